"""The pathology zoo through the full engine: `service.engine.diagnose(model_bytes, batch_bytes)`.

Every case is exported to `.pt2`, TorchScript and ONNX (by both of torch.onnx's exporters) and
must give the same diagnosis: the findings, the layers named, the recommended fixes, and the
main fix verified on a copy of the model. Healthy controls must produce no error-level finding
and no recommendation. Pathologies and controls are also checked on other seeds so that the
thresholds are not tuned to one draw.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from service.engine import diagnose
from service.engine.detectors.optypes import canonical_op
from service.engine.options import DiagnoseOptions
from service.engine.report import SEVERITY_RANK, Report
from service.errors import BadInputError
from tests.support import export
from tests.support.pathologies import BATCH, WIDTH, ZOO, Case, SqrtOfReLU

SLOW_FORMATS = {"torchscript"}  # TorchScript → FX conversion is the slowest path


def grid(cases: list[Case]) -> list[object]:
    """(case, format) pairs each case can be exported to."""
    return [
        pytest.param(
            case,
            fmt,
            id=f"{case.name}-{fmt}",
            marks=[pytest.mark.slow] if fmt in SLOW_FORMATS else [],
        )
        for case in cases
        for fmt in case.formats
    ]


_CACHE: dict[tuple[str, str, int], Report] = {}


def run(case: Case, fmt: str, seed: int = 0, **options: object) -> Report:
    key = (case.name, fmt, seed)
    if key not in _CACHE or options:
        report = diagnose(
            case.model_bytes(fmt, seed), case.batch_bytes(seed), DiagnoseOptions(**options)
        )
        if options:
            return report
        _CACHE[key] = report
    return _CACHE[key]


def check_structure(report: Report) -> None:
    """Every recommendation addresses real findings, explains itself and carries code."""
    json.dumps(report.to_jsonable(), allow_nan=False)
    for rec in report.recommendations:
        assert rec.addresses, rec.fix
        assert all(isinstance(i, int) and 0 <= i < len(report.findings) for i in rec.addresses)
        assert rec.rationale and rec.snippet
    for finding in report.findings:
        assert finding.message.endswith(".")


PATHOLOGIES = [c for c in ZOO.values() if not c.healthy]
HEALTHY = [c for c in ZOO.values() if c.healthy]


@pytest.mark.parametrize(("case", "fmt"), grid(PATHOLOGIES))
def test_pathology_is_diagnosed(case: Case, fmt: str) -> None:
    report = run(case, fmt)
    check_structure(report)
    assert report.verdict == "unhealthy"
    worst: dict[str, str] = {}
    for f in report.findings:
        worst[f.kind] = max(worst.get(f.kind, "info"), f.severity, key=SEVERITY_RANK.__getitem__)
    for kind, severity in case.expect.items():
        assert kind in worst, f"{case.name}/{fmt}: no {kind} in {sorted(worst)}"
        assert SEVERITY_RANK[worst[kind]] >= SEVERITY_RANK[severity], (kind, worst[kind])
    if case.first_layer is not None:
        finding = next(f for f in report.findings if f.kind == case.layer_of)
        assert finding.layers[0] == case.first_layer, finding.layers
    fixes = [r.fix for r in report.recommendations]
    for fix in case.fixes:
        assert fix in fixes, f"{case.name}/{fmt}: {fix} not in {fixes}"
    if case.main_fix is not None:
        rec = next(r for r in report.recommendations if r.fix == case.main_fix)
        assert rec.verified is not None and rec.verified.applied, rec.verified
        assert rec.verified.resolved is True, (rec.verified.before, rec.verified.after)


@pytest.mark.parametrize(("case", "fmt"), grid(HEALTHY))
def test_healthy_control_has_no_error(case: Case, fmt: str) -> None:
    report = run(case, fmt)
    check_structure(report)
    assert all(f.severity != "error" for f in report.findings), report.findings
    assert report.verdict != "unhealthy"
    assert not report.recommendations or all(r.addresses for r in report.recommendations)


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("case", list(ZOO.values()), ids=lambda c: c.name)
def test_diagnosis_holds_on_other_seeds(case: Case, seed: int) -> None:
    report = run(case, "torch_export", seed)
    kinds = {f.kind for f in report.findings if f.severity == "error"}
    if case.healthy:
        assert not kinds, report.findings
    else:
        assert {k for k, s in case.expect.items() if s == "error"} <= kinds


def test_deep_sigmoid_vanishes_towards_input_and_relu_swap_resolves() -> None:
    report = run(ZOO["deep_sigmoid_mlp"], "torch_export")
    finding = next(f for f in report.findings if f.kind == "vanishing_gradients")
    assert finding.evidence["axis"] == "depth"
    assert finding.evidence["depth_ratio"] < 1e-3
    assert finding.layers[:3] == ["fc0", "fc1", "fc2"]
    rec = report.recommendations[0]
    assert rec.fix == "replace_activation" and rec.params["to"] == "ReLU"
    assert "sigmoid" in rec.rationale and "fc0" in rec.rationale
    before = rec.verified.before["figures"]["depth_ratio"]  # type: ignore[union-attr]
    after = rec.verified.after["figures"]["depth_ratio"]  # type: ignore[union-attr]
    assert after > 1e3 * before


def test_large_init_explodes_by_profile_not_by_weight_ratio() -> None:
    report = run(ZOO["deep_relu_large_init"], "torch_export")
    finding = next(f for f in report.findings if f.kind == "exploding_gradients")
    # weight gradients are similar at every depth; the activation-gradient profile is not
    assert 0.1 < finding.evidence["weight_ratio"] < 10
    assert finding.evidence["per_layer_factor"] > 1.5
    clip = next(r for r in report.recommendations if r.fix == "clip_gradients")
    total = clip.params["total_grad_norm"]
    assert 0 < clip.params["max_norm"] < total
    after = clip.verified.after["figures"]["total_grad_norm"]  # type: ignore[union-attr]
    assert after == pytest.approx(clip.params["max_norm"], rel=1e-3)
    reinit = next(r for r in report.recommendations if r.fix == "reinitialize_weights")
    assert "fc0.weight" in reinit.params["schemes"]
    assert reinit.params["schemes"]["fc0.weight"] == "kaiming"


def test_tiny_init_names_every_layer_and_reinit_resolves() -> None:
    report = run(ZOO["relu_tiny_init"], "torch_export")
    init = next(f for f in report.findings if f.kind == "init_scale")
    assert init.severity == "error" and init.evidence["direction"] == "small"
    assert {f"fc{i}" for i in range(6)} <= set(init.layers)
    reinit = report.recommendations[0]
    assert reinit.fix == "reinitialize_weights"
    assert reinit.verified is not None and reinit.verified.resolved


def test_rnn_vanishes_over_time_and_gated_units_are_recommended() -> None:
    report = run(ZOO["tanh_rnn_long"], "torch_export")
    finding = next(f for f in report.findings if f.kind == "vanishing_gradients")
    assert finding.evidence["axis"] == "time"
    assert finding.evidence["steps"] == 120
    assert finding.evidence["horizon_steps"] < 60
    assert finding.layers == ["rnn"]
    rec = report.recommendations[0]
    assert rec.fix == "use_gated_recurrent_unit" and rec.layers == ["rnn"]
    assert rec.verified is not None and not rec.verified.applied and rec.verified.reason


def test_rnn_explodes_over_time_and_orthogonal_reinit_resolves() -> None:
    report = run(ZOO["relu_rnn_exploding"], "torch_export")
    finding = next(
        f
        for f in report.findings
        if f.kind == "exploding_gradients" and f.evidence["axis"] == "time"
    )
    assert finding.evidence["time_ratio"] > 70 and finding.evidence["per_step_factor"] > 1.1
    reinit = next(r for r in report.recommendations if r.fix == "reinitialize_weights")
    assert reinit.params["schemes"] == {"rnn.weight_hh_l0": "orthogonal"}
    assert reinit.verified is not None and reinit.verified.resolved


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_log_of_negatives_origin_is_the_log_op(fmt: str) -> None:
    report = run(ZOO["log_of_negatives"], fmt)
    finding = report.findings[0]
    assert finding.kind == "non_finite"
    origin = finding.evidence["origin"]
    assert canonical_op(origin["op_type"]) == "log" and origin["phase"] == "forward"
    guard = report.recommendations[0]
    assert guard.fix == "guard_numerics" and guard.params["node"] == origin["node"]
    assert "clamp" in guard.snippet
    after = guard.verified.after["figures"]  # type: ignore[union-attr]
    assert math.isfinite(after["loss"]) and after["non_finite_parameters"] == 0


def test_backward_origin_is_named_with_its_phase() -> None:
    report = run(ZOO["sqrt_at_zero_backward"], "torch_export")
    origin = report.findings[0].evidence["origin"]
    assert canonical_op(origin["op_type"]) == "sqrt" and origin["phase"] == "backward"
    assert "backward pass" in report.findings[0].message
    guard = report.recommendations[0]
    assert guard.params["op"] == "sqrt" and "clamp_min" in guard.snippet
    assert guard.verified is not None and guard.verified.resolved


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_a_backward_inf_no_parameter_gradient_sees_is_info(fmt: str) -> None:
    """sqrt of a ReLU's output: its backward is inf at the zeros, which the ReLU's backward
    zeroes (torch's parameter gradients are finite): told, not an error."""
    case = Case("sqrt_of_relu", lambda _s: SqrtOfReLU(), (BATCH, WIDTH))
    module = case.module()
    x, target = case.batch()
    torch.nn.functional.cross_entropy(module.train()(x), target).backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    report = run(case, fmt)
    (finding,) = [f for f in report.findings if f.kind == "non_finite"]
    assert finding.severity == "info" and finding.evidence["origin"]["phase"] == "backward"
    assert "reach no parameter gradient" in finding.message
    assert report.verdict == "healthy"


def test_threshold_overrides_reach_the_detectors() -> None:
    case = ZOO["saturated_tanh"]
    report = run(case, "torch_export", thresholds={"saturation_fraction_error": 0.95})
    saturation = next(f for f in report.findings if f.kind == "saturation")
    assert saturation.severity == "warning"
    with pytest.raises(BadInputError, match="known thresholds"):
        run(case, "torch_export", thresholds={"saturation": 0.5})


def test_verification_can_be_turned_off() -> None:
    report = run(ZOO["dead_relu"], "torch_export", verify_fixes=False)
    assert report.recommendations and all(r.verified is None for r in report.recommendations)


@pytest.mark.parametrize("name", ["tanh_rnn_long", "relu_rnn_exploding"])
def test_a_dynamo_onnx_export_of_nn_rnn_gets_the_legacy_exports_diagnosis(name: str) -> None:
    """torch's default ONNX exporter writes nn.RNN out step by step (no RNN node; one MatMul
    per step on the same weight), which the converter folds back into an RNN node
    (onnx/unrolled_rnn.py): one recurrent layer, judged over time as the legacy export's is.
    (Unfolded, each step was a layer and, with no recurrent op found, the time profile was not
    judged: "healthy".)"""
    case = ZOO[name]
    module = case.module(0)
    x, _ = case.batch(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = export.to_onnx(module, x, dynamo=True, input_names=["x"])
    dynamo = diagnose(data, case.batch_bytes(0), DiagnoseOptions())
    legacy = run(case, "onnx")
    assert [(layer.name, layer.op) for layer in dynamo.layers] == [
        (layer.name, layer.op) for layer in legacy.layers
    ]
    assert [(f.kind, f.severity, f.layers) for f in dynamo.findings] == [
        (f.kind, f.severity, f.layers) for f in legacy.findings
    ]
    assert [r.fix for r in dynamo.recommendations] == [r.fix for r in legacy.recommendations]
    for ours_rec, their_rec in zip(dynamo.recommendations, legacy.recommendations, strict=True):
        assert ours_rec.params.keys() == their_rec.params.keys()
        for key, value in their_rec.params.items():
            numeric = isinstance(value, float)
            assert ours_rec.params[key] == (pytest.approx(value, rel=1e-4) if numeric else value)
        verdicts = [
            (r.verified.applied, r.verified.resolved) if r.verified else None
            for r in (ours_rec, their_rec)
        ]
        assert verdicts[0] == verdicts[1], ours_rec.fix
    for ours, theirs in zip(dynamo.findings, legacy.findings, strict=True):
        if ours.evidence.get("axis") == "time":
            assert ours.evidence["time_ratio"] == pytest.approx(
                theirs.evidence["time_ratio"], rel=1e-3
            )


def test_a_gradient_below_float32s_squares_gets_its_float64_norm() -> None:
    """30 sigmoid layers: the first weight's gradient entries are ~1e-27, whose squares
    float32 cannot hold, so its float32 norm is 0; the report gives torch's float64 norm."""
    layers: list[torch.nn.Module] = []
    for _ in range(30):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.Sigmoid()]
    case = Case("sigmoid30", lambda _s: torch.nn.Sequential(*layers), (BATCH, WIDTH))
    module = case.module()
    x, _ = case.batch()
    module.train()(x)[:, :4].sum().backward()  # any loss: only the scale matters here
    grad = dict(module.named_parameters())["0.weight"].grad
    assert grad is not None and grad.norm() == 0 and grad.count_nonzero() > 0
    report = run(case, "torch_export", verify_fixes=False)
    first = next(p for p in report.parameters if p.name == "0.weight")
    assert first.grad_norm is not None and 0 < first.grad_norm < 1e-20
