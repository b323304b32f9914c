"""The loss the diagnosis differentiates (CONTRACT.md §2).

Kinds: `cross_entropy`, `nll` (the output is log-probabilities), `mse`, `l1`, `bce_with_logits`,
`bce` (the output is already a sigmoid's: probabilities in [0, 1]), `output_norm` (no target:
L = mean(y²) over every floating output, i.e. MSE against zero),
`model_output` (L = the model's first output, a scalar: a model that computes its own loss).
All losses are means over the batch, computed in float32 whatever the model's dtype.

Default when `--loss` is not given: an integer target and a class-shaped output → `cross_entropy`;
a floating target → `mse`; no target → `model_output` when the first floating output is a scalar
(Hugging Face's `model(input_ids, labels=labels).loss`), else `output_norm`. With several
outputs, target losses use the first.

Class axis of `cross_entropy` / `nll`: dim 1 as in `F.cross_entropy` (the target's shape is the
output's without dim 1: [N, C] / [N], [N, C, H, W] / [N, H, W]), else the last axis when the
target is the output without it: a sequence model's [B, T, vocab] logits with [B, T] labels,
which training code flattens before its loss. Targets of -100 are ignored (`ignore_index`, as in
torch and Hugging Face labels): a batch whose every target is -100 is refused
(`check_has_labels`, before any micro-batch split), and a micro-batch with none but -100 adds a
loss of 0 (torch's mean over no label is NaN), i.e. nothing to the full batch's sum; each
micro-batch is weighted by its share of the batch's labels (`labelled_share`), so the
accumulated loss is the whole batch's mean over its labels.

`cross_entropy` also takes a floating-point target of the output's shape: class probabilities
(label smoothing, mixup, a teacher's soft labels), as `F.cross_entropy` does. They are read on
dim 1, else on the last axis (a [B, T, vocab] output), whichever has rows that sum to 1; they
must be finite and ≥ 0, and every row must sum to 1 (within `_PROBABILITY_SUM_TOLERANCE`) or be
all zero (it adds no loss but counts in the mean, as in torch). Only an explicit `--loss
cross_entropy` reads them: the default for a floating target stays `mse`.

A model that ends in a softmax returns class probabilities, not logits: `cross_entropy` on them
would apply a second softmax (log_softmax(softmax(z))), a loss no one trains with, whose
gradients are an order of magnitude smaller than those of the loss such a model does train with,
the NLL of log(p). So when the loss is the default and the output's rows along the class axis
are probabilities (finite, ≥ 0, each summing to 1 within `_PROBABILITY_SUM_TOLERANCE`), the
default is `nll_of_log` instead: F.nll_loss of log(p), p clamped at `_LOG_FLOOR` (a softmax
that underflowed to 0 gives a large finite loss, not inf), with a note. Telling takes a look at
the output's values, which must not cost a host read of its own (measure.py moves everything to
the host once): the default for class indices is first `class_default`, computed on the device
as either loss, whichever the rows call for (`torch.where`), and the host learns which from
`output_checks` in the one transfer (`resolve_class_default`). A `--loss cross_entropy` given on
such an output is kept, with a note saying what to pass instead; so is a `--loss
bce_with_logits` on an output that is already a sigmoid's (`output_check_notes`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from service.errors import BadInputError, BatchError

LOSS_KINDS = (
    "cross_entropy",
    "nll",
    "mse",
    "l1",
    "bce_with_logits",
    "bce",
    "output_norm",
    "model_output",
)
# the NLL of log(output), for an output of class probabilities (module docstring); a default
# only, never given by --loss
NLL_OF_LOG = "nll_of_log"
# the class-index default until the host has seen the output: cross_entropy, or nll_of_log
# where its rows are probabilities, chosen on the device (module docstring)
CLASS_DEFAULT = "class_default"
_CLASS_LOSSES = ("cross_entropy", "nll", NLL_OF_LOG, CLASS_DEFAULT)
_LOG_FLOOR = 1e-12  # p clamped before its log: a probability that underflowed to 0
GIVEN_BY_USER = "given by --loss"  # the report's loss.reason when no default applied
IGNORE_INDEX = -100  # F.cross_entropy / nll_loss's default ignore_index, Hugging Face's labels
# class-probability rows sum to 1: float16/bfloat16-stored probabilities (relative rounding
# 2^-11 / 2^-8 per entry) stay within it, a multi-hot or unnormalised row does not
_PROBABILITY_SUM_TOLERANCE = 1e-2


def _numel(shape: Sequence[object]) -> int | None:
    """Elements of a shape whose sizes are all known, else None."""
    sizes = [d for d in shape if isinstance(d, int)]
    return math.prod(sizes) if len(sizes) == len(shape) else None


def _same_shape(expected: Sequence[object], actual: Sequence[object]) -> bool:
    """Equal where both sizes are known (a symbolic size, e.g. ONNX's "batch", matches any)."""
    return len(expected) == len(actual) and all(
        not isinstance(e, int) or not isinstance(a, int) or e == a
        for e, a in zip(expected, actual, strict=True)
    )


def class_axis(output_shape: Sequence[object], target_shape: Sequence[object]) -> int | None:
    """The output's class axis for class-index targets (module docstring), or None when the
    target's shape fits neither dim 1 nor the last axis. Dim 1 wins when both fit."""
    if len(output_shape) < 2:
        return None
    if _same_shape([output_shape[0], *output_shape[2:]], target_shape):
        return 1
    if _same_shape(output_shape[:-1], target_shape):
        return len(output_shape) - 1
    return None


def default_loss(
    target: torch.Tensor | None, output_shape: Sequence[object] | None
) -> tuple[str, str]:
    """(kind, reason) per CONTRACT.md §2. `output_shape` None means unknown yet."""
    if target is None and output_shape is not None and _numel(output_shape) == 1:
        return "model_output", (
            "the batch has no target array and the model returns a scalar: taken as the "
            "loss it computes itself"
        )
    if target is None:
        return "output_norm", "the batch has no target array"
    if target.dtype.is_floating_point:
        return "mse", "the target is floating point"
    if output_shape is None:
        return "cross_entropy", "integer target and a class-shaped output"
    axis = class_axis(output_shape, list(target.shape))
    if axis is not None and output_shape[axis] == 1:
        raise BadInputError(
            f"the target holds class indices but the output {list(output_shape)} has one "
            "class: cross-entropy over one class is 0 whatever the model does; for a binary "
            "classifier with one logit give a float target of the output's shape with "
            "--loss bce_with_logits (or --loss mse for a regression)"
        )
    if axis == 1 or (axis is not None and len(output_shape) == 2):
        return "cross_entropy", "integer target and a class-shaped output"
    if axis is not None:
        return "cross_entropy", "integer target and an output with the classes on its last axis"
    return "mse", (
        f"integer target {list(target.shape)} whose shape is not the output's "
        f"{list(output_shape)} without a class axis (dim 1 or the last)"
    )


def _probability_rows_on_device(y: torch.Tensor, axis: int) -> torch.Tensor:
    """A 0-d bool on `y`'s device: whether its rows along `axis` are class probabilities (a
    softmax's output): finite, ≥ 0, each summing to 1 within `_PROBABILITY_SUM_TOLERANCE`, as
    a class-probability target must (`probability_axis`). NaN compares false."""
    with torch.no_grad():
        y = y.detach().float()
        off = (y.sum(dim=axis) - 1).abs().amax()
        return (y.amin() >= 0) & (off <= _PROBABILITY_SUM_TOLERANCE)


def probability_rows(y: torch.Tensor, axis: int) -> bool:
    """`_probability_rows_on_device`, read on the host (one host read)."""
    if y.dim() < 2 or not y.numel() or not -y.dim() <= axis < y.dim():
        return False
    return bool(_probability_rows_on_device(y, axis))


# ops whose output may be class probabilities (a softmax; exp(z) / Σ exp(z) written out ends
# in a div): where the graph says the output comes from another op, its values are not checked
# (the check costs kernels on every pass, bench/overhead.py)
_PROBABILITY_OPS = frozenset({"softmax", "div"})


def _may_be(op: str, ops: frozenset[str]) -> bool:
    """Whether an output computed by `op` ("" where the graph does not tell) may be one of
    `ops`' and is worth a look at its values."""
    return not op or op in ops


def class_default(kind: str, target: torch.Tensor | None, op: str = "") -> str:
    """The default `kind` (`default_loss`) to run: `class_default` for class indices, whose
    output may turn out to be probabilities (module docstring). `op`: the canonical op that
    computes the output, where the graph tells ("" otherwise)."""
    integer = target is not None and not target.is_floating_point()
    if kind == "cross_entropy" and integer and _may_be(op, _PROBABILITY_OPS):
        return CLASS_DEFAULT
    return kind


def _binary_cross_entropy(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """F.binary_cross_entropy's mean, written out: torch's kernel asserts its input is in
    [0, 1], which on a GPU is a device-side assert that ends the process's CUDA context. Here
    each log is floored at `_LOG_FLOOR` (a saturated sigmoid's 0 or 1 gives a large finite
    loss, as torch's clamp of the log at -100 does), and an output outside [0, 1] is said in a
    note from `output_checks` instead."""
    log_p = p.clamp_min(_LOG_FLOOR).log()
    log_not_p = (1 - p).clamp_min(_LOG_FLOOR).log()
    return -(t * log_p + (1 - t) * log_not_p).mean()


def output_checks(
    kind: str, outputs: Sequence[torch.Tensor], target: torch.Tensor | None, op: str = ""
) -> torch.Tensor | None:
    """What the host must know of the output the loss reads, on the device for the one
    transfer: for a given cross_entropy on class indices, whether its rows are probabilities
    ([1.0] / [0.0]: `class_default` records it while computing the loss, `compute_loss`); for
    bce_with_logits, its [min, max]; for bce, its [min, max] always. None otherwise, and where
    `op` (`class_default`) says the output is no softmax's (sigmoid's)."""
    floats = [o for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()]
    if not floats or target is None or not floats[0].numel():
        return None
    y = floats[0]
    probabilities = kind in ("cross_entropy", CLASS_DEFAULT) and _may_be(op, _PROBABILITY_OPS)
    if probabilities and not target.is_floating_point():
        axis = class_axis(list(y.shape), list(target.shape))
        if axis is None:
            return None
        return _probability_rows_on_device(y, axis).float().reshape(1)
    if kind == "bce" or (kind == "bce_with_logits" and _may_be(op, frozenset({"sigmoid"}))):
        with torch.no_grad():
            return torch.stack(torch.aminmax(y.detach().float()))
    return None


def resolve_class_default(
    kind: str, reason: str | None, checks: Sequence[float] | None
) -> tuple[str, str | None]:
    """The loss `class_default` was, once `output_checks` are on the host: nll_of_log for
    probability rows, else cross_entropy. Other kinds are returned unchanged."""
    if kind != CLASS_DEFAULT:
        return kind, reason
    if checks and checks[0] > 0:
        return NLL_OF_LOG, (
            "integer target and an output of class probabilities (rows ≥ 0 summing to 1: the "
            "model ends in a softmax): the NLL of their log, as such a model trains"
        )
    return "cross_entropy", reason


def read_output(kind: str, floats: Sequence[torch.Tensor]) -> int:
    """Which of the floating-point outputs the loss reads: for `model_output` the first
    scalar one (a model returning `{"logits": ..., "loss": ...}` computes its loss second),
    else the first."""
    if kind == "model_output":
        return next((i for i, o in enumerate(floats) if o.numel() == 1), 0)
    return 0


def default_output_shape(
    target: torch.Tensor | None, outputs: Sequence[torch.Tensor]
) -> list[int] | None:
    """The shape `default_loss` judges: without a target a scalar output (the loss the model
    computes itself) wherever it is, else the first floating-point output's."""
    floats = [o for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()]
    if not floats:
        return None
    scalar = read_output("model_output", floats) if target is None else 0
    return list(floats[scalar].shape)


def compute_loss(
    kind: str,
    outputs: Sequence[torch.Tensor],
    target: torch.Tensor | None,
    probability_flags: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The scalar float32 loss; raises BadInputError naming what does not fit. For
    `class_default`, the device's choice (whether the rows are probabilities, a 0-d bool) is
    appended to `probability_flags` when given: measure.py reads it in its one transfer."""
    floats = [o for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()]
    if not floats:
        raise BadInputError("the model has no floating-point output to take a loss of")
    if kind == "output_norm":
        return torch.stack([o.float().square().mean() for o in floats]).sum()
    if kind == "model_output":
        read = floats[read_output(kind, floats)]
        if read.numel() != 1:
            raise BadInputError(
                f"loss 'model_output' takes the model's output as the loss, but no output is "
                f"a scalar (the first has shape {list(read.shape)}): use --loss output_norm "
                "or give a target"
            )
        return read.float().reshape(())
    probabilities_too = kind == CLASS_DEFAULT  # cross_entropy, or nll_of_log on probabilities
    if probabilities_too:
        kind = "cross_entropy"
    if target is None:
        raise BadInputError(
            f"loss {kind!r} needs a target: add an array named 'target' to the batch "
            "or use --loss output_norm"
        )
    y = floats[0].float()
    t = target.to(y.device)
    if t.dim() and y.dim() and t.shape[0] != y.shape[0]:
        raise TargetError(
            f"the target has {t.shape[0]} rows ({list(t.shape)}) but the output "
            f"{list(y.shape)} has {y.shape[0]}, one per example: give one target per example"
        )
    try:
        if kind == "cross_entropy" and t.is_floating_point():
            t = t.to(y.dtype)
            read_on = probability_axis(y, t)[0]
            if read_on != 1 and y.dim() > 1:
                y, t = y.movedim(read_on, 1), t.movedim(read_on, 1)
            return F.cross_entropy(y, t)
        if kind in _CLASS_LOSSES:
            if t.is_floating_point():
                raise BadInputError(
                    f"loss {kind!r} needs integer class indices as target, got "
                    f"{str(t.dtype).removeprefix('torch.')} (F.nll_loss takes no class "
                    "probabilities: use --loss cross_entropy on the model's logits for them)"
                )
            t = t.long()
            if kind == NLL_OF_LOG:  # class probabilities: their log is what nll_loss reads
                y = y.clamp_min(_LOG_FLOOR).log()
            axis = class_axis(list(y.shape), list(t.shape))
            if axis is not None and axis != 1:
                y = y.movedim(axis, 1)  # F.cross_entropy / nll_loss read classes on dim 1
            # torch's mean is the sum over the labels that are not -100 divided by their count
            # (bit for bit), which is 0/0 = NaN where there is none: a micro-batch whose labels
            # are all -100 adds 0 instead (a whole batch of them is refused by check_has_labels)
            if kind == "cross_entropy":
                total = F.cross_entropy(y, t, reduction="sum")
                if probabilities_too:  # chosen on the device: no host read
                    rows = _probability_rows_on_device(y, 1 if y.dim() > 1 else 0)
                    nll = F.nll_loss(y.clamp_min(_LOG_FLOOR).log(), t, reduction="sum")
                    total = torch.where(rows, nll, total)
                    if probability_flags is not None:
                        probability_flags.append(rows)
            else:
                total = F.nll_loss(y, t, reduction="sum")
            return total / (t != IGNORE_INDEX).sum().clamp(min=1).to(total.dtype)
        t = t.to(y.dtype)
        if t.shape != y.shape and t.numel() == y.numel():
            # the same values in another shape ([B] for a [B, 1] output): torch's loss would
            # broadcast them to [B, B] with only a warning, the classic bug; the target is at
            # fault whatever the loss
            raise TargetError(
                f"loss {kind!r} needs a target shaped like the output {list(y.shape)}, got "
                f"{list(t.shape)} with as many values: reshape the target to "
                f"{list(y.shape)}{_broadcast_text(kind, y, t)}"
            )
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
        if kind == "bce":
            return _binary_cross_entropy(y, t)
    except (RuntimeError, IndexError, ValueError) as exc:
        out_of_range = _class_indices_out_of_range(kind, y, target)
        if out_of_range:
            raise TargetError(out_of_range) from exc
        raise BadInputError(
            f"loss {kind!r} does not fit output {list(y.shape)} and target "
            f"{list(target.shape)}: {str(exc).splitlines()[0]}"
        ) from exc
    raise BadInputError(f"unknown loss {kind!r}; use one of {', '.join(LOSS_KINDS)}")


# losses that regress the output onto the target's values: their gradient, y − t (mse) or
# its sign (l1), is in the target's units, so a target far off the output's scale sets the
# gradient's scale (an unstandardised regression target)
REGRESSION_LOSSES = ("mse", "l1")
_SCALE_KEYS = ("target_mean", "target_std", "output_mean", "output_std")


def regression_scale_stats(
    kind: str, outputs: Sequence[torch.Tensor], target: torch.Tensor | None
) -> torch.Tensor | None:
    """[target mean, target std, output mean, output std] in float32 on the device (no host
    sync: `regression_scale` reads them after the passes), for a regression loss with a
    floating target; None otherwise. The output is the one `compute_loss` reads."""
    floats = [o for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()]
    if kind not in REGRESSION_LOSSES or target is None or not floats:
        return None
    with torch.no_grad():
        y = floats[0].detach().float()
        t = target.detach().to(y.device).float()
        if t.numel() < 2 or y.numel() < 2:
            return None
        t_std, t_mean = torch.std_mean(t, correction=0)
        y_std, y_mean = torch.std_mean(y, correction=0)
        return torch.stack([t_mean, t_std, y_mean, y_std])


def regression_scale(stats: torch.Tensor | None) -> dict[str, float] | None:
    """`regression_scale_stats` on the host, by name (Measurements.target_scale)."""
    if stats is None:
        return None
    return dict(zip(_SCALE_KEYS, (float(v) for v in stats.tolist()), strict=True))


def _broadcast_text(kind: str, y: torch.Tensor, t: torch.Tensor) -> str:
    """What torch's own loss would have done with the two shapes, where it broadcasts."""
    try:
        shape = torch.broadcast_shapes(y.shape, t.shape)
    except RuntimeError:
        return ""
    return f" (torch's {kind} would broadcast the two to {list(shape)}, with only a warning)"


class TargetError(BadInputError):
    """The target's values are wrong whatever the loss: changing --loss does not help."""


def _class_indices_out_of_range(kind: str, y: torch.Tensor, target: torch.Tensor) -> str:
    """What is wrong with class indices outside 0..C-1 and not -100, or '' (read only on the
    path where the loss already failed)."""
    if kind not in _CLASS_LOSSES or target.is_floating_point() or y.dim() < 2:
        return ""
    axis = class_axis(list(y.shape), list(target.shape))
    if axis is None:
        return ""
    classes = int(y.shape[axis])
    t = target.long()
    bad = t[((t < 0) & (t != IGNORE_INDEX)) | (t >= classes)]
    if not bad.numel():
        return ""
    shown = ", ".join(str(v) for v in bad.unique()[:5].tolist())
    return (
        f"the target's class indices must be 0..{classes - 1} (the output has {classes} "
        f"classes on axis {axis}) or {IGNORE_INDEX} (ignored): it holds {shown} "
        f"({bad.numel()} entr{'y' if bad.numel() == 1 else 'ies'} out of range)"
    )


def labelled_share(
    kind: str, part: torch.Tensor | None, whole: torch.Tensor | None, share: float
) -> float | torch.Tensor:
    """A micro-batch's weight in the accumulated loss: its `share` of the examples, or for a
    class loss on class indices its share of the labels that are not -100, so that the parts'
    means over their labels add up to the whole batch's (weighted by examples, a part of
    mostly -100 labels would count as much as a fully labelled one)."""
    if share == 1.0 or kind not in _CLASS_LOSSES or part is None or whole is None:
        return share
    if part.dtype.is_floating_point or part.dtype.is_complex:  # class probabilities
        return share
    # a 0-d tensor on the device: no host read before the one transfer (measure.py)
    labelled = (whole != IGNORE_INDEX).sum().clamp(min=1)
    return (part != IGNORE_INDEX).sum() / labelled


def check_has_labels(target: torch.Tensor, name: str = "target") -> None:
    """Refuse an integer target whose every entry is -100 (the ignored label): the loss would
    be a mean over no label, NaN, and every gradient 0. Checked on the whole batch (a
    micro-batch may have none, compute_loss)."""
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        return
    if target.numel() and bool((target == IGNORE_INDEX).all()):
        raise BatchError(
            f"every target is {IGNORE_INDEX} (the ignored label) in the batch's {name!r} "
            f"{list(target.shape)}: no example has a label to compute the loss on; give at "
            "least one class index"
        )


def probability_axis(y: torch.Tensor, t: torch.Tensor) -> tuple[int, int, int]:
    """(class axis, all-zero rows, rows) of a class-probability target `t` of `y`'s shape (module
    docstring): dim 1, else the last axis, the first whose rows all sum to 1, else the first
    whose rows sum to 1 or 0. One host read; raises BadInputError naming what to change."""
    if t.shape != y.shape:
        raise BadInputError(
            f"loss 'cross_entropy' reads a floating-point target as class probabilities, which "
            f"have the output's shape {list(y.shape)}, got {list(t.shape)}: give class indices "
            "as an integer array, or probabilities shaped like the output"
        )
    axes = [1] if y.dim() > 1 else [0]
    if y.dim() > 2:
        axes.append(y.dim() - 1)
    if not t.numel():
        return axes[0], 0, 0
    checks = [(~torch.isfinite(t)).sum(), t.min()]
    rows = []
    for axis in axes:
        sums = t.sum(dim=axis).flatten()
        off = ((sums - 1).abs() > _PROBABILITY_SUM_TOLERANCE) & (sums != 0)
        worst = sums[torch.where(off, (sums - 1).abs(), 0).argmax()]
        checks += [off.sum(), worst, (sums == 0).sum()]
        rows.append(sums.numel())
    host = torch.stack([c.float() for c in checks]).tolist()
    non_finite, smallest = int(host[0]), host[1]
    problem = (
        "loss 'cross_entropy' reads a floating-point target of the output's shape as class "
        "probabilities"
    )
    if non_finite:
        raise BadInputError(
            f"{problem}, but it holds {non_finite} NaN/Inf value(s): make it finite"
        )
    if smallest < 0:
        raise BadInputError(
            f"{problem}, but it holds negative values (smallest {smallest:.4g}): give "
            "probabilities (a softmax of a teacher's logits), or class indices as an integer array"
        )
    # an axis whose every row sums to 1 first: a one-hot [B, T, V] target whose tokens do not
    # repeat within a sequence also sums to 0 or 1 along T (dim 1), which is no class axis
    fits = [(k, axis) for k, axis in enumerate(axes) if not host[2 + 3 * k]]
    for k, axis in sorted(fits, key=lambda fit: host[4 + 3 * fit[0]] > 0):
        return axis, int(host[4 + 3 * k]), rows[k]
    off, worst = host[2:4]
    where = f"dim {axes[0]}" if len(axes) == 1 else f"dim 1 (nor along the last axis, {axes[-1]})"
    raise BadInputError(
        f"{problem}, but {int(off)} of {rows[0]} rows along {where} do not sum to 1 (one sums "
        f"to {worst:.4g}): normalise each row to sum to 1 (multi-label targets take --loss "
        "bce_with_logits)"
    )


# log-probabilities are ≤ 0 and each row's exp sums to 1 (logsumexp over the class axis = 0);
# these tolerances allow float32 rounding of a log_softmax, not a different quantity
_LOG_PROB_MAX = 1e-4
_LOGSUMEXP_TOLERANCE = 1e-3


def loss_input_notes(
    kind: str,
    outputs: Sequence[torch.Tensor],
    target: torch.Tensor | None,
    output_names: Sequence[str] = (),
) -> list[str]:
    """Notes for the report on what the loss reads: which output, where the model has several
    (`output_names`: the declared ones, in order), and whether it looks like what the loss
    expects (with `output_check_notes`, which read the one transfer's values)."""
    return (
        _first_output_notes(kind, outputs, output_names)
        + _ambiguous_class_axis_notes(kind, outputs, target)
        + _log_probability_notes(kind, outputs, target)
        + _zero_probability_notes(kind, outputs, target)
        + _soft_target_probability_notes(kind, outputs, target)
    )


def _ambiguous_class_axis_notes(
    kind: str, outputs: Sequence[torch.Tensor], target: torch.Tensor | None
) -> list[str]:
    """Class indices that fit the output's classes on dim 1 and on its last axis alike
    ([B, T, C] logits with [B, T] labels where T = C): read on dim 1, as F.cross_entropy
    does, which a token classifier did not mean."""
    floats = [o for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()]
    if kind not in _CLASS_LOSSES or target is None or target.is_floating_point() or not floats:
        return []
    shape, labels = list(floats[0].shape), list(target.shape)
    last = len(shape) - 1
    if len(shape) < 3 or class_axis(shape, labels) != 1:
        return []
    if not _same_shape(shape[:-1], labels):
        return []
    return [
        f"the target {labels} fits the output {shape} with the classes on dim 1 and on its "
        f"last axis ({last}) alike: read on dim 1, as F.cross_entropy does; if the classes are "
        "on the last axis (a token classifier's [batch, tokens, classes]), put them on dim 1 "
        "(output.transpose(1, -1)) or give a batch whose lengths differ from the class count"
    ]


def _first_output_notes(
    kind: str, outputs: Sequence[torch.Tensor], output_names: Sequence[str]
) -> list[str]:
    """Every loss but output_norm reads the first floating-point output alone: with several,
    the others take no part, and the layers that only feed them get no gradient (a finding
    says so). The user must know which output was meant."""
    floats = [
        (output_names[i] if i < len(output_names) else f"output {i}", o)
        for i, o in enumerate(outputs)
        if isinstance(o, torch.Tensor) and o.is_floating_point()
    ]
    if kind == "output_norm" or len(floats) < 2:
        return []
    read = read_output(kind, [o for _, o in floats])
    (name, first), others = floats[read], [n for k, (n, _) in enumerate(floats) if k != read]
    if kind == "model_output":  # the model computed it, from whatever it computed it from
        return [
            f"the loss is the model's own, its first scalar output {name!r}; its other "
            f"outputs ({', '.join(map(repr, others[:4]))}{', ...' if len(others) > 4 else ''}) "
            "are not added to it, and reach it only as far as the model computed it from them"
        ]
    which = "first floating-point output" if read == 0 else "first scalar output"
    return [
        f"the loss ({kind}) is of the model's {which}, {name!r} "
        f"{list(first.shape)}; its other outputs ({', '.join(map(repr, others[:4]))}"
        f"{', ...' if len(others) > 4 else ''}) take no part in it, and layers that feed only "
        "them get no gradient: to diagnose another output, export the model with that one first"
    ]


def _log_probability_notes(
    kind: str, outputs: Sequence[torch.Tensor], target: torch.Tensor | None
) -> list[str]:
    """`nll` reads log-probabilities, so raw logits (values > 0, or rows whose exp does not sum
    to 1) give a loss and gradients of a different objective. One host read, nll runs only."""
    if kind != "nll" or not outputs or outputs[0].dim() < 2 or not outputs[0].numel():
        return []
    y = outputs[0].detach().float()
    axis = class_axis(list(y.shape), list(target.shape)) if target is not None else None
    row_sums = torch.logsumexp(y, dim=axis or 1)
    peak, off = torch.stack([y.max(), (row_sums.abs() > _LOGSUMEXP_TOLERANCE).sum()]).tolist()
    rows = row_sums.numel()
    if peak <= _LOG_PROB_MAX and off == 0:
        return []
    if axis is not None and probability_rows(y, axis):
        return [
            f"--loss nll expects log-probabilities, but the model's output holds class "
            f"probabilities (rows ≥ 0 summing to 1 on axis {axis}: it ends in a softmax): leave "
            "--loss out (the default for class indices is then the NLL of log(p)), or end the "
            "model with log_softmax"
        ]
    return [
        f"--loss nll expects log-probabilities, but the model's output looks like logits "
        f"(largest value {peak:.3g}; {int(off)} of {rows} rows' exp does not sum to 1): use "
        "--loss cross_entropy, or end the model with log_softmax"
    ]


def _zero_probability_notes(
    kind: str, outputs: Sequence[torch.Tensor], target: torch.Tensor | None
) -> list[str]:
    """Class-probability rows that are all zero (masked positions) add no loss but count in
    F.cross_entropy's mean: accepted as in torch, and said, since every row so leaves no
    gradient at all."""
    floats = [o for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()]
    if kind != "cross_entropy" or target is None or not target.is_floating_point() or not floats:
        return []
    y = floats[0].detach().float()
    try:
        _, zero, rows = probability_axis(y, target.to(y.device, y.dtype))
    except BadInputError:
        return []  # compute_loss has said so
    if not zero:
        return []
    if zero == rows:
        return [
            f"every one of the {rows} rows of the class-probability target is all zero: the "
            "loss and every gradient are 0 (F.cross_entropy's mean over rows that add nothing); "
            "give each example's class probabilities"
        ]
    return [
        f"{zero} of {rows} rows of the class-probability target are all zero: as in torch, they "
        "add no loss but count in F.cross_entropy's mean, which is so "
        f"{(rows - zero) / rows:.3g} × the mean over the other rows"
    ]


def _soft_target_probability_notes(
    kind: str, outputs: Sequence[torch.Tensor], target: torch.Tensor | None
) -> list[str]:
    """cross_entropy with a class-probability target on an output of probabilities (the
    class-index case is `output_check_notes`'). compute_loss has read the target on the host
    already (`probability_axis`): one more read, these runs only."""
    floats = [o for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()]
    if kind != "cross_entropy" or target is None or not target.is_floating_point() or not floats:
        return []
    y = floats[0].detach().float()
    try:
        axis = probability_axis(y, target.detach().to(y.device, torch.float32))[0]
    except BadInputError:
        return []  # compute_loss says so
    return _explicit_cross_entropy_note(list(y.shape), axis) if probability_rows(y, axis) else []


def _explicit_cross_entropy_note(shape: list[int], axis: int | None) -> list[str]:
    where = f" on axis {axis}" if axis is not None else ""
    return [
        f"--loss cross_entropy expects logits, but the model's output {shape} holds class "
        f"probabilities (rows ≥ 0 summing to 1{where}: it ends in a softmax): cross_entropy "
        "applies a second softmax on top of them, whose gradients are much smaller than those "
        "of the loss such a model trains with; leave --loss out (the default for class indices "
        "is then the NLL of log(p)), or export the model without its final softmax"
    ]


def output_check_notes(
    asked: str,
    kind: str,
    shape: Sequence[int],
    target_shape: Sequence[int] | None,
    checks: Sequence[float] | None,
    op: str = "",
) -> list[str]:
    """Notes from `output_checks` (on the host): the nll_of_log default said; an output of
    probabilities under a given cross_entropy, or of a sigmoid under bce_with_logits, which
    apply their own softmax / sigmoid on top. `asked`: the kind before `resolve_class_default`,
    `kind`: after; `shape`: the read output's (first part's) shape, `target_shape` the target's;
    `op`: the canonical op computing that output where the graph tells ("sigmoid"), else ""."""
    if not checks:
        return []
    axis = class_axis(list(shape), list(target_shape)) if target_shape is not None else None
    if kind == NLL_OF_LOG and asked == CLASS_DEFAULT:
        return [
            f"the model's output holds class probabilities (rows ≥ 0 summing to 1 on axis "
            f"{axis}: it ends in a softmax), so the loss is the NLL of their log "
            f"(F.nll_loss(torch.log(p.clamp_min({_LOG_FLOOR:g})), target)), the loss such a "
            "model trains with; cross_entropy would apply a second softmax on top of them and "
            "shrink every gradient. Pass --loss to diagnose another loss"
        ]
    if asked == "cross_entropy" and checks[0] > 0:
        return _explicit_cross_entropy_note(list(shape), axis)
    if asked == "bce" and len(checks) == 2 and (checks[0] < 0 or checks[1] > 1):
        return [
            f"--loss bce expects probabilities in [0, 1], but the model's output {list(shape)} "
            f"ranges from {checks[0]:.3g} to {checks[1]:.3g}: these look like logits, and the "
            "loss (each log floored) is not the one such a model trains with; use --loss "
            "bce_with_logits"
        ]
    if asked != "bce_with_logits" or len(checks) < 2:
        return []
    low, high = checks[0], checks[1]
    sigmoid = op == "sigmoid"
    # the graph's op where known, else the values alone (a logit is rarely in (0, 1) throughout)
    inside = (sigmoid and low >= 0 and high <= 1) if op else (low > 0 and high < 1)
    if not inside:
        return []
    why = "its last op is a sigmoid" if sigmoid else "every value strictly between 0 and 1"
    return [
        f"--loss bce_with_logits expects logits, but the model's output {list(shape)} looks "
        f"like probabilities already ({why}; values {low:.3g} to {high:.3g}): the loss "
        "applies a second sigmoid on top of them and its gradients are not those of training; "
        "use --loss bce (binary cross-entropy on probabilities)"
    ]
