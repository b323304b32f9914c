"""Random ops: RandomUniform(Like), RandomNormal(Like), Bernoulli.

Training exports write random masks with them: both exporters turn a drop path (stochastic
depth, `x.new_empty(...).bernoulli_(keep)`) into `RandomUniformLike → Less(u, keep) → Cast`,
and opset 15's `Bernoulli` draws one directly. Like dropout, such masks are off in train mode
unless dropout is asked for (CONTRACT.md §2): a mask is then its expected value, which is the
module's eval behaviour for an inverted mask (`x · mask / keep` = x), and the run is
reproducible. `expected_random_masks` rewrites the Less of the exporters' pattern (and
onnxruntime's copy of the model computes the same for the conformance check); `Bernoulli`
gives its probabilities. Other draws sample torch's generator (one seeded per diagnosis, or the
node's own `seed`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from service.engine.graph import Node, NodeFn
from service.engine.onnx.ops._util import ints, torch_dtype
from service.engine.onnx.registry import OpContext, register

_FLOAT = 1  # TensorProto.FLOAT, the ops' default dtype


def _generator(ctx: OpContext) -> torch.Generator | None:
    seed = ctx.attr("seed")
    return None if seed is None else torch.Generator().manual_seed(int(seed))


def _draw(
    ctx: OpContext, sample: Callable[[list[int], torch.dtype, torch.Generator | None], Any]
) -> Callable[[list[int], torch.dtype, torch.device], torch.Tensor]:
    generator = _generator(ctx)

    def draw(shape: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # a seeded generator lives on the CPU: draw there, then move
        values = sample(shape, dtype, generator)
        return values.to(device) if generator is not None else values

    return draw


def _uniform(ctx: OpContext) -> Callable[[list[int], torch.dtype, torch.device], torch.Tensor]:
    low, high = float(ctx.attr("low", 0.0)), float(ctx.attr("high", 1.0))
    return _draw(
        ctx,
        lambda shape, dtype, g: torch.rand(shape, dtype=dtype, generator=g) * (high - low) + low,
    )


def _normal(ctx: OpContext) -> Callable[[list[int], torch.dtype, torch.device], torch.Tensor]:
    mean, scale = float(ctx.attr("mean", 0.0)), float(ctx.attr("scale", 1.0))
    return _draw(
        ctx, lambda shape, dtype, g: torch.randn(shape, dtype=dtype, generator=g) * scale + mean
    )


def _like(ctx: OpContext, draw: Callable[..., torch.Tensor]) -> NodeFn:
    dtype_attr = ctx.attr("dtype")

    def fn(x: torch.Tensor) -> torch.Tensor:
        dtype = torch_dtype(int(dtype_attr)) if dtype_attr is not None else x.dtype
        return draw(list(x.shape), dtype, x.device)

    return fn


def _shaped(ctx: OpContext, draw: Callable[..., torch.Tensor]) -> NodeFn:
    shape = ints(ctx.attr("shape", []))
    dtype = torch_dtype(int(ctx.attr("dtype", _FLOAT)))
    return lambda: draw(shape, dtype, torch.device("cpu"))


@register("RandomUniformLike")
def random_uniform_like(ctx: OpContext) -> NodeFn:
    return _like(ctx, _uniform(ctx))


@register("RandomUniform")
def random_uniform(ctx: OpContext) -> NodeFn:
    return _shaped(ctx, _uniform(ctx))


@register("RandomNormalLike")
def random_normal_like(ctx: OpContext) -> NodeFn:
    return _like(ctx, _normal(ctx))


@register("RandomNormal")
def random_normal(ctx: OpContext) -> NodeFn:
    return _shaped(ctx, _normal(ctx))


@register("Bernoulli", since=15)
def bernoulli(ctx: OpContext) -> NodeFn:
    dtype_attr = ctx.attr("dtype")
    generator = _generator(ctx)
    expected = masks_are_expected(ctx.mode, ctx.extra)

    def fn(p: torch.Tensor) -> torch.Tensor:
        dtype = torch_dtype(int(dtype_attr)) if dtype_attr is not None else p.dtype
        probabilities = p.clamp(0.0, 1.0)
        if expected:
            return probabilities.to(dtype)
        if generator is not None:
            return torch.bernoulli(probabilities.cpu(), generator=generator).to(p.device, dtype)
        return torch.bernoulli(probabilities).to(dtype)

    return fn


def masks_are_expected(mode: str, extra: dict[str, Any]) -> bool:
    """Random masks are their expected value: train mode without --dropout."""
    return mode == "train" and not extra.get("dropout", False)


_UNIFORM = frozenset({"RandomUniform", "RandomUniformLike"})
# the comparisons that are a Bernoulli(p) draw on u ~ U[0, 1): op → the operand u is
_DRAW_OPERAND = {"Less": 0, "Greater": 1}  # u < p, p > u


def expected_random_masks(
    nodes: Sequence[Node], producers: dict[str, Node]
) -> dict[str, tuple[str, str]]:
    """Make each `Less(u, p)` (or `Greater(p, u)`) on a uniform draw in [0, 1) that only
    casts to a float read give p instead of its sample: the exporters' Bernoulli(p) mask at
    its expected value; so is `Floor(Add(u, keep))`. Returns, by the rewritten node's output,
    (u, p): onnxruntime's copy of the model computes the same (conformance.py)."""
    readers: dict[str, list[Node]] = {}
    for node in nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node)
    rewritten: dict[str, tuple[str, str]] = {}
    for node in nodes:
        floored = _floored_draw(node, producers)
        if floored is not None:  # floor(keep + u): Bernoulli(keep), as a float already
            node.inputs = list(floored)  # it reads the draw and keep, not their sum
            node.fn = _expected_mask(0)
            rewritten[node.outputs[0]] = floored
            continue
        slot = _DRAW_OPERAND.get(node.op_type)
        if slot is None or len(node.inputs) != 2 or not _uniform_draw(node.inputs[slot], producers):
            continue
        users = readers.get(node.outputs[0], [])
        if not users or not all(_casts_to_float(user) for user in users):
            continue
        node.fn = _expected_mask(slot)
        rewritten[node.outputs[0]] = (node.inputs[slot], node.inputs[1 - slot])
    return rewritten


def _floored_draw(node: Node, producers: dict[str, Node]) -> tuple[str, str] | None:
    """(u, keep) of a `Floor(Add(u, keep))` on a uniform draw u in [0, 1): Hugging Face's
    drop path (`keep + torch.rand(shape)).floor_()`), a Bernoulli(keep) sample."""
    if node.op_type != "Floor" or len(node.inputs) != 1:
        return None
    add = producers.get(node.inputs[0])
    if add is None or add.op_type != "Add" or len(add.inputs) != 2:
        return None
    for slot, name in enumerate(add.inputs):
        if _uniform_draw(name, producers):
            return name, add.inputs[1 - slot]
    return None


def _uniform_draw(name: str, producers: dict[str, Node]) -> bool:
    producer = producers.get(name)
    return (
        producer is not None
        and producer.op_type in _UNIFORM
        and float(producer.attrs.get("low", 0.0)) == 0.0
        and float(producer.attrs.get("high", 1.0)) == 1.0
    )


def _casts_to_float(node: Node) -> bool:
    """A Cast to a float type, or a CastLike (the unoptimised dynamo export's: like the
    masked activation, a float; a mask cast to an integer would be no mask)."""
    if node.op_type == "CastLike":
        return True
    target = node.attrs.get("to")
    return (
        node.op_type == "Cast" and target is not None and torch_dtype(int(target)).is_floating_point
    )


def _expected_mask(draw_slot: int) -> NodeFn:
    """The mask's expected value: its threshold p (clamped to [0, 1]) in the draw's shape."""

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        draw, threshold = (a, b) if draw_slot == 0 else (b, a)
        p = threshold.to(draw.dtype).clamp(0.0, 1.0)
        return p.expand(torch.broadcast_shapes(draw.shape, p.shape)).clone()

    return fn
