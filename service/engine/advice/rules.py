"""From findings to recommendations: every classic cause of vanishing/exploding gradients and
its remedy, each tied to the numbers that justify it.

A rule only fires on evidence: a finding it addresses plus a measured cause (a saturating
activation, a weight scale off He/Xavier, no normalisation layer, no shortcut, a vanilla RNN,
the op that produced a NaN). Recommendations of the same fix are merged, their `addresses`
joined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from service.engine.advice import evidence as ev
from service.engine.advice import snippets, targets
from service.engine.detectors.optypes import canonical_op, is_normalization
from service.engine.detectors.origin_text import describe as describe_origin
from service.engine.detectors.profile import decay_phrase, ratio_phrase, sig
from service.engine.detectors.quantizers import quantized_what, range_text
from service.engine.detectors.thresholds import resolve_thresholds
from service.engine.detectors.units import init_ratio, normalized_layers, unit_share
from service.engine.gradient_cuts import SINGLE_ELEMENT_SOFTMAX
from service.engine.graph import ObservableGraph
from service.engine.layers import grouped_weight_stds
from service.engine.measurements import Measurements
from service.engine.origin import exp_input_limit
from service.engine.report import SEVERITY_RANK, Finding, LayerReport, Recommendation

# Rank among recommendations of equal severity: causes before symptoms, specific before generic.
PRIORITY = {
    "guard_numerics": 100,
    "straight_through_estimator": 98,
    "attend_over_more_tokens": 97,
    "recalibrate_quantizers": 95,
    "use_gated_recurrent_unit": 90,
    "normalize_targets": 85,
    "replace_activation": 80,
    "reinitialize_weights": 75,
    "loss_scaling": 70,
    "clip_gradients": 60,
    "add_normalization": 50,
    "add_residual_connections": 45,
    "use_bf16": 40,
    "lower_learning_rate": 30,
}
COMPOUND_LOW = 0.7  # init ratio below it counts when the gradient already vanishes
COMPOUND_HIGH = 1.3  # init ratio above it counts when the gradient already explodes
MIN_DEPTH_FOR_NORMALIZATION = 4  # weight layers; shallower nets rarely need it
MIN_DEPTH_FOR_SHORTCUTS = 6  # weight layers; He et al. 2016 saw plain nets degrade from ~20


def _input_end(evidence: dict[str, Any]) -> str:
    """Where a depth finding's ratio was read: the first layer, or a deeper branch's."""
    start = evidence.get("depth_ratio_from")
    return f"the first layer ({start})" if start else "the first layer"


# activations whose derivative is at most 1/4 everywhere: a cause of vanishing gradients
# even unsaturated (a tanh's is near 1 until it saturates)
_QUARTER_SLOPE = frozenset({"sigmoid", "hardsigmoid"})
GATE_BIAS_TARGET = 1.0  # forget/update-gate bias (Gers et al. 2000; Jozefowicz et al. 2015)
GATE_BIAS_TOLERANCE = 1e-3  # a measured gate bias this close to the target is at it


def _layer_means(measured: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    return {layer: float(torch.cat(values).mean()) for layer, values in measured.items()}


def _openness(gate: float) -> str:
    if gate < 0.1:
        return "almost shut"
    if gate < 0.4:
        return "mostly closed"
    if gate < 0.6:
        return "half closed"
    return "partly open"


def _gate_bias_text(op: str, measured: dict[str, list[torch.Tensor]]) -> str:
    """Why a forget (LSTM) / update (GRU) gate bias of 1: the measured bias the gate sees
    (bias_ih + bias_hh) per layer, how far σ of it opens the gate, and what 1 gives."""
    target = f"σ({GATE_BIAS_TARGET:g}) = {sig(1 / (1 + math.exp(-GATE_BIAS_TARGET)))}"
    gate = "forget" if op == "lstm" else "update"
    recipe = (
        f"an effective {gate}-gate bias of {GATE_BIAS_TARGET:g} (bias_ih's {gate} slice "
        f"{GATE_BIAS_TARGET:g}, bias_hh's 0"
    )
    if not measured:
        if op == "lstm":
            return (
                f"{recipe}; Gers et al. 2000; Jozefowicz et al. 2015) opens the LSTM's forget "
                f"gates to about {target} and keeps more of the state, and of its gradient, "
                "per step"
            )
        return (
            f"the GRU keeps z·h of its state per step, z = σ(update-gate bias); {recipe}) "
            f"gives z ≈ {target} and carries more of it, and of its gradient, back"
        )
    stats = {layer: torch.cat(values) for layer, values in measured.items()}
    uniform = all(float(v.max() - v.min()) < 1e-6 for v in stats.values())
    parts = [f"{sig(float(v.mean()))} in {layer}" for layer, v in list(stats.items())[:3]]
    if len(stats) > 3:
        parts.append(f"{len(stats) - 3} more layers")
    lowest = min(stats, key=lambda layer: float(stats[layer].mean()))
    bias = float(stats[lowest].mean())
    opened = 1 / (1 + math.exp(-bias))
    where = f" in {lowest}" if len(stats) > 1 else ""
    measured_text = (
        f"the {op.upper()}'s {gate}-gate bias (the {gate} slices of bias_ih + bias_hh) "
        f"{'is' if uniform else 'averages'} {', '.join(parts)}"
    )
    keeps = f"of its state, and of its gradient, per step; {recipe}"
    if op == "lstm":
        return (
            f"{measured_text}: its forget gates start at about σ({sig(bias)}) = {sig(opened)}"
            f"{where} ({_openness(opened)}), so the cell keeps about {sig(opened)} {keeps}; "
            f"Gers et al. 2000; Jozefowicz et al. 2015) opens them to {target}"
        )
    return (
        f"the GRU keeps z·h of its state per step, z = σ(update-gate bias); {measured_text}: z "
        f"starts at about σ({sig(bias)}) = {sig(opened)}{where}, so it keeps about "
        f"{sig(opened)} {keeps}) gives z ≈ {target}"
    )


@dataclass
class Draft:
    fix: str
    addresses: set[int] = field(default_factory=set)
    layers: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    boost: int = 0


class Advisor:
    def __init__(
        self,
        findings: list[Finding],
        m: Measurements,
        graph: ObservableGraph | None,
        thresholds: dict[str, Any] | None,
        precision: str | None = None,
    ) -> None:
        self.findings = findings
        self.m = m
        self.precision = precision or m.precision
        self.graph = graph
        self.t = resolve_thresholds(thresholds)
        self.drafts: dict[str, Draft] = {}
        self.layers = {x.name: x for x in m.layers}

    # -- plumbing ----------------------------------------------------------------------------
    def add(self, fix: str, index: int, reason: str, layers: list[str], **params: Any) -> Draft:
        draft = self.drafts.setdefault(fix, Draft(fix))
        draft.addresses.add(index)
        if reason not in draft.reasons:
            draft.reasons.append(reason)
        draft.layers += [x for x in layers if x not in draft.layers]
        for key, value in params.items():
            if isinstance(value, dict):
                draft.params.setdefault(key, {}).update(value)
            elif isinstance(value, list):
                old = draft.params.setdefault(key, [])
                old += [v for v in value if v not in old]
            else:
                draft.params.setdefault(key, value)
        return draft

    def recommendations(self) -> list[Recommendation]:
        for index, finding in enumerate(self.findings):
            handler = getattr(self, f"_{finding.kind}", None)
            if handler is not None:
                handler(index, finding)
        recs = [self._build(d) for d in self.drafts.values()]

        def rank(r: Recommendation) -> tuple[int, int, int]:
            worst = max(SEVERITY_RANK[self.findings[i].severity] for i in r.addresses)  # type: ignore[index]
            boost = self.drafts[r.fix].boost
            return (-worst, -(PRIORITY[r.fix] + boost), -len(r.addresses))

        return sorted(recs, key=rank)

    def _build(self, d: Draft) -> Recommendation:
        snippet = self._snippet(d)
        return Recommendation(
            fix=d.fix,
            addresses=sorted(d.addresses),
            rationale=" ".join(d.reasons),
            snippet=snippet,
            params=d.params,
            layers=d.layers,
        )

    def _snippet(self, d: Draft) -> str:
        p = d.params
        if d.fix == "replace_activation":
            if p.get("init") == "kaiming":
                # the weights before the swapped activations: what the verification
                # re-initialises (verify._apply), listed so that the snippet does the same
                shapes = {x.name: x.shape for x in self.m.parameters}
                p["init_weights"] = [
                    name
                    for layer in d.layers
                    if layer in self.layers
                    for name in self.layers[layer].params
                    if len(shapes.get(name, [])) >= 2
                ]
            return snippets.replace_activation(
                p["from"], p["to"], p.get("init"), p.get("init_weights")
            )
        if d.fix == "reinitialize_weights":
            stds = grouped_weight_stds(self.graph, p["schemes"]) if self.graph else {}
            return snippets.reinitialize(p["schemes"], p.get("source_names"), stds)
        if d.fix == "clip_gradients":
            return snippets.clip_gradients(p["max_norm"])
        if d.fix == "lower_learning_rate":
            return snippets.lower_learning_rate(p["factor"])
        if d.fix == "normalize_targets":
            return snippets.normalize_targets(
                p["target_mean"], p["target_std"], str(p["loss_kind"])
            )
        if d.fix == "add_normalization":
            return snippets.add_normalization(p["kind"], d.layers)
        if d.fix == "add_residual_connections":
            return snippets.add_residual(d.layers)
        if d.fix == "use_gated_recurrent_unit":
            return snippets.gated_recurrent(d.layers)
        if d.fix == "guard_numerics":
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
            limit = exp_input_limit(dtype or torch.float32)
            if p.get("method") == "log_softmax":
                return snippets.log_softmax(p["node"], p["softmax_node"], int(p["dim"]))
            return snippets.guard_numerics(p["op"], p["node"], limit)
        if d.fix == "loss_scaling":
            return snippets.loss_scaling(p["scale"])
        if d.fix == "straight_through_estimator":
            return snippets.straight_through_estimator(str(p["op"]))
        if d.fix == "attend_over_more_tokens":
            return snippets.attend_over_more_tokens(str(p["node"]))
        if d.fix == "recalibrate_quantizers":
            return snippets.recalibrate_quantizers(list(p["scale_factors"]))
        return snippets.use_bf16()

    # -- shared causes -----------------------------------------------------------------------
    def _saturating_cause(self, index: int, why: str, layers: list[str] | None = None) -> None:
        sat = ev.saturating_layers(self.m)
        if layers is not None:
            sat = [x for x in sat if x.name in layers] or sat
        # a sigmoid's derivative is at most 0.25 wherever it works; a tanh's is near 1 until
        # it saturates: an unsaturated tanh stack is no cause (its init is, when anything)
        cut = self.t["saturation_fraction_warning"]
        sat = [
            x
            for x in sat
            if ev.activation_of(x) in _QUARTER_SLOPE
            or (x.activation_stats.saturated_fraction or 0.0) >= cut
        ]
        if not sat:
            return
        acts = sorted({ev.activation_of(x) or "" for x in sat})
        span = sat[0].name if len(sat) == 1 else f"{sat[0].name} … {sat[-1].name}"
        # attention models use GELU in their MLPs (BERT, GPT, ViT); ReLU elsewhere
        new = "GELU" if ev.is_attention_model(self.m) else "ReLU"
        self.add(
            "replace_activation",
            index,
            f"{len(sat)} hidden layer(s) ({span}) use "
            f"{'/'.join(acts)}, whose derivative is at most "
            f"{'0.25' if acts == ['sigmoid'] else '1 and near 0 once saturated'}; {why} "
            f"{new} with He initialisation passes gradients at full scale.",
            [x.name for x in sat],
            **{"from": acts, "to": new, "init": "kaiming"},
        )

    def _init_cause(
        self, index: int, names: list[str], direction: str, why: str, compounding: bool = False
    ) -> None:
        """Re-initialisation for layers whose weight scale is off He/Xavier.

        `compounding`: the finding shows the gradient already shrinking/growing through the
        stack, so a scale merely off by COMPOUND_LOW/HIGH counts (it multiplies at every layer;
        PyTorch's default 0.41 of He over 8 ReLU layers is ×8e-4).
        """
        low, high = self.t["init_ratio_low"], self.t["init_ratio_high"]
        if compounding:
            low, high = max(low, COMPOUND_LOW), min(high, COMPOUND_HIGH)
        picked: list[LayerReport] = []
        ratio: dict[str, float] = {}
        scale_free = normalized_layers(self.m)
        for name in names:
            layer = self.layers.get(name)
            r = init_ratio(layer, self.m) if layer is not None else None
            if layer is None or r is None or name in scale_free:
                continue
            ratio[name] = r
            if (direction == "small" and r < low) or (direction == "large" and r > high):
                picked.append(layer)
        if not picked:
            return
        schemes = {p: ev.init_scheme(x) for x in picked for p in ev.weight_params(self.m, x)}
        if not schemes:
            return
        worst = min(picked, key=lambda x: ratio[x.name])
        if direction == "large":
            worst = max(picked, key=lambda x: ratio[x.name])
        bound = "up to" if direction == "large" else "as little as"
        base = (
            f"The weights of these layers are {bound} "
            f"{sig(ratio[worst.name])}× (at {worst.name}) the std He/Xavier initialisation "
            f"gives for their fan-in"
        )
        if len(picked) > 1 and self._plain_chain():
            gain = math.prod(ratio[x.name] for x in picked)
            base += f", ×{sig(gain)} compounded over the {len(picked)} layers"
        existing = self.drafts.get("reinitialize_weights")
        if existing is not None and any(r.startswith("The weights of") for r in existing.reasons):
            reason = why[:1].upper() + why[1:]  # the base sentence is there already
        else:
            reason = f"{base}; {why}"
        draft = self.add(
            "reinitialize_weights", index, reason, [x.name for x in picked], schemes=schemes
        )
        draft.boost = max(draft.boost, 15)

    def _plain_chain(self) -> bool:
        """No shortcut adds (none seen, or no graph to look in) and no normalisation: each
        layer's scale multiplies into the next (in a transformer or a ResNet the residual
        stream and the norms do not)."""
        return not ev.residual_adds(self.graph) and not ev.has_normalization(self.m)

    def _normalization_cause(self, index: int, why: str, layers: list[str]) -> None:
        weights = ev.weight_layers(self.m)
        if ev.has_normalization(self.m) or len(weights) < MIN_DEPTH_FOR_NORMALIZATION:
            return
        kind = "BatchNorm" if ev.uses_convolution(self.m) else "LayerNorm"
        self.add(
            "add_normalization",
            index,
            f"The model has {len(weights)} weight layers and no normalisation layer; {why} "
            f"A {kind} after each layer keeps every layer's input at unit scale.",
            layers or [x.name for x in weights],
            kind=kind,
        )

    def _shortcut_cause(self, index: int, why: str, layers: list[str]) -> None:
        weights = ev.weight_layers(self.m)
        shortcuts = ev.residual_adds(self.graph)
        if shortcuts is None or shortcuts > 0 or len(weights) < MIN_DEPTH_FOR_SHORTCUTS:
            return
        self.add(
            "add_residual_connections",
            index,
            f"The gradient crosses all {len(weights)} weight layers in series (no shortcut adds "
            f"in the graph); {why} Identity shortcuts give it a path that skips them.",
            layers or [x.name for x in weights],
        )

    def _gate_bias_cause(self, index: int, e: dict[str, Any]) -> None:
        """LSTM forget-gate / GRU update-gate bias 1, on torch's `bias_ih_l<k>` or on the ONNX
        `B` the export folded them into; a gated layer without bias gets the advice with a
        scheme verification cannot apply (a parameter cannot be added to the graph).

        The gate sees bias_ih + bias_hh (ONNX: Wb + Rb): that sum is measured, named in the
        rationale, and is what the fix sets to 1 (input slice 1, hidden slice 0). A gate
        whose bias is 1 or more already is not the cause, and gets no such advice."""
        schemes: dict[str, str] = {}
        sources: dict[str, list[str]] = {}
        for op, gate in (("lstm", "forget"), ("gru", "update")):
            schemes.update(dict.fromkeys(ev.lstm_input_biases(self.m, op), f"{gate}_bias"))
            onnx_biases = ev.onnx_gate_biases(self.m, op)
            schemes.update(dict.fromkeys(onnx_biases, f"onnx_{gate}_bias"))
            sources.update(onnx_biases)
        ops = {x.name: canonical_op(x.op) for x in self.m.layers}
        for layer in ev.biasless_gated_layers(self.m):
            gate = "update" if ops[layer].startswith("gru") else "forget"
            schemes[layer] = f"no_bias_{gate}"
            module, _, k = layer.rpartition(".l")
            module, k = (module, k) if module and k.isdigit() else (layer, "0")
            sources[layer] = [f"{module}.bias_ih_l{k}"]
        layer_of = {p.name: p.layer for p in self.m.parameters}
        measured: dict[str, dict[str, list[torch.Tensor]]] = {"lstm": {}, "gru": {}}
        for name, scheme in list(schemes.items()):
            if scheme.startswith("no_bias_"):  # no bias: the gate's bias is 0
                values: torch.Tensor | None = torch.zeros(1)
                layer = name
            else:
                values = ev.effective_gate_bias(self.graph, name, scheme)
                layer = layer_of.get(name) or name
            if values is None or not values.numel():
                continue
            if float(values.mean()) >= GATE_BIAS_TARGET - GATE_BIAS_TOLERANCE:
                del schemes[name]  # open as far as the fix would set it already
                sources.pop(name, None)
                continue
            measured[ev.GATE_OF_SCHEME[scheme]].setdefault(layer, []).append(values)
        if not schemes:
            return
        used = set(schemes.values())
        why = []
        bias_params: dict[str, dict[str, float]] = {}
        if used & {"forget_bias", "onnx_forget_bias", "no_bias_forget"}:
            why.append(_gate_bias_text("lstm", measured["lstm"]))
            if measured["lstm"]:
                # the value the fix sets (the snippet's), and what the gate sees now
                current = _layer_means(measured["lstm"])
                bias_params["forget_gate_bias"] = dict.fromkeys(current, GATE_BIAS_TARGET)
                bias_params["current_forget_gate_bias"] = current
        if used & {"update_bias", "onnx_update_bias", "no_bias_update"}:
            why.append(_gate_bias_text("gru", measured["gru"]))
            if measured["gru"]:
                current = _layer_means(measured["gru"])
                bias_params["update_gate_bias"] = dict.fromkeys(current, GATE_BIAS_TARGET)
                bias_params["current_update_gate_bias"] = current
        if used & {"onnx_forget_bias", "onnx_update_bias"}:
            why.append(
                "in the ONNX graph that is B[:, 2H:3H] + B[:, 6H:7H] (Wb + Rb) of an LSTM (ONNX "
                "gate order i, o, f, c) or B[:, 0:H] + B[:, 3H:4H] of a GRU (z, r, h); in "
                "torch, chunk 1 of bias_ih + bias_hh (LSTM i, f, g, o; GRU r, z, n)"
            )
        if used & {"no_bias_forget", "no_bias_update"}:
            why.append("a layer built with bias=False needs its bias back first")
        self.add(
            "reinitialize_weights",
            index,
            f"The gradient shrinks ×{sig(e['per_step_factor'])} per step back in time; "
            + "; ".join(why)
            + ".",
            list(self.m.recurrent_layers),
            schemes=schemes,
            **({"source_names": sources} if sources else {}),
            **bias_params,
        )

    # -- per finding kind ---------------------------------------------------------------------
    def _vanishing_gradients(self, index: int, f: Finding) -> None:
        e = f.evidence
        if f.severity == "info":  # zero-initialised by design (detectors/gradients.py): no fix
            return
        if e.get("axis") == "time":
            rnn = ev.vanilla_rnn_layers(self.m)
            if rnn:
                self.add(
                    "use_gated_recurrent_unit",
                    index,
                    f"{', '.join(rnn)} is a vanilla RNN: the gradient reaching the first of "
                    f"{e['steps']} steps is {ratio_phrase(e['time_ratio'])} of the last step's "
                    f"(×{sig(e['per_step_factor'])} per step), so only the last "
                    f"{e['horizon_steps']} steps teach it; LSTM/GRU gates keep an additive "
                    f"path through time.",
                    rnn,
                )
            self._gate_bias_cause(index, e)
            return
        cut = e.get("gradient_cut")
        if cut is not None and cut.get("kind") == SINGLE_ELEMENT_SOFTMAX:
            self.add(
                "attend_over_more_tokens",
                index,
                f"{cut['op']} ({cut['node']}) normalises over one element (attention over a "
                f"single token): its output is 1 whatever the scores, so "
                f"{', '.join(cut['layers'][:3])} get no gradient; the attention needs more "
                "than one token per sequence.",
                cut["layers"],
                node=cut["node"],
            )
            return
        if cut is not None:  # a rounding explains the zeros: no scale, norm or shortcut helps
            self.add(
                "straight_through_estimator",
                index,
                f"{cut['op']} ({cut['node']}) has zero derivative, so no gradient reaches "
                f"{', '.join(cut['layers'][:3])}; a straight-through "
                "estimator keeps its value in the forward pass and passes the gradient on "
                "unchanged, as quantisation-aware training does.",
                cut["layers"],
                node=cut["node"],
                op=cut["op"],
            )
            return
        ratio = e.get("depth_ratio")
        how = (
            f"‖∂L/∂a‖ at {_input_end(e)} is {ratio_phrase(ratio)} of the last's "
            f"({decay_phrase(e)})."
            if ratio is not None
            else f"the first layer's weight gradient is {sig(e.get('weight_ratio'))} of the last's."
        )
        self._saturating_cause(index, how)
        weights = [x.name for x in ev.weight_layers(self.m)]
        if "absolute_scale" in e.get("rules", []):
            self._init_cause(
                index,
                weights,
                "small",
                f"the largest grad/weight is {sig(e.get('max_grad_to_weight'))}, so every layer's "
                f"signal and gradient shrink together.",
            )
        else:
            self._init_cause(index, weights, "small", how, compounding=True)
        self._normalization_cause(index, how, f.layers)
        self._shortcut_cause(index, how, f.layers)

    def _exploding_gradients(self, index: int, f: Finding) -> None:
        e = f.evidence
        max_norm, derivation = ev.suggested_max_norm(self.m, f.layers)
        total = ev.total_grad_norm(self.m)
        if e.get("axis") == "time":
            grows = (
                f"the gradient at the first of {e['steps']} steps is {sig(e['time_ratio'])}× the "
                f"last step's"
            )
            rnn = ev.vanilla_rnn_layers(self.m)
            if rnn:
                self.add(
                    "use_gated_recurrent_unit",
                    index,
                    f"{', '.join(rnn)} is a vanilla RNN and {grows}; gated units bound the "
                    f"recurrent Jacobian.",
                    rnn,
                )
            recurrent = ev.recurrent_weights(self.m)
            if recurrent:
                self.add(
                    "reinitialize_weights",
                    index,
                    f"The gradient grows ×{sig(e.get('per_step_factor'))} per step back in "
                    f"time: the recurrent weights ({', '.join(recurrent[:3])}) amplify; an "
                    f"orthogonal initialisation (all singular values 1) neither grows nor "
                    f"shrinks the state (Saxe et al. 2014).",
                    list(self.m.recurrent_layers),
                    schemes=dict.fromkeys(recurrent, "orthogonal"),
                )
        else:
            # the profile's growth only where it grows towards the input (a factor or ratio
            # below 1 is a shrink: grad/weight is what explodes then)
            growing = (e.get("per_layer_factor") or 0.0) > 1 and (e.get("depth_ratio") or 0.0) > 1
            grows = (
                f"‖∂L/∂a‖ grows ×{sig(e.get('per_layer_factor'))} per layer backwards "
                f"({sig(e.get('depth_ratio'))}× larger at the first layer than at the last)"
                if growing
                else f"grad/weight reaches {sig(e.get('max_grad_to_weight'))}"
            )
        target_scale = e.get("target_scale")
        if target_scale:
            self.add(
                "normalize_targets",
                index,
                targets.normalize_targets_reason(target_scale),
                f.layers,
                **targets.normalize_targets_params(target_scale),
            )
        self.add(
            "clip_gradients",
            index,
            f"The total gradient norm is {sig(total)} and {grows}; clipping at "
            f"max_norm={max_norm:g} ({derivation}) bounds each update while "
            f"{targets.exploding_cause(e)}.",
            f.layers,
            max_norm=max_norm,
            total_grad_norm=total,
        )
        weights = [x.name for x in ev.weight_layers(self.m)]
        if e.get("axis") != "time":
            self._init_cause(
                index, weights, "large", f"{grows}, as that gain compounds.", compounding=True
            )
            self._normalization_cause(index, grows + ".", f.layers)
        g2w = e.get("max_grad_to_weight")
        if g2w is not None and math.isfinite(g2w) and g2w > 1.0:
            factor = 10.0 ** -min(3, max(1, math.ceil(math.log10(g2w))))
            self.add(
                "lower_learning_rate",
                index,
                f"grad/weight reaches {sig(g2w)}: an SGD step at lr 1 would change a layer "
                f"{sig(g2w)}× its size; lower the learning rate ×{factor:g} (or warm it up).",
                f.layers,
                factor=factor,
            )

    def _non_finite(self, index: int, f: Finding) -> None:
        origin = f.evidence.get("origin")
        if not origin:
            bad = f.evidence.get("non_finite_parameters") or {}
            self.add(
                "guard_numerics",
                index,
                f"NaN/Inf gradients in {len(bad)} parameter(s) without a forward origin: an op's "
                f"backward divides by zero (sqrt/pow/norm at 0); guard it with an eps.",
                f.layers,
                op="unknown",
                node="",
                eps=1e-6,
            )
            return
        if origin["op_type"] == "input":  # the batch's own values: no op to guard
            return
        op = canonical_op(origin["op_type"])
        what, guard = describe_origin(origin)
        advisory = (
            "Advisory, the values reach no loss or gradient now: " if f.severity == "info" else ""
        )
        feed = ev.softmax_feeding(self.graph, origin["node"]) if op == "log" else None
        if feed is not None:
            self._log_of_softmax(index, f, origin, feed, advisory + what)
            return
        reason = advisory + (
            f"{what} (loss = {f.evidence.get('loss')}): {guard}."
            if origin.get("values")
            else f"Node {origin['node']!r} ({origin['op_type']}) is the first to produce NaN/Inf, "
            f"in the {origin['phase']} pass (loss = {f.evidence.get('loss')}); its input leaves "
            f"the op's domain, so clamp it or add an eps there."
        )
        self._add_guard(index, f, origin, reason, op=op, eps=1e-6)

    def _add_guard(
        self, index: int, f: Finding, origin: dict[str, Any], reason: str, **params: Any
    ) -> None:
        """The guard_numerics recommendation at the origin node, `params` the guard's own."""
        self.add(
            "guard_numerics",
            index,
            reason,
            f.layers or [origin["node"]],
            node=origin["node"],
            op_type=origin["op_type"],
            phase=origin["phase"],
            **params,
        )

    def _log_of_softmax(
        self, index: int, f: Finding, origin: dict[str, Any], feed: ev.SoftmaxFeed, what: str
    ) -> None:
        """log(softmax(z)): the softmax underflows to exactly 0 for logits far below their
        row's maximum and the log gives -inf. The standard fix is one op, log_softmax(z) =
        z − logsumexp(z): finite for any finite z, with the exact gradient softmax(z) − onehot.
        A clamp would keep the -inf out but cut the gradient of every clamped entry."""
        axis = (
            f"axis {feed.dim}, over the flattened dims from there (ONNX opset < 13)"
            if feed.flattened
            else f"dim={feed.dim}"
        )
        reason = (
            f"{what} (loss = {f.evidence.get('loss')}): the log reads the output of the softmax "
            f"{feed.node!r}, which underflows to exactly 0 for logits far below their row's "
            f"maximum; compute both in one op, F.log_softmax(z, {axis}) (z − logsumexp(z)): "
            "finite, with exact gradients, where clamping the log's input would cut the "
            "gradient of every clamped entry. With an NLL loss on it, F.cross_entropy on the "
            "logits does both."
        )
        self._add_guard(
            index,
            f,
            origin,
            reason,
            op="log",
            method="log_softmax",
            softmax_node=feed.node,
            dim=feed.dim,
        )

    def _saturation(self, index: int, f: Finding) -> None:
        frac = f.evidence.get("worst_fraction")
        why = f"{sig(frac)} of the activations of {f.layers[0]} are saturated."
        self._saturating_cause(index, why, f.layers)
        self._init_cause(
            index, f.layers, "large", "large weights push sigmoid/tanh into saturation."
        )
        self._normalization_cause(index, why, f.layers)

    def _quantizer_clipping(self, index: int, f: Finding) -> None:
        clipping = [q for q in self.m.quantizers if q.name in f.evidence["clipped_fraction"]]
        clipping.sort(key=lambda q: -q.clipped_fraction)
        facts = []
        for q in clipping[:3]:
            reach = max(q.input_min or 0.0, q.input_max or 0.0, key=abs)
            facts.append(
                f"the range {range_text(q)} of {q.name} holds {sig(1.0 - q.clipped_fraction)} of "
                f"{quantized_what(q)}, which reaches {sig(reach)} (a scale "
                f"{sig(q.covering_scale_factor)}× larger holds this batch)"
            )
        more = f"; {len(clipping) - 3} more" if len(clipping) > 3 else ""
        self.add(
            "recalibrate_quantizers",
            index,
            f"T{'; '.join(facts)[1:]}{more}. Calibrate the "
            "scales on representative batches (max, or a 99.99th percentile amax) or learn "
            "them (LSQ): a value outside the range is clamped in the forward pass and passes "
            "no gradient.",
            f.layers,
            scale_factors={q.name: q.covering_scale_factor for q in clipping},
        )

    def _dead_units(self, index: int, f: Finding) -> None:
        frac = f.evidence.get("worst_fraction")
        layers = [self.layers[n] for n in f.layers if n in self.layers]
        weighted = [x for x in layers if not is_normalization(x.op)]
        self.add(
            "replace_activation",
            index,
            f"{unit_share(frac or 0.0)} of the units of {f.layers[0]} are zero for the whole "
            "batch and get no gradient; LeakyReLU keeps a small slope below zero so they can "
            "recover.",
            f.layers,
            **{"from": sorted({ev.activation_of(x) or "relu" for x in layers}), "to": "LeakyReLU"},
        )
        self.drafts["replace_activation"].params["to"] = "LeakyReLU"
        schemes = {p: "kaiming" for x in weighted for p in ev.weight_params(self.m, x)}
        schemes.update({p: "zero_bias" for x in weighted for p in ev.bias_params(self.m, x)})
        if schemes:
            bias = self._bias_mean(weighted)
            self.add(
                "reinitialize_weights",
                index,
                f"Re-initialise {', '.join(x.name for x in weighted[:3])} (He weights, zero bias)"
                + (
                    f": the mean bias is {sig(bias)}, which keeps pre-activations negative."
                    if bias is not None and bias < 0
                    else "."
                ),
                f.layers,
                schemes=schemes,
            )

    def _bias_mean(self, layers: list[Any]) -> float | None:
        if self.graph is None:
            return None
        values = []
        for x in layers:
            for name in ev.bias_params(self.m, x):
                if name in self.graph.param_names:
                    values.append(float(self.graph.parameter(name).detach().float().mean()))
        return sum(values) / len(values) if values else None

    def _init_scale(self, index: int, f: Finding) -> None:
        direction = f.evidence.get("direction", "small")
        if self._plain_chain():
            why = "signals and gradients then shrink or grow by that factor at every layer."
        elif direction == "small":
            why = (
                "each passes on about that fraction of its input's scale (and of the gradient "
                "back through it), so it starts out contributing little to what follows."
            )
        else:
            why = (
                "each amplifies its input (and the gradient back through it) by about that "
                "factor, pushing what follows towards saturation or overflow."
            )
        self._init_cause(index, f.layers, direction, why)

    def _fp16_underflow(self, index: int, f: Finding) -> None:
        share = f.evidence.get("underflow_fraction")
        scale, how = ev.suggested_loss_scale(self.m)
        # an info finding is a forecast for fp16 training: its advice is advisory
        advisory = "Advisory, if you train in fp16: " if f.severity == "info" else ""
        self.add(
            "loss_scaling",
            index,
            f"{advisory}{sig(share)} of the gradient entries fall below fp16's smallest value; "
            f"scaling the loss by {scale:g} ({how}) keeps them representable.",
            f.layers,
            scale=scale,
        )
        if self.precision == "bf16":
            return  # already there
        self.add(
            "use_bf16",
            index,
            f"{advisory}bf16 has fp32's exponent range, so the {sig(share)} of gradient "
            f"entries below "
            f"2^-24 stay representable without loss scaling.",
            f.layers,
        )
