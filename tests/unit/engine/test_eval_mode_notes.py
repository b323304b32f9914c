"""`--mode eval` on a model exported in training mode: its batch norms still normalise with
the batch's statistics (the graph runs as exported), and a note says so."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from tests.support.export import to_onnx, to_torch_export
from tests.unit.engine.measure_support import npz_bytes


def _net() -> nn.Module:
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(8)
    # running statistics far from the batch's: the modes differ
    norm.running_mean = torch.full((8,), 2.0)
    norm.running_var = torch.full((8,), 4.0)
    return nn.Sequential(nn.Linear(6, 8), norm, nn.ReLU(), nn.Linear(8, 3))


def _export(module: nn.Module, x: torch.Tensor, fmt: str) -> bytes:
    if fmt == "torch_export":
        return to_torch_export(module, x)
    return to_onnx(module, x, training=module.training, input_names=["x"])


def _notes(data: bytes, x: torch.Tensor, mode: str) -> list[str]:
    target = torch.arange(x.shape[0]) % 3
    options = DiagnoseOptions(mode=mode)
    report = diagnose(data, npz_bytes(x=x, target=target), options)
    return [note for note in report.notes if note.startswith("mode eval")]


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_eval_mode_on_a_training_mode_export_says_its_batch_norms_use_batch_statistics(
    fmt: str,
) -> None:
    x = torch.randn(16, 6)
    data = _export(_net().train(), x, fmt)
    (note,) = _notes(data, x, "eval")
    assert "1 batch norm(s)" in note and "export it in eval mode" in note
    assert _notes(data, x, "train") == []


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_an_eval_mode_export_gets_no_such_note(fmt: str) -> None:
    x = torch.randn(16, 6)
    assert _notes(_export(_net().eval(), x, fmt), x, "eval") == []
