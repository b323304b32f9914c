"""A recurrent layer whose final state is read beside (or instead of) its output sequence:
its ‖∂L/∂a‖ is the norm of the gradient of everything it outputs that the model reads,
√(‖∂L/∂out‖² + ‖∂L/∂h_n‖²), the same in torch.export and ONNX. Before, reading both left the
.pt2 layer without a measurement, and reading h_n alone gave the ONNX layer an exact 0 (the
gradient of its unread output sequence)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from tests.support.export import to_onnx, to_torch_export
from tests.unit.engine.measure_support import npz_bytes

X = torch.randn(5, 7, 4, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(1))


class LastStates(nn.Module):
    def __init__(self, read_output: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.read_output = read_output
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(16 if read_output else 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, _) = self.lstm(x)
        features = torch.cat([out[:, -1], h[-1]], dim=-1) if self.read_output else h[-1]
        return self.head(features)


def _torch_norm(module: LastStates) -> float:
    out, (h, _) = module.lstm(X)
    out.retain_grad()
    h.retain_grad()
    features = torch.cat([out[:, -1], h[-1]], dim=-1) if module.read_output else h[-1]
    F.cross_entropy(module.head(features), Y).backward()
    out_grad = out.grad if out.grad is not None else torch.zeros(())
    assert h.grad is not None
    return float((out_grad.norm() ** 2 + h.grad.norm() ** 2).sqrt())


@pytest.mark.parametrize("read_output", [True, False], ids=["output_and_h_n", "h_n_only"])
@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_a_recurrent_layers_gradient_includes_its_read_final_state(
    fmt: str, read_output: bool
) -> None:
    module = LastStates(read_output)
    model = (
        to_torch_export(module, X)
        if fmt == "torch_export"
        else to_onnx(module, X, input_names=["x"])
    )
    report = diagnose(model, npz_bytes(x=X, target=Y), DiagnoseOptions(verify_fixes=False))
    (lstm,) = [layer for layer in report.layers if layer.name == "lstm"]
    assert lstm.activation_grad_norm == pytest.approx(_torch_norm(LastStates(read_output)), 1e-5)
    assert not [n for n in report.notes if "no measured ‖∂L/∂a‖" in n]
