"""Where the batch and time axes of the model's inputs are, and which tensors get a time profile.

Layouts differ: `nn.LSTM(batch_first=True)` reads [batch, time, feature], the default
`nn.LSTM()` reads [time, batch, feature]. The time profile (‖∂L/∂x_t‖ per step) and the
micro-batch split both need the right axes, so they are read off the recurrent ops:

- ONNX graphs: `service.engine.onnx.ops.recurrent.sequence_axes` (RNN/GRU/LSTM `layout`,
  followed back through Transpose and axis-preserving ops to the graph inputs);
- FX graphs (torch.export, TorchScript converted to FX): `aten.lstm/gru/rnn_tanh/rnn_relu`
  with their `batch_first` argument, followed back through transpose/permute and
  axis-preserving ops the same way;
- 1-D convolutions (ONNX Conv/ConvTranspose, aten convolution with a rank-3 weight) read
  [batch, channels, time]: their data input's steps are along axis 2, followed back the same
  way (a Conv1d front end, WaveNet, TCNs).

Token inputs (integer ids feeding an embedding / Gather of a parameter) have no gradient: their
profile is taken of the embedding's output instead, ‖∂L/∂e_t‖ per step, whose leading axes are
the ids' axes.

When nothing reads an input's axes (no recurrent op or 1-D convolution reaches it: a
Transformer, a TorchScript model run parameters-only), a rank-3 float input and a rank-2 token
input are read sequence-first, [time, batch, ...] (`nn.Transformer`'s and `nn.LSTM`'s default
`batch_first=False`), where the batch or the graph says so (`_sequence_first_evidence`): a
target whose leading size is the input's axis 1 and not its axis 0 (a [B] target of a [T, B, F]
input), the model's first output whose leading size is the input's axis 1 (declared with the
same symbol, or with the same size in a static export), another input shaped [axis 1, axis 0]
(a [B, T] key-padding mask), or, where axes 0 and 1 differ in size, the self-attention the
input feeds (attention_layout.py: its scores [batch × heads, T, T] run over axis 0, as
`nn.MultiheadAttention`'s with `batch_first=False`; in a `.pt2` and in ONNX from either
exporter). Otherwise they fall back to batch axis 0, time axis 1 (batch-first), and a note
says so and how to say otherwise. An input of batch size 1 is never read sequence-first (a
flattened [T] target of a [1, T, F] input has T rows too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from service.engine.attention_layout import attention_reads_sequence_first
from service.engine.graph import Node, ObservableGraph
from service.engine.layers import canonical


@dataclass(frozen=True)
class StepAxes:
    batch: int
    time: int


@dataclass
class TimeSource:
    """One time profile: of graph input `input_index` itself, or (token inputs) of the
    embedding output `value` computed from it."""

    input_index: int
    axes: StepAxes
    value: str | None = None  # the embedding output's value name; None: the input itself
    known: bool = True  # False: the batch-first fallback


@dataclass
class SequenceLayout:
    sources: list[TimeSource]
    batch_axes: dict[int, int]  # graph input index → its batch axis (micro-batch split)
    notes: list[str]


_FX_RECURRENT = frozenset({"lstm", "gru", "rnntanh", "rnnrelu"})
# padding keeps the axes in place (a causal Conv1d's left pad, F.pad before a TCN layer)
_FX_PADS = frozenset(
    {"constantpadnd", "pad", "reflectionpad1d", "replicationpad1d", "circularpad1d"}
)
_ONNX_RECURRENT = frozenset({"RNN", "GRU", "LSTM"})
# Ops whose output keeps their data input's leading axes in order.
_FX_PRESERVING = frozenset(
    {"dropout", "nativedropout", "add", "sub", "mul", "div", "neg", "relu", "tanh", "sigmoid"}
    | {"gelu", "silu", "elu", "leakyrelu", "hardtanh", "clone", "contiguous", "todtype", "to"}
    | {"alias", "detach", "layernorm", "nativelayernorm", "linear", "type_as", "typeas"}
    | _FX_PADS
)
_FX_FIRST_ONLY = frozenset({"linear", "layernorm", "nativelayernorm", "todtype", "to"} | _FX_PADS)
_ONNX_PRESERVING = frozenset(
    {"Identity", "Cast", "CastLike", "Dropout", "Relu", "LeakyRelu", "Elu", "Sigmoid", "Tanh"}
    | {"Gelu", "Add", "Sub", "Mul", "Div", "Neg", "LayerNormalization", "MatMul", "Gemm", "Pad"}
)
_ONNX_FIRST_ONLY = frozenset({"MatMul", "Gemm", "LayerNormalization", "Pad"})


def _recurrent_x_axes(node: Node) -> StepAxes | None:
    """(batch, time) axes of the data input X of a recurrent node, or None if not one."""
    if node.domain == "aten" and canonical(node.op_type) in _FX_RECURRENT:
        source = node.source
        target = getattr(source, "target", None)
        if getattr(target, "_overloadname", "input") != "input":
            return None  # the packed-sequence overload has no batch_first
        args = getattr(source, "args", ())
        if not args or not isinstance(args[-1], bool):
            return None
        return StepAxes(0, 1) if args[-1] else StepAxes(1, 0)
    if node.domain in ("", "ai.onnx") and node.op_type in _ONNX_RECURRENT:
        from service.engine.layers import _attr

        layout = _attr(node, "layout")
        return StepAxes(0, 1) if layout == 1 else StepAxes(1, 0)
    return None


_FX_CONVOLUTIONS = frozenset({"convolution", "conv1d", "convtranspose1d"})
_ONNX_CONVOLUTIONS = frozenset({"Conv", "ConvTranspose"})
CHANNELS_FIRST = StepAxes(0, 2)  # a 1-D convolution's [batch, channels, time]


def _conv1d_x_axes(node: Node, weights: dict[str, Any]) -> StepAxes | None:
    """[batch, channels, time] for the data input of a 1-D convolution (a rank-3 weight):
    its steps are along axis 2 (a Conv1d front end, WaveNet, TCNs), else None."""
    if node.domain == "aten" and canonical(node.op_type) in _FX_CONVOLUTIONS:
        args = tuple(getattr(node.source, "args", ()))
        weight = getattr(args[1], "meta", {}).get("val") if len(args) > 1 else None
        rank = weight.dim() if isinstance(weight, torch.Tensor) else None
    elif node.domain in ("", "ai.onnx") and node.op_type in _ONNX_CONVOLUTIONS:
        weight = weights.get(node.inputs[1]) if len(node.inputs) > 1 else None
        rank = weight.dim() if isinstance(weight, torch.Tensor) else None
    else:
        return None
    return CHANNELS_FIRST if rank == 3 else None


def _rank(node: Node) -> int | None:
    value = getattr(node.source, "meta", {}).get("val") if node.source is not None else None
    return value.dim() if isinstance(value, torch.Tensor) else None


def _backwards(node: Node, axes: StepAxes) -> list[tuple[str, StepAxes]]:
    """The producer `node`'s inputs and the axes they carry, given its output's axes."""
    if node.domain == "aten":
        op = canonical(node.op_type)
        args: tuple[Any, ...] = tuple(getattr(node.source, "args", ()))
        if op in ("transpose", "swapaxes") and len(args) == 3:
            rank = _rank(node)
            d0, d1 = int(args[1]), int(args[2])
            if d0 < 0 or d1 < 0:
                if rank is None:
                    return []
                d0, d1 = d0 % rank, d1 % rank
            swap = {d0: d1, d1: d0}
            return [
                (
                    node.inputs[0],
                    StepAxes(swap.get(axes.batch, axes.batch), swap.get(axes.time, axes.time)),
                )
            ]
        if op == "permute" and len(args) == 2:
            dims = [int(d) for d in args[1]]
            rank = len(dims)
            dims = [d % rank for d in dims]
            return [(node.inputs[0], StepAxes(dims[axes.batch], dims[axes.time]))]
        if op in _FX_PRESERVING:
            followed = node.inputs[:1] if op in _FX_FIRST_ONLY else node.inputs
            return [(name, axes) for name in followed]
        return []
    if node.op_type == "Transpose":
        from service.engine.layers import _attr

        perm = _attr(node, "perm")
        if perm is None:
            return []
        perm = [int(p) for p in perm]  # type: ignore[attr-defined]
        return [(node.inputs[0], StepAxes(perm[axes.batch], perm[axes.time]))]
    if node.op_type in _ONNX_PRESERVING:
        followed = node.inputs[:1] if node.op_type in _ONNX_FIRST_ONLY else node.inputs
        return [(name, axes) for name in followed]
    return []


def traced_axes(graph: ObservableGraph) -> dict[str, StepAxes]:
    """Every value (graph input or intermediate) that reaches a recurrent op's or a 1-D
    convolution's data input through layout-following ops → its (batch, time) axes. A value
    reached with two different layouts is left out."""
    producer = {out: node for node in graph.nodes for out in node.outputs if out}
    stored = set(graph.param_names) | set(graph.buffer_names) | set(graph.constants)
    weights = graph.initial_values()
    found: dict[str, StepAxes | None] = {}
    for node in graph.nodes:
        x_axes = _recurrent_x_axes(node) or _conv1d_x_axes(node, weights)
        if x_axes is None or not node.inputs:
            continue
        pending = [(node.inputs[0], x_axes)]
        seen: set[str] = set()
        while pending:
            value, axes = pending.pop()
            if not value or value in seen or value in stored:
                continue
            seen.add(value)
            found[value] = axes if found.get(value, axes) == axes else None
            source = producer.get(value)
            if source is not None:
                pending.extend(_backwards(source, axes))
    return {name: axes for name, axes in found.items() if axes is not None}


# ops between a graph input and a recurrent op's initial state that keep its batch axis where
# it is (an ONNX export slices one layer's states out of h0 along axis 0)
_STATE_PRESERVING = frozenset(
    {"Identity", "Cast", "Slice", "clone", "contiguous", "to", "todtype", "alias", "detach"}
    | {"slice", "select"}
)


def _initial_states(node: Node) -> tuple[list[str], int] | None:
    """The values a recurrent node reads as its initial states and their batch axis: torch's
    h0/c0 are [layers × directions, batch, hidden] whatever `batch_first` says; ONNX's
    initial_h/initial_c [directions, batch, hidden], or [batch, directions, hidden] with
    layout=1."""
    if node.domain == "aten" and canonical(node.op_type) in _FX_RECURRENT:
        args = tuple(getattr(node.source, "args", ()))
        if len(args) < 2:
            return None
        hx = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        # node.inputs are the args flattened: the sequence, then the states (the FX node
        # names may differ from the graph's value names: a TorchScript model's `h0_1`)
        return [v for v in node.inputs[1 : 1 + len(hx)] if v], 1
    if node.domain in ("", "ai.onnx") and node.op_type in _ONNX_RECURRENT:
        from service.engine.layers import _attr

        # the NodeProto's own inputs: the converter may pass the weights otherwise
        # (per direction, recurrent_weights.py) but reads the states as the file names them
        original = list(getattr(node.source, "input", node.inputs))
        states = [v for v in original[5:7] if v]
        return states, 0 if _attr(node, "layout") == 1 else 1
    return None


def state_batch_axes(graph: ObservableGraph) -> dict[str, int]:
    """Graph input → its batch axis, for the inputs a recurrent op reads as initial states
    (directly, or sliced per layer): they must be split with the sequence into micro-batches
    and have no time axis."""
    producer = {out: node for node in graph.nodes for out in node.outputs if out}
    inputs = set(graph.input_names)
    found: dict[str, int | None] = {}
    for node in graph.nodes:
        states = _initial_states(node)
        if states is None:
            continue
        values, axis = states
        for value in values:
            seen: set[str] = set()
            while value and value not in seen:
                seen.add(value)
                if value in inputs:
                    found[value] = axis if found.get(value, axis) == axis else None
                    break
                source = producer.get(value)
                op = source.op_type if source is not None else ""
                if source is None or (
                    op not in _STATE_PRESERVING and canonical(op) not in _STATE_PRESERVING
                ):
                    break
                value = source.inputs[0]
    return {name: axis for name, axis in found.items() if axis is not None}


def _input_axes(graph: ObservableGraph, traced: dict[str, StepAxes]) -> dict[str, StepAxes]:
    """Graph input → axes; ONNX graphs through the converter's own `sequence_axes`."""
    known = {name: traced[name] for name in graph.input_names if name in traced}
    if any(n.domain in ("", "ai.onnx") and n.op_type in _ONNX_RECURRENT for n in graph.nodes):
        from service.engine.onnx.ops.recurrent import sequence_axes

        for name, axes in sequence_axes(graph).items():
            known[name] = StepAxes(axes.batch, axes.time)
    return known


def _embeddings(graph: ObservableGraph, inputs: list[torch.Tensor]) -> dict[int, str]:
    """Token input index → the output of the embedding (aten.embedding, ONNX Gather on axis 0
    of a parameter) that reads it first."""
    index_of = {name: i for i, name in enumerate(graph.input_names)}
    params = set(graph.param_names)
    found: dict[int, str] = {}
    for node in graph.nodes:
        op = canonical(node.op_type)
        if op not in ("embedding", "gather") or len(node.inputs) < 2:
            continue
        if op == "gather":
            from service.engine.layers import _attr

            if int(_attr(node, "axis") or 0) != 0:  # type: ignore[call-overload]
                continue
        table, ids = node.inputs[0], node.inputs[1]
        i = index_of.get(ids)
        tokens = i is not None and i < len(inputs) and not inputs[i].is_floating_point()
        if table in params and tokens and i is not None:
            found.setdefault(i, node.outputs[0])
    return found


def _sequence_first_evidence(
    i: int,
    inputs: list[torch.Tensor],
    input_names: list[str],
    target: torch.Tensor | None,
    declared_inputs: list[list[Any]],
    declared_outputs: list[list[Any]],
    graph: ObservableGraph | None = None,
) -> str | None:
    """Why input `i` (a rank-3 float or rank-2 token input whose axes no op tells) is
    sequence-first, [time, batch, ...] (module docstring); None when nothing says so."""
    x = inputs[i]
    if x.dim() < 2:
        return None
    first, second = int(x.shape[0]), int(x.shape[1])
    if first == second or first == 1:
        return None
    if target is not None and target.dim() == 1 and int(target.shape[0]) == first:
        return None  # one label per entry of axis 0: batch-first
    shape = list(x.shape)
    if target is not None and target.dim() >= 1 and int(target.shape[0]) == second:
        return (
            f"the target {list(target.shape)} has {second} rows, the size of its axis 1, "
            f"not {first}"
        )
    declared = declared_inputs[i] if i < len(declared_inputs) else []
    out = declared_outputs[0] if declared_outputs else []
    if out and len(declared) == x.dim():
        lead = out[0]
        symbolic = isinstance(lead, str) and declared[1] == lead and declared[0] != lead
        static = all(isinstance(d, int) for d in declared) and declared == shape and lead == second
        if symbolic or static:
            return f"the model's output {list(out)} leads with the size of its axis 1"
    for j, other in enumerate(inputs):
        if j != i and other.dim() == 2 and list(other.shape) == [second, first]:
            name = input_names[j] if j < len(input_names) else f"input_{j}"
            return f"input {name!r} {list(other.shape)} reads as [batch, time] beside it"
    return attention_reads_sequence_first(graph, inputs, i) if graph is not None else None


def _time_axes_text(name: str, x: torch.Tensor, evidence: str | None, what: str) -> str:
    """The note on an input whose axes no op tells (module docstring)."""
    if evidence is not None:
        return (
            f"{what} {name!r} {list(x.shape)} is read sequence-first, [time, batch, ...] "
            f"(batch size {x.shape[1]}, time axis 0), as no recurrent op's layout could be "
            f"traced to it: {evidence}"
        )
    return (
        f"{what} {name!r} {list(x.shape)}: axis 0 taken as the batch and axis 1 as time "
        "(batch-first assumed: no recurrent op's layout could be traced to it); if it is "
        "sequence-first [time, batch, ...] (batch_first=False, nn.Transformer's and "
        "nn.LSTM's default), give a target with one row per example ([batch]) or export the "
        "model with batch_first=True"
    )


def sequence_layout(
    graph: ObservableGraph | None,
    inputs: list[torch.Tensor],
    input_names: list[str],
    target: torch.Tensor | None = None,
    declared_inputs: list[list[Any]] | None = None,
    declared_outputs: list[list[Any]] | None = None,
) -> SequenceLayout:
    """The time profiles to take and each input's batch axis. `target` and the model's
    declared input and output shapes tell a sequence-first input where no op does."""
    sources: list[TimeSource] = []
    batch_axes: dict[int, int] = {}
    notes: list[str] = []
    known: dict[str, StepAxes] = {}
    embeddings: dict[int, str] = {}
    traced: dict[str, StepAxes] = {}
    states: dict[str, int] = {}
    if graph is not None:
        traced = traced_axes(graph)
        known = _input_axes(graph, traced)
        embeddings = _embeddings(graph, inputs)
        states = state_batch_axes(graph)
    evidence_from = (
        inputs,
        input_names,
        target,
        declared_inputs or [],
        declared_outputs or [],
        graph,
    )
    for i, x in enumerate(inputs):
        name = input_names[i] if i < len(input_names) else f"input_{i}"
        graph_name = graph.input_names[i] if graph is not None else None
        if graph_name in states and graph_name not in known:  # an initial state: no time axis
            batch_axes[i] = states[graph_name]
            continue
        axes = known.get(graph_name) if graph_name is not None else None
        if i in embeddings:
            value = embeddings[i]
            value_axes = traced.get(value) or axes
            if value_axes is not None:
                sources.append(TimeSource(i, value_axes, value))
                batch_axes[i] = value_axes.batch
            elif x.dim() == 2:
                evidence = _sequence_first_evidence(i, *evidence_from)
                step = StepAxes(0, 1) if evidence is None else StepAxes(1, 0)
                sources.append(TimeSource(i, step, value, known=False))
                if evidence is not None:
                    batch_axes[i] = 1
                notes.append(
                    _time_axes_text(name, x, evidence, "token input")
                    + f" (its time profile is of its embedding output {value!r})"
                )
            continue
        if axes is not None:
            batch_axes[i] = axes.batch
            if x.is_floating_point():
                sources.append(TimeSource(i, axes))
        elif x.is_floating_point() and x.dim() == 3:
            evidence = _sequence_first_evidence(i, *evidence_from)
            sources.append(
                TimeSource(i, StepAxes(0, 1) if evidence is None else StepAxes(1, 0), known=False)
            )
            if evidence is not None:
                batch_axes[i] = 1
            notes.append(_time_axes_text(name, x, evidence, "input"))
    return SequenceLayout(sources=sources, batch_axes=batch_axes, notes=notes)


def describe(source: TimeSource, input_name: str) -> str:
    """What tensor a profile is of, for the report."""
    if source.value is None:
        return f"∂L/∂{input_name} (the input)"
    return f"∂L/∂{source.value} (embedding output of token input {input_name})"


def step_sums(grad: torch.Tensor, axes: StepAxes) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ over every axis but the time axis of g², float32 (the report's profile), and the same
    per example, [batch, time] (None where the gradient has no separate batch and time
    axes), both from one squaring, on the device."""
    sq = grad.float().square()
    summed = sq.sum(dim=[d for d in range(grad.dim()) if d != axes.time])
    if grad.dim() < 2 or axes.batch == axes.time or max(axes.batch, axes.time) >= grad.dim():
        return summed, None
    rest = [d for d in range(grad.dim()) if d not in (axes.batch, axes.time)]
    per_example = sq.sum(dim=rest) if rest else sq
    return summed, per_example if axes.batch < axes.time else per_example.t()


def add_step_sums(
    store: dict[int, Any],
    examples: dict[int, list[torch.Tensor]],
    key: int,
    grad: torch.Tensor,
    axes: StepAxes,
) -> None:
    """Adds one pass's gradient: the profile summed over the passes (micro-batches), the
    per-example rows gathered, as each micro-batch holds other examples."""
    sq, per_example = step_sums(grad, axes)
    store[key] = sq if key not in store else store[key] + sq
    if per_example is not None:
        examples.setdefault(key, []).append(per_example)


def tap_hook(
    store: dict[int, Any], examples: dict[int, list[torch.Tensor]], key: int, axes: StepAxes
) -> Any:
    def hook(grad: torch.Tensor) -> None:
        add_step_sums(store, examples, key, grad, axes)

    return hook


# -- examples of different lengths -------------------------------------------------------------
#
# A padded batch (lengths [30, 12, 5] zero-padded to 30 steps, a mask, a masked mean) gives
# each example's steps past its length exactly no gradient, and the batch-summed profile's
# last step holds only the longest example's gradient while its first step holds every
# example's: a first/last ratio of 130 where no example's own exceeds 6 (a false exploding
# finding). Each example's span of steps with gradient, and the gradient at its two ends, are
# found on the device and come back in the one transfer (4 numbers per example, not its
# steps); the time detector judges such a batch per example.


@dataclass(frozen=True)
class ExampleSpan:
    """One example's steps with gradient: the first and the last (inclusive), and ‖∂L/∂x_t‖
    at them; `start` > `end` when none has any."""

    start: int
    end: int
    first: float
    last: float

    @property
    def steps(self) -> int:
        return self.end - self.start + 1


def example_spans_on_device(per_example: torch.Tensor) -> torch.Tensor:
    """[examples, time] Σ g² → [4, examples]: first and last step with a non-zero (or
    non-finite) gradient, Σ g² at each; no host read."""
    count, steps = per_example.shape
    reached = per_example != 0  # NaN counts as reached: its own detectors report it
    index = torch.arange(steps, device=per_example.device)
    start = torch.where(reached, index, steps).amin(dim=1)
    end = torch.where(reached, index, -1).amax(dim=1)
    first = per_example.gather(1, start.clamp(max=steps - 1).unsqueeze(1)).squeeze(1)
    last = per_example.gather(1, end.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.stack([start.float(), end.float(), first, last]).reshape(4, count)


def example_spans(values: list[float]) -> list[ExampleSpan]:
    """`example_spans_on_device`'s values, on the host."""
    count = len(values) // 4
    start, end, first, last = (values[k * count : (k + 1) * count] for k in range(4))
    return [
        ExampleSpan(int(s), int(e), math.sqrt(f), math.sqrt(la))
        for s, e, f, la in zip(start, end, first, last, strict=True)
    ]


def spans_differ(spans: list[ExampleSpan]) -> bool:
    """Do the examples that get any gradient reach different steps (padding, or a mask)?"""
    reached = {(s.start, s.end) for s in spans if s.start <= s.end}
    return len(reached) > 1


def lengths_note(name: str, spans: list[ExampleSpan], steps: int) -> str:
    lengths = sorted(s.steps for s in spans if s.start <= s.end)
    return (
        f"the time profile of input {name!r} sums {len(lengths)} examples whose steps with "
        f"gradient differ ({lengths[0]}–{lengths[-1]} of {steps} steps; steps past an "
        "example's length, padding or masked out, get none): its later steps hold only the "
        "longer examples' gradients, so its first/last ratio is no decay over time; the "
        "time check reads each example over its own steps"
    )
