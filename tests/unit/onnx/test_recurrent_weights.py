"""Legacy-exported LSTMs read torch's parameters directly (onnx/recurrent_weights.py): the
reordering Slice/Concat chain leaves the graph, results and gradients stay those of onnxruntime
and of the torch module; anything off the exact pattern keeps its nodes.

(`convert` releases the initializers' bytes of the ModelProto it reads: onnxruntime gets its
own copy, loaded from the same bytes.)"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from service.engine.graph import ObservableGraph
from service.engine.onnx.conformance import check_conversion
from service.engine.onnx.convert import convert, load_onnx
from service.engine.onnx.ops.recurrent import RecurrentFn, use_gate_blocks
from service.engine.onnx.recurrent_weights import DirectWeights, GateReorder
from tests.support.export import to_onnx
from tests.support.recurrent_zoo import (
    build_node_fn,
    call_recurrent,
    check_against_references,
    run_onnxruntime,
)

TORCH_GATE_BLOCKS = [0, 3, 1, 2]


class TwoLayerLSTM(nn.Module):
    """Two recurrent layers of `cell`, registered under its name (`lstm.weight_ih_l0`), and a
    linear head on the last step."""

    cell: type[nn.Module] = nn.LSTM

    def __init__(self, bias: bool = True, bidirectional: bool = False, hidden: int = 6) -> None:
        super().__init__()
        self.recurrent = self.cell.__name__.lower()
        self.add_module(
            self.recurrent,
            self.cell(
                5, hidden, num_layers=2, batch_first=True, bias=bias, bidirectional=bidirectional
            ),
        )
        self.head = nn.Linear(hidden * 2 if bidirectional else hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(getattr(self, self.recurrent)(x)[0][:, -1])


def _assert_no_folded_copy_and_onnxruntime_agrees(
    model: onnx.ModelProto, graph: ObservableGraph, x: torch.Tensor
) -> None:
    """The folded initializers are not kept beside the parameters split out of them (no
    second copy of a weight), and onnxruntime's copy of the model, rebuilt from the graph's
    parameters (conformance._refill), still gives the graph's outputs."""
    held = set(graph.param_names) | set(graph.buffer_names)
    assert not held & set(graph.metadata.get("gate_reordered_initializers", {}))
    check = check_conversion(model, graph, [x])
    assert check.checked and check.max_abs_error is not None and check.max_abs_error < 1e-5


def _onnxruntime(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return run_onnxruntime(model, {model.graph.input[0].name: x})


@pytest.mark.parametrize(
    ("bias", "dynamo", "optimize", "hidden"),
    [
        (True, False, None, 6),
        (False, False, None, 6),
        (True, True, False, 6),
        (True, True, True, 6),
        (False, True, True, 6),
        (True, True, True, 128),
    ],
    ids=[
        "legacy",
        "legacy-nobias",
        "dynamo",
        "dynamo-optimized",
        "dynamo-optimized-nobias",
        "dynamo-optimized-large",
    ],
)
def test_an_exported_lstm_reads_its_parameters_directly(
    bias: bool, dynamo: bool, optimize: bool | None, hidden: int
) -> None:
    """Legacy exports slice with constant bounds; dynamo's bounds are H·k with H read from the
    shape of an initial state (known by shape inference). torch.onnx.export's default optimizer
    folds the chains into initializers in ONNX's gate order (all of them for small weights, the
    biases alone for larger ones): split back into the module's parameters, named from the
    export's metadata."""
    torch.manual_seed(0)
    module = TwoLayerLSTM(bias=bias, hidden=hidden).train()
    x = torch.randn(4, 7, 5)
    data = to_onnx(module, x, dynamo=dynamo, optimize=optimize)
    model = load_onnx(data)
    graph = convert(model, mode="train")
    lstms = [n for n in graph.nodes if n.op_type == "LSTM"]
    assert len(lstms) == 2
    for k, node in enumerate(lstms):
        assert isinstance(node.fn, DirectWeights)
        assert node.fn.inner.gate_blocks == TORCH_GATE_BLOCKS
        biases = [f"lstm.bias_ih_l{k}", f"lstm.bias_hh_l{k}"] if bias else ["", ""]
        assert node.inputs[1:5] == [f"lstm.weight_ih_l{k}", f"lstm.weight_hh_l{k}", *biases]
    # no node reorders a parameter any more
    params = set(graph.param_names)
    assert not [n.name for n in graph.nodes if n.op_type == "Slice" and n.inputs[0] in params]
    assert params == {name for name, _ in module.named_parameters()}
    notes = " ".join(graph.metadata.get("notes", []))
    assert ("folded into initializers in ONNX's gate order" in notes) == bool(optimize)
    assert bool(graph.metadata.get("gate_reordered_initializers")) == bool(optimize)
    _assert_no_folded_copy_and_onnxruntime_agrees(model, graph, x)
    check_against_references(module, data, x)


def test_each_exported_lstm_layer_is_one_autograd_node() -> None:
    """The per-direction views, the bias sum and the output stacking around the sequence
    Function happen inside it: each layer's node reads torch's parameters straight from their
    gradient accumulators (one layer's backward costs ~0.1 ms less at hidden 128)."""
    torch.manual_seed(0)
    module = TwoLayerLSTM().train()
    x = torch.randn(4, 7, 5)
    graph = convert(load_onnx(to_onnx(module, x)), mode="train")
    loss = graph(x).square().sum()
    layers: list[Any] = []
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "_LSTMSequenceBackward":
            layers.append(fn)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    assert len(layers) == 2
    params = {id(p): name for name, p in graph.named_graph_parameters()}
    read = {
        params[id(next_fn.variable)]
        for layer in layers
        for next_fn, _ in layer.next_functions
        if next_fn is not None and hasattr(next_fn, "variable")
    }
    assert read == {
        f"lstm.{kind}_l{k}"
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        for k in (0, 1)
    }


def test_the_next_layers_zero_state_is_computed_once_per_input_shape() -> None:
    """A legacy export with a fixed batch sizes layer 2's initial state as Expand(zeros,
    Concat(.., Shape(layer 1's output)[1], ..)): an LSTM's output shape follows from its
    input's, so that chain is shape arithmetic (onnx/shape_values.py), run on the first call
    only."""
    torch.manual_seed(0)
    module = TwoLayerLSTM().train()
    data = to_onnx(module, torch.randn(4, 7, 5))
    graph = convert(load_onnx(data), mode="train")
    chain = [n for n in graph.nodes if n.op_type in ("Shape", "Expand")]
    assert chain and {n.name for n in chain} <= graph.input_shape_nodes
    calls: list[str] = []
    for node in chain:
        node.fn = _counted(node.fn, node.name, calls)
    for first in (True, False, False):
        calls.clear()
        x = torch.randn(4, 7, 5)
        out = graph(x)
        (expected,) = _onnxruntime(load_onnx(data), x.numpy())
        np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-4, atol=1e-5)
        assert sorted(calls) == (sorted(n.name for n in chain) if first else [])


def _counted(fn: Any, name: str, calls: list[str]) -> Any:
    def counted(*args: Any) -> Any:
        calls.append(name)
        return fn(*args)

    return counted


@pytest.mark.parametrize(
    ("dynamo", "optimize"),
    [(False, None), (True, False), (True, True)],
    ids=["legacy", "dynamo", "dynamo-optimized"],
)
def test_a_bidirectional_lstm_reads_both_directions_parameters(
    dynamo: bool, optimize: bool | None
) -> None:
    """W = Concat(Unsqueeze(forward chain), Unsqueeze(reverse chain)): each direction's
    parameters, `_reverse` ones included, feed the node directly."""
    torch.manual_seed(1)
    module = TwoLayerLSTM(bidirectional=True).train()
    x = torch.randn(3, 4, 5)
    data = to_onnx(module, x, dynamo=dynamo, optimize=optimize)
    graph = convert(load_onnx(data), mode="train")
    lstms = [n for n in graph.nodes if n.op_type == "LSTM"]
    assert all(isinstance(n.fn, DirectWeights) and n.fn.directions == 2 for n in lstms)
    assert lstms[1].inputs[1:3] == ["lstm.weight_ih_l1", "lstm.weight_ih_l1_reverse"]
    check_against_references(module, data, x)


def test_a_chain_value_read_elsewhere_keeps_the_chain() -> None:
    """The reordered W is also a graph output: the chain must stay to compute it."""
    torch.manual_seed(2)
    module = TwoLayerLSTM().train()
    x = torch.randn(2, 3, 5)
    model = load_onnx(to_onnx(module, x))
    first = next(n for n in model.graph.node if n.op_type == "LSTM")
    model.graph.output.append(
        helper.make_tensor_value_info(first.input[1], TensorProto.FLOAT, None)
    )
    data = model.SerializeToString()
    graph = convert(load_onnx(data), mode="train")
    lstms = [n for n in graph.nodes if n.op_type == "LSTM"]
    assert isinstance(lstms[0].fn, RecurrentFn)  # kept as exported
    assert isinstance(lstms[1].fn, DirectWeights)  # the other layer is still folded
    outputs = graph(x)
    expected = _onnxruntime(load_onnx(data), x.numpy())
    for got, want in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-5)


def _hand_built_lstm(pieces: list[tuple[int, int]], x_dims: list[Any]) -> onnx.ModelProto:
    """An LSTM whose W and R are Unsqueeze(Concat(Slice(param, piece) for each piece)), except
    that the first piece of W ends at Shape(x)[1] (the batch size, 2 at run time)."""
    hidden, inputs = 2, 3
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4 * hidden, inputs)).astype(np.float32)
    r = rng.standard_normal((4 * hidden, hidden)).astype(np.float32)
    nodes = [helper.make_node("Shape", ["x"], ["batch"], start=1, end=2)]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(r, "r")]
    inits.append(numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"))
    for param in ("w", "r"):
        sliced = []
        for k, (start, end) in enumerate(pieces):
            for bound, value in (("s", start), ("e", end)):
                inits.append(
                    numpy_helper.from_array(np.array([value], np.int64), f"{param}{bound}{k}")
                )
            sliced.append(f"{param}_piece{k}")
            end_name = "batch" if (param, k) == ("w", 0) else f"{param}e{k}"
            nodes.append(
                helper.make_node("Slice", [param, f"{param}s{k}", end_name, "axis0"], [sliced[-1]])
            )
        nodes.append(helper.make_node("Concat", sliced, [f"{param}_cat"], axis=0))
        nodes.append(helper.make_node("Unsqueeze", [f"{param}_cat", "axis0"], [f"{param}_3d"]))
    nodes.append(helper.make_node("LSTM", ["x", "w_3d", "r_3d"], ["y"], hidden_size=hidden))
    graph = helper.make_graph(
        nodes,
        "hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize(
    ("pieces", "x_dims", "folded"),
    [
        ([(0, 2), (6, 8), (2, 6)], [4, 2, 3], True),  # torch's order, as the exporter writes it
        ([(0, 2), (2, 8)], [4, 2, 3], True),  # the identity is a permutation too
        ([(0, 2), (6, 8), (2, 6)], [4, "batch", 3], False),  # a bound known only at run time
        ([(0, 2), (0, 2), (2, 6)], [4, 2, 3], False),  # a block twice, one missing
        ([(0, 2), (2, 3), (3, 8)], [4, 2, 3], False),  # not on block boundaries
    ],
)
def test_only_whole_block_permutations_fold(
    pieces: list[tuple[int, int]], x_dims: list[Any], folded: bool
) -> None:
    data = _hand_built_lstm(pieces, x_dims).SerializeToString()
    graph = convert(load_onnx(data), mode="train")
    (lstm,) = [n for n in graph.nodes if n.op_type == "LSTM"]
    assert isinstance(lstm.fn, DirectWeights) is folded
    x = np.random.default_rng(1).standard_normal((4, 2, 3)).astype(np.float32)
    (expected,) = _onnxruntime(load_onnx(data), x)
    got = graph(torch.from_numpy(x))
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_unrolled_path_reads_gate_blocks_too() -> None:
    """Sequence lengths shorter than the input send a call down the unrolled path, which
    gathers ONNX's order from weights given in torch's order."""
    hidden, steps, batch = 3, 5, 2
    node = helper.make_node(
        "LSTM", ["X", "W", "R", "B", "lens"], ["Y", "Y_h", "Y_c"], hidden_size=hidden
    )
    g = torch.Generator().manual_seed(0)
    X = torch.randn(steps, batch, 4, generator=g)
    W, R = (
        torch.randn(1, 4 * hidden, 4, generator=g),
        torch.randn(1, 4 * hidden, hidden, generator=g),
    )
    B = torch.randn(1, 8 * hidden, generator=g)
    lens = torch.tensor([5, 3], dtype=torch.int32)
    plain = build_node_fn(node, 17)
    reordered = build_node_fn(node, 17)
    assert isinstance(plain, RecurrentFn) and isinstance(reordered, RecurrentFn)
    assert use_gate_blocks(reordered, TORCH_GATE_BLOCKS)
    # torch's i, f, g, o from ONNX's i, o, f, c: blocks 0, 2, 3, 1
    to_torch = torch.cat([torch.arange(b * hidden, (b + 1) * hidden) for b in (0, 2, 3, 1)])
    W_t, R_t = W[:, to_torch], R[:, to_torch]
    B_t = torch.cat([B[:, : 4 * hidden][:, to_torch], B[:, 4 * hidden :][:, to_torch]], 1)
    expected = call_recurrent(plain, [X, W, R, B, lens])
    got = call_recurrent(reordered, [X, W_t, R_t, B_t, lens])
    for a, b in zip(got, expected, strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b)


class TwoLayerGRU(TwoLayerLSTM):
    cell = nn.GRU


@pytest.mark.parametrize(
    ("hidden", "bidirectional", "bias"),
    [(6, False, True), (6, True, True), (6, False, False), (128, False, True)],
    ids=["small", "bidirectional", "nobias", "large"],
)
def test_an_optimized_exports_folded_gru_weights_are_the_modules_parameters(
    hidden: int, bidirectional: bool, bias: bool
) -> None:
    """torch.onnx.export's optimizer folds a GRU's gate reordering into initializers in ONNX's
    gate order (all of W, R, B for small weights; some for larger): they become the module's
    parameters again, each ONNX tensor computed from them (GateReorder), so the report names
    every parameter as the module does and its gradient equals torch's."""
    torch.manual_seed(2)
    module = TwoLayerGRU(bias, bidirectional, hidden).train()
    x = torch.randn(3, 4, 5)
    data = to_onnx(module, x, dynamo=True, optimize=True)
    assert any(
        i.name.startswith("val_") and len(i.dims) == 3 for i in load_onnx(data).graph.initializer
    )
    model = load_onnx(data)
    graph = convert(model, mode="train")  # releases the initializers: onnxruntime refills
    assert set(graph.param_names) == {name for name, _ in module.named_parameters()}
    assert any(isinstance(n.fn, GateReorder) for n in graph.nodes)
    assert "gru.weight_ih_l0" in " ".join(graph.metadata["notes"])
    _assert_no_folded_copy_and_onnxruntime_agrees(model, graph, x)
    check_against_references(module, data, x)


@pytest.mark.parametrize(
    ("bias", "bidirectional", "dynamo"),
    [(True, False, False), (False, False, False), (True, True, False), (True, False, True)],
    ids=["legacy", "legacy-nobias", "legacy-bidirectional", "dynamo"],
)
def test_an_exported_grus_reordering_chain_leaves_the_graph(
    bias: bool, bidirectional: bool, dynamo: bool
) -> None:
    """nn.GRU's r, z, n gathered into ONNX's z, r, n by Slices and Concats of every weight
    and bias (40 of a 2-layer GRU's 48 nodes per call): the GRU node reads the parameters
    and gathers ONNX's order itself; results and gradients those of torch and onnxruntime."""
    torch.manual_seed(1)
    module = TwoLayerGRU(bias, bidirectional).train()
    x = torch.randn(4, 7, 5)
    data = to_onnx(module, x, dynamo=dynamo, optimize=False if dynamo else None)
    model = load_onnx(data)
    graph = convert(model, mode="train")
    grus = [n for n in graph.nodes if n.op_type == "GRU"]
    assert len(grus) == 2
    for node in grus:
        assert isinstance(node.fn, DirectWeights)
        assert node.fn.inner.gate_blocks == [1, 0, 2]
    params = set(graph.param_names)
    assert not [n.name for n in graph.nodes if n.op_type == "Slice" and n.inputs[0] in params]
    assert params == {name for name, _ in module.named_parameters()}
    _assert_no_folded_copy_and_onnxruntime_agrees(model, graph, x)
    check_against_references(module, data, x)
