"""Fused attention and linear groups (onnx/fusions.py, graph.FusedNodes): run as one call when
nobody observes the nodes, node by node otherwise, and never a different result."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from service.engine.graph import Node, NodeObserver, ObservableGraph
from service.engine.onnx.convert import convert, load_onnx
from tests.support.export import to_onnx
from tests.support.op_counts import OpCounter
from tests.support.zoo import TransformerEncoder


def _step(graph: ObservableGraph, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
    """Output and every parameter's and float input's gradient of one training step."""
    graph.zero_grad(set_to_none=True)
    leaves = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = graph(*leaves)
    out.square().mean().backward()
    grads = [p.grad for _, p in graph.named_graph_parameters()]
    return out.detach(), grads + [x.grad for x in leaves]


def _first_call(graph: ObservableGraph, *inputs: torch.Tensor) -> None:
    """The first call with these shapes runs node by node (ObservableGraph.run keeps the
    shape arithmetic it computes); fused groups run from the second on."""
    with torch.no_grad():
        graph(*inputs)


def _observed(graph: ObservableGraph, seen: list[str]) -> NodeObserver:
    def observe(node: Node, outputs: Any) -> None:
        seen.append(node.op_type)

    return observe


def _assert_same(a: tuple[torch.Tensor, list[Any]], b: tuple[torch.Tensor, list[Any]]) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    for x, y in zip(a[1], b[1], strict=True):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dynamo", [False, True])
def test_an_exported_encoder_runs_its_attention_and_linears_fused_unless_observed(
    dynamo: bool,
) -> None:
    torch.manual_seed(0)
    encoder = TransformerEncoder(dim=32, heads=4, layers=2, ffn=64).train()
    x = torch.randn(3, 5, 32)
    graph = convert(load_onnx(to_onnx(encoder, x, dynamo=dynamo)), mode="train")
    kinds = Counter(f.op_type for f in graph.fusions)
    assert kinds["Attention"] == 2 and kinds["Linear"] >= 5, kinds  # in_proj, ffn ×2, head
    _first_call(graph, x)
    with OpCounter() as unobserved_ops:
        fused = _step(graph, x)
    seen: list[str] = []
    graph.observer = _observed(graph, seen)
    with OpCounter() as observed_ops:
        node_by_node = _step(graph, x)
    graph.observer = None
    _assert_same(fused, node_by_node)
    # the original module's result too: what the fused kernels are meant to reproduce
    encoder.zero_grad(set_to_none=True)
    torch.testing.assert_close(fused[0], encoder(x).detach(), rtol=1e-5, atol=1e-5)
    assert "_scaled_dot_product_flash_attention_for_cpu" in unobserved_ops.ops
    assert "bmm" not in unobserved_ops.ops and "softmax" not in unobserved_ops.ops
    assert observed_ops.ops["_softmax"] == 2 and "bmm" in observed_ops.ops
    assert seen.count("Softmax") == 2 and seen.count("MatMul") == len(
        [n for n in graph.nodes if n.op_type == "MatMul"]
    )


def _attention_model(
    *, opset: int = 18, mask: bool = False, divide: bool = False, learned_scale: bool = False
) -> onnx.ModelProto:
    """q·kᵀ [/ c or · c] [+ mask] → Softmax → ·v, BERT-style, hand-written."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Transpose", ["k"], ["k_t"], perm=[0, 1, 3, 2])]
    nodes.append(helper.make_node("MatMul", ["q", "k_t"], ["scores"]))
    scaled = "scores"
    initializers = []

    def constant(name: str, value: np.ndarray) -> None:  # a Constant node: no parameter
        nodes.insert(
            0, helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value))
        )

    if divide or learned_scale:
        scaled = "scaled"
        op = "Div" if divide else "Mul"
        nodes.append(helper.make_node(op, ["scores", "c"], ["scaled"]))
        value = np.array(8.0 if divide else 0.3, np.float32)
        if learned_scale:  # a float initializer: a parameter, with a gradient
            initializers.append(numpy_helper.from_array(value, "c"))
        else:
            constant("c", value)
    if mask:
        nodes.append(helper.make_node("Sub", ["one", "keep"], ["dropped"]))
        nodes.append(helper.make_node("Mul", ["dropped", "big"], ["bias"]))
        nodes.append(helper.make_node("Add", [scaled, "bias"], ["masked"]))
        scaled = "masked"
        constant("one", np.array(1.0, np.float32))
        constant("big", np.array(-10000.0, np.float32))
        keep = (rng.random((2, 1, 1, 6)) > 0.3).astype(np.float32)
        keep[..., 0] = 1.0
        constant("keep", keep)
    softmax = helper.make_node("Softmax", [scaled], ["probs"])
    if opset < 13:  # the last axis, as the default -1 is from opset 13 on
        softmax.attribute.append(helper.make_attribute("axis", 3))
    nodes.append(softmax)
    nodes.append(helper.make_node("MatMul", ["probs", "v"], ["y"]))
    shape = [2, 3, 6, 4]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("q", "k", "v")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _feeds() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.standard_normal((2, 3, 6, 4)).astype(np.float32) for _ in range(3)]


def _ort(model: onnx.ModelProto, feeds: list[np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, dict(zip("qkv", feeds, strict=True)))[0])


@pytest.mark.parametrize("kind", ["plain", "divided and masked", "legacy softmax on the last axis"])
def test_hand_written_attention_fuses_and_equals_onnxruntime(kind: str) -> None:
    model = _attention_model(
        mask=kind == "divided and masked",
        divide=kind == "divided and masked",
        opset=11 if kind.startswith("legacy") else 18,
    )
    graph = convert(model, mode="train")
    assert [f.op_type for f in graph.fusions] == ["Attention"]
    feeds = _feeds()
    inputs = [torch.from_numpy(f) for f in feeds]
    _first_call(graph, *inputs)
    with OpCounter() as ops:
        fused = _step(graph, *inputs)
    assert "_scaled_dot_product_flash_attention_for_cpu" in ops.ops, ops.ops
    np.testing.assert_allclose(fused[0].numpy(), _ort(model, feeds), rtol=1e-5, atol=1e-6)
    graph.observer = _observed(graph, [])
    _assert_same(fused, _step(graph, *inputs))


def test_a_learned_scale_gets_its_gradient_through_the_fused_attention() -> None:
    """A score scale that is a parameter (a learned temperature) is no plain number for
    SDPA's `scale`: it multiplies q, and its gradient is the nodes' own."""
    graph = convert(_attention_model(learned_scale=True), mode="train")
    assert [f.op_type for f in graph.fusions] == ["Attention"]
    inputs = [torch.from_numpy(f) for f in _feeds()]
    _first_call(graph, *inputs)
    with OpCounter() as ops:
        fused = _step(graph, *inputs)
    assert "_scaled_dot_product_flash_attention_for_cpu" in ops.ops and "bmm" not in ops.ops
    assert fused[1][0] is not None and float(fused[1][0].abs()) > 0  # ∂L/∂c
    graph.observer = _observed(graph, [])
    _assert_same(fused, _step(graph, *inputs))


def test_softmax_over_a_flattened_block_is_not_attention() -> None:
    """Before opset 13 Softmax's default axis 1 normalises over [heads, L, S] at once."""
    model = _attention_model(opset=11)
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    del softmax.attribute[:]
    graph = convert(model, mode="train")
    feeds = _feeds()
    _first_call(graph, *[torch.from_numpy(f) for f in feeds])
    with OpCounter() as ops:
        out, _ = _step(graph, *[torch.from_numpy(f) for f in feeds])
    assert not any(op.startswith("_scaled_dot_product") for op in ops.ops)
    np.testing.assert_allclose(out.numpy(), _ort(model, feeds), rtol=1e-5, atol=1e-6)


def test_a_swapped_node_or_a_new_reader_unfuses_the_group() -> None:
    graph = convert(_attention_model(), mode="train")
    inputs = [torch.from_numpy(f) for f in _feeds()]
    _first_call(graph, *inputs)
    softmax = next(n for n in graph.nodes if n.op_type == "Softmax")
    reference = _step(graph, *inputs)[0]
    # a transform replaces the Softmax (as the fix verifier swaps activations)
    softmax.fn = lambda x: torch.softmax(2 * x, -1)
    q, k, v = inputs
    expected = torch.softmax(2 * (q @ k.transpose(-1, -2)), -1) @ v
    torch.testing.assert_close(_step(graph, *inputs)[0], expected, rtol=1e-5, atol=1e-6)
    # another node reads the probabilities: the group's intermediate is needed
    softmax.fn = graph.fusions[0].fns[graph.fusions[0].nodes.index(softmax)]
    torch.testing.assert_close(_step(graph, *inputs)[0], reference)
    graph.nodes = [
        *graph.nodes,
        Node(name="peek", op_type="Identity", inputs=["probs"], outputs=["peeked"], fn=torch.clone),
    ]
    graph.output_names = ["y", "peeked"]
    with OpCounter() as ops:
        y, peeked = graph(*inputs)
    assert "bmm" in ops.ops
    torch.testing.assert_close(y, reference)
    torch.testing.assert_close(peeked, torch.softmax(q @ k.transpose(-1, -2), -1))


def _linear_model(bias_shape: list[int]) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((8, 5)).astype(np.float32)
    bias = rng.standard_normal(bias_shape).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "w_t"], ["xw"]),
            helper.make_node("Add", ["b", "xw"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("bias_shape", [[8], [3, 8]])
def test_matmul_plus_bias_runs_as_one_linear_where_the_bias_is_a_vector(
    bias_shape: list[int],
) -> None:
    model = _linear_model(bias_shape)
    graph = convert(model.__deepcopy__(), mode="train")  # convert() releases the weights
    assert [f.op_type for f in graph.fusions] == ["Linear"]
    x = np.random.default_rng(3).standard_normal((2, 3, 5)).astype(np.float32)
    _first_call(graph, torch.from_numpy(x))
    with OpCounter() as ops:
        fused = _step(graph, torch.from_numpy(x))
    vector_bias = bias_shape == [8]
    # a [3, 8] bias broadcast over the batch is no nn.Linear bias: MatMul then Add
    assert ("add" not in ops.ops) == vector_bias, ops.ops
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(fused[0].numpy(), session.run(None, {"x": x})[0], rtol=1e-5)
    graph.observer = _observed(graph, [])
    _assert_same(fused, _step(graph, torch.from_numpy(x)))


def test_under_autocast_the_linear_keeps_the_dtypes_of_matmul_then_add() -> None:
    """Autocast runs MatMul in bf16 and the Add in fp32 (a bf16 product plus an fp32 bias);
    one F.linear would return bf16."""
    graph = convert(_linear_model([8]), mode="train")
    x = torch.randn(2, 3, 5)
    _first_call(graph, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = graph(x)
        graph.observer = _observed(graph, [])
        node_by_node = graph(x)
    assert fused.dtype == node_by_node.dtype == torch.float32
    torch.testing.assert_close(fused, node_by_node)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dynamo", [False, True])
def test_on_cuda_the_groups_run_node_by_node_and_fused_would_equal_them(
    dynamo: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU the nodes run one by one (fused measured slower on an H200, fusions.py); made
    to fuse there, the memory-efficient attention kernel (fp32) and cuBLAS with the bias in
    the epilogue give the nodes' results."""
    torch.manual_seed(0)
    encoder = TransformerEncoder(dim=64, heads=4, layers=2, ffn=128).train()
    x = torch.randn(4, 16, 64)
    graph = convert(load_onnx(to_onnx(encoder, x, dynamo=dynamo)), mode="train").cuda()
    x = x.cuda()
    _first_call(graph, x)
    with OpCounter() as ops:
        node_by_node = _step(graph, x)
    assert ops.ops["bmm"] and ops.ops["_softmax"], ops.ops
    for fusion in graph.fusions:
        monkeypatch.setattr(fusion, "device_types", frozenset({"cpu", "cuda"}))
    graph.fusions = list(graph.fusions)  # a new list: the plan is made again
    with OpCounter() as ops:
        fused = _step(graph, x)
    assert not ops.ops["bmm"] and not ops.ops["_softmax"], ops.ops
    _assert_same(fused, node_by_node)
    torch.testing.assert_close(fused[0], encoder.cuda()(x).detach(), rtol=1e-4, atol=1e-5)


def test_the_groups_run_fused_only_where_the_graph_is_on_a_fused_device_type() -> None:
    graph = convert(_attention_model(), mode="train")
    inputs = [torch.from_numpy(f) for f in _feeds()]
    _first_call(graph, *inputs)
    graph.fusions[0].device_types = frozenset({"cuda"})
    graph.fusions = list(graph.fusions)
    with OpCounter() as ops:
        _step(graph, *inputs)
    assert "bmm" in ops.ops and not any(op.startswith("_scaled_dot") for op in ops.ops)


class _MaskedAttention(torch.nn.Module):
    """F.scaled_dot_product_attention (its export: q·√s, kᵀ·√s, MatMul, + mask), or written
    out by hand (MatMul, · 1/√d, + mask): SDPA itself takes no 1-D mask."""

    def __init__(self, by_hand: bool) -> None:
        super().__init__()
        self.by_hand = by_hand

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        if self.by_hand:
            scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + mask
            return torch.softmax(scores, -1) @ v
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _masked_case(mask: torch.Tensor, nan_query: bool = False) -> tuple[bool, torch.Tensor, Any]:
    """(whether SDPA ran fused, the fused output, the node-by-node output) of an exported
    F.scaled_dot_product_attention with `mask` (both exporters give the same pattern)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    if nan_query:
        q[0, 1, 2, 3] = float("nan")
    inputs = (q, k, v, mask)
    module = _MaskedAttention(by_hand=mask.dim() < 2)
    graph = convert(load_onnx(to_onnx(module, inputs)), mode="train")
    assert [f.op_type for f in graph.fusions] == ["Attention"]
    with torch.no_grad():
        graph(*inputs)
        with OpCounter() as ops:
            fused = graph(*inputs)
        graph.observer = _observed(graph, [])
        node_by_node = graph(*inputs)
    return any(op.startswith("_scaled_dot") for op in ops.ops), fused, node_by_node


@pytest.mark.parametrize("shape", [[2, 1, 1, 5], [5, 5], [5]], ids=["padding", "square", "1-D"])
def test_an_exported_masked_attention_runs_fused(shape: list[int]) -> None:
    """The exporters' `scores + mask` is a MatMul then an Add: attention, not a linear layer;
    a 1-D mask broadcasts as [1, S] (SDPA itself wants two dims)."""
    mask = torch.zeros(shape)
    mask[..., -1] = float("-inf")  # the last key masked out
    ran, fused, node_by_node = _masked_case(mask)
    assert ran
    torch.testing.assert_close(fused, node_by_node, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["a row with every key masked", "a NaN in q"])
def test_a_nan_the_nodes_give_is_not_hidden_by_the_fused_kernel(case: str) -> None:
    """torch's CPU attention kernel gives zeros for a fully masked row and for a NaN query:
    where the nodes give NaN the group runs as nodes (a NaN origin must stay visible)."""
    mask = torch.zeros(5, 5)
    if case == "a row with every key masked":
        mask[2] = float("-inf")
    ran, fused, node_by_node = _masked_case(mask, nan_query=case == "a NaN in q")
    assert not ran
    assert bool(node_by_node.isnan().any())
    torch.testing.assert_close(fused, node_by_node, equal_nan=True)
