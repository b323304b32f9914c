"""Loss kinds and defaults (CONTRACT.md §2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from service.engine.losses import compute_loss, default_loss
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
        (FLOAT_TARGET, [5, 4], "mse"),
        (CLASSES, [5, 4], "cross_entropy"),
        (torch.zeros(5, 7, dtype=torch.long), [5, 4, 7], "cross_entropy"),  # per-position classes
        (torch.zeros(5, 4, dtype=torch.long), [5, 4], "mse"),  # not class-shaped
    ],
)
def test_defaults(target: torch.Tensor | None, shape: list[int], kind: str) -> None:
    assert default_loss(target, shape)[0] == kind


def test_target_loss_without_target_says_what_to_add() -> None:
    with pytest.raises(BadInputError, match="array named 'target'"):
        compute_loss("mse", [LOGITS], None)


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(BadInputError, match=r"\[5, 4\].*\[5, 3\]"):
        compute_loss("mse", [LOGITS], torch.rand(5, 3))


def test_class_loss_with_float_target_is_refused() -> None:
    with pytest.raises(BadInputError, match="integer class indices"):
        compute_loss("cross_entropy", [LOGITS], FLOAT_TARGET)


def test_out_of_range_class_is_a_user_error() -> None:
    with pytest.raises(BadInputError, match="does not fit"):
        compute_loss("cross_entropy", [LOGITS], torch.tensor([0, 9, 1, 2, 1]))
