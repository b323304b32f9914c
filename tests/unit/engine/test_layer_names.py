"""The report's layers are named as the source model's modules in every format, a layer whose
parameters give no module path falls back to its main node's name, and every
`parameters[].layer` names one of `layers[]`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.engine.measure import measure
from service.engine.measurements import Measurements
from service.engine.options import DiagnoseOptions
from service.engine.report import LayerReport
from service.engine.subject import build_subject
from tests.support.export import to_onnx, to_torch_export, to_torchscript
from tests.unit.engine.measure_support import npz_bytes, onnx_available


class BasicBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(4))
        self.fc = nn.Linear(4, 3)
        # top-level parameters, no module path: `scale` makes a layer of its own (named by its
        # node), `gain` joins fc's layer as a scale after it (which stays named `fc`)
        self.scale = nn.Parameter(torch.ones(4))
        self.gain = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)) * self.scale) * self.gain


def by_name(m: Measurements, name: str) -> LayerReport:
    return next(layer for layer in m.layers if layer.name == name)


FORMATS = ["torch_export", "torchscript"] + (["onnx"] if onnx_available() else [])


def _export(module: nn.Module, x: torch.Tensor, fmt: str) -> bytes:
    if fmt == "torch_export":
        return to_torch_export(module, x)
    if fmt == "torchscript":
        return to_torchscript(module, x)
    return to_onnx(module, x, input_names=["x"])  # legacy exporter, training mode


@pytest.mark.parametrize("fmt", FORMATS)
def test_layer_names_are_the_source_modules_and_parameters_point_at_them(fmt: str) -> None:
    torch.manual_seed(0)
    module, x = TinyResNet(), torch.randn(2, 2, 5, 5)
    subject = build_subject(_export(module, x, fmt), npz_bytes(x=x), DiagnoseOptions())
    assert subject.model_info.probe_coverage == "full"
    assert subject.graph is not None
    m = measure(subject)
    names = [layer.name for layer in m.layers]
    assert len(names) == len(set(names))
    expected = {"conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"}
    expected |= {"layer1.0.bn2", "fc"}
    assert expected <= set(names), names
    assert "gain" in by_name(m, "fc").params
    # the top-level `scale` gives no module path: its layer is named by its main node
    (scaled,) = [layer for layer in m.layers if layer.params == ["scale"]]
    assert scaled.name in {node.name for node in subject.graph.nodes}
    by_layer = {layer.name: layer for layer in m.layers}
    trainable = {name for name, _ in subject.graph.named_graph_parameters()}
    for p in m.parameters:
        assert p.layer is not None, p.name
        assert p.layer in by_layer, (p.name, p.layer)
        assert p.name in by_layer[p.layer].params
    assert {p for layer in m.layers for p in layer.params} <= trainable
