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
