"""Helpers shared by the op families: dtype maps, shape-like values, broadcasting axes.

UINT16/32/64 are left out on purpose: torch has almost no kernels for them (add, compare,
shift all raise), so a model using them is refused up front instead of failing mid-run.
The float8 types are in: torch holds and converts them (graph inputs and outputs, Cast,
QuantizeLinear/DequantizeLinear) though it computes with none of them, and a model stores
values in float8 exactly to cast them before any arithmetic. FLOAT8E8M0 (opset 24, the MX
formats' power-of-two block scale) is one of them, in torch's float8_e8m0fnu; torch's own cast
to it rounds up only, so Cast computes its three round modes itself (ops/elementwise.py).

The types narrower than a byte are held by value, one per byte, in a torch dtype that holds
each of their values exactly: INT4/UINT4 and INT2/UINT2 in int8/uint8 (torch's own int4/uint4
dtypes are shells: not even a copy works), FLOAT4E2M1 in float8_e4m3fn (torch's
float4_e2m1fn_x2 packs two a byte and converts to nothing). Weight-only-quantised models store
their weights in them, read by DequantizeLinear. By value, every reader (Cast from them,
DequantizeLinear, Reshape and the like) reads them as it reads the holder; FLOAT4E2M1's holder
being a float8 type, it is never taken for a trainable float weight nor computed with, which a
float32 holder would be, and 4-bit codes in uint8 would need the ONNX type in every reader.
An int8 tensor that is "really" int4 looks like any int8 one at run time, so whatever depends
on the narrow type (Cast/CastLike to it, QuantizeLinear's range) decides it at conversion, from
the ONNX types (`OpContext.input_type`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from service.engine.onnx.registry import UnsupportedAttribute

FLOAT8_TO_TORCH: dict[int, torch.dtype] = {
    TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn,
    TensorProto.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz,
    TensorProto.FLOAT8E5M2: torch.float8_e5m2,
    TensorProto.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz,
    TensorProto.FLOAT8E8M0: torch.float8_e8m0fnu,
}
FLOAT8_DTYPES = frozenset(FLOAT8_TO_TORCH.values())
# Types narrower than a byte, one value per byte in the torch dtype that holds them (above)
SUB_BYTE_TO_TORCH: dict[int, torch.dtype] = {
    TensorProto.INT4: torch.int8,
    TensorProto.UINT4: torch.uint8,
    TensorProto.INT2: torch.int8,
    TensorProto.UINT2: torch.uint8,
    TensorProto.FLOAT4E2M1: torch.float8_e4m3fn,
}
SUB_BYTE_INT_RANGES: dict[int, tuple[int, int]] = {
    TensorProto.INT4: (-8, 7),
    TensorProto.UINT4: (0, 15),
    TensorProto.INT2: (-2, 1),
    TensorProto.UINT2: (0, 3),
}
FLOAT4_MAX = 6.0  # FLOAT4E2M1's largest value (S.11.1); it has no NaN and no infinity
ONNX_TO_TORCH: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.BOOL: torch.bool,
    TensorProto.COMPLEX64: torch.complex64,
    TensorProto.COMPLEX128: torch.complex128,
    **FLOAT8_TO_TORCH,
    **SUB_BYTE_TO_TORCH,
}
# int8/uint8 are INT8/UINT8, float8_e4m3fn FLOAT8E4M3FN (the narrow types' holders never name
# them)
TORCH_TO_ONNX: dict[torch.dtype, int] = {
    v: k for k, v in ONNX_TO_TORCH.items() if k not in SUB_BYTE_TO_TORCH
}
# The float dtypes torch computes with (not float8's: see the module's docstring).
FLOAT_DTYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16}


def torch_dtype(onnx_type: int) -> torch.dtype:
    """The torch dtype of an ONNX element type; refuses the ones torch cannot hold."""
    try:
        return ONNX_TO_TORCH[onnx_type]
    except KeyError:
        name = TensorProto.DataType.Name(onnx_type) if onnx_type else "UNDEFINED"
        raise UnsupportedAttribute(f"element type {name} is not supported") from None


def _float4_as_e4m3(codes: torch.Tensor) -> torch.Tensor:
    """FLOAT4E2M1's codes S.EE.M (exponent bias 1) as the float8_e4m3fn bits S.EEEE.MMM
    (bias 7) of the same values; its subnormal 0.5 (S.00.1) is 2^-1, S.0110.000. In uint8
    throughout, by arithmetic rather than a table look-up: a weight's index tensor would take
    eight bytes a value."""
    sign = (codes & 0x8) << 4
    exponent, mantissa = (codes >> 1) & 0x3, codes & 0x1
    normal = ((exponent + 6) << 3) | (mantissa << 2)
    return (torch.where(exponent > 0, normal, mantissa * (6 << 3)) | sign).view(torch.float8_e4m3fn)


def _e4m3_as_float4(held: torch.Tensor) -> torch.Tensor:
    """The codes of FLOAT4E2M1 values held in float8_e4m3fn: `_float4_as_e4m3` inverted."""
    bits = held.view(torch.uint8)
    sign = (bits >> 7) << 3
    exponent = (bits >> 3) & 0xF
    normal = ((exponent - 6) << 1) | ((bits >> 2) & 0x1)  # from 1 (exponent 7) on
    return torch.where(exponent > 6, normal, (exponent == 6).to(torch.uint8)) | sign


def sub_byte_tensor(array: np.ndarray, onnx_type: int) -> torch.Tensor:
    """A narrow type's values (an `ml_dtypes` array, one value per byte: what
    `onnx.numpy_helper.to_array` unpacks) in the torch dtype that holds them."""
    holder = SUB_BYTE_TO_TORCH[onnx_type]
    if onnx_type == TensorProto.FLOAT4E2M1:  # through the codes (a copy: read-only arrays)
        return _float4_as_e4m3(torch.from_numpy(np.array(array.view(np.uint8))))
    return torch.from_numpy(array.astype(str(holder).removeprefix("torch.")))


def sub_byte_proto(name: str, tensor: torch.Tensor, onnx_type: int) -> TensorProto:
    """A TensorProto of a narrow type (packed, 2 or 4 values a byte) of its holder `tensor`."""
    held = tensor.detach().cpu().contiguous()
    np_type = helper.tensor_dtype_to_np_dtype(onnx_type)
    if onnx_type == TensorProto.FLOAT4E2M1:  # values on its grid: their codes
        return numpy_helper.from_array(_e4m3_as_float4(held).numpy().view(np_type), name)
    return numpy_helper.from_array(held.numpy().astype(np_type), name)


def ints(value: Any) -> list[int]:
    """A shape-like value (tensor, list, int) as a list of Python ints."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def scalar(value: Any) -> Any:
    """A 0-d/1-element tensor or a number as a Python number."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1)[0].item()
    return value


def as_tensor(value: Any, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if like is not None:
        return torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return torch.as_tensor(value)


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def norm_axes(axes: Sequence[int], rank: int) -> list[int]:
    return [norm_axis(int(a), rank) for a in axes]


def on_device(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Index tensors (often from shape computations on CPU) moved next to the data."""
    return index if index.device == like.device else index.to(like.device)


def require(condition: bool, message: str) -> None:
    """Refuse a node at build time (collected into the model's UnsupportedModelError)."""
    if not condition:
        raise UnsupportedAttribute(message)


# Largest tensor a `LastTensorMemo` keeps alive between calls.
MEMO_MAX_NUMEL = 1024


class LastTensorMemo:
    """`fn(value, *extra)` remembered for the last small tensor `value` seen, by identity and
    in-place version.

    A node's shape-like input (a Reshape target, Unsqueeze axes, a Gather index) is usually
    the same tensor call after call: a folded constant, or shape arithmetic `ObservableGraph.run`
    reuses per input shape. Reading it back as Python ints per call is a dispatcher call (and,
    for a tensor on a GPU, a device sync); moving a CPU one next to device data is a copy.
    Results are shared between calls: callers must not modify them. Tensors that need a
    gradient are never remembered (their graph is per call).
    """

    __slots__ = ("_fn", "_last")

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn
        self._last: tuple[Any, int, tuple[Any, ...], Any] | None = None

    def __call__(self, value: Any, *extra: Any) -> Any:
        last = self._last
        if last is not None and last[0] is value and last[2] == extra and value._version == last[1]:
            return last[3]
        result = self._fn(value, *extra)
        if (
            isinstance(value, torch.Tensor)
            and not value.requires_grad
            and not value.is_inference()  # (no version counter)
            and value.numel() <= MEMO_MAX_NUMEL
        ):
            self._last = (value, value._version, extra, result)
        return result
