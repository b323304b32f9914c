"""Outputs that are already probabilities (losses.py `probability_default`, the notes on a
softmax's or sigmoid's output under a loss that applies its own), a batch of one through
BatchNorm in eval mode (first_pass.py `uses_batch_statistics`), sequence-first inputs no
recurrent op tells (sequences.py `_sequence_first_evidence`), and parameters whose gradient is
exactly zero on the batch (measure.py `zero_gradient_notes`)."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.engine import diagnose
from service.engine.losses import (
    CLASS_DEFAULT,
    NLL_OF_LOG,
    class_default,
    compute_loss,
    loss_input_notes,
    output_check_notes,
    output_checks,
    resolve_class_default,
)
from service.engine.options import DiagnoseOptions
from service.engine.report import Report
from service.errors import BadInputError
from tests.support.export import to_onnx, to_torch_export, to_torchscript
from tests.unit.engine.measure_support import npz_bytes


def _options(**kwargs: object) -> DiagnoseOptions:
    return DiagnoseOptions.model_validate({"verify_fixes": False, **kwargs})


def _reference(
    module: nn.Module, loss: Callable[[nn.Module], torch.Tensor]
) -> tuple[float, dict[str, float]]:
    """The loss and each parameter's gradient norm by plain autograd."""
    module.zero_grad()
    value = loss(module)
    value.backward()
    grads = {
        n: float(p.grad.norm()) if p.grad is not None else 0.0 for n, p in module.named_parameters()
    }
    return value.item(), grads


def _assert_matches(report: Report, loss: float, grads: dict[str, float]) -> None:
    assert report.loss.value is not None
    assert math.isclose(report.loss.value, loss, rel_tol=1e-4)
    got = {p.name: p.grad_norm for p in report.parameters}
    for name, want in grads.items():
        value = got[name]
        assert value is not None
        assert math.isclose(value, want, rel_tol=1e-3, abs_tol=1e-7), name


# -- 1. softmax / sigmoid outputs --------------------------------------------------------------


class SoftmaxClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.o = nn.Linear(16, 5)
        with torch.no_grad():
            self.o.weight.mul_(6.0)  # confident: a second softmax flattens its gradients

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.o(torch.relu(self.a(x))), dim=-1)


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_the_default_loss_of_a_softmax_output_is_the_nll_of_its_log(fmt: str) -> None:
    torch.manual_seed(0)
    module = SoftmaxClassifier().eval()
    x, y = torch.randn(12, 6), torch.randint(0, 5, (12,))
    model = to_torch_export(module, x) if fmt == "torch_export" else to_onnx(module, x)
    report = diagnose(model, npz_bytes(x=x, target=y), _options())
    assert report.loss.kind == NLL_OF_LOG
    # the loss such a model trains with, not cross_entropy over a second softmax
    loss, grads = _reference(module, lambda m: F.nll_loss(torch.log(m(x)), y))
    _assert_matches(report, loss, grads)
    (note,) = [n for n in report.notes if "class probabilities" in n]
    assert "NLL of their log" in note and "second softmax" in note


def test_the_nll_of_log_default_survives_micro_batches_and_verification() -> None:
    torch.manual_seed(1)
    module = SoftmaxClassifier().eval()
    x, y = torch.randn(10, 6), torch.randint(0, 5, (10,))
    report = diagnose(
        to_torch_export(module, x),
        npz_bytes(x=x, target=y),
        DiagnoseOptions(micro_batches=3),
    )
    assert report.loss.kind == NLL_OF_LOG
    loss, grads = _reference(module, lambda m: F.nll_loss(torch.log(m(x)), y))
    _assert_matches(report, loss, grads)


def _resolved(outputs: list[torch.Tensor], target: torch.Tensor) -> str:
    kind = class_default("cross_entropy", target)
    checks = output_checks(kind, outputs, target)
    return resolve_class_default(kind, "r", checks.tolist() if checks is not None else None)[0]


def test_logits_keep_the_cross_entropy_default() -> None:
    logits = torch.randn(8, 4)
    target = torch.randint(0, 4, (8,))
    assert _resolved([logits], target) == "cross_entropy"
    assert _resolved([logits.softmax(1)], target) == NLL_OF_LOG
    # [B, T, V] probabilities with [B, T] labels: rows along the last axis
    seq = torch.randn(2, 5, 7).softmax(-1)
    assert _resolved([seq], torch.zeros(2, 5).long()) == NLL_OF_LOG
    # only the class-index default changes: a float target's mse does not
    assert class_default("mse", logits) == "mse"


def test_the_class_default_is_chosen_on_the_device() -> None:
    """`class_default` is cross_entropy on logits and the NLL of log(p) on probabilities,
    bit for bit, without reading the output on the host."""
    logits = torch.randn(8, 4)
    target = torch.randint(0, 4, (8,))
    probs = logits.softmax(1)
    assert torch.equal(
        compute_loss(CLASS_DEFAULT, [logits], target),
        compute_loss("cross_entropy", [logits], target),
    )
    assert torch.equal(
        compute_loss(CLASS_DEFAULT, [probs], target), compute_loss(NLL_OF_LOG, [probs], target)
    )
    assert math.isclose(
        compute_loss(NLL_OF_LOG, [probs], target).item(),
        F.nll_loss(probs.log(), target).item(),
        rel_tol=1e-6,
    )


def test_an_explicit_cross_entropy_on_probabilities_is_noted_with_the_fix() -> None:
    probs = torch.randn(8, 4).softmax(1)
    target = torch.randint(0, 4, (8,))
    checks = output_checks("cross_entropy", [probs], target)
    assert checks is not None
    (note,) = output_check_notes("cross_entropy", "cross_entropy", [8, 4], [8], checks.tolist())
    assert "--loss cross_entropy expects logits" in note and "leave --loss out" in note
    soft = torch.rand(8, 4).softmax(1)  # a class-probability target, same story
    (note,) = loss_input_notes("cross_entropy", [probs], soft)
    assert "second softmax" in note
    logits = torch.randn(8, 4)
    checks = output_checks("cross_entropy", [logits], target)
    assert checks is not None
    assert output_check_notes("cross_entropy", "cross_entropy", [8, 4], [8], checks.tolist()) == []
    assert loss_input_notes("cross_entropy", [logits], soft) == []


def test_an_explicit_nll_on_probabilities_says_they_are_probabilities() -> None:
    probs = torch.randn(8, 4).softmax(1)
    (note,) = loss_input_notes("nll", [probs], torch.randint(0, 4, (8,)))
    assert "holds class probabilities" in note and "log_softmax" in note


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_bce_with_logits_on_a_sigmoid_output_is_noted(fmt: str) -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid()).eval()
    x, t = torch.randn(8, 4), torch.randint(0, 2, (8, 3)).float()
    model = to_torch_export(module, x) if fmt == "torch_export" else to_onnx(module, x)
    report = diagnose(model, npz_bytes(x=x, target=t), _options(loss="bce_with_logits"))
    (note,) = [n for n in report.notes if "bce_with_logits" in n]
    assert "its last op is a sigmoid" in note and "use --loss bce" in note
    logits = nn.Sequential(nn.Linear(4, 3)).eval()
    report = diagnose(
        to_torch_export(logits, x), npz_bytes(x=x, target=t), _options(loss="bce_with_logits")
    )
    assert not [n for n in report.notes if "bce_with_logits" in n]


def _bce_notes(y: torch.Tensor, op: str = "") -> list[str]:
    t = torch.ones_like(y)
    checks = output_checks("bce_with_logits", [y], t)
    assert checks is not None
    return output_check_notes(
        "bce_with_logits", "bce_with_logits", list(y.shape), list(t.shape), checks.tolist(), op
    )


def test_bce_with_logits_without_a_graph_judges_the_values() -> None:
    (note,) = _bce_notes(torch.rand(6, 2) * 0.9 + 0.05)
    assert "strictly between 0 and 1" in note
    assert _bce_notes(torch.randn(6, 2)) == []
    # the graph says it is no sigmoid: values in [0, 1] alone are not enough
    assert _bce_notes(torch.rand(6, 2), "linear") == []
    assert _bce_notes(torch.rand(6, 2), "sigmoid") != []


# -- 2. a batch of one through BatchNorm in eval mode ------------------------------------------


def _batch_norm_net(track: bool = True) -> nn.Module:
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8, track_running_stats=track), nn.ReLU(), nn.Linear(8, 3)
    )
    module.train()
    module(torch.randn(64, 5))  # running statistics of its own
    return module.eval()


@pytest.mark.parametrize("fmt", ["torch_export", "torchscript", "onnx"])
def test_a_batch_of_one_through_batch_norm_runs_in_eval_mode(fmt: str) -> None:
    module = _batch_norm_net()
    x, y = torch.randn(1, 5), torch.tensor([2])
    export = {
        "torch_export": to_torch_export,
        "torchscript": to_torchscript,
        "onnx": lambda m, e: to_onnx(m, e, training=False),
    }[fmt]
    model = export(module, x)
    report = diagnose(model, npz_bytes(x=x, target=y), _options(mode="eval"))
    loss, grads = _reference(module, lambda m: F.cross_entropy(m(x), y))
    _assert_matches(report, loss, grads)
    # train mode normalises with the batch's statistics: one value per channel is refused
    with pytest.raises(BadInputError, match=r"one value per channel.*--mode eval"):
        diagnose(model, npz_bytes(x=x, target=y), _options(mode="train"))


def test_a_batch_norm_exported_with_batch_statistics_is_refused_in_eval_mode_too() -> None:
    module = _batch_norm_net(track=False)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(
            module, (torch.randn(4, 5),), dynamic_shapes=({0: torch.export.Dim("B")},)
        )
    torch.export.save(program, buffer)
    batch = npz_bytes(x=torch.randn(1, 5), target=torch.tensor([1]))
    for mode in ("eval", "train"):
        with pytest.raises(BadInputError, match="in eval mode too") as caught:
            diagnose(buffer.getvalue(), batch, _options(mode=mode))
        assert "--mode eval" not in str(caught.value)


# -- 3. sequence-first inputs no recurrent op tells --------------------------------------------


class SeqFirstEncoder(nn.Module):
    """A Transformer encoder with torch's default batch_first=False: [T, B, F] in, its mean
    over time classified, [B, C] out. No recurrent op reads the layout."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.o = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.enc(x).mean(0))


def _seq_first_model(fmt: str, module: nn.Module, x: torch.Tensor) -> bytes:
    if fmt == "torch_export":
        return to_torch_export(module, x)
    if fmt == "torch_export_dynamic":
        buffer = io.BytesIO()
        dims = {0: torch.export.Dim("T", min=2, max=64), 1: torch.export.Dim("B", min=2, max=64)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(module, (x,), dynamic_shapes=(dims,))
        torch.export.save(program, buffer)
        return buffer.getvalue()
    if fmt == "onnx_dynamic":
        dims = {0: torch.export.Dim("T", min=2, max=64), 1: torch.export.Dim("B", min=2, max=64)}
        return to_onnx(module, x, dynamo=True, input_names=["x"], dynamic_shapes={"x": dims})
    return to_onnx(module, x, input_names=["x"])


def _time_norms(module: nn.Module, x: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor]):
    xx = x.clone().requires_grad_(True)
    loss(module(xx)).backward()
    assert xx.grad is not None
    return xx.grad.double().square().sum(dim=(1, 2)).sqrt().tolist()


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_a_per_example_target_reads_a_sequence_first_input(fmt: str) -> None:
    torch.manual_seed(0)
    module = SeqFirstEncoder().eval()
    T, B = 8, 4
    x, y = torch.randn(T, B, 8), torch.randint(0, 3, (B,))
    model = _seq_first_model(fmt, module, x)
    report = diagnose(model, npz_bytes(x=x, target=y), _options())
    assert report.batch.size == B
    (profile,) = report.profiles.time
    assert profile.axis == 0 and len(profile.grad_norms) == T
    want = _time_norms(module, x, lambda out: F.cross_entropy(out, y))
    for got, expected in zip(profile.grad_norms, want, strict=True):
        assert math.isclose(got, expected, rel_tol=1e-3, abs_tol=1e-9)
    assert any("read sequence-first" in n and "the target [4]" in n for n in report.notes)
    loss, grads = _reference(module, lambda m: F.cross_entropy(m(x), y))
    _assert_matches(report, loss, grads)


@pytest.mark.parametrize("fmt", ["torch_export_dynamic", "onnx_dynamic"])
def test_micro_batches_split_a_sequence_first_input_along_its_batch(fmt: str) -> None:
    torch.manual_seed(1)
    module = SeqFirstEncoder().eval()
    x, y = torch.randn(8, 4, 8), torch.randint(0, 3, (4,))
    model = _seq_first_model(fmt, module, x)
    report = diagnose(model, npz_bytes(x=x, target=y), _options(micro_batches=2))
    assert report.batch.size == 4 and report.micro_batches == 2
    loss, grads = _reference(module, lambda m: F.cross_entropy(m(x), y))
    _assert_matches(report, loss, grads)  # attention saw whole sequences


@pytest.mark.parametrize("fmt", ["torch_export", "torch_export_dynamic", "onnx", "onnx_dynamic"])
def test_an_output_led_by_the_inputs_axis_1_reads_it_sequence_first(fmt: str) -> None:
    torch.manual_seed(2)
    module = SeqFirstEncoder().eval()
    x = torch.randn(8, 4, 8)
    report = diagnose(_seq_first_model(fmt, module, x), npz_bytes(x=x), _options())
    assert report.batch.size == 4
    (profile,) = report.profiles.time
    assert profile.axis == 0 and len(profile.grad_norms) == 8
    assert any("read sequence-first" in n and "output" in n for n in report.notes)


def test_a_scripted_sequence_first_lstm_run_parameters_only_is_read_sequence_first() -> None:
    class Scripted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.r = nn.LSTM(4, 8)
            self.o = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(self.r(x)[0][-1])

    torch.manual_seed(3)
    module = Scripted()
    x, y = torch.randn(9, 3, 4), torch.randint(0, 3, (3,))
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    report = diagnose(buffer.getvalue(), npz_bytes(x=x, target=y), _options())
    assert report.batch.size == 3
    (profile,) = report.profiles.time
    assert profile.axis == 0 and len(profile.grad_norms) == 9
    want = _time_norms(module, x, lambda out: F.cross_entropy(out, y))
    for got, expected in zip(profile.grad_norms, want, strict=True):
        assert math.isclose(got, expected, rel_tol=1e-3, abs_tol=1e-9)


def test_a_sequence_first_token_input_with_a_per_example_target() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.o = nn.Linear(8, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.o(torch.tanh(self.emb(ids)).mean(0))  # [T, B] ids → [B, 2]

    torch.manual_seed(4)
    ids, y = torch.randint(0, 11, (7, 3)), torch.randint(0, 2, (3,))
    report = diagnose(to_torch_export(Tokens(), ids), npz_bytes(ids=ids, target=y), _options())
    assert report.batch.size == 3
    (profile,) = report.profiles.time
    assert profile.axis == 0 and len(profile.grad_norms) == 7


def test_an_ambiguous_layout_is_read_batch_first_and_says_how_to_say_otherwise() -> None:
    torch.manual_seed(5)
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(6, 5, 3), torch.randn(6, 5, 2)  # [T, B] or [B, T]: nothing tells
    report = diagnose(to_torch_export(module, x), npz_bytes(x=x, target=y), _options())
    assert report.batch.size == 6
    (note,) = [n for n in report.notes if "batch-first assumed" in n]
    assert "axis 0 taken as the batch" in note and "batch_first=True" in note
    # a per-example target of the batch-first reading keeps it, and a batch of one too
    x1 = torch.randn(1, 5, 3)
    report = diagnose(
        to_torch_export(module, x1), npz_bytes(x=x1, target=torch.randn(1, 5, 2)), _options()
    )
    assert report.batch.size == 1


# -- 4. parameters whose gradient is exactly zero ----------------------------------------------


class TwoExperts(nn.Module):
    """A hard router that sends every example to expert 0: expert 1's gradient is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.router = nn.Linear(8, 2)
        with torch.no_grad():
            self.router.bias.copy_(torch.tensor([20.0, -20.0]))
        self.experts = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        probs = self.router(h).softmax(-1)
        idx = probs.argmax(-1)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            mask = (idx == e).to(h.dtype)[:, None]
            out = out + mask * probs[:, e : e + 1] * expert(h)
        return self.head(out + h)


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_an_expert_no_example_reaches_is_noted(fmt: str) -> None:
    torch.manual_seed(0)
    module = TwoExperts().eval()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    model = to_torch_export(module, x) if fmt == "torch_export" else to_onnx(module, x)
    report = diagnose(model, npz_bytes(x=x, target=y), _options())
    (note,) = [n for n in report.notes if "exactly-zero gradient" in n]
    assert note.startswith("2 parameter(s)")
    assert "experts.1.weight" in note and "experts.1.bias" in note
    assert "experts.0" not in note and "Mixture-of-Experts" in note


def test_zero_gradients_a_finding_explains_are_not_noted() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    healthy = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    head, hidden = nn.Linear(8, 3), nn.Linear(8, 8)
    blocked = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), head)
    dead = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), hidden, nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        head.weight.zero_()  # zero-initialised head: nothing before it gets a gradient
        hidden.bias.fill_(-100.0)  # every unit of the second ReLU dead
    for module in (healthy, blocked, dead):
        report = diagnose(to_torch_export(module, x), npz_bytes(x=x, target=y), _options())
        assert not [n for n in report.notes if "exactly-zero gradient" in n], module
