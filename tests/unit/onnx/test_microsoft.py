"""com.microsoft contrib ops (and onnxruntime's default-domain LayerNormalization /
SimplifiedLayerNormalization for opsets < 17) against onnxruntime's CPU kernels."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from onnx import helper

from service.engine.onnx.registry import UnsupportedAttribute
from tests.support.recurrent_zoo import (
    as_outputs,
    build_node_fn,
    run_onnxruntime,
    single_node_model,
)

MS = "com.microsoft"


def _random(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


def _check(
    op: str,
    inputs: list[np.ndarray | None],
    outputs: list[str],
    *,
    domain: str = MS,
    opset: int = 14,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    **attrs: Any,
) -> list[torch.Tensor]:
    names = [f"in{i}" if v is not None else "" for i, v in enumerate(inputs)]
    node = helper.make_node(op, names, outputs, domain=domain, **attrs)
    extra = {MS: 1} if domain == MS else None
    model, feeds = single_node_model(node, inputs, opset=opset, extra_opsets=extra)
    expected = run_onnxruntime(model, feeds)
    fn = build_node_fn(node, 1 if domain == MS else opset)
    got = as_outputs(
        fn(*[None if v is None else torch.from_numpy(v) for v in inputs]), len(outputs)
    )
    named = [(name, g) for name, g in zip(outputs, got, strict=True) if name]
    assert len(named) == len(expected)
    for (name, g), e in zip(named, expected, strict=True):
        assert tuple(g.shape) == e.shape, name
        np.testing.assert_allclose(g.numpy(), e, rtol=rtol, atol=atol, err_msg=name)
    return got


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "attrs"),
    [
        ((3, 4), (4, 5), {}),
        ((3, 4), (5, 4), {"transB": 1, "alpha": 0.5}),
        ((4, 3), (4, 5), {"transA": 1}),
        ((2, 3, 4), (2, 5, 4), {"transB": 1, "alpha": 2.0}),
        ((2, 3, 4), (4, 5), {}),
        ((3, 2, 4), (2, 4, 5), {"transBatchA": 1}),
        ((3, 2, 4), (2, 5, 4), {"transBatchA": 1, "transA": 0, "transB": 1}),
        ((2, 3, 4), (4, 2, 5), {"transBatchB": 1}),
        ((2, 3, 4), (5, 2, 4), {"transBatchB": 1, "transB": 1}),
        ((4, 2, 3), (4, 2, 5), {"transBatchA": 1, "transA": 1, "transBatchB": 1}),
        ((2, 2, 3, 4), (2, 2, 4, 5), {"alpha": 0.125}),
    ],
)
def test_fused_matmul(
    a_shape: tuple[int, ...], b_shape: tuple[int, ...], attrs: dict[str, Any]
) -> None:
    _check("FusedMatMul", [_random(*a_shape), _random(*b_shape, seed=1)], ["Y"], **attrs)


def test_gelu_family() -> None:
    x, bias = _random(2, 3, 8), _random(8, seed=1)
    _check("Gelu", [x], ["Y"])
    _check("BiasGelu", [x, bias], ["Y"])
    _check("FastGelu", [x], ["Y"], atol=1e-4)
    _check("FastGelu", [x, bias], ["Y"], atol=1e-4)
    _check("QuickGelu", [x], ["Y"])
    _check("QuickGelu", [x], ["Y"], alpha=1.3)


@pytest.mark.parametrize("skip_shape", [(2, 3, 8), (1, 3, 8), (3, 8)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skip_layer_normalization(skip_shape: tuple[int, ...], with_bias: bool) -> None:
    x, skip = _random(2, 3, 8), _random(*skip_shape, seed=1)
    gamma, beta, bias = _random(8, seed=2), _random(8, seed=3), _random(8, seed=4)
    inputs: list[np.ndarray | None] = [x, skip, gamma, beta, bias if with_bias else None]
    if not with_bias:
        inputs.pop()
    _check("SkipLayerNormalization", inputs, ["Y"], epsilon=1e-5)
    outputs = ["Y", "mean", "inv_std_var", "sum"] if with_bias else ["Y", "mean", "inv_std_var"]
    _check("SkipLayerNormalization", inputs, outputs)
    _check("SkipLayerNormalization", [x, skip, gamma], ["Y"])


def test_skip_simplified_layer_normalization() -> None:
    x, skip, gamma, bias = _random(2, 3, 8), _random(2, 3, 8, seed=1), _random(8), _random(8)
    _check("SkipSimplifiedLayerNormalization", [x, skip, gamma], ["Y"], epsilon=1e-6)
    _check(
        "SkipSimplifiedLayerNormalization",
        [x, skip, gamma, bias],
        ["Y", "", "inv_std_var", "sum"],
    )


@pytest.mark.parametrize("axis", [-1, 1])
def test_default_domain_contrib_normalizations_before_opset_17(axis: int) -> None:
    x, scale, bias = _random(2, 3, 4), _random(*(3, 4)[axis:], seed=1), _random(4)
    bias = _random(*(3, 4)[axis:], seed=2)
    _check("LayerNormalization", [x, scale, bias], ["Y"], domain="", axis=axis)
    _check("LayerNormalization", [x, scale], ["Y", "mean", "inv_std"], domain="", axis=axis)
    _check("SimplifiedLayerNormalization", [x, scale], ["Y"], domain="", axis=axis)
    _check("SimplifiedLayerNormalization", [x, scale], ["Y", "inv_std"], domain="", epsilon=1e-3)


def test_skip_layer_normalization_gradients_float64() -> None:
    fn = build_node_fn(
        helper.make_node("SkipLayerNormalization", ["x", "s", "g", "b", "c"], ["y"], domain=MS), 1
    )
    gen = torch.Generator().manual_seed(0)
    args = [
        torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
        for shape in [(2, 3), (2, 3), (3,), (3,), (3,)]
    ]
    assert torch.autograd.gradcheck(fn, args)


def test_contrib_ops_inside_a_converted_graph_match_onnxruntime_and_train() -> None:
    from onnx import TensorProto, numpy_helper

    from service.engine.onnx.convert import convert

    rng = np.random.default_rng(0)
    shapes = {"enc.w1": (8, 16), "enc.b1": (16,), "enc.w2": (8, 16), "enc.gamma": (8,)}
    shapes |= {"enc.beta": (8,), "enc.b2": (8,)}
    initializers = [
        numpy_helper.from_array((rng.standard_normal(s) * 0.5).astype(np.float32), name)
        for name, s in shapes.items()
    ]
    nodes = [
        helper.make_node("FusedMatMul", ["x", "enc.w1"], ["h1"], domain=MS, alpha=0.5),
        helper.make_node("BiasGelu", ["h1", "enc.b1"], ["h2"], domain=MS),
        helper.make_node("FusedMatMul", ["h2", "enc.w2"], ["h3"], domain=MS, transB=1),
        helper.make_node(
            "SkipLayerNormalization",
            ["h3", "x", "enc.gamma", "enc.beta", "enc.b2"],
            ["y"],
            domain=MS,
            epsilon=1e-5,
        ),
        helper.make_node("QuickGelu", ["y"], ["z"], domain=MS),
    ]
    graph = helper.make_graph(
        nodes,
        "contrib",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3, 8])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    )
    model.ir_version = 10
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    (expected,) = run_onnxruntime(model, {"x": x})
    converted = convert(model)
    out = converted(torch.from_numpy(x))
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    parameters = dict(converted.named_graph_parameters())
    assert set(parameters) == set(shapes)
    for name, parameter in parameters.items():
        assert parameter.grad is not None and float(parameter.grad.abs().sum()) > 0, name


@pytest.mark.slow  # the dynamo export and onnxruntime's optimizer: a few seconds
def test_onnxruntime_optimized_transformer_converts_and_matches(tmp_path: Any) -> None:
    # onnxruntime's transformer optimizer fuses a dynamo-exported encoder into
    # SkipLayerNormalization and BiasGelu (attention fusion off: it recognises no attention
    # pattern in this export, so it would fuse nothing; com.microsoft Attention and
    # MultiHeadAttention themselves are checked node by node)
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from service.engine.onnx.convert import convert
    from tests.support.export import to_onnx

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(
        16, 2, 32, dropout=0.0, batch_first=True, activation="gelu"
    )
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    options = FusionOptions("bert")
    options.enable_attention = False
    optimized = optimize_model(
        # the exporter's optimizer on, as a user's export has it: the fusions need its output
        onnx.load_from_string(to_onnx(encoder, x, dynamo=True, optimize=True)),
        model_type="bert",
        num_heads=2,
        hidden_size=16,
        optimization_options=options,
        opt_level=0,
    )
    # saving is what adds the com.microsoft opset import: a user uploads the saved file
    optimized.save_model_to_file(str(tmp_path / "optimized.onnx"))
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    contrib = {n.op_type for n in optimized.graph.node if n.domain == MS}
    assert {"SkipLayerNormalization", "BiasGelu"} <= contrib
    input_name = optimized.graph.input[0].name
    (expected,) = run_onnxruntime(optimized, {input_name: x.numpy()})
    with torch.no_grad():
        got = convert(optimized, mode="eval")(x)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)


FUSED_ACTIVATIONS: list[tuple[str, list[float]]] = [
    ("Relu", []),
    ("Tanh", []),
    ("Sigmoid", []),
    ("LeakyRelu", [0.1]),
    ("HardSigmoid", [0.3, 0.4]),
    ("Clip", [-0.5, 0.7]),
]


@pytest.mark.parametrize(("activation", "params"), FUSED_ACTIVATIONS)
def test_fused_conv(activation: str, params: list[float]) -> None:
    x, w, b = _random(2, 3, 6, 6), _random(4, 3, 3, 3, seed=1), _random(4, seed=2)
    attrs: dict[str, Any] = {"activation": activation, "kernel_shape": [3, 3], "pads": [1, 0, 1, 0]}
    if params:
        attrs["activation_params"] = params
    _check("FusedConv", [x, w, b], ["Y"], **attrs)
    z = _random(2, 4, 6, 4, seed=3)  # the summed residual
    _check("FusedConv", [x, w, b, z], ["Y"], **attrs)


@pytest.mark.parametrize(("activation", "params"), FUSED_ACTIVATIONS[:5])
def test_fused_gemm(activation: str, params: list[float]) -> None:
    a, b, c = _random(3, 4), _random(5, 4, seed=1), _random(5, seed=2)
    attrs: dict[str, Any] = {"activation": activation, "transB": 1, "alpha": 0.5}
    attrs |= dict(zip(["activation_alpha", "activation_beta"], params, strict=False))
    _check("FusedGemm", [a, b, c], ["Y"], **attrs)


def test_unknown_fused_activation_is_refused() -> None:
    node = helper.make_node("FusedConv", ["x", "w"], ["y"], domain=MS, activation="Swish")
    with pytest.raises(UnsupportedAttribute, match="Swish"):
        build_node_fn(node, 1)


def test_model_saved_by_onnxruntime_optimizer_converts(tmp_path: Any) -> None:
    # onnxruntime's extended optimizations fold BatchNorm and fuse activations into
    # com.microsoft FusedConv / FusedGemm; a user may upload such a saved file
    import onnx
    import onnxruntime as ort

    from service.engine.onnx.convert import convert
    from tests.support.export import to_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3),
        torch.nn.LeakyReLU(0.1),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 6),
        torch.nn.ReLU(),
    ).eval()
    x = torch.randn(2, 3, 6, 6)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(
        to_onnx(net, x, training=False), options, providers=["CPUExecutionProvider"]
    )
    model = onnx.load(str(tmp_path / "optimized.onnx"))
    fused = {n.op_type for n in model.graph.node if n.domain == MS}
    assert {"FusedConv", "FusedGemm"} <= fused
    (expected,) = run_onnxruntime(model, {model.graph.input[0].name: x.numpy()})
    converted = convert(model, mode="eval")
    out = converted(x)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for _, p in converted.named_graph_parameters())


def _ms_attention_cases() -> list[Any]:
    rng = np.random.default_rng(5)
    batch, seq, width, heads, size = 2, 4, 6, 2, 3
    hidden = heads * size
    x, w, b = _random(batch, seq, width), _random(width, 3 * hidden, seed=1), _random(3 * hidden)
    padded = (rng.random((batch, seq)) > 0.5).astype(np.int32)
    padded[0, :2] = 0  # with unidirectional: query 0 sees only key 0, which is padding
    per_query = (rng.random((batch, seq, seq)) > 0.3).astype(np.int32)
    per_query[0, 1] = 0  # one fully padded query row
    past = _random(2, batch, heads, 3, size, seed=2)
    return [
        pytest.param([x, w, b], ["y"], {}, id="plain"),
        pytest.param([x, w], ["y"], {"unidirectional": 1, "scale": 0.3}, id="causal_nobias"),
        pytest.param([x, w, b, np.array([3, 2], np.int32)], ["y"], {}, id="right_padding"),
        pytest.param([x, w, b, np.array([4, 3, 1, 0], np.int32)], ["y"], {}, id="left_padding"),
        pytest.param(  # lengths, then ragged starts only the CUDA kernels read
            [x, w, b, np.array([3, 2, 0, 3, 5, 0, 3, 5], np.int32)], ["y"], {}, id="3b_plus_2"
        ),
        pytest.param([x, w, b, padded], ["y"], {"unidirectional": 1}, id="raw_2d_causal"),
        pytest.param([x, w, b, per_query], ["y"], {}, id="raw_3d"),
        pytest.param([x, w, b, per_query], ["y"], {"unidirectional": 1}, id="raw_3d_causal"),
        pytest.param([x, w, b, None, past], ["y", "present"], {}, id="past"),
        pytest.param(
            [x, w, b, (rng.random((batch, seq + 3)) > 0.3).astype(np.int32), past],
            ["y", "present"],
            {"unidirectional": 1, "mask_filter_value": -1e9},
            id="past_mask_causal",
        ),
        pytest.param(
            [x, w, b, None, None, _random(1, heads, seq, seq, seed=3)], ["y"], {}, id="bias"
        ),
        pytest.param(
            [x, _random(width, 2 * hidden + 4, seed=4), _random(2 * hidden + 4, seed=5)],
            ["y"],
            {"qkv_hidden_sizes": [hidden, hidden, 4]},
            id="v_size",
        ),
    ]


@pytest.mark.parametrize(("inputs", "outputs", "attrs"), _ms_attention_cases())
def test_ms_attention(
    inputs: list[np.ndarray | None], outputs: list[str], attrs: dict[str, Any]
) -> None:
    _check("Attention", inputs, outputs, num_heads=2, **attrs)


def test_ms_attention_gradcheck_and_refusals() -> None:
    node = helper.make_node(
        "Attention", ["x", "w", "b", "m"], ["y"], domain=MS, num_heads=2, unidirectional=1
    )
    fn = build_node_fn(node, 1)
    gen = torch.Generator().manual_seed(0)
    args = [
        torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
        for shape in [(1, 3, 4), (4, 12), (12,)]
    ]
    mask = torch.tensor([[1, 0, 1]])
    assert torch.autograd.gradcheck(lambda x, w, b: fn(x, w, b, mask), args)
    attrs: dict[str, Any]
    for attrs in ({"do_rotary": 1}, {"qkv_hidden_sizes": [4, 4, 3]}, {}):
        heads: dict[str, Any] = {} if not attrs else {"num_heads": 2}
        refused = helper.make_node("Attention", ["x", "w"], ["y"], domain=MS, **heads, **attrs)
        with pytest.raises(UnsupportedAttribute):
            build_node_fn(refused, 1)
