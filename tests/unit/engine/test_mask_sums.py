"""Two masks added where both mask a position: Hugging Face masks with the dtype's min, not
-inf, and a causal mask plus a local-window (or padding) mask at finfo.min each overflows to
-inf there (GPT-Neo's local attention). That -inf is a mask's intended value, absorbed by the
softmax: no NaN/Inf finding, as a -inf mask gives none. A -inf from an add of ordinary values
still is one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from tests.support.export import to_onnx, to_torch_export
from tests.support.runner_jobs import npz_batch


class LocalCausalAttention(nn.Module):
    def __init__(self, overflow_in_scores: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)
        self.overflow_in_scores = overflow_in_scores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(1, 2)
        steps = torch.arange(x.shape[1])
        lowest = torch.finfo(scores.dtype).min
        causal = scores.masked_fill(steps[None, :] > steps[:, None], lowest)
        window = torch.where((steps[:, None] - steps[None, :]).abs() > 2, lowest, 0.0)
        if self.overflow_in_scores:  # no mask: every score pushed down, none left attended
            window = torch.full_like(scores, lowest)
        attended = torch.softmax(causal + window, dim=-1) @ self.v(x)
        return self.head(attended.mean(1))


X = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(1))
TARGET = np.array([0, 1, 2])


def _export(model: nn.Module, fmt: str) -> bytes:
    return to_torch_export(model, X) if fmt == "pt2" else to_onnx(model, X)


@pytest.mark.parametrize("fmt", ["pt2", "legacy"])
def test_a_causal_mask_plus_a_window_mask_is_no_nan_inf_finding(fmt: str) -> None:
    report = diagnose(_export(LocalCausalAttention(), fmt), npz_batch(X, TARGET), DiagnoseOptions())
    assert not [f for f in report.findings if f.kind == "non_finite"]
    assert report.loss.value is not None and np.isfinite(report.loss.value)


def test_scores_overflowing_into_the_mask_are_still_told() -> None:
    report = diagnose(
        _export(LocalCausalAttention(overflow_in_scores=True), "pt2"),
        npz_batch(X, TARGET),
        DiagnoseOptions(),
    )
    assert [f for f in report.findings if f.kind == "non_finite"]
