"""onnxruntime's com.microsoft QLinear* ops of the QOperator format (ops/microsoft_qlinear.py)
against onnxruntime itself, on random integers over int8 and uint8, several scales and zero
points and broadcast shapes.

Bit-exact where onnxruntime's kernel is exact integer or float32 arithmetic this reproduces
(QGemm, QLinearAdd's fixed point, QLinearMul, QLinearGlobalAveragePool, QLinearConcat,
QLinearWhere, QLinearLeakyRelu); within one quantisation step where onnxruntime sums or
approximates differently (QLinearSigmoid's MLAS logistic, QLinearSoftmax's and
QLinearAveragePool's sequential float32 sums), and there at almost every element exactly."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from service.engine.onnx.convert import convert
from tests.support.recurrent_zoo import run_onnxruntime

MS = "com.microsoft"
_ONNX_TYPE = {
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.bool_): TensorProto.BOOL,
}
_TYPES = [np.uint8, np.int8]


def _ints(rng: np.random.Generator, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.asarray(rng.integers(info.min, int(info.max) + 1, shape), dtype=dtype)


def _scale(rng: np.random.Generator, low: float = 0.005, high: float = 0.1) -> np.ndarray:
    return np.array(rng.uniform(low, high), np.float32)


def _run(
    op_type: str,
    inputs: dict[str, np.ndarray],
    params: dict[str, np.ndarray],
    out_type: int,
    **attrs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """One com.microsoft node: `inputs` are graph inputs, `params` (scales, zero points)
    initializers, in the node's input order given by `order`; ours and onnxruntime's output."""
    order = attrs.pop("order")
    node = helper.make_node(op_type, order, ["output"], domain=MS, **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(n, _ONNX_TYPE[v.dtype], list(v.shape))
            for n, v in inputs.items()
        ],
        [helper.make_tensor_value_info("output", out_type, None)],
        [numpy_helper.from_array(v, n) for n, v in params.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=9)
    (expected,) = run_onnxruntime(model, inputs)
    with torch.no_grad():
        (got,) = convert(model).run([torch.from_numpy(v.copy()) for v in inputs.values()])
    assert got.dtype == torch.from_numpy(expected).dtype and tuple(got.shape) == expected.shape
    return got.numpy(), expected


def _assert_within_one_step(got: np.ndarray, expected: np.ndarray, exact_share: float) -> None:
    difference = np.abs(got.astype(np.int32) - expected.astype(np.int32))
    assert difference.max() <= 1
    assert (difference == 0).mean() >= exact_share


def _binary_params(rng: np.random.Generator, dtype: Any) -> dict[str, np.ndarray]:
    return {
        "a_scale": _scale(rng),
        "a_zero_point": _ints(rng, dtype, ()),
        "b_scale": _scale(rng),
        "b_zero_point": _ints(rng, dtype, ()),
        "c_scale": _scale(rng, 0.01, 0.2),
        "c_zero_point": _ints(rng, dtype, ()),
    }


_BINARY_ORDER = [
    "a",
    "a_scale",
    "a_zero_point",
    "b",
    "b_scale",
    "b_zero_point",
    "c_scale",
    "c_zero_point",
]
_SHAPES = [((3, 37), (3, 37)), ((2, 3, 5), (5,)), ((1,), (4, 9)), ((2, 1, 6), (3, 1))]


@pytest.mark.parametrize("op_type", ["QLinearAdd", "QLinearMul"])
@pytest.mark.parametrize("dtype", _TYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize(("a_shape", "b_shape"), _SHAPES, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_qlinear_add_and_mul_match_onnxruntime_exactly(
    op_type: str, dtype: Any, a_shape: tuple[int, ...], b_shape: tuple[int, ...], seed: int
) -> None:
    rng = np.random.default_rng(seed + 10 * len(a_shape))
    inputs = {"a": _ints(rng, dtype, a_shape), "b": _ints(rng, dtype, b_shape)}
    got, expected = _run(
        op_type,
        inputs,
        _binary_params(rng, dtype),
        _ONNX_TYPE[np.dtype(dtype)],
        order=_BINARY_ORDER,
    )
    np.testing.assert_array_equal(got, expected)


def _activation_params(rng: np.random.Generator, dtype: Any) -> dict[str, np.ndarray]:
    return {
        "x_scale": _scale(rng, 0.01, 0.1),
        "x_zero_point": _ints(rng, dtype, ()),
        "y_scale": _scale(rng, 0.002, 0.05),
        "y_zero_point": _ints(rng, dtype, ()),
    }


_ACTIVATION_ORDER = ["x", "x_scale", "x_zero_point", "y_scale", "y_zero_point"]


@pytest.mark.parametrize("dtype", _TYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qlinear_leaky_relu_matches_onnxruntime_exactly(dtype: Any, seed: int) -> None:
    rng = np.random.default_rng(seed)
    every_value = np.arange(256).astype(dtype).reshape(4, 64)  # the whole table
    got, expected = _run(
        "QLinearLeakyRelu",
        {"x": every_value},
        _activation_params(rng, dtype),
        _ONNX_TYPE[np.dtype(dtype)],
        order=_ACTIVATION_ORDER,
        alpha=0.1 + 0.1 * seed,
    )
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", _TYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qlinear_sigmoid_is_within_one_step_of_onnxruntimes_table(dtype: Any, seed: int) -> None:
    # onnxruntime's table comes from MLAS's polynomial logistic, ours from torch's sigmoid
    rng = np.random.default_rng(seed)
    params = _activation_params(rng, dtype)
    params["y_scale"] = np.array(1 / 256, np.float32) * rng.uniform(1, 2)
    got, expected = _run(
        "QLinearSigmoid",
        {"x": np.arange(256).astype(dtype).reshape(4, 64)},
        {k: np.asarray(v, np.float32) if "scale" in k else v for k, v in params.items()},
        _ONNX_TYPE[np.dtype(dtype)],
        order=_ACTIVATION_ORDER,
    )
    _assert_within_one_step(got, expected, 0.97)


@pytest.mark.parametrize("dtype", _TYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("channels_last", [0, 1])
@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (1, 3, 70), (2, 4, 9, 9)], ids=str)
def test_qlinear_global_average_pool_matches_onnxruntime_exactly(
    dtype: Any, channels_last: int, shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(sum(shape) + channels_last)
    got, expected = _run(
        "QLinearGlobalAveragePool",
        {"x": _ints(rng, dtype, shape)},
        _activation_params(rng, dtype),
        _ONNX_TYPE[np.dtype(dtype)],
        order=_ACTIVATION_ORDER,
        channels_last=channels_last,
    )
    np.testing.assert_array_equal(got, expected)


_POOLS: list[dict[str, Any]] = [
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1},
    {"kernel_shape": [3, 2], "pads": [1, 0, 1, 1], "strides": [2, 1]},
    {"kernel_shape": [6, 6]},  # the whole image: onnxruntime's global-pool path, exact
]


@pytest.mark.parametrize("dtype", _TYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("attrs", range(len(_POOLS)))
@pytest.mark.parametrize("channels_last", [0, 1])
def test_qlinear_average_pool_is_within_one_step_of_onnxruntime(
    dtype: Any, attrs: int, channels_last: int
) -> None:
    rng = np.random.default_rng(attrs)
    shape = (2, 6, 6, 3) if channels_last else (2, 3, 6, 6)
    got, expected = _run(
        "QLinearAveragePool",
        {"x": _ints(rng, dtype, shape)},
        _activation_params(rng, dtype),
        _ONNX_TYPE[np.dtype(dtype)],
        order=_ACTIVATION_ORDER,
        channels_last=channels_last,
        **_POOLS[attrs],
    )
    _assert_within_one_step(got, expected, 0.97)
    if attrs == len(_POOLS) - 1:
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", _TYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_qlinear_concat_matches_onnxruntime_exactly(dtype: Any, axis: int) -> None:
    rng = np.random.default_rng(axis + 5)
    shapes: list[tuple[int, ...]] = [(2, 3, 4), (2, 3, 4), (2, 3, 4)]
    shapes = [
        tuple(s + i if d == axis % 3 else s for d, s in enumerate(shape))
        for i, shape in enumerate(shapes)
    ]
    inputs = {f"x{i}": _ints(rng, dtype, shape) for i, shape in enumerate(shapes)}
    params = {"y_scale": _scale(rng), "y_zero_point": _ints(rng, dtype, ())}
    order = ["y_scale", "y_zero_point"]
    for i in range(3):
        # the second input shares the output's scale and zero point: onnxruntime copies it
        params[f"s{i}"] = params["y_scale"] if i == 1 else _scale(rng)
        params[f"z{i}"] = params["y_zero_point"] if i == 1 else _ints(rng, dtype, ())
        order += [f"x{i}", f"s{i}", f"z{i}"]
    got, expected = _run(
        "QLinearConcat", inputs, params, _ONNX_TYPE[np.dtype(dtype)], order=order, axis=axis
    )
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", _TYPES, ids=lambda t: np.dtype(t).name)
def test_qlinear_where_matches_onnxruntime_exactly(dtype: Any) -> None:
    rng = np.random.default_rng(3)
    inputs = {
        "condition": rng.integers(0, 2, (4, 1, 5)).astype(np.bool_),
        "x": _ints(rng, dtype, (3, 5)),
        "y": _ints(rng, dtype, (4, 3, 1)),
    }
    params = {
        "x_scale": _scale(rng),
        "x_zero_point": _ints(rng, dtype, ()),
        "y_scale": _scale(rng),
        "y_zero_point": _ints(rng, dtype, ()),
        "z_scale": _scale(rng),
        "z_zero_point": _ints(rng, dtype, ()),
    }
    order = ["condition", "x", "x_scale", "x_zero_point", "y", "y_scale", "y_zero_point"]
    got, expected = _run(
        "QLinearWhere",
        inputs,
        params,
        _ONNX_TYPE[np.dtype(dtype)],
        order=[*order, "z_scale", "z_zero_point"],
    )
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", _TYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize(
    ("opset", "axis", "shape"), [(13, -1, (3, 10)), (13, 1, (2, 7, 3)), (11, 1, (2, 3, 4))]
)
def test_qlinear_softmax_is_within_one_step_of_onnxruntime(
    dtype: Any, opset: int, axis: int, shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(opset + axis)
    params = {
        "x_scale": _scale(rng, 0.02, 0.1),
        "x_zero_point": _ints(rng, dtype, ()),
        # what onnxruntime's quantiser gives a softmax: 1/256, from 0 (uint8) or -128 (int8)
        "y_scale": np.array(1 / 256, np.float32),
        "y_zero_point": np.array(0 if dtype == np.uint8 else -128, dtype),
    }
    got, expected = _run(
        "QLinearSoftmax",
        {"x": _ints(rng, dtype, shape)},
        params,
        _ONNX_TYPE[np.dtype(dtype)],
        order=_ACTIVATION_ORDER,
        axis=axis,
        opset=opset,
    )
    _assert_within_one_step(got, expected, 0.95)


def _qgemm_inputs(
    rng: np.random.Generator, a_type: Any, b_type: Any, per_column: bool, trans_b: bool
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    m, k, n = 5, 19, 7
    b_shape = (n, k) if trans_b else (k, n)
    params = {
        "a_scale": _scale(rng),
        "a_zero_point": _ints(rng, a_type, ()),
        "b": _ints(rng, b_type, b_shape),
        "b_scale": rng.uniform(0.005, 0.05, (n,) if per_column else ()).astype(np.float32),
        "b_zero_point": _ints(rng, b_type, (n,) if per_column else ()),
        "c": rng.integers(-3000, 3000, (n,)).astype(np.int32),
    }
    return {"a": _ints(rng, a_type, (m, k))}, params


@pytest.mark.parametrize(
    ("a_type", "b_type"), [(np.uint8, np.int8), (np.uint8, np.uint8), (np.int8, np.int8)]
)
@pytest.mark.parametrize("per_column", [False, True])
@pytest.mark.parametrize(("trans_b", "alpha"), [(True, 1.0), (False, 0.75)])
@pytest.mark.parametrize("float_output", [False, True])
def test_qgemm_matches_onnxruntime_exactly(
    a_type: Any, b_type: Any, per_column: bool, trans_b: bool, alpha: float, float_output: bool
) -> None:
    rng = np.random.default_rng(int(per_column) + 2 * int(trans_b))
    inputs, params = _qgemm_inputs(rng, a_type, b_type, per_column, trans_b)
    order = ["a", "a_scale", "a_zero_point", "b", "b_scale", "b_zero_point", "c"]
    if not float_output:
        params["y_scale"] = _scale(rng, 0.05, 0.5)
        params["y_zero_point"] = _ints(rng, a_type, ())
        order += ["y_scale", "y_zero_point"]
    out_type = TensorProto.FLOAT if float_output else _ONNX_TYPE[np.dtype(a_type)]
    got, expected = _run(
        "QGemm", inputs, params, out_type, order=order, alpha=alpha, transB=int(trans_b)
    )
    if float_output:
        # the same integers times the same float32 scale, but MLAS scales the bias's sum apart
        # (float32 rounding of terms as large as the largest output, where they cancel)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    else:
        np.testing.assert_array_equal(got, expected)


def test_qlinear_ops_pass_no_gradient() -> None:
    # the integers carry none: the conversion's rewrite to QDQ is what gives weights gradients
    node = onnx.helper.make_node("QLinearSigmoid", _ACTIVATION_ORDER, ["y"], domain=MS)
    rng = np.random.default_rng(0)
    params = _activation_params(rng, np.uint8)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
        [numpy_helper.from_array(v, n) for n, v in params.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    converted = convert(helper.make_model(graph, opset_imports=opsets, ir_version=9))
    (y,) = converted.run([torch.zeros(2, 3, dtype=torch.uint8)])
    assert y.dtype == torch.uint8 and not y.requires_grad
