"""The whole-sequence LSTM on CUDA: the same step loop, each step's cell in one kernel.

On a GPU the CPU-side cost of launching kernels is what an unrolled LSTM pays for: lstm_sequence's
loop launches a product and six elementwise kernels per step forward and five backward, each
~10 µs of Python and dispatch, while the GPU idles (H100: a 2-layer LSTM, hidden 512, 50 steps,
batch 32 took 4.0× torch's cuDNN kernel that way). torch ships the per-step cell as one CUDA
kernel each way (`_thnn_fused_lstm_cell` and its backward, what `nn.LSTMCell` runs on CUDA), so
here a step is one product plus one cell kernel forward, one product plus one cell kernel
backward. Still one step at a time, and ∂L/∂h_t of every step is still at hand in the backward.
Once a shape repeats, both loops are replayed as CUDA graphs (cuda_graph_loops.py): on the H100
that took the same LSTM from 2.78× to 0.92× cuDNN's time (bench/README.md). For float32 with a
hidden size up to lstm_persistent.MAX_HIDDEN the loops run instead as one Triton kernel each
way (lstm_persistent.py), same contract.

The cell kernels use torch's gate order i, f, g, o; ONNX orders i, o, f, c. `lstm_fused_cell`
reorders W, R and the bias once per call (autograd carries the gradients back through that),
unless they come in torch's order already (the converter feeds a legacy export's LSTM torch's
parameters directly: service/engine/onnx/recurrent_weights.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from service.engine.onnx.ops import cuda_graph_loops, lstm_persistent
from service.engine.onnx.ops._sequence_common import block_rows

# The cell kernels, as module attributes so that tests on a machine without CUDA can put a
# pure-torch equivalent in their place (tests/unit/onnx/test_lstm_fused_cell.py).
cell_forward = torch.ops.aten._thnn_fused_lstm_cell
cell_backward = torch.ops.aten._thnn_fused_lstm_cell_backward_impl


def available(x: Tensor) -> bool:
    """The fused cell kernels exist for CUDA floating tensors."""
    return x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _torch_gate_order(hidden: int, device: torch.device, gate_blocks: list[int]) -> Tensor | None:
    """Row indices that gather torch's gate order (i, f, g, o) from weights whose ONNX gates
    i, o, f, c sit in blocks `gate_blocks`; None when they already are in torch's order."""
    blocks = [gate_blocks[k] for k in (0, 2, 3, 1)]  # torch's i, f, g, o are ONNX's i, f, c, o
    return None if blocks == [0, 1, 2, 3] else block_rows(blocks, hidden, device)


def lstm_fused_cell(
    X: Tensor,
    W: Tensor,
    R: Tensor,
    bias: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    hidden_grads: list[Tensor] | None,
    reversed_time: bool = False,
    gate_blocks: list[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """lstm_sequence's contract on CUDA, for X already in the order the steps run;
    `reversed_time`: X was flipped, so hidden_grads are flipped back. `gate_blocks`: where W,
    R and bias hold the gates i, o, f, c (None: ONNX's order)."""
    order = _torch_gate_order(R.shape[1], W.device, gate_blocks or [0, 1, 2, 3])
    W_t, R_t, b_t = W, R, bias
    if order is not None:
        W_t, R_t = W.index_select(0, order), R.index_select(0, order)
        b_t = None if bias is None else bias.index_select(0, order)
    projected = F.linear(X, W_t, b_t)  # [T, B, 4H]: the input side of every step at once
    Y, h, c = _FusedCellSequence.apply(projected, R_t, h0, c0, hidden_grads, reversed_time)
    return Y, h, c


def forward_steps(projected: Tensor, R: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, ...]:
    """The forward loop: (Y, cells, workspaces), each stacked over the steps. A workspace holds
    the step's activated gates, which the backward kernel reads."""
    R_t = R.t()
    h, c = h0, c0
    hiddens, cells, workspaces = [], [], []
    for p in projected.unbind(0):
        h, c, workspace = cell_forward(p, torch.mm(h, R_t), c)
        hiddens.append(h)
        cells.append(c)
        workspaces.append(workspace)
    return torch.stack(hiddens), torch.stack(cells), torch.stack(workspaces)


def backward_steps(
    dY: Tensor,
    dh_last: Tensor,
    dc_last: Tensor,
    cells: Tensor,
    workspaces: Tensor,
    c0: Tensor,
    R: Tensor,
) -> tuple[Tensor, ...]:
    """The backward loop: (∂L/∂gates [T, B, 4H], ∂L/∂c0, ∂L/∂h_t [T, B, H])."""
    steps = cells.shape[0]
    dgates: list[Tensor] = [dY] * steps  # placeholders, all overwritten
    dhidden: list[Tensor] = [dY] * steps
    dc = dc_last
    for t in range(steps - 1, -1, -1):
        # ∂L/∂h_t: through Y_t and (but for the last step) through step t+1's gates
        last = t == steps - 1
        dh = dY[t] + dh_last if last else torch.addmm(dY[t], dgates[t + 1], R)
        previous_cell = cells[t - 1] if t > 0 else c0
        dgates[t], dc, _ = cell_backward(dh, dc, previous_cell, cells[t], workspaces[t], False)
        dhidden[t] = dh
    return torch.stack(dgates), dc, torch.stack(dhidden)


class _FusedCellSequence(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        projected: Tensor,
        R: Tensor,
        h0: Tensor,
        c0: Tensor,
        hidden_grads: list[Tensor] | None,
        reversed_time: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # all steps in one kernel each way where that applies (lstm_persistent.py), else the
        # per-step loops, replayed as CUDA graphs once this shape repeats (cuda_graph_loops.py)
        loops = lstm_persistent.loops_for(projected)
        if loops is None:
            Y, cells, workspaces = cuda_graph_loops.run(forward_steps, projected, R, h0, c0)
        else:
            Y, cells, workspaces = loops.forward(projected, R, h0, c0)
        ctx.save_for_backward(R, h0, c0, Y, cells, workspaces)
        ctx.loops, ctx.hidden_grads, ctx.reversed_time = loops, hidden_grads, reversed_time
        return Y, Y[-1].clone(), cells[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dY: Tensor, dh_last: Tensor, dc_last: Tensor) -> tuple[Any, ...]:
        R, h0, c0, Y, cells, workspaces = ctx.saved_tensors
        inputs = (dY.contiguous(), dh_last, dc_last, cells, workspaces, c0, R)
        if ctx.loops is None:
            d_projected, dc0, dhidden = cuda_graph_loops.run(backward_steps, *inputs)
        else:
            d_projected, dc0, dhidden = ctx.loops.backward(*inputs)
        if ctx.hidden_grads is not None:
            ctx.hidden_grads.append(dhidden.flip(0) if ctx.reversed_time else dhidden)
        need_p, need_r, need_h0, need_c0 = ctx.needs_input_grad[:4]
        dR = None
        if need_r:  # Σ_t dgates_tᵀ·h_{t-1}, one product for all steps
            h_prev = torch.cat([h0.unsqueeze(0), Y[:-1]], 0).flatten(0, 1)
            dR = d_projected.flatten(0, 1).t().mm(h_prev)
        dh0 = torch.mm(d_projected[0], R) if need_h0 else None
        return d_projected if need_p else None, dR, dh0, dc0 if need_c0 else None, None, None


lstm_persistent.register_fallback(forward_steps, backward_steps)
