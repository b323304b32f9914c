"""A statically quantised model in onnxruntime's QOperator format, written again as QDQ.

`quantize_static(..., quant_format=QuantFormat.QOperator)` computes every layer on integers:
QLinearConv / QLinearMatMul (ops/integer.py), com.microsoft QGemm, QLinearAdd, QLinearMul,
QLinearSigmoid, QLinearLeakyRelu, QLinearGlobalAveragePool, QLinearAveragePool,
QLinearConcat, QLinearSoftmax and QLinearWhere (ops/microsoft_qlinear.py), and default-domain
ops run on the 8-bit values themselves (MaxPool, Reshape, Flatten, Split, Pad, ...). No
gradient passes an integer: such a model had no weight to diagnose.

The same model in the QDQ format (what `QuantFormat.QDQ` writes) has a gradient everywhere,
and the converter already handles it: a DequantizeLinear of an integer weight becomes a float
parameter (dequantized_weights.py) and a QuantizeLinear read only by DequantizeLinears a
straight-through fake quantiser (ops/quantize.py). So each QLinear node is written as

    DequantizeLinear(x_q, x_scale, x_zero) ... → float op → QuantizeLinear(y_scale, y_zero)

with its weight dequantized by its own scale and zero point (per output channel where it is
so quantised) and its int32 bias by x_scale·w_scale (a new initializer, added to `weights`;
QGemm's also times alpha, as its kernel scales the bias). An op on 8-bit values runs on their
dequantized floats instead (the same values: it only moves, picks or compares elements, and
a dequantization is monotone); its integer copy stays only where something still reads the
integers. An existing DequantizeLinear of a value whose float is at hand becomes an Identity
of it. The gradients are those of fine-tuning from this checkpoint with the activations fake-
quantised; the forward is the integer kernels' up to float rounding, which can move a value
near a rounding boundary by one quantisation step.

Only exact forms are rewritten: scales and zero points held as one-element initializers (a
weight's per tensor or per output channel), a 2-D weight for QGemm, channels-first pools
without ceil mode, Resize in nearest mode. Anything else keeps its integer op: an exact
forward, no gradient.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from onnx import GraphProto, NodeProto, helper

from service.engine.onnx.graph_rewrites import taken_names, with_nodes
from service.engine.onnx.source_parameters import listed

_MS = "com.microsoft"
_DEFAULT_DOMAINS = ("", "ai.onnx")
_DEQUANTIZE_DOMAINS = (*_DEFAULT_DOMAINS, _MS)
_EIGHT_BIT = (torch.int8, torch.uint8)
# a value's float counterpart is named after it
_FLOAT_SUFFIX = "/dequantized"


@dataclass(frozen=True)
class _Layout:
    """Where a QLinear node keeps what: (value, scale, zero point) slots of its quantised
    activations, of its weight (an initializer; else read as one more activation), its int32
    bias slot, its output's (scale, zero point) slots (None: a float output, QGemm without
    y_scale), slots passed on as they are, and the float op it computes."""

    float_op: str
    activations: tuple[tuple[int, int, int], ...]
    output: tuple[int, int] | None
    weight: tuple[int, int, int] | None = None
    bias: int | None = None
    passed: tuple[int, ...] = ()


def _unary(float_op: str) -> _Layout:
    return _Layout(float_op, ((0, 1, 2),), (3, 4))


_LAYOUTS: dict[tuple[str, str], _Layout] = {
    ("", "QLinearConv"): _Layout("Conv", ((0, 1, 2),), (6, 7), weight=(3, 4, 5), bias=8),
    ("", "QLinearMatMul"): _Layout("MatMul", ((0, 1, 2),), (6, 7), weight=(3, 4, 5)),
    (_MS, "QGemm"): _Layout("Gemm", ((0, 1, 2),), (7, 8), weight=(3, 4, 5), bias=6),
    (_MS, "QLinearAdd"): _Layout("Add", ((0, 1, 2), (3, 4, 5)), (6, 7)),
    (_MS, "QLinearMul"): _Layout("Mul", ((0, 1, 2), (3, 4, 5)), (6, 7)),
    (_MS, "QLinearSigmoid"): _unary("Sigmoid"),
    (_MS, "QLinearLeakyRelu"): _unary("LeakyRelu"),
    (_MS, "QLinearGlobalAveragePool"): _unary("GlobalAveragePool"),
    (_MS, "QLinearAveragePool"): _unary("AveragePool"),
    (_MS, "QLinearSoftmax"): _unary("Softmax"),
    (_MS, "QLinearWhere"): _Layout("Where", ((1, 2, 3), (4, 5, 6)), (7, 8), passed=(0,)),
    # QLinearConcat's slots depend on its input count (`_layout`)
}
# attributes of the QLinear node that its float op does not take
_NOT_FLOAT_ATTRIBUTES = frozenset({"channels_last", "opset"})
# default-domain ops onnxruntime runs on 8-bit values (operators/direct_q8.py, maxpool.py,
# pad.py, resize.py, split.py, gather.py, argmax.py): the same op on their dequantized floats
# gives the dequantized result (they move, pick or compare elements)
_ON_EIGHT_BITS = frozenset(
    {"MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Split", "Gather"}
    | {"Pad", "Resize", "ArgMax", "ArgMin"}
)
# of those, the ones whose output is no quantised value (an index)
_INDEX_OUTPUT = frozenset({"ArgMax", "ArgMin"})


@dataclass(frozen=True)
class _Grid:
    """A per-tensor quantised value's scale and zero point (initializer names)."""

    scale: str
    zero_point: str


def qoperator_as_qdq(
    graph: GraphProto, weights: dict[str, torch.Tensor]
) -> tuple[GraphProto, list[str]]:
    """`graph`, or a copy whose QLinear* nodes are DequantizeLinear → float op → QuantizeLinear;
    with the report notes saying what was rewritten."""
    if not any(_layout(node) is not None for node in graph.node):
        return graph, []
    rewrite = _Rewrite(graph, weights)
    for node in graph.node:
        rewrite.visit(node)
    if not rewrite.rewritten:
        return graph, []
    nodes = rewrite.without_unread_integer_copies()
    return with_nodes(graph, nodes, rewrite.added, weights), rewrite.notes()


def _layout(node: NodeProto) -> _Layout | None:
    domain = "" if node.domain in _DEFAULT_DOMAINS else node.domain
    if (domain, node.op_type) == (_MS, "QLinearConcat"):
        count = (len(node.input) - 2) // 3
        if count < 1 or len(node.input) != 2 + 3 * count:
            return None
        slots = tuple((2 + 3 * i, 3 + 3 * i, 4 + 3 * i) for i in range(count))
        return _Layout("Concat", slots, (0, 1))
    return _LAYOUTS.get((domain, node.op_type))


class _Rewrite:
    """The new node list, built in the graph's order (so it stays topologically sorted)."""

    def __init__(self, graph: GraphProto, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights
        self.graph_outputs = {o.name for o in graph.output}
        self.taken = taken_names(graph, weights) | self.graph_outputs
        self.nodes: list[NodeProto] = []
        self.grids: dict[str, _Grid] = {}  # quantised value → its scale and zero point
        self.floats: dict[tuple[str, str, str], str] = {}  # (value, scale, zero) → its float
        self.integer_copies: set[str] = set()  # first outputs of kept 8-bit ops, maybe unread
        self.rewritten: Counter[str] = Counter()
        self.moved: Counter[str] = Counter()
        self.kept: list[str] = []
        self.added: list[str] = []

    # ------------------------------------------------------------ names and values

    def fresh(self, name: str) -> str:
        while name in self.taken:
            name += "_"
        self.taken.add(name)
        return name

    def scalar(self, name: str, dtypes: tuple[torch.dtype, ...]) -> bool:
        tensor = self.weights.get(name) if name else None
        return tensor is not None and tensor.numel() == 1 and tensor.dtype in dtypes

    def grid_of(self, scale: str, zero_point: str) -> _Grid | None:
        if self.scalar(scale, (torch.float32,)) and self.scalar(zero_point, _EIGHT_BIT):
            return _Grid(scale, zero_point)
        return None

    def float_of(self, value: str, grid: _Grid) -> str:
        """The float counterpart of the quantised `value` on `grid`: one at hand (a float op's
        output, an earlier DequantizeLinear), else a DequantizeLinear written here."""
        key = (value, grid.scale, grid.zero_point)
        if key not in self.floats:
            name = self.fresh(value + _FLOAT_SUFFIX)
            self.nodes.append(
                helper.make_node(
                    "DequantizeLinear", [value, grid.scale, grid.zero_point], [name], name=name
                )
            )
            self.floats[key] = name
        return self.floats[key]

    # ------------------------------------------------------------ the walk

    def visit(self, node: NodeProto) -> None:
        layout = _layout(node)
        if layout is not None:
            if self.as_qdq(node, layout):
                self.rewritten[node.op_type] += 1
                return
            self.kept.append(node.name or node.output[0])
            if layout.output is not None:  # its integers still sit on its output's grid
                self.note_grid(node.output[0], *(node.input[i] for i in layout.output))
        elif node.domain in _DEFAULT_DOMAINS and node.op_type in _ON_EIGHT_BITS:
            if self.on_floats(node):
                return
        elif node.op_type == "DequantizeLinear" and node.domain in _DEQUANTIZE_DOMAINS:
            if self.dequantization(node):
                return
        elif node.op_type == "QuantizeLinear" and node.domain in _DEQUANTIZE_DOMAINS:
            self.note_grid(node.output[0], *[*node.input, "", ""][1:3])
        self.nodes.append(node)

    def note_grid(self, value: str, scale: str, zero_point: str) -> None:
        grid = self.grid_of(scale, zero_point)
        if grid is not None:
            self.grids[value] = grid

    def dequantization(self, node: NodeProto) -> bool:
        """An existing per-tensor DequantizeLinear: an Identity of the float at hand, else
        kept and remembered as that float. Whether it was replaced."""
        inputs = [*node.input, "", ""]
        grid = self.grid_of(inputs[1], inputs[2])
        if grid is None:
            return False
        key = (inputs[0], grid.scale, grid.zero_point)
        if key not in self.floats:
            self.floats[key] = node.output[0]
            return False
        name = node.name or node.output[0]
        self.nodes.append(
            helper.make_node("Identity", [self.floats[key]], [node.output[0]], name=name)
        )
        return True

    def on_floats(self, node: NodeProto) -> bool:
        """An op on 8-bit values computed on their floats; its integer copy stays for
        whatever still reads the integers (dropped at the end if nothing does)."""
        grid = self.grids.get(node.input[0]) if node.input else None
        if grid is None or not self.exact_on_floats(node):
            return False
        inputs = [self.float_of(node.input[0], grid), *node.input[1:]]
        if node.op_type == "Pad" and len(inputs) > 2 and inputs[2]:
            inputs[2] = self.float_of(inputs[2], grid)  # its constant, quantised on the grid
        name = node.name or node.output[0]
        if node.op_type in _INDEX_OUTPUT:  # the same indices: the integer op is not needed
            outputs = list(node.output)
        else:
            outputs = [self.fresh(out + _FLOAT_SUFFIX) if out else "" for out in node.output]
            for out, out_float in zip(node.output, outputs, strict=True):
                if out:
                    self.grids[out] = grid
                    self.floats[(out, grid.scale, grid.zero_point)] = out_float
            self.nodes.append(node)
            self.integer_copies.add(node.output[0])
        floated = helper.make_node(
            node.op_type, inputs, outputs, name=self.fresh(f"{name}{_FLOAT_SUFFIX}")
        )
        floated.attribute.extend(node.attribute)
        self.nodes.append(floated)
        self.moved[node.op_type] += 1
        return True

    def exact_on_floats(self, node: NodeProto) -> bool:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MaxPool":
            return len([o for o in node.output if o]) == 1  # no indices
        if node.op_type == "Resize":  # integer linear/cubic modes round differently
            return attrs.get("mode", b"nearest") in (b"nearest", "nearest")
        if node.op_type == "Pad" and attrs.get("mode", b"constant") in (b"constant", "constant"):
            # the constant (quantised on the value's grid) must be given: 0 is no float zero
            return len(node.input) > 2 and bool(node.input[2])
        return True

    # ------------------------------------------------------------ QLinear nodes

    def as_qdq(self, node: NodeProto, layout: _Layout) -> bool:
        """DequantizeLinear of the node's quantised inputs, its float op, QuantizeLinear of
        the result, written; False where the node is not in a form this rewrites exactly."""
        inputs = [*node.input, *[""] * 10]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if int(attrs.get("channels_last", 0)) or int(attrs.get("ceil_mode", 0)):
            return False
        activations, weight = list(layout.activations), layout.weight
        if (
            weight is not None
            and layout.float_op == "MatMul"
            and inputs[weight[0]] not in self.weights
        ):
            activations, weight = [*activations, weight], None  # A @ B of two activations
        grids = [self.grid_of(inputs[s], inputs[z]) for _, s, z in activations]
        output = None
        if layout.output is not None and inputs[layout.output[0]]:
            output = self.grid_of(*(inputs[i] for i in layout.output))
            if output is None:
                return False
        elif layout.float_op != "Gemm":  # only QGemm may give floats
            return False
        if any(grid is None for grid in grids):
            return False
        if weight is not None and not self.weight_fits(weight, layout, inputs, attrs):
            return False
        has_bias = layout.bias is not None and bool(inputs[layout.bias])
        if has_bias and not self.bias_fits(layout, inputs):
            return False
        operands = [inputs[i] for i in layout.passed]
        operands += [
            self.float_of(inputs[v], grid)
            for (v, _, _), grid in zip(activations, grids, strict=True)
            if grid is not None
        ]
        if weight is not None:
            operands.append(self.dequantized_weight(weight, layout, inputs, attrs))
        if has_bias:
            operands.append(self.dequantized_bias(layout, inputs, attrs))
        name = node.name or node.output[0]
        result = node.output[0] if output is None else self.fresh(node.output[0] + "/float")
        self.nodes.extend(self.float_op(layout, attrs, operands, result, name))
        if output is not None:
            self.nodes.append(
                helper.make_node(
                    "QuantizeLinear",
                    [result, output.scale, output.zero_point],
                    [node.output[0]],
                    name=f"{name}/quantize",
                )
            )
            self.grids[node.output[0]] = output
        return True

    def weight_fits(
        self,
        slots: tuple[int, int, int],
        layout: _Layout,
        inputs: list[str],
        attrs: Mapping[str, Any],
    ) -> bool:
        """An 8-bit weight initializer, its scale and zero point per tensor or per output
        channel (a 2-D one for QGemm)."""
        value, scale, zero = (inputs[i] for i in slots)
        tensor, scales = self.weights.get(value), self.weights.get(scale)
        zeros = self.weights.get(zero) if zero else None
        if tensor is None or tensor.dtype not in _EIGHT_BIT or scales is None or zeros is None:
            return False
        if scales.dtype != torch.float32 or zeros.dtype != tensor.dtype:
            return False
        if tensor.dim() < 2 or (layout.float_op != "Conv" and tensor.dim() != 2):
            return False
        channels = tensor.shape[_weight_axis(layout.float_op, attrs)]
        per_channel = scales.dim() == 1 and scales.numel() == channels
        return (scales.numel() == 1 or per_channel) and zeros.shape == scales.shape

    def dequantized_weight(
        self,
        slots: tuple[int, int, int],
        layout: _Layout,
        inputs: list[str],
        attrs: Mapping[str, Any],
    ) -> str:
        value, scale, zero = (inputs[i] for i in slots)
        name = self.fresh(f"{value}{_FLOAT_SUFFIX}")
        axis = _weight_axis(layout.float_op, attrs)
        self.nodes.append(
            helper.make_node("DequantizeLinear", [value, scale, zero], [name], name=name, axis=axis)
        )
        return name

    def bias_fits(self, layout: _Layout, inputs: list[str]) -> bool:
        """An int32 1-D bias initializer, one per output channel (the weight's scales')."""
        assert layout.bias is not None and layout.weight is not None
        bias = self.weights.get(inputs[layout.bias])
        w_scale = self.weights[inputs[layout.weight[1]]]  # weight_fits has seen it
        return (
            bias is not None
            and bias.dtype == torch.int32
            and bias.dim() == 1
            and w_scale.numel() in (1, bias.numel())
        )

    def dequantized_bias(self, layout: _Layout, inputs: list[str], attrs: Mapping[str, Any]) -> str:
        """The int32 bias's DequantizeLinear by x_scale·w_scale (QGemm's times alpha too, as
        its kernel scales the summed bias), that scale a new initializer."""
        assert layout.bias is not None and layout.weight is not None
        bias = inputs[layout.bias]
        x_scale = self.weights[inputs[layout.activations[0][1]]]
        w_scale = self.weights[inputs[layout.weight[1]]]
        # in float32, as the kernels compute the accumulator's scale
        scale = x_scale.reshape(()).to(torch.float32) * w_scale.reshape(-1).to(torch.float32)
        if layout.float_op == "Gemm":
            alpha = float(attrs.get("alpha", 1.0))
            scale = torch.tensor(alpha, dtype=torch.float32) * scale
        scale_name = self.fresh(f"{bias}_scale")
        self.weights[scale_name] = scale.reshape(()) if scale.numel() == 1 else scale.contiguous()
        self.added.append(scale_name)
        name = self.fresh(f"{bias}{_FLOAT_SUFFIX}")
        self.nodes.append(
            helper.make_node("DequantizeLinear", [bias, scale_name], [name], name=name, axis=0)
        )
        return name

    def float_op(
        self,
        layout: _Layout,
        attrs: Mapping[str, Any],
        operands: list[str],
        result: str,
        name: str,
    ) -> list[NodeProto]:
        """The float op writing `result`."""
        kept = {k: v for k, v in attrs.items() if k not in _NOT_FLOAT_ATTRIBUTES}
        if layout.float_op != "Softmax" or int(attrs.get("opset", 13)) >= 13:
            # Softmax from opset 13 reads one axis, as the model's own Softmax did
            return [helper.make_node(layout.float_op, operands, [result], name=name, **kept)]
        # below opset 13 the dims from `axis` on are one row: written so in any opset
        axis = int(attrs.get("axis", 1))
        shape, rows, normalised = (self.fresh(f"{result}/{w}") for w in ("shape", "rows", "sm"))
        return [
            helper.make_node("Shape", [operands[0]], [shape], name=shape),
            helper.make_node("Flatten", [operands[0]], [rows], name=rows, axis=axis),
            helper.make_node("Softmax", [rows], [normalised], name=name, axis=-1),
            helper.make_node("Reshape", [normalised, shape], [result], name=f"{name}/reshape"),
        ]

    # ------------------------------------------------------------ the result

    def without_unread_integer_copies(self) -> list[NodeProto]:
        """The nodes, less the kept 8-bit ops that nothing reads any more (their readers all
        took the floats), repeated so that a chain of them goes."""
        nodes = list(self.nodes)
        while True:
            read = {name for node in nodes for name in node.input} | self.graph_outputs
            unread = {
                node.output[0]
                for node in nodes
                if node.output
                and node.output[0] in self.integer_copies
                and not any(out in read for out in node.output if out)
            }
            if not unread:
                return nodes
            nodes = [n for n in nodes if not (n.output and n.output[0] in unread)]

    def notes(self) -> list[str]:
        counts = ", ".join(f"{count} {op}" for op, count in sorted(self.rewritten.items()))
        total = sum(self.rewritten.values())
        notes = [
            f"{total} integer op(s) of a statically quantised model in onnxruntime's QOperator "
            f"format ({counts}) are computed as DequantizeLinear → float op → QuantizeLinear, "
            "the QDQ form of the same model: their weights are float parameters holding the "
            "dequantized values and their activations are fake-quantised, so the gradients are "
            "those of fine-tuning from this checkpoint; the outputs are onnxruntime's integer "
            "kernels' up to float rounding (a value near a rounding boundary may move by one "
            "quantisation step)"
        ]
        if self.moved:
            moved = ", ".join(f"{count} {op}" for op, count in sorted(self.moved.items()))
            notes.append(
                f"{sum(self.moved.values())} op(s) run on 8-bit values between them ({moved}) "
                "are computed on the dequantized values (the same values: they only move, pick "
                "or compare elements), so that the gradient passes them"
            )
        if self.kept:
            notes.append(
                f"{len(self.kept)} QLinear op(s) ({listed(self.kept)}) are in a form not "
                "rewritten (scales or zero points not one-element initializers, channels-last "
                "or ceil-mode pooling): they compute onnxruntime's integers and pass no gradient"
            )
        return notes


def _weight_axis(float_op: str, attrs: Mapping[str, Any]) -> int:
    """The weight's output-channel axis, along which a per-channel scale runs: a Conv's
    [M, C, ...] and a transposed Gemm's [N, K] weight axis 0, a MatMul's [K, N] axis 1."""
    if float_op == "Conv":
        return 0
    if float_op == "Gemm":
        return 0 if int(attrs.get("transB", 0)) else 1
    return 1
