"""`--loss bce`: binary cross-entropy on probabilities, for a model that ends in a sigmoid."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.engine import diagnose
from service.engine.losses import LOSS_KINDS, compute_loss, output_check_notes, output_checks
from service.engine.options import DiagnoseOptions
from tests.support.export import to_onnx, to_torch_export
from tests.unit.engine.measure_support import npz_bytes


def test_bce_equals_torchs_loss_and_gradient_on_probabilities() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 3, requires_grad=True)
    target = torch.randint(0, 2, (6, 3)).float()
    ours = compute_loss("bce", [logits.sigmoid()], target)
    (ours_grad,) = torch.autograd.grad(ours, logits)
    theirs = F.binary_cross_entropy(logits.sigmoid(), target)
    (theirs_grad,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_grad, theirs_grad)
    assert "bce" in LOSS_KINDS


def test_a_saturated_sigmoid_gives_a_large_finite_loss_not_an_error() -> None:
    """torch floors each log at -100; here at log(1e-12): finite either way, no kernel
    assert (which on a GPU would end the process's CUDA context)."""
    p = torch.tensor([[0.0, 1.0, 0.5]], requires_grad=True)
    loss = compute_loss("bce", [p], torch.tensor([[1.0, 0.0, 1.0]]))
    value = float(loss.detach())
    assert math.isfinite(value) and value > 5
    loss.backward()
    assert p.grad is not None and bool(torch.isfinite(p.grad).all())


def test_bce_on_logits_says_to_use_bce_with_logits() -> None:
    y, t = torch.randn(6, 2) * 3, torch.ones(6, 2)
    checks = output_checks("bce", [y], t)
    assert checks is not None
    (note,) = output_check_notes("bce", "bce", [6, 2], [6, 2], checks.tolist())
    assert "use --loss bce_with_logits" in note
    probabilities = torch.rand(6, 2)
    checks = output_checks("bce", [probabilities], t)
    assert checks is not None
    assert output_check_notes("bce", "bce", [6, 2], [6, 2], checks.tolist()) == []


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_a_sigmoid_model_diagnosed_with_bce_has_torchs_gradients_and_no_note(fmt: str) -> None:
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3), nn.Sigmoid()).eval()
    x, t = torch.randn(16, 4), torch.randint(0, 2, (16, 3)).float()
    model = to_torch_export(module, x) if fmt == "torch_export" else to_onnx(module, x)
    options = DiagnoseOptions.model_validate({"verify_fixes": False, "loss": "bce"})
    report = diagnose(model, npz_bytes(x=x, target=t), options)
    module.zero_grad()
    expected = F.binary_cross_entropy(module(x), t)
    expected.backward()
    assert report.loss.kind == "bce"
    assert report.loss.value is not None
    assert math.isclose(report.loss.value, float(expected.detach()), rel_tol=1e-4)
    grads = {p.name: p.grad_norm for p in report.parameters}
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None
        got = grads[name]
        assert got is not None
        assert math.isclose(got, float(parameter.grad.norm()), rel_tol=1e-3), name
    assert not [n for n in report.notes if "--loss" in n]
