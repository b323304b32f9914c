"""The loss the diagnosis differentiates (CONTRACT.md §2).

Kinds: `cross_entropy`, `nll` (the output is log-probabilities), `mse`, `l1`, `bce_with_logits`,
`output_norm` (no target: L = mean(y²) over every floating output, i.e. MSE against zero).
All losses are means over the batch, computed in float32 whatever the model's dtype.

Default when `--loss` is not given: an integer target and a class-shaped output (the target's
shape is the output's without dim 1) → `cross_entropy`; a floating target → `mse`; no target →
`output_norm`. With several outputs, target losses use the first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from service.errors import BadInputError

LOSS_KINDS = ("cross_entropy", "nll", "mse", "l1", "bce_with_logits", "output_norm")
_CLASS_LOSSES = ("cross_entropy", "nll")


def _class_shaped(output_shape: Sequence[object], target_shape: Sequence[object]) -> bool:
    if len(output_shape) < 2:
        return False
    expected = [output_shape[0], *output_shape[2:]]
    return len(expected) == len(target_shape) and all(
        not isinstance(o, int) or not isinstance(t, int) or o == t
        for o, t in zip(expected, target_shape, strict=True)
    )


def default_loss(
    target: torch.Tensor | None, output_shape: Sequence[object] | None
) -> tuple[str, str]:
    """(kind, reason) per CONTRACT.md §2. `output_shape` None means unknown yet."""
    if target is None:
        return "output_norm", "the batch has no target array"
    if target.dtype.is_floating_point:
        return "mse", "the target is floating point"
    if output_shape is None or _class_shaped(output_shape, list(target.shape)):
        return "cross_entropy", "integer target and a class-shaped output"
    return "mse", "integer target whose shape is not the output's without the class axis"


def compute_loss(
    kind: str, outputs: Sequence[torch.Tensor], target: torch.Tensor | None
) -> torch.Tensor:
    """The scalar float32 loss; raises BadInputError naming what does not fit."""
    floats = [o for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()]
    if not floats:
        raise BadInputError("the model has no floating-point output to take a loss of")
    if kind == "output_norm":
        return torch.stack([o.float().square().mean() for o in floats]).sum()
    if target is None:
        raise BadInputError(
            f"loss {kind!r} needs a target: add an array named 'target' to the batch "
            "or use --loss output_norm"
        )
    y = floats[0].float()
    t = target.to(y.device)
    try:
        if kind in _CLASS_LOSSES:
            if t.is_floating_point():
                raise BadInputError(
                    f"loss {kind!r} needs integer class indices as target, got {t.dtype}"
                )
            t = t.long()
            if kind == "cross_entropy":
                return F.cross_entropy(y, t)
            return F.nll_loss(y, t)
        t = t.to(y.dtype)
        if t.shape != y.shape:
            raise BadInputError(
                f"loss {kind!r} needs a target shaped like the output {list(y.shape)}, "
                f"got {list(t.shape)}"
            )
        if kind == "mse":
            return F.mse_loss(y, t)
        if kind == "l1":
            return F.l1_loss(y, t)
        if kind == "bce_with_logits":
            return F.binary_cross_entropy_with_logits(y, t)
    except (RuntimeError, IndexError) as exc:
        raise BadInputError(
            f"loss {kind!r} does not fit output {list(y.shape)} and target "
            f"{list(target.shape)}: {str(exc).splitlines()[0]}"
        ) from exc
    raise BadInputError(f"unknown loss {kind!r}; use one of {', '.join(LOSS_KINDS)}")


# log-probabilities are ≤ 0 and each row's exp sums to 1 (logsumexp over the class axis = 0);
# these tolerances allow float32 rounding of a log_softmax, not a different quantity
_LOG_PROB_MAX = 1e-4
_LOGSUMEXP_TOLERANCE = 1e-3


def loss_input_notes(kind: str, outputs: Sequence[torch.Tensor]) -> list[str]:
    """Notes for the report when the model's output does not look like what the loss expects:
    `nll` reads log-probabilities, so raw logits (values > 0, or rows whose exp does not sum to
    1) give a loss and gradients of a different objective. One host read, nll runs only."""
    if kind != "nll" or not outputs or outputs[0].dim() < 2 or not outputs[0].numel():
        return []
    y = outputs[0].detach().float()
    row_sums = torch.logsumexp(y, dim=1)
    peak, off = torch.stack([y.max(), (row_sums.abs() > _LOGSUMEXP_TOLERANCE).sum()]).tolist()
    rows = row_sums.numel()
    if peak <= _LOG_PROB_MAX and off == 0:
        return []
    return [
        f"--loss nll expects log-probabilities, but the model's output looks like logits "
        f"(largest value {peak:.3g}; {int(off)} of {rows} rows' exp does not sum to 1): use "
        "--loss cross_entropy, or end the model with log_softmax"
    ]
