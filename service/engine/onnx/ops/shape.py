"""Shape ops: Shape, Size, Reshape, Flatten, Squeeze/Unsqueeze, Transpose, Concat, Split, Slice,
Expand, Tile, Range, ConstantOfShape, Constant, DepthToSpace/SpaceToDepth, EyeLike.

Shape-computation chains (Shape → Gather → Concat → Reshape) run on small int64 CPU tensors,
read back as Python ints where a shape is consumed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from service.engine.graph import NodeFn
from service.engine.onnx.ops._util import (
    LastTensorMemo,
    ints,
    norm_axes,
    norm_axis,
    require,
    scalar,
    torch_dtype,
)
from service.engine.onnx.registry import OpContext, register


@register("Shape")
def shape(ctx: OpContext) -> NodeFn:
    start, end = ctx.attr("start", 0), ctx.attr("end")

    def fn(x: torch.Tensor) -> torch.Tensor:
        dims = list(x.shape)[start:end] if (start or end is not None) else list(x.shape)
        return torch.tensor(dims, dtype=torch.int64)

    return fn


@register("Size")
def size(ctx: OpContext) -> NodeFn:
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64)


def _reshape(x: torch.Tensor, target: Sequence[int], allowzero: bool) -> torch.Tensor:
    if not allowzero and 0 in target:
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


def _static_ints(value: Any) -> tuple[int, ...]:
    return tuple(ints(value))


@register("Reshape")
def reshape_1(ctx: OpContext) -> NodeFn:
    target = list(ctx.attr("shape", []))
    return lambda x: _reshape(x, target, False)


@register("Reshape", since=5)
def reshape_5(ctx: OpContext) -> NodeFn:
    allowzero = bool(ctx.attr("allowzero", 0))
    target_ints = LastTensorMemo(_static_ints)
    return lambda x, target: _reshape(x, target_ints(target), allowzero)


@register("Flatten")
def flatten(ctx: OpContext) -> NodeFn:
    axis = int(ctx.attr("axis", 1))

    def fn(x: torch.Tensor) -> torch.Tensor:
        a = norm_axis(axis, x.dim())
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))

    return fn


def _squeeze(x: torch.Tensor, axes: list[int]) -> torch.Tensor:
    if not axes:
        return x.squeeze()
    return x.squeeze(tuple(norm_axes(axes, x.dim())))


def _unsqueeze(x: torch.Tensor, axes: list[int]) -> torch.Tensor:
    rank = x.dim() + len(axes)
    shape = list(x.shape)
    for a in sorted(norm_axes(axes, rank)):
        shape.insert(a, 1)
    return x.reshape(shape)


@register("Squeeze")
def squeeze_1(ctx: OpContext) -> NodeFn:
    axes = list(ctx.attr("axes", []))
    return lambda x: _squeeze(x, axes)


@register("Squeeze", since=13)
def squeeze_13(ctx: OpContext) -> NodeFn:
    axes_ints = LastTensorMemo(_static_ints)
    return lambda x, axes=None: _squeeze(x, axes_ints(axes))


@register("Unsqueeze")
def unsqueeze_1(ctx: OpContext) -> NodeFn:
    axes = list(ctx.attr("axes", []))
    return lambda x: _unsqueeze(x, axes)


@register("Unsqueeze", since=13)
def unsqueeze_13(ctx: OpContext) -> NodeFn:
    axes_ints = LastTensorMemo(_static_ints)
    return lambda x, axes: _unsqueeze(x, axes_ints(axes))


@register("Transpose")
def transpose(ctx: OpContext) -> NodeFn:
    perm = ctx.attr("perm")
    if perm is None:
        return lambda x: x.permute(*reversed(range(x.dim())))
    return lambda x: x.permute(*perm)


@register("Concat")
def concat(ctx: OpContext) -> NodeFn:
    axis = int(ctx.attr("axis", 0))

    def fn(*xs: torch.Tensor) -> torch.Tensor:
        if len(xs) > 1 and any(x.device != xs[0].device for x in xs):
            xs = tuple(x.to(xs[0].device) for x in xs)  # shape tensors next to device data
        return torch.cat(xs, dim=axis)

    return fn


def _split(x: torch.Tensor, axis: int, sizes: list[int] | None, count: int) -> tuple[Any, ...]:
    a = norm_axis(axis, x.dim())
    if not sizes:
        chunk = math.ceil(x.shape[a] / count)
        sizes = [min(chunk, x.shape[a] - i * chunk) for i in range(count)]
    return tuple(torch.split(x, sizes, dim=a))


@register("Split")
def split_2(ctx: OpContext) -> NodeFn:
    axis, count = int(ctx.attr("axis", 0)), ctx.num_outputs
    sizes = ctx.attr("split")
    if sizes is None and ctx.num_inputs > 1:  # opset 1 allowed `split` as a second input
        return lambda x, s=None: _split(x, axis, ints(s) or None, count)
    return lambda x: _split(x, axis, list(sizes) if sizes else None, count)


@register("Split", since=13)
def split_13(ctx: OpContext) -> NodeFn:
    axis, count = int(ctx.attr("axis", 0)), ctx.num_outputs
    num_outputs = ctx.attr("num_outputs")
    if num_outputs is not None:
        count = int(num_outputs)
    return lambda x, s=None: _split(x, axis, ints(s) or None, count)


def _slice(
    x: torch.Tensor,
    starts: Sequence[int],
    ends: Sequence[int],
    axes: Sequence[int] | None,
    steps: Sequence[int] | None,
) -> torch.Tensor:
    axes = norm_axes(axes, x.dim()) if axes else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    flips: list[int] = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        dim = x.shape[axis]
        require(step != 0, "Slice step 0")
        if start < 0:
            start += dim
        if end < 0:
            end += dim
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
            index[axis] = slice(start, end, step)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            # torch has no negative steps: slice the flipped axis instead.
            flips.append(axis)
            index[axis] = slice(dim - 1 - start, max(dim - 1 - end, 0), -step)
    if flips:
        x = x.flip(flips)
    return x[tuple(index)]


@register("Slice")
def slice_1(ctx: OpContext) -> NodeFn:
    starts, ends = list(ctx.attr("starts")), list(ctx.attr("ends"))
    axes = ctx.attr("axes")
    return lambda x: _slice(x, starts, ends, axes, None)


@register("Slice", since=10)
def slice_10(ctx: OpContext) -> NodeFn:
    memos = [LastTensorMemo(_static_ints) for _ in range(4)]

    def fn(x: torch.Tensor, starts: Any, ends: Any, axes: Any = None, steps: Any = None) -> Any:
        s, e, a, st = (memo(v) for memo, v in zip(memos, (starts, ends, axes, steps), strict=True))
        return _slice(x, s, e, a or None, st or None)

    return fn


@register("Expand", since=8)
def expand(ctx: OpContext) -> NodeFn:
    target_ints = LastTensorMemo(_static_ints)

    def fn(x: torch.Tensor, target: Any) -> torch.Tensor:
        return x.expand(_broadcast_shape(tuple(x.shape), tuple(target_ints(target))))

    return fn


def _broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """numpy's broadcasting of two shapes, in plain Python: torch.broadcast_shapes goes
    through torch._refs and cost ~15 µs per call, per Expand node (an LSTM's initial states)."""
    rank = max(len(a), len(b))
    a, b = (1,) * (rank - len(a)) + a, (1,) * (rank - len(b)) + b
    out = []
    for i, (m, n) in enumerate(zip(a, b, strict=True)):
        if m != n and m != 1 and n != 1:
            raise ValueError(f"Expand: shapes {a} and {b} do not broadcast (axis {i}: {m} vs {n})")
        out.append(n if m == 1 else m)
    return tuple(out)


@register("Tile", since=6)
def tile(ctx: OpContext) -> NodeFn:
    return lambda x, repeats: x.repeat(ints(repeats)) if x.dim() else x


@register("Range", since=11)
def range_(ctx: OpContext) -> NodeFn:
    def fn(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        s, lim, d = scalar(start), scalar(limit), scalar(delta)
        count = max(math.ceil((lim - s) / d), 0)
        return (torch.arange(count, dtype=torch.float64) * d + s).to(start.dtype)

    return fn


@register("ConstantOfShape", since=9)
def constant_of_shape(ctx: OpContext) -> NodeFn:
    value = ctx.attr("value")
    fill = value.reshape(-1)[0] if isinstance(value, torch.Tensor) else torch.tensor(0.0)

    def fn(target: Any) -> torch.Tensor:
        return torch.full(ints(target), fill.item(), dtype=fill.dtype)

    return fn


@register("Constant")
def constant(ctx: OpContext) -> NodeFn:
    attrs = ctx.attrs
    value: torch.Tensor
    if "value" in attrs:
        value = attrs["value"]
    elif "value_float" in attrs:
        value = torch.tensor(float(attrs["value_float"]), dtype=torch.float32)
    elif "value_floats" in attrs:
        value = torch.tensor(list(attrs["value_floats"]), dtype=torch.float32)
    elif "value_int" in attrs:
        value = torch.tensor(int(attrs["value_int"]), dtype=torch.int64)
    elif "value_ints" in attrs:
        value = torch.tensor(list(attrs["value_ints"]), dtype=torch.int64)
    else:
        kinds = ", ".join(attrs) or "none"
        raise_unsupported(f"Constant with attribute(s) {kinds} (strings and sparse tensors)")
    return lambda: value


def raise_unsupported(message: str) -> Any:
    require(False, message)


@register("DepthToSpace")
def depth_to_space(ctx: OpContext) -> NodeFn:
    b = int(ctx.attr("blocksize"))
    mode = str(ctx.attr("mode", "DCR"))
    require(mode in ("DCR", "CRD"), f"mode '{mode}'")

    def fn(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if mode == "DCR":
            y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
        return y.reshape(n, c // (b * b), h * b, w * b)

    return fn


@register("SpaceToDepth")
def space_to_depth(ctx: OpContext) -> NodeFn:
    b = int(ctx.attr("blocksize"))
    mode = str(ctx.attr("mode", "DCR"))
    require(mode in ("DCR", "CRD"), f"mode '{mode}'")
    order = (0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4)

    def fn(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // b, b, w // b, b).permute(*order)
        return y.reshape(n, c * b * b, h // b, w // b)

    return fn


@register("EyeLike")
def eye_like(ctx: OpContext) -> NodeFn:
    k = int(ctx.attr("k", 0))
    dtype_attr = ctx.attr("dtype")
    dtype = torch_dtype(int(dtype_attr)) if dtype_attr is not None else None

    def fn(x: torch.Tensor) -> torch.Tensor:
        rows, cols = x.shape
        eye = torch.ones(rows, cols, dtype=dtype or x.dtype, device=x.device)
        return torch.triu(torch.tril(eye, k), k)

    return fn
