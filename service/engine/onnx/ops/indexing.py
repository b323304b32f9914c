"""Indexing: Gather*, Scatter*, OneHot, Trilu, NonZero, Pad, Compress-free subset."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from service.engine.graph import NodeFn
from service.engine.onnx.ops._util import (
    LastTensorMemo,
    ints,
    norm_axes,
    norm_axis,
    on_device,
    require,
    scalar,
)
from service.engine.onnx.registry import OpContext, register
from service.engine.onnx.source_parameters import fx_node_text


def _wrap_negative(index: torch.Tensor, size: int | torch.Tensor) -> torch.Tensor:
    return torch.where(index < 0, index + size, index)


class EmbeddingGradient(NamedTuple):
    """What an `nn.Embedding` changes in its lookup's gradient, which a Gather does not say."""

    padding_idx: int | None  # this row gets no gradient
    scale_grad_by_freq: bool  # each row's gradient divided by its count in the batch


# The dynamo exporter's record of the aten call (`pkg.torch.onnx.fx_node`):
# aten.embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False)
_EMBEDDING_CALL = re.compile(
    r"aten\.embedding\.default\]\(args = \(%\w+, %\w+(?:, (-?\d+))?(?:, (True|False))?"
)


# OpContext.extra key: a legacy-exported embedding Gather's first output → its padding row,
# as read off its weight (onnx/padding_rows.py)
PADDING_ROWS = "padding_rows"


def embedding_gradient(ctx: OpContext) -> EmbeddingGradient | None:
    """The source Embedding's padding_idx / scale_grad_by_freq where a dynamo export's Gather
    records them and they change the gradient, or the padding row found in a legacy export's
    weight (PADDING_IDX), else None."""
    if ctx.node is None or int(ctx.attr("axis", 0)) != 0:
        return None
    found = ctx.extra.get(PADDING_ROWS, {}).get(ctx.node.output[0] if ctx.node.output else "")
    if found is not None:
        return EmbeddingGradient(int(found), False)
    match = _EMBEDDING_CALL.search(fx_node_text(ctx.node) or "")
    if match is None:
        return None
    padding = int(match.group(1)) if match.group(1) is not None else -1
    by_frequency = match.group(2) == "True"
    if padding < 0 and not by_frequency:
        return None
    return EmbeddingGradient(padding if padding >= 0 else None, by_frequency)


@register("Gather")
def gather(ctx: OpContext) -> NodeFn:
    axis = int(ctx.attr("axis", 0))
    position = LastTensorMemo(int)  # the index is mostly a constant: read it once
    embedding = embedding_gradient(ctx)

    def fn(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        a = norm_axis(axis, x.dim())
        if embedding is not None and x.dim() == 2:
            # the lookup as torch's embedding computes it and its gradient: the padding row's
            # stays zero, as in the source model
            return F.embedding(
                on_device(_wrap_negative(index.long(), x.shape[0]), x),
                x,
                padding_idx=embedding.padding_idx,
                scale_grad_by_freq=embedding.scale_grad_by_freq,
            )
        if index.dim() == 0 and index.device.type == "cpu":
            # One position (exporters' q/k/v split, shape picks): a view whose backward is a
            # slice copy, not index_select's scatter-add.
            return x.select(a, position(index))
        index = on_device(_wrap_negative(index.long(), x.shape[a]), x)
        picked = x.index_select(a, index.reshape(-1))
        return picked.reshape([*x.shape[:a], *index.shape, *x.shape[a + 1 :]])

    return fn


@register("GatherElements")
def gather_elements(ctx: OpContext) -> NodeFn:
    axis = int(ctx.attr("axis", 0))

    def fn(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        a = norm_axis(axis, x.dim())
        return torch.gather(x, a, on_device(_wrap_negative(index.long(), x.shape[a]), x))

    return fn


@register("GatherND")
def gather_nd(ctx: OpContext) -> NodeFn:
    batch_dims = int(ctx.attr("batch_dims", 0))

    def fn(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        index = on_device(index.long(), x)
        k = index.shape[-1]
        batch = x.shape[:batch_dims]
        nb = int(torch.tensor(batch).prod()) if batch_dims else 1
        data = x.reshape(nb, *x.shape[batch_dims:])
        idx = index.reshape(nb, -1, k)
        dims = torch.tensor(data.shape[1 : 1 + k], device=x.device)
        idx = _wrap_negative(idx, dims)
        b = torch.arange(nb, device=x.device).reshape(nb, 1).expand(nb, idx.shape[1])
        picked = data[(b, *idx.unbind(-1))]
        return picked.reshape([*index.shape[:-1], *x.shape[batch_dims + k :]])

    return fn


_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _reduction(ctx: OpContext) -> str:
    reduction = str(ctx.attr("reduction", "none"))
    require(reduction == "none" or reduction in _REDUCE, f"reduction='{reduction}'")
    return reduction


def _scatter_elements(
    x: torch.Tensor, index: torch.Tensor, updates: torch.Tensor, axis: int, reduction: str
) -> torch.Tensor:
    a = norm_axis(axis, x.dim())
    index = on_device(_wrap_negative(index.long(), x.shape[a]), x)
    if reduction == "none":
        return torch.scatter(x, a, index, updates)
    return torch.scatter_reduce(x, a, index, updates, _REDUCE[reduction], include_self=True)


@register("ScatterElements")
def scatter_elements(ctx: OpContext) -> NodeFn:
    axis, reduction = int(ctx.attr("axis", 0)), _reduction(ctx)
    return lambda x, i, u: _scatter_elements(x, i, u, axis, reduction)


@register("Scatter")
def scatter(ctx: OpContext) -> NodeFn:  # deprecated alias of ScatterElements (opset 9-10)
    axis = int(ctx.attr("axis", 0))
    return lambda x, i, u: _scatter_elements(x, i, u, axis, "none")


@register("ScatterND")
def scatter_nd(ctx: OpContext) -> NodeFn:
    reduction = _reduction(ctx)

    def fn(x: torch.Tensor, index: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        index = on_device(index.long(), x)
        k = index.shape[-1]
        rows = int(torch.tensor(x.shape[:k]).prod()) if k else 1
        flat = x.reshape(rows, -1)
        dims = torch.tensor(x.shape[:k], device=x.device)
        idx = _wrap_negative(index.reshape(-1, k), dims)
        strides = torch.ones(k, dtype=torch.long, device=x.device)
        for i in range(k - 2, -1, -1):
            strides[i] = strides[i + 1] * x.shape[i + 1]
        linear = (idx * strides).sum(-1)
        values = updates.reshape(linear.shape[0], -1)
        if reduction == "none":
            out = flat.index_put((linear,), values)
        else:
            expanded = linear.reshape(-1, 1).expand_as(values)
            out = flat.scatter_reduce(0, expanded, values, _REDUCE[reduction], include_self=True)
        return out.reshape(x.shape)

    return fn


@register("TensorScatter", since=24)
def tensor_scatter(ctx: OpContext) -> NodeFn:
    """A KV cache update as a function: `update`'s positions along `axis` written into a copy
    of `past_cache` from each batch row's write index on (modulo the axis length when
    circular). Differentiable in both: the overwritten cache entries get no gradient."""
    mode = ctx.attr("mode", "linear")
    require(mode in ("linear", "circular"), f"mode '{mode}' is not linear or circular")
    axis_attr = int(ctx.attr("axis", -2))

    def fn(
        past: torch.Tensor, update: torch.Tensor, write_indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        axis = norm_axis(axis_attr, past.dim())
        if not 1 <= axis < past.dim():
            raise ValueError(f"TensorScatter axis {axis_attr} must not be the batch axis")
        batch, length, steps = past.shape[0], past.shape[axis], update.shape[axis]
        if write_indices is None:
            starts = torch.zeros(batch, dtype=torch.int64, device=past.device)
        else:
            starts = on_device(write_indices, past).to(torch.int64).reshape(batch)
        positions = starts[:, None] + torch.arange(steps, device=past.device)  # [B, steps]
        if mode == "circular":
            positions = positions % length
        shape = [batch] + [1] * (past.dim() - 1)
        shape[axis] = steps
        return past.scatter(axis, positions.reshape(shape).expand_as(update), update)

    return fn


@register("OneHot", since=9)
def one_hot(ctx: OpContext) -> NodeFn:
    axis = int(ctx.attr("axis", -1))

    def fn(index: torch.Tensor, depth: Any, values: torch.Tensor) -> torch.Tensor:
        d = int(scalar(depth))
        idx = index.long()
        idx = torch.where(idx < 0, idx + d, idx)
        valid = (idx >= 0) & (idx < d)
        hot = F.one_hot(torch.where(valid, idx, 0), d).bool() & valid.unsqueeze(-1)
        out = torch.where(hot, values[1], values[0])
        a = norm_axis(axis, index.dim() + 1)
        return out.movedim(-1, a)

    return fn


@register("Trilu", since=14)
def trilu(ctx: OpContext) -> NodeFn:
    upper = bool(ctx.attr("upper", 1))

    def fn(x: torch.Tensor, k: Any = None) -> torch.Tensor:
        diagonal = int(scalar(k)) if k is not None else 0
        return torch.triu(x, diagonal) if upper else torch.tril(x, diagonal)

    return fn


@register("NonZero", since=9)
def non_zero(ctx: OpContext) -> NodeFn:
    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0:
            return torch.zeros((0, int(bool(x))), dtype=torch.int64, device=x.device)
        return torch.nonzero(x).t()

    return fn


_PAD_MODES = ("constant", "reflect", "edge", "wrap")


def _pad(x: torch.Tensor, pads: list[int], mode: str, value: Any, axes: list[int] | None) -> Any:
    rank = x.dim()
    axes = norm_axes(axes, rank) if axes else list(range(rank))
    n = len(axes)
    begin = dict(zip(axes, pads[:n], strict=True))
    end = dict(zip(axes, pads[n:], strict=True))
    if mode == "constant":
        flat: list[int] = []
        for axis in reversed(range(rank)):
            flat += [begin.get(axis, 0), end.get(axis, 0)]
        while flat[-2:] == [0, 0] and len(flat) > 2:
            flat = flat[:-2]
        fill = scalar(value) if value is not None else 0
        return F.pad(x, flat, value=fill)
    # reflect / edge / wrap: one index_select per padded axis (any rank, differentiable).
    for axis in axes:
        b, e = begin[axis], end[axis]
        if b == 0 and e == 0:
            continue
        size = x.shape[axis]
        pos = torch.arange(-b, size + e, device=x.device)
        if mode == "edge":
            pos = pos.clamp(0, size - 1)
        elif mode == "wrap":
            pos = pos % size
        else:
            period = 2 * (size - 1) if size > 1 else 1
            pos = pos.abs() % period
            pos = torch.where(pos >= size, period - pos, pos)
        x = x.index_select(axis, pos)
    return x


@register("Pad", since=2)
def pad_2(ctx: OpContext) -> NodeFn:
    mode = str(ctx.attr("mode", "constant"))
    require(mode in _PAD_MODES, f"mode '{mode}'")
    pads, value = list(ctx.attr("pads", ctx.attr("paddings", []))), ctx.attr("value", 0.0)
    return lambda x: _pad(x, pads, mode, value, None)


@register("Pad", since=11)
def pad_11(ctx: OpContext) -> NodeFn:
    mode = str(ctx.attr("mode", "constant"))
    require(mode in _PAD_MODES, f"mode '{mode}'")

    def fn(x: torch.Tensor, pads: Any, value: Any = None, axes: Any = None) -> Any:
        return _pad(x, ints(pads), mode, value, ints(axes) or None)

    return fn


@register("Compress", since=9)
def compress(ctx: OpContext) -> NodeFn:
    axis = ctx.attr("axis")

    def fn(x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        data = x.reshape(-1) if axis is None else x
        a = 0 if axis is None else norm_axis(int(axis), x.dim())
        keep = torch.nonzero(condition.reshape(-1)[: data.shape[a]]).reshape(-1)
        return data.index_select(a, on_device(keep, data))

    return fn


@register("ReverseSequence", since=10)
def reverse_sequence(ctx: OpContext) -> NodeFn:
    batch_axis, time_axis = int(ctx.attr("batch_axis", 1)), int(ctx.attr("time_axis", 0))

    def fn(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        steps = x.shape[time_axis]
        t = torch.arange(steps, device=x.device).reshape(-1, 1)
        lens = on_device(lengths.long(), x).reshape(1, -1)
        index = torch.where(t < lens, lens - 1 - t, t)  # [time, batch]
        if batch_axis < time_axis:
            index = index.t()
        shape = [1] * x.dim()
        shape[time_axis], shape[batch_axis] = x.shape[time_axis], x.shape[batch_axis]
        return torch.gather(x, time_axis, index.reshape(shape).expand(x.shape))

    return fn


@register("CenterCropPad", since=18)
def center_crop_pad(ctx: OpContext) -> NodeFn:
    axes_attr = ctx.attr("axes")

    def fn(x: torch.Tensor, shape: Any) -> torch.Tensor:
        axes = norm_axes(axes_attr, x.dim()) if axes_attr else list(range(x.dim()))
        begin = [0] * x.dim()
        end = [0] * x.dim()
        for axis, size in zip(axes, ints(shape), strict=False):
            dim = x.shape[axis]
            # Centred: a crop drops (dim - size) // 2 first, a pad adds (size - dim) // 2 first.
            begin[axis] = -((dim - size) // 2) if size < dim else (size - dim) // 2
            end[axis] = size - dim - begin[axis]
        return _pad(x, begin + end, "constant", 0, None)

    return fn
