"""Normalisation layers and Dropout, with the `mode` semantics of CONTRACT.md §2.

`train`: BatchNormalization normalises with the batch's statistics whatever the export said, and
Dropout is the identity unless the diagnosis asked for it (`ctx.extra["dropout"]`).
`eval`: the graph as exported: training_mode attributes/inputs are honoured.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from service.engine.graph import NodeFn, passthrough
from service.engine.onnx.ops._util import norm_axes, norm_axis, require, scalar
from service.engine.onnx.registry import OpContext, register


def _bn_uses_batch_stats(ctx: OpContext) -> bool:
    if ctx.mode == "train":
        return True
    if ctx.opset >= 14:
        return bool(ctx.attr("training_mode", 0))
    # Before opset 14 a training graph is the one that asks for the statistics outputs.
    return any(name for name in list(ctx.node.output)[1:])


@register("BatchNormalization")
def batch_norm(ctx: OpContext) -> NodeFn:
    require(int(ctx.attr("spatial", 1)) == 1, "spatial=0 (per-activation statistics)")
    eps = float(ctx.attr("epsilon", 1e-5))
    momentum = float(ctx.attr("momentum", 0.9))
    batch_stats = _bn_uses_batch_stats(ctx)
    # Trailing statistics outputs nothing reads (the legacy exporter names them all) cost
    # two extra reductions over the activations: compute only up to the last one read.
    used = [i for i in range(1, ctx.num_outputs) if ctx.output_used(i)]
    extra_outputs = max(used, default=0)

    def fn(x: torch.Tensor, scale: Any, bias: Any, mean: Any, var: Any) -> Any:
        if not batch_stats:
            # Running statistics are data, not weights: no gradient flows into them.
            return F.batch_norm(x, mean.detach(), var.detach(), scale, bias, False, 0.0, eps)
        y = F.batch_norm(x, None, None, scale, bias, True, 0.0, eps)
        if extra_outputs == 0:
            return y if ctx.num_outputs == 1 else (y,) + (None,) * (ctx.num_outputs - 1)
        dims = [0, *range(2, x.dim())]
        batch_mean = x.mean(dim=dims)
        batch_var = x.var(dim=dims, unbiased=False)
        running_mean = mean * momentum + batch_mean * (1 - momentum)
        running_var = var * momentum + batch_var * (1 - momentum)
        outs = [y, running_mean, running_var, batch_mean, batch_var]
        return tuple(outs[: 1 + extra_outputs]) + (None,) * (ctx.num_outputs - 1 - extra_outputs)

    return fn


@register("InstanceNormalization")
def instance_norm(ctx: OpContext) -> NodeFn:
    eps = float(ctx.attr("epsilon", 1e-5))
    # group_norm with one group per channel is instance norm: the same statistics, computed
    # by one kernel each way, where F.instance_norm repeats the weights and runs batch_norm
    # on an [1, N·C, ...] view (forward + backward 0.53-0.69x the time on the CPU; both
    # exporters write every nn.GroupNorm through this op)
    return lambda x, scale, bias: F.group_norm(x, x.shape[1], scale, bias, eps)


@register("LayerNormalization", since=17)
def layer_norm(ctx: OpContext) -> NodeFn:
    axis = int(ctx.attr("axis", -1))
    eps = float(ctx.attr("epsilon", 1e-5))
    stats = ctx.num_outputs > 1

    def fn(x: torch.Tensor, scale: torch.Tensor, bias: Any = None) -> Any:
        a = norm_axis(axis, x.dim())
        shape = list(x.shape[a:])
        if not stats and list(scale.shape) == shape and (bias is None or bias.shape == scale.shape):
            return F.layer_norm(x, shape, scale, bias, eps)
        dims = list(range(a, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        inv_std = torch.rsqrt(x.var(dim=dims, unbiased=False, keepdim=True) + eps)
        y = (x - mean) * inv_std * scale
        if bias is not None:
            y = y + bias
        return (y, mean, inv_std)[: max(1, len(ctx.node.output))] if stats else y

    return fn


@register("RMSNormalization", since=23)
def rms_norm(ctx: OpContext) -> NodeFn:
    axis = int(ctx.attr("axis", -1))
    eps = float(ctx.attr("epsilon", 1e-5))

    def fn(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        dims = list(range(norm_axis(axis, x.dim()), x.dim()))
        return x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps) * scale

    return fn


def _group_norm(ctx: OpContext, per_group_affine: bool) -> NodeFn:
    groups = int(ctx.attr("num_groups", 1))
    eps = float(ctx.attr("epsilon", 1e-5))

    def fn(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if per_group_affine:  # opset 18: one scale/bias per group
            channels = x.shape[1] // groups
            scale = scale.repeat_interleave(channels)
            bias = bias.repeat_interleave(channels)
        return F.group_norm(x, groups, scale, bias, eps)

    return fn


@register("GroupNormalization", since=18)
def group_norm_18(ctx: OpContext) -> NodeFn:
    return _group_norm(ctx, per_group_affine=True)


@register("GroupNormalization", since=21)
def group_norm_21(ctx: OpContext) -> NodeFn:
    return _group_norm(ctx, per_group_affine=False)


@register("LRN")
def lrn(ctx: OpContext) -> NodeFn:
    size = int(ctx.attr("size"))
    alpha, beta = float(ctx.attr("alpha", 1e-4)), float(ctx.attr("beta", 0.75))
    bias = float(ctx.attr("bias", 1.0))
    return lambda x: F.local_response_norm(x, size, alpha, beta, bias)


@register("MeanVarianceNormalization")
def mean_variance_norm(ctx: OpContext) -> NodeFn:
    axes = ctx.attr("axes", [0, 2, 3])

    def fn(x: torch.Tensor) -> torch.Tensor:
        dims = norm_axes(axes, x.dim())
        mean = x.mean(dim=dims, keepdim=True)
        var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-9)

    return fn


def _dropout_active(ctx: OpContext, training_input: Any) -> bool:
    if ctx.mode == "train":
        return bool(ctx.extra.get("dropout", False))
    return bool(scalar(training_input)) if training_input is not None else False


def _dropout(x: torch.Tensor, ratio: float, active: bool, mask: tuple[bool, bool]) -> Any:
    declared, used = mask
    if not active or ratio == 0.0:
        if not declared:
            return x
        return (x, torch.ones_like(x, dtype=torch.bool) if used else None)
    keep = torch.rand_like(x) >= ratio
    y = x * keep / (1.0 - ratio)
    return (y, keep) if declared else y


def _inactive_dropout(mask: tuple[bool, bool]) -> NodeFn:
    declared, used = mask
    if not declared:
        return passthrough  # run() gives the output the input's slot
    if not used:
        return lambda x, ratio=None, training_mode=None: (x, None)
    return lambda x, ratio=None, training_mode=None: _dropout(x, 0.0, False, mask)


def _mask_output(ctx: OpContext) -> tuple[bool, bool]:
    """(declared, read): an all-true mask is only built when something reads it."""
    return ctx.num_outputs > 1, ctx.output_used(1)


@register("Dropout")
def dropout_legacy(ctx: OpContext) -> NodeFn:
    ratio = float(ctx.attr("ratio", 0.5))
    is_test = bool(ctx.attr("is_test", 0)) if ctx.opset < 7 else False
    mask = _mask_output(ctx)
    # Before opset 12 the exported graph's Dropout is an inference no-op (onnxruntime's too).
    active = ctx.mode == "train" and bool(ctx.extra.get("dropout", False)) and not is_test
    return lambda x: _dropout(x, ratio, active, mask)


@register("Dropout", since=12)
def dropout(ctx: OpContext) -> NodeFn:
    mask = _mask_output(ctx)
    if ctx.mode == "train" and not ctx.extra.get("dropout", False):
        # off whatever the ratio and training_mode inputs say: read neither (a scalar read
        # per node and step is a dispatcher call and, on a GPU, a device sync)
        return _inactive_dropout(mask)

    def fn(x: torch.Tensor, ratio: Any = None, training_mode: Any = None) -> Any:
        r = float(scalar(ratio)) if ratio is not None else 0.5
        return _dropout(x, r, _dropout_active(ctx, training_mode), mask)

    return fn


@register("LpNormalization")
def lp_normalization(ctx: OpContext) -> NodeFn:
    axis, p = int(ctx.attr("axis", -1)), int(ctx.attr("p", 2))
    require(p in (1, 2), f"p={p} (only 1 and 2 are defined)")

    def fn(x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, ord=p, dim=axis, keepdim=True)
        return x / torch.where(norm == 0, torch.ones_like(norm), norm)  # zero vectors stay 0

    return fn
