"""A Transformer with `batch_first=False` read sequence-first by its self-attention
(attention_layout.py): with a per-token target and a [T, B, C] output nothing in the batch
tells [T, B, F] from [B, T, F], but the attention scores [B × heads, T, T] run over axis 0.
`.pt2` and ONNX from both exporters; the batch_first=True twin stays batch-first."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

from service.engine.measure import measure
from service.engine.options import DiagnoseOptions
from service.engine.subject import build_subject
from tests.support.export import to_onnx
from tests.unit.engine.measure_support import CASES, Case, case_batch, export, onnx_available

FORMATS = ["torch_export"] + (["onnx_legacy", "onnx_dynamo"] if onnx_available() else [])
T, B = 8, 4


class Encoder(nn.Module):
    """[T, B, 8] → [T, B, 3] (batch_first=False, torch's default), or [B, T, 8] → [B, T, 3]."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.enc(x))


def _case(module: nn.Module, x: torch.Tensor) -> Case:
    case = CASES["rnn"]()
    case.module, case.inputs, case.target, case.loss = module, [x], None, "output_norm"
    return case


def _model(case: Case, fmt: str) -> bytes:
    if fmt == "torch_export":
        return export(case, fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_onnx(case.module, case.inputs[0], dynamo=fmt == "onnx_dynamo", input_names=["x"])


def _norms_along(module: nn.Module, x: torch.Tensor, axis: int) -> list[float]:
    """‖∂L/∂x_t‖ for the output-norm loss, t along `axis`, as torch computes them."""
    leaf = x.clone().requires_grad_(True)
    module.zero_grad()
    module(leaf).square().mean().backward()
    assert leaf.grad is not None
    other = tuple(d for d in range(leaf.dim()) if d != axis)
    return [float(v) for v in leaf.grad.double().square().sum(dim=other).sqrt()]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_sequence_first_transformer_is_profiled_along_axis_0(fmt: str) -> None:
    torch.manual_seed(0)
    module, x = Encoder(batch_first=False), torch.randn(T, B, 8)
    case = _case(module, x)
    subject = build_subject(_model(case, fmt), case_batch(case), DiagnoseOptions())
    m = measure(subject)
    (profile,) = m.profiles.time
    assert profile.axis == 0 and len(profile.grad_norms) == T
    assert subject.batch_info.size == B
    assert not any("batch-first assumed" in note for note in m.notes)
    assert any("self-attention" in note for note in m.notes)
    for got, want in zip(profile.grad_norms, _norms_along(module, x, 0), strict=True):
        assert math.isclose(got, want, rel_tol=2e-4, abs_tol=1e-9)


def test_micro_batches_of_a_sequence_first_transformer_split_its_batch_axis() -> None:
    """A .pt2 exported with both axes dynamic (its sizes symbols, bound to the batch's):
    split along axis 0, the attention would see half the sequence and give other gradients."""
    torch.manual_seed(1)
    module, x = Encoder(batch_first=False), torch.randn(T, B, 8)
    case = _case(module, x)
    dims = {0: torch.export.Dim("T", min=2, max=64), 1: torch.export.Dim("B", min=2, max=64)}
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(module, (x,), dynamic_shapes={"x": dims}), buffer)
    data, batch = buffer.getvalue(), case_batch(case)
    full = measure(build_subject(data, batch, DiagnoseOptions()))
    options = DiagnoseOptions(micro_batches=2)
    split = measure(build_subject(data, batch, options), options)
    assert split.micro_batches == 2
    assert split.loss.value == pytest.approx(full.loss.value, rel=1e-5)
    for a, b in zip(split.parameters, full.parameters, strict=True):
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4, abs=1e-9), a.name


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_batch_first_transformer_stays_batch_first(fmt: str) -> None:
    torch.manual_seed(2)
    module, x = Encoder(batch_first=True), torch.randn(T, B, 8)  # [B=8, T=4, 8]
    case = _case(module, x)
    subject = build_subject(_model(case, fmt), case_batch(case), DiagnoseOptions())
    m = measure(subject)
    (profile,) = m.profiles.time
    assert profile.axis == 1 and len(profile.grad_norms) == B
    assert subject.batch_info.size == T
    assert any("batch-first assumed" in note for note in m.notes)
    for got, want in zip(profile.grad_norms, _norms_along(module, x, 1), strict=True):
        assert math.isclose(got, want, rel_tol=2e-4, abs_tol=1e-9)
