"""A frozen backbone under a trainable head, and a ReLU output head that is dead.

- Fine-tuning: a backbone whose parameters are all frozen (requires_grad=False) with nothing
  trainable upstream of it gets a gradient that reaches no parameter an optimizer updates. It
  is still measured (the report shows what it would get if trained), but no finding, verdict
  or recommendation is about it; a frozen layer between trainable ones still counts.
- A model ending in relu(out(h)) whose output ReLU is dead for every example passes no gradient
  at all: the vanishing finding names that output layer, the LeakyReLU swap is verified on
  that very node (not on the healthy hidden ReLUs), and the dead share reads as "all".
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from service.engine import diagnose
from service.engine.detectors.units import unit_share
from service.engine.options import DiagnoseOptions
from service.engine.report import Report
from tests.support.export import to_onnx, to_torch_export, to_torchscript
from tests.unit.engine.measure_support import npz_bytes

torch.set_num_threads(1)


def export(module: nn.Module, x: torch.Tensor, fmt: str) -> bytes:
    if fmt == "torch_export":
        return to_torch_export(module, x)
    if fmt == "torchscript":
        return to_torchscript(module, x)
    return to_onnx(module, x, dynamo=True)


def run(module: nn.Module, fmt: str, x: torch.Tensor, target: torch.Tensor) -> Report:
    return diagnose(export(module, x, fmt), npz_bytes(x=x, target=target), DiagnoseOptions())


def sigmoid_stack(count: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        *[m for _ in range(count) for m in (nn.Linear(width, width), nn.Sigmoid())]
    )


class FineTuned(nn.Module):
    """A deep sigmoid backbone (its gradient vanishes: 12 layers at ×~0.15 each) under a
    2-layer head; `trainable` sigmoid layers between them that are trained."""

    def __init__(self, frozen: int = 12, trainable: int = 0, width: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = sigmoid_stack(frozen, width)
        self.neck = sigmoid_stack(trainable, width)
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))
        self.backbone.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.backbone(x)))


def classes() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(64, 32), torch.randint(0, 4, (64,))


def blamed(report: Report) -> set[str]:
    """Every layer a finding or a recommendation names."""
    named = {n for f in report.findings for n in f.layers}
    named |= {n for r in report.recommendations for n in r.layers}
    for r in report.recommendations:
        named |= {p.rsplit(".", 1)[0] for p in r.params.get("schemes", {})}
    return named


@pytest.mark.parametrize("fmt", ["torch_export", "torchscript"])
def test_a_frozen_backbone_under_a_trainable_head_is_healthy(fmt: str) -> None:
    report = run(FineTuned(), fmt, *classes())
    assert report.verdict == "healthy", [(f.kind, f.message) for f in report.findings]
    assert not report.findings and not report.recommendations
    backbone = {f"backbone.{2 * i}" for i in range(12)}
    assert not blamed(report) & backbone
    # still measured, as if trained: the numbers stay in the report
    layers = {x.name: x for x in report.layers}
    assert backbone <= set(layers)
    assert layers["backbone.0"].grad_norm and layers["backbone.0"].activation_grad_norm
    assert any(p.name == "backbone.0.weight" and p.grad_norm for p in report.parameters)
    assert any("frozen" in n and "requires_grad=False" in n for n in report.notes)
    (note,) = [n for n in report.notes if "left out of the findings" in n]
    assert "12 layer(s)" in note and "backbone.0" in note


def test_a_frozen_backbone_is_neither_blamed_nor_swapped_when_the_trained_part_vanishes() -> None:
    report = run(FineTuned(frozen=6, trainable=10), "torch_export", *classes())
    backbone = {f"backbone.{2 * i}" for i in range(6)}
    vanishing = [f for f in report.findings if f.kind == "vanishing_gradients"]
    assert [f.severity for f in vanishing] == ["error"], [f.message for f in report.findings]
    assert "neck.0" in vanishing[0].layers
    assert not blamed(report) & backbone, [(f.kind, f.layers) for f in report.findings]
    for f in report.findings:
        assert "backbone" not in f.message, f.message
        if f.kind == "fp16_underflow":  # counted over the trainable parameters only
            assert not any(p.startswith("backbone") for p in f.evidence["parameters"])
    (swap,) = [r for r in report.recommendations if r.fix == "replace_activation"]
    assert swap.verified is not None and swap.verified.applied
    # the 10 sigmoids of the trained part (and the head's ReLU, dead for some units), not
    # the frozen backbone's 6
    swapped = re.search(r"in (\d+) node\(s\)", swap.verified.transform or "")
    assert swapped is not None and int(swapped.group(1)) <= 11, swap.verified.transform


def test_frozen_layers_between_trainable_ones_still_count() -> None:
    """The gradient to the trainable first layer crosses the frozen stack: its vanishing is
    the run's problem."""

    class Sandwich(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.stem = nn.Linear(32, 32)
            self.middle = sigmoid_stack(12, 32)
            self.head = nn.Linear(32, 4)
            self.middle.requires_grad_(False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.middle(self.stem(x)))

    report = run(Sandwich(), "torch_export", *classes())
    vanishing = [f for f in report.findings if f.kind == "vanishing_gradients"]
    assert [f.severity for f in vanishing] == ["error"]
    assert "middle.0" in vanishing[0].layers or "stem" in vanishing[0].layers
    assert not [n for n in report.notes if "left out of the findings" in n]


class DeadOutput(nn.Module):
    """relu(out(h)) with out.bias = -20: every prediction is 0 and every gradient exactly 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 64)
        self.b = nn.Linear(64, 64)
        self.out = nn.Linear(64, 1)
        with torch.no_grad():
            self.out.bias.fill_(-20.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.out(torch.relu(self.b(torch.relu(self.a(x))))))


def regression() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(128, 8), torch.rand(128, 1) * 5


@pytest.mark.parametrize("fmt", ["torch_export", "torchscript", "onnx"])
def test_a_dead_relu_output_is_swapped_where_it_is_and_named_as_the_cause(fmt: str) -> None:
    report = run(DeadOutput(), fmt, *regression())
    kinds = [f.kind for f in report.findings]
    dead = report.findings[kinds.index("dead_units")]
    assert dead.layers == ["out"]
    assert "all of the units of out" in dead.message, dead.message
    vanishing = report.findings[kinds.index("vanishing_gradients")]
    assert vanishing.layers[0] == "out", vanishing.layers
    assert vanishing.evidence["dead_output_layers"] == ["out"]
    assert "output of out" in vanishing.message and "initialisation scale" not in vanishing.message
    (swap,) = [r for r in report.recommendations if r.fix == "replace_activation"]
    assert swap.params["to"] == "LeakyReLU"
    assert "all of the units of out" in swap.rationale
    verified = swap.verified
    assert verified is not None and verified.applied, verified
    assert "output activation" in (verified.transform or ""), verified.transform
    assert verified.after["figures"]["max_dead_fraction"] in (None, 0.0), verified.after
    assert verified.resolved is True, verified


def test_a_sigmoid_output_is_still_not_swapped() -> None:
    """The output activation is swapped only where a dead-units finding names it: a
    classifier's sigmoid output defines what it predicts."""

    class SigmoidNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body = sigmoid_stack(10, 16)
            self.out = nn.Linear(16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.out(self.body(x)))

    torch.manual_seed(1)
    x, t = torch.randn(32, 16), torch.rand(32, 1)
    report = run(SigmoidNet(), "torch_export", x, t)
    (swap,) = [r for r in report.recommendations if r.fix == "replace_activation"]
    assert swap.verified is not None
    assert "in 10 node(s)" in (swap.verified.transform or "")
    assert "output activation" not in (swap.verified.transform or "")


def test_a_dead_hidden_layer_reads_as_all_of_its_units() -> None:
    class DeadHidden(DeadOutput):
        def __init__(self) -> None:
            super().__init__()
            with torch.no_grad():
                self.out.bias.zero_()
                self.b.bias.fill_(-20.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.b(torch.relu(self.a(x)))))

    report = run(DeadHidden(), "torch_export", *regression())
    (dead,) = [f for f in report.findings if f.kind == "dead_units"]
    assert "all of the units of b" in dead.message and "1 of the units" not in dead.message


def test_unit_share_reads_100_percent_only_when_all() -> None:
    assert unit_share(1.0) == "all"
    assert unit_share(0.5) == "50%"
    assert unit_share(1 / 64) == "1.56%"
    assert unit_share(63 / 64) == "98.4%"
    assert unit_share(0.99999) == "99.999%"
