"""Dynamically quantised models in onnxruntime's fused forms: their weights are parameters.

An MLP quantised by `quantize_dynamic` and saved by an onnxruntime session after its graph
optimisations (`optimized_model_filepath`) holds DynamicQuantizeMatMul and, where one
DynamicQuantizeLinear feeds two products, MatMulIntegerToFloat; a BERT layer built of
com.microsoft EmbedLayerNormalization and Attention, quantised, holds QEmbedLayerNormalization
and QAttention (and, optimised, DynamicQuantizeMatMul). Their integers passed no gradient: no
projection weight or embedding was a parameter. Unfolded (fused_quantization.py), they are
fake quantisation whose weights are float parameters under the source's names.

Tolerances: the converted forward computes the same quantised integers (DynamicQuantizeLinear
is exact) and float32 products of their dequantized values where onnxruntime accumulates
integers and scales once, so the outputs agree within float32 rounding, K·2⁻²⁴ ≈ 2e-6
relative for K = 32 (measured: 2.4e-7 for the MLP, 1e-6 for BERT at outputs of 3): 1e-5. The
gradients are those of the same computation written in torch (dequantized weights, each
activation's rounding passed straight through), in float32 in another order: 1e-5 relative.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from service.engine.graph import ObservableGraph
from service.engine.onnx.conformance import check_conversion
from service.engine.onnx.convert import convert
from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from tests.support.quantized_reference import (
    dequantized_leaf,
    fake_dynamic_quantized,
    initializers,
)
from tests.support.recurrent_zoo import run_onnxruntime
from tests.unit.engine.measure_support import npz_bytes

MS = "com.microsoft"
FORMS = [("QInt8", False), ("QInt8", True), ("QUInt8", False), ("QUInt8", True)]
FUSED_NOTE = "fused quantised op(s) of onnxruntime"


def _quantized(source: onnx.ModelProto, folder: Path, form: tuple[str, bool]) -> onnx.ModelProto:
    weight_type, per_channel = form
    onnx.save(source, folder / "float.onnx")
    quantize_dynamic(
        folder / "float.onnx",
        folder / "int8.onnx",
        weight_type=QuantType[weight_type],
        per_channel=per_channel,
    )
    return onnx.load(folder / "int8.onnx")


def _optimized(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    """`model` as an onnxruntime session saves it after its extended graph optimisations."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(folder / "optimized.onnx")


def _ops(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node}


def _converted(model: onnx.ModelProto) -> ObservableGraph:
    """A conversion of a copy: converting releases the initializers' bytes, and the module's
    fixtures are shared."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return convert(copy)


def _gradients(loss: torch.Tensor, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))


def _assert_gradients(graph: ObservableGraph, expected: dict[str, torch.Tensor]) -> None:
    params = dict(graph.named_graph_parameters())
    assert set(params) == set(expected)
    for name, grad in expected.items():
        got = params[name].grad
        assert got is not None and got.abs().max() > 0, name
        # LayerNorm's backward subtracts row means of terms of the gradient's size: an
        # element's rounding is relative to the largest, not to itself
        scale = float(grad.abs().max())
        torch.testing.assert_close(got, grad, rtol=1e-5, atol=1e-5 * scale)


# ---------------------------------------------------------------- an optimised MLP


class _MLP(nn.Module):
    """fc1 and fc3 read x: one DynamicQuantizeLinear feeds both (MatMulIntegerToFloat)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 8), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) + self.fc3(x)


X = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=FORMS, ids=lambda form: f"{form[0]}-per_channel{form[1]}")
def optimized_mlp(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> onnx.ModelProto:
    """A [2, 3, 16] input: the Linear layers export as MatMul + Add (quantize_dynamic leaves a
    2-D one's Gemm in float)."""
    torch.manual_seed(0)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter's deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _MLP().eval(),
            (X,),
            buffer,  # type: ignore[arg-type]
            dynamo=False,
            input_names=["x"],
            opset_version=13,
        )
    folder = tmp_path_factory.mktemp("mlp")
    model = _optimized(
        _quantized(onnx.load_from_string(buffer.getvalue()), folder, request.param), folder
    )
    # the premise: the fused forms, and none of quantize_dynamic's own pattern left
    assert {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"} <= _ops(model)
    assert not {"MatMulInteger", "Cast", "Mul"} & _ops(model)
    return model


def _mlp_reference(model: onnx.ModelProto) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The optimised MLP in torch from its initializers: y and the gradients of sum(y²)."""
    init = initializers(model)
    # each fused node reads its weight at input 1 and its bias last: layer → weight name
    weight = {
        node.input[-1].removesuffix(".bias"): node.input[1].removesuffix("_quantized")
        for node in model.graph.node
        if node.domain == MS
    }
    leaves = {
        weight[layer]: dequantized_leaf(init, weight[layer]) for layer in ("fc1", "fc2", "fc3")
    }
    leaves |= {f"{n}.bias": init[f"{n}.bias"].clone().requires_grad_() for n in weight}

    def linear(x: torch.Tensor, layer: str) -> torch.Tensor:
        return fake_dynamic_quantized(x) @ leaves[weight[layer]] + leaves[f"{layer}.bias"]

    y = linear(torch.relu(linear(X, "fc1")), "fc2") + linear(X, "fc3")
    return y.detach(), _gradients(y.square().sum(), leaves)


def test_an_optimised_mlps_fused_products_have_their_weights_as_parameters(
    optimized_mlp: onnx.ModelProto,
) -> None:
    (expected,) = run_onnxruntime(optimized_mlp, {"x": X.numpy()})
    reference, expected_grads = _mlp_reference(optimized_mlp)
    graph = _converted(optimized_mlp)
    y = graph(X)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.detach(), reference, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    _assert_gradients(graph, expected_grads)
    notes = graph.metadata["notes"]
    assert any(
        n.startswith(f"3 {FUSED_NOTE} (2 MatMulIntegerToFloat, 1 DynamicQuantizeMatMul")
        and "3 integer weight(s) are float parameters" in n
        for n in notes
    ), notes
    check = check_conversion(optimized_mlp, graph, [X])  # onnxruntime runs the fused ops
    assert check.checked and check.max_abs_error is not None and check.max_abs_error < 1e-5


def test_a_fused_product_of_a_statically_quantized_input_keeps_its_op() -> None:
    """A_q from a QuantizeLinear, not a DynamicQuantizeLinear: not quantize_dynamic's pattern,
    so the op computes it (exactly) and its weight stays an integer constant."""
    rng = np.random.default_rng(0)
    initializers: dict[str, np.ndarray] = {
        "x_scale": np.array(0.05, np.float32),
        "x_zero": np.array(128, np.uint8),
        "w": rng.integers(-128, 128, (16, 8)).astype(np.int8),
        "w_scale": np.array(0.01, np.float32),
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
        helper.make_node(
            "MatMulIntegerToFloat",
            ["x_q", "w", "x_scale", "w_scale", "x_zero"],
            ["y"],
            domain=MS,
            name="static",
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "static",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8])],
        [numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    (expected,) = run_onnxruntime(model, {"x": x})
    converted = convert(model)
    np.testing.assert_array_equal(converted(torch.from_numpy(x)).detach().numpy(), expected)
    # its integers, scales and zero points are the kernel's constants, not weights
    assert dict(converted.named_graph_parameters()) == {}
    assert any(
        "1 fused quantised op(s) of onnxruntime (1 MatMulIntegerToFloat: static) keep" in n
        for n in converted.metadata["notes"]
    )


# ---------------------------------------------------------------- a quantised BERT layer

BATCH, SEQ, HIDDEN, HEADS, VOCAB = 2, 5, 16, 2, 30
FEEDS = {
    "ids": np.random.default_rng(1).integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32),
    "segments": np.random.default_rng(2).integers(0, 2, (BATCH, SEQ)).astype(np.int32),
    "mask": np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32),  # right padding
}
TARGET = torch.randint(0, HIDDEN, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
TABLES = ("word", "position", "segment", "gamma", "beta")
PROJECTIONS = ("qkv_weight", "out_weight")


def _bert_layer() -> onnx.ModelProto:
    """EmbedLayerNormalization → Attention (its mask_index) → MatMul + Add, as onnxruntime's
    transformer optimizer writes BERT."""
    rng = np.random.default_rng(0)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    weights = {
        "word": weight(VOCAB, HIDDEN),
        "position": weight(SEQ, HIDDEN),
        "segment": weight(2, HIDDEN),
        "gamma": 1 + weight(HIDDEN),
        "beta": weight(HIDDEN),
        "qkv_weight": weight(HIDDEN, 3 * HIDDEN),
        "qkv_bias": weight(3 * HIDDEN),
        "out_weight": weight(HIDDEN, HIDDEN),
        "out_bias": weight(HIDDEN),
    }
    nodes = [
        helper.make_node(
            "EmbedLayerNormalization",
            ["ids", "segments", *TABLES, "mask"],
            ["embedded", "mask_index"],
            domain=MS,
            epsilon=1e-12,
        ),
        helper.make_node(
            "Attention",
            ["embedded", "qkv_weight", "qkv_bias", "mask_index"],
            ["attended"],
            domain=MS,
            num_heads=HEADS,
        ),
        helper.make_node("MatMul", ["attended", "out_weight"], ["projected"]),
        helper.make_node("Add", ["projected", "out_bias"], ["y"]),
    ]
    hidden = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH, SEQ, HIDDEN])
        for name in ("embedded", "attended", "projected")
    ]  # the quantiser reads the types of the contrib ops' outputs from here
    graph = helper.make_graph(
        nodes,
        "bert",
        [helper.make_tensor_value_info(n, TensorProto.INT32, [BATCH, SEQ]) for n in FEEDS],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, SEQ, HIDDEN])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
        value_info=[
            *hidden,
            helper.make_tensor_value_info("mask_index", TensorProto.INT32, [BATCH]),
        ],
    )
    opsets = [helper.make_opsetid("", 14), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


@pytest.fixture(scope="module", params=FORMS, ids=lambda form: f"{form[0]}-per_channel{form[1]}")
def quantized_bert(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> onnx.ModelProto:
    model = _quantized(_bert_layer(), tmp_path_factory.mktemp("bert"), request.param)
    assert {"QEmbedLayerNormalization", "QAttention", "MatMulInteger"} <= _ops(model)
    return model


@pytest.fixture(scope="module")
def optimized_bert(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    folder = tmp_path_factory.mktemp("bert_optimized")
    model = _optimized(_quantized(_bert_layer(), folder, ("QInt8", True)), folder)
    fused = {"QEmbedLayerNormalization", "QAttention", "DynamicQuantizeMatMul"}
    assert fused <= _ops(model) and "MatMulInteger" not in _ops(model)
    return model


def _bert_reference(model: onnx.ModelProto) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The quantised layer in torch from its initializers: y and the float leaves."""
    init = initializers(model)
    leaves = {name: dequantized_leaf(init, name) for name in (*TABLES, *PROJECTIONS)}
    leaves |= {n: init[n].clone().requires_grad_() for n in ("qkv_bias", "out_bias")}
    ids, segments, mask = (torch.from_numpy(FEEDS[n]).long() for n in FEEDS)
    summed = leaves["word"][ids] + leaves["position"][:SEQ] + leaves["segment"][segments]
    embedded = F.layer_norm(summed, (HIDDEN,), leaves["gamma"], leaves["beta"], eps=1e-12)
    qkv = fake_dynamic_quantized(embedded) @ leaves["qkv_weight"] + leaves["qkv_bias"]
    q, k, v = (t.reshape(BATCH, SEQ, HEADS, -1).transpose(1, 2) for t in qkv.split(HIDDEN, -1))
    # mask_index: each row's count of 1s, a right-padded length; padding adds -10000
    keep = torch.arange(SEQ) < (mask == 1).sum(-1).reshape(BATCH, 1, 1, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS) + torch.where(keep, 0, -1e4)
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(BATCH, SEQ, HIDDEN)
    return fake_dynamic_quantized(attended) @ leaves["out_weight"] + leaves["out_bias"], leaves


def _check_bert(model: onnx.ModelProto) -> list[str]:
    """Forward against onnxruntime and the reference, gradients against the reference; the
    converted graph's notes."""
    (expected,) = run_onnxruntime(model, FEEDS)
    reference, leaves = _bert_reference(model)
    expected_grads = _gradients(reference.square().sum(), leaves)
    graph = _converted(model)
    inputs = [torch.from_numpy(v) for v in FEEDS.values()]
    y = graph(*inputs)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.detach(), reference.detach(), rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    _assert_gradients(graph, expected_grads)
    check = check_conversion(model, graph, inputs)
    assert check.checked and check.max_abs_error is not None and check.max_abs_error < 1e-5
    return list(graph.metadata["notes"])


def test_a_quantized_bert_layers_embeddings_and_attention_weights_are_parameters(
    quantized_bert: onnx.ModelProto,
) -> None:
    notes = _check_bert(quantized_bert)
    assert any(
        n.startswith(f"2 {FUSED_NOTE} (1 QEmbedLayerNormalization, 1 QAttention")
        and "6 integer weight(s) are float parameters" in n
        for n in notes
    ), notes


def test_an_optimised_quantized_bert_layer_is_unfolded_whole(
    optimized_bert: onnx.ModelProto,
) -> None:
    notes = _check_bert(optimized_bert)
    assert any(f"3 {FUSED_NOTE}" in n and "7 integer weight(s)" in n for n in notes), notes


def test_the_diagnosis_of_an_optimised_quantized_bert_layer(
    optimized_bert: onnx.ModelProto,
) -> None:
    """The service's whole diagnosis: the loss and every weight's gradient are the fake-
    quantised computation's, the conformance check agrees with onnxruntime's fused kernels,
    and the report says what was unfolded."""
    report = diagnose(
        optimized_bert.SerializeToString(),
        npz_bytes(**{k: torch.from_numpy(v) for k, v in FEEDS.items()}, target=TARGET),
        DiagnoseOptions(),
    )
    reference, leaves = _bert_reference(optimized_bert)
    loss = F.cross_entropy(reference.reshape(-1, HIDDEN), TARGET.reshape(-1))
    grads = _gradients(loss, leaves)
    assert report.loss.value == pytest.approx(loss.item(), rel=1e-5)
    ours = {p.name: p.grad_norm for p in report.parameters}
    assert ours == pytest.approx({n: float(g.norm()) for n, g in grads.items()}, rel=1e-4)
    assert report.model.conversion is not None
    assert report.model.conversion.max_abs_error is not None
    assert report.model.conversion.max_abs_error < 1e-5
    assert any(
        n.startswith(f"3 {FUSED_NOTE} (1 QEmbedLayerNormalization, 1 QAttention, 1 Dynamic")
        for n in report.notes
    ), report.notes
