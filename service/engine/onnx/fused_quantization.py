"""onnxruntime's fused quantised ops, unfolded into the patterns the converter rewrites.

(Stub: filled in by the fused-ops work; returns the graph unchanged.)
"""

from __future__ import annotations

import torch
from onnx import GraphProto


def unfolded_quantized_ops(
    graph: GraphProto, weights: dict[str, torch.Tensor]
) -> tuple[GraphProto, list[str]]:
    """`graph`, or a copy whose fused quantised ops are unfolded; with the report notes saying
    what was unfolded."""
    return graph, []
