"""Attention (opsets 23-25) against onnxruntime and onnx's reference implementation, plus
gradients (gradcheck in float64, and finite gradients for fully masked rows)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from service.engine.onnx.registry import UnsupportedAttribute
from tests.support.recurrent_zoo import (
    as_outputs,
    build_node_fn,
    run_onnxruntime,
    single_node_model,
)

INPUTS = ["Q", "K", "V", "attn_mask", "past_key", "past_value", "nonpad_kv_seqlen"]
B, H, S, L, D = 2, 2, 3, 5, 4


def _rand(*shape: int) -> np.ndarray:
    return (
        np.random.default_rng(sum(shape) * 31 + len(shape))
        .standard_normal(shape)
        .astype(np.float32)
    )


def _qkv(q_len: int = S, kv_len: int = L) -> list[np.ndarray | None]:
    return [_rand(B, H, q_len, D), _rand(B, H, kv_len, D) * 0.9, _rand(B, H, kv_len, D) * 1.1]


def _node(inputs: list[np.ndarray | None], outputs: list[str], attrs: dict[str, Any]) -> Any:
    names = [n if v is not None else "" for n, v in zip(INPUTS, inputs, strict=False)]
    return helper.make_node("Attention", names, outputs, **attrs)


def _ours(node: Any, opset: int, inputs: list[np.ndarray | None]) -> list[np.ndarray]:
    fn = build_node_fn(node, opset)
    result = fn(*[None if v is None else torch.from_numpy(v) for v in inputs])
    outs = as_outputs(result, len(node.output))
    return [o.numpy() for o, name in zip(outs, node.output, strict=True) if name]


CAUSAL_MASK = np.random.default_rng(3).random((S, L)) > 0.3
ONE_ROW_MASKED = np.ones((S, L), bool)
ONE_ROW_MASKED[1] = False
PAST = [_rand(B, H, 2, D), _rand(B, H, 2, D)]

# (name, inputs, outputs, attrs, opsets, onnxruntime runs it)
CASES: list[
    tuple[str, list[np.ndarray | None], list[str], dict[str, Any], tuple[int, ...], bool]
] = [
    ("plain", _qkv(), ["Y"], {}, (23, 24, 25), True),
    ("causal", _qkv(), ["Y"], {"is_causal": 1}, (23, 24, 25), True),
    ("scale_softcap", _qkv(), ["Y"], {"scale": 0.3, "softcap": 2.0}, (23, 24, 25), True),
    ("float_mask", [*_qkv(), _rand(S, L)], ["Y"], {}, (23, 24, 25), True),
    (
        "bool_mask_4d",
        [*_qkv(), np.random.default_rng(1).random((B, 1, S, L)) > 0.3],
        ["Y"],
        {},
        (23, 24, 25),
        True,
    ),
    ("bool_mask_causal", [*_qkv(), CAUSAL_MASK], ["Y"], {"is_causal": 1}, (23, 24, 25), True),
    ("fully_masked_row", [*_qkv(), ONE_ROW_MASKED], ["Y"], {}, (23, 24, 25), True),
    (
        "mqa_3d",
        [_rand(B, S, H * D), _rand(B, L, D), _rand(B, L, 6)],
        ["Y"],
        {"q_num_heads": H, "kv_num_heads": 1},
        (23, 24, 25),
        True,
    ),
    (
        "gqa_3d_causal",
        [_rand(B, S, 4 * D), _rand(B, L, 2 * D), _rand(B, L, 2 * 6)],
        ["Y"],
        {"q_num_heads": 4, "kv_num_heads": 2, "is_causal": 1},
        (23, 24, 25),
        True,
    ),
    (
        "past_causal",
        [*_qkv(S, S), None, *PAST],
        ["Y", "present_key", "present_value"],
        {"is_causal": 1},
        (23, 24, 25),
        True,
    ),
    (
        "past_short_mask",  # the mask covers the first 3 of 5 keys: the rest count as masked
        [*_qkv(S, S), _rand(S, 3), *PAST],
        ["Y", "present_key", "present_value"],
        {},
        (23, 24, 25),
        False,
    ),
    *[
        (
            f"qk_output_mode{mode}",
            [*_qkv(), _rand(S, L)],
            ["Y", "", "", "qk"],
            {"qk_matmul_output_mode": mode, "softcap": 1.5},
            (23, 24, 25),
            True,
        )
        for mode in (1, 2, 3)
    ],
    ("softmax_double", _qkv(), ["Y"], {"softmax_precision": TensorProto.DOUBLE}, (23, 25), True),
    ("nonpad", [*_qkv(), None, None, None, np.array([4, 2])], ["Y"], {}, (24, 25), True),
    (
        "nonpad_causal",
        [*_qkv(), None, None, None, np.array([4, 5])],
        ["Y"],
        {"is_causal": 1},
        (24, 25),
        True,
    ),
    (
        "nonpad_short_mask_causal",
        [*_qkv(), _rand(S, 4), None, None, np.array([4, 2])],
        ["Y"],
        {"is_causal": 1},
        (24,),
        False,
    ),
    ("window", _qkv(), ["Y"], {"left_window_size": 1, "right_window_size": 1}, (25,), True),
    (
        "window_causal",
        _qkv(),
        ["Y"],
        {"left_window_size": 2, "right_window_size": 0, "is_causal": 1},
        (25,),
        True,
    ),
    (
        "window_past",
        [*_qkv(S, S), None, *PAST],
        ["Y", "present_key", "present_value"],
        {"left_window_size": 1},
        (25,),
        True,
    ),
]

PARAMS = [
    pytest.param(inputs, outputs, attrs, opset, ort, id=f"{name}-{opset}")
    for name, inputs, outputs, attrs, opsets, ort in CASES
    for opset in opsets
]


@pytest.mark.parametrize(("inputs", "outputs", "attrs", "opset", "onnxruntime_runs"), PARAMS)
def test_matches_reference_and_onnxruntime(
    inputs: list[np.ndarray | None],
    outputs: list[str],
    attrs: dict[str, Any],
    opset: int,
    onnxruntime_runs: bool,
) -> None:
    node = _node(inputs, outputs, attrs)
    model, feeds = single_node_model(node, inputs, opset=opset)
    got = _ours(node, opset, inputs)
    references = [ReferenceEvaluator(model).run(None, feeds)]
    if onnxruntime_runs:
        references.append(run_onnxruntime(model, feeds))
    for expected in references:
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            assert g.shape == e.shape
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_qk_output_mode0_is_the_raw_product_as_onnxruntime() -> None:
    # onnx's reference returns the softcapped product for mode 0; the spec and onnxruntime don't
    inputs = [*_qkv(), _rand(S, L)]
    node = _node(inputs, ["Y", "", "", "qk"], {"qk_matmul_output_mode": 0, "softcap": 1.5})
    model, feeds = single_node_model(node, inputs, opset=23)
    for g, e in zip(_ours(node, 23, inputs), run_onnxruntime(model, feeds), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_a_negative_scale_multiplies_the_scores_with_its_sign() -> None:
    """scale·QKᵀ for a negative scale too, on the explicit path (a mask; the spec's √scale
    on each side would be NaN: √|scale| with the sign on K) and on the fused one."""
    q, k, v = (torch.from_numpy(a) for a in _qkv() if a is not None)
    for inputs in ([*_qkv(), _rand(S, L)], _qkv()):
        mask = torch.from_numpy(inputs[3]) if len(inputs) > 3 else torch.zeros(S, L)
        expected = torch.softmax(-0.3 * q @ k.transpose(-1, -2) + mask, -1) @ v
        (got,) = _ours(_node(inputs, ["Y"], {"scale": -0.3}), 23, inputs)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_fully_masked_row_has_zero_output_and_finite_gradients() -> None:
    node = _node([*_qkv(), ONE_ROW_MASKED], ["Y"], {})
    fn = build_node_fn(node, 23)
    q, k, v = (torch.from_numpy(x).requires_grad_(True) for x in _qkv())
    y = fn(q, k, v, torch.from_numpy(ONE_ROW_MASKED))
    assert torch.all(y[:, :, 1] == 0)
    y.square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, 1] == 0)  # type: ignore[index]


GRADCHECK = [
    ({"is_causal": 1, "softcap": 3.0}, 23, False, False),
    ({}, 24, True, False),  # float mask, past
    ({"q_num_heads": 4, "kv_num_heads": 2, "is_causal": 1}, 25, False, True),  # 3-D GQA
    ({"left_window_size": 1, "right_window_size": 0}, 25, True, False),
]


@pytest.mark.parametrize(("attrs", "opset", "with_mask_and_past", "three_d"), GRADCHECK)
def test_gradcheck_float64(
    attrs: dict[str, Any], opset: int, with_mask_and_past: bool, three_d: bool
) -> None:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    if three_d:
        args = [rand(1, 3, 4 * 2), rand(1, 4, 2 * 2), rand(1, 4, 2 * 2)]
    else:
        args = [rand(1, 2, 3, 2), rand(1, 2, 3, 2), rand(1, 2, 3, 2)]
    names = ["Q", "K", "V"]
    if with_mask_and_past:
        args += [rand(3, 5), rand(1, 2, 2, 2), rand(1, 2, 2, 2)]
        names += ["attn_mask", "past_key", "past_value"]
    fn = build_node_fn(helper.make_node("Attention", names, ["Y"], **attrs), opset)
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"qk_matmul_output_mode": 4}, "qk_matmul_output_mode"),
        ({"softmax_precision": TensorProto.INT32}, "softmax_precision"),
        ({"softmax_precision": TensorProto.FLOAT8E4M3FN}, "softmax_precision 17: set it to one"),
        ({"q_num_heads": 3}, "together"),
        ({"q_num_heads": 3, "kv_num_heads": 2}, "multiple"),
        ({"left_window_size": -2}, "window"),
    ],
)
def test_unsupported_attributes_are_refused_at_build_time(
    attrs: dict[str, Any], message: str
) -> None:
    with pytest.raises(UnsupportedAttribute, match=message):
        build_node_fn(helper.make_node("Attention", ["Q", "K", "V"], ["Y"], **attrs), 25)


@pytest.mark.parametrize(
    ("attrs", "three_d", "with_past"),
    [
        ({}, False, False),
        ({"is_causal": 1, "scale": 0.2}, False, False),
        ({"q_num_heads": 4, "kv_num_heads": 2, "is_causal": 1}, True, False),
        ({}, False, True),
    ],
)
def test_fused_kernel_path_equals_the_explicit_form_with_gradients(
    attrs: dict[str, Any], three_d: bool, with_past: bool
) -> None:
    # without masks/softcap/qk output the builder calls F.scaled_dot_product_attention; asking
    # for qk_matmul_output (which does not change Y) forces the explicit form
    gen = torch.Generator().manual_seed(0)
    if three_d:
        shapes: list[tuple[int, ...]] = [(2, 3, 4 * 4), (2, 5, 2 * 4), (2, 5, 2 * 4)]
    else:
        shapes = [(2, 2, 3, 4), (2, 2, 5, 4), (2, 2, 5, 4)]
    names = ["Q", "K", "V"]
    if with_past:
        shapes += [(2, 2, 2, 4), (2, 2, 2, 4)]
        names += ["", "past_key", "past_value"]
    values = [torch.randn(s, generator=gen) for s in shapes]
    results = []
    for outputs in (["Y"], ["Y", "", "", "qk"]):
        fn = build_node_fn(helper.make_node("Attention", names, outputs, **attrs), 23)
        leaves = [v.clone().requires_grad_(True) for v in values]
        args: list[torch.Tensor | None] = list(leaves)
        if with_past:
            args.insert(3, None)
        y = as_outputs(fn(*args), len(outputs))[0]
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        results.append((y.detach(), [leaf.grad for leaf in leaves]))
    (fast_y, fast_grads), (explicit_y, explicit_grads) = results
    torch.testing.assert_close(fast_y, explicit_y, rtol=1e-5, atol=1e-6)
    for fast, explicit in zip(fast_grads, explicit_grads, strict=True):
        torch.testing.assert_close(fast, explicit, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("opset", [23, pytest.param(24, marks=pytest.mark.slow)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_exported_transformer_encoder_matches_onnxruntime_and_torch_gradients(
    opset: int, causal: bool
) -> None:
    # the dynamo exporter turns F.scaled_dot_product_attention into Attention from opset 23
    import onnx

    from service.engine.onnx.convert import convert
    from tests.support.export import to_onnx

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(
        16, 2, 32, dropout=0.0, batch_first=True, activation="gelu"
    )
    encoder = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(5) if causal else None

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.encoder(x, mask=mask, is_causal=causal)

    module = Model()
    with torch.no_grad():  # no two equal tensors: the exporter would merge them into one
        for parameter in module.parameters():
            parameter.normal_(0.0, 0.3)
    x = torch.randn(2, 5, 16)
    model = onnx.load_from_string(to_onnx(module, x, dynamo=True, opset=opset))
    assert any(n.op_type == "Attention" for n in model.graph.node)
    (expected,) = run_onnxruntime(model, {model.graph.input[0].name: x.numpy()})
    graph = convert(model, mode="train")
    weights = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    out = graph(x)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-4, atol=1e-5)
    (out * weights).sum().backward()
    (module(x) * weights).sum().backward()

    source = dict(module.named_parameters())
    for name, converted in graph.named_graph_parameters():
        assert converted.grad is not None, name
        if name in source:
            torch.testing.assert_close(converted.grad, source[name].grad, rtol=2e-3, atol=1e-6)
            continue
        # the exporter stored some Linear weights transposed under new names: match by value
        (original,) = [
            p
            for p in source.values()
            if p.dim() == 2
            and p.t().shape == converted.shape
            and torch.equal(p.t(), converted.detach())
        ]
        assert original.grad is not None, name
        torch.testing.assert_close(converted.grad, original.grad.t(), rtol=2e-3, atol=1e-6)
