"""QuantizeLinear / DequantizeLinear: quantisation-aware-training (QAT) exports.

A QAT model's fake quantisation (torch.ao's FakeQuantize, NVIDIA's pytorch-quantization and
ModelOpt, Brevitas) is exported as a QuantizeLinear → DequantizeLinear pair; the legacy exporter
puts a Clip between them for a reduced range. The integers between the two carry no gradient in
torch, so a pair is computed in float (`fake_quantize_pairs`): Q gives its integers as float
values with the straight-through estimator that training uses (torch.fake_quantize_*: the
gradient passes where round(x / scale) + zero_point lies in range and is zero where it is
clamped) and DQ maps them back. A Q whose integers go anywhere else (a graph output, an integer
op) computes real integers. Scale and zero point are state, not weights (gradient_paths.py).

Per tensor (a scalar or one-element scale), per axis (`axis`, opset 13) and blocked
(`block_size`, opset 21) parameters; integer targets int8, uint8, int16, uint16, int4 and uint4
(opset 21) and int2 and uint2 (opset 25), the narrow ones held in int8/uint8 (ops/_util.py), and
float ones: float8 (opset 19, `saturate`) and FLOAT4E2M1 (opset 23, held in float8_e4m3fn,
always saturating: it has no NaN or infinity). Rounding is half to even, like torch.round. A
narrow target is known at conversion only: from `output_dtype` or the zero point's declared
ONNX type (an int8 zero point at run time may be an int4 one). Scales may be FLOAT8E8M0
(opset 24: powers of two, the MX formats' block scales); DequantizeLinear's `output_dtype`
(opset 23) then names the float type it computes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from onnx import TensorProto

from service.engine.graph import Node, NodeFn
from service.engine.onnx.ops._util import FLOAT4_MAX, FLOAT_DTYPES, SUB_BYTE_TO_TORCH, torch_dtype
from service.engine.onnx.ops._util import FLOAT8_TO_TORCH as FLOAT8_TO_TORCH  # convert.py's
from service.engine.onnx.ops.elementwise import to_float4
from service.engine.onnx.registry import OpContext, UnsupportedAttribute, register


@dataclass(frozen=True)
class QuantizedType:
    """How an ONNX quantised element type is held and clamped."""

    storage: torch.dtype  # the torch dtype that holds its values
    low: float
    high: float
    # a float type (float8, FLOAT4E2M1): values rounded to its grid, not to integers
    is_float8: bool = False
    is_float4: bool = False  # FLOAT4E2M1: ops/elementwise.to_float4 rounds to its grid


_INTEGER_TYPES: dict[int, QuantizedType] = {
    TensorProto.INT8: QuantizedType(torch.int8, -128, 127),
    TensorProto.UINT8: QuantizedType(torch.uint8, 0, 255),
    TensorProto.INT16: QuantizedType(torch.int16, -32768, 32767),
    # torch has few uint16 kernels: its values are held in int32
    TensorProto.UINT16: QuantizedType(torch.int32, 0, 65535),
    # held one per byte (ops/_util.py): only the ONNX types tell them from int8/uint8
    TensorProto.INT4: QuantizedType(torch.int8, -8, 7),
    TensorProto.UINT4: QuantizedType(torch.uint8, 0, 15),
    TensorProto.INT2: QuantizedType(torch.int8, -2, 1),
    TensorProto.UINT2: QuantizedType(torch.uint8, 0, 3),
}
_HELD_IN_OTHERS = frozenset({TensorProto.UINT16, *SUB_BYTE_TO_TORCH})
_FLOAT_TYPES: dict[int, QuantizedType] = {
    onnx_type: QuantizedType(dtype, -torch.finfo(dtype).max, torch.finfo(dtype).max, True)
    for onnx_type, dtype in FLOAT8_TO_TORCH.items()
    if onnx_type != TensorProto.FLOAT8E8M0  # a scale type, never a target
}
_FLOAT_TYPES[TensorProto.FLOAT4E2M1] = QuantizedType(
    SUB_BYTE_TO_TORCH[TensorProto.FLOAT4E2M1], -FLOAT4_MAX, FLOAT4_MAX, True, is_float4=True
)
QUANTIZED_TYPES: dict[int, QuantizedType] = {**_INTEGER_TYPES, **_FLOAT_TYPES}
# a zero point's torch dtype → its type (an int32 zero point is no Q target; an int8 one is
# INT8 unless its ONNX type says INT4 or INT2, a float8_e4m3fn one FLOAT8E4M3FN unless it says
# FLOAT4E2M1: `_declared_type`)
_BY_STORAGE = {q.storage: q for t, q in QUANTIZED_TYPES.items() if t not in _HELD_IN_OTHERS}
# the opset that made a target type a QuantizeLinear output (the older ones: its `output_dtype`'s)
_TARGET_SINCE: dict[int, int] = {
    TensorProto.FLOAT4E2M1: 23,
    TensorProto.INT2: 25,
    TensorProto.UINT2: 25,
}


def _declared_type(ctx: OpContext) -> QuantizedType | None:
    """The declared target type (`output_dtype`, opset 21), or a narrow zero point's ONNX type,
    or None: the zero point's, else uint8, decided when the zero point is seen."""
    declared = int(ctx.attr("output_dtype", 0) or 0)
    if not declared:
        zero_point_type = ctx.input_type(2)
        if zero_point_type in SUB_BYTE_TO_TORCH:
            return QUANTIZED_TYPES[zero_point_type]
        return None
    name = TensorProto.DataType.Name(declared)
    if declared not in QUANTIZED_TYPES:
        raise UnsupportedAttribute(f"output_dtype {name} is not supported")
    since = _TARGET_SINCE.get(declared, 0)
    if ctx.opset < since:
        raise UnsupportedAttribute(f"output_dtype {name} is not supported before opset {since}")
    return QUANTIZED_TYPES[declared]


def quantized_type(
    declared: QuantizedType | None, zero_point: torch.Tensor | None
) -> QuantizedType:
    """The target type: declared, else the zero point's, else uint8 (ONNX's default)."""
    if declared is not None:
        return declared
    if zero_point is None:
        return _INTEGER_TYPES[TensorProto.UINT8]
    target = _BY_STORAGE.get(zero_point.dtype)
    if target is None:
        raise ValueError(f"QuantizeLinear: zero point of dtype {zero_point.dtype} is not supported")
    return target


def _along(param: torch.Tensor, x: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    """`param` (a scale or zero point) broadcastable to `x`: per tensor, per axis or blocked."""
    if param.numel() == 1 and not block_size:
        return param.reshape(())
    axis = axis % x.dim()
    if block_size:  # one value per block of `block_size` along `axis`, same rank as x
        expanded = param.repeat_interleave(block_size, dim=axis)
        return expanded.narrow(axis, 0, x.shape[axis])
    shape = [1] * x.dim()
    shape[axis] = param.numel()
    return param.reshape(shape)


def _attrs(ctx: OpContext) -> tuple[int, int]:
    block_size = int(ctx.attr("block_size", 0))
    if block_size < 0:
        raise UnsupportedAttribute(f"block_size {block_size} is negative")
    return int(ctx.attr("axis", 1)), block_size


def _saturated(values: torch.Tensor, target: QuantizedType, saturate: bool) -> torch.Tensor:
    """`values` clamped to the target's range; unsaturated float8 overflows are NaN (the
    types without infinities) or ±inf, as ONNX says."""
    if saturate or not target.is_float8:
        return values.clamp(target.low, target.high)
    overflow = values.abs() > target.high
    if target.storage == torch.float8_e5m2:  # the only one with infinities
        return torch.where(overflow, values.sign() * float("inf"), values)
    return torch.where(overflow, torch.full_like(values, float("nan")), values)


@dataclass(frozen=True)
class QuantizeLinear:
    declared: QuantizedType | None
    axis: int
    block_size: int
    saturate: bool
    # straight-through float output for a Q→DQ pair (fake_quantize_pairs), else integers
    fake: bool = False
    # a widened range on a copy of the model (fix verification, service/engine/quantizers.py)
    scale_factor: float = 1.0

    def broadcast(self, param: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A scale or zero point of this node, broadcastable to its input `x`."""
        return _along(param, x, self.axis, self.block_size)

    def __call__(
        self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None
    ) -> torch.Tensor:
        target = quantized_type(self.declared, zero_point)
        compute = x.dtype if x.dtype.is_floating_point else torch.float32
        scale = _along(scale, x, self.axis, self.block_size).to(compute) * self.scale_factor
        scaled = x.to(compute) / scale
        offset = 0.0 if zero_point is None else _along(zero_point, x, self.axis, self.block_size)
        if isinstance(offset, torch.Tensor):
            offset = offset.to(torch.float32).to(compute)
        if target.is_float4:  # saturating and rounding, gradients as for float8 below
            grid = to_float4(scaled + offset)
            return grid.to(compute) if self.fake else grid.detach()
        if target.is_float8:  # zero point 0 (ONNX requires it); saturation before the cast
            bounded = _saturated(scaled + offset, target, self.saturate)
            grid = bounded.detach().to(target.storage)
            if not self.fake:
                return grid
            # the cast passes its gradient straight through, the saturation does not
            return bounded + (grid.to(compute) - bounded.detach())
        # round(x / scale) + zero_point, as ONNX and torch.fake_quantize_* have it (rounding
        # after adding an odd zero point would move ties)
        if not self.fake:
            grid = torch.round(scaled) + offset
            return _saturated(grid, target, self.saturate).to(target.storage)
        # the rounding passes its gradient straight through; the clamp zeroes it out of range
        rounded = scaled + (torch.round(scaled.detach()) - scaled.detach()) + offset
        return _saturated(rounded, target, self.saturate)


@dataclass(frozen=True)
class DequantizeLinear:
    axis: int
    block_size: int
    scale_factor: float = 1.0  # as QuantizeLinear's
    # `output_dtype` (opset 23), else the scale's type. The product is computed in the scale's
    # float type (float32 for a FLOAT8E8M0 one, which holds it exactly) and then cast, as onnx's
    # reference does.
    output: torch.dtype | None = None

    def __call__(
        self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None
    ) -> torch.Tensor:
        if scale.dtype not in FLOAT_DTYPES:  # FLOAT8E8M0
            scale = scale.to(torch.float32)
        values = x.to(scale.dtype)
        if zero_point is not None:
            offset = _along(zero_point, x, self.axis, self.block_size)
            values = values - offset.to(torch.float32).to(scale.dtype)
        product = values * (_along(scale, x, self.axis, self.block_size) * self.scale_factor)
        return product if self.output is None else product.to(self.output)


@register("QuantizeLinear", since=10)
def quantize_linear(ctx: OpContext) -> NodeFn:
    axis, block_size = _attrs(ctx)
    saturate = bool(int(ctx.attr("saturate", 1)))
    return QuantizeLinear(_declared_type(ctx), axis, block_size, saturate)


for _since in (13, 19, 21, 23):
    register("QuantizeLinear", since=_since)(quantize_linear)


def dequantized_dtype(output_dtype: int, scale_type: int) -> torch.dtype | None:
    """DequantizeLinear's `output_dtype` as a torch dtype (None: the scale's type); refuses what
    is no float type torch computes with, and a FLOAT8E8M0 scale without one."""
    if not output_dtype:
        if scale_type == TensorProto.FLOAT8E8M0:
            raise UnsupportedAttribute("a FLOAT8E8M0 scale needs output_dtype")
        return None
    dtype = torch_dtype(output_dtype)
    if dtype not in FLOAT_DTYPES:
        name = TensorProto.DataType.Name(output_dtype)
        raise UnsupportedAttribute(f"output_dtype {name} is not supported")
    return dtype


@register("DequantizeLinear", since=10)
def dequantize_linear(ctx: OpContext) -> NodeFn:
    output = dequantized_dtype(int(ctx.attr("output_dtype", 0) or 0), ctx.input_type(1))
    return DequantizeLinear(*_attrs(ctx), output=output)


for _since in (13, 19, 21, 23):
    register("DequantizeLinear", since=_since)(dequantize_linear)


# ops that keep a quantised integer an integer of the same grid between a Q and its DQ
_GRID_PRESERVING = frozenset({"Clip", "Identity"})


def fake_quantize_pairs(nodes: list[Node], graph_outputs: list[str]) -> list[str]:
    """Make each QuantizeLinear whose integers reach only DequantizeLinears (directly or
    through a Clip) compute in float with the straight-through gradient. Returns their names."""
    readers: dict[str, list[Node]] = {}
    for node in nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node)
    leaving = set(graph_outputs)

    def only_dequantized(value: str) -> bool:
        users = readers.get(value, [])
        if value in leaving or not users:
            return False
        return all(
            user.inputs[0] == value
            and (
                user.op_type == "DequantizeLinear"
                or (user.op_type in _GRID_PRESERVING and only_dequantized(user.outputs[0]))
            )
            for user in users
        )

    faked: list[str] = []
    for node in nodes:
        if (
            node.op_type == "QuantizeLinear"
            and isinstance(node.fn, QuantizeLinear)
            and only_dequantized(node.outputs[0])
        ):
            node.fn = dataclasses.replace(node.fn, fake=True)
            faked.append(node.name)
    return faked
