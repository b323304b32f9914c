"""Class targets the loss cannot or can read, through the real engine against plain torch:
a batch whose every label is -100 is refused (a micro-batch of them adds nothing), and
`--loss cross_entropy` reads a floating-point target of the output's shape as class
probabilities, as `F.cross_entropy` does."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.engine import diagnose
from service.engine.options import DiagnoseOptions
from service.engine.report import Report
from service.errors import BadInputError, BatchError
from tests.support.export import to_torch_export
from tests.unit.engine.measure_support import npz_bytes


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def torch_grads(module: nn.Module, loss: torch.Tensor) -> dict[str, float]:
    module.zero_grad()
    loss.backward()
    return {n: p.grad.norm().item() for n, p in module.named_parameters() if p.grad is not None}


def assert_matches_torch(report: Report, loss: torch.Tensor, module: nn.Module) -> None:
    assert report.loss.value == pytest.approx(loss.item(), rel=1e-5)
    grads = torch_grads(module, loss)
    measured = {p.name: p.grad_norm for p in report.parameters}
    assert measured.keys() == grads.keys()
    for name, norm in grads.items():
        assert measured[name] == pytest.approx(norm, rel=1e-4), name
    assert not [f for f in report.findings if f.kind in ("non_finite", "vanishing_gradients")]


# -- labels of -100 ------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", [None, "cross_entropy", "nll"])
def test_a_batch_whose_every_label_is_ignored_is_refused(loss: str | None) -> None:
    """torch's mean over no label is NaN and every gradient 0: the report said `non_finite` at
    the loss and vanishing gradients. It is the batch's fault: exit 2, naming what to change."""
    module, x = mlp(), torch.randn(8, 6)
    labels = torch.full((8,), -100)
    assert math.isnan(F.cross_entropy(module(x), labels).item())
    with pytest.raises(BatchError) as raised:
        model, batch = to_torch_export(module, x), npz_bytes(x=x, target=labels)
        diagnose(model, batch, DiagnoseOptions(loss=loss))
    assert raised.value.is_client_error  # the CLI's exit code 2
    message = str(raised.value)
    assert "every target is -100 (the ignored label)" in message
    assert "give at least one class index" in message


def test_a_sequence_batch_whose_every_label_is_ignored_is_refused_also_split() -> None:
    torch.manual_seed(0)
    module, x = nn.Linear(5, 7), torch.randn(4, 3, 5)  # [B, T, vocab] logits
    labels = torch.full((4, 3), -100, dtype=torch.int32)
    with pytest.raises(BatchError, match=r"every target is -100.*\[4, 3\]"):
        diagnose(
            to_torch_export(module, x),
            npz_bytes(x=x, labels=labels),
            DiagnoseOptions(micro_batches=2),
        )


@pytest.mark.parametrize("loss", ["cross_entropy", "nll"])
def test_a_micro_batch_whose_every_label_is_ignored_adds_no_loss(loss: str) -> None:
    """The batch has labels, its second half none: that micro-batch's torch mean is NaN (0/0);
    it adds 0, and each part's mean is weighted by its share of the batch's labels
    (losses.labelled_share), so the accumulated loss is the whole batch's mean."""
    module, x = mlp(), torch.randn(8, 6)
    if loss == "nll":
        module.append(nn.LogSoftmax(dim=1))
    labels = torch.tensor([0, 3, 1, 2, -100, -100, -100, -100])
    report = diagnose(
        to_torch_export(module, x),
        npz_bytes(x=x, target=labels),
        DiagnoseOptions(loss=loss, micro_batches=2),
    )
    assert report.micro_batches == 2
    fn = F.cross_entropy if loss == "cross_entropy" else F.nll_loss
    assert math.isnan(fn(module(x[4:]), labels[4:]).item())
    # the whole batch's loss, as without micro-batches
    assert_matches_torch(report, fn(module(x), labels), module)


# -- class probabilities -------------------------------------------------------------------------


def soft_labels(classes: torch.Tensor, count: int) -> torch.Tensor:
    """Label smoothing (0.1) of one-hot rows, mixed up pairwise (λ = 0.7): rows sum to 1."""
    smooth = F.one_hot(classes, count).float() * 0.9 + 0.1 / count
    return 0.7 * smooth + 0.3 * smooth.roll(1, dims=0)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_class_probabilities_give_torchs_cross_entropy(micro_batches: int) -> None:
    module, x = mlp(), torch.randn(8, 6)
    probs = soft_labels(torch.tensor([0, 3, 1, 2, 1, 0, 2, 3]), 4)
    model, batch = to_torch_export(module, x), npz_bytes(x=x, target=probs)
    options = DiagnoseOptions(loss="cross_entropy", micro_batches=micro_batches)
    report = diagnose(model, batch, options)
    assert report.loss.kind == "cross_entropy"
    assert_matches_torch(report, F.cross_entropy(module(x), probs), module)
    # without --loss, a floating target still defaults to mse (README)
    assert diagnose(model, batch, DiagnoseOptions()).loss.kind == "mse"


def test_a_teachers_softmax_is_read_as_torch_reads_it_on_dim_1() -> None:
    """[N, C, H, W] segmentation logits, a teacher's probabilities on dim 1 (distillation)."""
    torch.manual_seed(0)
    module, x = nn.Conv2d(3, 5, 3, padding=1), torch.randn(2, 3, 4, 4)
    probs = (torch.randn(2, 5, 4, 4) / 2.0).softmax(dim=1)
    report = diagnose(
        to_torch_export(module, x),
        npz_bytes(x=x, target=probs),
        DiagnoseOptions(loss="cross_entropy"),
    )
    assert_matches_torch(report, F.cross_entropy(module(x), probs), module)


def test_sequence_probabilities_are_read_on_the_vocabulary_axis() -> None:
    """[B, T, vocab] logits with [B, T, vocab] soft labels: rows over the vocabulary, the loss
    training code takes after flattening (dim 1 is time here)."""
    torch.manual_seed(0)
    module, x = nn.Linear(5, 7), torch.randn(4, 3, 5)
    probs = soft_labels(torch.randint(0, 7, (12,)), 7).reshape(4, 3, 7)
    report = diagnose(
        to_torch_export(module, x),
        npz_bytes(x=x, labels=probs),
        DiagnoseOptions(loss="cross_entropy", micro_batches=2),
    )
    expected = F.cross_entropy(module(x).reshape(-1, 7), probs.reshape(-1, 7))
    assert_matches_torch(report, expected, module)


def test_all_zero_probability_rows_count_in_the_mean_as_in_torch_and_are_noted() -> None:
    module, x = mlp(), torch.randn(8, 6)
    probs = soft_labels(torch.tensor([0, 3, 1, 2, 1, 0, 2, 3]), 4)
    probs[6:] = 0.0  # masked examples
    report = diagnose(
        to_torch_export(module, x),
        npz_bytes(x=x, target=probs),
        DiagnoseOptions(loss="cross_entropy"),
    )
    assert_matches_torch(report, F.cross_entropy(module(x), probs), module)
    (note,) = [n for n in report.notes if "rows of the class-probability target" in n]
    assert note.startswith("2 of 8 rows") and "0.75 × the mean over the other rows" in note


ONE_HOT = F.one_hot(torch.arange(8) % 4, 4).float()
MULTI_HOT = ONE_HOT + ONE_HOT.roll(1, 0)  # two labels per example: rows sum to 2


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (torch.tensor([0, 3, 1, 2, 1, 0, 2, 3]).float(), r"output's shape \[8, 4\], got \[8\]"),
        (torch.randn(8, 4), r"negative values \(smallest -"),  # a teacher's logits
        (torch.randn(8, 4).log_softmax(1), "negative values"),
        (torch.rand(8, 4), r"8 of 8 rows along dim 1 do not sum to 1"),  # unnormalised
        (MULTI_HOT, "bce_with_logits"),
        (torch.full((8, 4), math.nan), "NaN/Inf"),
    ],
)
def test_targets_that_are_no_class_probabilities_are_refused(
    target: torch.Tensor, message: str
) -> None:
    torch.manual_seed(0)
    module, x = mlp(), torch.randn(8, 6)
    with pytest.raises(BadInputError, match=message) as raised:
        diagnose(
            to_torch_export(module, x),
            npz_bytes(x=x, target=target),
            DiagnoseOptions(loss="cross_entropy"),
        )
    assert raised.value.is_client_error and "class probabilities" in str(raised.value)


def test_sequence_rows_that_sum_to_1_on_neither_axis_name_both() -> None:
    torch.manual_seed(0)
    module, x = nn.Linear(5, 7), torch.randn(4, 3, 5)
    with pytest.raises(BadInputError, match=r"dim 1 \(nor along the last axis, 2\)"):
        diagnose(
            to_torch_export(module, x),
            npz_bytes(x=x, target=torch.rand(4, 3, 7)),
            DiagnoseOptions(loss="cross_entropy"),
        )


def test_micro_batches_with_unevenly_ignored_labels_give_the_whole_batchs_gradients() -> None:
    """Three labels in the first half, one in the second: weighted by examples, each half
    would count as much; weighted by labels, the sum is the whole batch's mean."""
    module, x = mlp(), torch.randn(8, 6)
    labels = torch.tensor([0, 3, 1, -100, 2, -100, -100, -100])
    report = diagnose(
        to_torch_export(module, x),
        npz_bytes(x=x, target=labels),
        DiagnoseOptions(loss="cross_entropy", micro_batches=2),
    )
    assert_matches_torch(report, F.cross_entropy(module(x), labels), module)
