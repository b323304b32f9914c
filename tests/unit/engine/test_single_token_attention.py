"""Attention over a single token: a softmax over one score is 1 whatever the scores, so the
query and key projections get exactly no gradient (a tiny MobileViT's last stages, a vision
transformer whose patching leaves one token). The report names the softmax, not a vanishing
depth profile or an initialisation, and recommends more tokens; with more tokens, nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from service.engine.report import Report
from tests.support.export import to_onnx, to_torch_export
from tests.support.runner_jobs import npz_batch


class TinyAttention(nn.Module):
    """Written out (scores, softmax), or fused: torch's scaled_dot_product_attention, which
    Hugging Face models call by default and a .pt2 keeps as one op."""

    def __init__(self, fused: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fused = fused
        self.embed = nn.Linear(5, 8)
        self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))  # [B, tokens, 8]
        q, k, v = self.query(h), self.key(h), self.value(h)
        if self.fused:
            attended = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            scores = q @ k.transpose(1, 2) / 8**0.5
            attended = torch.softmax(scores, dim=-1) @ v
        return self.head((h + attended).mean(1))


def _diagnose(fmt: str, tokens: int, fused: bool = False) -> Report:
    x = torch.randn(6, tokens, 5, generator=torch.Generator().manual_seed(1))
    model = TinyAttention(fused)
    data = to_torch_export(model, x) if fmt == "pt2" else to_onnx(model, x, dynamo=fmt == "dynamo")
    return diagnose(data, npz_batch(x, np.array([0, 1, 2, 0, 1, 2])), DiagnoseOptions())


@pytest.mark.parametrize("fmt", ["pt2", "legacy", "dynamo"])
def test_attention_over_one_token_is_named_as_the_cut_with_its_remedy(fmt: str) -> None:
    report = _diagnose(fmt, tokens=1)
    (finding,) = [f for f in report.findings if f.kind == "vanishing_gradients"]
    cut = finding.evidence["gradient_cut"]
    assert cut["kind"] == "single_element_softmax"
    assert set(cut["layers"]) == {"query", "key"}
    assert "attention over a single token" in finding.message
    assert finding.severity == "warning"  # the rest of the model trains
    fixes = [r.fix for r in report.recommendations]
    assert "attend_over_more_tokens" in fixes and "straight_through_estimator" not in fixes


def test_fused_attention_with_one_key_is_named_as_the_cut() -> None:
    report = _diagnose("pt2", tokens=1, fused=True)
    (finding,) = [f for f in report.findings if f.kind == "vanishing_gradients"]
    cut = finding.evidence["gradient_cut"]
    assert cut["kind"] == "single_element_softmax" and set(cut["layers"]) == {"query", "key"}
    assert "scaled_dot_product_attention" in cut["op"] and "with one key" in finding.message
    assert "attend_over_more_tokens" in [r.fix for r in report.recommendations]


@pytest.mark.parametrize(("fmt", "fused"), [("pt2", False), ("legacy", False), ("pt2", True)])
def test_attention_over_several_tokens_has_no_cut(fmt: str, fused: bool) -> None:
    report = _diagnose(fmt, tokens=4, fused=fused)
    assert not [f for f in report.findings if f.kind == "vanishing_gradients"]
    assert "attend_over_more_tokens" not in [r.fix for r in report.recommendations]
