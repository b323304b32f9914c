"""com.microsoft contrib ops (and onnxruntime's default-domain LayerNormalization /
SimplifiedLayerNormalization for opsets < 17) against onnxruntime's CPU kernels."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from onnx import helper

from tests.support.recurrent_zoo import (
    as_outputs,
    build_node_fn,
    run_onnxruntime,
    single_node_model,
)

MS = "com.microsoft"


def _random(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


def _check(
    op: str,
    inputs: list[np.ndarray | None],
    outputs: list[str],
    *,
    domain: str = MS,
    opset: int = 14,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    **attrs: Any,
) -> list[torch.Tensor]:
    names = [f"in{i}" if v is not None else "" for i, v in enumerate(inputs)]
    node = helper.make_node(op, names, outputs, domain=domain, **attrs)
    extra = {MS: 1} if domain == MS else None
    model, feeds = single_node_model(node, inputs, opset=opset, extra_opsets=extra)
    expected = run_onnxruntime(model, feeds)
    fn = build_node_fn(node, 1 if domain == MS else opset)
    got = as_outputs(
        fn(*[None if v is None else torch.from_numpy(v) for v in inputs]), len(outputs)
    )
    named = [(name, g) for name, g in zip(outputs, got, strict=True) if name]
    assert len(named) == len(expected)
    for (name, g), e in zip(named, expected, strict=True):
        assert tuple(g.shape) == e.shape, name
        np.testing.assert_allclose(g.numpy(), e, rtol=rtol, atol=atol, err_msg=name)
    return got


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "attrs"),
    [
        ((3, 4), (4, 5), {}),
        ((3, 4), (5, 4), {"transB": 1, "alpha": 0.5}),
        ((4, 3), (4, 5), {"transA": 1}),
        ((2, 3, 4), (2, 5, 4), {"transB": 1, "alpha": 2.0}),
        ((2, 3, 4), (4, 5), {}),
        ((3, 2, 4), (2, 4, 5), {"transBatchA": 1}),
        ((3, 2, 4), (2, 5, 4), {"transBatchA": 1, "transA": 0, "transB": 1}),
        ((2, 3, 4), (4, 2, 5), {"transBatchB": 1}),
        ((2, 3, 4), (5, 2, 4), {"transBatchB": 1, "transB": 1}),
        ((4, 2, 3), (4, 2, 5), {"transBatchA": 1, "transA": 1, "transBatchB": 1}),
        ((2, 2, 3, 4), (2, 2, 4, 5), {"alpha": 0.125}),
    ],
)
def test_fused_matmul(
    a_shape: tuple[int, ...], b_shape: tuple[int, ...], attrs: dict[str, Any]
) -> None:
    _check("FusedMatMul", [_random(*a_shape), _random(*b_shape, seed=1)], ["Y"], **attrs)


def test_gelu_family() -> None:
    x, bias = _random(2, 3, 8), _random(8, seed=1)
    _check("Gelu", [x], ["Y"])
    _check("BiasGelu", [x, bias], ["Y"])
    _check("FastGelu", [x], ["Y"], atol=1e-4)
    _check("FastGelu", [x, bias], ["Y"], atol=1e-4)
    _check("QuickGelu", [x], ["Y"])
    _check("QuickGelu", [x], ["Y"], alpha=1.3)


@pytest.mark.parametrize("skip_shape", [(2, 3, 8), (1, 3, 8), (3, 8)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skip_layer_normalization(skip_shape: tuple[int, ...], with_bias: bool) -> None:
    x, skip = _random(2, 3, 8), _random(*skip_shape, seed=1)
    gamma, beta, bias = _random(8, seed=2), _random(8, seed=3), _random(8, seed=4)
    inputs: list[np.ndarray | None] = [x, skip, gamma, beta, bias if with_bias else None]
    if not with_bias:
        inputs.pop()
    _check("SkipLayerNormalization", inputs, ["Y"], epsilon=1e-5)
    outputs = ["Y", "mean", "inv_std_var", "sum"] if with_bias else ["Y", "mean", "inv_std_var"]
    _check("SkipLayerNormalization", inputs, outputs)
    _check("SkipLayerNormalization", [x, skip, gamma], ["Y"])


def test_skip_simplified_layer_normalization() -> None:
    x, skip, gamma, bias = _random(2, 3, 8), _random(2, 3, 8, seed=1), _random(8), _random(8)
    _check("SkipSimplifiedLayerNormalization", [x, skip, gamma], ["Y"], epsilon=1e-6)
    _check(
        "SkipSimplifiedLayerNormalization",
        [x, skip, gamma, bias],
        ["Y", "", "inv_std_var", "sum"],
    )


@pytest.mark.parametrize("axis", [-1, 1])
def test_default_domain_contrib_normalizations_before_opset_17(axis: int) -> None:
    x, scale, bias = _random(2, 3, 4), _random(*(3, 4)[axis:], seed=1), _random(4)
    bias = _random(*(3, 4)[axis:], seed=2)
    _check("LayerNormalization", [x, scale, bias], ["Y"], domain="", axis=axis)
    _check("LayerNormalization", [x, scale], ["Y", "mean", "inv_std"], domain="", axis=axis)
    _check("SimplifiedLayerNormalization", [x, scale], ["Y"], domain="", axis=axis)
    _check("SimplifiedLayerNormalization", [x, scale], ["Y", "inv_std"], domain="", epsilon=1e-3)


def test_skip_layer_normalization_gradients_float64() -> None:
    fn = build_node_fn(
        helper.make_node("SkipLayerNormalization", ["x", "s", "g", "b", "c"], ["y"], domain=MS), 1
    )
    gen = torch.Generator().manual_seed(0)
    args = [
        torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
        for shape in [(2, 3), (2, 3), (3,), (3,), (3,)]
    ]
    assert torch.autograd.gradcheck(fn, args)
