"""Cast/CastLike to and from the float8 types and BitCast, bit for bit against onnx's
reference implementation (`onnx.reference`, which computes float8 with `ml_dtypes`).

torch's own float8 casts disagree with ONNX out of range (E4M3FN saturates even with
saturate=0, the others never saturate), so every sweep reaches past the largest value.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from service.engine.onnx.convert import convert

F8_TYPES: dict[int, Any] = {
    TensorProto.FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn,
    TensorProto.FLOAT8E4M3FNUZ: ml_dtypes.float8_e4m3fnuz,
    TensorProto.FLOAT8E5M2: ml_dtypes.float8_e5m2,
    TensorProto.FLOAT8E5M2FNUZ: ml_dtypes.float8_e5m2fnuz,
}
SOURCES: dict[int, Any] = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.BFLOAT16: ml_dtypes.bfloat16,
    TensorProto.DOUBLE: np.float64,
}
# numpy types torch.from_numpy refuses, as (same-width integer, torch dtype)
_BITS = {
    "bfloat16": (np.int16, torch.bfloat16),
    "float8_e4m3fn": (np.uint8, torch.float8_e4m3fn),
    "float8_e4m3fnuz": (np.uint8, torch.float8_e4m3fnuz),
    "float8_e5m2": (np.uint8, torch.float8_e5m2),
    "float8_e5m2fnuz": (np.uint8, torch.float8_e5m2fnuz),
}
_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def _model(
    op: str, inputs: list[int], out: int, attrs: dict[str, Any], opset: int
) -> onnx.ModelProto:
    """A one-node model of inputs x0.. of the given element types and output y."""
    names = [f"x{i}" for i in range(len(inputs))]
    graph = helper.make_graph(
        [helper.make_node(op, names, ["y"], **attrs)],
        "g",
        [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, inputs, strict=True)],
        [helper.make_tensor_value_info("y", out, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype.name in _BITS:
        bits, dtype = _BITS[array.dtype.name]
        return torch.from_numpy(array.view(bits).copy()).view(dtype)
    return torch.from_numpy(array.copy())


def _run(model: onnx.ModelProto, feeds: list[np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
    """(ours, the reference's) output."""
    names = [i.name for i in model.graph.input]
    (want,) = ReferenceEvaluator(model).run(None, dict(zip(names, feeds, strict=True)))
    with torch.no_grad():
        (got,) = convert(model, mode="eval").run([_torch(f) for f in feeds])
    assert isinstance(got, torch.Tensor) and isinstance(want, np.ndarray)
    return got, want


def _bits_of(t: torch.Tensor) -> np.ndarray:
    """A tensor's bits, one signed integer of its width per value (complex: per part)."""
    if t.is_complex():
        t = torch.view_as_real(t)
    width = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(width[t.element_size()]).numpy()


def _np_bits(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "c":
        a = a.view(a.real.dtype).reshape(*a.shape, 2)
    return np.frombuffer(a.tobytes(), dtype=_SIGNED[a.dtype.itemsize]).reshape(a.shape)


def _assert_same(got: torch.Tensor, want: np.ndarray) -> None:
    """The same dtype and values bit for bit, except NaN's bits (its sign and payload)."""
    assert str(got.dtype).removeprefix("torch.") == want.dtype.name
    nan = np.isnan(want.astype(np.float64))
    np.testing.assert_array_equal(got.float().isnan().numpy(), nan)
    mismatch = (_bits_of(got) != _np_bits(want)) & ~nan
    assert not mismatch.any(), (got[torch.from_numpy(mismatch)][:8], want[mismatch][:8])


def _float8_grid(f8: Any) -> np.ndarray:
    """Every finite value of a float8 type (zeros, subnormals and its max included)."""
    values = np.arange(256, dtype=np.uint8).view(f8).astype(np.float64)
    return np.unique(values[np.isfinite(values)])


def _sweep(f8: Any) -> np.ndarray:
    """Values of a float8 type, the ties between them and their float32 neighbours, the range's
    end (max, the tie past it, beyond), specials; in float64."""
    grid = _float8_grid(f8)
    top, below = grid[-1], grid[-2]
    ties = (grid[1:] + grid[:-1]) / 2  # exact in float32 too
    ties32 = ties.astype(np.float32)
    near = [np.nextafter(ties32, np.float32(s)).astype(np.float64) for s in (-np.inf, np.inf)]
    halfway = top + (top - below) / 2
    end = [
        top * 1.01,
        halfway,
        *np.nextafter(np.array([halfway] * 2, np.float32), [0, np.inf]),
        2 * top,
    ]
    specials = [1e30, np.inf, np.nan, -0.0, grid[grid > 0].min() / 2]
    values = np.concatenate([grid, ties, *near, end, specials])
    return np.concatenate([values, -values])


def _as_source(values: np.ndarray, source: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return values.astype(SOURCES[source])


@pytest.mark.parametrize("saturate", [1, 0])
@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("target", list(F8_TYPES))
def test_cast_to_float8_matches_the_reference(target: int, source: int, saturate: int) -> None:
    values = _sweep(F8_TYPES[target])
    if source == TensorProto.DOUBLE:  # just off a tie, a tie in float32 (both round through it)
        values = np.concatenate([values, values * (1 + 2.0**-35), values * (1 - 2.0**-35)])
    model = _model("Cast", [source], target, {"to": target, "saturate": saturate}, 19)
    _assert_same(*_run(model, [_as_source(values, source)]))


@pytest.mark.parametrize("saturate", [1, 0])
@pytest.mark.parametrize("target", list(F8_TYPES))
def test_cast_like_to_float8_matches_the_reference(target: int, saturate: int) -> None:
    values = _sweep(F8_TYPES[target]).astype(np.float32)
    like = np.zeros(1, dtype=F8_TYPES[target])
    model = _model("CastLike", [TensorProto.FLOAT, target], target, {"saturate": saturate}, 19)
    _assert_same(*_run(model, [values, like]))


def test_cast_like_saturates_by_default() -> None:
    like = np.zeros(1, dtype=ml_dtypes.float8_e4m3fn)
    e4m3fn = TensorProto.FLOAT8E4M3FN
    model = _model("CastLike", [TensorProto.FLOAT, e4m3fn], e4m3fn, {}, 19)
    got, want = _run(model, [np.array([1000, -np.inf, 464, 465], np.float32), like])
    _assert_same(got, want)
    assert got.float().tolist() == [448, -448, 448, 448]


@pytest.mark.parametrize("saturate", [1, 0])
@pytest.mark.parametrize("target", [*F8_TYPES, *SOURCES])
@pytest.mark.parametrize("source", list(F8_TYPES))
def test_cast_from_float8_matches_the_reference(source: int, target: int, saturate: int) -> None:
    """Every code of a float8 type (NaN included) to floats and the other float8 types."""
    codes = np.arange(256, dtype=np.uint8).view(F8_TYPES[source])
    model = _model("Cast", [source], target, {"to": target, "saturate": saturate}, 19)
    _assert_same(*_run(model, [codes]))


def test_a_float8_round_trip_passes_gradient_inside_the_range() -> None:
    """Like a cast to float16 (torch's casts pass gradient); the saturation does not, like
    QuantizeLinear's float8 saturation."""
    nodes = [
        helper.make_node("Cast", ["x"], ["q"], to=TensorProto.FLOAT8E4M3FN),
        helper.make_node("Cast", ["q"], ["y"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    x = torch.tensor([0.3, -2.0, 500.0, -1000.0], requires_grad=True)
    (y,) = convert(model, mode="eval").run([x])
    assert y.tolist() == pytest.approx([0.3125, -2.0, 448.0, -448.0])
    y.sum().backward()
    assert x.grad is not None and x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


BIT_CASTS = [
    (
        TensorProto.FLOAT,
        TensorProto.INT32,
        np.array([1.5, -0.0, np.inf, np.nan, 1e-45], np.float32),
    ),
    (TensorProto.DOUBLE, TensorProto.INT64, np.array([1.5, -0.0, -np.inf, 5e-324], np.float64)),
    (TensorProto.FLOAT16, TensorProto.BFLOAT16, np.array([1.5, -0.0, 65504, 6e-8], np.float16)),
    (
        TensorProto.BFLOAT16,
        TensorProto.INT16,
        np.array([1.5, -3e38, 1e-40], np.float32).astype("bfloat16"),
    ),
    (TensorProto.FLOAT8E4M3FN, TensorProto.UINT8, np.arange(256, dtype=np.uint8)),
    (TensorProto.UINT8, TensorProto.FLOAT8E5M2FNUZ, np.arange(256, dtype=np.uint8)),
    (TensorProto.INT8, TensorProto.UINT8, np.array([-128, -1, 0, 127], np.int8)),
    (TensorProto.BOOL, TensorProto.UINT8, np.array([True, False])),
    (TensorProto.COMPLEX64, TensorProto.DOUBLE, np.array([1 + 2j, -0.5j], np.complex64)),
]


def _bit_cast_input(source: int, values: np.ndarray) -> np.ndarray:
    if source in F8_TYPES:  # the values above are the codes
        return values.view(F8_TYPES[source])
    return values.reshape(-1, 1) if values.size % 2 == 0 else values  # some of rank 2


@pytest.mark.parametrize(("source", "target", "values"), BIT_CASTS)
def test_bit_cast_matches_the_reference_and_round_trips(
    source: int, target: int, values: np.ndarray
) -> None:
    x = _bit_cast_input(source, values)
    got, want = _run(_model("BitCast", [source], target, {"to": target}, 26), [x])
    assert str(got.dtype).removeprefix("torch.") == want.dtype.name
    np.testing.assert_array_equal(_bits_of(got), _np_bits(want))
    back = _model("BitCast", [target], source, {"to": source}, 26)
    (again,) = convert(back, mode="eval").run([got])
    np.testing.assert_array_equal(_bits_of(again), _np_bits(x))


def test_bit_cast_refuses_a_width_change() -> None:
    int16 = TensorProto.INT16
    graph = convert(_model("BitCast", [TensorProto.FLOAT], int16, {"to": int16}, 26))
    with pytest.raises(ValueError, match="widths must match"):
        graph.run([torch.ones(4)])
