"""The converter on the zoo (tests/support/zoo.py) exported by both exporters at the lowest,
default and highest opset: forward equals onnxruntime, and for the legacy TRAINING exports
(and the dynamo exports without the exporter's optimizer) every parameter gradient equals the
original torch module's.
"""

from __future__ import annotations

import functools
import io
import warnings

import onnx
import pytest
import torch
from torch.onnx import _constants as onnx_constants

from service.engine.onnx.conformance import check_conversion
from service.engine.onnx.convert import convert
from tests.support.export import to_onnx
from tests.support.zoo import ZOO

LEGACY_LOWEST = {"transformer": 14, "gpt": 14}  # the legacy exporter needs 14 for SDPA
LEGACY_DEFAULT_LOWEST = 9  # below, the exporter itself emits invalid Erf/Expand nodes
HIGHEST = onnx_constants.ONNX_MAX_OPSET
DYNAMO_LOWEST = 18  # the dynamo exporter's first native opset


def _matrix() -> list[pytest.param]:  # type: ignore[valid-type]
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
def exported(name: str, dynamo: bool, opset: int | None) -> bytes:
    """Export once per session (exports are the slow part)."""
    entry = ZOO[name]
    module = entry.build()
    target = torch.jit.script(module) if entry.scripted else module
    return to_onnx(target, entry.example(), dynamo=dynamo, opset=opset)


@pytest.mark.parametrize(("name", "dynamo", "opset"), _matrix())
def test_forward_matches_onnxruntime(name: str, dynamo: bool, opset: int | None) -> None:
    data = exported(name, dynamo, opset)
    x = ZOO[name].example()
    graph = convert(onnx.load_from_string(data), mode="eval")
    with torch.no_grad():
        ours = graph(x)
    check = check_conversion(onnx.load_from_string(data), graph, [x], [ours])
    assert check.checked, check.reason
    assert check.max_rel_error is not None and check.max_rel_error <= 1e-4, check
    assert check.reason is None or check.reason.startswith("dropout switched off")


def _legacy_params() -> list[pytest.param]:  # type: ignore[valid-type]
    return [p for p in _matrix() if p.values[1] is False]


@functools.cache
def exported_unoptimized(name: str) -> bytes:
    """The dynamo exporter without its ONNX optimizer, which would fold BatchNormalization
    into the convolutions (and so change the weights the gradients are compared on)."""
    entry = ZOO[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(entry.build(), (entry.example(),), dynamo=True, optimize=False)
    assert program is not None
    buffer = io.BytesIO()
    program.save(buffer)
    return buffer.getvalue()


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
    data = exported_unoptimized(name) if dynamo else exported(name, dynamo, opset)
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


def test_train_mode_keeps_batch_statistics_for_legacy_bn_export() -> None:
    """The legacy TRAINING export of a BN model in train mode equals torch's train forward,
    and the running statistics are buffers named as in the module, not parameters."""
    graph = convert(onnx.load_from_string(exported("cnn_bn", False, None)), mode="train")
    buffers = {name for name, _ in graph.named_buffers()}
    assert "bn1.running_mean" in buffers and "bn1.running_var" in buffers
    assert "bn1.running_mean" not in dict(graph.named_graph_parameters())
