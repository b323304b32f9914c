"""onnxruntime's fused quantised ops, unfolded into the patterns the converter rewrites.

A dynamically quantised model does not always hold quantize_dynamic's plain pattern
(dynamic_quantization.py). Saved after onnxruntime's graph optimisations
(`SessionOptions.optimized_model_filepath`, ORT_ENABLE_EXTENDED or above), each
DynamicQuantizeLinear → MatMulInteger → Cast → Mul(Mul(a_scale, b_scale)) (→ Add bias) is one
com.microsoft node: DynamicQuantizeMatMul(A, B, b_scale, b_zero_point, bias), or, where one
DynamicQuantizeLinear feeds several products, MatMulIntegerToFloat(A_q, B, a_scale, b_scale,
a_zero_point, b_zero_point, bias) after it. And quantize_dynamic itself writes a com.microsoft
Attention as QAttention (the quantised input and packed QKV weight) and an
EmbedLayerNormalization as QEmbedLayerNormalization (every table, gamma and beta quantised).
Their integers pass no gradient (ops/microsoft_fused_integer.py): no projection's weight,
and in BERT no embedding, could be diagnosed.

Where the weights are initializers, each node is written as the ops it stands for:

- DynamicQuantizeMatMul and MatMulIntegerToFloat as quantize_dynamic's own pattern, with a
  DynamicQuantizeLinear of A for the first (the second reads the one it follows), which
  dynamic_quantization.py then computes as fake quantisation: the same products in float, the
  weight a parameter, the activation's rounding passed straight through;
- QAttention as com.microsoft Attention (same attributes) of its dequantized weight (a
  parameter by dequantized_weights.py) and of its input dequantized from the
  DynamicQuantizeLinear it reads, in dynamic_quantization.py's straight-through form
  `x + (dequantized − x)` (its STRAIGHT_THROUGH_SUFFIX: the converter's stop-gradient, not a
  straight-through estimator of the model's);
- QEmbedLayerNormalization as EmbedLayerNormalization of its dequantized tables, gamma and
  beta (parameters).

Each computes what the fused op computes (the tests compare them with onnxruntime), and the
products quantised as the fused kernels quantise them. Only the exact forms are unfolded: B a
2-D int8/uint8 initializer with a float32 scale per tensor or per column (and a zero point of
the scale's shape), A_q and its scale and zero point the outputs of a DynamicQuantizeLinear,
QEmbedLayerNormalization's parameters per tensor. Anything else keeps its fused op, whose
forward is exact and which passes no gradient to its weights; the notes say which.

The unfolded ops are default-domain DynamicQuantizeLinear, MatMulInteger and DequantizeLinear:
quantize_dynamic writes opset 11 or later, where all three exist (the converter reads a
DequantizeLinear's `axis` at any opset).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from onnx import GraphProto, NodeProto, TensorProto, helper

from service.engine.onnx.dynamic_quantization import straight_through_dequantized
from service.engine.onnx.graph_rewrites import with_nodes

_MS = "com.microsoft"
_DEFAULT_DOMAINS = ("", "ai.onnx")
_EIGHT_BIT = (torch.int8, torch.uint8)


@dataclass
class _Names:
    """Value and node names in use, and fresh ones derived from a base."""

    taken: set[str] = field(default_factory=set)

    def fresh(self, base: str) -> str:
        name = base
        while name in self.taken:
            name += "_"
        self.taken.add(name)
        return name


@dataclass
class _Context:
    weights: Mapping[str, torch.Tensor]
    producer: dict[str, NodeProto]  # value name → the node writing it
    names: _Names

    def quantized_by(self, q: str, scale: str, zero_point: str) -> NodeProto | None:
        """The default-domain DynamicQuantizeLinear whose three outputs are these, if any."""
        node = self.producer.get(q)
        if (
            node is None
            or node.op_type != "DynamicQuantizeLinear"
            or node.domain not in _DEFAULT_DOMAINS
            or list(node.output[:3]) != [q, scale, zero_point]
        ):
            return None
        return node

    def quantized_weight(self, weight: str, scale: str, zero_point: str) -> bool:
        """A 2-D int8/uint8 initializer [K, N] with a float32 scale per tensor or per column
        and, if any, a zero point of its type and of the scale's shape: what
        dynamic_quantization.py's matcher and dequantized_weights.py both take."""
        w, s = self.weights.get(weight), self.weights.get(scale)
        if w is None or s is None or w.dtype not in _EIGHT_BIT or w.dim() != 2:
            return False
        if s.dtype != torch.float32 or s.dim() > 1 or s.numel() not in (1, w.shape[1]):
            return False
        if not zero_point:
            return True
        z = self.weights.get(zero_point)
        return z is not None and z.dtype == w.dtype and z.shape == s.shape

    def per_tensor(self, tensor: str, scale: str, zero_point: str) -> bool:
        """An int8/uint8 initializer with a float32 scalar scale and a scalar zero point of its
        type (QEmbedLayerNormalization's tables, gamma and beta)."""
        t, s, z = (self.weights.get(name) for name in (tensor, scale, zero_point))
        return (
            t is not None
            and s is not None
            and z is not None
            and t.dtype in _EIGHT_BIT
            and s.dtype == torch.float32
            and s.numel() == 1
            and z.dtype == t.dtype
            and z.numel() == 1
        )


def _inputs(node: NodeProto, count: int) -> list[str]:
    """The node's first `count` inputs, "" for the omitted ones."""
    return [*node.input, *[""] * count][:count]


def _label(node: NodeProto) -> str:
    return node.name or node.output[0]


def _integer_product(
    node: NodeProto,
    quantized: tuple[str, str, str],
    weight: tuple[str, str, str],
    bias: str,
    ctx: _Context,
) -> list[NodeProto]:
    """quantize_dynamic's MatMulInteger → Cast → Mul(Mul(a_scale, b_scale)) (→ Add bias)
    writing the node's output, the MatMulInteger named as the node."""
    (a_q, a_scale, a_zero), (b, b_scale, b_zero) = quantized, weight
    name = _label(node)
    product, as_float, scale = (
        ctx.names.fresh(f"{name}/{w}") for w in ("product", "float", "scale")
    )
    rescaled = ctx.names.fresh(f"{name}/unbiased") if bias else node.output[0]
    nodes = [
        helper.make_node(
            "MatMulInteger",
            [a_q, b, a_zero, *([b_zero] if b_zero else [])],
            [product],
            name=name,  # the fused node's (gone): dynamic_quantization.py names its parts so
        ),
        helper.make_node("Cast", [product], [as_float], name=as_float, to=TensorProto.FLOAT),
        helper.make_node("Mul", [a_scale, b_scale], [scale], name=scale),
        helper.make_node(
            "Mul", [as_float, scale], [rescaled], name=ctx.names.fresh(f"{name}/rescale")
        ),
    ]
    if bias:
        nodes.append(
            helper.make_node(
                "Add", [rescaled, bias], [node.output[0]], name=ctx.names.fresh(f"{name}/bias")
            )
        )
    return nodes


def _dynamic_quantize_matmul(node: NodeProto, ctx: _Context) -> list[NodeProto] | None:
    a, b, b_scale, b_zero, bias = _inputs(node, 5)
    if not ctx.quantized_weight(b, b_scale, b_zero):
        return None
    name = _label(node)
    quantized = tuple(
        ctx.names.fresh(f"{name}/A_{w}") for w in ("quantized", "scale", "zero_point")
    )
    quantize = helper.make_node(
        "DynamicQuantizeLinear", [a], list(quantized), name=ctx.names.fresh(f"{name}/quantize_A")
    )
    a_q, a_scale, a_zero = quantized
    return [
        quantize,
        *_integer_product(node, (a_q, a_scale, a_zero), (b, b_scale, b_zero), bias, ctx),
    ]


def _matmul_integer_to_float(node: NodeProto, ctx: _Context) -> list[NodeProto] | None:
    a_q, b, a_scale, b_scale, a_zero, b_zero, bias = _inputs(node, 7)
    if ctx.quantized_by(a_q, a_scale, a_zero) is None or not ctx.quantized_weight(
        b, b_scale, b_zero
    ):
        return None
    return _integer_product(node, (a_q, a_scale, a_zero), (b, b_scale, b_zero), bias, ctx)


def _q_attention(node: NodeProto, ctx: _Context) -> list[NodeProto] | None:
    x_q, w, bias, x_scale, w_scale, mask, x_zero, w_zero, past = _inputs(node, 9)
    quantize = ctx.quantized_by(x_q, x_scale, x_zero)
    if quantize is None or not ctx.quantized_weight(w, w_scale, w_zero):
        return None
    x, name = quantize.input[0], _label(node)
    x_nodes, x_st = straight_through_dequantized(x, [x_q, x_scale, x_zero], name)
    w_dq = ctx.names.fresh(f"{name}/w")
    attention_inputs = [x_st, w_dq, bias, mask, past]
    while not attention_inputs[-1]:
        attention_inputs.pop()
    w_inputs = [w, w_scale, *([w_zero] if w_zero else [])]
    return [
        *x_nodes,
        # per column of the [hidden, 3·hidden] weight: axis 1 (a scalar scale ignores it)
        helper.make_node("DequantizeLinear", w_inputs, [w_dq], name=w_dq, axis=1),
        helper.make_node(
            "Attention",
            attention_inputs,
            list(node.output),
            name=name,
            domain=_MS,
            **{a.name: helper.get_attribute_value(a) for a in node.attribute},
        ),
    ]


# QEmbedLayerNormalization's quantised inputs: (role, tensor, scale, zero point) slots
_EMBEDDING_PARTS = (
    ("word", 2, 8, 13),
    ("position", 3, 9, 14),
    ("segment", 4, 10, 15),
    ("gamma", 5, 11, 16),
    ("beta", 6, 12, 17),
)


def _q_embed_layer_normalization(node: NodeProto, ctx: _Context) -> list[NodeProto] | None:
    inputs = _inputs(node, 18)
    given = [part for part in _EMBEDDING_PARTS if inputs[part[1]]]
    if not all(ctx.per_tensor(*(inputs[slot] for slot in part[1:])) for part in given):
        return None
    name = _label(node)
    embed_inputs = inputs[:8]
    nodes = []
    for role, *slots in given:
        dequantized = ctx.names.fresh(f"{name}/{role}")
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [inputs[slot] for slot in slots],
                [dequantized],
                name=dequantized,
            )
        )
        embed_inputs[slots[0]] = dequantized
    while not embed_inputs[-1]:
        embed_inputs.pop()
    nodes.append(
        helper.make_node(
            "EmbedLayerNormalization",
            embed_inputs,
            list(node.output),
            name=name,
            domain=_MS,
            **{a.name: helper.get_attribute_value(a) for a in node.attribute},
        )
    )
    return nodes


_UNFOLD: dict[str, Callable[[NodeProto, _Context], list[NodeProto] | None]] = {
    "DynamicQuantizeMatMul": _dynamic_quantize_matmul,
    "MatMulIntegerToFloat": _matmul_integer_to_float,
    "QAttention": _q_attention,
    "QEmbedLayerNormalization": _q_embed_layer_normalization,
}
# the inputs that are the weights made parameters, per op
_WEIGHT_SLOTS = {
    "DynamicQuantizeMatMul": (1,),
    "MatMulIntegerToFloat": (1,),
    "QAttention": (1,),
    "QEmbedLayerNormalization": (2, 3, 4, 5, 6),
}


def unfolded_quantized_ops(
    graph: GraphProto, weights: dict[str, torch.Tensor]
) -> tuple[GraphProto, list[str]]:
    """`graph`, or a copy whose fused quantised ops are unfolded; with the report notes saying
    what was unfolded."""
    fused = [n for n in graph.node if n.domain == _MS and n.op_type in _UNFOLD]
    if not fused:
        return graph, []
    names = _Names({name for node in graph.node for name in (node.name, *node.output)})
    names.taken |= {i.name for i in graph.input} | {i.name for i in graph.initializer}
    ctx = _Context(weights, {o: node for node in graph.node for o in node.output}, names)
    replacements: dict[str, list[NodeProto]] = {}  # by the fused node's first output
    for node in fused:
        unfolded = _UNFOLD[node.op_type](node, ctx)
        if unfolded is not None:
            replacements[node.output[0]] = unfolded
    kept = [n for n in fused if n.output[0] not in replacements]
    notes = [_kept_note(kept)] if kept else []
    if not replacements:
        return graph, notes
    rewritten = with_nodes(
        graph,
        [n for node in graph.node for n in replacements.get(_first_output(node), [node])],
        [],
        weights,
    )
    unfolded_nodes = [n for n in fused if n.output[0] in replacements]
    return rewritten, [_unfolded_note(unfolded_nodes), *notes]


def _first_output(node: NodeProto) -> str:
    return node.output[0] if node.output else ""


def _counted(nodes: list[NodeProto]) -> str:
    return ", ".join(f"{count} {op}" for op, count in Counter(n.op_type for n in nodes).items())


def _unfolded_note(nodes: list[NodeProto]) -> str:
    weights = {
        n.input[slot]
        for n in nodes
        for slot in _WEIGHT_SLOTS[n.op_type]
        if slot < len(n.input) and n.input[slot]
    }
    return (
        f"{len(nodes)} fused quantised op(s) of onnxruntime ({_counted(nodes)}) are unfolded "
        "into the ops they fuse, their integer products computed as fake quantisation: their "
        f"{len(weights)} integer weight(s) are float parameters holding their dequantized "
        "values, with the gradients of fine-tuning from this checkpoint"
    )


def _kept_note(nodes: list[NodeProto]) -> str:
    shown = ", ".join(_label(n) for n in nodes[:3]) + (", ..." if len(nodes) > 3 else "")
    return (
        f"{len(nodes)} fused quantised op(s) of onnxruntime ({_counted(nodes)}: {shown}) keep "
        "their integer computation (a weight given at run time, or a form the converter does "
        "not unfold): their forward is onnxruntime's, but no gradient reaches their weights"
    )
