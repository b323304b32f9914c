"""Spectral normalisation's power iteration, which torch runs under no_grad.

`nn.utils.spectral_norm` and `nn.utils.parametrizations.spectral_norm` estimate a weight's
largest singular value in training mode by power iteration on two buffers, u and v, updated
under `torch.no_grad()`: σ = u·(W v) then passes W only the gradient u vᵀ (Miyato et al. 2018).
ONNX has no no_grad, so a dynamo export (optimize=False; the default optimizer folds the whole
normalised weight into a constant) writes the iteration as ordinary MatMul → ReduceL2 → Clip →
Div nodes, and the gradient would also flow through the iterates into W: 3.5 % off the
module's in the tests' GAN discriminator. Each normalisation x / max(‖x‖, ε) downstream of a u
or v buffer has its output detached again, which is what torch computes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from typing import Any

from service.engine.graph import Node

# the buffers each API registers next to the weight it normalises (`name` is usually `weight`):
# nn.utils.spectral_norm: `{name}_u`, `{name}_v` beside `{name}_orig`;
# nn.utils.parametrizations.spectral_norm: `parametrizations.{name}.0._u`, `._v` beside
# `parametrizations.{name}.original`
_LEGACY_BUFFER = re.compile(r"^(?P<stem>.*)_[uv]$")
_PARAMETRIZED_BUFFER = re.compile(r"^(?P<stem>(.*\.)?parametrizations\.[^.]+)\.0\._[uv]$")


def _iterate_buffers(buffers: Collection[str], parameters: Collection[str]) -> dict[str, str]:
    """The u and v buffers of spectral norms whose weight is one of `parameters`: buffer →
    weight."""
    found = {}
    for name in buffers:
        legacy, parametrized = _LEGACY_BUFFER.match(name), _PARAMETRIZED_BUFFER.match(name)
        if legacy and f"{legacy['stem']}_orig" in parameters:
            found[name] = f"{legacy['stem']}_orig"
        elif parametrized and f"{parametrized['stem']}.original" in parameters:
            found[name] = f"{parametrized['stem']}.original"
    return found


def _detached(fn: Callable[..., Any]) -> Callable[..., Any]:
    def detached_output(*args: Any) -> Any:
        return fn(*args).detach()

    return detached_output


def _is_detached(fn: Callable[..., Any]) -> bool:  # a Div on the paths of both u and v
    return getattr(fn, "__name__", "") == "detached_output"


def _ancestors(value: str, producers: dict[str, Node]) -> set[str]:
    seen: set[str] = set()
    stack = [value]
    while stack:
        name = stack.pop()
        node = producers.get(name)
        if node is None or name in seen:
            continue
        seen.add(name)
        stack.extend(i for i in node.inputs if i)
    return seen


def detach_power_iterations(
    nodes: Sequence[Node], buffers: Collection[str], parameters: Collection[str]
) -> list[str]:
    """Detach each normalised iterate (a Div whose divisor is computed from its own numerator)
    that depends on a spectral norm's u or v buffer. Returns the weights whose iteration was
    detached."""
    weights = _iterate_buffers(buffers, parameters)
    producers = {out: node for node in nodes for out in node.outputs if out}
    detached: dict[str, None] = {}
    for buffer, weight in weights.items():
        reached = {buffer}
        for node in nodes:  # graph order: an iterate's inputs are reached before it
            if not any(i in reached for i in node.inputs):
                continue
            if node.op_type == "Div" and node.inputs[0] == weight:
                continue  # W / σ: the normalised weight, where the iteration ends
            reached.update(o for o in node.outputs if o)
            if node.op_type == "Div" and node.domain == "" and len(node.inputs) == 2:
                numerator, divisor = node.inputs
                if numerator in _ancestors(divisor, producers) and not _is_detached(node.fn):
                    node.fn = _detached(node.fn)
                    detached[weight] = None
    return list(detached)


def power_iteration_note(weights: Sequence[str]) -> str:
    shown = ", ".join(weights[:3]) + (", …" if len(weights) > 3 else "")
    return (
        f"{len(weights)} spectrally normalised weight(s) ({shown}): the power iteration's "
        "normalised u and v are detached, as torch computes them under no_grad, so that "
        "σ = u·(W v) passes W the gradient u vᵀ only, as in training"
    )
