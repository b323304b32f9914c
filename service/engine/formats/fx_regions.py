"""Wrapper regions of a torch.export graph → their bodies as ordinary FX nodes.

torch.export turns a `with torch.autocast(...):` or `with torch.no_grad():` block of `forward`
into ONE node, `higher_order.wrap_with_autocast(device, dtype, enabled, cache, body, *args)` or
`higher_order.wrap_with_set_grad_enabled(enabled, body, *args)`, whose body is a submodule; its
outputs are read with `getitem`. Run as it is, the whole region is one opaque node: no probes,
no layers, no findings inside it.

`inline_wrapper_regions` copies each body's nodes into the parent graph in place of the region
node (nested regions too) and records on every copied node the contexts of the regions around
it (`node.meta[REGION_CONTEXTS]`, outermost first). The body's ops are the ones the model called
(`aten.linear` on fp32 inputs), not the casts autocast makes of them at dispatch, so each copied
node must run under its regions' contexts (`run_in_regions`) to compute what the region did:
the same ops, in the same autocast dtypes and grad mode, one node at a time.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

REGION_CONTEXTS = "gradhealth_region_contexts"

_higher_order = torch.ops.higher_order


# set while an fp32 reference pass runs the graph (measure.py): its autocast regions compute in
# the precision of their inputs, as the model would without its autocast
_AUTOCAST_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "gradhealth_autocast_regions_off", default=False
)


@contextlib.contextmanager
def autocast_regions_off() -> Iterator[None]:
    token = _AUTOCAST_OFF.set(True)
    try:
        yield
    finally:
        _AUTOCAST_OFF.reset(token)


@dataclass(frozen=True)
class Autocast:
    """`torch.autocast(device_type, dtype, enabled, cache_enabled)` around a region."""

    device_type: str
    dtype: torch.dtype | None
    enabled: bool
    cache_enabled: bool | None

    def enter(self, device_type: str | None) -> contextlib.AbstractContextManager[Any]:
        """The context on `device_type`, the device the node's inputs are on: an exported
        graph runs wherever it was moved (fx.py), and a region traced under CUDA autocast
        keeps its precision when diagnosed on the CPU (and the reverse). None inside
        `autocast_regions_off()`."""
        if _AUTOCAST_OFF.get():
            return contextlib.nullcontext()
        device = device_type or self.device_type
        return torch.autocast(device, self.dtype, self.enabled, self.cache_enabled)


@dataclass(frozen=True)
class GradMode:
    """`torch.set_grad_enabled(enabled)` around a region (`torch.no_grad()` is False)."""

    enabled: bool

    def enter(self, device_type: str | None) -> contextlib.AbstractContextManager[Any]:
        return torch.set_grad_enabled(self.enabled)


RegionContext = Autocast | GradMode


def _autocast_region(args: Sequence[Any]) -> tuple[RegionContext, Any, Sequence[Any]]:
    device_type, dtype, enabled, cache_enabled, body, *inputs = args
    return Autocast(device_type, dtype, enabled, cache_enabled), body, inputs


def _grad_mode_region(args: Sequence[Any]) -> tuple[RegionContext, Any, Sequence[Any]]:
    enabled, body, *inputs = args
    return GradMode(bool(enabled)), body, inputs


# Region op → its (context, body, body inputs) from the node's args.
_REGIONS: dict[Any, Callable[[Sequence[Any]], tuple[RegionContext, Any, Sequence[Any]]]] = {
    _higher_order.wrap_with_autocast: _autocast_region,
    _higher_order.wrap_with_set_grad_enabled: _grad_mode_region,
}


def run_in_regions(fn: Callable[..., Any], contexts: Sequence[RegionContext]) -> Callable[..., Any]:
    """`fn` run under `contexts` (outermost first), entered afresh at each call so that
    nothing outside the node (a probe's statistics, the next node) runs under them."""

    def call(*values: Any) -> Any:
        device_type = _first_device_type(values)
        with contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context.enter(device_type))
            return fn(*values)

    return call


def _first_device_type(values: Sequence[Any]) -> str | None:
    return next((v.device.type for v in values if isinstance(v, torch.Tensor)), None)


def inline_wrapper_regions(gm: fx.GraphModule) -> list[str]:
    """Inline every region node of `gm` in place; notes for the regions left opaque (a body
    that is no FX graph, an output read otherwise than by `getitem`) and for any other
    higher-order op, whose body runs as one node."""
    for node in list(gm.graph.nodes):
        if _inlinable(gm, node):
            _inline(gm, node)
    gm.recompile()
    return [_opaque_note(node) for node in gm.graph.nodes if _is_higher_order(node)]


def _inlinable(owner: fx.GraphModule, node: fx.Node) -> bool:
    """A region node whose outputs are only read by `getitem`, and whose body (and every
    nested region's) is an FX graph returning nodes."""
    if not _is_region(node) or any(_output_index(user) is None for user in node.users):
        return False
    body = _body(owner, node)
    if not isinstance(body, fx.GraphModule):
        return False
    output = next(n for n in body.graph.nodes if n.op == "output")
    if not all(isinstance(value, fx.Node) for value in _flat_outputs(output)):
        return False
    return all(_inlinable(body, n) for n in body.graph.nodes if _is_region(n))


def _output_index(user: fx.Node) -> int | None:
    """Which output of a region `user` reads (`getitem(region, i)`), None if it is no such read."""
    if user.target is not operator.getitem or not isinstance(user.args[1], int):
        return None
    return user.args[1]


def _inline(gm: fx.GraphModule, node: fx.Node) -> None:
    context, body, inputs = _REGIONS[node.target](node.args)
    contexts = (*node.meta.get(REGION_CONTEXTS, ()), context)
    with gm.graph.inserting_before(node):
        outputs = _copy_body(gm, _attribute(gm, body), inputs, contexts)
    for user in list(node.users):
        index = _output_index(user)
        assert index is not None  # `_inlinable` checked it
        user.replace_all_uses_with(outputs[index])
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    if not body.users:  # the body's get_attr: unread now, it would become a graph constant
        gm.graph.erase_node(body)


def _copy_body(
    gm: fx.GraphModule,
    body: fx.GraphModule,
    inputs: Sequence[Any],
    contexts: tuple[RegionContext, ...],
) -> list[Any]:
    """Copy `body`'s nodes into `gm` at its insertion point, its placeholders bound to
    `inputs`; the copies of its outputs, in order. A nested region is copied in its place,
    under its own context too, and a `getitem` of it resolves to the copied output."""
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    env: dict[fx.Node, Any] = dict(zip(placeholders, inputs, strict=True))
    for inner in body.graph.nodes:
        if inner.op == "placeholder":
            continue
        if inner.op == "output":
            return [env[value] for value in _flat_outputs(inner)]
        if _is_region(inner):
            context, nested, nested_inputs = _REGIONS[inner.target](inner.args)
            mapped = fx.node.map_arg(tuple(nested_inputs), env.__getitem__)
            env[inner] = _copy_body(gm, _attribute(body, nested), mapped, (*contexts, context))
        elif (index := _output_index(inner)) is not None and _is_region(inner.args[0]):
            env[inner] = env[inner.args[0]][index]  # a nested region's output, copied
        elif inner.op == "get_attr" and all(_is_region(u) for u in inner.users):
            continue  # a nested region's body: copied in the region's place, read from `body`
        elif inner.op == "get_attr":
            env[inner] = _copy_attribute(gm, body, inner)
        else:
            env[inner] = gm.graph.node_copy(inner, env.__getitem__)
            env[inner].meta[REGION_CONTEXTS] = contexts
    raise ValueError("a region body without an output node")


def _copy_attribute(gm: fx.GraphModule, body: fx.GraphModule, node: fx.Node) -> fx.Node:
    """A get_attr in `gm` of what `node` reads in `body` (a constant tensor; a nested
    region's body is copied by `_copy_body` instead and is read from `body`), under a name
    `gm` has free."""
    base = str(node.target).replace(".", "_")
    candidates = itertools.chain([base], (f"{base}_{i}" for i in itertools.count(1)))
    name = next(n for n in candidates if not hasattr(gm, n))
    setattr(gm, name, _attribute(body, node))
    copy = gm.graph.get_attr(name)
    copy.meta = dict(node.meta)
    return copy


def _body(gm: fx.GraphModule, node: fx.Node) -> Any:
    return _attribute(gm, _REGIONS[node.target](node.args)[1])


def _attribute(gm: fx.GraphModule, node: Any) -> Any:
    """What a get_attr node reads from `gm` (None for anything else)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value: Any = gm
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value


def _flat_outputs(output: fx.Node) -> list[Any]:
    values = output.args[0]
    return list(values) if isinstance(values, (tuple, list)) else [values]


def _is_region(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in _REGIONS


def _is_higher_order(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)


def _opaque_note(node: fx.Node) -> str:
    assert isinstance(node.target, torch._ops.HigherOrderOperator)
    return (
        f"node {node.name!r} ({node.target.name()}, a higher-order op) runs its body as one "
        "node: the activations inside it are not probed, so layers and findings there are "
        "missing from the report (parameter gradients through it are measured)"
    )
