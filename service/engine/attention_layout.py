"""Whether a self-attention reads a rank-3 input [T, B, F] sequence-first (sequences.py).

`nn.MultiheadAttention` and `nn.TransformerEncoderLayer` with their default
`batch_first=False` attend per batch element over axis 0: whatever the export writes in
between (a `.pt2`'s aten graph, ONNX from the legacy or the dynamo exporter), the attention
scores are [batch-like..., L, L] with L the input's axis 0 and the batch-like leading dims
(batch × heads) a multiple of its axis 1; batch-first, L is axis 1 and the leading dims a
multiple of axis 0. The shape is read where the scores are formed:

- FX graphs: `aten.scaled_dot_product_attention` (query [..., L, E], key [..., S, E]) and
  `aten.softmax` over the last dim, from the nodes' `meta["val"]` (a dynamic export's
  symbolic sizes evaluated at the batch's input sizes);
- ONNX graphs: `Softmax` over the last axis, its input's dims from ONNX shape inference of
  the graph's nodes with the batch's input shapes (the dims are in no node otherwise).

Only self-attention counts (L == S: a classifier's softmax over [T, B, C] has no square
scores unless C happens to be B, and then it reads batch-first, which leaves the fallback
alone), only sites the input reaches (sites whose shapes cannot be read are not counted), and
only when at least one reads sequence-first and none batch-first: otherwise the input is left
to the batch-first fallback and its note.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from service.engine.graph import ObservableGraph
from service.engine.layers import _attr, canonical

_FX_ATTENTION = frozenset({"scaleddotproductattention"})
_FX_SOFTMAX = frozenset({"softmax", "safesoftmax"})

Scores = tuple[int, int, int]  # (product of the batch-like leading dims, L, S)


def _reached(graph: ObservableGraph, name: str) -> set[str]:
    """The values computed from `name` (any op)."""
    reached = {name}
    for node in graph.nodes:  # topological order
        if any(v in reached for v in node.inputs if v):
            reached.update(v for v in node.outputs if v)
    return reached


def _fx_bindings(graph: ObservableGraph, inputs: list[torch.Tensor]) -> dict[Any, int]:
    """A dynamic export's size symbols → their sizes in this batch (the placeholders' dims)."""
    bindings: dict[Any, int] = {}
    fx_graph = next((n.source.graph for n in graph.nodes if hasattr(n.source, "graph")), None)
    if fx_graph is None:
        return bindings
    index = {name: i for i, name in enumerate(graph.input_names)}
    for node in fx_graph.nodes:
        i = index.get(node.name) if node.op == "placeholder" else None
        val = node.meta.get("val") if i is not None else None
        if i is None or i >= len(inputs) or not isinstance(val, torch.Tensor):
            continue
        if val.dim() != inputs[i].dim():
            continue
        for dim, size in zip(val.shape, inputs[i].shape, strict=True):
            if isinstance(dim, torch.SymInt):
                bindings.setdefault(dim.node.expr, int(size))
    return bindings


def _fx_dims(value: Any, bindings: dict[Any, int]) -> list[int] | None:
    val = getattr(value, "meta", {}).get("val")
    if not isinstance(val, torch.Tensor):
        return None
    dims: list[int] = []
    for dim in val.shape:
        if isinstance(dim, torch.SymInt):
            try:  # a symbol the batch's inputs do not bind stays a symbol: int() refuses it
                dims.append(int(dim.node.expr.xreplace(bindings)))
            except TypeError:
                return None
        else:
            dims.append(int(dim))
    return dims


def _scores(query: list[int] | None, key_length: int | None) -> Scores | None:
    if query is None or key_length is None or len(query) < 3:
        return None
    return math.prod(query[:-2]), query[-2], key_length


def _fx_sites(graph: ObservableGraph, inputs: list[torch.Tensor], reached: set[str]) -> list:
    bindings = _fx_bindings(graph, inputs)
    sites: list[Scores | None] = []
    for node in graph.nodes:
        op = canonical(node.op_type)
        if node.domain != "aten" or not node.inputs or node.inputs[0] not in reached:
            continue
        args = tuple(getattr(node.source, "args", ()))
        if op in _FX_ATTENTION and len(args) >= 2:
            key = _fx_dims(args[1], bindings)
            sites.append(_scores(_fx_dims(args[0], bindings), key[-2] if key else None))
        elif op in _FX_SOFTMAX and len(args) >= 2:
            dims = _fx_dims(args[0], bindings)
            if (
                dims is not None
                and isinstance(args[1], int)
                and args[1] % len(dims) == len(dims) - 1
            ):
                sites.append(_scores([*dims[:-1], 0], dims[-1]))
    return sites


def _onnx_dims(graph: ObservableGraph, inputs: list[torch.Tensor]) -> dict[str, list[int]]:
    """Every value's dims by ONNX shape inference of the graph's nodes, its inputs shaped as
    this batch's; nothing where a node is no NodeProto or inference fails."""
    import onnx
    from onnx import helper, numpy_helper

    protos: list[onnx.NodeProto] = []
    seen: set[int] = set()
    for node in graph.nodes:
        if not isinstance(node.source, onnx.NodeProto):
            return {}
        if id(node.source) not in seen:
            seen.add(id(node.source))
            protos.append(node.source)
    produced = {out for proto in protos for out in proto.output if out}
    read = {name for proto in protos for name in proto.input if name and name not in produced}
    values = graph.initial_values()
    declared: list[onnx.ValueInfoProto] = []
    initializers: list[onnx.TensorProto] = []
    given = dict(zip(graph.input_names, inputs, strict=False))
    for name in sorted(read):
        tensor = given.get(name, values.get(name))
        if not isinstance(tensor, torch.Tensor):
            return {}
        tensor = tensor.detach()
        if name not in given and (not tensor.is_floating_point() or tensor.numel() <= 16):
            initializers.append(numpy_helper.from_array(tensor.cpu().numpy(), name))
            continue
        elem = helper.np_dtype_to_tensor_dtype(torch.empty((), dtype=tensor.dtype).numpy().dtype)
        declared.append(helper.make_tensor_value_info(name, elem, list(tensor.shape)))
    opsets = graph.metadata.get("opset_imports") or {}
    model = helper.make_model(
        helper.make_graph(protos, "twin", declared, [], initializers),
        opset_imports=[helper.make_opsetid(d, int(v)) for d, v in opsets.items()],
    )
    model.ir_version = int(graph.metadata.get("ir_version") or model.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # any failure of inference: no shapes, no evidence
        return {}
    dims: dict[str, list[int]] = {}
    for info in inferred.graph.value_info:
        shape = info.type.tensor_type.shape if info.type.HasField("tensor_type") else None
        if shape is not None and all(d.HasField("dim_value") for d in shape.dim):
            dims[info.name] = [int(d.dim_value) for d in shape.dim]
    return dims


def _onnx_sites(graph: ObservableGraph, inputs: list[torch.Tensor], reached: set[str]) -> list:
    softmaxes = [
        n
        for n in graph.nodes
        if n.domain in ("", "ai.onnx") and n.op_type == "Softmax" and n.inputs
    ]
    softmaxes = [n for n in softmaxes if n.inputs[0] in reached]
    if not softmaxes:
        return []
    dims = _onnx_dims(graph, inputs)
    sites: list[Scores | None] = []
    for node in softmaxes:
        shape = dims.get(node.inputs[0])
        axis = _attr(node, "axis")
        axis = -1 if axis is None else int(axis)  # type: ignore[call-overload]
        last = shape is not None and axis % len(shape) == len(shape) - 1
        sites.append(_scores([*shape[:-1], 0], shape[-1]) if shape and last else None)
    return sites


def _sites(graph: ObservableGraph, inputs: list[torch.Tensor], name: str) -> Iterable:
    reached = _reached(graph, name)
    if any(n.domain == "aten" for n in graph.nodes):
        return _fx_sites(graph, inputs, reached)
    return _onnx_sites(graph, inputs, reached)


def attention_reads_sequence_first(
    graph: ObservableGraph, inputs: list[torch.Tensor], i: int
) -> str | None:
    """Why input `i` [T, B, ...] (axes 0 and 1 of different sizes) is sequence-first by the
    self-attention it feeds (module docstring); None when no attention says so."""
    x = inputs[i]
    first, second = int(x.shape[0]), int(x.shape[1])
    if first == second or i >= len(graph.input_names):
        return None
    seq_first = 0
    for site in _sites(graph, inputs, graph.input_names[i]):
        if site is None:
            continue
        lead, length, key_length = site
        if length != key_length:
            continue  # cross-attention, or no attention scores
        if length == second and lead % first == 0:
            return None  # this one reads it batch-first
        if length == first and lead % second == 0:
            seq_first += 1
    if not seq_first:
        return None
    return (
        f"its self-attention scores run over its axis 0 ({first} steps) per entry of its "
        f"axis 1 ({second}), as nn.MultiheadAttention's with batch_first=False"
    )
