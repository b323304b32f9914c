"""The CUDA LSTM's step loops as two persistent Triton kernels (_lstm_triton.py): every step of a
direction in one launch forward and one backward.

Why, when they apply, and what happens when they fail: recurrent_persistent.py, the machinery
the LSTM's, GRU's and tanh RNN's kernels share. At small sizes the per-step loops of
lstm_fused_cell are bound by kernel latency, not arithmetic: even replayed as CUDA graphs a
step costs a product and a cell kernel each way, ~96 dependent kernels per layer for 24 steps.

The contract is lstm_fused_cell's loops' (same arguments, same outputs, torch's gate order,
the activated gates as the backward's workspace), so lstm_fused_cell's forward_node and
backward_node take these loops in place of the eager or captured ones (`loops_for`). Every step
is still computed one after the other and the backward still writes ∂L/∂h_t of every step
(`grad_hiddens`).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from service.engine.onnx.ops import recurrent_persistent
from service.engine.onnx.ops.recurrent_persistent import StepsFn, check_tensors, launch

KERNELS_MODULE = "service.engine.onnx.ops._lstm_triton"

# Shared names that the LSTM's tests and bench scripts read here (the knobs are set on
# recurrent_persistent: these are copies)
MAX_HIDDEN = recurrent_persistent.MAX_HIDDEN
SPIN_LIMIT = recurrent_persistent.SPIN_LIMIT
PersistentLoops = recurrent_persistent.PersistentLoops
barrier_failures = recurrent_persistent.barrier_failures
_grid, _tiles = recurrent_persistent._grid, recurrent_persistent._tiles

_LOOPS = PersistentLoops(sys.modules[__name__], "LSTM")
kernels = _LOOPS.kernels
self_check = _LOOPS.self_check
register_fallback = _LOOPS.register_fallback  # lstm_fused_cell registers its per-step loops


def loops_for(projected: Tensor) -> recurrent_persistent.PersistentLoops | None:
    """The persistent loops when they apply to this LSTM's projected input [T, B, 4H] (or its
    gates, same shape), else None."""
    return _LOOPS if _LOOPS.applies(projected, projected.shape[-1] // 4) else None


def forward_steps(projected: Tensor, R: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, ...]:
    """The forward loop in one kernel: (h0 then every h_t [T + 1, B, H], cells [T, B, H],
    activated gates [T, B, 4H]), as lstm_fused_cell.forward_steps."""
    module = kernels()
    assert module is not None
    steps, batch, four_h = projected.shape
    hidden = four_h // 4
    hiddens = projected.new_empty(steps + 1, batch, hidden)
    cells = projected.new_empty(steps, batch, hidden)
    gates = torch.empty_like(projected)
    # in the kernel's order, outputs among the inputs
    tensors: tuple[Tensor, ...] = (projected.contiguous(), R.t().contiguous(), h0.contiguous())
    tensors += (hiddens, c0.contiguous(), cells, gates)
    launch(module.lstm_forward_kernel, tensors, steps, batch, hidden)
    return hiddens, cells, gates


def backward_steps(
    dY: Tensor,
    dh_last: Tensor,
    dc_last: Tensor,
    cells: Tensor,
    gates: Tensor,
    c0: Tensor,
    R: Tensor,
) -> tuple[Tensor, ...]:
    """The backward loop in one kernel: (∂L/∂gates [T, B, 4H], ∂L/∂c0, ∂L/∂h_t [T, B, H]), as
    lstm_fused_cell.backward_steps."""
    module = kernels()
    assert module is not None
    steps, batch, hidden = cells.shape
    grad_gates = torch.empty_like(gates)
    grad_hiddens = torch.empty_like(cells)
    grad_c0 = torch.empty_like(c0)
    inputs: tuple[Tensor, ...] = (dY.contiguous(), dh_last.contiguous(), dc_last.contiguous())
    inputs += (cells, gates, c0.contiguous(), R.contiguous())
    outputs = (grad_gates, grad_hiddens, grad_c0)
    launch(module.lstm_backward_kernel, inputs + outputs, steps, batch, hidden)
    return grad_gates, grad_c0, grad_hiddens


def check_passes(
    forward: StepsFn, backward: StepsFn, device: torch.device, hidden: int
) -> list[Tensor]:
    """The self-check's problem (recurrent_persistent) through `forward` then `backward`:
    every output of both."""
    randn = check_tensors(device)
    steps, batch = recurrent_persistent.CHECK_STEPS, recurrent_persistent.CHECK_BATCH
    projected, R = randn(steps, batch, 4 * hidden), randn(4 * hidden, hidden, scale=hidden**-0.5)
    h0, c0 = randn(batch, hidden), randn(batch, hidden)
    grads = (randn(steps, batch, hidden), randn(batch, hidden), randn(batch, hidden))
    states, cells, gates = forward(projected, R, h0, c0)
    return [states, cells, gates, *backward(*grads, cells, gates, c0, R)]
