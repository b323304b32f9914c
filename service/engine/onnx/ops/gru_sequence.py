"""One GRU direction (linear_before_reset=1, what torch exports for `nn.GRU`) over a whole
sequence, step by step, with a hand-written backward through time: lstm_sequence's approach
(see there for why) for the GRU.

Gates in ONNX order z, r, h; with linear_before_reset=1 a step is
    z, r = σ(x·W_zrᵀ + Wb_zr + h·R_zrᵀ + Rb_zr)
    n    = tanh(x·W_hᵀ + Wb_h + r ⊙ (h·R_hᵀ + Rb_h))
    h'   = (1 − z) ⊙ n + z ⊙ h
Forward: one product and five elementwise ops per step. Backward: every gate's gradient is the
step's ∂L/∂h' times a factor known from the forward alone, so after those factors are computed
for all steps at once the sequential part is one product and two elementwise ops per step.
GRUs with linear_before_reset=0, other activations or clip take the unrolled path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from service.engine.onnx.ops import _onednn
from service.engine.onnx.ops._sequence_common import run_in_time_order


def gru_direction(
    X: Tensor,
    W: Tensor,
    R: Tensor,
    B: Tensor | None,
    h0: Tensor,
    c0: Tensor | None,
    reverse: bool,
    hidden_grads: list[Tensor] | None,
) -> tuple[Tensor, Tensor, None]:
    """(Y [T, B, H], h_T, None) for one direction: X [T, B, I], W [3H, I], R [3H, H], B the
    node's bias row [6H] (Wb then Rb) or None, h0 [B, H]."""
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
        steps, batch = X.shape[0], X.shape[1]
        hidden = R.shape[1]
        projected = _onednn.linear(X, W, projection_bias)  # [T, B, 3H]
        # h·Rᵀ + [0, 0, Rb_h] per step: the h part is needed again by the backward
        recurrent_bias = R.new_zeros(3 * hidden)
        if inner_bias is not None:
            recurrent_bias[2 * hidden :] = inner_bias
        from_hidden = torch.empty_like(projected)
        zr = projected.new_empty(steps, batch, 2 * hidden)
        n = projected.new_empty(steps, batch, hidden)
        Y = torch.empty_like(n)
        p_zr, p_n = projected[..., : 2 * hidden].unbind(0), projected[..., 2 * hidden :].unbind(0)
        fh_t = from_hidden.unbind(0)
        fh_zr, fh_n = (
            from_hidden[..., : 2 * hidden].unbind(0),
            from_hidden[..., 2 * hidden :].unbind(0),
        )
        zr_t, z_t, r_t = zr.unbind(0), zr[..., :hidden].unbind(0), zr[..., hidden:].unbind(0)
        n_t, y_t = n.unbind(0), Y.unbind(0)
        recurrent = _onednn.StepProduct(R, batch)
        h = h0
        for t in range(steps):
            fh = recurrent(h, recurrent_bias, out=fh_t[t])
            fh_zr_t, fh_n_t = (fh_zr[t], fh_n[t]) if fh is fh_t[t] else fh.split(2 * hidden, 1)
            torch.add(p_zr[t], fh_zr_t, out=zr_t[t]).sigmoid_()
            torch.addcmul(p_n[t], r_t[t], fh_n_t, out=n_t[t]).tanh_()
            torch.lerp(n_t[t], h, z_t[t], out=y_t[t])  # (1 − z)·n + z·h
            if fh is not fh_t[t]:  # oneDNN wrote a new tensor: keep the h part for the backward
                fh_n[t].copy_(fh_n_t)
            h = y_t[t]
        ctx.save_for_backward(X, W, R, h0, zr, n, from_hidden, Y)
        ctx.hidden_grads, ctx.reverse = hidden_grads, reverse
        ctx.has_biases = (projection_bias is not None, inner_bias is not None)
        return Y, h.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dY: Tensor, dh_last: Tensor) -> tuple[Tensor | None, ...]:
        X, W, R, h0, zr, n, from_hidden, Y = ctx.saved_tensors
        steps, batch, hidden = Y.shape
        z, r = zr[..., :hidden], zr[..., hidden:]
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
        recurrent_t = _onednn.StepProduct(R.t().contiguous(), batch)  # d(h·Rᵀ)·R
        last = steps - 1
        torch.add(dy_t[last], dh_last, out=dh_t[last])
        for t in range(last, -1, -1):
            if t < last:  # through step t+1: its products with R and its z ⊙ h term
                dh = recurrent_t(d_from_hidden[t + 1], dy_t[t], out=dh_t[t])
                if dh is not dh_t[t]:
                    dh_t[t].copy_(dh)
                dh_t[t].addcmul_(dh_t[t + 1], z_t[t + 1])
            torch.mul(f_t[t], dh_t[t].unsqueeze(1), out=dg_t[t])
        if ctx.hidden_grads is not None:
            ctx.hidden_grads.append(dhidden.flip(0) if ctx.reverse else dhidden)
        dh0 = torch.addcmul(d_from_hidden[0].mm(R), dh_t[0], z_t[0])
        return _GRUSequence._input_grads(ctx, X, W, h_prev, dgates, dh0)

    @staticmethod
    def _input_grads(
        ctx: Any, X: Tensor, W: Tensor, h_prev: Tensor, dgates: Tensor, dh0: Tensor
    ) -> tuple[Tensor | None, ...]:
        steps, batch, _, hidden = dgates.shape
        flat = dgates.view(steps * batch, 4 * hidden)
        d_from_hidden = flat[:, : 3 * hidden]
        d_projected = torch.cat([flat[:, : 2 * hidden], flat[:, 3 * hidden :]], 1)  # z, r, n
        need_x, need_w, need_r, need_pb, need_ib, need_h0 = ctx.needs_input_grad[:6]
        has_pb, has_ib = ctx.has_biases
        dX = _onednn.linear(d_projected, W.t()).view_as(X) if need_x else None
        dW = _onednn.linear(d_projected.t(), X.reshape(steps * batch, -1).t()) if need_w else None
        dR = None
        if need_r:
            dR = _onednn.linear(d_from_hidden.t(), h_prev.reshape(steps * batch, hidden).t())
        d_pb = d_projected.sum(0) if need_pb and has_pb else None
        d_ib = d_from_hidden[:, 2 * hidden :].sum(0) if need_ib and has_ib else None
        return dX, dW, dR, d_pb, d_ib, dh0 if need_h0 else None, None, None
