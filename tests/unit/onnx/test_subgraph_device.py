"""If/Loop/Scan bodies keep their initializers and Constants outside the module's state: a call
on another device reads them moved there (a MatMul by a body initializer on CUDA would
otherwise meet a CPU weight). The `meta` device stands in for CUDA here: the body returns its
initializer and its Constant through Identity, so their device is what the body read."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from service.engine.onnx.convert import convert


def _loop_returning_its_state() -> onnx.ModelProto:
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["h_in", "Wb"], ["h_out"]),
            helper.make_node("Identity", ["Wb"], ["weight_seen"]),
            helper.make_node(
                "Constant", [], ["one"], value=numpy_helper.from_array(np.ones(3, np.float32))
            ),
            helper.make_node("Identity", ["one"], ["constant_seen"]),
            helper.make_node(
                "Constant", [], ["axes"], value=numpy_helper.from_array(np.array([0], np.int64))
            ),
            helper.make_node("Identity", ["axes"], ["axes_seen"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [2, 3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("weight_seen", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("constant_seen", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("axes_seen", TensorProto.INT64, [1]),
        ],
        [numpy_helper.from_array(weight, "Wb")],
    )
    outputs = ["h", "weights", "constants", "axes"]
    graph = helper.make_graph(
        [helper.make_node("Loop", ["M", "cond", "x"], outputs, body=body)],
        "loop",
        [
            helper.make_tensor_value_info("M", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
        ],
        [
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("weights", TensorProto.FLOAT, [None, 2, 3]),
            helper.make_tensor_value_info("constants", TensorProto.FLOAT, [None, 3]),
            helper.make_tensor_value_info("axes", TensorProto.INT64, [None, 1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_body_reads_its_state_on_the_device_of_the_call() -> None:
    graph = convert(_loop_returning_its_state())
    M, cond = torch.tensor(2), torch.tensor(True)
    h, weights, constants, axes = graph(M, cond, torch.zeros(2, 3))
    torch.testing.assert_close(h, 2 * torch.arange(6.0).reshape(2, 3))
    assert weights.device.type == constants.device.type == "cpu"
    h, weights, constants, axes = graph.to("meta")(M, cond, torch.zeros(2, 3, device="meta"))
    assert h.device.type == "meta"
    assert weights.device.type == "meta" and weights.shape == (2, 2, 3)  # stacked per iteration
    assert constants.device.type == "meta"
    assert axes.device.type == "cpu"  # a small integer constant (an axes argument) stays
