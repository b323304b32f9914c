"""ai.onnx.preview.training optimizer ops (Adagrad, Adam, Momentum): one update step each.

Inputs are R (learning rate, scalar), T (update count, int64 scalar), then the per-tensor
groups back to back: every X, then every G, then every V/H accumulator (so a node updating
n tensors has 2 + k·n inputs), and the outputs likewise: every new X, then every new
accumulator. Each tensor's step is the reference's formula (onnx/reference/ops/
aionnx_preview_training) written in torch ops, so the new values are differentiable w.r.t. R,
X, G and the accumulators. T's branches (bias correction, the first step's momentum weight)
are taken on the tensor (a `torch.where`, a 0/1 mask) rather than on T read back as a Python
number: no device sync per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from service.engine.graph import NodeFn
from service.engine.onnx.ops._util import require
from service.engine.onnx.registry import OpContext, register

TRAINING = "ai.onnx.preview.training"
MOMENTUM_MODES = ("standard", "nesterov")

# One tensor's update: (r, t, x, g, *accumulators) → (new x, *new accumulators); r is in x's
# dtype, t is still int64.
Step = Callable[..., tuple[torch.Tensor, ...]]


def _variadic(ctx: OpContext, per_tensor_inputs: int, step: Step) -> NodeFn:
    """The node's function: `step` per optimised tensor over the grouped inputs, its results
    regrouped (every new X, then every new first accumulator, ...)."""
    groups = ctx.num_inputs - 2
    require(
        groups > 0 and groups % per_tensor_inputs == 0,
        f"{ctx.op_type} takes R, T and {per_tensor_inputs} inputs per optimised tensor "
        f"(X, G, accumulators), got {ctx.num_inputs} inputs",
    )
    count = groups // per_tensor_inputs
    per_tensor_outputs = per_tensor_inputs - 1  # every input but G has a new value
    require(
        ctx.num_outputs == per_tensor_outputs * count,
        f"{ctx.op_type} updating {count} tensor(s) has {per_tensor_outputs * count} outputs, "
        f"the node declares {ctx.num_outputs}",
    )

    def fn(r: torch.Tensor, t: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        results = []
        for i in range(count):
            x = tensors[i]
            group = tensors[i::count]
            results.append(step(r.to(dtype=x.dtype, device=x.device), t.to(x.device), *group))
        return tuple(new for per_output in zip(*results, strict=True) for new in per_output)

    return fn


def _float_attr(ctx: OpContext, name: str, default: float | None = None) -> float:
    value = ctx.attr(name, default)
    require(value is not None, f"{ctx.op_type} needs its '{name}' attribute")
    return float(value)


def _regularised(x: torch.Tensor, g: torch.Tensor, norm_coefficient: float) -> torch.Tensor:
    """The gradient plus the L2 regulariser's (norm_coefficient/2 · ‖x‖²) own."""
    return g + norm_coefficient * x if norm_coefficient else g


def _as_float(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype)


@register("Adagrad", domain=TRAINING)
def adagrad(ctx: OpContext) -> NodeFn:
    norm_coefficient = _float_attr(ctx, "norm_coefficient", 0.0)
    decay_factor = _float_attr(ctx, "decay_factor", 0.0)
    epsilon = _float_attr(ctx, "epsilon", 1e-6)

    def step(
        r: torch.Tensor, t: torch.Tensor, x: torch.Tensor, g: torch.Tensor, h: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        rate = r / (1 + _as_float(t, x) * decay_factor)
        g = _regularised(x, g, norm_coefficient)
        h_new = h + g * g
        return x - rate * g / (h_new.sqrt() + epsilon), h_new

    return _variadic(ctx, 3, step)


@register("Adam", domain=TRAINING)
def adam(ctx: OpContext) -> NodeFn:
    alpha = _float_attr(ctx, "alpha", 0.9)
    beta = _float_attr(ctx, "beta", 0.999)
    epsilon = _float_attr(ctx, "epsilon", 1e-6)
    norm_coefficient = _float_attr(ctx, "norm_coefficient", 0.0)
    norm_coefficient_post = _float_attr(ctx, "norm_coefficient_post", 0.0)

    def step(
        r: torch.Tensor,
        t: torch.Tensor,
        x: torch.Tensor,
        g: torch.Tensor,
        v: torch.Tensor,
        h: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        g = _regularised(x, g, norm_coefficient)
        v_new = alpha * v + (1 - alpha) * g
        h_new = beta * h + (1 - beta) * (g * g)
        rate = r * _bias_correction(t, x, alpha, beta)
        x_new = x - rate * (v_new / (h_new.sqrt() + epsilon))
        return (1 - norm_coefficient_post) * x_new, v_new, h_new

    return _variadic(ctx, 4, step)


def _bias_correction(
    t: torch.Tensor, like: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """Adam's learning-rate factor √(1-βᵗ)/(1-αᵗ) from the first step on (T > 0), 1 before
    (where the formula is 0/0: discarded by the `where`; nothing in it takes a gradient)."""
    steps = _as_float(t, like)
    factor = torch.sqrt(1 - beta**steps) / (1 - alpha**steps)
    return torch.where(t > 0, factor, torch.ones_like(factor))


@register("Momentum", domain=TRAINING)
def momentum(ctx: OpContext) -> NodeFn:
    alpha = _float_attr(ctx, "alpha")
    beta = _float_attr(ctx, "beta")
    norm_coefficient = _float_attr(ctx, "norm_coefficient")
    mode = ctx.attr("mode")
    require(
        mode in MOMENTUM_MODES,
        f"Momentum mode {mode!r} is not one of {', '.join(MOMENTUM_MODES)}",
    )
    nesterov = mode == "nesterov"

    def step(
        r: torch.Tensor, t: torch.Tensor, x: torch.Tensor, g: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        g = _regularised(x, g, norm_coefficient)
        # The gradient's weight is 1 on the first step (T = 0), beta after.
        weight = 1 + (beta - 1) * _as_float(t > 0, x)
        v_new = alpha * v + weight * g
        direction = g + alpha * v_new if nesterov else v_new
        return x - r * direction, v_new

    return _variadic(ctx, 3, step)
