"""The init_scale reference (He/Xavier over the layer's fans) in the cases where the fans or the
activation are not what torch's tensor-only formula or the ONNX graph show at first sight:

- a grouped (depthwise) conv's fans are per group: torch's default init of one is healthy, the
  same weights ×10 are not;
- ONNX writes SiLU as x · sigmoid(x) (HardSwish, before opset 14, as x · hardsigmoid(x)): the
  layer before it gets the activation, and the He reference, that the .pt2 export gets;
- a conv whose BatchNorm the dynamo exporter's optimizer folded into it is not judged on the
  folded weight's scale, as the unfolded conv is not;
- a weight with a fan-in of 1 (Mamba's dt_proj) scales one input, and is not judged;
- the re-initialisation fix draws from the reference's own std, so its verification resolves.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from service.engine.report import LayerReport, Report
from tests.support.export import to_onnx, to_torch_export
from tests.unit.engine.measure_support import npz_bytes


def _export(module: nn.Module, x: torch.Tensor, fmt: str) -> bytes:
    if fmt == "torch_export":
        return to_torch_export(module, x)
    if fmt == "onnx_legacy":
        return to_onnx(module, x, input_names=["x"])
    # what torch.onnx.export(..., dynamo=True) gives by default: BatchNorm folded into the conv
    return to_onnx(module, x, dynamo=True, optimize=True, input_names=["x"])


def _diagnose(
    module: nn.Module, x: torch.Tensor, target: torch.Tensor, fmt: str, *, verify: bool = False
) -> Report:
    return diagnose(
        _export(module.train(), x, fmt),
        npz_bytes(x=x, target=target),
        DiagnoseOptions(verify_fixes=verify),
    )


def _init_scale_layers(report: Report) -> list[str]:
    return [name for f in report.findings if f.kind == "init_scale" for name in f.layers]


def _layer(report: Report, name: str) -> LayerReport:
    return next(x for x in report.layers if x.name == name)


FORMATS = ["torch_export", "onnx_legacy", "onnx_dynamo"]

# -- grouped convolutions ------------------------------------------------------------------------


class Depthwise(nn.Module):
    """pointwise → ReLU → depthwise (groups=C) → pointwise; the depthwise conv's output goes on
    to a sum, not to a normalisation or a ReLU, so it is judged against Xavier."""

    def __init__(self, scale: float = 1.0, channels: int = 32, kernel: int = 7) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pw1 = nn.Conv1d(8, channels, 1)
        self.dw = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.pw2 = nn.Conv1d(channels, 5, 1)
        with torch.no_grad():
            self.dw.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(torch.relu(self.pw1(x)))
        return self.pw2(h + h.mean())


X_SEQ = torch.randn(8, 8, 20, generator=torch.Generator().manual_seed(1))
Y_SEQ = torch.randint(0, 5, (8, 20), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_default_initialised_depthwise_conv_is_not_flagged(fmt: str) -> None:
    report = _diagnose(Depthwise(), X_SEQ, Y_SEQ, fmt)
    assert "dw" not in _init_scale_layers(report)
    # torch's kaiming_uniform(a=√5) std 1/√(3·7) against Xavier over 7 in, 7 out per group
    assert _layer(report, "dw").init_std_ratio == pytest.approx(0.58, abs=0.08)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_depthwise_conv_scaled_up_is_still_flagged(fmt: str) -> None:
    report = _diagnose(Depthwise(scale=10.0), X_SEQ, Y_SEQ, fmt)
    assert "dw" in _init_scale_layers(report)


# -- SiLU / HardSwish written out in ONNX --------------------------------------------------------


def _gated_mlp(activation: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), activation, nn.Linear(64, 4))


X_FLAT = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
Y_FLAT = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("fmt", ["onnx_legacy", "onnx_dynamo"])
def test_silu_written_as_sigmoid_times_x_is_recognised_in_onnx(fmt: str) -> None:
    exported = _diagnose(_gated_mlp(nn.SiLU()), X_FLAT, Y_FLAT, "torch_export")
    report = _diagnose(_gated_mlp(nn.SiLU()), X_FLAT, Y_FLAT, fmt)
    layer = _layer(report, "0")
    assert layer.activation_stats.activation == "silu"
    # the He reference, as in the .pt2 export (Xavier read 0.92)
    assert layer.init_std_ratio == pytest.approx(_layer(exported, "0").init_std_ratio, rel=1e-3)


def test_hardswish_written_as_hardsigmoid_times_x_is_recognised_in_onnx() -> None:
    module = _gated_mlp(nn.Hardswish()).train()
    model = to_onnx(module, X_FLAT, opset=13, input_names=["x"])  # no HardSwish op before 14
    report = diagnose(model, npz_bytes(x=X_FLAT, target=Y_FLAT), DiagnoseOptions())
    assert _layer(report, "0").activation_stats.activation == "hardswish"


# -- BatchNorm folded into the conv at export ----------------------------------------------------


class TrainedConvBlock(nn.Module):
    """A Conformer-like conv module after training: depthwise conv → BatchNorm → SiLU, the
    BatchNorm's running variance small, so the weight folded at export is ×10 the conv's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pw = nn.Conv1d(8, 32, 1)
        self.dw = nn.Conv1d(32, 32, 7, padding=3, groups=32)
        self.bn = nn.BatchNorm1d(32)
        self.out = nn.Conv1d(32, 5, 1)
        running_var = self.bn.running_var
        assert running_var is not None
        running_var.fill_(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.dw(self.pw(x)))
        return self.out(nn.functional.silu(h) + h.mean())


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_conv_with_its_batchnorm_folded_in_is_not_judged_on_the_folded_scale(fmt: str) -> None:
    report = _diagnose(TrainedConvBlock(), X_SEQ, Y_SEQ, fmt)
    assert "dw" not in _init_scale_layers(report)


# -- a fan-in of 1 -------------------------------------------------------------------------------


class OneInputProjection(nn.Module):
    """Mamba's dt_proj at dt_rank 1: Linear(1, 16) → softplus; torch's default U(±1) for it
    is 1.7× Xavier over fans (1, 16)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.x_proj = nn.Linear(16, 1)
        self.dt_proj = nn.Linear(1, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.softplus(self.dt_proj(self.x_proj(x))) * x)


@pytest.mark.parametrize("fmt", ["torch_export", "onnx_legacy"])
def test_a_weight_that_scales_one_input_is_not_judged(fmt: str) -> None:
    report = _diagnose(OneInputProjection(), X_FLAT, Y_FLAT, fmt)
    assert "dt_proj" not in _init_scale_layers(report)
    assert _layer(report, "dt_proj").init_std_ratio is None


# -- the re-initialisation fix meets the reference -----------------------------------------------


def _scaled_conv_net() -> nn.Module:
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 4, 1),
    )
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dim() > 1:
                parameter.mul_(6.0)
    return module


X_IMAGE = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
Y_IMAGE = torch.randint(0, 4, (4, 12, 12), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("fmt", ["torch_export", "onnx_legacy"])
def test_reinitialising_a_badly_initialised_conv_resolves_init_scale(fmt: str) -> None:
    report = _diagnose(_scaled_conv_net(), X_IMAGE, Y_IMAGE, fmt, verify=True)
    assert "0" in _init_scale_layers(report)
    rec = next(r for r in report.recommendations if r.fix == "reinitialize_weights")
    assert rec.verified is not None and rec.verified.applied
    # Xavier over the kernel's receptive field: Conv2d(3, 8, 3) has fans 27 and 72
    assert "fan-in 27, fan-out 72" in (rec.verified.transform or "")
    assert rec.verified.resolved is True
    low, high = rec.verified.after["figures"]["init_std_ratio_range"]
    assert low > 0.8 and high < 1.25


@pytest.mark.parametrize("fmt", ["torch_export", "onnx_legacy"])
def test_reinitialising_a_scaled_up_depthwise_conv_uses_its_per_group_fans(fmt: str) -> None:
    report = _diagnose(Depthwise(scale=10.0), X_SEQ, Y_SEQ, fmt, verify=True)
    rec = next(r for r in report.recommendations if r.fix == "reinitialize_weights")
    assert rec.verified is not None and rec.verified.resolved is True
    # the snippet draws the per-group Xavier std itself: torch's xavier_normal_ would take
    # fan_out = 32·7 and leave the conv reading as too small (0.25×)
    assert "nn.init.normal_(params['dw.weight'], std=0.378)" in rec.snippet


def test_an_experts_weight_picked_by_index_is_not_judged_by_a_fan_in() -> None:
    """A mixture of experts reads its expert weights as `w[idx]` (ONNX GatherND): the pick has
    no fan-in (the product after it does), so no init_scale on it in any format (the ONNX
    exports got one, against a fan-in of the whole stacked weight)."""
    from tests.unit.onnx.test_optimizer_merges import IndexedExperts

    module, x = IndexedExperts(3), torch.randn(12, 16, generator=torch.Generator().manual_seed(1))
    batch = npz_bytes(x=x, target=torch.randn(12, 8, generator=torch.Generator().manual_seed(2)))
    for model in (to_onnx(module, x, dynamo=True, optimize=True), to_torch_export(module, x)):
        report = diagnose(model, batch, DiagnoseOptions(loss="mse", verify_fixes=False))
        assert not [f for f in report.findings if f.kind == "init_scale"], report.findings


def test_the_init_scale_message_names_the_reference_it_compared_with() -> None:
    """Before tanh the reference is Xavier over both fans, before ReLU He over the fan-in: the
    message said "for its fan-in" for both."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 32, 5), nn.Tanh(), nn.Conv2d(32, 4, 3), nn.ReLU())
    with torch.no_grad():
        module[0].weight.mul_(4.0)  # type: ignore[operator]
        module[2].weight.mul_(8.0)  # type: ignore[operator]
    x = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    report = diagnose(
        to_torch_export(module, x), npz_bytes(x=x), DiagnoseOptions(verify_fixes=False)
    )
    layers = {layer.name: layer for layer in report.layers}
    assert (layers["0"].init_reference, layers["0"].fan_out) == ("xavier", 32 * 25)
    assert layers["2"].init_reference == "he"
    (finding,) = [f for f in report.findings if f.kind == "init_scale"]
    assert (
        "Xavier initialisation gives for its fan-in of 25 and fan-out of 800" in (finding.message)
        or "He initialisation gives for its fan-in of 288" in finding.message
    )


class Widening(nn.Module):
    """ESPCN's first layers: 1 channel into 32 of 5×5 before tanh (fan-in 25, fan-out 800),
    at torch's default init: 2.4× Xavier's std, 0.58× 1/√fan_in."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(1, 32, 5, padding=2), nn.Conv2d(32, 4, 3, padding=1)
        with torch.no_grad():
            self.c1.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.tanh(self.c1(x)))


@pytest.mark.parametrize(("scale", "flagged"), [(1.0, False), (4.0, True)])
def test_a_widening_layer_is_judged_between_xaviers_ends(scale: float, flagged: bool) -> None:
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    report = diagnose(
        to_torch_export(Widening(scale), x),
        npz_bytes(x=x, target=torch.zeros(2, 4, 12, 12)),
        DiagnoseOptions(loss="mse", verify_fixes=False),
    )
    c1 = next(layer for layer in report.layers if layer.name == "c1")
    assert c1.init_std_ratio is not None and c1.init_std_ratio > 1.5 * scale
    found = [f for f in report.findings if f.kind == "init_scale" and "c1" in f.layers]
    assert bool(found) == flagged
