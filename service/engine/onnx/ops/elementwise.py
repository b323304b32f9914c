"""Elementwise math, comparison and logic, Cast/CastLike/BitCast, Identity, Where, Clip."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from onnx import TensorProto

from service.engine.graph import NodeFn, passthrough
from service.engine.onnx.ops._util import (
    FLOAT4_MAX,
    FLOAT8_DTYPES,
    FLOAT_DTYPES,
    SUB_BYTE_INT_RANGES,
    SUB_BYTE_TO_TORCH,
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


# (FLOAT8E8M0 has its own rounding: `to_float8e8m0`)
_FLOAT8_BOUNDS = {
    dtype: _float8_bounds(dtype) for dtype in FLOAT8_DTYPES if dtype != torch.float8_e8m0fnu
}


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


# FLOAT8E8M0 is 2^(code - 127), code 255 NaN; Cast-24's `round_mode`s for it
_E8M0_BIAS, _E8M0_NAN = 127, 255
_E8M0_MIN, _E8M0_MAX = 2.0**-127, 2.0**127
_E8M0_ROUND_MODES = ("up", "down", "nearest")


def to_float8e8m0(x: torch.Tensor, saturate: bool, round_mode: str) -> torch.Tensor:
    """`x` cast to FLOAT8E8M0 as Cast-24's table and onnxruntime have it: log2(x) rounded `up`,
    `down` or to the `nearest` (1.5 x 2^e, the midpoint, up); NaN stays NaN. Saturating, what
    lies below 2^-127 (zero, negative values, -inf) is 2^-127 and above 2^127 (+inf) 2^127;
    not saturating, both are NaN.

    onnx's reference (numpy_helper.to_float8e8m0) differs where the table says nothing
    (negative values: it takes |x|) and where it does: ±inf give NaN even saturating, zero is
    2^-127 unsaturated too, and float32 subnormals (2^-127 itself) round as if their exponent
    field were one. No gradient, like a cast to an integer: its values are exponents."""
    x = x.detach().to(torch.float32)  # doubles rounded first, as the reference and torch do
    mantissa, exponent = torch.frexp(x)  # x = mantissa x 2^exponent, mantissa in [0.5, 1)
    code = exponent.to(torch.int32) - 1 + _E8M0_BIAS  # floor(log2 x), biased, for x > 0
    if round_mode == "up":
        code = code + (mantissa > 0.5).to(torch.int32)
    elif round_mode == "nearest":
        code = code + (mantissa >= 0.75).to(torch.int32)
    below, above = x < _E8M0_MIN, x > _E8M0_MAX  # NaN is neither
    if saturate:
        code = torch.where(below, 0, torch.where(above, _E8M0_NAN - 1, code))
    else:
        code = torch.where(below | above, _E8M0_NAN, code)
    code = torch.where(x.isnan(), _E8M0_NAN, code)
    return code.to(torch.uint8).view(torch.float8_e8m0fnu)


def to_float4(x: torch.Tensor) -> torch.Tensor:
    """`x` cast to FLOAT4E2M1, held in float8_e4m3fn (ops/_util.py), as onnx's reference
    (ml_dtypes) does: rounded to the nearest of ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}, ties to even;
    ±6 beyond ±6, ±inf included (it has no infinity or NaN, so it always saturates: `saturate`
    changes nothing); NaN gives -0, as the reference and onnx's backend test data have it
    (onnx's float4 notes say 6; onnxruntime 1.32 has no such cast). Doubles are rounded to
    float32 first, as the reference does. The clamp passes no gradient to saturated values, the
    rounding passes it straight through, as `to_float8`."""
    x = x.to(torch.float32)
    bounded = x.clamp(-FLOAT4_MAX, FLOAT4_MAX)
    magnitude = bounded.detach().abs()
    # the grid's spacing: 0.5 below 2 (0, 0.5, 1, 1.5), 1 up to 4 (2, 3), 2 from 4 (4, 6)
    step = torch.where(magnitude < 2, 0.5, torch.where(magnitude < 4, 1.0, 2.0))
    rounded = torch.copysign(torch.round(magnitude / step) * step, bounded.detach())
    # the straight-through gradient as `rounded - (b - b)`, not `b + (rounded - b)`: b - b is
    # +0, and -0 - +0 stays -0 where -0 + +0 would be +0
    passed = rounded - (bounded.detach() - bounded)
    return torch.where(x.isnan(), -0.0, passed).to(SUB_BYTE_TO_TORCH[TensorProto.FLOAT4E2M1])


def cast_to(
    x: torch.Tensor, dtype: torch.dtype, saturate: bool = True, round_mode: str = "up"
) -> torch.Tensor:
    """ONNX's Cast of `x` to `dtype`; `saturate` applies to float8 targets only, `round_mode`
    to FLOAT8E8M0."""
    if dtype == torch.float8_e8m0fnu:
        return to_float8e8m0(x, saturate, round_mode)
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
# through a C int on x86), whose low bits are 0
_INT32_LIMIT = 2.0**31


def to_sub_byte_int(x: torch.Tensor, onnx_type: int) -> torch.Tensor:
    """`x` cast to INT4/UINT4/INT2/UINT2 as onnx's reference (ml_dtypes) does, held in
    int8/uint8: floats truncated toward zero (NaN, ±inf and values beyond int32 give 0), then
    the low four (two) bits kept (wrapping, no saturation: `saturate` is for float8 targets
    only). onnxruntime 1.32 rounds half away from zero instead of truncating. No gradient, like
    any cast to an integer."""
    if x.dtype in FLOAT8_DTYPES or x.dtype in FLOAT_DTYPES:
        wide = x.detach().to(torch.float64).trunc()
        valid = wide.isfinite() & (wide >= -_INT32_LIMIT) & (wide < _INT32_LIMIT)
        x = torch.where(valid, wide, torch.zeros_like(wide))
    low, high = SUB_BYTE_INT_RANGES[onnx_type]
    span = high - low + 1  # 16 or 4
    low_bits = x.to(torch.int64) & (span - 1)
    if low < 0:  # the top bit is the sign
        low_bits = torch.where(low_bits > high, low_bits - span, low_bits)
    return low_bits.to(SUB_BYTE_TO_TORCH[onnx_type])


def _caster(
    onnx_type: int, saturate: bool, round_mode: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """ONNX's Cast to `onnx_type` (a torch dtype's, or a narrow one's held one per byte)."""
    if onnx_type == TensorProto.FLOAT4E2M1:
        return to_float4
    if onnx_type in SUB_BYTE_INT_RANGES:
        return functools.partial(to_sub_byte_int, onnx_type=onnx_type)
    dtype = torch_dtype(onnx_type)
    return functools.partial(cast_to, dtype=dtype, saturate=saturate, round_mode=round_mode)


def _cast_attrs(ctx: OpContext) -> tuple[bool, str]:
    """`saturate` (opset 19) and `round_mode` (opset 24)."""
    round_mode = str(ctx.attr("round_mode", "up"))
    require(
        round_mode in _E8M0_ROUND_MODES,
        f"round_mode '{round_mode}' is not one of {_E8M0_ROUND_MODES}",
    )
    return bool(ctx.attr("saturate", 1)), round_mode


@register("Cast")
def cast(ctx: OpContext) -> NodeFn:
    return _caster(int(ctx.attr("to")), *_cast_attrs(ctx))


@register("CastLike")
def cast_like(ctx: OpContext) -> NodeFn:
    saturate, round_mode = _cast_attrs(ctx)
    # a narrow `like` is held in another type at run time (int8, float8_e4m3fn): its ONNX
    # type decides
    like_type = ctx.input_type(1)
    if like_type in SUB_BYTE_TO_TORCH:
        to_narrow = _caster(like_type, saturate, round_mode)
        return lambda x, like: to_narrow(x)

    def fn(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return cast_to(x, like.dtype, saturate, round_mode)

    return fn


@register("BitCast", since=26)
def bit_cast(ctx: OpContext) -> NodeFn:
    """The same bits read as another type of the same width (torch's `view(dtype)`, which
    carries no gradient: bits have no derivative)."""
    to = int(ctx.attr("to"))
    # a narrow type's holder holds its value, not its bits
    for onnx_type in (ctx.input_type(0), to):
        require(
            onnx_type not in SUB_BYTE_TO_TORCH,
            f"BitCast to or from {TensorProto.DataType.Name(onnx_type)} is not supported",
        )
    dtype = torch_dtype(to)
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
