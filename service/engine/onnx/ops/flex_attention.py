"""ai.onnx.preview FlexAttention: attention whose scores and probabilities pass through
subgraph functions (score_mod, prob_mod).

    scores = (Q·√scale) @ (K·√scale)ᵀ          in the inputs' dtype, as onnx's reference has it
    scores = score_mod(scores)                  in the softmax precision
    probs  = prob_mod(softmax(scores))          in the softmax precision
    Y      = probs @ V                          in the softmax precision, cast to V's dtype

Grouped-query attention: query head h reads K/V head h // (q_heads / kv_heads).

Where the spec and onnx's reference implementation are silent or break down:
- A query row that score_mod masks entirely (every score -inf) gives zero probabilities, a zero
  output row and zero gradients, as torch's flex_attention does; the reference implementation
  gives NaN there, which would poison the whole backward pass through softmax.
- A negative `scale` keeps its sign on K (√|scale| on each side): the product is `scale·QKᵀ`
  as the spec's formula has it, where the reference's √scale is NaN.

Without modifiers and with the softmax in the inputs' own dtype, the result is exactly
`F.scaled_dot_product_attention`, which computes it (a fused kernel, no [q, kv] score tensor
kept for the backward pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from service.engine.graph import NodeFn
from service.engine.onnx.ops._util import require
from service.engine.onnx.ops.attention import (
    grouped_heads,
    scaled_scores,
    softmax_precision,
    softmax_zeroing_rows,
)
from service.engine.onnx.registry import OpContext, register

# A converted modifier subgraph (convert.Subgraph): (inputs, outer-scope values) → outputs.
Modifier = Callable[[Sequence[Any], Mapping[str, Any]], list[Any]]


@dataclass(frozen=True)
class _Spec:
    scale: float | None  # None: 1/√head_size
    softmax_dtype: torch.dtype | None  # None: float32 for 16-bit inputs, else the inputs' dtype
    score_mod: Modifier | None
    prob_mod: Modifier | None


def _scale(ctx: OpContext) -> float | None:
    scale = ctx.attr("scale")
    if scale is None:
        return None
    require(
        math.isfinite(float(scale)),
        f"scale {scale}: set a finite scale or leave it out (1/sqrt(head_size))",
    )
    return float(scale)


def _modifier(ctx: OpContext, name: str) -> Modifier | None:
    """The `name` subgraph converted into a callable; None when the node has none."""
    graph = ctx.attr(name)
    if graph is None:
        return None
    require(
        len(graph.input) == 1 and len(graph.output) == 1,
        f"{name} has {len(graph.input)} input(s) and {len(graph.output)} output(s): a modifier "
        "takes the [batch, q_heads, q_len, kv_len] tensor alone and returns it modified",
    )
    assert ctx.convert_subgraph is not None  # set by the converter for every node
    modifier: Modifier = ctx.convert_subgraph(graph)
    return modifier


def _spec(ctx: OpContext) -> _Spec:
    return _Spec(
        scale=_scale(ctx),
        softmax_dtype=softmax_precision(ctx),
        score_mod=_modifier(ctx, "score_mod"),
        prob_mod=_modifier(ctx, "prob_mod"),
    )


def _check_shapes(Q: Tensor, K: Tensor, V: Tensor) -> None:
    shapes = f"Q {tuple(Q.shape)}, K {tuple(K.shape)}, V {tuple(V.shape)}"
    if Q.dim() != 4 or K.dim() != 4 or V.dim() != 4:
        raise ValueError(f"FlexAttention: Q, K and V must be rank 4, got {shapes}")
    if K.shape[:3] != V.shape[:3] or Q.shape[0] != K.shape[0] or Q.shape[3] != K.shape[3]:
        raise ValueError(f"FlexAttention: mismatched batch, heads, lengths or sizes: {shapes}")
    if Q.shape[1] % K.shape[1]:
        raise ValueError(f"FlexAttention: q_num_heads must be a multiple of kv_num_heads: {shapes}")


def _compute_dtype(input_dtype: torch.dtype, softmax_dtype: torch.dtype | None) -> torch.dtype:
    if softmax_dtype is not None:
        return softmax_dtype
    if input_dtype in (torch.float16, torch.bfloat16):  # 16-bit softmax overflows: float32
        return torch.float32
    return input_dtype


def _modified(modifier: Modifier | None, name: str, x: Tensor, outer: Mapping[str, Any]) -> Tensor:
    """`modifier(x)` in x's dtype (a subgraph's constants may widen it); x without one."""
    if modifier is None:
        return x
    (out,) = modifier([x], outer)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"FlexAttention: {name} returned {got}, expected {tuple(x.shape)}")
    return out.to(x.dtype)


@register("FlexAttention", domain="ai.onnx.preview")
def flex_attention(ctx: OpContext) -> NodeFn:
    spec = _spec(ctx)
    has_modifiers = spec.score_mod is not None or spec.prob_mod is not None

    def fn(Q: Tensor, K: Tensor, V: Tensor, *, outer: Mapping[str, Any] | None = None) -> Tensor:
        _check_shapes(Q, K, V)
        scale = spec.scale if spec.scale is not None else 1.0 / math.sqrt(Q.shape[-1])
        compute_dtype = _compute_dtype(Q.dtype, spec.softmax_dtype)
        if not has_modifiers and compute_dtype == Q.dtype:
            grouped = Q.shape[1] != K.shape[1]
            return F.scaled_dot_product_attention(Q, K, V, scale=scale, enable_gqa=grouped)
        K, V = grouped_heads(K, V, Q.shape[1])
        scope = outer or {}
        scores = scaled_scores(Q, K, scale).to(compute_dtype)
        scores = _modified(spec.score_mod, "score_mod", scores, scope)
        # a row that score_mod masks entirely: zeros (the scores are finite before it)
        probs = softmax_zeroing_rows(scores, torch.isneginf(scores.amax(-1, keepdim=True)))
        probs = _modified(spec.prob_mod, "prob_mod", probs, scope)
        return torch.matmul(probs, V.to(compute_dtype)).to(V.dtype)

    return fn
