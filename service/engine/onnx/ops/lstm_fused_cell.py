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

These loops are the CUDA half of lstm_sequence's autograd Function (`forward_loops`,
`backward_loops`): the input projection, the time flip of a reverse direction, the outputs'
shapes and the weights' gradients are the Function's, as on the CPU, so an LSTM node is one
autograd node on either device (it was ~8 on CUDA: the bias sum, views, the projection and
the loops each their own, which is host time on a GPU that waits for the host).

The cell kernels use torch's gate order i, f, g, o; ONNX orders i, o, f, c. `forward_loops`
reorders W, R and the bias once per call and `backward_loops` the gate gradients back, unless
they come in torch's order already (the converter feeds a legacy export's LSTM torch's
parameters directly: service/engine/onnx/recurrent_weights.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

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


@dataclass
class FusedRun:
    """What the backward of one fused forward needs besides the saved tensors: the loops that
    ran (None: the per-step loops, eager or replayed), R in torch's gate order, and the
    permutation from torch's order back to the weights' (None: already torch's)."""

    loops: lstm_persistent.PersistentLoops | None
    R_torch: Tensor
    to_weights_order: Tensor | None


def forward_loops(
    X: Tensor,
    W: Tensor,
    R: Tensor,
    bias: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    gate_blocks: list[int],
) -> tuple[Tensor, Tensor, Tensor, FusedRun]:
    """The forward of lstm_sequence's Function on CUDA, X in the order the steps run:
    (h0 then Y [T + 1, B, H], cells [T, B, H], workspaces [T, B, 4H] (activated gates,
    torch's order), what `backward_loops` needs). `gate_blocks`: where W, R and bias hold
    i, o, f, c."""
    order = _torch_gate_order(R.shape[1], W.device, gate_blocks)
    if order is not None:
        W, R = W.index_select(0, order), R.index_select(0, order)
        bias = None if bias is None else bias.index_select(0, order)
    projected = F.linear(X, W, bias)  # [T, B, 4H]: the input side of every step at once
    # all steps in one kernel each way where that applies (lstm_persistent.py), else the
    # per-step loops, replayed as CUDA graphs once this shape repeats (cuda_graph_loops.py)
    loops = lstm_persistent.loops_for(projected)
    if loops is None:
        states, cells, workspaces = cuda_graph_loops.run(forward_steps, projected, R, h0, c0)
    else:
        states, cells, workspaces = loops.forward(projected, R, h0, c0)
    back = None if order is None else order.argsort()
    return states, cells, workspaces, FusedRun(loops, R, back)


def backward_loops(
    run: FusedRun,
    dY: Tensor,
    dh_last: Tensor,
    dc_last: Tensor,
    cells: Tensor,
    workspaces: Tensor,
    c0: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """(∂L/∂gates [T, B, 4H] in the weights' gate order, ∂L/∂h_t [T, B, H], ∂L/∂c0) for
    `forward_loops`'s run."""
    inputs = (dY.contiguous(), dh_last, dc_last, cells, workspaces, c0, run.R_torch)
    if run.loops is None:
        dgates, dc0, dhidden = cuda_graph_loops.run(backward_steps, *inputs)
    else:
        dgates, dc0, dhidden = run.loops.backward(*inputs)
    if run.to_weights_order is not None:
        dgates = dgates.index_select(2, run.to_weights_order)
    return dgates, dhidden, dc0


def forward_steps(projected: Tensor, R: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, ...]:
    """The forward loop: (h0 then every h_t [T + 1, B, H], cells, workspaces), each stacked
    over the steps. A workspace holds the step's activated gates, which the backward kernel
    reads."""
    R_t = R.t()
    h, c = h0, c0
    hiddens, cells, workspaces = [h0], [], []
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


lstm_persistent.register_fallback(forward_steps, backward_steps)
