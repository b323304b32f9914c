"""Fix transforms applied to a COPY of a Subject: the user's model is never touched.

- `copy_subject`: parameters and nodes copied, the source objects (FX nodes, ONNX protos,
  the loaded program) shared, since transforms never modify those.
- `swap_activations`: replace sigmoid/tanh (or ReLU) node functions in the ObservableGraph;
  op types are compared through `optypes.canonical_op`, so ONNX "Sigmoid", FX "sigmoid" and
  "aten.sigmoid.default" are one case.
- `reinitialize`: He/Xavier/zero/orthogonal re-initialisation of named parameters, or an
  LSTM forget / GRU update gate's bias (bias_ih + bias_hh, ONNX Wb + Rb) set to 1, with the
  fans and the std formula of the init_scale reference (layers.parameter_fans, init_std):
  ONNX exports may store weights transposed and a grouped conv's fans are per group, so
  torch's own fan computation from the tensor layout could be wrong.
- `guard_node`: clamp the input of the op that produced the first NaN/Inf; a log that reads a
  softmax's output (log(softmax(z)), which underflows to log(0) = -inf) is computed as
  log_softmax(z) instead (`use_log_softmax`): finite, with exact gradients, where a clamp
  would cut the gradient of every clamped entry.

Each returns a short description of what it changed, or raises `NotApplicable(reason)`.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from service.engine.advice.evidence import (
    GATE_LAYOUT,
    GATE_OF_SCHEME,
    SoftmaxFeed,
    gate_bias_slices,
    hidden_bias_name,
    softmax_feeding,
)
from service.engine.detectors.optypes import aten_style, canonical_op
from service.engine.graph import ObservableGraph
from service.engine.layers import group_layers, init_std, parameter_fans, weight_fans
from service.engine.measurements import Subject
from service.engine.origin import exp_input_limit

REINIT_SEED = 0  # re-initialisation is reproducible: same fix, same numbers
GUARD_EPS = 1e-6


class NotApplicable(Exception):
    """The transform cannot be applied to this subject; the message says why."""


def copy_subject(subject: Subject) -> Subject:
    module = subject.module
    memo: dict[int, Any] = {}
    graphs = [g for g in (subject.graph, module) if isinstance(g, ObservableGraph)]
    for graph in graphs:
        for node in graph.nodes:
            memo[id(node.source)] = node.source  # FX nodes / ONNX protos: shared, read-only
            memo[id(node.fn)] = node.fn
        memo[id(graph.metadata)] = graph.metadata
    new_module = _copy_module(module, memo, subject.device)
    if subject.graph is None:
        new_graph = None
    elif subject.graph is module:
        new_graph = new_module
    else:
        new_graph = copy.deepcopy(subject.graph, memo)
    return dataclasses.replace(
        subject,
        module=new_module,
        graph=new_graph,  # type: ignore[arg-type]
        extra=dict(subject.extra),
    )


def _copy_module(module: nn.Module, memo: dict[int, Any], device: torch.device) -> nn.Module:
    if isinstance(module, torch.jit.ScriptModule):
        # deepcopy of a ScriptModule yields non-leaf parameters (no .grad); a save/load round
        # trip gives a true copy
        buffer = io.BytesIO()
        torch.jit.save(module, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer, map_location=device)
        loaded.train(module.training)
        return loaded
    return copy.deepcopy(module, memo)


# -- activation swap -----------------------------------------------------------------------------

_NEW_ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str, str]] = {
    # name → (fn, FX/aten op type, ONNX op type)
    "ReLU": (torch.relu, "relu", "Relu"),
    "LeakyReLU": (lambda x: F.leaky_relu(x, 0.01), "leaky_relu", "LeakyRelu"),
    "GELU": (F.gelu, "gelu", "Gelu"),
}


def swap_activations(
    subject: Subject,
    old: set[str],
    new: str,
    *,
    outputs: Collection[str] = frozenset(),
    kept: Collection[str] = frozenset(),
) -> list[str]:
    """Replace every node whose canonical op is in `old` by `new`; graph outputs are kept (an
    output activation defines what the model predicts: a sigmoid's probability), except the
    nodes in `outputs`: an output activation the finding itself names (a ReLU output head
    dead for every example passes no gradient at all, and swapping the hidden ones instead
    verified a different change). Nodes in `kept` stay (a frozen backbone's, which the fix is
    not about). Returns the swapped node names."""
    graph = subject.graph
    if graph is None:
        raise NotApplicable(
            "the model could not be made observable (probe coverage parameters_only), so its "
            "activations cannot be swapped"
        )
    fn, fx_type, onnx_type = _NEW_ACTIVATIONS[new]
    graph_outputs = set(graph.output_names)
    swapped: list[str] = []
    for node in graph.nodes:
        if canonical_op(node.op_type) not in old or node.name in kept:
            continue
        if graph_outputs.intersection(node.outputs) and node.name not in outputs:
            continue
        node.fn = _unary(fn)
        onnx_like = node.op_type[:1].isupper() and not aten_style(node.op_type)
        node.op_type = onnx_type if onnx_like else fx_type
        node.attrs = {}
        swapped.append(node.name)
    if not swapped:
        frozen = " and the frozen layers nothing trainable is upstream of" if kept else ""
        raise NotApplicable(f"no {'/'.join(sorted(old))} node outside the graph outputs{frozen}")
    return swapped


def layer_nodes(subject: Subject, layers: Collection[str]) -> set[str]:
    """The graph nodes of the named layers (layers.group_layers, as measured)."""
    if subject.graph is None or not layers:
        return set()
    return {n for x in group_layers(subject.graph) if x.name in layers for n in x.nodes}


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    def activation(x: torch.Tensor, *_ignored: Any) -> torch.Tensor:
        return fn(x)

    return activation


# -- re-initialisation ---------------------------------------------------------------------------


def _tensor(subject: Subject, name: str) -> torch.Tensor:
    if subject.graph is not None and name in subject.graph.param_names:
        return subject.graph.parameter(name)
    params = dict(subject.module.named_parameters())
    if name not in params:
        raise NotApplicable(f"parameter {name!r} not found in the model")
    return params[name]


def reinitialize(subject: Subject, schemes: dict[str, str]) -> list[str]:
    """Re-initialise each named parameter by its scheme; returns what was done per tensor.
    He/Xavier stds are the init_scale reference's own (layers.init_std over the layer's fans,
    a grouped conv's per group), so that a re-initialised weight reads as ratio 1."""
    generator = torch.Generator().manual_seed(REINIT_SEED)
    fans = parameter_fans(subject.graph) if subject.graph is not None else {}
    done: list[str] = []
    with torch.no_grad():
        for name, scheme in schemes.items():
            if scheme.startswith("no_bias_"):
                raise NotApplicable(
                    f"{name} has no bias parameter (built with bias=False?): a parameter cannot "
                    f"be added to the graph, so rebuild it with bias=True and set the gate bias"
                )
            tensor = _tensor(subject, name)
            # without a graph (a module measured by its parameters), torch's fans of the shape,
            # as the measurement's own fallback (detectors.units.init_ratio) reads them
            fan_in, fan_out = fans.get(name) or weight_fans(tuple(tensor.shape))
            if scheme == "zero_bias":
                tensor.zero_()
                done.append(f"{name}: zeros")
                continue
            if scheme in GATE_OF_SCHEME:  # no_bias_* raised above
                done.append(_gate_bias_one(subject, name, tensor, scheme))
                continue
            if scheme == "orthogonal":
                fresh = torch.empty(tensor.shape, dtype=torch.float32)
                nn.init.orthogonal_(fresh, generator=generator)
                tensor.copy_(fresh)
                done.append(f"{name}: orthogonal")
                continue
            std = init_std(scheme, fan_in, fan_out)
            if std is None:
                raise NotApplicable(f"no automatic transform for initialisation {scheme!r}")
            fresh = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std
            tensor.copy_(fresh.to(tensor.device, tensor.dtype))
            done.append(
                f"{name}: normal(0, {std:.3g}) ({scheme}, fan-in {fan_in}, fan-out {fan_out})"
            )
    return done


def _optional_tensor(subject: Subject, name: str) -> torch.Tensor | None:
    try:
        return _tensor(subject, name)
    except NotApplicable:
        return None


def _gate_bias_one(subject: Subject, name: str, tensor: torch.Tensor, scheme: str) -> str:
    """The LSTM forget / GRU update gate's bias, bias_ih + bias_hh (ONNX: Wb + Rb), set to 1:
    the input slice 1 and the hidden slice 0, as the usual recipe (Jozefowicz et al. 2015)
    initialises it. Setting bias_ih's slice alone would leave the sum at 1 + bias_hh's."""
    op = GATE_OF_SCHEME[scheme]
    gate = "forget" if op == "lstm" else "update"
    gates = GATE_LAYOUT[op][0]
    partner_name = hidden_bias_name(name)
    partner = None
    if not scheme.startswith("onnx_") and partner_name != name:
        partner = _optional_tensor(subject, partner_name)
    views = gate_bias_slices(tensor, scheme, partner)
    if views is None:
        layout = f"ONNX B [dirs, {2 * gates}H]" if scheme.startswith("onnx_") else f"{gates} gates"
        raise NotApplicable(f"{name} is not an {op.upper()} bias ({layout})")
    views[0].fill_(1.0)
    for view in views[1:]:
        view.zero_()
    if scheme.startswith("onnx_"):
        h = tensor.shape[1] // (2 * gates)
        block = GATE_LAYOUT[op][2]
        wb, rb = block * h, (gates + block) * h
        return f"{name}: {gate}-gate bias 1 (ONNX B[:, {wb}:{wb + h}] = 1, B[:, {rb}:{rb + h}] = 0)"
    if len(views) > 1:
        return f"{name}: {gate}-gate bias 1 ({partner_name}'s {gate} slice 0: their sum is 1)"
    return f"{name}: {gate}-gate bias 1"


# -- numerics guard ------------------------------------------------------------------------------


def _clamp_min(low: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x.clamp_min(low)


def _away_from_zero(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        return x
    small = x.abs() < GUARD_EPS
    return torch.where(small, torch.full_like(x, GUARD_EPS), x)


# canonical op → (index of the input to guard, guard)
_GUARDS: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "log": (0, _clamp_min(GUARD_EPS)),
    "log2": (0, _clamp_min(GUARD_EPS)),
    "log10": (0, _clamp_min(GUARD_EPS)),
    "log1p": (0, _clamp_min(-1.0 + GUARD_EPS)),
    "sqrt": (0, _clamp_min(GUARD_EPS)),
    "rsqrt": (0, _clamp_min(GUARD_EPS)),
    "reciprocal": (0, _away_from_zero),
    "div": (1, _away_from_zero),
    "pow": (0, _clamp_min(GUARD_EPS)),  # negatives, and 0 where p < 1 (infinite gradient)
    "exp": (0, lambda x: x.clamp_max(exp_input_limit(x.dtype))),
    "acos": (0, lambda x: x.clamp(-1 + GUARD_EPS, 1 - GUARD_EPS)),
    "asin": (0, lambda x: x.clamp(-1 + GUARD_EPS, 1 - GUARD_EPS)),
}


def guard_node(subject: Subject, node_name: str) -> str:
    graph = subject.graph
    if graph is None:
        raise NotApplicable("the model has no observable graph, so no op can be guarded")
    node = next((n for n in graph.nodes if n.name == node_name), None)
    if node is None:
        raise NotApplicable(f"node {node_name!r} not found in the graph")
    op = canonical_op(node.op_type)
    if op == "log" and softmax_feeding(graph, node_name) is not None:
        return use_log_softmax(subject, node_name)
    if op not in _GUARDS:
        raise NotApplicable(f"no automatic guard for op {node.op_type!r}; guard it by hand")
    position, guard = _GUARDS[op]
    original = node.fn

    def guarded(*values: Any) -> Any:
        values_list = list(values)
        if position < len(values_list) and isinstance(values_list[position], torch.Tensor):
            values_list[position] = guard(values_list[position])
        return original(*values_list)

    node.fn = guarded
    return f"guarded input {position} of {node_name!r} ({node.op_type})"


def _log_softmax(feed: SoftmaxFeed) -> Callable[..., torch.Tensor]:
    dim, dtype = feed.dim, feed.dtype

    def log_softmax(z: torch.Tensor, *_ignored: Any) -> torch.Tensor:
        if not feed.flattened:
            return F.log_softmax(z, dim, dtype=dtype)
        # ONNX Softmax before opset 13: over the dims from `axis` on, flattened (as converted)
        axis = dim + z.dim() if dim < 0 else dim
        flat = z.reshape(*z.shape[:axis], -1) if axis > 0 else z.reshape(1, -1)
        return F.log_softmax(flat, -1, dtype=dtype).reshape(z.shape)

    return log_softmax


def use_log_softmax(subject: Subject, node_name: str) -> str:
    """Rewire the log that reads a softmax's output to compute log_softmax of the softmax's own
    input, over the same axis: log(softmax(z)) → log_softmax(z). The softmax node stays (other
    ops may read it); only the log's input and function change."""
    feed = softmax_feeding(subject.graph, node_name)
    if subject.graph is None or feed is None:
        raise NotApplicable(f"node {node_name!r} is no log of a softmax's output")
    node = next(n for n in subject.graph.nodes if n.name == node_name)
    onnx_like = node.op_type[:1].isupper() and not aten_style(node.op_type)
    node.inputs = [feed.logits]  # a new list: the run plan notices the rewiring
    node.fn = _log_softmax(feed)
    node.op_type = "LogSoftmax" if onnx_like else "log_softmax"
    node.attrs = {"axis": feed.dim} if onnx_like else {}
    return (
        f"replaced log(softmax) in {node_name!r} (log of {feed.node!r}, dim {feed.dim}) by "
        f"log_softmax of the softmax's input {feed.logits!r}"
    )
