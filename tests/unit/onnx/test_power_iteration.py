"""Spectral normalisation's power iteration runs under no_grad in torch; ONNX writes it as
ordinary nodes (onnx/power_iteration.py). Converted gradients equal the source module's, and a
later normalisation of activations (F.normalize, the same Div pattern) keeps its gradient."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.engine.onnx.convert import convert
from tests.support.export import to_onnx


class Discriminator(nn.Module):
    """A GAN discriminator's shape: spectrally normalised conv and linear layers, then a
    cosine-similarity style normalisation of the features (not spectral norm's)."""

    def __init__(self, parametrized: bool) -> None:
        super().__init__()
        spectral = (
            nn.utils.parametrizations.spectral_norm if parametrized else nn.utils.spectral_norm
        )
        self.conv = spectral(nn.Conv2d(3, 8, 3))
        self.fc = spectral(nn.Linear(8 * 36, 16))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.leaky_relu(self.conv(x), 0.2).flatten(1)
        return self.head(F.normalize(F.leaky_relu(self.fc(features), 0.2), dim=1))


@pytest.mark.parametrize("parametrized", [False, True])
def test_spectral_norms_gradient_equals_torchs(parametrized: bool) -> None:
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    exported = Discriminator(parametrized).train()  # a training step advances u and v
    model = onnx.load_from_string(to_onnx(exported, x, dynamo=True))
    torch.manual_seed(0)
    module = Discriminator(parametrized).train()
    graph = convert(model, mode="train")
    module(x).square().mean().backward()
    graph(x).square().mean().backward()
    got = dict(graph.named_graph_parameters())
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name
        torch.testing.assert_close(got[name].grad, parameter.grad, rtol=1e-5, atol=1e-7)
    weights = [n for n in got if n.endswith(("_orig", ".original"))]
    (note,) = [n for n in graph.metadata.get("notes", []) if "power iteration" in n]
    assert all(w in note for w in weights) and len(weights) == 2


class Normalized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.tanh(self.fc(x)), dim=1)


def test_a_model_without_spectral_norm_is_left_alone() -> None:
    """F.normalize alone is the same Div pattern: no u/v buffers, nothing detached."""
    torch.manual_seed(0)
    module, x = Normalized(), torch.randn(3, 6)
    graph = convert(onnx.load_from_string(to_onnx(module, x, dynamo=True)))
    module(x)[:, 0].sum().backward()
    graph(x)[:, 0].sum().backward()
    got = dict(graph.named_graph_parameters())["fc.weight"].grad
    assert module.fc.weight.grad is not None and got is not None
    torch.testing.assert_close(got, module.fc.weight.grad)
    assert not [n for n in graph.metadata.get("notes", []) if "power iteration" in n]
