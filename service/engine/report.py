"""The diagnosis report (CONTRACT.md §3, `report_version` "1").

Pydantic models so that the engine, the CLI, the API and the database all share one schema.
Extend freely (new optional fields, new enum values); never rename or remove a contract field.
Float fields may hold `inf`/`nan` (a non-finite gradient is a finding, not an error), so
`model_dump(mode="json")` is serialised with `allow_inf_nan`-tolerant JSON (see `to_json`).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

REPORT_VERSION = "1"

Verdict = Literal["healthy", "at_risk", "unhealthy"]
Severity = Literal["info", "warning", "error"]
ModelFormat = Literal["onnx", "torchscript", "torch_export"]
FindingKind = Literal[
    "vanishing_gradients",
    "exploding_gradients",
    "non_finite",
    "saturation",
    "dead_units",
    "init_scale",
    "fp16_underflow",
    "no_trainable_parameters",
    "quantizer_clipping",
]
FixKind = Literal[
    "replace_activation",
    "reinitialize_weights",
    "add_normalization",
    "add_residual_connections",
    "clip_gradients",
    "lower_learning_rate",
    "use_gated_recurrent_unit",
    "guard_numerics",
    "loss_scaling",
    "use_bf16",
    "recalibrate_quantizers",
    "straight_through_estimator",
    "attend_over_more_tokens",
    "normalize_targets",
]
SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "error": 2}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Model):
    name: str
    shape: list[int | str | None]  # symbolic dims keep their name; unknown is None
    dtype: str


class ConversionCheck(_Model):
    """ONNX only: the converted graph's forward output vs onnxruntime on the same batch."""

    checked: bool
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    reference: str | None = None  # e.g. "onnxruntime 1.31.1 (CPUExecutionProvider)"
    reason: str | None = None  # why it was not checked, or why it failed


class ModelInfo(_Model):
    format: ModelFormat
    sha256: str
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    parameter_count: int = 0
    probe_coverage: Literal["full", "parameters_only"] = "full"
    probe_coverage_reason: str | None = None
    conversion: ConversionCheck | None = None
    opset: int | None = None


class ArrayInfo(_Model):
    name: str
    shape: list[int]
    dtype: str
    role: Literal["input", "target"] = "input"
    feeds: str | None = None  # the model input it feeds


class BatchInfo(_Model):
    names: list[str] = []
    shapes: list[list[int]] = []
    dtypes: list[str] = []
    size: int = 0
    arrays: list[ArrayInfo] = []


class LossInfo(_Model):
    kind: str
    value: float | None = None
    reason: str | None = None  # why this kind was chosen by default


class ActivationStats(_Model):
    mean: float | None = None
    std: float | None = None
    saturated_fraction: float | None = None
    dead_fraction: float | None = None
    non_finite_fraction: float | None = None
    activation: str | None = None  # op type of the activation the stats describe


class LayerReport(_Model):
    name: str
    op: str
    depth: int
    activation_grad_norm: float | None = None
    activation_stats: ActivationStats = Field(default_factory=ActivationStats)
    params: list[str] = []
    grad_norm: float | None = None
    weight_norm: float | None = None
    grad_to_weight: float | None = None
    fan_in: int | None = None
    init_std_ratio: float | None = None  # weight std / the He or Xavier std for its fan-in
    # what init_std_ratio compares with: "he" (sqrt(2/fan_in)), "xavier" (sqrt(2/(fan_in +
    # fan_out))) or "recurrent" (1/√H); fan_out for Xavier's
    init_reference: str | None = None
    fan_out: int | None = None
    # its output reaches a model output through no other layer (the last layer, and each of
    # several heads): its activation is the model's output, not a hidden one
    output_head: bool = False


class QuantizerReport(_Model):
    """A fake quantiser of a quantisation-aware-training model (service/engine/quantizers.py):
    the share of what it quantises that falls outside its range, is clamped and gets no
    gradient through the straight-through estimator."""

    name: str  # its node
    op: str
    input: str  # the value it quantises
    quantizes: Literal["weight", "activation"]
    parameters: list[str] = []  # a weight quantiser's parameters
    layer: str | None = None  # the layer whose output (or weight) it quantises
    per_channel: bool = False
    input_min: float | None = None
    input_max: float | None = None
    # the range it represents, in its input's units (per channel: the widest channel's ends)
    range_min: float | None = None
    range_max: float | None = None
    clipped_fraction: float = 0.0
    # the factor its scale must grow by for its range to hold every value of the batch
    covering_scale_factor: float = 1.0


class ParameterReport(_Model):
    name: str
    shape: list[int]
    layer: str | None = None
    grad_norm: float | None = None
    weight_norm: float | None = None
    grad_to_weight: float | None = None
    non_finite: bool = False
    non_finite_count: int = 0
    fp16_underflow_fraction: float = 0.0
    fp16_overflow_fraction: float = 0.0


class DepthProfile(_Model):
    layers: list[str] = []
    grad_norms: list[float | None] = []
    growth_factor: float | None = None  # fitted per-layer factor of ‖∂L/∂a‖, input → output
    first_last_ratio: float | None = None  # first layer's norm / last layer's norm
    # layers with no ‖∂L/∂a‖ (not observed, or off the loss's path): not in the profile or fit
    layers_left_out: int = 0
    left_out: list[str] = []


class TimeProfile(_Model):
    input: str
    axis: int
    # the tensor whose per-step gradient norm this is: the input itself, or for token inputs
    # the embedding output computed from them
    tensor: str | None = None
    grad_norms: list[float] = []
    growth_factor: float | None = None  # fitted per-step factor, first step → last
    first_last_ratio: float | None = None
    # trailing steps the loss does not read (exactly zero gradient: a shifted next-token loss);
    # the fit and the ratio end at the step before them
    unreached_last_steps: int = 0


class Profiles(_Model):
    depth: DepthProfile = Field(default_factory=DepthProfile)
    time: list[TimeProfile] = []


class Finding(_Model):
    kind: FindingKind
    severity: Severity
    message: str
    layers: list[str] = []
    evidence: dict[str, Any] = {}


class Verification(_Model):
    applied: bool
    transform: str | None = None
    before: dict[str, Any] = {}
    # also, when the fix brought findings that were not there before: `new_errors` and
    # `new_warnings` (their kinds) and `new_findings` (kind, severity, axis, layers, message);
    # `revealed_findings` (same entries): what an exact rewrite (log_softmax) shows that the
    # NaN/Inf hid before
    after: dict[str, Any] = {}
    # the addressed findings are gone after the fix and no new error appeared
    resolved: bool | None = None
    reason: str | None = None  # why it could not be applied, or why it is not resolved


class Recommendation(_Model):
    fix: FixKind
    addresses: list[int | str] = []
    rationale: str
    snippet: str = ""
    params: dict[str, Any] = {}
    layers: list[str] = []
    verified: Verification | None = None


class Timing(_Model):
    load: float = 0.0
    convert: float = 0.0
    forward: float = 0.0
    backward: float = 0.0
    analysis: float = 0.0
    verification: float = 0.0
    total: float = 0.0


class Environment(_Model):
    gradhealth: str
    torch: str
    onnx: str | None = None
    onnxruntime: str | None = None
    device_name: str


class Report(_Model):
    report_version: str = REPORT_VERSION
    verdict: Verdict = "healthy"
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    model: ModelInfo
    batch: BatchInfo = Field(default_factory=BatchInfo)
    loss: LossInfo
    device: str
    mode: Literal["train", "eval"] = "train"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    micro_batches: int = 1
    layers: list[LayerReport] = []
    parameters: list[ParameterReport] = []
    profiles: Profiles = Field(default_factory=Profiles)
    quantizers: list[QuantizerReport] = []  # fake quantisers (QAT models) only
    findings: list[Finding] = []
    recommendations: list[Recommendation] = []
    timing: Timing = Field(default_factory=Timing)
    environment: Environment
    notes: list[str] = []

    def worst_severity(self) -> Severity | None:
        if not self.findings:
            return None
        return max((f.severity for f in self.findings), key=SEVERITY_RANK.__getitem__)

    def compute_verdict(self) -> Verdict:
        worst = self.worst_severity()
        if worst is None or worst == "info":
            return "healthy"
        return "at_risk" if worst == "warning" else "unhealthy"

    def to_jsonable(self) -> dict[str, Any]:
        """JSON-safe dict: non-finite floats become the strings "inf", "-inf", "nan"."""
        return _finite_json(self.model_dump(mode="json"))


def _finite_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_json(v) for v in value]
    return value
