"""CausalConvWithState and LinearAttention (opset 27) through converted one-node models:
outputs against onnx's ReferenceEvaluator, gradcheck in float64, state carried across calls,
and attribute values refused at conversion with a message that names them."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from service.engine.onnx.convert import convert
from service.errors import UnsupportedModelError

OPSET = 27
CONV_INPUTS = ["input", "weight", "bias", "past_state"]
ATTN_INPUTS = ["query", "key", "value", "past_state", "decay", "beta"]
B, T, KV, DK, DV = 2, 5, 2, 3, 4  # LinearAttention: batch, steps, KV heads, d_k, d_v
C, L, K = 3, 6, 4  # CausalConvWithState: channels, length, kernel


def _model(
    op: str, names: list[str], values: list[np.ndarray | None], attrs: dict[str, Any], elem: int
) -> onnx.ModelProto:
    """A one-node model; a None value is an omitted optional input ("")."""
    node_inputs = [n if v is not None else "" for n, v in zip(names, values, strict=True)]
    while node_inputs and not node_inputs[-1]:
        node_inputs.pop()
    node = helper.make_node(op, node_inputs, ["output", "present_state"], **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(n, elem, list(v.shape))
            for n, v in zip(names, values, strict=True)
            if v is not None
        ],
        [helper.make_tensor_value_info(n, elem, None) for n in ("output", "present_state")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    return model


def _convert(
    op: str, names: list[str], values: list[np.ndarray | None], attrs: dict[str, Any]
) -> Any:
    elem = TensorProto.DOUBLE if _dtype(values) == np.float64 else TensorProto.FLOAT
    return convert(_model(op, names, values, attrs, elem), mode="eval")


def _dtype(values: list[np.ndarray | None]) -> Any:
    return next(v for v in values if v is not None).dtype


def _rand(*shape: int, seed: int, dtype: Any = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _check_against_reference(
    op: str, names: list[str], values: list[np.ndarray | None], attrs: dict[str, Any]
) -> None:
    model = _model(op, names, values, attrs, TensorProto.FLOAT)
    feeds = {n: v for n, v in zip(names, values, strict=True) if v is not None}
    expected = ReferenceEvaluator(model).run(None, feeds)
    graph = convert(model, mode="eval")
    got = graph(*[torch.from_numpy(v) for v in feeds.values()])
    assert len(got) == 2
    for g, e in zip(got, expected, strict=True):
        assert tuple(g.shape) == e.shape
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=1e-5)


# --- LinearAttention -----------------------------------------------------------------------


def _attention_inputs(
    rule: str,
    *,
    group: int = 1,
    past: bool = False,
    per_head_decay: bool = False,
    shared_beta: bool = False,
    steps: int = T,
    dtype: Any = np.float32,
    seed: int = 0,
) -> list[np.ndarray | None]:
    query = _rand(B, steps, KV * group * DK, seed=seed, dtype=dtype)
    key = _rand(B, steps, KV, DK, seed=seed + 1, dtype=dtype)
    # the delta rules expect L2-normalised keys (a contraction); the others take any
    key = (key / np.linalg.norm(key, axis=-1, keepdims=True)).reshape(B, steps, KV * DK)
    value = _rand(B, steps, KV * DV, seed=seed + 2, dtype=dtype)
    state = 0.3 * _rand(B, KV, DK, DV, seed=seed + 3, dtype=dtype) if past else None
    decay = beta = None
    if rule in ("gated", "gated_delta"):
        width = KV if per_head_decay else KV * DK
        decay = -0.2 * np.abs(_rand(B, steps, width, seed=seed + 4, dtype=dtype))
    if rule in ("delta", "gated_delta"):
        width = 1 if shared_beta else KV
        beta = 1 / (1 + np.exp(-_rand(B, steps, width, seed=seed + 5, dtype=dtype)))
    return [query, key, value, state, decay, beta]


def _heads(group: int) -> dict[str, Any]:
    return {"q_num_heads": KV * group, "kv_num_heads": KV}


RULES = ["linear", "gated", "delta", "gated_delta"]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("group", [1, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("past", [False, True], ids=["no_past", "past"])
def test_linear_attention_matches_reference(rule: str, group: int, past: bool) -> None:
    values = _attention_inputs(rule, group=group, past=past)
    _check_against_reference(
        "LinearAttention", ATTN_INPUTS, values, {"update_rule": rule, **_heads(group)}
    )


@pytest.mark.parametrize(
    ("rule", "options", "attrs"),
    [
        ("gated", {"per_head_decay": True}, {}),
        ("gated_delta", {"per_head_decay": True, "shared_beta": True}, {}),
        ("delta", {"shared_beta": True}, {"scale": 0.25}),
        ("gated_delta", {"group": 2}, {"chunk_size": 2}),  # a hint: no effect on the result
        ("linear", {"steps": 1, "past": True}, {}),  # one decode step
    ],
)
def test_linear_attention_variants_match_reference(
    rule: str, options: dict[str, Any], attrs: dict[str, Any]
) -> None:
    values = _attention_inputs(rule, **options)
    heads = _heads(options.get("group", 1))
    _check_against_reference(
        "LinearAttention", ATTN_INPUTS, values, {"update_rule": rule, **heads, **attrs}
    )


def test_linear_attention_default_rule_is_gated_delta() -> None:
    values = _attention_inputs("gated_delta", past=True)
    _check_against_reference("LinearAttention", ATTN_INPUTS, values, _heads(1))


@pytest.mark.parametrize("rule", RULES)
def test_linear_attention_state_carries_across_calls(rule: str) -> None:
    # a prefill split in two, the second call fed the first's present_state, is the whole one
    values = _attention_inputs(rule, group=2, past=True)
    graph = _convert("LinearAttention", ATTN_INPUTS, values, {"update_rule": rule, **_heads(2)})
    q, k, v, past, decay, beta = (None if x is None else torch.from_numpy(x) for x in values)

    def call(start: int, stop: int, state: Any) -> Any:
        steps = [x[:, start:stop] for x in (q, k, v, decay, beta) if x is not None]
        return graph(*steps[:3], state, *steps[3:])

    whole_out, whole_state = call(0, T, past)
    out1, state1 = call(0, 2, past)
    out2, state2 = call(2, T, state1)
    torch.testing.assert_close(torch.cat([out1, out2], 1), whole_out)
    torch.testing.assert_close(state2, whole_state)


@pytest.mark.parametrize(
    ("rule", "per_head_decay"),
    [
        ("linear", False),
        ("gated", False),
        ("gated", True),
        ("delta", False),
        ("gated_delta", False),
        ("gated_delta", True),
    ],
)
def test_linear_attention_gradcheck(rule: str, per_head_decay: bool) -> None:
    # w.r.t. query, key, value, past_state and (where the rule takes them) decay and beta
    values = _attention_inputs(
        rule, group=2, past=True, per_head_decay=per_head_decay, steps=3, dtype=np.float64
    )
    graph = _convert("LinearAttention", ATTN_INPUTS, values, {"update_rule": rule, **_heads(2)})
    leaves = [torch.from_numpy(v).requires_grad_(True) for v in values if v is not None]
    assert torch.autograd.gradcheck(lambda *xs: tuple(graph(*xs)), leaves, eps=1e-6, atol=1e-5)


# --- CausalConvWithState -------------------------------------------------------------------


def _conv_inputs(
    *, bias: bool, past: bool, length: int = L, k: int = K, dtype: Any = np.float32
) -> list[np.ndarray | None]:
    return [
        _rand(B, C, length, seed=10, dtype=dtype),
        _rand(C, 1, k, seed=11, dtype=dtype),
        _rand(C, seed=12, dtype=dtype) if bias else None,
        _rand(B, C, k - 1, seed=13, dtype=dtype) if past else None,
    ]


@pytest.mark.parametrize("activation", ["none", "silu", "swish"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("past", [False, True], ids=["no_past", "past"])
def test_causal_conv_matches_reference(activation: str, bias: bool, past: bool) -> None:
    values = _conv_inputs(bias=bias, past=past)
    _check_against_reference("CausalConvWithState", CONV_INPUTS, values, {"activation": activation})


@pytest.mark.parametrize(
    ("length", "k", "past"),
    [(2, 5, False), (2, 5, True), (6, 1, False), (1, 4, True)],
    ids=["short_input", "short_input_past", "kernel_one", "decode_step"],
)
def test_causal_conv_edge_shapes_match_reference(length: int, k: int, past: bool) -> None:
    values = _conv_inputs(bias=True, past=past, length=length, k=k)
    _check_against_reference("CausalConvWithState", CONV_INPUTS, values, {"activation": "silu"})


def test_causal_conv_default_activation_is_none() -> None:
    _check_against_reference(
        "CausalConvWithState", CONV_INPUTS, _conv_inputs(bias=True, past=True), {}
    )


def test_causal_conv_state_carries_across_calls() -> None:
    values = _conv_inputs(bias=True, past=True)
    graph = _convert("CausalConvWithState", CONV_INPUTS, values, {"activation": "silu"})
    x, w, b, past = (torch.from_numpy(v) for v in values if v is not None)
    whole, whole_state = graph(x, w, b, past)
    state, pieces = past, []
    for chunk in x.split([1, 3, 2], 2):  # decode-sized and prefill-sized pieces
        out, state = graph(chunk, w, b, state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 2), whole)
    torch.testing.assert_close(state, whole_state)


@pytest.mark.parametrize("activation", ["none", "silu"])
def test_causal_conv_gradcheck(activation: str) -> None:
    # w.r.t. input, weight, bias and past_state
    values = _conv_inputs(bias=True, past=True, length=4, k=3, dtype=np.float64)
    graph = _convert("CausalConvWithState", CONV_INPUTS, values, {"activation": activation})
    leaves = [torch.from_numpy(v).requires_grad_(True) for v in values if v is not None]
    assert torch.autograd.gradcheck(lambda *xs: tuple(graph(*xs)), leaves, eps=1e-6, atol=1e-5)


# --- refused at conversion -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "attrs", "drop", "message"),
    [
        ("bogus", {}, (), "update_rule 'bogus'"),
        ("gated_delta", {"q_num_heads": 3, "kv_num_heads": 2}, (), "q_num_heads 3"),
        ("gated_delta", {"q_num_heads": 2, "kv_num_heads": 0}, (), "kv_num_heads 0"),
        ("gated_delta", {"q_num_heads": None}, (), "q_num_heads and kv_num_heads"),
        ("gated_delta", {}, (4,), "requires the decay input"),
        ("delta", {}, (5,), "requires the beta input"),
    ],
)
def test_linear_attention_refuses_bad_attributes(
    rule: str, attrs: dict[str, Any], drop: tuple[int, ...], message: str
) -> None:
    values = _attention_inputs("gated_delta" if rule == "bogus" else rule)
    values = [None if i in drop else v for i, v in enumerate(values)]
    merged = {"update_rule": rule, **_heads(1), **attrs}
    merged = {k: v for k, v in merged.items() if v is not None}
    with pytest.raises(UnsupportedModelError, match=message) as info:
        _convert("LinearAttention", ATTN_INPUTS, values, merged)
    assert "LinearAttention" in str(info.value)


def test_linear_attention_refuses_an_input_the_rule_forbids() -> None:
    values = _attention_inputs("gated_delta")  # decay and beta given to the plain linear rule
    with pytest.raises(UnsupportedModelError, match="update_rule 'linear' forbids the decay"):
        _convert("LinearAttention", ATTN_INPUTS, values, {"update_rule": "linear", **_heads(1)})


def test_causal_conv_refuses_an_unknown_activation() -> None:
    values = _conv_inputs(bias=False, past=False)
    with pytest.raises(UnsupportedModelError, match="activation 'gelu'"):
        _convert("CausalConvWithState", CONV_INPUTS, values, {"activation": "gelu"})
