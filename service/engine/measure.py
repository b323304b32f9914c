"""`measure(subject, options) -> Measurements`: one instrumented forward/backward pass (or one per
micro-batch, gradients accumulated) and every statistic the detectors read.

- Per parameter (stats.parameter_statistics): gradient and weight norms, their ratio,
  non-finite count, fp16 underflow/overflow fractions.
- Per layer (layers.py, probes.py): ‖∂L/∂output‖, activation mean/std/saturation/dead units,
  fan-in and weight std relative to He/Xavier.
- Profiles: depth (log ‖∂L/∂a_l‖ fitted against depth l) and time (‖∂L/∂x_t‖ per step of the
  inputs with a sequence axis, read off the recurrent ops' layouts by sequences.py; token
  inputs get ‖∂L/∂e_t‖ of their embedding output; batch-first is only the fallback, noted).
- Non-finite origin: the first node producing NaN/Inf in the forward pass, else the node whose
  backward first produced a non-finite gradient.

Micro-batches: the batch is split along each input's batch axis (sequences.py), each part's
loss is weighted by its share of the batch, so accumulated gradients equal the full batch's
(exactly, unless the model mixes samples, e.g. BatchNorm in train mode sees each part's statistics).

Everything stays on the device until one transfer at the end (`_to_host`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from service.engine.detectors.frozen import untrained_layers_note
from service.engine.detectors.gradients import depth_profile, zero_init_blocked
from service.engine.detectors.profile import growth_factor, reached_steps
from service.engine.first_pass import COMPUTES_IN_FP16, FirstPass, uses_batch_statistics
from service.engine.formats.fx_regions import autocast_regions_off
from service.engine.formats.loaded import frozen_parameter_names
from service.engine.gradient_cuts import gradient_cuts
from service.engine.graph import Node, ObservableGraph
from service.engine.layers import (
    RELU_LIKE,
    SATURATING,
    Layer,
    canonical,
    group_layers,
    normalized_layers,
    reference_scheme,
    reference_std,
    untrained_layers,
)
from service.engine.losses import (
    GIVEN_BY_USER,
    TargetError,
    class_default,
    compute_loss,
    default_loss,
    default_output_shape,
    labelled_share,
    loss_input_notes,
    output_check_notes,
    output_checks,
    regression_scale,
    regression_scale_stats,
    resolve_class_default,
)
from service.engine.measurements import (
    Measurements,
    NonFiniteOrigin,
    Subject,
    output_sizes_per_example,
)
from service.engine.options import DiagnoseOptions
from service.engine.origin import OriginReached, OriginRecorder, find_origin, mask_inputs
from service.engine.probes import Probe
from service.engine.quantizers import measure_quantizers
from service.engine.report import (
    ActivationStats,
    DepthProfile,
    LayerReport,
    LossInfo,
    ParameterReport,
    Profiles,
    TimeProfile,
)
from service.engine.sequences import (
    SequenceLayout,
    TimeSource,
    add_step_sums,
    describe,
    example_spans,
    example_spans_on_device,
    lengths_note,
    sequence_layout,
    spans_differ,
    tap_hook,
)
from service.engine.stats import combine_moments, parameter_statistics
from service.errors import BadInputError, EngineError, GradhealthError, first_line

RECURRENT_OPS = frozenset(
    {"rnn", "lstm", "gru", "rnntanh", "rnnrelu", "lstmcell", "grucell", "rnntanhcell"}
    | {"rnnrelucell"}
)
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def measure(subject: Subject, options: DiagnoseOptions | None = None) -> Measurements:
    options = options or DiagnoseOptions.model_validate({})
    graph = subject.graph
    probe: Probe | None = None
    if graph is not None:
        named = graph.named_graph_parameters()
        layers, probe = _graph_plan(graph, named, subject.device)
    else:
        named = list(subject.module.named_parameters())
        layers = module_layers(subject.module, [n for n, _ in named])
    trainable = [(n, p) for n, p in named if p.requires_grad]
    for _, p in trainable:
        p.grad = None
    layout = _layout(subject)
    # the batch size along the batch axis the layout found ([seq, batch, ...] inputs of a
    # recurrent model: not axis 0, which the batch matching had to assume)
    subject.batch_info.size = _batch_size(subject, layout.batch_axes)
    direct = {s.input_index: k for k, s in enumerate(layout.sources) if s.value is None}
    tapped = {s.value: k for k, s in enumerate(layout.sources) if s.value is not None}
    timing = {"forward": 0.0, "backward": 0.0}
    clock = _PassClock(subject.device)
    loss_total: torch.Tensor | None = None
    step_sq: dict[int, torch.Tensor] = {}
    example_sq: dict[int, list[torch.Tensor]] = {}  # per example, one entry per pass
    observer = _with_taps(probe, tapped, layout.sources, step_sq, example_sq)
    precision, precision_note = effective_precision(trainable, options.precision)
    # fp16 runs: fp32 gradients of the same batch, to count what fp16 flushed to zero; for a
    # model whose own parameters are fp16, from an fp32 copy of it
    reference: list[torch.Tensor | None] | None = (
        [None] * len(trainable) if precision == "fp16" else None
    )
    fp32_copy = (
        _fp32_copy(subject) if reference is not None and options.precision != "fp16" else None
    )
    batch_notes = batch_statistics_notes(
        layers, _batch_size(subject, layout.batch_axes), options.micro_batches, options.mode
    )
    # a float32 model that computes in float16 (autocast baked in), a BatchNorm given one
    # value per channel: told by the first pass
    first_pass = (
        FirstPass(
            observer,
            half=precision == "fp32",
            batch_norms=_batch_norms(layers, graph, options.mode),
        )
        if graph is not None
        else None
    )
    parts = 0
    loss_notes: list[str] = []
    # what the host learns of the read output in the one transfer (losses.output_checks)
    check_values: torch.Tensor | None = None
    check_context: tuple[list[int], list[int] | None, str] = ([], None, "")
    scale_stats: torch.Tensor | None = None  # a regression target's scale (first part)
    for inputs, target, share in _micro_batches(subject, options.micro_batches, layout.batch_axes):
        parts += 1
        inputs = [
            x.detach().requires_grad_(True) if i in direct else x for i, x in enumerate(inputs)
        ]
        start = clock.mark()
        checks = first_pass if parts == 1 else None
        rng = _rng_state(subject.device) if reference is not None or checks else None
        if probe is not None:
            probe.begin_pass()
        outputs = _forward(subject, inputs, probe, options.precision, checks or observer)
        if checks is not None and checks.single_value_batch_norms:
            name = checks.single_value_batch_norms[0]
            node = next((n for n in graph.nodes if n.name == name), None) if graph else None
            raise BadInputError(
                single_value_batch_norm_message(
                    name,
                    options.micro_batches,
                    options.mode == "train"
                    and (node is None or not uses_batch_statistics(node, "eval")),
                )
            )
        baked = checks.precision() if checks is not None else None
        if baked is not None:
            precision, precision_note = baked
            if precision == "fp16":
                subject.extra[COMPUTES_IN_FP16] = True
                reference = [None] * len(trainable)
                fp32_copy = _fp32_copy(subject)
        if parts == 1:
            check_context = _check_context(graph, outputs, target)
        if subject.loss_kind in ("", "auto"):
            # this part's target beside this part's output (micro-batches split both)
            kind, subject.loss_reason = default_loss(target, default_output_shape(target, outputs))
            subject.loss_kind = class_default(kind, target, check_context[2])
        flags: list[torch.Tensor] | None = [] if parts == 1 else None
        loss = _loss(subject, outputs, target, flags)
        parts_split = share != 1.0
        weight = labelled_share(subject.loss_kind, target, subject.target, share)
        if parts == 1:
            output_names = [spec.name for spec in subject.model_info.outputs]
            loss_notes = loss_input_notes(subject.loss_kind, outputs, target, output_names)
            check_values = (
                flags[0].float().reshape(1)
                if flags
                else output_checks(subject.loss_kind, outputs, target, check_context[2])
            )
            scale_stats = regression_scale_stats(subject.loss_kind, outputs, target)
        middle = clock.mark()
        if loss.requires_grad:  # else nothing trainable reaches it: no_trainable_parameters
            (loss * weight).backward()
        clock.add_pass(start, middle, clock.mark())
        if probe is not None:
            probe.end_pass()
        weighted = loss.detach().float() * weight if parts_split else loss.detach().float()
        loss_total = weighted if loss_total is None else loss_total + weighted
        if reference is not None and rng is not None:
            started = time.perf_counter()
            if fp32_copy is not None:
                copy_subject_, copy_params = fp32_copy
                copy_subject_.loss_kind = subject.loss_kind  # resolved by the first pass
                copy_inputs = [x.float() if x.is_floating_point() else x for x in inputs]
                _add_fp32_gradients(
                    copy_subject_, copy_inputs, target, weight, copy_params, reference, rng
                )
            else:
                _add_fp32_gradients(subject, inputs, target, weight, trainable, reference, rng)
            timing["fp32_reference"] = timing.get("fp32_reference", 0.0)
            timing["fp32_reference"] += time.perf_counter() - started
        for i, key in direct.items():
            grad = inputs[i].grad
            if grad is not None:
                add_step_sums(step_sq, example_sq, key, grad, layout.sources[key].axes)
    start = time.perf_counter()
    pstats = parameter_statistics(
        [p for _, p in trainable], [p.grad for _, p in trainable], reference
    )
    if reference is not None and trainable:
        norms = torch._foreach_norm(
            [
                r.float() if r is not None else torch.zeros(1, device=p.device)
                for r, (_, p) in zip(reference, trainable, strict=True)
            ]
        )
        pstats["fp32_grad_norm"] = torch.stack([n.float() for n in norms])
    if loss_total is None:
        loss_total = torch.zeros((), device=subject.device)
    collected = _collect(pstats, probe, loss_total, step_sq, example_sq)
    for i, x in enumerate(subject.inputs):  # a NaN in the batch is its own origin
        if x.is_floating_point():
            collected[f"input.{i}"] = torch.sum(x, dtype=torch.float64).reshape(1)
            # only -inf besides finite values: an additive attention mask (origin.mask_inputs)
            bad = torch.isnan(x) | torch.isposinf(x)
            collected[f"input_nan_posinf.{i}"] = bad.sum(dtype=torch.float32).reshape(1)
    if check_values is not None:
        collected["loss.checks"] = check_values
    host = _to_host(collected)
    output_values = host.pop("loss.checks", None)
    asked = subject.loss_kind
    subject.loss_kind, subject.loss_reason = resolve_class_default(
        asked, subject.loss_reason, output_values
    )
    loss_notes += output_check_notes(
        asked, subject.loss_kind, *check_context[:2], output_values, check_context[2]
    )
    _dead_fractions(host, probe)
    timing["forward"], timing["backward"] = clock.totals()  # the transfer waited for the passes
    result = _build(subject, layers, trainable, host, probe, layout.sources)
    if probe is not None:
        result.layer_output_sizes = output_sizes_per_example(
            [x.name for x in layers],
            probe.totals.layer_count,
            probe.totals.layer_seen,
            subject.batch_info.size,
        )
    result.target_scale = regression_scale(scale_stats)
    result.frozen_parameters = frozen_parameter_names(subject.extra.get("source"))
    result.untrained_layers = untrained_layers(graph, layers, result.frozen_parameters)
    result.notes.extend(untrained_layers_note(result.untrained_layers))
    origin = result.non_finite_origin
    if origin is not None and graph is not None and origin.op_type != "input":
        origin.values = _trace_origin(subject, graph, origin, layers, options, layout.batch_axes)
    result.notes.extend(layout.notes)
    result.notes.extend(loss_notes)
    result.notes.extend(
        f"input {name!r} holds -inf entries and no NaN: taken as an additive attention mask, "
        "whose -inf the model adds to its scores on purpose (not a NaN/Inf origin)"
        for name in mask_inputs(subject, host)
    )
    result.micro_batches = parts
    result.notes.extend(
        micro_batch_notes(_batch_size(subject, layout.batch_axes), options.micro_batches)
    )
    result.notes.extend(batch_notes)
    result.precision = precision
    left_out = result.profiles.depth.left_out
    if left_out:
        shown = ", ".join(left_out[:5]) + (", ..." if len(left_out) > 5 else "")
        result.notes.append(
            f"{len(left_out)} layer(s) have no measured ‖∂L/∂a‖ and are left out of the depth "
            f"profile and its fit: {shown}"
        )
    if precision_note:
        result.notes.append(precision_note)
    unreached = [name for name, p in trainable if p.grad is None]
    if unreached:
        shown = ", ".join(unreached[:5]) + (", ..." if len(unreached) > 5 else "")
        result.notes.append(
            f"{len(unreached)} parameter(s) received no gradient from this loss (unused, or "
            f"state such as running statistics stored as float initializers): {shown}"
        )
    if graph is not None:  # one more forward pass (per part), for QAT models only
        # a part at a time, as the passes above: no more memory than theirs
        batches = _micro_batches(subject, options.micro_batches, layout.batch_axes)
        result.quantizers = measure_quantizers(graph, (p for p, _, _ in batches), layers)
        first_part = next(iter(_micro_batches(subject, options.micro_batches, layout.batch_axes)))
        result.gradient_cuts = gradient_cuts(graph, layers, result.layers, list(first_part[0]))
    result.notes.extend(zero_gradient_notes(result))
    timing["analysis"] = clock.analysis(start, timing)
    result.timing = timing
    return result


def zero_gradient_notes(m: Measurements) -> list[str]:
    """Trainable parameters whose gradient is exactly zero on this batch while others' is not,
    and that no finding or note explains: a branch no example took (a Mixture-of-Experts
    expert no token was routed to) or one masked off. Explained, so left out: frozen and
    untrained layers (detectors/frozen.py), layers a zero-initialised parameter downstream
    blocks (`zero_init_blocked`), a rounding that cuts the gradient (`gradient_cuts`), a layer
    whose units are all dead (nothing is noted then), the zero-gradient layers at the input
    end of the depth profile (vanishing gradients), entries fp16 flushed (the fp32 reference
    has them), and any run with a non-finite gradient."""
    params = [p for p in m.parameters if p.grad_norm is not None]
    if any(p.non_finite for p in m.parameters) or not any(p.grad_norm for p in params):
        return []
    zero = [p for p in params if p.grad_norm == 0.0 and p.name not in m.frozen_parameters]
    if not zero:
        return []
    explained = set(m.untrained_layers) | set(m.gradient_cuts)
    explained |= set(zero_init_blocked(m, *depth_profile(m)))
    if any(x.activation_stats.dead_fraction == 1.0 for x in m.layers):
        # no gradient before it, and none into the weights it feeds zeros to: dead_units
        return []
    names, norms = depth_profile(m)
    for name, norm in zip(names, norms, strict=True):
        if norm is None:
            continue
        if norm != 0.0:
            break
        explained.add(name)
    shown = [
        p.name
        for p in zero
        if p.layer not in explained and not (m.fp32_grad_norms.get(p.name) or 0.0) > 0.0
    ]
    if not shown:
        return []
    listed = ", ".join(shown[:6]) + (", ..." if len(shown) > 6 else "")
    return [
        f"{len(shown)} parameter(s) got an exactly-zero gradient on this batch while the others "
        f"did not: {listed} (a branch no example took, such as a Mixture-of-Experts expert no "
        "token was routed to, or one masked off); diagnose a batch that reaches them to see "
        "their gradients"
    ]


# -- the graph's layers and probe plan, once per graph ------------------------------------------

# A worker measures the same cached model job after job (and bench/overhead.py call after call):
# grouping the layers and planning the probes is ~1.5 ms of host time before the first kernel,
# which a GPU spends idle. Both depend only on the graph's structure, so they are kept per graph
# object (weakly: a dropped model takes its plan with it) together with a fingerprint of that
# structure; a graph changed in place since (a node, its wiring, a parameter shape, the device)
# is planned afresh. Layers and the plan are only read afterwards; each call gets its own probe
# state (`Probe.fresh`).
_PLANS: weakref.WeakKeyDictionary[ObservableGraph, tuple[Hashable, list[Layer], Probe]] = (
    weakref.WeakKeyDictionary()
)


def _graph_fingerprint(
    graph: ObservableGraph, named: list[tuple[str, torch.nn.Parameter]], device: torch.device
) -> Hashable:
    nodes = tuple(
        (id(n), n.name, n.op_type, n.domain, n.scope, tuple(n.inputs), tuple(n.outputs))
        for n in graph.nodes
    )
    parameters = tuple((name, tuple(p.shape)) for name, p in named)
    masked = tuple(graph.metadata.get("non_finite_states", ()))
    return (str(device), nodes, parameters, tuple(graph.input_names), masked)


def _graph_plan(
    graph: ObservableGraph, named: list[tuple[str, torch.nn.Parameter]], device: torch.device
) -> tuple[list[Layer], Probe]:
    fingerprint = _graph_fingerprint(graph, named, device)
    cached = _PLANS.get(graph)
    if cached is not None and cached[0] == fingerprint:
        return cached[1], cached[2].fresh()
    layers = group_layers(graph)
    probe = Probe(graph, layers, device)
    _PLANS[graph] = (fingerprint, layers, probe)
    return layers, probe.fresh()


# -- running ---------------------------------------------------------------------------------

_MODEL_PRECISION = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def effective_precision(
    trainable: Sequence[tuple[str, torch.Tensor]], requested: str
) -> tuple[str, str | None]:
    """The precision the gradients are really computed in, and a note when it is not the one
    asked for: a model whose floating parameters are all fp16 (bf16) trains in fp16 (bf16)
    whatever `--precision` says (autocast only lowers fp32 ops)."""
    dtypes = {p.dtype for _, p in trainable if p.is_floating_point()}
    own = _MODEL_PRECISION.get(next(iter(dtypes))) if len(dtypes) == 1 else None
    if own is None or own == requested:
        return requested, None
    dtype = str(next(iter(dtypes))).removeprefix("torch.")
    return own, (
        f"the model's parameters are {dtype}: analysed as a {own} run (precision {own}), "
        f"not the {requested} asked for"
    )


def _fp32_copy(subject: Subject) -> tuple[Subject, list[tuple[str, torch.nn.Parameter]]]:
    """An fp32 copy of an fp16 model, for the reference pass that tells which gradient entries
    fp16 flushed to zero; its trainable parameters in the same order as the model's."""
    from service.engine.verify.transforms import copy_subject

    copy_ = copy_subject(subject)
    copy_.module.float()
    if copy_.graph is not None and copy_.graph is not copy_.module:
        copy_.graph.float()
    if copy_.graph is not None:
        for node in copy_.graph.nodes:
            # torch.export asserts the dtypes it traced (`_assert_tensor_metadata(x,
            # dtype=torch.float16)`): in the fp32 copy they no longer hold, by design
            checks_dtype = "assert_tensor_metadata" in node.op_type
            node.fn = _no_op if checks_dtype else _in_fp32(node.fn, canonical(node.op_type))
    named = (
        copy_.graph.named_graph_parameters()
        if copy_.graph is not None
        else list(copy_.module.named_parameters())
    )
    return copy_, [(n, p) for n, p in named if p.requires_grad]


def _no_op(*args: Any) -> None:
    return None


# a cast down to half precision in the fp32 copy passes its fp32 input on unchanged: cast down
# and back up, values and gradients would still be rounded through fp16
_CASTS = frozenset({"cast", "castlike", "tocopy", "to", "todtype", "typeas", "half", "type"})


def _in_fp32(fn: Callable[..., Any], op: str = "") -> Callable[..., Any]:
    """`fn` computing in fp32: its half-precision inputs and outputs cast up. The graph of an
    fp16 model bakes fp16 in (Cast to float16, `torch.full(..., dtype=torch.half)`, a mask of
    `finfo(float16).min`), which in the fp32 copy would meet fp32 values; cast up, those
    casts are no-ops, as in fp32 training. Autocast regions compute in fp32 too."""

    def up(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dtype in _HALF_DTYPES:
            return value.float()
        if isinstance(value, (list, tuple)):
            return type(value)(up(v) for v in value)
        return value

    def in_fp32(*args: Any) -> Any:
        with autocast_regions_off():
            values = [up(a) for a in args]
            out = fn(*values)
        first = values[0] if values else None
        if (
            op in _CASTS
            and isinstance(out, torch.Tensor)
            and out.dtype in _HALF_DTYPES
            and isinstance(first, torch.Tensor)
            and first.dtype == torch.float32
        ):
            return first
        return up(out)

    return in_fp32


def _with_taps(
    probe: Probe | None,
    tapped: dict[str, int],
    sources: list[TimeSource],
    step_sq: dict[int, torch.Tensor],
    example_sq: dict[int, list[torch.Tensor]],
) -> Any:
    """The graph observer: the probe, plus a per-step gradient hook on each tapped value
    (embedding outputs of token inputs)."""
    if not tapped:
        return probe

    def observe(node: Node, outputs: Sequence[Any]) -> None:
        if probe is not None:
            probe(node, outputs)
        for name, value in zip(node.outputs, outputs, strict=False):
            key = tapped.get(name)
            if key is not None and isinstance(value, torch.Tensor) and value.requires_grad:
                value.register_hook(tap_hook(step_sq, example_sq, key, sources[key].axes))

    return observe


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _add_fp32_gradients(
    subject: Subject,
    inputs: list[torch.Tensor],
    target: torch.Tensor | None,
    share: float | torch.Tensor,
    trainable: list[tuple[str, torch.nn.Parameter]],
    into: list[torch.Tensor | None],
    rng: tuple[torch.Tensor, torch.Tensor | None],
) -> None:
    """The fp16 pass's reference: the same micro-batch again in fp32 (no autocast, no probes),
    from the RNG state the fp16 pass started with so dropout draws the same masks; its
    parameter gradients are added into `into`. (BatchNorm running statistics, in train mode,
    see this second batch too.)"""
    after = _rng_state(subject.device)
    _set_rng_state(subject.device, rng)
    try:
        outputs = _forward(subject, [x.detach() for x in inputs], None, "fp32")
        loss = compute_loss(subject.loss_kind, outputs, target)
        grads = torch.autograd.grad(loss * share, [p for _, p in trainable], allow_unused=True)
    finally:
        _set_rng_state(subject.device, after)
    for k, g in enumerate(grads):
        previous = into[k]
        if g is not None:
            into[k] = g if previous is None else previous + g


def _trace_origin(
    subject: Subject,
    graph: ObservableGraph,
    origin: NonFiniteOrigin,
    layers: list[Layer],
    options: DiagnoseOptions,
    batch_axes: dict[int, int],
) -> dict[str, Any]:
    """What the NaN/Inf origin node read and produced (origin.OriginRecorder): the forward
    again, without gradients, micro-batch by micro-batch, up to that node. The RNG state is
    restored after, so dropout masks elsewhere are unchanged."""
    node = next((n for n in graph.nodes if n.name == origin.node), None)
    if node is None:
        return {}
    recorder = None
    rng = _rng_state(subject.device)
    try:
        with torch.no_grad():
            for inputs, _, _ in _micro_batches(subject, options.micro_batches, batch_axes):
                fresh = OriginRecorder(
                    node, graph.initial_values(), dict(zip(graph.input_names, inputs, strict=False))
                )
                if recorder is not None:  # keep accumulating into the first one's counts
                    fresh.inputs, fresh.outputs = recorder.inputs, recorder.outputs
                recorder = fresh
                with contextlib.suppress(OriginReached):
                    _forward(subject, list(inputs), None, options.precision, recorder)
    finally:
        _set_rng_state(subject.device, rng)
    if recorder is None:
        return {}
    layer_of_node = {n: layer.name for layer in layers for n in layer.nodes}
    return recorder.evidence(graph, layer_of_node)


def input_parts(subject: Subject, options: DiagnoseOptions) -> Iterator[list[torch.Tensor]]:
    """The batch's inputs in the parts `measure` runs them in (`options.micro_batches`)."""
    layout = _layout(subject)
    for inputs, _, _ in _micro_batches(subject, options.micro_batches, layout.batch_axes):
        yield inputs


def _layout(subject: Subject) -> SequenceLayout:
    """sequence_layout, told what the batch and the model's declared shapes say about
    sequence-first inputs."""
    return sequence_layout(
        subject.graph,
        subject.inputs,
        [s.name for s in subject.model_info.inputs],
        subject.target,
        [list(s.shape) for s in subject.model_info.inputs],
        [list(s.shape) for s in subject.model_info.outputs],
    )


def _micro_batches(
    subject: Subject, count: int, batch_axes: dict[int, int]
) -> Iterator[tuple[list[torch.Tensor], torch.Tensor | None, float]]:
    """Parts of the batch along each input's batch axis (axis 0 unless a recurrent op reads it
    otherwise, sequence-first inputs [T, B, F] are split along axis 1)."""
    axis0 = batch_axes.get(0, 0)
    size = _batch_size(subject, batch_axes)
    bounds = _split_bounds(size, count)
    if len(bounds) == 2:
        yield list(subject.inputs), subject.target, 1.0
        return
    target_axis = _target_batch_axis(subject, size, axis0)
    for lo, hi in itertools.pairwise(bounds):
        inputs = []
        for i, x in enumerate(subject.inputs):
            axis = batch_axes.get(i, 0)
            split = x.dim() > axis and x.shape[axis] == size
            inputs.append(x.narrow(axis, lo, hi - lo) if split else x)
        target = subject.target
        if target is not None and target_axis is not None:
            target = target.narrow(target_axis, lo, hi - lo)
        yield inputs, target, (hi - lo) / size


def _batch_size(subject: Subject, batch_axes: dict[int, int]) -> int:
    first = subject.inputs[0] if subject.inputs else None
    axis0 = batch_axes.get(0, 0)
    return int(first.shape[axis0]) if first is not None and first.dim() > axis0 else 1


def _split_bounds(size: int, count: int) -> list[int]:
    """Where the batch is cut: `count` parts (at most one per example) as even as rounding
    allows."""
    count = max(1, min(count, size))
    return [round(size * k / count) for k in range(count + 1)]


# ops that only reshape or copy a value: an output computed by `sigmoid(z).squeeze(-1)` is a
# sigmoid's
_SHAPE_ONLY = frozenset(
    {"view", "reshape", "squeeze", "unsqueeze", "flatten", "clone", "contiguous", "alias"}
    | {"identity", "detach", "unsafeview", "expand", "todtype", "to", "cast"}
)


def _check_context(
    graph: ObservableGraph | None, outputs: Sequence[torch.Tensor], target: torch.Tensor | None
) -> tuple[list[int], list[int] | None, str]:
    """For losses.output_check_notes: the read (first floating) output's shape, the target's,
    and the op computing that output where the graph tells ("" otherwise)."""
    ops = _output_ops(graph)
    floats = [k for k, o in enumerate(outputs) if o.is_floating_point()]
    if not floats:
        return [], None, ""
    read = floats[0]
    op = ops[read] if len(ops) == len(outputs) else ""
    return list(outputs[read].shape), list(target.shape) if target is not None else None, op


def _output_ops(graph: ObservableGraph | None) -> list[str]:
    """The canonical op computing each graph output (through reshapes and copies), "" where
    no node does (an input passed through); [] without a graph."""
    if graph is None:
        return []
    producer = {out: node for node in graph.nodes for out in node.outputs if out}
    ops = []
    for name in graph.output_names:
        node = producer.get(name)
        seen = 0
        while node is not None and canonical(node.op_type) in _SHAPE_ONLY and seen < 16:
            node = producer.get(node.inputs[0]) if node.inputs else None
            seen += 1
        ops.append(canonical(node.op_type) if node is not None else "")
    return ops


def _batch_norms(layers: Sequence[Layer], graph: ObservableGraph, mode: str) -> list[str]:
    """The BatchNorms (main node names) that normalise with the batch's statistics in this run:
    a batch of one gives them one value per channel (first_pass.py)."""
    nodes = {n.name: n for n in graph.nodes}
    return [
        x.main
        for x in layers
        if "batchnorm" in canonical(x.op)
        and (x.main not in nodes or uses_batch_statistics(nodes[x.main], mode))
    ]


def batch_statistics_notes(
    layers: Sequence[Layer], size: int, requested: int, mode: str
) -> list[str]:
    """Micro-batches through BatchNorm in train mode: each part is normalised by its own
    statistics, so the accumulated gradients are not the full batch's (as in training with
    gradient accumulation)."""
    normalizing = [x.name for x in layers if "batchnorm" in canonical(x.op)]
    if mode != "train" or requested <= 1 or not normalizing:
        return []
    bounds = _split_bounds(size, requested)
    smallest = min(hi - lo for lo, hi in itertools.pairwise(bounds))
    shown = ", ".join(normalizing[:3]) + (", …" if len(normalizing) > 3 else "")
    return [
        f"the BatchNorm layer(s) {shown} normalise each micro-batch ({smallest}+ examples) by "
        "its own statistics, as with gradient accumulation in training, so the accumulated "
        f"gradients are not those of the whole batch of {size}"
    ]


def single_value_batch_norm_message(node: str, micro_batches: int, eval_helps: bool = True) -> str:
    """A BatchNorm normalising with batch statistics given one value per channel
    (first_pass.py, or torch's own refusal in a converted ONNX graph). `eval_helps`: whether
    it would use its running statistics in eval mode; one exported to use batch statistics
    (`track_running_stats=False`) does in either mode, and eval mode is no way out."""
    split = (
        f" (--micro-batches {micro_batches} leaves micro-batches of one example)"
        if micro_batches > 1
        else ""
    )
    return (
        f"the BatchNorm {node} gets one value per channel{split}: its output would be its "
        "bias alone and no gradient would pass it (torch refuses this in train mode: "
        "'Expected more than 1 value per channel when training'); give it at least two "
        "examples"
        + (" per micro-batch (fewer micro-batches)" if split else "")
        + (
            " or diagnose with --mode eval"
            if eval_helps
            else " (it normalises with batch statistics in eval mode too, as exported)"
        )
    )


def micro_batch_notes(size: int, requested: int) -> list[str]:
    """What the report says when the micro-batches are not the `requested` equal parts."""
    bounds = _split_bounds(size, requested)
    parts = [hi - lo for lo, hi in itertools.pairwise(bounds)]
    notes = []
    if requested > len(parts):
        notes.append(
            f"--micro-batches {requested} is more than the batch's {size} example(s): ran "
            f"{len(parts)} micro-batch(es) of one example each"
        )
    if len(set(parts)) > 1:
        counts = ", ".join(
            f"{parts.count(n)} of {n} example(s)" for n in sorted(set(parts), reverse=True)
        )
        notes.append(
            f"{size} examples do not split evenly into {len(parts)} micro-batches ({counts}); "
            "each part's loss is weighted by its share of the batch (of its labels, for a "
            "class loss with ignored -100 labels), so the accumulated "
            "gradients still equal the full batch's (layers that mix examples, such as "
            "BatchNorm in train mode, see each part's own statistics)"
        )
    return notes


def _target_batch_axis(subject: Subject, size: int, input_axis: int) -> int | None:
    """The target's batch axis: the first input's when the target shares its leading shape
    ([T, B] targets of a [T, B, F] sequence-first model), else axis 0."""
    target = subject.target
    if target is None:
        return None
    first = subject.inputs[0]
    lead = min(target.dim(), first.dim(), input_axis + 1)
    if lead > input_axis and target.shape[:lead] == first.shape[:lead]:
        return input_axis
    if target.dim() and target.shape[0] == size:
        return 0
    raise BadInputError(
        f"cannot split the target of shape {list(target.shape)} into micro-batches: no axis "
        f"of it has the batch size {size}; run with --micro-batches 1"
    )


def _loss(
    subject: Subject,
    outputs: Sequence[torch.Tensor],
    target: torch.Tensor | None,
    flags: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """compute_loss (`flags`: its probability_flags); when the loss was not chosen by the user,
    its error also says which default applied and why, so the fix (`--loss`) is in the
    message."""
    try:
        return compute_loss(subject.loss_kind, outputs, target, flags)
    except BadInputError as exc:
        whole = subject.target
        split = target is not None and whole is not None and target.shape != whole.shape
        if split and isinstance(exc, TargetError):
            raise TargetError(
                f"{exc} (with --micro-batches each part's output is computed from its own "
                "examples: a loss over the whole batch, such as an in-batch contrastive one "
                "whose labels index the batch, needs --micro-batches 1)"
            ) from exc
        if subject.loss_reason in (None, GIVEN_BY_USER) or isinstance(exc, TargetError):
            raise
        raise BadInputError(
            f"{exc}; {subject.loss_kind!r} is the default here ({subject.loss_reason}): "
            "choose the loss with --loss"
        ) from exc


def _forward(
    subject: Subject,
    inputs: list[torch.Tensor],
    probe: Probe | None,
    precision: str,
    observer: Any = None,
) -> list[torch.Tensor]:
    dtype = _AUTOCAST.get(precision)
    context: Any = (
        torch.autocast(device_type=subject.device.type, dtype=dtype)
        if dtype is not None
        else contextlib.nullcontext()
    )
    try:
        with context:
            if subject.graph is not None:
                # ONNX sequence outputs (lists of tensors) are not what a loss reads
                outs = subject.graph.run(inputs, observer)
                return [o for o in outs if isinstance(o, torch.Tensor)]
            out = subject.module(*inputs)
    except torch.OutOfMemoryError as exc:
        raise _out_of_memory(exc) from exc
    except (RuntimeError, IndexError, TypeError, ValueError) as exc:
        if "can't allocate memory" in str(exc) or "out of memory" in str(exc):
            raise _out_of_memory(exc) from exc
        raise _forward_failure(subject, inputs, probe, exc) from exc
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [o for o in out if isinstance(o, torch.Tensor)]
    if isinstance(out, dict):
        return [o for o in out.values() if isinstance(o, torch.Tensor)]
    raise BadInputError(f"the model returned a {type(out).__name__}, not tensors")


class DeviceOutOfMemory(GradhealthError, RuntimeError):
    """Running out of memory is the machine's limit, not a fault in the input (exit 3 / 5xx).
    Also a RuntimeError saying "out of memory", as torch's own, so that callers that retry with
    more micro-batches (service/workers/runner.py) recognise it."""

    code = "out_of_memory"
    status = 507


def _out_of_memory(exc: BaseException) -> GradhealthError:
    return DeviceOutOfMemory(
        f"out of memory while running the model ({first_line(exc)}); try --micro-batches N or "
        "a smaller batch"
    )


_SINGLE_VALUE_BATCH_NORM = "Expected more than 1 value per channel when training"


def _forward_failure(
    subject: Subject, inputs: list[torch.Tensor], probe: Probe | None, exc: Exception
) -> GradhealthError:
    """Whose fault a failed forward is. The batch already matched the model's declared inputs
    (batches.py), so what is left is either the batch (values or dims the declaration cannot
    express: sizes two inputs must share, a length a Reshape needs) or gradhealth. For ONNX,
    onnxruntime decides: if it runs the same batch, the converted graph is at fault and the
    error is an EngineError (5xx, exit 3) that says so, not a request to change the input.
    TorchScript and torch.export models run their own code: an error there is the model's."""
    where = ""
    if probe is not None and subject.graph is not None:
        nodes = subject.graph.nodes
        index = probe.last_node + 1
        if 0 <= index < len(nodes):
            where = f" at node {nodes[index].name!r} ({nodes[index].op_type})"
    ours = failure_line(exc)
    if _SINGLE_VALUE_BATCH_NORM in ours and where:  # torch's batch_norm refused it
        size = subject.batch_info.size
        parts = size // max(1, inputs[0].shape[0]) if inputs and inputs[0].dim() else 1
        options = subject.extra.get("options")
        eval_helps = getattr(options, "mode", "train") == "train" and not uses_batch_statistics(
            nodes[index], "eval"
        )
        return BadInputError(single_value_batch_norm_message(nodes[index].name, parts, eval_helps))
    source = subject.extra.get("source")
    if subject.graph is not None and subject.model_info.format == "onnx" and source is not None:
        from service.engine.onnx import conformance

        try:
            theirs = conformance.reference_failure(source, subject.graph, inputs)
        except conformance.ReferenceUnavailable:
            theirs = ""  # cannot tell: left with the input, as the other formats' errors
        if theirs is None:
            return EngineError(
                f"gradhealth failed to run this ONNX model{where}: {ours}. onnxruntime runs "
                "the same batch, so the fault is in gradhealth's converter, not in the input; "
                "please report it with the model"
            )
        if theirs:
            ours = f"{ours} (onnxruntime fails on it too: {theirs})"
            if _declares_exactly(subject, inputs):
                # nothing about the batch is left to change: the file contradicts itself
                return BadInputError(
                    f"running the model on the batch failed{where}: {ours}; the batch has "
                    "exactly the input shapes the model declares, so the model file itself "
                    "is inconsistent (its exporter wrote shapes its own nodes reject): "
                    "re-export it (the other exporter, another opset, or without the "
                    "feature this node comes from)"
                )
    if _is_micro_batch(subject, inputs):  # the whole batch was not what failed
        return BadInputError(
            f"running the model on a micro-batch failed{where}: {ours}; the model may fix "
            f"its batch size (an export with static shapes) or mix examples: run with "
            "--micro-batches 1, or export the model with a dynamic batch dimension"
        )
    return BadInputError(
        f"running the model on the batch failed{where}: {ours}; check that the batch's "
        "shapes and dtypes match what the model was exported with"
    )


_TORCHSCRIPT_HEADER = "The following operation failed in the TorchScript interpreter"


def failure_line(exc: BaseException) -> str:
    """The line of a failed forward's error that says what went wrong. Mostly the first; a
    TorchScript interpreter error starts with a generic header and two tracebacks, and ends
    with the exception it re-raises ("RuntimeError: mat1 and mat2 shapes cannot be
    multiplied (8x7 and 16x32)")."""
    text = str(exc).strip()
    if text.startswith(_TORCHSCRIPT_HEADER):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if len(lines) > 1:
            return lines[-1]
    return first_line(exc)


def _is_micro_batch(subject: Subject, inputs: list[torch.Tensor]) -> bool:
    """Whether `inputs` are a part of the batch (some input smaller than the batch's)."""
    return any(
        part.shape != whole.shape for part, whole in zip(inputs, subject.inputs, strict=False)
    )


def _declares_exactly(subject: Subject, inputs: list[torch.Tensor]) -> bool:
    """Whether every input's declared shape is all fixed sizes and the batch has them."""
    declared = subject.model_info.inputs
    return len(declared) == len(inputs) and all(
        all(isinstance(d, int) for d in spec.shape) and list(x.shape) == spec.shape
        for spec, x in zip(declared, inputs, strict=True)
    )


class _PassClock:
    """Forward and backward time per pass without stopping the device: on CUDA, events recorded
    on the stream and read after the one transfer (which waited for them anyway); a
    `torch.cuda.synchronize` after each half stalled the host, which then could not queue the
    next kernels while the GPU ran (bench/overhead.py). Elsewhere `time.perf_counter`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.passes: list[tuple[Any, Any, Any]] = []
        self.wall_start: float | None = None

    def mark(self) -> Any:
        if self.wall_start is None:
            self.wall_start = time.perf_counter()
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def add_pass(self, start: Any, middle: Any, end: Any) -> None:
        self.passes.append((start, middle, end))

    def totals(self) -> tuple[float, float]:
        """(forward, backward) seconds summed over the passes; on CUDA only once the events
        are complete (after the transfer), else `elapsed_time` would wait for them."""
        forward = backward = 0.0
        for start, middle, end in self.passes:
            if self.cuda:
                forward += start.elapsed_time(middle) / 1e3
                backward += middle.elapsed_time(end) / 1e3
            else:
                forward += middle - start
                backward += end - middle
        return forward, backward

    def analysis(self, started: float, timing: dict[str, float]) -> float:
        """Seconds of the analysis begun at `started` (host clock). On CUDA the host reaches
        it while the device still runs the backward, which the transfer then waits for: there,
        the whole call's wall time less the device's forward/backward (and fp32 reference)."""
        now = time.perf_counter()
        if not self.cuda or self.wall_start is None:
            return now - started
        passes = timing["forward"] + timing["backward"] + timing.get("fp32_reference", 0.0)
        return max(now - self.wall_start - passes, 0.0)


# -- the one transfer --------------------------------------------------------------------------


def _collect(
    pstats: dict[str, torch.Tensor],
    probe: Probe | None,
    loss: torch.Tensor,
    step_sq: dict[int, torch.Tensor],
    example_sq: dict[int, list[torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {f"param.{k}": v for k, v in pstats.items()}
    out["loss"] = loss.reshape(1)
    for i, sq in step_sq.items():
        out[f"time.{i}"] = sq
    for i, rows in (example_sq or {}).items():
        if rows and all(r.shape[1] == rows[0].shape[1] for r in rows):
            out[f"time_examples.{i}"] = example_spans_on_device(torch.cat(rows))
    if probe is None:
        return out
    totals = probe.totals
    for p, (fwd, bwd) in enumerate(zip(totals.forward_sums, totals.backward_norms, strict=True)):
        out[f"forward.{p}"] = fwd
        out[f"backward.{p}"] = bwd
    if totals.layer_grad_sq is not None:
        assert totals.layer_saturated is not None
        out["layer.grad_sq"] = totals.layer_grad_sq
        for k, (means, variances) in enumerate(
            zip(totals.layer_means, totals.layer_vars, strict=True)
        ):
            out[f"layer.mean.{k}"] = means
            out[f"layer.var.{k}"] = variances
        out["layer.saturated"] = totals.layer_saturated
    if totals.alive:
        # units alive per ReLU layer, in `totals.alive` order: the 0-"norm" counts the non-zero
        # peaks (as count_nonzero, exact integers in float32 below 2^24 units), all layers in
        # one call; `_dead_fractions` turns them into the dead fractions on the host
        out["alive"] = torch.stack(torch._foreach_norm(list(totals.alive.values()), 0))
    return out


def _dead_fractions(host: dict[str, list[float]], probe: Probe | None) -> None:
    """`dead.<layer>`: the fraction of units never non-zero, from the transferred alive counts;
    float32 arithmetic, as the device computed it before (count / units in float32)."""
    if probe is None:
        return
    counts = host.pop("alive", None)
    if counts is None:
        return
    for (index, peaks), alive in zip(probe.totals.alive.items(), counts, strict=True):
        units = peaks.numel()
        dead = np.float32(units - round(alive)) / np.float32(max(units, 1))
        host[f"dead.{index}"] = [float(dead)]


def _flat(t: torch.Tensor) -> torch.Tensor:
    t = t.detach() if t.requires_grad else t
    return t if t.dim() == 1 else t.reshape(-1)


def _to_host(tensors: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """One device→host copy: everything is flattened into one float64 vector first, with one
    concatenation per dtype (not one conversion kernel per entry)."""
    if not tensors:
        return {}
    flat = [_flat(t) for t in tensors.values()]
    lengths = [f.numel() for f in flat]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for position, f in enumerate(flat):
        by_dtype.setdefault(f.dtype, []).append(position)
    groups = [torch.cat([flat[k] for k in positions]) for positions in by_dtype.values()]
    joined = torch.cat([g.to(torch.float64) for g in groups])
    grouped = joined.cpu().tolist()
    values: list[float] = [0.0] * len(grouped)  # back into the order of `tensors`
    starts = list(itertools.accumulate(lengths, initial=0))
    cursor = 0
    for positions in by_dtype.values():
        for k in positions:
            values[starts[k] : starts[k] + lengths[k]] = grouped[cursor : cursor + lengths[k]]
            cursor += lengths[k]
    out: dict[str, list[float]] = {}
    offset = 0
    for key, length in zip(tensors, lengths, strict=True):
        out[key] = values[offset : offset + length]
        offset += length
    return out


# -- building the measurements -----------------------------------------------------------------


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _ratio(num: float, den: float) -> float | None:
    if den > 0 and math.isfinite(den):
        return num / den
    return None


def _build(
    subject: Subject,
    layers: list[Layer],
    trainable: list[tuple[str, torch.nn.Parameter]],
    host: dict[str, list[float]],
    probe: Probe | None,
    sources: list[TimeSource],
) -> Measurements:
    layer_of_param: dict[str, str] = {}
    for layer in layers:
        for name in layer.params:
            layer_of_param.setdefault(name, layer.name)
    parameters = []
    by_name: dict[str, dict[str, float]] = {}
    # the per-parameter vectors, found once (host also holds per-layer and per-pass keys)
    param_vectors = {k.removeprefix("param."): v for k, v in host.items() if k.startswith("param.")}
    for i, (name, p) in enumerate(trainable):
        row = {k: v[i] for k, v in param_vectors.items()}
        numel = max(p.numel(), 1)
        if row["grad_norm"] == 0.0 and row["underflow"] > 0 and p.grad is not None:
            # non-zero entries whose squares are all below float32's range (a 30-layer
            # sigmoid stack's first layer, ~1e-26): the norm in float64, rare, for these only
            row["grad_norm"] = float(torch.linalg.vector_norm(p.grad, dtype=torch.float64))
        row["weight_rms"] = row["weight_norm"] / math.sqrt(numel)
        by_name[name] = row
        parameters.append(
            ParameterReport(
                name=name,
                shape=list(p.shape),
                layer=layer_of_param.get(name),
                grad_norm=row["grad_norm"] if p.grad is not None else None,
                weight_norm=row["weight_norm"],
                grad_to_weight=_ratio(row["grad_norm"], row["weight_norm"])
                if p.grad is not None
                else None,
                non_finite=row["non_finite"] > 0,
                non_finite_count=int(row["non_finite"]),
                fp16_underflow_fraction=row["underflow"] / numel,
                fp16_overflow_fraction=row["overflow"] / numel,
            )
        )
    counts = probe.totals.layer_count if probe is not None else []
    seen = probe.totals.layer_seen if probe is not None else []
    pass_counts = probe.totals.layer_counts if probe is not None else []
    reports = [
        _layer_report(i, layer, host, by_name, counts, seen, pass_counts)
        for i, layer in enumerate(layers)
    ]
    depth = _depth_profile(reports)
    times = []
    time_examples = []  # each profile's examples (their spans of steps with gradient)
    notes: list[str] = []
    for key, source in enumerate(sources):
        sq = host.get(f"time.{key}")
        if sq:
            norms = [math.sqrt(v) for v in sq]
            reached, unreached = reached_steps(norms)
            growth, first_last = _fit(reached)
            i = source.input_index
            name = (
                subject.model_info.inputs[i].name
                if i < len(subject.model_info.inputs)
                else f"input_{i}"
            )
            times.append(
                TimeProfile(
                    input=name,
                    axis=source.axes.time,
                    tensor=describe(source, name),
                    grad_norms=norms,
                    growth_factor=growth,
                    first_last_ratio=first_last,
                    unreached_last_steps=unreached,
                )
            )
            spans = example_spans(host.get(f"time_examples.{key}", []))
            time_examples.append(spans)
            if spans_differ(spans):
                notes.append(lengths_note(name, spans, len(norms)))
    loss_value = host["loss"][0]
    op_types = [n.op_type for n in subject.graph.nodes] if subject.graph is not None else []
    return Measurements(
        layers=reports,
        parameters=parameters,
        profiles=Profiles(depth=depth, time=times),
        time_examples=time_examples,
        notes=notes,
        loss=LossInfo(kind=subject.loss_kind, value=loss_value, reason=subject.loss_reason),
        non_finite_origin=find_origin(subject, layers, host, probe, parameters, loss_value),
        op_types=op_types,
        recurrent_layers=[layer.name for layer in layers if canonical(layer.op) in RECURRENT_OPS],
        fp32_grad_norms={
            name: row["fp32_grad_norm"] for name, row in by_name.items() if "fp32_grad_norm" in row
        },
        normalized=(
            normalized_layers(subject.graph, layers) if subject.graph is not None else None
        ),
    )


def _layer_report(
    index: int,
    layer: Layer,
    host: dict[str, list[float]],
    params: dict[str, dict[str, float]],
    counts: list[int],
    seen: list[bool],
    pass_counts: list[list[int]],
) -> LayerReport:
    grad_sq = sum(params[p]["grad_norm"] ** 2 for p in layer.params if p in params)
    weight_sq = sum(params[p]["weight_norm"] ** 2 for p in layer.params if p in params)
    grad_norm, weight_norm = math.sqrt(grad_sq), math.sqrt(weight_sq)
    # the statistics as keyword arguments, validated once (assigning them one by one to the
    # model costs a pydantic __setattr__ each, ~5 per layer); the same fields are set
    stats: dict[str, Any] = {"activation": layer.activation}
    activation_grad = None
    if "layer.mean.0" in host and seen[index] and counts[index] > 0:
        count = counts[index]
        _, mean, var = combine_moments(
            [
                (n[index], host[f"layer.mean.{k}"][index], host[f"layer.var.{k}"][index])
                for k, n in enumerate(pass_counts)
            ]
        )
        stats["mean"] = mean
        stats["std"] = math.sqrt(var) if math.isfinite(var) else var
        if layer.activation in SATURATING:
            stats["saturated_fraction"] = host["layer.saturated"][index] / count
        activation_grad = math.sqrt(host["layer.grad_sq"][index])
    if layer.activation in RELU_LIKE and f"dead.{index}" in host:
        stats["dead_fraction"] = host[f"dead.{index}"][0]
    init_ratio = None
    if layer.weight is not None and layer.weight in params:
        reference = reference_std(layer)
        if reference:
            # weight RMS = ‖W‖/√n: the scale He/Xavier prescribe as a std for zero-mean init
            init_ratio = params[layer.weight]["weight_rms"] / reference
    return LayerReport(
        name=layer.name,
        op=layer.op,
        depth=layer.depth,
        activation_grad_norm=activation_grad,
        activation_stats=ActivationStats(**stats),
        params=list(layer.params),
        grad_norm=grad_norm if layer.params else None,
        weight_norm=weight_norm if layer.params else None,
        grad_to_weight=_ratio(grad_norm, weight_norm) if layer.params else None,
        fan_in=layer.fan_in,
        init_std_ratio=init_ratio,
        init_reference=_init_reference(layer) if init_ratio is not None else None,
        fan_out=layer.fan_out,
        output_head=bool(layer.extra.get("output_head")),
    )


def _init_reference(layer: Layer) -> str:
    """Which std `reference_std` compared the weight with."""
    if isinstance(layer.extra.get("hidden_size"), int):
        return "recurrent"
    return "he" if reference_scheme(layer.init_activation) == "kaiming" else "xavier"


def _fit(norms: Sequence[float | None]) -> tuple[float | None, float | None]:
    """(growth factor per step, first/last ratio). The factor is the detectors' own fit
    (`detectors.profile.growth_factor`, Theil–Sen), so the profile and the findings agree."""
    growth = growth_factor(norms)
    first_last = None
    if norms and norms[0] is not None and norms[-1] is not None:
        first, last = norms[0], norms[-1]
        if math.isfinite(first) and math.isfinite(last):
            first_last = first / last if last > 0 else (math.inf if first > 0 else None)
    return growth, first_last


def _depth_profile(reports: list[LayerReport]) -> DepthProfile:
    """Layers without a ‖∂L/∂a‖ (a recurrent layer whose output gradient is not observed, a
    layer off the loss's path) are left out of the profile and of its fit, and counted."""
    measured = [r for r in reports if r.activation_grad_norm is not None]
    left_out = [r.name for r in reports if r.activation_grad_norm is None]
    norms: list[float | None] = [r.activation_grad_norm for r in measured]
    growth, first_last = _fit(norms)
    return DepthProfile(
        layers=[r.name for r in measured],
        grad_norms=norms,
        growth_factor=growth,
        first_last_ratio=first_last,
        layers_left_out=len(left_out),
        left_out=left_out,
    )


# -- parameters-only coverage ----------------------------------------------------------------


def module_layers(module: torch.nn.Module, names: list[str]) -> list[Layer]:
    """Layers of a module that cannot be observed: its parameters grouped by owning submodule,
    in parameter order; op = the submodule's class (TorchScript keeps it as `original_name`)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        prefix = name.rsplit(".", 1)[0] if "." in name else name
        groups.setdefault(prefix, []).append(name)
    shapes = {name: list(p.shape) for name, p in module.named_parameters()}
    layers = []
    for depth, (prefix, params) in enumerate(groups.items()):
        sub: Any = module
        for part in prefix.split("."):  # ScriptModules have no get_submodule
            sub = getattr(sub, part, None)
        op = (
            str(getattr(sub, "original_name", type(sub).__name__))
            if sub is not None
            else "parameter"
        )
        layer = Layer(
            name=prefix, op=op, depth=depth, main=prefix, nodes=[], params=params, output=""
        )
        weight = next((p for p in params if p.endswith("weight")), None)
        if weight is not None and canonical(op) in {"linear", "conv1d", "conv2d", "conv3d"}:
            shape = shapes[weight]
            # fan-in only: the activation after it is not visible, so no He/Xavier reference
            layer.fan_in = shape[1] * math.prod(shape[2:]) if len(shape) >= 2 else None
        layers.append(layer)
    return layers
