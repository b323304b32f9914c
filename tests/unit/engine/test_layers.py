"""Grouping graph nodes into layers on hand-built graphs (the ONNX shapes of things)."""

from __future__ import annotations

import math

import torch

from service.engine.graph import Node, ObservableGraph
from service.engine.layers import group_layers, normalized_layers, reference_std


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


def _lstm_like(read_states: bool) -> ObservableGraph:
    """torch.export's nn.LSTM: one node giving (output, h_n, c_n), unpacked by three getitems."""
    params = {"rnn.weight": torch.randn(4, 3), "head.weight": torch.randn(2, 4)}
    nodes = [
        Node("lstm", "lstm", ["x", "rnn.weight"], ["lstm"], lambda x, w: (x @ w.t(), x, x)),
        *[Node(f"get{k}", "getitem", ["lstm"], [f"g{k}"], lambda t, k=k: t[k]) for k in range(3)],
        Node("head", "linear", ["g0", "head.weight"], ["y"], torch.nn.functional.linear),
    ]
    outputs = ["y", "g1"] if read_states else ["y"]
    return ObservableGraph(nodes, input_names=["x"], output_names=outputs, parameters=params)


def test_a_tuple_output_unpacked_by_getitems_is_followed_to_the_one_read() -> None:
    """Only the sequence (getitem 0) is read: it is the layer's output, whose gradient the
    report shows (before, the tuple was, and the layer had no ‖∂L/∂a‖)."""
    rnn, head = group_layers(_lstm_like(read_states=False))
    assert rnn.output == "g0" and rnn.nodes == ["lstm", "get0"]
    assert head.params == ["head.weight"]


def test_a_recurrent_tuple_with_two_parts_read_gets_the_gradient_of_both() -> None:
    """h_n is a graph output too: the sequence is the layer's output and h_n's gradient joins
    its ‖∂L/∂a‖ (before, the tuple stayed the output and the layer had no measurement)."""
    rnn, _ = group_layers(_lstm_like(read_states=True))
    assert rnn.output == "g0" and rnn.grad_outputs == ["g1"]


def test_the_affine_step_of_a_decomposed_group_norm_is_a_normalisation_layer() -> None:
    """Reshape → InstanceNormalization (ones, zeros) → Reshape → Mul weight → Add bias: how both
    ONNX exporters write nn.GroupNorm. The layer is the GroupNorm, not a Mul with a fan-in."""
    params = {
        "conv.weight": torch.randn(4, 2, 3),
        "norm.weight": torch.ones(4, 1),
        "norm.bias": torch.zeros(4, 1),
    }
    buffers = {"ones": torch.ones(2), "zeros": torch.zeros(2), "groups": torch.tensor([0, 2, -1])}
    nodes = [
        Node("conv", "Conv", ["x", "conv.weight"], ["c"], lambda x, w: torch.conv1d(x, w)),
        Node("r1", "Reshape", ["c", "groups"], ["r"], lambda c, s: c.reshape(c.shape[0], 2, -1)),
        Node("in", "InstanceNormalization", ["r", "ones", "zeros"], ["n"], lambda r, *_: r),
        Node("r2", "Reshape", ["n"], ["m"], lambda n: n.reshape(n.shape[0], 4, -1)),
        Node("mul", "Mul", ["m", "norm.weight"], ["w"], torch.mul),
        Node("add", "Add", ["w", "norm.bias"], ["y"], torch.add),
    ]
    graph = ObservableGraph(
        nodes, input_names=["x"], output_names=["y"], parameters=params, buffers=buffers
    )
    assert [(layer.op, layer.params) for layer in group_layers(graph)] == [
        ("Conv", ["conv.weight"]),
        ("GroupNormalization", ["norm.weight", "norm.bias"]),
    ]


def test_a_group_norms_weights_cast_like_the_data_are_still_one_normalisation_layer() -> None:
    """The dynamo exporter without its optimizer casts the GroupNorm's weight and bias to the
    data's dtype first: CastLike(W, data) reads only the data's dtype, so W is not multiplied
    into a CastLike layer of its own (each GroupNorm was two layers, weight and bias apart)."""
    params = {"norm.weight": torch.ones(4, 1), "norm.bias": torch.zeros(4, 1)}
    buffers = {"ones": torch.ones(2), "zeros": torch.zeros(2)}
    nodes = [
        Node("r1", "Reshape", ["x"], ["r"], lambda x: x.reshape(x.shape[0], 2, -1)),
        Node("in", "InstanceNormalization", ["r", "ones", "zeros"], ["n"], lambda r, *_: r),
        Node("r2", "Reshape", ["n"], ["m"], lambda n: n.reshape(n.shape[0], 4, -1)),
        Node("cw", "CastLike", ["norm.weight", "m"], ["w"], lambda w, m: w.to(m.dtype)),
        Node("mul", "Mul", ["m", "w"], ["scaled"], torch.mul),
        Node("cb", "CastLike", ["norm.bias", "scaled"], ["b"], lambda b, s: b.to(s.dtype)),
        Node("add", "Add", ["scaled", "b"], ["y"], torch.add),
    ]
    graph = ObservableGraph(
        nodes, input_names=["x"], output_names=["y"], parameters=params, buffers=buffers
    )
    (layer,) = group_layers(graph)
    assert (layer.op, layer.params, layer.output) == (
        "GroupNormalization",
        ["norm.weight", "norm.bias"],
        "y",
    )


def _rms_norm_nodes(inverse_root: list[Node]) -> list[Node]:
    """weight · (x · f(mean(x²) + eps)) with f written by `inverse_root` (value `inv`)."""
    return [
        Node("pow", "Pow", ["x", "two"], ["sq"], torch.pow),
        Node("mean", "ReduceMean", ["sq"], ["ms"], lambda v: v.mean(-1, keepdim=True)),
        Node("eps", "Add", ["ms", "epsilon"], ["var"], torch.add),
        *inverse_root,
        Node("norm", "Mul", ["x", "inv"], ["n"], torch.mul),
        Node("cast", "Cast", ["n"], ["c"], lambda v: v),
        Node("scale", "Mul", ["norm.weight", "c"], ["y"], torch.mul),
    ]


def test_a_written_out_rms_norm_is_a_normalisation_layer() -> None:
    """Hugging Face's LlamaRMSNorm: rsqrt in torch.export and the dynamo exporter, 1 / Sqrt in
    the legacy ONNX exporter; either way the layer is an RMSNorm, not a Mul."""
    spellings = {
        "rsqrt": [Node("rsqrt", "Rsqrt", ["var"], ["inv"], torch.rsqrt)],
        "1/sqrt": [
            Node("sqrt", "Sqrt", ["var"], ["root"], torch.sqrt),
            Node("recip", "Div", ["one", "root"], ["inv"], torch.div),
        ],
    }
    buffers = {"two": torch.tensor(2.0), "epsilon": torch.tensor(1e-6), "one": torch.tensor(1.0)}
    for spelling, inverse_root in spellings.items():
        graph = ObservableGraph(
            _rms_norm_nodes(inverse_root),
            input_names=["x"],
            output_names=["y"],
            parameters={"norm.weight": torch.ones(8)},
            buffers=buffers,
        )
        assert [layer.op for layer in group_layers(graph)] == ["RMSNorm"], spelling
    # a Mul by a factor that is no root of a mean stays a Mul
    plain = ObservableGraph(
        [Node("scale", "Mul", ["norm.weight", "x"], ["y"], torch.mul)],
        input_names=["x"],
        output_names=["y"],
        parameters={"norm.weight": torch.ones(8)},
    )
    assert [layer.op for layer in group_layers(plain)] == ["Mul"]


def test_only_a_layer_whose_output_only_a_normalisation_reads_is_scale_free() -> None:
    """conv → BatchNorm: the norm divides the conv's scale out. A transformer's out-projection
    joins the residual sum before the next LayerNorm: its scale is not divided out, though the
    LayerNorm is the next layer in depth order. The legacy GroupNorm reads its input through a
    Reshape and a Shape."""
    params = {
        "conv.weight": torch.randn(4, 4, 1),
        "bn.weight": torch.ones(4),
        "proj.weight": torch.randn(4, 4, 1),
        "ln.weight": torch.ones(4),
        "gn_conv.weight": torch.randn(4, 4, 1),
        "gn.weight": torch.ones(4),
    }
    buffers = {"ones": torch.ones(2), "zeros": torch.zeros(2)}
    nodes = [
        Node("conv", "Conv", ["x", "conv.weight"], ["c"], lambda x, w: torch.conv1d(x, w)),
        Node("bn", "BatchNormalization", ["c", "bn.weight"], ["b"], lambda c, w: c),
        Node("proj", "Conv", ["b", "proj.weight"], ["p"], lambda x, w: torch.conv1d(x, w)),
        Node("residual", "Add", ["b", "p"], ["r"], torch.add),
        Node("ln", "LayerNormalization", ["r", "ln.weight"], ["n"], lambda r, w: r),
        Node("gn_conv", "Conv", ["n", "gn_conv.weight"], ["g"], lambda x, w: torch.conv1d(x, w)),
        Node("shape", "Shape", ["g"], ["s"], lambda g: torch.tensor(g.shape)),
        Node("r1", "Reshape", ["g"], ["gr"], lambda g: g.reshape(g.shape[0], 2, -1)),
        Node("in", "InstanceNormalization", ["gr", "ones", "zeros"], ["i"], lambda v, *_: v),
        Node("r2", "Reshape", ["i", "s"], ["ib"], lambda i, s: i.reshape(*s.tolist())),
        Node("gn", "Mul", ["ib", "gn.weight"], ["y"], lambda i, w: i * w[:, None]),
    ]
    graph = ObservableGraph(
        nodes, input_names=["x"], output_names=["y"], parameters=params, buffers=buffers
    )
    layers = group_layers(graph)
    assert [layer.name for layer in layers][:5] == ["conv", "bn", "proj", "ln", "gn_conv"]
    assert normalized_layers(graph, layers) == {"conv", "gn_conv"}


def test_a_weight_computed_from_two_parameters_has_no_fan_in_to_judge() -> None:
    """weight_norm: W = g · v / ‖v‖ has the scale of neither g nor v."""
    params = {"g": torch.full((4, 1, 1), 9.0), "v": torch.randn(4, 3, 5)}
    nodes = [
        Node("norm", "Div", ["v", "g"], ["unit"], lambda v, g: v / v.norm()),
        Node("w", "Mul", ["unit", "g"], ["weight"], torch.mul),
        Node("conv", "Conv", ["x", "weight"], ["y"], lambda x, w: torch.conv1d(x, w)),
    ]
    graph = ObservableGraph(nodes, input_names=["x"], output_names=["y"], parameters=params)
    (layer,) = group_layers(graph)
    assert set(layer.params) == {"g", "v"}
    assert layer.weight is None and layer.fan_in is None and reference_std(layer) is None


def test_an_activations_own_parameter_belongs_to_the_layer_it_follows() -> None:
    """PReLU after a conv is the conv layer's activation; its slope is that layer's parameter
    (it had no layer: its gradient was in no layer's row)."""
    params = {
        "conv.weight": torch.randn(4, 2, 3),
        "act.weight": torch.full((4,), 0.25),
    }
    nodes = [
        Node("conv", "Conv", ["x", "conv.weight"], ["c"], lambda x, w: torch.conv1d(x, w)),
        Node("slope", "Reshape", ["act.weight"], ["s"], lambda w: w.reshape(4, 1)),
        Node("act", "PRelu", ["c", "s"], ["y"], lambda c, s: torch.where(c > 0, c, c * s)),
    ]
    (layer,) = group_layers(_graph(nodes, params, "y"))
    assert layer.activation == "prelu" and layer.nodes == ["conv", "act"]
    assert layer.params == ["conv.weight", "act.weight"]
    assert layer.weight == "conv.weight"
