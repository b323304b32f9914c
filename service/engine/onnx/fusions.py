"""Where an export spelled out op by op what torch ran as one kernel: the groups of converted
nodes that one call computes when nobody observes them (graph.FusedNodes).

- Attention: `MatMul(q [· s], kᵀ [· s]) [· c | / c] [+ mask] → Softmax(last axis) →
  MatMul(·, v)`, what both exporters write for `F.scaled_dot_product_attention` and
  nn.MultiheadAttention, as `F.scaled_dot_product_attention(q, k, v, attn_mask, scale)`. Its
  fused kernels keep no [L, S] score tensor: a 12-layer d=768 encoder's training step on an
  H200 took 4 % longer with torch's own attention made explicit (`sdpa_kernel(MATH)`), about
  what the converted module lost against torch (bench/README.md, session 17).
- Linear: `MatMul(x, w) + b` with a 2-D w and a 1-D b, the legacy exporter's nn.Linear on
  inputs of rank > 2, as one `F.linear` (the bias added by the product's epilogue; on the
  CPU oneDNN's inner product with bias, _cpu_products).

Only on the CPU, where a 4-layer d=256 encoder's training step took 0.4-1.8 % less CPU time
fused (attention or linear alone, or both; bench/README.md, session 17). On an H200 the
12-layer d=768 step took 1.081× torch's time fused against 1.057× node by node in one process:
F.linear has cuBLAS pick the bias-epilogue kernels torch's own nn.Linear runs, slower there
than a plain product and an Add, and the memory-efficient attention kernels saved no time over
the explicit products in fp32 (not keeping the probabilities would save memory on long
sequences: untried).

Each group is checked again at every call: the fast form runs only when it computes what the
nodes would (shapes, dtypes, one-element scales, no autocast, the softmax over the last
axis, and no NaN the nodes would give: torch's CPU attention kernel returns zeros for a NaN
input or a row whose every key is masked, where the nodes, onnxruntime and torch's own
modules give NaN); otherwise the nodes' own functions run in order. Not covered: a second
derivative through the fused attention (torch's kernel has none; a gradient penalty on an
unobserved run raises where the nodes would not). With an observer
attached (every diagnosis pass) the nodes run one by one as always, so every node output stays
observable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from service.engine.graph import FusedNodes, Node
from service.engine.onnx.ops import _cpu_products

DEFAULT_DOMAINS = ("", "ai.onnx")
# where the groups run fused (see above: measured faster on the CPU only)
FUSED_ON = frozenset({"cpu"})


def find_fusions(
    nodes: Sequence[Node], graph_outputs: Iterable[str], opset: int
) -> list[FusedNodes]:
    """The attention and linear groups among `nodes` (no node in two groups); `opset`: the
    model's default-domain opset (Softmax's axis means another thing before 13)."""
    wiring = _Wiring(nodes, set(graph_outputs), opset)
    found: list[FusedNodes] = []
    taken: set[int] = set()
    # attention first: its `scores + mask` is a MatMul then an Add too, which as a linear
    # group would leave the attention unfused (and never run fused itself: no 1-D bias)
    for op_type, group in (("Softmax", _attention), ("Add", _linear)):
        for node in nodes:
            fusion = group(node, wiring) if _is(node, op_type) else None
            if fusion is not None and not taken & {id(n) for n in fusion.nodes}:
                taken |= {id(n) for n in fusion.nodes}
                found.append(fusion)
    return found


class _Wiring:
    def __init__(self, nodes: Sequence[Node], graph_outputs: set[str], opset: int) -> None:
        self.opset = opset
        self.producer = {out: node for node in nodes for out in node.outputs if out}
        self.readers: dict[str, list[Node]] = {}
        for node in nodes:
            for name in node.inputs:
                if name:
                    self.readers.setdefault(name, []).append(node)
        self.graph_outputs = graph_outputs

    def only_reader(self, value: str, node: Node) -> bool:
        """Whether `node` alone reads `value` and the graph does not return it."""
        return self.readers.get(value) == [node] and value not in self.graph_outputs

    def single_use_producer(self, value: str, op_type: str, reader: Node) -> Node | None:
        """The `op_type` node that produces `value` for `reader` alone, else None."""
        node = self.producer.get(value)
        if node is None or not _is(node, op_type) or not self.only_reader(value, reader):
            return None
        return node


def _is(node: Node, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in DEFAULT_DOMAINS and len(node.outputs) == 1


# --- attention ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Attention:
    """Which input names play which part; a `*_mul` pair is a Mul whose one scalar operand
    scales the other (which one is told at run time, by their sizes)."""

    query: str | tuple[str, str]  # q, or (the two operands of q's Mul)
    key_t: str | tuple[str, str]  # kᵀ [..., E, S], or its Mul's operands
    score_scale: str | None  # the c of `scores · c` or `scores / c`
    score_divides: bool
    mask: str | None
    value: str
    softmax_axis: int
    softmax_before_13: bool  # the input flattened from `axis` on (last axis only: the same)


def _attention(softmax: Node, wiring: _Wiring) -> FusedNodes | None:
    (probs,) = softmax.outputs
    readers = wiring.readers.get(probs, [])
    if len(softmax.inputs) != 1 or len(readers) != 1 or probs in wiring.graph_outputs:
        return None
    second = readers[0]
    if not _is(second, "MatMul") or second.inputs[0] != probs or second.inputs[1] == probs:
        return None
    covered = [softmax, second]
    scores, reader = softmax.inputs[0], softmax
    mask = None
    add = wiring.single_use_producer(scores, "Add", reader)
    if add is not None:  # scores + mask: the scores are the side a MatMul, Mul or Div made
        sides = [i for i, name in enumerate(add.inputs) if _leads_to_product(name, wiring)]
        if len(sides) != 1 or len(add.inputs) != 2:
            return None
        scores, mask = add.inputs[sides[0]], add.inputs[1 - sides[0]]
        covered.insert(0, add)
        reader = add
    score_scale, divides = None, False
    for op_type in ("Mul", "Div"):
        scaling = wiring.single_use_producer(scores, op_type, reader)
        if scaling is None or len(scaling.inputs) != 2:
            continue
        sides = [i for i, name in enumerate(scaling.inputs) if _made_by(name, "MatMul", wiring)]
        if sides not in ([0], [1]) or (op_type == "Div" and sides != [0]):
            return None
        product = sides[0]
        scores, score_scale = scaling.inputs[product], scaling.inputs[1 - product]
        divides = op_type == "Div"
        covered.insert(0, scaling)
        reader = scaling
        break
    first = wiring.single_use_producer(scores, "MatMul", reader)
    if first is None or len(first.inputs) != 2:
        return None
    covered.insert(0, first)
    operands: list[str | tuple[str, str]] = []
    for name in first.inputs:
        scaled = wiring.single_use_producer(name, "Mul", first)
        if scaled is not None and len(scaled.inputs) == 2 and first.inputs.count(name) == 1:
            covered.insert(0, scaled)
            operands.append((scaled.inputs[0], scaled.inputs[1]))
        else:
            operands.append(name)
    roles = _Attention(
        query=operands[0],
        key_t=operands[1],
        score_scale=score_scale,
        score_divides=divides,
        mask=mask,
        value=second.inputs[1],
        softmax_axis=int(softmax.attrs.get("axis", -1 if wiring.opset >= 13 else 1)),
        softmax_before_13=wiring.opset < 13,
    )
    return _fused("Attention", covered, AttentionCall(roles))


def _made_by(name: str, op_type: str, wiring: _Wiring) -> bool:
    node = wiring.producer.get(name)
    return node is not None and _is(node, op_type)


def _leads_to_product(name: str, wiring: _Wiring) -> bool:
    """Whether `name` is the score product, or that product scaled (a Mul or Div with it
    as an operand): the side of `scores + mask` that is not the mask (a mask is often a Mul
    too, `(1 − m)·−10000`, but not of a MatMul)."""
    if _made_by(name, "MatMul", wiring):
        return True
    node = wiring.producer.get(name)
    return (
        node is not None
        and (_is(node, "Mul") or _is(node, "Div"))
        and any(_made_by(operand, "MatMul", wiring) for operand in node.inputs)
    )


class AttentionCall:
    """The fused attention's function: F.scaled_dot_product_attention where that computes
    what the nodes would, else `None` (the nodes run)."""

    def __init__(self, roles: _Attention) -> None:
        self.roles = roles

    def __call__(self, values: dict[str, Any]) -> Tensor | None:
        r = self.roles
        query, query_factor = _split_factor(r.query, values)
        key_t, key_factor = _split_factor(r.key_t, values)
        value = values[r.value]
        if query is None or key_t is None:
            return None
        mask = None if r.mask is None else values[r.mask]
        if not _sdpa_applies(query, key_t, value, mask, r):
            return None
        score_factor = None if r.score_scale is None else values[r.score_scale]
        if score_factor is not None and not _is_factor_of(score_factor, query):
            return None
        # A CPU scalar without gradient becomes SDPA's `scale`; any other factor (on the GPU,
        # where reading it would wait for the device, or learned, taking a gradient) multiplies
        # q instead: the scores are bilinear in q and k, so each factor may scale either side
        scale = 1.0
        factors = ((query_factor, False), (key_factor, False), (score_factor, r.score_divides))
        for factor, divides in factors:
            if factor is None:
                continue
            number = _cpu_scalar(factor)
            if number is None:
                factor = factor.to(query.device)
                query = query / factor if divides else query * factor
            elif (divides and number == 0.0) or not math.isfinite(number):
                return None  # the nodes' inf/NaN scores, as they are
            else:
                scale = scale / number if divides else scale * number
        if not _all_finite(query, key_t, value) or (mask is not None and _drops_a_row(mask)):
            return None
        if mask is not None and mask.dim() < 2:  # SDPA wants [..., L, S]: the same broadcast
            mask = mask.reshape(*[1] * (2 - mask.dim()), *mask.shape)
        return F.scaled_dot_product_attention(
            query, key_t.transpose(-2, -1), value, attn_mask=mask, scale=scale
        )


def _all_finite(*tensors: Tensor) -> bool:
    """Whether no value is NaN or infinite: torch's CPU attention kernel returns zeros where
    the nodes propagate a NaN (and a NaN origin hidden would be a wrong diagnosis)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _drops_a_row(mask: Tensor) -> bool:
    """Whether the nodes' softmax would give NaN for some row: a NaN or +inf in the mask, or
    a row of it all -inf (every key masked), where the fused kernel gives zeros."""
    if mask.isnan().any() or mask.isposinf().any():
        return True
    return mask.dim() > 0 and not bool(torch.isfinite(mask).any(-1).all())


def _split_factor(
    operand: str | tuple[str, str], values: dict[str, Any]
) -> tuple[Tensor | None, Tensor | None]:
    """(the tensor, its one-element factor or None): a Mul's operands told apart by size."""
    if isinstance(operand, str):
        tensor = values[operand]
        return (tensor, None) if isinstance(tensor, Tensor) else (None, None)
    a, b = values[operand[0]], values[operand[1]]
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        return None, None
    if _is_factor_of(b, a) and a.numel() > 1:
        return a, b
    if _is_factor_of(a, b) and b.numel() > 1:
        return b, a
    return None, None


def _is_factor_of(factor: Any, tensor: Tensor) -> bool:
    """A one-element tensor that scales `tensor` without changing its shape or dtype."""
    return (
        isinstance(factor, Tensor)
        and factor.numel() == 1
        and factor.dim() <= tensor.dim()
        and factor.dtype == tensor.dtype
    )


def _cpu_scalar(value: Any) -> float | None:
    """A one-element CPU tensor without gradient as a float (reading a GPU one would wait
    for the device), else None."""
    if isinstance(value, (int, float)):
        return float(value)
    if (
        isinstance(value, Tensor)
        and value.numel() == 1
        and value.device.type == "cpu"
        and not value.requires_grad
        and not value.is_complex()
    ):
        return float(value)
    return None


def _sdpa_applies(q: Tensor, k_t: Tensor, v: Any, mask: Any, roles: _Attention) -> bool:
    if not isinstance(v, Tensor) or torch.is_autocast_enabled(q.device.type):
        return False
    rank = q.dim()
    axis = roles.softmax_axis
    if roles.softmax_before_13:
        last_axis = axis == rank - 1 or axis == -1
    else:
        last_axis = axis in (-1, rank - 1)
    if not (
        last_axis
        and rank >= 3
        and k_t.dim() == rank
        and v.dim() == rank
        and q.is_floating_point()
        and q.dtype == k_t.dtype == v.dtype
        and q.device == k_t.device == v.device
        and q.shape[:-2] == k_t.shape[:-2] == v.shape[:-2]
        and q.shape[-1] == k_t.shape[-2]
        and k_t.shape[-1] == v.shape[-2]
    ):
        return False
    if mask is None:
        return True
    scores = (*q.shape[:-1], k_t.shape[-1])
    return (
        isinstance(mask, Tensor)
        and mask.dtype == q.dtype
        and mask.device == q.device
        and not mask.requires_grad
        and mask.dim() <= rank
        and _broadcasts_to(mask.shape, scores)
    )


def _broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    try:
        return tuple(torch.broadcast_shapes(tuple(shape), tuple(target))) == tuple(target)
    except RuntimeError:
        return False


# --- linear ---------------------------------------------------------------------------------


def _linear(add: Node, wiring: _Wiring) -> FusedNodes | None:
    if len(add.inputs) != 2:
        return None
    products = [
        (i, node)
        for i, name in enumerate(add.inputs)
        if (node := wiring.single_use_producer(name, "MatMul", add)) is not None
    ]
    if len(products) != 1 or len(products[0][1].inputs) != 2:
        return None
    side, matmul = products[0]
    x, weight = matmul.inputs
    return _fused("Linear", [matmul, add], LinearCall(x, weight, add.inputs[1 - side]))


class LinearCall:
    """The fused linear's function: x·w + b as F.linear where that computes what MatMul and
    Add would, else `None` (the nodes run)."""

    def __init__(self, x: str, weight: str, bias: str) -> None:
        self.x, self.weight, self.bias = x, weight, bias

    def __call__(self, values: dict[str, Any]) -> Tensor | None:
        x, w, b = values[self.x], values[self.weight], values[self.bias]
        if not (
            isinstance(x, Tensor)
            and isinstance(w, Tensor)
            and isinstance(b, Tensor)
            and x.dim() >= 2
            and w.dim() == 2
            and b.dim() == 1
            and x.shape[-1] == w.shape[0]
            and b.shape[0] == w.shape[1]
            and x.is_floating_point()
            and x.dtype == w.dtype == b.dtype
            and x.device == w.device == b.device
            and not torch.is_autocast_enabled(x.device.type)
        ):
            return None
        weight = w.t()  # [out, in]: the exported MatMul reads the Transpose of nn.Linear's
        if x.device.type == "cpu":  # oneDNN where this CPU runs it faster than MKL
            faster = _cpu_products.weight_product(x, weight, b)
            if faster is not None:
                return faster
        return F.linear(x, weight, b)


# --- one call for the group -----------------------------------------------------------------


class _GroupCall:
    """`fn` of a FusedNodes: the fast form, or the nodes' own functions in order."""

    def __init__(self, nodes: Sequence[Node], inputs: tuple[str, ...], fast: Any) -> None:
        self.nodes = tuple(nodes)
        self.inputs = inputs
        self.fast = fast

    def __call__(self, *args: Any) -> Any:
        values = dict(zip(self.inputs, args, strict=True))
        result = self.fast(values)
        if result is not None:
            return result
        for node in self.nodes:
            out = node.fn(*[values[name] if name else None for name in node.inputs])
            values[node.outputs[0]] = out
        return values[self.nodes[-1].outputs[0]]


def _fused(op_type: str, nodes: list[Node], fast: Any) -> FusedNodes:
    produced = {out for node in nodes for out in node.outputs}
    inputs = tuple(
        dict.fromkeys(
            name for node in nodes for name in node.inputs if name and name not in produced
        )
    )
    return FusedNodes(
        device_types=FUSED_ON,
        op_type=op_type,
        nodes=tuple(nodes),
        inputs=inputs,
        output=nodes[-1].outputs[0],
        fn=_GroupCall(nodes, inputs, fast),
    )
