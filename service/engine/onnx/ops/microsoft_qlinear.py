"""com.microsoft QLinear* ops of onnxruntime's QOperator format: QLinearAdd, QLinearMul,
QLinearSigmoid, QLinearLeakyRelu, QLinearGlobalAveragePool, QLinearAveragePool, QLinearConcat,
QLinearSoftmax, QLinearWhere and QGemm.

`quantize_static(..., quant_format=QuantFormat.QOperator)` writes these (with the default
domain's QLinearConv and QLinearMatMul, integer.py) between a QuantizeLinear of the model's
inputs and a DequantizeLinear of its outputs: every value between is uint8/int8, each with the
scale and zero point its producer was given. Each op here computes what onnxruntime's CPU
kernel computes, which is not always the float op between a dequantization and a quantisation:

- QGemm: an int32 accumulator (plus the int32 bias C, on the scale a_scale·b_scale)
  requantised as QLinearMatMul's, with the multiplier alpha·a_scale·b_scale/y_scale; without
  y_scale the output is that float product. Bit-exact.
- QLinearMul: (a − a_zero)(b − b_zero) requantised by a_scale·b_scale/c_scale. Bit-exact.
- QLinearAdd: MLAS's fixed-point sum: each scale ratio to c_scale as an integer multiplier of
  22 significant bits, the sum shifted back rounding half away from zero. Bit-exact (a float
  sum would differ by one step where the ratios' last bits matter).
- QLinearGlobalAveragePool (and QLinearAveragePool over the whole image without padding,
  which onnxruntime hands to it): the integer sum less N·zero point times the float32
  x_scale / (y_scale·N), rounded half to even. Bit-exact.
- QLinearConcat, QLinearWhere, QLinearLeakyRelu: onnxruntime's 256-entry lookup tables, each
  entry quantize(f(dequantize(x))); computed here per element with the same float32 steps.
  Bit-exact. QLinearSigmoid's table uses MLAS's polynomial logistic, here torch's sigmoid:
  within one quantisation step (a value near a rounding boundary may round the other way).
- QLinearAveragePool: the dequantized window average in float32, then
  round(y / y_scale + y_zero) (the zero point added before the rounding, as onnxruntime's
  `quantize_value`). Within one step: its window sums are sequential, torch's pools not.
- QLinearSoftmax: onnxruntime's exp table, exp((x − max + shift)·x_scale) with a shift that
  keeps the sum finite, divided by its float32 sum and multiplied by floor(1 / y_scale);
  the opset attribute chooses the axis semantics (below 13: the dims from `axis` on as one).
  Within one step (its sum is sequential). The int8 output wraps past 127 as onnxruntime's
  does (a probability of 1 at y_zero_point −128 comes out as −128): what it computes.

Scales and zero points are per tensor (onnxruntime refuses others), except QGemm's B, per
column too. The integer outputs carry no gradient; the conversion rewrites these nodes as
DequantizeLinear → float op → QuantizeLinear where it can (onnx/qoperator_as_qdq.py), which
is what gives such a model's weights their gradients.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from service.engine.graph import NodeFn
from service.engine.onnx.ops.integer import (
    column_param,
    exact_int32,
    offset_integers,
    requantization_multiplier,
    requantized,
    scalar_param,
)
from service.engine.onnx.ops.microsoft import MS, default_domain_builder
from service.engine.onnx.ops.quantize import DequantizeLinear, QuantizeLinear
from service.engine.onnx.registry import OpContext, UnsupportedAttribute, register

# per-tensor dequantization / quantisation: (x − zero) · scale and round(y / scale) + zero,
# saturated to the zero point's type, each in float32 (MLAS's DequantizeLinear and
# QuantizeLinear, with which onnxruntime builds its lookup tables)
_DEQUANTIZE = DequantizeLinear(axis=1, block_size=0)
_QUANTIZE = QuantizeLinear(None, axis=1, block_size=0, saturate=True)


def _dequantized(x: Tensor, scale: Tensor, zero_point: Tensor | None, what: str) -> Tensor:
    scale = scalar_param(scale, f"{what}_scale").to(device=x.device, dtype=torch.float32)
    zero = None if zero_point is None else scalar_param(zero_point, f"{what}_zero_point")
    return _DEQUANTIZE(x, scale, None if zero is None else zero.to(x.device))


def _quantized(y: Tensor, scale: Tensor, zero_point: Tensor | None, like: Tensor) -> Tensor:
    """`y` quantised per tensor; without a zero point, to `like`'s type at zero point 0."""
    zero = torch.zeros((), dtype=like.dtype) if zero_point is None else zero_point
    scale = scalar_param(scale, "y_scale").to(device=y.device, dtype=torch.float32)
    return _QUANTIZE(y, scale, scalar_param(zero, "y_zero_point").to(y.device))


def _rounded_with_offset(values: Tensor, zero_point: Tensor) -> Tensor:
    """nearbyint(values + zero point), saturated: onnxruntime's pooling `quantize_value`
    adds the zero point in float32 before rounding (ties then go to the even sum)."""
    zero = scalar_param(zero_point, "y_zero_point")
    info = torch.iinfo(zero.dtype)
    shifted = values + zero.to(device=values.device, dtype=torch.float32)
    return torch.round(shifted).clamp(info.min, info.max).to(zero.dtype)


def _through_table(
    function: Any,
) -> Any:
    """A QLinear activation: quantize(f(dequantize(x))), what each entry of onnxruntime's
    lookup table holds (QLinearLookupBase)."""

    def fn(
        x: Tensor,
        x_scale: Tensor,
        x_zero_point: Tensor | None,
        y_scale: Tensor,
        y_zero_point: Tensor | None = None,
    ) -> Tensor:
        return _quantized(
            function(_dequantized(x, x_scale, x_zero_point, "x")), y_scale, y_zero_point, x
        )

    return fn


@register("QLinearLeakyRelu", domain=MS)
def qlinear_leaky_relu(ctx: OpContext) -> NodeFn:
    alpha = float(ctx.attr("alpha", 0.01))
    return _through_table(lambda x: torch.where(x >= 0, x, x * alpha))


@register("QLinearSigmoid", domain=MS)
def qlinear_sigmoid(ctx: OpContext) -> NodeFn:
    return _through_table(torch.sigmoid)


# ---------------------------------------------------------------- binary ops


def _add_multipliers(a_scale: Tensor, b_scale: Tensor, c_scale: Tensor) -> tuple[int, int, int]:
    """MLAS's QLinearAdd parameters: the ratios a_scale/c_scale and b_scale/c_scale as integers
    with 22 significant bits for the greater, and the shift that scales them back. (Host
    numbers: the scales are the kernel's constants, whatever tracks their gradient.)"""
    ratios = [
        float(
            scalar_param(s, "scale").detach().to(torch.float32).cpu()
            / scalar_param(c_scale, "c_scale").detach().cpu()
        )
        for s in (a_scale, b_scale)
    ]
    # (the ratios are float32 values; a double holds them, and the power-of-two scaling, exactly)
    exponent = math.frexp(max(ratios))[1] - 1  # the greater's binary exponent
    shift = 21 - exponent
    multiplier_a, multiplier_b = (round(r * 2.0**shift) for r in ratios)  # half to even: lrintf
    return multiplier_a, multiplier_b, shift


@register("QLinearAdd", domain=MS)
def qlinear_add(ctx: OpContext) -> NodeFn:
    def fn(
        a: Tensor,
        a_scale: Tensor,
        a_zero_point: Tensor | None,
        b: Tensor,
        b_scale: Tensor,
        b_zero_point: Tensor | None,
        c_scale: Tensor,
        c_zero_point: Tensor | None = None,
    ) -> Tensor:
        multiplier_a, multiplier_b, shift = _add_multipliers(a_scale, b_scale, c_scale)
        a_values = offset_integers(a, _optional_scalar(a_zero_point), "A").to(torch.int64)
        b_values = offset_integers(b, _optional_scalar(b_zero_point), "B").to(torch.int64)
        # exact in int64 (MLAS's int32 sum cannot overflow: each term is below 255·2^22)
        accumulated = a_values * multiplier_a + b_values * multiplier_b
        # shifted right, rounding half away from zero (MLAS: the remainder against half)
        remainder = (accumulated & ((1 << shift) - 1)) - (accumulated < 0).to(torch.int64)
        rounded = (accumulated >> shift) + (remainder > ((1 << shift) - 1) >> 1).to(torch.int64)
        zero = _optional_scalar(c_zero_point)
        out_type = a.dtype if zero is None else zero.dtype
        info = torch.iinfo(out_type)
        offset = 0 if zero is None else int(zero)
        return (rounded + offset).clamp(info.min, info.max).to(out_type)

    return fn


def _optional_scalar(zero_point: Tensor | None) -> Tensor | None:
    return None if zero_point is None else scalar_param(zero_point, "zero point")


@register("QLinearMul", domain=MS)
def qlinear_mul(ctx: OpContext) -> NodeFn:
    def fn(
        a: Tensor,
        a_scale: Tensor,
        a_zero_point: Tensor | None,
        b: Tensor,
        b_scale: Tensor,
        b_zero_point: Tensor | None,
        c_scale: Tensor,
        c_zero_point: Tensor | None = None,
    ) -> Tensor:
        product = offset_integers(a, _optional_scalar(a_zero_point), "A") * offset_integers(
            b, _optional_scalar(b_zero_point), "B"
        )
        multiplier = requantization_multiplier(
            scalar_param(a_scale, "a_scale"),
            scalar_param(b_scale, "b_scale"),
            scalar_param(c_scale, "c_scale"),
            a.device,
        )
        zero = c_zero_point if c_zero_point is not None else torch.zeros((), dtype=a.dtype)
        return requantized(exact_int32(product), multiplier, scalar_param(zero, "c_zero_point"))

    return fn


@register("QLinearWhere", domain=MS)
def qlinear_where(ctx: OpContext) -> NodeFn:
    def fn(
        condition: Tensor,
        x: Tensor,
        x_scale: Tensor,
        x_zero_point: Tensor,
        y: Tensor,
        y_scale: Tensor,
        y_zero_point: Tensor,
        z_scale: Tensor,
        z_zero_point: Tensor,
    ) -> Tensor:
        # each operand through its table to Z's scale and zero point, then chosen
        x_in_z = _quantized(_dequantized(x, x_scale, x_zero_point, "x"), z_scale, z_zero_point, x)
        y_in_z = _quantized(_dequantized(y, y_scale, y_zero_point, "y"), z_scale, z_zero_point, y)
        return torch.where(condition.to(torch.bool), x_in_z, y_in_z)

    return fn


@register("QLinearConcat", domain=MS)
def qlinear_concat(ctx: OpContext) -> NodeFn:
    axis = ctx.attr("axis")
    if axis is None:
        raise UnsupportedAttribute("QLinearConcat needs its axis attribute")
    if ctx.num_inputs < 5 or (ctx.num_inputs - 2) % 3:
        raise UnsupportedAttribute(
            "QLinearConcat takes y_scale, y_zero_point, then (x, scale, zero point) per input"
        )

    def fn(y_scale: Tensor, y_zero_point: Tensor, *inputs: Tensor) -> Tensor:
        parts = [
            _quantized(_dequantized(x, scale, zero, "x"), y_scale, y_zero_point, x)
            for x, scale, zero in zip(inputs[::3], inputs[1::3], inputs[2::3], strict=True)
        ]
        return torch.cat(parts, dim=int(axis))

    return fn


# ---------------------------------------------------------------- pooling


def _global_average(
    x: Tensor,
    x_scale: Tensor,
    x_zero_point: Tensor,
    y_scale: Tensor,
    y_zero_point: Tensor,
    dims: list[int],
) -> Tensor:
    """MLAS's QLinearGlobalAveragePool over `dims`: the exact integer sum less N·zero point,
    times x_scale / (y_scale·N) in float32, rounded half to even."""
    count = math.prod(x.shape[d] for d in dims)
    accumulated = offset_integers(x, scalar_param(x_zero_point, "x_zero_point"), "X").sum(
        dim=dims, keepdim=True
    )
    x_scale_f, y_scale_f = (
        scalar_param(s, "scale").to(device=x.device, dtype=torch.float32)
        for s in (x_scale, y_scale)
    )
    multiplier = x_scale_f / (y_scale_f * float(count))
    return requantized(
        exact_int32(accumulated), multiplier, scalar_param(y_zero_point, "y_zero_point")
    )


def _channels_last(ctx: OpContext) -> bool:
    return bool(int(ctx.attr("channels_last", 0)))


@register("QLinearGlobalAveragePool", domain=MS)
def qlinear_global_average_pool(ctx: OpContext) -> NodeFn:
    channels_last = _channels_last(ctx)

    def fn(
        x: Tensor, x_scale: Tensor, x_zero_point: Tensor, y_scale: Tensor, y_zero_point: Tensor
    ) -> Tensor:
        spatial = list(range(1, x.dim() - 1)) if channels_last else list(range(2, x.dim()))
        return _global_average(x, x_scale, x_zero_point, y_scale, y_zero_point, spatial)

    return fn


@register("QLinearAveragePool", domain=MS)
def qlinear_average_pool(ctx: OpContext) -> NodeFn:
    channels_last = _channels_last(ctx)
    attrs = {k: v for k, v in ctx.attrs.items() if k != "channels_last"}
    pool = default_domain_builder(ctx, "AveragePool", 11, attrs)
    kernel = [int(k) for k in ctx.attr("kernel_shape", [])]
    unpadded = not any(int(p) for p in ctx.attr("pads", [])) and ctx.attr("auto_pad", "NOTSET") in (
        "NOTSET",
        "VALID",
    )

    def fn(
        x: Tensor,
        x_scale: Tensor,
        x_zero_point: Tensor | None,
        y_scale: Tensor,
        y_zero_point: Tensor | None = None,
    ) -> Tensor:
        zero_x = x_zero_point if x_zero_point is not None else torch.zeros((), dtype=x.dtype)
        zero_y = y_zero_point if y_zero_point is not None else torch.zeros((), dtype=x.dtype)
        if channels_last:  # [N, ..., C] → [N, C, ...] and back
            x = x.movedim(-1, 1)
        if unpadded and list(x.shape[2:]) == kernel:  # onnxruntime's global-pool path
            y = _global_average(x, x_scale, zero_x, y_scale, zero_y, list(range(2, x.dim())))
        else:
            average = pool(_dequantized(x, x_scale, zero_x, "x"))
            y_scale_f = scalar_param(y_scale, "y_scale").to(device=x.device, dtype=torch.float32)
            y = _rounded_with_offset(average / y_scale_f, zero_y)
        return y.movedim(1, -1) if channels_last else y

    return fn


# ---------------------------------------------------------------- softmax

# onnxruntime's exp table is float: the sum of D entries must stay below FLT_MAX, with e^5 spare
_FLOAT_MAX_LOG = math.log(torch.finfo(torch.float32).max)
_RESERVED_BITS = 5.0


@register("QLinearSoftmax", domain=MS)
def qlinear_softmax(ctx: OpContext) -> NodeFn:
    opset = ctx.attr("opset")
    if opset is None:
        raise UnsupportedAttribute("QLinearSoftmax needs its opset attribute")
    coerced = int(opset) < 13  # the dims from `axis` on are one (Softmax before opset 13)
    axis = int(ctx.attr("axis", 1 if coerced else -1))

    def fn(
        x: Tensor,
        x_scale: Tensor,
        x_zero_point: Tensor | None,
        y_scale: Tensor,
        y_zero_point: Tensor | None = None,
    ) -> Tensor:
        last = axis % x.dim() if x.dim() else 0
        rows = x.reshape(*x.shape[:last], -1) if coerced else x.movedim(last, -1)
        length = rows.shape[-1]
        scale = float(scalar_param(x_scale, "x_scale").detach().to(torch.float32))
        shift = max(0.0, math.log(torch.finfo(torch.float32).max / length) - _RESERVED_BITS) / scale
        # (x_zero_point cancels: the table is read at x − max)
        offset = rows.to(torch.float64) - rows.amax(dim=-1, keepdim=True).to(torch.float64)
        exps = torch.exp((offset + shift) * scale).to(torch.float32)
        total = exps.to(torch.float64).sum(dim=-1, keepdim=True).to(torch.float32)
        levels = torch.floor(
            torch.ones((), dtype=torch.float32)
            / scalar_param(y_scale, "y_scale").to(torch.float32).cpu()
        ).to(x.device)
        counted = torch.round((exps * levels) / total).to(torch.int32)
        zero = 0 if y_zero_point is None else int(scalar_param(y_zero_point, "y_zero_point"))
        values = counted + zero
        # onnxruntime caps above at 255 and casts: int8 wraps (as its kernel does)
        values = torch.where(values > 255, torch.full_like(values, 255), values)
        y = (
            values.to(torch.uint8).view(torch.int8)
            if x.dtype == torch.int8
            else values.to(torch.uint8)
        )
        return y.reshape(x.shape) if coerced else y.movedim(-1, last)

    return fn


# ---------------------------------------------------------------- QGemm


@register("QGemm", domain=MS)
def qgemm(ctx: OpContext) -> NodeFn:
    alpha = float(ctx.attr("alpha", 1.0))
    trans_a, trans_b = bool(ctx.attr("transA", 0)), bool(ctx.attr("transB", 0))

    def fn(
        a: Tensor,
        a_scale: Tensor,
        a_zero_point: Tensor,
        b: Tensor,
        b_scale: Tensor,
        b_zero_point: Tensor,
        c: Tensor | None = None,
        y_scale: Tensor | None = None,
        y_zero_point: Tensor | None = None,
    ) -> Tensor:
        a_values = offset_integers(
            a.t() if trans_a else a, scalar_param(a_zero_point, "a_zero_point"), "A"
        )
        b_values = offset_integers(b.t() if trans_b else b, column_param(b_zero_point), "B")
        accumulated = torch.matmul(a_values, b_values)
        if c is not None:  # int32, on the accumulator's scale a_scale·b_scale
            accumulated = accumulated + c.to(device=a.device, dtype=torch.float64)
        accumulated = exact_int32(accumulated)
        # onnxruntime's output scale: alpha·a_scale·b_scale (then / y_scale), in float32
        scaled_a = scalar_param(a_scale, "a_scale").to(torch.float32) * torch.tensor(
            alpha, dtype=torch.float32
        )
        if y_scale is None:
            b_scales = column_param(b_scale).to(device=a.device, dtype=torch.float32)
            return accumulated.to(torch.float32) * (scaled_a.to(a.device) * b_scales)
        multiplier = requantization_multiplier(
            scaled_a, column_param(b_scale), scalar_param(y_scale, "y_scale"), a.device
        )
        zero = y_zero_point if y_zero_point is not None else torch.zeros((), dtype=torch.uint8)
        return requantized(accumulated, multiplier, scalar_param(zero, "y_zero_point"))

    return fn
