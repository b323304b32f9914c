"""The observer passed to `ObservableGraph.run`: forward statistics and backward hooks per node.

Per pass (one micro-batch) it collects, all as 0-dim/small tensors on the model's device:
- forward: a float64 sum of every node output that can create a NaN/Inf (FORWARD_SAFE ops,
  which cannot, are skipped; float64 so that large finite values do not overflow it). A
  non-finite sum marks a non-finite output; the first such node
  in execution order is the forward origin. For a node whose output is a layer output the
  layer's mean stands in for the sum (non-finite when the output holds a NaN/Inf, as the sum).
- layer outputs (layers.py): mean/variance (torch.var_mean), saturated count, alive-unit
  mask, and a gradient hook giving ‖∂L/∂output‖ of the layer (squared at the end of the pass).
- backward: a hook on every value not read only by BACKWARD_SAFE ops, giving its gradient's
  float32 norm in the order autograd calls them (the backward execution order), for the
  backward origin.

On a GPU each of these is a kernel launch and a Python dispatch, and any host read of a value
stalls the host until the device catches up (bench/overhead.py measured 2.87x a plain
ResNet-50 step before the per-node work was cut to what is listed here). So: at most one
reduction per node output in the forward (two for a ReLU layer: moments and unit peaks), one
norm per hooked gradient, no detach/reshape/cast for values not measured; the pass's values go
into Python lists and are stacked into one tensor at its end (one kernel for the whole pass),
then added into accumulators allocated on the first pass. Nothing calls `.item()` or `.cpu()`
(tests/unit/engine/test_measure_device_work.py counts both).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from service.engine.formats.fx import VIEW_OPS
from service.engine.graph import Node, ObservableGraph
from service.engine.layers import RELU_LIKE, SATURATING, Layer, canonical
from service.engine.stats import moments, saturated_count, unit_peaks

# ONNX spellings of the view-like ops (the FX ones come from formats/fx.py).
_ONNX_VIEWS = frozenset(
    {"reshape", "transpose", "squeeze", "unsqueeze", "flatten", "identity", "slice"}
    | {"gather", "concat", "split", "expand", "shape", "cast", "constant"}
    # sequence ops only pick, group or join tensors (their list outputs are never observed)
    | {"splittosequence", "sequenceat", "concatfromsequence", "sequenceconstruct"}
    | {"sequenceinsert", "sequenceerase"}
)
_VIEWS = frozenset(canonical(op) for op in VIEW_OPS) | _ONNX_VIEWS

# Ops that cannot turn finite inputs into NaN/Inf in the forward pass: their outputs need no
# finiteness check, since a non-finite value reaching them comes from a checked node upstream.
FORWARD_SAFE = _VIEWS | frozenset(
    {"relu", "relu6", "leakyrelu", "sigmoid", "tanh", "hardtanh", "hardsigmoid", "softsign"}
    | {"gelu", "silu", "elu", "selu", "celu", "mish", "hardswish", "threshold", "clamp", "clip"}
    | {"maxpool2d", "maxpool1d", "maxpool3d", "maxpool2dwithindices", "maxpool", "globalmaxpool"}
    | {"dropout", "nativedropout", "softmax", "logsoftmax", "abs", "neg", "zeros", "zeroslike"}
    | {"onesl", "fill", "full", "sign", "floor", "ceil", "round", "where", "mean", "reducemean"}
)
# Ops whose backward only masks, routes or adds gradients: finite in, finite out. A value read
# only by such ops needs no gradient hook; its gradient is finite iff theirs are (the origin
# search in measure.py walks through them).
BACKWARD_SAFE = _VIEWS | frozenset(
    {"relu", "relu6", "leakyrelu", "threshold", "hardtanh", "clamp", "clip", "add", "sub"}
    | {"neg", "dropout", "nativedropout", "maxpool2d", "maxpool1d", "maxpool3d", "maxpool"}
    | {"maxpool2dwithindices", "getitem"}
)


# Ops through which a mask's -inf entries travel to where they are used (added to scores).
MASK_CARRIERS = _VIEWS | frozenset(
    {"add", "sub", "mul", "where", "expand", "tile", "cast", "triu", "tril", "trilu", "clone"}
    | {"contiguous", "repeat", "maskedfill", "to", "typeas", "castlike"}
    # scores = mask + q·kᵀ in one op (MultiheadAttention's path when it returns the weights)
    | {"baddbmm"}
)
# Ops that write a constant value given by the program: an infinite one is a mask's, on purpose.
_CONSTANT_WRITERS = frozenset(
    {"maskedfill", "full", "fulllike", "newfull", "fill", "filllike", "scalartensor"}
)


def mask_carriers(graph: ObservableGraph, masks: Sequence[str]) -> set[int]:
    """Indexes of the nodes that carry the intended -inf of `masks` (values: mask states, or
    mask inputs of a batch) through MASK_CARRIERS ops, or write one (`writes_infinite_fill`),
    up to e.g. the Softmax that absorbs it: their non-finite outputs are no NaN/Inf origin."""
    masked = set(masks)
    carrying: set[int] = set()
    for index, node in enumerate(graph.nodes):
        op = canonical(node.op_type)
        if (op in MASK_CARRIERS and any(v in masked for v in node.inputs)) or (
            writes_infinite_fill(node)
        ):
            carrying.add(index)
            masked.update(o for o in node.outputs if o)
    return carrying


def writes_infinite_fill(node: Node) -> bool:
    """An FX op writing an infinite constant the program gave it: `masked_fill(scores, mask,
    -inf)` (nanoGPT's causal mask, MultiheadAttention's padding mask) or `full((T, T), -inf)`
    (nn.Transformer.generate_square_subsequent_mask): a mask's intended -inf, absorbed by the
    Softmax after it; not a NaN/Inf origin. (ONNX exports make such masks constants or a
    Where, neither of which is checked.)"""
    if canonical(node.op_type) not in _CONSTANT_WRITERS:
        return False
    source = node.source
    args: Sequence[Any] = getattr(source, "args", ())
    kwargs: dict[str, Any] = getattr(source, "kwargs", {})
    values = [*args, kwargs.get("value"), kwargs.get("fill_value")]
    return any(isinstance(v, float) and math.isinf(v) for v in values)


def is_backward_safe(node: Node) -> bool:
    return canonical(node.op_type) in BACKWARD_SAFE


@dataclass
class ProbeTotals:
    """Accumulated over the passes; all tensors on the device."""

    forward_sums: list[torch.Tensor] = field(default_factory=list)  # one [n_checked] per pass
    backward_norms: list[torch.Tensor] = field(default_factory=list)  # one [n_hooked] per pass
    backward_orders: list[list[int]] = field(default_factory=list)  # slot order per pass
    layer_grad_sq: torch.Tensor | None = None  # [n_layers]
    # per pass: mean and biased variance of each layer output's entries ([n_layers] each),
    # combined over the passes on the host (stats.combine_moments) with `layer_counts`
    layer_means: list[torch.Tensor] = field(default_factory=list)
    layer_vars: list[torch.Tensor] = field(default_factory=list)
    layer_counts: list[list[int]] = field(default_factory=list)
    layer_saturated: torch.Tensor | None = None
    # host-side: known without looking at any tensor, so never copied to the device (a
    # host→device copy from a Python list waits for the GPU queue like a sync would)
    layer_count: list[int] = field(default_factory=list)  # Σ entries of the layer output
    layer_seen: list[bool] = field(default_factory=list)  # its gradient hook fired
    alive: dict[int, torch.Tensor] = field(default_factory=dict)  # layer → per-unit peak |y|


# per observed node output: (position, layer whose statistics it is, backward slot, layer
# whose ‖∂L/∂output‖ its gradient makes)
_OutputWork = tuple[int, int | None, int | None, int | None]


class Probe:
    """A NodeObserver; call `begin_pass()` before each forward and `end_pass()` after backward."""

    def __init__(self, graph: ObservableGraph, layers: list[Layer], device: torch.device):
        self.graph = graph
        self.layers = layers
        self.device = device
        self.layer_of_output = {layer.output: i for i, layer in enumerate(layers)}
        self.checked_nodes: list[int] = []  # node index per forward slot
        self.hooked_values: list[tuple[int, str]] = []  # (node index, value) per backward slot
        self._forward_slot: dict[int, int] = {}
        self.backward_slots: dict[str, int] = {}
        consumers: dict[str, list[Node]] = {}
        for node in graph.nodes:
            for name in dict.fromkeys(node.inputs):
                consumers.setdefault(name, []).append(node)
        self.consumers = consumers
        # Values carrying a mask's intended -inf (a state listed by the ONNX converter, through
        # elementwise ops up to e.g. the Softmax that absorbs it) are no NaN/Inf origin.
        carrying = mask_carriers(graph, graph.metadata.get("non_finite_states", ()))
        for index, node in enumerate(graph.nodes):
            op = canonical(node.op_type)
            if op not in FORWARD_SAFE and index not in carrying:
                self._forward_slot[index] = len(self.checked_nodes)
                self.checked_nodes.append(index)
            for value in node.outputs:
                users = consumers.get(value, [])
                if value and (not users or not all(is_backward_safe(u) for u in users)):
                    self.backward_slots[value] = len(self.hooked_values)
                    self.hooked_values.append((index, value))
        producer: dict[str, int] = {}  # value → the first node that outputs it
        for i, node in enumerate(graph.nodes):
            for value in node.outputs:
                producer.setdefault(value, i)
        # the values whose gradient makes a layer's ‖∂L/∂output‖: its output and a recurrent
        # layer's read final states
        self.grad_layer_of = {
            value: i for i, layer in enumerate(layers) for value in layer.grad_outputs
        }
        self.grad_layer_of.update(self.layer_of_output)
        for value in self.grad_layer_of:  # always hooked (e.g. through a getitem)
            if value not in self.backward_slots:
                node_index = producer[value]
                self.backward_slots[value] = len(self.hooked_values)
                self.hooked_values.append((node_index, value))
        self.node_index = {node.name: i for i, node in enumerate(graph.nodes)}
        # Per node, what its observer call has to do, decided here once per graph rather than
        # per node and pass (host time a GPU waits through): the forward slot, and the output
        # positions that need anything (`_OutputWork`).
        self._work: list[tuple[int | None, tuple[_OutputWork, ...]]]
        self._work = []
        for index, node in enumerate(graph.nodes):
            forward_slot = self._forward_slot.get(index)
            outputs = []
            for position, value_name in enumerate(node.outputs):
                layer_index = self.layer_of_output.get(value_name)
                slot = self.backward_slots.get(value_name)
                if layer_index is not None or forward_slot is not None or slot is not None:
                    grad_layer = self.grad_layer_of.get(value_name)
                    outputs.append((position, layer_index, slot, grad_layer))
            self._work.append((forward_slot, tuple(outputs)))
        # per layer: (saturating activation or None, ReLU-like, non-negative output)
        self._layer_kinds = [
            (
                layer.activation if layer.activation in SATURATING else None,
                layer.activation in RELU_LIKE,
                layer.activation in ("relu", "relu6"),
            )
            for layer in layers
        ]
        self.totals = ProbeTotals()
        self._pass: dict[str, Any] = {}
        self.last_node = -1  # index of the last node that ran (names the failing one)

    def fresh(self) -> Probe:
        """A probe for another measure() call on the same graph: this one's plan (slots,
        consumers, indices; only read while running) shared, its recorded values not."""
        probe = copy.copy(self)
        probe.totals = ProbeTotals()
        probe._pass = {}
        probe.last_node = -1
        return probe

    # -- per pass -----------------------------------------------------------------------
    def begin_pass(self) -> None:
        self.last_node = -1
        self._pass = {
            "forward": {},  # slot → sum (or the layer's mean: finite iff the sum is)
            "backward": [],  # (slot, norm)
            "layer_grad": {},  # layer index → ‖g‖²
            "layer_mean": {},
            "layer_var": {},
            "layer_n": {},
            "layer_sat": {},
        }

    def __call__(self, node: Node, outputs: Sequence[Any]) -> None:
        index = self.node_index[node.name]
        self.last_node = index
        forward_slot, work = self._work[index]
        if not work:
            return
        # Statistics with gradient recording off instead of a `detach` per measured output:
        # the same values, two plain C calls per node instead of a dispatched op per output
        # (on a GPU host each dispatch is microseconds the device waits through)
        recording = torch.is_grad_enabled()
        if recording:
            torch._C._set_grad_enabled(False)
        try:
            self._observe(forward_slot, work, outputs)
        finally:
            if recording:
                torch._C._set_grad_enabled(True)

    def _observe(
        self,
        forward_slot: int | None,
        work: tuple[_OutputWork, ...],
        outputs: Sequence[Any],
    ) -> None:
        record = self._pass
        available = len(outputs)
        for position, layer_index, slot, grad_layer in work:
            if position >= available:
                break
            value = outputs[position]
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                continue
            if layer_index is not None:
                mean = self._layer_forward(layer_index, value)
                if forward_slot is not None:
                    # the layer's mean is non-finite iff the output holds a NaN/Inf: it is the
                    # finiteness check, one reduction over the output instead of two
                    record["forward"][forward_slot] = mean
            elif forward_slot is not None:
                # float64: a float32 sum of large finite values (an attention mask's
                # finfo.min entries) overflows to -inf and would read as a NaN/Inf origin
                record["forward"][forward_slot] = torch.sum(value, dtype=torch.float64)
            if slot is not None and value.requires_grad:
                value.register_hook(self._make_hook(slot, grad_layer))

    def _layer_forward(self, layer_index: int, y: torch.Tensor) -> torch.Tensor:
        """The layer output's statistics for this pass; returns its mean (0-dim, float32)."""
        saturating, relu_like, non_negative = self._layer_kinds[layer_index]
        p = self._pass
        mean, var = moments(y)
        p["layer_mean"][layer_index], p["layer_var"][layer_index] = mean, var
        p["layer_n"][layer_index] = y.numel()
        if saturating is not None:
            p["layer_sat"][layer_index] = saturated_count(y, saturating)
        if relu_like:
            peaks = unit_peaks(y, non_negative=non_negative)
            previous = self.totals.alive.get(layer_index)
            self.totals.alive[layer_index] = (
                peaks if previous is None else torch.maximum(previous, peaks)
            )
        return mean

    def _make_hook(self, slot: int, layer_index: int | None) -> Any:
        record = self._pass

        def hook(grad: torch.Tensor | None) -> None:
            # None: no gradient reached this value in this pass (cuDNN's RNN hands its unused
            # outputs' hooks None on CUDA where the CPU kernels give zeros): a zero norm
            if grad is None:
                norm = torch.zeros((), dtype=torch.float32, device=self.device)
            elif grad.dtype == torch.float64:  # a traced Python float scales in double
                norm = torch.linalg.vector_norm(grad).float()
            else:
                norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
            record["backward"].append((slot, norm))
            if layer_index is not None:
                # squared at the end of the pass; a recurrent layer's second read output
                # (its final state) adds its square
                earlier = record["layer_grad"].get(layer_index)
                record["layer_grad"][layer_index] = (
                    norm if earlier is None else torch.hypot(earlier, norm)
                )

        return hook

    def end_pass(self) -> None:
        """Stack this pass's 0-dim values into one tensor (one kernel for the whole pass, then
        views of it) and add the layer rows into the accumulators (device only)."""
        p, t = self._pass, self.totals
        zero = torch.zeros((), device=self.device)
        forward = [zero] * len(self.checked_nodes)  # unobserved (non-float) outputs: finite
        for slot, value in p["forward"].items():
            forward[slot] = value
        backward = [v for _, v in p["backward"]]
        t.backward_orders.append([slot for slot, _ in p["backward"]])
        n_layers = len(self.layers)
        rows = range(n_layers)
        layer_rows = [
            p[kind].get(i, zero)
            for kind in ("layer_grad", "layer_mean", "layer_var", "layer_sat")
            for i in rows
        ]
        # the forward sums as finiteness marks, 0 or NaN (x - x), before any float32 cast
        sums = torch.stack(forward) if forward else torch.zeros(0, device=self.device)
        pieces = [*(sums - sums).float().unbind(0), *backward, *layer_rows]
        stacked = torch.stack(pieces).float() if pieces else torch.zeros(0, device=self.device)
        sizes = [len(forward), len(backward)] + [n_layers] * 4
        fwd, bwd, grad_norm, means, variances, sat = stacked.split(sizes)
        t.forward_sums.append(fwd)
        t.backward_norms.append(bwd)
        if not n_layers:
            return
        grad_sq = grad_norm.square()
        t.layer_means.append(means)
        t.layer_vars.append(variances)
        counts = [int(p["layer_n"].get(i, 0)) for i in rows]
        seen = [i in p["layer_grad"] for i in rows]
        t.layer_counts.append(counts)
        if t.layer_grad_sq is None:
            t.layer_grad_sq = grad_sq
            t.layer_saturated = sat
            t.layer_count, t.layer_seen = counts, seen
        else:
            assert t.layer_saturated is not None
            t.layer_grad_sq = t.layer_grad_sq + grad_sq
            t.layer_saturated = t.layer_saturated + sat
            t.layer_count = [a + b for a, b in zip(t.layer_count, counts, strict=True)]
            t.layer_seen = [a or b for a, b in zip(t.layer_seen, seen, strict=True)]
