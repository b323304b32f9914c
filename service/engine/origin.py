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

import torch

from service.engine.graph import Node, ObservableGraph
from service.engine.layers import Layer
from service.engine.measurements import NonFiniteOrigin, Subject
from service.engine.probes import Probe, is_backward_safe, mask_carriers
from service.engine.report import ParameterReport


def _bad_entries(x: torch.Tensor) -> dict[str, Any]:
    """What a batch array holds that is not finite, and where the first such entry is (read
    once, on the rare path where the batch itself carries NaN/Inf)."""
    first = torch.nonzero(~torch.isfinite(x))[:1].tolist()
    return {
        "array": {
            "nan": int(torch.isnan(x).sum()),
            "posinf": int(torch.isposinf(x).sum()),
            "neginf": int(torch.isneginf(x).sum()),
            "numel": x.numel(),
            "first": first[0] if first else None,
        }
    }


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
    masks = mask_inputs(subject, host)
    for i, spec in enumerate(subject.model_info.inputs):
        if not math.isfinite(host.get(f"input.{i}", [0.0])[0]) and spec.name not in masks:
            # named as the batch names it (the user's array), else as the model's input
            array = next(
                (a.name for a in subject.batch_info.arrays if a.feeds == spec.name), spec.name
            )
            return NonFiniteOrigin(
                array, "input", "forward", spec.name, values=_bad_entries(subject.inputs[i])
            )
    if graph is not None and probe is not None:
        nodes = graph.nodes
        carrying = mask_carriers(graph, masks) if masks else set()
        first: int | None = None
        for p in range(len(probe.totals.forward_sums)):
            for slot, total in enumerate(host[f"forward.{p}"]):
                if not math.isfinite(total) and probe.checked_nodes[slot] not in carrying:
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


def mask_inputs(subject: Subject, host: dict[str, list[float]]) -> list[str]:
    """Batch arrays whose only non-finite entries are -inf: additive attention masks (0 where
    a position is attended, -inf where not), which the model adds to its scores on purpose.
    (measure() counts each float input's NaN and +inf entries as `input_nan_posinf.i`.)"""
    return [
        spec.name
        for i, spec in enumerate(subject.model_info.inputs)
        if not math.isfinite(host.get(f"input.{i}", [0.0])[0])
        and host.get(f"input_nan_posinf.{i}", [1.0])[0] == 0
    ]


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


# -- what the origin's inputs held ------------------------------------------------------------

# exp overflows float32 above log(3.4e38) ≈ 88.72 (float16: log(65504) ≈ 11.09)
EXP_LIMIT = {torch.float32: 88.72, torch.float16: 11.09, torch.bfloat16: 88.72}


def exp_input_limit(dtype: torch.dtype) -> float:
    """The largest input the exp guard lets through (verify/transforms.py, and the advice's
    snippet): exp of it finite with room for what follows, 80 in float32 and bfloat16, 10.5 in
    float16 (where 80 guarded nothing)."""
    return min(80.0, math.floor(2 * EXP_LIMIT.get(dtype, 88.72)) / 2 - 0.5)


_COUNT_KEYS = ("numel", "negative", "zero", "nan", "posinf", "neginf", "above_exp_limit")


class OriginReached(Exception):
    """Raised by `OriginRecorder` once it has seen the origin node: the rest is not needed."""


def value_counts(x: torch.Tensor) -> dict[str, float]:
    """numel and counts of negative (−inf included), zero, NaN, +inf, −inf entries, entries
    above exp's overflow limit, and the finite min/max; one host transfer."""
    x = x.detach()
    limit = EXP_LIMIT.get(x.dtype, 88.72)
    x = x.float()
    finite = torch.isfinite(x)
    stacked = torch.stack(
        [
            torch.tensor(float(x.numel()), device=x.device),
            (x < 0).sum().float(),
            (x == 0).sum().float(),
            torch.isnan(x).sum().float(),
            torch.isposinf(x).sum().float(),
            torch.isneginf(x).sum().float(),
            (x > limit).sum().float(),
            torch.where(finite, x, torch.inf).min() if x.numel() else x.new_zeros(()),
            torch.where(finite, x, -torch.inf).max() if x.numel() else x.new_zeros(()),
        ]
    ).tolist()
    out = dict(zip(_COUNT_KEYS, stacked[:7], strict=True))
    out["min"], out["max"] = stacked[7], stacked[8]
    return out


def merge_counts(a: dict[str, float] | None, b: dict[str, float]) -> dict[str, float]:
    """Counts of two micro-batches: sums, and the min/max of the extremes."""
    if a is None:
        return dict(b)
    out = {k: a[k] + b[k] for k in _COUNT_KEYS}
    out["min"], out["max"] = min(a["min"], b["min"]), max(a["max"], b["max"])
    return out


class OriginRecorder:
    """A graph observer for a re-run of the forward pass (no grad): keeps the values the origin
    node reads as they are produced, and at the node counts what its inputs and outputs hold,
    then stops the run (`OriginReached`). Only run when a NaN/Inf was found: one extra forward
    up to that node, never on a healthy model."""

    def __init__(self, node: Node, initial: dict[str, Any], inputs: dict[str, Any]) -> None:
        self.node = node
        self.wanted = set(node.inputs) - {""}
        self.values: dict[str, Any] = {
            k: v for k, v in {**initial, **inputs}.items() if k in self.wanted
        }
        self.inputs: list[dict[str, float] | None] = [None] * len(node.inputs)
        self.outputs: list[dict[str, float] | None] = [None] * len(node.outputs)

    def __call__(self, node: Node, outputs: Any) -> None:
        if node is not self.node:
            for name, value in zip(node.outputs, outputs, strict=False):
                if name in self.wanted:
                    self.values[name] = value
            return
        for k, name in enumerate(node.inputs):
            value = self.values.get(name)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                self.inputs[k] = merge_counts(self.inputs[k], value_counts(value))
        for k, value in enumerate(outputs):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                self.outputs[k] = merge_counts(self.outputs[k], value_counts(value))
        self.values = {}
        raise OriginReached

    def evidence(self, graph: ObservableGraph, layer_of_node: dict[str, str]) -> dict[str, Any]:
        """{"inputs": [{value, source, counts...}], "output": {counts...}}: `source` names what
        fed the input: a layer (`fc1`), a node outside any layer, a model input or a parameter."""
        producer = {o: n for n in graph.nodes for o in n.outputs if o}
        params = {name for name, _ in graph.named_graph_parameters()}
        inputs = []
        for name, counts in zip(self.node.inputs, self.inputs, strict=True):
            if counts is None:
                continue
            node = producer.get(name)
            if node is not None:
                source = layer_of_node.get(node.name) or node.name
                kind = "layer" if node.name in layer_of_node else "node"
            elif name in graph.input_names:
                source, kind = name, "model input"
            else:
                source, kind = name, "parameter" if name in params else "constant"
            entry = {"value": name, "source": source, "source_kind": kind, **counts}
            if node is not None:  # what computed it (a softmax before a log: log_softmax)
                entry["source_op"] = node.op_type
            inputs.append(entry)
        output = next((c for c in self.outputs if c is not None), None)
        return {"inputs": inputs, "output": output} if inputs or output else {}
