"""Fix transforms on real converted graphs (.pt2 via FX, ONNX via the converter): activation
swap equals the hand-edited torch model, re-initialisation follows He/Xavier and touches only
the copy, numerics guards remove the NaN, and op types are normalised in one place."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from service.engine.advice.evidence import residual_adds
from service.engine.detectors import detect
from service.engine.detectors.optypes import canonical_op, is_saturating
from service.engine.measure import measure
from service.engine.measurements import Subject
from service.engine.options import DiagnoseOptions
from service.engine.report import Recommendation
from service.engine.subject import build_subject
from service.engine.verify import verify_recommendations
from service.engine.verify.transforms import (
    NotApplicable,
    copy_subject,
    guard_node,
    reinitialize,
    swap_activations,
)
from tests.support.export import to_format, to_torch_export
from tests.support.pathologies import MLP, ZOO
from tests.unit.engine.measure_support import npz_bytes

OPTIONS = DiagnoseOptions()


def subject_of(case_name: str, fmt: str, seed: int = 0):
    case = ZOO[case_name]
    return build_subject(case.model_bytes(fmt, seed), case.batch_bytes(seed), OPTIONS)


@pytest.mark.parametrize(
    ("op_type", "canonical"),
    [
        ("Sigmoid", "sigmoid"),
        ("sigmoid", "sigmoid"),
        ("aten.sigmoid.default", "sigmoid"),
        ("aten::sigmoid", "sigmoid"),
        ("relu_", "relu"),
        ("LeakyRelu", "leaky_relu"),
        ("aten.rnn_tanh.input", "rnn_tanh"),
        ("RNN", "rnn_tanh"),
        ("BatchNormalization", "batch_norm"),
        ("_native_batch_norm_legit_functional", "_native_batch_norm_legit_functional"),
        ("aten.log.default", "log"),
        ("Conv", "convolution"),
    ],
)
def test_op_types_are_normalised_in_one_place(op_type: str, canonical: str) -> None:
    assert canonical_op(op_type) == canonical


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_activation_swap_equals_the_hand_edited_model(fmt: str) -> None:
    case = ZOO["deep_sigmoid_mlp"]
    subject = subject_of(case.name, fmt)
    copy_ = copy_subject(subject)
    swapped = swap_activations(copy_, {"sigmoid"}, "ReLU")
    assert len(swapped) == 10
    assert not any(is_saturating(n.op_type) for n in copy_.graph.nodes)  # type: ignore[union-attr]
    reference = case.module(0)
    for i in range(10):
        setattr(reference, f"act{i}", nn.ReLU())
    x, _ = case.batch(0)
    with torch.no_grad():
        got = copy_.graph.run([x])[0]  # type: ignore[union-attr]
        want = reference(x)
        original = subject.graph.run([x])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the original graph still runs sigmoids
    torch.testing.assert_close(original, case.module(0)(x), rtol=1e-5, atol=1e-5)


def test_output_activation_is_not_swapped() -> None:
    class OutputSigmoid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.fc(x))

    import io

    import numpy as np

    from tests.support.export import to_torch_export

    x = torch.randn(8, 4)
    buffer = io.BytesIO()
    np.savez(buffer, x=x.numpy())
    subject = build_subject(to_torch_export(OutputSigmoid(), x), buffer.getvalue(), OPTIONS)
    with pytest.raises(NotApplicable, match="outside the graph outputs"):
        swap_activations(copy_subject(subject), {"sigmoid"}, "ReLU")


def test_reinitialisation_touches_only_the_copy_and_follows_he() -> None:
    subject = subject_of("relu_tiny_init", "torch_export")
    before = subject.graph.parameter("fc0.weight").detach().clone()
    copy_ = copy_subject(subject)
    done = reinitialize(copy_, {"fc0.weight": "kaiming", "fc0.bias": "zero_bias"})
    assert len(done) == 2
    torch.testing.assert_close(subject.graph.parameter("fc0.weight"), before)
    new = copy_.graph.parameter("fc0.weight")  # type: ignore[union-attr]
    assert new.std().item() == pytest.approx(math.sqrt(2 / 16), rel=0.2)
    assert torch.count_nonzero(copy_.graph.parameter("fc0.bias")) == 0  # type: ignore[union-attr]
    again = copy_subject(subject)
    reinitialize(again, {"fc0.weight": "kaiming"})
    torch.testing.assert_close(again.graph.parameter("fc0.weight"), new)  # type: ignore[union-attr]


def test_reinitialisation_uses_the_layer_fans() -> None:
    subject = subject_of("relu_tiny_init", "torch_export")
    copy_ = copy_subject(subject)
    reinitialize(copy_, {"fc1.weight": "xavier"})
    std = copy_.graph.parameter("fc1.weight").std().item()  # type: ignore[union-attr]
    assert std == pytest.approx(math.sqrt(2 / (16 + 16)), rel=0.2)  # Linear(16, 16)


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_guarding_the_log_removes_the_nan(fmt: str) -> None:
    subject = subject_of("log_of_negatives", fmt)
    m = measure(subject, OPTIONS)
    assert m.non_finite_origin is not None
    copy_ = copy_subject(subject)
    guard_node(copy_, m.non_finite_origin.node)
    after = measure(copy_, OPTIONS)
    assert after.non_finite_origin is None and math.isfinite(after.loss.value or math.nan)
    assert not [f for f in detect(after) if f.kind == "non_finite"]
    assert copy_.graph is not None
    with pytest.raises(NotApplicable, match="no automatic guard"):
        linear = next(
            n for n in copy_.graph.nodes if canonical_op(n.op_type) in {"linear", "addmm"}
        )
        guard_node(copy_, linear.name)


def test_parameters_only_subject_explains_why_no_swap() -> None:
    subject = subject_of("deep_sigmoid_mlp", "torch_export")
    subject.graph = None
    with pytest.raises(NotApplicable, match="parameters_only"):
        swap_activations(subject, {"sigmoid"}, "ReLU")


def test_residual_adds_are_counted_from_the_graph() -> None:
    assert residual_adds(subject_of("healthy_residual_cnn_bn", "torch_export").graph) == 3
    assert residual_adds(subject_of("deep_sigmoid_mlp", "onnx").graph) == 0  # bias adds only
    assert residual_adds(None) is None


def test_clip_and_not_automatic_fixes_are_reported() -> None:
    subject = subject_of("deep_relu_large_init", "torch_export")
    m = measure(subject, OPTIONS)
    findings = detect(m)
    index = next(i for i, f in enumerate(findings) if f.kind == "exploding_gradients")
    recs = [
        Recommendation(
            fix="clip_gradients", addresses=[index], rationale="r", params={"max_norm": 5.0}
        ),
        Recommendation(fix="add_normalization", addresses=[index], rationale="r"),
    ]
    verify_recommendations(recs, findings, m, subject, OPTIONS)
    clip, norm = recs[0].verified, recs[1].verified
    assert (
        clip is not None
        and clip.applied
        and clip.after["figures"]["total_grad_norm"] == (pytest.approx(5.0, rel=1e-3))
    )
    # clipping bounds the step, which one pass shows; whether that is enough shows only over
    # training steps: neither resolved nor not resolved, and the reason says so
    assert clip.before["figures"]["total_grad_norm"] > 5.0 * 1.01
    assert clip.resolved is None and "one gradient pass cannot show" in (clip.reason or "")
    assert norm is not None and not norm.applied and "trained" in (norm.reason or "")


def test_mlp_builder_names_layers_for_the_zoo() -> None:
    names = [n for n, _ in MLP(2, nn.ReLU).named_parameters()]
    assert names[:2] == ["fc0.weight", "fc0.bias"]


def test_parameters_only_model_is_still_diagnosed_and_reinit_verified() -> None:
    """A TorchScript model that could not be made observable: weight-gradient and weight-scale
    rules still find the tiny init, and the re-initialisation is verified on a true copy."""
    import io

    case = ZOO["relu_tiny_init"]
    subject = subject_of(case.name, "torchscript")
    subject.module = torch.jit.load(io.BytesIO(case.model_bytes("torchscript")))
    subject.module.train()
    subject.graph = None
    m = measure(subject, OPTIONS)
    findings = detect(m)
    kinds = {(f.kind, f.severity) for f in findings}
    assert {("vanishing_gradients", "error"), ("init_scale", "error")} <= kinds
    from service.engine.advice import recommend

    recs = recommend(findings, m, subject, OPTIONS)
    reinit = recs[0]
    assert reinit.fix == "reinitialize_weights"
    assert reinit.verified is not None and reinit.verified.resolved
    # the user's module is untouched
    original = dict(subject.module.named_parameters())["fc0.weight"]
    assert original.std().item() < 0.01
    copied = copy_subject(subject)
    assert all(p.is_leaf for p in copied.module.parameters())


def test_lstm_time_decay_is_a_warning_and_forget_bias_is_verified() -> None:
    from service.engine import diagnose
    from tests.support.pathologies import Case, GatedRNN

    case = Case("lstm", lambda _s: GatedRNN(nn.LSTM), (8, 30, 4))
    report = diagnose(case.model_bytes("torch_export"), case.batch_bytes(), OPTIONS)
    (finding,) = report.findings
    assert finding.kind == "vanishing_gradients" and finding.severity == "warning"
    assert finding.evidence["axis"] == "time"
    (rec,) = report.recommendations
    assert rec.params["schemes"] == {"rnn.bias_ih_l0": "forget_bias"}
    assert rec.verified is not None and rec.verified.resolved
    before = rec.verified.before["figures"]["time_ratio"]
    assert rec.verified.after["figures"]["time_ratio"] > 100 * before


def _verified_guard(subject: Subject, phase: str) -> tuple[Recommendation, str]:
    """The guard_numerics fix of the run's non-finite origin (found in `phase`), verified on a
    copy; and the non_finite finding's message."""
    m = measure(subject, OPTIONS)
    findings = detect(m)
    (index,) = [k for k, f in enumerate(findings) if f.kind == "non_finite"]
    assert m.non_finite_origin is not None and m.non_finite_origin.phase == phase
    rec = Recommendation(
        fix="guard_numerics",
        addresses=[index],
        rationale="",
        snippet="",
        params={"node": m.non_finite_origin.node},
        layers=[],
    )
    (verified,) = verify_recommendations([rec], findings, m, subject, OPTIONS)
    return verified, findings[index].message


class LogInEveryBlock(nn.Module):
    """The same unguarded log in two blocks: guarding the first origin makes the second one
    the origin, so the verified fix guards each in turn."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + torch.log(block(x))  # negative pre-activations: NaN
        return self.head(x)


def test_the_verified_guard_follows_the_origin_through_every_block() -> None:
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    subject = build_subject(to_torch_export(LogInEveryBlock(), x), npz_bytes(x=x), OPTIONS)
    verified, _ = _verified_guard(subject, "forward")
    assert verified.verified is not None
    assert verified.verified.after["non_finite"] == {"present": False}
    assert verified.verified.transform is not None
    assert verified.verified.transform.count("guarded input 0") == 2
    # the clamped log(1e-6) = -13.8 feeds the head huge inputs: a new error, so not resolved
    assert verified.verified.resolved is not bool(verified.verified.after.get("new_errors"))


class DistanceToItself(nn.Module):
    """Pairwise Euclidean distances written as a power of a sum of squares (what the legacy
    exporter makes of torch.cdist): the distance of each point to itself is exactly 0, where
    the gradient of x**0.5 is infinite, so the backward is NaN while every base is ≥ 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        squared = (h.unsqueeze(1) - h.unsqueeze(0)).pow(2).sum(-1)
        return squared.pow(0.5)


@pytest.mark.parametrize("fmt", ["torch_export", "onnx_legacy"])
def test_the_verified_guard_of_a_power_keeps_its_base_off_zero(fmt: str) -> None:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    subject = build_subject(to_format(fmt, DistanceToItself(), x), npz_bytes(x=x), OPTIONS)
    verified, message = _verified_guard(subject, "backward")
    assert "infinite at 0" in message
    assert verified.verified is not None and verified.verified.resolved
    assert verified.verified.after["non_finite"] == {"present": False}
