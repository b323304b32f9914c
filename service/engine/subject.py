"""Build a `Subject` (a model made runnable, its batch and its loss) from bytes and options.

    subject = build_subject(model_bytes, batch_bytes, DiagnoseOptions(device="cpu"))
    measurements = measure(subject, options)

Order matters: the model is loaded on the CPU, the batch is matched against its declared
inputs, format-specific finishing that needs the batch runs (TorchScript → FX conversion,
ONNX conformance against onnxruntime), and only then are model and batch moved to the device.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch

from service.engine.batches import load_batch, match_batch
from service.engine.eval_mode_notes import eval_mode_notes
from service.engine.formats.detect import detect_format
from service.engine.formats.loaded import LoadedModel
from service.engine.formats.onnx import conversion_mismatch_note
from service.engine.losses import GIVEN_BY_USER, LOSS_KINDS, default_loss
from service.engine.measurements import Subject
from service.engine.options import DiagnoseOptions
from service.engine.report import ModelInfo, TensorSpec
from service.engine.unread_inputs import unread_input_notes
from service.errors import BadInputError


def read_bytes(source: bytes | Path | str, what: str) -> bytes:
    if isinstance(source, bytes):
        return source
    path = Path(source)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"cannot read the {what} file {str(path)!r}: {exc.strerror}") from exc


def pick_device(spec: str) -> torch.device:
    """`auto` → the first CUDA device if there is one, else the CPU; `cpu`; `cuda[:N]`."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise BadInputError(f"device {spec!r} was asked for but no CUDA device is available")
        index = 0
        if ":" in spec:
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError as exc:
                raise BadInputError(f"device {spec!r}: the index must be a number") from exc
        if not 0 <= index < torch.cuda.device_count():
            raise BadInputError(
                f"device {spec!r}: there are {torch.cuda.device_count()} CUDA devices"
            )
        return torch.device(f"cuda:{index}")
    raise BadInputError(f"device must be auto, cpu, cuda or cuda:N, not {spec!r}")


def load_model(
    data: bytes, options: DiagnoseOptions, *, bundle_dir: Path | None = None
) -> LoadedModel:
    """Detect the format from content and load the model on the CPU. `bundle_dir`: the folder
    an ONNX model's external data files are read from (the CLI's model folder; never set for
    uploads, whose external data comes in a zip bundle)."""
    fmt = detect_format(data)
    if fmt == "torch_export":
        from service.engine.formats.torch_export import load_torch_export

        return load_torch_export(data, mode=options.mode, dropout=options.dropout)
    if fmt == "torchscript":
        from service.engine.formats.torchscript import load_torchscript

        return load_torchscript(data, mode=options.mode, dropout=options.dropout)
    from service.engine.formats.onnx import load_onnx_model

    return load_onnx_model(
        data,
        mode=options.mode,
        dropout=options.dropout,
        check_conversion=options.check_conversion,
        bundle_dir=bundle_dir,
    )


def build_subject(
    model: bytes | Path | str,
    batch: bytes | Path | str,
    options: DiagnoseOptions | None = None,
    *,
    loaded: LoadedModel | None = None,
    bundle_dir: Path | None = None,
    conformance_reference: Any = None,
) -> Subject:
    """`loaded`: the model already loaded by `load_model(model_bytes, options)` with the same
    mode and dropout, possibly used by earlier subjects (a worker's cache of loaded models):
    loading is skipped and `timing.load` is 0. TorchScript's FX conversion then is the one done
    for the first batch (its `finish` runs once); ONNX's conformance check runs again on this
    batch, on the CPU as for a fresh load. The caller keeps the module unchanged between jobs
    (measure() leaves `.grad` set; fix verification works on copies).

    `conformance_reference`: with `loaded` (ONNX), the `conformance.ConformanceReference` kept
    with it, so that check reuses the onnxruntime session built for an earlier batch."""
    options = options or DiagnoseOptions.model_validate({})
    if options.loss is not None and options.loss not in LOSS_KINDS:
        raise BadInputError(f"loss must be one of {', '.join(LOSS_KINDS)}")
    device = pick_device(options.device)
    model_bytes = read_bytes(model, "model")
    batch_bytes = read_bytes(batch, "batch")
    start = time.perf_counter()
    preloaded = loaded is not None
    if loaded is None:
        loaded = load_model(model_bytes, options, bundle_dir=bundle_dir)
    loaded_at = time.perf_counter()
    matched = match_batch(
        load_batch(batch_bytes),
        loaded.inputs,
        aliases=loaded.input_aliases,
        optional=loaded.optional_inputs,
    )
    if loaded.format == "torchscript":
        # TorchScript declares no input dtypes: float arrays follow the model's float dtype
        # (float32 data for a bf16/fp16 model), as they do for the formats that declare them
        float_dtype = next(
            (p.dtype for p in loaded.module.parameters() if p.is_floating_point()), None
        )
        if float_dtype is not None:
            matched.inputs = [
                x.to(float_dtype) if x.is_floating_point() else x for x in matched.inputs
            ]
    if loaded.finish is not None:
        if preloaded:
            loaded.module.to("cpu")  # an earlier subject moved it; the check runs on the CPU
        if conformance_reference is not None and loaded.format == "onnx":
            loaded.finish(matched.inputs, conformance_reference)
        else:
            loaded.finish(matched.inputs)
        if loaded.format != "onnx":
            loaded.finish = None  # TorchScript → FX is done once; ONNX's is a per-batch check
    if loaded.describe_outputs is not None:  # this batch's output shapes, not the first one's
        loaded.outputs = loaded.describe_outputs(matched.inputs)
    finished_at = time.perf_counter()

    module = loaded.module.to(device)
    if loaded.graph is None:
        module.train(options.mode == "train")
    inputs = [x.to(device) for x in matched.inputs]
    target = matched.target.to(device) if matched.target is not None else None

    declared = matched.specs  # the inputs fed: all but those left to their defaults
    if loaded.format == "torchscript":
        # TorchScript declares no shapes: report what the model was run with
        declared = [
            TensorSpec(name=s.name, shape=list(x.shape), dtype=str(x.dtype).removeprefix("torch."))
            for s, x in zip(matched.specs, matched.inputs, strict=True)
        ]
    named = (
        loaded.graph.named_graph_parameters()
        if loaded.graph is not None
        else list(module.named_parameters())
    )
    info = ModelInfo(
        format=loaded.format,
        sha256=hashlib.sha256(model_bytes).hexdigest(),
        inputs=declared,
        outputs=loaded.outputs,
        parameter_count=sum(p.numel() for _, p in named if p.requires_grad),
        probe_coverage="full" if loaded.graph is not None else "parameters_only",
        probe_coverage_reason=loaded.coverage_reason,
        conversion=loaded.conversion,
        opset=loaded.opset,
    )
    loss_kind: str
    reason: str | None
    if options.loss is not None:
        loss_kind, reason = options.loss, GIVEN_BY_USER
    elif target is not None and target.is_floating_point():
        loss_kind, reason = default_loss(target, None)
    else:
        # resolved from the actual output by measure(): a declared output shape can be stale
        # (a dynamic-shape dynamo export declared ['B', 10, 30] for a [7, 17, 30] output)
        loss_kind, reason = "auto", None
    notes = list(loaded.notes) + matched.notes + conversion_mismatch_note(loaded.conversion)
    if loaded.graph is not None:
        notes += loaded.graph.metadata.get("notes", [])
        notes += unread_input_notes(
            loaded.graph, [s.name for s in matched.specs], list(matched.inputs)
        )
        if options.mode == "eval":
            notes += eval_mode_notes(loaded.graph)
    return Subject(
        module=module,
        graph=loaded.graph,
        inputs=inputs,
        target=target,
        loss_kind=loss_kind,
        model_info=info,
        batch_info=matched.info,
        device=device,
        loss_reason=reason,
        extra={
            "timing": {"load": loaded_at - start, "convert": finished_at - loaded_at},
            "notes": notes,
            "options": options,
            "source": loaded.source,
        },
    )
