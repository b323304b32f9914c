"""The CUDA GRU's step loops as two persistent Triton kernels (_gru_triton.py): every step of a
direction in one launch forward and one backward, as the LSTM's (lstm_persistent.py; the
machinery they share, when they apply and what happens when they fail: recurrent_persistent.py).

The contract is gru_sequence's Python loops' (`_forward_steps`, `_backward_steps`: same
arguments, same outputs), so gru_sequence's forward_node and backward_node take these loops
in place of the captured ones (`loops_for`). Unlike the Python forward, the kernel leaves the
projected input as it is (the activated gates get their own buffer).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from service.engine.onnx.ops import recurrent_persistent
from service.engine.onnx.ops.recurrent_persistent import (
    PersistentLoops,
    StepsFn,
    check_tensors,
    launch,
)

KERNELS_MODULE = "service.engine.onnx.ops._gru_triton"

_LOOPS = PersistentLoops(sys.modules[__name__], "GRU")
kernels = _LOOPS.kernels
self_check = _LOOPS.self_check
register_fallback = _LOOPS.register_fallback  # gru_sequence registers its per-step loops


def loops_for(projected: Tensor) -> PersistentLoops | None:
    """The persistent loops when they apply to this GRU's projected input [T, B, 3H] (or its
    gates, same shape), else None."""
    return _LOOPS if _LOOPS.applies(projected, projected.shape[-1] // 3) else None


def forward_steps(
    projected: Tensor, R: Tensor, recurrent_bias: Tensor, h0: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The forward loop in one kernel: (activated gates z, r, n [T, B, 3H], fh = h_{t-1}·Rᵀ +
    recurrent_bias [T, B, 3H], Y [T, B, H]), as gru_sequence._forward_steps."""
    module = kernels()
    assert module is not None
    steps, batch, three_h = projected.shape
    hidden = three_h // 3
    gates = projected.new_empty(steps, batch, three_h)
    from_hidden = projected.new_empty(steps, batch, three_h)
    Y = projected.new_empty(steps, batch, hidden)
    inputs = (projected.contiguous(), R.t().contiguous(), recurrent_bias.contiguous())
    tensors = (*inputs, h0.contiguous(), gates, from_hidden, Y)
    launch(module.gru_forward_kernel, tensors, steps, batch, hidden)
    return gates, from_hidden, Y


def backward_steps(
    dY: Tensor,
    dh_last: Tensor,
    gates: Tensor,
    from_hidden: Tensor,
    h0: Tensor,
    Y: Tensor,
    R: Tensor,
) -> tuple[Tensor, Tensor]:
    """The backward loop in one kernel: (dgates [T, B, 4H] in slots z, r, fh_n, n; ∂L/∂h_t
    [T, B, H]), as gru_sequence._backward_steps."""
    module = kernels()
    assert module is not None
    steps, batch, hidden = Y.shape
    grad_gates = Y.new_empty(steps, batch, 4 * hidden)
    grad_hiddens = Y.new_empty(steps, batch, hidden)
    inputs: tuple[Tensor, ...] = (dY.contiguous(), dh_last.contiguous(), gates.contiguous())
    inputs += (from_hidden.contiguous(), h0.contiguous(), Y.contiguous(), R.contiguous())
    launch(module.gru_backward_kernel, (*inputs, grad_gates, grad_hiddens), steps, batch, hidden)
    return grad_gates, grad_hiddens


def check_passes(
    forward: StepsFn, backward: StepsFn, device: torch.device, hidden: int
) -> list[Tensor]:
    """The self-check's problem (recurrent_persistent) through `forward` then `backward`:
    every output of both."""
    randn = check_tensors(device)
    steps, batch = recurrent_persistent.CHECK_STEPS, recurrent_persistent.CHECK_BATCH
    projected, R = randn(steps, batch, 3 * hidden), randn(3 * hidden, hidden, scale=hidden**-0.5)
    recurrent_bias, h0 = randn(3 * hidden, scale=0.5), randn(batch, hidden)
    grads = (randn(steps, batch, hidden), randn(batch, hidden))
    gates, from_hidden, Y = forward(projected, R, recurrent_bias, h0)
    return [gates, from_hidden, Y, *backward(*grads, gates, from_hidden, h0, Y, R)]
