"""Quantised models written out in torch from their initializers: the references that the
converter's fake quantisation is checked against (tests of quantize_dynamic, onnxruntime's
fused and QOperator ops, the quantised LSTM)."""

from __future__ import annotations

import onnx
import torch
from onnx import numpy_helper


def initializers(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    """The model's initializers as tensors (copies: the conversion releases the bytes)."""
    return {
        i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer
    }


def dequantized_leaf(init: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """`name`'s integer weight as a float leaf: (q − zero point) · scale, per tensor or per
    column, from onnxruntime's `<name>_quantized/_scale/_zero_point` initializers."""
    q, s, z = (init[f"{name}_{part}"].double() for part in ("quantized", "scale", "zero_point"))
    return ((q - z) * s).float().requires_grad_()


def fake_dynamic_quantized(v: torch.Tensor) -> torch.Tensor:
    """DynamicQuantizeLinear → DequantizeLinear of `v`, its rounding passed straight through."""
    d = v.detach()  # the range widened to 0, in float32 as the op computes it
    low, high = d.min().clamp(max=0), d.max().clamp(min=0)
    # an all-zero input (an initial state) gets scale 1, as onnxruntime's kernel gives it
    scale = torch.where(high > low, (high - low) / 255, torch.ones_like(high))
    zero = torch.round((-low / scale).clamp(0, 255))
    q = torch.clamp(torch.round(d / scale) + zero, 0, 255)
    return v + ((q - zero) * scale - v).detach()
