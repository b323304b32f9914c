"""Sequences: SequenceConstruct/Empty/At/Insert/Erase/Length, SplitToSequence,
ConcatFromSequence and SequenceMap; optional values: Optional, OptionalHasElement and
OptionalGetElement.

An ONNX `seq(tensor)` value is a Python list of torch tensors. Every op builds a new list
(never mutates its input: the same list may be read by several nodes, or by every iteration
of a Loop), and the tensors in it are the autograd graph's own, so gradients flow through
SequenceAt, ConcatFromSequence, ... exactly as through indexing and torch.cat.

Exporters emit these for list-valued tensor code: the dynamo exporter (`optimize=False`) turns
`torch.chunk`/`torch.split` into SplitToSequence + SequenceAt; the TorchScript exporter turns
list building and `torch.cat`/`torch.stack` over a list into SequenceConstruct/SequenceInsert
and ConcatFromSequence.

Positions follow the spec: in [-n, n-1] for SequenceAt/SequenceErase and [-n, n] for
SequenceInsert (n = the sequence's length; negative counts from the back); one out of range is
an error naming the op. Sequences of sequences (a SequenceMap body that takes or returns a
sequence) are refused when the node is built.

An ONNX `optional(T)` value (T a tensor or a sequence of tensors) is Python None when empty and
the T value itself (a tensor, a list of tensors) when present, so a present optional is used
exactly as its element and gradients flow through Optional and OptionalGetElement unchanged.
An omitted input ("") reads as None too, which is what OptionalHasElement-18 says of it.
"""

from __future__ import annotations

from typing import Any

import torch
from onnx import TensorProto

from service.engine.graph import NodeFn
from service.engine.onnx.ops._util import (
    ONNX_TO_TORCH,
    ints,
    norm_axis,
    require,
    scalar,
    torch_dtype,
)
from service.engine.onnx.registry import OpContext, register

SEQUENCE_OPSET = 11  # every sequence op but SequenceMap (17) starts here
OPTIONAL_OPSET = 15  # Optional*, widened in 18 (plain tensors and sequences accepted)


def _position(op_type: str, position: Any, length: int, *, inclusive_end: bool) -> int:
    """A spec position (negative counts from the back) as an index into a list."""
    index = int(scalar(position))
    upper = length if inclusive_end else length - 1
    if not -length <= index <= upper:
        raise IndexError(
            f"{op_type} position {index} is outside [{-length}, {upper}] for a sequence of "
            f"{length} tensor(s)"
        )
    return index + length if index < 0 else index


@register("SequenceConstruct", since=SEQUENCE_OPSET)
def sequence_construct(ctx: OpContext) -> NodeFn:
    return lambda *tensors: list(tensors)


@register("SequenceEmpty", since=SEQUENCE_OPSET)
def sequence_empty(ctx: OpContext) -> NodeFn:
    dtype = ctx.attr("dtype")
    if dtype is not None:
        torch_dtype(int(dtype))  # refuses element types torch cannot compute with
    return lambda: []


@register("SequenceAt", since=SEQUENCE_OPSET)
def sequence_at(ctx: OpContext) -> NodeFn:
    def fn(sequence: list[torch.Tensor], position: Any) -> torch.Tensor:
        return sequence[_position("SequenceAt", position, len(sequence), inclusive_end=False)]

    return fn


@register("SequenceInsert", since=SEQUENCE_OPSET)
def sequence_insert(ctx: OpContext) -> NodeFn:
    def fn(sequence: list[torch.Tensor], tensor: torch.Tensor, position: Any = None) -> list[Any]:
        if position is None:
            return [*sequence, tensor]
        index = _position("SequenceInsert", position, len(sequence), inclusive_end=True)
        return [*sequence[:index], tensor, *sequence[index:]]

    return fn


@register("SequenceErase", since=SEQUENCE_OPSET)
def sequence_erase(ctx: OpContext) -> NodeFn:
    def fn(sequence: list[torch.Tensor], position: Any = None) -> list[Any]:
        if position is None:
            position = -1
        index = _position("SequenceErase", position, len(sequence), inclusive_end=False)
        return [*sequence[:index], *sequence[index + 1 :]]

    return fn


@register("SequenceLength", since=SEQUENCE_OPSET)
def sequence_length(ctx: OpContext) -> NodeFn:
    # a CPU int64 scalar, like every shape value (Shape, Size): read as a Python int downstream
    return lambda sequence: torch.tensor(len(sequence), dtype=torch.int64)


@register("SplitToSequence", since=SEQUENCE_OPSET)
def split_to_sequence(ctx: OpContext) -> NodeFn:
    axis = int(ctx.attr("axis", 0))
    # `keepdims` only applies without `split` (chunks of 1): 0 drops the split axis
    keepdims = bool(ctx.attr("keepdims", 1))

    def fn(x: torch.Tensor, split: Any = None) -> list[torch.Tensor]:
        a = norm_axis(axis, x.dim())
        if split is None:
            if keepdims:
                return list(torch.split(x, 1, dim=a))
            return list(torch.unbind(x, dim=a))
        if isinstance(split, torch.Tensor) and split.dim() == 0:
            size = int(split)
            if size <= 0:
                raise ValueError(f"SplitToSequence split must be positive, got {size}")
            return list(torch.split(x, size, dim=a))
        sizes = ints(split)
        if sum(sizes) != x.shape[a] or any(s < 0 for s in sizes):
            raise ValueError(
                f"SplitToSequence split {sizes} does not add up to the size {x.shape[a]} of "
                f"axis {axis}"
            )
        return list(torch.split(x, sizes, dim=a))

    return fn


@register("ConcatFromSequence", since=SEQUENCE_OPSET)
def concat_from_sequence(ctx: OpContext) -> NodeFn:
    axis = ctx.attr("axis")
    require(axis is not None, "ConcatFromSequence needs its 'axis' attribute")
    new_axis = bool(ctx.attr("new_axis", 0))

    def fn(sequence: list[torch.Tensor]) -> torch.Tensor:
        if not sequence:
            raise ValueError("ConcatFromSequence got an empty sequence")
        tensors = sequence
        if any(t.device != tensors[0].device for t in tensors):
            tensors = [t.to(tensors[0].device) for t in tensors]  # shape values on the CPU
        if new_axis:  # np.stack: the new axis may also be the last, rank + 1 ones
            return torch.stack(tensors, dim=norm_axis(int(axis), tensors[0].dim() + 1))
        return torch.cat(tensors, dim=norm_axis(int(axis), tensors[0].dim()))

    return fn


def _is_sequence_type(info: Any) -> bool:
    return info.type.WhichOneof("value") == "sequence_type"


@register("SequenceMap", since=17)
def sequence_map(ctx: OpContext) -> NodeFn:
    graph = ctx.attr("body")
    require(graph is not None, "missing subgraph attribute 'body'")
    # Body inputs and outputs are the sequences' elements: a sequence there means the node
    # maps over, or builds, a sequence of sequences.
    nested = [v.name for v in [*graph.input, *graph.output] if _is_sequence_type(v)]
    require(
        not nested,
        f"SequenceMap body values {nested} are sequences: sequences of sequences are not supported",
    )
    require(
        len(graph.input) == ctx.num_inputs and len(graph.output) == ctx.num_outputs,
        f"SequenceMap body has {len(graph.input)} input(s) and {len(graph.output)} output(s), "
        f"the node {ctx.num_inputs} and {ctx.num_outputs}",
    )
    assert ctx.convert_subgraph is not None
    body = ctx.convert_subgraph(graph)
    count = ctx.num_outputs

    def fn(*inputs: Any, outer: dict[str, Any]) -> Any:
        length = len(inputs[0])
        for index, value in enumerate(inputs):
            if isinstance(value, list) and len(value) != length:
                raise ValueError(
                    f"SequenceMap input {index} has {len(value)} tensor(s), the first "
                    f"input {length}"
                )
        collected: list[list[Any]] = [[] for _ in range(count)]
        for i in range(length):
            samples = [value[i] if isinstance(value, list) else value for value in inputs]
            for store, value in zip(collected, body(samples, outer), strict=True):
                store.append(value)
        return collected[0] if count == 1 else tuple(collected)

    return fn


def _optional_element_problem(type_proto: Any) -> str:
    """What an optional of this element type (onnx.TypeProto) would hold that cannot be held;
    "" if it can: a tensor of a torch dtype, or a sequence of such tensors."""
    kind = type_proto.WhichOneof("value")
    if kind == "sequence_type":
        type_proto = type_proto.sequence_type.elem_type
        kind = type_proto.WhichOneof("value")
        if kind != "tensor_type":
            return "sequences of non-tensors"
    if kind != "tensor_type":
        return f"{kind.removesuffix('_type')} values" if kind else "untyped values"
    elem_type = type_proto.tensor_type.elem_type
    if elem_type not in ONNX_TO_TORCH:
        return f"{TensorProto.DataType.Name(elem_type).lower()} tensors"
    return ""


@register("Optional", since=OPTIONAL_OPSET)
def optional(ctx: OpContext) -> NodeFn:
    """The input as a present optional, or (no input) an empty one of the `type` attribute."""
    type_proto = ctx.attr("type")
    if type_proto is not None:
        problem = _optional_element_problem(type_proto)
        require(not problem, f"Optional of {problem} is not supported")
    has_input = ctx.num_inputs > 0 and bool(ctx.node.input[0])
    require(has_input or type_proto is not None, "Optional without an input needs its 'type'")
    return lambda value=None: value


@register("OptionalHasElement", since=OPTIONAL_OPSET)
def optional_has_element(ctx: OpContext) -> NodeFn:
    # a CPU bool scalar, like the loop conditions the converter makes (ops/control.py)
    return lambda value=None: torch.tensor(value is not None)


@register("OptionalGetElement", since=OPTIONAL_OPSET)
def optional_get_element(ctx: OpContext) -> NodeFn:
    def fn(value: Any) -> Any:
        if value is None:
            raise ValueError("OptionalGetElement read an empty optional value")
        return value

    return fn
