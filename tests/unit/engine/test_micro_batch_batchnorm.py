"""Micro-batches through BatchNorm in train mode: each part is normalised by its own
statistics (a note says so), and a part of one example, one value per channel, is refused
with what to change, as torch refuses it: the .pt2 ran it silently (its output the bias
alone, no gradient upstream, reported as vanishing gradients) and the ONNX graph's failure
was put on the batch's shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from service.engine import diagnose
from service.engine.options import DiagnoseOptions
from service.errors import BadInputError
from tests.support.export import to_onnx, to_torch_export
from tests.unit.engine.measure_support import npz_bytes


def _model_and_batch(features: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor, np.ndarray]:
    torch.manual_seed(0)
    if len(features) == 1:
        module: nn.Module = nn.Sequential(
            nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)
        )
    else:
        module = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 8 * 8, 4),
        )
    x = torch.randn(8, *features, generator=torch.Generator().manual_seed(1))
    return module, x, np.arange(8) % 4


def _export(fmt: str, module: nn.Module, x: torch.Tensor) -> bytes:
    return to_torch_export(module, x) if fmt == "torch_export" else to_onnx(module, x)


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_micro_batches_of_one_example_through_batchnorm1d_are_refused(fmt: str) -> None:
    module, x, target = _model_and_batch((16,))
    with pytest.raises(
        BadInputError,
        match=r"one value per channel \(--micro-batches 8 .*"
        r"fewer micro-batches",
    ):
        diagnose(
            _export(fmt, module, x), npz_bytes(x=x, target=target), DiagnoseOptions(micro_batches=8)
        )


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_micro_batches_through_batchnorm_are_noted_and_match_accumulation(fmt: str) -> None:
    module, x, target = _model_and_batch((16,))
    report = diagnose(
        _export(fmt, module, x), npz_bytes(x=x, target=target), DiagnoseOptions(micro_batches=4)
    )
    assert any("normalise each micro-batch (2+ examples)" in n for n in report.notes)
    module.train()
    for part in range(4):  # gradient accumulation, each part its own BatchNorm statistics
        rows = slice(2 * part, 2 * part + 2)
        loss = nn.functional.cross_entropy(module(x[rows]), torch.as_tensor(target[rows]))
        (loss / 4).backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    for p in report.parameters:
        grad = grads[p.name]
        assert grad is not None
        assert p.grad_norm == pytest.approx(grad.norm().item(), rel=1e-4)


def test_one_example_through_batchnorm2d_has_values_enough() -> None:
    """A conv's BatchNorm over one 8×8 image has 64 values per channel: torch runs it."""
    module, x, target = _model_and_batch((3, 8, 8))
    report = diagnose(
        to_torch_export(module, x), npz_bytes(x=x, target=target), DiagnoseOptions(micro_batches=8)
    )
    assert report.parameters and all(p.grad_norm for p in report.parameters)


class FixedBatch(nn.Module):
    """Reshapes with its batch size written in: any export keeps the 8."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(8, 4, 4).sum(1))


def test_a_micro_batch_the_model_cannot_run_says_to_run_without_micro_batches() -> None:
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    data, batch = to_torch_export(FixedBatch(), x), npz_bytes(x=x, target=np.arange(8) % 4)
    assert diagnose(data, batch, DiagnoseOptions()).parameters
    with pytest.raises(BadInputError, match=r"a micro-batch failed.*--micro-batches 1"):
        diagnose(data, batch, DiagnoseOptions(micro_batches=2))
