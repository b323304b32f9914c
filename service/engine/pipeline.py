"""`diagnose(model, batch, options) -> Report`: load → subject → measure → findings → advice.

The one entry point the CLI, the workers and the tests call. Findings come from
`service.engine.detectors.detect(measurements, thresholds)` and recommendations (with fix
verification) from `service.engine.advice.recommend(findings, measurements, subject, options)`;
while those modules are not importable the report simply has none (with a note).
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any

import torch

import service
from service.engine.formats.loaded import LoadedModel
from service.engine.measure import measure
from service.engine.measurements import Subject
from service.engine.options import DiagnoseOptions
from service.engine.report import Environment, Finding, Recommendation, Report, Timing
from service.engine.subject import build_subject


def _optional(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ModuleNotFoundError, AttributeError):
        return None


def environment(device: torch.device) -> Environment:
    def version(module: str) -> str | None:
        try:
            return str(importlib.import_module(module).__version__)
        except ModuleNotFoundError:
            return None

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        import platform

        device_name = f"cpu ({platform.processor() or platform.machine()})"
    return Environment(
        gradhealth=getattr(service, "__version__", "0.1.0"),
        torch=torch.__version__,
        onnx=version("onnx"),
        onnxruntime=version("onnxruntime"),
        device_name=device_name,
    )


def diagnose(
    model: bytes | Path | str,
    batch: bytes | Path | str,
    options: DiagnoseOptions | None = None,
    *,
    loaded: LoadedModel | None = None,
    bundle_dir: Path | None = None,
    conformance_reference: Any = None,
) -> Report:
    """`loaded`: a model loaded earlier by `subject.load_model` (see `build_subject`).
    `bundle_dir`: where an ONNX model's external data files are read from (`load_model`).
    `conformance_reference`: the onnxruntime session kept with `loaded` (see `build_subject`)."""
    options = options or DiagnoseOptions.model_validate({})
    started = time.perf_counter()
    subject = build_subject(
        model,
        batch,
        options,
        loaded=loaded,
        bundle_dir=bundle_dir,
        conformance_reference=conformance_reference,
    )
    # random draws (--dropout, a model's own noise) are the same on every run of a diagnosis
    devices = [subject.device] if subject.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(DIAGNOSIS_SEED)
        return _diagnosed(subject, options, started)


# the seed of torch's generators for every diagnosis (restored after it)
DIAGNOSIS_SEED = 0


def _diagnosed(subject: Subject, options: DiagnoseOptions, started: float) -> Report:
    measurements = measure(subject, options)
    analysis_start = time.perf_counter()
    notes = list(subject.extra.get("notes", [])) + list(measurements.notes)
    findings: list[Finding] = []
    recommendations: list[Recommendation] = []
    detect = _optional("service.engine.detectors", "detect")
    recommend = _optional("service.engine.advice", "recommend")
    if detect is None:
        notes.append("detectors unavailable in this build: no findings were computed")
    else:
        findings = list(detect(measurements, options.thresholds))
    verification_start = time.perf_counter()
    if recommend is not None and findings:
        recommendations = list(recommend(findings, measurements, subject, options))
    verification = time.perf_counter() - verification_start
    load_timing = subject.extra.get("timing", {})
    timing = Timing(
        load=load_timing.get("load", 0.0),
        convert=load_timing.get("convert", 0.0),
        forward=measurements.timing.get("forward", 0.0),
        backward=measurements.timing.get("backward", 0.0),
        analysis=measurements.timing.get("analysis", 0.0) + (verification_start - analysis_start),
        verification=verification,
        total=time.perf_counter() - started,
    )
    report = Report(
        model=subject.model_info,
        batch=subject.batch_info,
        loss=measurements.loss,
        device=str(subject.device),
        mode=options.mode,
        precision=measurements.precision,
        micro_batches=measurements.micro_batches,
        layers=measurements.layers,
        parameters=measurements.parameters,
        profiles=measurements.profiles,
        quantizers=measurements.quantizers,
        findings=findings,
        recommendations=recommendations,
        timing=timing,
        environment=environment(subject.device),
        notes=notes,
    )
    report.verdict = report.compute_verdict()
    return report
