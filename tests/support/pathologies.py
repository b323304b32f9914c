"""The pathology zoo: tiny torch models with one classic gradient problem each, plus healthy
controls, built with fixed seeds (no downloads). Each case gives its module, an example batch
(`npz` bytes with arrays `x` and `target`), and what a diagnosis must find and recommend.

Sizes are the smallest that still show the effect clearly: 16-wide layers, batches of 32.
Every model is exported by tests/support/export.py to `.pt2`, TorchScript and ONNX.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
from torch import nn

from tests.support import export

WIDTH = 16
BATCH = 32
CLASSES = 4


@dataclass
class Case:
    name: str
    build: Callable[[int], nn.Module]  # seed → module
    input_shape: tuple[int, ...]
    expect: dict[str, str] = field(default_factory=dict)  # finding kind → minimum severity
    first_layer: str | None = None  # the layer a finding must name first (kind in `layer_of`)
    layer_of: str | None = None
    fixes: list[str] = field(default_factory=list)  # fixes that must be recommended
    main_fix: str | None = None  # must be verified to resolve (or measurably improve)
    healthy: bool = False
    # torch.jit.trace's sanity check fails on nn.TransformerEncoder's fast path
    formats: tuple[str, ...] = ("torch_export", "onnx", "onnx_dynamo", "torchscript")
    input_fn: Callable[[torch.Generator, tuple[int, ...]], torch.Tensor] | None = None

    def module(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build(seed).eval()

    def batch(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + seed)
        x = (
            self.input_fn(g, self.input_shape)
            if self.input_fn is not None
            else torch.randn(self.input_shape, generator=g)
        )
        target = torch.randint(0, CLASSES, (self.input_shape[0],), generator=g)
        return x, target

    def batch_bytes(self, seed: int = 0) -> bytes:
        x, target = self.batch(seed)
        buffer = io.BytesIO()
        np.savez(buffer, x=x.numpy(), target=target.numpy())
        return buffer.getvalue()

    def model_bytes(self, fmt: str, seed: int = 0) -> bytes:
        module = self.module(seed)
        x, _ = self.batch(seed)
        with warnings.catch_warnings():
            # nn.RNN's flat weights warn during torch.export; irrelevant to the zoo
            warnings.simplefilter("ignore")
            if fmt == "torch_export":
                return export.to_torch_export(module, x)
            if fmt == "torchscript":
                return export.to_torchscript(module, x)
            if fmt == "onnx":  # the legacy exporter, TRAINING mode
                return export.to_onnx(module, x, input_names=["x"])
            if fmt == "onnx_dynamo":  # torch.onnx.export's default exporter
                return export.to_onnx(module, x, dynamo=True, input_names=["x"], optimize=True)
        raise ValueError(f"unknown format {fmt!r}")


# -- building blocks ---------------------------------------------------------------------------


class MLP(nn.Module):
    """`depth` × (Linear → [norm] → activation), then a Linear head; layers named fc0, fc1, ..."""

    def __init__(
        self,
        depth: int,
        activation: Callable[[], nn.Module],
        *,
        width: int = WIDTH,
        norm: bool = False,
        init: Callable[[nn.Linear, int], None] | None = None,
    ) -> None:
        super().__init__()
        self.depth = depth
        for i in range(depth):
            layer = nn.Linear(width, width)
            if init is not None:
                init(layer, i)
            self.add_module(f"fc{i}", layer)
            if norm:
                self.add_module(f"ln{i}", nn.LayerNorm(width))
            self.add_module(f"act{i}", activation())
        self.head = nn.Linear(width, CLASSES)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.depth):
            x = getattr(self, f"fc{i}")(x)
            if self.norm:
                x = getattr(self, f"ln{i}")(x)
            x = getattr(self, f"act{i}")(x)
        return self.head(x)


def _normal_init(std_fn: Callable[[int], float], bias: float = 0.0):
    def init(layer: nn.Linear, _i: int) -> None:
        with torch.no_grad():
            layer.weight.normal_(0.0, std_fn(layer.in_features))
            layer.bias.fill_(bias)

    return init


def he_std(fan_in: int) -> float:
    return math.sqrt(2.0 / fan_in)


class LogOfNegatives(nn.Module):
    """Takes `log` of a linear layer's output, about half of which is negative → NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.log(self.fc0(x)))


class SqrtAtZero(nn.Module):
    """Pairwise distances of the batch's embeddings, sqrt of summed squared differences, each
    example's distance to itself included: finite forward (sqrt(0) = 0), but d sqrt/dx = inf
    at those zeros, times the zero difference in the square's backward: NaN in fc0's
    gradients (backward origin). `torch.cdist` and a hand-written norm of a zero vector fail
    the same way."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(BATCH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.tanh(self.fc0(x))
        return self.head(torch.sqrt(((e[:, None] - e[None]) ** 2).sum(-1)))


class SqrtOfReLU(nn.Module):
    """sqrt of a ReLU output: d sqrt/dx = inf at the zeros (backward Inf), which the ReLU's
    backward zeroes: no parameter gradient is touched (an `info` finding, not an error)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sqrt(torch.relu(self.fc0(x))))


class DeadReLU(nn.Module):
    """fc0's bias is -10 on 80% of its units: those ReLUs output zero for every example."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(WIDTH, 2 * WIDTH)
        self.fc1 = nn.Linear(2 * WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)
        for layer in (self.fc0, self.fc1):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        with torch.no_grad():
            self.fc0.bias[: int(0.8 * 2 * WIDTH)] = -10.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc1(torch.relu(self.fc0(x)))))


class SaturatedTanh(nn.Module):
    """tanh after a layer whose weights are ~10× Xavier's: most outputs pinned at ±1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(WIDTH, 2 * WIDTH)
        self.head = nn.Linear(2 * WIDTH, CLASSES)
        with torch.no_grad():
            self.fc0.weight.normal_(0.0, 10.0 / math.sqrt(WIDTH))
            self.fc0.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc0(x)))


class LastStepRNN(nn.Module):
    """A recurrent layer `rnn` (batch first, 16 wide) read at its last step by a Linear head."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class TanhRNN(LastStepRNN):
    """A vanilla tanh RNN read at its last step: the first steps get almost no gradient."""

    def __init__(self) -> None:
        super().__init__(nn.RNN(4, WIDTH, batch_first=True))


class GatedRNN(LastStepRNN):
    """An LSTM or GRU read at its last step (not in the zoo: gated units at initialisation
    decay over time too, which is a warning, not a pathology)."""

    def __init__(self, cell: type[nn.Module] = nn.LSTM) -> None:
        super().__init__(cell(4, WIDTH, batch_first=True))


class ReluRNN(LastStepRNN):
    """A ReLU RNN whose recurrent matrix is 1.3·I: the state and the gradient back in time grow
    ×1.3 per step (30 steps: ~1e3)."""

    def __init__(self) -> None:
        rnn = nn.RNN(4, WIDTH, nonlinearity="relu", batch_first=True)
        super().__init__(rnn)
        with torch.no_grad():
            cast(torch.Tensor, rnn.weight_hh_l0).copy_(1.3 * torch.eye(WIDTH))


class TinyTransformer(nn.Module):
    """Two pre-built encoder layers (GELU MLPs, LayerNorm, residuals) over 12 tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(WIDTH, WIDTH)
        layer = nn.TransformerEncoderLayer(
            WIDTH, 2, dim_feedforward=32, dropout=0.0, batch_first=True, activation="gelu"
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class ResidualCNN(nn.Module):
    def __init__(self, channels: int = 8, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.blocks = nn.Sequential(*[ResidualBlock(channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, CLASSES)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.blocks(x)
        return self.head(x.mean(dim=(2, 3)))


# -- the zoo -------------------------------------------------------------------------------------

ZOO: dict[str, Case] = {
    c.name: c
    for c in [
        Case(
            "deep_sigmoid_mlp",
            lambda _s: MLP(10, nn.Sigmoid),
            (BATCH, WIDTH),
            expect={"vanishing_gradients": "error"},
            first_layer="fc0",
            layer_of="vanishing_gradients",
            fixes=["replace_activation", "add_normalization", "add_residual_connections"],
            main_fix="replace_activation",
        ),
        Case(
            "deep_relu_large_init",
            lambda _s: MLP(12, nn.ReLU, init=_normal_init(lambda n: 2.0 * he_std(n))),
            (BATCH, WIDTH),
            expect={"exploding_gradients": "error", "init_scale": "warning"},
            first_layer="fc0",
            layer_of="exploding_gradients",
            fixes=["reinitialize_weights", "clip_gradients"],
            main_fix="reinitialize_weights",
        ),
        Case(
            "relu_tiny_init",
            lambda _s: MLP(6, nn.ReLU, init=_normal_init(lambda n: 1e-3)),
            (BATCH, WIDTH),
            expect={"vanishing_gradients": "error", "init_scale": "error"},
            fixes=["reinitialize_weights"],
            main_fix="reinitialize_weights",
        ),
        Case(
            "tanh_rnn_long",
            lambda _s: TanhRNN(),
            (8, 120, 4),
            expect={"vanishing_gradients": "error"},
            fixes=["use_gated_recurrent_unit"],
        ),
        Case(
            "relu_rnn_exploding",
            lambda _s: ReluRNN(),
            (8, 30, 4),
            expect={"exploding_gradients": "error"},
            fixes=["use_gated_recurrent_unit", "clip_gradients", "reinitialize_weights"],
            main_fix="reinitialize_weights",
        ),
        Case(
            "log_of_negatives",
            lambda _s: LogOfNegatives(),
            (BATCH, WIDTH),
            expect={"non_finite": "error"},
            fixes=["guard_numerics"],
            main_fix="guard_numerics",
        ),
        Case(
            "sqrt_at_zero_backward",
            lambda _s: SqrtAtZero(),
            (BATCH, WIDTH),
            expect={"non_finite": "error"},
            fixes=["guard_numerics"],
            main_fix="guard_numerics",
        ),
        Case(
            "dead_relu",
            lambda _s: DeadReLU(),
            (BATCH, WIDTH),
            expect={"dead_units": "error"},
            first_layer="fc0",
            layer_of="dead_units",
            fixes=["reinitialize_weights", "replace_activation"],
            main_fix="reinitialize_weights",
        ),
        Case(
            "saturated_tanh",
            lambda _s: SaturatedTanh(),
            (BATCH, WIDTH),
            expect={"saturation": "error"},
            first_layer="fc0",
            layer_of="saturation",
            fixes=["replace_activation", "reinitialize_weights"],
            main_fix="replace_activation",
        ),
        Case(
            "healthy_mlp_layernorm",
            lambda _s: MLP(6, nn.ReLU, norm=True, init=_normal_init(he_std)),
            (BATCH, WIDTH),
            healthy=True,
        ),
        Case(
            "healthy_residual_cnn_bn",
            lambda _s: ResidualCNN(),
            (8, 3, 8, 8),
            healthy=True,
        ),
        Case(
            "healthy_tiny_transformer",
            lambda _s: TinyTransformer(),
            (8, 12, WIDTH),
            healthy=True,
            formats=("torch_export", "onnx", "onnx_dynamo"),
        ),
    ]
}
