"""ai.onnx.preview FlexAttention: onnx's backend cases, outputs against onnx's reference
implementation (with score_mod/prob_mod subgraphs, GQA, scales and softmax precisions),
float64 gradchecks through converted graphs, the refusals, and CUDA against the CPU."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from service.engine.onnx.convert import convert
from service.errors import UnsupportedModelError
from tests.unit.onnx.backend_cases import Case, node_cases_named, run_case
from tests.unit.onnx.test_cuda_new_ops import _compare_model

PREVIEW = "ai.onnx.preview"
B, L, S, E, EV = 2, 3, 4, 5, 6  # batch, query length, key length, head size, value head size
CAP = 1.5  # the soft cap of `_softcap_causal`


def _backend_cases() -> dict[str, Case]:
    return node_cases_named(("test_flexattention",))


@pytest.mark.parametrize("name", sorted(_backend_cases()))
def test_backend_case_passes(name: str) -> None:
    status, detail = run_case(_backend_cases()[name])
    assert status == "pass", detail


def test_backend_cases_are_found() -> None:
    # 11 cases in onnx 1.23, each with its function-expanded twin: an empty parametrize
    # would pass silently
    assert len([n for n in _backend_cases() if "expanded" not in n]) >= 11


# --- models ---------------------------------------------------------------------------------


def _modifier(name: str, nodes: list[Any], dtype: int, initializers: list[Any]) -> Any:
    """A score_mod/prob_mod subgraph `x` → `y` ([B, Hq, L, S] in `dtype`)."""
    dims = ["B", "H", "L", "S"]
    return helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", dtype, dims)],
        [helper.make_tensor_value_info("y", dtype, dims)],
        initializers,
    )


def _softcap_causal(dtype: int, allowed: np.ndarray | None = None) -> Any:
    """score_mod: CAP·tanh(x/CAP), then -inf where `allowed` ([L, S] bools, default causal)
    is False."""
    allowed = np.tril(np.ones((L, S), bool)) if allowed is None else allowed
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    nodes = [
        helper.make_node("Div", ["x", "cap"], ["ratio"]),
        helper.make_node("Tanh", ["ratio"], ["bounded"]),
        helper.make_node("Mul", ["bounded", "cap"], ["capped"]),
        helper.make_node("Where", ["allowed", "capped", "neg_inf"], ["y"]),
    ]
    constants = [
        numpy_helper.from_array(np.array(CAP, np_dtype), "cap"),
        numpy_helper.from_array(np.array(-np.inf, np_dtype), "neg_inf"),
        numpy_helper.from_array(allowed, "allowed"),
    ]
    return _modifier("softcap_causal", nodes, dtype, constants)


def _squared(dtype: int) -> Any:
    """prob_mod: x² (non-linear, so a wrong place in the chain changes the result)."""
    return _modifier("squared", [helper.make_node("Mul", ["x", "x"], ["y"])], dtype, [])


def _rounding_probe(dtype: int, big: float) -> Any:
    """score_mod: (x + big) - big, the identity in a float wide enough for `big`, a rounding to
    whole numbers in a narrower one: tells which precision the scores reach the subgraph in."""
    nodes = [
        helper.make_node("Add", ["x", "big"], ["shifted"]),
        helper.make_node("Sub", ["shifted", "big"], ["y"]),
    ]
    big_value = numpy_helper.from_array(
        np.array(big, helper.tensor_dtype_to_np_dtype(dtype)), "big"
    )
    return _modifier("rounding_probe", nodes, dtype, [big_value])


def _outer_bias(dtype: int) -> Any:
    """score_mod: x + `bias`, a value of the outer graph (a graph input, [Hq, L, S])."""
    return _modifier("outer_bias", [helper.make_node("Add", ["x", "bias"], ["y"])], dtype, [])


def _model(
    dtype: int,
    heads: tuple[int, int],
    *,
    score_mod: Any = None,
    prob_mod: Any = None,
    with_bias: bool = False,
    **attrs: Any,
) -> onnx.ModelProto:
    """One FlexAttention node on graph inputs Q, K, V (and `bias` for `_outer_bias`)."""
    q_heads, kv_heads = heads
    node = helper.make_node("FlexAttention", ["Q", "K", "V"], ["Y"], domain=PREVIEW, **attrs)
    for name, graph in (("score_mod", score_mod), ("prob_mod", prob_mod)):
        if graph is not None:
            node.attribute.append(helper.make_attribute(name, graph))
    inputs = [
        helper.make_tensor_value_info("Q", dtype, [B, q_heads, L, E]),
        helper.make_tensor_value_info("K", dtype, [B, kv_heads, S, E]),
        helper.make_tensor_value_info("V", dtype, [B, kv_heads, S, EV]),
    ]
    if with_bias:
        precision = attrs.get("softmax_precision", dtype)
        inputs.append(helper.make_tensor_value_info("bias", precision, [q_heads, L, S]))
    graph = helper.make_graph(
        [node],
        "flex_attention",
        inputs,
        [helper.make_tensor_value_info("Y", dtype, [B, q_heads, L, EV])],
    )
    opsets = [helper.make_opsetid("", 26), helper.make_opsetid(PREVIEW, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _feeds(model: onnx.ModelProto, seed: int = 0) -> list[np.ndarray]:
    """Standard-normal values for every graph input, in its declared shape and dtype."""
    rng = np.random.default_rng(seed)
    feeds = []
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        np_dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds.append(rng.standard_normal(shape).astype(np_dtype))
    return feeds


def _ours(model: onnx.ModelProto, feeds: list[np.ndarray]) -> np.ndarray:
    graph = convert(model.__deepcopy__(), mode="eval")
    with torch.no_grad():
        (y,) = graph.run([torch.from_numpy(f) for f in feeds])
    out: np.ndarray = y.numpy()
    return out


def _reference(model: onnx.ModelProto, feeds: list[np.ndarray]) -> np.ndarray:
    names = [value.name for value in model.graph.input]
    (y,) = ReferenceEvaluator(model).run(None, dict(zip(names, feeds, strict=True)))
    return np.asarray(y)


F32, F16, F64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE

# (id, input dtype, (q_heads, kv_heads), node kwargs for `_model`)
REFERENCE_CASES: list[tuple[str, int, tuple[int, int], dict[str, Any]]] = [
    ("default_scale", F32, (2, 2), {}),
    ("scale", F32, (2, 2), {"scale": 0.3}),
    ("gqa", F32, (4, 2), {}),
    ("score_mod_gqa_scale", F32, (4, 2), {"score_mod": _softcap_causal(F32), "scale": 0.7}),
    ("prob_mod", F32, (2, 1), {"prob_mod": _squared(F32)}),
    (
        "both_mods_double_softmax",
        F32,
        (4, 2),
        {
            "score_mod": _softcap_causal(F64),
            "prob_mod": _squared(F64),
            "softmax_precision": F64,
            "scale": 0.4,
        },
    ),
    ("double", F64, (2, 2), {"score_mod": _softcap_causal(F64), "prob_mod": _squared(F64)}),
    ("float16_default_softmax", F16, (2, 2), {"score_mod": _softcap_causal(F32)}),
    ("float16_float16_softmax", F16, (4, 2), {"softmax_precision": F16, "scale": 0.3}),
    # scores rounded to whole numbers in float32 (2²⁴) and float16 (2¹¹), not in the precision
    # asked for, would fail these
    (
        "float_double_softmax",
        F32,
        (2, 2),
        {"score_mod": _rounding_probe(F64, 2.0**24), "softmax_precision": F64},
    ),
    ("float16_scores_widened", F16, (2, 2), {"score_mod": _rounding_probe(F32, 2.0**11)}),
    (
        "float16_scores_kept",
        F16,
        (2, 2),
        {"score_mod": _rounding_probe(F16, 2.0**11), "softmax_precision": F16},
    ),
]


@pytest.mark.parametrize(
    ("dtype", "heads", "kwargs"),
    [case[1:] for case in REFERENCE_CASES],
    ids=[case[0] for case in REFERENCE_CASES],
)
def test_outputs_match_the_reference(
    dtype: int, heads: tuple[int, int], kwargs: dict[str, Any]
) -> None:
    model = _model(dtype, heads, **kwargs)
    feeds = _feeds(model)
    got, want = _ours(model, feeds), _reference(model, feeds)
    assert got.dtype == want.dtype
    rtol, atol = (4e-3, 2e-3) if dtype == F16 else (1e-5, 1e-6)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("mods", [{}, {"score_mod": _softcap_causal(F32)}], ids=["plain", "mod"])
def test_a_negative_scale_is_the_positive_one_on_negated_queries(mods: dict[str, Any]) -> None:
    # scale·QKᵀ = |scale|·(-Q)Kᵀ; onnx's reference takes √scale and gives NaN
    negative, positive = (
        _model(F32, (4, 2), scale=-0.6, **mods),
        _model(F32, (4, 2), scale=0.6, **mods),
    )
    q, k, v = _feeds(negative)
    np.testing.assert_allclose(
        _ours(negative, [q, k, v]), _ours(positive, [-q, k, v]), rtol=1e-5, atol=1e-6
    )


def test_a_fully_masked_row_gives_zeros_and_finite_gradients() -> None:
    allowed = np.tril(np.ones((L, S), bool))
    allowed[0] = False  # query 0 sees no key
    model = _model(F32, (2, 2), score_mod=_softcap_causal(F32, allowed))
    feeds = _feeds(model)
    got = _ours(model, feeds)
    with np.errstate(invalid="ignore"):  # the reference's -inf - -inf
        want = _reference(model, feeds)
    assert np.all(got[:, :, 0] == 0)
    assert np.isnan(want[:, :, 0]).all()  # the reference's NaN row, the one difference
    np.testing.assert_allclose(got[:, :, 1:], want[:, :, 1:], rtol=1e-5, atol=1e-6)
    leaves = [torch.from_numpy(f).requires_grad_() for f in feeds]
    convert(model.__deepcopy__())(*leaves).square().sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


# --- gradients ------------------------------------------------------------------------------

# (id, model) in float64: every path of the implementation
GRADCHECK_MODELS: list[tuple[str, onnx.ModelProto]] = [
    ("fused_gqa_scale", _model(F64, (4, 2), scale=0.7)),
    (
        "score_mod_prob_mod_gqa",
        _model(F64, (4, 2), score_mod=_softcap_causal(F64), prob_mod=_squared(F64), scale=-0.5),
    ),
    ("outer_scope_bias", _model(F64, (2, 1), score_mod=_outer_bias(F64), with_bias=True)),
]


@pytest.mark.parametrize(
    "model", [m for _, m in GRADCHECK_MODELS], ids=[i for i, _ in GRADCHECK_MODELS]
)
def test_gradcheck_through_the_converted_graph(model: onnx.ModelProto) -> None:
    graph = convert(model.__deepcopy__())
    leaves = [torch.from_numpy(f).requires_grad_() for f in _feeds(model)]
    assert torch.autograd.gradcheck(lambda *xs: graph(*xs), tuple(leaves))


def test_the_outer_scope_bias_is_added_to_the_scores() -> None:
    # onnx's reference cannot run a subgraph that reads outer values: it runs the same bias
    # held inside the subgraph, as an initializer
    model = _model(F32, (2, 1), score_mod=_outer_bias(F32), with_bias=True)
    q, k, v, bias = _feeds(model)
    inner = _outer_bias(F32)
    inner.initializer.append(numpy_helper.from_array(bias, "bias"))
    np.testing.assert_allclose(
        _ours(model, [q, k, v, bias]),
        _reference(_model(F32, (2, 1), score_mod=inner), [q, k, v]),
        rtol=1e-5,
        atol=1e-6,
    )


# --- refusals -------------------------------------------------------------------------------


def _two_input_score_mod() -> Any:
    graph = _squared(F32)
    graph.input.append(helper.make_tensor_value_info("extra", F32, []))
    return graph


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"softmax_precision": TensorProto.INT64}, "softmax_precision 7"),
        ({"softmax_precision": TensorProto.FLOAT8E4M3FN}, "softmax_precision 17"),
        ({"scale": float("inf")}, "scale inf"),
        ({"score_mod": _two_input_score_mod()}, "score_mod has 2 input(s)"),
    ],
    ids=["integer_precision", "float8_precision", "infinite_scale", "two_input_score_mod"],
)
def test_attributes_it_cannot_honour_are_refused(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(UnsupportedModelError) as refused:
        convert(_model(F32, (2, 2), **kwargs))
    assert named in refused.value.message


# --- CUDA -----------------------------------------------------------------------------------

CUDA_MODELS = [
    _model(F32, (4, 2), scale=0.7),
    _model(F32, (4, 2), score_mod=_softcap_causal(F32), prob_mod=_squared(F32)),
    _model(F32, (2, 1), score_mod=_outer_bias(F32), with_bias=True),
]


def test_the_cuda_comparison_runs_on_the_cpu() -> None:
    for model in CUDA_MODELS:
        _compare_model(model, _feeds(model), "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_outputs_and_gradients_equal_the_cpu() -> None:
    for model in CUDA_MODELS:
        _compare_model(model, _feeds(model), "cuda")
