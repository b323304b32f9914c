"""A next-token language model's last position has no target (-100, or the shift inside a
Hugging Face model's loss): its step gets exactly no gradient, which is no decay. The time
profile's ratio ended at that zero (infinite, so no judgement at all: a vanilla RNN language
model's exploding gradient went unreported); now it ends at the last step the loss reads."""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn

from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from tests.support.export import to_torch_export


class RnnLanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)
        self.rnn = nn.RNN(8, 16, batch_first=True)
        with torch.no_grad():  # an expanding recurrence: the gradient grows back in time
            self.rnn.get_parameter("weight_hh_l0").mul_(4.0)
        self.out = nn.Linear(16, 20)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(self.embed(ids))
        return self.out(states)


def test_an_rnn_lm_without_a_last_target_is_judged_over_the_steps_the_loss_reads() -> None:
    ids = torch.randint(0, 20, (4, 30), generator=torch.Generator().manual_seed(1))
    target = np.roll(ids.numpy(), -1, axis=1)
    target[:, -1] = -100  # the next token after the last is unknown
    batch = io.BytesIO()
    np.savez(batch, ids=ids.numpy(), target=target)
    report = diagnose(to_torch_export(RnnLanguageModel(), ids), batch.getvalue(), DiagnoseOptions())
    (profile,) = report.profiles.time
    assert profile.grad_norms[-1] == 0.0 and profile.unreached_last_steps == 1
    assert profile.first_last_ratio is not None and profile.first_last_ratio > 70
    (finding,) = [
        f
        for f in report.findings
        if f.kind == "exploding_gradients" and f.evidence["axis"] == "time"
    ]
    assert finding.evidence["unreached_last_steps"] == 1
    assert finding.evidence["steps"] == 29
