"""What `convert` builds: names, state, metadata, observability, modes, the conformance check."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from service.engine.formats.onnx import conversion_mismatch_note
from service.engine.graph import Node
from service.engine.onnx.conformance import check_conversion
from service.engine.onnx.convert import convert
from service.engine.report import ConversionCheck
from service.errors import BadInputError
from tests.support.export import to_onnx
from tests.support.zoo import ZOO


@functools.cache
def _mlp_bytes() -> bytes:
    return to_onnx(ZOO["mlp"].build(), ZOO["mlp"].example())


class _BNDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(self.conv(x)))


def _bn_module() -> _BNDropout:
    module = _BNDropout()
    with torch.no_grad():  # running statistics far from any batch's
        assert module.bn.running_mean is not None and module.bn.running_var is not None
        module.bn.running_mean.fill_(3.0)
        module.bn.running_var.fill_(5.0)
    return module


X = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(2))


def test_parameters_keep_initializer_names_and_proto_weights_are_released() -> None:
    model = onnx.load_from_string(_mlp_bytes())
    graph = convert(model)
    names = [name for name, _ in graph.named_parameters()]
    assert names == [name for name, _ in ZOO["mlp"].build().named_parameters()]
    assert [n for n, _ in graph.named_graph_parameters()] == names
    assert all(not init.raw_data and not init.float_data for init in model.graph.initializer)
    assert graph.metadata["opset_imports"] == {"": 20}
    assert graph.metadata["inputs"][0]["dtype"] == "float32"
    assert graph.metadata["inputs"][0]["shape"] == [3, 8]


def test_weights_can_be_kept_in_the_proto_on_request() -> None:
    model = onnx.load_from_string(_mlp_bytes())
    convert(model, release_weights=False)
    assert all(init.raw_data for init in model.graph.initializer)


def test_every_node_output_is_observed_in_graph_order() -> None:
    model = onnx.load_from_string(_mlp_bytes())
    ops = [n.op_type for n in model.graph.node]
    graph = convert(model)
    seen: list[tuple[str, str, int]] = []

    def observer(node: Node, outputs: object) -> None:
        assert isinstance(node.source, onnx.NodeProto)
        seen.append((node.name, node.op_type, len(outputs)))  # type: ignore[arg-type]

    graph.observer = observer
    graph(ZOO["mlp"].example())
    assert [op for _, op, _ in seen] == ops
    assert len({name for name, _, _ in seen}) == len(seen)  # unique names


def test_integer_initializers_and_constants_are_state_not_parameters() -> None:
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(3, "f"))),
        helper.make_node("Add", ["x", "c"], ["a"]),
        helper.make_node("Reshape", ["a", "shape"], ["r"]),
        helper.make_node("Gather", ["r", "big_index"], ["y"], axis=1),
    ]
    graph_proto = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 100])],
        [
            numpy_helper.from_array(np.array([1, 3], np.int64), "shape"),
            numpy_helper.from_array(np.zeros(100, np.int64), "big_index"),
        ],
    )
    model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 17)])
    graph = convert(model)
    assert list(graph.named_parameters()) == []
    assert "big_index" in graph.buffer_names  # large integer tensor: a buffer
    assert "shape" in graph.constants  # small integer tensor: a CPU constant
    assert "c::constant" in graph.buffer_names  # Constant float value: moves with .to()
    assert graph.input_names == ["x"]
    assert graph(torch.zeros(3)).shape == (1, 100)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(BadInputError, match="mode must be one of train, eval"):
        convert(onnx.load_from_string(_mlp_bytes()), mode="inference")


def test_train_mode_uses_batch_statistics_for_an_inference_export() -> None:
    module = _bn_module()
    data = to_onnx(module.eval(), X, training=False)
    train_graph = convert(onnx.load_from_string(data), mode="train")
    eval_graph = convert(onnx.load_from_string(data), mode="eval")
    with torch.no_grad():
        expected_eval = module.eval()(X)
        module.train()
        module.drop.p = 0.0  # train mode without dropout: what the diagnosis runs
        expected_train = module(X)
    torch.testing.assert_close(eval_graph(X), expected_eval, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(train_graph(X), expected_train, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected_train, expected_eval, atol=1e-2)


def test_conformance_of_train_mode_inference_export_compares_in_eval_mode() -> None:
    data = to_onnx(_bn_module().eval(), X, training=False)
    model = onnx.load_from_string(data)
    graph = convert(model, mode="train")
    check = check_conversion(model, graph, [X])
    assert check.checked
    assert check.reason is not None and "compared in eval mode" in check.reason
    assert check.max_rel_error is not None and check.max_rel_error < 1e-4
    assert check.reference is not None and check.reference.startswith("onnxruntime ")


def test_conformance_sees_a_wrong_weight() -> None:
    model = onnx.load_from_string(_mlp_bytes())
    graph = convert(model, mode="eval")
    x = ZOO["mlp"].example()
    assert check_conversion(model, graph, [x]).max_abs_error < 1e-5  # type: ignore[operator]
    with torch.no_grad():
        graph.parameter("out.bias").add_(1.0)
    ours = [graph(x)]
    # The refilled model carries the graph's current weights: still equal...
    assert check_conversion(model, graph, [x]).max_abs_error < 1e-5  # type: ignore[operator]
    # ...but outputs computed before a change are caught.
    with torch.no_grad():
        graph.parameter("out.bias").sub_(1.0)
    check = check_conversion(model, graph, [x], ours)
    assert check.max_abs_error is not None and abs(check.max_abs_error - 1.0) < 1e-5


def test_conformance_says_why_when_onnxruntime_cannot_run_the_model() -> None:
    graph_proto = helper.make_graph(
        [helper.make_node("Erf", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2])],
    )
    model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 17)])
    graph = convert(model)
    x = torch.tensor([0.5, -1.0], dtype=torch.bfloat16)
    assert graph(x).dtype == torch.bfloat16
    check = check_conversion(model, graph, [x])
    assert not check.checked
    assert check.reason


def test_dropout_is_off_in_train_mode_unless_asked() -> None:
    module = _bn_module().train()
    data = to_onnx(module, X)  # TRAINING export: Dropout with training_mode=True
    off = convert(onnx.load_from_string(data), mode="train")
    torch.testing.assert_close(off(X), off(X))
    on = convert(onnx.load_from_string(data), mode="train", extra={"dropout": True})
    y = on(X)
    zero_fraction = float((y == 0).float().mean())
    assert 0.3 < zero_fraction < 0.7
    eval_graph = convert(onnx.load_from_string(data), mode="eval")  # as exported: active
    assert float((eval_graph(X) == 0).float().mean()) > 0.3


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_conformance_of_a_training_export_with_dropout(mode: str) -> None:
    """onnxruntime runs TRAINING-mode Dropout randomly: the check turns it off on both sides."""
    module = _bn_module().train()
    model = onnx.load_from_string(to_onnx(module, X))
    graph = convert(model, mode=mode)
    check = check_conversion(model, graph, [X])
    assert check.checked
    assert check.reason is not None and "dropout switched off" in check.reason
    assert check.max_rel_error is not None and check.max_rel_error < 1e-4


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], out: str) -> onnx.ModelProto:
    graph_proto = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 5, 5])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 17)])


def test_node_attrs_hold_the_decoded_attributes() -> None:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], group=2, auto_pad="SAME_UPPER", name="conv"),
        helper.make_node("Flatten", ["c"], ["f"], axis=1, name="flat"),
        helper.make_node("Gemm", ["f", "g"], ["y"], transB=1, alpha=0.5, name="gemm"),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype("f"), "w"),
        numpy_helper.from_array(rng.standard_normal((3, 100)).astype("f"), "g"),
    ]
    graph = convert(_model(nodes, inits, "y"))
    attrs = {node.name: node.attrs for node in graph.nodes}
    assert attrs["conv"] == {"group": 2, "auto_pad": "SAME_UPPER"}  # bytes decoded to str
    assert attrs["flat"] == {"axis": 1}
    assert attrs["gemm"] == {"transB": 1, "alpha": 0.5}
    assert graph(torch.randn(2, 4, 5, 5)).shape == (2, 3)


def test_node_attrs_leave_out_subgraph_bodies() -> None:
    branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["b"])],
        "branch",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch, name="if"),
    ]
    inits = [numpy_helper.from_array(np.zeros((), "f"), "zero")]
    graph = convert(_model(nodes, inits, "y"))
    assert {node.name: node.attrs for node in graph.nodes}["if"] == {}


def test_initializers_off_any_differentiable_path_are_buffers() -> None:
    """Read only as Shape's input, only as BatchNormalization's mean/var, or only compared (the
    If's condition): buffers (onnx/gradient_paths.py). Read also inside a subgraph: a
    parameter (the body may differentiate through it)."""
    branch = helper.make_graph(
        [helper.make_node("Add", ["n", "mean_also_in_body"], ["b"])],
        "branch",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Shape", ["shape_only"], ["shape"]),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node(
            "BatchNormalization", ["r", "scale", "bias", "mean", "mean_also_in_body"], ["n"]
        ),
        helper.make_node("ReduceSum", ["n"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch),
    ]
    ones = np.ones(4, "f")
    inits = [
        numpy_helper.from_array(np.zeros((2, 4, 5, 5), "f"), "shape_only"),
        numpy_helper.from_array(ones, "scale"),
        numpy_helper.from_array(ones * 0, "bias"),
        numpy_helper.from_array(ones * 0, "mean"),
        numpy_helper.from_array(ones, "mean_also_in_body"),
        numpy_helper.from_array(np.zeros((), "f"), "zero"),
    ]
    graph = convert(_model(nodes, inits, "y"), mode="eval")
    parameters = [name for name, _ in graph.named_parameters()]
    assert parameters == ["scale", "bias", "mean_also_in_body"]
    assert {"shape_only", "mean", "zero"} <= set(graph.buffer_names)


def test_conformance_names_onnxruntimes_max_unpool_layout_where_output_shape_is_larger() -> None:
    """onnxruntime indexes MaxUnpool's output in output_shape's layout, the specification in
    the unpooled one (its own test case: indices 5, 7, 13, 15 of a 4x4 into a 5x5): the check
    says so instead of reporting a conversion error unexplained."""
    node = helper.make_node(
        "MaxUnpool", ["x", "i", "shape"], ["y"], kernel_shape=[2, 2], strides=[2, 2], name="up"
    )
    graph_proto = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2]),
            helper.make_tensor_value_info("i", TensorProto.INT64, [1, 1, 2, 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 5, 5])],
        [numpy_helper.from_array(np.array([1, 1, 5, 5], np.int64), "shape")],
    )
    model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 22)])
    model.ir_version = 10
    graph = convert(model, mode="eval")
    x, i = torch.tensor([[[[5.0, 6.0], [7.0, 8.0]]]]), torch.tensor([[[[5, 7], [13, 15]]]])
    y = graph(x, i)
    assert (y[0, 0, 1, 1], y[0, 0, 1, 3], y[0, 0, 3, 1], y[0, 0, 3, 3]).count(0) == 0
    check = check_conversion(model, graph, [x, i])
    assert check.max_abs_error is not None and check.max_abs_error > 1  # they do differ
    assert check.reason is not None and "MaxUnpool with output_shape (up)" in check.reason


def _reduce_mean_model() -> onnx.ModelProto:
    graph_proto = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=0)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    return helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 17)])


def test_a_mean_over_an_empty_axis_is_zero_as_in_onnxruntime() -> None:
    # a legacy-exported EmbeddingBag(mode="mean") with an empty bag: torch's mean is NaN there
    model = _reduce_mean_model()
    graph = convert(model)
    x = torch.zeros(2, 0, 3)
    assert torch.equal(graph(x), torch.zeros(2, 3))
    check = check_conversion(model, graph, [x])
    assert check.checked and check.max_abs_error == 0.0


def test_conformance_counts_a_nan_on_one_side_only_as_an_infinite_error() -> None:
    model = _reduce_mean_model()
    graph = convert(model)
    x = torch.randn(2, 4, 3)
    ours = graph(x).detach().clone()
    ours[0, 1] = float("nan")
    check = check_conversion(model, graph, [x], [ours])
    assert check.max_abs_error == float("inf") and check.max_rel_error == float("inf")
    # the same NaN on both sides agrees
    x[1, 2, 0] = float("nan")
    check = check_conversion(model, graph, [x])
    assert check.max_abs_error is not None and check.max_abs_error < 1e-6


def test_a_report_notes_a_conversion_that_differs_from_onnxruntime() -> None:
    agreeing = ConversionCheck(checked=True, max_abs_error=1e-7, max_rel_error=1e-6)
    assert conversion_mismatch_note(agreeing) == []
    assert conversion_mismatch_note(ConversionCheck(checked=False, reason="not requested")) == []
    for error in (0.5, float("inf")):
        check = ConversionCheck(checked=True, max_abs_error=error, max_rel_error=error)
        (note,) = conversion_mismatch_note(check)
        assert "differs from onnxruntime" in note
