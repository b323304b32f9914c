"""Integer ops of quantised inference (ops/integer.py) and onnxruntime's contrib quantisation
ops (ops/microsoft_quantize.py).

DynamicQuantizeLinear, MatMulInteger, ConvInteger, QLinearMatMul and QLinearConv give exactly
onnxruntime's integers (and onnx's ReferenceEvaluator's) over zero-point forms, signedness,
shapes and Conv attributes; the spec's per-row zero points of A, which neither runs, against
the spec's formula. com.microsoft QuantizeLinear / DequantizeLinear match onnxruntime;
MatMulNBits matches it over bits, block sizes, zero-point forms, g_idx and bias, and is
differentiable w.r.t. A and the bias only. End to end, an MLP quantised by onnxruntime's
`quantize_dynamic` converts and computes what onnxruntime computes, as fake quantisation whose
weights are float parameters with the gradients of the same computation in torch."""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from service.engine.onnx.conformance import check_conversion
from service.engine.onnx.convert import convert
from service.engine.onnx.gradient_paths import gradient_free_initializers
from service.errors import UnsupportedModelError
from tests.support.quantized_reference import (
    dequantized_leaf,
    fake_dynamic_quantized,
    initializers,
)
from tests.support.recurrent_zoo import run_onnxruntime

MS = "com.microsoft"
NP_TO_ONNX = {
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.int16): TensorProto.INT16,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float64): TensorProto.DOUBLE,
}


def _model(
    node: onnx.NodeProto,
    feeds: dict[str, np.ndarray],
    outputs: Mapping[str, int],
    *,
    opset: int,
    initializers: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """One node; `feeds` are graph inputs, `initializers` initializers; outputs name → type."""
    inputs = [
        helper.make_tensor_value_info(name, NP_TO_ONNX[value.dtype], list(value.shape))
        for name, value in feeds.items()
    ]
    graph = helper.make_graph(
        [node],
        "g",
        inputs,
        [helper.make_tensor_value_info(name, kind, None) for name, kind in outputs.items()],
        [numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()],
    )
    opsets = [helper.make_opsetid("", opset)]
    if node.domain == MS:
        opsets.append(helper.make_opsetid(MS, 1))
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _converted(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    graph = convert(model)
    with torch.no_grad():
        outputs = graph.run([torch.from_numpy(np.array(v, copy=True)) for v in feeds.values()])
    return [o.numpy() for o in outputs]


def _assert_same(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape, (g.dtype, e.dtype, g.shape, e.shape)
        np.testing.assert_array_equal(g, e)


def _check_exact(
    node: onnx.NodeProto,
    feeds: dict[str, np.ndarray],
    outputs: Mapping[str, int],
    *,
    opset: int,
    onnxruntime: bool = True,
    reference: bool = True,
) -> list[np.ndarray]:
    model = _model(node, feeds, outputs, opset=opset)
    expected: list[np.ndarray] | None = None
    if onnxruntime:
        expected = run_onnxruntime(model, feeds)
    if reference:
        referenced = [np.asarray(v) for v in ReferenceEvaluator(model).run(None, feeds)]
        if expected is None:
            expected = referenced
        else:
            _assert_same(referenced, expected)  # the two references agree here
    got = _converted(model, feeds)
    assert expected is not None
    _assert_same(got, expected)
    return got


def _ints(rng: np.random.Generator, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.asarray(rng.integers(info.min, int(info.max) + 1, shape), dtype=dtype)


# ---------------------------------------------------------------- DynamicQuantizeLinear

_DYNAMIC_INPUTS = {
    "mixed": np.random.default_rng(0).standard_normal((4, 7)).astype(np.float32) * 3,
    "positive": np.linspace(0.5, 9.0, 12, dtype=np.float32),
    "negative": -np.linspace(0.25, 4.0, 9, dtype=np.float32).reshape(3, 3),
    # 255 levels over [-1, 1.55]: values on rounding ties of x / scale
    "ties": np.array([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 1.5, 1.55], np.float32),
    "one_value": np.array([[2.5]], np.float32),
}


@pytest.mark.parametrize("case", list(_DYNAMIC_INPUTS))
def test_dynamic_quantize_linear_matches_onnxruntime_and_the_reference(case: str) -> None:
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "y_scale", "y_zero_point"])
    outputs = {"y": TensorProto.UINT8, "y_scale": TensorProto.FLOAT}
    outputs["y_zero_point"] = TensorProto.UINT8
    _check_exact(node, {"x": _DYNAMIC_INPUTS[case]}, outputs, opset=11)


def test_dynamic_quantize_linear_of_zeros_has_onnxruntimes_scale_one() -> None:
    # the reference's scale is 1/255 here; the integers (all 0) agree either way
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "y_scale", "y_zero_point"])
    outputs = {"y": TensorProto.UINT8, "y_scale": TensorProto.FLOAT}
    outputs["y_zero_point"] = TensorProto.UINT8
    y, scale, zero_point = _check_exact(
        node, {"x": np.zeros((2, 3), np.float32)}, outputs, opset=11, reference=False
    )
    assert scale == 1.0 and zero_point == 0 and not y.any()


def test_dynamic_quantize_linear_carries_no_gradient() -> None:
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "y_scale", "y_zero_point"])
    outputs = {"y": TensorProto.UINT8, "y_scale": TensorProto.FLOAT}
    outputs["y_zero_point"] = TensorProto.UINT8
    model = _model(node, {"x": np.ones((2, 2), np.float32)}, outputs, opset=11)
    x = torch.randn(2, 2, requires_grad=True)
    y, scale, zero_point = convert(model).run([x])
    assert y.dtype == torch.uint8 and zero_point.dtype == torch.uint8
    assert not scale.requires_grad


# ---------------------------------------------------------------- MatMulInteger

_SIGNEDNESS = [(np.uint8, np.uint8), (np.int8, np.int8), (np.uint8, np.int8), (np.int8, np.uint8)]


@pytest.mark.parametrize(("a_type", "b_type"), _SIGNEDNESS, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize(
    ("a_shape", "b_shape", "zero_points"),
    [
        ((3, 8), (8, 5), "none"),
        ((3, 8), (8, 5), "scalar"),
        ((3, 8), (8, 5), "b_per_column"),
        ((2, 3, 8), (8, 5), "scalar"),  # batched A
        ((2, 3, 8), (2, 8, 5), "b_per_column"),  # batched both
        ((4, 1, 3, 8), (2, 8, 5), "scalar"),  # broadcast batch dims
        ((8,), (8, 5), "scalar"),  # a vector A
    ],
)
def test_matmul_integer_matches_onnxruntime_and_the_reference(
    a_type: Any, b_type: Any, a_shape: tuple[int, ...], b_shape: tuple[int, ...], zero_points: str
) -> None:
    rng = np.random.default_rng(len(a_shape) + len(b_shape))
    feeds = {"A": _ints(rng, a_type, a_shape), "B": _ints(rng, b_type, b_shape)}
    names = ["A", "B"]
    if zero_points != "none":
        feeds["a_zero_point"] = _ints(rng, a_type, ())
        # per column: [N], or [..., 1, N] for a batched B
        per_column = (b_shape[-1],) if len(b_shape) == 2 else (*b_shape[:-2], 1, b_shape[-1])
        b_zero_shape = per_column if zero_points == "b_per_column" else ()
        feeds["b_zero_point"] = _ints(rng, b_type, b_zero_shape)
        names += ["a_zero_point", "b_zero_point"]
    node = helper.make_node("MatMulInteger", names, ["Y"])
    _check_exact(node, feeds, {"Y": TensorProto.INT32}, opset=10)


@pytest.mark.parametrize("form", ["1-D", "N-D"])
def test_matmul_integer_per_row_zero_points_of_a_follow_the_spec(form: str) -> None:
    # neither onnxruntime nor the reference runs these (the reference broadcasts [M] along K)
    rng = np.random.default_rng(3)
    a = _ints(rng, np.uint8, (2, 3, 6))
    b = _ints(rng, np.int8, (2, 6, 4))
    a_zero = _ints(rng, np.uint8, (3,) if form == "1-D" else (2, 3, 1))
    b_zero = _ints(rng, np.int8, (2, 1, 4))
    node = helper.make_node("MatMulInteger", ["A", "B", "az", "bz"], ["Y"])
    feeds = {"A": a, "B": b, "az": a_zero, "bz": b_zero}
    model = _model(node, feeds, {"Y": TensorProto.INT32}, opset=10)
    (got,) = _converted(model, feeds)
    rows = a_zero.reshape(-1, 1) if form == "1-D" else a_zero
    expected = (a.astype(np.int64) - rows) @ (b.astype(np.int64) - b_zero)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected.astype(np.int32))


def test_matmul_integer_accumulates_in_int32_as_onnxruntime() -> None:
    # 255 · 255 · 40000 > 2^31: the int32 accumulator wraps, exactly as onnxruntime's
    k = 40000
    feeds = {"A": np.full((1, k), 255, np.uint8), "B": np.full((k, 2), 255, np.uint8)}
    node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
    (got,) = _check_exact(node, feeds, {"Y": TensorProto.INT32}, opset=10, reference=False)
    assert (got < 0).all()  # wrapped


# ---------------------------------------------------------------- ConvInteger

_CONV_ATTRS: dict[str, dict[str, Any]] = {
    "plain": {},
    "pads_strides": {"pads": [1, 0, 2, 1], "strides": [2, 1]},
    "dilations_group": {"dilations": [2, 1], "group": 2, "pads": [1, 1, 1, 1]},
    "same_upper": {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    "same_lower": {"auto_pad": "SAME_LOWER", "kernel_shape": [3, 3]},
    "valid": {"auto_pad": "VALID"},
}


@pytest.mark.parametrize("attrs", list(_CONV_ATTRS))
@pytest.mark.parametrize("zero_points", ["none", "scalar", "per_channel"])
def test_conv_integer_matches_the_reference(attrs: str, zero_points: str) -> None:
    rng = np.random.default_rng(7)
    feeds = {"x": _ints(rng, np.uint8, (2, 4, 7, 6)), "w": _ints(rng, np.uint8, (6, 2, 3, 3))}
    if _CONV_ATTRS[attrs].get("group", 1) == 1:
        feeds["w"] = _ints(rng, np.uint8, (6, 4, 3, 3))
    names = ["x", "w"]
    if zero_points != "none":
        feeds["x_zero_point"] = np.array(131, np.uint8)  # the padding is this zero point
        w_zero_shape = (6,) if zero_points == "per_channel" else ()
        feeds["w_zero_point"] = _ints(rng, np.uint8, w_zero_shape)
        names += ["x_zero_point", "w_zero_point"]
    node = helper.make_node("ConvInteger", names, ["y"], **_CONV_ATTRS[attrs])
    # onnxruntime runs uint8 with per-tensor zero points (compared there too)
    _check_exact(
        node, feeds, {"y": TensorProto.INT32}, opset=10, onnxruntime=zero_points != "per_channel"
    )


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "attrs"),
    [
        ((1, 3, 9), (4, 3, 2), {"pads": [1, 2], "strides": [2]}),  # 1-D
        ((1, 2, 4, 5, 3), (3, 2, 2, 3, 2), {"pads": [0, 1, 0, 1, 0, 1]}),  # 3-D
    ],
)
def test_conv_integer_in_1d_and_3d(
    x_shape: tuple[int, ...], w_shape: tuple[int, ...], attrs: dict[str, Any]
) -> None:
    rng = np.random.default_rng(11)
    feeds = {
        "x": _ints(rng, np.uint8, x_shape),
        "w": _ints(rng, np.uint8, w_shape),
        "x_zero_point": np.array(7, np.uint8),
        "w_zero_point": np.array(200, np.uint8),
    }
    node = helper.make_node("ConvInteger", list(feeds), ["y"], **attrs)
    _check_exact(node, feeds, {"y": TensorProto.INT32}, opset=10)


def test_conv_integer_with_int8_operands_matches_the_reference() -> None:
    rng = np.random.default_rng(12)
    feeds = {
        "x": _ints(rng, np.int8, (1, 3, 5, 5)),
        "w": _ints(rng, np.int8, (2, 3, 3, 3)),
        "x_zero_point": np.array(-5, np.int8),
        "w_zero_point": np.array([3, -4], np.int8),
    }
    node = helper.make_node("ConvInteger", list(feeds), ["y"], pads=[1, 1, 1, 1])
    _check_exact(node, feeds, {"y": TensorProto.INT32}, opset=10, onnxruntime=False)


# ---------------------------------------------------------------- QLinearMatMul


def _qlinear_matmul_feeds(
    rng: np.random.Generator,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    types: tuple[Any, Any, Any],
    scale_type: Any,
    b_per_column: bool,
) -> dict[str, np.ndarray]:
    a_type, b_type, y_type = types
    n = b_shape[-1]
    b_params = (n,) if b_per_column else ()
    return {
        "a": _ints(rng, a_type, a_shape),
        "a_scale": np.array(rng.uniform(0.005, 0.05), scale_type),
        "a_zero_point": _ints(rng, a_type, ()),
        "b": _ints(rng, b_type, b_shape),
        "b_scale": rng.uniform(0.005, 0.05, b_params).astype(scale_type),
        "b_zero_point": _ints(rng, b_type, b_params),
        "y_scale": np.array(rng.uniform(0.05, 0.5), scale_type),
        "y_zero_point": _ints(rng, y_type, ()),
    }


@pytest.mark.parametrize(
    ("opset", "scale_type"), [(10, np.float32), (21, np.float32), (21, np.float16)]
)
@pytest.mark.parametrize(
    "types",
    [(np.uint8, np.uint8, np.uint8), (np.uint8, np.int8, np.uint8), (np.int8, np.int8, np.int8)],
    ids=["u8u8u8", "u8i8u8", "i8i8i8"],
)
@pytest.mark.parametrize(
    ("a_shape", "b_shape", "b_per_column"),
    [((4, 16), (16, 5), False), ((2, 3, 40), (40, 6), True), ((2, 3, 9), (2, 9, 4), False)],
)
def test_qlinear_matmul_matches_onnxruntime(
    opset: int,
    scale_type: Any,
    types: tuple[Any, Any, Any],
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    b_per_column: bool,
) -> None:
    rng = np.random.default_rng(sum(a_shape) + opset)
    feeds = _qlinear_matmul_feeds(rng, a_shape, b_shape, types, scale_type, b_per_column)
    node = helper.make_node("QLinearMatMul", list(feeds), ["y"])
    out_type = NP_TO_ONNX[np.dtype(types[2])]
    _check_exact(node, feeds, {"y": out_type}, opset=opset)


def test_qlinear_matmul_saturates_and_rounds_ties_to_even() -> None:
    # products on exact halves (multiplier 0.5) and far past the output range
    feeds: dict[str, np.ndarray] = {
        "a": np.array([[1, 3, 5, 7, 200, 0]], np.uint8).T.copy(),
        "a_scale": np.array(0.5, np.float32),
        "a_zero_point": np.array(0, np.uint8),
        "b": np.array([[1, 255]], np.uint8),
        "b_scale": np.array(1.0, np.float32),
        "b_zero_point": np.array(0, np.uint8),
        "y_scale": np.array(1.0, np.float32),
        "y_zero_point": np.array(10, np.uint8),
    }
    node = helper.make_node("QLinearMatMul", list(feeds), ["y"])
    (got,) = _check_exact(node, feeds, {"y": TensorProto.UINT8}, opset=10)
    assert got[:4, 0].tolist() == [10, 12, 12, 14]  # 0.5, 1.5, 2.5, 3.5 → 0, 2, 2, 4
    assert got[4, 1] == 255


def test_qlinear_matmul_per_row_scales_of_a_follow_the_spec() -> None:
    rng = np.random.default_rng(5)
    feeds = _qlinear_matmul_feeds(
        rng, (3, 8), (8, 4), (np.uint8, np.uint8, np.uint8), np.float32, True
    )
    feeds["a_scale"] = rng.uniform(0.005, 0.05, 3).astype(np.float32)
    feeds["a_zero_point"] = _ints(rng, np.uint8, (3,))
    node = helper.make_node("QLinearMatMul", list(feeds), ["y"])
    model = _model(node, feeds, {"y": TensorProto.UINT8}, opset=10)
    (got,) = _converted(model, feeds)
    accumulated = (feeds["a"].astype(np.int64) - feeds["a_zero_point"][:, None]) @ (
        feeds["b"].astype(np.int64) - feeds["b_zero_point"]
    )
    multiplier = (feeds["a_scale"][:, None] * feeds["b_scale"]) / feeds["y_scale"]
    values = accumulated.astype(np.float32) * multiplier.astype(np.float32)
    expected = np.clip(np.rint(values) + feeds["y_zero_point"], 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)


def test_float8_qlinear_matmul_is_refused() -> None:
    vi = helper.make_tensor_value_info
    names = ["a", "a_scale", "a_zero_point", "b", "b_scale", "b_zero_point", "y_scale"]
    names.append("y_zero_point")
    types = [TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT, TensorProto.FLOAT8E4M3FN]
    types = [*types, *types, TensorProto.FLOAT, TensorProto.FLOAT8E4M3FN]
    graph = helper.make_graph(
        [helper.make_node("QLinearMatMul", names, ["y"])],
        "g",
        [vi(n, t, None) for n, t in zip(names, types, strict=True)],
        [vi("y", TensorProto.FLOAT8E4M3FN, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    with pytest.raises(UnsupportedModelError, match="only the int8/uint8 forms"):
        convert(model)


# ---------------------------------------------------------------- QLinearConv


@pytest.mark.parametrize("types", [(np.uint8, np.uint8), (np.uint8, np.int8), (np.int8, np.int8)])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("attrs", ["plain", "pads_strides", "dilations_group", "same_upper"])
def test_qlinear_conv_matches_onnxruntime(
    types: tuple[Any, Any], per_channel: bool, bias: bool, attrs: str
) -> None:
    x_type, w_type = types
    rng = np.random.default_rng(17)
    channels = 4 if _CONV_ATTRS[attrs].get("group", 1) == 1 else 2
    params = (6,) if per_channel else ()
    feeds = {
        "x": _ints(rng, x_type, (2, 4, 7, 6)),
        "x_scale": np.array(rng.uniform(0.005, 0.05), np.float32),
        "x_zero_point": _ints(rng, x_type, ()),
        "w": _ints(rng, w_type, (6, channels, 3, 3)),
        "w_scale": rng.uniform(0.005, 0.05, params).astype(np.float32),
        # onnxruntime takes int8 weights with zero points 0 only (symmetric)
        "w_zero_point": (
            _ints(rng, w_type, params) if w_type == np.uint8 else np.zeros(params, np.int8)
        ),
        "y_scale": np.array(rng.uniform(0.05, 0.5), np.float32),
        "y_zero_point": _ints(rng, x_type, ()),
    }
    if bias:
        feeds["B"] = rng.integers(-20000, 20000, 6).astype(np.int32)
    node = helper.make_node("QLinearConv", list(feeds), ["y"], **_CONV_ATTRS[attrs])
    _check_exact(node, feeds, {"y": NP_TO_ONNX[np.dtype(x_type)]}, opset=10)


def test_integer_ops_pass_no_gradient_to_their_inputs() -> None:
    """A float initializer read only by an integer op's scale slot is state, not a weight."""
    vi = helper.make_tensor_value_info
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "q_scale", "q_zero"]),
        helper.make_node(
            "QLinearMatMul",
            ["q", "q_scale", "q_zero", "w", "w_scale", "w_zero", "y_scale", "y_zero"],
            ["y_q"],
        ),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zero"], ["y"]),
    ]
    inits: dict[str, np.ndarray] = {
        "w": np.ones((3, 2), np.uint8),
        "w_scale": np.array(0.1, np.float32),
        "w_zero": np.array(0, np.uint8),
        "y_scale": np.array(0.2, np.float32),
        "y_zero": np.array(0, np.uint8),
    }
    graph = helper.make_graph(
        nodes,
        "g",
        [vi("x", TensorProto.FLOAT, [4, 3])],
        [vi("y", TensorProto.FLOAT, [4, 2])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    # y_scale reaches the output through DequantizeLinear's scale slot only: state as well
    assert gradient_free_initializers(model.graph) == set(inits)
    converted = convert(model)
    assert not list(converted.named_parameters())
    x = torch.randn(4, 3, requires_grad=True)
    assert not converted(x).requires_grad


# ---------------------------------------------------------------- com.microsoft Q / DQ


@pytest.mark.parametrize(
    ("zero_type", "axis"),
    [(np.uint8, None), (np.int8, None), (np.int16, None), (np.int8, 1), (np.uint8, 0)],
)
def test_microsoft_quantize_and_dequantize_linear_match_onnxruntime(
    zero_type: Any, axis: int | None
) -> None:
    rng = np.random.default_rng(23)
    x = rng.standard_normal((3, 5)).astype(np.float32) * 4
    x[0, :3] = [0.25, 0.75, -0.25]  # ties at scale 0.5
    count = x.shape[axis] if axis is not None else 1
    shape = (count,) if axis is not None else ()
    scale = (np.full(shape, 0.5) if zero_type != np.int16 else np.full(shape, 0.001)).astype(
        np.float32
    )
    feeds = {"x": x, "scale": scale, "zero_point": np.asarray(_ints(rng, zero_type, shape) // 4)}
    attrs: dict[str, Any] = {} if axis is None else {"axis": axis}
    q = helper.make_node("QuantizeLinear", list(feeds), ["q"], domain=MS, **attrs)
    (integers,) = _check_exact(
        q, feeds, {"q": NP_TO_ONNX[np.dtype(zero_type)]}, opset=13, reference=False
    )
    dq_feeds = {"q": integers, "scale": scale, "zero_point": feeds["zero_point"]}
    dq = helper.make_node("DequantizeLinear", list(dq_feeds), ["y"], domain=MS, **attrs)
    _check_exact(dq, dq_feeds, {"y": TensorProto.FLOAT}, opset=13, reference=False)


def test_microsoft_dequantize_linear_reads_int32() -> None:
    feeds = {
        "x": np.array([-70000, -3, 0, 5, 123456], np.int32),
        "scale": np.array(0.125, np.float32),
    }
    node = helper.make_node("DequantizeLinear", list(feeds), ["y"], domain=MS)
    _check_exact(node, feeds, {"y": TensorProto.FLOAT}, opset=13, reference=False)


def test_a_microsoft_q_dq_pair_is_fake_quantisation_with_state_scales() -> None:
    vi = helper.make_tensor_value_info
    inits: dict[str, np.ndarray] = {
        "scale": np.array(0.25, np.float32),
        "zero": np.array(3, np.int8),
    }
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], domain=MS),
            helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], domain=MS),
        ],
        "g",
        [vi("x", TensorProto.FLOAT, [6])],
        [vi("y", TensorProto.FLOAT, [6])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(MS, 1)],
        ir_version=8,
    )
    x = np.array([-40.0, -1.1, 0.0, 0.3, 1.2, 40.0], np.float32)
    (expected,) = run_onnxruntime(model, {"x": x})
    assert gradient_free_initializers(model.graph) == set(inits)
    converted = convert(model)
    assert not list(converted.named_parameters())
    inputs = torch.from_numpy(x).requires_grad_()
    y = converted(inputs)
    np.testing.assert_array_equal(y.detach().numpy(), expected)
    y.sum().backward()
    assert inputs.grad is not None  # straight through inside the range, zero where clamped
    assert inputs.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_microsoft_quantize_linear_to_uint16_is_refused() -> None:
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], domain=MS)],
        "g",
        [vi("x", TensorProto.FLOAT, [2])],
        [vi("q", TensorProto.UINT16, [2])],
        [
            numpy_helper.from_array(np.array(0.5, np.float32), "scale"),
            numpy_helper.from_array(np.array(7, np.uint16), "zero"),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(MS, 1)],
        ir_version=8,
    )
    with pytest.raises(UnsupportedModelError, match="uint16 is not supported: torch has no uint16"):
        convert(model)


# ---------------------------------------------------------------- MatMulNBits


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Integers in [0, 2^bits) along the last axis, 8/bits a byte, low bits first."""
    per = 8 // bits
    pad = (-values.shape[-1]) % per
    values = np.concatenate([values, np.zeros((*values.shape[:-1], pad), values.dtype)], -1)
    grouped = values.reshape(*values.shape[:-1], -1, per).astype(np.uint8)
    packed = np.zeros(grouped.shape[:-1], np.uint8)
    for j in range(per):
        packed |= grouped[..., j] << (bits * j)
    return packed


def _nbits_case(
    *,
    bits: int,
    block_size: int,
    k: int,
    n: int,
    zero_points: str,
    bias: bool,
    g_idx: bool = False,
    a_shape: tuple[int, ...] = (3,),
    seed: int = 0,
) -> tuple[onnx.NodeProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A MatMulNBits node, its A feed and its weights (as initializers)."""
    rng = np.random.default_rng(seed)
    n_blocks = -(-k // block_size)
    q = rng.integers(0, 1 << bits, (n, n_blocks, block_size))
    weights = {
        "B": _pack(q, bits),
        "scales": rng.uniform(0.01, 0.1, (n, n_blocks)).astype(np.float32).reshape(-1),
    }
    if zero_points == "packed":
        weights["zero_points"] = _pack(rng.integers(0, 1 << bits, (n, n_blocks)), bits)
    elif zero_points == "float":
        weights["zero_points"] = rng.uniform(0, (1 << bits) - 1, (n, n_blocks)).astype(np.float32)
    if g_idx:
        order = np.repeat(np.arange(n_blocks), block_size)[:k]
        weights["g_idx"] = rng.permutation(order).astype(np.int32)
    if bias:
        weights["bias"] = rng.standard_normal(n).astype(np.float32)
    names = ["A", "B", "scales"]
    for name in ("zero_points", "g_idx", "bias"):
        names.append(name if name in weights else "")
    while not names[-1]:
        names.pop()
    node = helper.make_node(
        "MatMulNBits", names, ["Y"], domain=MS, K=k, N=n, bits=bits, block_size=block_size
    )
    feeds = {"A": rng.standard_normal((*a_shape, k)).astype(np.float32)}
    return node, feeds, weights


def _check_nbits(
    node: onnx.NodeProto, feeds: dict[str, np.ndarray], weights: dict[str, np.ndarray]
) -> Any:
    """onnxruntime's result, from the converted model (stored weights: a float MatMul,
    weight_only_quantization.py) and from the op itself (weights given at run time)."""
    from service.engine.onnx.ops.microsoft_quantize import matmul_nbits
    from tests.support.recurrent_zoo import node_context

    model = _model(node, feeds, {"Y": TensorProto.FLOAT}, opset=21, initializers=weights)
    (expected,) = run_onnxruntime(model, feeds)
    op_inputs = [torch.from_numpy(weights[name]) if name else None for name in node.input[1:]]
    from_op = matmul_nbits(node_context(node, 1))(torch.from_numpy(feeds["A"]), *op_inputs)
    graph = convert(model)
    y = graph(torch.from_numpy(feeds["A"]))
    for got in (y, from_op):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-4, atol=1e-4)
    return graph


@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("zero_points", ["none", "packed", "float"])
@pytest.mark.parametrize("k_extra", [0, 5], ids=["k_whole_blocks", "k_partial_block"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_matmul_nbits_4_bits_matches_onnxruntime(
    block_size: int, zero_points: str, k_extra: int, bias: bool
) -> None:
    node, feeds, weights = _nbits_case(
        bits=4, block_size=block_size, k=2 * block_size + k_extra, n=7, zero_points=zero_points,
        bias=bias, seed=block_size + k_extra,
    )  # fmt: skip
    _check_nbits(node, feeds, weights)


@pytest.mark.parametrize("bits", [2, 8])
@pytest.mark.parametrize("zero_points", ["none", "packed"])
def test_matmul_nbits_2_and_8_bits_match_onnxruntime(bits: int, zero_points: str) -> None:
    node, feeds, weights = _nbits_case(
        bits=bits, block_size=32, k=75, n=6, zero_points=zero_points, bias=True, seed=bits
    )
    _check_nbits(node, feeds, weights)


@pytest.mark.parametrize("zero_points", ["none", "float"])
def test_matmul_nbits_with_g_idx_matches_onnxruntime(zero_points: str) -> None:
    node, feeds, weights = _nbits_case(
        bits=4, block_size=16, k=48, n=5, zero_points=zero_points, bias=False, g_idx=True
    )
    _check_nbits(node, feeds, weights)


def test_matmul_nbits_with_batched_a_matches_onnxruntime() -> None:
    node, feeds, weights = _nbits_case(
        bits=4, block_size=32, k=40, n=3, zero_points="packed", bias=True, a_shape=(2, 4)
    )
    _check_nbits(node, feeds, weights)


def test_a_stored_matmul_nbits_weight_is_a_float_parameter() -> None:
    """The packed weight, its scales and zero points are no parameters; the dequantized
    weight is one (weight_only_quantization.py), with the gradient of y = A·W + bias."""
    node, feeds, weights = _nbits_case(
        bits=4, block_size=16, k=20, n=4, zero_points="float", bias=True
    )
    model = _model(node, feeds, {"Y": TensorProto.FLOAT}, opset=21, initializers=weights)
    assert gradient_free_initializers(model.graph) == {"B", "scales", "zero_points"}
    graph = convert(model)
    params = dict(graph.named_graph_parameters())
    assert set(params) == {"bias", "B_dequantized"} and params["B_dequantized"].shape == (20, 4)
    a = torch.from_numpy(feeds["A"]).requires_grad_()
    graph(a).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    torch.testing.assert_close(params["bias"].grad, torch.full((4,), 3.0), rtol=0, atol=0)
    torch.testing.assert_close(
        params["B_dequantized"].grad, a.detach().sum(0)[:, None].expand(20, 4)
    )
    assert any("stored packed in 2/4/8 bits" in note for note in graph.metadata["notes"])


def test_matmul_nbits_gradcheck_in_float64() -> None:
    from service.engine.onnx.ops.microsoft_quantize import matmul_nbits
    from tests.support.recurrent_zoo import node_context

    node, feeds, weights = _nbits_case(
        bits=4, block_size=16, k=21, n=3, zero_points="packed", bias=True
    )
    fn = matmul_nbits(node_context(node, 1))
    b = torch.from_numpy(weights["B"])
    scales = torch.from_numpy(weights["scales"]).double()
    zero_points = torch.from_numpy(weights["zero_points"])
    a = torch.from_numpy(feeds["A"]).double().requires_grad_()
    bias = torch.from_numpy(weights["bias"]).double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, bias: fn(a, b, scales, zero_points, None, bias), (a, bias)
    )


def test_matmul_nbits_with_an_empty_weight_gives_the_bias() -> None:
    node, feeds, weights = _nbits_case(
        bits=4, block_size=16, k=32, n=4, zero_points="none", bias=True
    )
    weights["B"] = np.zeros((4, 0, 8), np.uint8)  # an omitted projection
    _check_nbits(node, feeds, weights)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bits": 3}, "bits=3 is not supported"),
        ({"block_size": 24}, "block_size=24 is not a power of two"),
        ({"weight_prepacked": 1}, "weight_prepacked"),
        ({"g_idx_with_packed_zero_points": True}, "g_idx with packed uint8 zero points"),
    ],
)
def test_matmul_nbits_refusals(change: dict[str, Any], message: str) -> None:
    with_g_idx = change.pop("g_idx_with_packed_zero_points", False)
    node, feeds, weights = _nbits_case(
        bits=4, block_size=16, k=32, n=4, zero_points="packed", bias=False, g_idx=with_g_idx
    )
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute} | change
    node = helper.make_node(node.op_type, list(node.input), ["Y"], domain=MS, **attrs)
    model = _model(node, feeds, {"Y": TensorProto.FLOAT}, opset=21, initializers=weights)
    with pytest.raises(UnsupportedModelError, match=message):
        convert(model)


# ---------------------------------------------------------------- end to end


class _MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _exported_mlp() -> bytes:
    """A [2, 3, 16] input: the Linear layers export as MatMul + Add (a 2-D one gives Gemm,
    which `quantize_dynamic` leaves in float); constant folding makes each transposed weight
    the MatMul's initializer, which the quantisers need."""
    torch.manual_seed(0)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter's deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _MLP().eval(),
            (torch.randn(2, 3, 16),),
            buffer,  # type: ignore[arg-type]
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            opset_version=13,
            do_constant_folding=True,
        )
    return buffer.getvalue()


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("weight_type", ["QInt8", "QUInt8"])
def test_a_dynamically_quantized_mlp_matches_onnxruntime(
    tmp_path: Any, weight_type: str, per_channel: bool
) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = tmp_path / "mlp.onnx", tmp_path / "mlp.int8.onnx"
    source.write_bytes(_exported_mlp())
    quantize_dynamic(source, target, weight_type=QuantType[weight_type], per_channel=per_channel)
    model = onnx.load(target)
    ops = {node.op_type for node in model.graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    x = np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32)
    (expected,) = run_onnxruntime(model, {"x": x})
    expected_grads = _fake_quantized_reference(model, x)  # (conversion releases the weights)
    graph = convert(model)
    y = graph(torch.from_numpy(x)).detach().numpy()
    # the same integers, then float32 scaling and bias in either order: a few ulps
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    # computed as fake quantisation (dynamic_quantization.py): the integer weights are float
    # parameters, the scales are not, and the gradients are those of the same computation in
    # torch with each activation's rounding passed straight through
    params = dict(graph.named_graph_parameters())
    assert set(params) == {"fc1.bias", "fc2.bias", "onnx::MatMul_12", "onnx::MatMul_13"}
    graph(torch.from_numpy(x)).square().sum().backward()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(params[name].grad, grad, rtol=1e-5, atol=1e-6)
    assert any("dynamically quantised model" in note for note in graph.metadata["notes"])
    # the service's conformance check (onnxruntime with its graph optimisations) agrees
    check = check_conversion(model, graph, [torch.from_numpy(x)])
    assert check.checked, check.reason
    assert check.max_abs_error is not None and check.max_abs_error < 1e-5
    assert "quantises 2 activation(s) at run time" in (check.reason or ""), check.reason


def _gradients(y: torch.Tensor, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(y.square().sum(), list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


def _fake_quantized_reference(model: onnx.ModelProto, x: np.ndarray) -> dict[str, torch.Tensor]:
    """The quantised MLP written in torch from its initializers, each activation quantised as
    DynamicQuantizeLinear does: the gradients of sum(y²)."""
    init = initializers(model)
    leaves = {n: dequantized_leaf(init, n) for n in ("onnx::MatMul_12", "onnx::MatMul_13")}
    leaves |= {n: init[n].clone().requires_grad_() for n in ("fc1.bias", "fc2.bias")}
    h = torch.relu(
        fake_dynamic_quantized(torch.from_numpy(x)) @ leaves["onnx::MatMul_12"] + leaves["fc1.bias"]
    )
    return _gradients(
        fake_dynamic_quantized(h) @ leaves["onnx::MatMul_13"] + leaves["fc2.bias"], leaves
    )


def test_a_dynamically_quantized_cnn_has_its_conv_weights_as_parameters(tmp_path: Any) -> None:
    """quantize_dynamic's ConvInteger (per tensor, padding with the zero point) becomes a
    fake-quantised Conv with the source's weight names."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)
    )
    x = torch.randn(2, 3, 8, 8)
    source, target = tmp_path / "cnn.onnx", tmp_path / "cnn.int8.onnx"
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter's deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), buffer, dynamo=False, input_names=["x"])  # type: ignore[arg-type]
    source.write_bytes(buffer.getvalue())
    quantize_dynamic(source, target, weight_type=QuantType.QUInt8, op_types_to_quantize=["Conv"])
    model = onnx.load(target)
    assert "ConvInteger" in {node.op_type for node in model.graph.node}
    init = initializers(model)
    leaves = {n: dequantized_leaf(init, n) for n in ("0.weight", "2.weight")}
    leaves |= {n: init[n].clone().requires_grad_() for n in ("0.bias", "2.bias")}
    h = torch.relu(
        F.conv2d(fake_dynamic_quantized(x), leaves["0.weight"], leaves["0.bias"], padding=1)
    )
    expected = _gradients(
        F.conv2d(fake_dynamic_quantized(h), leaves["2.weight"], leaves["2.bias"]), leaves
    )

    graph = convert(model)
    params = dict(graph.named_graph_parameters())
    assert set(params) == set(leaves)
    graph(x).square().sum().backward()
    for name, grad in expected.items():
        torch.testing.assert_close(params[name].grad, grad, rtol=1e-5, atol=1e-6)
    check = check_conversion(model, graph, [x])
    assert check.checked and check.max_abs_error is not None and check.max_abs_error < 1e-5


class _Embedder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.emb(ids)))


def test_a_dynamically_quantized_embedding_table_is_a_parameter(tmp_path: Any) -> None:
    """quantize_dynamic gathers an embedding's integer rows, then dequantizes them: the table
    is dequantized before the Gather (the same values), so it is `emb.weight` again, with the
    gradient of the same computation in torch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 7))
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter's deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(_Embedder().eval(), (ids,), buffer, dynamo=False, input_names=["ids"])  # type: ignore[arg-type]
    source, target = tmp_path / "emb.onnx", tmp_path / "emb.int8.onnx"
    source.write_bytes(buffer.getvalue())
    quantize_dynamic(source, target, weight_type=QuantType.QUInt8)
    model = onnx.load(target)
    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    assert gather.input[0] == "emb.weight_quantized"  # the premise: integer rows gathered
    init = initializers(model)
    product = next(n.input[1] for n in model.graph.node if n.op_type == "MatMulInteger")
    weight = product.removesuffix("_quantized")
    leaves = {n: dequantized_leaf(init, n) for n in ("emb.weight", weight)}
    leaves["fc.bias"] = init["fc.bias"].clone().requires_grad_()
    h = torch.relu(leaves["emb.weight"][ids])
    expected = _gradients(fake_dynamic_quantized(h) @ leaves[weight] + leaves["fc.bias"], leaves)

    graph = convert(model)
    params = dict(graph.named_graph_parameters())
    assert set(params) == set(leaves)
    graph(ids).square().sum().backward()
    for name, grad in expected.items():
        torch.testing.assert_close(params[name].grad, grad, rtol=1e-5, atol=1e-6)
    assert any("integer table(s) gathered" in note for note in graph.metadata["notes"])
    check = check_conversion(model, graph, [ids])
    assert check.checked and check.max_abs_error is not None and check.max_abs_error < 1e-5


def test_an_mlp_quantized_to_matmul_nbits_matches_onnxruntime(tmp_path: Any) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load_from_string(_exported_mlp())
    config = DefaultWeightOnlyQuantConfig(block_size=16, is_symmetric=False)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    quantized = quantizer.model.model
    assert "MatMulNBits" in {node.op_type for node in quantized.graph.node}
    x = np.random.default_rng(1).standard_normal((2, 3, 16)).astype(np.float32)
    (expected,) = run_onnxruntime(quantized, {"x": x})
    graph = convert(quantized)
    # the weights, float parameters under the source's names (`<name>_Q4` → `<name>`)
    assert set(dict(graph.named_graph_parameters())) == {
        "fc1.bias", "fc2.bias", "onnx::MatMul_12", "onnx::MatMul_13"
    }  # fmt: skip
    y = graph(torch.from_numpy(x).requires_grad_())
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert all(p.grad is not None for p in graph.parameters())
    check = check_conversion(quantized, graph, [torch.from_numpy(x)])
    assert check.checked, check.reason
    assert check.max_abs_error is not None and check.max_abs_error < 1e-4


def test_matmul_nbits_accuracy_level_is_compared_at_full_precision() -> None:
    """accuracy_level=4 (onnxruntime-genai's CPU exports) lets onnxruntime quantise A to int8:
    the conformance check asks it for the float product the converter computes, and says so."""
    node, feeds, weights = _nbits_case(
        bits=4, block_size=32, k=64, n=8, zero_points="none", bias=False, a_shape=(4,)
    )
    node.attribute.append(helper.make_attribute("accuracy_level", 4))
    model = _model(node, feeds, {"Y": TensorProto.FLOAT}, opset=21, initializers=weights)
    graph = convert(model, release_weights=False)
    check = check_conversion(model, graph, [torch.from_numpy(feeds["A"])])
    assert check.max_abs_error is not None and check.max_abs_error < 1e-5
    assert check.reason is not None and "accuracy_level" in check.reason


def test_gathered_integer_rows_returned_as_they_are_are_left_alone() -> None:
    """No DequantizeLinear after the Gather (the rows are the graph's output): nothing to
    dequantize first, the table stays an integer constant."""
    table = np.arange(12, dtype=np.int8).reshape(4, 3)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["t", "ids"], ["rows"])],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("rows", TensorProto.INT8, None)],
        [numpy_helper.from_array(table, "t")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    converted = convert(model)
    assert list(converted.parameters()) == []
    np.testing.assert_array_equal(converted(torch.tensor([0, 2])).numpy(), table[[0, 2]])
