"""A model with two branches: the depth profile lists a side input's one layer first, while
the first layer of a deep sigmoid branch beside it gets next to nothing. Judged on the
profile's first/last ratio alone, it was reported healthy in every format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from service.engine import diagnose
from service.engine.options import DiagnoseOptions
from tests.support.export import to_onnx, to_torch_export
from tests.unit.engine.measure_support import npz_bytes


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.side = nn.Linear(8, 16)
        self.deep = nn.Sequential(
            *[m for _ in range(12) for m in (nn.Linear(16, 16), nn.Sigmoid())]
        )
        self.head = nn.Linear(32, 4)

    def forward(self, meta: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.relu(self.side(meta)), self.deep(img)], 1))


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_vanishing_in_a_deep_branch_is_found_behind_a_healthy_first_layer(fmt: str) -> None:
    module = TwoBranches()
    generator = torch.Generator().manual_seed(1)
    meta, img = torch.randn(32, 8, generator=generator), torch.randn(32, 16, generator=generator)
    target = np.arange(32) % 4
    model = (
        to_torch_export(module, (meta, img))
        if fmt == "torch_export"
        else to_onnx(module, (meta, img), input_names=["meta", "img"])
    )
    report = diagnose(model, npz_bytes(meta=meta, img=img, target=target), DiagnoseOptions())
    nn.functional.cross_entropy(module(meta, img), torch.as_tensor(target)).backward()
    first = dict(module.named_parameters())["deep.0.weight"].grad
    assert first is not None and first.norm() < 1e-9  # torch agrees: it barely learns
    assert report.verdict == "unhealthy"
    (finding,) = [f for f in report.findings if f.kind == "vanishing_gradients"]
    assert finding.severity == "error"
    assert finding.layers[0] == "deep.0" and "side" not in finding.layers
    assert finding.evidence["depth_ratio_from"] == "deep.0"
    assert finding.evidence["depth_ratio"] < 1e-8
    fix = next(r for r in report.recommendations if r.fix == "replace_activation")
    assert fix.verified is not None and fix.verified.resolved
