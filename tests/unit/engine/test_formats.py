"""Model format detection from content, never from the file name."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from service.engine.formats.detect import detect_format
from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from service.errors import ModelFormatError
from tests.support.export import to_onnx, to_torch_export, to_torchscript
from tests.unit.engine.measure_support import npz_bytes


@pytest.fixture(scope="module")
def model_bytes() -> dict[str, bytes]:
    module, x = nn.Sequential(nn.Linear(3, 2), nn.ReLU()), torch.randn(2, 3)
    return {
        "torch_export": to_torch_export(module, x),
        "torchscript": to_torchscript(module, x),
        "onnx": to_onnx(module, x),
    }


@pytest.mark.parametrize("fmt", ["torch_export", "torchscript", "onnx"])
def test_format_from_content_even_when_renamed(
    fmt: str, model_bytes: dict[str, bytes], tmp_path: object
) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "model.npz"  # a misleading name
    path.write_bytes(model_bytes[fmt])
    assert detect_format(path.read_bytes()) == fmt


def test_pickled_checkpoint_is_refused_with_advice() -> None:
    buffer = io.BytesIO()
    torch.save(nn.Linear(2, 2).state_dict(), buffer)
    with pytest.raises(ModelFormatError, match=r"torch\.save checkpoint"):
        detect_format(buffer.getvalue())


@pytest.mark.parametrize("data", [b"", b"hello world", b"PK\x03\x04broken"])
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(ModelFormatError):
        detect_format(data)


def test_damaged_pt2_names_the_loader() -> None:
    import zipfile

    from service.engine.formats.torch_export import load_torch_export

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/archive_format", "pt2")
        archive.writestr("archive/models/model.json", "{not json")
    data = buffer.getvalue()
    assert detect_format(data) == "torch_export"
    with pytest.raises(ModelFormatError, match=r"torch\.export\.load"):
        load_torch_export(data)


@pytest.mark.parametrize("fmt", ["torch_export", "torchscript"])
def test_parameters_frozen_in_the_model_are_named_in_a_note(fmt: str) -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    for p in module[0].parameters():
        p.requires_grad_(False)  # a fine-tuned model's frozen backbone
    x = torch.randn(8, 6)
    model = to_torch_export(module, x) if fmt == "torch_export" else to_torchscript(module, x)
    report = diagnose(model, npz_bytes(x=x), DiagnoseOptions(verify_fixes=False))
    (note,) = [n for n in report.notes if "frozen" in n]
    assert "2 parameter(s)" in note and "0.weight, 0.bias" in note and "2.weight" not in note


class ScaledLoss(nn.Module):
    """Returns its own loss with a Python float factor: torch.jit.trace bakes 0.01 in as a
    double constant, so the gradient reaching `y` from that term is float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return y.mean() + 0.01 * y.sum()


def test_a_traced_model_with_a_double_gradient_is_measured() -> None:
    module, x = ScaledLoss(), torch.randn(16, 20, generator=torch.Generator().manual_seed(1))
    report = diagnose(to_torchscript(module, x), npz_bytes(x=x), DiagnoseOptions())
    assert report.model.probe_coverage == "full"
    module(x).backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    for p in report.parameters:
        grad = grads[p.name]
        assert grad is not None and p.grad_norm == pytest.approx(grad.norm().item(), rel=1e-5)


class UnusedBranch(nn.Module):
    """A module the forward never calls (WaveNet's last residual conv, an auxiliary head):
    the TorchScript → FX conversion drops its parameters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 4)
        self.unused = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_an_unused_module_keeps_full_probes_and_is_noted() -> None:
    """TorchScript fell back to parameters-only for the whole model ("lost parameters")."""
    module, x = UnusedBranch(), torch.randn(6, 8)
    data = to_torchscript(module, x)
    report = diagnose(data, npz_bytes(x=x), DiagnoseOptions())
    assert report.model.probe_coverage == "full"
    assert [layer.name for layer in report.layers] == ["fc"]
    (note,) = [n for n in report.notes if "never reads" in n]
    assert "unused.bias, unused.weight" in note
