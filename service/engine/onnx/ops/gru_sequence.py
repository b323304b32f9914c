"""One GRU direction (linear_before_reset=1, what torch exports for `nn.GRU`) over a whole
sequence, step by step, with a hand-written backward through time: lstm_sequence's approach
(see there for why) for the GRU.

Gates in ONNX order z, r, h; with linear_before_reset=1 a step is
    z, r = σ(x·W_zrᵀ + Wb_zr + h·R_zrᵀ + Rb_zr)
    n    = tanh(x·W_hᵀ + Wb_h + r ⊙ (h·R_hᵀ + Rb_h))
    h'   = (1 − z) ⊙ n + z ⊙ h
Forward: one product (h·Rᵀ for all three gates) and the activations per step. Backward: every
gate's gradient is the step's ∂L/∂h' times a factor known from the forward alone, so the
sequential part is one product and those products-with-a-factor per step. On the CPU both loops
are C++ (recurrent_cpu.cpp's gru_forward/gru_backward) where that is built, else the same loops
in Python below (which compute the factors for all steps at once). On CUDA, in float32 with a
hidden size up to recurrent_persistent.MAX_HIDDEN, each loop is one Triton kernel that runs
every step (gru_persistent.py, as the LSTM's), else the Python loops, replayed as CUDA graphs
(cuda_graph_loops.py). The node's forward and its backward (projection, loops, weight
products) are each one pure function, which on CUDA is replayed as one CUDA graph once its
inputs repeat (pooled_cuda_graphs.py, as the LSTM's node).
The products are MKL's with row-major operands on the CPU, as in lstm_sequence (as fast as
oneDNN's or faster at every size measured).
GRUs with linear_before_reset=0, other activations or clip take the unrolled path.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from service.engine.onnx.ops import (
    _cpu_products,
    cuda_graph_loops,
    gru_persistent,
    pooled_cuda_graphs,
)
from service.engine.onnx.ops._sequence_common import (
    native_loops,
    pooled_backward,
    reorder_blocks,
    run_in_time_order,
)


def gru_direction(
    X: Tensor,
    W: Tensor,
    R: Tensor,
    B: Tensor | None,
    h0: Tensor,
    c0: Tensor | None,
    reverse: bool,
    hidden_grads: list[Tensor] | None,
    gate_blocks: list[int] | None = None,
) -> tuple[Tensor, Tensor, None]:
    """(Y [T, B, H], h_T, None) for one direction: X [T, B, I], W [3H, I], R [3H, H], B the
    node's bias row [6H] (Wb then Rb) or None, h0 [B, H]. `gate_blocks`: which H-wide block of
    W, R and each bias half holds the gates z, r, n (torch's own parameters, read without the
    exporter's reordering chain: [1, 0, 2]); None for ONNX's order. The loops compute in
    ONNX's order: one gather each (the chain it replaces ran ~10 ops a tensor each way)."""
    if gate_blocks is not None:
        W, R = reorder_blocks(W, gate_blocks), reorder_blocks(R, gate_blocks)
        if B is not None:
            B = reorder_blocks(B, gate_blocks + [b + len(gate_blocks) for b in gate_blocks])
    hidden = R.shape[1]
    if B is None:
        projection_bias = inner_bias = None
    else:  # Rb_z, Rb_r sit outside every product: folded into the input projection's bias
        w_bias, r_bias = B[: 3 * hidden], B[3 * hidden :]
        projection_bias = w_bias + torch.cat([r_bias[: 2 * hidden], r_bias.new_zeros(hidden)])
        inner_bias = r_bias[2 * hidden :]

    def apply(*tensors: Tensor) -> tuple[Tensor, ...]:
        x, w, r, pb, ib, h = tensors
        return _GRUSequence.apply(x, w, r, pb, ib, h, hidden_grads, reverse)

    Y, h = run_in_time_order(apply, reverse, X, W, R, projection_bias, inner_bias, h0)
    return Y, h, None


class _GRUSequence(torch.autograd.Function):
    """gru_direction's one autograd node. Its forward and its backward are each one pure
    function of their inputs (`forward_node`, `backward_node`): on CUDA replayed as one CUDA
    graph once the inputs repeat (pooled_cuda_graphs.py), elsewhere simply called."""

    @staticmethod
    def forward(
        ctx: Any,
        X: Tensor,
        W: Tensor,
        R: Tensor,
        projection_bias: Tensor | None,
        inner_bias: Tensor | None,
        h0: Tensor,
        hidden_grads: list[Tensor] | None,
        reverse: bool,
    ) -> tuple[Tensor, Tensor]:
        outputs = pooled_cuda_graphs.run(
            forward_node, None, X, W, R, projection_bias, inner_bias, h0
        )
        gates, from_hidden, Y, h_last = cast(tuple[Tensor, Tensor, Tensor, Tensor], outputs)
        ctx.save_for_backward(X, W, R, h0, gates, from_hidden, Y)
        ctx.hidden_grads, ctx.reverse = hidden_grads, reverse
        ctx.has_biases = (projection_bias is not None, inner_bias is not None)
        return Y, h_last

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dY: Tensor, dh_last: Tensor) -> tuple[Tensor | None, ...]:
        return pooled_backward(ctx, backward_node, 6, ctx.has_biases, dY, dh_last)


def forward_node(
    config: None,
    X: Tensor,
    W: Tensor,
    R: Tensor,
    projection_bias: Tensor | None,
    inner_bias: Tensor | None,
    h0: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward as one pure function (X in the order the steps run): (activated gates z,
    r, n [T, B, 3H], fh = h_{t-1}·Rᵀ + [0, 0, Rb_h] [T, B, 3H], Y [T, B, H], h_T)."""
    hidden = R.shape[1]
    # contiguous X: see lstm_sequence
    projected = _cpu_products.linear(X.contiguous(), W, projection_bias)  # [T, B, 3H]
    # h·Rᵀ + [0, 0, Rb_h] per step: the h part is needed again by the backward
    recurrent_bias = R.new_zeros(3 * hidden)
    if inner_bias is not None:
        recurrent_bias[2 * hidden :] = inner_bias
    loops = native_loops(X)
    # on CUDA all steps in one kernel where that applies (gru_persistent.py)
    persistent = gru_persistent.loops_for(projected)
    if loops is not None:
        packed_R = _cpu_products.packed_step_weight(R, X.shape[1])
        gates, from_hidden, Y = loops.gru_forward(
            projected.contiguous(), R, recurrent_bias, h0, packed_R
        )
    elif persistent is not None:
        gates, from_hidden, Y = persistent.forward(projected, R, recurrent_bias, h0)
    else:  # inside a capture these run eagerly, becoming part of the node's graph
        gates, from_hidden, Y = cuda_graph_loops.run(
            _forward_steps, projected, R, recurrent_bias, h0
        )
    # h_T as its own tensor: a view of Y could be changed in place by a caller (h0 for an
    # empty sequence, as before the loops moved to C++)
    return gates, from_hidden, Y, (Y[-1] if len(Y) else h0).clone()


def backward_node(
    config: tuple[tuple[bool, ...], tuple[bool, bool], bool, bool],
    dY: Tensor,
    dh_last: Tensor,
    X: Tensor,
    W: Tensor,
    R: Tensor,
    h0: Tensor,
    gates: Tensor,
    from_hidden: Tensor,
    Y: Tensor,
) -> tuple[Tensor | None, ...]:
    """The backward of `forward_node`, one pure function too: the gradients of X, W, R, the
    projection's and the inner bias, h0 (None where not needed), then ∂L/∂h_t [T, B, H] in
    the input's time order when `collect`, else None. `config`: (which inputs need a
    gradient, which biases exist, collect, reverse)."""
    needs, has_biases, collect, reverse = config
    loops = native_loops(X)
    persistent = gru_persistent.loops_for(gates)  # the forward's loops: same contract
    if loops is not None:
        packed_Rt = _cpu_products.packed_step_weight(R.t(), gates.shape[1])
        dgates, dhidden = loops.gru_backward(dY, dh_last, gates, from_hidden, h0, Y, R, packed_Rt)
    elif persistent is not None:
        dgates, dhidden = persistent.backward(dY, dh_last, gates, from_hidden, h0, Y, R)
    else:
        dgates, dhidden = cuda_graph_loops.run(
            _backward_steps, dY, dh_last, gates, from_hidden, h0, Y, R
        )
    grads = _input_grads(needs, has_biases, X, W, R, h0, Y, gates, dgates, dhidden)
    hidden_grads = (dhidden.flip(0) if reverse else dhidden) if collect else None
    return (*grads, hidden_grads)


def _input_grads(
    needs: tuple[bool, ...],
    has_biases: tuple[bool, bool],
    X: Tensor,
    W: Tensor,
    R: Tensor,
    h0: Tensor,
    Y: Tensor,
    gates: Tensor,
    dgates: Tensor,
    dhidden: Tensor,
) -> tuple[Tensor | None, ...]:
    """The products over all steps at once (_cpu_products: oneDNN or MKL, whichever this
    machine runs faster): dX, dW, dR, the biases' gradients and dh0."""
    steps, batch, four_h = dgates.shape
    hidden = four_h // 4
    flat = dgates.view(steps * batch, four_h)
    d_from_hidden = flat[:, : 3 * hidden]  # slots z, r, fh_n: the gradient of h·Rᵀ
    need_x, need_w, need_r, need_pb, need_ib, need_h0 = needs
    has_pb, has_ib = has_biases
    d_projected = torch.cat([flat[:, : 2 * hidden], flat[:, 3 * hidden :]], 1)  # z, r, n
    dX = _cpu_products.mm(d_projected, W).view_as(X) if need_x else None
    dW = _cpu_products.mm(d_projected.t(), X.reshape(steps * batch, -1)) if need_w else None
    dR = None
    if need_r:  # Σ_t d(fh_t)ᵀ·h_{t-1}: steps 1.. against Y, step 0 against h0
        dR = torch.mm(d_from_hidden[:batch].t(), h0)
        if steps > 1:
            later = d_from_hidden[batch:].t()
            dR += _cpu_products.mm(later, Y[:-1].reshape((steps - 1) * batch, hidden))
    d_pb = d_projected.sum(0) if need_pb and has_pb else None
    d_ib = d_from_hidden[:, 2 * hidden :].sum(0) if need_ib and has_ib else None
    dh0 = None
    if need_h0:  # through step 0's product with R and its z ⊙ h0 term
        dh0 = torch.addcmul(d_from_hidden[:batch].mm(R), dhidden[0], gates[0, :, :hidden])
    return dX, dW, dR, d_pb, d_ib, dh0


def _forward_steps(
    projected: Tensor, R: Tensor, recurrent_bias: Tensor, h0: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The forward loop in Python (where the C++ one is not built, and for other dtypes):
    (gates z, r, n [T, B, 3H] (activated, over `projected`), fh = h_{t-1}·Rᵀ + recurrent_bias
    [T, B, 3H], Y [T, B, H])."""
    steps, batch, three_h = projected.shape
    hidden = three_h // 3
    gates = projected  # activated in place: the pre-activations are not needed again
    from_hidden = torch.empty_like(projected)
    Y = projected.new_empty(steps, batch, hidden)
    # per-step views, made once: slicing inside the loop would cost as much as the ops
    zr_t, n_t = gates[..., : 2 * hidden].unbind(0), gates[..., 2 * hidden :].unbind(0)
    z_t, r_t = gates[..., :hidden].unbind(0), gates[..., hidden : 2 * hidden].unbind(0)
    fh_t, fh_zr, fh_n = (
        from_hidden.unbind(0),
        from_hidden[..., : 2 * hidden].unbind(0),
        from_hidden[..., 2 * hidden :].unbind(0),
    )
    y_t = Y.unbind(0)
    R_t = R.t().contiguous()  # row-major operands: MKL is 1.5-3x slower on a transposed view
    h = h0
    for t in range(steps):
        torch.addmm(recurrent_bias, h, R_t, out=fh_t[t])
        zr_t[t].add_(fh_zr[t]).sigmoid_()
        n_t[t].addcmul_(r_t[t], fh_n[t]).tanh_()
        torch.lerp(n_t[t], h, z_t[t], out=y_t[t])  # (1 − z)·n + z·h
        h = y_t[t]
    return gates, from_hidden, Y


def _backward_steps(
    dY: Tensor,
    dh_last: Tensor,
    gates: Tensor,
    from_hidden: Tensor,
    h0: Tensor,
    Y: Tensor,
    R: Tensor,
) -> tuple[Tensor, Tensor]:
    """Backpropagation through time in Python: (dgates [T, B, 4H], slots z, r, fh_n, n; ∂L/∂h_t
    [T, B, H])."""
    steps, batch, hidden = Y.shape
    z, r, n = gates.split(hidden, -1)
    h_prev = torch.cat([h0.unsqueeze(0), Y[:-1]], 0)
    # ∂L/∂(pre-activations) = ∂L/∂h'_t × factor: slots z, r, r ⊙ ∂n (the h-side product's
    # gradient), n; the first three are the gradient of h·Rᵀ + [0, 0, Rb_h]
    factors = n.new_empty(steps, batch, 4, hidden)
    along_n = (1 - z) * (1 - n * n)  # ∂h'/∂(n's pre-activation)
    torch.mul(h_prev - n, z * (1 - z), out=factors[:, :, 0])
    torch.mul(along_n * from_hidden[..., 2 * hidden :], r * (1 - r), out=factors[:, :, 1])
    torch.mul(along_n, r, out=factors[:, :, 2])
    factors[:, :, 3] = along_n
    dgates = torch.empty_like(factors)
    dhidden = torch.empty_like(Y)  # ∂L/∂h_t through Y and through the recurrence
    f_t, dg_t = factors.unbind(0), dgates.unbind(0)
    d_from_hidden = dgates.view(steps, batch, 4 * hidden)[..., : 3 * hidden].unbind(0)
    dy_t, dh_t, z_t = dY.unbind(0), dhidden.unbind(0), z.unbind(0)
    last = steps - 1
    torch.add(dy_t[last], dh_last, out=dh_t[last])
    for t in range(last, -1, -1):
        if t < last:  # through step t+1: its products with R and its z ⊙ h term
            torch.addmm(dy_t[t], d_from_hidden[t + 1], R, out=dh_t[t])
            dh_t[t].addcmul_(dh_t[t + 1], z_t[t + 1])
        torch.mul(f_t[t], dh_t[t].unsqueeze(1), out=dg_t[t])
    return dgates.view(steps, batch, 4 * hidden), dhidden


gru_persistent.register_fallback(_forward_steps, _backward_steps)
