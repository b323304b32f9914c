"""Error messages that keep the cause: a TorchScript forward failure names the real error (not
the interpreter's header), the CLI's stderr is that one line (no torch log noise), and a .pt
batch refused by weights_only names the refused object without advising weights_only=False."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from service.engine.batches import load_batch
from service.engine.measure import failure_line
from service.errors import BatchError

GRADHEALTH = Path(sys.executable).parent / "gradhealth"


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("true",))


def test_a_pt_batch_with_a_code_object_names_it_and_never_advises_weights_only_false() -> None:
    buffer = io.BytesIO()
    torch.save({"x": _Evil()}, buffer)
    with pytest.raises(BatchError) as raised:
        load_batch(buffer.getvalue())
    message = raised.value.message
    assert "system" in message and ("posix.system" in message or "os.system" in message)
    assert "non-tensor object" in message
    assert ".npz" in message and ".safetensors" in message
    assert "weights_only=False" not in message and "`False`" not in message
    assert "arbitrary code execution" not in message
    assert "\n" not in message


def _torchscript_failure() -> RuntimeError:
    module = torch.jit.trace(nn.Linear(16, 32), torch.randn(8, 16))
    try:
        module(torch.randn(8, 7))
    except RuntimeError as exc:
        return exc
    raise AssertionError("the forward should have failed")


def test_failure_line_of_a_torchscript_error_is_the_real_cause() -> None:
    exc = _torchscript_failure()
    assert str(exc).startswith("The following operation failed in the TorchScript interpreter")
    line = failure_line(exc)
    assert "mat1 and mat2 shapes cannot be multiplied (8x7 and 16x32)" in line
    assert failure_line(RuntimeError("plain\nmore")) == "plain"


@pytest.mark.slow  # starts a Python process that imports torch
def test_cli_names_the_shape_error_of_a_torchscript_model_in_one_line(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 10))
    path, batch = tmp_path / "net.pt", tmp_path / "bad.npz"
    torch.jit.save(torch.jit.trace(model, torch.randn(8, 16)), str(path))
    rng = np.random.default_rng(0)
    np.savez(batch, x=rng.standard_normal((8, 7)).astype(np.float32), target=np.arange(8) % 10)
    result = subprocess.run(
        [str(GRADHEALTH), "diagnose", str(path), "--batch", str(batch)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "mat1 and mat2 shapes cannot be multiplied (8x7 and 16x32)" in lines[0]
    assert "TorchScript interpreter" not in lines[0]
