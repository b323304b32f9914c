"""Vanishing and exploding gradients, over depth and over time.

Judged on the activation-gradient profile (‖∂L/∂a‖ per layer), on weight gradients
(AUTOTRAINER's first/last ratio) AND on absolute scale (grad/weight), because each alone is blind
to a classic case: see the rules in thresholds.py.
"""

from __future__ import annotations

import math
from typing import Any

from service.engine.detectors.optypes import (
    LINEAR_LIKE,
    canonical_op,
    is_embedding,
    is_gated_rnn,
    is_normalization,
    is_recurrent,
    is_vanilla_rnn,
)
from service.engine.detectors.positions import (
    exploding_in_both,
    size_adjusted_profile,
    vanishing_in_both,
)
from service.engine.detectors.profile import (
    backward_factor,
    decay_phrase,
    depth_fit_phrase,
    first_last_ratio,
    growth_factor,
    ratio_phrase,
    reached_steps,
    sig,
    usable,
)
from service.engine.detectors.units import init_ratio, normalized_layers
from service.engine.gradient_cuts import SINGLE_ELEMENT_SOFTMAX
from service.engine.measurements import Measurements
from service.engine.report import Finding, LayerReport
from service.engine.sequences import ExampleSpan, spans_differ


def _ordered_layers(m: Measurements) -> list[LayerReport]:
    return sorted(m.layers, key=lambda layer: layer.depth)


def depth_profile(m: Measurements) -> tuple[list[str], list[float | None]]:
    depth = m.profiles.depth
    if depth.layers and any(usable(v) for v in depth.grad_norms):
        return list(depth.layers), list(depth.grad_norms)
    layers = [x for x in _ordered_layers(m) if x.activation_grad_norm is not None]
    return [x.name for x in layers], [x.activation_grad_norm for x in layers]


def _judged_grad_to_weight(layer: LayerReport, m: Measurements, normalized: set[str]) -> float:
    """grad/weight, over the weight He/Xavier would give where the layer's is smaller; for
    an embedding table, over nn.Embedding's N(0, 1) (a table at N(0, 0.02), CLIP's and
    BERT's, whose used rows get the whole gradient, is no explosion). A layer only a
    normalisation reads is scale-invariant: its gradient grows as its weight shrinks, so at
    r× the healthy scale grad/weight is 1/r² of the healthy one's (a conv at N(0, 0.02) before
    BatchNorm, Hugging Face's MobileNetV2 at init: 3.5e3, whose first step only grows the
    weight's norm; Arora et al. 2019, "auto rate-tuning by batch normalization")."""
    ratio = layer.grad_to_weight or 0.0
    scale = _embedding_scale(layer, m) if is_embedding(layer.op) else init_ratio(layer, m)
    if not scale:
        return ratio
    shrink = min(1.0, scale)
    return ratio * (shrink * shrink if layer.name in normalized else shrink)


def _embedding_scale(layer: LayerReport, m: Measurements) -> float | None:
    """The table's RMS over nn.Embedding's default std, 1."""
    shapes = {p.name: p.shape for p in m.parameters}
    numel = sum(math.prod(shapes[n]) for n in layer.params if n in shapes)
    if not numel or not layer.weight_norm:
        return None
    return layer.weight_norm / math.sqrt(numel)


# ops through which a parameter that is exactly zero passes no gradient back to their input:
# it multiplies the input (a weight matrix or kernel, a normalisation's gain, a ReZero α)
_MULTIPLYING_OPS = LINEAR_LIKE | {"mul"}


def _blocking_parameters(layer: LayerReport, m: Measurements) -> list[str]:
    """The layer's parameters that are exactly zero, multiply its input and get a gradient:
    a zero-initialised weight (ControlNet's zero convolution, LoRA's B, a ResNet block's last
    BatchNorm gain, ReZero's α, an STN localisation head) passes no gradient back while it is
    zero, and leaves zero after the first optimizer step. A bias is added, not multiplied: a
    zero one blocks nothing. A zero weight with no gradient of its own never leaves zero: it is
    no design, nothing unblocks it."""
    op = canonical_op(layer.op)
    if op not in _MULTIPLYING_OPS and not is_normalization(layer.op):
        return []
    shapes = {p.name: p for p in m.parameters}
    blocking = []
    for name in layer.params:
        p = shapes.get(name)
        if p is None or p.weight_norm != 0.0 or not usable(p.grad_norm):
            continue
        last = name.rsplit(".", 1)[-1].lower()
        if len(p.shape) >= 2 or ("bias" not in last and "::" not in name):
            blocking.append(name)
    return blocking


def zero_init_blocked(
    m: Measurements, names: list[str], norms: list[float | None]
) -> dict[str, list[str]]:
    """Layers with exactly zero ‖∂L/∂a‖ explained by a zero-initialised parameter downstream
    (→ its names): the first layer after them in the depth profile (execution order) whose
    ‖∂L/∂a‖ is not zero holds a blocking parameter (`_blocking_parameters`), the zero-gradient
    layers between are blocked by the same one. Measurements have no graph edges, so
    "downstream" is read from the order: a branch run in between (a nonzero layer between the
    zeros and the zero parameter) leaves the zeros unexplained, which errs towards reporting.
    A rounding that cuts the gradient (`m.gradient_cuts`) is another cause: not explained."""
    by_name = {x.name: x for x in m.layers}
    blocked: dict[str, list[str]] = {}
    pending: list[str] = []
    for name, norm in zip(names, norms, strict=True):
        if norm is None:
            continue
        if norm == 0.0:
            if name not in m.gradient_cuts:
                pending.append(name)
            else:
                pending = []
            continue
        layer = by_name.get(name)
        params = _blocking_parameters(layer, m) if layer is not None else []
        if params and pending:
            blocked.update({z: params for z in pending})
        pending = []
    return blocked


def _weight_layers(m: Measurements) -> list[LayerReport]:
    """Layers with weight gradients, normalisation layers left out (their gains are not weights
    in AUTOTRAINER's sense and their gradients follow a different scale), and so are layers
    with no weight matrix or kernel at all (a scalar temperature: CLIP's logit_scale, whose
    gradient is one number's)."""
    shapes = {p.name: p.shape for p in m.parameters}
    return [
        x
        for x in _ordered_layers(m)
        if x.grad_norm is not None
        and x.params
        and not is_normalization(x.op)
        and (not shapes or any(len(shapes.get(n, [0, 0])) >= 2 for n in x.params))
    ]


def depth_findings(m: Measurements, t: dict[str, float]) -> list[Finding]:
    names, norms = depth_profile(m)
    # layers a zero-initialised parameter downstream blocks at initialisation, by design: not
    # judged (an info finding says why), the rules run on the rest of the model
    blocked = zero_init_blocked(m, names, norms)
    if blocked:
        kept = [(n, v) for n, v in zip(names, norms, strict=True) if n not in blocked]
        names, norms = [n for n, _ in kept], [v for _, v in kept]
    ratio = first_last_ratio(norms) if len(names) >= 2 else None
    factor = backward_factor(norms)
    forward = growth_factor(norms)
    last = norms[-1] if norms else None
    rel = [(n, v / last) for n, v in zip(names, norms, strict=True) if usable(last) and usable(v)]  # type: ignore[operator]
    # layers whose ‖∂L/∂a‖ is exactly 0 (fp16 flushed it, or nothing reaches them): the
    # worst case of vanishing, named first; the fit and `rel` cannot use them
    zero = [n for n, v in zip(names, norms, strict=True) if v == 0.0 and usable(last)]
    start, ratio = _input_end(names, norms, ratio, rel, forward, t)
    # a change of tensor size (a mean over positions, an upsampling) is no change of gradient:
    # the depth-ratio rules hold only where the profile per position agrees (positions.py)
    sized = size_adjusted_profile(m, names, norms, start)

    wl = [x for x in _weight_layers(m) if x.name not in blocked]
    w_first, w_last = (wl[0], wl[-1]) if len(wl) >= 2 else (None, None)
    weight_ratio = None
    if w_first is not None and w_last is not None and usable(w_last.grad_norm):
        weight_ratio = (w_first.grad_norm or 0.0) / w_last.grad_norm  # type: ignore[operator]
    g2w = [(x.name, x.grad_to_weight) for x in wl if x.grad_to_weight is not None]
    # judged against a weight of healthy scale: a layer initialised far too small (a fresh
    # classifier at N(0, 0.02)) has a large grad/weight from its tiny weight, not from its
    # gradient (init_scale reports the weight)
    normalized = normalized_layers(m)
    g2w_judged = [
        (x.name, _judged_grad_to_weight(x, m, normalized)) for x in wl if x.grad_to_weight
    ]

    evidence: dict[str, Any] = {
        "axis": "depth",
        "depth_ratio": ratio,
        "depth_ratio_from": start,  # the profile's first layer, or a deeper branch's
        "per_layer_factor": factor,  # backwards (output → input) = 1 / growth_factor
        "growth_factor": forward,  # the depth profile's fit, input → output
        "zero_gradient_layers": zero,
        "layers_in_profile": len(names),
        "weight_ratio": weight_ratio,
        "first_weight_grad_norm": w_first.grad_norm if w_first else None,
        "last_weight_grad_norm": w_last.grad_norm if w_last else None,
        "max_grad_to_weight": max((v for _, v in g2w), default=None),
        "min_grad_to_weight": min((v for _, v in g2w), default=None),
    }
    if sized is not None:
        evidence["size_adjusted_depth_ratio"] = sized.ratio
        evidence["positions"] = sized.positions  # per example, the input end's and the last's
    findings: list[Finding] = []

    # --- vanishing -----------------------------------------------------------------------
    rules: list[str] = []
    if vanishing_in_both(ratio, sized, t["vanishing_profile_ratio"]):
        rules.append("depth_ratio")
    if (
        weight_ratio is not None
        and weight_ratio < t["vanishing_weight_ratio"]
        and (w_first.grad_norm or 0.0) < t["vanishing_first_grad_norm"]  # type: ignore[union-attr]
    ):
        rules.append("weight_ratio")
    if g2w and all(v < t["vanishing_grad_to_weight"] for _, v in g2w):
        rules.append("absolute_scale")
    severity = "error" if rules else None
    if not rules and vanishing_in_both(ratio, sized, t["vanishing_profile_ratio_warning"]):
        severity, rules = "warning", ["depth_ratio_warning"]
    if severity is None and any(n in m.gradient_cuts for n in zero):
        # layers inside the network with no gradient at all, whatever the ends of the profile
        # say (attention over one token between healthy layers): their weights never learn
        severity, rules = "warning", ["gradient_cut"]
    if severity is not None:
        if "absolute_scale" in rules:
            layers = [n for n, _ in sorted(g2w, key=lambda p: p[1])]
        else:
            cut = t["vanishing_profile_ratio_warning"]
            layers = zero + [n for n, r in sorted(rel, key=lambda p: p[1]) if r < cut]
            if not layers and w_last is not None and usable(w_last.grad_norm):
                layers = [
                    x.name
                    for x in sorted(wl, key=lambda x: x.grad_norm or 0.0)
                    if (x.grad_norm or 0.0) / w_last.grad_norm < cut  # type: ignore[operator]
                ]
        ev = {**evidence, "rules": rules, "one_step_drop": _one_step_drop(names, norms, ratio)}
        if blocked:
            ev["zero_init_blocked"] = blocked
        dead_heads = _dead_output_heads(m, g2w)
        if dead_heads:  # the cause is at the output end: named first
            layers = dead_heads + [n for n in layers if n not in dead_heads]
            ev["dead_output_layers"] = dead_heads
            msg = _dead_output_message(m, dead_heads)
        elif "absolute_scale" in rules:
            msg = (
                f"Gradients vanish at every depth: the largest grad/weight of any layer is "
                f"{sig(evidence['max_grad_to_weight'])}, so no layer would learn; check the "
                f"initialisation scale of {layers[0] if layers else 'the layers'}."
            )
        elif "depth_ratio" in rules or severity == "warning":
            shrinking = [n for n in layers if n not in zero]
            cut_layers = [n for n in zero if n in m.gradient_cuts]
            if cut_layers:
                rounding = m.gradient_cuts[cut_layers[0]]
                ev["gradient_cut"] = {**rounding, "layers": cut_layers}
                passes = f"on the way to the loss their output passes {rounding['op']} "
                if rounding.get("kind") == SINGLE_ELEMENT_SOFTMAX:
                    softmax = "softmax" in rounding["op"].lower()
                    over = "over an axis of one element" if softmax else "with one key"
                    why = (
                        f"({rounding['node']}) {over}, whose softmax is 1 whatever the scores: "
                        "attention over a single token gives its query and key projections "
                        "nothing to learn."
                    )
                else:
                    why = (
                        f"({rounding['node']}), whose derivative is zero everywhere; a rounding "
                        "trains only with a straight-through estimator (an exported "
                        "torch.autograd.Function keeps its forward only)."
                    )
                msg = f"No gradient reaches {_span(zero, names)} (‖∂L/∂a‖ = 0): {passes}{why}"
            elif zero:
                learn = (
                    f"; the next earliest ({', '.join(shrinking[:3])}) barely learn"
                    if shrinking
                    else ""
                )
                msg = (
                    f"Gradients vanish towards the input: {_span(zero, names)} get a gradient "
                    f"of norm 0 in float32 (‖∂L/∂a‖ = 0){learn}; {depth_fit_phrase(forward)}, "
                    f"‖∂L/∂a‖ at {start} is {ratio_phrase(ratio or 0.0)} of that at {names[-1]}."
                )
            else:
                msg = (
                    f"Gradients vanish towards the input: ‖∂L/∂a‖ at {start} is {sig(ratio)} "
                    f"of that at {names[-1]} ({decay_phrase(ev)}){_branch(start, names)}; "
                    f"the layers with the least gradient ({', '.join(layers[:3])}) barely learn."
                )
        else:
            msg = (
                f"Weight gradients vanish towards the input: {w_first.name} gets "  # type: ignore[union-attr]
                f"{sig(weight_ratio)} of the gradient of {w_last.name} "  # type: ignore[union-attr]
                f"(norm {sig(w_first.grad_norm)}); the earliest layers barely learn."  # type: ignore[union-attr]
            )
        if blocked:
            msg += f" (Not counted: at initialisation {_zero_init_text(blocked)}, by design.)"
        findings.append(
            Finding(
                kind="vanishing_gradients",
                severity=severity,
                message=msg,
                layers=layers,
                evidence=ev,
            )
        )
    elif blocked:
        findings.append(_zero_init_finding(blocked, evidence))

    # --- exploding -----------------------------------------------------------------------
    rules = []
    compounding = factor is not None and factor > t["exploding_layer_factor"]
    ratio_cut, layer_cut = t["exploding_profile_ratio"], t["exploding_layer_factor"]
    if exploding_in_both(ratio, compounding, sized, ratio_cut, layer_cut):
        rules.append("depth_ratio")
    if weight_ratio is not None and weight_ratio > t["exploding_profile_ratio"]:
        rules.append("weight_ratio")
    if any(v > t["exploding_grad_to_weight"] for _, v in g2w_judged):
        rules.append("absolute_scale")
    severity = "error" if rules else None
    warn = t["exploding_profile_ratio_warning"]
    if not rules and exploding_in_both(ratio, compounding, sized, warn, layer_cut):
        severity, rules = "warning", ["depth_ratio_warning"]
    if severity is not None:
        if rules == ["absolute_scale"]:
            cut = t["exploding_grad_to_weight"]
            layers = [n for n, v in sorted(g2w_judged, key=lambda p: -p[1]) if v > cut]
        else:
            cut = t["exploding_profile_ratio_warning"]
            layers = [n for n, r in sorted(rel, key=lambda p: -p[1]) if r > cut]
            if not layers:
                layers = [n for n, _ in sorted(g2w, key=lambda p: -p[1])][:3]
        if "depth_ratio" in rules or rules == ["depth_ratio_warning"]:
            msg = (
                f"Gradients explode towards the input: ‖∂L/∂a‖ grows ×{sig(factor)} per layer "
                f"backwards ({depth_fit_phrase(forward)}), {sig(ratio)}× larger at {names[0]} "
                f"than at {names[-1]}."
            )
        elif "weight_ratio" in rules:
            msg = (
                f"Weight gradients explode towards the input: {w_first.name} gets "  # type: ignore[union-attr]
                f"{sig(weight_ratio)}× the gradient of {w_last.name}."  # type: ignore[union-attr]
            )
        else:
            msg = (
                f"Gradients are too large for the weights: grad/weight reaches "
                f"{sig(dict(g2w)[layers[0]])} in {layers[0]}, one SGD step would "
                f"overwrite the layer."
            )
        findings.append(
            Finding(
                kind="exploding_gradients",
                severity=severity,
                message=msg,
                layers=layers,
                evidence={**evidence, "rules": rules},
            )
        )
    return findings


def _dead_output_heads(m: Measurements, g2w: list[tuple[str, float]]) -> list[str]:
    """The output layers whose ReLU-like activation is zero for every unit and example, when
    every weight gradient of the model is exactly zero: nothing passes back through a dead
    output activation, so no layer gets any gradient, whatever its initialisation (a
    regression head ending in ReLU whose bias keeps every prediction negative)."""
    if not g2w or any(v != 0.0 for _, v in g2w):
        return []
    return [
        x.name
        for x in _ordered_layers(m)
        if x.output_head and (x.activation_stats.dead_fraction or 0.0) >= 1.0
    ]


def _dead_output_message(m: Measurements, heads: list[str]) -> str:
    by_name = {x.name: x for x in m.layers}
    act = by_name[heads[0]].activation_stats.activation or "activation"
    which = heads[0] if len(heads) == 1 else f"{', '.join(heads[:-1])} and {heads[-1]}"
    return (
        f"No layer gets any gradient: the {act} at the output of {which} is zero for every "
        f"unit and every example of the batch (its pre-activations are all negative: look at "
        f"the bias and weights of {heads[0]}), and a dead {act} passes no gradient back, so "
        "every gradient of the model is 0 (see dead_units)."
    )


def _zero_init_text(blocked: dict[str, list[str]]) -> str:
    """'the zero-initialised P (exactly 0) blocks the gradient to L1, L2; …'"""
    by_params: dict[tuple[str, ...], list[str]] = {}
    for layer, params in blocked.items():
        by_params.setdefault(tuple(params), []).append(layer)
    order = list(blocked)
    parts = []
    for group, layers in list(by_params.items())[:3]:
        verb = "blocks" if len(group) == 1 else "block"
        parts.append(
            f"{' and '.join(group)} (exactly 0) {verb} the gradient to {_span(layers, order)}"
        )
    if len(by_params) > 3:
        parts.append(f"{len(by_params) - 3} more zero-initialised parameters block it likewise")
    return "the zero-initialised " + "; ".join(parts)


def _zero_init_finding(blocked: dict[str, list[str]], evidence: dict[str, Any]) -> Finding:
    """Layers that get no gradient only because a zero-initialised parameter downstream blocks
    it: by design (an identity or zero start), nothing to fix: info."""
    params = list(dict.fromkeys(p for ps in blocked.values() for p in ps))
    one = len(params) == 1
    message = (
        f"At initialisation {_zero_init_text(blocked)}, by design: a zero start (an identity "
        "or zero branch: a zero convolution, LoRA's B, a zero-initialised gain or output "
        f"layer). {'It gets' if one else 'They get'} a gradient of {'its' if one else 'their'} "
        f"own, so after the first optimizer step {'it is' if one else 'they are'} no longer "
        f"zero and these layers get gradient; do not re-initialise {'it' if one else 'them'}."
    )
    return Finding(
        kind="vanishing_gradients",
        severity="info",
        message=message,
        layers=list(blocked),
        evidence={
            **evidence,
            "rules": ["zero_init"],
            "zero_init_blocked": blocked,
            "zero_init_parameters": params,
        },
    )


def fp32_weight_ratio(m: Measurements) -> float | None:
    """An fp16 run's first/last weight-gradient ratio in its fp32 reference pass (the same
    layers as the depth rules' weight ratio), None without one."""
    if not m.fp32_grad_norms:
        return None
    layers = _weight_layers(m)
    if len(layers) < 2:
        return None

    def norm(layer: LayerReport) -> float:
        return math.sqrt(sum(m.fp32_grad_norms.get(p, 0.0) ** 2 for p in layer.params))

    last = norm(layers[-1])
    return norm(layers[0]) / last if last > 0 else None


def _input_end(
    names: list[str],
    norms: list[float | None],
    ratio: float | None,
    rel: list[tuple[str, float]],
    forward: float | None,
    t: dict[str, float],
) -> tuple[str | None, float | None]:
    """The profile's input end and its ratio to the last layer. Its first layer, unless the
    fit shows the gradient shrinking layer after layer towards the input (growing by more
    than `exploding_layer_factor` per layer towards the output) and some layer gets less than
    it, from which the profile rises step by step (not in one jump: a dip into a parallel
    branch, an attention's q_proj, is no input end): a model with two branches lists a side
    input's one layer first, while the first layer of a deep branch beside it may get next to
    nothing."""
    first = names[0] if names else None
    if forward is None or forward <= t["exploding_layer_factor"] or not rel:
        return first, ratio
    least, least_ratio = min(rel, key=lambda pair: pair[1])
    if ratio is not None and least_ratio >= ratio:
        return first, ratio
    k = names.index(least)
    if _one_step_drop(names[k:], norms[k:], least_ratio) is not None:
        return first, ratio
    return least, least_ratio


def _branch(start: str | None, names: list[str]) -> str:
    if not names or start == names[0]:
        return ""
    return f"; {names[0]}, first in the profile, is on another branch and gets more"


def _one_step_drop(
    names: list[str], norms: list[float | None], ratio: float | None
) -> dict[str, Any] | None:
    """The cut between neighbouring layers that holds most of a vanishing profile's drop (a
    head with tiny weights above a flat body: no compounding decay), or None. A cut's drop
    is the largest ‖∂L/∂a‖ below it over the smallest above it, so a dip into a parallel
    branch (an attention's q_proj) is none."""
    kept = [(n, v) for n, v in zip(names, norms, strict=True) if v is not None and usable(v)]
    if len(kept) < 2 or not ratio or ratio >= 1:
        return None
    values = [v for _, v in kept]
    below = [max(values[: k + 1]) for k in range(len(values) - 1)]
    above = [min(values[k + 1 :]) for k in range(len(values) - 1)]
    drop, cut = min((b / a, k) for k, (b, a) in enumerate(zip(below, above, strict=True)))
    if drop >= 1 or math.log(drop) > 0.5 * math.log(ratio):
        return None
    return {"below": kept[cut + 1][0], "factor": drop}


def _span(chosen: list[str], order: list[str]) -> str:
    """`layers.0–layers.2` when the layers are consecutive in `order`, else a list, its first
    three and a count past four (the finding's `layers` has them all)."""
    positions = sorted(order.index(n) for n in chosen)
    if len(chosen) >= 3 and positions == list(range(positions[0], positions[-1] + 1)):
        return f"{order[positions[0]]}–{order[positions[-1]]}"
    if len(positions) > 4:
        shown = ", ".join(order[p] for p in positions[:3])
        return f"{shown} and {len(positions) - 3} more layers"
    return ", ".join(order[p] for p in positions)


def time_findings(m: Measurements, t: dict[str, float]) -> list[Finding]:
    """Only for models with a recurrent layer: a rank-3 input of a convolution or a transformer
    also has a per-position gradient profile, but no gradient path through time steps, so a
    first/last ratio there says which positions matter, not that gradients vanish."""
    findings: list[Finding] = []
    recurrent = bool(m.recurrent_layers) or any(is_recurrent(op) for op in m.op_types)
    if not recurrent:
        return findings
    ops = [*m.op_types, *(x.op for x in m.layers)]
    # gated units (LSTM/GRU) decay at initialisation too, but their gates can learn to keep
    # the state; only a vanilla RNN has no such path: error for it, warning for gated ones
    gated_only = any(is_gated_rnn(op) for op in ops) and not any(is_vanilla_rnn(op) for op in ops)
    vanishing_severity = "warning" if gated_only else "error"
    profiles = m.profiles.time
    examples = [*m.time_examples, *[[]] * (len(profiles) - len(m.time_examples))]
    for prof, spans in zip(profiles, examples, strict=False):
        norms, unreached = reached_steps(list(prof.grad_norms))
        ratio = first_last_ratio(norms)
        per_example = _per_example_time(spans, t["vanishing_time_ratio"])
        if per_example is not None:
            ratio = per_example["per_example_ratio"]
        if ratio is None:
            continue
        factor = backward_factor(norms)
        last = norms[-1]
        horizon = _summed_horizon(norms, t["vanishing_time_ratio"])
        steps_phrase = f"the first of {len(norms)} steps"
        last_phrase = "the last"
        if per_example is not None:
            factor, horizon = per_example["per_step_factor"], per_example["horizon_steps"]
            lengths = per_example["valid_lengths"]
            steps_phrase = (
                f"an example's first step (the median over {lengths['examples']} examples of "
                f"{lengths['min']}–{lengths['max']} steps with gradient)"
            )
            last_phrase = "its last"
        evidence: dict[str, Any] = {
            "axis": "time",
            "input": prof.input,
            "tensor": prof.tensor,  # the input itself, or a token input's embedding output
            "sequence_axis": prof.axis,
            "steps": len(norms),
            "time_ratio": ratio,
            "per_step_factor": factor,
            "horizon_steps": horizon,
            "first_step_grad_norm": norms[0],
            "last_step_grad_norm": last,
            "unreached_last_steps": unreached,  # not read by the loss: left out of the ratio
        }
        if per_example is not None:
            # the batch-summed profile's own ratio, which mixes the lengths (profiles.time)
            evidence["batch_time_ratio"] = first_last_ratio(norms)
            evidence.update(per_example)
        layers = list(m.recurrent_layers)
        if ratio < t["vanishing_time_ratio"]:
            findings.append(
                Finding(
                    kind="vanishing_gradients",
                    severity=vanishing_severity,
                    message=(
                        f"Gradients vanish over time: ‖∂L/∂x_t‖ of input {prof.input!r} at "
                        f"{steps_phrase} is {ratio_phrase(ratio)} of that at {last_phrase} "
                        f"(×{sig(factor)} per step); steps more than {horizon} back from "
                        f"{last_phrase} get under {sig(t['vanishing_time_ratio'])} of its "
                        f"gradient, so what they carry is barely learned."
                    ),
                    layers=layers,
                    evidence=evidence,
                )
            )
        elif ratio > t["exploding_time_ratio"]:
            findings.append(
                Finding(
                    kind="exploding_gradients",
                    severity="error",
                    message=(
                        f"Gradients explode over time: ‖∂L/∂x_t‖ of input {prof.input!r} at "
                        f"{steps_phrase} is {sig(ratio)}× that at {last_phrase} "
                        f"(×{sig(factor)} per step back)."
                    ),
                    layers=layers,
                    evidence=evidence,
                )
            )
    return findings


def _summed_horizon(norms: list[float | None], vanishing: float) -> int:
    """Steps back from the last whose gradient stays at least `vanishing` of the last's."""
    last = norms[-1]
    horizon = 0
    for v in reversed(norms):
        if not (usable(v) and usable(last) and v / last >= vanishing):  # type: ignore[operator]
            break
        horizon += 1
    return horizon


def _log_median(values: list[float]) -> float:
    """The median of positive values, the two middle ones' geometric mean for an even count."""
    logs = sorted(math.log(v) if v > 0 else -math.inf for v in values)
    mid = len(logs) // 2
    if len(logs) % 2:
        return math.exp(logs[mid])
    return math.exp((logs[mid - 1] + logs[mid]) / 2) if math.isfinite(logs[mid - 1]) else 0.0


def _per_example_time(spans: list[ExampleSpan], vanishing: float) -> dict[str, Any] | None:
    """The time ratio of a batch whose examples reach different steps (padding or a mask,
    `sequences.spans_differ`), read per example; None for a batch whose examples all reach
    the same steps, judged on the summed profile as before.

    The batch-summed profile's first/last ratio mixes the lengths: its last steps hold only the
    longest examples' gradients, its first step every example's, and a short example spreads a
    masked mean over fewer steps, so each of its steps carries more. Each example is read over
    its own steps instead, from its first step with gradient to its last (first/last, the
    direction the summed check uses), and the examples are combined by their median (in log
    space: ratios multiply): a finding then holds for the typical example of the batch, and one
    odd example (a very short one, whose ratio is near 1, or one outlier) does not decide it,
    as it would the geometric mean. Examples with fewer than two steps with gradient, or a
    non-finite gradient at either end, tell no ratio and are left out."""
    if not spans_differ(spans):
        return None
    kept = [
        s
        for s in spans
        if s.steps >= 2 and math.isfinite(s.first) and math.isfinite(s.last) and s.last > 0
    ]
    if not kept:
        return None
    ratios = [s.first / s.last for s in kept]
    # per step back: the ratio's (steps − 1)-th root, per example
    factors = [r ** (1 / (s.steps - 1)) for r, s in zip(ratios, kept, strict=True)]
    factor = _log_median(factors)
    lengths = sorted(s.steps for s in spans if s.start <= s.end)
    if 0 < factor < 1:  # steps back from the last whose gradient stays above `vanishing`
        horizon = min(max(lengths), int(math.log(vanishing) / math.log(factor)) + 1)
    else:
        horizon = 0 if factor == 0 else max(lengths)
    return {
        "per_example_ratio": _log_median(ratios),
        "per_step_factor": factor,
        "horizon_steps": horizon,
        "example_ratios": {
            "min": min(ratios),
            "median": _log_median(ratios),
            "max": max(ratios),
            "examples": len(ratios),
        },
        "valid_lengths": {
            "min": lengths[0],
            "median": lengths[len(lengths) // 2],
            "max": lengths[-1],
            "examples": len(lengths),
        },
    }
