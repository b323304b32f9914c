"""The converter on the zoo (tests/support/zoo.py) exported by both exporters at the lowest,
default and highest opset: forward equals onnxruntime, and for the legacy TRAINING exports
(and the dynamo exports without the exporter's optimizer) every parameter gradient equals the
original torch module's. The dynamo exports at the default opset are run through the exporter's
optimizer for the forward check (what a user's `torch.onnx.export(..., dynamo=True)` gives);
elsewhere `to_onnx`'s default (optimizer off) keeps BatchNormalization and the parameter names.
"""

from __future__ import annotations

import functools

import onnx
import pytest
import torch
from _pytest.mark import ParameterSet  # what pytest.param returns
from torch.onnx import _constants as onnx_constants

from service.engine.onnx.conformance import check_conversion
from service.engine.onnx.convert import convert
from tests.support.export import to_onnx
from tests.support.zoo import ZOO

LEGACY_LOWEST = {"transformer": 14, "gpt": 14}  # the legacy exporter needs 14 for SDPA
LEGACY_DEFAULT_LOWEST = 9  # below, the exporter itself emits invalid Erf/Expand nodes
HIGHEST = onnx_constants.ONNX_MAX_OPSET
DYNAMO_LOWEST = 18  # the dynamo exporter's first native opset


def _matrix() -> list[ParameterSet]:
    params = []
    for name, entry in ZOO.items():
        legacy = [LEGACY_LOWEST.get(name, LEGACY_DEFAULT_LOWEST), None, HIGHEST]
        for opset in legacy if "legacy" in entry.exporters else []:
            params.append(
                pytest.param(name, False, opset, id=f"{name}-legacy-{opset or 'default'}")
            )
        for opset in [] if "dynamo" not in entry.exporters else (DYNAMO_LOWEST, None, HIGHEST):
            marks = [] if opset is None else [pytest.mark.slow]
            params.append(
                pytest.param(
                    name, True, opset, id=f"{name}-dynamo-{opset or 'default'}", marks=marks
                )
            )
    return params


@functools.cache
def exported(name: str, dynamo: bool, opset: int | None, optimize: bool | None = None) -> bytes:
    """Export once per session (exports are the slow part)."""
    entry = ZOO[name]
    module = entry.build()
    target = torch.jit.script(module) if entry.scripted else module
    return to_onnx(target, entry.example(), dynamo=dynamo, opset=opset, optimize=optimize)


@pytest.mark.parametrize(("name", "dynamo", "opset"), _matrix())
def test_forward_matches_onnxruntime(name: str, dynamo: bool, opset: int | None) -> None:
    optimize = True if dynamo and opset is None else None
    data = exported(name, dynamo, opset, optimize)
    x = ZOO[name].example()
    graph = convert(onnx.load_from_string(data), mode="eval")
    with torch.no_grad():
        ours = graph(x)
    check = check_conversion(onnx.load_from_string(data), graph, [x], [ours])
    assert check.checked, check.reason
    assert check.max_rel_error is not None and check.max_rel_error <= 1e-4, check
    assert check.reason is None or check.reason.startswith("dropout switched off")


def _legacy_params() -> list[ParameterSet]:
    return [p for p in _matrix() if p.values[1] is False]


def _gradient_params() -> list[pytest.param]:  # type: ignore[valid-type]
    params = list(_legacy_params())
    for name, entry in ZOO.items():
        if "dynamo" in entry.exporters:
            marks = [] if name == "cnn_bn" else [pytest.mark.slow]
            params.append(
                pytest.param(name, True, None, id=f"{name}-dynamo-unoptimized", marks=marks)
            )
    return params


@pytest.mark.parametrize(("name", "dynamo", "opset"), _gradient_params())
def test_training_export_gradients_match_torch(name: str, dynamo: bool, opset: int | None) -> None:
    entry = ZOO[name]
    module = entry.build().train()
    x = entry.example()
    # dynamo: to_onnx's default leaves the exporter's optimizer off, which would fold
    # BatchNormalization into the convolutions (and so change the weights compared here)
    data = exported(name, dynamo, opset)
    graph = convert(onnx.load_from_string(data), mode="train")

    weights = torch.randn(module(x).shape, generator=torch.Generator().manual_seed(3))
    expected_out = module(x)
    (expected_out * weights).sum().backward()
    out = graph(x)
    torch.testing.assert_close(out, expected_out, rtol=1e-4, atol=1e-5)
    (out * weights).sum().backward()

    ours = dict(graph.named_graph_parameters())
    theirs = dict(module.named_parameters())
    assert set(ours) == set(theirs), "parameters must keep the module's names"
    for pname, param in theirs.items():
        got = ours[pname].grad
        if param.grad is None or got is None:  # the branch of an If that did not run
            other = got if param.grad is None else param.grad
            assert other is None or not other.any(), f"{pname}: gradient only on one side"
            continue
        scale = param.grad.abs().max().clamp(min=1e-8)
        rel = float((got - param.grad).abs().max() / scale)
        assert rel <= 2e-3, f"{pname}: relative gradient error {rel:.2e}"


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo-unoptimized"])
def test_bn_running_statistics_are_buffers_not_parameters(dynamo: bool) -> None:
    """A TRAINING export carries running_mean/running_var as float initializers read only as
    BatchNormalization inputs 3/4: they are buffers named as in the module, and the
    parameters are exactly the module's trainable ones, in the module's order."""
    graph = convert(onnx.load_from_string(exported("cnn_bn", dynamo, None)), mode="train")
    module = ZOO["cnn_bn"].build()
    assert [n for n, _ in graph.named_parameters()] == [
        n for n, p in module.named_parameters() if p.requires_grad
    ]
    buffers = {name for name, _ in graph.named_buffers()}
    statistics = {n for n, _ in module.named_buffers() if n.endswith(("_mean", "_var"))}
    assert statistics and statistics <= buffers
