"""QuantizeLinear / DequantizeLinear: a quantisation-aware-training (QAT) export's fake
quantisers. Forward values equal onnxruntime's for each form (per tensor, per axis, blocked,
int8/uint8/int16, float8 with and without saturation, a Q whose integers leave the graph); a
Q → DQ pair passes the straight-through gradient of torch's fake_quantize ops (zero where a
value is clamped), and its scale and zero point are state, not parameters."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from service.engine.onnx.convert import convert
from service.errors import UnsupportedModelError
from tests.support.recurrent_zoo import run_onnxruntime

X_SHAPE = [3, 6]


def _q_dq_model(
    *,
    opset: int,
    scale: np.ndarray,
    zero_point: onnx.TensorProto | None,
    q_attrs: dict[str, Any] | None = None,
    dq_attrs: dict[str, Any] | None = None,
    integers_out: bool = False,
) -> onnx.ModelProto:
    """x → QuantizeLinear → DequantizeLinear → y; the integers are an output too if asked."""
    inits = [onnx.numpy_helper.from_array(scale, "scale")]
    qdq_inputs = ["scale"]
    if zero_point is not None:
        inits.append(zero_point)
        qdq_inputs.append(zero_point.name)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", *qdq_inputs], ["q"], **(q_attrs or {})),
        helper.make_node("DequantizeLinear", ["q", *qdq_inputs], ["y"], **(dq_attrs or {})),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if integers_out:
        integer_type = zero_point.data_type if zero_point is not None else TensorProto.UINT8
        outputs.append(helper.make_tensor_value_info("q", integer_type, None))
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, X_SHAPE)],
        outputs,
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _x() -> np.ndarray:
    # spans past int8's range at the scales below, with values on rounding ties
    values = np.linspace(-3.0, 3.0, 18, dtype=np.float32).reshape(X_SHAPE)
    values[0, :3] = [0.25, 0.75, -0.25]
    return values


def _zero_point(dtype: int, values: list[float] | list[int], shape: list[int]) -> TensorProto:
    return helper.make_tensor("zero_point", dtype, shape, values)


CASES = {
    "per_tensor_uint8_opset10": dict(
        opset=10,
        scale=np.array(0.02, np.float32),
        zero_point=_zero_point(TensorProto.UINT8, [128], []),
    ),
    "per_tensor_default_uint8": dict(opset=13, scale=np.array([0.5], np.float32), zero_point=None),
    "per_axis_int8_axis1": dict(
        opset=13,
        scale=np.linspace(0.01, 0.06, 6, dtype=np.float32),
        zero_point=_zero_point(TensorProto.INT8, [0, 1, -2, 3, 0, 5], [6]),
        q_attrs={"axis": 1},
        dq_attrs={"axis": 1},
    ),
    "per_axis_int8_axis0": dict(
        opset=13,
        scale=np.array([0.01, 0.02, 0.05], np.float32),
        zero_point=_zero_point(TensorProto.INT8, [0, 0, 0], [3]),
        q_attrs={"axis": 0},
        dq_attrs={"axis": 0},
    ),
    "blocked_int8": dict(
        opset=21,
        scale=np.array([[0.01, 0.03, 0.05]] * 3, np.float32),
        zero_point=_zero_point(TensorProto.INT8, [1, 0, -1] * 3, [3, 3]),
        q_attrs={"axis": 1, "block_size": 2},
        dq_attrs={"axis": 1, "block_size": 2},
    ),
    "int16": dict(
        opset=21,
        scale=np.array(0.0001, np.float32),
        zero_point=_zero_point(TensorProto.INT16, [7], []),
    ),
    "float8_e4m3fn_saturated": dict(
        opset=19,
        scale=np.array(0.005, np.float32),
        zero_point=_zero_point(TensorProto.FLOAT8E4M3FN, [0.0], []),
    ),
    "float8_e5m2": dict(
        opset=19,
        scale=np.array(0.25, np.float32),
        zero_point=_zero_point(TensorProto.FLOAT8E5M2, [0.0], []),
    ),
}


# a float8 graph output is refused (no batch or report dtype holds it): pairs only
_CASE_OUTPUTS = [
    (case, integers_out)
    for case in CASES
    for integers_out in ([False] if "float8" in case else [False, True])
]


@pytest.mark.parametrize(("case", "integers_out"), _CASE_OUTPUTS)
def test_quantize_dequantize_equals_onnxruntime(case: str, integers_out: bool) -> None:
    model = _q_dq_model(**CASES[case], integers_out=integers_out)  # type: ignore[arg-type]
    x = _x()
    expected = run_onnxruntime(model, {"x": x})
    out = convert(model)(torch.from_numpy(x))
    got = list(out) if integers_out else [out]
    np.testing.assert_allclose(got[0].detach().numpy(), expected[0], rtol=1e-6, atol=1e-7)
    if integers_out:  # the integers themselves, in their ONNX type where torch has it
        assert not got[1].dtype.is_floating_point
        integers = got[1].to(torch.float32).numpy()
        np.testing.assert_array_equal(integers, expected[1].astype(np.float32))


def test_unsaturated_float8_overflows_are_nan_as_onnx_says() -> None:
    model = _q_dq_model(
        opset=19,
        scale=np.array(0.001, np.float32),
        zero_point=_zero_point(TensorProto.FLOAT8E4M3FN, [0.0], []),
        q_attrs={"saturate": 0},
    )
    x = _x()
    expected = run_onnxruntime(model, {"x": x})[0]
    got = convert(model)(torch.from_numpy(x)).detach().numpy()
    assert np.isnan(expected).any()  # the premise: some values overflow float8's 448
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got[~np.isnan(got)], expected[~np.isnan(expected)], rtol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_a_pair_has_torchs_straight_through_gradient(per_channel: bool) -> None:
    """The gradient through Q → DQ is torch.fake_quantize_*'s: 1 where round(x/s)+zp is in
    range, 0 where it is clamped (values past ±3 here)."""
    x = torch.from_numpy(_x()).requires_grad_()
    if per_channel:
        scale = torch.tensor([0.01, 0.02, 0.05])
        zero_point = torch.tensor([0, 3, -2], dtype=torch.int32)
        reference = torch.fake_quantize_per_channel_affine(x, scale, zero_point, 0, -128, 127)
        model = _q_dq_model(
            opset=13,
            scale=scale.numpy(),
            zero_point=_zero_point(TensorProto.INT8, [0, 3, -2], [3]),
            q_attrs={"axis": 0},
            dq_attrs={"axis": 0},
        )
    else:
        reference = torch.fake_quantize_per_tensor_affine(x, 0.02, 5, 0, 255)
        model = _q_dq_model(
            opset=13,
            scale=np.array(0.02, np.float32),
            zero_point=_zero_point(TensorProto.UINT8, [5], []),
        )
    weights = torch.linspace(-1.0, 2.0, x.numel()).reshape(x.shape)
    (expected_grad,) = torch.autograd.grad((reference * weights).sum(), x)
    graph = convert(model)
    ours = graph(x)
    (grad,) = torch.autograd.grad((ours * weights).sum(), x)
    torch.testing.assert_close(ours, reference)
    assert (expected_grad == 0).any() and (expected_grad != 0).any()  # some values clamped
    torch.testing.assert_close(grad, expected_grad)
    assert list(graph.param_names) == []  # the scale is a quantiser's state
    assert "scale" in graph.buffer_names


def test_a_clip_between_q_and_dq_narrows_the_range_and_its_gradient() -> None:
    """The legacy exporter writes a reduced-range quantiser (torch.ao's 0..127 activations) as
    QuantizeLinear → Clip(max 127) → DequantizeLinear."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["q"]),
        helper.make_node("Clip", ["q", "", "high"], ["clipped"]),
        helper.make_node("DequantizeLinear", ["clipped", "scale", "zero_point"], ["y"]),
    ]
    inits = [
        onnx.numpy_helper.from_array(np.array(0.02, np.float32), "scale"),
        helper.make_tensor("zero_point", TensorProto.UINT8, [], [0]),
        helper.make_tensor("high", TensorProto.UINT8, [], [127]),
    ]
    graph_proto = helper.make_graph(
        nodes,
        "clipped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, X_SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(
        graph_proto, opset_imports=[helper.make_opsetid("", 17)], ir_version=10
    )
    expected_out = run_onnxruntime(model, {"x": _x()})[0]  # before convert releases the weights
    x = torch.from_numpy(_x()).requires_grad_()
    out = convert(model)(x)
    np.testing.assert_allclose(out.detach().numpy(), expected_out)
    reference = torch.fake_quantize_per_tensor_affine(x, 0.02, 0, 0, 127)
    (expected,) = torch.autograd.grad(reference.sum(), x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, expected)


def test_an_unsupported_output_dtype_is_refused_before_any_compute() -> None:
    model = _q_dq_model(
        opset=21,
        scale=np.array(0.5, np.float32),
        zero_point=None,
        q_attrs={"output_dtype": TensorProto.UINT2},
    )
    with pytest.raises(UnsupportedModelError, match=r"QuantizeLinear.*output_dtype UINT2"):
        convert(model)
