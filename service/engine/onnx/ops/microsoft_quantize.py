"""onnxruntime's contrib quantisation ops (`com.microsoft`): QuantizeLinear, DequantizeLinear
and MatMulNBits.

QuantizeLinear / DequantizeLinear are the default-domain ops (quantize.py) under onnxruntime's
older contrib schema: per tensor or per `axis`, int8/uint8/int16 (and int4/uint4, held in int8/
uint8; DequantizeLinear also reads int32). A Q → DQ pair of them is fake quantisation as the
default-domain pair is (quantize.py's `fake_quantize_pairs` goes by op type). uint16 is
refused: torch has no uint16 arithmetic.

MatMulNBits is the weight-only quantised MatMul of onnxruntime-genai's and Olive's LLM exports
(`matmul_nbits_quantizer.py`): Y = A @ dequantize(B)ᵀ (+ bias), B the [N, K] weight quantised
to `bits` (2, 4 or 8) in blocks of `block_size` along K, packed low bits first into uint8
[N, ceil(K / block_size), block_size·bits/8]. Per block a scale and a zero point: packed uint8
ones (one row of ceil(n_blocks·bits/8) bytes per n), float ones (HQQ's), or none (2^(bits-1)).
g_idx (GPTQ's act-order: the block of each k) is taken with 4 bits and float or no zero
points only: onnxruntime's CPU kernel ignores packed zero points with it, and computes
something else again for 2 bits and refuses 8. `accuracy_level` tells onnxruntime how it may
compute (quantising A, for speed), not what: it is ignored; `weight_prepacked` layouts are
refused. An empty B (an omitted projection) gives zeros, or the bias.

The op dequantizes the weight on every call and is differentiable only w.r.t. A and the bias
(gradient_paths.py keeps the packed weight, scales, zero points and g_idx out of the
parameters): the packed integers cannot be trained. A stored weight never reaches it: the
conversion writes such a node as a float MatMul whose weight is a parameter
(weight_only_quantization.py, with `dequantized_nbits`); the op computes the rest (a weight
given at run time).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from onnx import TensorProto
from torch import Tensor

from service.engine.graph import NodeFn
from service.engine.onnx.ops._util import require
from service.engine.onnx.ops.microsoft import MS
from service.engine.onnx.ops.quantize import dequantize_linear, quantize_linear
from service.engine.onnx.registry import OpContext, UnsupportedAttribute, register


def _refuse_uint16(ctx: OpContext, slots: tuple[int, ...]) -> None:
    if any(ctx.input_type(slot) == TensorProto.UINT16 for slot in slots):
        raise UnsupportedAttribute(
            f"{MS}::{ctx.op_type} on uint16 is not supported: torch has no uint16 arithmetic"
        )


@register("QuantizeLinear", domain=MS)
def ms_quantize_linear(ctx: OpContext) -> NodeFn:
    _refuse_uint16(ctx, (2,))  # the zero point's type is the target's
    return quantize_linear(ctx)


@register("DequantizeLinear", domain=MS)
def ms_dequantize_linear(ctx: OpContext) -> NodeFn:
    _refuse_uint16(ctx, (0, 2))
    return dequantize_linear(ctx)


_NBITS = (2, 4, 8)


def _unpacked(packed: Tensor, bits: int, count: int) -> Tensor:
    """uint8 [..., B] holding 8/bits values a byte, low bits first → int32 [..., count]."""
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device)
    values = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.flatten(-2)[..., :count]


def _input_given(ctx: OpContext, index: int) -> bool:
    names = list(ctx.node.input) if ctx.node is not None else []
    return index < len(names) and bool(names[index])


@dataclass(frozen=True)
class NBitsShape:
    """A MatMulNBits weight's attributes: B is the [N, K] weight in blocks along K."""

    k: int
    n: int
    bits: int
    block_size: int

    @classmethod
    def of(cls, attrs: Mapping[str, Any]) -> NBitsShape:
        return cls(
            int(attrs["K"]), int(attrs["N"]), int(attrs.get("bits", 4)), int(attrs["block_size"])
        )


def dequantized_nbits(
    shape: NBitsShape,
    b: Tensor,
    scales: Tensor,
    zero_points: Tensor | None,
    g_idx: Tensor | None,
    dtype: torch.dtype,
) -> Tensor:
    """B as the float [N, K] weight: (q - zero point) · scale per block."""
    k, n, bits, block_size = shape.k, shape.n, shape.bits, shape.block_size
    n_blocks = math.ceil(k / block_size)
    blob = block_size * bits // 8
    if list(b.shape) != [n, n_blocks, blob]:
        raise ValueError(
            f"MatMulNBits: B has shape {list(b.shape)}, expected {[n, n_blocks, blob]} "
            f"(N={n}, K={k}, bits={bits}, block_size={block_size})"
        )
    q = _unpacked(b, bits, block_size).reshape(n, n_blocks * block_size)[:, :k]
    scale = scales.detach().to(dtype).reshape(n, n_blocks)
    if zero_points is None:
        zero = torch.full((), float(1 << (bits - 1)), dtype=dtype, device=b.device)
    elif zero_points.dtype == torch.uint8:  # packed, one row of bytes per n
        if g_idx is not None:
            raise ValueError("MatMulNBits: g_idx with packed uint8 zero points")
        zero = _unpacked(zero_points.reshape(n, -1), bits, n_blocks).to(dtype)
    else:
        zero = zero_points.detach().to(dtype).reshape(n, n_blocks)
    if g_idx is None:  # the block of k is k // block_size
        index = torch.arange(k, device=b.device) // block_size
    else:
        index = g_idx.to(device=b.device, dtype=torch.int64)
    if zero.dim():
        zero = zero[:, index]
    return (q.to(dtype) - zero) * scale[:, index]


@register("MatMulNBits", domain=MS)
def matmul_nbits(ctx: OpContext) -> NodeFn:
    k, n = ctx.attr("K"), ctx.attr("N")
    require(k is not None and n is not None, "MatMulNBits needs its K and N attributes")
    k, n = int(k), int(n)
    bits = int(ctx.attr("bits", 4))
    block_size = int(ctx.attr("block_size", 0))
    require(bits in _NBITS, f"bits={bits} is not supported (2, 4 or 8)")
    require(
        block_size >= 16 and block_size & (block_size - 1) == 0,
        f"block_size={block_size} is not a power of two of at least 16",
    )
    require(
        int(ctx.attr("weight_prepacked", 0)) == 0,
        "weight_prepacked (an execution provider's own layout of B) is not supported",
    )
    if _input_given(ctx, 4):
        require(bits == 4, f"g_idx with bits={bits} is not supported (onnxruntime: 4 bits only)")
        require(
            ctx.input_type(3) != TensorProto.UINT8,
            "g_idx with packed uint8 zero points is not supported "
            "(onnxruntime's CPU kernel ignores the zero points there)",
        )

    shape = NBitsShape(k, n, bits, block_size)

    def fn(
        a: Tensor,
        b: Tensor,
        scales: Tensor,
        zero_points: Tensor | None = None,
        g_idx: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
        if a.shape[-1] != k:
            raise ValueError(f"MatMulNBits: A has shape {list(a.shape)}, K={k}")
        if b.numel() == 0:  # an omitted projection
            y = a.new_zeros((*a.shape[:-1], n))
        else:
            # half inputs dequantize in float32: the weight is rounded once, to A's type
            compute = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
            weight = dequantized_nbits(shape, b, scales, zero_points, g_idx, compute).to(a.dtype)
            y = torch.matmul(a, weight.t())
        return y if bias is None else y + bias

    return fn
