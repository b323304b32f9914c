"""Advice for a regression target far off the output's scale (detectors/target_scale.py):
standardise it, ranked before clipping and a lower learning rate, which only hide the cause."""

from __future__ import annotations

from typing import Any

from service.engine.detectors.profile import sig


def normalize_targets_reason(e: dict[str, Any]) -> str:
    """The rationale of `normalize_targets`, tied to the finding's `target_scale` evidence."""
    return (
        f"The {e['loss_kind']} loss (value {sig(e['loss'])}) compares an output of std "
        f"{sig(e['output_std'])} with targets of {sig(e['target_mean'])} ± "
        f"{sig(e['target_std'])}: its gradient ∂L/∂y is in the target's units, so every "
        f"gradient is scaled by the target ({sig(e['ratio'])}× the output's scale). "
        "Standardising the target ((t − mean) / std, with the training set's mean and std; "
        "predictions are then output × std + mean) removes the cause; clipping or a lower "
        "learning rate would only hide it."
    )


def normalize_targets_params(e: dict[str, Any]) -> dict[str, Any]:
    return {
        "target_mean": e["target_mean"],
        "target_std": e["target_std"],
        "loss_kind": e["loss_kind"],
    }


def exploding_cause(e: dict[str, Any]) -> str:
    """What an exploding finding's clipping bounds the updates against, named: 'while X is
    fixed'."""
    rules = e.get("rules") or []
    if e.get("target_scale"):
        return "the target is standardised (normalize_targets)"
    if e.get("axis") == "time":
        return "the recurrent weights' gain is fixed"
    if "depth_ratio" in rules or "depth_ratio_warning" in rules:
        return "the gain that compounds through the layers is fixed"
    if "weight_ratio" in rules:
        return "the gain between the first and the last layers is fixed"
    return "what makes grad/weight that large (the weights' or the loss's scale) is fixed"
