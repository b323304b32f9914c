"""A dynamically quantised model's integer products, written again as fake quantisation.

onnxruntime's `quantize_dynamic` stores each MatMul's and Conv's weight as an int8/uint8
initializer and computes, per product:

    x_q, x_scale, x_zero = DynamicQuantizeLinear(x)
    scale = Mul(x_scale, w_scale)
    y = Mul(Cast(MatMulInteger(x_q, W_q, x_zero, w_zero), float), scale)   (or ConvInteger)

No gradient passes the integers: no layer's weight could be diagnosed, only the float biases
after the last product (and a weight's scale, which no one trains, looked like a parameter).
The same value is `DequantizeLinear(x_q, x_scale, x_zero) @ DequantizeLinear(W_q, w_scale,
w_zero)` (or their Conv), which is how the pattern is converted: the weight's DequantizeLinear
then makes it a float parameter holding its dequantized values (dequantized_weights.py), and
the activation's quantisation passes the gradient straight through to x (written as
`x + (dequantized − x)`, which straight_through.py gives its stop-gradient), as quantisation-
aware training from this checkpoint would. The products are then float products of the same
values: equal to onnxruntime's integer ones within float32 rounding (the conformance check
compares them).

Its embeddings it gathers as integers and dequantizes after (`Gather(W_q, ids)` → [data
moves] → DequantizeLinear per tensor): the table is dequantized before the Gather instead (the
same values: a per-tensor affine map commutes with moving elements), so that it too is a
float parameter.

Only the exact patterns are rewritten (a MatMul's 2-D weight initializer quantised per tensor or
per column, a Conv's per tensor, as onnxruntime writes them; every intermediate read by the
next step alone); anything else keeps the integer ops, whose forward is exact and which pass
no gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from onnx import GraphProto, NodeProto, TensorProto, helper

_DEFAULT_DOMAINS = ("", "ai.onnx")
# the float op whose operands are the integer op's dequantized (ConvInteger pads x with its
# zero point: a dequantized 0, what Conv pads with)
_FLOAT_OP = {"MatMulInteger": "MatMul", "ConvInteger": "Conv"}
# ops that only move elements (their data at input 0): a per-tensor dequantization commutes
_DATA_MOVES = frozenset(
    {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Gather"}
    | {"Expand"}
)
# the name of each activation's `x + (dequantized − x)` node: a straight-through estimator of
# this rewrite's, not one that an export wrote without its stop-gradient
STRAIGHT_THROUGH_SUFFIX = "/x_straight_through"


@dataclass
class _Pattern:
    quantize: NodeProto  # DynamicQuantizeLinear(x)
    scales: NodeProto  # Mul(x_scale, w_scale)
    product: NodeProto  # MatMulInteger or ConvInteger(x_q, W_q, x_zero, w_zero)
    cast: NodeProto  # Cast(product, to=float)
    rescale: NodeProto  # Mul(cast, scales)
    w_scale: str


@dataclass
class _GatheredTable:
    """An integer table gathered, moved about, then dequantized per tensor (quantize_dynamic's
    embeddings: Gather(W_q, ids) → [Transpose] → DequantizeLinear)."""

    gather: NodeProto  # reads the integer initializer at input 0
    dequantize: NodeProto  # DequantizeLinear of what the gather (and data moves) gave


def dynamic_quantization_as_fake(
    graph: GraphProto, weights: Mapping[str, torch.Tensor]
) -> tuple[GraphProto, list[str], list[str]]:
    """`graph`, or a copy whose dynamically quantised MatMuls and Convs are fake-quantised
    float ones and whose gathered integer tables are dequantized before the Gather; with the
    rewritten products' and tables' integer initializer names."""
    patterns = _patterns(graph, weights)
    tables = _gathered_tables(graph, weights)
    if not patterns and not tables:
        return graph, [], []
    rewritten = GraphProto()
    rewritten.CopyFrom(graph)  # the initializers' bytes are released by now: a small copy
    # nodes known by their first output (the graph is SSA; a protobuf message's Python object
    # is not the same from one iteration to the next)
    dropped = {node.output[0] for p in patterns for node in (p.product, p.cast, p.scales)}
    replacement = {p.rescale.output[0]: _fake_quantized(p) for p in patterns}
    for table in tables:
        replacement |= _dequantized_first(table)
    nodes: list[NodeProto] = []
    for node in graph.node:
        first = node.output[0] if node.output else ""
        if first in replacement:
            nodes.extend(replacement[first])
        elif first not in dropped:
            nodes.append(node)
    del rewritten.node[:]
    rewritten.node.extend(nodes)
    return rewritten, [p.product.input[1] for p in patterns], [t.gather.input[0] for t in tables]


def _gathered_tables(
    graph: GraphProto, weights: Mapping[str, torch.Tensor]
) -> list[_GatheredTable]:
    """Integer tables read by one Gather alone whose rows reach a per-tensor DequantizeLinear
    through data moves alone, each value read once: dequantizing the table first gives the
    same values (a per-tensor affine map commutes with moving elements)."""
    readers = _readers(graph)
    found = []
    for gather in graph.node:
        table = gather.input[0] if gather.input else ""
        if (
            gather.op_type != "Gather"
            or gather.domain not in _DEFAULT_DOMAINS
            or table not in weights
            or weights[table].is_floating_point()
            or len(readers[table]) != 1
        ):
            continue
        dequantize = _dequantized_after_moves(gather.output[0], readers)
        if dequantize is not None and all(
            name in weights and weights[name].numel() == 1 for name in dequantize.input[1:] if name
        ):
            found.append(_GatheredTable(gather, dequantize))
    return found


def _dequantized_after_moves(
    value: str, readers: Mapping[str, list[NodeProto]]
) -> NodeProto | None:
    """The DequantizeLinear that `value` reaches through data moves, each value read once."""
    while len(readers.get(value, [])) == 1:
        node = readers[value][0]  # (a graph output's stand-in reads nothing: not a move)
        if node.domain not in _DEFAULT_DOMAINS or not node.input or node.input[0] != value:
            return None
        if node.op_type == "DequantizeLinear":
            return node
        if node.op_type not in _DATA_MOVES:
            return None
        value = node.output[0]
    return None


def _dequantized_first(table: _GatheredTable) -> dict[str, list[NodeProto]]:
    """The replacements (by first output) that dequantize the table before its Gather and make
    the late DequantizeLinear an Identity."""
    integer, dequantize = table.gather.input[0], table.dequantize
    dequantized = f"{integer}/dequantized"
    gather = NodeProto()
    gather.CopyFrom(table.gather)
    gather.input[0] = dequantized
    name = dequantize.name or dequantize.output[0]
    return {
        table.gather.output[0]: [
            helper.make_node(
                "DequantizeLinear",
                [integer, *dequantize.input[1:]],
                [dequantized],
                name=f"{name}/table",
            ),
            gather,
        ],
        dequantize.output[0]: [
            helper.make_node("Identity", [dequantize.input[0]], [dequantize.output[0]], name=name)
        ],
    }


def _patterns(graph: GraphProto, weights: Mapping[str, torch.Tensor]) -> list[_Pattern]:
    producer = {name: node for node in graph.node for name in node.output}
    readers = _readers(graph)

    def only_reader(name: str, op_type: str) -> NodeProto | None:
        found = readers.get(name, [])
        if len(found) == 1 and found[0].op_type == op_type and found[0].domain in _DEFAULT_DOMAINS:
            return found[0]
        return None

    patterns = []
    for product in graph.node:
        if product.op_type not in _FLOAT_OP or product.domain not in _DEFAULT_DOMAINS:
            continue
        inputs = [*product.input, "", "", ""][:4]
        quantize = producer.get(inputs[0])
        w_q = weights.get(inputs[1])
        if (
            quantize is None
            or quantize.op_type != "DynamicQuantizeLinear"
            or inputs[2] != quantize.output[2]
            or w_q is None
            or (product.op_type == "MatMulInteger" and w_q.dim() != 2)
            or (inputs[3] and inputs[3] not in weights)
        ):
            continue
        cast = only_reader(product.output[0], "Cast")
        if cast is None or _cast_target(cast) != TensorProto.FLOAT:
            continue
        rescale = only_reader(cast.output[0], "Mul")
        if rescale is None:
            continue
        scales = producer.get(next((i for i in rescale.input if i != cast.output[0]), ""))
        if scales is None or scales.op_type != "Mul" or len(readers[scales.output[0]]) != 1:
            continue
        others = [name for name in scales.input if name != quantize.output[1]]
        if len(others) != 1 or len(scales.input) != 2:
            continue
        if not _scale_fits(weights.get(others[0]), w_q, product.op_type):
            continue
        if inputs[3] and weights[inputs[3]].shape != weights[others[0]].shape:
            continue
        patterns.append(_Pattern(quantize, scales, product, cast, rescale, others[0]))
    return patterns


def _readers(graph: GraphProto) -> dict[str, list[NodeProto]]:
    """Value name → the nodes reading it; a graph output counts as one reader more (an empty
    NodeProto), so that a value the graph returns is never "read by one node alone"."""
    readers: dict[str, list[NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for name in (o.name for o in graph.output):
        readers.setdefault(name, []).append(NodeProto())
    return readers


def _cast_target(cast: NodeProto) -> int:
    return next((a.i for a in cast.attribute if a.name == "to"), 0)


def _scale_fits(scale: torch.Tensor | None, w_q: torch.Tensor, op_type: str) -> bool:
    """A float weight scale per tensor, or for a MatMul per column of its [K, N] weight (what
    multiplies the product's last axis)."""
    if scale is None or not scale.is_floating_point() or scale.dim() > 1:
        return False
    if scale.numel() == 1:
        return True
    return op_type == "MatMulInteger" and scale.numel() == w_q.shape[1]


def straight_through_dequantized(
    x: str, quantized: Sequence[str], name: str
) -> tuple[list[NodeProto], str]:
    """The nodes giving DequantizeLinear of DynamicQuantizeLinear(x)'s outputs (`quantized`:
    integers, scale, zero point) as `x + (dequantized − x)`, and that value's name: what the
    integer op computes with, with x's gradient (straight_through.py gives it its
    stop-gradient)."""
    x_q, x_scale, x_zero = quantized
    x_dq, difference = f"{name}/x_dequantized", f"{name}/x_rounding"
    x_st = name + STRAIGHT_THROUGH_SUFFIX
    return [
        helper.make_node("DequantizeLinear", [x_q, x_scale, x_zero], [x_dq], name=f"{name}/x_dq"),
        helper.make_node("Sub", [x_dq, x], [difference], name=f"{name}/x_rounding"),
        helper.make_node("Add", [x, difference], [x_st], name=x_st),
    ], x_st


def _fake_quantized(p: _Pattern) -> list[NodeProto]:
    """DequantizeLinear of both operands, the activation's straight through, one MatMul (or
    Conv, with the ConvInteger's attributes) writing what the rescaling Mul wrote."""
    w_q, w_zero = p.product.input[1], ([*p.product.input, "", ""][3])
    name = p.product.name or p.product.output[0]
    x_nodes, x_st = straight_through_dequantized(p.quantize.input[0], p.quantize.output, name)
    w_dq = f"{name}/w"
    w_inputs = [w_q, p.w_scale, *([w_zero] if w_zero else [])]
    return [
        *x_nodes,
        # per column of the [K, N] weight: axis 1 (a scalar scale ignores it)
        helper.make_node("DequantizeLinear", w_inputs, [w_dq], name=f"{name}/w_dq", axis=1),
        helper.make_node(
            _FLOAT_OP[p.product.op_type],
            [x_st, w_dq],
            [p.rescale.output[0]],
            name=name,
            **{a.name: helper.get_attribute_value(a) for a in p.product.attribute},
        ),
    ]
