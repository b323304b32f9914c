"""The LSTM's products over all steps at once, shared by lstm_sequence's CPU path and its CUDA
node (lstm_fused_cell): the biases' sum the gates add, and the backward's dX, dW, dR, biases',
dh0 and dc0 from the gate gradients of every step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from service.engine.onnx.ops import _cpu_products


def summed_bias(bias: Tensor | None, recurrent_bias: Tensor | None, hidden: int) -> Tensor | None:
    """The one [4H] bias the gates add: `bias` is either ONNX's row [8H] (Wb then Rb, any
    leading axes of 1), or the input-side bias [4H] plus `recurrent_bias` [4H], or already
    their sum (`recurrent_bias` None)."""
    if bias is None:
        assert recurrent_bias is None, "a recurrent bias comes with an input-side one"
        return None
    row = bias.reshape(-1)
    if row.numel() == 8 * hidden:
        row = row[: 4 * hidden] + row[4 * hidden :]
    return row if recurrent_bias is None else row + recurrent_bias.reshape(-1)


@dataclass(frozen=True)
class GradPlan:
    """Which input gradients a backward computes and the shapes they take (hashable: part of
    a CUDA graph's key). `needs`: X, W, R, bias, recurrent bias, h0, c0, as autograd asks."""

    x_shape: torch.Size
    w_shape: torch.Size
    r_shape: torch.Size
    h0_shape: torch.Size
    c0_shape: torch.Size
    bias_shape: torch.Size | None
    recurrent_bias_shape: torch.Size | None
    needs: tuple[bool, ...]
    reverse: bool


def input_grads(
    plan: GradPlan,
    X: Tensor,
    W: Tensor,
    R: Tensor,
    h0: Tensor,
    hiddens: Tensor,
    dgates: Tensor,
    dc0: Tensor,
) -> tuple[Tensor | None, ...]:
    """(dX, dW, dR, d_bias, d_recurrent_bias, dh0, dc0), each shaped as its input was, for X
    in the order the steps ran, W [4H, I], R [4H, H], h0 [B, H] and dgates [T, B, 4H] in the
    weights' gate order. `hiddens`: on CUDA h0 then every h_t [T + 1, B, H] (the forward's
    buffer), on the CPU Y [T, B, H]. The CPU's products are _cpu_products' (oneDNN or MKL,
    whichever this machine runs faster)."""
    steps, batch, four_h = dgates.shape
    flat = dgates.view(steps * batch, four_h)
    need_x, need_w, need_r, need_b, need_rb, need_h0, need_c0 = plan.needs
    dX = None
    if need_x:
        dX = _cpu_products.mm(flat, W).view(steps, batch, -1)
        dX = (dX.flip(0) if plan.reverse else dX).reshape(plan.x_shape)
    inputs = X.reshape(steps * batch, -1)
    dW = dR = None
    if len(hiddens) == steps + 1:
        # cuBLAS reads the transposed operand as it is: two products, h_{t-1} straight from
        # the forward's [h0, Y] buffer (no concatenation, no copy)
        h_prev = hiddens[:-1].reshape(steps * batch, R.shape[1])
        dgates_t = flat.t()
        dW = torch.mm(dgates_t, inputs).reshape(plan.w_shape) if need_w else None
        dR = torch.mm(dgates_t, h_prev).reshape(plan.r_shape) if need_r else None
    else:
        # dW = Σ_t dgates_tᵀ·x_t and dR = Σ_t dgates_tᵀ·h_{t-1} in ONE product,
        # dgatesᵀ·[X | H_prev]: both read dgates transposed, which oneDNN copies first (that
        # copy cost as much as the product at the small LSTM's size: 2.46 -> ms per pass)
        operands = [inputs] if need_w else []
        if need_r:
            h_prev = torch.cat([h0.unsqueeze(0), hiddens[:-1]], 0)
            operands.append(h_prev.view(steps * batch, R.shape[1]))
        both = _cpu_products.mm(flat.t(), torch.cat(operands, 1)) if operands else None
        if both is not None:
            dW = both[:, : inputs.shape[1]].reshape(plan.w_shape) if need_w else None
            dR = both[:, -R.shape[1] :].reshape(plan.r_shape) if need_r else None
    d_bias = d_recurrent_bias = None
    if need_b or need_rb:
        d_bias, d_recurrent_bias = _bias_grads(plan, flat.sum(0))
    dh0 = torch.mm(dgates[0], R).view(plan.h0_shape) if need_h0 else None
    d_c0 = dc0.view(plan.c0_shape) if need_c0 else None
    return dX, dW, dR, d_bias, d_recurrent_bias, dh0, d_c0


def _bias_grads(plan: GradPlan, db: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of `summed_bias`'s inputs, given the sum's, `db` [4H]."""
    if plan.bias_shape is None:
        return None, None
    d_bias = db.repeat(2) if plan.bias_shape.numel() == 2 * db.numel() else db
    d_recurrent = None if plan.recurrent_bias_shape is None else db.view(plan.recurrent_bias_shape)
    return d_bias.view(plan.bias_shape), d_recurrent
