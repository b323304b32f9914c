"""Zero-initialised parameters by design, through the full engine.

A parameter that is exactly zero and multiplies its input (an STN localisation head, LoRA's B,
a ResNet block's last BatchNorm gain, ReZero's α, a zero output layer) passes no gradient back
at initialisation: the layers before it get ‖∂L/∂a‖ = 0. That is the design (an identity or
zero start), not vanishing gradients: an `info` finding says so and no fix is recommended for
it, while real vanishing, dead units and zero gradients with another cause stay errors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.engine import diagnose
from service.engine.options import DiagnoseOptions
from service.engine.report import Finding, Report
from tests.support.export import to_onnx, to_torch_export
from tests.unit.engine.measure_support import npz_bytes

torch.set_num_threads(1)

FORMATS = ["torch_export", "onnx"]


def run(module: nn.Module, x: torch.Tensor, target: torch.Tensor, fmt: str) -> Report:
    model = to_torch_export(module, x) if fmt == "torch_export" else to_onnx(module, x, dynamo=True)
    return diagnose(model, npz_bytes(x=x, target=target), DiagnoseOptions(verify_fixes=False))


def vanishing(report: Report) -> list[Finding]:
    return [
        f
        for f in report.findings
        if f.kind == "vanishing_gradients" and f.evidence.get("axis") == "depth"
    ]


def assert_by_design(report: Report, blocked: dict[str, list[str]]) -> None:
    """One info vanishing finding naming exactly `blocked` (layer → zero parameters), no
    warning or error about vanishing and no recommendation addressing it."""
    found = vanishing(report)
    assert [f.severity for f in found] == ["info"], [(f.severity, f.message) for f in found]
    f = found[0]
    assert f.evidence["rules"] == ["zero_init"]
    assert f.evidence["zero_init_blocked"] == blocked
    assert f.layers == list(blocked)
    params = sorted({p for ps in blocked.values() for p in ps})
    assert sorted(f.evidence["zero_init_parameters"]) == params
    assert "by design" in f.message and "first optimizer step" in f.message
    assert all(p in f.message for p in params)
    index = report.findings.index(f)
    assert not [r.fix for r in report.recommendations if index in r.addresses]
    # nor is the zero parameter itself too small an initialisation (a zero start)
    for finding in report.findings:
        if finding.kind == "init_scale":
            zero_layers = {p.layer for p in report.parameters if p.name in params}
            assert not zero_layers & set(finding.layers), finding.message


# --- models -------------------------------------------------------------------------------


class STN(nn.Module):
    """A spatial transformer with the standard init: a zero-weight localisation head whose
    bias is the identity transform (loc.0 and loc.4 get exactly zero gradient at step 0)."""

    def __init__(self, classifier: nn.Module | None = None, dead_loc: bool = False) -> None:
        super().__init__()
        hidden, head = nn.Linear(8 * 10 * 10, 32), nn.Linear(32, 6)
        self.loc = nn.Sequential(
            nn.Conv2d(1, 8, 5), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), hidden, nn.ReLU(), head
        )
        nn.init.zeros_(head.weight)
        with torch.no_grad():
            head.bias.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0]))
            if dead_loc:  # every unit before the head dead: its zero weight never moves
                hidden.bias.fill_(-100.0)
        self.cls = classifier or nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 10),
        )

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        theta = self.loc(img).view(-1, 2, 3)
        grid = F.affine_grid(theta, list(img.shape), align_corners=False)
        return self.cls(F.grid_sample(img, grid, align_corners=False))


def stn_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(16, 1, 24, 24), torch.randint(0, 10, (16,))


class LoRALinear(nn.Module):
    """A frozen Linear plus a low-rank update B·A with B = 0 (lora_A gets no gradient)."""

    def __init__(self, d: int, rank: int = 4) -> None:
        super().__init__()
        self.base = nn.Linear(d, d)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(d, rank, bias=False)
        self.lora_B = nn.Linear(rank, d, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x)) + self.base(x)


class LoRAStack(nn.Module):
    def __init__(self, d: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(LoRALinear(d) for _ in range(depth))
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


class Block(nn.Module):
    """A ResNet basic block with zero_init_residual: its last BatchNorm's gain is 0."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)
        nn.init.zeros_(self.b2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class ResNet(nn.Module):
    def __init__(self, c: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(c) for _ in range(depth)])
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(x), 1).flatten(1))


class ZeroOut(nn.Module):
    """A generator / denoiser whose output layer is zero-initialised (weight and bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.out = nn.Linear(32, 16)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


class DeadTrunkReZero(nn.Module):
    """A ReLU trunk whose second layer is dead (bias -100: layer 0 gets no gradient), then a
    ReZero residual branch (α = 0: f gets no gradient, by design)."""

    def __init__(self) -> None:
        super().__init__()
        dead = nn.Linear(32, 32)
        self.trunk = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), dead, nn.ReLU(), nn.Linear(32, 32))
        with torch.no_grad():
            dead.bias.fill_(-100.0)
        self.f = nn.Linear(32, 32)
        self.alpha = nn.Parameter(torch.zeros(1))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        h = h + self.alpha * torch.tanh(self.f(h))
        return self.head(h)


class ZeroBiasCut(nn.Module):
    """l0 gets exactly zero gradient with no zero parameter: l2 reads only l1's units 16..31,
    whose rows of l1's weight are zero (the rest of the weight is not). l1's bias is exactly
    zero and gets a gradient, but a bias is added, not multiplied: it explains nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.l0 = nn.Linear(16, 32)
        self.l1 = nn.Linear(32, 32)
        self.l2 = nn.Linear(32, 10)
        with torch.no_grad():
            self.l1.weight[16:].zero_()
            self.l1.bias.zero_()
            self.l2.weight[:, :16].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(torch.relu(self.l0(x)))))


def sigmoid_classifier(depth: int = 12) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(24 * 24, 32), nn.Sigmoid()]
    for _ in range(depth):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(32, 10))


# --- by design: info, no fix -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_stn_identity_head_blocks_the_localisation_net_by_design(fmt: str) -> None:
    torch.manual_seed(0)
    x, y = stn_batch()
    report = run(STN(), x, y, fmt)
    assert_by_design(report, {"loc.0": ["loc.6.weight"], "loc.4": ["loc.6.weight"]})


@pytest.mark.parametrize("fmt", FORMATS)
def test_lora_b_zero_blocks_lora_a_by_design(fmt: str) -> None:
    torch.manual_seed(0)
    report = run(LoRAStack(), torch.randn(32, 16), torch.randint(0, 10, (32,)), fmt)
    assert_by_design(
        report, {f"blocks.{i}.lora_A": [f"blocks.{i}.lora_B.weight"] for i in range(3)}
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_resnet_zero_init_residual_gain_by_design(fmt: str) -> None:
    torch.manual_seed(0)
    report = run(ResNet(), torch.randn(16, 4, 8, 8), torch.randint(0, 10, (16,)), fmt)
    assert_by_design(
        report,
        {
            f"blocks.{i}.{name}": [f"blocks.{i}.b2.weight"]
            for i in range(2)
            for name in ("c1", "b1", "c2")
        },
    )
    assert report.verdict == "healthy"


def test_zero_output_layer_blocks_the_body_by_design() -> None:
    torch.manual_seed(0)
    report = run(ZeroOut(), torch.randn(32, 16), torch.randn(32, 16), "torch_export")
    assert_by_design(report, {"body.0": ["out.weight"], "body.2": ["out.weight"]})


# --- real problems beside a zero init stay errors ------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_real_vanishing_beside_a_zero_init_stays_an_error(fmt: str) -> None:
    """An STN whose classifier is a deep sigmoid stack: the classifier's vanishing is an
    error naming its layers; the localisation net's zeros are explained, not counted."""
    torch.manual_seed(0)
    x, y = stn_batch()
    report = run(STN(classifier=sigmoid_classifier()), x, y, fmt)
    [f] = vanishing(report)
    assert f.severity == "error"
    assert f.layers[0] == "cls.1"
    assert "loc.0" not in f.layers and "loc.4" not in f.layers
    assert f.evidence["zero_init_blocked"] == {
        "loc.0": ["loc.6.weight"],
        "loc.4": ["loc.6.weight"],
    }
    assert f.evidence["zero_gradient_layers"] == []
    assert "loc.6.weight" in f.message
    index = report.findings.index(f)
    assert any(index in r.addresses for r in report.recommendations)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dead_relu_zeros_are_not_explained_by_a_zero_init_elsewhere(fmt: str) -> None:
    torch.manual_seed(0)
    report = run(DeadTrunkReZero(), torch.randn(32, 16), torch.randint(0, 10, (32,)), fmt)
    [f] = vanishing(report)
    assert f.severity == "error"
    assert f.evidence["zero_gradient_layers"] == ["trunk.0"]
    assert "trunk.0" in f.layers
    assert f.evidence["zero_init_blocked"] == {"f": ["alpha"]}
    assert any(g.kind == "dead_units" and g.severity == "error" for g in report.findings)
    index = report.findings.index(f)
    assert "reinitialize_weights" in [r.fix for r in report.recommendations if index in r.addresses]


def test_only_a_zero_weight_that_gets_a_gradient_explains_zeros() -> None:
    """The same STN is by design while its zero head gets a gradient; with every unit before
    the head dead, the head's weight gets none and never leaves zero: an error. A zero bias
    explains nothing either."""
    torch.manual_seed(0)
    x, y = stn_batch()
    assert_by_design(
        run(STN(), x, y, "torch_export"),
        {"loc.0": ["loc.6.weight"], "loc.4": ["loc.6.weight"]},
    )

    torch.manual_seed(0)
    report = run(STN(dead_loc=True), x, y, "torch_export")
    [f] = vanishing(report)
    assert f.severity == "error"
    assert "loc.0" in f.evidence["zero_gradient_layers"]
    assert "zero_init_blocked" not in f.evidence

    torch.manual_seed(0)
    report = run(ZeroBiasCut(), torch.randn(32, 16), torch.randint(0, 10, (32,)), "onnx")
    [f] = vanishing(report)
    assert f.severity == "error"
    assert f.evidence["zero_gradient_layers"] == ["l0"]
    assert "zero_init_blocked" not in f.evidence
