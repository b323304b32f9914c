"""Initializers holding inf/NaN (a causal attention mask registered as a torch buffer) are
buffers, never trainable parameters: as parameters they were reported as non-finite weights,
compared with He/Xavier, and re-randomised by the re-initialisation fix. Nor is the -inf they
add to attention scores a NaN/Inf origin."""

from __future__ import annotations

import functools
import io

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from service.engine.onnx.convert import convert
from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from service.engine.report import Report
from tests.support.export import to_onnx

SEQ, WIDTH = 6, 16


class CausalSelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.register_buffer("mask", torch.full((SEQ, SEQ), float("-inf")).triu(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.qkv(x)  # sliced, not chunked: chunk exports as SplitToSequence (unsupported)
        q, k, v = h[..., :WIDTH], h[..., WIDTH : 2 * WIDTH], h[..., 2 * WIDTH :]
        scores = q @ k.transpose(-2, -1) / WIDTH**0.5 + self.mask
        return self.proj(torch.softmax(scores, dim=-1) @ v)


@functools.cache
def _export(dynamo: bool) -> bytes:
    return to_onnx(CausalSelfAttention(), torch.randn(2, SEQ, WIDTH), dynamo=dynamo)


def test_a_default_dynamo_export_keeps_no_non_finite_parameter() -> None:
    """`optimize=True` (the exporter's default) renames and merges initializers."""
    exported = to_onnx(
        CausalSelfAttention(), torch.randn(2, SEQ, WIDTH), dynamo=True, optimize=True
    )
    graph = convert(onnx.load_from_string(exported))
    assert all(torch.isfinite(p).all() for _, p in graph.named_graph_parameters())
    assert any(torch.isinf(b).any() for b in graph.buffers())
    assert graph.param_names  # the weights are still trainable


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_a_mask_full_of_inf_is_a_buffer_and_the_weights_stay_parameters(dynamo: bool) -> None:
    model = onnx.load_from_string(_export(dynamo))
    assert "mask" in {init.name for init in model.graph.initializer}  # the premise
    graph = convert(model)
    assert set(graph.param_names) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    assert "mask" in graph.buffer_names
    mask = dict(graph.named_buffers())[graph.buffer_names["mask"]]
    assert torch.isinf(mask).any() and not mask.requires_grad


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_the_masked_model_still_matches_torch_and_its_weights_get_gradients(
    dynamo: bool,
) -> None:
    graph = convert(onnx.load_from_string(_export(dynamo)))
    reference = CausalSelfAttention()
    x = torch.randn(2, SEQ, WIDTH)
    out = graph(x)
    torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    grads = {name: p.grad for name, p in graph.named_graph_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())


def _diagnose(exported: bytes) -> Report:
    buffer = io.BytesIO()
    np.savez(buffer, x=torch.randn(2, SEQ, WIDTH).numpy())
    options = DiagnoseOptions.model_validate({"device": "cpu", "verify_fixes": False})
    return diagnose(exported, buffer.getvalue(), options)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_a_diagnosis_finds_no_non_finite_values_in_a_masked_model(dynamo: bool) -> None:
    """The mask's -inf added to the scores (then absorbed by Softmax) is no NaN/Inf origin."""
    report = _diagnose(_export(dynamo))
    assert "mask" not in {p.name for p in report.parameters}
    assert [f for f in report.findings if f.kind == "non_finite"] == []


class MaskedThenLog(CausalSelfAttention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(super().forward(x) - 100.0)  # a real NaN, after the mask


def test_a_real_nan_after_the_mask_is_still_found_at_its_origin() -> None:
    exported = to_onnx(MaskedThenLog(), torch.randn(2, SEQ, WIDTH), dynamo=True)
    found = [f for f in _diagnose(exported).findings if f.kind == "non_finite"]
    assert len(found) == 1
    assert "Log" in found[0].message


@pytest.mark.parametrize(
    ("values", "finite"),
    [
        ([3e38, 3e38, -1.0], True),  # finite, but their sum overflows to inf
        ([1.0, float("nan")], False),
        ([float("inf"), float("-inf")], False),  # their sum is NaN
        ([0.5, float("-inf")], False),
    ],
)
def test_finiteness_of_initializers_survives_overflowing_sums(
    values: list[float], finite: bool
) -> None:
    """The check sums first (a finite sum proves every element finite) and looks at each
    element only when the sum is not finite."""
    from service.engine.onnx.convert import _non_finite_initializers

    weights = {"w": torch.tensor(values, dtype=torch.float32)}
    assert (_non_finite_initializers(weights) == set()) is finite


class WhereMaskedAttention(CausalSelfAttention):
    """The causal mask built in the forward pass as Hugging Face does:
    `where(allowed, 0, -inf)`, which a legacy export writes with two Constants."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.qkv(x)
        q, k, v = h[..., :WIDTH], h[..., WIDTH : 2 * WIDTH], h[..., 2 * WIDTH :]
        position = torch.arange(x.shape[1])
        allowed = position[None, :] <= position[:, None]
        mask = torch.where(allowed, 0.0, float("-inf"))
        scores = q @ k.transpose(-2, -1) / WIDTH**0.5 + mask
        return self.proj(torch.softmax(scores, dim=-1) @ v)


def test_a_mask_built_from_a_constant_minus_inf_is_no_nan_origin() -> None:
    model = onnx.load_from_string(to_onnx(WhereMaskedAttention(), torch.randn(2, SEQ, WIDTH)))
    constants = [
        onnx.numpy_helper.to_array(n.attribute[0].t)
        for n in model.graph.node
        if n.op_type == "Constant"
    ]
    assert any(np.isneginf(c).any() for c in constants if c.dtype.kind == "f")  # the premise
    x = np.random.default_rng(0).standard_normal((2, SEQ, WIDTH)).astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, x=x)
    report = diagnose(
        model.SerializeToString(), buffer.getvalue(), DiagnoseOptions(verify_fixes=False)
    )
    assert not [f for f in report.findings if f.kind == "non_finite"]
    assert report.loss.value is not None and np.isfinite(report.loss.value)
