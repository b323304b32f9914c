"""`gradhealth diagnose` end to end through the installed console script (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from service.engine.report import Report
from tests.support.export import to_torch_export, to_torchscript

pytestmark = pytest.mark.slow  # each run starts a Python process that imports torch

GRADHEALTH = Path(sys.executable).parent / "gradhealth"


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GRADHEALTH), "diagnose", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


class HealthyMLP(nn.Module):
    """He-initialised MLP with LayerNorm: the issue's healthy control."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.norms = nn.ModuleList(nn.LayerNorm(16) for _ in range(3))
        self.head = nn.Linear(16, 4)
        for layer in self.layers:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, norm in zip(self.layers, self.norms, strict=True):
            x = torch.relu(norm(layer(x)))
        return self.head(x)


class OuterProduct(nn.Module):
    """Asks for a 4 TiB tensor: a real resource failure (exit 3), not bad input."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.scale
        return (y.unsqueeze(-1) * y.unsqueeze(-2)).sum(-1)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    y = torch.randint(0, 4, (32,))
    deep = []
    for _ in range(12):
        deep += [nn.Linear(16, 16), nn.Sigmoid()]
    sigmoid = nn.Sequential(*deep, nn.Linear(16, 4))
    paths = {
        # misleading names: the format comes from the content
        "healthy": root / "healthy.onnx",
        "sigmoid": root / "sigmoid.bin",
        "batch": root / "batch.npz",
        "bad_batch": root / "bad.npz",
        "huge": root / "huge.pt2",
        "huge_batch": root / "huge.npz",
        "garbage": root / "garbage.pt2",
    }
    paths["healthy"].write_bytes(to_torch_export(HealthyMLP(), x))
    paths["sigmoid"].write_bytes(to_torchscript(sigmoid, x))
    np.savez(paths["batch"], x=x.numpy(), target=y.numpy())
    np.savez(paths["bad_batch"], x=np.zeros((32, 5), np.float32), target=y.numpy())
    big = torch.randn(1, 2**20)
    paths["huge"].write_bytes(to_torch_export(OuterProduct(), big))
    np.savez(paths["huge_batch"], x=big.numpy())
    paths["garbage"].write_bytes(b"definitely not a model")
    return paths


def test_json_prints_exactly_one_valid_report_and_exit_1_on_findings(
    files: dict[str, Path],
) -> None:
    result = run(files["sigmoid"], "--batch", files["batch"], "--format", "json", "--device", "cpu")
    assert result.returncode == 1, result.stderr
    report = Report.model_validate(json.loads(result.stdout))  # one object, nothing else
    assert report.model.format == "torchscript"
    assert report.model.probe_coverage == "full"
    assert report.loss.kind == "cross_entropy"
    assert [layer.name for layer in report.layers][:2] == ["0", "2"]
    assert report.verdict == "unhealthy"
    assert any(f.kind == "vanishing_gradients" and f.severity == "error" for f in report.findings)


def test_table_output_and_exit_0_for_a_healthy_model(files: dict[str, Path]) -> None:
    result = run(files["healthy"], "--batch", files["batch"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "healthy" in result.stdout
    assert "layers.0" in result.stdout and "norms.2" in result.stdout
    assert result.stderr.strip() == "" or "Traceback" not in result.stderr


def test_fail_on_warning_counts_warnings(files: dict[str, Path]) -> None:
    result = run(
        files["healthy"], "--batch", files["batch"], "--format", "json", "--fail-on", "warning"
    )
    report = Report.model_validate(json.loads(result.stdout))
    assert not any(f.severity == "error" for f in report.findings)  # the healthy control
    expected = 1 if any(f.severity == "warning" for f in report.findings) else 0
    assert result.returncode == expected


@pytest.mark.parametrize(
    ("model", "batch", "extra", "message"),
    [
        ("healthy", "bad_batch", [], "input 'x' expects shape [32, 16]"),
        ("garbage", "batch", [], "not ONNX, TorchScript or a torch.export program"),
        ("healthy", "missing", [], "does not exist"),
        ("healthy", "batch", ["--mode", "sideways"], "--mode"),
        ("healthy", "batch", ["--loss", "hinge"], "--loss"),
    ],
)
def test_user_errors_exit_2_with_one_line(
    files: dict[str, Path], model: str, batch: str, extra: list[str], message: str
) -> None:
    batch_path = files.get(batch, Path("/nonexistent/batch.npz"))
    result = run(files[model], "--batch", batch_path, *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_internal_failure_exits_3_without_traceback(files: dict[str, Path]) -> None:
    result = run(files["huge"], "--batch", files["huge_batch"], "--device", "cpu")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "out of memory" in result.stderr
    assert "Traceback" not in result.stderr
