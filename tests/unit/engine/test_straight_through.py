"""Straight-through estimators (STE) through export. Written as `x + (round(x) - x).detach()`,
both ONNX exporters drop the detach (ONNX has no stop-gradient) and the converter puts it
back: the report has torch's gradients. Written as a torch.autograd.Function, every export
keeps the rounding's forward only: the layers before it get exactly no gradient, which the
report says is the rounding's doing (not underflow), recommending an STE that it verifies on
a copy; the rounded weights stay parameters of an ONNX model."""

from __future__ import annotations

from typing import Any

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.engine.gradient_cuts import straight_through
from service.engine.onnx.convert import convert
from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from tests.support.export import to_onnx, to_torch_export
from tests.unit.engine.measure_support import npz_bytes

X = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(1))


class RoundWithIdentityGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class QuantisedHidden(nn.Module):
    """A hidden layer rounded to a grid of 0.05 with a straight-through estimator."""

    def __init__(self, as_function: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.head = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 4)
        self.as_function = as_function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l2(torch.relu(self.l1(x)))) / 0.05
        if self.as_function:
            h = RoundWithIdentityGradient.apply(h)
        else:
            h = h + (torch.round(h) - h).detach()
        return self.head(h * 0.05)


def _torch_gradients(module: nn.Module) -> tuple[float, dict[str, float]]:
    loss = F.cross_entropy(module(X), Y)
    loss.backward()
    return loss.item(), {
        n: p.grad.norm().item() for n, p in module.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_a_detached_ste_in_onnx_gets_its_stop_gradient_back(dynamo: bool) -> None:
    module = QuantisedHidden(as_function=False)
    model = to_onnx(module, X, input_names=["x"], dynamo=dynamo)
    ops = [n.op_type for n in onnx.load_from_string(model).graph.node]
    assert "Round" in ops and "Sub" in ops  # the premise: written without a stop-gradient
    report = diagnose(model, npz_bytes(x=X, target=Y), DiagnoseOptions(verify_fixes=False))
    loss, grads = _torch_gradients(module)
    assert report.loss.value == pytest.approx(loss, rel=1e-6)
    assert {p.name: p.grad_norm for p in report.parameters} == pytest.approx(grads, rel=1e-5)
    assert any("straight-through estimator(s)" in n for n in report.notes)
    assert not report.findings


@pytest.mark.parametrize("fmt", ["onnx", "torch_export"])
def test_a_rounding_that_cuts_the_gradient_is_named_and_its_ste_verified(fmt: str) -> None:
    module = QuantisedHidden(as_function=True)
    model = to_onnx(module, X, input_names=["x"]) if fmt == "onnx" else to_torch_export(module, X)
    report = diagnose(model, npz_bytes(x=X, target=Y), DiagnoseOptions.model_validate({}))
    # every source parameter is one, the rounded ones included
    assert {p.name for p in report.parameters} == {n for n, _ in module.named_parameters()}
    zero = {p.name for p in report.parameters if p.grad_norm == 0.0}
    assert zero == {"l1.weight", "l1.bias", "l2.weight", "l2.bias"}
    (finding,) = report.findings
    assert finding.kind == "vanishing_gradients"
    cut = finding.evidence["gradient_cut"]
    assert cut["op"].lower() == "round" and cut["layers"] == ["l1", "l2"]
    assert f"passes {cut['op']} ({cut['node']}), whose derivative is zero" in finding.message
    assert "underflow" not in finding.message
    (rec,) = report.recommendations
    assert rec.fix == "straight_through_estimator" and rec.params["node"] == cut["node"]
    assert "x_q = x + (torch.round(x) - x).detach()" in rec.snippet
    assert rec.verified is not None and rec.verified.resolved is True


def test_the_verified_ste_has_the_gradients_of_the_torch_function() -> None:
    module = QuantisedHidden(as_function=True)
    graph = convert(onnx.load_from_string(to_onnx(module, X, input_names=["x"])))
    rounding = next(n.name for n in graph.nodes if n.op_type == "Round")
    assert straight_through(graph, [rounding]) == [rounding]
    F.cross_entropy(graph(X), Y).backward()
    ours = {n: p.grad.norm().item() for n, p in graph.named_graph_parameters()}  # type: ignore[union-attr]
    assert ours == pytest.approx(_torch_gradients(module)[1], rel=1e-5)
