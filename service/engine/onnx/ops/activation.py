"""Activations and the softmax family."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from service.engine.graph import NodeFn
from service.engine.onnx.ops._util import norm_axis, require
from service.engine.onnx.registry import OpContext, register


@register("Relu")
def relu(ctx: OpContext) -> NodeFn:
    return torch.relu


@register("LeakyRelu")
def leaky_relu(ctx: OpContext) -> NodeFn:
    alpha = float(ctx.attr("alpha", 0.01))
    return lambda x: F.leaky_relu(x, alpha)


@register("PRelu")
def prelu(ctx: OpContext) -> NodeFn:
    # `slope` broadcasts unidirectionally to x; old exporters (opset < 7) also gave a
    # per-channel vector [C] for an [N, C, ...] input.
    def fn(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
        if slope.dim() == 1 and x.dim() > 2 and slope.shape[0] not in (1, x.shape[-1]):
            slope = slope.reshape([-1] + [1] * (x.dim() - 2))
        return torch.where(x < 0, x * slope, x)

    return fn


@register("Elu")
def elu(ctx: OpContext) -> NodeFn:
    alpha = float(ctx.attr("alpha", 1.0))
    return lambda x: F.elu(x, alpha)


@register("Celu")
def celu(ctx: OpContext) -> NodeFn:
    alpha = float(ctx.attr("alpha", 1.0))
    return lambda x: F.celu(x, alpha)


@register("Selu")
def selu(ctx: OpContext) -> NodeFn:
    alpha = float(ctx.attr("alpha", 1.67326319217681884765625))
    gamma = float(ctx.attr("gamma", 1.05070102214813232421875))
    return lambda x: gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@register("Sigmoid")
def sigmoid(ctx: OpContext) -> NodeFn:
    return torch.sigmoid


@register("HardSigmoid")
def hard_sigmoid(ctx: OpContext) -> NodeFn:
    alpha, beta = float(ctx.attr("alpha", 0.2)), float(ctx.attr("beta", 0.5))
    return lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0)


@register("HardSwish")
def hard_swish(ctx: OpContext) -> NodeFn:
    return F.hardswish


@register("Tanh")
def tanh(ctx: OpContext) -> NodeFn:
    return torch.tanh


@register("Softplus")
def softplus(ctx: OpContext) -> NodeFn:
    # ln(1+e^x) exactly, with torch's overflow-safe form past the threshold.
    return F.softplus


@register("Softsign")
def softsign(ctx: OpContext) -> NodeFn:
    return F.softsign


@register("Mish")
def mish(ctx: OpContext) -> NodeFn:
    return F.mish


@register("ThresholdedRelu")
def thresholded_relu(ctx: OpContext) -> NodeFn:
    alpha = float(ctx.attr("alpha", 1.0))
    return lambda x: torch.where(x > alpha, x, torch.zeros((), dtype=x.dtype, device=x.device))


@register("Swish")
def swish(ctx: OpContext) -> NodeFn:
    alpha = float(ctx.attr("alpha", 1.0))
    return lambda x: x * torch.sigmoid(alpha * x)


@register("SwiGLU", since=28)
def swiglu(ctx: OpContext) -> NodeFn:
    """Swish_alpha(A) · B: the gated feed-forward of Llama-style models."""
    alpha = float(ctx.attr("alpha", 1.0))
    if alpha == 1.0:  # SiLU: one fused kernel each way
        return lambda a, b: F.silu(a) * b
    return lambda a, b: a * torch.sigmoid(alpha * a) * b


@register("Gelu", since=20)
def gelu(ctx: OpContext) -> NodeFn:
    approximate = ctx.attr("approximate", "none")
    require(approximate in ("none", "tanh"), f"approximate='{approximate}' is not none or tanh")
    return lambda x: F.gelu(x, approximate=approximate)


def _softmax_family(op_type: str) -> None:
    kinds: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
        "Softmax": torch.softmax,
        "LogSoftmax": torch.log_softmax,
        "Hardmax": _hardmax,
    }
    fn = kinds[op_type]

    @register(op_type)
    def build_legacy(ctx: OpContext) -> NodeFn:
        # Before opset 13 the input is coerced to 2-D at `axis` (default 1) and normalised
        # over the flattened trailing block.
        axis = int(ctx.attr("axis", 1))

        def run(x: torch.Tensor) -> torch.Tensor:
            a = norm_axis(axis, x.dim())
            flat = x.reshape(*x.shape[:a], -1) if a > 0 else x.reshape(1, -1)
            return fn(flat, -1).reshape(x.shape)

        return run

    @register(op_type, since=13)
    def build(ctx: OpContext) -> NodeFn:
        axis = int(ctx.attr("axis", -1))
        return lambda x: fn(x, axis)


def _hardmax(x: torch.Tensor, axis: int) -> torch.Tensor:
    index = x.argmax(dim=axis, keepdim=True)
    return torch.zeros_like(x).scatter_(axis, index, 1.0)


for _op in ("Softmax", "LogSoftmax", "Hardmax"):
    _softmax_family(_op)
