"""Where NaN/Inf first appeared, from the probes' per-pass records, in one pass.

Forward: the first node (execution order) whose output sum is non-finite; a non-finite batch
array is its own origin ("input"). Backward (forward all finite): the first hooked value, in
the order autograd produced gradients, whose gradient norm is non-finite, and the node whose
backward produced it. Else a parameter with a non-finite gradient names its consumer. No
`detect_anomaly`: that re-runs every op with checks and costs 2.3-2.6x (issue 3).
"""

from __future__ import annotations

import math
from typing import Any

from service.engine.layers import Layer
from service.engine.measurements import NonFiniteOrigin, Subject
from service.engine.probes import Probe, is_backward_safe
from service.engine.report import ParameterReport


def find_origin(
    subject: Subject,
    layers: list[Layer],
    host: dict[str, list[float]],
    probe: Probe | None,
    parameters: list[ParameterReport],
    loss_value: float,
) -> NonFiniteOrigin | None:
    graph = subject.graph
    layer_of_node = {n: layer.name for layer in layers for n in layer.nodes}
    for i, spec in enumerate(subject.model_info.inputs):
        if not math.isfinite(host.get(f"input.{i}", [0.0])[0]):
            return NonFiniteOrigin(spec.name, "input", "forward", spec.name)
    if graph is not None and probe is not None:
        nodes = graph.nodes
        first: int | None = None
        for p in range(len(probe.totals.forward_sums)):
            for slot, total in enumerate(host[f"forward.{p}"]):
                if not math.isfinite(total):
                    index = probe.checked_nodes[slot]
                    first = index if first is None else min(first, index)
                    break
        if first is not None:
            node = nodes[first]
            return NonFiniteOrigin(
                node.name, node.op_type, "forward", node.outputs[0], layer_of_node.get(node.name)
            )
        if not math.isfinite(loss_value):
            return NonFiniteOrigin("loss", subject.loss_kind, "forward")
        for p, order in enumerate(probe.totals.backward_orders):
            norms = host[f"backward.{p}"]
            for position, slot in enumerate(order):
                if not math.isfinite(norms[position]):
                    _, value = probe.hooked_values[slot]
                    node = _gradient_producer(probe, value)
                    if node is None:
                        return NonFiniteOrigin("loss", subject.loss_kind, "backward", value)
                    return NonFiniteOrigin(
                        node.name, node.op_type, "backward", value, layer_of_node.get(node.name)
                    )
        bad = next((p for p in reversed(parameters) if p.non_finite), None)
        if bad is not None:
            consumer = next((n for n in reversed(nodes) if bad.name in n.inputs), None)
            if consumer is not None:
                return NonFiniteOrigin(
                    consumer.name,
                    consumer.op_type,
                    "backward",
                    bad.name,
                    layer_of_node.get(consumer.name),
                )
        return None
    # parameters only: no node-level view; name the layer when we can
    if not math.isfinite(loss_value):
        return NonFiniteOrigin("model", "unknown (parameters_only coverage)", "forward")
    bad = next((p for p in reversed(parameters) if p.non_finite), None)
    if bad is not None:
        layer = bad.layer or bad.name
        op = next((lyr.op for lyr in layers if lyr.name == layer), "unknown")
        return NonFiniteOrigin(layer, op, "backward", bad.name, bad.layer)
    return None


def _gradient_producer(probe: Probe, value: str, depth: int = 0) -> Any:
    """The node whose backward first made the gradient of `value` non-finite.

    `value` is the first hooked value (in backward order) with a non-finite gradient, so the
    hooked outputs of its consumers were finite: a consumer that is not backward-safe, or whose
    output was hooked, produced it. A backward-safe consumer with unhooked outputs only passed
    a non-finite gradient on, so the search continues through its outputs."""
    users = probe.consumers.get(value, [])
    for node in reversed(users):  # later consumers run first in the backward pass
        if not is_backward_safe(node) or any(o in probe.backward_slots for o in node.outputs):
            return node
    if depth < 64:
        for node in reversed(users):
            for output in node.outputs:
                found = _gradient_producer(probe, output, depth + 1)
                if found is not None:
                    return found
    return users[-1] if users else None
