"""A nanoGPT-style model (tied input embedding and output projection, a causal mask written
with `masked_fill(-inf)` from a registered buffer, labels of -100) diagnosed from the three
files a user would have: a torch.export `.pt2`, `torch.onnx.export(dynamo=True)` (its optimizer
on, as by default) and the legacy exporter. The three reports must tell the same story: the
same loss, layers, findings and per-parameter gradients, no NaN/Inf "origin" at the mask, the
tied weight counted once, and the mask buffer no parameter."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.engine import diagnose
from service.engine.options import DiagnoseOptions
from service.engine.report import Report
from tests.support.export import to_onnx, to_torch_export
from tests.unit.engine.measure_support import npz_bytes

VOCAB, STEPS, WIDTH, HEADS = 50, 8, 16, 2


class Block(nn.Module):
    mask: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.register_buffer("mask", torch.tril(torch.ones(STEPS, STEPS)).view(1, 1, STEPS, STEPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = x.shape
        q, k, v = self.qkv(self.ln(x)).split(WIDTH, dim=2)
        q, k, v = (t.view(batch, steps, HEADS, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(WIDTH // HEADS)
        scores = scores.masked_fill(self.mask[:, :, :steps, :steps] == 0, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, steps, WIDTH)
        return x + self.proj(y)


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.ln_f = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.wte.weight  # tied, as GPT-2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


IDS = torch.randint(0, VOCAB, (4, STEPS), generator=torch.Generator().manual_seed(1))
LABELS = torch.randint(0, VOCAB, (4, STEPS), generator=torch.Generator().manual_seed(2))
LABELS[:, :2] = -100  # prompt positions, ignored by the loss
FORMATS = ("torch_export", "onnx_dynamo", "onnx")
TIED = {"wte.weight", "head.weight"}


@functools.cache
def _report(fmt: str) -> Report:
    module = TinyGPT().train()
    if fmt == "torch_export":
        model = to_torch_export(module, IDS)
    elif fmt == "onnx_dynamo":
        model = to_onnx(module, IDS, dynamo=True, optimize=True)
    else:
        model = to_onnx(module, IDS)
    batch = npz_bytes(idx=IDS, target=LABELS)
    return diagnose(model, batch, DiagnoseOptions(verify_fixes=False))


def _expected_gradients() -> dict[str, torch.Tensor]:
    module = TinyGPT().train()
    logits = module(IDS)
    F.cross_entropy(logits.reshape(-1, VOCAB), LABELS.reshape(-1)).backward()
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reports_the_modules_gradients_once_each(fmt: str) -> None:
    report = _report(fmt)
    expected = _expected_gradients()  # named_parameters: the tied tensor once, as wte.weight
    by_name = {p.name: p for p in report.parameters}
    tied = [name for name in by_name if name in TIED]
    assert len(tied) == 1, list(by_name)
    assert set(by_name) - TIED == set(expected) - TIED
    assert report.model.parameter_count == sum(g.numel() for g in expected.values())
    for name, grad in expected.items():
        reported = by_name[tied[0] if name in TIED else name].grad_norm
        assert reported == pytest.approx(grad.norm().item(), rel=2e-3), name
    assert not [n for n in by_name if n.endswith(".mask")]  # a buffer, only compared


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_causal_mask_is_no_nan_inf_origin(fmt: str) -> None:
    report = _report(fmt)
    assert not [f for f in report.findings if f.kind == "non_finite"], report.findings
    assert report.loss.kind == "cross_entropy"
    assert report.loss.value == pytest.approx(_report("torch_export").loss.value, rel=1e-5)


def test_the_three_reports_agree_on_layers_and_findings() -> None:
    reports = [_report(fmt) for fmt in FORMATS]
    names = [[layer.name for layer in r.layers] for r in reports]
    assert names[0] == names[1] == names[2], names
    assert names[0][0] == "wte" and names[0][-1] == "head"  # the tied layers by module
    kinds = [sorted((f.kind, f.severity) for f in r.findings) for r in reports]
    assert kinds[0] == kinds[1] == kinds[2], kinds
