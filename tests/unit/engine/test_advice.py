"""Advice rules on hand-built measurements: which fix for which evidence, the numbers in the
rationale, the snippet, the ranking, and no recommendation without a finding."""

from __future__ import annotations

import math
from typing import cast

import pytest

from service.engine.advice import recommend
from service.engine.advice.evidence import (
    one_significant,
    suggested_loss_scale,
    suggested_max_norm,
)
from service.engine.detectors import detect
from service.engine.report import (
    BatchInfo,
    Environment,
    LossInfo,
    ModelInfo,
    ParameterReport,
    Report,
)
from tests.unit.engine.measurements_factory import geometric, mlp, with_non_finite, with_time


def fixes(recs):
    return [r.fix for r in recs]


def test_no_findings_no_recommendations():
    m = mlp(geometric(1.0, 1.0, 6))
    assert recommend(detect(m), m) == []


def test_sigmoid_vanishing_recommends_relu_with_he_first():
    m = mlp(geometric(1e-6, 5.0, 8), activation="aten.sigmoid.default")
    m.layers[-1].activation_stats.activation = None  # the head has no activation
    findings = detect(m)
    recs = recommend(findings, m)
    assert recs[0].fix == "replace_activation"
    rec = recs[0]
    assert rec.params["to"] == "ReLU" and rec.params["from"] == ["sigmoid"]
    assert rec.layers == [f"fc{i}" for i in range(7)]
    assert "0.25" in rec.rationale and "×5 per layer towards the output" in rec.rationale
    assert "nn.ReLU()" in rec.snippet and "kaiming_normal_" in rec.snippet
    assert "add_normalization" in fixes(recs)  # 8 weight layers, no normalisation
    # shortcuts are not recommended without a graph to prove their absence
    assert "add_residual_connections" not in fixes(recs)
    assert all(r.addresses == [0] for r in recs)


def test_attention_models_get_gelu():
    m = mlp(geometric(1e-6, 5.0, 8), activation="Tanh", saturated=[0.6] * 8)
    m.layers[-1].activation_stats.activation = None
    m.op_types.append("Softmax")
    rec = next(r for r in recommend(detect(m), m) if r.fix == "replace_activation")
    assert rec.params["to"] == "GELU"
    assert "nn.GELU()" in rec.snippet


def test_an_unsaturated_tanh_stack_is_not_told_to_change_its_activation():
    """A tanh's derivative is near 1 until it saturates: vanishing gradients through
    unsaturated tanh layers come from elsewhere (their initialisation); a sigmoid's is at most
    1/4 anywhere, saturated or not."""
    tanh = mlp(geometric(1e-6, 5.0, 8), activation="Tanh", saturated=[0.0] * 8)
    assert "replace_activation" not in fixes(recommend(detect(tanh), tanh))
    sigmoid = mlp(geometric(1e-6, 5.0, 8), activation="aten.sigmoid.default", saturated=[0.0] * 8)
    assert "replace_activation" in fixes(recommend(detect(sigmoid), sigmoid))


def test_output_sigmoid_is_not_blamed():
    m = mlp(geometric(1e-6, 5.0, 8), activation="aten.relu.default")
    m.layers[-1].activation_stats.activation = "sigmoid"  # probability output
    assert "replace_activation" not in fixes(recommend(detect(m), m))


def test_exploding_gets_clip_with_derived_max_norm_and_reinit():
    m = mlp(
        geometric(2.0**11, 0.5, 12),
        weight_grad_norms=[300.0] * 12,
        weight_norms=[10.0] * 12,
        init_ratios=[2.0] * 12,
    )
    findings = detect(m)
    recs = recommend(findings, m)
    assert recs[0].fix == "reinitialize_weights"  # the cause, verified or not, before clipping
    assert set(recs[0].params["schemes"].values()) == {"kaiming"}
    clip = next(r for r in recs if r.fix == "clip_gradients")
    # no tensor's gradient above its weight norm: √(12 × 10²) ≈ 35 → 30
    assert clip.params["max_norm"] == 30.0
    assert "max_norm=30" in clip.snippet
    lr = next(r for r in recs if r.fix == "lower_learning_rate")
    assert lr.params["factor"] == pytest.approx(0.01)  # grad/weight 30 → 10^-2


def test_max_norm_falls_back_to_calm_layers_then_one():
    m = mlp([1.0] * 4, weight_grad_norms=[5.0, 5.0, 0.1, 0.1], weight_norms=[100.0] * 4)
    value, how = suggested_max_norm(m, ["fc0", "fc1"])
    assert value == 0.2 and "median" in how  # median 0.1 × √4 tensors
    value, how = suggested_max_norm(m, ["fc0", "fc1", "fc2", "fc3"])
    assert value == 1.0 and "customary" in how


def test_one_significant():
    assert one_significant(2696.5) == 2000.0
    assert one_significant(0.0347) == 0.03
    assert one_significant(0.2) == 0.2


def test_non_finite_guards_the_origin_op():
    m = mlp([1.0] * 3)
    with_non_finite(m, node="log_1", op="Log")
    (rec,) = recommend(detect(m), m)
    assert rec.fix == "guard_numerics"
    assert rec.params["node"] == "log_1" and rec.params["op"] == "log"
    assert "clamp_min" in rec.snippet and "'log_1'" in rec.rationale


def test_fp16_underflow_loss_scale_is_a_power_of_two_within_fp16_range():
    m = mlp([1.0] * 3, weight_grad_norms=[1e-6, 1e-3, 1e-2], fp16_underflow=0.3)
    recs = recommend(detect(m), m)
    assert fixes(recs) == ["loss_scaling", "use_bf16"]
    scale = recs[0].params["scale"]
    assert math.log2(scale).is_integer() and scale > 1
    value, _ = suggested_loss_scale(m)
    assert value == scale and 1e-2 * value < 65504 / 2  # the largest gradient norm stays in range
    assert "GradScaler(init_scale=" in recs[0].snippet
    m.precision = "bf16"  # bf16 keeps these gradients: no finding, no advice
    assert recommend(detect(m), m) == []


def test_fp16_forecast_in_fp32_keeps_advisory_fixes_and_a_healthy_verdict():
    m = mlp([1.0] * 3, weight_grad_norms=[1e-3, 1e-3, 1e-2], fp16_underflow=0.3)
    findings = detect(m)
    assert [(f.kind, f.severity) for f in findings] == [("fp16_underflow", "info")]
    recs = recommend(findings, m)
    assert fixes(recs) == ["loss_scaling", "use_bf16"]
    assert all(r.rationale.startswith("Advisory, if you train in fp16") for r in recs)
    report = Report(
        model=ModelInfo(format="onnx", sha256="0" * 64),
        batch=BatchInfo(size=1),
        loss=LossInfo(kind="mse"),
        device="cpu",
        environment=Environment(gradhealth="0", torch="0", device_name="cpu"),
        findings=findings,
        recommendations=recs,
    )
    assert report.compute_verdict() == "healthy"


def test_vanilla_rnn_gets_gated_units_lstm_does_not():
    m = mlp([1.0] * 3)
    with_time(m, geometric(1e-6, 1.15, 120))
    recs = recommend(detect(m), m)
    assert recs[0].fix == "use_gated_recurrent_unit" and recs[0].layers == ["rnn"]
    assert "nn.LSTM" in recs[0].snippet and "120 steps" in recs[0].rationale
    lstm = mlp([1.0] * 3)
    with_time(lstm, geometric(1e-6, 1.15, 120), rnn_op="LSTM")
    assert "use_gated_recurrent_unit" not in fixes(recommend(detect(lstm), lstm))


def test_dead_units_leaky_relu_and_zero_bias():
    m = mlp([1.0] * 3, dead=[0.9, 0.0, 0.0])
    m.layers[0].params.append("fc0.bias")
    m.parameters.append(ParameterReport(name="fc0.bias", shape=[16], layer="fc0", grad_norm=0.1))
    recs = recommend(detect(m), m)
    act = next(r for r in recs if r.fix == "replace_activation")
    assert act.params["to"] == "LeakyReLU" and act.layers == ["fc0"]
    reinit = next(r for r in recs if r.fix == "reinitialize_weights")
    assert reinit.params["schemes"] == {"fc0.weight": "kaiming", "fc0.bias": "zero_bias"}


def test_saturation_with_large_init_recommends_xavier():
    m = mlp([1.0] * 3, activation="tanh", saturated=[0.8, 0.0, 0.0], init_ratios=[8.0, 1, 1])
    recs = recommend(detect(m), m)
    reinit = next(r for r in recs if r.fix == "reinitialize_weights")
    assert reinit.params["schemes"] == {"fc0.weight": "xavier"}
    assert "replace_activation" in fixes(recs)


def test_convolutional_nets_get_batchnorm():
    m = mlp(geometric(1e-6, 5.0, 8), op="aten.conv2d.default")
    rec = next(r for r in recommend(detect(m), m) if r.fix == "add_normalization")
    assert rec.params["kind"] == "BatchNorm" and "BatchNorm2d" in rec.snippet


def test_error_findings_are_addressed_before_warnings():
    m = mlp(geometric(1e-6, 5.0, 8), fp16_underflow=0.2, activation="sigmoid")
    m.layers[-1].activation_stats.activation = None
    findings = detect(m)
    recs = recommend(findings, m)
    tiers = [max(findings[cast(int, i)].severity == "error" for i in r.addresses) for r in recs]
    assert tiers == sorted(tiers, reverse=True)


def test_default_init_is_blamed_only_when_the_gradient_already_vanishes():
    # PyTorch's default init is 0.41 of He: fine alone, a cause once ‖∂L/∂a‖ shrinks ×0.4/layer
    vanishing = mlp(geometric(1e-4, 2.5, 9), init_ratios=[0.41] * 9)
    rec = next(r for r in recommend(detect(vanishing), vanishing) if r.fix.startswith("reinit"))
    assert set(rec.params["schemes"]) == {f"fc{i}.weight" for i in range(9)}
    assert "compounded over the 9 layers" in rec.rationale
    healthy = mlp([1.0] * 9, init_ratios=[0.41] * 9)
    assert recommend(detect(healthy), healthy) == []
    # a layer feeding a normalisation layer is scale-free: not re-initialised
    vanishing.layers[1].op = "layer_norm"
    rec = next(r for r in recommend(detect(vanishing), vanishing) if r.fix.startswith("reinit"))
    assert "fc0.weight" not in rec.params["schemes"]


def test_entries_underflowing_below_a_normal_rms_still_get_a_scale_above_one():
    """Every tensor's rms gradient is in fp16's normal range, yet single entries underflow
    (a tied embedding's rare rows): a scale of 1 would change nothing; the advice lifts them
    as far as the largest gradient norm allows (at most GradScaler's 2^16)."""
    m = mlp([1.0] * 3, weight_grad_norms=[5.0, 1.0, 0.5], fp16_underflow=0.07)
    value, why = suggested_loss_scale(m)
    assert value > 1 and math.log2(value).is_integer() and value <= 2**16
    assert 5.0 * value < 65504 / 2
    assert "far below" in why


def test_guard_snippets_clamp_where_the_verified_transform_clamps() -> None:
    """The advised sqrt guard said clamp_min(1e-12) while the verified one clamped at 1e-6."""
    from service.engine.advice import snippets
    from service.engine.detectors.origin_text import describe
    from service.engine.verify.transforms import GUARD_EPS

    assert GUARD_EPS == 1e-6  # the texts write it as 1e-6
    for op in ("log", "sqrt", "rsqrt"):
        assert "clamp_min(1e-6)" in snippets.guard_numerics(op, "n")
        _, guard = describe({"op_type": op, "node": "n", "phase": "forward"})
        assert "at least 1e-6" in guard


def test_an_output_head_with_a_sigmoid_is_not_blamed() -> None:
    """NeRF's colour head (sigmoid) beside its density head: both are outputs, not hidden
    layers; only the last layer in the profile was left out."""
    m = mlp(geometric(1e-6, 5.0, 8), activation="aten.relu.default")
    m.layers[-2].activation_stats.activation = "sigmoid"
    assert "replace_activation" in fixes(recommend(detect(m), m))
    m.layers[-2].output_head = True
    assert "replace_activation" not in fixes(recommend(detect(m), m))


def test_each_layer_that_feeds_a_model_output_directly_is_an_output_head() -> None:
    import torch
    from torch import nn

    from service.engine import diagnose
    from service.engine.options import DiagnoseOptions
    from tests.support.export import to_torch_export
    from tests.unit.engine.measure_support import npz_bytes

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.trunk, self.rgb, self.sigma = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = torch.relu(self.trunk(x))
            return torch.sigmoid(self.rgb(h)), torch.relu(self.sigma(h))

    x = torch.randn(4, 6)
    report = diagnose(to_torch_export(TwoHeads(), x), npz_bytes(x=x), DiagnoseOptions())
    assert {layer.name: layer.output_head for layer in report.layers} == {
        "trunk": False,
        "rgb": True,
        "sigma": True,
    }
