"""`torch.autograd.gradcheck` in float64 through converted one-node (or tiny) ONNX models,
per op family: the converter's ops must be differentiable w.r.t. inputs and initializers."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from service.engine.onnx.convert import convert

D = TensorProto.DOUBLE
I64 = TensorProto.INT64


def _rand(*shape: int, seed: int = 0, positive: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x.abs() + 0.5 if positive else x


def _graph_of(
    op: str,
    inputs: list[torch.Tensor],
    attrs: dict[str, Any] | None = None,
    consts: dict[str, np.ndarray] | None = None,
    opset: int = 18,
    outputs: int = 1,
    mode: str = "eval",
    order: list[str] | None = None,
) -> Any:
    """A one-node model: tensor inputs x0..xn (double), then constant inputs in order
    (or the node inputs in `order`)."""
    names = [f"x{i}" for i in range(len(inputs))]
    consts = consts or {}
    node = helper.make_node(
        op, order or names + list(consts), [f"y{i}" for i in range(outputs)], **(attrs or {})
    )
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(n, D, list(t.shape))
            for n, t in zip(names, inputs, strict=True)
        ],
        [helper.make_tensor_value_info(f"y{i}", D, None) for i in range(outputs)],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)  # fills the outputs' shapes
    return convert(model, mode=mode)


def _check(op: str, inputs: list[torch.Tensor], **kwargs: Any) -> None:
    graph = _graph_of(op, inputs, **kwargs)
    leaves = [t.clone().requires_grad_(True) for t in inputs]

    def fn(*xs: torch.Tensor) -> Any:
        out = graph(*xs)
        return out[0] if isinstance(out, tuple) else out

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5)


X = _rand(2, 3, 5, 5)
V = _rand(2, 3, 4)


@pytest.mark.parametrize(
    ("op", "inputs", "attrs"),
    [
        ("Add", [V, _rand(4, seed=1)], {}),
        ("Mul", [V, _rand(3, 4, seed=1)], {}),
        ("Div", [V, _rand(2, 3, 4, seed=1, positive=True)], {}),
        ("Pow", [_rand(2, 3, positive=True), _rand(2, 3, seed=2)], {}),
        ("Sqrt", [_rand(2, 3, positive=True)], {}),
        ("Exp", [V], {}),
        ("Log", [_rand(5, positive=True)], {}),
        ("Erf", [V], {}),
        ("Atan", [V], {}),
        ("Max", [V, _rand(2, 3, 4, seed=4)], {}),
        ("Mean", [V, _rand(2, 3, 4, seed=4)], {}),
    ],
)
def test_elementwise(op: str, inputs: list[torch.Tensor], attrs: dict[str, Any]) -> None:
    _check(op, inputs, attrs=attrs)


@pytest.mark.parametrize(
    ("op", "attrs", "opset"),
    [
        ("Sigmoid", {}, 18),
        ("Tanh", {}, 18),
        ("Elu", {"alpha": 0.7}, 18),
        ("Selu", {}, 18),
        ("Celu", {}, 18),
        ("Softplus", {}, 18),
        ("Softsign", {}, 18),
        ("Mish", {}, 18),
        ("Gelu", {}, 20),
        ("Gelu", {"approximate": "tanh"}, 20),
        ("LeakyRelu", {"alpha": 0.1}, 18),
        ("HardSwish", {}, 18),
        ("HardSigmoid", {}, 18),
        ("Softmax", {"axis": 1}, 18),
        ("LogSoftmax", {}, 18),
        ("Softmax", {"axis": 1}, 11),
    ],
)
def test_activations(op: str, attrs: dict[str, Any], opset: int) -> None:
    _check(op, [V], attrs=attrs, opset=opset)


def test_prelu() -> None:
    _check("PRelu", [X, _rand(3, 1, 1, seed=5)])


@pytest.mark.parametrize(
    ("op", "inputs", "attrs"),
    [
        ("Conv", [X, _rand(4, 3, 3, 3, seed=1), _rand(4, seed=2)], {"pads": [1, 0, 1, 2]}),
        ("Conv", [X, _rand(3, 1, 3, 3, seed=1)], {"group": 3, "dilations": [2, 1]}),
        ("Conv", [X, _rand(2, 3, 2, 2, seed=1)], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
        (
            "ConvTranspose",
            [X, _rand(3, 2, 3, 3, seed=1)],
            {"strides": [2, 2], "pads": [1, 0, 0, 1]},
        ),
        (
            "ConvTranspose",
            [X, _rand(3, 2, 2, 2, seed=1)],
            {"output_padding": [1, 1], "strides": [2, 2]},
        ),
        ("AveragePool", [X], {"kernel_shape": [3, 3], "pads": [1, 1, 0, 0]}),
        ("AveragePool", [X], {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
        ("MaxPool", [X], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}),
        ("LpPool", [X], {"kernel_shape": [2, 2], "p": 3}),
        ("GlobalAveragePool", [X], {}),
        ("GlobalMaxPool", [X], {}),
        ("GlobalLpPool", [X], {}),
    ],
)
def test_conv_and_pool(op: str, inputs: list[torch.Tensor], attrs: dict[str, Any]) -> None:
    _check(op, inputs, attrs=attrs)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_norm(mode: str) -> None:
    stats = {"mean": np.zeros(3), "var": np.ones(3) * 2.0}
    _check(
        "BatchNormalization",
        [X, _rand(3, seed=1), _rand(3, seed=2)],
        consts=stats,
        mode=mode,
        opset=15,
    )


@pytest.mark.parametrize(
    ("op", "inputs", "attrs", "opset"),
    [
        ("InstanceNormalization", [X, _rand(3, seed=1), _rand(3, seed=2)], {}, 18),
        ("LayerNormalization", [V, _rand(4, seed=1), _rand(4, seed=2)], {}, 18),
        ("LayerNormalization", [V, _rand(3, 4, seed=1)], {"axis": 1}, 18),
        ("GroupNormalization", [X, _rand(3, seed=1), _rand(3, seed=2)], {"num_groups": 3}, 21),
        ("LRN", [X], {"size": 3}, 18),
        ("MeanVarianceNormalization", [X], {}, 18),
    ],
)
def test_normalization(
    op: str, inputs: list[torch.Tensor], attrs: dict[str, Any], opset: int
) -> None:
    _check(op, inputs, attrs=attrs, opset=opset)


@pytest.mark.parametrize(
    ("op", "inputs", "attrs"),
    [
        ("Gemm", [_rand(3, 4), _rand(5, 4, seed=1), _rand(5, seed=2)], {"transB": 1}),
        ("Gemm", [_rand(4, 3), _rand(4, 5, seed=1)], {"transA": 1, "alpha": 0.5}),
        ("MatMul", [V, _rand(4, 2, seed=1)], {}),
        ("Einsum", [V, _rand(4, 2, seed=1)], {"equation": "bij,jk->bik"}),
    ],
)
def test_linear_algebra(op: str, inputs: list[torch.Tensor], attrs: dict[str, Any]) -> None:
    _check(op, inputs, attrs=attrs)


@pytest.mark.parametrize(
    ("op", "axes"),
    [
        ("ReduceSum", [1]),
        ("ReduceMean", [0, 2]),
        ("ReduceL2", [2]),
        ("ReduceLogSumExp", [1]),
        ("ReduceSumSquare", [-1]),
        ("ReduceProd", [1]),
        ("ReduceMax", [2]),
    ],
)
def test_reductions(op: str, axes: list[int]) -> None:
    _check(op, [V], consts={"axes": np.array(axes, np.int64)})


def test_cumsum() -> None:
    _check("CumSum", [V], consts={"axis": np.array(1, np.int64)}, attrs={"reverse": 1})


@pytest.mark.parametrize(
    ("op", "inputs", "attrs", "consts"),
    [
        ("Reshape", [V], {}, {"shape": np.array([0, -1], np.int64)}),
        ("Transpose", [V], {"perm": [2, 0, 1]}, {}),
        (
            "Slice",
            [V],
            {},
            {
                "starts": np.array([3, 0], np.int64),
                "ends": np.array([-10, 2], np.int64),
                "axes": np.array([2, 1], np.int64),
                "steps": np.array([-2, 1], np.int64),
            },
        ),
        ("Gather", [V], {"axis": 1}, {"i": np.array([[2, -1], [0, 0]], np.int64)}),
        ("Gather", [V], {"axis": 2}, {"i": np.array(-1, np.int64)}),
        ("GatherElements", [V], {"axis": 2}, {"i": np.zeros((2, 3, 2), np.int64)}),
        ("GatherND", [V], {"batch_dims": 1}, {"i": np.array([[1], [0]], np.int64)}),
        ("Expand", [_rand(3, 1)], {}, {"shape": np.array([2, 3, 4], np.int64)}),
        ("Tile", [V], {}, {"r": np.array([1, 2, 1], np.int64)}),
        ("Pad", [X], {"mode": "reflect"}, {"p": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}),
        ("Pad", [X], {"mode": "edge"}, {"p": np.array([0, 0, 1, 0, 0, 0, 0, 2], np.int64)}),
        ("Pad", [X], {"mode": "wrap"}, {"p": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}),
        ("Resize", [X], {"mode": "linear"}, {"roi": np.zeros(0), "s": np.array([1, 1, 1.5, 0.6])}),
        ("Resize", [X], {"mode": "cubic"}, {"roi": np.zeros(0), "s": np.array([1, 1, 2.0, 2.0])}),
        ("Resize", [X], {"mode": "nearest"}, {"roi": np.zeros(0), "s": np.array([1, 1, 2.0, 0.5])}),
    ],
)
def test_shape_and_indexing(
    op: str, inputs: list[torch.Tensor], attrs: dict[str, Any], consts: dict[str, np.ndarray]
) -> None:
    _check(op, inputs, attrs=attrs, consts=consts)


def test_scatter_ops_are_differentiable_in_data_and_updates() -> None:
    _check(
        "ScatterND",
        [_rand(3, 4), _rand(2, 4, seed=1)],
        consts={"i": np.array([[1], [0]], np.int64)},
        order=["x0", "i", "x1"],
    )
    _check(
        "ScatterElements",
        [_rand(2, 3), _rand(2, 2, seed=1)],
        attrs={"axis": 1},
        consts={"i": np.array([[0, 2], [1, 0]], np.int64)},
        order=["x0", "i", "x1"],
    )


def test_concat_split_where() -> None:
    _check("Concat", [V, _rand(2, 1, 4, seed=1)], attrs={"axis": 1})
    _check("Split", [V], attrs={"axis": 2}, consts={"s": np.array([1, 3], np.int64)}, outputs=2)
    _check(
        "Where",
        [V, _rand(4, seed=3)],
        consts={"c": np.array([True, False, True, False])},
        order=["c", "x0", "x1"],
    )


def test_control_flow_loop_body_reads_outer_parameter() -> None:
    """Loop whose body multiplies by an outer-scope initializer: gradients reach both."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Mul", ["h", "w"], ["m"]),
            helper.make_node("Tanh", ["m"], ["h_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", I64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h", D, [3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", D, [3]),
            helper.make_tensor_value_info("m", D, [3]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trip", "", "x"], ["h_final", "steps"], body=body)],
        "g",
        [helper.make_tensor_value_info("x", D, [3])],
        [
            helper.make_tensor_value_info("h_final", D, [3]),
            helper.make_tensor_value_info("steps", D, None),
        ],
        [
            numpy_helper.from_array(np.array(3, np.int64), "trip"),
            numpy_helper.from_array(np.array([0.5, -1.0, 2.0]), "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    converted = convert(model)
    loop_node = converted.nodes[0]
    assert "w" in loop_node.inputs  # the outer-scope value is an explicit node input
    x = _rand(3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: converted(t)[0], [x])
    h, steps = converted(x)
    assert steps.shape == (3, 3)
    h.sum().backward()
    assert converted.parameter("w").grad is not None


@pytest.mark.parametrize("op", ["NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_losses(op: str, reduction: str) -> None:
    _check(
        op,
        [_rand(3, 4, 2)],
        attrs={"reduction": reduction, "ignore_index": 1},
        consts={"t": np.array([[0, 1], [3, 2], [1, 0]], np.int64)},
        opset=13,
    )


@pytest.mark.parametrize(
    ("op", "inputs", "attrs", "consts"),
    [
        ("CumProd", [V], {"exclusive": 1}, {"axis": np.array(2, np.int64)}),
        ("LpNormalization", [V], {"axis": 1, "p": 2}, {}),
        ("Compress", [V], {"axis": 2}, {"c": np.array([True, False, True, True])}),
        ("ReverseSequence", [_rand(4, 3, 2)], {}, {"lens": np.array([4, 1, 2], np.int64)}),
        ("GridSample", [X, _rand(2, 4, 3, 2, seed=7) * 0.8], {"align_corners": 1}, {}),
        ("CenterCropPad", [X], {"axes": [2, 3]}, {"s": np.array([3, 8], np.int64)}),
        (
            "RotaryEmbedding",
            [_rand(2, 2, 3, 4), _rand(5, 2, seed=1), _rand(5, 2, seed=2)],
            {"interleaved": 1},
            {"ids": np.array([[0, 1, 2], [4, 3, 2]], np.int64)},
        ),
        ("SwiGLU", [V, _rand(2, 3, 4, seed=3)], {}, {}),
        ("SwiGLU", [V, _rand(2, 3, 4, seed=3)], {"alpha": 1.7}, {}),
        # [1, 2, 2, 2] pooled from [1, 2, 4, 4] by 2x2 windows: one flat index in each window
        (
            "MaxUnpool",
            [_rand(1, 2, 2, 2)],
            {"kernel_shape": [2, 2], "strides": [2, 2]},
            {
                "i": np.array([[[[0, 7], [9, 14]], [[21, 18], [28, 31]]]], np.int64),
            },
        ),
        # a KV cache [B=2, heads 3, length 5, 2]: two steps written from 4 (wrapping) and 1
        (
            "TensorScatter",
            [_rand(2, 3, 5, 2), _rand(2, 3, 2, 2, seed=4)],
            {"mode": "circular"},
            {
                "w": np.array([4, 1], np.int64),
            },
        ),
    ],
)
def test_more_ops(
    op: str, inputs: list[torch.Tensor], attrs: dict[str, Any], consts: dict[str, np.ndarray]
) -> None:
    opset = {"CumProd": 26, "RotaryEmbedding": 23, "SwiGLU": 28}.get(op, 20)
    opset = {"MaxUnpool": 22, "TensorScatter": 24}.get(op, opset)
    _check(op, inputs, attrs=attrs, consts=consts, opset=opset)
