"""ONNX models: glue to the converter (service/engine/onnx, issue 2).

A model arrives as ONNX bytes (external data read from `bundle_dir`, the folder the model
file came from, when the CLI gives one) or as a zip bundle of one `.onnx` file plus its external
data files (`loading.load_onnx_bundle`), which is what to upload when `torch.onnx.export` wrote
the weights to a separate `.data` file.

The converter turns the ModelProto into an ObservableGraph (full probes). Once the batch is
known, `finish` compares the converted forward with onnxruntime on it
(`service.engine.onnx.conformance.check_conversion`), so the report says how far the converted
graph is from the reference runtime.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from service.engine.formats.loaded import LoadedModel
from service.engine.report import ConversionCheck, TensorSpec
from service.errors import UnsupportedModelError

_ZIP_MAGIC = b"PK\x03\x04"


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise UnsupportedModelError(
            "ONNX models are not supported by this build yet (the converter is missing); "
            "send a torch.export (.pt2) or TorchScript file instead"
        ) from exc


def _spec(raw: dict[str, Any]) -> TensorSpec:
    return TensorSpec(name=raw["name"], shape=list(raw.get("shape") or []), dtype=raw["dtype"])


def load_onnx_model(
    data: bytes,
    *,
    mode: str = "train",
    dropout: bool = False,
    check_conversion: bool = True,
    bundle_dir: Path | None = None,
) -> LoadedModel:
    loading = _import("service.engine.onnx.loading")
    convert_mod = _import("service.engine.onnx.convert")
    if data.startswith(_ZIP_MAGIC):
        # external data is resolved inside the bundle's own temporary folder, never bundle_dir
        model = loading.load_onnx_bundle(data)
        bundle_dir = None
    else:
        model = loading.load_onnx(data, bundle_dir=bundle_dir)
    graph = convert_mod.convert(
        model,
        mode=mode,
        bundle_dir=bundle_dir,
        extra={"dropout": dropout},
    )
    meta = graph.metadata
    opsets = meta.get("opset_imports") or {}
    loaded = LoadedModel(
        format="onnx",
        module=graph,
        graph=graph,
        inputs=[_spec(s) for s in meta.get("inputs", [])],
        outputs=[_spec(s) for s in meta.get("outputs", [])],
        opset=opsets.get(""),
        source=model,
    )
    if not check_conversion:
        loaded.conversion = ConversionCheck(checked=False, reason="not requested")
        return loaded

    def finish(example: Sequence[torch.Tensor], reference: Any = None) -> None:
        loaded.conversion = _check(model, graph, example, reference)

    loaded.finish = finish
    return loaded


def _check(
    model: Any, graph: Any, example: Sequence[torch.Tensor], reference: Any = None
) -> ConversionCheck:
    """`reference`: a `conformance.ConformanceReference` kept by the caller (a worker's cache
    of loaded models) so the onnxruntime session is built once per model, not per batch."""
    try:
        conformance = importlib.import_module("service.engine.onnx.conformance")
    except ModuleNotFoundError:
        return ConversionCheck(checked=False, reason="conformance check not available")
    try:
        # it refills the proto's initializers from the graph and runs the forward it needs
        result = conformance.check_conversion(model, graph, list(example), reference=reference)
    except Exception as exc:  # a reference-runtime failure must not stop the diagnosis
        return ConversionCheck(checked=False, reason=f"{type(exc).__name__}: {exc}")
    assert isinstance(result, ConversionCheck)
    return result


# A relative error past this is no rounding difference: the converted graph computes something
# else than onnxruntime does (fp32 conversions agree to ~1e-5, fp16 ones within `reason`'s floor).
MISMATCH_REL_ERROR = 0.1


def conversion_mismatch_note(check: ConversionCheck | None) -> list[str]:
    """A note when the conformance check found the converted forward far from onnxruntime's
    (or NaN/inf where onnxruntime is finite): the findings then describe the converted graph,
    which is not the model onnxruntime runs."""
    if check is None or not check.checked or check.max_rel_error is None:
        return []
    error = check.max_rel_error
    # a finite error that `reason` explains (onnxruntime's MaxUnpool layout) is no surprise
    if math.isfinite(error) and (error <= MISMATCH_REL_ERROR or check.reason):
        return []
    shown = f"{error:.3g}" if math.isfinite(error) else "a NaN or inf where it is finite"
    return [
        f"the converted graph's output differs from onnxruntime's on this batch (max relative "
        f"error {shown}): the findings describe the converted graph, which may not compute what "
        "onnxruntime computes; please report the model to the gradhealth maintainers"
    ]
