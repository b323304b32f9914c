"""Integer ops of quantised inference: DynamicQuantizeLinear, MatMulInteger, ConvInteger,
QLinearMatMul and QLinearConv.

What onnxruntime's quantiser writes: `quantize_dynamic` quantises each activation at run time
(DynamicQuantizeLinear) and multiplies integers (MatMulInteger, ConvInteger, then a Cast and a
Mul by both scales); `quantize_static` in the QOperator format writes QLinearConv and
QLinearMatMul, which requantise their int32 accumulators to uint8/int8. Each computes what
onnxruntime's CPU kernels compute, bit for bit (the tests compare integers exactly):

- zero points (and QLinearMatMul's scales): a scalar, per row of A (a 1-D [M] or an N-D
  [..., M, 1] one) and per column of B ([N] or [..., 1, N]) for the MatMuls, per output
  channel of W ([M]) for the Convs. onnxruntime refuses the per-row forms of A, and onnx's
  reference reads a 1-D one along K: they are computed as the spec says;
- the integer product is exact and accumulates in int32, wrapping as the spec allows
  (`exact_int32`);
- requantisation (QLinear*) is onnxruntime's: the int32 accumulator as float32 times the
  multiplier x_scale·w_scale/y_scale (computed in the scales' type: float16 scales give a
  float16 multiplier, as onnxruntime and onnx's reference compute it), rounded half to even,
  plus the output zero point, saturated (quantize.py's QuantizeLinear, with scale 1);
- DynamicQuantizeLinear's range includes 0; an all-zero input gets scale 1 as onnxruntime's
  kernel gives it (onnx's ReferenceEvaluator gives 1/255 there; the integers agree).

The integer outputs carry no gradient (torch tracks none through integers), and neither does
DynamicQuantizeLinear's scale: computed from a detached input, as gradient_paths.py lists these
ops among those with no gradient to any input. Float8 forms (QLinearMatMul-21) are refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from onnx import TensorProto
from torch import Tensor

from service.engine.graph import NodeFn
from service.engine.onnx.ops._util import FLOAT8_TO_TORCH
from service.engine.onnx.ops.conv import conv as conv_builder
from service.engine.onnx.ops.quantize import QUANTIZED_TYPES, QuantizeLinear
from service.engine.onnx.registry import OpContext, UnsupportedAttribute, register

_EIGHT_BIT = (torch.int8, torch.uint8)
# round(values / 1) + zero point, saturated to the zero point's type: per tensor, or per
# element of the flattened values (`requantized`)
_REQUANTIZE = QuantizeLinear(None, axis=0, block_size=0, saturate=True)
_DYNAMIC = QuantizeLinear(QUANTIZED_TYPES[TensorProto.UINT8], axis=0, block_size=0, saturate=True)


def _refuse_float8(ctx: OpContext, slots: Sequence[int]) -> None:
    for slot in slots:
        if ctx.input_type(slot) in FLOAT8_TO_TORCH:
            name = TensorProto.DataType.Name(ctx.input_type(slot))
            raise UnsupportedAttribute(
                f"input {slot} is {name}: only the int8/uint8 forms of {ctx.op_type} are supported"
            )


def offset_integers(x: Tensor, zero_point: Tensor | None, what: str) -> Tensor:
    """`x - zero_point` in float64 (exactly: see `exact_int32`); `zero_point` broadcastable."""
    if x.dtype not in _EIGHT_BIT:
        raise ValueError(f"{what} must be int8 or uint8, got {x.dtype}")
    values = x.to(torch.float64)
    if zero_point is None:
        return values
    if zero_point.dtype not in _EIGHT_BIT:
        raise ValueError(f"{what}'s zero point must be int8 or uint8, got {zero_point.dtype}")
    return values - zero_point.to(device=x.device, dtype=torch.float64)


def exact_int32(product: Tensor) -> Tensor:
    """An integer product computed in float64, as the spec's int32 accumulator.

    Integer matmul and convolution are computed in float64: torch has neither for integer
    dtypes on CUDA (and only slow int64 ones on CPU), while float64 BLAS and convolution run
    on both. They are exact here: every operand (an 8-bit value minus an 8-bit zero point, in
    [-255, 255]) and every product (at most 255² = 65025 in magnitude) is an integer a double
    holds exactly, and so is every partial sum, in any order, while below 2^53: for any
    reduction shorter than 2^53 / 65025 ≈ 1.4e11 terms, which no operand that fits in memory
    reaches (it holds the reduction's length in elements). The rounding only guards against a
    convolution algorithm that is not a plain sum of products (an FFT one): its float64 error
    at these magnitudes is far below 0.5. The int64 → int32 cast wraps, as the spec's 32-bit
    accumulation may ("accumulation may overflow if and only if in 32 bits").
    """
    return torch.round(product).to(torch.int64).to(torch.int32)


def _per_row(param: Tensor) -> Tensor:
    """A's zero point or scale: a scalar, [M] (one per row) or N-D [..., M, 1] as given."""
    if param.numel() == 1:
        return param.reshape(())
    return param.reshape(-1, 1) if param.dim() == 1 else param


def column_param(param: Tensor) -> Tensor:
    """B's (and Y's) zero point or scale: a scalar, else [N] or [..., 1, N] as given."""
    return param.reshape(()) if param.numel() == 1 else param


def _per_channel(param: Tensor, rank: int, channel_axis: int) -> Tensor:
    """A per-tensor or per-output-channel (1-D [M]) parameter of a rank-`rank` conv tensor."""
    if param.numel() == 1:
        return param.reshape(())
    if param.dim() != 1:
        raise ValueError(f"a per-channel zero point or scale must be 1-D, got {list(param.shape)}")
    shape = [1] * rank
    shape[channel_axis] = param.numel()
    return param.reshape(shape)


def scalar_param(param: Tensor, what: str) -> Tensor:
    if param.numel() != 1:
        raise ValueError(f"{what} must be a scalar, got shape {list(param.shape)}")
    return param.reshape(())


def requantization_multiplier(
    x_scale: Tensor, w_scale: Tensor, y_scale: Tensor, device: torch.device
) -> Tensor:
    """x_scale · w_scale / y_scale in the scales' own type, as onnxruntime computes it. Moved
    next to the data first: a CPU scalar divisor would make CUDA multiply by its reciprocal."""
    x_scale, w_scale, y_scale = (s.to(device) for s in (x_scale, w_scale, y_scale))
    return (x_scale * w_scale) / y_scale


def requantized(accumulated: Tensor, multiplier: Tensor, zero_point: Tensor) -> Tensor:
    """onnxruntime's requantisation of an int32 accumulator: float32(accumulated) · multiplier
    in float32, rounded half to even, plus the zero point, saturated to its type (int8/uint8)."""
    if zero_point.dtype not in _EIGHT_BIT:
        raise ValueError(f"the output zero point must be int8 or uint8, got {zero_point.dtype}")
    values = accumulated.to(torch.float32) * multiplier.to(torch.float32)
    one = torch.ones((), dtype=torch.float32, device=values.device)
    zero_point = zero_point.to(values.device)
    if zero_point.numel() == 1:
        return _REQUANTIZE(values, one, zero_point.reshape(()))
    # a zero point per element: QuantizeLinear's per-axis form over the flattened values
    values, zero_point = torch.broadcast_tensors(values, zero_point)
    flat = _REQUANTIZE(values.reshape(-1), one, zero_point.reshape(-1))
    return flat.reshape(values.shape)


def dynamic_quantization(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """DynamicQuantizeLinear of `x` as onnxruntime computes it (also what its quantised LSTM
    applies to its input and, at every step, to its hidden state): uint8 values, the float32
    scale and the uint8 zero point. No gradient: computed from `x` detached."""
    x = x.detach().to(torch.float32)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    if x.numel():  # the range [min(x), max(x)] widened to include 0
        smallest, largest = torch.aminmax(x)
        high, low = torch.maximum(largest, zero), torch.minimum(smallest, zero)
    else:
        high = low = zero
    span = high - low
    # a tensor divisor: a Python one would make CUDA multiply by its reciprocal (inexact)
    levels = torch.full((), 255.0, dtype=torch.float32, device=x.device)
    scale = torch.where(span == 0, torch.ones_like(span), span / levels)
    # qmin - min/scale, saturated to [0, 255], rounded half to even
    zero_point = torch.round((zero - low / scale).clamp(0.0, 255.0)).to(torch.uint8)
    return _DYNAMIC(x, scale, zero_point), scale, zero_point


def dynamically_dequantized(x: Tensor) -> Tensor:
    """`x`'s values after DynamicQuantizeLinear and back, (q − zero point)·scale, in x's dtype:
    what a dynamically quantised LSTM's recurrent product reads of h (the C++ loop,
    native/recurrent_cpu.cpp, computes the same values). No gradient."""
    q, scale, zero_point = dynamic_quantization(x)
    return ((q.to(torch.float32) - zero_point.to(torch.float32)) * scale).to(x.dtype)


@register("DynamicQuantizeLinear", since=11)
def dynamic_quantize_linear(ctx: OpContext) -> NodeFn:
    return dynamic_quantization


@register("MatMulInteger", since=10)
def matmul_integer(ctx: OpContext) -> NodeFn:
    def fn(
        a: Tensor, b: Tensor, a_zero_point: Tensor | None = None, b_zero_point: Tensor | None = None
    ) -> Tensor:
        a_values = offset_integers(a, None if a_zero_point is None else _per_row(a_zero_point), "A")
        b_values = offset_integers(
            b, None if b_zero_point is None else column_param(b_zero_point), "B"
        )
        return exact_int32(torch.matmul(a_values, b_values))

    return fn


@register("QLinearMatMul", since=10)
def qlinear_matmul(ctx: OpContext) -> NodeFn:
    _refuse_float8(ctx, (0, 2, 3, 5, 7))

    def fn(
        a: Tensor,
        a_scale: Tensor,
        a_zero_point: Tensor,
        b: Tensor,
        b_scale: Tensor,
        b_zero_point: Tensor,
        y_scale: Tensor,
        y_zero_point: Tensor,
    ) -> Tensor:
        a_values = offset_integers(a, _per_row(a_zero_point), "a")
        b_values = offset_integers(b, column_param(b_zero_point), "b")
        accumulated = exact_int32(torch.matmul(a_values, b_values))
        multiplier = requantization_multiplier(
            _per_row(a_scale), column_param(b_scale), column_param(y_scale), a.device
        )
        return requantized(accumulated, multiplier, column_param(y_zero_point))

    return fn


register("QLinearMatMul", since=21)(qlinear_matmul)  # adds float16/bfloat16 scales, float8


def _conv_zero_points(
    x: Tensor, w: Tensor, x_zero_point: Tensor | None, w_zero_point: Tensor | None
) -> tuple[Tensor, Tensor]:
    """X and W less their zero points (X's per tensor, W's per tensor or output channel), in
    float64; X's zero padding then pads with its zero point, as onnxruntime does."""
    x_zero = None if x_zero_point is None else scalar_param(x_zero_point, "x_zero_point")
    w_zero = None if w_zero_point is None else _per_channel(w_zero_point, w.dim(), 0)
    return offset_integers(x, x_zero, "x"), offset_integers(w, w_zero, "w")


@register("ConvInteger", since=10)
def conv_integer(ctx: OpContext) -> NodeFn:
    convolve = conv_builder(ctx)  # Conv's attributes: auto_pad, pads, strides, dilations, group

    def fn(
        x: Tensor, w: Tensor, x_zero_point: Tensor | None = None, w_zero_point: Tensor | None = None
    ) -> Tensor:
        return exact_int32(convolve(*_conv_zero_points(x, w, x_zero_point, w_zero_point)))

    return fn


@register("QLinearConv", since=10)
def qlinear_conv(ctx: OpContext) -> NodeFn:
    convolve = conv_builder(ctx)

    def fn(
        x: Tensor,
        x_scale: Tensor,
        x_zero_point: Tensor,
        w: Tensor,
        w_scale: Tensor,
        w_zero_point: Tensor,
        y_scale: Tensor,
        y_zero_point: Tensor,
        bias: Tensor | None = None,
    ) -> Tensor:
        accumulated = convolve(*_conv_zero_points(x, w, x_zero_point, w_zero_point))
        if bias is not None:  # int32, on the accumulator's scale x_scale·w_scale
            shape = [1, -1] + [1] * (accumulated.dim() - 2)
            accumulated = accumulated + bias.to(x.device, torch.float64).reshape(shape)
        multiplier = requantization_multiplier(
            scalar_param(x_scale, "x_scale"),
            _per_channel(w_scale, accumulated.dim(), 1),
            scalar_param(y_scale, "y_scale"),
            x.device,
        )
        return requantized(exact_int32(accumulated), multiplier, y_zero_point)

    return fn
