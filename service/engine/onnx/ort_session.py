"""The conformance check's onnxruntime session, created only where it cannot take the process
down with it.

onnxruntime can die on a model instead of raising: creating the session of an nn.EmbeddingBag
exported by `torch.onnx.export(dynamo=True, optimize=False)` ends in SIGSEGV (onnxruntime
1.32; the converter runs that model fine). In the CLI or a worker that would be the whole
diagnosis lost, report and all, for want of its conformance check. So the session is first
created in a child process with the same options: a child killed by a signal means the check
is skipped with that reason, and the diagnosis goes on. Cost: a Python start and onnxruntime's
import in the child (~0.3 s) and a second session creation, once per model (a worker keeps
the session of each model it holds).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

# A child that takes longer than this is left to finish on its own account: the probe is
# inconclusive and the session is created here, as it was before there was a probe.
PROBE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class SessionSettings:
    """The options a session is created with, in a form a child process can be given."""

    providers: tuple[str, ...]
    intra_op_num_threads: int = 0  # 0: onnxruntime's default
    config: dict[str, str] = field(default_factory=dict)
    # fatal only: its failures reach us as exceptions, which the check or the user's error
    # message quotes; its own log would print them to stderr again
    log_severity_level: int = 4


def _options(settings: dict[str, Any]) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = settings["log_severity_level"]
    for key, value in settings["config"].items():
        options.add_session_config_entry(key, value)
    if settings["intra_op_num_threads"]:
        options.intra_op_num_threads = settings["intra_op_num_threads"]
    return options


def create_session(serialized: bytes, settings: SessionSettings) -> Any:
    """An onnxruntime InferenceSession of the model; raises what onnxruntime raises, and
    `SessionCrashed` where creating it killed a child process that tried first."""
    crash = _crash_creating(serialized, settings)
    if crash is not None:
        raise SessionCrashed(crash)
    import onnxruntime as ort

    spec = asdict(settings)
    return ort.InferenceSession(serialized, _options(spec), providers=list(settings.providers))


class SessionCrashed(Exception):
    """Creating the session killed the process that tried (the message says how)."""


# The child: the same options, the model on stdin; an exception is not a crash (this
# process's own creation raises it again, with its message).
_CHILD = """
import json, sys
from service.engine.onnx.ort_session import _options
import onnxruntime as ort
settings = json.loads(sys.argv[1])
model = sys.stdin.buffer.read()
try:
    ort.InferenceSession(model, _options(settings), providers=settings["providers"])
except Exception:
    pass
"""


def _crash_creating(serialized: bytes, settings: SessionSettings) -> str | None:
    """How creating the session killed a child process, or None (it did not, or the child
    could not tell in time)."""
    try:
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(asdict(settings))],
            input=serialized,
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
            cwd=_repository_root(),
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if child.returncode >= 0:
        return None
    try:
        name = signal.Signals(-child.returncode).name
    except ValueError:
        name = f"signal {-child.returncode}"
    return f"onnxruntime crashed ({name}) creating a session of the model (in a separate process)"


def _repository_root() -> str:
    """Where `service` is importable from in the child."""
    from pathlib import Path

    return str(Path(__file__).resolve().parents[3])
