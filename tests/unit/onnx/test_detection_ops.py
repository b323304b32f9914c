"""NonMaxSuppression, RoiAlign and Unique: one-node models against onnxruntime on random inputs
beyond the ONNX backend cases, and gradcheck through RoiAlign (w.r.t. X) and Unique's Y."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from service.engine.onnx.convert import convert
from service.errors import UnsupportedModelError

F, D, I64 = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64
_NP_TYPES = {np.dtype(np.float32): F, np.dtype(np.float64): D, np.dtype(np.int64): I64}


def _model(
    op: str,
    inputs: Mapping[str, np.ndarray | None],
    outputs: Mapping[str, int],
    opset: int,
    consts: dict[str, np.ndarray] | None = None,
    **attrs: Any,
) -> onnx.ModelProto:
    """One `op` node: graph inputs `inputs` (None = an omitted optional input), then `consts`
    as initializers after them."""
    consts = consts or {}
    names = [name if value is not None else "" for name, value in inputs.items()]
    node = helper.make_node(op, names + list(consts), list(outputs), **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(name, _NP_TYPES[value.dtype], list(value.shape))
            for name, value in inputs.items()
            if value is not None
        ],
        [helper.make_tensor_value_info(name, elem, None) for name, elem in outputs.items()],
        [numpy_helper.from_array(value, name) for name, value in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _compare(model: onnx.ModelProto, feeds: dict[str, np.ndarray], atol: float = 0.0) -> None:
    """The converted graph's outputs equal onnxruntime's: exactly for integer outputs."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # RoiAlign max mode warns about an old ORT fix
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    want = session.run(None, feeds)
    graph = convert(model, mode="eval")
    with torch.no_grad():
        got = graph.run([torch.from_numpy(v) for v in feeds.values()])
    got = list(got) if isinstance(got, list | tuple) else [got]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        g_np = g.numpy()
        assert g_np.dtype == w.dtype and g_np.shape == w.shape, (g_np, w)
        if w.dtype.kind == "f":
            np.testing.assert_allclose(g_np, w, rtol=1e-5, atol=atol)
        else:
            np.testing.assert_array_equal(g_np, w)


# --- NonMaxSuppression ------------------------------------------------------------------------


def _nms_inputs(
    batches: int, classes: int, boxes: int, center: bool, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lo = rng.uniform(0, 10, (batches, boxes, 2))
    size = rng.uniform(0.5, 4, (batches, boxes, 2))
    if center:
        data = np.concatenate([lo + size / 2, size], -1)  # [x_c, y_c, w, h]
    else:
        corners = np.concatenate([lo, lo + size], -1)  # [y1, x1, y2, x2]
        flip = rng.random((batches, boxes)) < 0.5  # either diagonal pair
        data = np.where(flip[..., None], corners[..., [2, 3, 0, 1]], corners)
    # Scores on a coarse grid: ties, broken by box index in ONNX's order.
    scores = np.round(rng.random((batches, classes, boxes)) * 8) / 8
    return data.astype(np.float32), scores.astype(np.float32)


@pytest.mark.parametrize(
    ("center", "max_out", "iou", "score"),
    [
        (0, 100, 0.5, None),
        (0, 3, 0.3, 0.4),
        (1, 100, 0.2, 0.25),
        (1, 5, 0.7, None),
        (0, 1000, 0.0, 0.5),
        (0, 0, 0.5, None),
        (0, -2, 0.5, 0.1),
    ],
)
def test_non_max_suppression_matches_onnxruntime(
    center: int, max_out: int, iou: float, score: float | None
) -> None:
    boxes, scores = _nms_inputs(3, 4, 30, bool(center), seed=max_out + int(100 * iou))
    inputs = {"boxes": boxes, "scores": scores, "max_output": np.array([max_out], np.int64)}
    inputs["iou"] = np.array([iou], np.float32)
    if score is not None:  # else the trailing optional input is left out
        inputs["score"] = np.array([score], np.float32)
    model = _model("NonMaxSuppression", inputs, {"y": I64}, 11, center_point_box=center)
    _compare(model, inputs)


@pytest.mark.parametrize("iou", [0.1, 0.6])
def test_non_max_suppression_over_several_blocks_of_candidates(iou: float) -> None:
    # More candidates than one block of the IoU test (NMS_BLOCK = 256), many suppressed.
    boxes, scores = _nms_inputs(1, 2, 700, False, seed=11)
    inputs = {"boxes": boxes * 3, "scores": scores, "max_output": np.array([500], np.int64)}
    inputs["iou"] = np.array([iou], np.float32)
    _compare(_model("NonMaxSuppression", inputs, {"y": I64}, 11), inputs)


def test_non_max_suppression_optional_inputs_left_out_and_opset_10() -> None:
    boxes, scores = _nms_inputs(2, 2, 12, False, seed=7)
    only_max = {"boxes": boxes, "scores": scores, "max_output": np.array([4], np.int64)}
    _compare(_model("NonMaxSuppression", only_max, {"y": I64}, 10), only_max)
    # No max_output_boxes_per_class: nothing is selected ([0, 3]).
    bare = {"boxes": boxes, "scores": scores}
    _compare(_model("NonMaxSuppression", bare, {"y": I64}, 11), bare)
    # A score threshold with the iou threshold left out (0: any overlap suppresses).
    inputs = {"boxes": boxes, "scores": scores, "m": np.array([10], np.int64), "i": None}
    inputs["s"] = np.array([0.3], np.float32)
    feeds = {k: v for k, v in inputs.items() if v is not None}
    _compare(_model("NonMaxSuppression", inputs, {"y": I64}, 11), feeds)


def test_non_max_suppression_keeps_an_iou_exactly_at_the_threshold() -> None:
    # IoU([0, 0, 1, 1], [0, 0, 1, 2]) = 1/2 exactly: suppressed only above 0.5.
    boxes = np.array([[[0, 0, 1, 1], [0, 0, 1, 2], [0, 0, 1, 4]]], np.float32)
    scores = np.array([[[0.9, 0.8, 0.7]]], np.float32)
    for iou in (0.5, 0.49):
        feeds: dict[str, np.ndarray] = {"b": boxes, "s": scores}
        feeds["m"], feeds["i"] = np.array([9], np.int64), np.array([iou], np.float32)
        _compare(_model("NonMaxSuppression", feeds, {"y": I64}, 11), feeds)


# --- RoiAlign ---------------------------------------------------------------------------------

ROIS = np.array(
    [
        [0.3, 0.2, 4.5, 5.1],
        [-2.0, -1.0, 3.0, 2.0],  # partly outside the map
        [1.0, 1.0, 21.0, 17.0],  # past the far edges
        [6.0, 5.0, 5.5, 4.0],  # inverted: 1x1 in output_half_pixel, no samples in half_pixel
        [2.2, 3.1, 2.4, 3.3],  # smaller than a pixel
        [0.0, 0.0, 23.0, 19.0],  # the whole map (large adaptive grid)
    ],
    np.float32,
)
BATCH_INDICES = np.array([0, 1, 1, 0, 1, 0], np.int64)


def _roi_x(dtype: Any = np.float32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, 10, 12)).astype(dtype)


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("coordinates", ["half_pixel", "output_half_pixel"])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_matches_onnxruntime(mode: str, coordinates: str, sampling_ratio: int) -> None:
    feeds = {"x": _roi_x(), "rois": ROIS, "batch_indices": BATCH_INDICES}
    model = _model(
        "RoiAlign",
        feeds,
        {"y": F},
        16,
        mode=mode,
        coordinate_transformation_mode=coordinates,
        output_height=3,
        output_width=4,
        sampling_ratio=sampling_ratio,
        spatial_scale=0.5,
    )
    _compare(model, feeds, atol=1e-5)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_roi_align_opset_10_has_no_half_pixel_shift(mode: str) -> None:
    feeds = {"x": _roi_x(np.float64, seed=1), "rois": ROIS.astype(np.float64)}
    feeds["batch_indices"] = BATCH_INDICES
    model = _model("RoiAlign", feeds, {"y": D}, 10, mode=mode, output_height=2)
    _compare(model, feeds, atol=1e-12)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_roi_align_samples_on_the_boundaries(mode: str) -> None:
    # One sample per ROI at y, x = 10, 12 (the far edges: read at the last pixel), -1 (read
    # at 0) and -1.5 (outside: zero weights).
    rois = np.array([[0, 0, 24, 20], [-2, -2, 0, 0], [-2.5, -2.5, -0.5, -0.5]], np.float32)
    feeds = {"x": _roi_x(), "rois": rois, "batch_indices": np.array([0, 1, 0], np.int64)}
    model = _model(
        "RoiAlign",
        feeds,
        {"y": F},
        16,
        mode=mode,
        coordinate_transformation_mode="output_half_pixel",
        sampling_ratio=1,
    )
    _compare(model, feeds)


def test_roi_align_without_rois_is_empty() -> None:
    feeds = {"x": _roi_x(), "rois": np.zeros((0, 4), np.float32)}
    feeds["batch_indices"] = np.zeros(0, np.int64)
    _compare(_model("RoiAlign", feeds, {"y": F}, 16, output_width=2), feeds)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_roi_align_in_float16_matches_float32(mode: str) -> None:
    # float16 takes the gathered path for avg too (no sparse product in half precision).
    feeds = {"x": _roi_x(), "rois": ROIS, "batch_indices": BATCH_INDICES}
    graph = convert(_model("RoiAlign", feeds, {"y": F}, 16, mode=mode), mode="eval")
    x, rois, batch_indices = (torch.from_numpy(v) for v in feeds.values())
    outs = []
    with torch.no_grad():
        for dtype in (torch.float32, torch.float16):
            outs.append(graph(x.to(dtype), rois.to(dtype), batch_indices).float())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-2, atol=1e-2)


def test_roi_align_rejects_a_batch_index_out_of_range() -> None:
    feeds = {"x": _roi_x(), "rois": ROIS, "batch_indices": BATCH_INDICES + 1}
    graph = convert(_model("RoiAlign", feeds, {"y": F}, 16))
    with pytest.raises(ValueError, match="batch index"):
        graph(*(torch.from_numpy(v) for v in feeds.values()))


def test_roi_align_refuses_an_unknown_mode() -> None:
    feeds = {"x": _roi_x(), "rois": ROIS, "batch_indices": BATCH_INDICES}
    with pytest.raises(UnsupportedModelError, match="mode='median'"):
        convert(_model("RoiAlign", feeds, {"y": F}, 16, mode="median"))


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("coordinates", ["half_pixel", "output_half_pixel"])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_gradcheck_wrt_x(mode: str, coordinates: str, sampling_ratio: int) -> None:
    x = _roi_x(np.float64, seed=2)[:, :2, :6, :7]
    rois = np.array([[0.3, 0.2, 4.5, 5.1], [-1.0, 1.5, 3.0, 9.0], [5.5, 4.0, 5.2, 4.1]])
    consts = {"rois": rois, "batch_indices": np.array([0, 1, 1], np.int64)}
    graph = convert(
        _model(
            "RoiAlign",
            {"x": x},
            {"y": D},
            16,
            consts,
            mode=mode,
            coordinate_transformation_mode=coordinates,
            output_height=2,
            output_width=3,
            sampling_ratio=sampling_ratio,
        ),
        mode="eval",
    )
    leaf = torch.from_numpy(x).requires_grad_(True)
    assert torch.autograd.gradcheck(graph, (leaf,), eps=1e-6, atol=1e-5)


# --- Unique -----------------------------------------------------------------------------------


def _unique_x(dtype: Any = np.float32) -> np.ndarray:
    rng = np.random.default_rng(3)
    rows = rng.integers(-3, 3, (3, 2, 4)).astype(dtype)
    # Repeated slices along every axis, and repeated values in the flattened tensor.
    x = np.concatenate([rows, rows[::-1], rows[:1]], 0)
    return np.concatenate([x, x[:, :1]], 1)


@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("sort", [0, 1])
@pytest.mark.parametrize("outputs", [1, 4])
def test_unique_matches_onnxruntime(axis: int | None, sort: int, outputs: int) -> None:
    x = _unique_x()
    if axis == -1:  # repeated slices along the last axis too
        x = np.concatenate([x, x[..., ::-1]], -1)
    attrs: dict[str, Any] = {"sorted": sort}
    if axis is not None:
        attrs["axis"] = axis
    names = {"y": F, "indices": I64, "inverse_indices": I64, "counts": I64}
    model = _model("Unique", {"x": x}, dict(list(names.items())[:outputs]), 11, **attrs)
    _compare(model, {"x": x})


@pytest.mark.parametrize("sort", [0, 1])
def test_unique_of_integers_matches_onnxruntime(sort: int) -> None:
    x = _unique_x(np.int64)
    outputs = {"y": I64, "indices": I64, "inverse_indices": I64, "counts": I64}
    _compare(_model("Unique", {"x": x}, outputs, 11, sorted=sort), {"x": x})


@pytest.mark.parametrize(("axis", "sort"), [(None, 1), (None, 0), (1, 0), (0, 1)])
def test_unique_gradcheck_through_y(axis: int | None, sort: int) -> None:
    # Distinct values: a perturbation of a repeated one would split it (a different Y).
    x = np.random.default_rng(4).permutation(24).reshape(2, 3, 4) + 0.5
    attrs: dict[str, Any] = {"sorted": sort}
    if axis is not None:
        attrs["axis"] = axis
    outputs = {"y": D, "indices": I64}
    graph = convert(_model("Unique", {"x": x}, outputs, 11, **attrs), mode="eval")
    leaf = torch.from_numpy(x).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: graph(t)[0], (leaf,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("sort", [0, 1])
def test_unique_y_gradient_reaches_first_occurrences(sort: int) -> None:
    x = np.array([[2.0, 1.0, 1.0], [3.0, 2.0, 4.0]])
    graph = convert(_model("Unique", {"x": x}, {"y": D}, 11, sorted=sort), mode="eval")
    leaf = torch.from_numpy(x).requires_grad_(True)
    y = graph(leaf)
    weights = torch.arange(1.0, 5.0, dtype=torch.float64)
    (y * weights).sum().backward()
    assert leaf.grad is not None
    # Y = [1, 2, 3, 4] sorted, [2, 1, 3, 4] in order of first occurrence; repeats get none.
    expected = [[2.0, 1.0, 0.0], [3.0, 0.0, 4.0]] if sort else [[1.0, 2.0, 0.0], [3.0, 0.0, 4.0]]
    torch.testing.assert_close(leaf.grad, torch.tensor(expected, dtype=torch.float64))
