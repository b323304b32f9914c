"""One tanh RNN direction over a whole sequence, step by step, with a hand-written backward
through time (lstm_sequence's approach, see there for why): h_t = tanh(x_t·Wᵀ + b + h_{t-1}·Rᵀ).

Forward: one product and one tanh per step. Backward: ∂L/∂pre_t = (∂L/∂y_t + ∂L/∂pre_{t+1}·R)
⊙ (1 − h_t²), one product and one product-with-a-factor per step; R's, W's and the biases'
gradients are one product each over all steps. Other activations and clip stay unrolled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from service.engine.onnx.ops import _onednn
from service.engine.onnx.ops._sequence_common import run_in_time_order


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
        projected = _onednn.linear(X, W, bias)  # [T, B, H]
        Y = torch.empty_like(projected)
        p_t, y_t = projected.unbind(0), Y.unbind(0)
        recurrent = _onednn.StepProduct(R, X.shape[1])
        h = h0
        for t in range(X.shape[0]):
            pre = recurrent(h, p_t[t], out=y_t[t])
            h = torch.tanh(pre, out=y_t[t])
        ctx.save_for_backward(X, W, R, h0, Y)
        ctx.hidden_grads, ctx.reverse, ctx.has_bias = hidden_grads, reverse, bias is not None
        return Y, h.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dY: Tensor, dh_last: Tensor) -> tuple[Tensor | None, ...]:
        X, W, R, h0, Y = ctx.saved_tensors
        steps, batch, hidden = Y.shape
        slope = 1 - Y * Y  # tanh' at every step, from the forward's outputs
        dpre = torch.empty_like(Y)
        dhidden = torch.empty_like(Y)
        dpre_t, dh_t, dy_t, slope_t = (
            dpre.unbind(0),
            dhidden.unbind(0),
            dY.unbind(0),
            slope.unbind(0),
        )
        recurrent_t = _onednn.StepProduct(R.t().contiguous(), batch)  # dpre·R
        last = steps - 1
        torch.add(dy_t[last], dh_last, out=dh_t[last])
        for t in range(last, -1, -1):
            if t < last:
                dh = recurrent_t(dpre_t[t + 1], dy_t[t], out=dh_t[t])
                if dh is not dh_t[t]:
                    dh_t[t].copy_(dh)
            torch.mul(dh_t[t], slope_t[t], out=dpre_t[t])
        if ctx.hidden_grads is not None:
            ctx.hidden_grads.append(dhidden.flip(0) if ctx.reverse else dhidden)
        flat = dpre.view(steps * batch, hidden)
        need_x, need_w, need_r, need_b, need_h0 = ctx.needs_input_grad[:5]
        dX = _onednn.linear(flat, W.t()).view_as(X) if need_x else None
        dW = _onednn.linear(flat.t(), X.reshape(steps * batch, -1).t()) if need_w else None
        dR = None
        if need_r:
            h_prev = torch.cat([h0.unsqueeze(0), Y[:-1]], 0).view(steps * batch, hidden)
            dR = _onednn.linear(flat.t(), h_prev.t())
        db = flat.sum(0) if need_b and ctx.has_bias else None
        dh0 = dpre_t[0].mm(R) if need_h0 else None
        return dX, dW, dR, db, dh0, None, None
