"""Conv, ConvTranspose and pooling (Max/Average/Lp, Global*), 1-D to 3-D; DeformConv, 2-D."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from service.engine.graph import NodeFn
from service.engine.onnx.ops._util import require
from service.engine.onnx.registry import OpContext, register

AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _auto_pad(ctx: OpContext) -> str:
    auto_pad = str(ctx.attr("auto_pad", "NOTSET"))
    require(auto_pad in AUTO_PADS, f"auto_pad='{auto_pad}' is not one of {', '.join(AUTO_PADS)}")
    return auto_pad


def _same_pads(
    spatial: list[int], kernel: list[int], strides: list[int], dilations: list[int], upper: bool
) -> list[int]:
    """ONNX pads [begin..., end...] that keep ceil(in/stride) outputs."""
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if upper else large)
        ends.append(large if upper else small)
    return begins + ends


class _Window:
    """The window attributes shared by Conv and the pools, resolved per input shape."""

    def __init__(self, ctx: OpContext, kernel: list[int] | None) -> None:
        self.auto_pad = _auto_pad(ctx)
        self.kernel = kernel
        self.strides: list[int] | None = ctx.attr("strides")
        self.dilations: list[int] | None = ctx.attr("dilations")
        self.pads: list[int] | None = ctx.attr("pads")

    def resolve(self, x: torch.Tensor, kernel: list[int]) -> tuple[list[int], list[int], list[int]]:
        n = len(kernel)
        strides = list(self.strides or [1] * n)
        dilations = list(self.dilations or [1] * n)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = _same_pads(
                list(x.shape[2:]), kernel, strides, dilations, self.auto_pad == "SAME_UPPER"
            )
        elif self.auto_pad == "VALID":
            pads = [0] * (2 * n)
        else:
            pads = list(self.pads or [0] * (2 * n))
        return strides, dilations, pads


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX [b1, b2, ..., e1, e2, ...] → F.pad's [bn, en, ..., b1, e1]."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


def _symmetric(pads: list[int]) -> list[int] | None:
    n = len(pads) // 2
    return pads[:n] if pads[:n] == pads[n:] else None


@register("Conv")
def conv(ctx: OpContext) -> NodeFn:
    window = _Window(ctx, ctx.attr("kernel_shape"))
    groups = int(ctx.attr("group", 1))
    static = window.auto_pad in ("NOTSET", "VALID")

    def fn(x: torch.Tensor, w: torch.Tensor, b: Any = None) -> torch.Tensor:
        kernel = list(w.shape[2:])
        require_rank(x, len(kernel))
        strides, dilations, pads = window.resolve(x, kernel)
        sym = _symmetric(pads)
        if sym is None:
            x = F.pad(x, _torch_pad(pads))
            sym = [0] * len(kernel)
        return _CONV[len(kernel)](x, w, b, strides, sym, dilations, groups)

    if static and window.kernel is not None:
        require(1 <= len(window.kernel) <= 3, f"{len(window.kernel)}-D convolution")
    return fn


def require_rank(x: torch.Tensor, spatial: int) -> None:
    if x.dim() != spatial + 2 or spatial not in _CONV:
        raise ValueError(f"Conv expects a {spatial + 2}-D input, got shape {list(x.shape)}")


@register("DeformConv", since=19)  # opset 22 only widens the types
def deform_conv(ctx: OpContext) -> NodeFn:
    """Deformable convolution (torchvision's deform_conv2d, as the ONNX reference computes it):
    every kernel tap samples X bilinearly at its shifted position, zeros outside the input,
    scaled by the mask; then one matmul per group with the weight. Differentiable w.r.t. X, W,
    offset, B and mask.

    The schema says N-D, but the ONNX reference (and onnxruntime) implement 2-D only, so other
    ranks are refused rather than guessed at.
    """
    kernel_attr = ctx.attr("kernel_shape")
    strides = [int(s) for s in ctx.attr("strides", [1, 1])]
    dilations = [int(d) for d in ctx.attr("dilations", [1, 1])]
    pads = [int(p) for p in ctx.attr("pads", [0, 0, 0, 0])]
    groups = int(ctx.attr("group", 1))
    offset_groups = int(ctx.attr("offset_group", 1))
    require(
        (kernel_attr is None or len(kernel_attr) == 2)
        and len(strides) == 2
        and len(dilations) == 2
        and len(pads) == 4,
        "DeformConv is supported in 2-D only (the ONNX reference implements 2-D only)",
    )
    require(min(strides) >= 1 and min(dilations) >= 1, "DeformConv strides/dilations below 1")
    require(groups >= 1 and offset_groups >= 1, "DeformConv group/offset_group below 1")
    kernel_shape = None if kernel_attr is None else [int(k) for k in kernel_attr]

    def fn(
        x: torch.Tensor, w: torch.Tensor, offset: torch.Tensor, b: Any = None, mask: Any = None
    ) -> torch.Tensor:
        if x.dim() != 4 or w.dim() != 4:
            raise ValueError(
                f"DeformConv expects 4-D X and W, got {list(x.shape)} and {list(w.shape)}"
            )
        kernel = [int(k) for k in w.shape[2:]]
        if kernel_shape is not None and kernel_shape != kernel:
            raise ValueError(f"DeformConv kernel_shape {kernel_shape} != W's {kernel}")
        n, c = int(x.shape[0]), int(x.shape[1])
        out_c = int(w.shape[0])
        if c != w.shape[1] * groups or out_c % groups or c % offset_groups:
            raise ValueError(
                f"DeformConv: X {list(x.shape)} and W {list(w.shape)} do not fit "
                f"group={groups}, offset_group={offset_groups}"
            )
        out_hw = _deform_output_size(x, kernel, strides, dilations, pads)
        taps = kernel[0] * kernel[1]
        if list(offset.shape) != [n, offset_groups * 2 * taps, *out_hw]:
            raise ValueError(
                f"DeformConv offset shape {list(offset.shape)}, expected "
                f"{[n, offset_groups * 2 * taps, *out_hw]}"
            )
        if mask is not None and list(mask.shape) != [n, offset_groups * taps, *out_hw]:
            raise ValueError(
                f"DeformConv mask shape {list(mask.shape)}, expected "
                f"{[n, offset_groups * taps, *out_hw]}"
            )
        sampled = _deformed_taps(
            x, offset, mask, kernel, strides, dilations, pads, offset_groups, out_hw
        )
        # [N, offset_group, C/offset_group, taps·P] is channel-major like [N, C, taps, P], so
        # the conv groups are contiguous slices of it.
        columns = sampled.reshape(n, groups, (c // groups) * taps, out_hw[0] * out_hw[1])
        y = torch.matmul(w.reshape(groups, out_c // groups, (c // groups) * taps), columns)
        y = y.reshape(n, out_c, *out_hw)
        return y if b is None else y + b.reshape(1, -1, 1, 1)

    return fn


def _deform_output_size(
    x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int], pads: list[int]
) -> list[int]:
    sizes = []
    for i in range(2):
        span = int(x.shape[2 + i]) + pads[i] + pads[i + 2] - (kernel[i] - 1) * dilations[i] - 1
        if span < 0:
            raise ValueError(f"DeformConv: the kernel overruns the padded input {list(x.shape)}")
        sizes.append(span // strides[i] + 1)
    return sizes


def _deformed_taps(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    kernel: list[int],
    strides: list[int],
    dilations: list[int],
    pads: list[int],
    offset_groups: int,
    out_hw: list[int],
) -> torch.Tensor:
    """X sampled at every kernel tap's deformed position, times the mask:
    [N, offset_group, C/offset_group, taps·oH·oW]."""
    n, c, height, width = (int(s) for s in x.shape)
    taps = kernel[0] * kernel[1]
    # Positions in at least float32 even for half inputs: in bfloat16 a position past 128 has
    # no fraction left, and with it go the sampling weights and their gradient.
    pos_dtype = torch.promote_types(offset.dtype, torch.float32)
    tap = torch.arange(taps, device=x.device)
    # Undeformed position of tap k at output (i, j): top-left of the window plus the tap.
    rows = torch.arange(out_hw[0], device=x.device, dtype=pos_dtype) * strides[0] - pads[0]
    cols = torch.arange(out_hw[1], device=x.device, dtype=pos_dtype) * strides[1] - pads[1]
    base_y = (tap // kernel[1]).to(pos_dtype)[:, None, None] * dilations[0] + rows[:, None]
    base_x = (tap % kernel[1]).to(pos_dtype)[:, None, None] * dilations[1] + cols
    # offset channels are (offset_group, kH, kW, [dy, dx]), as in the reference's reshape
    shifts = offset.to(pos_dtype).reshape(n, offset_groups, taps, 2, *out_hw)
    samples = taps * out_hw[0] * out_hw[1]  # explicit sizes: an empty batch cannot infer -1
    ys = (base_y + shifts[:, :, :, 0]).reshape(n, offset_groups, samples)
    xs = (base_x + shifts[:, :, :, 1]).reshape(n, offset_groups, samples)
    scale = None
    if mask is not None:
        scale = mask.to(pos_dtype).reshape(n, offset_groups, samples)
    planes = x.reshape(n, offset_groups, c // offset_groups, height * width)
    return _bilinear_zeros(planes, ys, xs, height, width, scale)


def _bilinear_zeros(
    planes: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    height: int,
    width: int,
    scale: torch.Tensor | None,
) -> torch.Tensor:
    """planes [N, G, Cg, H·W] sampled bilinearly at (ys, xs) [N, G, L], times `scale`.

    Each of the four corners outside the input reads zero (the reference's GridSample with
    padding_mode='zeros', and torchvision's kernel). Sampling directly in pixel coordinates,
    rather than through F.grid_sample's [-1, 1] grid, keeps positions exact and stays defined
    for a 1-pixel-high or -wide input.
    """
    y0, x0 = ys.floor(), xs.floor()
    fy, fx = ys - y0, xs - x0  # floor has no gradient: these carry d/d(offset)
    iy, ix = y0.long(), x0.long()
    channels = planes.shape[2]
    terms = []
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            cy, cx = iy + dy, ix + dx
            inside = (cy >= 0) & (cy < height) & (cx >= 0) & (cx < width)
            weight = torch.where(inside, wy * wx, 0.0)
            if scale is not None:
                weight = weight * scale
            index = cy.clamp(0, height - 1) * width + cx.clamp(0, width - 1)
            values = planes.gather(3, index[:, :, None].expand(-1, -1, channels, -1))
            terms.append(values * weight.to(planes.dtype)[:, :, None])
    return terms[0] + terms[1] + terms[2] + terms[3]


@register("ConvTranspose")
def conv_transpose(ctx: OpContext) -> NodeFn:
    window = _Window(ctx, ctx.attr("kernel_shape"))
    groups = int(ctx.attr("group", 1))
    output_padding_attr = ctx.attr("output_padding")
    output_shape = ctx.attr("output_shape")

    def fn(x: torch.Tensor, w: torch.Tensor, b: Any = None) -> torch.Tensor:
        kernel = list(w.shape[2:])
        n = len(kernel)
        strides = list(window.strides or [1] * n)
        dilations = list(window.dilations or [1] * n)
        out_pad = list(output_padding_attr or [0] * n)
        spatial = list(x.shape[2:])
        full = [
            s * (i - 1) + (k - 1) * d + 1 + op
            for s, i, k, d, op in zip(strides, spatial, kernel, dilations, out_pad, strict=True)
        ]
        if output_shape is not None or window.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            target = (
                list(output_shape)[-n:]
                if output_shape is not None
                else [i * s for i, s in zip(spatial, strides, strict=True)]
            )
            total = [f - t for f, t in zip(full, target, strict=True)]
            if window.auto_pad == "SAME_UPPER":
                pads = [t // 2 for t in total] + [t - t // 2 for t in total]
            else:
                pads = [t - t // 2 for t in total] + [t // 2 for t in total]
        elif window.auto_pad == "VALID":
            pads = [0] * (2 * n)
        else:
            pads = list(window.pads or [0] * (2 * n))
        sym = _symmetric(pads)
        if (
            sym is not None
            and all(p < max(s, d) for p, s, d in zip(out_pad, strides, dilations, strict=True))
            and min(sym) >= 0
        ):
            return _CONV_T[n](x, w, b, strides, sym, out_pad, groups, dilations)
        y = _CONV_T[n](x, w, None, strides, 0, 0, groups, dilations)
        # Asymmetric (or negative) pads and large output_padding: pad the end, then crop.
        y = F.pad(y, _torch_pad([0] * n + out_pad))
        y = F.pad(y, _torch_pad([-p for p in pads]))  # crops positive pads, extends negative
        if b is not None:
            y = y + b.reshape([1, -1] + [1] * n)
        return y

    return fn


def _pool_kernel(ctx: OpContext) -> list[int]:
    kernel = ctx.attr("kernel_shape")
    require(kernel is not None and 1 <= len(kernel) <= 3, "kernel_shape must have 1 to 3 dims")
    return [int(k) for k in kernel]


def _ceil_pads(
    spatial: list[int],
    kernel: list[int],
    strides: list[int],
    dilations: list[int],
    pads: list[int],
    ceil_mode: bool,
) -> tuple[list[int], list[int] | None]:
    """Extra end padding so that floor-mode pooling yields ONNX's ceil-mode output count, and
    that count (None in floor mode).

    The count rounds up, less a last window that would start in the end padding (ONNX opset
    19 text, the reference, onnxruntime and torch agree). Floor-mode pooling over an end
    padding of at least a window's span has more windows than that (onnxruntime refuses such
    pads, the reference drops one window as here): `_crop` cuts them off.
    """
    n = len(kernel)
    if not ceil_mode:
        return [0] * n, None
    extra, counts = [], []
    for i in range(n):
        span = spatial[i] + pads[i] + pads[i + n] - ((kernel[i] - 1) * dilations[i] + 1)
        out = math.ceil(span / strides[i]) + 1
        if (out - 1) * strides[i] >= spatial[i] + pads[i]:
            out -= 1
        need = (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
        extra.append(max(0, need - (spatial[i] + pads[i] + pads[i + n])))
        counts.append(out)
    return extra, counts


def _crop(y: torch.Tensor, counts: list[int] | None) -> torch.Tensor:
    """`y` [N, C, ...] cut to `counts` windows per spatial axis (`_ceil_pads`)."""
    if counts is None or all(y.shape[2 + i] <= c for i, c in enumerate(counts)):
        return y
    return y[(slice(None), slice(None), *(slice(0, max(c, 0)) for c in counts))]


@register("MaxPool")
def max_pool(ctx: OpContext) -> NodeFn:
    kernel = _pool_kernel(ctx)
    window = _Window(ctx, kernel)
    ceil_mode = bool(ctx.attr("ceil_mode", 0))
    storage_order = int(ctx.attr("storage_order", 0))
    require(storage_order in (0, 1), f"storage_order={storage_order} is neither 0 nor 1")
    want_indices = ctx.num_outputs > 1 and bool(ctx.node.output[1])
    n = len(kernel)

    def fn(x: torch.Tensor) -> Any:
        strides, dilations, pads = window.resolve(x, kernel)
        spatial = list(x.shape[2:])
        extra, counts = _ceil_pads(spatial, kernel, strides, dilations, pads, ceil_mode)
        full = pads[:n] + [p + e for p, e in zip(pads[n:], extra, strict=True)]
        sym = _symmetric(pads) if not any(extra) else None
        if sym is not None and all(p <= k // 2 for p, k in zip(sym, kernel, strict=True)):
            y, idx = _MAX[n](x, kernel, strides, sym, dilations, False, True)
        else:
            low = torch.finfo(x.dtype).min if x.dtype.is_floating_point else -(2**31)
            padded = F.pad(x, _torch_pad(full), value=low)
            y, idx = _MAX[n](padded, kernel, strides, 0, dilations, False, True)
            if want_indices:
                idx = _unpad_indices(idx, list(padded.shape[2:]), spatial, full[:n])
            y, idx = _crop(y, counts), _crop(idx, counts)
        if not want_indices:
            return (y, None)
        if storage_order == 1:
            idx = _column_major(idx, spatial)
        plane = math.prod(spatial)
        offsets = torch.arange(x.shape[0] * x.shape[1], device=x.device) * plane
        return (y, idx + offsets.reshape([x.shape[0], x.shape[1]] + [1] * n))

    if not want_indices:
        return lambda x: fn(x)[0]
    return fn


@register("MaxUnpool", since=9)
def max_unpool(ctx: OpContext) -> NodeFn:
    """MaxPool's partial inverse: X's values written at their indices (MaxPool's second
    output: flat over the whole [N, C, ...] tensor), zeros elsewhere. Differentiable in X."""
    kernel = _pool_kernel(ctx)
    n = len(kernel)
    strides = [int(s) for s in ctx.attr("strides", [1] * n)]
    pads = [int(p) for p in ctx.attr("pads", [0] * 2 * n)]
    require(len(strides) == n and len(pads) == 2 * n, "strides/pads do not match kernel_shape")

    def fn(x: torch.Tensor, indices: torch.Tensor, output_shape: Any = None) -> torch.Tensor:
        # the size MaxPool's input had, unless output_shape says more (zeros after the end)
        inferred = [x.shape[0], x.shape[1]] + [
            (x.shape[d + 2] - 1) * strides[d] - (pads[d] + pads[d + n]) + kernel[d]
            for d in range(n)
        ]
        flat = x.new_zeros(math.prod(inferred))
        index = indices.reshape(-1).to(device=x.device, dtype=torch.int64)
        y = flat.scatter(0, index, x.reshape(-1)).view(inferred)
        if output_shape is None:
            return y
        shape = [int(v) for v in torch.as_tensor(output_shape).reshape(-1).tolist()]
        if len(shape) != len(inferred) or any(s < i for s, i in zip(shape, inferred, strict=True)):
            raise ValueError(
                f"MaxUnpool output_shape {shape} does not hold the unpooled shape {inferred}"
            )
        return F.pad(
            y, _torch_pad([0] * len(shape) + [s - i for s, i in zip(shape, inferred, strict=True)])
        )

    return fn


def _unravel(idx: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """The coordinates of row-major flat positions `idx` in a grid of `sizes`."""
    coords = []
    rest = idx
    for size in reversed(sizes):
        coords.append(rest % size)
        rest = rest // size
    coords.reverse()
    return coords


def _unpad_indices(
    idx: torch.Tensor, padded: list[int], spatial: list[int], begins: list[int]
) -> torch.Tensor:
    flat = torch.zeros_like(idx)
    for c, b, size in zip(_unravel(idx, padded), begins, spatial, strict=True):
        flat = flat * size + (c - b)
    return flat


def _column_major(idx: torch.Tensor, spatial: list[int]) -> torch.Tensor:
    """Row-major flat positions within a plane as column-major ones (storage_order=1): the
    first spatial axis varies fastest, h + w·H (+ d·H·W), as in the reference and
    onnxruntime. The batch and channel offsets stay row-major (added after)."""
    flat = torch.zeros_like(idx)
    for c, size in zip(reversed(_unravel(idx, spatial)), reversed(spatial), strict=True):
        flat = flat * size + c
    return flat


def _window_mean(
    x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int]
) -> torch.Tensor:
    """The mean over every (dilated) window of the already padded `x`, no padding of its own.

    Without dilation torch's avg_pool; with it (torch's avg_pool has none) the windows are
    strided views (`unfold` per spatial axis, every dilation-th tap of each span), reduced
    at once: exact, differentiable (unfold's backward), in x's dtype whatever autocast says.
    """
    n = len(kernel)
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    if any(span > size for span, size in zip(spans, x.shape[2:], strict=True)):
        # no window fits: the ONNX formula's empty result (torch's pools raise; onnxruntime's
        # truncating division can make it one window)
        counts = [
            max(0, (size - span) // s + 1)
            for size, span, s in zip(x.shape[2:], spans, strides, strict=True)
        ]
        return x.new_zeros((*x.shape[:2], *counts))
    if all(d == 1 for d in dilations):
        return _AVG[n](x, kernel, strides, 0, False, True)
    windows = x
    for axis, (k, s, d) in enumerate(zip(kernel, strides, dilations, strict=True)):
        windows = windows.unfold(2 + axis, (k - 1) * d + 1, s)[..., ::d]
    return windows.mean(dim=tuple(range(-n, 0)))


def _pool_dilations(ctx: OpContext, window: _Window, kernel: list[int]) -> list[int]:
    """AveragePool-19's and LpPool-18's `dilations`, checked against the window attributes."""
    n = len(kernel)
    dilations = [int(d) for d in (window.dilations or [1] * n)]
    require(len(dilations) == n, f"dilations {dilations} do not match kernel_shape {kernel}")
    require(min(dilations) >= 1, f"dilations {dilations} below 1")
    # onnxruntime sizes SAME padding for the undilated kernel, the ONNX text (and the
    # reference, differently again) for the dilated one: no single answer to reproduce
    require(
        window.auto_pad not in ("SAME_UPPER", "SAME_LOWER") or max(dilations) == 1,
        f"{ctx.op_type} with auto_pad={window.auto_pad} and dilations {dilations} (onnxruntime "
        "and the ONNX specification pad it differently); re-export with explicit pads",
    )
    return dilations


@register("AveragePool")
def average_pool(ctx: OpContext) -> NodeFn:
    """Average over each window; `count_include_pad` says whether the explicit padding counts
    in the divisor (ceil mode's overhang never does). Dilations (opset 19) as the ONNX
    reference and onnxruntime compute them: every dilation-th cell of the span."""
    kernel = _pool_kernel(ctx)
    window = _Window(ctx, kernel)
    ceil_mode = bool(ctx.attr("ceil_mode", 0))
    include_pad = bool(ctx.attr("count_include_pad", 0))
    dilated = max(_pool_dilations(ctx, window, kernel)) > 1
    n = len(kernel)

    def fn(x: torch.Tensor) -> torch.Tensor:
        strides, dilations, pads = window.resolve(x, kernel)
        spatial = list(x.shape[2:])
        extra, counts = _ceil_pads(spatial, kernel, strides, dilations, pads, ceil_mode)
        sym = _symmetric(pads)
        if (
            not dilated
            and not any(extra)
            and sym is not None
            and all(p <= k // 2 for p, k in zip(sym, kernel, strict=True))
        ):
            return _AVG[n](x, kernel, strides, sym, False, include_pad)
        # General case: sum over the window divided by the count of the cells that ONNX
        # counts (padding included or not; the ceil-mode overhang never counts).
        full = pads[:n] + [p + e for p, e in zip(pads[n:], extra, strict=True)]
        total = _window_mean(F.pad(x, _torch_pad(full)), kernel, strides, dilations)
        ones = torch.ones((1, 1, *spatial), dtype=x.dtype, device=x.device)
        counted = F.pad(ones, _torch_pad(pads), value=1.0 if include_pad else 0.0)
        counted = F.pad(counted, _torch_pad([0] * n + extra))
        count = _window_mean(counted, kernel, strides, dilations)
        return _crop(total / count, counts)

    return fn


@register("LpPool")
def lp_pool(ctx: OpContext) -> NodeFn:
    """(sum of |x|^p over each window)^(1/p), padding adding nothing (onnxruntime's sum; the
    ONNX reference rescales ceil-mode windows that overhang, onnxruntime does not).
    Dilations (opset 18) as in AveragePool."""
    kernel = _pool_kernel(ctx)
    window = _Window(ctx, kernel)
    p = float(ctx.attr("p", 2))
    ceil_mode = bool(ctx.attr("ceil_mode", 0))
    _pool_dilations(ctx, window, kernel)
    n = len(kernel)

    def fn(x: torch.Tensor) -> torch.Tensor:
        strides, dilations, pads = window.resolve(x, kernel)
        spatial = list(x.shape[2:])
        extra, counts = _ceil_pads(spatial, kernel, strides, dilations, pads, ceil_mode)
        full = pads[:n] + [q + e for q, e in zip(pads[n:], extra, strict=True)]
        powered = F.pad(x.abs().pow(p), _torch_pad(full))
        summed = _window_mean(powered, kernel, strides, dilations) * math.prod(kernel)
        return _crop(summed, counts).pow(1.0 / p)

    return fn


def _global(reduce: Callable[[torch.Tensor, list[int]], torch.Tensor]) -> NodeFn:
    return lambda x: reduce(x, list(range(2, x.dim())))


@register("GlobalAveragePool")
def global_average_pool(ctx: OpContext) -> NodeFn:
    return _global(lambda x, dims: x.mean(dim=dims, keepdim=True))


@register("GlobalMaxPool")
def global_max_pool(ctx: OpContext) -> NodeFn:
    return _global(lambda x, dims: x.amax(dim=dims, keepdim=True))


@register("GlobalLpPool")
def global_lp_pool(ctx: OpContext) -> NodeFn:
    p = float(ctx.attr("p", 2))
    return _global(lambda x, dims: x.abs().pow(p).sum(dim=dims, keepdim=True).pow(1.0 / p))
