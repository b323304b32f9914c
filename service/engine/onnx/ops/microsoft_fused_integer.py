"""onnxruntime's fused integer ops (`com.microsoft`) of dynamically quantised models:
DynamicQuantizeMatMul, MatMulIntegerToFloat, QAttention and QEmbedLayerNormalization.

`quantize_dynamic` writes QAttention for a com.microsoft Attention and QEmbedLayerNormalization
for an EmbedLayerNormalization; onnxruntime's graph optimisations (a model saved with
`optimized_model_filepath` at ORT_ENABLE_EXTENDED or above) fuse its
DynamicQuantizeLinear → MatMulInteger → Cast → Mul(Mul(a_scale, b_scale)) (→ Add bias) into
DynamicQuantizeMatMul, or MatMulIntegerToFloat where one DynamicQuantizeLinear feeds several
products. Each is its parts, with their code: integer.py's DynamicQuantizeLinear and
MatMulInteger, microsoft.py's Attention, microsoft_transformer.py's EmbedLayerNormalization,
quantize.py's DequantizeLinear. As onnxruntime's CPU kernels compute them:

- the MatMuls accumulate exactly in int32, then scale by a_scale·b_scale (b's per tensor or
  per column of B, computed in float32) and add the bias, in float32: equal to onnxruntime's
  bit for bit here; float16 scales (MatMulIntegerToFloat) compute in float32 and round once.
  A per-column scale of A, which onnxruntime's kernel fails on, is refused;
- QAttention is Attention of the dequantized input and weight (per tensor, or per column of
  the [hidden, 3·hidden] weight): its integer projection as a float product of the same
  values, equal to onnxruntime's within float32 rounding;
- QEmbedLayerNormalization is EmbedLayerNormalization of its dequantized tables, gamma and
  beta (per tensor): onnxruntime dequantizes each gathered value the same way.

The integers carry no gradient, so these ops pass none to A or to the weights: where the
weights are initializers, the conversion writes each node as its parts instead
(fused_quantization.py), which dynamic_quantization.py and dequantized_weights.py make fake
quantisation with float weight parameters. The ops compute the rest (weights given at run
time, inputs quantised some other way).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from service.engine.graph import NodeFn
from service.engine.onnx.ops.integer import dynamic_quantize_linear, matmul_integer
from service.engine.onnx.ops.microsoft import MS, ms_attention
from service.engine.onnx.ops.microsoft_transformer import embed_layer_normalization
from service.engine.onnx.ops.quantize import DequantizeLinear
from service.engine.onnx.registry import OpContext, register

# a scalar scale ignores the axis; a per-column one of a [K, N] weight is along axis 1
_PER_COLUMN = DequantizeLinear(axis=1, block_size=0)
_PER_TENSOR = DequantizeLinear(axis=0, block_size=0)


def _per_tensor(scale: Tensor, what: str) -> Tensor:
    """The quantised activation's scale: per tensor only (onnxruntime's kernels fail to
    broadcast a 1-D one)."""
    if scale.numel() != 1:
        raise ValueError(
            f"{what} of shape {list(scale.shape)}: only a per-tensor scale of the quantised "
            "input is supported (as by onnxruntime)"
        )
    return scale.reshape(())


@register("MatMulIntegerToFloat", domain=MS)
def matmul_integer_to_float(ctx: OpContext) -> NodeFn:
    """A_q @ B as MatMulInteger computes it (int32), then · a_scale·b_scale (+ bias) in float32,
    in the scales' type at the end."""
    product = matmul_integer(ctx)

    def fn(
        a: Tensor,
        b: Tensor,
        a_scale: Tensor,
        b_scale: Tensor,
        a_zero_point: Tensor | None = None,
        b_zero_point: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
        accumulated = product(a, b, a_zero_point, b_zero_point)
        # per column of B: [N] (or [..., 1, N]) broadcasts along the product's last axis
        a_scale = _per_tensor(a_scale, "a_scale").to(a.device, torch.float32)
        y = accumulated.to(torch.float32) * (a_scale * b_scale.to(a.device, torch.float32))
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(b_scale.dtype)

    return fn


@register("DynamicQuantizeMatMul", domain=MS)
def dynamic_quantize_matmul(ctx: OpContext) -> NodeFn:
    """A quantised as DynamicQuantizeLinear quantises it (uint8, its range widened to 0), then
    MatMulIntegerToFloat."""
    quantize = dynamic_quantize_linear(ctx)
    product = matmul_integer_to_float(ctx)

    def fn(
        a: Tensor,
        b: Tensor,
        b_scale: Tensor,
        b_zero_point: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
        a_q, a_scale, a_zero_point = quantize(a)
        return product(a_q, b, a_scale, b_scale, a_zero_point, b_zero_point, bias)

    return fn


@register("QAttention", domain=MS)
def q_attention(ctx: OpContext) -> NodeFn:
    """com.microsoft Attention (same attributes, less qkv_hidden_sizes) of the dequantized
    input (per tensor) and weight (per tensor or per column)."""
    attend = ms_attention(ctx)

    def fn(
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        input_scale: Tensor,
        weight_scale: Tensor,
        mask_index: Tensor | None = None,
        input_zero_point: Tensor | None = None,
        weight_zero_point: Tensor | None = None,
        past: Tensor | None = None,
    ) -> Any:
        x_values = _PER_TENSOR(x, _per_tensor(input_scale, "input_scale"), input_zero_point)
        w_values = _PER_COLUMN(weight, weight_scale, weight_zero_point)
        return attend(x_values, w_values, bias, mask_index, past)

    return fn


@register("QEmbedLayerNormalization", domain=MS)
def q_embed_layer_normalization(ctx: OpContext) -> NodeFn:
    """EmbedLayerNormalization (its inputs 0-7 are this op's) of the dequantized word,
    position and segment tables, gamma and beta; outputs the normalised sum and mask_index."""
    embed = embed_layer_normalization(ctx)

    def fn(
        input_ids: Tensor,
        segment_ids: Tensor | None,
        word: Tensor,
        position: Tensor,
        segment: Tensor | None,
        gamma: Tensor,
        beta: Tensor,
        mask: Tensor | None,
        word_scale: Tensor,
        position_scale: Tensor,
        segment_scale: Tensor | None,
        gamma_scale: Tensor,
        beta_scale: Tensor,
        word_zero_point: Tensor,
        position_zero_point: Tensor,
        segment_zero_point: Tensor | None = None,
        gamma_zero_point: Tensor | None = None,
        beta_zero_point: Tensor | None = None,
    ) -> Any:
        segment_values = None
        if segment is not None and segment_scale is not None:
            segment_values = _PER_TENSOR(segment, segment_scale, segment_zero_point)
        return embed(
            input_ids,
            segment_ids,
            _PER_TENSOR(word, word_scale, word_zero_point),
            _PER_TENSOR(position, position_scale, position_zero_point),
            segment_values,
            _PER_TENSOR(gamma, gamma_scale, gamma_zero_point),
            _PER_TENSOR(beta, beta_scale, beta_zero_point),
            mask,
        )

    return fn
