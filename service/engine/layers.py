"""Grouping the nodes of an ObservableGraph into "layers", the unit the report talks about.

A layer is a node that consumes a parameter-derived value together with data (its "main"
node: Linear, Conv, MatMul with a weight, BatchNorm, LayerNorm, an embedding, ...), plus:
- an elementwise bias/scale node right after it (ONNX `MatMul` + `Add(bias)` is one layer),
- tuple unpacking (`getitem`) of its output (of several getitems, the one read further: torch's
  LSTM gives output, h_n, c_n, and a model reading only the output is measured on it),
- the activation that follows it, when the main node's output feeds only that activation.

A value is *parameter-derived* when it is a parameter or computed only from parameters and
constants (e.g. `Transpose(weight)` in ONNX exports of `nn.Linear`); *data* when it depends on a
graph input. Layers are listed in execution order; `depth` is that index (0 = nearest the input).

A layer's name is the common dotted prefix of its main node's parameters' names
(`layer1.0.conv1`), which is the module path for torch models; else that of all its parameters;
else the main node's source module path (`Node.scope`: dynamo ONNX exports rename folded or
merged weights `val_97` but record each node's module, as FX does); otherwise the main node's
name. A name already taken by an earlier layer (the dynamo optimizer merges equal initializers,
so `blocks.1.ln` may read `blocks.0.ln.weight`) gives way to the scope. Several recurrent
layers of one module path (ONNX splits a `num_layers=2` nn.LSTM into two LSTM nodes) are named
`lstm.l0`, `lstm.l1` by torch's `_l<k>` parameter suffix, else by their graph order.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

from service.engine.graph import Node, ObservableGraph


def canonical(op_type: str) -> str:
    """`leaky_relu_` / `LeakyRelu` → `leakyrelu`: one spelling for FX, ONNX and TorchScript."""
    return op_type.lower().replace("_", "")


# Activations whose derivative vanishes for large |x| (saturated_fraction is reported).
SATURATING = frozenset({"sigmoid", "tanh", "hardsigmoid", "hardtanh", "softsign"})
# Activations with an exact zero region (dead_fraction is reported).
RELU_LIKE = frozenset({"relu", "relu6", "threshold"})
# Activations initialised with He (Kaiming) rather than Xavier (Glorot).
HE_FAMILY = frozenset(
    {"relu", "relu6", "threshold", "leakyrelu", "gelu", "elu", "selu", "celu", "silu", "swish"}
    | {"mish", "hardswish", "prelu"}
)
ACTIVATIONS = SATURATING | HE_FAMILY | frozenset({"softplus", "logsigmoid"})
NORMALIZATIONS = frozenset(
    {"batchnorm", "layernorm", "groupnorm", "instancenorm", "nativebatchnorm"}
    | {"batchnormalization", "layernormalization", "groupnormalization", "rmsnorm"}
    | {"instancenormalization", "nativelayernorm", "nativegroupnorm"}
)
_MATMUL = frozenset({"matmul", "mm", "bmm", "addmm", "gemm"})
# Ops that add, scale, select or join a parameter rather than multiply it into a sum over
# inputs: a position embedding added (`x + pos`), a relative-position bias table indexed into
# an attention mask (Swin), a class token concatenated, an expert's weight picked by its index
# (a mixture of experts' `w[idx]`, ONNX GatherND). No fan-in, nothing to compare with
# He/Xavier.
_NO_FAN_IN = frozenset(
    {"add", "sub", "mul", "div", "where", "index", "indexselect", "cat", "concat", "expand"}
    | {"scaleddotproductattention", "maskedfill", "slice", "getitem", "gathernd"}
)
# Recurrent ops → gates per hidden unit. Their input weight is [gates*H, in] (torch, per layer)
# or [dirs, gates*H, in] (ONNX W); the recurrent one [gates*H, H] / [dirs, gates*H, H] (R).
RECURRENT_GATES = {
    "lstm": 4,
    "lstmcell": 4,
    "gru": 3,
    "grucell": 3,
    "rnn": 1,
    "rnntanh": 1,
    "rnnrelu": 1,
    "rnntanhcell": 1,
    "rnnrelucell": 1,
}


def recurrent_gates(op_type: str) -> int | None:
    """Gates of a recurrent op (`aten.lstm.input`, `LSTM`, `gru`), else None."""
    op = canonical(op_type)
    if op.startswith("aten."):
        op = op.split(".")[1]
    return RECURRENT_GATES.get(op)


_BIAS_OPS = frozenset({"add", "sub", "mul", "div"})
_PASSTHROUGH = frozenset({"getitem"})
_SHAPE_ONLY = frozenset(
    {"reshape", "view", "unsqueeze", "cast", "castlike", "identity", "tocopy", "to", "typeas"}
)


@dataclass
class Layer:
    name: str
    op: str  # the main node's op type
    depth: int
    main: str  # main node name
    nodes: list[str]
    params: list[str]  # parameter value names, in graph order
    output: str  # the value whose gradient is the layer's ‖∂L/∂output‖
    activation: str | None = None  # canonical op of the attached activation
    init_activation: str | None = None  # the nonlinearity that decides He vs Xavier
    fan_in: int | None = None
    fan_out: int | None = None
    weight: str | None = None  # the parameter whose scale is compared with He/Xavier
    extra: dict[str, object] = field(default_factory=dict)
    main_params: list[str] = field(default_factory=list)  # the ones the main node reads
    scope: str | None = None  # the main node's source module path, when known
    # more values whose gradient is part of the layer's ‖∂L/∂output‖: a recurrent layer's
    # final states read beside (or instead of) its output sequence
    grad_outputs: list[str] = field(default_factory=list)


def _consumers(nodes: list[Node]) -> dict[str, list[int]]:
    """Value → the nodes computing with it (a CastLike reading only its dtype is not one)."""
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in dict.fromkeys(_values_read(node)):
            consumers.setdefault(name, []).append(index)
    return consumers


def group_layers(graph: ObservableGraph) -> list[Layer]:
    nodes = graph.nodes
    params = set(graph.param_names)
    data: set[str] = set(graph.input_names)
    derived: dict[str, set[str]] = {p: {p} for p in params}  # value → parameters it comes from
    consumers = _consumers(nodes)
    graph_outputs = set(graph.output_names)
    shapes = {name: list(graph.parameter(name).shape) for name in params}
    producers = {out: node for node in nodes for out in node.outputs if out}
    layers: list[Layer] = []
    claimed: set[int] = set()
    for index, node in enumerate(nodes):
        read = _values_read(node)
        data_in = [v for v in read if v in data]
        param_in = [v for v in read if v in derived]
        if data_in:
            data.update(o for o in node.outputs if o)
        elif param_in:
            sources = set().union(*(derived[v] for v in param_in))
            for out in node.outputs:
                if out:
                    derived[out] = sources
            continue
        if not data_in or not param_in:
            continue
        owned = [p for p in dict.fromkeys(v for src in param_in for v in sorted(derived[src]))]
        if index in claimed:
            # an activation with a parameter of its own (PReLU's slope) that a layer took as
            # its follower: that layer owns the parameter too
            owner = next((layer for layer in reversed(layers) if node.name in layer.nodes), None)
            if owner is not None:
                owner.params.extend(p for p in owned if p not in owner.params)
            continue
        previous = layers[-1] if layers else None
        if (
            previous is not None
            and canonical(node.op_type) in _BIAS_OPS
            and data_in == [previous.output]
            and len(consumers.get(previous.output, [])) == 1
            and previous.activation is None
        ):
            previous.nodes.append(node.name)
            previous.params.extend(p for p in owned if p not in previous.params)
            previous.output = node.outputs[0]
            claimed.add(index)
            _attach_followers(previous, index, nodes, consumers, claimed, graph_outputs)
            continue
        layer = Layer(
            name="",
            op=_affine_of_normalization(node, producers) or node.op_type,
            depth=len(layers),
            main=node.name,
            nodes=[node.name],
            params=owned,
            output=node.outputs[0],
            main_params=list(owned),
            scope=node.scope,
        )
        if recurrent_gates(node.op_type) is not None:  # ONNX: Y, then Y_h and Y_c
            layer.grad_outputs = [
                v for v in node.outputs[1:] if v and _read(v, consumers, graph_outputs)
            ]
        _fan(layer, node, param_in, shapes)
        claimed.add(index)
        _attach_followers(layer, index, nodes, consumers, claimed, graph_outputs)
        layers.append(layer)
    _name_layers(layers)
    _init_activations(layers, nodes, consumers)
    _mark_output_heads(layers, nodes, consumers, graph_outputs)
    return layers


def _mark_output_heads(
    layers: list[Layer],
    nodes: list[Node],
    consumers: dict[str, list[int]],
    graph_outputs: set[str],
) -> None:
    """`extra["output_head"]`: the layer's output reaches a graph output through no other
    layer (NeRF's rgb and sigma heads, a detector's class and box heads): its activation
    defines what the model outputs, as the last layer's does."""
    mains = {layer.main for layer in layers}
    for layer in layers:
        pending, seen = [layer.output], set()
        while pending:
            value = pending.pop()
            if value in seen:
                continue
            seen.add(value)
            if value in graph_outputs:
                layer.extra["output_head"] = True
                break
            for index in consumers.get(value, []):
                node = nodes[index]
                if node.name not in mains and node.name not in layer.nodes:
                    pending.extend(o for o in node.outputs if o)


# Ops whose second input lends only its dtype: CastLike(W, x) is W in x's dtype (the dynamo
# exporter without its optimizer writes a GroupNorm's weight so), not a product of W and x.
_TYPE_ONLY_SECOND = frozenset({"castlike", "typeas"})


def _values_read(node: Node) -> list[str]:
    """The inputs whose values the node computes with (not those it reads the dtype of)."""
    if canonical(node.op_type) in _TYPE_ONLY_SECOND:
        return node.inputs[:1]
    return node.inputs


def _affine_of_normalization(node: Node, producers: dict[str, Node]) -> str | None:
    """The normalisation whose weight a Mul applies, when the Mul is the affine step of a
    decomposed one: ONNX has no GroupNorm before opset 18, so both exporters write torch's
    GroupNorm as Reshape → InstanceNormalization (to ones and zeros) → Reshape → Mul by the
    weight → Add the bias; an RMSNorm written out (Hugging Face's LlamaRMSNorm, any ONNX
    before opset 23) is weight · (x · rsqrt(mean(x²) + eps)). Judged as a normalisation
    (scale-invariant input, no fan-in)."""
    if canonical(node.op_type) != "mul":
        return None
    for value in node.inputs:
        reshaped = False
        while (producer := producers.get(value)) is not None:
            op = canonical(producer.op_type)
            if op == "instancenormalization":
                return "GroupNormalization" if reshaped else producer.op_type
            if op in {"mul", "div"} and _divides_by_root_mean_square(producer, producers):
                return "RMSNorm"
            if op not in _SHAPE_ONLY or not producer.inputs:
                break
            reshaped = reshaped or op == "reshape"
            value = producer.inputs[0]
    return None


def _divides_by_root_mean_square(node: Node, producers: dict[str, Node]) -> bool:
    """x · rsqrt(mean(x²) + eps), x · (1 / sqrt(...)) or x / sqrt(...): a factor that is the
    (inverse) root of a mean, a few ops up."""
    factors = node.inputs[1:] if canonical(node.op_type) == "div" else node.inputs
    return any(_root_of_mean(value, producers, rooted=False, steps=5) for value in factors)


def _root_of_mean(value: str, producers: dict[str, Node], *, rooted: bool, steps: int) -> bool:
    producer = producers.get(value)
    if producer is None or steps == 0:
        return False
    op = canonical(producer.op_type)
    if op in {"mean", "reducemean"}:
        return rooted
    rooted = rooted or op in {"rsqrt", "sqrt"}
    return any(_root_of_mean(v, producers, rooted=rooted, steps=steps - 1) for v in producer.inputs)


def normalized_layers(graph: ObservableGraph, layers: list[Layer]) -> set[str]:
    """Layers whose output only a normalisation reads (through reshapes and casts): conv →
    BatchNorm, a feature encoder's conv → GroupNorm; or whose BatchNorm the exporter folded
    into them (_folds_normalization). Their scale is divided out, so their initialisation
    scale does not matter. A layer whose output also joins a residual sum
    (a transformer's out-projection, before the next LayerNorm) is not one of them."""
    from service.engine.detectors.optypes import is_normalization

    consumers = _consumers(graph.nodes)
    outputs = set(graph.output_names)

    def only_normalized(value: str, steps: int) -> bool:
        readers = consumers.get(value, [])
        if not readers or value in outputs or steps == 0:
            return False
        for index in readers:
            node = graph.nodes[index]
            if is_normalization(node.op_type) and node.inputs[:1] == [value]:
                continue
            if canonical(node.op_type) in {"shape", "size", "symsize"}:
                continue  # reads the shape only (the legacy GroupNorm's reshape back)
            reshapes = canonical(node.op_type) in _SHAPE_ONLY | {"transpose", "permute"}
            if reshapes and node.outputs and only_normalized(node.outputs[0], steps - 1):
                continue
            return False
        return True

    folded = {node.name for node in graph.nodes if _folds_normalization(node)}
    return {
        layer.name
        for layer in layers
        if only_normalized(layer.output, steps=6) or layer.main in folded
    }


def _folds_normalization(node: Node) -> bool:
    """Whether the exporter folded a BatchNorm into this node (the dynamo ONNX exporter's
    optimizer, by default). The weight is then W·γ/√(running_var + eps): its scale is the
    BatchNorm's statistics as much as W's, not an initialisation, and in the model trained
    the BatchNorm divides W's scale out, as for a conv it reads unfolded. So it counts as
    normalised, and the formats agree (the report notes the folding)."""
    if node.source is None or not hasattr(node.source, "metadata_props"):
        return False  # not an ONNX node
    from service.engine.onnx.convert import folds_batchnorm

    return folds_batchnorm(node.source)


def _read(value: str, consumers: dict[str, list[int]], graph_outputs: set[str]) -> bool:
    return bool(consumers.get(value)) or value in graph_outputs


def _attach_followers(
    layer: Layer,
    index: int,
    nodes: list[Node],
    consumers: dict[str, list[int]],
    claimed: set[int],
    graph_outputs: set[str],
) -> None:
    """Extend `layer` through tuple unpacking, then by the activation that alone follows it.
    A tuple (torch's LSTM: output, h_n, c_n) unpacked by several getitems of which only one is
    read further is followed through that one: its value is the layer's output. A recurrent
    layer's tuple with several read is followed through the first, the others' gradients
    joining the layer's (`grad_outputs`)."""
    while True:
        users = consumers.get(layer.output, [])
        if len(users) > 1 and all(canonical(nodes[u].op_type) in _PASSTHROUGH for u in users):
            users = [u for u in users if _read(nodes[u].outputs[0], consumers, graph_outputs)]
            if len(users) > 1 and recurrent_gates(layer.op) is not None:
                # torch's LSTM tuple with output and h_n both read: the output sequence
                # (the first) is the layer's output, the states join its gradient
                layer.grad_outputs += [nodes[u].outputs[0] for u in users[1:]]
                users = users[:1]
        gated = _self_gated(layer.output, users, nodes, consumers, graph_outputs)
        if gated is not None and layer.activation is None:
            activation, gate, product = gated
            layer.nodes += [nodes[gate].name, nodes[product].name]
            layer.output = nodes[product].outputs[0]
            layer.activation = activation
            claimed.update((gate, product))
            return
        if len(users) != 1:
            return
        follower = nodes[users[0]]
        op = canonical(follower.op_type)
        if op in _PASSTHROUGH and layer.activation is None:
            layer.nodes.append(follower.name)
            layer.output = follower.outputs[0]
            claimed.add(users[0])
            continue
        if op in ACTIVATIONS and layer.activation is None and follower.inputs[0] == layer.output:
            layer.nodes.append(follower.name)
            layer.output = follower.outputs[0]
            layer.activation = op
            claimed.add(users[0])
        return


# x · gate(x), an activation written out: ONNX has no SiLU op (both exporters write
# torch's SiLU as Mul(x, Sigmoid(x))), and the legacy exporter before opset 14 writes HardSwish
# as Mul(x, HardSigmoid(x)).
_SELF_GATES = {"sigmoid": "silu", "hardsigmoid": "hardswish"}


def _self_gated(
    value: str,
    users: list[int],
    nodes: list[Node],
    consumers: dict[str, list[int]],
    graph_outputs: set[str],
) -> tuple[str, int, int] | None:
    """(activation, gate node, product node) when `value`'s only readers are a gate
    (Sigmoid, HardSigmoid) of it and the Mul of it by that gate, which alone reads the gate:
    the activation torch wrote as one op (silu, hardswish). Recognised so that the layer gets
    the activation, and with it the He reference, that the .pt2 export of it gets."""
    if len(users) != 2:
        return None
    gates = [
        u
        for u in users
        if canonical(nodes[u].op_type) in _SELF_GATES and nodes[u].inputs[:1] == [value]
    ]
    if len(gates) != 1:
        return None
    gate = gates[0]
    product = next(u for u in users if u != gate)
    gate_value = nodes[gate].outputs[0]
    if (
        canonical(nodes[product].op_type) != "mul"
        or sorted(nodes[product].inputs) != sorted([value, gate_value])
        or consumers.get(gate_value) != [product]
        or gate_value in graph_outputs
    ):
        return None
    return _SELF_GATES[canonical(nodes[gate].op_type)], gate, product


def _fan(layer: Layer, node: Node, param_in: list[str], shapes: dict[str, list[int]]) -> None:
    """fan_in/fan_out of the layer's weight: torch's `_calculate_fan_in_and_fan_out`, per
    group for a grouped convolution (weight_fans)."""
    op = canonical(node.op_type)
    if op in NORMALIZATIONS or op in _NO_FAN_IN:
        return
    candidates = [v for v in param_in if v in shapes and len(shapes[v]) >= 2]
    weight = candidates[0] if candidates else None
    transposed_operand = False
    if weight is None:
        # a weight reached through a transform (Transpose(W) in ONNX exports of nn.Linear)
        derived_weights = [v for v in param_in if v not in shapes]
        if not derived_weights:
            return
        transposed_operand = True
        sources = [p for p in layer.params if len(shapes.get(p, [])) >= 2]
        if len(sources) != 1:
            # none, or a weight computed from several (weight_norm's g and v): it has the
            # scale of neither, so no fan-in and nothing to compare with He/Xavier
            return
        weight = sources[0]
    shape = shapes[weight]
    layer.weight = weight
    gates = recurrent_gates(node.op_type)
    if gates is not None:
        # the input weight W: fan-in = the input size (last axis), not dirs × gates*H × input;
        # H (= the recurrent weight R's fan-in) decides the reference std (reference_std)
        layer.fan_in, layer.fan_out = shape[-1], shape[-2]
        layer.extra["hidden_size"] = max(1, shape[-2] // gates)
        return
    if op in _MATMUL and not (transposed_operand or (op == "gemm" and _attr(node, "transB"))):
        layer.fan_in, layer.fan_out = shape[-2], shape[-1]
    elif op in {"embedding", "gather"} and not transposed_operand:
        return
    else:  # torch's [out, in/groups, *kernel] layout: Linear, Conv, a transposed operand, ...
        groups = _groups(node) if "conv" in op else 1
        if groups > 1:
            layer.extra["groups"] = groups  # torch's fan formula (and xavier_normal_) ignore it
        layer.fan_in, layer.fan_out = weight_fans(shape, groups=groups)


def weight_fans(shape: list[int] | tuple[int, ...], groups: int = 1) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight in torch's [out, in/groups, *kernel] layout, per group.

    Glorot's fan_in is how many inputs one output unit sums, fan_out how many outputs one
    input feeds. A grouped convolution's output unit sees in/groups channels (shape[1], per
    group already) over the kernel, and an input feeds out/groups channels over the kernel:
    shape[0]·kernel / groups. torch's `_calculate_fan_in_and_fan_out` sees only the tensor, so
    its fan_out is `groups` times too large (a depthwise Conv1d(C, C, 7) gets C·7 for 7), which
    makes torch's own default init of a depthwise conv read as 2.4× Xavier. A transposed conv
    ([in, out/groups, *kernel]) swaps the roles, and the same per-group count holds."""
    if len(shape) < 2:
        return max(1, math.prod(shape)), 1
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, max(1, shape[0] // max(1, groups)) * receptive


def _groups(node: Node) -> int:
    """A convolution's groups: ONNX's `group` attribute, else the FX op's `groups` argument
    (aten.conv1d, aten.convolution, ...), else 1."""
    value = _attr(node, "group")
    if value is None:
        value = _fx_argument(node, "groups")
    return value if isinstance(value, int) and value > 0 else 1


def _fx_argument(node: Node, name: str) -> object:
    """An argument of an FX node's aten op by its schema name, positional or keyword."""
    source = node.source
    schema = getattr(getattr(source, "target", None), "_schema", None)
    if schema is None:
        return None
    names = [argument.name for argument in schema.arguments]
    if name not in names:
        return None
    index = names.index(name)
    args = getattr(source, "args", ())
    return args[index] if index < len(args) else getattr(source, "kwargs", {}).get(name)


def _attr(node: Node, name: str) -> object:
    """An attribute of the source op: `Node.attrs`, else the ONNX NodeProto kept in `source`."""
    if name in node.attrs:
        return node.attrs[name]
    for attribute in getattr(node.source, "attribute", ()):
        if getattr(attribute, "name", None) == name:
            import onnx

            return onnx.helper.get_attribute_value(attribute)
    return None


_TORCH_LAYER_SUFFIX = re.compile(r"_l(\d+)(?:_reverse)?$")


def _stacked_recurrent_names(layers: list[Layer]) -> dict[int, str]:
    """`lstm.l0`, `lstm.l1` for the per-layer nodes of one stacked nn.LSTM/GRU/RNN.

    ONNX exports a `num_layers=2` module as two recurrent nodes whose parameters share the
    module path `lstm`. The index is torch's `_l<k>` suffix of their parameter names
    (`weight_ih_l1`), `_l<k>_reverse` for a node of a reverse direction alone; where the names
    carry none (dynamo's `val_N`) and the layers read distinct input weights W, their order in
    the graph."""
    groups: dict[str, list[Layer]] = {}
    for layer in layers:
        if recurrent_gates(layer.op) is None:
            continue
        base = _common_prefix(layer.main_params) or _common_prefix(layer.params) or layer.scope
        if base:
            groups.setdefault(base, []).append(layer)
    names: dict[int, str] = {}
    for base, group in groups.items():
        if len(group) < 2:
            continue
        indices: list[str | None] = []
        for layer in group:
            found = {m.group(1) for p in layer.params if (m := _TORCH_LAYER_SUFFIX.search(p))}
            index = found.pop() if len(found) == 1 else None
            if index is not None and all(p.endswith("_reverse") for p in layer.params):
                # one direction of a bidirectional layer as a node of its own (the converter's
                # fold of a written-out nn.RNN, onnx/unrolled_rnn.py): `rnn.l0_reverse`
                index += "_reverse"
            indices.append(index)
        if None in indices:
            # dynamo may share a zeros initial state between the nodes, so compare the input
            # weights W: one module called twice reads the same W, and is not a stack
            weights = [layer.weight for layer in group]
            if None in weights or len(set(weights)) != len(weights):
                continue
            indices = [str(k) for k in range(len(group))]
        if len(set(indices)) == len(indices):
            names.update(
                {id(layer): f"{base}.l{k}" for layer, k in zip(group, indices, strict=True)}
            )
    return names


def _name_layers(layers: list[Layer]) -> None:
    """The module path of the main node's parameters (`fc` for `fc.weight` even when a
    top-level `scale` multiplied after it joined the layer), else of all its parameters, else
    the main node's source module (scope), else the main node's name; the scope first for
    layers whose main parameter other layers read too (tied weights). The layers of a stacked
    recurrent module are `lstm.l0`, `lstm.l1` (_stacked_recurrent_names)."""
    used: set[str] = set()
    stacked = _stacked_recurrent_names(layers)
    readers = Counter(p for layer in layers for p in layer.main_params)
    first_calls: dict[tuple[str, ...], Layer] = {}
    calls: Counter[tuple[str, ...]] = Counter()
    for layer in layers:
        # a module called again (ALBERT's shared layer, a Siamese encoder's second input) is
        # `name#2`, `name#3` in call order in every format, not whatever each exporter made
        # of the repeat (`query_1`, `query/node_MatMul_110`, `query/linear_7`)
        call = (layer.op, *sorted(layer.main_params))
        first = first_calls.get(call) if layer.main_params else None
        if first is not None and _same_module(first.scope, layer.scope):
            calls[call] += 1
            layer.name = f"{first.name}#{calls[call] + 1}"
            used.add(layer.name)
            continue
        first_calls.setdefault(call, layer)
        # a tied parameter (an input embedding that is also the output projection) names
        # neither of its layers: their modules do
        tied = layer.scope is not None and any(readers[p] > 1 for p in layer.main_params)
        name = stacked.get(id(layer)) or (
            (layer.scope if tied else None)
            or _common_prefix(layer.main_params)
            or _common_prefix(layer.params)
            or layer.scope
            or layer.main
        )
        if name in used and layer.scope and layer.scope not in used:
            name = layer.scope
        if name in used:
            # a legacy export's node is named by its module path (`/vit/embeddings/Concat_6`),
            # which `name` already says: its last part only
            main = layer.main.rsplit("/", 1)[-1] if layer.main.startswith("/") else layer.main
            name = f"{name}/{main}" if f"{name}/{main}" not in used else f"{name}/{layer.main}"
        used.add(name)
        layer.name = name


def _same_module(first: str | None, later: str | None) -> bool:
    """Whether two scopes are one module's: equal, or equal but for the `_1`, `_2` the legacy
    ONNX exporter appends to a module's name when it is called again."""
    if first is None or later is None:
        return first == later
    return _LEGACY_REPEAT.sub("", first) == _LEGACY_REPEAT.sub("", later)


_LEGACY_REPEAT = re.compile(r"_\d+(?=\.|$)")


def _common_prefix(names: list[str]) -> str:
    if not names:
        return ""
    split = [n.split(".") for n in names]
    if any(len(parts) < 2 for parts in split):
        return ""
    prefix: list[str] = []
    for parts in zip(*(p[:-1] for p in split), strict=False):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    return ".".join(prefix)


def _init_activations(
    layers: list[Layer], nodes: list[Node], consumers: dict[str, list[int]]
) -> None:
    """The nonlinearity that decides a layer's reference init: its own activation, or the one
    after the normalization layer it feeds (conv → BatchNorm → ReLU is He-initialised)."""
    by_main = {layer.main: layer for layer in layers}
    for layer in layers:
        layer.init_activation = layer.activation
        if layer.activation is None:
            users = consumers.get(layer.output, [])
            if len(users) == 1:
                nxt = by_main.get(nodes[users[0]].name)
                if nxt is not None and canonical(nxt.op) in NORMALIZATIONS:
                    layer.init_activation = nxt.activation


def reference_scheme(activation: str | None) -> str:
    """The initialisation a weight before `activation` is judged by, and re-initialised with:
    "kaiming" (He et al. 2015) before a ReLU-family activation, else "xavier" (Glorot & Bengio
    2010, gain 1: as they derived it for tanh too)."""
    return "kaiming" if activation is not None and canonical(activation) in HE_FAMILY else "xavier"


def init_std(scheme: str, fan_in: int, fan_out: int) -> float | None:
    """The std `scheme` gives a weight of these fans: He sqrt(2/fan_in), Xavier
    sqrt(2/(fan_in+fan_out)), `xavier_tanh` PyTorch's calculate_gain("tanh") = 5/3 of Xavier;
    None for a scheme that is not a std (orthogonal, the bias schemes). The one formula both
    the init_scale reference (reference_std) and the re-initialisation fix use, so that a
    re-initialised weight reads as ratio 1."""
    if scheme == "kaiming":
        return he_std(fan_in)
    if scheme == "xavier":
        return xavier_std(fan_in, fan_out)
    if scheme == "xavier_tanh":
        return 5.0 / 3.0 * xavier_std(fan_in, fan_out)
    return None


def he_std(fan_in: int) -> float:
    return math.sqrt(2.0 / fan_in)


def xavier_std(fan_in: int, fan_out: int) -> float:
    return math.sqrt(2.0 / (fan_in + fan_out))


def scales_one_input(fan_in: int) -> bool:
    """Whether a weight with this fan-in scales one input rather than summing several
    (Linear(1, n): Mamba's dt_proj at dt_rank 1; a depthwise 1×1 conv). That is the product
    `x * v` of a parameter vector, which has no fan-in (_NO_FAN_IN's `mul`), and like a
    normalisation's gain it is not judged by He/Xavier: their balance of fan-in against
    fan-out is about how many terms a unit sums, and torch's default U(±1) for it would read
    as 1.7× Xavier."""
    return fan_in == 1


def reference_std(layer: Layer) -> float | None:
    """He std sqrt(2/fan_in) before ReLU-family activations, Xavier sqrt(2/(fan_in+fan_out))
    before tanh/sigmoid or nothing (init_std, reference_scheme); 1/√H for recurrent layers
    (hidden size H); none for a weight that scales one input (scales_one_input). The report's
    `init_std_ratio` is the weight's RMS (‖W‖/√n) over this; note torch's default
    nn.Linear/Conv init gives ≈0.41 against He."""
    if not layer.fan_in or not layer.fan_out:
        return None
    hidden = layer.extra.get("hidden_size")
    if isinstance(hidden, int) and hidden > 0:
        # RNN/GRU/LSTM: every gate's rows are scaled for the H-dimensional state (orthogonal R
        # has rows of norm 1 → std 1/√H; torch's default U(±1/√H) gives 1/√3 of it, whatever
        # the input size), not Xavier over the stacked gates
        return 1.0 / math.sqrt(hidden)
    if scales_one_input(layer.fan_in):
        return None
    return init_std(reference_scheme(layer.init_activation), layer.fan_in, layer.fan_out)


def grouped_weight_stds(graph: ObservableGraph, schemes: dict[str, str]) -> dict[str, float]:
    """The std `schemes` give each grouped conv's weight over its per-group fans: torch's
    xavier_normal_ takes fan_out as out_channels·kernel, `groups` times the reference's, and
    would leave a depthwise conv reading as too small."""
    return {
        layer.weight: std
        for layer in group_layers(graph)
        if layer.weight in schemes
        and layer.extra.get("groups", 1) != 1
        and layer.fan_in
        and layer.fan_out
        and (std := init_std(schemes[layer.weight], layer.fan_in, layer.fan_out)) is not None
    }


def parameter_fans(graph: ObservableGraph) -> dict[str, tuple[int, int]]:
    """Each layer weight's (fan_in, fan_out) as reference_std reads them (a grouped conv's
    per group): what re-initialising it must use to meet the reference."""
    return {
        layer.weight: (layer.fan_in, layer.fan_out)
        for layer in group_layers(graph)
        if layer.weight is not None and layer.fan_in and layer.fan_out
    }


def untrained_layers(
    graph: ObservableGraph | None, layers: list[Layer], frozen: frozenset[str]
) -> list[str]:
    """The layers a fine-tuning run leaves untouched AND whose gradient feeds nothing it
    trains: every parameter of theirs is frozen (`frozen`: names the source model holds with
    requires_grad=False) and no trainable parameter is upstream of them (towards the input).
    A frozen backbone under a trainable head: its gradient is measured (the report shows what
    it would get if trained) but reaches no parameter an optimizer updates, so no finding or
    advice is about it. A frozen layer between trainable ones still passes the gradient on to
    those before it: not listed. With every parameter frozen (a model exported for inference)
    nothing is listed: the whole model is measured as if trained.

    From the graph: a value is fed by a trainable parameter when a node computing it reads
    one, or reads a value so fed. Without a graph (parameters-only coverage), layers in
    parameter order: the leading run of layers whose parameters are all frozen."""
    params = list(graph.param_names) if graph is not None else [p for x in layers for p in x.params]
    if not frozen or all(p in frozen for p in params):
        return []
    if graph is None:
        leading: list[str] = []
        for layer in layers:
            if not layer.params or any(p not in frozen for p in layer.params):
                break
            leading.append(layer.name)
        return leading
    fed = {
        value
        for value, registered in graph.param_names.items()
        if value not in frozen and registered not in frozen
    }
    for node in graph.nodes:
        if any(v in fed for v in _values_read(node)):
            fed.update(o for o in node.outputs if o)
    return [
        layer.name
        for layer in layers
        if layer.params
        and all(p in frozen for p in layer.params)
        and not any(v in fed for v in (layer.output, *layer.grad_outputs))
    ]
