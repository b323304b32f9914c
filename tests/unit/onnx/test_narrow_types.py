"""INT2/UINT2 (opset 25), FLOAT4E2M1 (opset 23) and FLOAT8E8M0 (opset 24): packed initializers
unpacked one value per byte and packed back bit for bit; Cast/CastLike to them against onnx's
reference (bits, the sign of zero included) or, for FLOAT8E8M0's edges, onnxruntime, which
follows Cast's table where the reference does not; QuantizeLinear/DequantizeLinear with
per-axis, blocked and FLOAT8E8M0 scales; and an MXFP4 weight (FLOAT4E2M1 in blocks scaled by
FLOAT8E8M0) that becomes a float parameter with a gradient."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from service.engine.onnx.conformance import check_conversion
from service.engine.onnx.convert import convert, tensor_from_proto
from service.engine.onnx.ops._util import sub_byte_proto
from service.errors import UnsupportedModelError
from tests.support.recurrent_zoo import run_onnxruntime

NP_TYPES: dict[int, Any] = {
    t: helper.tensor_dtype_to_np_dtype(t)
    for t in (TensorProto.INT2, TensorProto.UINT2, TensorProto.FLOAT4E2M1, TensorProto.FLOAT8E8M0)
}
values = helper.make_tensor_value_info


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializer: list[TensorProto] | None = None,
    opset: int = 25,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "narrow", inputs, outputs, initializer=initializer or [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=11)


def _reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with np.errstate(invalid="ignore", over="ignore"):
        return [np.asarray(v) for v in ReferenceEvaluator(model).run(None, feeds)]


def _bits(array: np.ndarray) -> np.ndarray:
    """One byte per value (`ml_dtypes` narrow types are one a byte): compared bit for bit."""
    return np.ascontiguousarray(array).view(np.uint8)


def _torch_bits(tensor: torch.Tensor, onnx_type: int) -> np.ndarray:
    """The ONNX encoding of a converted tensor: FLOAT4E2M1's 4-bit codes, else its bytes."""
    held = tensor.detach()
    if onnx_type == TensorProto.FLOAT4E2M1:
        return held.float().numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    if onnx_type in (TensorProto.INT2, TensorProto.UINT2):
        return held.numpy().astype(NP_TYPES[onnx_type]).view(np.uint8)
    return held.view(torch.uint8).numpy()


# ---- packed initializers -------------------------------------------------------------------

_ARRAYS: dict[int, np.ndarray] = {
    TensorProto.INT2: np.array([-2, -1, 0, 1, 1, -2, 0]),
    TensorProto.UINT2: np.array([0, 1, 2, 3, 3, 2, 1]),
    TensorProto.FLOAT4E2M1: np.array([0.5, -0.0, 6, -6, 1.5, -3, 4]),
    TensorProto.FLOAT8E8M0: np.array([2.0**-127, 0.125, 1, 2**127, np.nan, 4, 0.5]),
}


@pytest.mark.parametrize("count", [1, 2, 3, 5, 6, 7])
@pytest.mark.parametrize("onnx_type", list(_ARRAYS), ids=lambda t: TensorProto.DataType.Name(t))
def test_a_packed_initializer_round_trips_bit_for_bit(onnx_type: int, count: int) -> None:
    """Odd counts leave padding in the last byte (4 values a byte for INT2, 2 for FLOAT4E2M1)."""
    array = _ARRAYS[onnx_type][:count].astype(np.float32).astype(NP_TYPES[onnx_type])
    proto = numpy_helper.from_array(array, "w")
    tensor = tensor_from_proto(proto)
    assert tensor.shape == (count,)
    np.testing.assert_array_equal(_torch_bits(tensor, onnx_type), _bits(array))
    if onnx_type != TensorProto.FLOAT8E8M0:  # (a byte a value: not packed)
        assert sub_byte_proto("w", tensor, onnx_type).raw_data == proto.raw_data
    # through a model: its value, and the proto refilled as it was (release_weights=False)
    model = _model(
        [helper.make_node("Cast", ["w"], ["y"], to=TensorProto.FLOAT)],
        [],
        [values("y", TensorProto.FLOAT, [count])],
        [proto],
    )
    (want,) = _reference(model, {})
    packed = proto.raw_data
    (got,) = convert(model, release_weights=False).run([])
    np.testing.assert_array_equal(got.numpy(), want)
    assert model.graph.initializer[0].raw_data == packed


def test_a_scalar_float4_initializer_stays_a_scalar() -> None:
    proto = numpy_helper.from_array(np.array(-1.5, np.float32).astype(ml_dtypes.float4_e2m1fn))
    tensor = tensor_from_proto(proto)
    assert tensor.shape == () and tensor.dtype == torch.float8_e4m3fn and float(tensor) == -1.5


def test_an_int32_data_initializer_unpacks_as_raw_data() -> None:
    """helper.make_tensor without raw stores INT2 packed in int32_data."""
    proto = helper.make_tensor("w", TensorProto.INT2, [5], [-2, -1, 0, 1, 1])
    assert not proto.HasField("raw_data")
    assert tensor_from_proto(proto).tolist() == [-2, -1, 0, 1, 1]


# ---- Cast / CastLike -----------------------------------------------------------------------

# FLOAT4E2M1's ties (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5), just off them, out of range, ±inf,
# NaN (no encoding: -0 in the reference), -0 and small negative values (-0)
_FLOAT4_SWEEP = np.array(
    [
        *(0.0, -0.0, 0.25, 0.2500001, -0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 4.9, 5.0001),
        *(-0.1, 6.0, 6.9, 7.0, 100.0, -7.0, -6e4, np.inf, -np.inf, np.nan, 0.74, -1.3),
    ],
    np.float32,
)


@pytest.mark.parametrize("source", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("saturate", [1, 0])
def test_cast_to_float4_rounds_saturates_and_keeps_signed_zeros(source: Any, saturate: int) -> None:
    """Rounded to nearest even, ±6 beyond (±inf too, `saturate` or not), NaN → -0; then back
    to float and to FLOAT8E4M3FN exactly; CastLike with a FLOAT4E2M1 `like`."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(source))
    x = _FLOAT4_SWEEP.astype(source)
    fp4 = TensorProto.FLOAT4E2M1
    nodes = [
        helper.make_node("Cast", ["x"], ["q"], to=fp4, saturate=saturate),
        helper.make_node("Cast", ["q"], ["back"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["q"], ["f8"], to=TensorProto.FLOAT8E4M3FN),
        helper.make_node("CastLike", ["x", "like"], ["like_q"], saturate=saturate),
    ]
    n = len(x)
    model = _model(
        nodes,
        [values("x", elem, [n]), values("like", fp4, [1])],
        [
            values("q", fp4, [n]),
            values("back", TensorProto.FLOAT, [n]),
            values("f8", TensorProto.FLOAT8E4M3FN, [n]),
            values("like_q", fp4, [n]),
        ],
    )
    like = np.array([1.0], np.float32).astype(ml_dtypes.float4_e2m1fn)
    want = _reference(model, {"x": x, "like": like})
    got = convert(model, mode="eval").run(
        [torch.from_numpy(x), torch.tensor([1.0]).to(torch.float8_e4m3fn)]
    )
    assert got[0].dtype == torch.float8_e4m3fn  # FLOAT4E2M1's holder
    np.testing.assert_array_equal(_torch_bits(got[0], fp4), _bits(want[0]))
    np.testing.assert_array_equal(got[1].numpy(), want[1])
    np.testing.assert_array_equal(got[2].view(torch.uint8).numpy(), _bits(want[2]))
    np.testing.assert_array_equal(_torch_bits(got[3], fp4), _bits(want[3]))


def test_cast_to_float4_passes_the_gradient_straight_through_inside_its_range() -> None:
    model = _model(
        [
            helper.make_node("Cast", ["x"], ["q"], to=TensorProto.FLOAT4E2M1),
            helper.make_node("Cast", ["q"], ["y"], to=TensorProto.FLOAT),
        ],
        [values("x", TensorProto.FLOAT, [5])],
        [values("y", TensorProto.FLOAT, [5])],
    )
    x = torch.tensor([-9.0, -0.2, 1.3, 5.9, 7.0], requires_grad=True)
    y = convert(model)(x)
    assert y.tolist() == [-6.0, -0.0, 1.5, 6.0, 6.0]
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


_INT_SWEEP = np.array(
    [
        *(-3.9, -2.5, -2.0, -1.5, -0.5, 0.0, 0.5, 0.9, 1.5, 2.0, 2.7, 3.0, 4.0, 5.5, 7.0),
        *(100.7, -100.7, 255.0, np.nan),
    ],
    np.float32,
)


@pytest.mark.parametrize("onnx_type", [TensorProto.INT2, TensorProto.UINT2], ids=["int2", "uint2"])
def test_casts_to_and_from_int2_wrap_as_the_reference(onnx_type: int) -> None:
    """Truncated toward zero, then the low two bits kept (no saturation; NaN → 0); back to
    float and int8, and to INT4 (UINT4) from them; CastLike with an INT2 `like`."""
    holder = torch.int8 if onnx_type == TensorProto.INT2 else torch.uint8
    four_bits = TensorProto.INT4 if onnx_type == TensorProto.INT2 else TensorProto.UINT4
    nodes = [
        helper.make_node("Cast", ["x"], ["bits"], to=onnx_type),
        helper.make_node("Cast", ["bits"], ["back"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["bits"], ["as_int8"], to=TensorProto.INT8),
        helper.make_node("Cast", ["bits"], ["as_int4"], to=four_bits),
        helper.make_node("CastLike", ["x", "like"], ["like_bits"]),
    ]
    n = len(_INT_SWEEP)
    model = _model(
        nodes,
        [values("x", TensorProto.FLOAT, [n]), values("like", onnx_type, [1])],
        [
            values("bits", onnx_type, [n]),
            values("back", TensorProto.FLOAT, [n]),
            values("as_int8", TensorProto.INT8, [n]),
            values("as_int4", four_bits, [n]),
            values("like_bits", onnx_type, [n]),
        ],
    )
    like = np.array([1]).astype(NP_TYPES[onnx_type])
    want = _reference(model, {"x": _INT_SWEEP, "like": like})
    got = convert(model).run([torch.from_numpy(_INT_SWEEP), torch.tensor([1], dtype=holder)])
    assert got[0].dtype == holder
    for ours, expected in zip(got, want, strict=True):
        np.testing.assert_array_equal(ours.numpy(), expected.astype(np.float32))


# FLOAT8E8M0's edges: zero, float32 subnormals (2^-127 exactly), the midpoint 1.5 x 2^e, past
# 2^127, ±inf, NaN, negative values
_E8M0_SWEEP = np.array(
    [
        *(0.0, -0.0, 1e-45, 2.0**-127, 1.5 * 2.0**-127, 2.0**-126, 0.124, 0.1875, 0.75, 1.0),
        *(1.25, 1.5, 3.0, 1.7e38, 2.0**127, 1.5 * 2.0**127, 3e38, np.inf, -np.inf, np.nan),
        *(-1.0, -3.0),
    ],
    np.float32,
)


def _e8m0_model(saturate: int, round_mode: str) -> onnx.ModelProto:
    n = len(_E8M0_SWEEP)
    nodes = [
        helper.make_node(
            "Cast",
            ["x"],
            ["e"],
            to=TensorProto.FLOAT8E8M0,
            saturate=saturate,
            round_mode=round_mode,
        ),
        helper.make_node("Cast", ["e"], ["y"], to=TensorProto.FLOAT),
    ]
    return _model(
        nodes, [values("x", TensorProto.FLOAT, [n])], [values("y", TensorProto.FLOAT, [n])]
    )


@pytest.mark.parametrize("round_mode", ["up", "down", "nearest"])
@pytest.mark.parametrize("saturate", [1, 0])
def test_cast_to_float8e8m0_follows_casts_table_as_onnxruntime(
    saturate: int, round_mode: str
) -> None:
    """onnxruntime follows Cast's table (saturating: Inf → E8M0_MAX, below E8M0_MIN → E8M0_MIN;
    else NaN); onnx's reference gives NaN for ±inf and rounds 2^-127 up. Where the table is
    silent (negative values) we follow onnxruntime too: onnxruntime checks our conversion."""
    model = _e8m0_model(saturate, round_mode)
    (want,) = run_onnxruntime(model, {"x": _E8M0_SWEEP})
    with torch.no_grad():
        (got,) = convert(model).run([torch.from_numpy(_E8M0_SWEEP)])
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("round_mode", ["up", "down", "nearest"])
@pytest.mark.parametrize("source", [np.float32, np.float16])
def test_cast_to_float8e8m0_agrees_with_the_reference_on_positive_normal_values(
    round_mode: str, source: Any
) -> None:
    x = np.exp2(np.linspace(-14.0, 15.0, 301)).astype(source)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(source))
    node = helper.make_node(
        "Cast", ["x"], ["e"], to=TensorProto.FLOAT8E8M0, saturate=0, round_mode=round_mode
    )
    model = _model([node], [values("x", elem, [301])], [values("e", TensorProto.FLOAT8E8M0, [301])])
    (want,) = _reference(model, {"x": x})
    (got,) = convert(model).run([torch.from_numpy(x)])
    assert got.dtype == torch.float8_e8m0fnu
    np.testing.assert_array_equal(got.view(torch.uint8).numpy(), _bits(want))


def test_an_unknown_round_mode_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="round_mode 'zero'"):
        convert(_e8m0_model(1, "zero"))


def test_bitcast_of_a_narrow_type_is_refused() -> None:
    """Their holders hold values, not the narrow type's bits."""
    model = _model(
        [helper.make_node("BitCast", ["x"], ["y"], to=TensorProto.UINT4)],
        [values("x", TensorProto.FLOAT4E2M1, [4])],
        [values("y", TensorProto.UINT4, [4])],
        opset=26,
    )
    with pytest.raises(UnsupportedModelError, match="BitCast to or from FLOAT4E2M1"):
        convert(model)


# ---- QuantizeLinear / DequantizeLinear -----------------------------------------------------


def _qdq_model(
    target: int,
    scale: np.ndarray,
    x_shape: list[int],
    attrs: dict[str, Any],
    dq_attrs: dict[str, Any] | None = None,
    zero_point: bool = True,
) -> onnx.ModelProto:
    """x → QuantizeLinear → (q, DequantizeLinear → y)."""
    inits = [numpy_helper.from_array(scale, "scale")]
    if zero_point:
        zeros = np.zeros(scale.shape, np.float32).astype(NP_TYPES[target])
        inits.append(numpy_helper.from_array(zeros, "zp"))
    q_attrs = dict(attrs) if zero_point else {**attrs, "output_dtype": target}
    names = [i.name for i in inits]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", *names], ["q"], **q_attrs),
        helper.make_node("DequantizeLinear", ["q", *names], ["y"], **attrs, **(dq_attrs or {})),
    ]
    return _model(
        nodes,
        [values("x", TensorProto.FLOAT, x_shape)],
        [values("q", target, x_shape), values("y", TensorProto.FLOAT, x_shape)],
        inits,
    )


def _x(shape: tuple[int, ...]) -> np.ndarray:
    # past FLOAT4E2M1's ±6 and INT2's range at these scales, ties included
    count = int(np.prod(shape))
    return np.linspace(-15.0, 15.0, count, dtype=np.float32).reshape(shape)


_E8M0_BLOCK_SCALES = np.array([[0.5, 2.0], [1.0, 4.0], [0.25, 1.0]], np.float32)


@pytest.mark.parametrize(
    ("scale", "attrs"),
    [
        (np.array([0.5, 2.0, 1.0], np.float32), {"axis": 0}),
        (np.array([[0.5, 2.0], [1.0, 4.0], [0.25, 1.0]], np.float32), {"axis": 1, "block_size": 4}),
        (_E8M0_BLOCK_SCALES.astype(ml_dtypes.float8_e8m0fnu), {"axis": 1, "block_size": 4}),
    ],
    ids=["per_axis", "blocked", "blocked_e8m0"],
)
@pytest.mark.parametrize("zero_point", [True, False], ids=["zero_point", "output_dtype"])
def test_float4_quantize_dequantize_matches_the_reference(
    scale: np.ndarray, attrs: dict[str, Any], zero_point: bool
) -> None:
    """FLOAT4E2M1's integers leaving the graph, and the dequantized values; a FLOAT8E8M0
    scale's DequantizeLinear names its output type (output_dtype)."""
    dq_attrs = {"output_dtype": TensorProto.FLOAT} if scale.dtype.name == "float8_e8m0fnu" else {}
    model = _qdq_model(TensorProto.FLOAT4E2M1, scale, [3, 7], attrs, dq_attrs, zero_point)
    x = _x((3, 7))
    want_q, want_y = _reference(model, {"x": x})
    q, y = convert(model).run([torch.from_numpy(x)])
    np.testing.assert_array_equal(_torch_bits(q, TensorProto.FLOAT4E2M1), _bits(want_q))
    np.testing.assert_array_equal(y.detach().numpy(), want_y)


@pytest.mark.parametrize("onnx_type", [TensorProto.INT2, TensorProto.UINT2], ids=["int2", "uint2"])
def test_int2_quantize_dequantize_matches_the_reference(onnx_type: int) -> None:
    scale = np.array([[0.5, 2.0], [1.0, 4.0], [0.25, 1.0]], np.float32)
    model = _qdq_model(onnx_type, scale, [3, 7], {"axis": 1, "block_size": 4})
    x = _x((3, 7))
    want_q, want_y = _reference(model, {"x": x})
    q, y = convert(model).run([torch.from_numpy(x)])
    np.testing.assert_array_equal(q.numpy(), want_q.astype(np.int32))
    np.testing.assert_array_equal(y.detach().numpy(), want_y)


def _pair(target: int, scale: np.ndarray, zero_point: int) -> onnx.ModelProto:
    """x → QuantizeLinear → DequantizeLinear → y: a fake-quantised pair, per axis 0."""
    inits = [
        numpy_helper.from_array(scale, "scale"),
        numpy_helper.from_array(
            np.full(scale.shape, zero_point, np.float32).astype(NP_TYPES[target]), "zp"
        ),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], axis=0),
        helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], axis=0),
    ]
    return _model(
        nodes,
        [values("x", TensorProto.FLOAT, [2, 9])],
        [values("y", TensorProto.FLOAT, [2, 9])],
        inits,
    )


def test_an_int2_pair_has_torchs_straight_through_gradient() -> None:
    scale = np.array([0.5, 0.25], np.float32)
    x = torch.linspace(-1.6, 1.6, 18).reshape(2, 9).add(0.125).requires_grad_()
    reference = torch.fake_quantize_per_channel_affine(
        x, torch.from_numpy(scale), torch.tensor([1, 1], dtype=torch.int32), 0, -2, 1
    )
    weights = torch.linspace(-1.0, 2.0, x.numel()).reshape(x.shape)
    (expected_grad,) = torch.autograd.grad((reference * weights).sum(), x)
    ours = convert(_pair(TensorProto.INT2, scale, 1))(x)
    (grad,) = torch.autograd.grad((ours * weights).sum(), x)
    torch.testing.assert_close(ours, reference)
    assert (expected_grad == 0).any() and (expected_grad != 0).any()  # some values clamped
    torch.testing.assert_close(grad, expected_grad)


def test_a_float4_pair_passes_the_gradient_inside_its_range_only() -> None:
    scale = np.array([1.0, 0.5], np.float32)
    x = torch.tensor([[-7.0, -5.0, -0.3, 0.75, 2.5, 5.9, 6.2, 10.0, 1.0]] * 2, requires_grad=True)
    y = convert(_pair(TensorProto.FLOAT4E2M1, scale, 0))(x)
    np.testing.assert_array_equal(
        y.detach().numpy(),
        _reference(_pair(TensorProto.FLOAT4E2M1, scale, 0), {"x": x.detach().numpy()})[0],
    )
    (grad,) = torch.autograd.grad(y.sum(), x)
    inside = (x.detach() / torch.tensor([[1.0], [0.5]])).abs() <= 6
    torch.testing.assert_close(grad, inside.float())


def test_a_float8e8m0_scale_needs_output_dtype() -> None:
    scale = _E8M0_BLOCK_SCALES.astype(ml_dtypes.float8_e8m0fnu)
    model = _qdq_model(TensorProto.FLOAT4E2M1, scale, [3, 7], {"axis": 1, "block_size": 4})
    with pytest.raises(UnsupportedModelError, match="FLOAT8E8M0 scale needs output_dtype"):
        convert(model)


# ---- weights -------------------------------------------------------------------------------


def _mxfp4_model(e8m0_scale: bool, output_dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """y = x @ DequantizeLinear(W, scale): W [8, 5] FLOAT4E2M1 in blocks of 4 along axis 0
    (an odd element count), scaled by FLOAT8E8M0 powers of two (MXFP4) or float32."""
    rng = np.random.default_rng(0)
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
    weight = rng.choice(grid, size=(8, 5)).astype(ml_dtypes.float4_e2m1fn)
    scale = np.exp2(rng.integers(-3, 3, size=(2, 5))).astype(np.float32)
    if e8m0_scale:
        scale = scale.astype(ml_dtypes.float8_e8m0fnu)
    dq_attrs: dict[str, Any] = {"axis": 0, "block_size": 4}
    if e8m0_scale:
        dq_attrs["output_dtype"] = output_dtype
    nodes = [
        helper.make_node("DequantizeLinear", ["W", "W_scale"], ["W_dq"], **dq_attrs),
        helper.make_node("MatMul", ["x", "W_dq"], ["y"]),
    ]
    out_type = output_dtype if e8m0_scale else TensorProto.FLOAT
    return _model(
        nodes,
        [values("x", out_type, [3, 8])],
        [values("y", out_type, [3, 5])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(scale, "W_scale")],
    )


@pytest.mark.parametrize(
    ("e8m0_scale", "output_dtype"),
    [(True, TensorProto.FLOAT), (True, TensorProto.FLOAT16), (False, TensorProto.FLOAT)],
    ids=["e8m0_float32", "e8m0_float16", "float_scale"],
)
def test_a_float4_weight_becomes_a_float_parameter_that_trains(
    e8m0_scale: bool, output_dtype: int
) -> None:
    model = _mxfp4_model(e8m0_scale, output_dtype)
    np_type = helper.tensor_dtype_to_np_dtype(output_dtype)
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np_type)
    (expected,) = _reference(model, {"x": x})
    packed = model.graph.initializer[0].raw_data
    graph = convert(model)
    y = graph(torch.from_numpy(x))
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-3)
    params = dict(graph.named_parameters())
    assert list(params) == ["W_dequantized"]
    assert params["W_dequantized"].dtype == torch.from_numpy(np.zeros(0, np_type)).dtype
    y.float().sum().backward()
    assert params["W_dequantized"].grad is not None
    assert params["W_dequantized"].grad.abs().sum() > 0
    # the FLOAT4E2M1 initializer is repacked as it was for a copy of the model
    kept = _mxfp4_model(e8m0_scale, output_dtype)
    convert(kept, release_weights=False)
    assert kept.graph.initializer[0].raw_data == packed


def test_an_int2_weight_only_model_matches_onnxruntime_and_trains() -> None:
    """onnxruntime 1.32 runs INT2 DequantizeLinear (opset 25): the conformance check's copy of
    the model gets the INT2 initializer back, packed four a byte."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-2, 2, size=(8, 5)).astype(ml_dtypes.int2)
    zero_point = rng.integers(-2, 2, size=(2, 5)).astype(ml_dtypes.int2)
    scale = rng.uniform(0.05, 0.2, size=(2, 5)).astype(np.float32)
    inits = [
        numpy_helper.from_array(weight, "W"),
        numpy_helper.from_array(scale, "W_scale"),
        numpy_helper.from_array(zero_point, "W_zero_point"),
    ]
    nodes = [
        helper.make_node(
            "DequantizeLinear", ["W", "W_scale", "W_zero_point"], ["W_dq"], axis=0, block_size=4
        ),
        helper.make_node("MatMul", ["x", "W_dq"], ["y"]),
    ]
    model = _model(
        nodes,
        [values("x", TensorProto.FLOAT, [3, 8])],
        [values("y", TensorProto.FLOAT, [3, 5])],
        inits,
    )
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    (expected,) = run_onnxruntime(model, {"x": x})
    graph = convert(model)
    inputs = [torch.from_numpy(x)]
    y = graph(*inputs)
    torch.testing.assert_close(y.detach(), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    (param,) = dict(graph.named_parameters()).values()
    assert param.grad is not None and param.grad.abs().sum() > 0
    check = check_conversion(model, graph, inputs)
    assert check.checked, check.reason
    assert check.max_abs_error is not None and check.max_abs_error < 1e-5
