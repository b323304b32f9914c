"""Detector rules and thresholds on hand-built measurements (pure data).

Each case is placed on both sides of its threshold, so the test fails if a rule is dropped or a
default drifts; end-to-end checks on real models live in test_pathologies*.py.
"""

from __future__ import annotations

import pytest

from service.engine.detectors import DEFAULTS, THRESHOLDS, detect, resolve_thresholds
from service.errors import BadInputError
from tests.unit.engine.measurements_factory import geometric, mlp, with_non_finite, with_time


def kinds(findings):
    return {(f.kind, f.severity) for f in findings}


def test_healthy_profile_has_no_findings():
    m = mlp(geometric(1.0, 1.05, 10))
    assert detect(m) == []


def test_vanishing_depth_profile_names_earliest_layers_first():
    # sigmoid-like: ‖∂L/∂a‖ shrinks ×0.2 per layer backwards over 8 layers → ratio 1.3e-5
    m = mlp(geometric(1e-6, 5.0, 8), activation="aten.sigmoid.default")
    (f,) = [f for f in detect(m) if f.kind == "vanishing_gradients"]
    assert f.severity == "error"
    assert f.evidence["axis"] == "depth"
    assert f.layers[0] == "fc0" and "fc7" not in f.layers
    assert f.evidence["per_layer_factor"] == pytest.approx(0.2)
    assert "depth_ratio" in f.evidence["rules"]


def test_vanishing_threshold_bands():
    # ratio 5e-3: warning only; 5e-4: error
    warn = mlp([5e-3, 1e-2, 0.1, 0.5, 1.0])
    err = mlp([5e-4, 1e-2, 0.1, 0.5, 1.0])
    assert ("vanishing_gradients", "warning") in kinds(detect(warn))
    assert ("vanishing_gradients", "error") in kinds(detect(err))
    # configurable: a looser error threshold turns the warning into an error
    assert ("vanishing_gradients", "error") in kinds(
        detect(warn, {"vanishing_profile_ratio": 1e-2})
    )


def test_autotrainer_weight_rule_needs_small_first_norm():
    flat = [1.0] * 6
    small = mlp(flat, weight_grad_norms=[5e-5, 1e-3, 1e-2, 0.05, 0.1, 0.1])
    assert ("vanishing_gradients", "error") in kinds(detect(small))
    # same ratio but first-layer norm above 1e-4: AUTOTRAINER does not call it vanishing
    big = mlp(flat, weight_grad_norms=[5e-2, 1, 10, 50, 100, 100], weight_norms=[1e4] * 6)
    assert not [f for f in detect(big) if f.kind == "vanishing_gradients"]


def test_tiny_init_caught_by_absolute_scale_when_ratios_are_flat():
    # every weight gradient ~1e-14 at every depth: flat ratios, tiny scale
    m = mlp([1.0] * 6, weight_grad_norms=[1e-14] * 6, weight_norms=[0.03] * 6)
    (f,) = [f for f in detect(m) if f.kind == "vanishing_gradients"]
    assert f.severity == "error"
    assert f.evidence["rules"] == ["absolute_scale"]
    assert len(f.layers) == 6
    # just above the threshold: not vanishing
    ok = mlp([1.0] * 6, weight_grad_norms=[1e-5] * 6, weight_norms=[1.0] * 6)
    assert not detect(ok)


def test_exploding_relu_large_init_similar_weight_grads_profile_doubles():
    # ReLU net, too-large init: weight grads similar at every depth; ‖∂L/∂a‖ ×2 per layer back
    m = mlp(geometric(2.0**11, 0.5, 12), weight_grad_norms=[3.0] * 12, weight_norms=[8.0] * 12)
    (f,) = [f for f in detect(m) if f.kind == "exploding_gradients"]
    assert f.severity == "error"
    assert f.evidence["per_layer_factor"] == pytest.approx(2.0)
    assert f.evidence["weight_ratio"] == pytest.approx(1.0)
    assert f.layers[0] == "fc0"


def test_single_jump_is_not_compounding_growth():
    # one ×100 step (e.g. a normalisation dividing by a small std) with a flat profile elsewhere
    m = mlp([100.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert not [f for f in detect(m) if f.kind == "exploding_gradients"]


def test_exploding_absolute_scale():
    m = mlp([1.0] * 4, weight_grad_norms=[1.0, 1.0, 50.0, 1.0], weight_norms=[1.0] * 4)
    (f,) = [f for f in detect(m) if f.kind == "exploding_gradients"]
    assert f.evidence["rules"] == ["absolute_scale"] and f.layers == ["fc2"]


def test_a_large_grad_to_weight_from_a_tiny_weight_is_no_explosion():
    # a fresh classifier at N(0, 0.02): grad/weight 20 because its weight is 0.05× the
    # healthy scale; against a weight of that scale it is 1: init_scale tells the weight
    weights = [4.0, 4.0, 4.0, 0.05]
    tiny = mlp([1.0] * 4, weight_grad_norms=[1.0] * 4, weight_norms=weights)
    tiny.layers[3].init_std_ratio = 0.05
    found = kinds(detect(tiny))
    assert ("init_scale", "warning") in found
    assert not {k for k, _ in found} & {"exploding_gradients"}
    # the same grad/weight with a weight of healthy scale is still an explosion
    healthy = mlp([1.0] * 4, weight_grad_norms=[1.0, 1.0, 1.0, 1.0], weight_norms=weights)
    (f,) = [f for f in detect(healthy) if f.kind == "exploding_gradients"]
    assert f.layers == ["fc3"] and "reaches 20 in fc3" in f.message


def test_a_small_weight_before_a_normalisation_is_judged_as_scale_invariant():
    # a conv at N(0, 0.02) before BatchNorm (0.1× the healthy scale): the normalisation makes
    # its gradient grow as its weight shrinks, so grad/weight 500 is 500 × 0.1² = 5 at a
    # healthy scale, no explosion (× 0.1 only, as for a weight nothing normalises, it was 50)
    weights = [4.0, 0.4, 4.0, 4.0]
    m = mlp([1.0] * 4, weight_grad_norms=[1.0, 200.0, 1.0, 1.0], weight_norms=weights)
    m.layers[1].init_std_ratio = 0.1
    m.normalized = {"fc1"}
    assert not [f for f in detect(m) if f.kind == "exploding_gradients"]
    # not normalised: the same numbers are an explosion
    m.normalized = set()
    (f,) = [f for f in detect(m) if f.kind == "exploding_gradients"]
    assert f.layers == ["fc1"]
    # normalised but four times the gradient: 20 at a healthy scale, an explosion still
    m = mlp([1.0] * 4, weight_grad_norms=[1.0, 800.0, 1.0, 1.0], weight_norms=weights)
    m.layers[1].init_std_ratio, m.normalized = 0.1, {"fc1"}
    (f,) = [f for f in detect(m) if f.kind == "exploding_gradients"]
    assert f.layers == ["fc1"]


def test_vanishing_over_time_names_recurrent_layer():
    m = mlp([1.0] * 3)
    with_time(m, geometric(1e-6, 1.15, 120))
    (f,) = [f for f in detect(m) if f.kind == "vanishing_gradients"]
    assert f.evidence["axis"] == "time"
    assert f.layers == ["rnn"]
    assert f.evidence["steps"] == 120
    assert 40 < f.evidence["horizon_steps"] < 60  # 1.15^-49 ≈ 1e-3
    short = mlp([1.0] * 3)
    with_time(short, geometric(0.5, 1.01, 20))
    assert not detect(short)


def test_gated_units_decaying_over_time_is_a_warning():
    m = mlp([1.0] * 3)
    with_time(m, geometric(1e-6, 1.15, 120), rnn_op="aten.lstm.input")
    (f,) = detect(m)
    assert f.kind == "vanishing_gradients" and f.severity == "warning"


def test_time_profile_of_a_non_recurrent_model_is_not_judged():
    from service.engine.report import TimeProfile

    m = mlp([1.0] * 3)  # e.g. a transformer fed (batch, tokens, features)
    m.profiles.time.append(TimeProfile(input="x", axis=1, grad_norms=geometric(1e-6, 1.15, 120)))
    assert not detect(m)


def test_non_finite_names_origin():
    m = mlp([1.0] * 3)
    with_non_finite(m)
    (f,) = [f for f in detect(m) if f.kind == "non_finite"]
    assert f.severity == "error"
    assert f.evidence["origin"] == {
        "node": "log",
        "op_type": "aten.log.default",
        "phase": "forward",
        "value": "log",
        "layer": "fc1",
    }
    assert f.layers == ["fc1"]


@pytest.mark.parametrize(("fraction", "severity"), [(0.1, None), (0.3, "warning"), (0.9, "error")])
def test_saturation_bands(fraction, severity):
    m = mlp([1.0] * 3, activation="aten.tanh.default", saturated=[0.0, fraction, 0.0])
    found = [f for f in detect(m) if f.kind == "saturation"]
    if severity is None:
        assert not found
    else:
        assert found[0].severity == severity and found[0].layers == ["fc1"]


@pytest.mark.parametrize(("fraction", "severity"), [(0.1, None), (0.4, "warning"), (1.0, "error")])
def test_dead_unit_bands(fraction, severity):
    m = mlp([1.0] * 3, dead=[fraction, 0.0, 0.0])
    found = [f for f in detect(m) if f.kind == "dead_units"]
    if severity is None:
        assert not found
    else:
        assert found[0].severity == severity and found[0].layers == ["fc0"]


def test_init_scale_bands_and_pytorch_default_is_accepted():
    assert not detect(mlp([1.0] * 3, init_ratios=[0.41, 0.41, 0.41]))  # PyTorch's default
    m = mlp([1.0] * 4, init_ratios=[2.0, 2.0, 1.0, 0.004])
    found = {f.evidence["direction"]: f for f in detect(m) if f.kind == "init_scale"}
    assert found["large"].severity == "warning" and found["large"].layers == ["fc0", "fc1"]
    assert found["small"].severity == "error" and found["small"].layers == ["fc3"]


def test_init_scale_ignored_before_normalisation():
    m = mlp([1.0] * 2, init_ratios=[0.004, 1.0])
    m.layers[1].op = "aten.batch_norm.default"
    assert not [f for f in detect(m) if f.kind == "init_scale"]


def test_fp16_underflow_is_a_forecast_in_fp32_absent_in_bf16_judged_in_fp16():
    m = mlp([1.0] * 3, fp16_underflow=0.6)
    (f,) = [f for f in detect(m) if f.kind == "fp16_underflow"]
    assert f.severity == "info" and f.evidence["forecast"] is True
    assert f.message.startswith("If you train in fp16")
    m.precision = "bf16"  # bf16 has fp32's exponent range: nothing to forecast
    assert not [f for f in detect(m) if f.kind == "fp16_underflow"]
    m.precision = "fp16"
    (f,) = [f for f in detect(m) if f.kind == "fp16_underflow"]
    assert f.severity == "error" and f.evidence["forecast"] is False
    m = mlp([1.0] * 3, fp16_underflow=0.2)
    m.precision = "fp16"
    assert [f.severity for f in detect(m) if f.kind == "fp16_underflow"] == ["warning"]
    assert not [f for f in detect(mlp([1.0] * 3, fp16_underflow=0.01)) if f.kind.startswith("fp")]


def test_no_trainable_parameters():
    m = mlp([1.0])
    m.parameters = []
    assert kinds(detect(m)) == {("no_trainable_parameters", "error")}


def test_findings_ordered_errors_first():
    m = mlp(geometric(1e-6, 5.0, 8), init_ratios=[1.4, 1.4, 1.4, 0.5, 1, 1, 1, 1.6])
    severities = [f.severity for f in detect(m)]
    assert severities == sorted(severities, key=["error", "warning", "info"].index)


def test_thresholds_documented_and_validated():
    from service.engine.detectors import thresholds as module

    for t in THRESHOLDS:
        assert t.name in module.__doc__, t.name
        assert t.source
    assert resolve_thresholds({"exploding_profile_ratio": 5})["exploding_profile_ratio"] == 5.0
    assert resolve_thresholds(None) == DEFAULTS
    with pytest.raises(BadInputError, match="known thresholds"):
        resolve_thresholds({"explode": 1})
    with pytest.raises(BadInputError, match="must be a number"):
        resolve_thresholds({"exploding_profile_ratio": "big"})


def test_layers_with_exactly_zero_gradient_are_said_so_and_named_first():
    # an fp16 run: the first three layers' ‖∂L/∂a‖ flushed to 0, the rest shrinking
    m = mlp([0.0, 0.0, 0.0, 1e-7, 1e-5, 1e-3, 1e-1, 1.0], activation="aten.sigmoid.default")
    (f,) = [f for f in detect(m) if f.kind == "vanishing_gradients"]
    assert f.severity == "error"
    assert f.layers[:4] == ["fc0", "fc1", "fc2", "fc3"]
    assert f.evidence["zero_gradient_layers"] == ["fc0", "fc1", "fc2"]
    assert "fc0–fc2 get a gradient of norm 0 in float32" in f.message
    assert "the next earliest (fc3, fc4, fc5) barely learn" in f.message
    assert "0 in float32 of that at fc7" in f.message


def test_vanishing_message_quotes_the_profile_fit_in_the_profile_direction():
    m = mlp(geometric(1e-6, 5.0, 8), activation="aten.sigmoid.default")
    (f,) = [f for f in detect(m) if f.kind == "vanishing_gradients"]
    assert f.evidence["growth_factor"] == pytest.approx(5.0)
    assert f.evidence["per_layer_factor"] * f.evidence["growth_factor"] == pytest.approx(1.0)
    assert "the depth profile grows ×5 per layer towards the output" in f.message


def test_a_drop_in_one_step_is_said_so_not_fitted_per_layer():
    # flat body, then ×100 less gradient below a head with tiny weights (a fresh HF classifier)
    # (and a dip into a parallel branch, fc2, which is no drop)
    m = mlp([5e-4, 6e-4, 1e-7, 6e-4, 5e-4, 4e-3, 0.4])
    (f,) = [f for f in detect(m) if f.kind == "vanishing_gradients"]
    assert "most of it in one step below fc6: no layer under it gets more than 0.01 " in f.message
    assert "per layer towards the output" not in f.message


def test_a_deep_branch_behind_a_healthy_first_layer_is_the_profiles_input_end():
    """Two branches concatenated into a head: a side input's one layer first in the profile
    (healthy, 0.4 of the head's gradient), then a 12-layer sigmoid branch whose gradient
    shrinks ×0.15 per layer towards its input: its first layer is where the profile is
    judged, not the side layer."""
    m = mlp([0.06, *geometric(3.6e-11, 6.9, 12), 0.15], activation="aten.sigmoid.default")
    (f,) = [f for f in detect(m) if f.kind == "vanishing_gradients"]
    assert f.severity == "error" and "depth_ratio" in f.evidence["rules"]
    assert f.evidence["depth_ratio_from"] == "fc1"
    assert f.evidence["depth_ratio"] == pytest.approx(3.6e-11 / 0.15)
    assert f.layers[0] == "fc1" and "fc0" not in f.layers
    assert "at fc1 is 2.40e-10 of that at fc13" in f.message
    assert "fc0, first in the profile, is on another branch" in f.message
    # the same side layer in front of a healthy deep branch: nothing
    assert not detect(mlp([0.06, *geometric(0.05, 1.02, 12), 0.15]))


def test_a_scalar_parameter_is_no_weight_layer_for_the_weight_ratio():
    # the last "layer" is a temperature (CLIP's logit_scale): one number's gradient, no weight
    m = mlp([1.0] * 4, weight_grad_norms=[1.0, 1.0, 1.0, 1e-3], weight_norms=[1e3] * 4)
    (f,) = [f for f in detect(m) if f.kind == "exploding_gradients"]
    assert f.evidence["rules"] == ["weight_ratio"]
    m.parameters[3].shape = []
    assert not [f for f in detect(m) if f.kind == "exploding_gradients"]


def test_a_long_list_of_layers_without_gradient_is_shortened_in_the_message():
    # zero ‖∂L/∂a‖ at every other layer: not one span, so listed; past four, three and a count
    m = mlp([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    (f,) = [f for f in detect(m) if f.kind == "vanishing_gradients"]
    assert "fc0, fc2, fc4 and 2 more layers get a gradient of norm 0 in float32" in f.message
    assert f.evidence["zero_gradient_layers"] == ["fc0", "fc2", "fc4", "fc6", "fc8"]
