"""Two causes of gradient-scale findings that were read wrong.

1. A change of tensor size is no change of gradient. ‖∂L/∂a‖ is a norm over a layer's whole
   output: a mean over T time steps hands each step 1/T of the gradient, so the norm before it
   is 1/√T of the norm after it. A 1D CNN over audio was told its gradients vanish in
   proportion to the clip's length (same weights: healthy at 1600 samples, a warning at 16 000,
   an error at 2.56 M), and an image CNN's global average pooling read as a drop of √(H·W).
   Genuine vanishing behind such a pooling must still be caught, in every format.
2. A regression target far off the output's scale (targets ~1e4 with mse) makes every gradient
   ~1e4 times larger: the exploding finding must name that cause, and the first fix must be to
   standardise the target (verified on a copy), not clipping or a lower learning rate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from service.engine import diagnose
from service.engine.detectors import detect
from service.engine.detectors.positions import size_adjusted_profile, weight_positions
from service.engine.options import DiagnoseOptions
from service.engine.report import Report
from tests.support.export import to_onnx, to_torch_export, to_torchscript
from tests.unit.engine.measure_support import npz_bytes
from tests.unit.engine.measurements_factory import mlp

FORMATS = ["torch_export", "onnx", "torchscript"]


def _model_bytes(fmt: str, module: nn.Module, x: torch.Tensor) -> bytes:
    if fmt == "torch_export":
        return to_torch_export(module, x)
    if fmt == "onnx":
        return to_onnx(module, x, input_names=["x"])
    return to_torchscript(module, x)


def _diagnose(fmt: str, module: nn.Module, x: torch.Tensor, target: np.ndarray) -> Report:
    model = _model_bytes(fmt, module, x)
    return diagnose(model, npz_bytes(x=x, target=target), DiagnoseOptions())


def _profile_kinds(report: Report) -> list[tuple[str, str]]:
    return [
        (f.kind, f.severity)
        for f in report.findings
        if f.kind in ("vanishing_gradients", "exploding_gradients")
    ]


# -- 1. pooling over positions ---------------------------------------------------------------


class AudioCNN(nn.Module):
    """Three strided Conv1d + ReLU, a mean over time, a Linear head (PyTorch's default init)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c = nn.Sequential(
            nn.Conv1d(1, 16, 9, stride=4, padding=4),
            nn.ReLU(),
            nn.Conv1d(16, 32, 9, stride=4, padding=4),
            nn.ReLU(),
            nn.Conv1d(32, 32, 9, stride=4, padding=4),
            nn.ReLU(),
        )
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c(x).mean(-1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_mean_over_time_is_no_vanishing_whatever_the_clip_length(fmt: str) -> None:
    module = AudioCNN()
    target = np.arange(4) % 4
    short = _diagnose(fmt, module, torch.randn(4, 1, 1600, generator=_gen()), target)
    x = torch.randn(4, 1, 16000, generator=_gen())
    long = _diagnose(fmt, module, x, target)
    # the raw profile falls as 1/√T below the mean: < 0.01 here, a warning before the fix
    assert long.profiles.depth.first_last_ratio is not None
    assert long.profiles.depth.first_last_ratio < 1e-2
    # torch agrees that the first conv learns: its grad/weight is of the head's order
    nn.functional.cross_entropy(module(x), torch.as_tensor(target)).backward()
    ratio = {
        n: float(p.grad.norm() / p.detach().norm())
        for n, p in module.named_parameters()
        if p.grad is not None
    }
    assert ratio["c.0.weight"] > 0.03 * ratio["head.weight"]
    assert _profile_kinds(short) == []
    assert _profile_kinds(long) == []
    assert long.verdict == short.verdict == "healthy"


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class ImageCNN(nn.Module):
    """Two He-initialised convs at full resolution, global average pooling, a Linear head."""

    def __init__(self, activation: type[nn.Module] = nn.ReLU, depth: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for i in range(depth):
            conv = nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1)
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            layers += [conv, activation()]
        self.c = nn.Sequential(*layers)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c(x).mean((2, 3)))


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_global_average_pooling_over_a_large_map_is_no_vanishing(fmt: str) -> None:
    report = _diagnose(fmt, ImageCNN(), torch.randn(4, 3, 128, 128, generator=_gen()), np.arange(4))
    # a 128×128 map averaged: ‖∂L/∂a‖ of the convs is ~1/128 of the head's
    assert report.profiles.depth.first_last_ratio is not None
    assert report.profiles.depth.first_last_ratio < 1e-2
    assert _profile_kinds(report) == []


class SigmoidCNN(nn.Module):
    """A deep sigmoid conv stack (torch's default init) with stride-2 steps and global average
    pooling: genuine vanishing behind a change of size."""

    def __init__(self, depth: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for i in range(depth):
            stride = 2 if i % 2 else 1
            layers += [nn.Conv2d(3 if i == 0 else 8, 8, 3, stride=stride, padding=1), nn.Sigmoid()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_genuine_vanishing_behind_pooling_and_strides_is_still_an_error(fmt: str) -> None:
    report = _diagnose(
        fmt, SigmoidCNN(), torch.randn(8, 3, 32, 32, generator=_gen()), np.arange(8) % 4
    )
    (f,) = [f for f in report.findings if f.kind == "vanishing_gradients"]
    assert f.severity == "error"
    assert f.layers[0] == "body.0"
    # the size-adjusted view gives the pooling and the strides their due and still vanishes
    adjusted = f.evidence["size_adjusted_depth_ratio"]
    assert f.evidence["depth_ratio"] < adjusted < 1e-3
    assert f.evidence["positions"] == {"body.0": 32 * 32, "head": 1}


def _sized(norms: list[float], positions: list[int]):
    """Hand-built measurements of a stack whose layers' outputs hold `positions` × 16 entries."""
    m = mlp(norms)
    m.layer_output_sizes = {x.name: 16 * p for x, p in zip(m.layers, positions, strict=True)}
    return m


def test_positions_are_entries_per_example_over_a_weight_application() -> None:
    m = _sized([1.0, 1.0, 1.0], [64, 16, 1])
    assert weight_positions(m) == {"fc0": 64, "fc1": 16, "fc2": 1}


def test_a_mean_gets_full_credit_a_norm_keeping_stride_none() -> None:
    # fc0 → fc1: 4× fewer positions, norm kept (a strided conv with He's init): no credit;
    # fc1 → fc2: a mean over 16 positions, norm ÷ 4: fully explained
    m = _sized([0.25, 0.25, 1.0], [64, 16, 1])
    names = [x.name for x in m.layers]
    sized = size_adjusted_profile(m, names, [0.25, 0.25, 1.0], "fc0")
    assert sized is not None and sized.ratio is not None
    assert sized.norms == pytest.approx([1.0, 1.0, 1.0])
    assert math.isclose(sized.ratio, 1.0)
    # the same sizes with a genuine drop: only what the size explains is credited
    sized = size_adjusted_profile(m, names, [1e-4, 1e-3, 1.0], "fc0")
    assert sized is not None and sized.ratio is not None
    assert sized.ratio == pytest.approx(1e-4 * 2 * 4)


def test_equal_sizes_leave_the_rules_as_they_were() -> None:
    m = _sized([1e-4, 1e-2, 1.0], [16, 16, 16])
    assert size_adjusted_profile(m, [x.name for x in m.layers], [1e-4, 1e-2, 1.0], "fc0") is None
    (f,) = [f for f in detect(m) if f.kind == "vanishing_gradients"]
    assert f.severity == "error" and "size_adjusted_depth_ratio" not in f.evidence


def test_a_drop_only_the_pooling_explains_is_no_finding_a_larger_one_is() -> None:
    # the last conv's ‖∂L/∂a‖ is 1/√16384 of the head's: a 128×128 map averaged (a depth
    # ratio of 0.0078, a warning when read raw)
    pooled = _sized([1 / 128, 1 / 128, 1 / 128, 1.0], [16384, 16384, 16384, 1])
    assert [f.kind for f in detect(pooled)] == []
    deeper = _sized([1e-7, 1e-5, 1e-3 / 128, 1.0], [16384, 16384, 16384, 1])
    (f,) = [f for f in detect(deeper) if f.kind == "vanishing_gradients"]
    assert f.severity == "error"
    assert f.evidence["size_adjusted_depth_ratio"] == pytest.approx(1e-7 * 128)


def test_growth_only_upsampling_explains_is_no_explosion() -> None:
    # a decoder: each ×2 nearest upsampling sums four copies' gradients on the way back, the
    # norm doubles per step towards the input while the positions shrink ×4
    norms = [2.0**k for k in range(8, -1, -1)]
    positions = [4**k for k in range(1, 10)]
    m = _sized(norms, positions)
    raw = mlp(norms)
    assert "exploding_gradients" in {f.kind for f in detect(raw)}  # what the raw view says
    assert [f.kind for f in detect(m)] == []


# -- 2. regression target off the output's scale --------------------------------------------


def _regressor() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )


def _regression_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(3)
    x = torch.randn(128, 8, generator=g)
    return x, 1e4 + 2e3 * torch.randn(128, 1, generator=g)


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_an_unstandardised_regression_target_is_named_and_standardising_comes_first(
    fmt: str,
) -> None:
    module = _regressor()
    x, target = _regression_batch()
    report = _diagnose(fmt, module, x, target.numpy())
    (f,) = [f for f in report.findings if f.kind == "exploding_gradients"]
    assert f.severity == "error"
    scale = f.evidence["target_scale"]
    assert scale["loss_kind"] == "mse"
    assert scale["target_mean"] == pytest.approx(float(target.mean()), rel=1e-4)
    assert scale["target_std"] == pytest.approx(float(target.std(correction=0)), rel=1e-4)
    assert scale["output_std"] == pytest.approx(
        float(module(x).detach().std(correction=0)), rel=1e-3
    )
    assert scale["loss"] == pytest.approx(report.loss.value)
    assert "regression target" in f.message and "standardise" in f.message
    fixes = [r.fix for r in report.recommendations]
    assert fixes[0] == "normalize_targets"
    assert fixes.index("normalize_targets") < fixes.index("clip_gradients")
    assert fixes.index("normalize_targets") < fixes.index("lower_learning_rate")
    first = report.recommendations[0]
    assert first.params["target_std"] == pytest.approx(scale["target_std"])
    assert "(y - target_mean) / target_std" in first.snippet
    assert first.verified is not None and first.verified.applied
    assert first.verified.resolved is True
    after = first.verified.after["figures"]["max_grad_to_weight"]
    assert after < 10 < first.verified.before["figures"]["max_grad_to_weight"]
    clip = next(r for r in report.recommendations if r.fix == "clip_gradients")
    assert "while the cause is fixed" not in clip.rationale
    assert "target is standardised" in clip.rationale
    # the profile shrinks towards the input here (depth ratio < 1): nothing is "larger"
    assert f.evidence["depth_ratio"] < 1
    assert all("× larger" not in r.rationale for r in report.recommendations)


def test_a_standardised_regression_target_is_healthy_and_not_named() -> None:
    module = _regressor()
    x, target = _regression_batch()
    standardised = (target - target.mean()) / target.std()
    report = _diagnose("torch_export", module, x, standardised.numpy())
    assert report.verdict == "healthy"
    assert "normalize_targets" not in [r.fix for r in report.recommendations]


def test_a_target_off_scale_explains_only_the_absolute_scale_rule() -> None:
    m = mlp([1.0, 1.0, 1.0], weight_grad_norms=[400.0] * 3, weight_norms=[4.0] * 3)
    m.target_scale = {
        "target_mean": 1e4,
        "target_std": 2e3,
        "output_mean": 0.0,
        "output_std": 0.05,
    }
    (f,) = detect(m)
    assert f.kind == "exploding_gradients" and f.evidence["rules"] == ["absolute_scale"]
    assert f.evidence["target_scale"]["ratio"] == pytest.approx(math.hypot(1e4, 2e3))
    # a target at unit scale is never off, however small a fresh model's outputs are
    m.target_scale = {"target_mean": 0.0, "target_std": 1.0, "output_mean": 0.0, "output_std": 0.01}
    (f,) = detect(m)
    assert "target_scale" not in f.evidence
