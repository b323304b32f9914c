"""Matrix products for the recurrent loops, through oneDNN where that is faster than `torch.mm`.

On x86 CPUs torch sends fp32 `mm`/`addmm` to MKL's sgemm; torch's own `nn.LSTM` runs oneDNN's
fused RNN, whose products are oneDNN's. On the AMD EPYC development machine MKL reached about 40 %
of oneDNN's speed for the recurrent shapes (one thread: [32, 512]·[512, 2048] 704 µs with
`addmm`, 292 µs with oneDNN and the weight packed once; [2048, 768]·[768, 512] 16.2 ms vs 6.8 ms),
so an unrolled LSTM built on `addmm` lost half its time to the library choice alone. The
operators used here are the ones torch's own compiler emits for CPU linear layers
(`torch.ops.mkldnn._linear_pointwise`, `_reorder_linear_weight`); where a build lacks them, or
for other devices and dtypes, every function falls back to plain torch.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# Below this many multiply-adds per step the call overhead dominates and `addmm` (which also
# writes into a preallocated buffer) is as fast: measured at [8, 128]·[128, 512], 15.6 µs both.
PACKED_STEP_MIN_MACS = 1 << 21


@functools.cache
def _operators_work() -> bool:
    """Whether this torch build has the oneDNN linear operators (probed once, on tiny data)."""
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


def usable(x: Tensor) -> bool:
    """oneDNN serves fp32 on the CPU; everything else goes through torch's own products."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and _operators_work()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x·weightᵀ (+ bias), for x [..., K] and weight [N, K] (non-contiguous operands are fine:
    oneDNN copies them, which is still faster than MKL on the transposed layout)."""
    if usable(x):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)


class StepProduct:
    """h·Wᵀ + other for one weight W [N, K] read at every step of a loop with a fixed batch:
    oneDNN with W packed once when the step is large enough to gain from it, else `addmm`."""

    def __init__(self, weight: Tensor, batch: int) -> None:
        self.weight_t = weight.t()
        self.packed: Tensor | None = None
        if usable(weight) and batch * weight.shape[0] * weight.shape[1] >= PACKED_STEP_MIN_MACS:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch)

    def __call__(self, h: Tensor, other: Tensor, out: Tensor) -> Tensor:
        """h·Wᵀ + other (other [batch, N], or [N] broadcast over the batch), in `out` (addmm)
        or in a new tensor (oneDNN writes no `out`): callers read the returned tensor and
        never assume `out` was written."""
        if self.packed is None:
            return torch.addmm(other, h, self.weight_t, out=out)
        if other.dim() == 1:  # a bias: oneDNN's own bias input
            return torch.ops.mkldnn._linear_pointwise(h, self.packed, other, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(h, other, self.packed, None, "add")
