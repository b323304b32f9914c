"""A probed value whose gradient is undefined in a pass (the unused half of a split, an RNN's
unused state output under cuDNN) hands its gradient hook None, not zeros: the diagnosis must
count it as no gradient rather than crash (seen first on an H100 with cuDNN's LSTM)."""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn

from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from tests.support.export import to_onnx


class SplitHalfUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept, unused = torch.relu(self.fc1(x)).split(4, dim=1)
        return self.fc2(kept), unused  # the loss reads output 0 only


def test_a_value_without_gradient_is_measured_as_zero_not_a_crash() -> None:
    # the premise: autograd hands such a hook None (so the probes must handle it)
    x = torch.randn(5, 6, requires_grad=True)
    first, other = x.split(3, dim=1)
    seen: list[object] = []
    other.register_hook(seen.append)
    first.sum().backward()
    assert seen == [None]
    torch.manual_seed(0)
    module = SplitHalfUnused()
    batch = torch.randn(16, 6)
    target = torch.randn(16, 3)
    data = to_onnx(module, batch)
    buffer = io.BytesIO()
    np.savez(buffer, x=batch.numpy(), target=target.numpy())
    report = diagnose(data, buffer.getvalue(), DiagnoseOptions(verify_fixes=False))
    assert report.loss.kind == "mse"
    by_name = {p.name: p for p in report.parameters}
    module.zero_grad()
    torch.nn.functional.mse_loss(module(batch)[0], target).backward()
    for name, param in module.named_parameters():
        assert param.grad is not None
        grad_norm = by_name[name].grad_norm
        assert grad_norm is not None
        assert abs(grad_norm - float(param.grad.norm())) < 1e-4
