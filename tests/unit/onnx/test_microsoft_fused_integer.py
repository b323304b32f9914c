"""onnxruntime's fused integer ops (ops/microsoft_fused_integer.py) against its CPU kernels.

DynamicQuantizeMatMul and MatMulIntegerToFloat accumulate the same int32 products, then scale
once and add the bias in float32 as onnxruntime does: equal to within the one rounding a fused
multiply-add may save (equal bit for bit on the machines measured). QAttention and
QEmbedLayerNormalization are Attention and EmbedLayerNormalization of the dequantized values:
the projection is a float32 product of the same values instead of an integer one scaled
once, so they agree within float32 rounding (measured: 5e-5 at outputs of 50, 1e-6 relative;
LayerNorm 1.2e-6 at outputs of 4). Each node here reads its weights as graph inputs: the ops
compute it (a stored weight is unfolded instead: tests/unit/engine/test_fused_quantized_models.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from service.engine.onnx.convert import convert
from tests.support.recurrent_zoo import run_onnxruntime

MS = "com.microsoft"
K, N = 40, 24
BATCH, SEQ, HIDDEN, HEADS = 2, 5, 16, 4
VOCAB, POSITIONS = 30, 8


def _ints(rng: np.random.Generator, dtype: Any, *shape: int) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.asarray(rng.integers(info.min, int(info.max) + 1, shape), dtype=dtype)


def _model(
    node: onnx.NodeProto, inputs: Mapping[str, np.ndarray | None], types: Mapping[str, int]
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`node` alone, its given inputs graph inputs; with the feeds."""
    feeds = {name: value for name, value in inputs.items() if value is not None}
    graph = helper.make_graph(
        [node],
        "fused",
        [
            helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for k, v in feeds.items()
        ],
        [helper.make_tensor_value_info(name, kind, None) for name, kind in types.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10), feeds


def _run(
    op: str, inputs: Mapping[str, np.ndarray | None], outputs: Mapping[str, int], **attrs: Any
) -> Any:
    """onnxruntime's outputs and the converted node's, for `inputs` by name (None: omitted);
    `outputs`: name → element type."""
    node = helper.make_node(
        op,
        [k if v is not None else "" for k, v in inputs.items()],
        list(outputs),
        domain=MS,
        **attrs,
    )
    model, feeds = _model(node, inputs, outputs)
    expected = run_onnxruntime(model, feeds)
    graph = convert(model)
    with torch.no_grad():
        got = graph.run([torch.from_numpy(v.copy()) for v in feeds.values()])
    return [g.numpy() for g in got], expected, graph


def _assert_within_a_rounding(got: np.ndarray, expected: np.ndarray) -> None:
    """One float32 multiply and one add from the same int32 accumulator: a fused multiply-add
    on another CPU may round once less, an ulp of the largest output."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    ulp = np.spacing(np.abs(expected).max().astype(expected.dtype)).astype(np.float64)
    np.testing.assert_allclose(got.astype(np.float64), expected, rtol=0, atol=2 * ulp)


def _weight(
    rng: np.random.Generator, dtype: Any, per_column: bool, zero_point: bool
) -> dict[str, Any]:
    """B [K, N], its scale per tensor or column, its zero point (None: omitted)."""
    scale = rng.uniform(0.01, 0.1, N) if per_column else np.array(0.05)
    scale = scale.astype(np.float32)
    return {
        "B": _ints(rng, dtype, K, N),
        "b_scale": scale,
        "b_zero_point": _ints(rng, dtype, *scale.shape) if zero_point else None,
    }


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("per_column", [False, True])
@pytest.mark.parametrize("weight_type", [np.int8, np.uint8])
def test_dynamic_quantize_matmul_matches_onnxruntime(
    weight_type: Any, per_column: bool, zero_point: bool, bias: bool
) -> None:
    rng = np.random.default_rng(0)
    inputs: dict[str, np.ndarray | None] = {
        "A": (rng.standard_normal((2, 3, K)) * 2).astype(np.float32)
    }
    inputs |= _weight(rng, weight_type, per_column, zero_point)
    inputs["bias"] = rng.standard_normal(N).astype(np.float32) if bias else None
    (got,), (expected,), graph = _run("DynamicQuantizeMatMul", inputs, {"Y": TensorProto.FLOAT})
    _assert_within_a_rounding(got, expected)
    # B is a graph input here: the op computes it, and the notes say no gradient reaches it
    assert any("keep their integer computation" in n for n in graph.metadata["notes"])


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("per_column", [False, True])
@pytest.mark.parametrize(
    ("a_type", "b_type"),
    # onnxruntime has no int8 × uint8 kernel
    [(np.uint8, np.int8), (np.uint8, np.uint8), (np.int8, np.int8)],
)
def test_matmul_integer_to_float_matches_onnxruntime(
    a_type: Any, b_type: Any, per_column: bool, bias: bool, half: bool
) -> None:
    """float16 scales and bias: computed in float32, rounded once (as onnxruntime)."""
    rng = np.random.default_rng(1)
    float_type = np.float16 if half else np.float32
    weight = _weight(rng, b_type, per_column, zero_point=True)
    inputs = {
        "A": _ints(rng, a_type, 2, 3, K),
        "B": weight["B"],
        "a_scale": np.array(0.03, float_type),
        "b_scale": weight["b_scale"].astype(float_type),
        "a_zero_point": _ints(rng, a_type),
        "b_zero_point": weight["b_zero_point"],
        "bias": rng.standard_normal(N).astype(float_type) if bias else None,
    }
    output = {"Y": TensorProto.FLOAT16 if half else TensorProto.FLOAT}
    (got,), (expected,), _ = _run("MatMulIntegerToFloat", inputs, output)
    _assert_within_a_rounding(got, expected)


def test_a_per_column_scale_of_a_is_refused_as_onnxruntime_fails_on_it() -> None:
    rng = np.random.default_rng(2)
    inputs: dict[str, np.ndarray | None] = {
        "A": _ints(rng, np.uint8, 3, K),
        "B": _ints(rng, np.int8, K, N),
        "a_scale": np.full(K, 0.1, np.float32),
        "b_scale": np.array(0.2, np.float32),
    }
    node = helper.make_node("MatMulIntegerToFloat", list(inputs), ["Y"], domain=MS)
    model, feeds = _model(node, inputs, {"Y": TensorProto.FLOAT})
    with pytest.raises(ValueError, match=r"a_scale of shape \[40\]: only a per-tensor scale"):
        convert(model).run([torch.from_numpy(v) for v in feeds.values()])


def _q_attention_inputs(
    weight_type: Any, per_column: bool, mask: str | None, *, past: bool = False
) -> dict[str, np.ndarray | None]:
    rng = np.random.default_rng(3)
    scale = rng.uniform(0.002, 0.01, 3 * HIDDEN) if per_column else np.array(0.005)
    scale = scale.astype(np.float32)
    keys = SEQ + (2 if past else 0)
    masks = {
        None: None,
        "lengths": np.array([SEQ, 3], np.int32),  # right padding: valid lengths
        "raw": (rng.uniform(size=(BATCH, keys)) > 0.3).astype(np.int32),  # 1 keep, 0 mask
    }
    return {
        "input": _ints(rng, np.uint8, BATCH, SEQ, HIDDEN),
        "weight": _ints(rng, weight_type, HIDDEN, 3 * HIDDEN),
        "bias": (rng.standard_normal(3 * HIDDEN) * 0.1).astype(np.float32),
        "input_scale": np.array(0.02, np.float32),
        "weight_scale": scale,
        "mask_index": masks[mask],
        "input_zero_point": _ints(rng, np.uint8),
        "weight_zero_point": _ints(rng, weight_type, *scale.shape),
        "past": (
            rng.standard_normal((2, BATCH, HEADS, 2, HIDDEN // HEADS)).astype(np.float32)
            if past
            else None
        ),
    }


def _assert_close(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    """Within float32 rounding of outputs of their size (see the module's docstring)."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(e).max()))


@pytest.mark.parametrize("mask", [None, "lengths", "raw"])
@pytest.mark.parametrize("per_column", [False, True])
@pytest.mark.parametrize("weight_type", [np.int8, np.uint8])
def test_q_attention_matches_onnxruntime(weight_type: Any, per_column: bool, mask: str) -> None:
    """onnxruntime's CPU kernel takes a uint8 input only."""
    inputs = _q_attention_inputs(weight_type, per_column, mask)
    got, expected, _ = _run("QAttention", inputs, {"output": TensorProto.FLOAT}, num_heads=HEADS)
    _assert_close(got, expected)


@pytest.mark.parametrize(
    ("mask", "past", "attrs"),
    [
        (None, False, {"unidirectional": 1}),
        ("raw", True, {}),
        ("lengths", False, {"scale": 0.1, "mask_filter_value": -1000.0}),
    ],
)
def test_q_attention_attributes_and_past_match_onnxruntime(
    mask: str | None, past: bool, attrs: dict[str, Any]
) -> None:
    inputs = _q_attention_inputs(np.int8, True, mask, past=past)
    outputs = dict.fromkeys(["output", "present"] if past else ["output"], TensorProto.FLOAT)
    got, expected, _ = _run("QAttention", inputs, outputs, num_heads=HEADS, **attrs)
    _assert_close(got, expected)


def _q_embed_inputs(
    table_type: Any, segments: bool, mask: str | None
) -> dict[str, np.ndarray | None]:
    rng = np.random.default_rng(4)

    def scale() -> np.ndarray:
        return np.array(rng.uniform(0.001, 0.01), np.float32)

    masks = {
        None: None,
        "binary": (rng.uniform(size=(BATCH, SEQ)) > 0.3).astype(np.int32),
        "counts": rng.integers(0, 3, (BATCH, SEQ)).astype(np.int32),  # only 1s count
    }
    return {
        "input_ids": rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32),
        "segment_ids": rng.integers(0, 2, (BATCH, SEQ)).astype(np.int32) if segments else None,
        "word": _ints(rng, table_type, VOCAB, HIDDEN),
        "position": _ints(rng, table_type, POSITIONS, HIDDEN),
        "segment": _ints(rng, table_type, 2, HIDDEN) if segments else None,
        "gamma": _ints(rng, table_type, HIDDEN),
        "beta": _ints(rng, table_type, HIDDEN),
        "mask": masks[mask],
        "word_scale": scale(),
        "position_scale": scale(),
        "segment_scale": scale() if segments else None,
        "gamma_scale": scale(),
        "beta_scale": scale(),
        "word_zero_point": _ints(rng, table_type),
        "position_zero_point": _ints(rng, table_type),
        "segment_zero_point": _ints(rng, table_type) if segments else None,
        "gamma_zero_point": _ints(rng, table_type),
        "beta_zero_point": _ints(rng, table_type),
    }


@pytest.mark.parametrize("mask", [None, "binary", "counts"])
@pytest.mark.parametrize("segments", [True, False])
@pytest.mark.parametrize("table_type", [np.uint8, np.int8])
def test_q_embed_layer_normalization_matches_onnxruntime(
    table_type: Any, segments: bool, mask: str | None
) -> None:
    inputs = _q_embed_inputs(table_type, segments, mask)
    (y, mask_index), (expected_y, expected_mask_index), _ = _run(
        "QEmbedLayerNormalization",
        inputs,
        {"y": TensorProto.FLOAT, "mask_index": TensorProto.INT32},
        epsilon=1e-12,
    )
    _assert_close([y], [expected_y])
    np.testing.assert_array_equal(mask_index, expected_mask_index)
