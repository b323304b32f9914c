"""Feed exported LSTMs and GRUs torch's parameters directly, without the exporter's reordering
chain.

torch.onnx's exporters write the weights of each `nn.LSTM` layer as
    W = Unsqueeze(Concat(Slice(weight_ih, 0:H), Slice(weight_ih, 3H:4H), Slice(weight_ih, H:3H)))
(torch's gate order i, f, g, o gathered into ONNX's i, o, f, c; dynamo slices four blocks and
computes the bounds as H·k from the shape of an initial state), R the same from weight_hh, and
B as Unsqueeze(Concat(the same of bias_ih, the same of bias_hh)); a bidirectional layer
concatenates both directions' (Concat(Unsqueeze(forward), Unsqueeze(reverse))). Run as written,
that chain copies every weight on each call, and its backward zero-fills and adds a full-size
gradient per Slice: ~0.37 ms per layer per training step for hidden 128, about a fifth of a
2-layer LSTM's whole step. The LSTM computes in any gate order (`RecurrentFn.gate_blocks`), so
here the chain goes: the LSTM node reads the parameters themselves, told which block holds which
gate, and the chain's nodes, which compute nothing but that layout, leave the graph. The results
and every parameter's gradient are the same (the tests compare both against onnxruntime and
torch). An `nn.GRU` layer's chain is the same with three blocks (torch's r, z, n gathered into
ONNX's z, r, n): 40 of a 2-layer GRU's 48 nodes per call, and their backward; its
node then gathers ONNX's order itself, one `index_select` per tensor (gru_sequence.py).

Only the exact pattern is folded (Slice bounds known before any input (StaticValues) on whole
H-blocks of one parameter along axis 0, forming a permutation shared by W, R and both biases of
every direction; every intermediate value read by the chain alone); anything else keeps its
nodes and runs as exported.

torch.onnx.export's default optimizer folds those chains into initializers (`val_41` [D, 4H, I]
in ONNX's gate order; for larger weights only B's): the report would name the layer's
parameters `val_N`, and B would be one tensor for two. The dynamo exporter records the module's
parameter names on each LSTM/GRU node (`pkg.torch.onnx.fx_node` of its `aten.lstm` call), so such
initializers are split back into torch's tensors under those names (`_unfold`): an LSTM then
reads them as above; a GRU (no direct-weights path) reads the ONNX tensor that a `GateReorder`
node computes from them (`unfold_gru_initializers`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from onnx import NodeProto
from torch import Tensor

from service.engine.graph import Node
from service.engine.onnx.ops.recurrent import RecurrentFn, use_gate_blocks
from service.engine.onnx.source_parameters import (
    ExportedSignature,
    fx_node_text,
    read_parameter_names,
)

# LSTM inputs: X, W, R, B, sequence_lens, initial_h, initial_c, P
_W, _R, _B = 1, 2, 3
# ONNX's gates i, o, f, c as torch's blocks (i, f, g, o): block k of an ONNX weight is torch's
# block ONNX_GATE_BLOCKS[k]
ONNX_GATE_BLOCKS = [0, 3, 1, 2]


@dataclass
class Recipe:
    """How an initializer an optimised export folded is built again from torch's tensors
    (`GateReorder(blocks, halves)(*parameters)`): for onnxruntime's copy of the model, so the
    folded tensor itself is not kept beside the parameters."""

    parameters: list[str]
    blocks: list[int]
    halves: bool


@dataclass
class UnfoldedWeights:
    """What `_unfold` split out of folded initializers: the new parameters, and the recipe of
    each initializer they replace."""

    parameters: dict[str, Tensor] = field(default_factory=dict)
    recipes: dict[str, Recipe] = field(default_factory=dict)
    # the export's graph signature, which names the parameters the recurrent FX nodes read
    signature: ExportedSignature = field(default_factory=ExportedSignature)

    def take(self, look: _Lookup) -> None:
        self.parameters.update(look.unfolded)
        self.recipes.update(look.recipes)


class DirectWeights:
    """The NodeFn of a rewired LSTM or GRU node with D directions: (X, weight_ih × D,
    weight_hh × D, (bias_ih, bias_hh) × D, *the node's other inputs) → the node's outputs, the
    weights in their own gate order."""

    def __init__(self, inner: RecurrentFn, directions: int) -> None:
        self.inner = inner
        self.directions = directions

    def __call__(self, X: Tensor, *args: Any) -> Any:
        d = self.directions
        ws, rs, biases, rest = args[:d], args[d : 2 * d], args[2 * d : 4 * d], args[4 * d :]
        if d == 1:  # torch's own tensors straight into one autograd node, where it applies
            outputs = self.inner.one_direction(X, ws[0], rs[0], *biases, *_padded(rest, 4))
            if outputs is not None:
                return outputs
        bias = None
        if all(b is not None for b in biases):  # ONNX's B rows: Wb then Rb per direction
            bias = _stacked([torch.cat(biases[2 * k : 2 * k + 2]) for k in range(d)])
        return self.inner(X, _stacked(ws), _stacked(rs), bias, *rest)


def _padded(inputs: Sequence[Any], count: int) -> list[Any]:
    """`inputs` with the omitted trailing optional inputs as None, `count` in all."""
    return [*inputs, *[None] * (count - len(inputs))]


def _stacked(per_direction: Sequence[Tensor]) -> Tensor:
    """[D, ...]; for one direction a view."""
    if len(per_direction) == 1:
        return per_direction[0].unsqueeze(0)
    return torch.stack(list(per_direction))


def fold_recurrent_weight_reorders(
    nodes: list[Node],
    constants: Mapping[str, Any],
    state: Mapping[str, Tensor],
    graph_outputs: Sequence[str],
    static_dims: Callable[[], Mapping[str, list[int | None]]] = dict,
    unfolded: UnfoldedWeights | None = None,
) -> list[Node]:
    """`nodes` with each LSTM or GRU that reads its weights through the exporter's reordering
    chain rewired to the parameters (see the module docstring). `state`: the
    graph's parameters and buffers; `constants`: its small constant values; `static_dims`:
    called at most once, the dims ONNX shape inference gives each value (None: not static);
    `unfolded`: collects the parameters split out of an optimised export's folded W, R and B
    (`_unfold`; without it, such LSTMs are left as they are; a GRU's: unfold_gru_initializers)."""
    producers = {out: node for node in nodes for out in node.outputs if out}
    readers = Counter(name for node in nodes for name in node.inputs if name)
    readers.update(graph_outputs)
    dropped: set[int] = set()
    values = StaticValues(producers, constants, static_dims)
    layer_names = _layer_names(nodes, "LSTM", unfolded.signature) if unfolded is not None else {}
    for node in nodes:
        if node.op_type not in ("LSTM", "GRU") or not isinstance(node.fn, RecurrentFn):
            continue
        if len(node.inputs) < 3:
            continue
        look = _Lookup(producers, values, state)
        found = _match_chain(node, look, layer_names.get(id(node)))
        if found is None:
            continue
        params, blocks, chain = found
        if not _private(chain, node, readers) or not use_gate_blocks(node.fn, blocks):
            continue
        if unfolded is not None:
            unfolded.take(look)
        node.fn = DirectWeights(node.fn, node.fn.settings.directions)
        node.inputs = [node.inputs[0], *params, *node.inputs[4:]]
        dropped.update(id(n) for n in chain)
    return [n for n in nodes if id(n) not in dropped]


@dataclass
class _Lookup:
    """What the matcher reads, and the chain nodes it has walked through."""

    producers: Mapping[str, Node]
    values: StaticValues
    state: Mapping[str, Tensor]
    chain: list[Node] = field(default_factory=list)
    # W, R or B that the exporter's optimizer folded into initializers, split back into
    # torch's per-direction tensors (`_unfold`), added as parameters if the LSTM is rewired
    unfolded: dict[str, Tensor] = field(default_factory=dict)
    recipes: dict[str, Recipe] = field(default_factory=dict)  # per folded initializer


class StaticValues:
    """Small integer values known before any input: the folded constants, and what the
    dynamo exporter computes from shapes that do not depend on the input (its LSTM weight
    slices end at `Shape(zeros)[2:3]`, the hidden size of an initial state, times 1..4).

    A `Shape` is known where ONNX's own shape inference (with data propagation) gives static
    dims for its input; the arithmetic after it is evaluated with the nodes' own functions.
    Inference runs at most once, on the first Shape asked for (`static_dims` is lazy).
    """

    # ops whose small-integer results are evaluated once their inputs are known
    EVALUATED = frozenset(
        {"Add", "Sub", "Mul", "Div", "Concat", "Unsqueeze", "Squeeze", "Gather", "Slice"}
        | {"Cast", "Identity", "Reshape"}
    )

    def __init__(
        self,
        producers: Mapping[str, Node],
        constants: Mapping[str, Any],
        static_dims: Callable[[], Mapping[str, list[int | None]]],
    ) -> None:
        self.producers = producers
        self.constants = constants
        self._static_dims = static_dims
        self._dims: Mapping[str, list[int | None]] | None = None
        self._known: dict[str, Tensor | None] = {}

    def get(self, name: str, depth: int = 0) -> Tensor | None:
        if name in self.constants:
            value = self.constants[name]
            return value if isinstance(value, Tensor) else None
        if name not in self._known:
            self._known[name] = self._evaluate(name, depth)
        return self._known[name]

    def _evaluate(self, name: str, depth: int) -> Tensor | None:
        node = self.producers.get(name)
        if node is None or depth > 16 or len(node.outputs) != 1:
            return None
        if node.op_type == "Shape":
            return self._shape(node)
        if node.op_type not in self.EVALUATED:
            return None
        args = [self.get(n, depth + 1) if n else None for n in node.inputs]
        if any(a is None for a, n in zip(args, node.inputs, strict=True) if n):
            return None
        try:
            with torch.no_grad():
                value = node.fn(*args)
        except Exception:  # left to fail, with its message, at run time (as _fold_constants)
            return None
        small = isinstance(value, Tensor) and value.numel() <= 64
        return value if small and not value.dtype.is_floating_point else None

    def _shape(self, node: Node) -> Tensor | None:
        if self._dims is None:
            self._dims = self._static_dims()
        dims = self._dims.get(node.inputs[0])
        if dims is None:
            return None
        start, end = node.attrs.get("start", 0), node.attrs.get("end")
        wanted = dims[start:end]
        if any(d is None for d in wanted):
            return None
        return torch.tensor(wanted, dtype=torch.int64)


def _match_chain(
    node: Node, look: _Lookup, layer_names: list[str] | None
) -> tuple[list[str], list[int], list[Node]] | None:
    """([weight_ih × D, weight_hh × D, (bias_ih, bias_hh) × D] ("" for no bias), gate blocks,
    chain nodes) for D directions. `layer_names`: the module's parameter names for this layer
    (`_layer_names`, LSTMs only), which the inputs an optimised export folded into
    initializers take."""
    if not isinstance(node.fn, RecurrentFn):
        return None
    directions, gates = node.fn.settings.directions, node.fn.gates
    named, bias_names = _flat_to_slots(layer_names, directions) if layer_names else ([], [])
    weights: list[tuple[str, list[int]]] = []
    for k, slot in enumerate((_W, _R)):
        folded_names = named[k * directions : (k + 1) * directions]
        if folded_names and _unfold(node.inputs[slot], folded_names, ONNX_GATE_BLOCKS, look):
            weights += [(name, ONNX_GATE_BLOCKS) for name in folded_names]
            continue
        for inner in _per_direction(node.inputs[slot], directions, look):
            weight = _reorder(inner, look, gates)
            if weight is None:
                return None
            weights.append(weight)
    blocks = weights[0][1]
    if any(order != blocks for _, order in weights):
        return None
    params = [name for name, _ in weights]
    bias_name = node.inputs[_B] if len(node.inputs) > _B else ""
    if not bias_name:
        return [*params, *[""] * (2 * directions)], blocks, look.chain
    if bias_names and _unfold(bias_name, bias_names, blocks, look):
        return [*params, *bias_names], blocks, look.chain
    for both in _per_direction(bias_name, directions, look):
        halves = _concat_inputs(both, look)
        if halves is None or len(halves) != 2:
            return None
        for half in halves:
            bias = _reorder(half, look, gates)
            if bias is None or bias[1] != blocks:
                return None
            params.append(bias[0])
    return params, blocks, look.chain


def _layer_names(
    nodes: Sequence[Node], op_type: str, signature: ExportedSignature
) -> dict[int, list[str]]:
    """Node id → the source module's parameter names of that recurrent layer (torch's flat
    order, per direction w_ih, w_hh[, b_ih, b_hh]), for dynamo exports: the FX node each LSTM
    (GRU) node records is the module's whole `aten.lstm` (`aten.gru`), listing every layer's
    parameters; the k-th node of one FX node is layer k."""
    by_call: dict[str, list[Node]] = {}
    for node in nodes:
        if node.op_type == op_type and isinstance(node.source, NodeProto):
            call = fx_node_text(node.source)
            if call is not None:
                by_call.setdefault(call, []).append(node)
    names: dict[int, list[str]] = {}
    for layers in by_call.values():
        proto = layers[0].source
        assert isinstance(proto, NodeProto)
        every = read_parameter_names(proto, signature)
        if not every or len(every) % len(layers):
            continue
        size = len(every) // len(layers)
        for k, node in enumerate(layers):
            names[id(node)] = every[k * size : (k + 1) * size]
    return names


def _torch_order(piece: Tensor, blocks: list[int]) -> Tensor:
    """A [gates·H, ...] piece whose block k holds torch's gate block blocks[k], in torch's
    order."""
    inverse = [blocks.index(b) for b in range(len(blocks))]
    return piece.reshape(len(blocks), -1, *piece.shape[1:])[inverse].reshape(piece.shape)


def _unfold(name: str, names: list[str], blocks: list[int], look: _Lookup) -> bool:
    """An initializer an optimised dynamo export folded its reordering chain into (W or R
    [D, gates·H, ·] in ONNX's gate order, or B [D, 2·gates·H]: each row bias_ih then bias_hh)
    split back into torch's per-direction tensors `names`, in torch's gate order (into
    `look.unfolded`): the layer reads them as it reads an unoptimised export's, and the report
    names them as the module does."""
    folded = look.state.get(name)
    if folded is None or name in look.producers or folded.dim() not in (2, 3):
        return False
    if any(n in look.state or n in look.producers or n in look.unfolded for n in names):
        return False
    if folded.dim() == 3:  # W or R: one [gates·H, ·] per direction
        pieces = list(folded.unbind(0))
    else:  # B: bias_ih, bias_hh per direction
        pieces = list(folded.reshape(folded.shape[0] * 2, -1).unbind(0))
    if len(pieces) != len(names) or any(p.shape[0] % len(blocks) for p in pieces):
        return False
    with torch.no_grad():
        for piece_name, piece in zip(names, pieces, strict=True):
            look.unfolded[piece_name] = _torch_order(piece, blocks).clone()
    look.recipes[name] = Recipe(list(names), blocks, halves=folded.dim() == 2)
    return True


def _flat_to_slots(layer_names: list[str], directions: int) -> tuple[list[str], list[str]]:
    """torch's flat order of a layer's parameters (per direction: w_ih, w_hh[, b_ih, b_hh])
    → (w_ih × D then w_hh × D, (b_ih, b_hh) × D; empty without biases)."""
    per = len(layer_names) // directions
    weights = [layer_names[d * per + k] for k in (0, 1) for d in range(directions)]
    biases = (
        [layer_names[d * per + k] for d in range(directions) for k in (2, 3)] if per == 4 else []
    )
    return weights, biases


class GateReorder:
    """NodeFn putting torch's per-direction recurrent parameters back into the ONNX tensor an
    optimised export had folded them into: (one tensor per direction, or bias_ih and bias_hh
    per direction when `halves`) → [D, ...], gate blocks in ONNX's order (`blocks`)."""

    def __init__(self, blocks: list[int], halves: bool) -> None:
        self.blocks = blocks
        self.halves = halves

    def __call__(self, *pieces: Tensor) -> Tensor:
        n = len(self.blocks)
        ordered = [p.reshape(n, -1, *p.shape[1:])[self.blocks].reshape(p.shape) for p in pieces]
        if self.halves:
            ordered = [torch.cat(ordered[k : k + 2]) for k in range(0, len(ordered), 2)]
        return torch.stack(ordered)


# ONNX's GRU gates z, r, h as torch's blocks (r, z, n)
ONNX_GRU_GATE_BLOCKS = [1, 0, 2]


def unfold_gru_initializers(
    nodes: list[Node],
    state: Mapping[str, Tensor],
    unfolded: UnfoldedWeights,
) -> list[Node]:
    """GRU nodes of an optimised dynamo export read W, R and B folded into initializers in
    ONNX's gate order: those become the module's parameters again (named from the export's
    metadata, torch's gate order), each ONNX tensor computed from them by a `GateReorder`
    node just before the GRU, so gradients and the report are per torch parameter."""
    producers = {out: node for node in nodes for out in node.outputs if out}
    layer_names = _layer_names(nodes, "GRU", unfolded.signature)
    before: dict[int, list[Node]] = {}
    for node in nodes:
        names = layer_names.get(id(node))
        if names is None or not isinstance(node.fn, RecurrentFn):
            continue
        directions = node.fn.settings.directions
        weights, biases = _flat_to_slots(names, directions)
        slots = [(_W, weights[:directions], False), (_R, weights[directions:], False)]
        if biases and len(node.inputs) > _B and node.inputs[_B]:
            slots.append((_B, biases, True))
        for slot, slot_names, halves in slots:
            look = _Lookup(producers, StaticValues(producers, {}, dict), state)
            if not _unfold(node.inputs[slot], slot_names, ONNX_GRU_GATE_BLOCKS, look):
                continue
            unfolded.take(look)
            value = f"{node.inputs[slot]}::from_parameters"
            reorder = Node(
                name=value,
                op_type="GateReorder",
                domain="gradhealth",
                inputs=slot_names,
                outputs=[value],
                fn=GateReorder(ONNX_GRU_GATE_BLOCKS, halves),
            )
            before.setdefault(id(node), []).append(reorder)
            node.inputs = [value if i == slot else v for i, v in enumerate(node.inputs)]
    return [n for node in nodes for n in [*before.get(id(node), []), node]]


def _per_direction(name: str, directions: int, look: _Lookup) -> list[str | None]:
    """The per-direction values an LSTM input [D, ...] is made of: Unsqueeze(v) for one
    direction, Concat(Unsqueeze(forward), Unsqueeze(reverse)) on axis 0 for two; [None] when
    it is made otherwise (the callers' matching then fails on it)."""
    pieces = [name] if directions == 1 else _concat_inputs(name, look) if directions == 2 else None
    if pieces is None or len(pieces) != directions:
        return [None]
    return [_unsqueezed(piece, look) for piece in pieces]


def _unsqueezed(name: str, look: _Lookup) -> str | None:
    """The data input of `name`'s producer when that is an Unsqueeze on axis 0."""
    node = look.producers.get(name)
    if node is None or node.op_type != "Unsqueeze":
        return None
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        axes = _ints(look.values.get(node.inputs[1]))
    if axes is None or list(axes) != [0]:
        return None
    look.chain.append(node)
    return node.inputs[0]


def _concat_inputs(name: str | None, look: _Lookup) -> list[str] | None:
    node = None if name is None else look.producers.get(name)
    if node is None or node.op_type != "Concat" or node.attrs.get("axis") != 0:
        return None
    look.chain.append(node)
    return list(node.inputs)


def _reorder(name: str | None, look: _Lookup, gates: int) -> tuple[str, list[int]] | None:
    """(parameter, its blocks in the order the Concat gathers them) for a Concat of Slices of
    one parameter along axis 0 that together take each of its `gates` blocks once."""
    pieces = _concat_inputs(name, look)
    if not pieces:
        return None
    sources: set[str] = set()
    rows: list[tuple[int, int]] = []
    for piece in pieces:
        node = look.producers.get(piece)
        bounds = None if node is None else _slice_rows(node, look.values)
        if node is None or bounds is None:
            return None
        sources.add(node.inputs[0])
        rows.append(bounds)
        look.chain.append(node)
    source = sources.pop() if len(sources) == 1 else None
    param = None if source is None or source in look.producers else look.state.get(source)
    if param is None or param.dim() == 0 or param.shape[0] % gates:
        return None
    block = param.shape[0] // gates
    if any(start % block or end % block or end > param.shape[0] for start, end in rows):
        return None
    order = [b for start, end in rows for b in range(start // block, end // block)]
    whole = sorted(order) == list(range(gates))
    return (source, order) if source is not None and whole else None


def _slice_rows(node: Node, values: StaticValues) -> tuple[int, int] | None:
    """(start, end) of a Slice on axis 0 with step 1 and static, non-negative bounds."""
    if node.op_type != "Slice":
        return None
    if "starts" in node.attrs:  # opset < 10: bounds are attributes
        starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
        axes, steps = node.attrs.get("axes"), None
    else:
        bound_names = node.inputs[1:5]
        named = [values.get(n) if n else None for n in bound_names]
        if len(node.inputs) < 3 or any(
            v is None for v, n in zip(named, bound_names, strict=True) if n
        ):
            return None
        starts, ends = _ints(named[0]), _ints(named[1])
        axes = _ints(named[2]) if len(named) > 2 else None
        steps = _ints(named[3]) if len(named) > 3 else None
    if starts is None or ends is None or len(starts) != 1 or len(ends) != 1:
        return None
    if axes not in (None, [0]) or steps not in (None, [1]):
        return None
    start, end = int(starts[0]), int(ends[0])
    return (start, end) if 0 <= start < end else None


def _ints(value: Any) -> list[int] | None:
    if isinstance(value, Tensor) and not value.dtype.is_floating_point:
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, list | tuple) and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def _private(chain: list[Node], lstm: Node, readers: Counter[str]) -> bool:
    """Whether every value the chain makes is read only by the chain itself and the LSTM."""
    internal = Counter(name for node in chain for name in node.inputs if name)
    internal.update(name for name in lstm.inputs[_W : _B + 1] if name)
    return all(readers[out] == internal[out] for node in chain for out in node.outputs if out)
