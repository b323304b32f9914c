"""Options of one diagnosis, shared by the CLI, the REST API and the engine."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

LossKind = Literal[
    "cross_entropy", "nll", "mse", "l1", "bce_with_logits", "bce", "output_norm", "model_output"
]


class DiagnoseOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loss: LossKind | None = Field(
        None, description="loss to differentiate; default from the target (CONTRACT.md §2)"
    )
    mode: Literal["train", "eval"] = "train"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dropout: bool = Field(False, description="train mode only: keep dropout active")
    micro_batches: int = Field(1, ge=1, description="split the batch and accumulate gradients")
    verify_fixes: bool = Field(True, description="apply automatic fixes to a copy and re-measure")
    check_conversion: bool = Field(True, description="ONNX: compare forward with onnxruntime")
    thresholds: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the detectors' named thresholds"
    )
