"""A padded batch (lengths [30, 12, 5] zero-padded to 30 steps, a [B, T] mask, a masked mean
over time): steps past an example's length get exactly no gradient, so the batch-summed time
profile's last step holds only the longest example's gradient and its first step every
example's. Its first/last ratio (130) was read as gradients exploding over time, where no
example's own ratio exceeds 6. The time check now reads such a batch per example, over each
example's own steps; the profile (`profiles.time`) stays the batch sum."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from service.engine.report import Finding, Report
from tests.support.export import to_onnx, to_torch_export

LENGTHS = [30, 12, 5]


class MaskedGru(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 6, batch_first=True)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(x)
        states = states * mask.unsqueeze(-1)
        return self.fc(states.sum(1) / mask.sum(1, keepdim=True))


class ExplodingRnn(MaskedGru):
    """A vanilla RNN whose recurrence expands: every example's gradient grows back in time."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.RNN(3, 16, batch_first=True)  # type: ignore[assignment]
        with torch.no_grad():
            weight = torch.randn(16, 16)
            weight /= torch.linalg.eigvals(weight).abs().max()
            self.rnn.get_parameter("weight_hh_l0").copy_(weight * 1.5)
            self.rnn.get_parameter("bias_hh_l0").zero_()
            self.rnn.get_parameter("bias_ih_l0").zero_()
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(x)
        last = (mask.sum(1) - 1).long()  # each example's own last step
        return self.fc(states[torch.arange(x.shape[0]), last])


def _padded(lengths: list[int], scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    mask = (torch.arange(30)[None] < torch.tensor(lengths)[:, None]).float()
    x = torch.randn(len(lengths), 30, 3) * scale * mask.unsqueeze(-1)
    return x, mask, torch.randn(len(lengths), 2)


def _report(model: bytes, x: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> Report:
    batch = io.BytesIO()
    np.savez(batch, x=x.numpy(), mask=mask.numpy(), target=target.numpy())
    return diagnose(model, batch.getvalue(), DiagnoseOptions())


def _export(fmt: str, module: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> bytes:
    if fmt == "pt2":
        return to_torch_export(module, (x, mask))
    return to_onnx(module, (x, mask), input_names=["x", "mask"])


def _time_findings(report: Report) -> list[Finding]:
    return [f for f in report.findings if f.evidence.get("axis") == "time"]


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_a_padded_batch_is_judged_per_example_over_time(fmt: str) -> None:
    x, mask, target = _padded(LENGTHS, 1.0)
    model = MaskedGru()  # its weights drawn after the batch, seed 0
    report = _report(_export(fmt, model, x, mask), x, mask, target)
    (profile,) = report.profiles.time
    # the profile is still the batch sum, whose first/last ratio mixes the lengths
    assert profile.first_last_ratio is not None and profile.first_last_ratio > 70
    assert profile.grad_norms[-1] > 0
    assert _time_findings(report) == []
    assert report.verdict != "unhealthy"
    assert any("5–30 of 30 steps" in note for note in report.notes)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_a_padded_batch_that_explodes_in_every_example_is_still_caught(fmt: str) -> None:
    x, mask, target = _padded([30, 26, 24], 1e-3)
    report = _report(_export(fmt, ExplodingRnn(), x, mask), x, mask, target)
    (finding,) = _time_findings(report)
    assert finding.kind == "exploding_gradients"
    evidence = finding.evidence
    assert evidence["per_example_ratio"] > 70
    assert evidence["example_ratios"]["min"] > 70  # every example explodes
    assert evidence["valid_lengths"] == {"min": 24, "median": 26, "max": 30, "examples": 3}


def test_micro_batches_join_the_examples_of_a_padded_batch() -> None:
    # each part's examples are rows of the per-example check, not summed into one
    x, mask, target = _padded([30, 26, 24, 30, 28, 25], 1e-3)
    batch = torch.export.Dim("batch", min=1)
    model = to_torch_export(ExplodingRnn(), (x, mask), ({0: batch}, {0: batch}))
    data = io.BytesIO()
    np.savez(data, x=x.numpy(), mask=mask.numpy(), target=target.numpy())
    evidence = []
    for parts in (1, 3):
        options = DiagnoseOptions.model_validate({"micro_batches": parts, "verify_fixes": False})
        report = diagnose(model, data.getvalue(), options)
        (finding,) = _time_findings(report)
        evidence.append(finding.evidence)
    whole, split = evidence
    assert split["valid_lengths"] == whole["valid_lengths"]
    assert split["valid_lengths"]["examples"] == 6
    assert split["per_example_ratio"] == pytest.approx(whole["per_example_ratio"], rel=1e-4)
