"""What the advice needs to know about the model beyond the findings: which activations,
whether there is normalisation or shortcuts, which parameters are weights, and numbers such as
the suggested `max_norm` and loss scale derived from the measured norms."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from service.engine.detectors.optypes import (
    canonical_op,
    is_gated_rnn,
    is_normalization,
    is_saturating,
    is_shortcut_add,
    is_vanilla_rnn,
)
from service.engine.graph import ObservableGraph
from service.engine.layers import reference_scheme
from service.engine.measurements import Measurements
from service.engine.report import LayerReport
from service.engine.stats import FP16_MAX

FP16_MIN_NORMAL = 2.0**-14
GRAD_SCALER_INIT_EXPONENT = 16  # torch.amp.GradScaler's init_scale 2^16


def by_depth(m: Measurements) -> list[LayerReport]:
    return sorted(m.layers, key=lambda x: x.depth)


def activation_of(layer: LayerReport) -> str | None:
    act = layer.activation_stats.activation
    return canonical_op(act) if act else None


def weight_layers(m: Measurements) -> list[LayerReport]:
    return [x for x in by_depth(m) if x.params and not is_normalization(x.op)]


def saturating_layers(m: Measurements) -> list[LayerReport]:
    """Layers followed by sigmoid/tanh, the output layer and other output heads left out:
    their activation defines what the model outputs (a probability, a colour), and changing
    it changes the task."""
    layers = by_depth(m)
    hidden = layers[:-1] if len(layers) > 1 else layers
    hidden = [x for x in hidden if not x.output_head]
    return [x for x in hidden if (a := activation_of(x)) is not None and is_saturating(a)]


def saturating_ops(m: Measurements) -> list[str]:
    return sorted({canonical_op(op) for op in m.op_types if is_saturating(op)})


def has_normalization(m: Measurements) -> bool:
    return any(is_normalization(op) for op in m.op_types) or any(
        is_normalization(x.op) for x in m.layers
    )


def residual_adds(graph: ObservableGraph | None) -> int | None:
    """How many adds join two data-dependent values (a shortcut's signature); None if unknown.

    A bias add (data + parameter) is not one; both operands must depend on a graph input.
    """
    if graph is None:
        return None
    data = set(graph.input_names)
    count = 0
    for node in graph.nodes:
        data_in = [v for v in node.inputs if v in data]
        if data_in:
            data.update(o for o in node.outputs if o)
        if is_shortcut_add(node.op_type) and len(data_in) >= 2:
            count += 1
    return count


SOFTMAX_OPS = frozenset({"softmax", "_softmax", "special_softmax"})
ONNX_SOFTMAX_AXIS_SINCE = 13  # before opset 13, Softmax normalises the flattened dims from axis


@dataclass(frozen=True)
class SoftmaxFeed:
    """The softmax whose output a log reads: log(softmax(z)) underflows to log(0) = -inf for
    logits far below their row's maximum, where log_softmax(z) = z − logsumexp(z) stays finite
    with exact gradients."""

    node: str  # the softmax node
    op_type: str
    logits: str  # the value name of z
    dim: int  # the axis it normalises over
    flattened: bool  # ONNX Softmax before opset 13: over the dims from `dim` on, flattened
    dtype: torch.dtype | None  # aten.softmax's dtype= / aten._softmax's half_to_float


def _onnx_opset(graph: ObservableGraph) -> int:
    opsets = graph.metadata.get("opset_imports") or {}
    return int(opsets.get("", opsets.get("ai.onnx", ONNX_SOFTMAX_AXIS_SINCE)))


def _fx_softmax(node: fx.Node) -> tuple[int, torch.dtype | None] | None:
    """(dim, dtype) of an aten softmax call: softmax.int(x, dim, dtype=None) or
    _softmax(x, dim, half_to_float)."""
    args, kwargs = list(node.args), dict(node.kwargs)
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if not isinstance(dim, int) or isinstance(dim, bool):
        return None
    third: Any = args[2] if len(args) > 2 else kwargs.get("dtype", kwargs.get("half_to_float"))
    if isinstance(third, torch.dtype):
        return dim, third
    if third is True:  # _softmax's half_to_float
        return dim, torch.float32
    return dim, None


def softmax_feeding(graph: ObservableGraph | None, log_node: str) -> SoftmaxFeed | None:
    """The softmax that produces the input of the natural log `log_node`, read from the graph
    in any format (FX/aten `softmax` of a .pt2 or TorchScript model, ONNX `Softmax`); None if
    the log reads anything else or the softmax's axis is unknown."""
    if graph is None:
        return None
    node = next((n for n in graph.nodes if n.name == log_node), None)
    if node is None or canonical_op(node.op_type) != "log" or not node.inputs:
        return None
    producer = next((n for n in graph.nodes if node.inputs[0] in n.outputs), None)
    if producer is None or canonical_op(producer.op_type) not in SOFTMAX_OPS:
        return None
    if not producer.inputs or len(producer.outputs) != 1:
        return None
    if isinstance(producer.source, fx.Node):
        found = _fx_softmax(producer.source)
        if found is None:
            return None
        dim, dtype = found
        flattened = False
    elif producer.op_type == "Softmax" and producer.domain in ("", "ai.onnx"):
        opset = _onnx_opset(graph)
        flattened = opset < ONNX_SOFTMAX_AXIS_SINCE
        dim = int(producer.attrs.get("axis", 1 if flattened else -1))
        dtype = None
    else:
        return None
    return SoftmaxFeed(producer.name, producer.op_type, producer.inputs[0], dim, flattened, dtype)


def vanilla_rnn_layers(m: Measurements) -> list[str]:
    named = [x.name for x in m.layers if is_vanilla_rnn(x.op)]
    if named:
        return named
    if any(is_vanilla_rnn(op) for op in m.op_types):
        return list(m.recurrent_layers) or ["the recurrent layer"]
    return []


def recurrent_weights(m: Measurements) -> list[str]:
    """Hidden-to-hidden weight matrices of the recurrent layers (torch: weight_hh_l*; ONNX: R)."""
    layers = set(m.recurrent_layers)
    return [
        p.name
        for p in m.parameters
        if p.layer in layers
        and len(p.shape) >= 2
        and ("weight_hh" in p.name or p.name.rsplit(".", 1)[-1] in {"R", "recurrence_weight"})
    ]


def lstm_input_biases(m: Measurements, op: str = "lstm") -> list[str]:
    """`bias_ih_l*` of LSTM layers (torch's gate order i, f, g, o: chunk 1 is the forget gate),
    or with op="gru" of GRU layers (order r, z, n: chunk 1 is the update gate). Other layouts
    (ONNX's `B`) are onnx_gate_biases'."""
    ops = {"lstm": {"lstm", "lstm_cell"}, "gru": {"gru", "gru_cell"}}[op]
    chosen = {x.name for x in m.layers if canonical_op(x.op) in ops}
    return [
        p.name
        for p in m.parameters
        if p.layer in chosen and len(p.shape) == 1 and "bias_ih" in p.name.rsplit(".", 1)[-1]
    ]


def onnx_gate_biases(m: Measurements, op: str = "lstm") -> dict[str, list[str]]:
    """ONNX LSTM/GRU biases `B` ([dirs, 2·gates·H]: Wb then Rb; gate order i, o, f, c for LSTM,
    z, r, h for GRU) of layers that have no torch-named `bias_ih` (dynamo exports fold torch's
    biases into one initializer `val_N`), mapped to the torch parameters they came from
    (`lstm.bias_ih_l0`, `…_reverse`): the layer `lstm.l1` is torch's layer 1 of module `lstm`,
    `lstm` its layer 0."""
    torch_named = set(lstm_input_biases(m, op))
    found: dict[str, list[str]] = {}
    for layer in m.layers:
        if canonical_op(layer.op) != op:
            continue
        mine = [p for p in m.parameters if p.layer == layer.name]
        if any(p.name in torch_named for p in mine):
            continue
        gate_rows = {p.shape[-2] for p in mine if len(p.shape) == 3}  # W/R: [dirs, gates*H, *]
        module, _, index = layer.name.rpartition(".l")
        if not (module and index.isdigit()):
            module, index = layer.name, "0"
        for p in mine:
            if len(p.shape) == 2 and p.shape[0] in (1, 2) and p.shape[1] // 2 in gate_rows:
                suffixes = ["", "_reverse"][: p.shape[0]]
                found[p.name] = [f"{module}.bias_ih_l{index}{s}" for s in suffixes]
    return found


# The gate whose bias decides how much of the state (and of its gradient) a step keeps: the
# LSTM's forget gate, the GRU's update gate z. Per op: (gates, the gate's chunk in torch's
# layout, its block in each half of ONNX's B). torch adds bias_ih and bias_hh (i, f, g, o;
# GRU r, z, n: chunk 1 both); ONNX's B = [dirs, 2·gates·H] is Wb then Rb (i, o, f, c: block 2;
# GRU z, r, h: block 0).
GATE_LAYOUT = {"lstm": (4, 1, 2), "gru": (3, 1, 0)}
GATE_OF_SCHEME = {
    "forget_bias": "lstm",
    "onnx_forget_bias": "lstm",
    "no_bias_forget": "lstm",
    "update_bias": "gru",
    "onnx_update_bias": "gru",
    "no_bias_update": "gru",
}


def hidden_bias_name(input_bias: str) -> str:
    """torch's `bias_hh_l<k>` beside a `bias_ih_l<k>` (`rnn.bias_ih_l0_reverse` →
    `rnn.bias_hh_l0_reverse`)."""
    head, dot, last = input_bias.rpartition(".")
    return head + dot + last.replace("bias_ih", "bias_hh")


def gate_bias_slices(
    tensor: torch.Tensor, scheme: str, hidden_bias: torch.Tensor | None = None
) -> list[torch.Tensor] | None:
    """Views of the gate's bias in `tensor` (torch's `bias_ih`, or ONNX's `B` for an `onnx_`
    scheme) and in `hidden_bias` (torch's `bias_hh`, when given and of the same shape): the
    terms whose sum is the bias the gate sees. None if the tensor has not the layout."""
    gates, chunk, block = GATE_LAYOUT[GATE_OF_SCHEME[scheme]]
    if scheme.startswith("onnx_"):
        if tensor.dim() != 2 or tensor.shape[1] % (2 * gates):
            return None
        h = tensor.shape[1] // (2 * gates)
        rb = gates + block
        return [tensor[:, block * h : (block + 1) * h], tensor[:, rb * h : (rb + 1) * h]]
    if tensor.dim() != 1 or tensor.numel() % gates:
        return None
    views = [tensor.chunk(gates)[chunk]]
    if hidden_bias is not None and hidden_bias.shape == tensor.shape:
        views.append(hidden_bias.chunk(gates)[chunk])
    return views


def effective_gate_bias(
    graph: ObservableGraph | None, name: str, scheme: str
) -> torch.Tensor | None:
    """The bias the LSTM forget / GRU update gate sees, bias_ih + bias_hh (ONNX: Wb + Rb) of
    its slices, one value per unit (and direction), for the parameter `name` that a gate-bias
    scheme names; None if it cannot be read (no graph, no such parameter, a `no_bias_*`
    layer's name)."""
    if graph is None or name not in graph.param_names:
        return None
    tensor = graph.parameter(name).detach().float().cpu()
    partner = hidden_bias_name(name)
    hidden = None
    if not scheme.startswith("onnx_") and partner != name and partner in graph.param_names:
        hidden = graph.parameter(partner).detach().float().cpu()
    views = gate_bias_slices(tensor, scheme, hidden)
    if views is None:
        return None
    return torch.stack(views).sum(0).flatten()


def biasless_gated_layers(m: Measurements) -> list[str]:
    """LSTM/GRU layers whose input bias neither name nor ONNX layout locates
    (`nn.LSTM(..., bias=False)`, or an export that computes B at run time)."""
    located: set[str | None] = set()
    for op in ("lstm", "gru"):
        names = set(lstm_input_biases(m, op)) | set(onnx_gate_biases(m, op))
        located |= {p.layer for p in m.parameters if p.name in names}
    gated = {"lstm", "lstm_cell", "gru", "gru_cell"}
    return [x.name for x in m.layers if canonical_op(x.op) in gated and x.name not in located]


def gated_rnn_present(m: Measurements) -> bool:
    return any(is_gated_rnn(op) for op in m.op_types) or any(is_gated_rnn(x.op) for x in m.layers)


_ATTENTION_OPS = frozenset(
    {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention", "softmax"}
    | {"_softmax", "attention", "multi_head_attention", "_native_multi_head_attention"}
)


def is_attention_model(m: Measurements) -> bool:
    return any(canonical_op(op) in _ATTENTION_OPS for op in m.op_types)


def uses_convolution(m: Measurements) -> bool:
    return any(
        canonical_op(x.op) in {"convolution", "conv1d", "conv2d", "conv3d"} for x in m.layers
    )


def init_scheme(layer: LayerReport, activation: str | None = None) -> str:
    """He for ReLU-family successors, Xavier otherwise (He et al. 2015; Glorot & Bengio 2010):
    the scheme the measurement's init_std_ratio is referenced to (layers.reference_scheme), so
    that the re-initialised weight meets it.

    Xavier with gain 1 for tanh too, as Glorot & Bengio derived it and as the measurement's
    init_std_ratio is referenced (PyTorch's calculate_gain("tanh") = 5/3 would read as 1.67×).
    """
    return reference_scheme(activation or activation_of(layer))


def weight_params(m: Measurements, layer: LayerReport) -> list[str]:
    shapes = {p.name: p.shape for p in m.parameters}
    return [p for p in layer.params if len(shapes.get(p, [])) >= 2]


def bias_params(m: Measurements, layer: LayerReport) -> list[str]:
    """1-D parameters named like a bias (a normalisation's gain is 1-D too, and is not one)."""
    shapes = {p.name: p.shape for p in m.parameters}
    return [
        p
        for p in layer.params
        if len(shapes.get(p, [0, 0])) == 1 and p.rsplit(".", 1)[-1].lower().startswith("bias")
    ]


def one_significant(value: float) -> float:
    """Rounded DOWN to one significant digit (a clip bound never above what was derived)."""
    if value <= 0 or not math.isfinite(value):
        return value
    exponent = math.floor(math.log10(value))
    return float(f"{max(1, math.floor(value / 10**exponent + 1e-9)):d}e{exponent}")


def total_grad_norm(m: Measurements) -> float:
    return math.sqrt(
        sum(p.grad_norm**2 for p in m.parameters if p.grad_norm and math.isfinite(p.grad_norm))
    )


def suggested_max_norm(m: Measurements, exploding_layers: list[str]) -> tuple[float, str]:
    """(max_norm, how it was derived) for clip_grad_norm_, rounded down to one significant digit.

    1. √Σ min(‖g_i‖, ‖W_i‖)²: the norm the gradient would have if no tensor's step at lr 1 were
       larger than the tensor itself; used when it actually clips (is below the total norm).
    2. Else the median gradient norm of the tensors outside the exploding layers × √(tensors):
       the scale of an unamplified gradient.
    3. Else (every layer explodes, nothing to compare with) the customary 1.0.
    """
    total = total_grad_norm(m)
    pairs = [
        (p.layer, p.grad_norm, p.weight_norm or p.grad_norm)
        for p in m.parameters
        if p.grad_norm is not None and math.isfinite(p.grad_norm)
    ]
    capped = math.sqrt(sum(min(g, w) ** 2 for _, g, w in pairs))
    if 0 < capped < 0.9 * total:
        return one_significant(capped), (
            f"the total norm if no tensor's gradient exceeded its weight norm ({capped:.3g}, "
            f"against {total:.3g} measured)"
        )
    named = set(exploding_layers)
    calm = [g for layer, g, _ in pairs if layer not in named and g > 0]
    if calm:
        typical = statistics.median(calm) * math.sqrt(len(m.parameters))
        if typical < 0.9 * total:
            return one_significant(typical), (
                f"median gradient norm of the {len(calm)} tensors outside the exploding layers "
                f"({statistics.median(calm):.3g}) × √{len(m.parameters)} tensors"
            )
    return 1.0, "no unamplified reference in this pass; 1.0 is the customary bound"


def suggested_loss_scale(m: Measurements) -> tuple[float, str]:
    """A power of two that lifts the smallest tensor's rms gradient to fp16's normal range
    without pushing the largest gradient norm past fp16's maximum (an entry ≤ the norm).
    In fp16 runs the norms are the fp32 reference pass's (`Measurements.fp32_grad_norms`): the
    fp16 pass's own are 0 exactly where underflow is worst."""
    reference = m.fp32_grad_norms
    norms = [(p, reference.get(p.name, p.grad_norm)) for p in m.parameters]
    rms = [
        norm / math.sqrt(max(1, math.prod(p.shape)))
        for p, norm in norms
        if norm and math.isfinite(norm) and norm > 0
    ]
    largest = max((norm for _, norm in norms if norm and math.isfinite(norm)), default=1.0)
    if not rms:
        return 2.0**16, "no usable gradient norms; 2^16 is GradScaler's default"
    want = math.ceil(math.log2(FP16_MIN_NORMAL / min(rms)))
    cap = math.floor(math.log2(FP16_MAX / 2 / largest))
    if want <= 0 < cap:
        # every tensor's rms is in fp16's normal range already: what underflows are single
        # entries far below their tensor's rms, so lift them as far as the range allows
        exponent = min(cap, GRAD_SCALER_INIT_EXPONENT)
        return 2.0**exponent, (
            f"2^{exponent}: every tensor's rms gradient is in fp16's normal range already "
            f"(smallest {min(rms):.3g}), so the entries that underflow lie far below it; the "
            f"largest power of two up to GradScaler's 2^{GRAD_SCALER_INIT_EXPONENT} that keeps "
            f"the largest gradient norm ({largest:.3g}) below 65504/2"
        )
    exponent = max(0, min(want, cap, 64))
    return 2.0**exponent, (
        f"2^{exponent}: lifts the smallest rms gradient ({min(rms):.3g}) towards fp16's normal "
        f"range (2^-14) while the largest gradient norm ({largest:.3g}) stays below 65504/2"
    )
