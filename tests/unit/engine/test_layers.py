"""Grouping graph nodes into layers on hand-built graphs (the ONNX shapes of things)."""

from __future__ import annotations

import math

import torch

from service.engine.graph import Node, ObservableGraph
from service.engine.layers import group_layers, reference_std


def _graph(nodes: list[Node], params: dict[str, torch.Tensor], out: str) -> ObservableGraph:
    return ObservableGraph(nodes, input_names=["x"], output_names=[out], parameters=params)


def test_transposed_matmul_plus_bias_plus_activation_is_one_layer() -> None:
    """ONNX exports of nn.Linear: MatMul(x, Transpose(W)) then Add(b), then the activation."""
    params = {"fc.weight": torch.randn(5, 3), "fc.bias": torch.randn(5)}
    nodes = [
        Node("t", "Transpose", ["fc.weight"], ["wt"], lambda w: w.t()),
        Node("mm", "MatMul", ["x", "wt"], ["h"], torch.matmul),
        Node("add", "Add", ["h", "fc.bias"], ["z"], torch.add),
        Node("act", "Tanh", ["z"], ["y"], torch.tanh),
    ]
    (layer,) = group_layers(_graph(nodes, params, "y"))
    assert layer.name == "fc"
    assert layer.params == ["fc.weight", "fc.bias"]
    assert layer.nodes == ["mm", "add", "act"]
    assert layer.output == "y" and layer.activation == "tanh"
    assert (layer.fan_in, layer.fan_out) == (3, 5)
    assert reference_std(layer) == math.sqrt(2 / 8)  # Xavier before tanh


def test_shared_output_is_not_merged_and_unnamed_params_use_the_node_name() -> None:
    params = {"w1": torch.randn(4, 4), "w2": torch.randn(4, 4)}
    nodes = [
        Node("mm1", "MatMul", ["x", "w1"], ["a"], torch.matmul),
        Node("relu", "Relu", ["a"], ["r"], torch.relu),
        Node("mm2", "MatMul", ["r", "w2"], ["b"], torch.matmul),
        Node("skip", "Add", ["b", "r"], ["y"], torch.add),  # data + data: not a layer
    ]
    layers = group_layers(_graph(nodes, params, "y"))
    assert [lyr.name for lyr in layers] == ["mm1", "mm2"]
    assert layers[0].activation == "relu" and layers[0].output == "r"
    assert layers[1].activation is None and layers[1].output == "b"
    assert [lyr.depth for lyr in layers] == [0, 1]
    assert layers[0].fan_in == 4 and reference_std(layers[0]) == math.sqrt(2 / 4)  # He


def test_conv_feeding_batchnorm_then_relu_is_judged_against_he() -> None:
    params = {
        "conv.weight": torch.randn(8, 3, 3, 3),
        "bn.weight": torch.ones(8),
        "bn.bias": torch.zeros(8),
    }
    nodes = [
        Node("conv", "Conv", ["x", "conv.weight"], ["c"], torch.conv2d),
        Node(
            "bn",
            "BatchNormalization",
            ["c", "bn.weight", "bn.bias"],
            ["n"],
            lambda c, w, b: torch.nn.functional.batch_norm(c, None, None, w, b, training=True),
        ),
        Node("relu", "Relu", ["n"], ["y"], torch.relu),
    ]
    conv, bn = group_layers(_graph(nodes, params, "y"))
    assert (conv.name, bn.name) == ("conv", "bn")
    assert conv.fan_in == 27 and conv.init_activation == "relu"
    assert reference_std(conv) == math.sqrt(2 / 27)
    assert bn.activation == "relu" and bn.fan_in is None and reference_std(bn) is None


def _written_out_rnn(
    steps: int, per_step_input: bool
) -> tuple[list[Node], dict[str, torch.Tensor]]:
    """What torch.onnx's dynamo exporter writes for a one-layer nn.RNN: the input projection,
    then per step h_t = Tanh(Add(Add(MatMul(h_{t-1}, Transpose(W_hh)), b_hh), x_t)) with x_t cut
    from the projection, and a Concat of every h_t. Without `per_step_input` the steps read no
    x_t: one tanh(Linear) applied `steps` times (weight tying, not a recurrence over time)."""
    params = {
        "rnn.weight_ih_l0": torch.randn(4, 3),
        "rnn.bias_ih_l0": torch.randn(4),
        "rnn.weight_hh_l0": torch.randn(4, 4),
        "rnn.bias_hh_l0": torch.randn(4),
    }
    nodes = [
        Node("wi", "Transpose", ["rnn.weight_ih_l0"], ["wit"], lambda w: w.t()),
        Node("proj", "MatMul", ["x", "wit"], ["p0"], torch.matmul),  # x: [T, B, 3]
        Node("proj_b", "Add", ["p0", "rnn.bias_ih_l0"], ["p"], torch.add),
    ]
    # the zero initial state, as the exporter's Expand of a constant: neither data nor parameter
    nodes.append(Node("zeros", "ConstantOfShape", [], ["h_init"], lambda: torch.zeros(2, 4)))
    h = "h_init"
    if not per_step_input:  # the first step's input is the projection's first row alone
        nodes.append(Node("first", "Squeeze", ["p"], ["p_0"], lambda p: p[0]))
        h = "p_0"
    hidden = []
    for t in range(steps):
        nodes.append(
            Node(f"wh{t}", "Transpose", ["rnn.weight_hh_l0"], [f"wht{t}"], lambda w: w.t())
        )
        nodes.append(Node(f"mm{t}", "MatMul", [h, f"wht{t}"], [f"m{t}"], torch.matmul))
        nodes.append(Node(f"b{t}", "Add", [f"m{t}", "rnn.bias_hh_l0"], [f"l{t}"], torch.add))
        pre = f"l{t}"
        if per_step_input:
            nodes.append(Node(f"cut{t}", "Slice", ["p"], [f"s{t}"], lambda p, t=t: p[t : t + 1]))
            nodes.append(Node(f"sq{t}", "Squeeze", [f"s{t}"], [f"x{t}"], lambda s: s[0]))
            nodes.append(Node(f"in{t}", "Add", [pre, f"x{t}"], [f"a{t}"], torch.add))
            pre = f"a{t}"
        nodes.append(Node(f"tanh{t}", "Tanh", [pre], [f"h{t}"], torch.tanh))
        h = f"h{t}"
        hidden.append(h)
    nodes.append(Node("cat", "Concat", hidden, ["y"], lambda *hs: torch.stack(hs)))
    return nodes, params


def test_a_written_out_rnn_is_one_recurrent_layer() -> None:
    nodes, params = _written_out_rnn(5, per_step_input=True)
    (layer,) = group_layers(_graph(nodes, params, "y"))
    assert (layer.name, layer.op) == ("rnn", "RNN")
    assert layer.params == list(params)
    assert layer.output == "y"  # every step's hidden state, as an RNN node's Y
    assert layer.weight == "rnn.weight_ih_l0" and (layer.fan_in, layer.fan_out) == (3, 4)


def test_one_weight_applied_again_and_again_without_per_step_inputs_stays_layers() -> None:
    nodes, params = _written_out_rnn(5, per_step_input=False)
    layers = group_layers(_graph(nodes, params, "y"))
    assert [layer.op for layer in layers] == ["MatMul"] * 6
    assert [layer.depth for layer in layers] == list(range(6))
