"""Recurrent models in every format get the forget-gate advice, written in the source model's
terms, and stacked recurrent layers are named `lstm.l0`, `lstm.l1`.

The dynamo exporter's optimizer (what `torch.onnx.export(..., dynamo=True)` gives a user) folds
torch's bias_ih/bias_hh into one ONNX `B` initializer named `val_N`: the advice must locate it
(ONNX gate order i, o, f, c) and still name `rnn.bias_ih_l0` in its snippet.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.engine import diagnose
from service.engine.options import DiagnoseOptions
from tests.support import export
from tests.support.pathologies import Case, GatedRNN
from tests.unit.engine.measure_support import npz_bytes, onnx_available

OPTIONS = DiagnoseOptions()
CASE = Case("lstm", lambda _s: GatedRNN(nn.LSTM), (8, 30, 4))  # default LSTM, 30 steps


def _model_bytes(fmt: str, module: nn.Module, x: torch.Tensor) -> bytes:
    return export.to_format(fmt, module, x)


def test_lstm_time_vanishing_gets_forget_bias_advice_in_every_format() -> None:
    if not onnx_available():
        pytest.skip("ONNX converter not built")
    x, _ = CASE.batch()
    after: dict[str, float] = {}
    for fmt in ("torch_export", "onnx_legacy", "onnx_dynamo"):
        report = diagnose(_model_bytes(fmt, CASE.module(), x), CASE.batch_bytes(), OPTIONS)
        kinds = [(f.kind, f.evidence.get("axis")) for f in report.findings]
        index = kinds.index(("vanishing_gradients", "time"))
        advice = [r for r in report.recommendations if index in r.addresses]
        assert [r.fix for r in advice] == ["reinitialize_weights"], (fmt, report.recommendations)
        (rec,) = advice
        # the snippet is written on the user's nn.LSTM, whatever the graph calls the bias
        assert "'rnn.bias_ih_l0'" in rec.snippet and "chunk(4)[1].fill_(1.0)" in rec.snippet
        schemes = rec.params["schemes"]
        if "rnn.bias_ih_l0" in schemes:
            assert schemes == {"rnn.bias_ih_l0": "forget_bias"}, fmt
        else:  # the dynamo optimizer folded torch's biases into one ONNX B
            assert fmt == "onnx_dynamo"
            (onnx_bias,) = schemes
            assert schemes[onnx_bias] == "onnx_forget_bias"
            assert rec.params["source_names"] == {onnx_bias: ["rnn.bias_ih_l0"]}
            assert "i, o, f, c" in rec.rationale
        verified = rec.verified
        assert verified is not None and verified.applied, (fmt, verified)
        before = verified.before["figures"]["time_ratio"]
        after[fmt] = verified.after["figures"]["time_ratio"]
        assert after[fmt] > 100 * before, fmt
    # the same change in every format: B[:, 2H:3H] in ONNX is chunk 1 of bias_ih in torch
    assert after["onnx_legacy"] == pytest.approx(after["torch_export"], rel=1e-3)
    assert after["onnx_dynamo"] == pytest.approx(after["torch_export"], rel=1e-3)


class StackedLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, num_layers=2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


@pytest.mark.parametrize("fmt", ["onnx_legacy", "onnx_dynamo", "torch_export"])
def test_stacked_lstm_layers_are_named_by_torch_layer_index(fmt: str) -> None:
    if fmt.startswith("onnx") and not onnx_available():
        pytest.skip("ONNX converter not built")
    torch.manual_seed(0)
    x = torch.randn(4, 6, 4)
    options = DiagnoseOptions(loss="output_norm", verify_fixes=False)
    report = diagnose(_model_bytes(fmt, StackedLSTM(), x), npz_bytes(x=x), options)
    names = [layer.name for layer in report.layers]
    if fmt == "torch_export":
        assert names == ["lstm", "fc"]  # one aten.lstm node for the whole stack
        return
    assert names == ["lstm.l0", "lstm.l1", "fc"]
    owner = {p.name: p.layer for p in report.parameters}
    if fmt == "onnx_legacy":  # torch's names survive: the suffix decides
        assert owner["lstm.weight_ih_l0"] == "lstm.l0"
        assert owner["lstm.weight_hh_l1"] == "lstm.l1"


def _time_advice(report):
    kinds = [(f.kind, f.evidence.get("axis")) for f in report.findings]
    index = kinds.index(("vanishing_gradients", "time"))
    (rec,) = [r for r in report.recommendations if index in r.addresses]
    return rec


def test_gru_gets_update_gate_bias_advice_verified_alike_in_torch_and_onnx() -> None:
    if not onnx_available():
        pytest.skip("ONNX converter not built")
    case = Case("gru", lambda _s: GatedRNN(nn.GRU), (8, 30, 4))
    x, _ = case.batch()
    after: dict[str, float] = {}
    for fmt in ("torch_export", "onnx_dynamo"):
        report = diagnose(_model_bytes(fmt, case.module(), x), case.batch_bytes(), OPTIONS)
        rec = _time_advice(report)
        assert rec.fix == "reinitialize_weights"
        assert "'rnn.bias_ih_l0'" in rec.snippet and "chunk(3)[1].fill_(1.0)" in rec.snippet
        assert set(rec.params["schemes"].values()) <= {"update_bias", "onnx_update_bias"}
        assert rec.verified is not None and rec.verified.applied, rec.verified
        after[fmt] = rec.verified.after["figures"]["time_ratio"]
        assert after[fmt] > rec.verified.before["figures"]["time_ratio"]
    # ONNX's B[:, 0:H] (gates z, r, h) is torch's chunk 1 of bias_ih (r, z, n)
    assert after["onnx_dynamo"] == pytest.approx(after["torch_export"], rel=1e-3)


def _biasless_lstm(*args: int, **kwargs: bool) -> nn.Module:
    return nn.LSTM(*args, bias=False, **kwargs)


def test_lstm_without_bias_gets_advice_that_verification_says_it_cannot_apply() -> None:
    case = Case("nobias", lambda _s: GatedRNN(_biasless_lstm), (8, 30, 4))  # type: ignore[arg-type]
    x, _ = case.batch()
    report = diagnose(_model_bytes("torch_export", case.module(), x), case.batch_bytes(), OPTIONS)
    rec = _time_advice(report)
    assert rec.params["schemes"] == {"rnn": "no_bias_forget"}
    assert "bias=True" in rec.snippet and "'rnn.bias_ih_l0'" in rec.snippet
    assert rec.verified is not None and not rec.verified.applied
    assert rec.verified.reason and "bias=False" in rec.verified.reason
