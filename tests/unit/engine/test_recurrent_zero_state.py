"""nn.LSTM/nn.GRU called without an initial state, exported with torch.onnx.export(dynamo=True)
and its default optimizer: the zero initial state becomes an all-zero initializer (`val_16`)
read as the op's initial_h/initial_c. It is no weight of the source model, so it must not be a
parameter: as one, ∂L/∂h0 (≈3e-10 after 40 steps, every entry below fp16's 2^-24) made an
`fp16_underflow` info forecast on the recurrent layer of an fp32 run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from service.engine import diagnose
from service.engine.options import DiagnoseOptions
from tests.support.export import to_onnx
from tests.unit.engine.measure_support import npz_bytes


class LastStepClassifier(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(3, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])  # no (h0, c0): torch's zero initial state


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_zero_initial_state_is_no_parameter_and_makes_no_fp16_forecast(
    cell: type[nn.Module],
) -> None:
    torch.manual_seed(0)
    module = LastStepClassifier(cell)
    x = torch.randn(4, 40, 3)
    model = to_onnx(module, x, dynamo=True, optimize=True)
    report = diagnose(model, npz_bytes(x=x, target=torch.tensor([0, 1, 0, 1])), DiagnoseOptions())
    trained = sum(p.numel() for p in module.parameters())
    assert report.model.parameter_count == trained
    assert sum(math.prod(p.shape) for p in report.parameters) == trained
    assert [f for f in report.findings if f.kind == "fp16_underflow"] == []
    # the recurrent weights are still parameters, with real gradients
    rnn = [p for p in report.parameters if p.layer == "rnn"]
    assert rnn and all(p.grad_norm and p.grad_norm > 1e-3 for p in rnn)
