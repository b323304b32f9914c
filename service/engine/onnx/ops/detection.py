"""Detection post-processing and set ops: NonMaxSuppression, RoiAlign, Unique.

Each follows the ONNX reference implementation (onnx/reference/ops) and onnxruntime's CPU
kernel, including the details where they differ from torchvision: NonMaxSuppression's output
order (batch, class, then selection order), RoiAlign's max mode (the max of the four *weighted*
corner values per sample, not of the interpolated values) and its clipping of samples outside
the feature map, Unique's first-occurrence order when `sorted=0`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from service.engine.graph import NodeFn
from service.engine.onnx.ops._util import norm_axis, on_device, require, scalar
from service.engine.onnx.registry import OpContext, register

# ---------------------------------------------------------------------------------------------
# NonMaxSuppression

# Candidates per block of the pairwise IoU test: bounds its memory to BLOCK x candidates.
NMS_BLOCK = 256


def _box_edges(boxes: torch.Tensor, center_point_box: bool) -> torch.Tensor:
    """[..., 4] boxes as [..., 4] edges (x_min, y_min, x_max, y_max), as the reference reads
    them: corners in either diagonal order ([y1, x1, y2, x2]) or [x_c, y_c, w, h]."""
    if center_point_box:
        xc, yc, width, height = boxes.unbind(-1)
        half_w, half_h = width / 2, height / 2
        return torch.stack([xc - half_w, yc - half_h, xc + half_w, yc + half_h], -1)
    y1, x1, y2, x2 = boxes.unbind(-1)
    return torch.stack(
        [
            torch.minimum(x1, x2),
            torch.minimum(y1, y2),
            torch.maximum(x1, x2),
            torch.maximum(y1, y2),
        ],
        -1,
    )


def _suppresses(rows: torch.Tensor, cols: torch.Tensor, iou_threshold: torch.Tensor) -> Any:
    """[len(rows), len(cols)] numpy bool: does box `rows[i]` suppress box `cols[j]`?

    The reference's `suppress_by_iou`, element for element: no overlap (an empty or
    degenerate intersection, a non-positive area or union) never suppresses; otherwise
    IoU > threshold, strictly. Same float ops in the same order, so ties agree."""
    a, b = rows[:, None, :], cols[None, :, :]
    inter_w = torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])
    inter_h = torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])
    inter = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    overlap = (inter_w > 0) & (inter_h > 0) & (inter > 0) & (area_a > 0) & (area_b > 0)
    over = overlap & (union > 0) & (inter / union > iou_threshold)
    return over.cpu().numpy()


def _greedy(edges: torch.Tensor, iou_threshold: torch.Tensor, limit: int) -> list[int]:
    """Positions (into `edges`, sorted by descending score) that greedy NMS keeps.

    A candidate is kept unless a kept one suppresses it; `suppressed` is the union of the
    kept candidates' rows. Rows are computed a block of candidates at a time (all pairs in
    one go would be candidates² memory, 25k YOLO anchors → 625M entries)."""
    count = edges.shape[0]
    suppressed = np.zeros(count, dtype=bool)
    kept: list[int] = []
    for start in range(0, count, NMS_BLOCK):
        stop = min(start + NMS_BLOCK, count)
        if suppressed[start:stop].all():
            continue
        over = _suppresses(edges[start:stop], edges[start:], iou_threshold)
        for position in range(start, stop):
            if suppressed[position]:
                continue
            kept.append(position)
            if len(kept) >= limit:
                return kept
            suppressed[start:] |= over[position - start]
    return kept


def _optional_scalar(value: Any) -> Any:
    """An optional scalar input: None when left out (empty name or empty tensor)."""
    if value is None or (isinstance(value, torch.Tensor) and value.numel() == 0):
        return None
    return scalar(value)


def _non_max_suppression(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    max_output: Any,
    iou_threshold: Any,
    score_threshold: Any,
    center_point_box: bool,
) -> torch.Tensor:
    limit = max(int(_optional_scalar(max_output) or 0), 0)  # left out: select nothing
    iou = _optional_scalar(iou_threshold) or 0.0
    iou = torch.tensor(iou, dtype=boxes.dtype, device=boxes.device)  # compared in box precision
    floor = _optional_scalar(score_threshold)
    edges = _box_edges(boxes.detach(), center_point_box)
    scores = scores.detach()
    selected: list[tuple[int, int, int]] = []
    for batch in range(boxes.shape[0] if limit else 0):
        for cls in range(scores.shape[1]):
            class_scores = scores[batch, cls]
            if floor is None:
                candidates = torch.arange(class_scores.shape[0], device=boxes.device)
            else:  # strictly above the threshold, as the reference
                candidates = torch.nonzero(class_scores > floor).reshape(-1)
            # Descending score, ties by ascending box index (the reference's BoxInfo order).
            order = torch.sort(class_scores[candidates], descending=True, stable=True).indices
            ranked = candidates[order]
            kept = _greedy(edges[batch, ranked], iou, limit)
            boxes_kept = ranked[torch.tensor(kept, dtype=torch.int64, device=boxes.device)]
            selected += [(batch, cls, int(box)) for box in boxes_kept.tolist()]
    out = torch.tensor(selected, dtype=torch.int64, device=boxes.device)
    return out.reshape(len(selected), 3)


@register("NonMaxSuppression", since=10)
def non_max_suppression(ctx: OpContext) -> NodeFn:
    """Indices, not values: no gradient. The selection loops on the host per (batch, class),
    as the reference does; the IoU tests are vectorised per block of candidates."""
    center = int(ctx.attr("center_point_box", 0))
    require(center in (0, 1), f"center_point_box={center} is not 0 or 1")

    def fn(
        boxes: torch.Tensor,
        scores: torch.Tensor,
        max_output: Any = None,
        iou_threshold: Any = None,
        score_threshold: Any = None,
    ) -> torch.Tensor:
        return _non_max_suppression(
            boxes, scores, max_output, iou_threshold, score_threshold, bool(center)
        )

    return fn


# ---------------------------------------------------------------------------------------------
# RoiAlign

ROI_MODES = ("avg", "max")
ROI_COORDINATE_MODES = ("half_pixel", "output_half_pixel")

# Most (tap, channel) values one gather holds (max mode, or avg in float16/bfloat16): bounds
# RoiAlign's memory whatever the ROIs.
ROI_CHUNK = 1 << 24

# One axis's bilinear taps per (ROI, output cell, sample): lower/upper pixel and their weights.
Taps = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _axis_taps(start: torch.Tensor, length: torch.Tensor, cells: int, grid: int, size: int) -> Taps:
    """The reference's `pre_calc_for_bilinear_interpolate` along one axis, for ROIs that share
    a `grid` of samples per cell: each [ROIs, cells, grid]. A sample beyond [-1, size] gets
    zero weights (at pixel 0, as the reference); one in [-1, 0) is read at 0; one past the
    last pixel at the last pixel."""
    dtype = start.dtype
    bin_size = (length / cells)[:, None, None]
    cell = torch.arange(cells, dtype=dtype, device=start.device)[None, :, None]
    step = (torch.arange(grid, dtype=dtype, device=start.device) + 0.5)[None, None, :]
    # Same association as the reference: start + cell*bin + ((i + 0.5)*bin) / grid.
    coord = start[:, None, None] + cell * bin_size + step * bin_size / grid
    inside = (coord >= -1.0) & (coord <= size)
    coord = torch.where(inside, coord.clamp(min=0), 0.0)  # (NaN/inf out before the cast)
    low = coord.to(torch.int64)  # truncation = floor for coord >= 0
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, 0.0, coord - low.to(dtype))
    zero = torch.zeros((), dtype=dtype, device=start.device)
    w_low = torch.where(inside, 1.0 - frac, zero)
    w_high = torch.where(inside, frac, zero)
    return torch.where(inside, low, 0), torch.where(inside, high, 0), w_low, w_high


def _group_taps(
    group: torch.Tensor, rows: torch.Tensor, ys: Taps, xs: Taps, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output slot, pixel row, weight) of every bilinear tap of a group of ROIs with the same
    grid: four corners per sample, [ROIs, out_h, out_w, grid_h, grid_w, 4] flattened. The
    reference's w1..w4 = (hy*hx, hy*lx, ly*hx, ly*lx) at (low,low), (low,high), ..."""
    y_low, y_high, wy_low, wy_high = ys  # [G, out_h, grid_h]
    x_low, x_high, wx_low, wx_high = xs  # [G, out_w, grid_w]
    out_h, out_w = y_low.shape[1], x_low.shape[1]
    y_index = torch.stack([y_low, y_low, y_high, y_high], -1)[:, :, None, :, None, :]
    x_index = torch.stack([x_low, x_high, x_low, x_high], -1)[:, None, :, None, :, :]
    wy = torch.stack([wy_low, wy_low, wy_high, wy_high], -1)[:, :, None, :, None, :]
    wx = torch.stack([wx_low, wx_high, wx_low, wx_high], -1)[:, None, :, None, :, :]
    row = rows[group][:, None, None, None, None, None] + y_index * width + x_index
    cells = torch.arange(out_h * out_w, device=group.device).reshape(1, out_h, out_w, 1, 1, 1)
    slot = group[:, None, None, None, None, None] * (out_h * out_w) + cells
    weight = wy * wx
    return slot.expand_as(row).reshape(-1), row.reshape(-1), weight.reshape(-1)


def _reduce_taps(
    flat: torch.Tensor,
    slots: int,
    slot: torch.Tensor,
    row: torch.Tensor,
    weight: torch.Tensor,
    mode: str,
) -> torch.Tensor:
    """[slots, C]: per output slot, the sum (avg) or max of its taps' weighted pixel values
    from `flat` ([N*H*W, C]). A slot without taps is 0."""
    channels = flat.shape[1]
    weight = weight.to(flat.dtype)
    if mode == "avg" and flat.dtype in (torch.float32, torch.float64):
        # A sparse [slots, N*H*W] matrix product: taps sharing a pixel merge (adaptive grids
        # sample each pixel ~4 times) and no [taps, C] intermediate is held, either way.
        matrix = torch.sparse_coo_tensor(
            torch.stack([slot, row]), weight, (slots, flat.shape[0]), check_invariants=False
        )
        return torch.sparse.mm(matrix.coalesce(), flat)
    # Otherwise gathered a chunk of taps at a time (max has no such product).
    fill = 0.0 if mode == "avg" else float("-inf")
    out = flat.new_full((slots, channels), fill)
    chunk = max(ROI_CHUNK // max(channels, 1), 1)
    for start in range(0, row.shape[0], chunk):
        part = slice(start, start + chunk)
        values = flat.index_select(0, row[part]) * weight[part, None]
        if mode == "avg":
            out = out.index_add(0, slot[part], values)
        else:  # ONNX's max: the largest weighted corner, over corners and samples
            out = out.scatter_reduce(0, slot[part, None].expand_as(values), values, "amax")
    if mode == "max":
        touched = torch.zeros(slots, dtype=torch.bool, device=flat.device)
        touched[slot] = True
        out = torch.where(touched[:, None], out, 0.0)
    return out


def _roi_align(
    x: torch.Tensor,
    rois: torch.Tensor,
    batch_indices: torch.Tensor,
    out_h: int,
    out_w: int,
    sampling_ratio: int,
    spatial_scale: float,
    half_pixel: bool,
    mode: str,
) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"RoiAlign expects a 4-D input X, got shape {list(x.shape)}")
    n, channels, height, width = x.shape
    # Sample coordinates in float32 at least (the reference computes in X's type; float16
    # would misplace samples on large maps).
    dtype = torch.promote_types(x.dtype, torch.float32)
    # The ROIs are proposals, not learned through: no gradient, as in torchvision.
    boxes = on_device(rois.detach(), x).to(dtype).reshape(-1, 4) * spatial_scale
    if half_pixel:
        boxes = boxes - 0.5
    start_w, start_h, end_w, end_h = boxes.unbind(1)
    roi_w, roi_h = end_w - start_w, end_h - start_h
    if not half_pixel:  # malformed ROIs forced to 1x1 (the reference's legacy mode)
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_h = torch.full_like(roi_h, sampling_ratio, dtype=torch.int64)
        grid_w = grid_h
    else:  # adaptive: ceil(roi / cells) samples per cell and axis, per ROI
        if not bool(torch.isfinite(boxes).all()):
            raise ValueError("RoiAlign: non-finite ROI coordinates with sampling_ratio=0")
        grid_h = torch.ceil(roi_h / out_h).to(torch.int64)
        grid_w = torch.ceil(roi_w / out_w).to(torch.int64)
    batch = on_device(batch_indices, x).to(torch.int64).reshape(-1)
    if bool(((batch < 0) | (batch >= n)).any()):  # (the gathers below do not check)
        raise ValueError(f"RoiAlign: a batch index is outside [0, {n})")
    rows = batch * (height * width)
    # Taps built per group of ROIs sharing a sample grid (few: one unless adaptive). An
    # inverted half-pixel ROI has a grid <= 0 (no samples): its output stays 0.
    none = torch.zeros(0, dtype=torch.int64, device=x.device)
    taps = [(none, none, torch.zeros(0, dtype=dtype, device=x.device))]
    for gh, gw in torch.unique(torch.stack([grid_h, grid_w], 1), dim=0).tolist():
        if gh > 0 and gw > 0:
            group = torch.nonzero((grid_h == gh) & (grid_w == gw)).reshape(-1)
            ys = _axis_taps(start_h[group], roi_h[group], out_h, gh, height)
            xs = _axis_taps(start_w[group], roi_w[group], out_w, gw, width)
            taps.append(_group_taps(group, rows, ys, xs, width))
    slot, row, weight = (torch.cat(parts) for parts in zip(*taps, strict=True))
    flat = x.permute(0, 2, 3, 1).reshape(n * height * width, channels)
    slots = rois.shape[0] * out_h * out_w
    pooled = _reduce_taps(flat, slots, slot, row, weight, mode)
    if mode == "avg":  # the reference divides each bin's sum by its ROI's grid_h * grid_w
        count = (grid_h * grid_w).clamp(min=1).to(x.dtype)
        pooled = pooled / count.repeat_interleave(out_h * out_w)[:, None]
    return pooled.reshape(-1, out_h, out_w, channels).permute(0, 3, 1, 2)


def _roi_align_builder(ctx: OpContext, half_pixel: bool) -> NodeFn:
    mode = str(ctx.attr("mode", "avg")).lower()
    require(mode in ROI_MODES, f"mode='{mode}' is not avg or max")
    out_h, out_w = int(ctx.attr("output_height", 1)), int(ctx.attr("output_width", 1))
    require(out_h >= 1 and out_w >= 1, f"output size {out_h}x{out_w} is not positive")
    sampling_ratio = int(ctx.attr("sampling_ratio", 0))
    require(sampling_ratio >= 0, f"sampling_ratio={sampling_ratio} is negative")
    spatial_scale = float(ctx.attr("spatial_scale", 1.0))

    def fn(x: torch.Tensor, rois: torch.Tensor, batch_indices: torch.Tensor) -> torch.Tensor:
        return _roi_align(
            x, rois, batch_indices, out_h, out_w, sampling_ratio, spatial_scale, half_pixel, mode
        )

    return fn


@register("RoiAlign", since=10)
def roi_align_10(ctx: OpContext) -> NodeFn:
    # Before opset 16 there is no coordinate_transformation_mode: ROIs are read without the
    # half-pixel shift (what opset 16 calls output_half_pixel; onnxruntime agrees).
    return _roi_align_builder(ctx, half_pixel=False)


@register("RoiAlign", since=16)
def roi_align_16(ctx: OpContext) -> NodeFn:
    coordinates = str(ctx.attr("coordinate_transformation_mode", "half_pixel"))
    require(
        coordinates in ROI_COORDINATE_MODES,
        f"coordinate_transformation_mode='{coordinates}' is not half_pixel or output_half_pixel",
    )
    return _roi_align_builder(ctx, half_pixel=coordinates == "half_pixel")


# ---------------------------------------------------------------------------------------------
# Unique

UniqueParts = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _unique(x: torch.Tensor, axis: int | None, sort: bool) -> UniqueParts:
    """(Y, indices, inverse_indices, counts) as ONNX defines them.

    torch.unique sorts (rows lexicographically with an axis, as numpy); the first occurrence
    of each value is the smallest position mapped to it. Y is gathered from X at those
    positions, so it is differentiable w.r.t. X where X is a float tensor."""
    if axis is None:
        source, a = x.reshape(-1), 0
        keys = source
    else:
        source, a = x, norm_axis(axis, x.dim())
        rest = math.prod(x.shape[:a] + x.shape[a + 1 :])
        keys = x.movedim(a, 0).reshape(x.shape[a], rest)  # one row per slice along the axis
        if rest == 0:  # empty slices, all equal (torch.unique refuses them; numpy has one)
            keys = torch.zeros(x.shape[a], 1, device=x.device)
    with torch.no_grad():
        if axis is None:
            _, inverse, counts = torch.unique(
                keys, sorted=True, return_inverse=True, return_counts=True
            )
        else:
            _, inverse, counts = torch.unique(
                keys, dim=0, sorted=True, return_inverse=True, return_counts=True
            )
        length = keys.shape[0]
        positions = torch.arange(length, device=x.device)
        first = torch.full((counts.shape[0],), length, dtype=torch.int64, device=x.device)
        first = first.scatter_reduce(0, inverse.reshape(-1), positions, "amin")
        inverse = inverse.reshape(-1)
        if not sort:  # in order of first occurrence, as ONNX's sorted=0 asks
            order = torch.argsort(first)
            first, counts = first[order], counts[order]
            inverse = torch.argsort(order)[inverse]
    return source.index_select(a, first), first, inverse, counts


@register("Unique", since=11)
def unique(ctx: OpContext) -> NodeFn:
    axis = ctx.attr("axis")
    sort = bool(int(ctx.attr("sorted", 1)))
    outputs = ctx.num_outputs

    def fn(x: torch.Tensor) -> Any:
        parts = _unique(x, None if axis is None else int(axis), sort)
        return parts[0] if outputs == 1 else parts[:outputs]

    return fn
