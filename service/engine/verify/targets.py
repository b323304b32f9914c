"""`normalize_targets` on a copy: the batch's regression target standardised, (t − mean) / std
over the batch, which is what the fix does with the training set's statistics; the model is
unchanged, so a new pass shows whether the target's scale was the cause."""

from __future__ import annotations

import math

import torch

from service.engine.measurements import Subject
from service.engine.verify.transforms import NotApplicable, copy_subject


def standardized_target(subject: Subject) -> tuple[str, Subject]:
    """(what was done, a copy of `subject` whose target is standardised)."""
    target = subject.target
    if target is None:
        raise NotApplicable("the batch has no target to standardise")
    values = target.detach().float()
    std, mean = (float(v) for v in torch.std_mean(values, correction=0))
    if not (math.isfinite(std) and math.isfinite(mean)) or std == 0.0:
        raise NotApplicable("the target is constant or not finite: no scale to divide by")
    copy_ = copy_subject(subject)
    copy_.target = (values - mean) / std
    return f"standardised the target on this batch: (t − {mean:.4g}) / {std:.4g}", copy_
