"""Loss kinds and defaults (CONTRACT.md §2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from service.engine.losses import class_axis, compute_loss, default_loss
from service.errors import BadInputError

torch.manual_seed(0)
LOGITS = torch.randn(5, 4)
CLASSES = torch.tensor([0, 3, 1, 2, 1])
FLOAT_TARGET = torch.rand(5, 4)


@pytest.mark.parametrize(
    ("kind", "target", "expected"),
    [
        ("cross_entropy", CLASSES, F.cross_entropy(LOGITS, CLASSES)),
        ("nll", CLASSES, F.nll_loss(LOGITS.log_softmax(1), CLASSES)),
        ("mse", FLOAT_TARGET, F.mse_loss(LOGITS, FLOAT_TARGET)),
        ("l1", FLOAT_TARGET, F.l1_loss(LOGITS, FLOAT_TARGET)),
        ("bce_with_logits", FLOAT_TARGET, F.binary_cross_entropy_with_logits(LOGITS, FLOAT_TARGET)),
        ("output_norm", None, LOGITS.square().mean()),
    ],
)
def test_each_kind_equals_torch(
    kind: str, target: torch.Tensor | None, expected: torch.Tensor
) -> None:
    output = LOGITS.log_softmax(1) if kind == "nll" else LOGITS
    assert torch.allclose(compute_loss(kind, [output], target), expected)


def test_fp16_outputs_give_a_float32_loss() -> None:
    loss = compute_loss("mse", [LOGITS.half()], FLOAT_TARGET)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize(
    ("target", "shape", "kind"),
    [
        (None, [5, 4], "output_norm"),
        (None, [], "model_output"),  # the model returns its own loss
        (None, [1], "model_output"),
        (None, ["batch"], "output_norm"),  # size unknown: not a scalar for sure
        (FLOAT_TARGET, [5, 4], "mse"),
        (CLASSES, [5, 4], "cross_entropy"),
        (torch.zeros(5, 7, dtype=torch.long), [5, 4, 7], "cross_entropy"),  # per-position classes
        (torch.zeros(5, 4, dtype=torch.long), [5, 4], "mse"),  # not class-shaped
    ],
)
def test_defaults(target: torch.Tensor | None, shape: list[int | str], kind: str) -> None:
    assert default_loss(target, shape)[0] == kind


def test_model_output_is_the_models_own_scalar_loss() -> None:
    own = torch.tensor(2.5, requires_grad=True)
    loss = compute_loss("model_output", [own, LOGITS], None)
    loss.backward()
    assert loss.item() == 2.5 and own.grad is not None and own.grad.item() == 1.0
    with pytest.raises(
        BadInputError, match=r"no output is a scalar \(the first has shape \[5, 4\]\).*output_norm"
    ):
        compute_loss("model_output", [LOGITS], None)


def test_target_loss_without_target_says_what_to_add() -> None:
    with pytest.raises(BadInputError, match="array named 'target'"):
        compute_loss("mse", [LOGITS], None)


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(BadInputError, match=r"\[5, 4\].*\[5, 3\]"):
        compute_loss("mse", [LOGITS], torch.rand(5, 3))


def test_class_loss_with_float_target_is_refused_unless_class_probabilities() -> None:
    """cross_entropy reads a float target of the output's shape as class probabilities (as
    F.cross_entropy does), so rows that do not sum to 1 and float class indices are refused;
    nll takes no probabilities."""
    with pytest.raises(BadInputError, match="do not sum to 1"):
        compute_loss("cross_entropy", [LOGITS], FLOAT_TARGET)
    with pytest.raises(BadInputError, match="class indices as an integer array"):
        compute_loss("cross_entropy", [LOGITS], CLASSES.float())
    with pytest.raises(BadInputError, match=r"integer class indices.*--loss cross_entropy"):
        compute_loss("nll", [LOGITS.log_softmax(1)], FLOAT_TARGET.softmax(1))
    probs = FLOAT_TARGET.softmax(1)
    expected = F.cross_entropy(LOGITS, probs)
    assert torch.equal(compute_loss("cross_entropy", [LOGITS], probs), expected)


def test_out_of_range_class_is_a_user_error() -> None:
    with pytest.raises(BadInputError, match=r"must be 0\.\.3 .* it holds 9"):
        compute_loss("cross_entropy", [LOGITS], torch.tensor([0, 9, 1, 2, 1]))


SEQUENCE_LOGITS = torch.randn(2, 5, 7)  # [batch, time, vocabulary]
TOKENS = torch.randint(0, 7, (2, 5))


@pytest.mark.parametrize("kind", ["cross_entropy", "nll"])
def test_classes_on_the_last_axis_of_a_sequence_output(kind: str) -> None:
    """A language model's [B, T, V] logits with [B, T] labels: the loss training code takes
    after flattening (dim 1 is time here, not the classes)."""
    output = SEQUENCE_LOGITS.log_softmax(-1) if kind == "nll" else SEQUENCE_LOGITS
    flat = output.reshape(-1, 7), TOKENS.reshape(-1)
    expected = F.cross_entropy(*flat) if kind == "cross_entropy" else F.nll_loss(*flat)
    assert torch.allclose(compute_loss(kind, [output], TOKENS), expected)


def test_labels_of_minus_100_are_ignored_as_in_torch() -> None:
    labels = TOKENS.clone()
    labels[:, :2] = -100  # Hugging Face's padding / prompt labels
    expected = F.cross_entropy(SEQUENCE_LOGITS.reshape(-1, 7), labels.reshape(-1))
    assert torch.allclose(compute_loss("cross_entropy", [SEQUENCE_LOGITS], labels), expected)


def test_dim_1_wins_when_both_axes_fit() -> None:
    logits, target = torch.randn(2, 3, 3), torch.randint(0, 3, (2, 3))
    assert class_axis(list(logits.shape), list(target.shape)) == 1
    expected = F.cross_entropy(logits, target)
    assert torch.allclose(compute_loss("cross_entropy", [logits], target), expected)


def test_sequence_labels_default_to_cross_entropy_and_say_why() -> None:
    kind, reason = default_loss(TOKENS, [2, 5, 7])
    assert kind == "cross_entropy" and "last axis" in reason
    kind, reason = default_loss(TOKENS, [2, 6, 7])
    assert kind == "mse" and "[2, 5]" in reason and "[2, 6, 7]" in reason


def test_a_default_that_does_not_fit_names_the_default_and_the_option() -> None:
    """Integer labels shaped like no class axis of the output: the default (mse) is refused
    with a message that says it was a default, why, and which option chooses another."""
    from service.engine import diagnose
    from service.engine.options import DiagnoseOptions
    from tests.support.export import to_torch_export
    from tests.unit.engine.measure_support import npz_bytes

    x, labels = torch.randn(4, 6), torch.randint(0, 3, (4, 2))
    model = to_torch_export(torch.nn.Linear(6, 3), x)
    with pytest.raises(BadInputError) as raised:
        diagnose(model, npz_bytes(x=x, target=labels), DiagnoseOptions())
    message = str(raised.value)
    assert "'mse' is the default here" in message and "--loss" in message
    assert "[4, 2]" in message and "[4, 3]" in message
