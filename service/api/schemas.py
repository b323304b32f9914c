"""Request and response bodies of the REST API (pydantic v2), each with an OpenAPI example so
that the /docs page alone is enough to try the service."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.engine.options import LossKind

EXAMPLE_SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
EXAMPLE_TIME = "2026-11-26T15:40:00Z"
DiagnosisStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


def _examples(*examples: dict[str, Any]) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": list(examples)})


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable code")
    message: str = Field(description="what went wrong and what to change")


class ErrorResponse(BaseModel):
    model_config = _examples(
        {"error": {"code": "not_found", "message": "no diagnosis with id 0f3c… for this tenant"}}
    )
    error: ErrorBody


class TensorSpecOut(BaseModel):
    name: str
    shape: list[int | str | None] | None = Field(
        description="a symbolic dim is its name, an unknown one null; null: the format does not "
        "declare shapes (TorchScript)"
    )
    dtype: str | None = Field(description="null: not declared by the format (TorchScript)")


class InspectionOut(BaseModel):
    status: str = Field(description="pending | succeeded | failed: the worker-side inspection job")
    error: str | None = None


MODEL_EXAMPLE: dict[str, Any] = {
    "id": "5b1e0c7d2f0a4c1e9a8b7c6d5e4f3a2b",
    "name": "resnet-tiny",
    "version": 2,
    "sha256": EXAMPLE_SHA,
    "format": "onnx",
    "size_bytes": 48213,
    "inputs": [],
    "outputs": [],
    "parameter_count": None,
    "inspection": {"status": "pending", "error": None},
    "created_at": EXAMPLE_TIME,
}


class ModelOut(BaseModel):
    model_config = _examples(MODEL_EXAMPLE)
    id: str
    name: str
    version: int = Field(description="1, 2, … per model name within the tenant")
    sha256: str
    format: str | None = Field(description="onnx | torchscript | torch_export")
    size_bytes: int
    inputs: list[TensorSpecOut] = Field(description="filled by the inspection job")
    outputs: list[TensorSpecOut] = Field(description="filled by the inspection job")
    parameter_count: int | None
    inspection: InspectionOut
    created_at: datetime


class ArrayOut(BaseModel):
    name: str
    shape: list[int]
    dtype: str


BATCH_EXAMPLE: dict[str, Any] = {
    "id": "a1b2c3d4e5f60718293a4b5c6d7e8f90",
    "sha256": EXAMPLE_SHA,
    "size_bytes": 1334,
    "format": "npz",
    "filename": "batch.npz",
    "arrays": [
        {"name": "x", "shape": [8, 3, 32, 32], "dtype": "float32"},
        {"name": "target", "shape": [8], "dtype": "int64"},
    ],
    "arrays_complete": True,
    "created_at": EXAMPLE_TIME,
}


class BatchOut(BaseModel):
    model_config = _examples(BATCH_EXAMPLE)
    id: str
    sha256: str
    size_bytes: int
    format: str = Field(description="npz | safetensors | pt (from the content)")
    filename: str | None
    arrays: list[ArrayOut]
    arrays_complete: bool = Field(
        description="false for a .pt whose contents cannot be listed without loading it; "
        "the worker loads it (weights_only) and reports any problem in the diagnosis"
    )
    created_at: datetime


class DiagnosisCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_id": "5b1e0c7d2f0a4c1e9a8b7c6d5e4f3a2b",
                    "batch_id": "a1b2c3d4e5f60718293a4b5c6d7e8f90",
                    "loss": "cross_entropy",
                    "mode": "train",
                    "options": {"verify_fixes": True},
                }
            ]
        },
    )
    model_id: str
    batch_id: str
    loss: LossKind | None = None
    mode: Literal["train", "eval"] | None = None
    precision: Literal["fp32", "bf16", "fp16"] | None = None
    device: str | None = Field(None, description="auto | cpu | cuda | cuda:N")
    options: dict[str, Any] = Field(
        default_factory=dict, description="any other DiagnoseOptions field (see the engine)"
    )


DIAGNOSIS_EXAMPLE: dict[str, Any] = {
    "id": "0f3c9a8b7d6e5f4a3b2c1d0e9f8a7b6c",
    "status": "succeeded",
    "model_id": "5b1e0c7d2f0a4c1e9a8b7c6d5e4f3a2b",
    "batch_id": "a1b2c3d4e5f60718293a4b5c6d7e8f90",
    "options": {"loss": "cross_entropy", "mode": "train"},
    "attempts": 1,
    "max_attempts": 3,
    "cancel_requested": False,
    "created_at": EXAMPLE_TIME,
    "started_at": "2026-11-26T15:40:01Z",
    "finished_at": "2026-11-26T15:40:03Z",
    "verdict": "unhealthy",
    "report": {"report_version": "1", "verdict": "unhealthy", "findings": []},
    "error": None,
}


class DiagnosisSummary(BaseModel):
    model_config = _examples({k: v for k, v in DIAGNOSIS_EXAMPLE.items() if k != "report"})
    id: str
    status: DiagnosisStatus
    model_id: str
    batch_id: str | None
    options: dict[str, Any]
    attempts: int
    max_attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    verdict: str | None = Field(description="healthy | at_risk | unhealthy, once succeeded")
    error: ErrorBody | None = Field(
        description="why it failed, or why the last attempt did not finish while it is retried"
    )


class DiagnosisOut(DiagnosisSummary):
    model_config = _examples(DIAGNOSIS_EXAMPLE)
    report: dict[str, Any] | None = Field(description="the report (CONTRACT §3) once succeeded")


class DiagnosisPage(BaseModel):
    model_config = _examples(
        {
            "items": [{k: v for k, v in DIAGNOSIS_EXAMPLE.items() if k != "report"}],
            "next_cursor": "WyIyMDI2LTExLTI2VDE1OjQwOjAwKzAwOjAwIiwgIjBmM2MiXQ",
        }
    )
    items: list[DiagnosisSummary]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null at end")


EXAMPLE_CURSOR = "WyIyMDI2LTExLTI2VDE1OjQwOjAwKzAwOjAwIiwgIjBmM2MiXQ"


class ModelPage(BaseModel):
    model_config = _examples({"items": [MODEL_EXAMPLE], "next_cursor": EXAMPLE_CURSOR})
    items: list[ModelOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null at end")


class BatchPage(BaseModel):
    model_config = _examples({"items": [BATCH_EXAMPLE], "next_cursor": EXAMPLE_CURSOR})
    items: list[BatchOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null at end")


class Health(BaseModel):
    model_config = _examples({"status": "ok"})
    status: str


class Readiness(BaseModel):
    model_config = _examples(
        {"status": "ready", "database": "ok", "revision": "0001", "head": "0001"}
    )
    status: Literal["ready", "not_ready"]
    database: str
    revision: str | None
    head: str | None


# -- GET /v1/models/{id}/history ----------------------------------------------------------------

# A number from a report: float, or "inf" / "-inf" / "nan" where it is not finite (as in §3).
Figure = float | str | None
HISTORY_FIRST_ID = "0f3c9a8b7d6e5f4a3b2c1d0e9f8a7b6c"
HISTORY_SECOND_ID = "7e6d5c4b3a291807f6e5d4c3b2a19080"
HISTORY_EXAMPLE: dict[str, Any] = {
    "model_id": "5b1e0c7d2f0a4c1e9a8b7c6d5e4f3a2b",
    "name": "resnet-tiny",
    "change_factor": 10.0,
    "items": [
        {
            "diagnosis_id": HISTORY_FIRST_ID,
            "model_id": "5b1e0c7d2f0a4c1e9a8b7c6d5e4f3a2b",
            "model_version": 2,
            "batch_id": "a1b2c3d4e5f60718293a4b5c6d7e8f90",
            "created_at": EXAMPLE_TIME,
            "finished_at": "2026-11-26T15:40:03Z",
            "verdict": "unhealthy",
            "counts": {"errors": 1, "warnings": 1, "info": 0},
            "findings": [
                {"kind": "exploding_gradients", "severity": "error", "layers": ["fc0", "fc1"]},
                {"kind": "init_scale", "severity": "warning", "layers": ["fc0"]},
            ],
            "layers": [
                {
                    "name": "fc0",
                    "op": "linear",
                    "grad_norm": 416.8,
                    "activation_grad_norm": 114.9,
                    "dead_fraction": 0.0,
                    "saturated_fraction": None,
                },
                {
                    "name": "fc1",
                    "op": "linear",
                    "grad_norm": 398.4,
                    "activation_grad_norm": 71.1,
                    "dead_fraction": 0.0,
                    "saturated_fraction": None,
                },
                {
                    "name": "fc2",
                    "op": "linear",
                    "grad_norm": 295.8,
                    "activation_grad_norm": 32.9,
                    "dead_fraction": 0.0,
                    "saturated_fraction": None,
                },
            ],
            "changes": {
                "compared_with": HISTORY_SECOND_ID,
                "compared_with_version": 1,
                "findings_appeared": ["exploding_gradients", "init_scale"],
                "findings_resolved": [],
                "severity_changed": [],
                "layers_added": ["fc2"],
                "layers_removed": [],
                "flagged_layers": ["fc0", "fc1"],
                "layers": [
                    {
                        "name": "fc0",
                        "grad_norm_ratio": 4554.5,
                        "activation_grad_norm_ratio": 3933.3,
                        "flagged": True,
                    },
                    {
                        "name": "fc1",
                        "grad_norm_ratio": 5365.4,
                        "activation_grad_norm_ratio": 2404.7,
                        "flagged": True,
                    },
                ],
            },
        },
        {
            "diagnosis_id": HISTORY_SECOND_ID,
            "model_id": "c0ffee0c7d2f0a4c1e9a8b7c6d5e4f3a",
            "model_version": 1,
            "batch_id": "a1b2c3d4e5f60718293a4b5c6d7e8f90",
            "created_at": "2026-11-25T09:00:00Z",
            "finished_at": "2026-11-25T09:00:02Z",
            "verdict": "healthy",
            "counts": {"errors": 0, "warnings": 0, "info": 0},
            "findings": [],
            "layers": [
                {
                    "name": "fc0",
                    "op": "linear",
                    "grad_norm": 0.0915,
                    "activation_grad_norm": 0.0292,
                    "dead_fraction": 0.0,
                    "saturated_fraction": None,
                },
                {
                    "name": "fc1",
                    "op": "linear",
                    "grad_norm": 0.0742,
                    "activation_grad_norm": 0.0296,
                    "dead_fraction": 0.0,
                    "saturated_fraction": None,
                },
            ],
            "changes": None,
        },
    ],
    "next_cursor": None,
}


class FindingBrief(BaseModel):
    kind: str = Field(description="the finding's kind (CONTRACT §3), e.g. exploding_gradients")
    severity: str = Field(description="info | warning | error")
    layers: list[str] = Field(description="the layers it names, worst first")


class FindingCounts(BaseModel):
    errors: int
    warnings: int
    info: int


class LayerFigures(BaseModel):
    """One layer of a report, the figures that show a gradient problem."""

    name: str
    op: str | None
    grad_norm: Figure = Field(description="‖∂L/∂θ‖ of the layer's parameters")
    activation_grad_norm: Figure = Field(description="‖∂L/∂a‖ of the layer's output")
    dead_fraction: Figure = Field(description="units that output zero for every example")
    saturated_fraction: Figure = Field(description="outputs in the activation's flat region")


class SeverityChange(BaseModel):
    kind: str
    before: str
    after: str


class LayerChange(BaseModel):
    name: str
    grad_norm_ratio: Figure = Field(
        description="grad_norm now / before; null where there is nothing to compare (no "
        "figure on one side, zero or non-finite on both)"
    )
    activation_grad_norm_ratio: Figure = Field(description="activation_grad_norm now / before")
    flagged: bool = Field(
        description="a ratio is ≥ change_factor or ≤ 1/change_factor, or non-finite"
    )


class HistoryChanges(BaseModel):
    compared_with: str = Field(description="the diagnosis this entry is compared with")
    compared_with_version: int = Field(description="the model version of that diagnosis")
    findings_appeared: list[str] = Field(description="finding kinds absent before")
    findings_resolved: list[str] = Field(description="finding kinds gone since")
    severity_changed: list[SeverityChange] = Field(
        description="kinds present on both sides whose worst severity changed"
    )
    layers_added: list[str] = Field(description="layers absent before (the architecture changed)")
    layers_removed: list[str] = Field(description="layers gone since")
    flagged_layers: list[str] = Field(description="names of the flagged entries of `layers`")
    layers: list[LayerChange] = Field(description="every layer present on both sides, in order")


class HistoryEntry(BaseModel):
    diagnosis_id: str
    model_id: str
    model_version: int
    batch_id: str | None
    created_at: datetime
    finished_at: datetime
    verdict: str | None = Field(description="healthy | at_risk | unhealthy")
    counts: FindingCounts
    findings: list[FindingBrief]
    layers: list[LayerFigures] = Field(description="the report's layers, input → output")
    changes: HistoryChanges | None = Field(
        description="compared with the next older entry of the same list; null for the oldest"
    )


class ModelHistory(BaseModel):
    model_config = _examples(HISTORY_EXAMPLE)
    model_id: str = Field(description="the model asked for")
    name: str = Field(description="its name: the history covers every version of this name")
    change_factor: float = Field(
        description="a layer is flagged when a gradient norm grew or shrank by this factor"
    )
    items: list[HistoryEntry] = Field(description="succeeded diagnoses, newest first")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null at end")


SCHEDULE_EXAMPLE: dict[str, Any] = {
    "id": "7c2d9e1f0a3b4c5d6e7f8091a2b3c4d5",
    "model_name": "resnet-tiny",
    "batch_id": "a1b2c3d4e5f60718293a4b5c6d7e8f90",
    "options": {"loss": "cross_entropy", "mode": "train"},
    "cron": "0 3 * * *",
    "timezone": "Europe/Berlin",
    "enabled": True,
    "webhook_url": "https://ci.example.com/hooks/gradhealth",
    "next_run_at": "2026-11-27T02:00:00Z",
    "last_run_at": None,
    "last_diagnosis_id": None,
    "last_error": None,
    "created_at": EXAMPLE_TIME,
    "updated_at": EXAMPLE_TIME,
}
CRON_DESCRIPTION = (
    "5 fields: minute hour day-of-month month day-of-week (e.g. `0 3 * * *`: 03:00 daily), "
    "read in `timezone`"
)
TIMEZONE_DESCRIPTION = "IANA time zone name; ticks follow its wall clock across DST changes"
WEBHOOK_DESCRIPTION = (
    "http(s) URL that gets a POST of `{schedule_id, diagnosis_id, status, verdict, report_url}` "
    "when a scheduled diagnosis succeeds or fails"
)


class ScheduleCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_name": "resnet-tiny",
                    "batch_id": "a1b2c3d4e5f60718293a4b5c6d7e8f90",
                    "cron": "0 3 * * *",
                    "timezone": "Europe/Berlin",
                    "loss": "cross_entropy",
                    "webhook_url": "https://ci.example.com/hooks/gradhealth",
                }
            ]
        },
    )
    model_name: str = Field(
        description="each run diagnoses the LATEST version of this model name (uploads with "
        "`name`) at run time"
    )
    batch_id: str
    cron: str = Field(description=CRON_DESCRIPTION)
    timezone: str = Field("UTC", description=TIMEZONE_DESCRIPTION)
    enabled: bool = True
    webhook_url: str | None = Field(None, description=WEBHOOK_DESCRIPTION)
    loss: LossKind | None = None
    mode: Literal["train", "eval"] | None = None
    precision: Literal["fp32", "bf16", "fp16"] | None = None
    device: str | None = Field(None, description="auto | cpu | cuda | cuda:N")
    options: dict[str, Any] = Field(
        default_factory=dict, description="any other DiagnoseOptions field (see the engine)"
    )


class ScheduleUpdate(BaseModel):
    """Only the fields sent change; `webhook_url: null` removes the webhook. Option fields
    are applied over the stored options."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"cron": "30 6 * * 1-5", "enabled": False}]},
    )
    model_name: str | None = None
    batch_id: str | None = None
    cron: str | None = Field(None, description=CRON_DESCRIPTION)
    timezone: str | None = Field(None, description=TIMEZONE_DESCRIPTION)
    enabled: bool | None = None
    webhook_url: str | None = Field(None, description=WEBHOOK_DESCRIPTION)
    loss: LossKind | None = None
    mode: Literal["train", "eval"] | None = None
    precision: Literal["fp32", "bf16", "fp16"] | None = None
    device: str | None = None
    options: dict[str, Any] | None = None


class ScheduleOut(BaseModel):
    model_config = _examples(SCHEDULE_EXAMPLE)
    id: str
    model_name: str
    batch_id: str
    options: dict[str, Any] = Field(description="the full diagnosis options each run uses")
    cron: str
    timezone: str
    enabled: bool
    webhook_url: str | None
    next_run_at: datetime = Field(description="UTC; the next tick (runs only while enabled)")
    last_run_at: datetime | None
    last_diagnosis_id: str | None
    last_error: str | None = Field(description="why the last tick queued nothing, if it did not")
    created_at: datetime
    updated_at: datetime


class SchedulePage(BaseModel):
    model_config = _examples({"items": [SCHEDULE_EXAMPLE], "next_cursor": EXAMPLE_CURSOR})
    items: list[ScheduleOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null at end")
