"""On-device statistics of activations and parameters, float32 whatever the model's dtype.

Nothing here moves data to the host: each function returns 0-dim (or small) tensors on the
tensor's device; measure.py transfers everything once at the end of the pass.

Definitions (also in the report's docs):
- saturated_fraction: fraction of activation entries (all samples × units) whose local
  derivative is below `SATURATION_DERIVATIVE` (0.01). sigmoid: σ(1−σ); tanh: 1−t²;
  softsign: (1−|y|)²; hardsigmoid/hardtanh: 0 at their bounds (y ≤ 0 or y ≥ 1 / |y| ≥ 1).
- dead_fraction: fraction of units (every position of the output except the batch axis 0)
  that are exactly zero for every sample of the batch (ReLU-like activations only).
- fp16 underflow fraction: entries g with g ≠ 0 and |g| < 2⁻²⁴ (the smallest fp16 subnormal),
  i.e. non-zero gradients that fp16 would round to zero or to its coarsest subnormal, divided by
  all entries. Overflow fraction: entries with |g| > 65504 (fp16 max), non-finite excluded.
  In a pass run in fp16 (autocast) that count is useless: the gradients that underflow are
  already exactly 0 there. Such runs pass `reference` (the same batch's gradients from a
  second pass in fp32, same dropout masks), and the underflow count is the entries that are
  exactly 0 in the fp16 pass but non-zero in the fp32 reference (`flushed_counts`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

SATURATION_DERIVATIVE = 0.01
FP16_TINY = 2.0**-24
FP16_MAX = 65504.0


# Saturation thresholds as a distance from the activation's centre: for sigmoid, σ(1−σ) < 0.01
# ⇔ |σ − ½| > ½ − c with c = (1 − √0.96)/2; for tanh, 1 − t² < 0.01 ⇔ |t| > √0.99; for
# softsign, (1 − |y|)² < 0.01 ⇔ |y| > 0.9. (centre, threshold, strict)
_SATURATION = {
    "sigmoid": (0.5, 0.5 - (1.0 - (1.0 - 4 * SATURATION_DERIVATIVE) ** 0.5) / 2, True),
    "tanh": (0.0, (1.0 - SATURATION_DERIVATIVE) ** 0.5, True),
    "softsign": (0.0, 1.0 - SATURATION_DERIVATIVE**0.5, True),
    "hardsigmoid": (0.5, 0.5, False),  # derivative 0 at and beyond the bounds 0 and 1
    "hardtanh": (0.0, 1.0, False),
}


def saturated_count(y: torch.Tensor, activation: str) -> torch.Tensor:
    """Entries of activation output `y` whose local derivative < SATURATION_DERIVATIVE."""
    rule = _SATURATION.get(activation)
    if rule is None:
        return torch.zeros((), device=y.device)
    centre, threshold, strict = rule
    if not strict:
        return ((_float32(y) - centre).abs_() >= threshold).sum().float()
    if y.device.type == "cpu":
        return _saturated_by_clamp(y, centre, threshold)
    return _saturated_by_hardshrink(y, centre, threshold)


def _saturated_by_clamp(y: torch.Tensor, centre: float, threshold: float) -> torch.Tensor:
    """Strict count on the CPU: sign(max(|y − c| − t, 0)) is 1 exactly where |y − c| > t (t
    in float32; NaN → 0), summed as floats: no bool tensor (bool reductions and bool→float
    conversions are the slow paths on CPU). Six cheap passes; hardshrink, sign and an L1 norm
    cost 2.4× as much CPU time for the same count."""
    distance = (_float32(y) - centre).abs_()
    return distance.sub_(threshold).clamp_(min=0.0).sign_().sum()


def _saturated_by_hardshrink(y: torch.Tensor, centre: float, threshold: float) -> torch.Tensor:
    """Strict count on a GPU, equal to `_saturated_by_clamp`: Σ|sign(hardshrink(y − c, t))|.
    hardshrink keeps exactly the entries with |y − c| > t (compared with t in float32, as
    `d − t > 0` is) and zeroes the rest, sign makes them ±1 (NaN → 0: not counted), the L1
    norm sums them. Three kernels (four off-centre) instead of six: on a GPU each is a launch
    and host time the device waits through, for every saturating layer. Exact integers below
    2^24 entries, as the float sum."""
    offset = _float32(y) - centre if centre else _float32(y)
    return torch.linalg.vector_norm(torch.sign(F.hardshrink(offset, threshold)), ord=1)


def unit_peaks(y: torch.Tensor, non_negative: bool = False) -> torch.Tensor:
    """Per unit (all axes but the batch axis 0), the largest |output| over the batch; a unit
    is dead when its peak is 0. Kept as a max so micro-batches combine with `maximum`.
    `non_negative` (ReLU outputs): skip the activation-sized |y| temporary."""
    y = _detached(y)
    if y.dim() == 0:
        return _float32(y.abs().reshape(1))
    return _float32((y if non_negative else y.abs()).amax(dim=0))


def _detached(y: torch.Tensor) -> torch.Tensor:
    # the probes call these with gradient recording off (no graph is recorded: the output
    # itself is read), or pass detached outputs; a `detach` would be one more dispatch
    return y.detach() if y.requires_grad and torch.is_grad_enabled() else y


def alive_units(y: torch.Tensor) -> torch.Tensor:
    """Bool mask over the units: non-zero for some sample of the batch."""
    return unit_peaks(y) > 0


def moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) in float32, on the device, in a numerically stable form.

    Not Σy²/n − mean²: that difference cancels catastrophically when |mean| ≫ std (an output
    offset by a large bias: 1e4 ± 1 in float32 keeps no digit of the variance). On CUDA
    `torch.var_mean` (one kernel, no temporary); on the CPU, where `var_mean` costs ~20× two
    plain sums (ResNet-50's measure/plain went 1.19× → 1.64×, bench/overhead.py), the same
    sums of the data shifted by its first sample's mean (`shifted_moments`)."""
    if y.device.type == "cpu":
        return shifted_moments(y)
    return var_mean_moments(y)


def var_mean_moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = _detached(y)
    if x.dtype != torch.float32:
        x = x.float()  # half-precision outputs: reduce in float32, as the other statistics
    if x.numel() == 0:
        zero = torch.zeros((), device=x.device)
        return zero, zero
    var, mean = torch.var_mean(x, correction=0)
    return mean, var


def shifted_moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance from Σd and Σd² of d = y − c, c the mean of the first sample
    (`y[0]`, a view: no copy, no host sync). The cancellation in Σd²/n − (Σd/n)² is then
    relative to (mean − c)², which is of the order of the spread itself rather than mean²
    (the "shifted data" algorithm; exact up to float32 accumulation of Σd²)."""
    x = _detached(y)
    n = x.numel()
    if n == 0:
        zero = torch.zeros((), device=x.device)
        return zero, zero
    shift = x[0].mean(dtype=torch.float32) if x.dim() else x.float()
    d = x.float() - shift  # one temporary of the output's size, freed on return
    offset = d.sum() / n
    var = torch.linalg.vector_norm(d).square() / n - offset.square()
    return shift + offset, var.clamp_min(0.0)


def combine_moments(parts: Sequence[tuple[int, float, float]]) -> tuple[int, float, float]:
    """(count, mean, biased variance) of the union of parts given as (count, mean, variance):
    Chan et al.'s pairwise update, in host floats (micro-batches of one layer output)."""
    n, mean, m2 = 0, 0.0, 0.0
    for n_b, mean_b, var_b in parts:
        if n_b <= 0:
            continue
        total = n + n_b
        delta = mean_b - mean
        mean += delta * n_b / total
        m2 += var_b * n_b + delta * delta * n * n_b / total
        n = total
    return n, mean, (m2 / n if n else 0.0)


def _float_bits(value: float) -> int:
    return int(torch.tensor([value], dtype=torch.float32).view(torch.int32).item())


# |g| compared through the IEEE-754 bit pattern of float32 (sign bit cleared), which orders
# non-negative floats like their values: integer arithmetic has no slow path for subnormal
# gradients (exactly the values underflow counting is about, and 100× slower as floats on CPU),
# and NaN/inf are simply the patterns at or above the exponent-all-ones mark.
_TINY_BITS = _float_bits(FP16_TINY)
_FP16_MAX_BITS = _float_bits(FP16_MAX)
_NON_FINITE_BITS = 0x7F800000
_MAGNITUDE_MASK = 0x7FFFFFFF


_CPU_CHUNK = 1 << 19  # 2 MiB of float32 (8 MiB of rows): temporaries stay on the heap


def _indicator_rows(flat: torch.Tensor) -> torch.Tensor:
    """[4, n] float 0/1 rows for a 1-D float32 tensor: non-finite, |g| < 2^-24 (zeros
    included), g == 0, |g| > 65504 (non-finite included)."""
    # magnitude bit patterns as float32: exact for the integer order up to 1 part in 2^24 of
    # the thresholds, and plain (never subnormal) floats, so all that follows is fast arithmetic
    bits = (flat.view(torch.int32) & _MAGNITUDE_MASK).float()
    rows = torch.empty((4, flat.numel()), device=flat.device)
    # indicator(bits < t) = clamp(t − bits, 0, 1): both sides are integers, so exactly 0 or 1
    # (negate-then-add: a scalar-first `torch.sub(c, t, out=)` is a slow broadcast path)
    # (the thresholds are exact float32 values; a finite |g| within 64 ulps of FLT_MAX, or
    # within 32 ulps below 2^-24 / above 65504, rounds onto the threshold: 1 part in 2^17)
    torch.add(bits, -float(_NON_FINITE_BITS), out=rows[0]).add_(1.0).clamp_(0.0, 1.0)
    torch.neg(bits, out=rows[1]).add_(float(_TINY_BITS)).clamp_(0.0, 1.0)
    torch.neg(bits, out=rows[2]).add_(1.0).clamp_(0.0, 1.0)
    torch.add(bits, -float(_FP16_MAX_BITS), out=rows[3]).clamp_(0.0, 1.0)
    return rows


def _indicator_rows_by_comparison(flat: torch.Tensor) -> torch.Tensor:
    """`_indicator_rows` as one comparison kernel per row (the GPU path, where bytes moved are
    the cost: 2 passes per row instead of 6). Equal entry by entry: the float bit patterns and
    thresholds are integer-valued floats, so every difference `_indicator_rows` forms rounds to
    an integer-valued float with the sign of the exact difference, and its clamp to [0, 1] is
    1 exactly where the comparison below holds (bits ≥ inf-bits, bits < tiny-bits, bits < 1,
    bits > max-bits)."""
    bits = (flat.view(torch.int32) & _MAGNITUDE_MASK).float()
    rows = torch.empty((4, flat.numel()), device=flat.device)
    comparisons = (
        (torch.ge, float(_NON_FINITE_BITS)),
        (torch.lt, float(_TINY_BITS)),
        (torch.lt, 1.0),
        (torch.gt, float(_FP16_MAX_BITS)),
    )
    for row, (compare, threshold) in zip(rows, comparisons, strict=True):
        try:  # a float `out` takes the 0/1 result in the same kernel
            compare(bits, threshold, out=row)
        except RuntimeError:  # a backend without dtype-casting comparison outputs
            row.copy_(compare(bits, threshold))
    return rows


def _chunked_sums(flat: torch.Tensor) -> torch.Tensor:
    chunks = flat.split(_CPU_CHUNK)
    if len(chunks) == 1:
        return _indicator_rows(flat).sum(dim=1)
    return torch.stack([_indicator_rows(c).sum(dim=1) for c in chunks]).sum(dim=0)


def counts_per_parameter(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """[4, n_params] indicator counts, parameter by parameter in chunks. The CPU path: big
    fresh temporaries cost more in page faults (allocations above glibc's mmap threshold are
    new pages every time) than the arithmetic."""
    return torch.stack([_chunked_sums(g.reshape(-1).float()) for g in grads], dim=1)


# The GPU path classifies gradients in buckets of at most this many entries: the bit patterns and
# the four rows are 6× a bucket's bytes, so the temporaries stay under ~96 MiB for any model (one
# concatenation of everything needed 6× the parameters: a 24-layer width-1024 MLP peaked at 2.25×
# its plain step's memory on an H100, and a billion-parameter model would need 24 GB more).
GPU_BUCKET_ENTRIES = 1 << 22


def counts_by_concatenation(
    grads: Sequence[torch.Tensor], bucket_entries: int = GPU_BUCKET_ENTRIES
) -> torch.Tensor:
    """[4, n_params] indicator counts from a few concatenations: a fixed number of kernels per
    bucket of `bucket_entries` entries, whatever the parameter count (the GPU path: launches,
    not bytes, are the cost). Parameters larger than a bucket are cut into pieces. Per piece
    the sums are one `_foreach_norm(ord=1)` over views of the rows (Σ|0/1| = the count), not a
    slice-and-sum kernel per parameter and row; each bucket is concatenated in one C++ call
    (`_flattened`). No index tensor is built: that would be a host→device copy mid-pass."""
    pieces_per_param = []
    buckets: list[list[torch.Tensor]] = []
    filled = 0
    for g in grads:
        pieces = [p for p in g.reshape(-1).split(bucket_entries) if p.numel()]
        pieces_per_param.append(len(pieces))  # 0: an empty parameter (fused kernels skip it)
        for piece in pieces:
            if not buckets or filled + piece.numel() > bucket_entries:
                buckets.append([])
                filled = 0
            buckets[-1].append(piece)
            filled += piece.numel()
    columns = []
    for bucket in buckets:
        rows = _indicator_rows_by_comparison(_flattened(bucket))
        segments = [segment for row in rows for segment in row.split([p.numel() for p in bucket])]
        columns.append(torch.stack(torch._foreach_norm(segments, 1)).reshape(4, len(bucket)))
    device = grads[0].device if grads else torch.device("cpu")
    by_piece = torch.cat(columns, dim=1) if columns else torch.zeros((4, 0), device=device)
    if all(n == 1 for n in pieces_per_param):  # the usual case: one piece per parameter
        return by_piece
    per_param = by_piece.split(pieces_per_param, dim=1)
    zero = torch.zeros(4, device=device)
    return torch.stack(
        [c[:, 0] if c.shape[1] == 1 else c.sum(dim=1) if c.shape[1] else zero for c in per_param],
        dim=1,
    )


def _flattened(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """All entries as one float32 vector: one C++ call (not a reshape and a cast per tensor);
    other dtypes are cast once after (fp16/bf16 → float32 is exact, as a cast per tensor)."""
    flat = torch._C._nn.flatten_dense_tensors(list(grads))
    return flat if flat.dtype == torch.float32 else flat.float()


def _float32(t: torch.Tensor) -> torch.Tensor:
    # `.float()` of a float32 tensor is no kernel but still a dispatch; 2×161 of them on a
    # ResNet-50 are ~0.5 ms of host time, which a GPU spends waiting
    return t if t.dtype == torch.float32 else t.float()


def _norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[n] float32 L2 norms by one `_foreach_norm`; float32 tensors (the usual case) are
    passed as they are, without a cast call per tensor and per norm."""
    if all(t.dtype == torch.float32 for t in tensors):
        return torch.stack(torch._foreach_norm(list(tensors)))
    return torch.stack([_float32(n) for n in torch._foreach_norm([_float32(t) for t in tensors])])


def flushed_counts(
    grads: Sequence[torch.Tensor], reference: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """Per parameter, the entries exactly 0 in `grads` (an fp16 pass) whose fp32 `reference`
    gradient is non-zero: the ones fp16 flushed to zero. A missing reference counts as zeros."""
    counts = [
        torch.logical_and(g == 0, r != 0).sum().float()
        if r is not None
        else torch.zeros((), device=g.device)
        for g, r in zip(grads, reference, strict=True)
    ]
    return torch.stack(counts)


def parameter_statistics(
    weights: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    reference: Sequence[torch.Tensor | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-parameter vectors (one entry per tensor): norms by `_foreach_norm`; counts from the
    gradients classified through their magnitude bit patterns into four 0/1 rows, summed per
    parameter. Why bit patterns: float arithmetic on subnormal gradients (exactly the values
    underflow counting is about) takes a microcode slow path on CPUs, ~100× slower; bool
    comparisons and bool reductions are slow paths on CPU too. A missing gradient counts as
    zeros. `reference` (fp16 runs only): fp32 gradients of the same pass; the underflow count
    is then `flushed_counts` instead (see the module docstring).
    """
    keys = ("grad_norm", "weight_norm", "non_finite", "underflow", "overflow")
    if not weights:
        return {k: torch.zeros(0) for k in keys}
    device = weights[0].device
    with torch.no_grad():  # parameters require grad: no autograd record, no per-tensor detach
        grads_or_zero = [
            g if g is not None else torch.zeros_like(w) for w, g in zip(weights, grads, strict=True)
        ]
        per_param = (
            counts_per_parameter(grads_or_zero)
            if device.type == "cpu"
            else counts_by_concatenation(grads_or_zero)
        )  # [4, n_params]
        grad_norms = _norms(grads_or_zero)
        weight_norms = _norms(weights)
        underflow = (
            per_param[1] - per_param[2]
            if reference is None
            else flushed_counts(grads_or_zero, reference)
        )
    return {
        "grad_norm": grad_norms,
        "weight_norm": weight_norms,
        "non_finite": per_param[0],
        "underflow": underflow,
        "overflow": per_param[3] - per_param[0],
    }
