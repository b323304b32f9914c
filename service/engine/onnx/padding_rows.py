"""An nn.Embedding's padding_idx in a legacy export, read off its weight.

The legacy exporter (`torch.onnx.export(..., dynamo=False)`) writes `nn.Embedding(padding_idx=k)`
as a plain Gather and drops `padding_idx` (it warns that the padding row will be updated), so
the converted lookup gives row k a gradient torch never gives it. The weight still says which
row it is: nn.Embedding zeroes its padding row at construction and, with no gradient, it stays
exactly zero through training; a row of a trained or freshly initialised embedding is otherwise
never exactly zero. So an embedding weight (a float parameter of rank 2 read by a Gather on
axis 0) with exactly one all-zero row is taken as having that padding_idx, and a note says so.
The dynamo exporter records padding_idx itself (ops/indexing.py embedding_gradient).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from onnx import GraphProto

from service.engine.onnx.source_parameters import fx_node_text


def padding_rows(
    graph: GraphProto, weights: Mapping[str, torch.Tensor]
) -> tuple[dict[str, int], list[str]]:
    """(the first output of each legacy-exported embedding Gather whose weight has exactly one
    all-zero row → that row, for the Gather's builder: ops/indexing.py PADDING_ROWS; the notes
    for the report)."""
    rows: dict[str, int] = {}
    weights_marked: dict[str, int] = {}
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or fx_node_text(node) is not None:
            continue
        if any(a.name == "axis" and a.i != 0 for a in node.attribute):
            continue
        row = _only_zero_row(weights.get(node.input[0]))
        if row is not None and node.output:
            rows[node.output[0]] = weights_marked[node.input[0]] = row
    notes = [
        f"{weight}'s row {row} is all zeros, as nn.Embedding(padding_idx={row}) keeps its "
        "padding row, which the legacy ONNX exporter does not record: taken as its "
        "padding_idx (that row gets no gradient, as in torch)"
        for weight, row in weights_marked.items()
    ]
    return rows, notes


def _only_zero_row(weight: torch.Tensor | None) -> int | None:
    if weight is None or weight.dim() != 2 or not weight.is_floating_point():
        return None
    if weight.shape[0] < 2 or weight.shape[1] == 0:
        return None
    zero_rows = torch.nonzero((weight == 0).all(dim=1)).flatten().tolist()
    return int(zero_rows[0]) if len(zero_rows) == 1 else None
