"""A model that computes its own loss (Hugging Face's `model(input_ids, labels=labels).loss`):
its `labels` array feeds the model, and the loss is the model's scalar output itself, not its
square (output_norm), so every gradient is the training step's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from tests.support.export import to_onnx, to_torch_export
from tests.unit.engine.measure_support import npz_bytes


class ComputesItsLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 16)
        self.head = nn.Linear(16, 20)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.tanh(self.embed(input_ids)))
        return F.cross_entropy(logits.reshape(-1, 20), labels.reshape(-1))


IDS = torch.randint(0, 20, (4, 7), generator=torch.Generator().manual_seed(1))
LABELS = torch.randint(0, 20, (4, 7), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_the_models_own_loss_is_the_loss(fmt: str) -> None:
    module = ComputesItsLoss()
    args = (IDS, LABELS)
    model = (
        to_torch_export(module, args)
        if fmt == "torch_export"
        else to_onnx(module, args, input_names=["input_ids", "labels"])
    )
    report = diagnose(model, npz_bytes(input_ids=IDS, labels=LABELS), DiagnoseOptions())
    expected = module(*args)
    expected.backward()
    assert report.loss.kind == "model_output" and "scalar" in (report.loss.reason or "")
    assert report.loss.value == pytest.approx(expected.item(), rel=1e-5)
    grads = {n: p.grad.norm().item() for n, p in module.named_parameters() if p.grad is not None}
    ours = {p.name: p.grad_norm for p in report.parameters}
    assert ours == pytest.approx(grads, rel=1e-4)
