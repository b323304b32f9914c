"""Transformer helpers of the default domain: RotaryEmbedding (opset 23)."""

from __future__ import annotations

from typing import Any

import torch

from service.engine.graph import NodeFn
from service.engine.onnx.ops.elementwise import colocated
from service.engine.onnx.registry import OpContext, register

_gather_rows = colocated(lambda cache, ids: cache[ids.long()])


@register("RotaryEmbedding", since=23)
def rotary_embedding(ctx: OpContext) -> NodeFn:
    """Follows onnx.reference's implementation: rotate the first `rotary_embedding_dim`
    channels of each head by (cos, sin), halves or interleaved pairs."""
    interleaved = bool(ctx.attr("interleaved", 0))
    rotary_dim = int(ctx.attr("rotary_embedding_dim", 0))
    num_heads = int(ctx.attr("num_heads", 0))

    def fn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ids: Any = None) -> Any:
        shape = x.shape
        if x.dim() == 4:  # [batch, heads, seq, head] → [batch, seq, heads, head]
            y = x.transpose(1, 2)
        else:
            if num_heads <= 0:
                raise ValueError("RotaryEmbedding on a 3-D input needs num_heads")
            y = x.reshape(shape[0], shape[1], num_heads, -1)
        dim = rotary_dim or y.shape[-1]
        rotate, keep = y[..., :dim], y[..., dim:]
        if ids is not None:
            cos, sin = _gather_rows(cos, ids), _gather_rows(sin, ids)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        if interleaved:
            x1, x2 = rotate[..., 0::2], rotate[..., 1::2]
        else:
            x1, x2 = rotate.chunk(2, dim=-1)
        real = cos * x1 - sin * x2
        imag = sin * x1 + cos * x2
        if interleaved:
            rotated = torch.stack([real, imag], dim=-1).reshape(rotate.shape)
        else:
            rotated = torch.cat([real, imag], dim=-1)
        out = torch.cat([rotated, keep], dim=-1)
        return out.transpose(1, 2) if x.dim() == 4 else out.reshape(shape)

    return fn
