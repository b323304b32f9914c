"""The dynamo exporter's default optimizer folds BatchNorm into the convolution before it: the
converted graph then has no BN to measure, which the report's notes must say, with the
re-export that keeps it."""

from __future__ import annotations

import functools

import onnx
import torch
from torch import nn

from service.engine.onnx.convert import convert
from tests.support.export import to_onnx


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn1(self.conv1(x))).mean(dim=(2, 3)))


@functools.cache
def _export(optimize: bool) -> onnx.ModelProto:
    module = ConvBN().eval()  # an inference export, as users make them
    return onnx.load_from_string(
        to_onnx(module, torch.randn(2, 3, 8, 8), dynamo=True, optimize=optimize)
    )


def test_folded_batchnorm_is_noted_with_the_re_export_that_keeps_it() -> None:
    model = _export(optimize=True)
    assert all(node.op_type != "BatchNormalization" for node in model.graph.node)  # premise
    notes = convert(model).metadata.get("notes", [])
    assert len(notes) == 1
    assert "bn1" in notes[0]
    assert "batch statistics are not available" in notes[0]
    assert "optimize=False" in notes[0]


def test_no_note_when_batchnorm_is_kept() -> None:
    model = _export(optimize=False)
    assert any(node.op_type == "BatchNormalization" for node in model.graph.node)
    assert "notes" not in convert(model).metadata
