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

These loops are the CUDA half of lstm_sequence's autograd Function, and the whole of each half
is one pure function (`forward_node`, `backward_node`): the input projection, the time flip of
a reverse direction, the loops and the weights' gradients. So an LSTM node is one autograd node
(it was ~8 on CUDA: the bias sum, views, the projection and the loops each their own), and
once its inputs repeat each half is one CUDA graph replay (pooled_cuda_graphs.py) instead of
~30 aten ops, a Triton launch and the Python between them, host time on a GPU that waits for
the host (bench/README.md, session 10).

The cell kernels use torch's gate order i, f, g, o; ONNX orders i, o, f, c. `forward_node`
reorders W, R and the bias once per call and `backward_node` the gate gradients back, unless
they come in torch's order already (the converter feeds a legacy export's LSTM torch's
parameters directly: service/engine/onnx/recurrent_weights.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from service.engine.onnx.ops import cuda_graph_loops, lstm_persistent
from service.engine.onnx.ops._sequence_common import block_rows
from service.engine.onnx.ops.lstm_products import GradPlan, input_grads, summed_bias

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


def forward_node(
    config: tuple[bool, tuple[int, ...]],
    X: Tensor,
    W: Tensor,
    R: Tensor,
    bias: Tensor | None,
    recurrent_bias: Tensor | None,
    h0: Tensor,
    c0: Tensor,
) -> tuple[Tensor | None, ...]:
    """lstm_sequence's forward on CUDA as one pure function of its inputs (as lstm_sequence
    takes them, X in the input's time order), which pooled_cuda_graphs replays: (h0 then every
    h_t [T + 1, B, H] in the order the steps ran, cells [T, B, H], workspaces [T, B, 4H]
    (activated gates, torch's order), Y in the input's order for a reverse direction (else
    None: the caller slices the states), h_T, c_T). `config`: (reverse, gate_blocks)."""
    reverse, gate_blocks = config
    batch, hidden = X.shape[1], R.shape[-1]
    W, R = W.reshape(-1, W.shape[-1]), R.reshape(-1, hidden)
    h0, c0 = h0.reshape(batch, hidden), c0.reshape(batch, hidden)
    X = (X.flip(0) if reverse else X).contiguous()
    bias = summed_bias(bias, recurrent_bias, hidden)
    order = _torch_gate_order(hidden, W.device, list(gate_blocks))
    if order is not None:
        W, R = W.index_select(0, order), R.index_select(0, order)
        bias = None if bias is None else bias.index_select(0, order)
    projected = F.linear(X, W, bias)  # [T, B, 4H]: the input side of every step at once
    # all steps in one kernel each way where that applies (lstm_persistent.py), else the
    # per-step loops, replayed as CUDA graphs once this shape repeats (cuda_graph_loops.py)
    loops = lstm_persistent.loops_for(projected)
    if loops is None:
        states, cells, gates = cuda_graph_loops.run(forward_steps, projected, R, h0, c0)
    else:
        states, cells, gates = loops.forward(projected, R, h0, c0)
    Y_reversed = states[1:].flip(0) if reverse else None
    # h_T and c_T as their own tensors: views of a saved buffer could be changed in place
    # by a caller and corrupt the backward
    return states, cells, gates, Y_reversed, states[-1].clone(), cells[-1].clone()


def backward_node(
    config: tuple[tuple[int, ...], GradPlan, bool],
    dY: Tensor | None,
    dh_last: Tensor | None,
    dc_last: Tensor | None,
    X: Tensor,
    W: Tensor,
    R: Tensor,
    h0: Tensor,
    c0: Tensor,
    gates: Tensor,
    cells: Tensor,
    states: Tensor,
) -> tuple[Tensor | None, ...]:
    """The backward of `forward_node`, one pure function too: the gradients of X, W, R, the
    biases, h0 and c0 (None where `plan` does not ask for them), then ∂L/∂h_t [T, B, H] in the
    input's time order when `collect`, else None. The forward's inputs as it was given them;
    an output's gradient None where the graph does not read it. `config`: (gate_blocks, plan,
    collect)."""
    gate_blocks, plan, collect = config
    steps, batch, hidden = cells.shape
    dY = cells.new_zeros(steps, batch, hidden) if dY is None else dY.reshape(steps, batch, hidden)
    dY = (dY.flip(0) if plan.reverse else dY).contiguous()
    dh_last = cells.new_zeros(batch, hidden) if dh_last is None else dh_last.reshape(batch, hidden)
    dc_last = cells.new_zeros(batch, hidden) if dc_last is None else dc_last.reshape(batch, hidden)
    X = (X.flip(0) if plan.reverse else X).contiguous()  # as the forward ran it
    W, R = W.reshape(-1, W.shape[-1]), R.reshape(-1, hidden)
    h0, c0 = h0.reshape(batch, hidden), c0.reshape(batch, hidden)
    order = _torch_gate_order(hidden, W.device, list(gate_blocks))
    R_torch = R if order is None else R.index_select(0, order)
    inputs = (dY, dh_last.contiguous(), dc_last.contiguous(), cells, gates, c0, R_torch)
    # the same loops as the forward's (either computes the other's backward: same contract)
    loops = lstm_persistent.loops_for(gates)
    if loops is None:
        dgates, dc0, dhidden = cuda_graph_loops.run(backward_steps, *inputs)
    else:
        dgates, dc0, dhidden = loops.backward(*inputs)
    if order is not None:
        dgates = dgates.index_select(2, order.argsort())
    grads = input_grads(plan, X, W, R, h0, states, dgates, dc0)
    hidden_grads = (dhidden.flip(0) if plan.reverse else dhidden) if collect else None
    return (*grads, hidden_grads)


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
