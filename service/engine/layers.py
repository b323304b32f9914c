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
# Ops whose weight follows torch's [out, in, *kernel] layout.
_OUT_IN_LAYOUT = frozenset(
    {"linear", "conv", "conv1d", "conv2d", "conv3d", "convolution", "convtranspose"}
    | {"conv_transpose1d", "convtranspose1d", "convtranspose2d", "convtranspose3d"}
)
_MATMUL = frozenset({"matmul", "mm", "bmm", "addmm", "gemm"})
# Ops that add, scale, select or join a parameter rather than multiply it into a sum over
# inputs: a position embedding added (`x + pos`), a relative-position bias table indexed into
# an attention mask (Swin), a class token concatenated. No fan-in, nothing to compare with
# He/Xavier.
_NO_FAN_IN = frozenset(
    {"add", "sub", "mul", "div", "where", "index", "indexselect", "cat", "concat", "expand"}
    | {"scaleddotproductattention", "maskedfill", "slice", "getitem"}
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
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in dict.fromkeys(node.inputs):
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
        data_in = [v for v in node.inputs if v in data]
        param_in = [v for v in node.inputs if v in derived]
        if data_in:
            data.update(o for o in node.outputs if o)
        elif param_in:
            sources = set().union(*(derived[v] for v in param_in))
            for out in node.outputs:
                if out:
                    derived[out] = sources
            continue
        if not data_in or not param_in or index in claimed:
            continue
        owned = [p for p in dict.fromkeys(v for src in param_in for v in sorted(derived[src]))]
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
    return layers


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
    BatchNorm, a feature encoder's conv → GroupNorm. Their scale is divided out, so their
    initialisation scale does not matter. A layer whose output also joins a residual sum
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

    return {layer.name for layer in layers if only_normalized(layer.output, steps=6)}


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


def _fan(layer: Layer, node: Node, param_in: list[str], shapes: dict[str, list[int]]) -> None:
    """fan_in/fan_out of the layer's weight, as torch's `_calculate_fan_in_and_fan_out`."""
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
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    if op in _OUT_IN_LAYOUT or transposed_operand or (op == "gemm" and _attr(node, "transB")):
        layer.fan_in, layer.fan_out = shape[1] * receptive, shape[0] * receptive
    elif op in _MATMUL:
        layer.fan_in, layer.fan_out = shape[-2], shape[-1]
    elif op in {"embedding", "gather"}:
        return
    else:
        layer.fan_in, layer.fan_out = shape[1] * receptive, shape[0] * receptive


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


def reference_std(layer: Layer) -> float | None:
    """He std sqrt(2/fan_in) before ReLU-family activations, Xavier sqrt(2/(fan_in+fan_out))
    before tanh/sigmoid or nothing; 1/√H for recurrent layers (hidden size H). The report's
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
    if layer.init_activation in HE_FAMILY:
        return math.sqrt(2.0 / layer.fan_in)
    return math.sqrt(2.0 / (layer.fan_in + layer.fan_out))
