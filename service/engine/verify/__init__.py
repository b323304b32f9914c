"""Fix verification (CONTRACT.md §5): apply a recommendation's transform to a COPY of the
Subject, measure again on the same batch, run the detectors, and record the before/after
figures of the findings it addresses in `Recommendation.verified`.

    verify_recommendations(recommendations, findings, m, subject, options) -> same list, filled

What each fix does here:
- replace_activation: swap the sigmoid/tanh (or ReLU) nodes in the ObservableGraph, and when the
  recommendation says so re-initialise the weights before them with He (`params.init_weights`,
  the tensors its snippet lists; biases kept). An
  output activation is swapped only when a dead_units finding it addresses names its layer (a
  dead ReLU output head); a frozen layer nothing trainable is upstream of keeps its own.
- reinitialize_weights: re-initialise the named parameters (He / Xavier / zero bias).
- guard_numerics: clamp the input of the op that produced the first NaN/Inf; a log of a
  softmax's output becomes log_softmax of the softmax's input instead (transforms.guard_node).
- clip_gradients: no new pass: the same gradients scaled by the clip coefficient (this is what
  clip_grad_norm_ does), so `before`/`after` show the update norm unclipped and clipped;
  `resolved` stays None with a `reason` (one pass cannot show what clipping does over training,
  as for lower_learning_rate).
- straight_through_estimator: the rounding that cuts the gradient keeps its value and passes
  the gradient on (x + (round(x) − x).detach()), then a new pass.
- recalibrate_quantizers: max calibration of every fake quantiser on the batch, widening only,
  in execution order (quantizers.widen_to_cover), then a new pass.
- normalize_targets: the regression target standardised over the batch, (t − mean) / std, on a
  copy (verify/targets.py), then a new pass: the model is unchanged.
- loss_scaling / use_bf16: one plain backward of the scaled loss, and the share of gradient
  entries that would underflow in fp16 (resp. bf16) recounted.
- add_normalization, add_residual_connections, use_gated_recurrent_unit, lower_learning_rate:
  not applied; `reason` says why (new layers need training / one pass has no learning rate).

`resolved` = none of the addressed findings is present after the fix (same kind and axis) AND,
for a fix of dead units / saturation, the vanishing gradient they cause through their layers is
gone too (judged under its own key; `reason` gives the depth ratio left; when the new activation
has no dead / saturated fraction to measure, every vanishing gradient of the run is judged) AND
the fixed copy shows no error that was not one before (a clamp that removes a NaN but zeroes the
gradient of the clamped entries makes gradients vanish: not resolved). `after` lists what the
fix brought: `new_errors` / `new_warnings` (kinds) and `new_findings` (kind, severity, axis,
layers, message), a finding being new when no finding of the same kind and axis was there
before at that severity or worse; `reason` says which new error kept it from `resolved`. A
rewrite that computes the same function (log(softmax) → log_softmax) brings nothing of its own:
what its finite gradients show (large gradients of extreme logits) was there before, hidden by
the NaN/Inf, and is listed as `revealed_findings` instead, without costing `resolved`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any

import torch

from service.engine.advice.evidence import softmax_feeding
from service.engine.detectors import detect
from service.engine.detectors.frozen import trained_part
from service.engine.detectors.optypes import RELU_LIKE, SATURATING
from service.engine.first_pass import COMPUTES_IN_FP16
from service.engine.gradient_cuts import straight_through
from service.engine.measurements import Measurements, Subject
from service.engine.options import DiagnoseOptions
from service.engine.quantizers import widen_to_cover
from service.engine.report import SEVERITY_RANK, Finding, Recommendation, Verification
from service.engine.stats import FP16_MAX, FP16_TINY
from service.engine.verify.figures import (
    described,
    figures,
    key_of,
    new_findings,
    same_finding,
    summary,
)
from service.engine.verify.targets import standardized_target
from service.engine.verify.transforms import (
    NotApplicable,
    copy_subject,
    guard_node,
    layer_nodes,
    reinitialize,
    swap_activations,
)
from service.errors import GradhealthError, first_line

__all__ = ["verify_recommendations"]

BF16_TINY = 2.0**-133  # smallest bf16 subnormal

_NOT_AUTOMATIC = {
    "add_normalization": "adds layers whose parameters must be trained; not applied",
    "add_residual_connections": "changes the architecture (which blocks get shortcuts is a "
    "design choice); not applied",
    "use_gated_recurrent_unit": "replaces the recurrent layer by one with new, untrained gate "
    "parameters; not applied",
    "lower_learning_rate": "one gradient pass has no learning rate to change; the effect shows "
    "only over training steps",
    "attend_over_more_tokens": "changes the input resolution or the architecture; not applied",
}


# origins guarded in turn when verifying guard_numerics (one per block of a repeated op)
MAX_GUARDED_NODES = 8

_CLIP_REASON = (
    "one gradient pass cannot show clipping's effect: it bounds the size of each update "
    "(figures: total gradient norm and grad/weight before and after clipping), while the "
    "gradient's profile through the layers is unchanged by design; whether training stays "
    "stable shows only over training steps"
)


def verify_recommendations(
    recommendations: list[Recommendation],
    findings: list[Finding],
    m: Measurements,
    subject: Subject,
    options: DiagnoseOptions,
) -> list[Recommendation]:
    m = trained_part(m)  # the findings' own view: what training updates
    for rec in recommendations:
        rec.verified = _verify(rec, findings, m, subject, options)
    return recommendations


def _verify(
    rec: Recommendation,
    findings: list[Finding],
    m: Measurements,
    subject: Subject,
    options: DiagnoseOptions,
) -> Verification:
    if rec.fix in _NOT_AUTOMATIC:
        return Verification(applied=False, reason=_NOT_AUTOMATIC[rec.fix])
    addressed = [findings[i] for i in rec.addresses if isinstance(i, int) and i < len(findings)]
    kinds: set[str] = {str(f.kind) for f in addressed}
    exact = False  # the fix computes the same function (log_softmax for log∘softmax)
    try:
        if rec.fix == "guard_numerics":
            transform, after_m, exact = _guarded(rec, subject, options)
        else:
            transform, after_m = _apply(rec, m, subject, options, addressed)
    except NotApplicable as exc:
        return Verification(applied=False, reason=str(exc))
    except (RuntimeError, ValueError, GradhealthError) as exc:
        # the diagnosis stands without its verification; say what went wrong with the copy
        return Verification(
            applied=False, reason=f"re-measuring the fixed copy failed: {first_line(exc)}"
        )
    after_m = trained_part(after_m)
    # a vanishing gradient through the dead / saturated layers is their consequence: the fix
    # must clear it too, whichever recommendation it was listed under
    caused = _consequences(addressed, findings, m)
    judged_kinds = kinds | {str(f.kind) for f in caused}
    if kinds & _BLOCKING_KINDS:  # what a dead / saturated unit costs: the gradient's flow
        judged_kinds.add("vanishing_gradients")
    before: dict[str, Any] = {"figures": figures(m, judged_kinds)}
    after: dict[str, Any] = {"figures": figures(after_m, judged_kinds)}
    # a figure the new activation does not have (LeakyReLU has no exact zero region): the
    # finding's absence shows nothing by itself, so every vanishing gradient of the run is
    # judged, the verdict resting on the gradient's flow
    unmeasurable = _unmeasurable(before["figures"], after["figures"], kinds)
    if unmeasurable:
        caused += [
            f
            for f in findings
            if f.kind == "vanishing_gradients" and not any(f is x for x in [*addressed, *caused])
        ]
    if rec.fix == "clip_gradients":
        # what one pass can show: the update clip_grad_norm_ lets through, before and after;
        # whether training then stays stable shows only over steps, so no resolved either way
        return Verification(
            applied=True,
            transform=transform,
            before=before,
            after=after,
            resolved=None,
            reason=_CLIP_REASON,
        )
    after_findings = detect(after_m, options.thresholds)
    gone = True
    for f in addressed:
        match = same_finding(f, after_findings)
        key = key_of(f)
        before[key] = summary(f)
        after[key] = summary(match)
        gone = gone and match is None
    remaining: list[tuple[Finding, Finding]] = []  # (consequence before, still there after)
    for f in caused:
        match = same_finding(f, after_findings)
        before[key_of(f)] = summary(f)
        after[key_of(f)] = summary(match)
        if match is not None and SEVERITY_RANK[match.severity] >= SEVERITY_RANK[f.severity]:
            remaining.append((f, match))
    new = new_findings(after_findings, findings, addressed + caused)
    if exact and new:
        # the same function with exact gradients cannot bring a finding of its own: what the
        # now finite values show was there before, hidden by the NaN/Inf
        after["revealed_findings"] = [described(f) for f in new]
        new = []
    errors = [f for f in new if f.severity == "error"]
    warnings = [f for f in new if f.severity == "warning"]
    if errors:
        after["new_errors"] = [f.kind for f in errors]
    if warnings:
        after["new_warnings"] = [f.kind for f in warnings]
    if new:
        after["new_findings"] = [described(f) for f in new]
    # resolved: what it addresses is gone and it brings no error of its own
    resolved = gone and not errors and not remaining
    reason = None
    if gone and remaining:
        reason = (
            "the addressed finding(s) are gone, but the vanishing gradient they caused "
            "remains: "
            + "; ".join(
                _remaining_text(f, g, before["figures"], after["figures"]) for f, g in remaining
            )
        )
    elif gone and unmeasurable and not errors:
        ratio = after["figures"].get("depth_ratio")
        reason = (
            f"{', '.join(unmeasurable)} cannot be measured for the new activation (it has "
            "no exact zero / saturated region), so that finding's absence shows nothing by "
            "itself; judged by the gradient's flow: no vanishing gradient error after the fix"
            + (f" (depth ratio {ratio:.3g})" if ratio is not None else "")
        )
    if gone and errors:
        reason = (f"{reason}; " if reason else "") + (
            "the addressed finding(s) are gone, but the fixed copy shows new error(s): "
            + "; ".join(f"{key_of(f)}: {f.message}" for f in errors)
        )
        if _gradients_were_non_finite(m) and any(f.kind in _PROFILE_KINDS for f in errors):
            reason += (
                " (the original pass's gradients were non-finite, so its gradient profile "
                "could not be compared)"
            )
    if resolved and after.get("revealed_findings"):
        reason = (
            "log_softmax computes the same function as log(softmax) with exact gradients; "
            "what the finite gradients now show was there before, hidden by the NaN/Inf: "
            + "; ".join(
                f"{x['kind']}" + (f"[{x['axis']}]" if "axis" in x else "") + f": {x['message']}"
                for x in after["revealed_findings"]
            )
        )
    return Verification(
        applied=True,
        transform=transform,
        before=before,
        after=after,
        resolved=resolved,
        reason=reason,
    )


_PROFILE_KINDS = frozenset({"vanishing_gradients", "exploding_gradients"})
# findings whose consequence is a vanishing gradient through their layers (a dead ReLU passes
# no gradient, a saturated sigmoid/tanh almost none)
_BLOCKING_KINDS = frozenset({"dead_units", "saturation"})
# the figure that says whether the blocking finding is there (figures.py)
_BLOCKING_FIGURES = {"dead_units": "max_dead_fraction", "saturation": "max_saturated_fraction"}


def _consequences(
    addressed: list[Finding], findings: list[Finding], m: Measurements
) -> list[Finding]:
    """The vanishing_gradients findings of the same run that the addressed dead units /
    saturation cause and that the recommendation does not address itself: those on the time
    axis that name one of their layers, those through the depth whose layers lie at or before
    the deepest blocking layer (the gradient of a layer passes every layer after it)."""
    blocking = [f for f in addressed if f.kind in _BLOCKING_KINDS]
    if not blocking:
        return []
    names = {n for f in blocking for n in f.layers}
    depth = {x.name: x.depth for x in m.layers}
    deepest = max((depth[n] for n in names if n in depth), default=None)
    out = []
    for f in findings:
        if f.kind != "vanishing_gradients" or any(f is a for a in addressed):
            continue
        if names & set(f.layers) or (
            f.evidence.get("axis", "depth") == "depth"
            and deepest is not None
            and any(n in depth and depth[n] <= deepest for n in f.layers)
        ):
            out.append(f)
    return out


def _unmeasurable(before: dict[str, Any], after: dict[str, Any], kinds: set[str]) -> list[str]:
    """The addressed blocking figures measured before the fix and not after: the new
    activation has no exact zero (LeakyReLU) / saturated region, so that figure is absent, which
    by itself shows nothing."""
    return [
        key
        for kind, key in _BLOCKING_FIGURES.items()
        if kind in kinds and before.get(key) is not None and after.get(key) is None
    ]


def _remaining_text(
    f: Finding, after_f: Finding, before: dict[str, Any], after: dict[str, Any]
) -> str:
    text = f"{key_of(f)} is still {'an' if after_f.severity == 'error' else 'a'} {after_f.severity}"
    ratio = "time_ratio" if f.evidence.get("axis") == "time" else "depth_ratio"
    if after.get(ratio) is not None:
        was = before.get(ratio)
        text += f" ({ratio.replace('_', ' ')} {after[ratio]:.3g} after the fix"
        text += f", {was:.3g} before)" if was is not None else ")"
    return text


def _gradients_were_non_finite(m: Measurements) -> bool:
    return any(p.non_finite for p in m.parameters)


def _apply(
    rec: Recommendation,
    m: Measurements,
    subject: Subject,
    options: DiagnoseOptions,
    addressed: list[Finding] | None = None,
) -> tuple[str, Measurements]:
    from service.engine.measure import input_parts, measure

    if rec.fix == "replace_activation":
        new = str(rec.params.get("to", "ReLU"))
        old = set(rec.params.get("from") or []) & (SATURATING | RELU_LIKE)
        if not old:
            raise NotApplicable("no activation to replace was named")
        copy_ = copy_subject(subject)
        dead = [n for f in addressed or [] if f.kind == "dead_units" for n in f.layers]
        outputs = layer_nodes(copy_, [x.name for x in m.layers if x.name in dead])
        swapped = swap_activations(
            copy_, old, new, outputs=outputs, kept=layer_nodes(copy_, m.untrained_layers)
        )
        text = (
            f"replaced {'/'.join(sorted(old))} by {new} in {len(swapped)} node(s) "
            f"({_listed(swapped)})"
        )
        at_output = [n for n in swapped if n in outputs and n in _graph_output_nodes(copy_)]
        if at_output:
            text += f", the output activation {', '.join(at_output)} among them (it is dead)"
        if rec.params.get("init") == "kaiming":
            # the tensors the snippet re-initialises (rules.py lists them in `init_weights`);
            # without the list, the weights of the recommendation's layers
            layers = {x.name: x for x in m.layers}
            names = rec.params.get("init_weights")
            if names is None:
                names = [
                    p
                    for name in rec.layers
                    if name in layers
                    for p in layers[name].params
                    if len(_shape(m, p)) >= 2
                ]
            schemes = dict.fromkeys(names, "kaiming")
            if schemes:
                reinitialize(copy_, schemes)
                text += f"; He-initialised {len(schemes)} weight(s) before them, biases kept"
        return text, measure(copy_, options)
    if rec.fix == "reinitialize_weights":
        copy_ = copy_subject(subject)
        done = reinitialize(copy_, dict(rec.params.get("schemes", {})))
        return f"re-initialised {len(done)} tensor(s): " + _listed(done, 4, "; "), measure(
            copy_, options
        )
    if rec.fix == "straight_through_estimator":
        copy_ = copy_subject(subject)
        if copy_.graph is None:
            raise NotApplicable("the model has no observable graph, so no op can be changed")
        done = straight_through(copy_.graph, [str(rec.params.get("node", ""))])
        if not done:
            raise NotApplicable(f"node {rec.params.get('node')!r} is no rounding of the graph")
        text = f"made {', '.join(done)} a straight-through estimator: x + (op(x) − x).detach()"
        return text, measure(copy_, options)
    if rec.fix == "recalibrate_quantizers":
        copy_ = copy_subject(subject)
        if copy_.graph is None:
            raise NotApplicable("the model's quantisers are not observable (parameters only)")
        grown = widen_to_cover(copy_.graph, input_parts(copy_, options))
        shown = _listed([f"{name} × {factor:.3g}" for name, factor in grown.items()], 4)
        text = (
            f"max-calibrated the quantisers on this batch, widening only: {len(grown)} scale(s) "
            f"grew ({shown})"
        )
        return text, measure(copy_, options)
    if rec.fix == "clip_gradients":
        return _clipped(m, float(rec.params["max_norm"]))
    if rec.fix in ("loss_scaling", "use_bf16"):
        scale = float(rec.params.get("scale", 1.0)) if rec.fix == "loss_scaling" else 1.0
        tiny = FP16_TINY if rec.fix == "loss_scaling" else BF16_TINY
        return _rescaled_underflow(m, subject, scale, tiny, rec.fix)
    if rec.fix == "normalize_targets":
        text, copy_ = standardized_target(subject)
        return text, measure(copy_, options)
    raise NotApplicable(f"no automatic transform for {rec.fix}")


def _guarded(
    rec: Recommendation, subject: Subject, options: DiagnoseOptions
) -> tuple[str, Measurements, bool]:
    """guard_numerics on a copy: (what was done, the new pass, whether every guard was an
    exact rewrite, log(softmax) → log_softmax, rather than a clamp)."""
    from service.engine.measure import measure

    copy_ = copy_subject(subject)
    node = str(rec.params.get("node", ""))
    texts, after = [guard_node(copy_, node)], measure(copy_, options)
    guarded = [node]
    # the same op in every block (T5's position buckets in the encoder and the decoder):
    # the next one becomes the origin; the fix is the guard on each
    while (
        (origin := after.non_finite_origin) is not None
        and origin.phase == "forward"
        and origin.node not in guarded
        and len(guarded) < MAX_GUARDED_NODES
    ):
        try:
            texts.append(guard_node(copy_, origin.node))
        except NotApplicable:
            break
        guarded.append(origin.node)
        after = measure(copy_, options)
    exact = all(softmax_feeding(subject.graph, name) is not None for name in guarded)
    return "; ".join(texts), after, exact


def _listed(items: list[str], limit: int = 8, sep: str = ", ") -> str:
    """The first `limit` items of a transform's text, and how many more there are."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


def _graph_output_nodes(subject: Subject) -> set[str]:
    graph = subject.graph
    if graph is None:
        return set()
    outputs = set(graph.output_names)
    return {node.name for node in graph.nodes if outputs.intersection(node.outputs)}


def _shape(m: Measurements, name: str) -> list[int]:
    return next((p.shape for p in m.parameters if p.name == name), [])


def _clipped(m: Measurements, max_norm: float) -> tuple[str, Measurements]:
    total = math.sqrt(
        sum(p.grad_norm**2 for p in m.parameters if p.grad_norm and math.isfinite(p.grad_norm))
    )
    coef = min(1.0, max_norm / (total + 1e-6))
    after = copy.deepcopy(m)
    for p in after.parameters:
        if p.grad_norm is not None:
            p.grad_norm *= coef
            p.grad_to_weight = p.grad_norm / p.weight_norm if p.weight_norm else None
    for layer in after.layers:
        if layer.grad_norm is not None:
            layer.grad_norm *= coef
            layer.grad_to_weight = (
                layer.grad_norm / layer.weight_norm if layer.weight_norm else None
            )
    text = (
        f"clip_grad_norm_(max_norm={max_norm:g}): total gradient norm {total:.3g} → "
        f"{min(total, max_norm):.3g} (coefficient {coef:.3g}); ‖∂L/∂a‖ ratios are unchanged"
    )
    return text, after


def _rescaled_underflow(
    m: Measurements, subject: Subject, scale: float, tiny: float, fix: str
) -> tuple[str, Measurements]:
    """One backward of `scale` × loss on a copy; recount underflow against `tiny`. When the
    diagnosis ran in fp16, loss scaling is checked the way it would act: the scaled pass runs
    in fp16 autocast and the entries it still flushes to exactly 0 (non-zero in an fp32 pass
    of the same batch, same dropout masks) are counted, as measure() does for fp16 runs."""
    copy_ = copy_subject(subject)
    if copy_.graph is not None:
        named = copy_.graph.named_graph_parameters()
    else:
        named = list(copy_.module.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    params: list[torch.Tensor] = [p for _, p in trainable]
    in_fp16 = fix == "loss_scaling" and m.precision == "fp16"
    rng_devices = [copy_.device] if copy_.device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):  # the reference draws the same masks
        grads = _loss_gradients(copy_, params, scale, fp16=in_fp16)
    if in_fp16:
        ref_subject, ref_params = _fp32_of(copy_, params)
        reference = _loss_gradients(ref_subject, ref_params, 1.0, fp16=False)
    else:
        reference = grads
    after = copy.deepcopy(m)
    names, rows = [], []
    for (name, _), g, r in zip(trainable, grads, reference, strict=True):
        if g is None:
            continue
        names.append(name)
        numel = torch.full((), g.numel(), device=g.device, dtype=torch.long)
        if in_fp16:
            flushed = torch.logical_and(g == 0, r != 0).sum() if r is not None else numel * 0
            overflowed = (~torch.isfinite(g)).sum()  # an fp16 overflow is an inf
            rows.append(torch.stack([flushed, overflowed, numel]))
        else:
            a = g.detach().float().abs()
            rows.append(torch.stack([((a > 0) & (a < tiny)).sum(), (a > FP16_MAX).sum(), numel]))
    # one transfer for all tensors, as in measure()
    host = dict(zip(names, torch.stack(rows).tolist(), strict=True)) if rows else {}
    for p in after.parameters:
        if p.name in host:
            under, over, numel_ = host[p.name]
            p.fp16_underflow_fraction = under / max(1, numel_)
            p.fp16_overflow_fraction = over / max(1, numel_) if fix == "loss_scaling" else 0.0
    if in_fp16:
        text = (
            f"loss × {scale:g} in fp16 autocast: gradient entries still flushed to 0 recounted "
            "against an fp32 pass"
        )
    elif fix == "loss_scaling":
        text = f"loss × {scale:g}: gradients recounted against fp16's 2^-24"
    else:
        text = "gradients recounted against bf16's smallest value 2^-133"
    return text, after


def _fp32_of(subject: Subject, params: list[torch.Tensor]) -> tuple[Subject, list[torch.Tensor]]:
    """The subject itself, or for a model whose own parameters are fp16 (or that computes in
    fp16: first_pass.py) an fp32 copy (inputs too, parameters in the same order): the
    reference pass must not run in fp16 itself."""
    from service.engine.measure import _fp32_copy

    computes_in_fp16 = subject.extra.get(COMPUTES_IN_FP16, False)  # autocast baked in
    if not computes_in_fp16 and not any(p.dtype == torch.float16 for p in params):
        return subject, params
    copy_, named = _fp32_copy(subject)
    copy_.inputs = [x.float() if x.is_floating_point() else x for x in copy_.inputs]
    return copy_, [p for _, p in named]


def _loss_gradients(
    subject: Subject, params: list[torch.Tensor], scale: float, *, fp16: bool
) -> tuple[torch.Tensor | None, ...]:
    """∂(scale × loss)/∂params / scale, unscaled in fp32; the forward in fp16 autocast or not."""
    from service.engine.losses import compute_loss

    context = (
        torch.autocast(device_type=subject.device.type, dtype=torch.float16)
        if fp16
        else contextlib.nullcontext()
    )
    with context:
        if subject.graph is not None:
            outputs = subject.graph.run(subject.inputs)
        else:
            out = subject.module(*subject.inputs)
            outputs = list(out) if isinstance(out, tuple | list) else [out]
    tensors = [o for o in outputs if isinstance(o, torch.Tensor)]
    loss = compute_loss(subject.loss_kind, tensors, subject.target)
    grads = torch.autograd.grad(loss * scale, params, allow_unused=True)
    if not fp16:
        return grads  # the fp32 recount keeps the scaled values (that is what it counts)
    return tuple(g.float() / scale if g is not None else None for g in grads)
