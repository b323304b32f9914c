"""Host-side shortcuts of `measure()` give exactly the numbers of the plain Python they replace.

On a GPU the diagnosis pass is bound by host time (bench/overhead.py --host-overhead), so the
depth fit, the probe plan and the parameter statistics do their work in fewer Python steps;
these tests hold each against the straightforward version, value for value.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from service.engine import stats
from service.engine.detectors import profile
from service.engine.detectors.profile import growth_factor


def _pairwise_python(norms: list[float | None]) -> float | None:
    """The Theil–Sen fit as one Python expression per pair (the previous implementation)."""
    points = [(i, math.log(v)) for i, v in enumerate(norms) if profile.usable(v)]  # type: ignore[arg-type]
    if len(points) < 3:
        return None
    if len(points) > profile._MAX_PAIRWISE:
        step = len(points) / profile._MAX_PAIRWISE
        points = [points[int(k * step)] for k in range(profile._MAX_PAIRWISE)]
    slopes = sorted(
        (yj - yi) / (xj - xi) for a, (xi, yi) in enumerate(points) for xj, yj in points[a + 1 :]
    )
    mid = len(slopes) // 2
    slope = slopes[mid] if len(slopes) % 2 else (slopes[mid - 1] + slopes[mid]) / 2
    return math.exp(slope) if slope < 700 else math.inf


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_depth_fit_equals_the_pairwise_python_fit(seed: int) -> None:
    """Profiles of every length up to past the thinning limit, with unusable entries (None, 0,
    inf, nan) between norms spanning 60 decades: the same float, bit for bit."""
    rng = random.Random(seed)
    choices: list[float | None] = [None, 0.0, math.inf, math.nan, 1.0]
    for length in list(range(0, 12)) + [rng.randint(12, 260) for _ in range(150)]:
        norms = [
            rng.choice(choices) if rng.random() < 0.2 else 10 ** rng.uniform(-30, 30)
            for _ in range(length)
        ]
        expected = _pairwise_python(norms)
        got = growth_factor(norms)
        assert got == expected, (length, got, expected)
    assert growth_factor([1e300, 1.0, 1e-300, 1e300]) == _pairwise_python(
        [1e300, 1.0, 1e-300, 1e300]
    )


def test_one_call_concatenation_counts_like_the_per_parameter_path_for_mixed_dtypes() -> None:
    """`counts_by_concatenation` flattens all gradients in one C++ call and casts once; with
    fp16, bf16, float64 and non-contiguous gradients among float32 ones it counts as the
    per-parameter path, which casts each tensor on its own."""
    torch.manual_seed(0)
    grads = [
        torch.randn(7, 5) * 1e-6,
        (torch.randn(30) * 1e-4).half(),
        (torch.randn(4, 4) * 1e5).bfloat16(),
        torch.randn(9, dtype=torch.float64) * 1e-9,
        (torch.randn(6, 8) * 7e4).t(),  # non-contiguous
    ]
    grads[0][2, 3] = float("nan")
    grads[4][1, 1] = float("inf")
    assert torch.equal(stats.counts_by_concatenation(grads), stats.counts_per_parameter(grads))
    single = [grads[4]]  # one tensor: the flattening is a view of it (nothing written into it)
    before = grads[4].clone()
    assert torch.equal(stats.counts_by_concatenation(single), stats.counts_per_parameter(single))
    assert torch.equal(grads[4], before)


def _saturated_by_clamp(y: torch.Tensor, activation: str) -> torch.Tensor:
    """The saturated count as |y − c| − t clamped at 0, signed and summed (before)."""
    centre, threshold, _ = stats._SATURATION[activation]
    distance = (y.float() - centre).abs_()
    return distance.sub_(threshold).clamp_(min=0.0).sign_().sum()


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "softsign"])
def test_saturated_count_equals_the_clamp_count_at_and_around_the_threshold(
    activation: str, device: str
) -> None:
    """The GPU path's hardshrink count against the clamp count (the CPU path's, and what both
    counted before): entries a few float32 ulps either side of both thresholds c ± t, exactly
    at them, NaN, ±inf, zeros, subnormals and random outputs (also half precision)."""
    centre, threshold, _ = stats._SATURATION[activation]
    torch.manual_seed(0)
    edges = torch.tensor([centre + threshold, centre - threshold], dtype=torch.float32)
    near = [edges]
    for direction in (math.inf, -math.inf):
        step = edges
        for _ in range(8):
            step = torch.nextafter(step, torch.full_like(step, direction))
            near.append(step)
    special = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, centre, 1.0, -1.0])
    values = torch.cat([*near, special, torch.rand(5000) * 2.4 - 1.2, torch.randn(3000)])
    values = values.to(device)  # on CUDA: its hardshrink/sign kernels against its clamp ones
    strided = values[: 20 * (values.numel() // 20)].reshape(20, -1)[:, :7]  # non-contiguous
    for y in (values, strided, values.half(), torch.sigmoid(values)):
        expected = _saturated_by_clamp(y, activation)
        got = stats._saturated_by_hardshrink(y, centre, threshold)  # the GPU path's count
        assert torch.equal(stats.saturated_count(y, activation), expected)  # the CPU path's
        assert got.dtype == expected.dtype == torch.float32
        assert torch.equal(got, expected), (got, expected)
    assert 0 < stats._saturated_by_hardshrink(values, centre, threshold) < values.numel()
