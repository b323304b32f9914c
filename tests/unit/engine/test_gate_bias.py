"""The LSTM forget gate (GRU update gate) sees bias_ih + bias_hh (ONNX: Wb + Rb): the advice
names that measured sum, and its fix makes the sum 1 (input slice 1, hidden slice 0), in every
format: `.pt2`, the legacy ONNX export, the dynamo export (whose names the converter restores)
and a dynamo export without the metadata that names them (the bias stays ONNX's `B`).

A forget bias of -5 split over both tensors (σ(-5) = 0.007: the gradient through time is gone
after a few steps) used to read "forget-gate bias 0 … σ(0) = 0.5", and the fix set bias_ih's
slice to 1 only: a sum of -1.5, not resolved.
"""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.engine import diagnose
from service.engine.options import DiagnoseOptions
from service.engine.report import Recommendation, Report
from tests.support import export
from tests.support.pathologies import Case, GatedRNN
from tests.unit.engine.measure_support import onnx_available

OPTIONS = DiagnoseOptions()
GATES = {nn.LSTM: 4, nn.GRU: 3}  # torch's chunk 1 is the LSTM forget / GRU update gate


def _biases(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    params = dict(module.named_parameters())
    return params["rnn.bias_ih_l0"], params["rnn.bias_hh_l0"]


def _gate_bias(cell: type[nn.Module], value: float, steps: int = 30) -> Case:
    """A GatedRNN whose gate bias is `value`, half in bias_ih and half in bias_hh."""

    def build(_seed: int) -> nn.Module:
        module = GatedRNN(cell)
        with torch.no_grad():
            for bias in _biases(module):
                bias.chunk(GATES[cell])[1].fill_(value / 2)
        return module

    return Case(f"{cell.__name__}_{value}", build, (8, steps, 4))


def _without_source_names(model: bytes) -> bytes:
    """The dynamo export without the node metadata that names torch's parameters: the folded
    bias stays one ONNX `B` initializer."""
    proto = onnx.load_from_string(model)
    for node in proto.graph.node:
        del node.metadata_props[:]
    return proto.SerializeToString()


def _model_bytes(fmt: str, module: nn.Module, x: torch.Tensor) -> bytes:
    if fmt in ("torch_export", "onnx_legacy", "onnx_dynamo"):
        return export.to_format(fmt, module, x)
    return _without_source_names(export.to_format("onnx_dynamo", module, x))


def _time_advice(report: Report) -> Recommendation:
    kinds = [(f.kind, f.evidence.get("axis")) for f in report.findings]
    index = kinds.index(("vanishing_gradients", "time"))
    (rec,) = [r for r in report.recommendations if index in r.addresses]
    return rec


def _fixed_time_ratio(case: Case, cell: type[nn.Module]) -> float:
    """Plain torch: the first/last step ‖∂L/∂x_t‖ after the usual recipe, bias_ih's gate
    slice 1 and bias_hh's 0 (Jozefowicz et al. 2015)."""
    module = copy.deepcopy(case.module())
    bias_ih, bias_hh = _biases(module)
    with torch.no_grad():
        bias_ih.chunk(GATES[cell])[1].fill_(1.0)
        bias_hh.chunk(GATES[cell])[1].zero_()
    x, target = case.batch()
    x.requires_grad_(True)
    F.cross_entropy(module(x), target).backward()
    assert x.grad is not None
    norms = x.grad.double().pow(2).sum(dim=(0, 2)).sqrt()
    return float(norms[0] / norms[-1])


FORMATS = ["torch_export", "onnx_legacy", "onnx_dynamo", "onnx_dynamo_unnamed"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_closed_forget_gates_are_named_and_the_fix_makes_their_sum_1(fmt: str) -> None:
    if fmt.startswith("onnx") and not onnx_available():
        pytest.skip("ONNX converter not built")
    case = _gate_bias(nn.LSTM, -5.0)
    x, _ = case.batch()
    report = diagnose(_model_bytes(fmt, case.module(), x), case.batch_bytes(), OPTIONS)
    rec = _time_advice(report)
    assert rec.fix == "reinitialize_weights"
    # the measured bias, bias_ih + bias_hh, not an assumed 0
    (bias,) = rec.params["current_forget_gate_bias"].values()
    assert bias == pytest.approx(-5.0, abs=1e-5)
    assert set(rec.params["forget_gate_bias"].values()) == {1.0}  # what the snippet sets
    assert "is -5 in" in rec.rationale and "σ(-5) = 0.00669" in rec.rationale, rec.rationale
    assert "σ(0)" not in rec.rationale
    # the snippet sets the sum: bias_ih's forget slice 1, bias_hh's 0
    assert "chunk(4)[1].fill_(1.0)" in rec.snippet and "chunk(4)[1].zero_()" in rec.snippet
    schemes = set(rec.params["schemes"].values())
    assert schemes == ({"onnx_forget_bias"} if fmt == "onnx_dynamo_unnamed" else {"forget_bias"})
    verified = rec.verified
    assert verified is not None and verified.applied, verified
    # the fixed copy is the model with forget bias 1: its time ratio is plain torch's
    after = verified.after["figures"]["time_ratio"]
    assert after == pytest.approx(_fixed_time_ratio(case, nn.LSTM), rel=1e-3)
    assert verified.resolved, verified.after


@pytest.mark.parametrize("fmt", ["torch_export", "onnx_dynamo_unnamed"])
def test_closed_gru_update_gates_are_named_and_the_fix_makes_their_sum_1(fmt: str) -> None:
    if fmt.startswith("onnx") and not onnx_available():
        pytest.skip("ONNX converter not built")
    case = _gate_bias(nn.GRU, -5.0)
    x, _ = case.batch()
    report = diagnose(_model_bytes(fmt, case.module(), x), case.batch_bytes(), OPTIONS)
    rec = _time_advice(report)
    (bias,) = rec.params["current_update_gate_bias"].values()
    assert bias == pytest.approx(-5.0, abs=1e-5)
    assert set(rec.params["update_gate_bias"].values()) == {1.0}  # what the snippet sets
    assert "σ(-5) = 0.00669" in rec.rationale, rec.rationale
    assert "chunk(3)[1].zero_()" in rec.snippet
    verified = rec.verified
    assert verified is not None and verified.applied, verified
    after = verified.after["figures"]["time_ratio"]
    assert after == pytest.approx(_fixed_time_ratio(case, nn.GRU), rel=1e-3)


def test_default_lstm_rationale_reads_its_measured_forget_bias() -> None:
    case = Case("lstm", lambda _s: GatedRNN(nn.LSTM), (8, 30, 4))
    module = case.module()
    bias_ih, bias_hh = _biases(module)
    with torch.no_grad():
        forget = (bias_ih + bias_hh).chunk(4)[1]
    expected = float(forget.mean())
    x, _ = case.batch()
    report = diagnose(_model_bytes("torch_export", module, x), case.batch_bytes(), OPTIONS)
    rec = _time_advice(report)
    assert rec.params["current_forget_gate_bias"] == {"rnn": pytest.approx(expected, abs=1e-6)}
    assert "averages" in rec.rationale and "σ(0) = 0.5" not in rec.rationale


def test_forget_bias_already_1_gets_no_forget_bias_advice() -> None:
    """100 steps decay even at forget bias 1 (σ(1) = 0.73 per step); setting it to 1 again
    would change nothing, so it is not advised."""
    case = _gate_bias(nn.LSTM, 1.0, steps=100)
    x, _ = case.batch()
    report = diagnose(_model_bytes("torch_export", case.module(), x), case.batch_bytes(), OPTIONS)
    kinds = [(f.kind, f.evidence.get("axis")) for f in report.findings]
    index = kinds.index(("vanishing_gradients", "time"))
    for rec in report.recommendations:
        if index in rec.addresses:
            assert "forget_bias" not in rec.params.get("schemes", {}).values(), rec
