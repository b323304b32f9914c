"""The converter's matrix products on the CPU (the recurrent layers', and MatMul/Gemm by a 2-D
weight): MKL (torch's `mm`) or oneDNN, whichever this machine runs faster.

Why a choice: torch sends fp32 `mm`/`addmm` to MKL's sgemm, while torch's own `nn.LSTM`/`GRU`/
`RNN` run oneDNN's fused RNN, whose products are oneDNN's. Which library is faster depends on
the processor. Measured (2 threads, fp32): on an AMD EPYC, MKL took 2.2-2.4x oneDNN's time for
the training-sized LSTM's products ([32, 512]·[512, 2048] per step 572 vs 165 µs with the weight
packed once; [1600, 512]·[512, 2048] 16.9 vs 7.4 ms), so the converted LSTM ran at 2.1x torch's
time; on an Intel Xeon (AVX-512) MKL with row-major operands matched or beat oneDNN (h·Rᵀ
[8, 128]·[128, 512] 7.7 vs 49 µs; dW 28.0 vs 37.6 ms, one thread).

So the first product asks, once per process: both libraries time two representative products
(a graph MatMul's and a recurrent step's, the weight packed as the loops pack it), warmed up,
alternately, keeping each one's fastest run, and oneDNN is used only if it is clearly faster
(PREFER_ONEDNN_BELOW, on the geometric mean of the two ratios). A single product's median of
five, the earlier probe, read 0.75-0.96 from process to process on an AMD EPYC with AVX-512
where oneDNN is the right choice (the large LSTM row 1.00 with it, 1.21 with MKL), so the
choice flipped between runs; the two-product minimum reads 0.69-0.77 there.
GRADHEALTH_CPU_PRODUCTS=mkl or onednn fixes the choice. Small per-step products stay on `addmm`
either way (below PACKED_STEP_MIN_MACS its call overhead is lower). Results differ between the
libraries only by fp32 rounding (summation order). The oneDNN operators are those torch's own
compiler emits for CPU linear layers (`mkldnn::_linear_pointwise`, `_reorder_linear_weight`); a
build without them uses MKL.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

# MatMul / Gemm by a 2-D weight go through oneDNN (a differentiable Function) from this many
# multiply-adds: below it the Function's own cost and oneDNN's operand copies eat the gain
GRAPH_PRODUCT_MIN_MACS = 1 << 22
# Per-step products below this many multiply-adds stay on addmm: at [8, 128]·[128, 512]
# (0.5 M) addmm took 15.6 µs, oneDNN 18.9 µs with a packed weight (AMD EPYC, one thread).
PACKED_STEP_MIN_MACS = 1 << 21
# oneDNN is chosen when its time is below this fraction of MKL's on the probe products: a clear
# win only, so that machines where the two are close keep torch's default.
PREFER_ONEDNN_BELOW = 0.9
# (m, k, n, packed): a graph product of ~0.13 G multiply-adds (a few ms per library) and a
# training-sized LSTM step's h·Rᵀ with R packed for its batch, as the loops run it
_PROBES = ((256, 512, 1024, False), (32, 512, 2048, True))
_PROBE_ROUNDS = 9
_CHOICE_ENV = "GRADHEALTH_CPU_PRODUCTS"


@functools.cache
def _onednn_operators_work() -> bool:
    """Whether this torch build has the oneDNN linear operators (tried once, on tiny data)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 2)
        plain = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        added = torch.ops.mkldnn._linear_pointwise.binary(x, plain, packed, None, "add")
    except (AttributeError, RuntimeError):
        return False
    return bool((plain == 3).all() and (added == 6).all())


def _fastest_s(runs: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Each run's fastest time over _PROBE_ROUNDS, the runs alternated (a busy machine slows
    both alike) after three warm-up calls each (first-call allocations, oneDNN's kernel
    generation)."""
    for run in runs.values():
        for _ in range(3):
            run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(_PROBE_ROUNDS):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _probe(m: int, k: int, n: int, packed: bool, generator: torch.Generator) -> tuple[float, str]:
    """oneDNN's time over MKL's for [m, k]·[k, n], and the two times as text."""
    a, w = torch.randn(m, k, generator=generator), torch.randn(n, k, generator=generator)
    w_t = w.t().contiguous()  # MKL is given row-major operands (see the module doc)
    weight = torch.ops.mkldnn._reorder_linear_weight(w, m) if packed else w
    with torch.no_grad():
        best = _fastest_s(
            {
                "mkl": lambda: torch.mm(a, w_t),
                "onednn": lambda: torch.ops.mkldnn._linear_pointwise(
                    a, weight, None, "none", [], ""
                ),
            }
        )
    mkl_ms, onednn_ms = best["mkl"] * 1e3, best["onednn"] * 1e3
    text = f"[{m}, {k}]·[{k}, {n}]: MKL {mkl_ms:.3f} ms, oneDNN {onednn_ms:.3f} ms"
    return best["onednn"] / best["mkl"], text


@functools.cache
def onednn_preferred() -> bool:
    """Whether fp32 CPU products go through oneDNN in this process (see the module doc)."""
    forced = os.environ.get(_CHOICE_ENV, "").lower()
    if forced in ("mkl", "onednn"):
        return forced == "onednn" and _onednn_operators_work()
    if forced:
        logger.warning("%s=%r: expected mkl or onednn; choosing by timing", _CHOICE_ENV, forced)
    if not _onednn_operators_work():
        return False
    generator = torch.Generator().manual_seed(0)
    probes = [_probe(*shape, generator) for shape in _PROBES]
    ratios, timings = [r for r, _ in probes], [t for _, t in probes]
    ratio = math.prod(ratios) ** (1 / len(ratios))
    chosen = ratio < PREFER_ONEDNN_BELOW
    logger.info(
        "CPU products: %s (oneDNN/MKL %.2f; probes %s)",
        "oneDNN" if chosen else "MKL",
        ratio,
        "; ".join(timings),
    )
    return chosen


def _use_onednn(x: Tensor, weight: Tensor) -> bool:
    """oneDNN for fp32 CPU operands where it is preferred; never for an empty product (oneDNN
    refuses a zero-sized dimension: a one-step sequence has no later steps for dR)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.numel() > 0
        and weight.numel() > 0
        and onednn_preferred()
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x·weightᵀ (+ bias) for x [..., K], weight [N, K]; transposed operands are fine (oneDNN
    reads strides; MKL is only given row-major ones by the callers)."""
    if _use_onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)


def mm(a: Tensor, b: Tensor) -> Tensor:
    """a·b for 2-D a [M, K], b [K, N]."""
    if _use_onednn(a, b):
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    return torch.mm(a, b)


def packed_step_weight(weight: Tensor, batch: int) -> Tensor | None:
    """`weight` [N, K] packed for oneDNN, for a loop that computes h·weightᵀ + other at every
    step with h [batch, K]; None where the loop should use addmm (MKL chosen, a small step, not
    fp32 on the CPU)."""
    steps_macs = batch * weight.shape[0] * weight.shape[1]
    if steps_macs < PACKED_STEP_MIN_MACS or not _use_onednn(weight, weight):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch)


def weight_product(a: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor | None:
    """a·weightᵀ (+ bias) through oneDNN, differentiable, for a [..., K] and a 2-D weight
    [N, K] (bias [N] or None): the converter's MatMul and Gemm by a weight where this machine
    prefers oneDNN. None where that does not apply and the caller runs torch's own product:
    not fp32 on the CPU, under autocast (whose casts torch's products carry), a bias of
    another shape, or below GRAPH_PRODUCT_MIN_MACS. On an AMD EPYC (Zen 5) this took a
    4-layer d=256 transformer encoder's pass from 57 to 37 ms (one thread)."""
    if (
        a.dim() < 2
        or weight.dim() != 2
        or a.shape[-1] != weight.shape[1]
        or a.dtype != weight.dtype
        or torch.is_autocast_enabled(a.device.type)
        or (bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]))
        or (bias is not None and bias.dtype != a.dtype)
        or a.numel() * weight.shape[0] < GRAPH_PRODUCT_MIN_MACS
        or not _use_onednn(a, weight)
    ):
        return None
    out: Tensor = _OneDNNLinear.apply(a, weight, bias)
    return out


class _OneDNNLinear(torch.autograd.Function):
    """a·weightᵀ + bias forward and backward through oneDNN's inner product."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(a, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(a, weight, bias, "none", [], "")

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        a, weight = ctx.saved_tensors
        need_a, need_weight, need_bias = ctx.needs_input_grad
        rows = grad.reshape(-1, grad.shape[-1])  # [M, N]
        da = dweight = dbias = None
        if need_a:  # grad·weight, with weight read as [K, N] (oneDNN copies the transpose)
            da = mm(rows, weight).view(a.shape)
        if need_weight:
            dweight = mm(rows.t(), a.reshape(-1, a.shape[-1]))
        if need_bias and ctx.has_bias:
            dbias = rows.sum(0)
        return da, dweight, dbias
