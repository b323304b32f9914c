"""An output projection tied to the input embedding has the embedding's scale (T5: N(0, 1),
its input scaled by d_model^-0.5): init_scale does not judge it by a linear's fan-in, while
the same weights in an untied projection are still too large."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from tests.support.export import to_onnx, to_torch_export
from tests.unit.engine.measure_support import npz_bytes


class ScaledLM(nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 32)
        nn.init.normal_(self.embed.weight, std=1.0)
        self.mix = nn.Linear(32, 32)
        self.head = nn.Linear(32, 50, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=1.0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.embed(ids)))
        return self.head(h * 32**-0.5)


IDS = torch.randint(0, 50, (8, 10), generator=torch.Generator().manual_seed(1))
TARGET = torch.randint(0, 50, (8, 10), generator=torch.Generator().manual_seed(2))


def _init_layers(tied: bool, fmt: str) -> list[str]:
    module = ScaledLM(tied)
    model = to_torch_export(module, IDS) if fmt == "torch_export" else to_onnx(module, IDS)
    report = diagnose(model, npz_bytes(ids=IDS, target=TARGET), DiagnoseOptions())
    return [layer for f in report.findings if f.kind == "init_scale" for layer in f.layers]


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_a_tied_output_projection_is_not_judged_by_its_fan_in(fmt: str) -> None:
    assert not any("head" in layer for layer in _init_layers(tied=True, fmt=fmt))
    assert any("head" in layer for layer in _init_layers(tied=False, fmt=fmt))


class PositionsAndTables(nn.Module):
    """Parameters that are added or looked up, not multiplied into a sum over inputs: a
    position embedding added to the tokens (Whisper's sinusoids, 3.6× "too large" for a
    linear of that shape), a zero relative-position bias table indexed into the attention
    scores (Swin: "0× too small"). No fan-in, nothing to compare with He/Xavier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 32)
        self.pos = nn.Parameter(torch.randn(1, 10, 32))  # std 1: a linear's would be ~0.25
        self.bias_table = nn.Parameter(torch.zeros(19, 1))  # zero-initialised, as Swin's
        self.index: torch.Tensor
        self.register_buffer("index", (torch.arange(10)[:, None] - torch.arange(10) + 9))
        self.head = nn.Linear(32, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos
        scores = h @ h.transpose(1, 2) / 32**0.5 + self.bias_table[self.index].squeeze(-1)
        return self.head(scores.softmax(-1) @ h)


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_added_and_indexed_parameters_are_not_judged_by_a_fan_in(fmt: str) -> None:
    module = PositionsAndTables()
    model = to_torch_export(module, IDS) if fmt == "torch_export" else to_onnx(module, IDS)
    report = diagnose(model, npz_bytes(ids=IDS, target=TARGET), DiagnoseOptions())
    judged = {x.name: x.fan_in for x in report.layers if x.init_std_ratio is not None}
    owners = {p.name: p.layer for p in report.parameters}
    assert owners["pos"] not in judged and owners["bias_table"] not in judged
    assert not any(f.kind == "init_scale" and f.severity == "error" for f in report.findings)


def test_an_embedding_at_a_small_std_with_large_gradients_is_no_explosion() -> None:
    """CLIP's and BERT's tables are N(0, 0.02): the few rows a batch reads take the whole
    gradient, so grad/weight is large against the tiny table; against nn.Embedding's N(0, 1)
    it is not. A table at N(0, 1) with the same grad/weight still explodes."""
    from service.engine.detectors import detect
    from tests.unit.engine.measurements_factory import mlp

    def table(rms: float) -> list[str]:
        # grad/weight 20 in a 100 × 16 embedding table whose entries have this RMS
        weight_norm = rms * 40.0  # √(100 · 16) = 40
        grad = 20 * weight_norm  # the same gradient reaches every layer (flat ratios)
        m = mlp([1.0] * 3, weight_grad_norms=[grad] * 3, weight_norms=[weight_norm, 1e4, 1e4])
        m.layers[0].op, m.layers[0].init_std_ratio = "embedding", None
        m.layers[0].fan_in = None  # a table has none (layers.py)
        m.parameters[0].shape = [100, 16]
        return [x for f in detect(m) if f.kind == "exploding_gradients" for x in f.layers]

    assert table(rms=0.02) == []
    assert table(rms=1.0) == ["fc0"]
