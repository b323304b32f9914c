"""nn.RNN as torch.onnx's dynamo exporter writes it, step by step, folded back into RNN nodes
(onnx/unrolled_rnn.py): outputs equal onnxruntime's on the exported graph, every parameter's
gradient equals the torch module's, the steps' states keep their names, and a chain off the
exact pattern runs as written.

(`convert` releases the initializers' bytes of the ModelProto it reads: onnxruntime gets its
own copy, loaded from the same bytes.)"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from torch import nn

from service.engine.graph import Node
from service.engine.layers import group_layers
from service.engine.onnx.convert import convert, load_onnx
from service.engine.onnx.unrolled_rnn import WrittenOutRNN
from tests.support.export import to_onnx
from tests.support.recurrent_zoo import check_against_references, run_onnxruntime


class StackedRNN(nn.Module):
    def __init__(self, nonlinearity: str, bias: bool, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.rnn = nn.RNN(
            3, 5, num_layers=2, nonlinearity=nonlinearity, bias=bias, batch_first=batch_first
        )
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(x)[0]
        return self.head(out[:, -1] if self.batch_first else out[-1])


def _export(module: nn.Module, x: torch.Tensor, optimize: bool = False) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_onnx(module, x, dynamo=True, input_names=["x"], optimize=optimize)


@pytest.mark.parametrize("optimize", [False, True], ids=["as-written", "optimized"])
@pytest.mark.parametrize(
    ("nonlinearity", "bias", "batch_first"),
    [("tanh", True, True), ("tanh", True, False), ("relu", True, True), ("tanh", False, True)],
    ids=["tanh", "tanh-seq-first", "relu", "tanh-no-bias"],
)
def test_a_written_out_rnn_folds_into_rnn_nodes(
    nonlinearity: str, bias: bool, batch_first: bool, optimize: bool
) -> None:
    """`optimize=True` is what `torch.onnx.export(..., dynamo=True)` does by default: the
    weights' Transposes are folded into `val_N` initializers (turned back into the module's
    parameters, onnx/source_parameters.py) and the first step, for h0 = 0, reads an
    initializer holding b_hh (zeros without bias) in place of h0·W_hhᵀ + b_hh."""
    torch.manual_seed(0)
    module = StackedRNN(nonlinearity, bias, batch_first).train()
    x = torch.randn(4, 6, 3) if batch_first else torch.randn(6, 4, 3)
    data = _export(module, x, optimize)
    exported = load_onnx(data)
    activation = "Tanh" if nonlinearity == "tanh" else "Relu"
    assert sum(n.op_type == activation for n in exported.graph.node) == 12  # 6 steps × 2 layers
    graph = convert(exported, mode="train")
    rnns = [n for n in graph.nodes if n.op_type == "RNN"]
    assert len(rnns) == 2 and all(isinstance(n.fn, WrittenOutRNN) for n in rnns)
    assert not [n for n in graph.nodes if n.op_type in ("MatMul", activation)]
    expected_params = ["weight_ih_l0", "weight_hh_l0", *(["bias_ih_l0", "bias_hh_l0"] * bias)]
    assert rnns[0].inputs[1 : 1 + len(expected_params)] == [f"rnn.{p}" for p in expected_params]
    assert {n for n, _ in graph.named_graph_parameters()} == {
        n for n, _ in module.named_parameters()
    }
    check_against_references(module, data, x)


class BidirectionalRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 5, batch_first=True, bidirectional=True)
        self.head = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("optimize", [False, True], ids=["as-written", "optimized"])
def test_a_bidirectional_rnns_reverse_direction_folds_into_a_reverse_rnn_node(
    optimize: bool,
) -> None:
    """The exporter runs the reverse direction as the same chain over its projection reversed
    (a Slice with step -1): it folds into an RNN node of direction "reverse", whose layer is
    `rnn.l0_reverse` beside `rnn.l0`."""
    torch.manual_seed(3)
    module = BidirectionalRNN().train()
    x = torch.randn(4, 6, 3)
    data = _export(module, x, optimize)
    graph = convert(load_onnx(data), mode="train")
    rnns = [n for n in graph.nodes if n.op_type == "RNN"]
    assert [n.attrs["direction"] for n in rnns] == ["forward", "reverse"]
    assert not [n for n in graph.nodes if n.op_type in ("MatMul", "Tanh")]
    assert rnns[1].inputs[1:3] == ["rnn.weight_ih_l0_reverse", "rnn.weight_hh_l0_reverse"]
    assert [layer.name for layer in group_layers(graph)] == ["rnn.l0", "rnn.l0_reverse", "head"]
    check_against_references(module, data, x)


def test_the_steps_states_keep_their_names_and_their_values() -> None:
    """The folded node gives every step's state under the exporter's name (observers see each
    step), and the exporter's Concat of them passes the node's whole sequence on."""
    torch.manual_seed(1)
    module = StackedRNN("tanh", True, True).train()
    x = torch.randn(2, 5, 3)
    data = _export(module, x)
    exported = load_onnx(data)
    tanh_outputs = [n.output[0] for n in exported.graph.node if n.op_type == "Tanh"]
    graph = convert(exported, mode="train")
    rnns = [n for n in graph.nodes if n.op_type == "RNN"]
    assert [o for n in rnns for o in n.outputs[1:]] == tanh_outputs
    seen: dict[str, torch.Tensor] = {}

    def observe(node: Node, outputs: Sequence[Any]) -> None:
        for name, value in zip(node.outputs, outputs, strict=False):
            seen[name] = value

    graph.run([x], observe)
    expected, _ = module.rnn(x)  # the last layer's states, [B, T, H]
    for t, name in enumerate(rnns[1].outputs[1:]):
        torch.testing.assert_close(seen[name][0], expected[:, t], rtol=1e-5, atol=1e-6)
    concat = next(n for n in graph.nodes if n.inputs == [rnns[0].outputs[0]])
    assert concat.op_type == "Concat"


def test_a_step_value_read_elsewhere_keeps_that_chain_as_written() -> None:
    """One step's product is also a graph output: that layer's chain does not fold (its value
    would vanish), the other layer's does, and the results still equal onnxruntime's."""
    torch.manual_seed(2)
    module = StackedRNN("tanh", True, True).train()
    x = torch.randn(3, 4, 3)
    model = load_onnx(_export(module, x))
    products = [n for n in model.graph.node if n.op_type == "MatMul"]
    step_product = products[1]  # [0] is layer 0's input projection, [1] its first step's h·Wᵀ
    model.graph.output.append(
        helper.make_tensor_value_info(step_product.output[0], onnx.TensorProto.FLOAT, None)
    )
    data = model.SerializeToString()
    graph = convert(load_onnx(data), mode="train")
    assert sum(n.op_type == "RNN" for n in graph.nodes) == 1
    assert sum(n.op_type == "Tanh" for n in graph.nodes) == 4  # one layer's steps, as written
    outputs = graph(x)
    references = run_onnxruntime(onnx.load_from_string(data), {"x": x.numpy()})
    for got, want in zip(outputs, references, strict=True):
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-5)


def _hand_written_rnn(steps: int, batch: int, inputs: int, hidden: int) -> onnx.ModelProto:
    """The dynamo exporter's step pattern with a [B, H] state (no [1, B, H] layer axis): the
    steps' Concat on axis 0 is then [T·B, H]."""
    g = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(
            (g.standard_normal(shape) * 0.4).astype(np.float32), name
        )

    def ints(name: str, *values: int) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(np.array(values, dtype=np.int64), name)

    initializers = [
        weight("W_ih", hidden, inputs),
        weight("W_hh", hidden, hidden),
        weight("b_ih", hidden),
        weight("b_hh", hidden),
        weight("h_init", batch, hidden),
        ints("axis0", 0),
    ]
    nodes = [
        helper.make_node("Transpose", ["W_ih"], ["W_ih_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "W_ih_t"], ["proj"]),
        helper.make_node("Add", ["proj", "b_ih"], ["P"]),
    ]
    h = "h_init"
    for t in range(steps):
        initializers += [ints(f"start{t}", t), ints(f"end{t}", t + 1)]
        nodes += [
            helper.make_node("Transpose", ["W_hh"], [f"W_hh_t{t}"], perm=[1, 0]),
            helper.make_node("MatMul", [h, f"W_hh_t{t}"], [f"m{t}"]),
            helper.make_node("Add", [f"m{t}", "b_hh"], [f"l{t}"]),
            helper.make_node("Slice", ["P", f"start{t}", f"end{t}", "axis0"], [f"s{t}"]),
            helper.make_node("Squeeze", [f"s{t}", "axis0"], [f"x{t}"]),
            helper.make_node("Add", [f"l{t}", f"x{t}"], [f"a{t}"]),
            helper.make_node("Tanh", [f"a{t}"], [f"h{t}"]),
        ]
        h = f"h{t}"
    nodes.append(helper.make_node("Concat", [f"h{t}" for t in range(steps)], ["y"], axis=0))
    graph = helper.make_graph(
        nodes,
        "written_out_rnn",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [steps, batch, inputs])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [steps * batch, hidden])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_two_dimensional_state_folds_too() -> None:
    model = _hand_written_rnn(steps=5, batch=3, inputs=4, hidden=6)
    data = model.SerializeToString()
    graph = convert(load_onnx(data), mode="train")
    assert [n.op_type for n in graph.nodes].count("RNN") == 1
    x = torch.randn(5, 3, 4)
    out = graph(x)
    (reference,) = run_onnxruntime(onnx.load_from_string(data), {"x": x.numpy()})
    np.testing.assert_allclose(out.detach().numpy(), reference, rtol=1e-4, atol=1e-5)
    out.sum().backward()  # every parameter, the initial state included, gets a gradient
    assert all(p.grad is not None for _, p in graph.named_graph_parameters())
