"""Attention (default domain, opsets 23, 24, 25): scaled dot-product attention as the spec draws it.

Computed with explicit torch ops (scale, matmul, softcap, bias, softmax, matmul) whenever a
mask, a softcap, a window, a softmax precision or the `qk_matmul_output` is involved, so that
every quantity the spec defines is the tensor the graph actually used, and so that a fully
masked query row gives a zero row and a zero gradient instead of NaN (the spec's errata; a NaN
in the forward pass would poison the whole backward pass through softmax). Without any of
those (what exporters emit for `F.scaled_dot_product_attention`), `F.scaled_dot_product_attention`
computes it: the same function, the kernel the source model ran.

Per version: 23 has Q/K/V, attn_mask, past_key/past_value; 24 adds `nonpad_kv_seqlen` (external
KV cache: a per-batch key padding mask, and the causal diagonal offset by `nonpad - q_len`);
25 adds `left_window_size` / `right_window_size` (a sliding window around each query's absolute
position). Everything follows onnx's reference implementation (onnx.reference) and
onnxruntime, which the tests compare against; where they differ (`qk_matmul_output_mode=0` with
a softcap), the spec's text and onnxruntime win.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from onnx import TensorProto
from torch import Tensor

from service.engine.graph import NodeFn
from service.engine.onnx.ops._util import ONNX_TO_TORCH
from service.engine.onnx.registry import OpContext, UnsupportedAttribute, register


@dataclass(frozen=True)
class _Spec:
    scale: float | None
    is_causal: bool
    q_num_heads: int | None
    kv_num_heads: int | None
    softcap: float
    softmax_dtype: torch.dtype | None
    qk_output_mode: int
    left_window: int
    right_window: int
    num_outputs: int


# The softmax precisions the spec allows (Attention, FlexAttention): the float types.
_SOFTMAX_PRECISIONS = {
    TensorProto.FLOAT: "float",
    TensorProto.FLOAT16: "float16",
    TensorProto.DOUBLE: "double",
    TensorProto.BFLOAT16: "bfloat16",
}


def softmax_precision(ctx: OpContext) -> torch.dtype | None:
    """The `softmax_precision` attribute as a dtype (None where it is not given); any other
    type than the spec's four float ones (float8 included) is refused."""
    precision = ctx.attr("softmax_precision")
    if precision is None:
        return None
    if int(precision) not in _SOFTMAX_PRECISIONS:
        allowed = ", ".join(f"{code} ({name})" for code, name in _SOFTMAX_PRECISIONS.items())
        raise UnsupportedAttribute(
            f"softmax_precision {precision}: set it to one of {allowed} or leave it out"
        )
    return ONNX_TO_TORCH[int(precision)]


def grouped_heads(K: Tensor, V: Tensor, q_heads: int) -> tuple[Tensor, Tensor]:
    """K and V with each of their heads repeated for the q_heads / kv_heads consecutive query
    heads it serves (grouped-query attention); as they are where the counts agree."""
    kv_heads = K.shape[1]
    if q_heads == kv_heads:
        return K, V
    return K.repeat_interleave(q_heads // kv_heads, 1), V.repeat_interleave(q_heads // kv_heads, 1)


def scaled_scores(Q: Tensor, K: Tensor, scale: float) -> Tensor:
    """scale·QKᵀ with √|scale| applied to each side before the product (the spec's form: it
    keeps 16-bit products from overflowing); a negative scale's sign goes on K (the spec's
    √scale would be NaN)."""
    root = math.sqrt(abs(scale))
    return torch.matmul(Q * root, (K * math.copysign(root, scale)).transpose(-1, -2))


def softmax_zeroing_rows(logits: Tensor, masked_rows: Tensor | None) -> Tensor:
    """Softmax over the keys, where `masked_rows` ([..., 1], or None: none) marks rows with
    no attendable key: those give zeros and a zero gradient instead of NaN (softmax over
    zeros, then zeroed: no host sync to ask whether any exist, cheaper than the round trip
    on a GPU)."""
    if masked_rows is None:
        return torch.softmax(logits, -1)
    probs = torch.softmax(logits.masked_fill(masked_rows, 0.0), -1)
    return probs.masked_fill(masked_rows, 0.0)


def _spec(ctx: OpContext) -> _Spec:
    mode = int(ctx.attr("qk_matmul_output_mode", 0))
    if mode not in (0, 1, 2, 3):
        raise UnsupportedAttribute(f"qk_matmul_output_mode {mode}: expected 0, 1, 2 or 3")
    softmax_dtype = softmax_precision(ctx)
    left, right = int(ctx.attr("left_window_size", -1)), int(ctx.attr("right_window_size", -1))
    if left < -1 or right < -1:
        raise UnsupportedAttribute("left/right_window_size must be -1 (unbounded) or >= 0")
    q_heads, kv_heads = ctx.attr("q_num_heads"), ctx.attr("kv_num_heads")
    if (q_heads is None) != (kv_heads is None):
        raise UnsupportedAttribute("q_num_heads and kv_num_heads must be given together")
    if q_heads is not None and (int(kv_heads) <= 0 or int(q_heads) % int(kv_heads)):
        raise UnsupportedAttribute(
            f"q_num_heads {q_heads} must be a positive multiple of kv_num_heads {kv_heads}"
        )
    scale = ctx.attr("scale")
    return _Spec(
        scale=None if scale is None else float(scale),
        is_causal=bool(ctx.attr("is_causal", 0)),
        q_num_heads=None if q_heads is None else int(q_heads),
        kv_num_heads=None if kv_heads is None else int(kv_heads),
        softcap=float(ctx.attr("softcap", 0.0)),
        softmax_dtype=softmax_dtype,
        qk_output_mode=mode,
        left_window=left,
        right_window=right,
        num_outputs=ctx.num_outputs,
    )


def _split_heads(x: Tensor, heads: int | None, name: str) -> Tensor:
    """[batch, seq, heads·size] → [batch, heads, seq, size]."""
    if heads is None:
        raise ValueError(f"Attention: 3-D {name} needs the q_num_heads/kv_num_heads attributes")
    batch, seq, width = x.shape
    return x.reshape(batch, seq, heads, width // heads).transpose(1, 2)


def _band(q_len: int, kv_len: int, offset: int | Tensor, device: torch.device) -> Tensor:
    """(i + offset) - j for every query i and key j: [q, kv], or [batch, 1, q, kv] when the
    offset is per batch (external cache)."""
    i = torch.arange(q_len, device=device).unsqueeze(1)
    j = torch.arange(kv_len, device=device).unsqueeze(0)
    if isinstance(offset, Tensor):
        return (i + offset.reshape(-1, 1, 1, 1)) - j
    return (i + offset) - j


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.full((), -math.inf, dtype=dtype, device=allowed.device))


def _bias(
    spec: _Spec,
    attn_mask: Tensor | None,
    nonpad: Tensor | None,
    past_len: int | None,
    q_len: int,
    kv_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    """The additive bias (0 / -inf / float mask) of the spec, broadcastable to
    [batch, heads, q, kv]; None when nothing masks."""
    bias: Tensor | None = None
    if attn_mask is not None:
        pad = kv_len - attn_mask.shape[-1]  # a mask may cover only the first keys
        if attn_mask.dtype == torch.bool:
            if pad > 0:
                attn_mask = torch.nn.functional.pad(attn_mask, (0, pad), value=False)
            bias = _additive(attn_mask, dtype)
        else:
            bias = attn_mask.to(dtype)
            if pad > 0:
                bias = torch.nn.functional.pad(bias, (0, pad), value=-math.inf)
    # the causal diagonal and the window are placed at each query's absolute position
    offset: int | Tensor = 0
    if past_len is not None:
        offset = past_len
    elif nonpad is not None:
        offset = nonpad.to(device=device, dtype=torch.long) - q_len
    windowed = spec.left_window >= 0 or spec.right_window >= 0
    if spec.is_causal or windowed:
        diff = _band(q_len, kv_len, offset, device)
        allowed = torch.ones_like(diff, dtype=torch.bool)
        if spec.is_causal:
            allowed &= diff >= 0
        if spec.left_window >= 0:
            allowed &= diff <= spec.left_window
        if spec.right_window >= 0:
            allowed &= -diff <= spec.right_window
        band = _additive(allowed, dtype)
        bias = band if bias is None else bias + band
    if nonpad is not None:
        keys = torch.arange(kv_len, device=device)
        valid = keys < nonpad.to(device=device).reshape(-1, 1, 1, 1)
        padding = _additive(valid, dtype)
        bias = padding if bias is None else bias + padding
    return bias


@register("Attention", since=23)
def attention(ctx: OpContext) -> NodeFn:
    spec = _spec(ctx)
    takes_nonpad = ctx.opset >= 24
    causal = spec.is_causal
    # no softcap, no softmax cast, no window, no qk output: torch's fused kernel computes it
    plain = (
        spec.softcap <= 0
        and spec.softmax_dtype is None
        and spec.left_window < 0
        and spec.right_window < 0
        and spec.num_outputs <= 3
    )

    def fn(
        Q: Tensor,
        K: Tensor,
        V: Tensor,
        attn_mask: Tensor | None = None,
        past_key: Tensor | None = None,
        past_value: Tensor | None = None,
        nonpad_kv_seqlen: Tensor | None = None,
    ) -> Any:
        if (past_key is None) != (past_value is None):
            raise ValueError("Attention: past_key and past_value must be given together")
        nonpad = nonpad_kv_seqlen if takes_nonpad else None
        three_d = Q.dim() == 3
        if three_d:
            Q = _split_heads(Q, spec.q_num_heads, "Q")
            K = _split_heads(K, spec.kv_num_heads, "K")
            V = _split_heads(V, spec.kv_num_heads, "V")
        past_len = None
        if past_key is not None and past_value is not None:
            past_len = past_key.shape[2]
            K = torch.cat([past_key, K], 2)
            V = torch.cat([past_value, V], 2)
        present_key, present_value = K, V
        K, V = grouped_heads(K, V, Q.shape[1])
        scale = spec.scale if spec.scale is not None else 1.0 / math.sqrt(Q.shape[-1])
        if plain and attn_mask is None and nonpad is None and (past_len is None or not causal):
            # nothing the explicit form is needed for: torch's kernel (what the source model
            # ran, for exports of F.scaled_dot_product_attention), same result, less memory
            Y = F.scaled_dot_product_attention(Q, K, V, is_causal=causal, scale=scale)
            return _pack(Y, three_d, present_key, present_value, None, spec.num_outputs)
        qk = raw_qk = scaled_scores(Q, K, scale)
        if spec.softcap > 0:
            qk = spec.softcap * torch.tanh(qk / spec.softcap)
        bias = _bias(spec, attn_mask, nonpad, past_len, Q.shape[2], K.shape[2], Q.dtype, Q.device)
        logits = qk if bias is None else qk + bias
        # mode 0 is the raw product as the spec and onnxruntime have it (onnx's reference
        # implementation returns it after softcap); 1: after softcap; 2: plus the bias
        qk_output = (raw_qk, qk, logits, None)[spec.qk_output_mode]
        if spec.softmax_dtype is not None:
            logits = logits.to(spec.softmax_dtype)
        masked_rows = None if bias is None else torch.isneginf(bias.amax(-1, keepdim=True))
        probs = softmax_zeroing_rows(logits, masked_rows).to(Q.dtype)
        if spec.qk_output_mode == 3:
            qk_output = probs
        if qk_output is not None:
            qk_output = qk_output.to(Q.dtype)
        Y = torch.matmul(probs, V)
        return _pack(Y, three_d, present_key, present_value, qk_output, spec.num_outputs)

    return fn


def _pack(
    Y: Tensor,
    three_d: bool,
    present_key: Tensor,
    present_value: Tensor,
    qk_output: Tensor | None,
    count: int,
) -> Any:
    if three_d:  # [batch, heads, q, size] → [batch, q, heads·size]
        Y = Y.transpose(1, 2).reshape(Y.shape[0], Y.shape[2], -1)
    outputs = (Y, present_key, present_value, qk_output)[:count]
    return outputs[0] if count <= 1 else outputs
