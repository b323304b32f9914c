"""What the converter's graph rewrites share: a copy of the graph with nodes replaced and new
float initializers declared (their tensors live in the converter's `weights`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from onnx import GraphProto, NodeProto, TensorProto

TORCH_TO_ONNX = {
    torch.float32: TensorProto.FLOAT,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
    torch.float64: TensorProto.DOUBLE,
}


def taken_names(graph: GraphProto, weights: Mapping[str, torch.Tensor]) -> set[str]:
    """Every value name in use: a new initializer's name must be none of these."""
    taken = set(weights) | {o for node in graph.node for o in node.output}
    return taken | {i.name for i in graph.input}


def with_replacements(
    graph: GraphProto,
    replacements: Mapping[int, list[NodeProto]],
    added: list[str],
    weights: Mapping[str, torch.Tensor],
) -> GraphProto:
    """`with_nodes` where the node at each index of `replacements` is replaced by its list."""
    nodes = [n for index, node in enumerate(graph.node) for n in replacements.get(index, [node])]
    return with_nodes(graph, nodes, added, weights)


def with_nodes(
    graph: GraphProto,
    nodes: Iterable[NodeProto],
    added: list[str],
    weights: Mapping[str, torch.Tensor],
) -> GraphProto:
    """A copy of `graph` with `nodes` for its nodes and the initializers `added` to `weights`
    declared (without data: the tensors are in `weights`)."""
    rewritten = GraphProto()
    rewritten.CopyFrom(graph)  # the initializers' bytes are released by now: a small copy
    del rewritten.node[:]
    rewritten.node.extend(nodes)
    for name in added:
        declared = rewritten.initializer.add()
        declared.name, declared.data_type = name, TORCH_TO_ONNX[weights[name].dtype]
        declared.dims.extend(weights[name].shape)
    return rewritten
