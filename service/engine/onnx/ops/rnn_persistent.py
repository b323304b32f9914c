"""The CUDA tanh RNN's step loops as two persistent Triton kernels (_rnn_triton.py): every step
of a direction in one launch forward and one backward, as the LSTM's (lstm_persistent.py; the
machinery they share, when they apply and what happens when they fail: recurrent_persistent.py).

The contract is rnn_sequence's Python loops' (`_forward_steps`, `_backward_steps`: same
arguments, same outputs), so rnn_sequence's forward_node and backward_node take these loops in
place of the captured ones (`loops_for`). Unlike the Python forward, the kernel writes Y to a
buffer of its own, not over the projected input (rnn_sequence uses only what the loop returns).
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

KERNELS_MODULE = "service.engine.onnx.ops._rnn_triton"

_LOOPS = PersistentLoops(sys.modules[__name__], "tanh RNN")
kernels = _LOOPS.kernels
self_check = _LOOPS.self_check
register_fallback = _LOOPS.register_fallback  # rnn_sequence registers its per-step loops


def loops_for(projected: Tensor) -> PersistentLoops | None:
    """The persistent loops when they apply to this RNN's projected input [T, B, H] (or its Y,
    same shape), else None."""
    return _LOOPS if _LOOPS.applies(projected, projected.shape[-1]) else None


def forward_steps(projected: Tensor, R: Tensor, h0: Tensor) -> Tensor:
    """The forward loop in one kernel: Y [T, B, H], as rnn_sequence._forward_steps."""
    module = kernels()
    assert module is not None
    steps, batch, hidden = projected.shape
    Y = projected.new_empty(steps, batch, hidden)
    tensors = (projected.contiguous(), R.t().contiguous(), h0.contiguous(), Y)
    launch(module.rnn_forward_kernel, tensors, steps, batch, hidden)
    return Y


def backward_steps(dY: Tensor, dh_last: Tensor, Y: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    """The backward loop in one kernel: (∂L/∂pre_t, ∂L/∂h_t), each [T, B, H], as
    rnn_sequence._backward_steps."""
    module = kernels()
    assert module is not None
    steps, batch, hidden = Y.shape
    grad_pre, grad_hiddens = Y.new_empty(steps, batch, hidden), Y.new_empty(steps, batch, hidden)
    inputs = (dY.contiguous(), dh_last.contiguous(), Y.contiguous(), R.contiguous())
    launch(module.rnn_backward_kernel, (*inputs, grad_pre, grad_hiddens), steps, batch, hidden)
    return grad_pre, grad_hiddens


def check_passes(
    forward: StepsFn, backward: StepsFn, device: torch.device, hidden: int
) -> list[Tensor]:
    """The self-check's problem (recurrent_persistent) through `forward` then `backward`:
    every output of both."""
    randn = check_tensors(device)
    steps, batch = recurrent_persistent.CHECK_STEPS, recurrent_persistent.CHECK_BATCH
    projected, R = randn(steps, batch, hidden), randn(hidden, hidden, scale=hidden**-0.5)
    h0, grads = randn(batch, hidden), (randn(steps, batch, hidden), randn(batch, hidden))
    Y = forward(projected, R, h0)
    return [Y, *backward(*grads, Y, R)]
