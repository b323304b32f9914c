"""A module called more than once (ALBERT's one shared transformer layer applied N times, a
Siamese encoder run on both inputs): each call is its own layer, named `<module>#2`, `#3` in
call order, alike in every format. Before, each exporter's naming of the repeat leaked into
the report: the legacy ONNX `fc_1`, dynamo ONNX `fc/node_Gemm_4`, torch.export `fc/linear_2`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from tests.support.export import to_onnx, to_torch_export
from tests.support.runner_jobs import npz_batch


class SharedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + torch.tanh(self.fc(x)))


class Looped(nn.Module):
    """One block applied three times, between an input and an output projection."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 8)
        self.block = SharedBlock()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for _ in range(3):
            h = self.block(h)
        return self.head(h)


EXPECTED = [
    "embed",
    *(f"block.{m}{suffix}" for suffix in ("", "#2", "#3") for m in ("fc", "norm")),
    "head",
]


def _export(fmt: str, model: nn.Module, x: torch.Tensor) -> bytes:
    if fmt == "pt2":
        return to_torch_export(model, x)
    return to_onnx(model, x, dynamo=fmt == "dynamo")


@pytest.mark.parametrize("fmt", ["legacy", "dynamo", "pt2"])
def test_each_call_of_a_shared_module_is_a_layer_named_by_its_call(fmt: str) -> None:
    model, x = Looped(), torch.randn(6, 4)
    target = np.array([0, 1, 2, 0, 1, 2])
    report = diagnose(
        _export(fmt, model, x), npz_batch(x, target), DiagnoseOptions.model_validate({})
    )
    assert [layer.name for layer in report.layers] == EXPECTED
    # every call reads the block's one set of parameters: reported once, gradients summed
    names = [p.name for p in report.parameters]
    assert names.count("block.fc.weight") == 1
    calls = [layer for layer in report.layers if layer.name.startswith("block.fc")]
    assert all(layer.params == calls[0].params for layer in calls)


@pytest.mark.parametrize("fmt", ["legacy", "pt2"])
def test_a_shared_weight_initialised_too_small_is_one_layer_to_reinitialise(fmt: str) -> None:
    model, x = Looped(), torch.randn(6, 4)
    with torch.no_grad():
        model.block.fc.weight.mul_(0.01)
    target = np.array([0, 1, 2, 0, 1, 2])
    report = diagnose(
        _export(fmt, model, x), npz_batch(x, target), DiagnoseOptions.model_validate({})
    )
    (finding,) = [f for f in report.findings if f.kind == "init_scale"]
    assert finding.layers == ["block.fc"]
    assert finding.message.startswith("1 layer(s) are initialised too small")
