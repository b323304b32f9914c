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


# -- which output, which axis ----------------------------------------------------------------------


class Tagger(nn.Module):
    """[B, T] tokens → [B, T, classes] logits (a language model / token classifier)."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.e, self.o = nn.Embedding(40, 8), nn.Linear(8, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.e(ids)))


def test_one_hot_probabilities_of_a_sequence_are_read_on_the_vocabulary_axis() -> None:
    """A one-hot [B, T, V] target whose tokens do not repeat in a sequence also sums to 0 or 1
    along T (dim 1), which was taken as the class axis (loss 0.36 against torch's 3.80)."""
    module, ids = Tagger(40), torch.arange(21).reshape(3, 7)
    probs = F.one_hot((ids * 3) % 40, 40).float()  # no repeat within a sequence
    report = diagnose(
        to_torch_export(module, ids),
        npz_bytes(ids=ids, target=probs),
        DiagnoseOptions(loss="cross_entropy"),
    )
    logits = module(ids)
    assert_matches_torch(report, F.cross_entropy(logits.flatten(0, 1), probs.flatten(0, 1)), module)


class ArgmaxFirst(nn.Module):
    """Returns (argmax, logits, aux): the loss reads the first floating-point output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.aux = nn.Linear(6, 5), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.fc(x)
        return logits.argmax(-1), logits, self.aux(x)


def test_the_default_loss_is_chosen_from_the_output_the_loss_reads() -> None:
    """It was chosen from the integer argmax output (mse, then refused)."""
    module, x = ArgmaxFirst(), torch.randn(8, 6)
    labels = torch.arange(8) % 5
    report = diagnose(to_torch_export(module, x), npz_bytes(x=x, target=labels), DiagnoseOptions())
    assert report.loss.kind == "cross_entropy"
    assert report.loss.value == pytest.approx(F.cross_entropy(module(x)[1], labels).item())


class OwnLossSecond(nn.Module):
    """Computes its own loss from a `labels` input and returns it after the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.tagger = Tagger(30)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.tagger(ids)
        return {"logits": logits, "loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten())}


def test_a_scalar_loss_output_after_the_logits_is_the_models_own_loss() -> None:
    """Without a target the first scalar output is the loss the model computes (the output
    norm of the logits was taken instead, silently: 13.0 against the model's 3.59)."""
    module = OwnLossSecond()
    ids, labels = torch.arange(24).reshape(4, 6) % 40, torch.arange(24).reshape(4, 6) % 30
    report = diagnose(
        to_torch_export(module, (ids, labels)),
        npz_bytes(ids=ids, labels=labels),
        DiagnoseOptions(),
    )
    assert report.loss.kind == "model_output"
    assert any(
        "the loss is the model's own, its first scalar output 'loss'" in n for n in report.notes
    )
    assert_matches_torch(report, module(ids, labels)["loss"], module)


def test_labels_that_fit_dim_1_and_the_last_axis_alike_get_a_note() -> None:
    module, ids = Tagger(6), torch.arange(24).reshape(4, 6) % 40  # T = classes = 6
    labels = torch.arange(24).reshape(4, 6) % 6
    report = diagnose(
        to_torch_export(module, ids), npz_bytes(ids=ids, target=labels), DiagnoseOptions()
    )
    assert any("on dim 1 and on its last axis (2) alike" in n for n in report.notes)


def test_class_indices_for_an_output_of_one_class_are_refused() -> None:
    """Cross-entropy over one class is 0 whatever the model does: the report was a zero loss
    and zero gradients everywhere."""
    torch.manual_seed(0)
    module, x = nn.Linear(6, 1), torch.randn(8, 6)
    with pytest.raises(BadInputError, match="one class: cross-entropy over one class is 0"):
        diagnose(
            to_torch_export(module, x),
            npz_bytes(x=x, target=torch.zeros(8, dtype=torch.long)),
            DiagnoseOptions(),
        )


def test_class_indices_out_of_range_say_the_valid_range() -> None:
    """torch's "Target 7 is out of bounds" with a hint to change --loss, which cannot help."""
    torch.manual_seed(0)
    module, x = nn.Linear(6, 5), torch.randn(8, 6)
    labels = torch.tensor([0, 1, 7, 2, -1, 3, 4, -100])
    with pytest.raises(BadInputError) as raised:
        diagnose(to_torch_export(module, x), npz_bytes(x=x, target=labels), DiagnoseOptions())
    message = str(raised.value)
    assert "must be 0..4 (the output has 5 classes on axis 1) or -100 (ignored)" in message
    assert "it holds -1, 7 (2 entries out of range)" in message
    assert "--loss" not in message


def test_a_target_with_the_outputs_values_in_another_shape_says_to_reshape_it() -> None:
    """[8] against a [8, 1] output: torch's mse would broadcast them to [8, 8]; changing
    --loss cannot help, reshaping the target does."""
    torch.manual_seed(0)
    module, x = nn.Linear(6, 1), torch.randn(8, 6)
    with pytest.raises(BadInputError) as raised:
        diagnose(
            to_torch_export(module, x), npz_bytes(x=x, target=torch.randn(8)), DiagnoseOptions()
        )
    message = str(raised.value)
    assert "reshape the target to [8, 1]" in message and "broadcast the two to [8, 8]" in message
    assert "--loss" not in message


@pytest.mark.parametrize("loss", [None, "cross_entropy", "mse"])
def test_a_target_with_fewer_rows_than_the_batch_is_refused_as_such(loss: str | None) -> None:
    """With --loss cross_entropy torch's ValueError escaped as an internal error (exit 3); by
    default the message was about mse's shapes and suggested --loss."""
    torch.manual_seed(0)
    module, x = nn.Linear(6, 5), torch.randn(8, 6)
    target = torch.arange(6) % 5 if loss != "mse" else torch.randn(6, 5)
    with pytest.raises(BadInputError, match=r"the target has 6 rows .* one per example"):
        diagnose(
            to_torch_export(module, x), npz_bytes(x=x, target=target), DiagnoseOptions(loss=loss)
        )


class Contrastive(nn.Module):
    """CLIP's in-batch loss: logits [B, B] between two towers, labels arange(B)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.a(x), dim=-1) @ F.normalize(self.b(y), dim=-1).T * 10


def test_micro_batches_of_an_in_batch_loss_say_why_the_labels_no_longer_fit() -> None:
    x, y = torch.randn(8, 6), torch.randn(8, 6)
    model = to_torch_export(Contrastive(), (x, y))
    batch = npz_bytes(x=x, y=y, target=torch.arange(8))
    assert diagnose(model, batch, DiagnoseOptions()).loss.kind == "cross_entropy"
    with pytest.raises(BadInputError, match=r"in-batch contrastive .* --micro-batches 1"):
        diagnose(model, batch, DiagnoseOptions(micro_batches=2))
