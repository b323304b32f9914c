"""Session 12's, 13's and 14's ops on CUDA: the same outputs and input gradients as on the CPU.

The com.microsoft transformer ops (EmbedLayerNormalization, RotaryEmbedding, MultiHeadAttention,
GroupQueryAttention), the integer products (MatMulInteger, ConvInteger, QLinearConv: float64
products on the device), MatMulNBits, Col2Im (its N-D `index_add`) and the dilated pools were
written and tested on the CPU only; their cases here are the CPU tests' own. `gpu`-marked
(skipped without a CUDA device, run by bench/gpu_check.sh); the comparison itself also runs on
the CPU against the CPU (`test_the_comparison_runs_on_the_cpu`), so that a broken case list
fails here and not first on a lent GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from service.engine.onnx.convert import convert
from tests.support.recurrent_zoo import as_outputs, build_node_fn
from tests.unit.onnx import test_integer_ops as integer_ops
from tests.unit.onnx import test_microsoft_fused_integer as fused
from tests.unit.onnx import test_microsoft_qlinear as qlinear
from tests.unit.onnx import test_microsoft_transformer as transformer
from tests.unit.onnx import test_pool_col2im_optional as pools
from tests.unit.onnx.backend_cases import node_cases_named

MS = "com.microsoft"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _param_values(param: Any) -> tuple[Any, ...]:
    return tuple(param.values)


def _node_cases() -> list[tuple[str, onnx.NodeProto, list[np.ndarray | None]]]:
    """(id, one com.microsoft node, its inputs) from the CPU tests' case lists."""
    cases: list[tuple[str, onnx.NodeProto, list[np.ndarray | None]]] = []

    def add(case_id: str, op: str, inputs: list[Any], outputs: list[str], **attrs: Any) -> None:
        names = [f"in{i}" if v is not None else "" for i, v in enumerate(inputs)]
        cases.append((case_id, helper.make_node(op, names, outputs, domain=MS, **attrs), inputs))

    embedding = transformer._embedding_inputs(True, True, (transformer.BATCH, transformer.SEQ))
    add("embed_layer_norm", "EmbedLayerNormalization", embedding, ["y", "mask_index", "sum"])
    for param in transformer._rotary_cases()[:3]:
        inputs, attrs = _param_values(param)
        add(f"rotary_{param.id}", "RotaryEmbedding", inputs, ["y"], **attrs)
    for param in transformer._mha_cases():
        inputs, outputs, attrs = _param_values(param)
        add(
            f"mha_{param.id}",
            "MultiHeadAttention",
            inputs,
            outputs,
            num_heads=transformer.HEADS,
            **attrs,
        )
    heads = {"num_heads": transformer.Q_HEADS, "kv_num_heads": transformer.KV_HEADS}
    for param in transformer._gqa_cases():
        inputs, outputs, attrs = _param_values(param)
        add(f"gqa_{param.id}", "GroupQueryAttention", inputs, outputs, **heads, **attrs)
    return cases


def _quantized_node_cases() -> list[tuple[str, onnx.NodeProto, list[np.ndarray | None]]]:
    """Session 13's integer ops: the QOperator format's and onnxruntime's fused ones. Only ops
    whose CPU result does not hang on a transcendental function's last bit (QLinearSigmoid,
    QLinearSoftmax and QLinearAveragePool round a float that may differ by an ulp on another
    device: one step of their output, not a fault)."""
    rng = np.random.default_rng(13)
    cases: list[tuple[str, onnx.NodeProto, list[np.ndarray | None]]] = []

    def add(case_id: str, op: str, inputs: list[Any], **attrs: Any) -> None:
        names = [f"in{i}" if v is not None else "" for i, v in enumerate(inputs)]
        node = helper.make_node(op, names, ["y"], domain=MS, **attrs)
        cases.append((case_id, node, inputs))

    for dtype in (np.uint8, np.int8):
        name = np.dtype(dtype).name
        for op in ("QLinearAdd", "QLinearMul"):
            values = qlinear._binary_params(rng, dtype)
            values["a"] = qlinear._ints(rng, dtype, (2, 3, 5))
            values["b"] = qlinear._ints(rng, dtype, (5,))
            add(f"{op}_{name}", op, [values[key] for key in qlinear._BINARY_ORDER])
        act = qlinear._activation_params(rng, dtype)
        x = qlinear._ints(rng, dtype, (2, 4, 3, 3))
        add(f"leaky_relu_{name}", "QLinearLeakyRelu", [x, *act.values()], alpha=0.1)
        add(f"global_pool_{name}", "QLinearGlobalAveragePool", [x, *act.values()])
        parts = [qlinear._ints(rng, dtype, (2, k, 4)) for k in (1, 2, 3)]
        scales = [(qlinear._scale(rng), qlinear._ints(rng, dtype, ())) for _ in parts]
        concat: list[Any] = [qlinear._scale(rng), qlinear._ints(rng, dtype, ())]
        for part, (scale, zero) in zip(parts, scales, strict=True):
            concat += [part, scale, zero]
        add(f"concat_{name}", "QLinearConcat", concat, axis=1)
    for per_column, float_output in ((False, False), (True, True)):
        feeds, params = qlinear._qgemm_inputs(rng, np.uint8, np.int8, per_column, True)
        inputs: list[Any] = [feeds["a"], *params.values()]
        if not float_output:
            inputs += [qlinear._scale(rng, 0.05, 0.5), qlinear._ints(rng, np.uint8, ())]
        add(f"qgemm_{per_column}_{float_output}", "QGemm", inputs, alpha=0.75, transB=1)
    weight = fused._weight(rng, np.int8, per_column=True, zero_point=True)
    a = (rng.standard_normal((2, 3, fused.K)) * 2).astype(np.float32)
    bias = rng.standard_normal(fused.N).astype(np.float32)
    add("dynamic_quantize_matmul", "DynamicQuantizeMatMul", [a, *weight.values(), bias])
    a_q = fused._ints(rng, np.uint8, 2, 3, fused.K)
    a_scale, a_zero = np.array(0.03, np.float32), fused._ints(rng, np.uint8)
    add(
        "matmul_integer_to_float",
        "MatMulIntegerToFloat",
        [a_q, weight["B"], a_scale, weight["b_scale"], a_zero, weight["b_zero_point"], bias],
    )
    attention = fused._q_attention_inputs(np.int8, True, "lengths")
    add("q_attention", "QAttention", list(attention.values())[:8], num_heads=fused.HEADS)
    embed = fused._q_embed_inputs(np.uint8, True, "binary")
    cases.append(
        (
            "q_embed_layer_norm",
            helper.make_node(
                "QEmbedLayerNormalization",
                [f"in{i}" if v is not None else "" for i, v in enumerate(embed.values())],
                ["y", "mask_index"],
                domain=MS,
                epsilon=1e-12,
            ),
            list(embed.values()),
        )
    )
    return cases


NODE_CASES = _node_cases() + _quantized_node_cases()


def _float_leaves(values: Sequence[Any], device: str) -> list[torch.Tensor | None]:
    """The inputs on `device`, the floating ones as leaves that take gradient."""
    out: list[torch.Tensor | None] = []
    for value in values:
        if value is None:
            out.append(None)
            continue
        tensor = torch.as_tensor(np.asarray(value)).to(device)
        out.append(tensor.requires_grad_() if tensor.is_floating_point() else tensor)
    return out


def _outputs_and_grads(run: Any, values: Sequence[Any], device: str) -> list[torch.Tensor]:
    """Every output, then the gradient of the float outputs' weighted sum w.r.t. every float
    input, all on the CPU."""
    leaves = _float_leaves(values, device)
    outputs = [o for o in run(leaves) if isinstance(o, torch.Tensor)]
    floats = [o for o in outputs if o.is_floating_point() and o.requires_grad]
    taking = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads: list[torch.Tensor] = []
    if floats and taking:
        loss = torch.stack([(o.double() * (k + 1)).square().mean() for k, o in enumerate(floats)])
        found = torch.autograd.grad(loss.sum(), taking, allow_unused=True)
        grads = [torch.zeros(()) if g is None else g for g in found]
    return [t.detach().cpu() for t in [*outputs, *grads]]


def _compare_node(node: onnx.NodeProto, inputs: list[Any], device: str) -> None:
    fn = build_node_fn(node, 1)

    def run(values: list[Any]) -> list[Any]:
        return list(as_outputs(fn(*values), len(node.output)))

    expected = _outputs_and_grads(run, inputs, "cpu")
    got = _outputs_and_grads(run, inputs, device)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        # float32 rounding is relative to the summands, not to each result: an entry that is
        # analytically zero (QAttention's key-bias gradient: softmax ignores a shift shared
        # by all keys) comes out as noise of the tensor's scale on either device
        scale = float(e.abs().max()) if e.numel() else 0.0
        torch.testing.assert_close(g, e, rtol=1e-4, atol=max(1e-5, 2e-5 * scale))


def _model_cases(tmp_path: Any) -> list[tuple[str, onnx.ModelProto, list[Any]]]:
    """(id, a model, its feeds): integer products, MatMulNBits, Col2Im, dilated pools."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    cases: list[tuple[str, onnx.ModelProto, list[Any]]] = []
    source, target = tmp_path / "mlp.onnx", tmp_path / "mlp.int8.onnx"
    source.write_bytes(integer_ops._exported_mlp())
    quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32)
    cases.append(("quantize_dynamic_mlp", onnx.load(target), [x]))
    node, feeds, weights = integer_ops._nbits_case(
        bits=4, block_size=16, k=40, n=6, zero_points="packed", bias=True
    )
    model = integer_ops._model(
        node, feeds, {"Y": onnx.TensorProto.FLOAT}, opset=21, initializers=weights
    )
    cases.append(("matmul_nbits", model, [feeds["A"]]))
    for image, block, attrs in (pools._col2im_cases()[5], pools._col2im_cases()[-1]):
        model, col2im_feeds = pools._col2im_model(image, block, attrs, constant=True)
        cases.append((f"col2im_{len(image)}d", model, col2im_feeds))
    for op in ("AveragePool", "LpPool"):
        attrs = {"kernel_shape": [3, 3], "dilations": [2, 1], "strides": [1, 2]}
        model = pools._pool_model(op, 2, attrs)
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        cases.append((f"dilated_{op}", model, [np.random.default_rng(1).random(shape, np.float32)]))
    return cases


# Session 14's ops, as the backend data has them: the optimisers (update steps with their
# gradients), TfIdfVectorizer (integer n-gram counting), MaxPool's column-major indices
SESSION_14_CASES = (
    "test_adagrad",
    "test_adam_multiple",
    "test_momentum",
    "test_nesterov_momentum",
    "test_tfidfvectorizer_tf_batch_uniandbigrams_skip5",
    "test_tfidfvectorizer_tf_uniandbigrams_skip5",
    "test_maxpool_with_argmax_2d_precomputed_strides",
)


def _backend_model_cases() -> list[tuple[str, onnx.ModelProto, list[Any]]]:
    """(id, the backend case's model, its first data set's inputs)."""
    cases = node_cases_named(SESSION_14_CASES)
    found = []
    for name in SESSION_14_CASES:
        inputs = [np.asarray(v) for v in cases[name].data_sets[0][0]]
        found.append((name, cases[name].model, inputs))
    return found


def _compare_model(model: onnx.ModelProto, feeds: list[Any], device: str) -> None:
    on_cpu = convert(model.__deepcopy__())
    on_device = convert(model.__deepcopy__()).to(device)

    def runner(graph: Any) -> Any:
        return lambda values: as_outputs(graph(*values), len(model.graph.output))

    expected = _outputs_and_grads(runner(on_cpu), feeds, "cpu")
    got = _outputs_and_grads(runner(on_device), feeds, device)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        # float32 rounding is relative to the summands, not to each result: an entry that is
        # analytically zero (QAttention's key-bias gradient: softmax ignores a shift shared
        # by all keys) comes out as noise of the tensor's scale on either device
        scale = float(e.abs().max()) if e.numel() else 0.0
        torch.testing.assert_close(g, e, rtol=1e-4, atol=max(1e-5, 2e-5 * scale))


def test_the_comparison_runs_on_the_cpu(tmp_path: Any) -> None:
    assert len(NODE_CASES) > 20
    for _, node, inputs in NODE_CASES:
        _compare_node(node, inputs, "cpu")
    for _, model, feeds in [*_model_cases(tmp_path), *_backend_model_cases()]:
        _compare_model(model, feeds, "cpu")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("case_id", "node", "inputs"), NODE_CASES, ids=[c[0] for c in NODE_CASES])
def test_contrib_ops_on_cuda_equal_the_cpu(case_id: str, node: Any, inputs: list[Any]) -> None:
    _compare_node(node, inputs, "cuda")


@pytest.mark.gpu
@cuda
def test_integer_products_nbits_col2im_and_pools_on_cuda_equal_the_cpu(tmp_path: Any) -> None:
    for case_id, model, feeds in _model_cases(tmp_path):
        try:
            _compare_model(model, feeds, "cuda")
        except AssertionError as error:
            raise AssertionError(f"{case_id}: {error}") from error


@pytest.mark.gpu
@cuda
def test_session_14_ops_on_cuda_equal_the_cpu() -> None:
    for case_id, model, feeds in _backend_model_cases():
        try:
            _compare_model(model, feeds, "cuda")
        except AssertionError as error:
            raise AssertionError(f"{case_id}: {error}") from error
