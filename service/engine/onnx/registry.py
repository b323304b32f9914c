"""The op registry: how each ONNX op (per domain and opset version) becomes a torch callable.

An op implementation is a *builder*: it is called once per node at conversion time with an
`OpContext` (decoded attributes, the opset in force, the mode, ...) and returns the `NodeFn`
that computes the node's outputs from its input values at run time. Everything that can be
checked without data (unsupported attributes, bad attribute values) is checked in the builder
and raised as `UnsupportedAttribute`, so a model is refused before any compute.

    @register("Relu")                       # since opset 1 of the default domain
    def relu(ctx: OpContext) -> NodeFn:
        return torch.relu

    @register("ReduceMean", since=18)       # `axes` became an input in opset 18
    def reduce_mean_18(ctx): ...

A lookup for opset N picks the implementation with the largest `since` <= N.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.engine.graph import NodeFn

DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass
class OpContext:
    """What a builder knows about the node it converts."""

    node: Any  # onnx.NodeProto
    op_type: str
    domain: str
    opset: int  # the opset version of the node's domain in this model
    attrs: dict[str, Any]  # decoded attribute values (ints, floats, strings, tensors, graphs)
    num_inputs: int
    num_outputs: int
    mode: str = "train"  # "train" | "eval" (CONTRACT.md §2)
    # Converts a subgraph attribute (If/Loop/Scan bodies) into a callable; set by the converter.
    convert_subgraph: Callable[..., Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Per declared output: does anything (a node, a subgraph, the graph's outputs) read it?
    # Empty = unknown (treat every output as used). Lets builders skip optional outputs that
    # exporters name but nothing consumes (BatchNormalization's running statistics, masks).
    outputs_used: list[bool] = field(default_factory=list)
    # Per declared input: its ONNX element type where the converter knows it (an initializer,
    # a Constant, a Cast, a declared graph value), else 0. What a run-time torch dtype cannot
    # tell: an int8 tensor may hold INT4 values (ops/_util.py).
    input_types: list[int] = field(default_factory=list)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def input_type(self, index: int) -> int:
        """The ONNX element type of input `index` if known, else 0 (TensorProto.UNDEFINED)."""
        return self.input_types[index] if index < len(self.input_types) else 0

    def output_used(self, index: int) -> bool:
        """Whether output `index` is declared and (as far as the converter knows) read."""
        names = list(self.node.output) if self.node is not None else []
        if index >= len(names) or not names[index]:
            return False
        return self.outputs_used[index] if index < len(self.outputs_used) else True


Builder = Callable[[OpContext], NodeFn]


class UnsupportedAttribute(Exception):
    """Raised by a builder for an attribute value it cannot honour; collected per node."""


@dataclass
class _Entry:
    since: int
    builder: Builder


_REGISTRY: dict[tuple[str, str], list[_Entry]] = {}


def _canonical_domain(domain: str) -> str:
    return "" if domain in DEFAULT_DOMAINS else domain


def register(op_type: str, *, domain: str = "", since: int = 1) -> Callable[[Builder], Builder]:
    """Decorator: `builder` implements `op_type` in `domain` from opset `since` on."""

    def decorate(builder: Builder) -> Builder:
        entries = _REGISTRY.setdefault((_canonical_domain(domain), op_type), [])
        if any(e.since == since for e in entries):
            raise ValueError(f"{domain or 'ai.onnx'}::{op_type} since {since} registered twice")
        entries.append(_Entry(since, builder))
        entries.sort(key=lambda e: e.since)
        return builder

    return decorate


def lookup(op_type: str, domain: str, opset: int) -> Builder | None:
    entries = _REGISTRY.get((_canonical_domain(domain), op_type))
    if not entries:
        return None
    index = bisect.bisect_right([e.since for e in entries], opset) - 1
    return entries[index].builder if index >= 0 else None


def supported_ops() -> dict[tuple[str, str], list[int]]:
    """(domain, op_type) → the opset versions at which an implementation starts."""
    return {key: [e.since for e in entries] for key, entries in sorted(_REGISTRY.items())}
