"""An FX graph (from `torch.export`) → ObservableGraph: one `Node` per `call_function`.

Parameters keep the names `named_parameters()` gives them in the source model (the get_attr
targets, e.g. `layer1.0.conv1.weight`), buffers stay buffers, and every aten op's output becomes
an observable value named after its FX node.

Mode (CONTRACT.md §2): in `train` mode normalization uses batch statistics even when the
program was exported for inference, and dropout is off unless asked for; in `eval` mode the
graph runs exactly as exported. Batch norm in train mode is given no running statistics so a
diagnosis never mutates the model (a fix verification re-measures the same graph).

Device and layout: an exported graph records what it saw when it was traced, usually on the
CPU. Ops that create tensors carry that device as an argument (`aten.zeros(..., device=cpu)`
for an RNN's initial state); those nodes take the graph's current device instead (they read
`DEVICE_VALUE`), so the graph runs wherever `.to()` put it. And `aten.view` runs as
`aten.reshape`: the trace dropped every `.contiguous()` that was a no-op on the CPU, and on
CUDA some kernels return other strides (flash / memory-efficient attention), where the view
would fail. Reshape returns the same view wherever a view is possible, so nothing changes for a
graph that ran before; where it is not, it copies, which an exported (functional) graph cannot
tell apart.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from service.engine.formats.fx_regions import REGION_CONTEXTS, run_in_regions
from service.engine.graph import DEVICE_VALUE, Node, ObservableGraph
from service.errors import UnsupportedModelError

aten = torch.ops.aten

# Ops whose output aliases their input or only moves data: they cannot create a NaN/Inf, so
# the probes skip their forward finiteness check (see probes.py).
VIEW_OPS = frozenset(
    {
        "view",
        "_unsafe_view",
        "reshape",
        "permute",
        "transpose",
        "t",
        "expand",
        "slice",
        "select",
        "unsqueeze",
        "squeeze",
        "flatten",
        "getitem",
        "clone",
        "contiguous",
        "detach",
        "alias",
        "unflatten",
        "split",
        "chunk",
        "unbind",
        "cat",
        "stack",
        "_to_copy",
        "to",
        "lift_fresh_copy",
    }
)

# Views run as reshapes (module docstring): same arguments (self, size).
_RESHAPING_VIEWS = frozenset({aten.view.default})

_DROPOUT_OPS = {"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"}
_DROPOUT_OPS |= {"native_dropout"}
# Ops with a dropout inside: (position, keyword) of their dropout probability, set to 0 in train
# mode unless dropout is asked for. MultiheadAttention in training calls
# scaled_dot_product_attention with dropout_p = its dropout; a stacked LSTM/GRU/RNN drops out
# between its layers.
_INNER_DROPOUT: dict[Any, tuple[int, str]] = {
    aten.scaled_dot_product_attention.default: (4, "dropout_p"),
    aten.lstm.input: (5, "dropout"),
    aten.gru.input: (5, "dropout"),
    aten.rnn_tanh.input: (5, "dropout"),
    aten.rnn_relu.input: (5, "dropout"),
}


def _expected_bernoulli(x: torch.Tensor, p: Any = 0.5, *_: Any, **__: Any) -> torch.Tensor:
    """bernoulli(x, p)'s expected value: p everywhere. A drop-path (stochastic depth) mask,
    `x.new_empty(...).bernoulli_(keep) / keep`, is then 1, the module's eval behaviour."""
    expected = torch.as_tensor(p, dtype=x.dtype, device=x.device).clamp(0.0, 1.0)
    return expected.expand(torch.broadcast_shapes(x.shape, expected.shape)).clone()


def _expected_bernoulli_of(probabilities: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
    return probabilities.clamp(0.0, 1.0).clone()


# Random masks drawn by sampling (drop path, hand-written dropout): in train mode without
# --dropout each sample is its expected value, as dropout is off, so the run is reproducible.
_BERNOULLI: dict[Any, Callable[..., Any]] = {
    aten.bernoulli.default: _expected_bernoulli_of,
    aten.bernoulli.p: _expected_bernoulli,
    aten.bernoulli.Tensor: _expected_bernoulli,
    aten.bernoulli_.float: _expected_bernoulli,
    aten.bernoulli_.Tensor: _expected_bernoulli,
}


_UNIFORM_DRAWS = frozenset({aten.rand.default, aten.rand_like.default})


def _floored_draw_keep(fx_node: fx.Node) -> float | None:
    """keep of `floor(rand(...) + keep)`: Hugging Face's drop path (`keep + torch.rand(shape)`
    then `floor_()`), a Bernoulli(keep) sample; None for any other node."""
    if fx_node.target not in (aten.floor.default, aten.floor_.default) or not fx_node.args:
        return None
    added = fx_node.args[0]
    if not isinstance(added, fx.Node) or added.target is not aten.add.Tensor:
        return None
    draws = [a for a in added.args if isinstance(a, fx.Node) and a.target in _UNIFORM_DRAWS]
    scalars = [a for a in added.args if isinstance(a, (int, float))]
    if len(draws) != 1 or len(scalars) != 1 or len(added.args) != 2:
        return None
    return float(scalars[0])


def _expected_floored_draw(summed: torch.Tensor, keep: float) -> torch.Tensor:
    """floor(keep + u)'s expected value, keep (in [0, 1]), in the draw's shape."""
    return torch.full_like(summed, min(max(keep, 0.0), 1.0))


def op_name(target: Any) -> str:
    """`aten.linear.default` → "linear"; builtins by their name (`operator.getitem` → "getitem")."""
    packet = getattr(target, "_overloadpacket", None)
    if packet is not None:
        return str(packet.__name__)
    return str(getattr(target, "__name__", target))


def _train_mode_fn(target: Any, dropout: bool) -> tuple[Callable[..., Any], str] | None:
    """The replacement callable for `target` in train mode, or None to keep it."""
    name = op_name(target)
    if target is aten.batch_norm.default:

        def batch_norm(x, w, b, _rm, _rv, _training, momentum, eps, cudnn):
            return aten.batch_norm.default(x, w, b, None, None, True, momentum, eps, cudnn)

        return batch_norm, name
    if target is aten._native_batch_norm_legit_no_training.default:

        def batch_norm_nt(x, w, b, _rm, _rv, momentum, eps):
            out = aten.batch_norm.default(x, w, b, None, None, True, momentum, eps, False)
            empty = x.new_empty((0,))
            return (out, empty, empty)

        return batch_norm_nt, "batch_norm"
    if target is aten.instance_norm.default:

        def instance_norm(x, w, b, _rm, _rv, _use_input_stats, momentum, eps, cudnn):
            return aten.instance_norm.default(x, w, b, None, None, True, momentum, eps, cudnn)

        return instance_norm, name
    if name in _DROPOUT_OPS:

        def dropout_fn(x, p, _train):
            return target(x, p, dropout)

        return dropout_fn, name
    if target in _BERNOULLI and not dropout:
        return _BERNOULLI[target], name
    if target in _INNER_DROPOUT and not dropout:
        position, keyword = _INNER_DROPOUT[target]

        def without_dropout(*args: Any, **kwargs: Any) -> Any:
            if len(args) > position:
                args = (*args[:position], 0.0, *args[position + 1 :])
            if keyword in kwargs:
                kwargs = {**kwargs, keyword: 0.0}
            return target(*args, **kwargs)

        return without_dropout, name
    return None


def _value_name(node: fx.Node, attr_names: dict[str, str]) -> str:
    return attr_names.get(node.name, node.name)


def _make_fn(
    target: Callable[..., Any], args: Any, kwargs: Any, slots: list[fx.Node]
) -> Callable[..., Any]:
    """A callable taking the values of `slots` (in order) and calling `target` with the
    original args/kwargs where each FX node reference is replaced by its value."""
    index = {n: i for i, n in enumerate(slots)}
    simple = not kwargs and all(isinstance(a, fx.Node) for a in args)
    if simple:
        positions = [index[a] for a in args]
        if positions == list(range(len(slots))):
            return target
        return lambda *values: target(*[values[p] for p in positions])

    def call(*values: Any) -> Any:
        sub = lambda n: values[index[n]]  # noqa: E731
        return target(*fx.node.map_arg(args, sub), **fx.node.map_arg(kwargs, sub))

    return call


def _make_device_following_fn(
    target: Callable[..., Any], args: Any, kwargs: Any, slots: list[fx.Node]
) -> Callable[..., Any]:
    """Like `_make_fn`, for a node whose args hold a `torch.device` (the one it was traced on):
    the callable takes one more value, the graph's device, which replaces every such arg."""
    index = {n: i for i, n in enumerate(slots)}

    def call(*values: Any) -> Any:
        *node_values, device = values
        sub = lambda n: node_values[index[n]]  # noqa: E731
        place = lambda a: device if isinstance(a, torch.device) else a  # noqa: E731
        call_args = [place(a) for a in fx.node.map_arg(args, sub)]
        call_kwargs = {k: place(v) for k, v in fx.node.map_arg(kwargs, sub).items()}
        return target(*call_args, **call_kwargs)

    return call


def _holds_device(args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    return any(isinstance(a, torch.device) for a in (*args, *kwargs.values()))


def unique_inputs(args: Iterable[Any], kwargs: dict[str, Any]) -> list[fx.Node]:
    seen: dict[fx.Node, None] = {}
    fx.node.map_arg((tuple(args), kwargs), lambda n: seen.setdefault(n, None))
    return list(seen)


def graph_from_fx(
    gm: fx.GraphModule,
    *,
    parameter_names: Sequence[str],
    input_names: list[str] | None = None,
    mode: str = "train",
    dropout: bool = False,
    metadata: dict[str, Any] | None = None,
    unread_aliases: frozenset[str] = frozenset(),
) -> ObservableGraph:
    """Build the ObservableGraph of `gm`.

    `parameter_names`: the get_attr targets that are trainable (the source model's
    `named_parameters()` names, in its order, which the graph keeps); any other tensor
    attribute becomes a buffer, and any other attribute (a submodule of a higher-order op,
    a script object) a constant.
    `input_names`: names for the placeholders, in order (default: the placeholder targets).
    `unread_aliases`: other names of a tied parameter that the graph reads under one name
    only; they are no tensors of their own (no copy, no "unused parameter" note).
    """
    wanted = set(parameter_names)
    parameters: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    constants: dict[str, Any] = {}
    attr_names: dict[str, str] = {}  # FX node name → value name
    placeholders: list[str] = []
    nodes: list[Node] = []
    output_names: list[str] = []
    for fx_node in gm.graph.nodes:
        if fx_node.op == "get_attr":
            target = str(fx_node.target)
            if target in unread_aliases and not fx_node.users:
                continue
            attr_names[fx_node.name] = target
            value = _get_attr(gm, target)
            if isinstance(value, torch.Tensor) and target in wanted:
                parameters[target] = nn.Parameter(value.detach(), requires_grad=True)
            elif isinstance(value, torch.Tensor):
                buffers[target] = value.detach()
            else:
                constants[target] = value
        elif fx_node.op == "placeholder":
            name = input_names[len(placeholders)] if input_names else str(fx_node.target)
            attr_names[fx_node.name] = name
            placeholders.append(name)
        elif fx_node.op == "call_function":
            nodes.append(_convert_call(fx_node, attr_names, mode, dropout))
        elif fx_node.op == "call_module":
            if str(fx_node.target).startswith("_guards"):
                continue  # shape guards of the exported program: the batch checks replace them
            raise UnsupportedModelError(
                f"node {fx_node.name!r} calls submodule {fx_node.target!r}; re-export the model "
                "with torch.export (a flat aten graph) to diagnose it"
            )
        elif fx_node.op == "call_method":
            method = str(fx_node.target)
            slots = unique_inputs(fx_node.args, fx_node.kwargs)
            fn = _make_fn(
                lambda obj, *a, _m=method, **k: getattr(obj, _m)(*a, **k),
                fx_node.args,
                fx_node.kwargs,
                slots,
            )
            nodes.append(
                Node(
                    name=fx_node.name,
                    op_type=method,
                    inputs=[_value_name(s, attr_names) for s in slots],
                    outputs=[fx_node.name],
                    fn=fn,
                    source=fx_node,
                )
            )
        elif fx_node.op == "output":
            flat = unique_inputs([fx_node.args[0]], {})
            output_names = [_value_name(n, attr_names) for n in flat]
    order = {name: i for i, name in enumerate(parameter_names)}
    parameters = dict(sorted(parameters.items(), key=lambda item: order[item[0]]))
    missing = set(parameter_names) - set(parameters) - unread_aliases
    shown = ", ".join(sorted(missing)[:5]) + (", …" if len(missing) > 5 else "")
    notes = (
        [
            f"{len(missing)} parameter(s) the graph never reads (an unused module) get no "
            f"gradient and are not reported: {shown}"
        ]
        if missing
        else []
    )
    meta = dict(metadata or {})
    meta.setdefault("notes", []).extend(notes)
    return ObservableGraph(
        nodes,
        input_names=placeholders,
        output_names=output_names,
        parameters=parameters,
        buffers=buffers,
        constants=constants,
        metadata=meta,
    )


def _convert_call(fx_node: fx.Node, attr_names: dict[str, str], mode: str, dropout: bool) -> Node:
    target = fx_node.target
    assert callable(target)
    name = op_name(target)
    if target is operator.getitem:
        name = "getitem"
    slots = unique_inputs(fx_node.args, fx_node.kwargs)
    replacement = _train_mode_fn(target, dropout) if mode == "train" else None
    keep = _floored_draw_keep(fx_node) if mode == "train" and not dropout else None
    if keep is not None:
        replacement = (functools.partial(_expected_floored_draw, keep=keep), name)
    if replacement is not None:
        fn_target, name = replacement
    elif target in _RESHAPING_VIEWS:
        fn_target = aten.reshape.default  # see the module docstring; op_type stays "view"
    else:
        fn_target = target
    inputs = [_value_name(s, attr_names) for s in slots]
    if _holds_device(fx_node.args, fx_node.kwargs):
        fn = _make_device_following_fn(fn_target, fx_node.args, fx_node.kwargs, slots)
        inputs.append(DEVICE_VALUE)
    else:
        fn = _make_fn(fn_target, fx_node.args, fx_node.kwargs, slots)
    regions = fx_node.meta.get(REGION_CONTEXTS)
    if regions:  # inlined from an autocast / no_grad region (fx_regions.py)
        fn = run_in_regions(fn, regions)
    return Node(
        name=fx_node.name,
        op_type=name,
        inputs=inputs,
        outputs=[fx_node.name],
        fn=fn,
        domain="aten",
        source=fx_node,
        scope=_module_scope(fx_node),
    )


def _module_scope(fx_node: fx.Node) -> str | None:
    """The innermost module path in `nn_module_stack` ({key: (path, type)}, outermost first)."""
    stack = fx_node.meta.get("nn_module_stack") or {}
    entries = list(stack.values())
    path = entries[-1][0] if entries and isinstance(entries[-1], tuple) else None
    return path if isinstance(path, str) and path else None


def _get_attr(gm: nn.Module, dotted: str) -> Any:
    value: Any = gm
    for part in dotted.split("."):
        value = getattr(value, part)
    return value
