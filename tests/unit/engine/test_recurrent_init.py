"""Fan-in and reference std of RNN/GRU/LSTM weights: a default-initialised nn.LSTM is not an
init_scale finding in any format (ONNX keeps W as [dirs, gates*H, input], whose fan-in is the
input size, not dirs*gates*H*input)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from tests.support.export import to_onnx, to_torch_export
from tests.unit.engine.measure_support import npz_bytes, onnx_available

INPUT, HIDDEN = 48, 8  # input ≫ H: Xavier over the stacked gates would misjudge torch's init


class LastStepLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(INPUT, HIDDEN, num_layers=2, batch_first=True)
        self.fc = nn.Linear(HIDDEN, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


def _export(fmt: str, module: nn.Module, x: torch.Tensor) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "torch_export":
            return to_torch_export(module, x)
        return to_onnx(module, x, input_names=["x"], dynamo=fmt == "onnx_dynamo")


@pytest.mark.parametrize("fmt", ["torch_export", "onnx_legacy", "onnx_dynamo"])
def test_default_lstm_fan_in_is_the_input_size_and_is_not_flagged(fmt: str) -> None:
    if fmt.startswith("onnx") and not onnx_available():
        pytest.skip("ONNX converter not built")
    torch.manual_seed(0)
    module = LastStepLSTM()
    x = torch.randn(4, 6, INPUT)
    report = diagnose(
        _export(fmt, module, x),
        npz_bytes(x=x),
        DiagnoseOptions(loss="output_norm", verify_fixes=False),
    )
    recurrent = [layer for layer in report.layers if layer.op.lower().endswith("lstm")]
    assert recurrent, [layer.op for layer in report.layers]
    first = recurrent[0]
    assert first.fan_in == INPUT
    # torch's U(±1/√H) has std 1/√(3H): 1/√3 of the 1/√H reference, whatever the input size
    assert first.init_std_ratio == pytest.approx(1 / math.sqrt(3), rel=0.15)
    assert not [f for f in report.findings if f.kind == "init_scale"]
