"""Reductions (axes as attribute, then as input: ReduceSum-13, the others -18), ArgMax/ArgMin,
CumSum, TopK."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from service.engine.graph import NodeFn
from service.engine.onnx.ops._util import ints, norm_axes, norm_axis, scalar
from service.engine.onnx.registry import OpContext, register

Reducer = Callable[[torch.Tensor, list[int], bool], torch.Tensor]


def _empty_extreme(x: torch.Tensor, dims: list[int], keep: bool, high: bool) -> torch.Tensor:
    """Max/min over an empty set: the identity element (-inf/+inf, or the dtype's bounds)."""
    shape = x.sum(dim=dims, keepdim=keep).shape
    if x.dtype == torch.bool:
        fill: Any = not high
    elif x.dtype.is_floating_point:
        fill = float("-inf") if high else float("inf")
    else:
        info = torch.iinfo(x.dtype)
        fill = info.min if high else info.max
    return torch.full(shape, fill, dtype=x.dtype, device=x.device)


def _amax(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    if x.numel() == 0:
        return _empty_extreme(x, dims, keep, True)
    return x.amax(dim=dims, keepdim=keep) if dims else x


def _amin(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    if x.numel() == 0:
        return _empty_extreme(x, dims, keep, False)
    return x.amin(dim=dims, keepdim=keep) if dims else x


def _mean(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    """The mean over an empty set is 0, as in onnxruntime and torch's EmbeddingBag (an empty
    bag of a legacy-exported mean EmbeddingBag reaches here): torch's mean gives NaN."""
    if x.numel() == 0:
        return x.sum(dim=dims, keepdim=keep)
    return x.mean(dim=dims, keepdim=keep)


def _prod(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        x = x.prod(dim=d, keepdim=keep)
    return x


REDUCERS: dict[str, Reducer] = {
    "ReduceSum": lambda x, d, k: x.sum(dim=d, keepdim=k),
    "ReduceMean": _mean,
    "ReduceMax": _amax,
    "ReduceMin": _amin,
    "ReduceProd": _prod,
    "ReduceL1": lambda x, d, k: x.abs().sum(dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: x.pow(2).sum(dim=d, keepdim=k).sqrt(),
    "ReduceLogSum": lambda x, d, k: x.sum(dim=d, keepdim=k).log(),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: x.pow(2).sum(dim=d, keepdim=k),
}
# The opset in which `axes` moved from an attribute to an input.
AXES_INPUT_SINCE = {name: (13 if name == "ReduceSum" else 18) for name in REDUCERS}


def _reduce(reducer: Reducer, x: torch.Tensor, axes: list[int], keep: bool, noop: bool) -> Any:
    if not axes:
        if noop:
            return x
        axes = list(range(x.dim()))
    if x.dim() == 0:
        return reducer(x.reshape(1), [0], False)
    return reducer(x, norm_axes(axes, x.dim()), keep)


def _register_reduce(op_type: str) -> None:
    reducer = REDUCERS[op_type]

    @register(op_type)
    def build_attr(ctx: OpContext) -> NodeFn:
        axes = list(ctx.attr("axes", []))
        keep = bool(ctx.attr("keepdims", 1))
        return lambda x: _reduce(reducer, x, axes, keep, False)

    @register(op_type, since=AXES_INPUT_SINCE[op_type])
    def build_input(ctx: OpContext) -> NodeFn:
        keep = bool(ctx.attr("keepdims", 1))
        noop = bool(ctx.attr("noop_with_empty_axes", 0))
        return lambda x, axes=None: _reduce(reducer, x, ints(axes), keep, noop)


for _name in REDUCERS:
    _register_reduce(_name)


def _arg(op_type: str, pick: Callable[..., torch.Tensor]) -> None:
    @register(op_type)
    def build(ctx: OpContext) -> NodeFn:
        axis = int(ctx.attr("axis", 0))
        keep = bool(ctx.attr("keepdims", 1))
        last = bool(ctx.attr("select_last_index", 0))

        def fn(x: torch.Tensor) -> torch.Tensor:
            a = norm_axis(axis, x.dim())
            if last:
                flipped = pick(x.flip(a), dim=a, keepdim=keep)
                return x.shape[a] - 1 - flipped
            return pick(x, dim=a, keepdim=keep)

        return fn


_arg("ArgMax", torch.argmax)
_arg("ArgMin", torch.argmin)


@register("CumSum")
def cumsum(ctx: OpContext) -> NodeFn:
    exclusive = bool(ctx.attr("exclusive", 0))
    reverse = bool(ctx.attr("reverse", 0))

    def fn(x: torch.Tensor, axis: Any) -> torch.Tensor:
        a = norm_axis(int(scalar(axis)), x.dim())
        y = x.flip(a) if reverse else x
        out = torch.cumsum(y, dim=a, dtype=x.dtype)
        if exclusive:
            out = out - y
        return out.flip(a) if reverse else out

    return fn


def _topk(x: torch.Tensor, k: int, axis: int, largest: bool, sort: bool) -> Any:
    a = norm_axis(axis, x.dim())
    # A stable sort puts the lower index first among equal values, as ONNX requires
    # (torch.topk's order among ties is unspecified).
    values, indices = torch.sort(x, dim=a, descending=largest, stable=True)
    return values.narrow(a, 0, k), indices.narrow(a, 0, k)


@register("TopK")
def topk_1(ctx: OpContext) -> NodeFn:
    k, axis = int(ctx.attr("k")), int(ctx.attr("axis", -1))
    return lambda x: _topk(x, k, axis, True, True)


@register("TopK", since=10)
def topk_10(ctx: OpContext) -> NodeFn:
    axis = int(ctx.attr("axis", -1))
    largest = bool(ctx.attr("largest", 1)) if ctx.opset >= 11 else True
    sort = bool(ctx.attr("sorted", 1)) if ctx.opset >= 11 else True
    return lambda x, k: _topk(x, int(scalar(k)), axis, largest, sort)


@register("CumProd")
def cumprod(ctx: OpContext) -> NodeFn:
    exclusive = bool(ctx.attr("exclusive", 0))
    reverse = bool(ctx.attr("reverse", 0))

    def fn(x: torch.Tensor, axis: Any) -> torch.Tensor:
        a = norm_axis(int(scalar(axis)), x.dim())
        y = x.flip(a) if reverse else x
        if exclusive:  # shift right by one, starting from the multiplicative identity
            ones = torch.ones_like(y.narrow(a, 0, 1))
            y = torch.cat([ones, y.narrow(a, 0, y.shape[a] - 1)], dim=a)
        out = torch.cumprod(y, dim=a, dtype=x.dtype)
        return out.flip(a) if reverse else out

    return fn
