"""Real CNN architectures (the `light` models shipped with onnx: AlexNet, DenseNet-121,
Inception v1/v2, ResNet-50, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512) converted in train mode:
a backward pass reaches the input and every initializer with finite gradients (these
"light" files build most weights with ConstantOfShape, so the input is the sure leaf)."""

from __future__ import annotations

import glob
import os

import onnx
import pytest
import torch

from service.engine.onnx.convert import convert
from tests.unit.onnx.backend_cases import DATA_DIR

LIGHT = sorted(glob.glob(os.path.join(DATA_DIR, "light", "*.onnx")))


@pytest.mark.slow
@pytest.mark.parametrize("path", LIGHT, ids=[os.path.basename(p)[:-5] for p in LIGHT])
def test_backward_reaches_input_and_parameters(path: str) -> None:
    graph = convert(onnx.load(path), mode="train")
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in graph.metadata["inputs"][0]["shape"]]
    # These models reshape to a fixed batch of 1; their BatchNorms follow convolutions, so the
    # batch statistics still average over the spatial positions.
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = graph(x)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in graph.named_graph_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), name
