"""The spectral ops (ops/spectral.py): DFT (opsets 17 and 20), STFT, the window functions and
MelWeightMatrix against onnxruntime; gradcheck in float64 through DFT and STFT; refusals."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from service.engine.onnx.convert import convert
from service.errors import UnsupportedModelError

RNG = np.random.default_rng(0)
REAL = RNG.standard_normal((2, 8, 3, 1)).astype(np.float32)  # [batch, n1, n2, 1]
COMPLEX = RNG.standard_normal((2, 8, 3, 2)).astype(np.float32)
ONESIDED = RNG.standard_normal((2, 5, 3, 2)).astype(np.float32)  # 5 bins of a length-8 signal
SIGNAL = RNG.standard_normal((2, 40, 1)).astype(np.float32)  # [batch, length, 1]
COMPLEX_SIGNAL = RNG.standard_normal((2, 40, 2)).astype(np.float32)
HANN_12 = np.hanning(12).astype(np.float32)


def _model(
    op: str,
    data: dict[str, np.ndarray],
    consts: dict[str, np.ndarray],
    node_inputs: list[str],
    attrs: dict[str, Any] | None = None,
    opset: int = 17,
    out_type: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """A one-node model: `data` as graph inputs, `consts` as initializers, the node reading
    `node_inputs` ("" for an omitted optional input)."""
    node = helper.make_node(op, node_inputs, ["y"], **(attrs or {}))
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)
            )
            for name, value in data.items()
        ],
        [helper.make_tensor_value_info("y", out_type, None)],
        [numpy_helper.from_array(value, name) for name, value in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _ours(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> np.ndarray:
    graph = convert(model, mode="eval", release_weights=False)
    with torch.no_grad():
        out = graph.run([torch.from_numpy(v) for v in data.values()])[0]
    return np.asarray(out.numpy())


def _onnxruntime(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, data)[0])


def _assert_matches(got: np.ndarray, want: np.ndarray, atol: float = 1e-4) -> None:
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol, equal_nan=True)


def _dft_model(
    x: np.ndarray,
    opset: int,
    attrs: dict[str, Any],
    length: int | None = None,
    axis: int | None = None,
) -> onnx.ModelProto:
    """DFT over graph input `x`: dft_length and (opset 20) axis as int64 initializers, axis
    as an attribute at opset 17."""
    attrs, consts, inputs = dict(attrs), {}, ["x", ""]
    if length is not None:
        consts["n"], inputs[1] = np.array(length, np.int64), "n"
    if axis is not None and opset < 20:
        attrs["axis"] = axis
    elif axis is not None:
        consts["axis"] = np.array(axis, np.int64)
        inputs.append("axis")
    return _model("DFT", {"x": x}, consts, inputs, attrs, opset)


DFT_CASES = [
    ("real", REAL, {}, None, None),
    ("complex", COMPLEX, {}, None, None),
    ("inverse", COMPLEX, {"inverse": 1}, None, None),
    ("inverse of a real input", REAL, {"inverse": 1}, None, None),
    ("rfft", REAL, {"onesided": 1}, None, None),
    ("rfft padded", REAL, {"onesided": 1}, 11, None),
    ("irfft", ONESIDED, {"onesided": 1, "inverse": 1}, None, None),
    ("irfft odd length", ONESIDED, {"onesided": 1, "inverse": 1}, 9, None),
    ("zero-padded", COMPLEX, {}, 12, None),
    ("truncated", COMPLEX, {}, 5, None),
    ("axis 2", COMPLEX, {}, None, 2),
    ("axis -2", REAL, {"onesided": 1}, None, -2),
    ("axis -3", COMPLEX, {"inverse": 1}, None, -3),
    ("axis 0", COMPLEX, {}, None, 0),
]


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize(
    ("x", "attrs", "length", "axis"),
    [case[1:] for case in DFT_CASES],
    ids=[case[0] for case in DFT_CASES],
)
def test_dft_matches_onnxruntime(
    opset: int, x: np.ndarray, attrs: dict[str, Any], length: int | None, axis: int | None
) -> None:
    model = _dft_model(x, opset, attrs, length, axis)
    _assert_matches(_ours(model, {"x": x}), _onnxruntime(model, {"x": x}))


@pytest.mark.parametrize(
    ("x", "attrs"),
    [(COMPLEX, {"onesided": 1}), (REAL[:, :5], {"onesided": 1, "inverse": 1})],
    ids=["rfft of a complex input", "irfft of a real input"],
)
def test_dft_outside_the_spec_follows_the_reference(x: np.ndarray, attrs: dict[str, Any]) -> None:
    # onnxruntime refuses these (the spec says RFFT takes real input, IRFFT complex input);
    # onnx's reference implementation, which the backend cases come from, computes them.
    model = _dft_model(x, 20, attrs)
    want = cast(list[Any], ReferenceEvaluator(model).run(None, {"x": x}))[0]
    _assert_matches(_ours(model, {"x": x}), np.asarray(want))


def test_dft_default_axis_differs_between_opsets() -> None:
    # opset 17: axis 1 (the first signal axis); opset 20: -2 (the last one)
    x = COMPLEX
    want_17 = np.fft.fft(x[..., 0] + 1j * x[..., 1], axis=1)
    want_20 = np.fft.fft(x[..., 0] + 1j * x[..., 1], axis=2)
    for opset, want in ((17, want_17), (20, want_20)):
        got = _ours(_dft_model(x, opset, {}), {"x": x})
        np.testing.assert_allclose(got[..., 0] + 1j * got[..., 1], want, rtol=1e-4, atol=1e-5)


def test_dft_half_precision_is_computed_in_float32() -> None:
    x = COMPLEX.astype(np.float16)
    got = _ours(_dft_model(x, 20, {}), {"x": x})
    want = _ours(_dft_model(x.astype(np.float32), 20, {}), {"x": x.astype(np.float32)})
    assert got.dtype == np.float16
    np.testing.assert_allclose(got, want.astype(np.float16), rtol=1e-3, atol=1e-3)


def test_dft_axis_on_the_pair_dimension_is_refused_at_run_time() -> None:
    model = _dft_model(COMPLEX, 20, {}, axis=-1)
    with pytest.raises(ValueError, match="axis -1 is out of range"):
        _ours(model, {"x": COMPLEX})


def _stft_model(
    signal: np.ndarray,
    step: int,
    window: np.ndarray | None,
    frame_length: int | None,
    attrs: dict[str, Any],
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    data, consts = {"s": signal}, {"step": np.array(step, np.int64)}
    inputs = ["s", "step", ""]
    if window is not None:
        data["w"], inputs[2] = window, "w"
    if frame_length is not None:
        consts["n"] = np.array(frame_length, np.int64)
        inputs.append("n")
    return _model("STFT", data, consts, inputs, attrs), data


STFT_CASES = [
    ("no window", SIGNAL, 4, None, 12, {}),
    ("window", SIGNAL, 4, HANN_12, None, {}),
    ("window and frame_length", SIGNAL, 5, HANN_12, 12, {}),
    ("two-sided", SIGNAL, 4, HANN_12, None, {"onesided": 0}),
    ("odd frame, uneven step", SIGNAL, 3, None, 7, {}),
    ("complex signal", COMPLEX_SIGNAL, 6, HANN_12, None, {"onesided": 0}),
    ("complex signal, no window", COMPLEX_SIGNAL, 8, None, 10, {"onesided": 0}),
]


@pytest.mark.parametrize(
    ("signal", "step", "window", "frame_length", "attrs"),
    [case[1:] for case in STFT_CASES],
    ids=[case[0] for case in STFT_CASES],
)
def test_stft_matches_onnxruntime(
    signal: np.ndarray,
    step: int,
    window: np.ndarray | None,
    frame_length: int | None,
    attrs: dict[str, Any],
) -> None:
    model, data = _stft_model(signal, step, window, frame_length, attrs)
    _assert_matches(_ours(model, data), _onnxruntime(model, data))


def test_stft_without_window_or_frame_length_is_one_frame_of_the_whole_signal() -> None:
    model, data = _stft_model(SIGNAL, 8, None, None, {})
    got = _ours(model, data)
    want = np.fft.rfft(SIGNAL[..., 0], axis=1)
    assert got.shape == (2, 1, 21, 2)
    np.testing.assert_allclose(got[:, 0, :, 0] + 1j * got[:, 0, :, 1], want, atol=1e-4)


def test_stft_window_of_another_length_than_frame_length_is_refused() -> None:
    model, data = _stft_model(SIGNAL, 4, HANN_12, 16, {})
    with pytest.raises(ValueError, match=r"window has shape \[12\]; expected \[16\]"):
        _ours(model, data)


@pytest.mark.parametrize("op", ["HannWindow", "HammingWindow", "BlackmanWindow"])
@pytest.mark.parametrize("periodic", [0, 1])
@pytest.mark.parametrize("size", [1, 10, 17])
@pytest.mark.parametrize("out_type", [TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT32])
def test_windows_match_onnxruntime(op: str, periodic: int, size: int, out_type: int) -> None:
    # (a symmetric window of size 1 is NaN in onnxruntime and onnx's reference alike)
    data = {"size": np.array(size, np.int64)}
    attrs = {"periodic": periodic, "output_datatype": out_type}
    model = _model(op, data, {}, ["size"], attrs, out_type=out_type)
    _assert_matches(_ours(model, data), _onnxruntime(model, data), atol=1e-6)


@pytest.mark.parametrize(
    "args",
    [(8, 16, 8192, 0.0, 4096.0), (10, 64, 16000, 20.0, 8000.0), (5, 32, 22050, 300.0, 5000.0)],
)
def test_mel_weight_matrix_matches_onnxruntime(
    args: tuple[int, int, int, float, float],
) -> None:
    bins, length, rate, low, high = args
    data: dict[str, np.ndarray] = {
        "bins": np.array(bins, np.int64),
        "length": np.array(length, np.int64),
        "rate": np.array(rate, np.int64),
        "low": np.array(low, np.float32),
        "high": np.array(high, np.float32),
    }
    model = _model("MelWeightMatrix", data, {}, list(data))
    got = _ours(model, data)
    assert got.shape == (length // 2 + 1, bins)
    _assert_matches(got, _onnxruntime(model, data), atol=0.0)


def _gradcheck(model: onnx.ModelProto, inputs: list[torch.Tensor]) -> None:
    graph = convert(model, mode="eval")
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    assert torch.autograd.gradcheck(lambda *xs: graph(*xs), leaves, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize(
    ("x", "attrs", "length"),
    [
        (COMPLEX[:1, :6], {}, None),
        (REAL[:1, :6], {"onesided": 1}, 7),
        (COMPLEX[:1, :6], {"inverse": 1}, 4),
        (ONESIDED[:1], {"onesided": 1, "inverse": 1}, None),
    ],
    ids=["complex", "rfft", "inverse", "irfft"],
)
def test_dft_gradcheck(
    opset: int, x: np.ndarray, attrs: dict[str, Any], length: int | None
) -> None:
    x64 = x.astype(np.float64)
    _gradcheck(_dft_model(x64, opset, attrs, length), [torch.from_numpy(x64)])


@pytest.mark.parametrize(
    ("signal", "attrs"),
    [(SIGNAL[:1, :20], {}), (COMPLEX_SIGNAL[:1, :20], {"onesided": 0})],
    ids=["real", "complex"],
)
def test_stft_gradcheck_signal_and_window(signal: np.ndarray, attrs: dict[str, Any]) -> None:
    signal64, window64 = signal.astype(np.float64), np.hanning(8)
    model, _ = _stft_model(signal64, 3, window64, None, attrs)
    _gradcheck(model, [torch.from_numpy(signal64), torch.from_numpy(window64)])


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            _model("HannWindow", {"n": np.array(4, np.int64)}, {}, ["n"], {"output_datatype": 4}),
            "element type UINT16 is not supported",
        ),
        (
            _model(
                "BlackmanWindow", {"n": np.array(4, np.int64)}, {}, ["n"], {"output_datatype": 9}
            ),
            "output_datatype BOOL is not a real number type",
        ),
        (_dft_model(COMPLEX, 20, {"onesided": 2}), "onesided=2 is not 0 or 1"),
        (_dft_model(COMPLEX, 17, {}, axis=-1), "axis=-1 names the real/imaginary dimension"),
        (
            _stft_model(SIGNAL, 4, None, 12, {"onesided": 3})[0],
            "ai.onnx::STFT (opset 17): onesided=3 is not 0 or 1",
        ),
    ],
    ids=["uint16 window", "bool window", "onesided 2", "axis -1", "stft onesided 3"],
)
def test_unsupported_values_are_refused_at_conversion(model: onnx.ModelProto, message: str) -> None:
    with pytest.raises(UnsupportedModelError) as info:
        convert(model, mode="eval")
    assert message in info.value.message


def test_window_op_feeding_stft_matches_onnxruntime() -> None:
    # The window's size is a constant: the converter folds HannWindow at conversion, and STFT
    # meets its (CPU) result beside the signal.
    nodes = [
        helper.make_node("HannWindow", ["size"], ["w"], periodic=0),
        helper.make_node("STFT", ["s", "step", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, list(SIGNAL.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.array(12, np.int64), "size"),
            numpy_helper.from_array(np.array(4, np.int64), "step"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    _assert_matches(_ours(model, {"s": SIGNAL}), _onnxruntime(model, {"s": SIGNAL}))
