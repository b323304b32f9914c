"""A dynamically quantised LSTM (com.microsoft DynamicQuantizeLSTM) as a fake-quantised one.

onnxruntime's `quantize_dynamic` writes every LSTM whose W and R are initializers as
DynamicQuantizeLSTM: W [D, input, 4·H] and R [D, H, 4·H] as int8/uint8 (transposed against
the LSTM's [D, 4·H, ·]), with a scale and zero point per direction or per direction and gate
column. Its CPU kernel (onnxruntime's uni_directional_lstm.cc with rnn_helpers' quantised
ComputeGemm) multiplies integers twice per direction:

- X·Wᵀ once for all steps: X quantised to uint8 by DynamicQuantizeLinear's rule over the
  whole input (a reverse direction reads it reversed: the same range);
- h_{t-1}·Rᵀ at every step: h_{t-1} quantised the same way over the batch (h_0 too),

each int32 product scaled by both scales, then the gates in float as an LSTM's.

As an op it passes no gradient to the integer weights, and none through the roundings. It is
converted as the fake quantisation of the same computation: a default-domain LSTM whose W and
R are float initializers holding the dequantized weights (parameters, under the integer
initializer's name without onnxruntime's `_quantized` suffix), whose X is DynamicQuantizeLinear
→ DequantizeLinear of the input with its gradient passed straight through, and which carries
QUANTIZED_STATE so that its recurrent product reads h_{t-1} fake-quantised the same way
(ops/recurrent.py). The products are float products of the same values: onnxruntime's within
float32 rounding, except where such a difference moves a value across a rounding boundary of
a later quantisation (one step of that quantiser).

onnxruntime splits the batch into one block per thread where the batch has more than 4 rows
(or 2+ rows and H ≤ 256) and quantises each block's h_{t-1} on its own: its result depends on
its thread count. The conformance check runs such a model on one thread (conformance.py),
where the whole batch is one block, as converted here.

Only nodes without `sequence_lens` are rewritten (the kernel then quantises only the first
max(sequence_lens) steps of X), with every weight, scale and zero point stored; any other
DynamicQuantizeLSTM is left as it is, which the converter refuses as an unsupported op.
"""

from __future__ import annotations

from typing import Any

import torch
from onnx import GraphProto, NodeProto, helper

from service.engine.onnx.dynamic_quantization import straight_through_dequantized
from service.engine.onnx.graph_rewrites import taken_names, with_replacements
from service.engine.onnx.ops.recurrent import QUANTIZED_STATE

_MS = "com.microsoft"
_SUFFIX = "_quantized"  # onnxruntime's quantiser's name for an integer copy of a weight
# DynamicQuantizeLSTM's inputs: the LSTM's eight, then W's and R's scale and zero point
_X, _W, _R, _B, _SEQUENCE_LENS, _H0, _C0, _P, _W_SCALE, _W_ZERO, _R_SCALE, _R_ZERO = range(12)


def quantized_lstms_as_fake(
    graph: GraphProto, weights: dict[str, torch.Tensor]
) -> tuple[GraphProto, list[str]]:
    """`graph`, or a copy whose DynamicQuantizeLSTM nodes are fake-quantised LSTMs; the
    dequantized W and R are added to `weights`, their names returned."""
    taken = taken_names(graph, weights)
    replacements: dict[int, list[NodeProto]] = {}  # by the node's index
    added: list[str] = []
    for index, node in enumerate(graph.node):
        if node.op_type != "DynamicQuantizeLSTM" or node.domain != _MS:
            continue
        inputs = [*node.input, *[""] * 12][:12]
        w = _dequantized(weights, inputs[_W], inputs[_W_SCALE], inputs[_W_ZERO])
        r = _dequantized(weights, inputs[_R], inputs[_R_SCALE], inputs[_R_ZERO])
        if w is None or r is None or inputs[_SEQUENCE_LENS]:
            continue
        names = []
        for integer, value in ((inputs[_W], w), (inputs[_R], r)):
            name = _float_name(integer, taken)
            taken.add(name)
            weights[name] = value
            names.append(name)
        added += names
        replacements[index] = _fake_quantized_lstm(node, inputs, *names)
    if not replacements:
        return graph, []
    return with_replacements(graph, replacements, added, weights), added


def _dequantized(
    weights: dict[str, torch.Tensor], integer: str, scale: str, zero_point: str
) -> torch.Tensor | None:
    """An integer [D, K, 4·H] weight as the float [D, 4·H, K] one an LSTM reads; None where
    something is not stored or not of a shape the kernel takes."""
    values, scales = weights.get(integer), weights.get(scale)
    zeros = weights.get(zero_point) if zero_point else None
    if values is None or scales is None or (zero_point and zeros is None):
        return None
    if values.dtype not in (torch.int8, torch.uint8) or values.dim() != 3:
        return None
    if not scales.is_floating_point():
        return None
    directions, columns = values.shape[0], values.shape[2]
    # per direction [D], or per direction and column [D, 4·H]
    if scales.numel() not in (directions, directions * columns):
        return None
    if zeros is not None and zeros.numel() != scales.numel():
        return None

    def broadcast(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32).reshape(directions, 1, -1)

    shifted = values.to(torch.float32) - (0.0 if zeros is None else broadcast(zeros))
    return (shifted * broadcast(scales)).transpose(1, 2).contiguous()


def _float_name(integer: str, taken: set[str]) -> str:
    name = integer.removesuffix(_SUFFIX)
    if name == integer or name in taken:
        name = f"{integer}_dequantized"
    while name in taken:
        name += "_"
    return name


def _fake_quantized_lstm(node: NodeProto, inputs: list[str], w: str, r: str) -> list[NodeProto]:
    """DynamicQuantizeLinear of X passed straight through, then the LSTM (the node's
    attributes, QUANTIZED_STATE set) writing the node's outputs."""
    name = node.name or node.output[0]
    x = inputs[_X]
    quantized = [f"{name}/x_{what}" for what in ("quantized", "scale", "zero_point")]
    x_nodes, x_st = straight_through_dequantized(x, quantized, name)
    lstm_inputs = [x_st, w, r, *inputs[_B:_W_SCALE]]
    while lstm_inputs and not lstm_inputs[-1]:
        lstm_inputs.pop()
    attributes: dict[str, Any] = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attributes[QUANTIZED_STATE] = 1
    return [
        helper.make_node("DynamicQuantizeLinear", [x], quantized, name=f"{name}/x_quantize"),
        *x_nodes,
        helper.make_node("LSTM", lstm_inputs, list(node.output), name=name, **attributes),
    ]
