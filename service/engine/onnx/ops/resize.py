"""Resize (opset 10/11/13/18/19) and Upsample, computed per axis from ONNX's own formulas.

torch's `interpolate` covers only some of ONNX's coordinate modes and rounding rules, so
nearest and (multi)linear are written as gathers with ONNX's source-coordinate formula:
exact for every mode, differentiable, any rank; cubic likewise (Keys' kernel, `cubic_coeff_a`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from service.engine.graph import NodeFn
from service.engine.onnx.ops._util import ints, norm_axes, require
from service.engine.onnx.registry import OpContext, register

COORDINATE_MODES = (
    "half_pixel",
    "half_pixel_symmetric",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "tf_half_pixel_for_nn",
)
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _source_coords(
    out_len: int, in_len: int, scale: float, coord_mode: str, device: torch.device
) -> torch.Tensor:
    x = torch.arange(out_len, dtype=torch.float64, device=device)
    if coord_mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if coord_mode == "half_pixel_symmetric":
        adjustment = out_len / (scale * in_len)
        offset = in_len / 2 * (1 - adjustment)
        return offset + (x + 0.5) / scale - 0.5
    if coord_mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out_len > 1 else torch.zeros_like(x)
    if coord_mode == "align_corners":
        # ONNX's reference divides by the unrounded resized length (in_len * scale).
        resized = in_len * scale
        return x * (in_len - 1) / (resized - 1) if resized > 1 else torch.zeros_like(x)
    if coord_mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    return x / scale  # asymmetric


def _nearest_index(coords: torch.Tensor, mode: str, in_len: int) -> torch.Tensor:
    if mode == "round_prefer_floor":
        index = torch.ceil(coords - 0.5)
    elif mode == "round_prefer_ceil":
        index = torch.floor(coords + 0.5)
    elif mode == "floor":
        index = torch.floor(coords)
    else:
        index = torch.ceil(coords)
    return index.clamp(0, in_len - 1).long()


class _ResizeSpec:
    def __init__(self, ctx: OpContext, *, legacy_mode: bool = False) -> None:
        self.mode = str(ctx.attr("mode", "nearest"))
        require(self.mode in ("nearest", "linear", "cubic"), f"mode '{self.mode}'")
        default_coord = "asymmetric" if legacy_mode else "half_pixel"
        self.coord = str(ctx.attr("coordinate_transformation_mode", default_coord))
        require(
            self.coord in COORDINATE_MODES,
            f"coordinate_transformation_mode '{self.coord}'"
            + (" (crop and resize)" if self.coord == "tf_crop_and_resize" else ""),
        )
        default_nearest = "floor" if legacy_mode else "round_prefer_floor"
        self.nearest = str(ctx.attr("nearest_mode", default_nearest))
        require(self.nearest in NEAREST_MODES, f"nearest_mode '{self.nearest}'")
        require(not ctx.attr("antialias", 0), "antialias=1")
        self.cubic_a = float(ctx.attr("cubic_coeff_a", -0.75))
        self.exclude_outside = bool(ctx.attr("exclude_outside", 0))
        self.axes = ctx.attr("axes")
        self.policy = str(ctx.attr("keep_aspect_ratio_policy", "stretch"))
        require(self.policy in ("stretch", "not_larger", "not_smaller"), f"policy '{self.policy}'")

    def plan(self, x: torch.Tensor, scales: Any, sizes: Any) -> tuple[list[int], list[float]]:
        rank = x.dim()
        axes = norm_axes(self.axes, rank) if self.axes else list(range(rank))
        out = list(x.shape)
        factors = [1.0] * rank
        size_list = ints(sizes)
        if size_list:
            ratios = [size_list[i] / x.shape[a] for i, a in enumerate(axes)]
            if self.policy != "stretch":
                pick = min if self.policy == "not_larger" else max
                ratio = pick(ratios)
                ratios = [ratio] * len(axes)
                size_list = [math.floor(x.shape[a] * ratio + 0.5) for a in axes]
            for i, a in enumerate(axes):
                out[a], factors[a] = size_list[i], ratios[i]
        else:
            scale_list = (
                [float(v) for v in scales.reshape(-1).tolist()]
                if isinstance(scales, torch.Tensor)
                else [float(v) for v in scales]
            )
            for i, a in enumerate(axes):
                factors[a] = scale_list[i]
                out[a] = math.floor(x.shape[a] * scale_list[i])
        return out, factors

    def apply(self, x: torch.Tensor, scales: Any, sizes: Any) -> torch.Tensor:
        out, factors = self.plan(x, scales, sizes)
        for axis in range(x.dim()):
            in_len, out_len = x.shape[axis], out[axis]
            if in_len == out_len and factors[axis] == 1.0:
                continue
            coords = _source_coords(out_len, in_len, factors[axis], self.coord, x.device)
            if self.mode == "nearest":
                x = x.index_select(axis, _nearest_index(coords, self.nearest, in_len))
            elif self.mode == "linear":
                x = _linear_axis(x, axis, coords, in_len)
            else:
                x = _cubic_axis(x, axis, coords, in_len, self.cubic_a, self.exclude_outside)
        return x


def _linear_axis(x: torch.Tensor, axis: int, coords: torch.Tensor, in_len: int) -> torch.Tensor:
    coords = coords.clamp(0, in_len - 1)
    low = coords.floor().long()
    high = (low + 1).clamp(max=in_len - 1)
    weight = (coords - low).to(x.dtype)
    shape = [1] * x.dim()
    shape[axis] = -1
    weight = weight.reshape(shape)
    return x.index_select(axis, low) * (1 - weight) + x.index_select(axis, high) * weight


def _cubic_weights(t: torch.Tensor, a: float) -> list[torch.Tensor]:
    """Keys' cubic convolution weights of the taps at offsets -1, 0, 1, 2."""

    def near(d: torch.Tensor) -> torch.Tensor:  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: torch.Tensor) -> torch.Tensor:  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _cubic_axis(
    x: torch.Tensor,
    axis: int,
    coords: torch.Tensor,
    in_len: int,
    a: float,
    exclude_outside: bool,
) -> torch.Tensor:
    base = coords.floor()
    weights = _cubic_weights(coords - base, a)
    taps = [base.long() + offset for offset in (-1, 0, 1, 2)]
    if exclude_outside:
        weights = [w * ((i >= 0) & (i < in_len)) for w, i in zip(weights, taps, strict=True)]
        total = sum(weights)
        weights = [w / total for w in weights]
    shape = [1] * x.dim()
    shape[axis] = -1
    out: torch.Tensor | None = None
    for w, i in zip(weights, taps, strict=True):
        term = x.index_select(axis, i.clamp(0, in_len - 1)) * w.to(x.dtype).reshape(shape)
        out = term if out is None else out + term
    assert out is not None
    return out


@register("Resize", since=10)
def resize_10(ctx: OpContext) -> NodeFn:
    spec = _ResizeSpec(ctx, legacy_mode=True)
    return lambda x, scales: spec.apply(x, scales, None)


@register("Resize", since=11)
def resize_11(ctx: OpContext) -> NodeFn:
    spec = _ResizeSpec(ctx)

    def fn(x: torch.Tensor, roi: Any = None, scales: Any = None, sizes: Any = None) -> Any:
        if sizes is not None and sizes.numel() == 0:
            sizes = None
        return spec.apply(x, scales, sizes)

    return fn


@register("Upsample", since=7)
def upsample_7(ctx: OpContext) -> NodeFn:
    spec = _ResizeSpec(ctx, legacy_mode=True)
    scales = ctx.attr("scales")
    return lambda x: spec.apply(x, scales, None)


@register("Upsample", since=9)
def upsample_9(ctx: OpContext) -> NodeFn:
    spec = _ResizeSpec(ctx, legacy_mode=True)
    return lambda x, scales: spec.apply(x, scales, None)


_GRID_MODES = {
    "bilinear": "bilinear",
    "linear": "bilinear",
    "nearest": "nearest",
    "bicubic": "bicubic",
    "cubic": "bicubic",
}


@register("GridSample", since=16)
def grid_sample(ctx: OpContext) -> NodeFn:
    mode = str(ctx.attr("mode", "bilinear" if ctx.opset < 20 else "linear"))
    require(mode in _GRID_MODES, f"mode '{mode}'")
    padding = str(ctx.attr("padding_mode", "zeros"))
    require(padding in ("zeros", "border", "reflection"), f"padding_mode '{padding}'")
    align = bool(ctx.attr("align_corners", 0))
    torch_mode = _GRID_MODES[mode]

    def fn(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        if torch_mode == "bicubic" and x.dim() != 4:
            raise ValueError("cubic GridSample is supported on 4-D inputs only")
        return F.grid_sample(x, grid, torch_mode, padding, align)

    return fn


@register("AffineGrid", since=20)
def affine_grid(ctx: OpContext) -> NodeFn:
    align = bool(ctx.attr("align_corners", 0))
    return lambda theta, size: F.affine_grid(theta, ints(size), align_corners=align)
