"""Weights stored as integers become float parameters again (post-training-quantised models).

A QDQ model quantised after training (onnxruntime's `quantize_static`, TensorRT's and ModelOpt's
PTQ) stores each weight as an int8 initializer and computes `DequantizeLinear(W, scale,
zero_point)` before using it; its biases as int32 the same way. Nothing in it is a float
weight, so there would be no gradient to diagnose at all. The dequantized values are the
weights the model computes with: as float parameters they get the gradients of fine-tuning
from this checkpoint (quantisation-aware training from it would also re-quantise them after
each step, which one pass does not reach), and the activation quantisers keep their fake
quantisation, whose clipping the report measures (service/engine/quantizers.py).

A weight is taken when every reader of its integer initializer is a DequantizeLinear (input 0)
with the same scale and zero point held as initializers. The float parameter is named as the
source's weight where the quantiser's naming says it (`0.weight_quantized` → `0.weight`). The
integer initializer stays as it is (a quarter of the float's size), for onnxruntime's copy of
the model in the conformance check.

Weights of the narrow types (int4, int2, FLOAT4E2M1: held by value, ops/_util.py) are taken the
same way, with float scales or FLOAT8E8M0 ones (an MXFP4 weight's power-of-two block scales). A
scale the graph computes (NVFP4's: a DequantizeLinear of float8 block scales) is no initializer:
such a weight stays as stored, a buffer without gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from onnx import GraphProto, NodeProto

from service.engine.onnx.ops._util import FLOAT_DTYPES, TORCH_TO_ONNX
from service.engine.onnx.ops.quantize import DequantizeLinear, dequantized_dtype
from service.engine.onnx.registry import UnsupportedAttribute

# onnxruntime's quantiser writes com.microsoft's Q/DQ (`UseQDQContribOps`, or for int16/int4
# below opset 21): the same DequantizeLinear (ops/microsoft_quantize.py)
_DEQUANTIZE_DOMAINS = ("", "ai.onnx", "com.microsoft")
# onnxruntime's quantiser names a weight's integer copy `<weight>_quantized`
_QUANTIZED_SUFFIX = "_quantized"
_SCALE_DTYPES = FLOAT_DTYPES | {torch.float8_e8m0fnu}
_ATTRS = ("axis", "block_size", "output_dtype")


@dataclass
class DequantizedWeight:
    name: str  # the float parameter
    integer: str  # the integer initializer it is the dequantized value of
    value: torch.Tensor
    # the output names of the DequantizeLinear nodes it replaces (one that is `name` itself:
    # the parameter takes that node's place)
    readers: list[str]


def dequantized_weights(
    graph: GraphProto, weights: Mapping[str, torch.Tensor], taken: set[str]
) -> dict[str, DequantizedWeight]:
    """Integer initializer → its dequantized weight. `taken`: every value name in use."""
    readers: dict[str, list[tuple[NodeProto, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, slot))
    found: dict[str, DequantizedWeight] = {}
    for name, reads in readers.items():
        tensor = weights.get(name)
        if tensor is None or tensor.dtype in FLOAT_DTYPES:
            continue
        nodes = [node for node, _ in reads]
        if (
            not all(
                node.op_type == "DequantizeLinear"
                and node.domain in _DEQUANTIZE_DOMAINS
                and slot == 0
                for node, slot in reads
            )
            or len({tuple(node.input[1:]) for node in nodes}) != 1
        ):
            continue
        value = _dequantized(nodes[0], tensor, weights)
        if value is None:
            continue
        outputs = [node.output[0] for node in nodes]
        found[name] = DequantizedWeight(_float_name(name, taken, outputs), name, value, outputs)
        taken.add(found[name].name)
    return found


def _dequantized(
    node: NodeProto, tensor: torch.Tensor, weights: Mapping[str, torch.Tensor]
) -> torch.Tensor | None:
    scale = weights.get(node.input[1])
    zero_name = node.input[2] if len(node.input) > 2 else ""
    zero_point = weights.get(zero_name) if zero_name else None
    if scale is None or scale.dtype not in _SCALE_DTYPES or (zero_name and zero_point is None):
        return None
    attrs = {a.name: a.i for a in node.attribute if a.name in _ATTRS}
    scale_type = TORCH_TO_ONNX[scale.dtype]
    try:
        output = dequantized_dtype(attrs.get("output_dtype", 0), scale_type)
    except UnsupportedAttribute:  # refused with the node, by its builder
        return None
    dequantize = DequantizeLinear(attrs.get("axis", 1), attrs.get("block_size", 0), output=output)
    with torch.no_grad():
        return dequantize(tensor, scale, zero_point).contiguous()


def _float_name(integer: str, taken: set[str], outputs: list[str]) -> str:
    """The source's name (`0.weight_quantized` → `0.weight`), also when it names the one
    DequantizeLinear's output (onnxruntime names a bias's so: the parameter takes its place);
    else the integer's name with `_dequantized`."""
    name = integer.removesuffix(_QUANTIZED_SUFFIX)
    if name != integer and (name not in taken or outputs == [name]):
        return name
    name = f"{integer}_dequantized"
    while name in taken:
        name += "_"
    return name
