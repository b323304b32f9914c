"""Fake quantisers of a quantisation-aware-training (QAT) model: how much each one clips.

Training passes the gradient straight through a fake quantiser only where round(x / scale) +
zero_point lies in [quant_min, quant_max] (torch.fake_quantize_*'s mask, and an ONNX
QuantizeLinear → DequantizeLinear pair as ops/quantize.py computes it). A value outside is
clamped: wrong in the forward pass and without gradient behind it. A range calibrated too
narrow (a scale too small for what it quantises) so cuts the gradient of most of a layer's
output, like a saturated tanh, and nothing else in a report would say why.

`measure_quantizers` runs one forward pass without autograd over the batch with each
quantiser's node wrapped to count, from its own arguments, the entries it clamps, the extremes
of its input and the factor by which its scale must grow for its range to hold them all.
Quantisers found: an ONNX QuantizeLinear computed as a fake pair (a Clip between Q and DQ
narrows its range: the legacy exporter writes torch.ao's reduced range so) and the aten
fake_quantize ops of torch.export and TorchScript graphs (FakeQuantize modules; quantisers that
call the ops directly, as NVIDIA's pytorch-quantization does). `rescale_quantizers` widens
ranges on a copy of the model, for fix verification.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from service.engine.formats.fx import unique_inputs
from service.engine.graph import Node, NodeFn, ObservableGraph
from service.engine.layers import Layer
from service.engine.onnx.ops.quantize import DequantizeLinear, QuantizeLinear, quantized_type
from service.engine.report import QuantizerReport

# aten's fake quantisation ops (op_type of an FX node), by the overload packet's name
_ATEN_QUANTIZERS = frozenset(
    {
        "fake_quantize_per_tensor_affine",
        "fake_quantize_per_channel_affine",
        "_fake_quantize_learnable_per_tensor_affine",
        "_fake_quantize_learnable_per_channel_affine",
    }
)


# in steps of the grid (float8: relative to the range), beyond half a step
_SLACK = 1e-3


@dataclass
class QuantizerCall:
    """One call's arguments, broadcast to the quantised tensor."""

    x: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    low: float  # the integer (or float8) range
    high: float
    divide: bool  # ONNX divides by the scale; torch multiplies by its reciprocal
    rounds: bool = True  # float8 targets cast instead of rounding

    def grid_values(self) -> torch.Tensor:
        """x / scale + zero_point, unrounded and before the clamp (in float32)."""
        x, scale = self.x.float(), self.scale.float()
        scaled = x / scale if self.divide else x * (1.0 / scale)
        return scaled + self.zero_point.float()

    def statistics(self) -> torch.Tensor:
        """[clamped entries, entries, min x, max x, the factor by which the scale must grow
        to hold every entry, the range's low and high end in x's units (per channel: the
        widest channel's)], float64."""
        grid = self.grid_values()
        zero = self.zero_point.float()
        up, down = self.high - zero, self.low - zero
        # clamped: beyond the range by more than rounding moves a value (half a step; float8:
        # its relative precision), with a hair's slack for the float error of a range
        # calibrated to end exactly at the batch's extreme
        slack = 0.5 + _SLACK if self.rounds else _SLACK * max(abs(self.high), 1.0)
        # a range that starts at exactly 0 clamps negatives as a ReLU does: onnxruntime's
        # quantiser removes a ReLU before it for that; those are not clipping
        below = (grid < self.low - slack) & (down != 0)
        above = grid > self.high + slack
        clamped = above | below
        # how many times its scale each clamped entry needs: its distance from the zero point
        # over the range's on its side
        need = torch.where(
            above,
            (grid - zero) / up.clamp_min(1e-12),
            torch.where(below, (grid - zero) / down.clamp_max(-1e-12), 1.0),
        )
        scale = self.scale.float()
        x = self.x.detach().float()
        if not x.numel():  # nothing to clamp
            x = torch.zeros(1, device=x.device)
        values = [
            clamped.sum(dtype=torch.float64),
            torch.tensor(float(self.x.numel()), dtype=torch.float64, device=x.device),
            x.min(),
            x.max(),
            need.max().clamp_min(1.0) if need.numel() else x.new_ones(()),
            (down * scale).min(),
            (up * scale).max(),
        ]
        return torch.stack([v.double().to(x.device) for v in values])


class QuantizerSite:
    """A quantiser node: its arguments as the node's runtime inputs give them (`call`), its
    own computation (`fn`, without any wrapper put around it), and `widen` to multiply its
    scale on a copy of the model (an ONNX pair's DequantizeLinears with it)."""

    def __init__(self, node: Node, per_channel: bool) -> None:
        self.node = node
        self.fn: NodeFn = node.fn
        self.per_channel = per_channel
        self.partners: list[Node] = []

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def input(self) -> str:
        return self.node.inputs[0]

    def call(self, values: Sequence[Any]) -> QuantizerCall:
        raise NotImplementedError

    def widen(self, factor: float) -> None:
        raise NotImplementedError


def find_quantizers(graph: ObservableGraph) -> list[QuantizerSite]:
    """The fake quantisers among the graph's top-level nodes, in execution order."""
    if not any(_is_quantizer(node) for node in graph.nodes):
        return []  # most models: no maps built on the measurement's path
    readers: dict[str, list[Node]] = {}
    for node in graph.nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node)
    state = graph.initial_values()
    sites: list[QuantizerSite] = []
    for node in graph.nodes:
        if isinstance(node.fn, QuantizeLinear) and node.fn.fake:
            sites.append(_OnnxQuantizer(node, readers, state))
        elif node.domain == "aten" and node.op_type in _ATEN_QUANTIZERS:
            source = node.source
            if isinstance(source, fx.Node) and len(node.inputs) == len(
                unique_inputs(source.args, source.kwargs)
            ):  # else a device-following call: not one of these ops
                sites.append(_AtenQuantizer(node, source))
    return sites


def _is_quantizer(node: Node) -> bool:
    fn = node.fn
    return (isinstance(fn, QuantizeLinear) and fn.fake) or (
        node.domain == "aten" and node.op_type in _ATEN_QUANTIZERS
    )


class _OnnxQuantizer(QuantizerSite):
    """A QuantizeLinear computed as a fake pair; a Clip between it and its DequantizeLinears
    narrows its range."""

    def __init__(self, node: Node, readers: dict[str, list[Node]], state: dict[str, Any]) -> None:
        super().__init__(node, per_channel=False)  # refined per call: a one-element scale
        self.low, self.high = -float("inf"), float("inf")
        pending = [node.outputs[0]]
        while pending:  # the pair's DequantizeLinears, through the Clips between
            value = pending.pop()
            for reader in readers.get(value, []):
                if reader.op_type == "DequantizeLinear":
                    self.partners.append(reader)
                    continue
                if reader.op_type == "Clip":
                    low, high = _clip_bounds(reader, state)
                    self.low, self.high = max(self.low, low), min(self.high, high)
                pending.append(reader.outputs[0])

    def call(self, values: Sequence[Any]) -> QuantizerCall:
        quantize = self.fn
        assert isinstance(quantize, QuantizeLinear)
        x, scale, *rest = values
        zero_point = rest[0] if rest and rest[0] is not None else None
        target = quantized_type(quantize.declared, zero_point)
        offset = quantize.broadcast(zero_point, x) if zero_point is not None else torch.zeros(())
        return QuantizerCall(
            x=x,
            scale=quantize.broadcast(scale, x) * quantize.scale_factor,
            zero_point=offset.to(x.device),
            low=max(target.low, self.low),
            high=min(target.high, self.high),
            divide=True,
            rounds=not target.is_float8,
        )

    def widen(self, factor: float) -> None:
        for node in [self.node, *self.partners]:
            fn = self.fn if node is self.node else node.fn
            if isinstance(fn, QuantizeLinear | DequantizeLinear):
                node.fn = dataclasses.replace(fn, scale_factor=fn.scale_factor * factor)
        self.fn = self.node.fn


def _clip_bounds(clip: Node, state: dict[str, Any]) -> tuple[float, float]:
    """A Clip's constant bounds (inputs from opset 11, attributes before); unknown = open."""

    def bound(slot: int, attr: str, default: float) -> float:
        if len(clip.inputs) > slot and clip.inputs[slot]:
            value = state.get(clip.inputs[slot])
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                return float(value)
            return default
        return float(clip.attrs.get(attr, default))

    return bound(1, "min", -float("inf")), bound(2, "max", float("inf"))


class _AtenQuantizer(QuantizerSite):
    """aten's fake_quantize_per_{tensor,channel}_affine (and the learnable ones), their
    arguments read off the FX node by the op's schema. A widened scale's factor is kept in the
    node's attrs and the node's fn rebuilt from the op with it."""

    def __init__(self, node: Node, source: fx.Node) -> None:
        target = source.target
        self.names = [a.name for a in target._schema.arguments]  # type: ignore[union-attr]
        super().__init__(node, per_channel="axis" in self.names)
        self.source = source
        self.slots = {n: i for i, n in enumerate(unique_inputs(source.args, source.kwargs))}

    def _arguments(self, values: Sequence[Any]) -> dict[str, Any]:
        def value(arg: Any) -> Any:
            return fx.node.map_arg(arg, lambda n: values[self.slots[n]])

        args = {self.names[i]: value(a) for i, a in enumerate(self.source.args)}
        args.update({k: value(v) for k, v in self.source.kwargs.items()})
        args["scale"] = args["scale"] * float(self.node.attrs.get("scale_factor", 1.0))
        return args

    def call(self, values: Sequence[Any]) -> QuantizerCall:
        args = self._arguments(values)
        x = args[self.names[0]]
        scale = torch.as_tensor(args["scale"], device=x.device).float()
        zero_point = torch.as_tensor(args["zero_point"], device=x.device).float()
        if self.per_channel:
            shape = [1] * x.dim()
            shape[int(args["axis"]) % x.dim()] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        if "learnable" in self.node.op_type:  # its zero point is learned in float, used rounded
            zero_point = torch.round(zero_point).clamp(args["quant_min"], args["quant_max"])
        return QuantizerCall(
            x=x,
            scale=scale,
            zero_point=zero_point,
            low=float(args["quant_min"]),
            high=float(args["quant_max"]),
            divide=False,
        )

    def widen(self, factor: float) -> None:
        self.node.attrs["scale_factor"] = float(self.node.attrs.get("scale_factor", 1.0)) * factor
        op, count = self.source.target, len(self.source.args)

        def widened(*values: Any) -> Any:
            args = self._arguments(values)
            positional = [args.pop(self.names[i]) for i in range(count)]
            return op(*positional, **args)  # type: ignore[operator]

        self.node.fn = self.fn = widened


def measure_quantizers(
    graph: ObservableGraph, parts: Iterable[Sequence[Any]], layers: list[Layer]
) -> list[QuantizerReport]:
    """Each quantiser's clamped share on the batch, given as the parts the measurement split
    it into (one forward pass without autograd per part: no more memory than the
    measurement's own)."""
    sites = find_quantizers(graph)
    if not sites:
        return []
    rows: dict[str, torch.Tensor] = {}
    per_channel: dict[str, bool] = {}

    def record(site: QuantizerSite, values: Sequence[Any]) -> None:
        call = site.call(values)
        per_channel[site.name] = call.scale.numel() > 1
        rows[site.name] = _merged(rows.get(site.name), call.statistics())

    for inputs in parts:
        _run_seeing_each(graph, inputs, sites, record)
    return _reports(graph, sites, rows, per_channel, layers)


def _merged(earlier: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """Two parts' statistics as one batch's: counts add, extremes and factors take the
    larger (the range's ends are the quantiser's own)."""
    if earlier is None:
        return part
    return torch.stack(
        [
            earlier[0] + part[0],
            earlier[1] + part[1],
            torch.minimum(earlier[2], part[2]),
            torch.maximum(earlier[3], part[3]),
            torch.maximum(earlier[4], part[4]),
            part[5],
            part[6],
        ]
    )


def _run_seeing_each(
    graph: ObservableGraph,
    inputs: Sequence[Any],
    sites: list[QuantizerSite],
    see: Callable[[QuantizerSite, Sequence[Any]], None],
) -> None:
    """One forward pass without autograd, each quantiser's arguments handed to `see` before
    the quantiser runs (`see` may widen it: then the wider one runs)."""

    def seeing(site: QuantizerSite) -> NodeFn:
        def run(*values: Any) -> Any:
            see(site, values)
            return site.fn(*values)

        return run

    for site in sites:
        site.node.fn = seeing(site)
    try:
        with torch.no_grad():
            graph.run(list(inputs))
    finally:
        for site in sites:
            site.node.fn = site.fn


def _reports(
    graph: ObservableGraph,
    sites: list[QuantizerSite],
    rows: dict[str, torch.Tensor],
    per_channel: dict[str, bool],
    layers: list[Layer],
) -> list[QuantizerReport]:
    measured = [s for s in sites if s.name in rows]
    if not measured:
        return []
    # one transfer for all of them
    stacked = torch.stack([rows[s.name] for s in measured])
    host = dict(zip([s.name for s in measured], stacked.tolist(), strict=True))
    sources = weight_sources(graph)
    producer = {out: node.name for node in graph.nodes for out in node.outputs}
    layer_of_node = {n: layer.name for layer in layers for n in layer.nodes}
    layer_of_param = {p: layer.name for layer in layers for p in layer.params}
    reports = []
    for site in measured:
        clamped, count, low, high, factor, range_min, range_max = host[site.name]
        params = sorted(sources.get(site.input, ()))
        layer = (
            layer_of_param.get(params[0])
            if params
            else layer_of_node.get(producer.get(site.input, ""))
        )
        reports.append(
            QuantizerReport(
                name=site.name,
                op=site.node.op_type,
                input=site.input,
                quantizes="weight" if params else "activation",
                parameters=params,
                layer=layer,
                per_channel=per_channel.get(site.name, site.per_channel),
                input_min=low,
                input_max=high,
                range_min=range_min,
                range_max=range_max,
                clipped_fraction=clamped / max(count, 1.0),
                covering_scale_factor=factor,
            )
        )
    return reports


def weight_sources(graph: ObservableGraph) -> dict[str, set[str]]:
    """Values computed from parameters alone (a weight, a Conv-BN module's folded weight) →
    those parameters. A value that depends on a graph input is not in it."""
    params = set(graph.param_names)
    sources: dict[str, set[str]] = {p: {p} for p in params}
    data = set(graph.input_names)
    for node in graph.nodes:
        if any(name in data for name in node.inputs):
            data.update(node.outputs)
            continue
        found = set().union(*(sources.get(name, set()) for name in node.inputs))
        if found:
            for out in node.outputs:
                sources[out] = found
    return sources


# a widened range ends a hair past the batch's extreme: float rounding keeps it inside
_COVER_MARGIN = 1.0 + 1e-6


def widen_to_cover(graph: ObservableGraph, parts: Iterable[Sequence[Any]]) -> dict[str, float]:
    """Max calibration on the batch (given in parts), widening only, for fix verification on
    a copy of the model: in execution order each quantiser's scale (and its ONNX
    DequantizeLinears') grows by the factor that holds all of its input, as the quantisers
    before it leave that input. The wider ranges stay in `graph`. Returns node → the factor
    by which each scale that grew did, in all."""
    sites = find_quantizers(graph)
    grown: dict[str, float] = {}

    def calibrate(site: QuantizerSite, values: Sequence[Any]) -> None:
        factor = float(site.call(values).statistics()[4]) * _COVER_MARGIN
        if factor > _COVER_MARGIN:
            site.widen(factor)  # its fn is the widened one from here on
            grown[site.name] = grown.get(site.name, 1.0) * factor

    for inputs in parts:
        _run_seeing_each(graph, inputs, sites, calibrate)
    return grown
