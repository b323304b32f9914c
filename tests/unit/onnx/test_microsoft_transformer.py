"""onnxruntime's transformer contrib ops (ops/microsoft_transformer.py): EmbedLayerNormalization,
BiasAdd, GemmFastGelu, RotaryEmbedding, MultiHeadAttention and GroupQueryAttention against
onnxruntime's CPU kernels (or, where it has none, against the ops they fuse), gradcheck in
float64 through converted one-node models, and the forms refused at conversion."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from service.engine.onnx.convert import convert
from service.engine.onnx.registry import UnsupportedAttribute
from tests.support.recurrent_zoo import as_outputs, build_node_fn, run_onnxruntime
from tests.unit.onnx.test_microsoft import MS, _check, _random

Inputs = list[np.ndarray | None]
# what _converted takes: float64 tensors (graph inputs), numpy arrays (initializers), omitted
GraphInputs = list[torch.Tensor | np.ndarray | None]


def _ints(*values: Any) -> np.ndarray:
    return np.array(values, np.int32)


def _mine(op: str, inputs: Inputs, outputs: list[str], **attrs: Any) -> list[np.ndarray]:
    names = [f"in{i}" if v is not None else "" for i, v in enumerate(inputs)]
    fn = build_node_fn(helper.make_node(op, names, outputs, domain=MS, **attrs), 1)
    got = fn(*[None if v is None else torch.from_numpy(v) for v in inputs])
    return [g.numpy() for g in as_outputs(got, len(outputs))]


def _converted(op: str, inputs: GraphInputs, outputs: int, **attrs: Any):
    """A one-node model of `op` converted: the float64 tensors are its graph inputs (in order),
    the numpy arrays (ids, lengths) initializers."""
    names = [f"x{i}" if v is not None else "" for i, v in enumerate(inputs)]
    node = helper.make_node(op, names, [f"y{i}" for i in range(outputs)], domain=MS, **attrs)
    double = TensorProto.DOUBLE
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(n, double, list(v.shape))
            for n, v in zip(names, inputs, strict=True)
            if isinstance(v, torch.Tensor)
        ],
        [helper.make_tensor_value_info(f"y{i}", double, None) for i in range(outputs)],
        [
            numpy_helper.from_array(v, n)
            for n, v in zip(names, inputs, strict=True)
            if isinstance(v, np.ndarray)
        ],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return convert(model, mode="eval")


def _gradcheck(op: str, inputs: GraphInputs, outputs: int = 1, **attrs: Any) -> None:
    converted = _converted(op, inputs, outputs, **attrs)

    def float_outputs(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(y for y in as_outputs(converted(*xs), outputs) if y.is_floating_point())

    leaves = [t.clone().requires_grad_(True) for t in inputs if isinstance(t, torch.Tensor)]
    assert torch.autograd.gradcheck(float_outputs, leaves, eps=1e-6, atol=1e-5)


def _double(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _refused(op: str, inputs: list[str], outputs: list[str], match: str, **attrs: Any) -> None:
    with pytest.raises(UnsupportedAttribute, match=match):
        build_node_fn(helper.make_node(op, inputs, outputs, domain=MS, **attrs), 1)


# --- EmbedLayerNormalization ------------------------------------------------------------------

BATCH, SEQ, HIDDEN = 2, 4, 8


def _embedding_inputs(segments: bool, mask: bool, positions: tuple[int, ...] | None) -> Inputs:
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 10, (BATCH, SEQ)).astype(np.int32)
    segment_ids = rng.integers(0, 2, (BATCH, SEQ)).astype(np.int32) if segments else None
    mask_values = _ints([1, 1, 0, 1], [2, 1, 1, 0]) if mask else None  # counts the 1s
    position_ids = rng.integers(0, 16, positions).astype(np.int32) if positions else None
    return [
        ids,
        segment_ids,
        _random(10, HIDDEN),
        _random(16, HIDDEN, seed=1),
        _random(2, HIDDEN, seed=2) if segments else None,
        _random(HIDDEN, seed=3),
        _random(HIDDEN, seed=4),
        mask_values,
        position_ids,
    ]


@pytest.mark.parametrize("segments", [True, False])
@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("positions", [None, (BATCH, SEQ), (1, SEQ)])
def test_embed_layer_normalization(
    segments: bool, mask: bool, positions: tuple[int, ...] | None
) -> None:
    inputs = _embedding_inputs(segments, mask, positions)
    while inputs[-1] is None:
        inputs.pop()
    # onnxruntime's shape inference wants mask_index declared
    _check("EmbedLayerNormalization", inputs, ["y", "mask_index"])
    _check("EmbedLayerNormalization", inputs, ["y", "mask_index", "sum"], epsilon=1e-3)
    _check("EmbedLayerNormalization", inputs, ["y", "", "sum"])


def test_embed_layer_normalization_gradients_and_refusal() -> None:
    ids, segment_ids = _ints([1, 0, 3], [2, 2, 0]), _ints([0, 1, 1], [1, 0, 0])
    tables = [_double(4, 3), _double(5, 3, seed=1), _double(2, 3, seed=2)]
    gamma, beta = _double(3, seed=3), _double(3, seed=4)
    inputs = [ids, segment_ids, *tables, gamma, beta, None, _ints([2, 0, 1])]
    _gradcheck("EmbedLayerNormalization", inputs, 3)  # y, mask_index, embedding_sum
    names = ["ids", "segments", "word", "position", "", "gamma", "beta"]
    _refused("EmbedLayerNormalization", names, ["y", "m"], "together")


# --- BiasAdd, GemmFastGelu ---------------------------------------------------------------------


def test_bias_add() -> None:
    # no CPU kernel in onnxruntime: its docs' formula
    x, bias, skip = _random(2, 3, 8), _random(8, seed=1), _random(2, 3, 8, seed=2)
    (got,) = _mine("BiasAdd", [x, bias, skip], ["y"])
    np.testing.assert_allclose(got, x + bias + skip, rtol=1e-6)
    _gradcheck("BiasAdd", [_double(2, 3, 4), _double(4, seed=1), _double(2, 3, 4, seed=2)])


@pytest.mark.parametrize("x_shape", [(3, 8), (2, 3, 8)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemm_fast_gelu(x_shape: tuple[int, ...], with_bias: bool) -> None:
    # no CPU kernel in onnxruntime: checked against the MatMul + FastGelu it fuses
    x, w, bias = _random(*x_shape), _random(8, 6, seed=1), _random(6, seed=2)
    feeds = {"x": x, "w": w, "b": bias} if with_bias else {"x": x, "w": w}
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("FastGelu", ["h", *list(feeds)[2:]], ["y"], domain=MS),
    ]
    float_type = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "unfused",
        [helper.make_tensor_value_info(n, float_type, list(v.shape)) for n, v in feeds.items()],
        [helper.make_tensor_value_info("y", float_type, None)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    )
    model.ir_version = 10
    (expected,) = run_onnxruntime(model, feeds)
    (got,) = _mine("GemmFastGelu", list(feeds.values()), ["y"])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_gemm_fast_gelu_gradients() -> None:
    _gradcheck("GemmFastGelu", [_double(2, 3, 4), _double(4, 5, seed=1), _double(5, seed=2)])


# --- RotaryEmbedding ----------------------------------------------------------------------------


def _rotary_cases() -> list[Any]:
    rng = np.random.default_rng(4)
    batch, seq, heads, size = 2, 3, 2, 8
    ids = rng.integers(0, 10, (batch, seq)).astype(np.int64)
    cos, sin = _random(10, size // 2, seed=1), _random(10, size // 2, seed=2)
    narrow_cos, narrow_sin = _random(10, 2, seed=3), _random(10, 2, seed=4)
    x3, x4 = _random(batch, seq, heads * size), _random(batch, heads, seq, size, seed=5)
    start = np.array([2], np.int64)
    return [
        pytest.param([x3, ids, cos, sin], {}, id="3d_heads_from_cache"),
        pytest.param([x3, ids, cos, sin], {"num_heads": heads}, id="3d_num_heads"),
        pytest.param([x4, ids, cos, sin], {}, id="4d"),
        pytest.param([x3, start, cos, sin], {}, id="first_position"),
        pytest.param([x4, start, cos, sin], {}, id="4d_first_position"),
        pytest.param(
            [x3, ids, narrow_cos, narrow_sin],
            {"num_heads": heads, "rotary_embedding_dim": 4},
            id="partial",
        ),
        pytest.param([x3, ids, narrow_cos, narrow_sin], {}, id="small_heads_from_cache"),
        pytest.param([x3, ids, cos, sin], {"scale": 0.5}, id="scale_ignored"),
    ]


@pytest.mark.parametrize(("inputs", "attrs"), _rotary_cases())
@pytest.mark.parametrize("interleaved", [0, 1])
def test_ms_rotary_embedding(inputs: Inputs, attrs: dict[str, Any], interleaved: int) -> None:
    _check("RotaryEmbedding", inputs, ["y"], interleaved=interleaved, **attrs)


def test_ms_rotary_embedding_gradients_and_refusals() -> None:
    ids = np.array([[0, 3], [2, 1]], np.int64)
    inputs: GraphInputs = [_double(2, 2, 8), ids, _double(4, 2, seed=1), _double(4, 2, seed=2)]
    _gradcheck("RotaryEmbedding", inputs, num_heads=2, rotary_embedding_dim=4, interleaved=1)
    names = ["x", "p", "c", "s"]
    _refused("RotaryEmbedding", names, ["y"], "is_packed_batching", is_packed_batching=1)
    _refused("RotaryEmbedding", names, ["y"], "num_heads", rotary_embedding_dim=4)
    # a cache wider than rotary_embedding_dim/2: onnxruntime reads it with shifted rows
    x, cos = _random(2, 3, 16), _random(10, 4)
    positions = np.zeros((2, 3), np.int64)
    with pytest.raises(ValueError, match="width 4, expected 2"):
        _mine(
            "RotaryEmbedding", [x, positions, cos, cos], ["y"], num_heads=2, rotary_embedding_dim=4
        )


# --- MultiHeadAttention -------------------------------------------------------------------------

HEADS, SIZE = 2, 4


def _mha_cases() -> list[Any]:
    rng = np.random.default_rng(5)
    batch, seq, kv_seq, past_len, hidden = 2, 3, 4, 5, HEADS * SIZE
    q, k, v = (
        _random(batch, seq, hidden),
        _random(batch, kv_seq, hidden, seed=1),
        _random(batch, kv_seq, hidden, seed=2),
    )
    bias = _random(3 * hidden, seed=3)
    padding = (rng.random((batch, kv_seq)) > 0.4).astype(np.int32)
    padding[0] = 0  # a fully padded row: uniform attention (a finite filter value)
    per_query = (rng.random((batch, seq, kv_seq)) > 0.4).astype(np.int32)
    past_kv = [_random(batch, HEADS, past_len, SIZE, seed=seed) for seed in (4, 5)]
    total = past_len + kv_seq
    cache_k, cache_v = (
        _random(batch, HEADS, kv_seq, SIZE, seed=6),
        _random(batch, HEADS, kv_seq, SIZE, seed=7),
    )
    wide_v = _random(batch, kv_seq, HEADS * 3, seed=8)
    self_q = _random(batch, kv_seq, hidden, seed=9)
    y, present = ["y"], ["y", "present_key", "present_value"]
    return [
        pytest.param([q, k, v], y, {}, id="plain"),
        pytest.param([q, k, v, bias], y, {"scale": 0.3}, id="bias_scale"),
        pytest.param([q, k, wide_v, _random(2 * hidden + HEADS * 3)], y, {}, id="v_size"),
        pytest.param([q, k, v, bias, _ints(2, 4)], y, {}, id="key_lengths"),
        pytest.param([q, k, v, bias, _ints(2, 4, 0, 3, 6, 0, 4, 8)], y, {}, id="3b_plus_2"),
        pytest.param([q, k, v, bias, padding], y, {}, id="padding_2d"),
        pytest.param(
            [q, k, v, bias, per_query], y, {"mask_filter_value": -5.0}, id="padding_3d_filter"
        ),
        pytest.param([q, k, v, bias, None, _random(batch, HEADS, seq, kv_seq)], y, {}, id="bias"),
        pytest.param([q, k, v, None, None, _random(1, 1, seq, kv_seq)], y, {}, id="bias_bcast"),
        pytest.param([q, k, v, bias, None, _random(1, HEADS, seq, kv_seq)], y, {}, id="bias_1n"),
        pytest.param([q, k, v, bias, None, None, *past_kv], present, {}, id="past"),
        pytest.param(
            [q, k, v, bias, (rng.random((batch, total)) > 0.3).astype(np.int32), None, *past_kv],
            present,
            {},
            id="past_padding",
        ),
        pytest.param(
            [q, k, v, bias, _ints(6, 9), _random(batch, HEADS, seq, total), *past_kv],
            present,
            {},
            id="past_lengths_bias",
        ),
        pytest.param([self_q, k, v, bias], y, {"unidirectional": 1}, id="causal"),
        pytest.param([self_q, k, v, bias, padding], y, {"unidirectional": 1}, id="causal_pad"),
        pytest.param([q, cache_k, cache_v, bias], present, {}, id="cross_cache"),
        pytest.param([q, cache_k, cache_v, None, _ints(2, 4)], present, {}, id="cross_cache_pad"),
    ]


@pytest.mark.parametrize(("inputs", "outputs", "attrs"), _mha_cases())
def test_multi_head_attention(inputs: Inputs, outputs: list[str], attrs: dict[str, Any]) -> None:
    _check("MultiHeadAttention", inputs, outputs, num_heads=HEADS, **attrs)


@pytest.mark.parametrize("with_bias", [False, True])
def test_multi_head_attention_packed_forms_match_unpacked(with_bias: bool) -> None:
    # onnxruntime's CPU provider runs neither packed form: compare with the unpacked one
    batch, seq, kv_seq = 2, 3, 4
    q, k, v = (
        _random(batch, seq, HEADS * SIZE),
        _random(batch, kv_seq, HEADS, SIZE, seed=1),
        _random(batch, kv_seq, HEADS, SIZE, seed=2),
    )
    flat = [q, k.reshape(batch, kv_seq, -1), v.reshape(batch, kv_seq, -1)]
    packed_kv = np.stack([k, v], 3)  # [B, L, heads, 2, size]
    mask = _ints(3, 2)
    # _check's result: the unpacked form, matched against onnxruntime
    expected = _check("MultiHeadAttention", [*flat, None, mask], ["y"], num_heads=HEADS)
    got = _mine("MultiHeadAttention", [q, packed_kv, None, None, mask], ["y"], num_heads=HEADS)
    np.testing.assert_allclose(got[0], expected[0].numpy(), rtol=1e-5, atol=1e-6)

    qs = _random(batch, kv_seq, HEADS, SIZE, seed=3)
    bias = _random(3 * HEADS * SIZE, seed=4) if with_bias else None
    self_flat = [qs.reshape(batch, kv_seq, -1), *flat[1:], bias]
    expected = _check("MultiHeadAttention", self_flat, ["y"], num_heads=HEADS)
    packed_qkv = np.stack([qs, k, v], 3)  # [B, L, heads, 3, size]
    got = _mine("MultiHeadAttention", [packed_qkv, None, None, bias], ["y"], num_heads=HEADS)
    np.testing.assert_allclose(got[0], expected[0].numpy(), rtol=1e-5, atol=1e-6)


def test_multi_head_attention_gradients() -> None:
    batch, seq, kv_seq, hidden = 1, 2, 3, HEADS * SIZE
    inputs: GraphInputs = [
        _double(batch, seq, hidden),
        _double(batch, kv_seq, hidden, seed=1),
        _double(batch, kv_seq, hidden, seed=2),
        _double(3 * hidden, seed=3),
        _ints([1, 0, 1, 1, 1]),  # key padding over past + new keys
        _double(1, HEADS, seq, 2 + kv_seq, seed=4),
        _double(batch, HEADS, 2, SIZE, seed=5),
        _double(batch, HEADS, 2, SIZE, seed=6),
    ]
    _gradcheck("MultiHeadAttention", inputs, 3, num_heads=HEADS)


def test_multi_head_attention_refusals() -> None:
    q, k, v = "q", "k", "v"
    _refused("MultiHeadAttention", [q, k, v], ["y"], "num_heads")
    heads = {"num_heads": HEADS}
    for inputs, match in [
        ([q, k, v, "", "", "", "pk", "pv", "", "beams"], "cache_indirection"),
        ([q, k, v, "", "", "", "pk", "pv", "len"], "past_sequence_length"),
        ([q, k, v, "", "", "", "pk"], "together"),
        ([q, k, "", "b"], "packed KV"),
        ([q, "", v], "value without key"),
        ([q, k, v, "", "", "", "pk", "pv"], "unidirectional"),
    ]:
        extra = {"unidirectional": 1} if match == "unidirectional" else {}
        _refused("MultiHeadAttention", inputs, ["y"], match, **heads, **extra)
    _refused("MultiHeadAttention", [q, k, v], ["y", "", "", "qk"], "qk", **heads)
    with pytest.raises(ValueError, match="as many keys as queries"):
        x, kv = _random(1, 2, 8), _random(1, 3, 8)
        _mine("MultiHeadAttention", [x, kv, kv], ["y"], unidirectional=1, **heads)


# --- GroupQueryAttention ------------------------------------------------------------------------

Q_HEADS, KV_HEADS = 4, 2


def _gqa_inputs(
    batch: int,
    seq: int,
    past: int | None,
    seqlens: list[int],
    total: int,
    *,
    size: int = 16,
    rotary: int = 0,
    bias: tuple[int, ...] | None = None,
    seed: int = 0,
) -> Inputs:
    """query, key, value, past_key, past_value, seqlens_k, total_sequence_length, then
    cos/sin caches of `rotary` columns and an attention bias when asked."""
    past_kv: Inputs = [None, None]
    if past is not None:
        past_kv = [_random(batch, KV_HEADS, past, size, seed=seed + s) for s in (3, 4)]
    inputs: Inputs = [
        _random(batch, seq, Q_HEADS * size, seed=seed),
        _random(batch, seq, KV_HEADS * size, seed=seed + 1),
        _random(batch, seq, KV_HEADS * size, seed=seed + 2),
        *past_kv,
        np.array(seqlens, np.int32),
        np.array(total, np.int32),
    ]
    if rotary or bias:
        caches = [_random(32, rotary, seed=seed + 5), _random(32, rotary, seed=seed + 6)]
        inputs += caches if rotary else [None, None]
    if bias:
        inputs += [None, _random(*bias, seed=seed + 7)]
    return inputs


def _gqa_cases() -> list[Any]:
    y, present = ["y"], ["y", "present_key", "present_value"]
    rotary = {"do_rotary": 1}
    return [
        pytest.param(_gqa_inputs(2, 4, None, [3, 3], 4), present, {}, id="prompt"),
        # right-padded prompt: entry 1 holds 2 tokens (its padding rows too, as onnxruntime)
        pytest.param(_gqa_inputs(2, 4, None, [3, 1], 4), present, {}, id="padded_prompt"),
        pytest.param(_gqa_inputs(2, 4, 0, [3, 3], 4), present, {}, id="empty_past"),
        pytest.param(_gqa_inputs(2, 1, 3, [3, 3], 4), present, {}, id="decode"),
        pytest.param(_gqa_inputs(2, 1, 3, [3, 1], 4), present, {}, id="ragged_decode"),
        # a static cache (total <= the past buffer's length): rows written in place
        pytest.param(_gqa_inputs(2, 1, 6, [3, 1], 4), present, {}, id="static_decode"),
        pytest.param(_gqa_inputs(2, 4, 6, [3, 1], 4), present, {}, id="static_prompt"),
        pytest.param(_gqa_inputs(1, 3, 4, [6], 7), present, {}, id="subsequent_prompt"),
        pytest.param(_gqa_inputs(1, 6, None, [5], 6), y, {"local_window_size": 2}, id="window"),
        pytest.param(
            _gqa_inputs(2, 1, 5, [5, 3], 6), present, {"local_window_size": 2}, id="window_decode"
        ),
        pytest.param(_gqa_inputs(2, 4, None, [3, 2], 4), y, {"softcap": 1.5}, id="softcap"),
        pytest.param(_gqa_inputs(2, 1, 3, [3, 2], 4), present, {"scale": 0.2}, id="scale"),
        pytest.param(_gqa_inputs(2, 4, None, [3, 3], 4), y, {"causal": 0}, id="bidirectional"),
        pytest.param(
            _gqa_inputs(2, 1, 3, [3, 1], 4), present, {"causal": 0}, id="bidirectional_decode"
        ),
        pytest.param(
            _gqa_inputs(2, 4, None, [3, 3], 4, rotary=8), present, rotary, id="rotary_prompt"
        ),
        pytest.param(
            _gqa_inputs(2, 4, None, [3, 1], 4, rotary=8), present, rotary, id="rotary_padded"
        ),
        pytest.param(
            _gqa_inputs(2, 1, 3, [3, 1], 4, rotary=8), present, rotary, id="rotary_decode"
        ),
        pytest.param(
            _gqa_inputs(1, 3, 4, [6], 7, rotary=8), present, rotary, id="rotary_subsequent"
        ),
        pytest.param(
            _gqa_inputs(2, 1, 3, [3, 2], 4, size=32, rotary=8),
            present,
            rotary,
            id="rotary_partial",
        ),
        pytest.param(
            _gqa_inputs(1, 6, None, [5], 6, rotary=8),
            present,
            {**rotary, "local_window_size": 3, "softcap": 2.0},
            id="rotary_window_softcap",
        ),
        pytest.param(_gqa_inputs(2, 4, None, [3, 3], 4, bias=(2, Q_HEADS, 4, 4)), y, {}, id="bias"),
        pytest.param(
            _gqa_inputs(2, 4, None, [3, 3], 4, bias=(2, 1, 4, 4)),
            y,
            {"softcap": 1.0},
            id="bias_softcap",
        ),
        pytest.param(
            _gqa_inputs(2, 1, 3, [3, 1], 4, bias=(1, 1, 1, 4)), present, {}, id="bias_decode"
        ),
        pytest.param(
            _gqa_inputs(2, 1, 6, [3, 1], 4, bias=(2, Q_HEADS, 1, 4)),
            present,
            {},
            id="bias_static",
        ),
    ]


@pytest.mark.parametrize(("inputs", "outputs", "attrs"), _gqa_cases())
def test_group_query_attention(inputs: Inputs, outputs: list[str], attrs: dict[str, Any]) -> None:
    # with a past, onnxruntime computes the cache only when present_key/value are asked for
    _check(
        "GroupQueryAttention",
        inputs,
        outputs,
        num_heads=Q_HEADS,
        kv_num_heads=KV_HEADS,
        **attrs,
    )


def test_group_query_attention_with_every_optional_input_named_empty() -> None:
    """onnxruntime-genai names all twelve inputs, the unused trailing ones empty (position_ids,
    attention_bias, head_sink): a twelfth argument of None was a TypeError at run time."""
    (param,) = [p for p in _gqa_cases() if p.id == "decode"]
    inputs, outputs, attrs = param.values
    padded = [*inputs, *[None] * (12 - len(inputs))]
    _check(
        "GroupQueryAttention", padded, outputs, num_heads=Q_HEADS, kv_num_heads=KV_HEADS, **attrs
    )


@pytest.mark.parametrize("rotary", [False, True])
def test_group_query_attention_packed_qkv(rotary: bool) -> None:
    inputs = _gqa_inputs(2, 1, 3, [3, 1], 4, rotary=8 if rotary else 0, seed=2)
    packed = np.concatenate([v for v in inputs[:3] if v is not None], -1)
    _check(
        "GroupQueryAttention",
        [packed, None, None, *inputs[3:]],
        ["y", "present_key", "present_value"],
        num_heads=Q_HEADS,
        kv_num_heads=KV_HEADS,
        do_rotary=int(rotary),
        rotary_interleaved=1,
    )


def test_group_query_attention_gradients() -> None:
    size, kv_heads = 4, 1
    inputs: GraphInputs = [
        _double(2, 1, 2 * size),
        _double(2, 1, kv_heads * size, seed=1),
        _double(2, 1, kv_heads * size, seed=2),
        _double(2, kv_heads, 2, size, seed=3),
        _double(2, kv_heads, 2, size, seed=4),
        _ints(2, 1),
        np.array(3, np.int32),
        _double(4, 1, seed=5),
        _double(4, 1, seed=6),
        None,
        _double(2, 2, 1, 3, seed=7),
    ]
    attrs = {"num_heads": 2, "kv_num_heads": kv_heads, "do_rotary": 1, "softcap": 2.0}
    _gradcheck("GroupQueryAttention", inputs, 3, **attrs, local_window_size=2)


def test_group_query_attention_refusals() -> None:
    names = ["q", "k", "v", "pk", "pv", "seqlens", "total"]
    heads = {"num_heads": Q_HEADS, "kv_num_heads": KV_HEADS}
    _refused("GroupQueryAttention", names, ["y"], "kv_num_heads", num_heads=4)
    _refused("GroupQueryAttention", names, ["y"], "multiple", num_heads=3, kv_num_heads=2)
    for index, match in [
        (9, "position_ids"),
        (11, "head_sink"),
        (12, "k_scale"),
        (13, "v_scale"),
        (14, "q_norm_weight"),
        (15, "k_norm_weight"),
        (16, "query_seqlens"),
    ]:
        inputs = names + [""] * (index - len(names)) + ["extra"]
        _refused("GroupQueryAttention", inputs, ["y"], match, **heads)
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"smooth_softmax": 1}, "smooth_softmax"),
        ({"k_quant_type": "PER_TENSOR"}, "k_quant_type"),
        ({"kv_cache_bit_width": 4}, "kv_cache_bit_width"),
        ({"sliding_window_cache": 1}, "sliding_window_cache"),
        ({"qk_output": 1}, "qk_output"),
        ({"causal": 0, "local_window_size": 4}, "causal"),
        ({"do_rotary": 1}, "cos_cache"),
    ]
    for attrs, match in refusals:
        _refused("GroupQueryAttention", names, ["y"], match, **heads, **attrs)
    _refused("GroupQueryAttention", names, ["y", "", "", "qk"], "output_qk", **heads)
    _refused(
        "GroupQueryAttention", ["q", "k", "", "pk", "pv", "s", "t"], ["y"], "key and value", **heads
    )
    _refused("GroupQueryAttention", ["q", "k", "v", "pk", "", "s", "t"], ["y"], "past_key", **heads)
    # total_sequence_length neither past + new nor within the past buffer
    with pytest.raises(ValueError, match="total_sequence_length 5"):
        _mine("GroupQueryAttention", _gqa_inputs(2, 1, 3, [3, 3], 5), ["y"], **heads)
