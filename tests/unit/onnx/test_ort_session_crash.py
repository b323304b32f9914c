"""onnxruntime dying while it creates the conformance check's session (a SIGSEGV, not an
exception) costs the check, never the diagnosis (service/engine/onnx/ort_session.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from service.engine.onnx import ort_session
from service.engine.onnx.ort_session import SessionCrashed, SessionSettings, create_session
from tests.support.export import to_onnx

# What a child does where onnxruntime crashes: the same death, without depending on a bug of
# one onnxruntime version
_SEGFAULTING_CHILD = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"


def _identity_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


SETTINGS = SessionSettings(("CPUExecutionProvider",), config={"session.disable_quant_qdq": "1"})


def test_a_session_is_created_with_the_settings_after_the_child_survived() -> None:
    session = create_session(_identity_model(), SETTINGS)
    assert session.get_session_options().log_severity_level == 4
    got = session.run(None, {"x": np.array([1.0, 2.0], np.float32)})[0]
    np.testing.assert_array_equal(got, [1.0, 2.0])


def test_a_child_killed_by_a_signal_is_a_crash_named_by_its_signal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ort_session, "_CHILD", _SEGFAULTING_CHILD)
    with pytest.raises(SessionCrashed, match=r"onnxruntime crashed \(SIGSEGV\) creating a session"):
        create_session(_identity_model(), SETTINGS)


def test_an_exception_in_the_child_is_raised_here_with_onnxruntimes_message() -> None:
    with pytest.raises(Exception, match=r"(?i)protobuf|parse|load"):
        create_session(b"not a model", SETTINGS)


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 8, mode="mean")
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(ids))


@pytest.mark.slow  # an export and a CLI process that imports torch
def test_the_cli_reports_a_model_whose_session_crashes_onnxruntime(tmp_path: Path) -> None:
    """nn.EmbeddingBag exported by the dynamo exporter without its optimizer: onnxruntime 1.32
    dies creating its session (SIGSEGV). The diagnosis still ends in a report, whose conversion
    check says why it was not run (or, with an onnxruntime that loads the model, ran it)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (6, 5))
    path = tmp_path / "bag.onnx"
    path.write_bytes(to_onnx(Bag(), ids, dynamo=True, optimize=False, input_names=["ids"]))
    batch = tmp_path / "batch.npz"
    np.savez(batch, ids=ids.numpy(), target=np.arange(6) % 3)
    cli = Path(sys.executable).with_name("gradhealth")
    done = subprocess.run(
        [str(cli), "diagnose", str(path), "--batch", str(batch), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode in (0, 1), done.stderr[-2000:]
    conversion = json.loads(done.stdout)["model"]["conversion"]
    if conversion["max_abs_error"] is None:
        assert "onnxruntime crashed (SIGSEGV)" in conversion["reason"]
    else:
        assert conversion["max_abs_error"] < 1e-5
