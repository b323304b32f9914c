"""Vanilla RNNs that torch.onnx's dynamo exporter writes out step by step, folded into RNN nodes.

`torch.onnx.export(..., dynamo=True)`, torch's default exporter, writes `nn.RNN` (tanh or relu)
not as an ONNX `RNN` node but as its steps: the input projection once, then per step t

    x_t = Squeeze(Slice(P, [t], [t+1], [0]))        P = Add(MatMul(X, Transpose(W_ih)), b_ih)
    h_t = Tanh(Add(Add(MatMul(h_{t-1}, Transpose(W_hh)), b_hh), x_t))      (or Relu)

(seven nodes a step; no Add where the module has no bias). With the exporter's optimizer (its
default), the Transposes are folded into `val_N` initializers, which the converter turns back
into the module's weights, each reader with its own Transpose (onnx/source_parameters.py), and
the first step, for h0 = 0, reads an initializer holding b_hh in every row (zeros without bias)
in place of h0·W_hhᵀ + b_hh: that step folds too, the node then starting from zeros.

Run as written, that is a Python call and an autograd node per op: the small bench RNN took 1.8×
torch's time where the legacy export's RNN node takes 0.6×, and the diagnosis saw one layer per step
and no recurrent op, so nothing was judged over time. Here each such chain becomes one node of op
type `RNN`, computed as an ONNX RNN node is (RecurrentFn: the whole-sequence loops for tanh),
reading the exported parameters directly. Its outputs are the whole sequence Y [T, B, H] and every
step's hidden state under the exporter's names (what its Concat and later nodes read); the per-step
nodes leave the graph. A bidirectional module's reverse direction is the same chain over P reversed
by a Slice (step -1), or cutting P at T-1 first: it folds into an RNN node of direction "reverse".
Only the exact pattern folds (every intermediate value read by its step alone, the steps cutting P
at 0, 1, ..., T-1 in one order or the other, one activation); anything else runs as written.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from service.engine.graph import Node, passthrough
from service.engine.onnx.ops.recurrent import RecurrentFn, rnn
from service.engine.onnx.registry import OpContext

_ACTIVATIONS = {"Tanh": "Tanh", "Relu": "Relu"}


@dataclass
class _Step:
    """One written-out step: h_t = act(h_prev·W_hhᵀ + b_hh + P[t])."""

    t: int
    h_prev: str
    sequence: str  # P
    weight_hh: str
    bias_hh: str  # "" without bias
    activation: Node
    nodes: list[Node]  # the step's nodes, the activation last
    # The first step of an optimised export (below): no h_prev, no product; `start` is the
    # initializer the exporter's optimizer folded h0·W_hhᵀ + b_hh into, for h0 = 0.
    start: str = ""


class WrittenOutRNN:
    """The NodeFn of a folded chain: (X [T, B, I], W_ih [H, I], W_hh [H, H], b_ih, b_hh or None,
    h0 [B, H] or [1, B, H], or None for zeros of `state_rank`) → (the steps' states
    concatenated on axis 0, h_0, ..., h_{T-1}), each h_t shaped as h0 (the exporter keeps
    nn.RNN's [layers, B, H] state axis through the steps, so the first output is then
    Y [T, B, H]; a view either way)."""

    def __init__(self, inner: RecurrentFn, state_rank: int | None = None) -> None:
        self.inner = inner
        self.state_rank = state_rank

    def __call__(
        self,
        X: Tensor,
        weight_ih: Tensor,
        weight_hh: Tensor,
        bias_ih: Tensor | None,
        bias_hh: Tensor | None,
        h0: Tensor | None,
    ) -> tuple[Tensor, ...]:
        bias = None
        if bias_ih is not None and bias_hh is not None:  # ONNX's B row: Wb then Rb
            bias = torch.cat([bias_ih, bias_hh]).unsqueeze(0)
        initial = None if h0 is None else h0.reshape(1, X.shape[1], weight_hh.shape[0])
        Y = self.inner(X, weight_ih.unsqueeze(0), weight_hh.unsqueeze(0), bias, None, initial)
        assert isinstance(Y, Tensor)  # [T, 1, B, H]
        sequence = Y.squeeze(1)
        if (h0.dim() if h0 is not None else self.state_rank) == 3:
            return (sequence, *Y.unbind(0))
        return (sequence.reshape(-1, sequence.shape[-1]), *sequence.unbind(0))


def fold_unrolled_rnns(
    nodes: list[Node],
    constants: Mapping[str, object],
    state: Mapping[str, Tensor],
    graph_outputs: Sequence[str],
) -> list[Node]:
    """`nodes` with each written-out vanilla RNN (see the module docstring) as one RNN node.
    `state`: the graph's parameters and buffers; `constants`: its small constant values."""
    producers = {out: node for node in nodes for out in node.outputs if out}
    readers = Counter(name for node in nodes for name in node.inputs if name)
    readers.update(graph_outputs)
    match = _Matcher(producers, readers, constants, state)
    steps = [s for node in nodes if (s := match.step(node)) is not None]
    after = {s.h_prev: s for s in steps if not s.start}
    states = {s.activation.outputs[0] for s in steps}
    position = {id(node): k for k, node in enumerate(nodes)}
    replaced: dict[int, Node | None] = {}  # node id → the folded node at its place, or None
    for first in (s for s in steps if s.h_prev not in states):
        chain = [first]
        while (following := after.get(chain[-1].activation.outputs[0])) is not None:
            if not _continues(chain, following):
                break
            chain.append(following)
        # a forward direction cuts P at 0, 1, ..., T-1; a reverse one at T-1, ..., 0, or at
        # 0, 1, ... of P reversed
        cuts = [step.t for step in chain]
        if len(chain) < 2 or sorted(cuts) != list(range(len(chain))):
            continue
        if first.start and not match.zero_start(chain):
            continue
        projection = match.projection(chain)
        if projection is None:
            continue
        removed = [n for step in chain for n in step.nodes] + projection.nodes
        last = max(position[id(n)] for n in removed)
        outputs = [step.activation.outputs[0] for step in chain]
        # readers of the hidden states outside the chain must run after the folded node
        gone = {id(n) for n in removed}
        if any(
            position[id(n)] < last and id(n) not in gone
            for n in nodes
            if any(o in n.inputs for o in outputs)
        ):
            continue
        node = _folded_node(chain, projection, state)
        for n in removed:
            replaced[id(n)] = None
        replaced[id(nodes[last])] = node
        _read_sequence_whole(node, nodes)
    if not replaced:
        return nodes
    result: list[Node] = []
    for n in nodes:
        if id(n) not in replaced:
            result.append(n)
        elif (folded_node := replaced[id(n)]) is not None:
            result.append(folded_node)
    return _without_orphaned_transposes(result, nodes, graph_outputs)


def _without_orphaned_transposes(
    result: list[Node], before: list[Node], graph_outputs: Sequence[str]
) -> list[Node]:
    """Drop the Transposes of a weight that only folded steps read (one shared by every step,
    as the exporter's optimizer leaves it): nothing reads them any more."""
    read_before = {name for node in before for name in node.inputs}
    read_now = {name for node in result for name in node.inputs} | set(graph_outputs)
    return [
        n
        for n in result
        if n.op_type != "Transpose" or n.outputs[0] not in read_before or n.outputs[0] in read_now
    ]


def _read_sequence_whole(node: Node, nodes: list[Node]) -> None:
    """The exporter's Concat of every step's state on axis 0 is the folded node's first output:
    it passes that on (no copy), and the whole sequence, whose gradient the report shows for
    the layer, is read."""
    steps = node.outputs[1:]
    for concat in nodes:
        if concat.op_type == "Concat" and concat.inputs == steps and concat.attrs.get("axis") == 0:
            concat.inputs = [node.outputs[0]]
            concat.fn = passthrough


def _continues(chain: list[_Step], following: _Step) -> bool:
    """`following` is the chain's next step: the next time in the chain's direction, the same
    sequence, weights and activation (a start step has no weights to compare)."""
    step, last = chain[0], chain[-1]
    direction = following.t - step.t if len(chain) == 1 else chain[1].t - step.t
    return (
        following.t == last.t + direction
        and direction in (1, -1)
        and following.sequence == step.sequence
        and (bool(last.start) or following.weight_hh == last.weight_hh)
        and (bool(last.start) or following.bias_hh == last.bias_hh)
        and following.activation.op_type == step.activation.op_type
    )


def _folded_node(chain: list[_Step], projection: _Projection, state: Mapping[str, Tensor]) -> Node:
    """The RNN node for `chain`: forward when it cuts P at 0 first, else reverse. Its outputs
    after Y are the steps' states in time order, as Y holds them."""
    matmul = projection.nodes[1]
    hidden = int(state[chain[0].weight_hh].shape[0])
    steps = len(chain)
    reverse = projection.flipped or chain[0].t != 0
    # the time step each chain step computes (over a reversed P, cut k is time T-1-k)
    times = [steps - 1 - s.t if projection.flipped else s.t for s in chain]
    states = [
        s.activation.outputs[0] for _, s in sorted(zip(times, chain, strict=True), key=_first)
    ]
    attrs = {
        "hidden_size": hidden,
        "activations": [_ACTIVATIONS[chain[0].activation.op_type]],
        "layout": 0,
        "direction": "reverse" if reverse else "forward",
    }
    inner = rnn(
        OpContext(
            node=None,
            op_type="RNN",
            domain="",
            opset=14,
            attrs=attrs,
            num_inputs=6,
            num_outputs=1,
        )
    )
    assert isinstance(inner, RecurrentFn)
    name = f"{matmul.name}::RNN"
    start = chain[0].start
    state_rank = state[start].dim() if start else None
    return Node(
        name=name,
        op_type="RNN",
        inputs=projection.inputs,
        outputs=[f"{name}::Y", *states],
        fn=WrittenOutRNN(inner, state_rank),
        attrs=attrs,
        scope=matmul.scope,
    )


def _first(pair: tuple[int, _Step]) -> int:
    return pair[0]


class _Matcher:
    def __init__(
        self,
        producers: Mapping[str, Node],
        readers: Counter[str],
        constants: Mapping[str, object],
        state: Mapping[str, Tensor],
    ) -> None:
        self.producers = producers
        self.readers = readers
        self.constants = constants
        self.state = state

    def _private(self, name: str, op_type: str) -> Node | None:
        """The producer of `name` if it is an `op_type` node and `name` is read once."""
        node = self.producers.get(name)
        if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
            return None
        return node if self.readers[name] == 1 else None

    def _weight_transpose(self, name: str, shared: bool = False) -> str | None:
        """The 2-D parameter W of a private Transpose(W, perm [1, 0]); `shared`: also of one
        that other nodes read (the optimizer's one Transpose of W_hh for every step)."""
        node = self.producers.get(name)
        if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            return None
        if list(node.attrs.get("perm", [1, 0])) != [1, 0]:
            return None
        if self.readers[name] != 1 and not shared:
            return None
        weight = node.inputs[0]
        tensor = self.state.get(weight)
        return weight if tensor is not None and tensor.dim() == 2 else None

    def _bias(self, name: str) -> bool:
        tensor = self.state.get(name)
        return tensor is not None and tensor.dim() == 1

    def _ints(self, name: str) -> list[int] | None:
        value = self.constants.get(name)
        if not isinstance(value, Tensor) or value.is_floating_point() or value.numel() > 4:
            return None
        return [int(v) for v in value.reshape(-1).tolist()]

    def _cut(self, name: str) -> tuple[str, int, list[Node]] | None:
        """(P, t, [Slice, Squeeze]) for a private Squeeze(Slice(P, [t], [t+1], [0]), [0])."""
        squeeze = self._private(name, "Squeeze")
        if squeeze is None or len(squeeze.inputs) != 2 or self._ints(squeeze.inputs[1]) != [0]:
            return None
        cut = self._private(squeeze.inputs[0], "Slice")
        if cut is None or len(cut.inputs) not in (4, 5):
            return None
        start, end, axes = (self._ints(n) for n in cut.inputs[1:4])
        steps = self._ints(cut.inputs[4]) if cut.inputs[4:5] not in ([], [""]) else [1]
        if start is None or len(start) != 1 or end != [start[0] + 1] or axes != [0]:
            return None
        if steps != [1] or start[0] < 0:
            return None
        return cut.inputs[0], start[0], [cut, squeeze]

    def step(self, activation: Node) -> _Step | None:
        """The step that `activation` (a Tanh or Relu) ends, if it is one."""
        if activation.op_type not in _ACTIVATIONS or activation.domain not in ("", "ai.onnx"):
            return None
        total = self._private(activation.inputs[0], "Add")
        if total is None:
            return None
        for recurrent, current in (total.inputs, total.inputs[::-1]):
            cut = self._cut(current)
            if cut is None:
                continue
            sequence, t, cut_nodes = cut
            if self._start_state(recurrent):
                return _Step(
                    t=t,
                    h_prev="",
                    sequence=sequence,
                    weight_hh="",
                    bias_hh="",
                    activation=activation,
                    nodes=[*cut_nodes, total, activation],
                    start=recurrent,
                )
            bias_node = self._private(recurrent, "Add")
            bias, product_name = "", recurrent
            if bias_node is not None and self._bias(bias_node.inputs[1]):
                bias, product_name = bias_node.inputs[1], bias_node.inputs[0]
            product = self._private(product_name, "MatMul")
            if product is None:
                continue
            weight = self._weight_transpose(product.inputs[1], shared=True)
            if weight is None:
                continue
            # a shared Transpose stays in the graph until nothing reads it (fold_unrolled_rnns)
            transpose = [self.producers[product.inputs[1]]]
            if self.readers[product.inputs[1]] > 1:
                transpose = []
            body = [*transpose, product, *([bias_node] if bias_node is not None and bias else [])]
            return _Step(
                t=t,
                h_prev=product.inputs[0],
                sequence=sequence,
                weight_hh=weight,
                bias_hh=bias,
                activation=activation,
                nodes=[*body, *cut_nodes, total, activation],
            )
        return None

    def _start_state(self, name: str) -> bool:
        """`name` is a float [B, H] or [1, B, H] initializer that no node computes."""
        tensor = self.state.get(name)
        return (
            name not in self.producers
            and tensor is not None
            and tensor.is_floating_point()
            and tensor.dim() in (2, 3)
            and (tensor.dim() == 2 or tensor.shape[0] == 1)
        )

    def zero_start(self, chain: list[_Step]) -> bool:
        """The chain's start step (`_Step.start`) is its step for h0 = 0: the folded
        initializer holds b_hh in every row (zeros without a bias). Then that step takes the
        chain's weights, with no initial state: the folded node starts from zeros."""
        first, second = chain[0], chain[1]
        folded = self.state[first.start]
        hidden = self.state[second.weight_hh].shape[0]
        if folded.shape[-1] != hidden:
            return False
        bias = self.state[second.bias_hh] if second.bias_hh else torch.zeros(hidden)
        with torch.no_grad():
            if not torch.equal(folded, bias.to(folded.dtype).expand_as(folded)):
                return False
        first.weight_hh, first.bias_hh = second.weight_hh, second.bias_hh
        return True

    def projection(self, chain: list[_Step]) -> _Projection | None:
        """The chain's input projection P = Add(MatMul(X, Transpose(W_ih)), b_ih) (or the MatMul
        alone), cut by the chain alone, possibly through a Slice that reverses it on axis 0 (how
        the exporter runs a bidirectional module's reverse direction); biases both there or
        both absent."""
        sequence = chain[0].sequence
        if self.readers[sequence] != len(chain):
            return None
        node = self.producers.get(sequence)
        nodes: list[Node] = []
        flipped = node is not None and self._reverses(node)
        if flipped:
            assert node is not None
            nodes.append(node)
            if self.readers[node.inputs[0]] != 1:
                return None
            node = self.producers.get(node.inputs[0])
        bias = ""
        if node is not None and node.op_type == "Add" and self._bias(node.inputs[1]):
            bias = node.inputs[1]
            nodes.append(node)
            product = self._private(node.inputs[0], "MatMul")
        else:
            product = node if node is not None and node.op_type == "MatMul" else None
        if product is None or bool(bias) != bool(chain[0].bias_hh):
            return None
        weight = self._weight_transpose(product.inputs[1])
        if weight is None:
            return None
        transpose = self.producers[product.inputs[1]]
        inputs = [product.inputs[0], weight, chain[0].weight_hh, bias, chain[0].bias_hh]
        return _Projection([transpose, product, *nodes], [*inputs, chain[0].h_prev], flipped)

    def _reverses(self, node: Node) -> bool:
        """`node` is a Slice that takes its input whole, backwards, along axis 0."""
        if node.op_type != "Slice" or len(node.inputs) != 5:
            return False
        start, end, axes, steps = (self._ints(n) for n in node.inputs[1:5])
        return (
            start == [-1]
            and axes == [0]
            and steps == [-1]
            and end is not None
            and end[0] <= -(2**31)
        )


@dataclass
class _Projection:
    nodes: list[Node]  # Transpose(W_ih), MatMul, then the bias Add and the reversing Slice if any
    inputs: list[str]  # the folded node's: X, W_ih, W_hh, b_ih, b_hh, h0
    flipped: bool  # the chain cuts P reversed on axis 0
