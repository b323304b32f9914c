"""Helpers shared by the op families: dtype maps, shape-like values, broadcasting axes.

UINT16/32/64 are left out on purpose: torch has almost no kernels for them (add, compare,
shift all raise), so a model using them is refused up front instead of failing mid-run.
The float8 types are in: torch holds and converts them (graph inputs and outputs, Cast,
QuantizeLinear/DequantizeLinear) though it computes with none of them, and a model stores
values in float8 exactly to cast them before any arithmetic. INT4/UINT4 are in, held one
value per byte in int8/uint8 (torch's own int4/uint4 dtypes are shells: not even a copy works):
weight-only-quantised models store their weights in them, read by DequantizeLinear. An int8
tensor that is "really" int4 looks like any int8 one at run time, so whatever depends on the
4-bit type (Cast/CastLike to it, QuantizeLinear's range) decides it at conversion, from the
ONNX types (`OpContext.input_type`). INT2/UINT2 stay out, FLOAT4E2M1 too (torch packs it two
to a byte), and FLOAT8E8M0 (torch's cast rounds up only; Cast has three round modes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from onnx import TensorProto, helper, numpy_helper

from service.engine.onnx.registry import UnsupportedAttribute

FLOAT8_TO_TORCH: dict[int, torch.dtype] = {
    TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn,
    TensorProto.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz,
    TensorProto.FLOAT8E5M2: torch.float8_e5m2,
    TensorProto.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz,
}
FLOAT8_DTYPES = frozenset(FLOAT8_TO_TORCH.values())
# 4-bit integers, one per byte: the torch dtype that holds them and their range
INT4_TO_TORCH: dict[int, torch.dtype] = {
    TensorProto.INT4: torch.int8,
    TensorProto.UINT4: torch.uint8,
}
INT4_RANGES: dict[int, tuple[int, int]] = {TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15)}
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
    **INT4_TO_TORCH,
}
# int8/uint8 are INT8/UINT8 (the 4-bit types' holders never name them)
TORCH_TO_ONNX: dict[torch.dtype, int] = {
    v: k for k, v in ONNX_TO_TORCH.items() if k not in INT4_TO_TORCH
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


def int4_proto(name: str, tensor: torch.Tensor, onnx_type: int) -> TensorProto:
    """An INT4/UINT4 TensorProto (packed two values a byte) of an int8/uint8 `tensor`."""
    array = tensor.detach().cpu().contiguous().numpy()
    return numpy_helper.from_array(array.astype(helper.tensor_dtype_to_np_dtype(onnx_type)), name)


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
