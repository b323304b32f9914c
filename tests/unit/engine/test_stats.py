"""On-device statistics against direct computations, including the edge values."""

from __future__ import annotations

import math

import pytest
import torch

from service.engine.stats import (
    _CPU_CHUNK,
    FP16_MAX,
    FP16_TINY,
    alive_units,
    combine_moments,
    counts_by_concatenation,
    counts_per_parameter,
    moments,
    parameter_statistics,
    saturated_count,
    shifted_moments,
    var_mean_moments,
)


def test_parameter_counts_with_edge_values() -> None:
    g1 = torch.tensor([0.0, 1e-8, -1e-9, 2.0**-24, 1.0, 7e4, -1e6, math.inf, -math.inf, math.nan])
    g2 = torch.tensor([[0.5, -1e-30], [3.0, 0.0]])
    w1, w2 = torch.ones(10), torch.full((2, 2), 2.0)
    s = parameter_statistics([w1, w2, torch.ones(3)], [g1, g2, None])
    assert s["non_finite"].tolist() == [3, 0, 0]
    assert s["underflow"].tolist() == [2, 1, 0]  # 1e-8, -1e-9 | -1e-30; 2^-24 itself is not
    assert s["overflow"].tolist() == [2, 0, 0]  # 7e4, -1e6 (finite only)
    assert math.isnan(s["grad_norm"][0].item())
    assert s["grad_norm"][1].item() == torch.linalg.vector_norm(g2).item()
    assert s["grad_norm"][2].item() == 0.0
    assert torch.allclose(s["weight_norm"], torch.tensor([math.sqrt(10), 4.0, math.sqrt(3)]))
    assert FP16_TINY == 2.0**-24 and FP16_MAX == 65504.0


def test_saturation_dead_units_and_moments() -> None:
    y = torch.sigmoid(torch.tensor([[-10.0, 0.0, 10.0, 1.0]]))
    assert saturated_count(y, "sigmoid").item() == 2  # σ(1-σ) < 0.01 at ±10
    t = torch.tanh(torch.tensor([3.0, 0.5, -4.0]))
    assert saturated_count(t, "tanh").item() == 2  # 1 - tanh² < 0.01 beyond |x| ≈ 2.99
    relu = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    assert alive_units(relu).tolist() == [False, True, True]
    mean, var = moments(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float16))
    assert mean.dtype == torch.float32 and mean.item() == 2.5
    assert var.item() == pytest.approx(1.25, rel=1e-6)


def test_both_count_paths_agree_across_chunk_boundaries() -> None:
    """The GPU path (one concatenation) and the CPU path (per parameter, chunked) must count
    alike; a parameter larger than a chunk exercises the chunk sums."""
    torch.manual_seed(0)
    big = torch.randn(_CPU_CHUNK + 1000) * 1e-7  # about a third below 2^-24
    big[::97] = 0.0
    big[5] = math.inf
    big[_CPU_CHUNK + 3] = 1e5
    small = torch.tensor([math.nan, 1e-30, 0.0, 7e4])
    grads = [big, small, torch.zeros(3)]
    by_parameter = counts_per_parameter(grads)
    assert torch.equal(by_parameter, counts_by_concatenation(grads))
    a = big.abs()
    assert by_parameter[1, 0].item() == (a < 2.0**-24).sum().item()
    assert by_parameter[2, 0].item() == (big == 0).sum().item()
    assert by_parameter[:, 1].tolist() == [1.0, 2.0, 1.0, 2.0]


@pytest.mark.parametrize("method", [moments, shifted_moments, var_mean_moments])
def test_moments_are_stable_when_the_mean_dwarfs_the_spread(method: object) -> None:
    """1e4 ± ~1 in float32: Σy²/n − mean² keeps no digit of the variance. Both forms (CPU:
    shifted sums, CUDA: var_mean) must; a layout whose first sample sits apart from the rest
    bounds the shifted form's cancellation by the spread, not by the mean."""
    assert callable(method)
    torch.manual_seed(0)
    for y in (
        1e4 + torch.randn(64, 8, 8),
        torch.cat([torch.full((1, 64), 1e4 + 3.0), 1e4 + torch.randn(63, 64)]),
    ):
        mean, var = method(y)
        want = y.double().var(correction=0).item()
        assert mean.item() == pytest.approx(y.double().mean().item(), rel=1e-7)
        assert var.item() == pytest.approx(want, rel=1e-4)


def test_combined_micro_batch_moments_equal_the_whole() -> None:
    torch.manual_seed(1)
    y = 5e3 + 0.5 * torch.randn(1000, dtype=torch.float64)
    parts = [y[:100], y[100:650], y[650:]]
    combined = combine_moments(
        [(p.numel(), p.mean().item(), p.var(correction=0).item()) for p in parts]
    )
    assert combined[0] == 1000
    assert combined[1] == pytest.approx(y.mean().item(), rel=1e-12)
    assert combined[2] == pytest.approx(y.var(correction=0).item(), rel=1e-9)


@pytest.mark.parametrize("bucket", [1, 3, 7, 40, 1 << 22])
def test_gpu_counts_in_buckets_equal_the_per_parameter_counts(bucket: int) -> None:
    """The GPU path classifies at most `bucket` entries at a time (its temporaries are 6× a
    bucket): parameters cut across buckets, several per bucket, empty ones and fp16 ones all
    count as parameter by parameter."""
    torch.manual_seed(1)
    grads = [
        torch.tensor([math.nan, 1e-30, 0.0, 7e4, -math.inf]),
        torch.zeros(0),
        torch.randn(33) * 1e-7,
        (torch.randn(3, 4) * 1e5).half(),
        torch.tensor([0.0, 1.0]),
    ]
    assert torch.equal(counts_by_concatenation(grads, bucket), counts_per_parameter(grads))
