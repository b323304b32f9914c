"""A statically quantised model in onnxruntime's QOperator format, written again as QDQ.

(Stub: filled in by the QOperator work; returns the graph unchanged.)
"""

from __future__ import annotations

import torch
from onnx import GraphProto


def qoperator_as_qdq(
    graph: GraphProto, weights: dict[str, torch.Tensor]
) -> tuple[GraphProto, list[str]]:
    """`graph`, or a copy whose QLinear* nodes are DequantizeLinear → float op → QuantizeLinear;
    with the report notes saying what was rewritten."""
    return graph, []
