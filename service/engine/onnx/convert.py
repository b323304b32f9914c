"""ONNX → `ObservableGraph`: one torch callable per ONNX node, differentiable end to end.

    model = load_onnx(data)                       # or load_onnx_bundle(zip_bytes)
    graph = convert(model, mode="train")          # raises before any compute if unsupported
    outputs = graph(*inputs)                      # nn.Module; named_parameters() = initializers

What becomes what:
- Float initializers → `nn.Parameter`s registered under their exact initializer names; the
  proto's copy of their bytes is released (`release_weights=True`), so one copy is kept
  (`conformance.check_conversion` refills a copy from the graph when onnxruntime needs it).
  Float initializers no gradient can reach (BatchNormalization statistics, Shape inputs, a mask
  that is only compared: onnx/gradient_paths.py), read by no node at all, holding any inf/NaN
  (attention masks registered as torch buffers), one-element constants the dynamo optimizer
  folded (`val_81`), or all-zero recurrent initial states it stored (`val_16`) → buffers.
- Integer initializers and `Constant` values → buffers (moved by `.to(device)`); small integer
  ones (shapes, axes: at most `SMALL_INT_NUMEL` elements) → `constants`, kept on the CPU because
  shape arithmetic reads them as Python ints and a device round trip would only add syncs.
- Graph inputs that are also initializers (IR < 4) are not inputs.
- `metadata`: `mode`, `extra`, `opset_imports` {domain: version}, `inputs`/`outputs`
  [{name, shape, dtype}] (symbolic dims as strings, unknown as None), `ir_version`, `producer`;
  when present, `non_finite_states` (buffers holding inf/NaN: attention masks) and `notes`
  (for the report, e.g. BatchNorm folded at export).

Observability: every top-level node is one `Node` of the graph (named by the ONNX node name,
or `<op_type>_<index>` when it has none) and its outputs reach `ObservableGraph`'s observer.
Nodes inside If/Loop/Scan bodies run inside their parent node: the parent's outputs are
observed, the body's own nodes are not. Nodes whose inputs are all small integer constants
(exporters' `Constant → Unsqueeze → Concat` chains) are evaluated once at conversion; they stay
in the node list and return the stored value. Nodes whose values follow from the input shapes
alone (`Shape` of an activation and the arithmetic on it) are computed once per input shape by
`ObservableGraph.run` (onnx/shape_values.py) and observed with the values they had.

Validation: every node, subgraphs included, is built before anything runs. Unknown
(domain, op_type, opset) and every attribute a builder refuses are collected and raised together
as one `UnsupportedModelError`; a malformed graph (checker failure, names nothing produces,
cycles) raises `ModelFormatError`.

How op builders (service/engine/onnx/ops/*, registered with `registry.register`) see a node,
through the `registry.OpContext` they receive:
- `ctx.attrs` / `ctx.attr(name, default)`: decoded attributes: int, float, str (utf-8 decoded),
  lists of those, `torch.Tensor` for tensor attributes, `onnx.GraphProto` for graph attributes.
- `ctx.opset`: the opset version of the node's domain; `ctx.num_inputs` / `ctx.num_outputs`
  count the node's declared inputs/outputs ("" = omitted optional, passed to fn as None).
- `ctx.mode`: "train" (normalisation uses batch statistics, dropout off unless
  `ctx.extra.get("dropout")`) or "eval" (the graph exactly as exported).
- `ctx.extra`: the `extra` mapping given to `convert` (e.g. {"dropout": True}).
- `ctx.convert_subgraph(graph_proto) -> Subgraph`: converts a body (If/Loop/Scan). A builder
  that calls it must return a fn taking the node's inputs positionally plus a keyword
  `outer: dict[str, Any]` holding the outer-scope values the bodies read; the converter appends
  those names to the Node's inputs, so data flow stays explicit in the node list. Call a body
  as `subgraph(inputs: list, outer) -> list` (its declared outputs in order).
- `ctx.output_used(i)`: whether output i is declared and read by anything; skip computing
  optional outputs nobody reads (return None in their place).
- Refuse what cannot be honoured by raising `registry.UnsupportedAttribute(message)` from the
  builder (never from the returned fn): it is collected with the node name and opset.
- Values reaching a fn: torch tensors (data on the model's device; shape arithmetic on small
  int64 CPU tensors, see ops/elementwise.colocated for mixing them), Python lists of tensors
  for ONNX sequences (ops/sequence.py; never mutate one, build a new list), or None for
  omitted inputs.

Graph inputs and outputs may be tensors, sequences of tensors (`metadata` dtype
`seq(float32)`; a batch cannot feed a sequence input, `check_inputs` says so) or optional ones
(dtype `optional(float32)`, `optional(seq(float32))`: None when empty, ops/sequence.py); maps,
sparse tensors and sequences of sequences are refused by name.

`release_weights=True` (the default) empties the initializers of the given proto on success;
a refused model keeps them. `check_inputs(graph, inputs)` checks a batch against the declared
inputs (count, rank, fixed and symbolic dims) and raises `BatchError` naming the input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper

import service.engine.onnx.ops  # noqa: F401  (registers every op family)
from service.engine.graph import ConstantResult, Node, ObservableGraph, passthrough
from service.engine.onnx.dequantized_weights import dequantized_weights
from service.engine.onnx.dynamic_quantization import (
    STRAIGHT_THROUGH_SUFFIX,
    dynamic_quantization_as_fake,
)
from service.engine.onnx.fused_quantization import unfolded_quantized_ops
from service.engine.onnx.fusions import find_fusions
from service.engine.onnx.gradient_paths import (
    consumed_names,
    disconnected_weights,
    gradient_free_initializers,
    subgraphs,
)
from service.engine.onnx.loading import load_onnx, load_onnx_bundle, resolve_external_data
from service.engine.onnx.ops._util import (
    FLOAT_DTYPES,
    ONNX_TO_TORCH,
    SUB_BYTE_TO_TORCH,
    sub_byte_proto,
    sub_byte_tensor,
)
from service.engine.onnx.ops.indexing import PADDING_ROWS
from service.engine.onnx.ops.quantize import FLOAT8_TO_TORCH, fake_quantize_pairs
from service.engine.onnx.ops.random import expected_random_masks, masks_are_expected
from service.engine.onnx.ops.recurrent import QUANTIZED_STATE
from service.engine.onnx.padding_rows import padding_rows
from service.engine.onnx.power_iteration import detach_power_iterations, power_iteration_note
from service.engine.onnx.qoperator_as_qdq import qoperator_as_qdq
from service.engine.onnx.quantized_lstm import quantized_lstms_as_fake
from service.engine.onnx.recurrent_weights import (
    UnfoldedWeights,
    fold_recurrent_weight_reorders,
    unfold_gru_initializers,
)
from service.engine.onnx.registry import (
    DEFAULT_DOMAINS,
    OpContext,
    UnsupportedAttribute,
    lookup,
)
from service.engine.onnx.shape_values import input_shape_nodes
from service.engine.onnx.source_parameters import (
    EXPORTER_VALUE_NAME,
    ExportedSignature,
    Restored,
    folded_parameter_sources,
    folded_transposes,
    listed,
    modules_run,
    name_scopes,
    placeholders_read,
    restore_source_parameters,
)
from service.engine.onnx.straight_through import straight_through_estimators
from service.engine.onnx.unrolled_rnn import fold_unrolled_rnns
from service.engine.onnx.weight_only_quantization import nbits_weights_as_float
from service.errors import (
    BadInputError,
    BatchError,
    ModelFormatError,
    UnsupportedModelError,
    first_line,
)

SMALL_INT_NUMEL = 64
# dtype of a `seq(tensor(float))` graph input/output in `metadata`: `seq(float32)`
SEQUENCE_DTYPE_PREFIX = "seq("
# and of an `optional(...)` one: `optional(float32)`, `optional(seq(float32))`
OPTIONAL_DTYPE_PREFIX = "optional("
MODES = ("train", "eval")
# Float input slots that never reach a differentiable path: BatchNormalization's statistics
# (torch's running_mean/running_var buffers) and inputs whose values are never read (Shape,
# Size). An initializer feeding only these slots is a buffer, never reported as trainable.
# Checker complaints that onnxruntime does not share and that do not affect conversion:
# a graph output declared without a shape is still computable.
TOLERATED_CHECKER_ERRORS = {"Field 'shape' of 'type' is required but missing."}

__all__ = [
    "Subgraph",
    "check_inputs",
    "convert",
    "load_onnx",
    "load_onnx_bundle",
    "tensor_from_proto",
]


def tensor_from_proto(proto: TensorProto) -> torch.Tensor:
    """One copy of a TensorProto's data as a torch tensor (bfloat16 and friends included;
    float8, which only quantisation ops read; the narrow types, in their holders)."""
    if proto.data_type in FLOAT8_TO_TORCH:
        return _float8_tensor(proto)
    if proto.data_type not in ONNX_TO_TORCH:
        raise UnsupportedAttribute(
            f"tensor '{proto.name}' has element type "
            f"{TensorProto.DataType.Name(proto.data_type)}, which is not supported"
        )
    dtype = ONNX_TO_TORCH[proto.data_type]
    shape = tuple(proto.dims)
    if proto.data_type in SUB_BYTE_TO_TORCH:  # packed 2 or 4 a byte: unpacked, one a byte
        unpacked = onnx.numpy_helper.to_array(proto)
        return sub_byte_tensor(unpacked, proto.data_type).reshape(shape)
    if proto.HasField("raw_data"):
        raw = proto.raw_data
        if not raw:
            return torch.empty(shape, dtype=dtype)
        # bytearray: one copy we own (the proto's bytes are released afterwards).
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
    array = onnx.numpy_helper.to_array(proto)
    if dtype == torch.bfloat16:
        return torch.tensor(array.astype("float32"), dtype=torch.bfloat16).reshape(shape)
    return torch.from_numpy(array.copy()).reshape(shape)


def _float8_tensor(proto: TensorProto) -> torch.Tensor:
    dtype, shape = FLOAT8_TO_TORCH[proto.data_type], tuple(proto.dims)
    if proto.HasField("raw_data"):  # one byte per value, the same encoding as torch's
        return (
            torch.frombuffer(bytearray(proto.raw_data), dtype=torch.uint8)
            .view(dtype)
            .reshape(shape)
        )
    # int32_data holds one float8 byte per entry
    return torch.tensor(list(proto.int32_data), dtype=torch.uint8).view(dtype).reshape(shape)


def _moves_with_the_module(value: Any) -> bool:
    """Module state (moved by `.to()`) rather than a CPU constant: a float tensor, or an integer
    one too large to be a shape or axes argument."""
    return isinstance(value, torch.Tensor) and (
        value.dtype in FLOAT_DTYPES or value.numel() > SMALL_INT_NUMEL
    )


def _device_of(values: Sequence[Any]) -> torch.device:
    """The first accelerator device among `values`' tensors (a body's trip counts and
    conditions are CPU tensors beside CUDA data), else the CPU."""
    for value in values:
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            return value.device
    return torch.device("cpu")


def _release(proto: TensorProto) -> None:
    for name in (
        "raw_data",
        "float_data",
        "double_data",
        "int32_data",
        "int64_data",
        "uint64_data",
        "string_data",
    ):
        proto.ClearField(name)


def _decode_attr(attr: onnx.AttributeProto) -> Any:
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, TensorProto):
        return tensor_from_proto(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8", "replace") for v in value]
    if isinstance(value, list) and value and isinstance(value[0], TensorProto):
        return [tensor_from_proto(v) for v in value]
    return value


def _value_spec(info: onnx.ValueInfoProto) -> dict[str, Any]:
    kind = info.type.WhichOneof("value")
    spec: dict[str, Any] = {"name": info.name, "shape": None, "dtype": None, "kind": kind}
    if kind == "optional_type":  # the element's shape, dtype `optional(float32)`
        element = _value_spec(
            onnx.helper.make_value_info(info.name, info.type.optional_type.elem_type)
        )
        spec["shape"] = element["shape"]
        spec["dtype"] = f"{OPTIONAL_DTYPE_PREFIX}{element['dtype']})"
        return spec
    if kind == "sequence_type":  # dtype `seq(float32)`: the element's; no shape
        element = info.type.sequence_type.elem_type
        if element.WhichOneof("value") == "tensor_type":
            dtype = ONNX_TO_TORCH.get(element.tensor_type.elem_type)
            name = str(dtype).removeprefix("torch.") if dtype else "unsupported"
            spec["dtype"] = f"{SEQUENCE_DTYPE_PREFIX}{name})"
        return spec
    if kind == "tensor_type":
        tt = info.type.tensor_type
        dtype = ONNX_TO_TORCH.get(tt.elem_type)
        spec["dtype"] = (
            str(dtype).removeprefix("torch.")
            if dtype
            else TensorProto.DataType.Name(tt.elem_type).lower()
        )
        if tt.HasField("shape"):
            spec["shape"] = [
                d.dim_value
                if d.HasField("dim_value")
                else (d.dim_param if d.HasField("dim_param") else None)
                for d in tt.shape.dim
            ]
    return spec


# ONNX type kinds, as an error message names them
_TYPE_KIND_NAMES = {
    "sequence_type": "sequence",
    "optional_type": "optional value",
    "map_type": "map",
    "sparse_tensor_type": "sparse tensor",
    "opaque_type": "opaque value",
}


def _element_type_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:  # a number newer than this onnx knows
        return f"element type {elem_type}"


def _unsupported_value_type(name: str, proto: onnx.TypeProto) -> str | None:
    """Why a graph input/output of this type cannot be converted; None if it can. Tensors of
    a torch dtype, sequences of them (Python lists of tensors, ops/sequence.py) and optional
    ones of either (None when empty) can; maps, sparse tensors and sequences of anything but
    tensors cannot."""
    kind = proto.WhichOneof("value")
    if kind == "optional_type":
        element = proto.optional_type.elem_type
        if element.WhichOneof("value") in ("tensor_type", "sequence_type"):
            return _unsupported_value_type(name, element)
        what = _TYPE_KIND_NAMES.get(element.WhichOneof("value") or "", "value of unknown type")
        return f"'{name}' is an optional {what}: only optional tensors and sequences are supported"
    if kind == "tensor_type":
        if proto.tensor_type.elem_type in ONNX_TO_TORCH:
            return None
        return f"'{name}' has type {_element_type_name(proto.tensor_type.elem_type)}"
    if kind == "sequence_type":
        element = proto.sequence_type.elem_type
        element_kind = element.WhichOneof("value")
        if element_kind != "tensor_type":
            what = _TYPE_KIND_NAMES.get(element_kind or "", "value of unknown type")
            return f"'{name}' is a sequence of {what}s: only sequences of tensors are supported"
        if element.tensor_type.elem_type not in ONNX_TO_TORCH:
            dtype = _element_type_name(element.tensor_type.elem_type)
            return f"'{name}' is a sequence of {dtype} tensors"
        return None
    what = _TYPE_KIND_NAMES.get(kind or "", "value of unknown type")
    article = "an" if what[0] in "aeiou" else "a"
    return (
        f"'{name}' is {article} {what}: only tensors, sequences of tensors and optional ones "
        "are supported"
    )


@dataclass
class Subgraph:
    """A converted body (If branch, Loop/Scan body): runs its nodes over local values.

    `free_names` are the outer-scope values it reads; pass them in `outer`.
    `initial` (the body's initializers and Constants) lives on the CPU and is not module state;
    a call whose tensors are on another device reads a copy moved there, made once per device
    (the main graph's policy: floats and large integer tensors move, small integer ones, shapes
    and axes, stay on the CPU).
    """

    input_names: list[str]
    output_names: list[str]
    nodes: list[Node]
    initial: dict[str, Any]
    free_names: list[str] = field(default_factory=list)
    _moved: dict[torch.device, dict[str, Any]] = field(default_factory=dict, repr=False)

    def _initial_on(self, device: torch.device) -> dict[str, Any]:
        if device.type == "cpu":
            return self.initial
        if device not in self._moved:
            self._moved[device] = {
                name: value.to(device) if _moves_with_the_module(value) else value
                for name, value in self.initial.items()
            }
        return self._moved[device]

    def __call__(self, inputs: Sequence[Any], outer: Mapping[str, Any]) -> list[Any]:
        device = _device_of([*inputs, *outer.values()])
        values: dict[str, Any] = dict(self._initial_on(device))
        values.update(outer)
        values.update(zip(self.input_names, inputs, strict=False))
        values[""] = None
        for node in self.nodes:
            result = node.fn(*[values[name] for name in node.inputs])
            outputs = (result,) if len(node.outputs) == 1 else result
            for name, value in zip(node.outputs, outputs, strict=False):
                if name:
                    values[name] = value
        return [values[name] for name in self.output_names]


class _Builder:
    """Builds nodes for one model, collecting every problem instead of stopping at the first."""

    def __init__(
        self,
        opsets: dict[str, int],
        mode: str,
        extra: Mapping[str, Any],
        consumed: set[str] | None = None,
    ) -> None:
        self.opsets = opsets
        self.mode = mode
        self.extra = dict(extra)
        self.consumed = consumed  # every value name read anywhere; None = unknown
        self.problems: list[tuple[str, str, int, str, str]] = []  # domain, op, opset, node, why
        self.used_names: set[str] = set()
        # ONNX element types of values where known (OpContext.input_types)
        self.value_types: dict[str, int] = {}

    def declare_types(self, graph: GraphProto) -> None:
        """Record the element types `graph` declares (inputs, outputs, value_info,
        initializers)."""
        for info in [*graph.input, *graph.output, *graph.value_info]:
            if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
                self.value_types[info.name] = info.type.tensor_type.elem_type
        for init in graph.initializer:
            self.value_types[init.name] = init.data_type

    def _record_output_types(self, node: NodeProto, attrs: Mapping[str, Any]) -> None:
        if not node.output:
            return
        if node.op_type == "Cast" and isinstance(attrs.get("to"), int):
            self.value_types[node.output[0]] = attrs["to"]
        elif node.op_type == "Constant":
            value = next(
                (a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None
            )
            if value is not None:
                self.value_types[node.output[0]] = value.data_type

    def node_name(self, node: NodeProto, index: int, prefix: str) -> str:
        base = node.name or f"{prefix}{node.op_type}_{index}"
        name, k = base, 1
        while name in self.used_names:
            k += 1
            name = f"{base}_{k}"
        self.used_names.add(name)
        return name

    def build_node(self, node: NodeProto, name: str) -> Node:
        domain = "" if node.domain in DEFAULT_DOMAINS else node.domain
        opset = self.opsets.get(domain, 0)
        inputs = list(node.input)
        outputs = list(node.output)
        subgraphs: list[Subgraph] = []

        def convert_subgraph(graph: GraphProto) -> Subgraph:
            sub = self.build_subgraph(graph, prefix=f"{name}/")
            subgraphs.append(sub)
            return sub

        fn: Any = _unsupported
        attrs: dict[str, Any] = {}
        builder = lookup(node.op_type, domain, opset)
        if builder is None:
            self.problems.append((domain, node.op_type, opset, name, ""))
        else:
            try:
                attrs = {a.name: _decode_attr(a) for a in node.attribute}
            except UnsupportedAttribute as exc:
                self.problems.append((domain, node.op_type, opset, name, str(exc)))
                builder = None
        if builder is not None:
            ctx = OpContext(
                node=node,
                op_type=node.op_type,
                domain=domain,
                opset=opset,
                attrs=attrs,
                num_inputs=len(inputs),
                num_outputs=len(outputs),
                mode=self.mode,
                convert_subgraph=convert_subgraph,
                extra=self.extra,
                outputs_used=[
                    bool(o) and (self.consumed is None or o in self.consumed) for o in outputs
                ],
                input_types=[self.value_types.get(i, 0) if i else 0 for i in inputs],
            )
            stored_only = _stored_only_input(node, domain, ctx.input_types)
            if stored_only:
                self.problems.append((domain, node.op_type, opset, name, stored_only))
            try:
                fn = builder(ctx)
            except UnsupportedAttribute as exc:
                self.problems.append((domain, node.op_type, opset, name, str(exc)))
        self._record_output_types(node, attrs)
        if subgraphs:
            declared = len(inputs)
            free = sorted({n for sub in subgraphs for n in sub.free_names} - {""})
            inputs += free
            fn = _with_outer(fn, declared, free)
        return Node(
            name=name,
            op_type=node.op_type,
            inputs=inputs,
            outputs=outputs,
            fn=fn,
            domain=domain,
            # Decoded attributes (bodies left out): what a transform or a report reads.
            attrs={k: v for k, v in attrs.items() if not _is_graph(v)},
            source=node,
            scope=module_scope(node),
        )

    def build_subgraph(self, graph: GraphProto, prefix: str) -> Subgraph:
        initial: dict[str, Any] = {}
        for init in graph.initializer:
            try:
                initial[init.name] = tensor_from_proto(init)
            except UnsupportedAttribute as exc:
                self.problems.append(("", "initializer", 0, init.name, str(exc)))
        self.declare_types(graph)
        nodes = [self.build_node(n, self.node_name(n, i, prefix)) for i, n in enumerate(graph.node)]
        for node in nodes:  # Constants read a value in `initial`, which follows the device
            if node.op_type == "Constant" and len(node.outputs) == 1 and not self.problems:
                value = node.fn()
                if isinstance(value, torch.Tensor):
                    initial[f"{node.outputs[0]}::constant"] = value
                    node.inputs, node.fn = [f"{node.outputs[0]}::constant"], passthrough
        defined = set(initial) | {i.name for i in graph.input} | {""}
        free: list[str] = []
        for node in nodes:
            for name in node.inputs:
                if name not in defined and name not in free:
                    free.append(name)
            defined.update(node.outputs)
        free += [o.name for o in graph.output if o.name not in defined and o.name not in free]
        return Subgraph(
            input_names=[i.name for i in graph.input],
            output_names=[o.name for o in graph.output],
            nodes=nodes,
            initial=initial,
            free_names=free,
        )


def module_scope(node: NodeProto) -> str | None:
    """The source module path of a node: for the dynamo exporter its innermost name scope
    (`['', 'blocks.0', 'blocks.0.attn', 'linear_1']` → `blocks.0.attn`); for the legacy one,
    which names nodes by it, the path of the node's name (`/blocks.0/attn/MatMul` →
    `blocks.0.attn`); top-level ops → None."""
    scopes = name_scopes(node)
    if scopes:
        return scopes[-1] or None
    if node.name.startswith("/"):
        return ".".join(node.name.split("/")[1:-1]) or None
    return None


def _is_graph(value: Any) -> bool:
    return isinstance(value, GraphProto) or (
        isinstance(value, list) and bool(value) and isinstance(value[0], GraphProto)
    )


def _unsupported(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("unsupported node executed")  # never reached: convert() raises first


def _with_outer(fn: Any, declared: int, free: list[str]) -> Any:
    def run(*args: Any) -> Any:
        return fn(*args[:declared], outer=dict(zip(free, args[declared:], strict=True)))

    return run


def _check_structure(graph: GraphProto) -> None:
    """Dangling names and cycles, with messages that name the node and the value."""
    produced: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for out in node.output:
            if out:
                produced[out] = index
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    missing: list[str] = []
    for node in graph.node:
        for name in node.input:
            if name not in available and name not in produced:
                missing.append(f"input '{name}' of node '{node.name or node.op_type}'")
    for out in graph.output:
        if out.name not in available and out.name not in produced:
            missing.append(f"graph output '{out.name}'")
    if missing:
        raise ModelFormatError(
            "malformed ONNX graph: no node, initializer or graph input produces "
            + "; ".join(missing[:10])
            + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
        )
    # Kahn's algorithm over data dependencies: whatever cannot be scheduled is on a cycle.
    waiting = [
        {produced[n] for n in node.input if n in produced and n not in available}
        for node in graph.node
    ]
    users: dict[int, list[int]] = {}
    for index, deps in enumerate(waiting):
        for dep in deps:
            users.setdefault(dep, []).append(index)
    ready = [i for i, deps in enumerate(waiting) if not deps]
    done = 0
    while ready:
        index = ready.pop()
        done += 1
        for user in users.get(index, []):
            waiting[user].discard(index)
            if not waiting[user]:
                ready.append(user)
    if done < len(graph.node):
        stuck = [graph.node[i].name or graph.node[i].op_type for i, d in enumerate(waiting) if d]
        raise ModelFormatError(
            f"malformed ONNX graph: nodes form a cycle ({', '.join(stuck[:10])})"
        )


def _run_checker(model: ModelProto) -> None:
    if model.ByteSize() >= 2**31 - 1:
        return  # the checker cannot serialise it; our own structure checks still ran
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = first_line(exc)
        if first in TOLERATED_CHECKER_ERRORS:
            return
        raise ModelFormatError(f"malformed ONNX model: {first}") from exc


def _format_problems(problems: list[tuple[str, str, int, str, str]]) -> str:
    ops: dict[tuple[str, str, int, str], list[str]] = {}
    for domain, op_type, opset, node, why in problems:
        ops.setdefault((domain, op_type, opset, why), []).append(node)
    lines = []
    for (domain, op_type, opset, why), nodes in ops.items():
        where = ", ".join(nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
        what = f"{domain or 'ai.onnx'}::{op_type} (opset {opset})"
        lines.append(f"{what}: {why or 'op not supported'} [nodes: {where}]")
    return (
        f"the model uses {len(ops)} unsupported op/attribute combination(s); "
        "re-export it without them or with another opset: " + "; ".join(lines)
    )


def convert(
    model: ModelProto,
    *,
    mode: str = "train",
    bundle_dir: Path | None = None,
    extra: Mapping[str, Any] | None = None,
    release_weights: bool = True,
) -> ObservableGraph:
    """Convert an ONNX model into an executable, differentiable `ObservableGraph`."""
    if mode not in MODES:
        raise BadInputError(f"mode must be one of {', '.join(MODES)}, not '{mode}'")
    resolve_external_data(model, bundle_dir)
    graph = model.graph
    _check_structure(graph)
    # Initializers are read (one copy each, as torch tensors) and their proto bytes dropped
    # before the checker runs on a weightless twin: serialising 300 MB for the checker would
    # cost more than the whole conversion.
    weights: dict[str, torch.Tensor] = {}
    problems: list[tuple[str, str, int, str, str]] = []
    for init in graph.initializer:
        try:
            weights[init.name] = tensor_from_proto(init)
        except UnsupportedAttribute as exc:
            problems.append(("", "initializer", 0, init.name, str(exc)))
            continue
        _release(init)
    try:
        _run_checker(_weightless_twin(model))
        graph_module = _convert_checked(model, mode, extra, weights, problems)
    except BaseException:
        _restore(graph, weights)  # a refused model keeps its weights for the caller
        raise
    if not release_weights:
        _restore(graph, weights)
    return graph_module


def _inferred_dims(model: ModelProto) -> dict[str, list[int | None]]:
    """Every value's dims by ONNX shape inference with data propagation (None where a dim is
    not a fixed number; nothing where inference fails): what `Shape` of it gives before any
    input is seen."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_weightless_twin(model), data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        return {}
    dims: dict[str, list[int | None]] = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = info.type.tensor_type
        if info.type.HasField("tensor_type") and tensor_type.HasField("shape"):
            dims[info.name] = [
                d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
            ]
    return dims


def _weightless_twin(model: ModelProto) -> ModelProto:
    """`model` with its (released) initializers declared as graph inputs: the checker sees
    the same graph without needing their bytes. Nodes of the default domain that ONNX does not
    define at the model's opset are moved out of it (`_outside_onnx`)."""
    twin = ModelProto()
    twin.CopyFrom(model)
    declared = {i.name for i in twin.graph.input}
    for init in twin.graph.initializer:
        if init.name not in declared:
            twin.graph.input.append(
                helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            )
    del twin.graph.initializer[:]
    _outside_onnx(twin)
    return twin


# onnxruntime defines ops of its own in the default domain (SimplifiedLayerNormalization,
# which onnxruntime-genai's LLM exports use; LayerNormalization below opset 17), which onnx's
# checker refuses ("No Op registered for ..."): the whole model was then "malformed". In the
# checker's twin they move to this domain, which the checker does not know and so does not
# check; the converter builds them (or names them in its unsupported-op error) as they are.
_CONTRIB_DOMAIN = "ai.gradhealth.onnxruntime_default_domain"


def _outside_onnx(twin: ModelProto) -> None:
    opset = next((o.version for o in twin.opset_import if o.domain in DEFAULT_DOMAINS), 0)
    moved = False
    for graph in _graphs(twin.graph):
        for node in graph.node:
            if node.domain not in DEFAULT_DOMAINS:
                continue
            try:
                onnx.defs.get_schema(node.op_type, max_inclusive_version=opset, domain="")
            except onnx.defs.SchemaError:
                node.domain, moved = _CONTRIB_DOMAIN, True
    if moved:
        twin.opset_import.append(helper.make_opsetid(_CONTRIB_DOMAIN, 1))


def _graphs(graph: GraphProto) -> list[GraphProto]:
    """`graph` and every subgraph in it (If/Loop/Scan bodies), depth first."""
    found = [graph]
    for node in graph.node:
        for sub in subgraphs(node):
            found += _graphs(sub)
    return found


# Element types torch holds but computes nothing with (float8), or holds in a wider type (int4,
# int2 and the unsigned ones in int8/uint8, where arithmetic would not wrap; FLOAT4E2M1 in
# float8_e4m3fn): only these ops may read them, so that any other is refused at conversion
# instead of failing, or differing, mid-run.
_STORED_ONLY_TYPES = frozenset(FLOAT8_TO_TORCH) | frozenset(SUB_BYTE_TO_TORCH)
_READ_STORED_ONLY = frozenset(
    {"Cast", "CastLike", "QuantizeLinear", "DequantizeLinear", "BitCast", "Identity"}
    | {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Shape", "Size"}
)


def _stored_only_input(node: NodeProto, domain: str, input_types: list[int]) -> str:
    """Why `node` cannot read one of its inputs (a float8 or narrow value, see above); ""."""
    if domain not in ("", "ai.onnx") or node.op_type in _READ_STORED_ONLY:
        return ""
    for name, elem_type in zip(node.input, input_types, strict=False):
        if elem_type in _STORED_ONLY_TYPES:
            kind = TensorProto.DataType.Name(elem_type)
            return (
                f"input '{name}' is {kind}, which torch stores but computes nothing with; "
                "Cast it to a float type first"
            )
    return ""


def _restore(graph: GraphProto, weights: Mapping[str, torch.Tensor]) -> None:
    for init in graph.initializer:
        tensor = weights.get(init.name)
        if tensor is not None and init.data_type in SUB_BYTE_TO_TORCH:
            if not init.HasField("raw_data") and not init.int32_data:
                init.raw_data = sub_byte_proto(init.name, tensor, init.data_type).raw_data
        elif tensor is not None and not init.HasField("raw_data"):
            flat = tensor.detach().contiguous().reshape(-1)
            init.raw_data = flat.view(torch.uint8).numpy().tobytes()


def _convert_checked(
    model: ModelProto,
    mode: str,
    extra: Mapping[str, Any] | None,
    weights: dict[str, torch.Tensor],
    problems: list[tuple[str, str, int, str, str]],
) -> ObservableGraph:
    # onnxruntime's fused quantised ops (an optimised model's, QAttention, ...) unfolded into
    # the patterns below, and a QOperator-format model's QLinear ops written as QDQ (copies of
    # the graph; onnxruntime's conformance check runs the model as it is)
    graph, rewrite_notes = unfolded_quantized_ops(model.graph, weights)
    graph, qoperator_notes = qoperator_as_qdq(graph, weights)
    rewrite_notes += qoperator_notes
    # a dynamically quantised model's integer MatMuls: fake-quantised float ones (a copy)
    graph, dynamically_quantized, gathered_tables = dynamic_quantization_as_fake(graph, weights)
    # its LSTMs: fake-quantised float ones whose W and R are parameters (also a copy)
    graph, quantized_lstm_weights = quantized_lstms_as_fake(graph, weights)
    # a weight-only quantised model's packed weights: float ones, parameters (also a copy)
    graph, unpacked = nbits_weights_as_float(graph, weights)
    opsets = {
        ("" if o.domain in DEFAULT_DOMAINS else o.domain): int(o.version)
        for o in model.opset_import
    }
    consumed = consumed_names(graph)
    builder = _Builder(opsets, mode, extra or {}, consumed)
    builder.problems.extend(problems)
    builder.declare_types(graph)

    init_names = {i.name for i in graph.initializer}
    input_infos = [i for i in graph.input if i.name not in init_names]
    for info in [*input_infos, *graph.output]:
        why = _unsupported_value_type(info.name, info.type)
        if why:
            builder.problems.append(("", "graph value", 0, info.name, why))

    parameters: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    constants: dict[str, Any] = {}
    # Statistics and initializers nothing reads are state, not trainable weights: reporting
    # them as parameters would show gradients that can never exist. A dynamo export's
    # signature names the source's buffers (a rotary embedding's inv_freq) outright.
    non_finite = _non_finite_initializers(weights)
    signature = ExportedSignature.of(graph)
    not_trainable = (
        set(signature.state)
        | gradient_free_initializers(graph)
        | (set(weights) - consumed)
        | non_finite
        | _folded_scalars(weights, folded_parameter_sources(graph, list(weights)))
        | _batchnorm_statistics(weights)
        | _zero_initial_states(graph, weights)
    )
    # a post-training-quantised model's integer weights: float parameters, dequantized
    taken_names = set(weights) | init_names | {o for node in graph.node for o in node.output}
    dequantized = dequantized_weights(graph, weights, taken_names)
    for weight in dequantized.values():
        weights[weight.name] = weight.value
        if weight.integer in not_trainable:
            not_trainable.add(weight.name)
    for name, tensor in weights.items():
        if tensor.dtype in FLOAT_DTYPES and name not in not_trainable:
            parameters[name] = torch.nn.Parameter(tensor)
        elif tensor.dtype in FLOAT_DTYPES:
            buffers[name] = tensor
        elif tensor.numel() <= SMALL_INT_NUMEL:
            constants[name] = tensor
        else:
            buffers[name] = tensor

    builder.extra[PADDING_ROWS], padding_notes = padding_rows(graph, parameters)
    rewrite_notes += padding_notes
    nodes: list[Node] = []
    for index, proto in enumerate(graph.node):
        node = builder.build_node(proto, builder.node_name(proto, index, ""))
        if proto.op_type == "Constant" and not builder.problems and len(node.outputs) == 1:
            node = _constant_as_state(node, buffers, constants)
        nodes.append(node)
    # a Constant -inf is a mask's too (Hugging Face's legacy exports build the causal mask as
    # Where(allowed, 0, -inf) from two Constants)
    non_finite |= {
        key
        for key, value in buffers.items()
        if key.endswith(_CONSTANT_SUFFIX) and value.dtype in FLOAT_DTYPES and not _all_finite(value)
    }
    if builder.problems:
        raise UnsupportedModelError(_format_problems(builder.problems))
    replaced = {out: weight.name for weight in dequantized.values() for out in weight.readers}
    for node in nodes:
        if node.op_type == "DequantizeLinear" and node.outputs and node.outputs[0] in replaced:
            node.inputs = [replaced[node.outputs[0]]]
            node.fn = passthrough
    # a DequantizeLinear whose output the parameter is named as: the parameter is its value
    nodes = [n for n in nodes if not (n.inputs and n.outputs and n.inputs == n.outputs)]
    taken = [*buffers, *constants, *(i.name for i in input_infos)]
    taken += [o for n in nodes for o in n.outputs]
    nodes, restored = restore_source_parameters(
        nodes,
        parameters,
        dict.fromkeys(taken),
        folded_parameter_sources(graph, list(parameters)),
        signature,
        folded_transposes(graph, list(parameters)),
    )
    buffers.update(restored.constants)
    if masks_are_expected(mode, dict(extra or {})):
        producers = {out: node for node in nodes for out in node.outputs if out}
        expected_masks = expected_random_masks(nodes, producers)
    else:
        expected_masks = {}
    fake_quantized = fake_quantize_pairs(nodes, [o.name for o in graph.output])
    straight_through = straight_through_estimators(
        nodes, {out: node for node in nodes for out in node.outputs if out}
    )
    straight_through = [n for n in straight_through if not n.endswith(STRAIGHT_THROUGH_SUFFIX)]
    power_iterations = detach_power_iterations(nodes, buffers, parameters)
    # activations quantised at run time and computed as fake quantisation (the rewrites'
    # straight-through nodes; a quantised LSTM's hidden state at every step)
    dynamic_quantizers = [n.name for n in nodes if n.name.endswith(STRAIGHT_THROUGH_SUFFIX)] + [
        f"{n.name}/h" for n in nodes if n.op_type == "LSTM" and n.attrs.get(QUANTIZED_STATE)
    ]
    _fold_constants(nodes, constants)

    unfolded = UnfoldedWeights(signature=signature)
    nodes = fold_recurrent_weight_reorders(
        nodes,
        constants,
        {**parameters, **buffers},
        [o.name for o in graph.output],
        static_dims=lambda: _inferred_dims(model),
        unfolded=unfolded,
    )
    nodes = unfold_gru_initializers(nodes, {**parameters, **buffers}, unfolded)
    for name, tensor in unfolded.parameters.items():
        parameters[name] = torch.nn.Parameter(tensor)
    restored.unfolded.extend(unfolded.parameters)
    for name in unfolded.recipes:  # rebuilt from the parameters where needed: no second copy
        parameters.pop(name, None)
    nodes = fold_unrolled_rnns(
        nodes, constants, {**parameters, **buffers}, [o.name for o in graph.output]
    )
    # what the folds left unread (an optimised export's folded first RNN step) is no weight
    read = {name for node in nodes for name in node.inputs}
    unread = {name for name in parameters if name not in read}
    for name in unread:
        buffers[name] = parameters.pop(name).detach()
    restored.unread(unread)
    for name, sources in folded_parameter_sources(graph, list(parameters)).items():
        if sources:
            restored.folded_from[name] = sources
            for source in [s for s in sources if s in parameters]:  # a tied weight's product
                restored.also_computed_ahead.setdefault(source, []).append(name)
        else:  # folded from constants and input shapes: a constant
            buffers[name] = parameters.pop(name).detach()
    metadata: dict[str, Any] = {
        "mode": mode,
        "extra": dict(extra or {}),
        "opset_imports": opsets,
        "ir_version": int(model.ir_version),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [_value_spec(i) for i in input_infos],
        "outputs": [_value_spec(o) for o in graph.output],
    }
    for spec in metadata["inputs"] + metadata["outputs"]:
        spec.pop("kind", None)
    if non_finite:
        # masks: their -inf entries spread through Add/Where until a Softmax absorbs them, which
        # is no NaN/Inf origin (service/engine/probes.py)
        metadata["non_finite_states"] = sorted(non_finite)
    if restored.transposed:  # onnxruntime's copy of the model reads them
        metadata["transposed_initializers"] = restored.transposed
    if restored.reshaped or restored.copied:  # a copy: reshaped to its own shape
        metadata["reshaped_initializers"] = {**restored.reshaped, **restored.copied}
    if unfolded.recipes:
        metadata["gate_reordered_initializers"] = unfolded.recipes
    notes = folded_batchnorm_notes(graph) + restored.notes() + _shared_initializer_notes(graph)
    notes += rewrite_notes
    dead_nodes, disconnected = disconnected_weights(graph)
    if disconnected:
        notes.append(
            f"{len(dead_nodes)} node(s) compute values no output depends on "
            f"({listed(dead_nodes, 3)}): part of the model is not connected to its outputs "
            f"(an export that wired them elsewhere), so its {len(disconnected)} weight(s) "
            f"({listed(disconnected, 3)}) get no gradient and are not reported as parameters"
        )
    absent = _unread_source_parameters(graph, signature, parameters, buffers, restored)
    if absent:
        notes.append(_unread_source_parameters_note(absent, modules_run(graph)))
    if expected_masks:
        notes.append(
            f"{len(expected_masks)} random mask(s) (a drop path's Bernoulli sample: "
            f"{', '.join(list(expected_masks)[:3])}) are their expected value, as dropout is "
            "off in train mode; --dropout samples them"
        )
        metadata["expected_masks"] = expected_masks  # onnxruntime's copy computes the same
    if dequantized:
        shown = listed([w.name for w in dequantized.values()])
        notes.append(
            f"{len(dequantized)} weight(s) stored as integers (a post-training-quantised model: "
            f"{shown}) are float parameters holding their dequantized values: the "
            "gradients are those of fine-tuning from this checkpoint, whose activation "
            "quantisers stay fake-quantised"
        )
    if unpacked:
        notes.append(
            f"{len(unpacked)} weight(s) stored packed in 2/4/8 bits (MatMulNBits, a weight-only "
            f"quantised model: {listed(unpacked)}) are float parameters holding their "
            "dequantized values: the gradients are those of fine-tuning from this checkpoint"
        )
    if dynamically_quantized:
        notes.append(
            f"{len(dynamically_quantized)} integer product(s) of a dynamically quantised model "
            "(DynamicQuantizeLinear → MatMulInteger or ConvInteger) are computed as fake "
            "quantisation: the "
            "same products in float, each activation's rounding passing the gradient straight "
            "through, so that every layer's weight has a gradient"
        )
    if quantized_lstm_weights:
        notes.append(
            f"{len(quantized_lstm_weights) // 2} dynamically quantised LSTM(s) "
            f"(DynamicQuantizeLSTM: {listed(quantized_lstm_weights)}) are computed as fake "
            "quantisation: float W and R holding their dequantized values (parameters), the "
            "input and each step's hidden state rounded as onnxruntime rounds them, the "
            "gradient passing each rounding straight through"
        )
    if gathered_tables:
        notes.append(
            f"{len(gathered_tables)} integer table(s) gathered before their dequantization (a "
            f"dynamically quantised model's embeddings: {listed(gathered_tables)}) are "
            "dequantized before the Gather (the same values), so that they are parameters"
        )
    if straight_through:
        notes.append(
            f"{len(straight_through)} straight-through estimator(s) (x + (q − x), written "
            f"without the .detach() the export dropped: {', '.join(straight_through[:3])}) "
            "pass the gradient to x, as in training"
        )
    if power_iterations:
        notes.append(power_iteration_note(power_iterations))
    if dynamic_quantizers:  # conformance.py says what they change
        metadata["dynamic_quantizers"] = dynamic_quantizers
    if fake_quantized:
        metadata["fake_quantizers"] = fake_quantized  # conformance.py says what they change
        notes.append(
            f"{len(fake_quantized)} QuantizeLinear → DequantizeLinear pair(s) are fake "
            "quantisation with the straight-through gradient, as in quantisation-aware training: "
            "the gradient passes where a value is in the quantised range and is zero where it is "
            "clamped"
        )
    if notes:
        metadata["notes"] = notes  # the engine adds them to the report's notes
    input_names = [i.name for i in input_infos]
    return ObservableGraph(
        nodes,
        input_names=input_names,
        output_names=[o.name for o in graph.output],
        parameters=parameters,
        buffers=buffers,
        constants=constants,
        metadata=metadata,
        input_shape_nodes=input_shape_nodes(
            nodes, inputs=input_names, state=[*parameters, *buffers], constants=constants
        ),
        fusions=find_fusions(nodes, [o.name for o in graph.output], opsets.get("", 0)),
    )


# Ops never folded: their value changes per run (randomness), they carry subgraphs, or
# their output size is data-dependent (below).
UNFOLDABLE = {
    "Dropout",
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "If",
    "Loop",
    "Scan",
    # Ops whose output size comes from input *values*: a hostile model could ask for
    # terabytes at conversion time; at run time the job's limits apply.
    "ConstantOfShape",
    "Range",
    "Expand",
    "Tile",
    "EyeLike",
    "OneHot",
    "Resize",
    "Upsample",
    "Pad",
    "CenterCropPad",
}


def _fold_constants(nodes: list[Node], constants: dict[str, Any]) -> None:
    """Precompute nodes that only read small CPU constants (exporters' `Constant → Unsqueeze
    → Concat` chains): the Node stays, observable as before, but returns the stored value.

    Only integer/bool results (or 0-d ones) are kept, so nothing pinned to the CPU ever meets
    a non-scalar tensor on another device.
    """
    static = set(constants)
    for node in nodes:
        if (
            node.op_type in UNFOLDABLE
            or not node.inputs
            or not all(name in static or name == "" for name in node.inputs)
        ):
            continue
        args = [constants.get(name) if name else None for name in node.inputs]
        try:
            with torch.no_grad():
                result = node.fn(*args)
        except Exception:  # left to fail, with its message, at run time
            continue
        outputs = (result,) if len(node.outputs) == 1 else tuple(result)
        if not all(_foldable_value(v) for v in outputs):
            continue
        for name, value in zip(node.outputs, outputs, strict=False):
            if name:
                static.add(name)
                constants[name] = value
        node.fn = ConstantResult(result)


def _foldable_value(value: Any) -> bool:
    if not isinstance(value, torch.Tensor):
        return False
    small = value.numel() <= SMALL_INT_NUMEL
    return small and (value.dim() == 0 or not (value.dtype.is_floating_point or value.is_complex()))


# The dynamo exporter's optimizer (`optimize=True`, its default) folds BatchNormalization into
# the convolution (or Gemm) before it. It tags the fused node with the rewrite rule's name
# (`FuseBatchNormIntoConv`) and, for a convolution without a bias, names the new bias after the
# weight (`conv1.weight_bias`).
REWRITE_RULE_KEY = "pkg.onnxscript.rewriter.rule_name"
FOLDED_BN_BIAS_SUFFIX = "weight_bias"
CONV_OPS = frozenset({"Conv", "ConvTranspose"})


def folds_batchnorm(node: NodeProto) -> bool:
    if any(p.key == REWRITE_RULE_KEY and "BatchNorm" in p.value for p in node.metadata_props):
        return True
    return (
        node.op_type in CONV_OPS
        and len(node.input) > 2
        and node.input[2].endswith(FOLDED_BN_BIAS_SUFFIX)
    )


def _unread_source_parameters(
    graph: GraphProto,
    signature: ExportedSignature,
    parameters: Mapping[str, Any],
    buffers: Mapping[str, Any],
    restored: Restored,
) -> list[str]:
    """Parameters of the export's signature that the converted graph does not hold, not even
    as the source of a value the optimizer computed ahead, and that no node's FX op read."""
    if not signature.parameters:
        return []
    held = set(parameters) | set(buffers)
    held |= {name for sources in restored.folded_from.values() for name in sources}
    read = placeholders_read(graph)
    return sorted(
        name
        for placeholder, name in signature.parameters.items()
        if name not in held and placeholder not in read
    )


def _unread_source_parameters_note(absent: Sequence[str], modules: set[str]) -> str:
    """The note on parameters of the source the graph does not read (`absent`), by whether a
    node of the graph runs in their module (`modules`): torch.export reads a tied weight
    through one placeholder, so the module of the other name runs and reads it under that
    one; no node at all runs in a module the forward pass never calls."""
    unused = [name for name in absent if name.rpartition(".")[0] not in modules]
    tied = [name for name in absent if name not in unused]
    reasons = []
    if unused:
        reasons.append(
            f"no node of the graph runs in the modules of {listed(unused, 4)}: the forward "
            "pass does not call them, so they get no gradient, unless the ONNX exporter's "
            "optimizer folded them away (a BatchNorm into its convolution) or merged their "
            "computation with an identical one (two freshly initialised LayerNorms of one "
            "input); re-export with optimize=False to tell"
        )
    if tied:
        reasons.append(
            f"the modules of {listed(tied, 4)} run but read another weight in their place: "
            "tied to it (an input embedding tied to the output projection: one parameter "
            "with the gradient of every use), or unused by the module"
        )
    return (
        f"{len(absent)} parameter(s) of the source model ({listed(absent, 4)}) are not read by "
        f"the exported graph: {'; '.join(reasons)}"
    )


def _shared_initializer_notes(graph: GraphProto) -> list[str]:
    """The legacy exporter stores equal initializers once in an inference-mode export (a fresh
    model's deep-copied layers) and gives each other use an `Identity` of it (after
    post-training quantisation, of its DequantizeLinear): one parameter, whose gradient is the
    sum over its uses."""
    initializers = {init.name for init in graph.initializer}
    dequantized = {
        node.output[0]: node.input[0].removesuffix("_quantized")  # dequantized_weights.py
        for node in graph.node
        if node.op_type == "DequantizeLinear" and node.input and node.input[0] in initializers
    }
    pairs = [
        f"{node.output[0]} = {dequantized.get(node.input[0], node.input[0])}"
        for node in graph.node
        if node.op_type == "Identity"
        and node.input
        and (node.input[0] in initializers or node.input[0] in dequantized)
    ]
    if not pairs:
        return []
    shown = listed(pairs)
    return [
        f"{len(pairs)} weight(s) are read as Identity copies of another ({shown}): the ONNX "
        "exporter stores equal tensors once in an inference-mode export (a fresh model's "
        "deep-copied layers, or tied weights), so each is one parameter whose gradient is the "
        "sum over its uses; export in training mode (training=TrainingMode.TRAINING) or a "
        "trained model to measure copies that are not tied apart"
    ]


def folded_batchnorm_notes(graph: GraphProto) -> list[str]:
    """A note when BatchNormalization was folded into convolutions at export: the graph then
    has no BN layers to measure and `mode=train` cannot use batch statistics."""
    if any(node.op_type == "BatchNormalization" for node in graph.node):
        return []
    folded = [module_scope(n) or n.name or n.op_type for n in graph.node if folds_batchnorm(n)]
    if not folded:
        return []
    shown = listed(folded)
    return [
        f"BatchNorm ({shown}) was folded into the layer before it by the ONNX exporter's "
        "optimizer: there are no BatchNorm layers to measure and batch statistics are not "
        "available, so mode=train runs the inference-time normalisation; re-export with "
        "torch.onnx.export(..., dynamo=True, optimize=False) to keep BatchNorm"
    ]


def _folded_scalars(
    weights: Mapping[str, torch.Tensor], folded_from: Mapping[str, list[str]]
) -> set[str]:
    """One-element float initializers the dynamo exporter's optimizer made by constant folding
    (attention's 1/sqrt(head_dim) scale becomes `val_81`): constants, not weights. A module's
    own scalar parameter keeps its name (`temperature`, `blocks.0.gamma`), and one the exporter
    reshaped (nn.PReLU()'s one slope as [1, 1, 1] for broadcasting: `val_1`, folded from
    `1.weight` alone; `folded_from`: `folded_parameter_sources`) is that parameter."""
    return {
        name
        for name, tensor in weights.items()
        if tensor.dtype in FLOAT_DTYPES
        and tensor.numel() == 1
        and EXPORTER_VALUE_NAME.fullmatch(name)
        and len(folded_from.get(name, [])) != 1
    }


# the buffers torch's BatchNorm registers, under the state_dict names the exporters keep
_BATCHNORM_STATISTICS = ("running_mean", "running_var")


def _batchnorm_statistics(weights: Mapping[str, torch.Tensor]) -> set[str]:
    """A BatchNorm's running statistics read outside a BatchNormalization: a QAT Conv-BN
    module (torch.ao's ConvBn2d scales its weight by bn.weight / sqrt(running_var)) or a batch
    norm written out by hand. They are buffers in the source model, never trained; as
    parameters they got a gradient and counted in parameter_count."""
    return {name for name in weights if name.rsplit(".", 1)[-1] in _BATCHNORM_STATISTICS}


# Recurrent ops' initial-state inputs (initial_h; LSTM's initial_c).
INITIAL_STATE_SLOTS = {("", "LSTM"): (5, 6), ("", "GRU"): (5,), ("", "RNN"): (5,)}


def _zero_initial_states(graph: GraphProto, weights: Mapping[str, torch.Tensor]) -> set[str]:
    """All-zero float initializers with exporter-made names (`val_16`) read only as a recurrent
    op's initial state: torch's default zero state (`nn.LSTM(x)` without `(h0, c0)`), which
    the dynamo exporter stores as a constant. It is no weight of the source model; as a
    parameter its gradient (∂L/∂h0, tiny after many steps) made a false fp16-underflow
    forecast and counted in parameter_count. A learned state keeps its module name."""
    at_slot: set[str] = set()
    elsewhere: set[str] = {o.name for o in graph.output}
    for node in graph.node:
        domain = "" if node.domain in DEFAULT_DOMAINS else node.domain
        slots = INITIAL_STATE_SLOTS.get((domain, node.op_type), ())
        for i, name in enumerate(node.input):
            (at_slot if i in slots else elsewhere).add(name)
        for sub in subgraphs(node):
            elsewhere |= consumed_names(sub)
    return {
        name
        for name in at_slot - elsewhere
        if EXPORTER_VALUE_NAME.fullmatch(name)
        and name in weights
        and weights[name].dtype in FLOAT_DTYPES
        and not bool(weights[name].any())
    }


def _non_finite_initializers(weights: Mapping[str, torch.Tensor]) -> set[str]:
    """Float initializers holding an inf or NaN: masks (a causal attention mask full of -inf,
    registered as a buffer in torch), never weights that training could have produced. As
    parameters they would be reported as non-finite weights and re-initialised by fixes."""
    return {
        name
        for name, tensor in weights.items()
        if tensor.dtype in FLOAT_DTYPES and not _all_finite(tensor)
    }


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether no element is inf or NaN. A finite sum proves it (an inf, a -inf or a NaN term
    leaves every sum non-finite) at a fifteenth of the cost of an elementwise check on 300 MB
    (no 78M-element mask); a non-finite sum may also be an overflow, so then each element."""
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


_CONSTANT_SUFFIX = "::constant"  # the state key of a Constant node's value


def _constant_as_state(
    node: Node, buffers: dict[str, torch.Tensor], constants: dict[str, Any]
) -> Node:
    """A Constant's value becomes module state (moved by `.to()`); the node just reads it."""
    value = node.fn()
    if not isinstance(value, torch.Tensor):
        return node
    key = f"{node.outputs[0]}{_CONSTANT_SUFFIX}"
    if _moves_with_the_module(value):
        buffers[key] = value
    else:
        constants[key] = value
    node.inputs = [key]
    node.fn = passthrough
    return node


def check_inputs(graph: ObservableGraph, inputs: Sequence[torch.Tensor | None]) -> None:
    """Refuse inputs whose count, rank or fixed dims differ from the model's declared inputs
    (None: an empty optional input)."""
    specs = graph.metadata.get("inputs", [])
    if len(inputs) != len(specs):
        names = ", ".join(s["name"] for s in specs)
        raise BatchError(
            f"the model takes {len(specs)} input(s) ({names}), the batch gives {len(inputs)}"
        )
    for spec in specs:
        if SEQUENCE_DTYPE_PREFIX in str(spec.get("dtype") or ""):  # optional ones too
            raise BatchError(
                f"input '{spec['name']}' is a sequence of tensors ({spec['dtype']}): a batch "
                "feeds tensors only; re-export the model with one tensor input per element"
            )
    symbols: dict[str, int] = {}
    for spec, value in zip(specs, inputs, strict=True):
        shape = spec.get("shape")
        if shape is None or value is None:  # None: an empty optional
            continue
        actual = list(value.shape)
        if len(actual) != len(shape):
            raise BatchError(
                f"input '{spec['name']}' must have {len(shape)} dimensions {shape}, "
                f"the batch gives shape {actual}"
            )
        for axis, (want, got) in enumerate(zip(shape, actual, strict=True)):
            if isinstance(want, int) and want > 0 and want != got:
                raise BatchError(
                    f"input '{spec['name']}' must have size {want} on axis {axis} "
                    f"(declared shape {shape}), the batch gives shape {actual}"
                )
            if isinstance(want, str) and want and symbols.setdefault(want, got) != got:
                raise BatchError(
                    f"dimension '{want}' of input '{spec['name']}' is {got} but another "
                    f"input gives it size {symbols[want]}"
                )
