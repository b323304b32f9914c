"""Elementwise math, comparison and logic, Cast/CastLike/BitCast, Identity, Where, Clip."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from service.engine.graph import NodeFn, passthrough
from service.engine.onnx.ops._util import (
    FLOAT8_DTYPES,
    FLOAT_DTYPES,
    INT4_RANGES,
    INT4_TO_TORCH,
    LastTensorMemo,
    as_tensor,
    require,
    torch_dtype,
)
from service.engine.onnx.registry import OpContext, register


def _unary(op_type: str, fn: Callable[..., torch.Tensor]) -> None:
    register(op_type)(lambda ctx: fn)


_UNARY: dict[str, Callable[..., torch.Tensor]] = {
    "Abs": torch.abs,
    "Neg": torch.neg,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Asin": torch.asin,
    "Acos": torch.acos,
    "Atan": torch.atan,
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Asinh": torch.asinh,
    "Acosh": torch.acosh,
    "Atanh": torch.atanh,
    "Erf": torch.erf,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "BitwiseNot": torch.bitwise_not,
    "Round": torch.round,  # round half to even, like ONNX
}
for _name, _fn in _UNARY.items():
    _unary(_name, _fn)


def _moved(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    return value.to(device)


def colocated(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`fn(a, b)` that first moves a CPU operand next to the other one's device.

    Values made on the CPU by shape arithmetic (Shape, Range, ConstantOfShape, folded
    constants) meet device data here; torch only mixes devices for 0-d tensors.
    """

    # the CPU operand is mostly the same small constant call after call (attention's
    # 1/sqrt(head_dim), reused per input shape by ObservableGraph.run): copied to the device
    # once, not per call (a host-to-device copy stalls the host)
    move_a, move_b = LastTensorMemo(_moved), LastTensorMemo(_moved)

    def run(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.device != b.device:
            if a.device.type == "cpu":
                a = move_a(a, b.device)
            else:
                b = move_b(b, a.device)
        return fn(a, b)

    return run


def _binary(op_type: str, fn: Callable[..., torch.Tensor]) -> None:
    safe = colocated(fn)

    @register(op_type)
    def build(ctx: OpContext) -> NodeFn:
        axis = ctx.attr("axis")
        if ctx.opset < 7 and ctx.attr("broadcast") and axis is not None:
            return lambda a, b: safe(a, _align_legacy(b, a.dim(), axis))
        return safe


def _align_legacy(b: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    """Opset < 7 broadcast with `axis`: b's dims line up with a's from `axis` on."""
    axis = axis + rank if axis < 0 else axis
    return b.reshape(list(b.shape) + [1] * (rank - axis - b.dim()))


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype.is_floating_point or b.dtype.is_floating_point:
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


def _pow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    result = torch.pow(a, b)
    return result if result.dtype == a.dtype else result.to(a.dtype)


_BINARY: dict[str, Callable[..., torch.Tensor]] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _div,
    "Pow": _pow,
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
    "BitwiseAnd": torch.bitwise_and,
    "BitwiseOr": torch.bitwise_or,
    "BitwiseXor": torch.bitwise_xor,
}
for _name, _bfn in _BINARY.items():
    _binary(_name, _bfn)


@register("Mod")
def mod(ctx: OpContext) -> NodeFn:
    if ctx.attr("fmod", 0):
        return torch.fmod

    def python_mod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.remainder(a, b)

    return python_mod


@register("BitShift")
def bit_shift(ctx: OpContext) -> NodeFn:
    direction = ctx.attr("direction")
    require(direction in ("LEFT", "RIGHT"), f"direction '{direction}' is not LEFT or RIGHT")
    if direction == "LEFT":
        return torch.bitwise_left_shift
    return torch.bitwise_right_shift


@register("IsInf")
def is_inf(ctx: OpContext) -> NodeFn:
    pos, neg = ctx.attr("detect_positive", 1), ctx.attr("detect_negative", 1)

    def fn(x: torch.Tensor) -> torch.Tensor:
        if pos and neg:
            return torch.isinf(x)
        if pos:
            return torch.isposinf(x)
        if neg:
            return torch.isneginf(x)
        return torch.zeros_like(x, dtype=torch.bool)

    return fn


def _variadic(op_type: str, combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    @register(op_type)
    def build(ctx: OpContext) -> NodeFn:
        mean = op_type == "Mean"

        safe = colocated(combine)

        def fn(*xs: torch.Tensor) -> torch.Tensor:
            result = functools.reduce(safe, xs)
            return result / len(xs) if mean else result

        return fn


_variadic("Sum", torch.add)
_variadic("Mean", torch.add)
_variadic("Max", torch.maximum)
_variadic("Min", torch.minimum)


@register("Identity")
def identity(ctx: OpContext) -> NodeFn:
    return passthrough  # run() gives the output its input's slot


@register("Where")
def where(ctx: OpContext) -> NodeFn:
    def fn(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        device = next((t.device for t in (a, b, c) if t.device.type != "cpu"), a.device)
        c, a, b = (t if t.device == device else t.to(device) for t in (c, a, b))
        return torch.where(c, a, b)

    return fn


@dataclass(frozen=True)
class _Float8Bounds:
    """Where a float8 type's range ends: |x| rounds past `max` (out of range: ONNX's tables'
    "[x] > FLT_MAX") from `halfway` on, midway between `max` and the next value the type
    would have. `halfway` itself rounds to even: past `max` unless max's last mantissa bit
    is 0 (E4M3FN's 448 = 1.110b x 2^8; the others' maxima end in 1)."""

    max: float
    halfway: float
    halfway_overflows: bool

    def overflows(self, x: torch.Tensor) -> torch.Tensor:
        magnitude = x.abs()  # NaN compares False: NaN stays NaN
        return magnitude >= self.halfway if self.halfway_overflows else magnitude > self.halfway


def _float8_bounds(dtype: torch.dtype) -> _Float8Bounds:
    top = torch.tensor(torch.finfo(dtype).max).to(dtype)
    code = int(top.view(torch.uint8))
    below = float(torch.tensor(code - 1, dtype=torch.uint8).view(dtype))
    highest = float(top)
    return _Float8Bounds(highest, highest + (highest - below) / 2, bool(code & 1))


_FLOAT8_BOUNDS = {dtype: _float8_bounds(dtype) for dtype in FLOAT8_DTYPES}


def to_float8(x: torch.Tensor, dtype: torch.dtype, saturate: bool) -> torch.Tensor:
    """`x` cast to a float8 type as ONNX's Cast does: rounded to nearest even; out-of-range
    values and infinities at ±max when saturating, else NaN (±inf for E5M2, the only type
    with infinities); NaN stays NaN.

    torch's own cast disagrees out of range (E4M3FN always saturates, the others never do:
    ±inf or NaN), so only in-range values, NaN and E5M2's infinities reach it. Doubles are
    rounded to float32 first, as onnx's reference (ml_dtypes) does. The clamp passes no
    gradient to saturated values, like QuantizeLinear's float8 saturation; the cast passes it
    on as torch's casts do (as for float16: a gradient reaching a float8 value is rounded to
    float8 by the backward of the cast that read it)."""
    x = x.to(torch.float32)  # exact from a float8 type
    bounds = _FLOAT8_BOUNDS[dtype]
    if saturate:
        return x.clamp(-bounds.max, bounds.max).to(dtype)
    overflow = torch.full_like(x, float("nan"))
    if dtype == torch.float8_e5m2:
        overflow = torch.copysign(torch.full_like(x, float("inf")), x)
    return torch.where(bounds.overflows(x), overflow, x).to(dtype)


def cast_to(x: torch.Tensor, dtype: torch.dtype, saturate: bool = True) -> torch.Tensor:
    """ONNX's Cast of `x` to `dtype`; `saturate` applies to float8 targets only."""
    if dtype in FLOAT8_DTYPES:  # from the same type too: saturating, E5M2's ±inf become ±max
        return to_float8(x, dtype, saturate)
    if x.dtype == dtype:
        return x
    if x.dtype in FLOAT8_DTYPES:  # exact in float32; torch has no other float8 arithmetic
        x = x.to(torch.float32)
    if x.dtype in FLOAT_DTYPES and not dtype.is_floating_point and dtype != torch.bool:
        return x.trunc().to(dtype)
    return x.to(dtype)


# float → integer conversions beyond int32 give INT_MIN in onnx's reference (ml_dtypes casts
# through a C int on x86), whose low four bits are 0
_INT32_LIMIT = 2.0**31


def to_int4(x: torch.Tensor, onnx_type: int) -> torch.Tensor:
    """`x` cast to INT4/UINT4 as onnx's reference (ml_dtypes) does, held in int8/uint8: floats
    truncated toward zero (NaN, ±inf and values beyond int32 give 0), then the low four bits
    kept (wrapping, no saturation: `saturate` is for float8 targets only). No gradient, like
    any cast to an integer."""
    if x.dtype in FLOAT8_DTYPES or x.dtype in FLOAT_DTYPES:
        wide = x.detach().to(torch.float64).trunc()
        valid = wide.isfinite() & (wide >= -_INT32_LIMIT) & (wide < _INT32_LIMIT)
        x = torch.where(valid, wide, torch.zeros_like(wide))
    low_bits = x.to(torch.int64) & 0xF
    low, _ = INT4_RANGES[onnx_type]
    if low < 0:  # the sign bit is bit 3
        low_bits = torch.where(low_bits >= 8, low_bits - 16, low_bits)
    return low_bits.to(INT4_TO_TORCH[onnx_type])


def _caster(onnx_type: int, saturate: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """ONNX's Cast to `onnx_type` (a torch dtype's, or a 4-bit one's held one per byte)."""
    if onnx_type in INT4_TO_TORCH:
        return functools.partial(to_int4, onnx_type=onnx_type)
    dtype = torch_dtype(onnx_type)
    return functools.partial(cast_to, dtype=dtype, saturate=saturate)


@register("Cast")
def cast(ctx: OpContext) -> NodeFn:
    return _caster(int(ctx.attr("to")), bool(ctx.attr("saturate", 1)))  # saturate: opset 19


@register("CastLike")
def cast_like(ctx: OpContext) -> NodeFn:
    saturate = bool(ctx.attr("saturate", 1))
    # a 4-bit `like` is an int8/uint8 tensor at run time: its ONNX type decides
    like_type = ctx.input_type(1)
    if like_type in INT4_TO_TORCH:
        to_4_bits = _caster(like_type, saturate)
        return lambda x, like: to_4_bits(x)

    def fn(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return cast_to(x, like.dtype, saturate)

    return fn


@register("BitCast", since=26)
def bit_cast(ctx: OpContext) -> NodeFn:
    """The same bits read as another type of the same width (torch's `view(dtype)`, which
    carries no gradient: bits have no derivative)."""
    dtype = torch_dtype(int(ctx.attr("to")))
    width = torch.empty((), dtype=dtype).element_size()

    def fn(x: torch.Tensor) -> torch.Tensor:
        # torch would fold a size change into the last dimension; ONNX forbids one
        if x.element_size() != width:
            raise ValueError(
                f"BitCast: {x.dtype} ({8 * x.element_size()} bits) cannot be read as "
                f"{dtype} ({8 * width} bits): the widths must match"
            )
        return x.view(dtype)

    return fn


def _clip_values(x: torch.Tensor, low: Any, high: Any) -> torch.Tensor:
    if low is None and high is None:
        return x
    if isinstance(low, torch.Tensor) and low.numel() == 1:
        low = low.reshape(()).to(x.device)
    if isinstance(high, torch.Tensor) and high.numel() == 1:
        high = high.reshape(()).to(x.device)
    if isinstance(low, torch.Tensor) or isinstance(high, torch.Tensor):
        low_t = as_tensor(low, x) if low is not None else None
        high_t = as_tensor(high, x) if high is not None else None
        return torch.clamp(x, low_t, high_t)
    return torch.clamp(x, low, high)


@register("Clip")
def clip_6(ctx: OpContext) -> NodeFn:
    low = ctx.attr("min", float("-inf"))
    high = ctx.attr("max", float("inf"))
    return lambda x: torch.clamp(x, low, high)


@register("Clip", since=11)
def clip_11(ctx: OpContext) -> NodeFn:
    def fn(x: torch.Tensor, low: Any = None, high: Any = None) -> torch.Tensor:
        return _clip_values(x, low, high)

    return fn


@register("Shrink")
def shrink(ctx: OpContext) -> NodeFn:
    bias, lambd = float(ctx.attr("bias", 0.0)), float(ctx.attr("lambd", 0.5))

    def fn(x: torch.Tensor) -> torch.Tensor:
        out = torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, 0.0))
        return out.to(x.dtype)

    return fn


@register("Det")
def det(ctx: OpContext) -> NodeFn:
    return torch.linalg.det
