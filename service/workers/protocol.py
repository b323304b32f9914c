"""Messages between the supervisor and its children (pickled over a multiprocessing Pipe).

supervisor → child: `JobRequest`, or None to ask the child to exit.
child → supervisor: `ChildReady` once torch (and CUDA) are initialised, then one `JobResult`
per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class JobRequest:
    job_id: str
    kind: str  # "diagnose" | "inspect"
    attempt: int
    model_sha256: str
    batch_sha256: str | None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChildReady:
    pid: int
    device: str  # what the child runs on, e.g. "cpu" or "cuda:0 (NVIDIA H100)"


@dataclass(frozen=True)
class JobResult:
    job_id: str
    ok: bool
    report: dict[str, Any] | None = None  # diagnose: the report JSON
    verdict: str | None = None
    model_info: dict[str, Any] | None = None  # inspect: format, inputs, outputs, parameter_count
    error_code: str | None = None
    error_message: str | None = None
    engine_s: float = 0.0  # time inside the engine (or the inspection), for bench/service_costs.py
