"""Initializers that no gradient can reach are state, not weights (onnx/gradient_paths.py)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.engine.onnx.convert import convert
from service.engine.onnx.gradient_paths import disconnected_weights, gradient_free_initializers


def _model(nodes: list[onnx.NodeProto], initializers: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _masked_scores() -> onnx.ModelProto:
    """y = Where(Equal(mask, 0), -1e4, x * scale): the float mask is only compared."""
    return _model(
        [
            helper.make_node("Equal", ["mask", "zero"], ["masked"]),
            helper.make_node("Mul", ["x", "scale"], ["scaled"]),
            helper.make_node("Where", ["masked", "fill", "scaled"], ["y"]),
        ],
        {
            "mask": np.tril(np.ones((2, 3), np.float32)),
            "zero": np.zeros((), np.float32),
            "scale": np.full((3,), 0.5, np.float32),
            "fill": np.full((), -1e4, np.float32),
        },
    )


def test_a_mask_that_is_only_compared_is_no_weight() -> None:
    free = gradient_free_initializers(_masked_scores().graph)
    assert {"mask", "zero"} <= free
    assert "scale" not in free and "fill" not in free  # Where's branches take gradient


def test_the_converted_graph_keeps_the_mask_as_a_buffer() -> None:
    graph = convert(_masked_scores())
    assert set(graph.param_names) == {"scale", "fill"}
    assert "mask" in graph.buffer_names


def test_a_cast_to_integers_cuts_the_path_and_a_cast_to_float_does_not() -> None:
    def cast_to(to: int) -> set[str]:
        model = _model(
            [
                helper.make_node("Cast", ["w"], ["c"], to=to),
                helper.make_node("Cast", ["c"], ["cf"], to=TensorProto.FLOAT),
                helper.make_node("Add", ["x", "cf"], ["y"]),
            ],
            {"w": np.ones((3,), np.float32)},
        )
        return gradient_free_initializers(model.graph)

    assert cast_to(TensorProto.INT64) == {"w"}
    assert cast_to(TensorProto.FLOAT16) == set()


def test_an_op_of_another_domain_passes_gradient_in_doubt() -> None:
    model = _model(
        [helper.make_node("Equal", ["x", "w"], ["y"], domain="com.example")],
        {"w": np.ones((3,), np.float32)},
    )
    assert gradient_free_initializers(model.graph) == set()


def test_rotary_cos_and_sin_tables_are_no_weights() -> None:
    """onnxruntime-genai stores a model's rotary tables as initializers: the gradient reaches
    them (they multiply the activations) but they are fixed functions of the position, the
    source model's non-persistent buffers, in both domains' RotaryEmbedding and in
    GroupQueryAttention."""
    tables = {
        "cos": np.cos(np.arange(12, dtype=np.float32)).reshape(4, 3),
        "sin": np.sin(np.arange(12, dtype=np.float32)).reshape(4, 3),
        "w": np.ones((4, 6), np.float32),
    }
    default = helper.make_node("RotaryEmbedding", ["h", "cos", "sin", "pos"], ["y"], num_heads=1)
    microsoft = helper.make_node(
        "RotaryEmbedding", ["h", "pos", "cos", "sin"], ["y"], domain="com.microsoft"
    )
    gqa = helper.make_node(
        "GroupQueryAttention",
        ["h", "h", "h", "", "", "lens", "total", "cos", "sin"],
        ["y"],
        domain="com.microsoft",
        num_heads=1,
        kv_num_heads=1,
        do_rotary=1,
    )
    for node in (default, microsoft, gqa):
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["h"]), node],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(v, k) for k, v in tables.items()],
        )
        assert gradient_free_initializers(graph) >= {"cos", "sin"}, node.domain + node.op_type
        assert "w" not in gradient_free_initializers(graph)


def test_weights_of_a_part_no_output_depends_on_are_named() -> None:
    """An export that wires the head to an early layer (onnxruntime-genai's builder with
    transformers 5) leaves the later layers unconnected: their weights are state, and a note
    says why instead of their silently missing from the parameters."""
    model = _model(
        [
            helper.make_node("Mul", ["x", "w1"], ["h"], name="first"),
            helper.make_node("Mul", ["h", "w2"], ["later"], name="second"),
            helper.make_node("Relu", ["later"], ["unused"], name="third"),
            helper.make_node("Add", ["h", "b"], ["y"], name="head"),
        ],
        {k: np.full((3,), 0.5, np.float32) for k in ("w1", "w2", "b")},
    )
    assert disconnected_weights(model.graph) == (["second", "third"], ["w2"])
    graph = convert(model)
    assert set(graph.param_names) == {"w1", "b"}
    (note,) = [n for n in graph.metadata["notes"] if "no output depends on" in n]
    assert "2 node(s)" in note and "(second, third)" in note and "1 weight(s) (w2)" in note
    connected = _masked_scores()
    assert disconnected_weights(connected.graph) == ([], [])
    assert not any(
        "no output depends on" in n for n in convert(connected).metadata.get("notes", [])
    )
