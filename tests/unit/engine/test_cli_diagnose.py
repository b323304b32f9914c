"""`gradhealth diagnose` end to end through the installed console script (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import cast

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
        for layer in cast(Iterable[nn.Linear], self.layers):
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


def _table_report() -> Report:
    """A report shaped like the ONNX GPT one: layer names that look like rich markup tags."""
    long_message = "Gradients vanish towards the input. " * 8
    return Report.model_validate(
        {
            "verdict": "unhealthy",
            "model": {
                "format": "onnx",
                "sha256": "0" * 64,
                "parameter_count": 1234,
                "conversion": {
                    "checked": True,
                    "max_abs_error": 1.5e-7,
                    "max_rel_error": 3.2e-5,
                    "reference": "onnxruntime 1.32.0 (CPUExecutionProvider)",
                },
            },
            "loss": {"kind": "cross_entropy", "value": 3.87},
            "device": "cpu",
            "layers": [
                {"name": "blocks.0.attn", "op": "MatMul", "depth": 0},
                {"name": "/blocks.0/self_attn/Add_3", "op": "Add", "depth": 1},
            ],
            "profiles": {
                "time": [
                    {
                        "input": "idx",
                        "axis": 1,
                        "tensor": "∂L/∂embedding",
                        "growth_factor": 1.48,
                        "first_last_ratio": 8.8e-4,
                    }
                ]
            },
            "findings": [
                {
                    "kind": "vanishing_gradients",
                    "severity": "error",
                    "message": long_message,
                    "layers": [f"blocks.{i}.attn" for i in range(7)],
                },
                {"kind": "init_scale", "severity": "warning", "message": "re-initialise them."},
            ],
            "recommendations": [
                {
                    "fix": "replace_activation",
                    "addresses": [0],
                    "rationale": "ReLU passes gradients at full scale.",
                    "verified": {"applied": True, "resolved": True},
                },
                {
                    "fix": "reinitialize_weights",
                    "addresses": [0, 1],
                    "rationale": "He initialisation.",
                    "verified": {"applied": True, "resolved": False},
                },
                {
                    "fix": "add_normalization",
                    "addresses": ["vanishing_gradients"],
                    "rationale": "A LayerNorm after each layer.",
                    "verified": {"applied": False, "reason": "adds layers to train"},
                },
            ],
            "environment": {"gradhealth": "0", "torch": "2", "device_name": "cpu"},
        }
    )


def test_table_prints_names_verbatim_and_says_what_each_fix_answers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from service.cli.diagnose import print_report

    print_report(_table_report())
    out = capsys.readouterr().out
    lines = out.splitlines()
    # names starting with a letter inside [...] used to be swallowed as rich markup tags
    assert "#0 error vanishing_gradients [blocks.0.attn, blocks.1.attn, blocks.2.attn, " in out
    assert "blocks.4.attn, … +2 more]:" in out
    assert "#1 warning init_scale:" in out
    assert "/blocks.0/self_attn/Add_3" in out
    assert "max abs error 1.50e-07, max rel error 3.20e-05" in out
    assert "∂L/∂embedding grows ×1.48 per step" in out
    assert "fix 1: replace_activation → #0 vanishing_gradients (verified on a copy: resolved)" in (
        out
    )
    assert (
        "fix 2: reinitialize_weights → #0 vanishing_gradients, #1 init_scale "
        "(tried on a copy: not resolved)" in out
    )
    assert "fix 3: add_normalization → vanishing_gradients (not tried on a copy: adds layers" in out
    # a long message wraps under its heading, indented, with no padding to the console width
    message_lines = [line for line in lines if "Gradients vanish towards the input." in line]
    assert len(message_lines) > 1
    assert all(line.startswith("   ") and not line.endswith(" ") for line in message_lines)


@pytest.mark.parametrize(
    ("applied", "resolved", "reason", "expected"),
    [
        (True, True, None, " (verified on a copy: resolved)"),
        (True, False, None, " (tried on a copy: not resolved)"),
        (True, None, "one pass cannot show it", " (tried on a copy: one pass cannot show it)"),
        (False, None, "needs a new layer", " (not tried on a copy: needs a new layer)"),
    ],
)
def test_verification_label_says_what_the_copy_showed(
    applied: bool, resolved: bool | None, reason: str | None, expected: str
) -> None:
    from service.cli.diagnose import _verified_label
    from service.engine.report import Recommendation, Verification

    rec = Recommendation(
        fix="clip_gradients",
        rationale="r",
        verified=Verification(applied=applied, resolved=resolved, reason=reason),
    )
    assert _verified_label(rec) == expected


def test_table_prints_the_reports_notes(capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli.diagnose import print_report

    report = _table_report().model_copy(update={"notes": ["BatchNorm was folded into conv1"]})
    print_report(report)
    lines = capsys.readouterr().out.splitlines()
    assert lines[lines.index("note:") + 1] == "   BatchNorm was folded into conv1"


def test_table_lists_a_qat_models_quantisers(capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli.diagnose import print_report
    from service.engine.report import QuantizerReport

    quantizers = [
        QuantizerReport(
            name="/QuantizeLinear",
            op="QuantizeLinear",
            input="/Relu_output_0",
            quantizes="activation",
            layer="layers.0",
            input_min=0.0,
            input_max=6.35,
            range_min=0.0,
            range_max=0.1275,
            clipped_fraction=0.46,
        ),
        QuantizerReport(
            name="/head/weight_fake_quant/QuantizeLinear",
            op="QuantizeLinear",
            input="head.weight",
            quantizes="weight",
            parameters=["head.weight"],
            layer="head",
            per_channel=True,
            range_min=-0.177,
            range_max=0.176,
        ),
    ]
    print_report(_table_report().model_copy(update={"quantizers": quantizers}))
    out = capsys.readouterr().out
    assert "fake quantisers (execution order)" in out
    row = next(line for line in out.splitlines() if "/QuantizeLinear " in line)
    assert "activation layers.0" in row and "[0, 0.128]" in row and "0.46" in row
    row = next(line for line in out.splitlines() if "weight_fake_quant" in line)
    assert "weight head.weight" in row and "[-0.177, 0.176] ch" in row
