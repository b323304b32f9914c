"""Col2Im (opset 18): sliding blocks summed back into an image, N-D (Im2Col's adjoint).

Input [N, C·∏block_shape, L] holds, per channel, every block's cells (block cells major,
channel-major as in torch's `unfold`), for the L = ∏ blocks-per-axis block positions;
`image_shape` and `block_shape` are inputs (usually constants: read once, `LastTensorMemo`).
Where blocks overlap their cells add up; cells that land in the padding are dropped.

2-D runs torch's `F.fold`; other ranks (the ONNX reference implements any, the backend tests
have a 3-D image) add every cell into the flat padded image with one `index_add`, which is
differentiable w.r.t. the input (its backward is a gather). Either way padding is cropped off
afterwards, so asymmetric pads need nothing special.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from service.engine.graph import NodeFn
from service.engine.onnx.ops._util import LastTensorMemo, ints, require
from service.engine.onnx.registry import OpContext, register


def _attr_ints(ctx: OpContext, name: str) -> list[int] | None:
    value = ctx.attr(name)
    return None if value is None else [int(v) for v in value]


@register("Col2Im", since=18)
def col2im(ctx: OpContext) -> NodeFn:
    dilations_attr = _attr_ints(ctx, "dilations")
    pads_attr = _attr_ints(ctx, "pads")
    strides_attr = _attr_ints(ctx, "strides")
    ranks = {len(v) for v in (dilations_attr, strides_attr) if v is not None}
    if pads_attr is not None:
        require(len(pads_attr) % 2 == 0, f"Col2Im pads {pads_attr} are not begin/end pairs")
        ranks.add(len(pads_attr) // 2)
    require(
        len(ranks) <= 1,
        f"Col2Im dilations {dilations_attr}, pads {pads_attr} and strides {strides_attr} "
        "disagree on the number of spatial axes",
    )
    require(min(dilations_attr or [1]) >= 1, f"Col2Im dilations {dilations_attr} below 1")
    require(min(strides_attr or [1]) >= 1, f"Col2Im strides {strides_attr} below 1")
    require(min(pads_attr or [0]) >= 0, f"Col2Im negative pads {pads_attr}")
    image_ints = LastTensorMemo(ints)  # mostly constants: read back once, not per call
    block_ints = LastTensorMemo(ints)

    def fn(x: torch.Tensor, image_shape: Any, block_shape: Any) -> torch.Tensor:
        image, block = image_ints(image_shape), block_ints(block_shape)
        n = len(image)
        dilations = dilations_attr or [1] * n
        strides = strides_attr or [1] * n
        pads = pads_attr or [0] * (2 * n)
        if len(block) != n or len(dilations) != n or len(strides) != n or len(pads) != 2 * n:
            raise ValueError(
                f"Col2Im image_shape {image} does not match block_shape {block}, dilations "
                f"{dilations}, pads {pads} or strides {strides}"
            )
        if x.dim() != 3:
            raise ValueError(
                f"Col2Im expects a 3-D input [N, C·∏block_shape, L], got {list(x.shape)}"
            )
        cells = math.prod(block)
        batch, rows, length = (int(s) for s in x.shape)
        padded = [image[i] + pads[i] + pads[i + n] for i in range(n)]
        counts = [
            (padded[i] - dilations[i] * (block[i] - 1) - 1) // strides[i] + 1 for i in range(n)
        ]
        if cells == 0 or rows % cells or min(counts, default=1) < 1 or math.prod(counts) != length:
            raise ValueError(
                f"Col2Im input {list(x.shape)} does not hold blocks {block} of a "
                f"{image} image (pads {pads}, strides {strides}, dilations {dilations}): "
                f"expected [N, C·{cells}, {math.prod(counts)}]"
            )
        if n == 2:
            y = F.fold(
                x, tuple(padded), tuple(block), dilation=tuple(dilations), stride=tuple(strides)
            )
        else:
            index = _flat_cells(block, counts, padded, strides, dilations, x.device)
            columns = x.reshape(batch, rows // cells, cells * length)
            y = x.new_zeros((batch, rows // cells, math.prod(padded)))
            y = y.index_add(2, index, columns).reshape(batch, rows // cells, *padded)
        if not any(pads):
            return y
        crop = (slice(p, p + s) for p, s in zip(pads[:n], image, strict=True))
        return y[(slice(None), slice(None), *crop)]

    return fn


def _flat_cells(
    block: list[int],
    counts: list[int],
    padded: list[int],
    strides: list[int],
    dilations: list[int],
    device: torch.device,
) -> torch.Tensor:
    """Position in the flat padded image of every (block cell, block position) pair, cells
    major: the order of the input's rows within a channel times its columns."""
    n = len(block)
    flat = torch.zeros([1] * (2 * n), dtype=torch.int64, device=device)
    for i in range(n):
        shape = [1] * (2 * n)
        shape[i] = block[i]
        cell = torch.arange(block[i], device=device).reshape(shape) * dilations[i]
        shape = [1] * (2 * n)
        shape[n + i] = counts[i]
        start = torch.arange(counts[i], device=device).reshape(shape) * strides[i]
        flat = flat + (cell + start) * math.prod(padded[i + 1 :])
    return flat.reshape(-1)
