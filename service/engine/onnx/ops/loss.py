"""Losses that training graphs carry: NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from service.engine.graph import NodeFn
from service.engine.onnx.ops._util import require
from service.engine.onnx.registry import OpContext, register

REDUCTIONS = ("none", "sum", "mean")
# torch needs an ignore_index; one no class index can equal stands for "none given".
NO_IGNORE = -(2**62)


def _loss_settings(ctx: OpContext) -> tuple[str, int]:
    reduction = str(ctx.attr("reduction", "mean"))
    require(reduction in REDUCTIONS, f"reduction='{reduction}'")
    ignore = ctx.attr("ignore_index")
    return reduction, int(ignore) if ignore is not None else NO_IGNORE


def _nll(
    log_prob: torch.Tensor, target: torch.Tensor, weight: Any, reduction: str, ignore: int
) -> torch.Tensor:
    target = target.long()
    if log_prob.dim() > 2 and log_prob.shape[1] == 0:
        raise ValueError("NegativeLogLikelihoodLoss needs at least one class")
    return F.nll_loss(log_prob, target, weight, ignore_index=ignore, reduction=reduction)


@register("NegativeLogLikelihoodLoss", since=12)
def negative_log_likelihood_loss(ctx: OpContext) -> NodeFn:
    reduction, ignore = _loss_settings(ctx)

    def fn(x: torch.Tensor, target: torch.Tensor, weight: Any = None) -> torch.Tensor:
        return _nll(x, target, weight, reduction, ignore)

    return fn


@register("SoftmaxCrossEntropyLoss", since=12)
def softmax_cross_entropy_loss(ctx: OpContext) -> NodeFn:
    reduction, ignore = _loss_settings(ctx)
    want_log_prob = ctx.num_outputs > 1

    def fn(scores: torch.Tensor, labels: torch.Tensor, weight: Any = None) -> Any:
        log_prob = torch.log_softmax(scores, dim=1)
        loss = _nll(log_prob, labels, weight, reduction, ignore)
        return (loss, log_prob) if want_log_prob else loss

    return fn
