"""Where the gradient is cut: a rounding (round, floor, ceil, sign, trunc) on the path to the
loss, whose derivative is zero everywhere, leaves every layer before it exactly no gradient.

Training code rounds with a straight-through estimator (`x + (torch.round(x) - x).detach()`, or
a torch.autograd.Function whose backward passes the gradient on). An export keeps a Function's
forward only, and a graph that rounds without one cannot train what comes before; either way
the layers before it measure ‖∂L/∂a‖ = 0, which is no underflow and no initialisation problem.
`gradient_cuts` names, for each layer with exactly zero gradient, the first such op its output
reaches; `straight_through` makes that op pass the gradient on, on a copy of the model, to
verify the fix.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from service.engine.graph import Node, NodeFn, ObservableGraph
from service.engine.layers import Layer, canonical
from service.engine.report import LayerReport

ZERO_DERIVATIVE_OPS = frozenset({"round", "floor", "ceil", "sign", "trunc"})


def gradient_cuts(
    graph: ObservableGraph, layers: list[Layer], reports: list[LayerReport]
) -> dict[str, dict[str, str]]:
    """Layer name → {"node", "op"} of the first zero-derivative op downstream of the output
    of each layer whose measured ‖∂L/∂a‖ is exactly 0."""
    zero = {r.name for r in reports if r.activation_grad_norm == 0.0}
    if not zero or not any(canonical(n.op_type) in ZERO_DERIVATIVE_OPS for n in graph.nodes):
        return {}
    readers: dict[str, list[Node]] = {}
    for node in graph.nodes:
        for name in dict.fromkeys(node.inputs):
            readers.setdefault(name, []).append(node)
    cuts: dict[str, dict[str, str]] = {}
    for layer in layers:
        if layer.name in zero:
            cut = _first_downstream_cut(layer.output, readers)
            if cut is not None:
                cuts[layer.name] = {"node": cut.name, "op": cut.op_type}
    return cuts


def _first_downstream_cut(value: str, readers: dict[str, list[Node]]) -> Node | None:
    """Breadth first from `value` along the nodes that read it: the nearest rounding."""
    seen, queue = {value}, deque([value])
    while queue:
        for node in readers.get(queue.popleft(), []):
            if canonical(node.op_type) in ZERO_DERIVATIVE_OPS:
                return node
            for out in node.outputs:
                if out and out not in seen:
                    seen.add(out)
                    queue.append(out)
    return None


def _straight_through_fn(rounding: NodeFn) -> NodeFn:
    def passed_on(x: torch.Tensor, *rest: Any) -> torch.Tensor:
        return x + (rounding(x, *rest) - x).detach()

    return passed_on


def straight_through(graph: ObservableGraph, node_names: list[str]) -> list[str]:
    """Make each named rounding a straight-through estimator (its value, the gradient of its
    input), in place: on a copy of the model, for fix verification. Returns the nodes done."""
    done = []
    for node in graph.nodes:
        if node.name in node_names and canonical(node.op_type) in ZERO_DERIVATIVE_OPS:
            node.fn = _straight_through_fn(node.fn)
            done.append(node.name)
    return done
