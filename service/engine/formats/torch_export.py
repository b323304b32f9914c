"""torch.export programs (`torch.export.save` `.pt2` zips) → ObservableGraph, full probes."""

from __future__ import annotations

import io
from typing import Any

import torch

from service.engine.formats.fx import graph_from_fx
from service.engine.formats.loaded import LoadedModel
from service.engine.report import TensorSpec
from service.errors import ModelFormatError


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def spec_from_value(name: str, value: Any) -> TensorSpec:
    """A TensorSpec from an FX `meta["val"]` (a FakeTensor whose dims may be symbolic)."""
    if not isinstance(value, torch.Tensor):
        return TensorSpec(name=name, shape=[], dtype=type(value).__name__)
    shape: list[int | str | None] = []
    for dim in value.shape:
        shape.append(int(dim) if isinstance(dim, int) else str(dim))
    return TensorSpec(name=name, shape=shape, dtype=dtype_name(value.dtype))


def load_torch_export(data: bytes, *, mode: str = "train", dropout: bool = False) -> LoadedModel:
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as exc:
        raise ModelFormatError(
            f"the .pt2 file could not be loaded by torch.export.load ({type(exc).__name__}: "
            f"{exc}); save it with torch.export.save(torch.export.export(model, args), path)"
        ) from exc
    signature = program.graph_signature
    by_name = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs = [spec_from_value(n, by_name[n].meta.get("val")) for n in signature.user_inputs]
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    flat_outputs = list(output_node.args[0])
    outputs = []
    for index, name in enumerate(signature.user_outputs):
        match = next((n for n in flat_outputs if getattr(n, "name", None) == name), None)
        value = match.meta.get("val") if match is not None else None
        outputs.append(spec_from_value(name or f"output_{index}", value))
    module = program.module()
    parameter_names = [name for name, _ in module.named_parameters()]
    graph = graph_from_fx(
        module,
        parameter_names=parameter_names,
        input_names=[s.name for s in inputs],
        mode=mode,
        dropout=dropout,
        metadata={"format": "torch_export"},
    )
    return LoadedModel(
        format="torch_export",
        module=graph,
        graph=graph,
        inputs=inputs,
        outputs=outputs,
        source=program,
    )
