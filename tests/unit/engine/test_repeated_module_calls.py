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


class Embeddings(nn.Module):
    """A projection, a learned scale, a class token concatenated: the scale's and the
    concatenation's layers have no module of their own, both are named by their parameters'."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.positions = nn.Parameter(torch.randn(1, 3, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.tanh(self.proj(x)) * self.positions
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), torch.tanh(tokens)], 1)


class TinyViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = Embeddings()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embeddings(x).mean(1))


def test_a_legacy_exports_unnamed_layer_is_its_module_and_op_not_its_node_path() -> None:
    x = torch.randn(2, 3, 4)
    report = diagnose(
        to_onnx(TinyViT(), x), npz_batch(x, np.array([0, 2])), DiagnoseOptions.model_validate({})
    )
    names = [layer.name for layer in report.layers]
    assert not [n for n in names if "//" in n], names  # was `embeddings//embeddings/Concat`
    assert "embeddings/Concat_1" in names, names
