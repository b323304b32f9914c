"""Gemm, MatMul, Einsum."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from service.engine.graph import NodeFn
from service.engine.onnx.ops import _cpu_products
from service.engine.onnx.ops._util import require
from service.engine.onnx.registry import OpContext, register


@register("Gemm")
def gemm(ctx: OpContext) -> NodeFn:
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    trans_a, trans_b = bool(ctx.attr("transA", 0)), bool(ctx.attr("transB", 0))

    if alpha == 1.0 and beta == 1.0 and not trans_a and trans_b:
        # The exporters' Linear: one fused kernel, like nn.Linear itself.
        def linear(a: torch.Tensor, b: torch.Tensor, c: Any = None) -> torch.Tensor:
            # oneDNN where this CPU runs it faster than MKL (_cpu_products)
            faster = _cpu_products.weight_product(a, b, c) if a.device.type == "cpu" else None
            return F.linear(a, b, c) if faster is None else faster

        return linear

    def fn(a: torch.Tensor, b: torch.Tensor, c: Any = None) -> torch.Tensor:
        a = a.t() if trans_a else a
        b = b.t() if trans_b else b
        out = a @ b
        if alpha != 1.0:
            out = out * alpha
        if c is not None:
            out = out + (c * beta if beta != 1.0 else c)
        return out

    return fn


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if b.dim() == 2 and a.device.type == "cpu":  # by a weight: oneDNN where it is faster
        faster = _cpu_products.weight_product(a, b.t())
        if faster is not None:
            return faster
    if a.dim() == b.dim() > 3 and a.shape[:-2] == b.shape[:-2]:
        # Attention's (batch, heads, m, k) @ (batch, heads, k, n): the batched product
        # torch.matmul runs too, without its two broadcasting `expand`s (each a dispatcher
        # call and an autograd node per step: host time a GPU waits for)
        batch = a.shape[:-2]
        out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
        return out.view(*batch, *out.shape[-2:])
    return torch.matmul(a, b)


@register("MatMul")
def matmul(ctx: OpContext) -> NodeFn:
    return _matmul


@register("Einsum")
def einsum(ctx: OpContext) -> NodeFn:
    equation = str(ctx.attr("equation", "")).replace(" ", "")
    require(bool(equation), "Einsum without an equation")
    return lambda *xs: torch.einsum(equation, *xs)
