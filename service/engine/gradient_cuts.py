"""Where the gradient is cut: a rounding (round, floor, ceil, sign, trunc) on the path to the
loss, whose derivative is zero everywhere, leaves every layer before it exactly no gradient.
So does a softmax over an axis of one element, whose output is 1 whatever its input: attention
over a single token (a vision transformer whose patches leave one token per sequence, as a tiny
MobileViT's last stages do) gives its query and key projections exactly no gradient, written
out (MatMul, Softmax) or fused (torch's scaled_dot_product_attention, ONNX's Attention) alike.

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
from service.engine.layers import Layer, _attr, canonical
from service.engine.report import LayerReport

ZERO_DERIVATIVE_OPS = frozenset({"round", "floor", "ceil", "sign", "trunc"})
_SOFTMAX_OPS = frozenset({"softmax", "logsoftmax", "safesoftmax"})  # canonical spellings
SINGLE_ELEMENT_SOFTMAX = "single_element_softmax"  # a cut's "kind" (a rounding's is absent)


def gradient_cuts(
    graph: ObservableGraph,
    layers: list[Layer],
    reports: list[LayerReport],
    inputs: list[torch.Tensor] | None = None,
) -> dict[str, dict[str, str]]:
    """Layer name → {"node", "op"} of the first zero-derivative op downstream of the output
    of each layer whose measured ‖∂L/∂a‖ is exactly 0 (with "kind" for a softmax over one
    element, found by one forward pass on `inputs` when there are such layers and softmaxes)."""
    zero = {r.name for r in reports if r.activation_grad_norm == 0.0}
    if not zero:
        return {}
    softmaxes = [n for n in graph.nodes if canonical(n.op_type) in _SOFTMAX_OPS]
    attentions = [n for n in graph.nodes if _fused_attention(n)]
    constant = (
        _single_element_softmaxes(graph, softmaxes, attentions, inputs)
        if softmaxes or attentions
        else set()
    )
    rounding = any(canonical(n.op_type) in ZERO_DERIVATIVE_OPS for n in graph.nodes)
    if not rounding and not constant:
        return {}
    readers: dict[str, list[Node]] = {}
    for node in graph.nodes:
        for name in dict.fromkeys(node.inputs):
            readers.setdefault(name, []).append(node)
    cuts: dict[str, dict[str, str]] = {}
    for layer in layers:
        if layer.name in zero:
            cut = _first_downstream_cut(layer.output, readers, constant)
            if cut is not None:
                cuts[layer.name] = {"node": cut.name, "op": cut.op_type}
                if cut.name in constant:
                    cuts[layer.name]["kind"] = SINGLE_ELEMENT_SOFTMAX
    return cuts


def _fused_attention(node: Node) -> bool:
    """torch's scaled_dot_product_attention, or ONNX's Attention (opset 23), reading Q, K, V."""
    fused = canonical(node.op_type) == "scaleddotproductattention" or (
        node.op_type == "Attention" and node.domain in ("", "ai.onnx")
    )
    return fused and len(node.inputs) >= 3


def _single_element_softmaxes(
    graph: ObservableGraph,
    softmaxes: list[Node],
    attentions: list[Node],
    inputs: list[torch.Tensor] | None,
) -> set[str]:
    """The softmax nodes whose axis has one element on `inputs`, and the fused attentions
    with one key (K's axis -2) (one forward pass)."""
    if inputs is None:
        return set()
    wanted = {n.name: _softmax_axis(n) for n in softmaxes}
    keys: dict[str, list[str]] = {}  # K's value → the attentions reading it
    for node in attentions:
        keys.setdefault(node.inputs[1], []).append(node.name)
    found: set[str] = set()

    def one_key(name: str, value: Any) -> None:
        tensor = isinstance(value, torch.Tensor) and value.dim() >= 2
        if name in keys and tensor and value.shape[-2] == 1:
            found.update(keys[name])

    for name, value in zip(graph.input_names, inputs, strict=False):
        one_key(name, value)

    def observe(node: Node, outputs: Any) -> None:
        for name, value in zip(node.outputs, outputs or (), strict=False):
            one_key(name, value)
        if node.name in wanted and outputs and isinstance(outputs[0], torch.Tensor):
            shape = outputs[0].shape
            axis = wanted[node.name]
            if shape and -len(shape) <= axis < len(shape) and shape[axis] == 1:
                found.add(node.name)

    with torch.no_grad():
        graph.run(inputs, observe)
    return found


def _softmax_axis(node: Node) -> int:
    """ONNX's `axis` attribute (default -1), or aten's `dim` argument."""
    args = getattr(node.source, "args", None)
    if isinstance(args, tuple) and len(args) > 1 and isinstance(args[1], int):
        return args[1]
    axis = _attr(node, "axis")
    return int(axis) if isinstance(axis, int) else -1


def _first_downstream_cut(
    value: str, readers: dict[str, list[Node]], constant: set[str]
) -> Node | None:
    """Breadth first from `value` along the nodes that read it: the nearest rounding or
    single-element softmax."""
    seen, queue = {value}, deque([value])
    while queue:
        for node in readers.get(queue.popleft(), []):
            if canonical(node.op_type) in ZERO_DERIVATIVE_OPS or node.name in constant:
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
