"""One tanh RNN direction over a whole sequence, step by step, with a hand-written backward
through time (lstm_sequence's approach, see there for why): h_t = tanh(x_t·Wᵀ + b + h_{t-1}·Rᵀ).

Forward: one product and one tanh per step. Backward: ∂L/∂pre_t = (∂L/∂y_t + ∂L/∂pre_{t+1}·R)
⊙ (1 − h_t²), one product and one product-with-a-factor per step; R's, W's and the biases'
gradients are one product each over all steps. On the CPU both loops are C++ (recurrent_cpu.cpp's
rnn_forward/rnn_backward) where that is built, else the same loops in Python below; with two
torch calls a step, interpreter overhead is most of a small RNN's time. On CUDA, in float32
with a hidden size up to recurrent_persistent.MAX_HIDDEN, each loop is one Triton kernel that
runs every step (rnn_persistent.py, as the LSTM's), else the Python loops, replayed as CUDA
graphs (cuda_graph_loops.py). The node's forward and its backward are each one pure function,
which on CUDA is replayed as one CUDA graph once its inputs repeat (pooled_cuda_graphs.py, as
the LSTM's node). The products are MKL's with row-major operands on the CPU, as in
lstm_sequence (as fast as oneDNN's or faster at every size measured).
Other activations and clip stay unrolled.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from service.engine.onnx.ops import (
    _cpu_products,
    cuda_graph_loops,
    pooled_cuda_graphs,
    rnn_persistent,
)
from service.engine.onnx.ops._sequence_common import (
    native_loops,
    pooled_backward,
    run_in_time_order,
)


def rnn_direction(
    X: Tensor,
    W: Tensor,
    R: Tensor,
    B: Tensor | None,
    h0: Tensor,
    c0: Tensor | None,
    reverse: bool,
    hidden_grads: list[Tensor] | None,
) -> tuple[Tensor, Tensor, None]:
    """(Y [T, B, H], h_T, None): X [T, B, I], W [H, I], R [H, H], B the bias row [2H] or None."""
    hidden = R.shape[1]
    bias = None if B is None else B[:hidden] + B[hidden:]

    def apply(x: Tensor, w: Tensor, r: Tensor, b: Tensor | None, h: Tensor) -> tuple[Tensor, ...]:
        return _TanhRNNSequence.apply(x, w, r, b, h, hidden_grads, reverse)

    Y, h = run_in_time_order(apply, reverse, X, W, R, bias, h0)
    return Y, h, None


class _TanhRNNSequence(torch.autograd.Function):
    """rnn_direction's one autograd node. Its forward and its backward are each one pure
    function of their inputs (`forward_node`, `backward_node`): on CUDA replayed as one CUDA
    graph once the inputs repeat (pooled_cuda_graphs.py), elsewhere simply called."""

    @staticmethod
    def forward(
        ctx: Any,
        X: Tensor,
        W: Tensor,
        R: Tensor,
        bias: Tensor | None,
        h0: Tensor,
        hidden_grads: list[Tensor] | None,
        reverse: bool,
    ) -> tuple[Tensor, Tensor]:
        Y, h_last = cast(
            tuple[Tensor, Tensor], pooled_cuda_graphs.run(forward_node, None, X, W, R, bias, h0)
        )
        ctx.save_for_backward(X, W, R, h0, Y)
        ctx.hidden_grads, ctx.reverse, ctx.has_bias = hidden_grads, reverse, bias is not None
        return Y, h_last

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dY: Tensor, dh_last: Tensor) -> tuple[Tensor | None, ...]:
        return pooled_backward(ctx, backward_node, 5, ctx.has_bias, dY, dh_last)


def forward_node(
    config: None, X: Tensor, W: Tensor, R: Tensor, bias: Tensor | None, h0: Tensor
) -> tuple[Tensor, Tensor]:
    """The forward as one pure function (X in the order the steps run): (Y [T, B, H], h_T)."""
    # contiguous X: see lstm_sequence
    projected = _cpu_products.linear(X.contiguous(), W, bias)  # [T, B, H]
    loops = native_loops(X)
    # on CUDA all steps in one kernel where that applies (rnn_persistent.py)
    persistent = rnn_persistent.loops_for(projected)
    if loops is not None:
        packed_R = _cpu_products.packed_step_weight(R, X.shape[1])
        Y = loops.rnn_forward(projected.contiguous(), R, h0, packed_R)
    elif persistent is not None:
        Y = persistent.forward(projected, R, h0)
    else:  # inside a capture these run eagerly, becoming part of the node's graph
        Y = cuda_graph_loops.run(_forward_steps, projected, R, h0)
    # h_T as its own tensor: a view of Y could be changed in place by a caller (h0 for an
    # empty sequence, as before the loops moved to C++)
    return Y, (Y[-1] if len(Y) else h0).clone()


def backward_node(
    config: tuple[tuple[bool, ...], bool, bool, bool],
    dY: Tensor,
    dh_last: Tensor,
    X: Tensor,
    W: Tensor,
    R: Tensor,
    h0: Tensor,
    Y: Tensor,
) -> tuple[Tensor | None, ...]:
    """The backward of `forward_node`, one pure function too: the gradients of X, W, R, the
    bias and h0 (None where not needed), then ∂L/∂h_t [T, B, H] in the input's time order
    when `collect`, else None. `config`: (which inputs need a gradient, has a bias, collect,
    reverse)."""
    (need_x, need_w, need_r, need_b, need_h0), has_bias, collect, reverse = config
    steps, batch, hidden = Y.shape
    loops = native_loops(X)
    persistent = rnn_persistent.loops_for(Y)  # the forward's loops: same contract
    if loops is not None:
        packed_Rt = _cpu_products.packed_step_weight(R.t(), Y.shape[1])
        dpre, dhidden = loops.rnn_backward(dY, dh_last, Y, R, packed_Rt)
    elif persistent is not None:
        dpre, dhidden = persistent.backward(dY, dh_last, Y, R)
    else:
        dpre, dhidden = cuda_graph_loops.run(_backward_steps, dY, dh_last, Y, R)
    # the products over all steps at once (_cpu_products: oneDNN or MKL)
    flat = dpre.view(steps * batch, hidden)
    dX = _cpu_products.mm(flat, W).view_as(X) if need_x else None
    dW = _cpu_products.mm(flat.t(), X.reshape(steps * batch, -1)) if need_w else None
    dR = None
    if need_r:  # Σ_t dpre_tᵀ·h_{t-1}: steps 1.. against Y, step 0 against h0
        dR = torch.mm(dpre[0].t(), h0)
        if steps > 1:
            later = flat[batch:].t()
            dR += _cpu_products.mm(later, Y[:-1].reshape((steps - 1) * batch, hidden))
    db = flat.sum(0) if need_b and has_bias else None
    dh0 = torch.mm(dpre[0], R) if need_h0 else None
    hidden_grads = (dhidden.flip(0) if reverse else dhidden) if collect else None
    return dX, dW, dR, db, dh0, hidden_grads


def _forward_steps(projected: Tensor, R: Tensor, h0: Tensor) -> Tensor:
    """The forward loop in Python (where the C++ one is not built, and for other dtypes): Y
    [T, B, H], written over `projected`."""
    R_t = R.t().contiguous()  # row-major operands: MKL is 1.5-3x slower on a transposed view
    y_t = projected.unbind(0)
    h = h0
    for t in range(projected.shape[0]):
        h = y_t[t].addmm_(h, R_t).tanh_()
    return projected


def _backward_steps(dY: Tensor, dh_last: Tensor, Y: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    """Backpropagation through time in Python: (∂L/∂pre_t, ∂L/∂h_t), each [T, B, H]."""
    slope = 1 - Y * Y  # tanh' at every step, from the forward's outputs
    dpre = torch.empty_like(Y)
    dhidden = torch.empty_like(Y)  # ∂L/∂h_t through Y and through the recurrence
    dpre_t, dh_t, dy_t = dpre.unbind(0), dhidden.unbind(0), dY.unbind(0)
    slope_t = slope.unbind(0)
    last = Y.shape[0] - 1
    torch.add(dy_t[last], dh_last, out=dh_t[last])
    for t in range(last, -1, -1):
        if t < last:
            torch.addmm(dy_t[t], dpre_t[t + 1], R, out=dh_t[t])
        torch.mul(dh_t[t], slope_t[t], out=dpre_t[t])
    return dpre, dhidden


rnn_persistent.register_fallback(_forward_steps, _backward_steps)
