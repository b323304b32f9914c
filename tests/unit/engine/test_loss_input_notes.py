"""`--loss nll` on raw logits: the report says the output looks like logits and what to use."""

from __future__ import annotations

import torch
from torch import nn

from service.engine import diagnose
from service.engine.losses import loss_input_notes
from service.engine.options import DiagnoseOptions
from tests.support.export import to_torch_export
from tests.unit.engine.measure_support import npz_bytes


def _notes(module: nn.Module) -> list[str]:
    torch.manual_seed(0)
    x, target = torch.randn(16, 4), torch.randint(0, 3, (16,))
    model = to_torch_export(module, x)
    report = diagnose(model, npz_bytes(x=x, target=target), DiagnoseOptions(loss="nll"))
    return [n for n in report.notes if "--loss nll" in n]


def test_nll_on_logits_is_noted_with_the_fix() -> None:
    torch.manual_seed(0)
    (note,) = _notes(nn.Sequential(nn.Linear(4, 3)))
    assert "looks like logits" in note and "of 16 rows" in note
    assert "--loss cross_entropy" in note and "log_softmax" in note


def test_nll_on_log_softmax_is_not_noted() -> None:
    torch.manual_seed(0)
    assert _notes(nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=1))) == []


def test_negative_values_that_are_not_log_probabilities_are_noted() -> None:
    logits = -torch.rand(5, 3) - 1.0  # all < 0, yet rows' exp sum to < 1
    (note,) = loss_input_notes("nll", [logits], None)
    assert "5 of 5 rows" in note
    assert loss_input_notes("cross_entropy", [logits], None) == []


def test_a_sequence_models_log_probabilities_are_read_on_their_class_axis() -> None:
    """[B, T, V] log-probabilities with [B, T] labels: rows are over V, not over T."""
    log_probs = torch.randn(2, 5, 7).log_softmax(-1)
    labels = torch.randint(0, 7, (2, 5))
    assert loss_input_notes("nll", [log_probs], labels) == []
    (note,) = loss_input_notes("nll", [torch.randn(2, 5, 7)], labels)
    assert "of 10 rows" in note
