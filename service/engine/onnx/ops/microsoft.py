"""onnxruntime's contrib ops that exporters and the transformer optimizer emit.

`com.microsoft` domain: FusedMatMul, Gelu, FastGelu, BiasGelu, QuickGelu, SkipLayerNormalization,
SkipSimplifiedLayerNormalization, Attention (BERT/GPT-2 style, packed QKV weights), and
FusedConv / FusedGemm (Conv / Gemm plus an activation: what
a model saved by onnxruntime with extended graph optimizations holds). Default domain,
opset < 17: onnxruntime's own LayerNormalization and SimplifiedLayerNormalization (the optimizer
fuses them into opset-13/14 models; from opset 17 on, LayerNormalization is the ONNX op in
normalization.py). The transformer ops of onnxruntime's optimizer and of HF Optimum /
onnxruntime-genai exports (MultiHeadAttention, GroupQueryAttention, RotaryEmbedding,
EmbedLayerNormalization, ...) are in microsoft_transformer.py, built on the helpers here.

Semantics and attribute defaults are onnxruntime's (its CPU kernels are the reference the
tests compare against). Statistics are computed in float32 for half-precision inputs, as
onnxruntime's `stash_type=1` does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from service.engine.graph import NodeFn
from service.engine.onnx.registry import OpContext, UnsupportedAttribute, lookup, register

MS = "com.microsoft"


def node_outputs(values: tuple[Any, ...], count: int) -> Any:
    """One value for a one-output node, else a tuple of `count` (graph.Node's contract)."""
    return values[0] if count <= 1 else values[:count]


def _matrix_view(x: Tensor, trans_batch: bool, trans: bool) -> Tensor:
    """FusedMatMul's operand: `transBatch` moves dim 0 next to the last dim, so the matrix is
    (dim 0, last dim) over the batch dims 1..rank-2; `trans` then swaps the last two."""
    if trans_batch and x.dim() > 2:
        x = x.permute(*range(1, x.dim() - 1), 0, x.dim() - 1)
    if trans and x.dim() >= 2:
        x = x.transpose(-1, -2)
    return x


@register("FusedMatMul", domain=MS)
def fused_matmul(ctx: OpContext) -> NodeFn:
    alpha = float(ctx.attr("alpha", 1.0))
    trans_a, trans_b = bool(ctx.attr("transA", 0)), bool(ctx.attr("transB", 0))
    batch_a, batch_b = bool(ctx.attr("transBatchA", 0)), bool(ctx.attr("transBatchB", 0))

    def fn(a: Tensor, b: Tensor) -> Tensor:
        product = torch.matmul(_matrix_view(a, batch_a, trans_a), _matrix_view(b, batch_b, trans_b))
        return product if alpha == 1.0 else product * alpha

    return fn


@register("Gelu", domain=MS)
def gelu(ctx: OpContext) -> NodeFn:
    return lambda x: F.gelu(x)


@register("BiasGelu", domain=MS)
def bias_gelu(ctx: OpContext) -> NodeFn:
    return lambda a, b: F.gelu(a + b)


@register("FastGelu", domain=MS)
def fast_gelu(ctx: OpContext) -> NodeFn:
    # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))): torch's tanh approximation, same formula
    def fn(x: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.gelu(x if bias is None else x + bias, approximate="tanh")

    return fn


@register("QuickGelu", domain=MS)
def quick_gelu(ctx: OpContext) -> NodeFn:
    alpha = float(ctx.attr("alpha", 1.702))
    return lambda x: x * torch.sigmoid(alpha * x)


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def normalize(x: Tensor, axis: int, eps: float, *, center: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(normalized x in x's dtype, mean, 1/std) over the dims from `axis` on; `center=False` is
    RMS normalisation (mean reported as zeros). Statistics keep dims, in float32 for halves."""
    start = axis if axis >= 0 else x.dim() + axis
    if not 0 <= start < x.dim():
        raise ValueError(f"axis {axis} is out of range for a rank-{x.dim()} input")
    dims = list(range(start, x.dim()))
    xs = x.to(_stats_dtype(x))
    if center:
        mean = xs.mean(dim=dims, keepdim=True)
        centered = xs - mean
        inv_std = torch.rsqrt(centered.square().mean(dim=dims, keepdim=True) + eps)
    else:
        mean = torch.zeros_like(xs.sum(dim=dims, keepdim=True))
        centered = xs
        inv_std = torch.rsqrt(xs.square().mean(dim=dims, keepdim=True) + eps)
    return (centered * inv_std).to(x.dtype), mean, inv_std


def _axis_and_eps(ctx: OpContext, default_eps: float) -> tuple[int, float]:
    stash = int(ctx.attr("stash_type", 1))
    if stash not in (1, 11):  # float or double statistics
        raise UnsupportedAttribute(f"stash_type {stash}: expected 1 (float) or 11 (double)")
    return int(ctx.attr("axis", -1)), float(ctx.attr("epsilon", default_eps))


@register("LayerNormalization", since=1)
def layer_normalization_contrib(ctx: OpContext) -> NodeFn:
    """onnxruntime's LayerNormalization for default-domain opsets 1-16 (ONNX's own is 17+)."""
    axis, eps = _axis_and_eps(ctx, 1e-5)
    count = ctx.num_outputs

    def fn(x: Tensor, scale: Tensor, bias: Tensor | None = None) -> Any:
        normalized, mean, inv_std = normalize(x, axis, eps, center=True)
        y = normalized * scale if bias is None else torch.addcmul(bias, normalized, scale)
        return node_outputs((y, mean, inv_std), count)

    return fn


@register("SimplifiedLayerNormalization", since=1)
def simplified_layer_normalization(ctx: OpContext) -> NodeFn:
    """onnxruntime's RMS normalisation (default domain): Y = X / √(mean(X²) + ε) · scale."""
    axis, eps = _axis_and_eps(ctx, 1e-5)
    count = ctx.num_outputs

    def fn(x: Tensor, scale: Tensor) -> Any:
        normalized, _, inv_std = normalize(x, axis, eps, center=False)
        return node_outputs((normalized * scale, inv_std), count)

    return fn


def _skip_sum(x: Tensor, skip: Tensor, bias: Tensor | None) -> Tensor:
    total = x + skip  # skip may be (1, S, H) or (S, H): broadcasting covers both
    return total if bias is None else total + bias


@register("SkipLayerNormalization", domain=MS)
def skip_layer_normalization(ctx: OpContext) -> NodeFn:
    eps = float(ctx.attr("epsilon", 1e-12))
    count = ctx.num_outputs

    def fn(
        x: Tensor,
        skip: Tensor,
        gamma: Tensor,
        beta: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> Any:
        total = _skip_sum(x, skip, bias)
        normalized, mean, inv_std = normalize(total, -1, eps, center=True)
        y = normalized * gamma if beta is None else torch.addcmul(beta, normalized, gamma)
        return node_outputs((y, mean, inv_std, total), count)

    return fn


@register("SkipSimplifiedLayerNormalization", domain=MS)
def skip_simplified_layer_normalization(ctx: OpContext) -> NodeFn:
    eps = float(ctx.attr("epsilon", 1e-12))
    count = ctx.num_outputs

    def fn(x: Tensor, skip: Tensor, gamma: Tensor, bias: Tensor | None = None) -> Any:
        total = _skip_sum(x, skip, bias)
        normalized, mean, inv_std = normalize(total, -1, eps, center=False)
        return node_outputs((normalized * gamma, mean, inv_std, total), count)

    return fn


# onnxruntime's fused activations: name → (parameter defaults, function of (x, parameters))
_FUSED_ACTIVATIONS: dict[str, tuple[tuple[float, ...], Callable[[Tensor, list[float]], Tensor]]] = {
    "Relu": ((), lambda x, p: torch.relu(x)),
    "Tanh": ((), lambda x, p: torch.tanh(x)),
    "Sigmoid": ((), lambda x, p: torch.sigmoid(x)),
    "LeakyRelu": ((0.01,), lambda x, p: F.leaky_relu(x, p[0])),
    "HardSigmoid": ((0.2, 0.5), lambda x, p: torch.clamp(p[0] * x + p[1], 0.0, 1.0)),
    "Clip": ((-math.inf, math.inf), lambda x, p: torch.clamp(x, p[0], p[1])),
}


def _fused_activation(name: Any, given: Sequence[float]) -> Callable[[Tensor], Tensor]:
    name = name.decode() if isinstance(name, bytes) else name
    if name not in _FUSED_ACTIVATIONS:
        raise UnsupportedAttribute(
            f"activation {name!r} is not supported; supported: " + ", ".join(_FUSED_ACTIVATIONS)
        )
    defaults, function = _FUSED_ACTIVATIONS[name]
    params = [float(v) for v in given] + list(defaults[len(given) :])
    return lambda x: function(x, params)


def default_domain_builder(
    ctx: OpContext, op_type: str, opset: int, attrs: dict[str, Any], num_outputs: int = 1
) -> Any:
    """The default-domain builder of `op_type` (conv.py, linalg.py, attention.py, ...) built
    for this node with `attrs`: a contrib op that is a default-domain op plus something
    (FusedConv is Conv then an activation) reuses that op's implementation."""
    builder = lookup(op_type, "", opset)
    if builder is None:
        raise UnsupportedAttribute(f"{op_type} is not available to implement {ctx.op_type}")
    return builder(
        dataclasses.replace(
            ctx,
            op_type=op_type,
            domain="",
            opset=opset,
            attrs=attrs,
            num_outputs=num_outputs,
            outputs_used=[],
        )
    )


def _without(attrs: dict[str, Any], drop: set[str]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if k not in drop}


@register("FusedConv", domain=MS)
def fused_conv(ctx: OpContext) -> NodeFn:
    activation = _fused_activation(ctx.attr("activation"), ctx.attr("activation_params", []))
    attrs = _without(ctx.attrs, {"activation", "activation_params"})
    convolution = default_domain_builder(ctx, "Conv", 11, attrs)

    def fn(x: Tensor, w: Tensor, b: Tensor | None = None, z: Tensor | None = None) -> Tensor:
        y = convolution(x, w, b)
        return activation(y if z is None else y + z)  # Z: a residual summed before it

    return fn


@register("FusedGemm", domain=MS)
def fused_gemm(ctx: OpContext) -> NodeFn:
    names = ("activation_alpha", "activation_beta", "activation_gamma")
    given = [ctx.attrs[n] for n in names if n in ctx.attrs]
    activation = _fused_activation(ctx.attr("activation"), given)
    gemm = default_domain_builder(ctx, "Gemm", 13, _without(ctx.attrs, {"activation", *names}))
    return lambda a, b, c=None: activation(gemm(a, b, c))


@register("Attention", domain=MS)
def ms_attention(ctx: OpContext) -> NodeFn:
    """onnxruntime's BERT/GPT-2 Attention: one packed Q/K/V projection, then scaled dot-product
    attention. Padding (`mask_index`) adds the finite `mask_filter_value` to masked scores, so
    a fully padded row attends uniformly rather than yielding NaN; `unidirectional` removes
    future keys outright. Both as onnxruntime's CPU kernel does."""
    heads = ctx.attr("num_heads")
    if heads is None or int(heads) <= 0:
        raise UnsupportedAttribute("num_heads must be a positive number of heads")
    heads = int(heads)
    for unsupported in ("do_rotary", "past_present_share_buffer"):
        if int(ctx.attr(unsupported, 0)):
            raise UnsupportedAttribute(f"{unsupported}=1 is not supported")
    sizes = ctx.attr("qkv_hidden_sizes")
    if sizes is not None and (len(sizes) != 3 or any(int(s) % heads for s in sizes)):
        raise UnsupportedAttribute(
            f"qkv_hidden_sizes {list(sizes)}: expected 3 sizes, each a multiple of num_heads"
        )
    causal = bool(ctx.attr("unidirectional", 0))
    scale_attr = ctx.attr("scale")
    filter_value = float(ctx.attr("mask_filter_value", -10000.0))
    count = ctx.num_outputs

    def fn(
        x: Tensor,
        weights: Tensor,
        bias: Tensor | None = None,
        mask_index: Tensor | None = None,
        past: Tensor | None = None,
        attention_bias: Tensor | None = None,
        past_sequence_length: Tensor | None = None,
    ) -> Any:
        batch, seq = x.shape[0], x.shape[1]
        width = weights.shape[1]
        q_size, k_size, v_size = (int(s) for s in sizes) if sizes else (width // 3,) * 3
        qkv = (
            torch.matmul(x, weights)
            if bias is None
            else torch.addmm(bias, x.reshape(-1, x.shape[-1]), weights).reshape(batch, seq, width)
        )
        q, k, v = qkv.split([q_size, k_size, v_size], -1)

        def heads_first(t: Tensor) -> Tensor:  # [B, S, heads·size] → [B, heads, S, size]
            return t.reshape(batch, seq, heads, -1).transpose(1, 2)

        q, k, v = heads_first(q), heads_first(k), heads_first(v)
        if past is not None:
            k = torch.cat([past[0], k], 2)
            v = torch.cat([past[1], v], 2)
        scale = float(scale_attr) if scale_attr else 1.0 / math.sqrt(q.shape[-1])
        keep = ms_key_mask(mask_index, batch, k.shape[2], x.device)
        y = ms_attend(q, k, v, keep, attention_bias, scale, filter_value, causal)
        y = y.transpose(1, 2).reshape(batch, seq, -1)
        if count <= 1:
            return y
        if k.shape != v.shape:
            raise ValueError("com.microsoft Attention: present needs equal K and V hidden sizes")
        return node_outputs((y, torch.stack([k, v])), count)

    return fn


def ms_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Tensor | None,
    attention_bias: Tensor | None,
    scale: float,
    filter_value: float,
    causal: bool,
) -> Tensor:
    """onnxruntime's CPU attention kernel (Attention, MultiHeadAttention) on heads-first
    q [B, heads, S, size] and k/v [B, heads, total, size]: padding (`keep` False) adds the
    finite `filter_value`, so a fully padded row attends uniformly rather than yielding NaN;
    `causal` removes the keys after each query's position, the queries being the last S of
    the total (past + new) positions."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if keep is not None:  # padding: a finite penalty, as onnxruntime
        scores = scores + torch.where(keep, 0.0, filter_value).to(scores.dtype)
    if attention_bias is not None:
        scores = scores + attention_bias
    if causal:  # future keys: excluded outright (the lowest float), whatever the padding
        keys = torch.arange(k.shape[2], device=q.device)
        offset = k.shape[2] - q.shape[2]  # the past length
        future = keys > torch.arange(q.shape[2], device=q.device).unsqueeze(1) + offset
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, -1), v)


def ms_key_mask(
    mask_index: Tensor | None, batch: int, total: int, device: torch.device
) -> Tensor | None:
    """Which keys each query may attend by `mask_index`, broadcastable to [B, heads, S, total];
    None when there is no mask."""
    if mask_index is None:
        return None
    keys = torch.arange(total, device=device)
    m = mask_index.to(device)
    if m.dim() == 1 and m.shape[0] in (batch, 3 * batch + 2):
        # right padding: valid lengths (3·batch + 2 appends the query and key starts of
        # ragged batches, which only onnxruntime's CUDA kernels read)
        return keys < m[:batch].reshape(batch, 1, 1, 1)
    if m.dim() == 1 and m.shape[0] == 2 * batch:  # left padding: ends, then starts
        ends, starts = m[:batch].reshape(batch, 1, 1, 1), m[batch:].reshape(batch, 1, 1, 1)
        return (keys < ends) & (keys >= starts)
    if m.dim() == 2:  # raw [B, total]: 1 keep, 0 mask
        return (m != 0).reshape(batch, 1, 1, total)
    if m.dim() == 3:  # raw [B, S, total]
        return (m != 0).unsqueeze(1)
    raise ValueError(
        f"com.microsoft Attention: mask_index of shape {list(m.shape)} is not supported "
        "(supported: [batch], [2·batch], [3·batch + 2], [batch, total], [batch, seq, total])"
    )
