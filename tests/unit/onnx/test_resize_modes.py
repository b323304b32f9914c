"""Resize's antialias filter and `tf_crop_and_resize` mode: one-node models against onnxruntime
and the ONNX reference evaluator, and `gradcheck` w.r.t. X through each new path."""

from __future__ import annotations

import copy
from typing import Any, cast

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from service.engine.onnx.convert import convert
from service.errors import UnsupportedModelError

CROP = "tf_crop_and_resize"


def _model(
    attrs: dict[str, Any],
    shape: tuple[int, ...],
    *,
    elem: int = TensorProto.FLOAT,
    roi: list[float] | None = None,
    scales: list[float] | None = None,
    sizes: list[int] | None = None,
) -> onnx.ModelProto:
    """A one-node opset-19 Resize of input X; roi, scales and sizes are initializers."""
    consts = {
        "roi": None if roi is None else np.array(roi, np.float32),
        "scales": None if scales is None else np.array(scales, np.float32),
        "sizes": None if sizes is None else np.array(sizes, np.int64),
    }
    names = ["X"] + [name if value is not None else "" for name, value in consts.items()]
    while not names[-1]:
        names.pop()
    graph = helper.make_graph(
        [helper.make_node("Resize", names, ["Y"], **attrs)],
        "g",
        [helper.make_tensor_value_info("X", elem, list(shape))],
        [helper.make_tensor_value_info("Y", elem, None)],
        [numpy_helper.from_array(v, k) for k, v in consts.items() if v is not None],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    return model


def _ours(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    graph = convert(copy.deepcopy(model), mode="eval")
    with torch.no_grad():
        return graph.run([torch.from_numpy(x)])[0].numpy()


def _reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    outputs = ReferenceEvaluator(model).run(None, {"X": x})
    return np.asarray(cast(list[Any], outputs)[0])


def _onnxruntime(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"X": x})[0]


def _data(*shape: int) -> np.ndarray:
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


ANTIALIAS_CASES = [
    # (attrs, input shape, resize inputs): non-integer scales, sizes, down and up, 2-D and 4-D.
    ({"mode": "linear"}, (1, 2, 9, 11), {"scales": [1, 1, 0.6, 0.45]}),
    ({"mode": "cubic"}, (2, 1, 10, 12), {"scales": [1, 1, 0.65, 0.35]}),
    ({"mode": "linear"}, (13, 10), {"sizes": [5, 4]}),
    ({"mode": "cubic", "exclude_outside": 1}, (11, 16), {"sizes": [4, 7]}),
    ({"mode": "cubic", "cubic_coeff_a": -0.5}, (1, 2, 9, 13), {"sizes": [1, 2, 5, 30]}),
    ({"mode": "linear", "exclude_outside": 1}, (7, 9), {"scales": [1.7, 0.3]}),
    ({"mode": "linear"}, (1, 1, 5, 6), {"scales": [1, 1, 1.5, 2.3]}),
    ({"mode": "cubic"}, (6, 5), {"scales": [2.5, 1.3]}),
    (
        {"mode": "linear", "axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"},
        (1, 3, 12, 16),
        {"sizes": [5, 9]},
    ),
    (
        {"mode": "cubic", "coordinate_transformation_mode": "align_corners"},
        (12, 8),
        {"sizes": [5, 3]},
    ),
]


@pytest.mark.parametrize(("attrs", "shape", "inputs"), ANTIALIAS_CASES)
def test_antialias_matches_onnxruntime_and_reference(
    attrs: dict[str, Any], shape: tuple[int, ...], inputs: dict[str, Any]
) -> None:
    model = _model({**attrs, "antialias": 1}, shape, **inputs)
    x = _data(*shape)
    got = _ours(model, x)
    np.testing.assert_allclose(got, _reference(model, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, _onnxruntime(model, x), rtol=1e-5, atol=1e-5)


CROP_CASES = [
    # roi on the resized (inner) axes only: onnxruntime's 4-D linear/cubic kernels ignore the
    # roi of the outer two axes, which the spec and the reference do not.
    (
        {"mode": "nearest"},
        (1, 2, 6, 7),
        {"roi": [0, 0, 0.2, 0.3, 1, 1, 0.7, 0.9], "sizes": [1, 2, 4, 5]},
    ),
    (
        {"mode": "nearest", "extrapolation_value": 10.0, "nearest_mode": "ceil"},
        (1, 1, 6, 7),
        {"roi": [0, 0, -0.3, 0.1, 1, 1, 1.2, 0.75], "sizes": [1, 1, 7, 5]},
    ),
    (
        {"mode": "linear", "extrapolation_value": -2.5},
        (2, 1, 8, 9),
        {"roi": [0, 0, -0.2, 0.35, 1, 1, 0.7, 1.3], "sizes": [2, 1, 7, 5]},
    ),
    ({"mode": "linear"}, (9, 11), {"roi": [0.25, 0.1, 0.6, 0.8], "sizes": [5, 1]}),
    (
        {"mode": "cubic", "extrapolation_value": 3.0},
        (10, 9),
        {"roi": [-0.1, 0.2, 0.8, 1.1], "sizes": [6, 4]},
    ),
    (
        {"mode": "nearest", "axes": [3, 2]},
        (1, 2, 6, 8),
        {"roi": [0.1, 0.3, 0.9, 0.8], "sizes": [5, 4]},
    ),
    ({"mode": "linear", "antialias": 1}, (13, 10), {"roi": [0.1, 0.0, 0.9, 0.8], "sizes": [5, 4]}),
]


@pytest.mark.parametrize(("attrs", "shape", "inputs"), CROP_CASES)
def test_crop_and_resize_matches_onnxruntime_and_reference(
    attrs: dict[str, Any], shape: tuple[int, ...], inputs: dict[str, Any]
) -> None:
    model = _model({**attrs, "coordinate_transformation_mode": CROP}, shape, **inputs)
    x = _data(*shape)
    got = _ours(model, x)
    np.testing.assert_allclose(got, _reference(model, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, _onnxruntime(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("attrs", "inputs"),
    [
        # With scales the reference (and we) divide by the unrounded length in_len * scale,
        # onnxruntime by the integer output length.
        (
            {"mode": "linear"},
            {"roi": [0, 0, 0.2, 0.35, 1, 1, 0.7, 0.9], "scales": [1, 1, 0.8, 1.7]},
        ),
        # A roi on an axis that keeps its length still crops it (onnxruntime ignores it).
        ({"mode": "cubic"}, {"roi": [0, 0.5, 0.2, 0.35, 1, 1, 0.7, 0.9], "sizes": [1, 2, 7, 5]}),
    ],
)
def test_crop_and_resize_cases_where_onnxruntime_departs_follow_the_reference(
    attrs: dict[str, Any], inputs: dict[str, Any]
) -> None:
    model = _model({**attrs, "coordinate_transformation_mode": CROP}, (1, 2, 9, 11), **inputs)
    x = _data(1, 2, 9, 11)
    np.testing.assert_allclose(_ours(model, x), _reference(model, x), rtol=1e-5, atol=1e-5)


def test_integer_input_rounds_and_saturates_like_the_reference() -> None:
    x = np.random.default_rng(0).integers(0, 256, (1, 3, 11, 13)).astype(np.uint8)
    for attrs, inputs in (
        ({"mode": "cubic", "antialias": 1}, {"scales": [1, 1, 0.6, 0.35]}),
        (
            {"mode": "nearest", "coordinate_transformation_mode": CROP, "extrapolation_value": 7.6},
            {"roi": [0, 0, -0.2, 0.1, 1, 1, 0.9, 1.3], "sizes": [1, 3, 5, 6]},
        ),
    ):
        model = _model(attrs, x.shape, elem=TensorProto.UINT8, **inputs)
        got = _ours(model, x)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, _reference(model, x))


def test_antialias_with_nearest_is_still_refused() -> None:
    model = _model({"mode": "nearest", "antialias": 1}, (4, 4), scales=[0.5, 0.5])
    with pytest.raises(UnsupportedModelError, match="antialias=1 with mode 'nearest'"):
        convert(model)


def test_crop_and_resize_without_roi_fails_loudly() -> None:
    model = _model({"mode": "linear", "coordinate_transformation_mode": CROP}, (4, 4), sizes=[3, 3])
    with pytest.raises(ValueError, match="needs roi"):
        _ours(model, _data(4, 4))


@pytest.mark.parametrize(
    ("attrs", "shape", "inputs"),
    [
        ({"mode": "linear", "antialias": 1}, (1, 2, 7, 6), {"scales": [1, 1, 0.45, 1.5]}),
        ({"mode": "cubic", "antialias": 1, "exclude_outside": 1}, (9, 8), {"sizes": [4, 3]}),
        (
            {"mode": "nearest", "coordinate_transformation_mode": CROP, "extrapolation_value": 2.0},
            (1, 1, 5, 6),
            {"roi": [0, 0, -0.2, 0.1, 1, 1, 0.9, 1.3], "sizes": [1, 1, 4, 5]},
        ),
        (
            {"mode": "linear", "coordinate_transformation_mode": CROP, "extrapolation_value": 1.0},
            (6, 7),
            {"roi": [-0.2, 0.3, 0.8, 1.2], "sizes": [5, 4]},
        ),
        (
            {"mode": "cubic", "coordinate_transformation_mode": CROP},
            (2, 6, 7),
            {"roi": [0, 0.1, 0.2, 1, 0.9, 0.7], "sizes": [2, 4, 5]},
        ),
    ],
)
def test_new_paths_are_differentiable_in_x(
    attrs: dict[str, Any], shape: tuple[int, ...], inputs: dict[str, Any]
) -> None:
    graph = convert(_model(attrs, shape, elem=TensorProto.DOUBLE, **inputs), mode="eval")
    x = torch.from_numpy(_data(*shape).astype(np.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: graph(t), [x], eps=1e-6, atol=1e-5)


NEAREST_FLOOR = {
    "mode": "nearest",
    "coordinate_transformation_mode": "asymmetric",
    "nearest_mode": "floor",
}


@pytest.mark.parametrize(
    ("shape", "inputs", "torch_kernel"),
    [
        ((2, 3, 4, 5), {"scales": [1, 1, 2, 3]}, True),  # F.interpolate(scale_factor=(2, 3))
        ((2, 3, 4), {"sizes": [2, 3, 12]}, True),
        ((1, 2, 2, 3, 2), {"scales": [1, 1, 2, 2, 2]}, True),
        ((2, 3, 4, 5), {"scales": [1, 1, 1.5, 2]}, False),  # not whole: the gathers
        ((2, 3, 4, 5), {"scales": [1, 2, 2, 2]}, False),  # the channels resized too
        ((2, 3, 6, 6), {"scales": [1, 1, 0.5, 0.5]}, False),  # downsampling
    ],
)
def test_torchs_nearest_upsampling_is_used_where_it_computes_the_same(
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    inputs: dict[str, Any],
    torch_kernel: bool,
) -> None:
    """Nearest upsampling by whole factors (what F.interpolate exports as) runs torch's
    kernel: equal to onnxruntime's and the reference's output bit for bit, as the gathers."""
    calls: list[object] = []
    interpolate = torch.nn.functional.interpolate

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(kwargs)
        return interpolate(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "interpolate", counted)
    model, x = _model(NEAREST_FLOOR, shape, **inputs), _data(*shape)
    got = _ours(model, x)
    assert bool(calls) == torch_kernel
    np.testing.assert_array_equal(got, _onnxruntime(model, x))
    np.testing.assert_array_equal(got, _reference(model, x))
