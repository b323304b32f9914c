"""onnxruntime's transformer contrib ops (`com.microsoft`), as its transformer optimizer and
HF Optimum / onnxruntime-genai exports emit them: EmbedLayerNormalization, MultiHeadAttention,
BiasAdd, GemmFastGelu, RotaryEmbedding and GroupQueryAttention.

Semantics are those of onnxruntime's CPU kernels, which the tests compare against. Where a
contrib op is a default-domain op plus something, that op's implementation does the work
(`default_domain_builder`): RotaryEmbedding-23 rotates for RotaryEmbedding and
GroupQueryAttention's `do_rotary`, Attention-23 attends for GroupQueryAttention (-inf masks,
softcap, grouped heads), and MultiHeadAttention shares com.microsoft Attention's kernel
(`ms_attend`: a finite `mask_filter_value` for padding). BiasSoftmax and BiasSplitGelu are not
here: onnxruntime has no CPU kernel for them, so nothing could check them.

Forms onnxruntime's CPU provider refuses, or that only a beam search / a shared KV buffer
uses, are refused at conversion (`UnsupportedAttribute`) when the node shows them (which
inputs it has, its attributes), else at run time with a ValueError naming the form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from service.engine.graph import NodeFn
from service.engine.onnx.ops.microsoft import (
    MS,
    default_domain_builder,
    fast_gelu,
    ms_attend,
    ms_key_mask,
    node_outputs,
    normalize,
)
from service.engine.onnx.registry import OpContext, UnsupportedAttribute, register


def _given(ctx: OpContext, index: int) -> bool:
    """Whether the node names input `index` (an omitted optional input is "" or absent)."""
    inputs = list(ctx.node.input) if ctx.node is not None else []
    return index < len(inputs) and bool(inputs[index])


def _refuse_inputs(ctx: OpContext, unsupported: dict[int, str]) -> None:
    for index, why in unsupported.items():
        if _given(ctx, index):
            raise UnsupportedAttribute(why)


def _positive(ctx: OpContext, name: str) -> int:
    value = ctx.attr(name)
    if value is None or int(value) <= 0:
        raise UnsupportedAttribute(f"{name} must be a positive number of heads")
    return int(value)


def _index(ids: Tensor, like: Tensor) -> Tensor:
    """Ids (int32 in these ops) as int64 indices on `like`'s device."""
    return ids.to(device=like.device, dtype=torch.long)


@register("EmbedLayerNormalization", domain=MS)
def embed_layer_normalization(ctx: OpContext) -> NodeFn:
    """BERT's embeddings: word + position (+ segment) rows, LayerNorm over the hidden size.
    `mask_index` counts each row's mask entries equal to 1 (zeros without a mask), as the CPU
    kernel; `embedding_sum` is the sum before normalisation."""
    if _given(ctx, 1) != _given(ctx, 4):
        raise UnsupportedAttribute("segment_ids and segment_embedding must be given together")
    eps = float(ctx.attr("epsilon", 1e-12))
    count = ctx.num_outputs

    def fn(
        input_ids: Tensor,
        segment_ids: Tensor | None,
        word_embedding: Tensor,
        position_embedding: Tensor,
        segment_embedding: Tensor | None,
        gamma: Tensor,
        beta: Tensor,
        mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Any:
        batch, seq = input_ids.shape
        if position_ids is None:  # position s for token s of every row
            position_ids = torch.arange(seq, device=word_embedding.device).unsqueeze(0)
        # position ids of shape [1, S] broadcast over the batch in the sum
        total = F.embedding(_index(input_ids, word_embedding), word_embedding) + F.embedding(
            _index(position_ids, position_embedding), position_embedding
        )
        if segment_ids is not None and segment_embedding is not None:
            total = total + F.embedding(_index(segment_ids, segment_embedding), segment_embedding)
        normalized, _, _ = normalize(total, -1, eps, center=True)
        y = torch.addcmul(beta, normalized, gamma)
        if mask is None:
            mask_index = torch.zeros(batch, dtype=torch.int32, device=y.device)
        else:
            mask_index = (mask == 1).sum(-1, dtype=torch.int32).to(y.device)
        return node_outputs((y, mask_index, total), count)

    return fn


@register("BiasAdd", domain=MS)
def bias_add(ctx: OpContext) -> NodeFn:
    """X + bias + skip (a diffusion UNet's residual). No CPU kernel in onnxruntime: checked
    against the formula of its docs."""
    return lambda x, bias, skip: x + bias + skip


@register("GemmFastGelu", domain=MS)
def gemm_fast_gelu(ctx: OpContext) -> NodeFn:
    """FastGelu(X·W + bias): MatMul then com.microsoft FastGelu (no CPU kernel in
    onnxruntime; checked against the MatMul + FastGelu it fuses)."""
    activation = fast_gelu(ctx)
    return lambda x, w, bias=None: activation(torch.matmul(x, w), bias)


# --- rotary embeddings ----------------------------------------------------------------------

RotateFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _rotary(ctx: OpContext, interleaved: bool) -> RotateFn:
    """RotaryEmbedding-23 (positional.py) on heads-first x [B, heads, S, size], rotating each
    head's first 2·cos.shape[-1] channels with the cache rows at position ids [B or 1, S]."""
    rotate = default_domain_builder(ctx, "RotaryEmbedding", 23, {"interleaved": int(interleaved)})

    def fn(x: Tensor, cos_cache: Tensor, sin_cache: Tensor, position_ids: Tensor) -> Tensor:
        width = 2 * cos_cache.shape[-1]
        if width == x.shape[-1]:
            return rotate(x, cos_cache, sin_cache, position_ids)
        rotated = rotate(x[..., :width], cos_cache, sin_cache, position_ids)
        return torch.cat([rotated, x[..., width:]], -1)

    return fn


@register("RotaryEmbedding", domain=MS)
def ms_rotary_embedding(ctx: OpContext) -> NodeFn:
    """x is [B, S, hidden] (heads of `num_heads`, else of 2·cos_cache.shape[1] channels) or
    [B, heads, S, size]; position_ids [B, S], or [1] (the first position: s + that)."""
    if int(ctx.attr("is_packed_batching", 0)):
        raise UnsupportedAttribute("is_packed_batching=1 (ragged packed tokens) is not supported")
    rotary_dim = int(ctx.attr("rotary_embedding_dim", 0))
    num_heads = int(ctx.attr("num_heads", 0))
    if rotary_dim < 0 or num_heads < 0 or rotary_dim % 2:
        raise UnsupportedAttribute("rotary_embedding_dim must be even and num_heads >= 0")
    if rotary_dim and not num_heads:
        raise UnsupportedAttribute("rotary_embedding_dim needs num_heads")
    rotate = _rotary(ctx, bool(ctx.attr("interleaved", 0)))

    def fn(x: Tensor, position_ids: Tensor, cos_cache: Tensor, sin_cache: Tensor) -> Tensor:
        width = cos_cache.shape[-1]
        if x.dim() == 4:
            heads_first = x
        else:
            heads = num_heads or x.shape[2] // (2 * width)
            heads_first = x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)
        rotated = rotary_dim or heads_first.shape[-1]
        if 2 * width != rotated:
            # onnxruntime refuses a narrower cache, and reads a wider one with a rotated/2
            # row stride (its rows shifted): refused rather than copied
            raise ValueError(
                f"com.microsoft RotaryEmbedding: cos/sin_cache width {width}, expected "
                f"{rotated // 2} (half the rotary_embedding_dim, else of the head size)"
            )
        seq = heads_first.shape[2]
        if position_ids.dim() == 1:  # [1]: the first position; token s sits at that + s
            start = position_ids.reshape(1, 1).to(cos_cache.device)
            position_ids = start + torch.arange(seq, device=cos_cache.device)
        y = rotate(heads_first, cos_cache, sin_cache, position_ids)
        return y if x.dim() == 4 else y.transpose(1, 2).reshape(x.shape)

    return fn


# --- MultiHeadAttention ---------------------------------------------------------------------


@register("MultiHeadAttention", domain=MS)
def multi_head_attention(ctx: OpContext) -> NodeFn:
    """Separate (or packed) Q/K/V already projected, optional projection bias, then
    com.microsoft Attention's kernel. K/V may be [B, L, hidden], or [B, heads, L, size] (a
    cross-attention cache: no bias, no past); packed KV is key [B, L, heads, 2, size] with no
    value, packed QKV is query [B, L, heads, 3, size] with neither (onnxruntime's CPU provider
    has neither packed form; the tests check them against the unpacked one)."""
    heads = _positive(ctx, "num_heads")
    _refuse_inputs(
        ctx,
        {
            8: "past_sequence_length (a shared past/present buffer) is not supported",
            9: "cache_indirection (beam search) is not supported",
        },
    )
    if _given(ctx, 6) != _given(ctx, 7):
        raise UnsupportedAttribute("past_key and past_value must be given together")
    packed_qkv = not _given(ctx, 1)
    packed_kv = _given(ctx, 1) and not _given(ctx, 2)
    if packed_qkv and _given(ctx, 2):
        raise UnsupportedAttribute("value without key is not a MultiHeadAttention form")
    if packed_kv and _given(ctx, 3):
        raise UnsupportedAttribute("bias with packed KV is not supported (nor by onnxruntime)")
    if ctx.output_used(3):
        raise UnsupportedAttribute("the qk output is not supported")
    causal = bool(ctx.attr("unidirectional", 0))
    if causal and _given(ctx, 6):
        # onnxruntime's CPU kernel mixes the past into the causal mask inconsistently: no
        # result to match
        raise UnsupportedAttribute("unidirectional=1 with past_key/past_value is not supported")
    scale_attr = ctx.attr("scale")
    filter_value = float(ctx.attr("mask_filter_value", -10000.0))
    count = min(ctx.num_outputs, 3)

    def seq_heads(t: Tensor) -> Tensor:  # [B, L, hidden] → [B, L, heads, size]
        return t.reshape(t.shape[0], t.shape[1], heads, -1) if t.dim() == 3 else t

    def fn(
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        bias: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attention_bias: Tensor | None = None,
        past_key: Tensor | None = None,
        past_value: Tensor | None = None,
    ) -> Any:
        if packed_qkv:
            if query.dim() != 5:
                raise ValueError("MultiHeadAttention without key: query must be packed QKV")
            q, k, v = query.unbind(3)  # [B, L, heads, 3, size] → 3 × [B, L, heads, size]
        elif packed_kv:
            if key is None or key.dim() != 5:
                raise ValueError("MultiHeadAttention without value: key must be packed KV")
            q = seq_heads(query)
            k, v = key.unbind(3)
        else:
            assert key is not None and value is not None
            q, k, v = seq_heads(query), seq_heads(key), seq_heads(value)
        cache_kv = not packed_kv and key is not None and key.dim() == 4
        if bias is not None:
            width = q.shape[2] * q.shape[3]
            q_bias, k_bias, v_bias = bias.split([width, width, bias.shape[0] - 2 * width])
            q = q + q_bias.reshape(heads, -1)
            if not cache_kv:  # a cache given as key/value is already projected
                k, v = k + k_bias.reshape(heads, -1), v + v_bias.reshape(heads, -1)
        q = q.transpose(1, 2)
        if not cache_kv:  # [B, L, heads, size] → [B, heads, L, size]
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        if past_key is not None and past_value is not None and not cache_kv:
            k, v = torch.cat([past_key, k], 2), torch.cat([past_value, v], 2)
        if causal and q.shape[2] != k.shape[2]:  # onnxruntime reads memory it never set
            raise ValueError("MultiHeadAttention: unidirectional needs as many keys as queries")
        scale = float(scale_attr) if scale_attr else 1.0 / math.sqrt(q.shape[-1])
        keep = ms_key_mask(key_padding_mask, q.shape[0], k.shape[2], q.device)
        y = ms_attend(q, k, v, keep, attention_bias, scale, filter_value, causal)
        y = y.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
        return node_outputs((y, k, v), count)

    return fn


# --- GroupQueryAttention --------------------------------------------------------------------


def _gqa_refusals(ctx: OpContext) -> None:
    _refuse_inputs(
        ctx,
        {
            9: "position_ids is not supported (positions come from seqlens_k)",
            11: "head_sink (smooth softmax) is not supported",
            12: "k_scale (a quantized KV cache) is not supported",
            13: "v_scale (a quantized KV cache) is not supported",
            14: "q_norm_weight (per-head RMS norm of Q and K) is not supported",
            15: "k_norm_weight (per-head RMS norm of Q and K) is not supported",
            16: "query_seqlens (right-padded query chunks) is not supported",
        },
    )
    if int(ctx.attr("smooth_softmax", -1)) == 1:
        raise UnsupportedAttribute("smooth_softmax=1 is not supported")
    for name in ("k_quant_type", "v_quant_type"):
        if str(ctx.attr(name, "NONE")).upper() != "NONE":
            raise UnsupportedAttribute(f"{name} {ctx.attr(name)!r}: only NONE (a float cache)")
    if int(ctx.attr("kv_cache_bit_width", 0)):
        raise UnsupportedAttribute("kv_cache_bit_width (a quantized KV cache) is not supported")
    if int(ctx.attr("sliding_window_cache", 0)):
        raise UnsupportedAttribute("sliding_window_cache=1 (a window-sized cache) is not supported")
    if int(ctx.attr("qk_output", 0)) or ctx.output_used(3):
        raise UnsupportedAttribute("the output_qk output (qk_output) is not supported")
    if _given(ctx, 3) != _given(ctx, 4):
        raise UnsupportedAttribute("past_key and past_value must be given together")
    if _given(ctx, 1) != _given(ctx, 2):
        raise UnsupportedAttribute("key and value must be given together (or neither: packed QKV)")


def _present_length(past: Tensor | None, seq: int, total_sequence_length: Tensor) -> int:
    """The cache length: past + new (a growing cache, total = past + S) or the past buffer's
    own (a static cache the new rows are written into, total <= its length). Without a past
    the total is S; with one, its value (one scalar read) tells which (it sizes a tensor)."""
    past_len = 0 if past is None else past.shape[2]
    if past_len == 0:
        return seq
    total = int(total_sequence_length)
    if total == past_len + seq:
        return total
    if total <= past_len:
        return past_len
    raise ValueError(
        f"GroupQueryAttention: total_sequence_length {total} is neither past ({past_len}) + "
        f"new ({seq}) nor at most the past buffer's length"
    )


def _write_cache(past: Tensor | None, new: Tensor, starts: Tensor, length: int) -> Tensor:
    """[B, kv_heads, length, size]: entry b holds its first `starts[b]` past rows, then the S
    new rows, then zeros (onnxruntime's CPU kernel's present: it clears the rest)."""
    batch, heads, seq, size = new.shape
    rows = torch.arange(length, device=new.device)
    offset = rows - starts.unsqueeze(1)  # [B, length]: which new row lands at each row
    from_new = ((offset >= 0) & (offset < seq)).reshape(batch, 1, length, 1)
    index = offset.clamp(0, seq - 1).reshape(batch, 1, length, 1).expand(-1, heads, -1, size)
    cache = torch.where(from_new, new.gather(2, index), 0.0)
    if past is None:
        return cache
    from_past = (rows < starts.unsqueeze(1)).reshape(batch, 1, length, 1)
    kept = F.pad(past, (0, 0, 0, length - past.shape[2]))
    return torch.where(from_past, kept, cache)


@register("GroupQueryAttention", domain=MS)
def group_query_attention(ctx: OpContext) -> NodeFn:
    """onnxruntime-genai's decoder attention: grouped KV heads, a KV cache addressed per batch
    entry by `seqlens_k` (its total length - 1): entry b's S new tokens sit at positions
    max(seqlens_k[b] + 1 - S, 0) on, after its past (a first prompt may be right-padded:
    keys from seqlens_k[b] + 1 on are padding). Optional rotary embedding of Q and K at those
    positions (`do_rotary`, cos/sin caches), a causal mask with an optional left window
    (`local_window_size`), `softcap`, and an additive `attention_bias`."""
    heads, kv_heads = _positive(ctx, "num_heads"), _positive(ctx, "kv_num_heads")
    if heads % kv_heads:
        raise UnsupportedAttribute(f"num_heads {heads} is not a multiple of kv_num_heads")
    _gqa_refusals(ctx)
    causal = int(ctx.attr("causal", 1))
    window = int(ctx.attr("local_window_size", -1))
    if causal not in (0, 1) or window < -1 or (window > 0 and not causal):
        raise UnsupportedAttribute(
            f"causal {causal}, local_window_size {window}: expected causal 0 or 1, and a "
            "window of -1 (none), or > 0 with causal=1"
        )
    do_rotary = bool(ctx.attr("do_rotary", 0))
    if do_rotary and not (_given(ctx, 7) and _given(ctx, 8)):
        raise UnsupportedAttribute("do_rotary=1 needs cos_cache and sin_cache")
    rotate = _rotary(ctx, bool(ctx.attr("rotary_interleaved", 0))) if do_rotary else None
    attrs: dict[str, Any] = {"softcap": float(ctx.attr("softcap", 0.0))}
    if float(ctx.attr("scale", 0.0)):  # 0: the default 1/√head_size
        attrs["scale"] = float(ctx.attr("scale"))
    attend = default_domain_builder(ctx, "Attention", 23, attrs)
    count = min(ctx.num_outputs, 3)

    def fn(
        query: Tensor,
        key: Tensor | None,
        value: Tensor | None,
        past_key: Tensor | None,
        past_value: Tensor | None,
        seqlens_k: Tensor,
        total_sequence_length: Tensor,
        cos_cache: Tensor | None = None,
        sin_cache: Tensor | None = None,
        position_ids: Tensor | None = None,
        attention_bias: Tensor | None = None,
        *omitted: None,  # head_sink, ...: named empty by exporters, refused when given
    ) -> Any:
        batch, seq, _ = query.shape
        if key is None or value is None:  # packed QKV: [B, S, (heads + 2·kv_heads)·size]
            size = query.shape[2] // (heads + 2 * kv_heads)
            query, key, value = query.split([heads * size, kv_heads * size, kv_heads * size], -1)
        q = query.reshape(batch, seq, heads, -1).transpose(1, 2)
        k = key.reshape(batch, seq, kv_heads, -1).transpose(1, 2)
        v = value.reshape(batch, seq, kv_heads, -1).transpose(1, 2)
        totals = seqlens_k.to(device=q.device, dtype=torch.long) + 1  # per entry, with the new
        starts = (totals - seq).clamp(min=0)  # its past length: where its new rows go
        positions = starts.unsqueeze(1) + torch.arange(seq, device=q.device)  # [B, S]
        if rotate is not None and cos_cache is not None and sin_cache is not None:
            q = rotate(q, cos_cache, sin_cache, positions)
            k = rotate(k, cos_cache, sin_cache, positions)
        length = _present_length(past_key, seq, total_sequence_length)
        present_key = _write_cache(past_key, k, starts, length)
        present_value = _write_cache(past_value, v, starts, length)
        keys = torch.arange(length, device=q.device)
        allowed = keys < totals.reshape(batch, 1, 1)  # [B, S, length]
        if causal:
            allowed = allowed & (keys <= positions.unsqueeze(2))
        if window > 0:  # the query and the window - 1 keys before it
            allowed = allowed & (keys > positions.unsqueeze(2) - window)
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
        mask = mask.masked_fill(~allowed, -math.inf).unsqueeze(1)  # [B, 1, S, length]
        if attention_bias is not None:  # its last dim is total_sequence_length <= length
            mask = mask + F.pad(attention_bias, (0, length - attention_bias.shape[-1]))
        y = attend(q, present_key, present_value, mask)
        y = y.transpose(1, 2).reshape(batch, seq, -1)
        return node_outputs((y, present_key, present_value), count)

    return fn
