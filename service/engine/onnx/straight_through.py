"""Straight-through estimators that an ONNX export wrote without their stop-gradient.

Training code writes a straight-through estimator as `x + (q - x).detach()`: the value of q (x
rounded, binarised, snapped to a codebook) with the gradient of x (Bengio et al. 2013; QAT,
binarised networks, VQ-VAE). ONNX has no stop-gradient, so both exporters drop the `detach`
and write `Add(x, Sub(q, x))` (an unoptimised dynamo export keeps an Identity named `detach`
between), whose gradient to x is 1 − 1 + ∂q/∂x: zero for a rounding, and every layer before
it would get none. The pattern's value is q itself, so nothing else writes it: it is computed
as `x + (q - x).detach()` again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from service.engine.graph import Node


def _x_plus_detached(x: torch.Tensor, difference: torch.Tensor) -> torch.Tensor:
    return x + difference.detach()


def _detached_plus_x(difference: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return difference.detach() + x


def straight_through_estimators(nodes: Sequence[Node], producers: dict[str, Node]) -> list[str]:
    """Give each `Add(x, Sub(q, x))` (either operand order of the Add) the stop-gradient on
    `q - x` that the export dropped. Returns the rewritten Adds' names."""
    rewritten: list[str] = []
    for node in nodes:
        if node.op_type != "Add" or node.domain != "" or len(node.inputs) != 2:
            continue
        for slot in (0, 1):
            x, difference = node.inputs[slot], node.inputs[1 - slot]
            sub = producers.get(difference)
            while sub is not None and sub.op_type == "Identity":  # the unoptimised `detach`
                sub = producers.get(sub.inputs[0])
            if (
                sub is not None
                and sub.op_type == "Sub"
                and len(sub.inputs) == 2
                and sub.inputs[1] == x
                and sub.inputs[0] != x
            ):
                node.fn = _x_plus_detached if slot == 0 else _detached_plus_x
                rewritten.append(node.name)
                break
    return rewritten
