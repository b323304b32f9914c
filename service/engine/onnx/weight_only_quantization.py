"""A weight-only quantised model's packed weights (com.microsoft MatMulNBits) as float
parameters.

onnxruntime-genai's and Olive's LLM exports store each projection's weight as 2/4/8-bit
integers packed in blocks (`MatMulNBits`, ops/microsoft_quantize.py), with float scales and
packed zero points. As an op its weight is dequantized on every call and gets no gradient: a
language model's report then has only its norms (and embeddings) as parameters. Where B, the
scales, the zero points and g_idx are all initializers, the node is converted as
`MatMul(A, W) (+ bias)` instead, W the dequantized weight as a float [K, N] initializer under
the source's name (`….weight_Q4` → `….weight`), which becomes a parameter like any other: the
gradients of fine-tuning from this checkpoint, as dequantized_weights.py gives a QDQ model's
weights. W holds (8 / bits)·4 bytes per packed byte in float32; the packed initializer stays
as it is for onnxruntime's copy in the conformance check, which compares the two.
"""

from __future__ import annotations

import re

import torch
from onnx import GraphProto, NodeProto, helper

from service.engine.onnx.graph_rewrites import taken_names, with_replacements
from service.engine.onnx.ops._util import FLOAT_DTYPES
from service.engine.onnx.ops.microsoft_quantize import NBitsShape, dequantized_nbits

_MS = "com.microsoft"
# onnxruntime's quantiser names B `<weight>_Q<bits>` (newer: `_Q<bits>G<block_size>`)
_PACKED_SUFFIX = re.compile(r"_Q\d+(G\d+)?$")


def nbits_weights_as_float(
    graph: GraphProto, weights: dict[str, torch.Tensor]
) -> tuple[GraphProto, list[str]]:
    """`graph`, or a copy whose MatMulNBits nodes with stored weights are float MatMuls; the
    dequantized weights are added to `weights`, their names returned."""
    taken = taken_names(graph, weights)
    replacements: dict[int, list[NodeProto]] = {}  # by the node's index
    added: list[str] = []
    for index, node in enumerate(graph.node):
        if node.op_type != "MatMulNBits" or node.domain != _MS:
            continue
        dequantized = _dequantized(node, weights)
        if dequantized is None:
            continue
        name = _float_name(node.input[1], taken)
        taken.add(name)
        weights[name] = dequantized.t().contiguous()  # [K, N], as MatMul reads it
        added.append(name)
        replacements[index] = _as_matmul(node, name)
    if not replacements:
        return graph, []
    return with_replacements(graph, replacements, added, weights), added


def _dequantized(node: NodeProto, weights: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The node's B as a float [N, K] weight, where everything it needs is stored and valid;
    else None (the op computes it, or refuses it with its own message)."""
    inputs = [*node.input, "", "", "", ""][:5]
    b, scales = weights.get(inputs[1]), weights.get(inputs[2])
    stored = [weights.get(name) for name in inputs[3:5]]
    if b is None or scales is None or scales.dtype not in FLOAT_DTYPES or b.numel() == 0:
        return None
    if any(name and value is None for name, value in zip(inputs[3:5], stored, strict=True)):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if "K" not in attrs or "N" not in attrs or "block_size" not in attrs:
        return None
    if attrs.get("weight_prepacked", 0) or attrs.get("bits", 4) not in (2, 4, 8):
        return None
    zero_points, g_idx = stored
    shape = NBitsShape.of(attrs)
    packed_zero_points = zero_points is not None and zero_points.dtype == torch.uint8
    if g_idx is not None and (shape.bits != 4 or packed_zero_points):
        return None  # what the op refuses, as onnxruntime computes something else there
    # half types dequantize in float32, rounded once to the model's type (as the op does)
    try:
        value = dequantized_nbits(shape, b, scales, zero_points, g_idx, torch.float32)
    except ValueError:
        return None  # a B of another shape than K, N say: the op's run-time error
    return value.to(scales.dtype)


def _float_name(packed: str, taken: set[str]) -> str:
    name = _PACKED_SUFFIX.sub("", packed)
    if name == packed or name in taken:
        name = f"{packed}_dequantized"
    while name in taken:
        name += "_"
    return name


def _as_matmul(node: NodeProto, weight: str) -> list[NodeProto]:
    """MatMul(A, W), and the bias added where the node has one, writing the node's output."""
    bias = node.input[5] if len(node.input) > 5 else ""
    name = node.name or node.output[0]
    if not bias:
        return [helper.make_node("MatMul", [node.input[0], weight], [node.output[0]], name=name)]
    product = f"{name}/product"
    return [
        helper.make_node("MatMul", [node.input[0], weight], [product], name=name),
        helper.make_node("Add", [product, bias], [node.output[0]], name=f"{name}/bias"),
    ]
