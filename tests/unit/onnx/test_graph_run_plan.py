"""`ObservableGraph.run` over its slot plan gives what a plain name → value interpreter gives,
observed or not, and notices every change made to the graph after the plan was made."""

from __future__ import annotations

import copy
import functools
import weakref
from collections.abc import Sequence
from typing import Any

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from service.engine.graph import ConstantResult, Node, ObservableGraph, passthrough
from service.engine.onnx.convert import convert, load_onnx
from service.engine.onnx.ops._util import LastTensorMemo
from tests.support.export import to_onnx
from tests.support.zoo import TransformerEncoder

X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))


@functools.cache
def _encoder_bytes() -> bytes:
    torch.manual_seed(0)
    return to_onnx(TransformerEncoder(dim=16, heads=2, layers=2, ffn=32).train(), X)


def _encoder() -> ObservableGraph:
    return convert(load_onnx(_encoder_bytes()), mode="train")


def reference_run(graph: ObservableGraph, inputs: Sequence[Any]) -> list[Any]:
    """Every node called in order over a dict of named values (what run() did before plans)."""
    values = graph.initial_values()
    values.update(zip(graph.input_names, inputs, strict=True))
    values[""] = None
    for node in graph.nodes:
        result = node.fn(*[values[name] for name in node.inputs])
        outputs = (result,) if len(node.outputs) == 1 else result
        for name, value in zip(node.outputs, outputs, strict=False):
            if name:
                values[name] = value
    return [values[name] for name in graph.output_names]


def _loss_and_grads(graph: ObservableGraph, run: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    graph.zero_grad(set_to_none=True)
    out = run()[0]
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for _, p in graph.named_graph_parameters()]  # type: ignore[union-attr]


def test_outputs_and_gradients_match_the_reference_interpreter_observed_or_not() -> None:
    graph = _encoder()
    # the plan itself changes no bit; fused groups (attention as one SDPA call) compute the
    # same to rounding, test_fusions.py
    graph.fusions = []
    expected, expected_grads = _loss_and_grads(graph, lambda: reference_run(graph, [X]))
    seen: list[tuple[str, list[Any]]] = []
    observed = lambda: graph.run([X], lambda n, o: seen.append((n.name, list(o))))  # noqa: E731
    for run in (lambda: graph.run([X]), observed, lambda: graph.run([X])):
        out, grads = _loss_and_grads(graph, run)
        assert torch.equal(out, expected)
        assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads, strict=True))
    # the observer saw every node, folded and passthrough ones included, in graph order
    assert [name for name, _ in seen] == [n.name for n in graph.nodes]
    folded = [n for n in graph.nodes if isinstance(n.fn, ConstantResult)]
    passing = [n for n in graph.nodes if n.fn is passthrough]
    assert folded and passing
    outputs = dict(seen)
    for node in folded:
        assert isinstance(node.fn, ConstantResult)  # narrows for mypy: `folded` holds only these
        assert outputs[node.name][0] is node.fn.value


def test_a_fn_swapped_in_place_runs_from_the_next_call() -> None:
    graph = _encoder()
    before = graph.run([X])[0]
    gelu = next(n for n in graph.nodes if n.op_type == "Gelu")
    gelu.fn = torch.relu
    after = graph.run([X])[0]
    assert not torch.equal(before, after)
    assert torch.equal(after, reference_run(graph, [X])[0])
    # a folded node given a new fn runs it (a transform guarding a folded node)
    folded = next(n for n in graph.nodes if isinstance(n.fn, ConstantResult))
    calls: list[str] = []
    stored = folded.fn

    def recorded(*args: Any) -> Any:
        calls.append(folded.name)
        return stored(*args)

    folded.fn = recorded
    graph.run([X])
    assert calls == [folded.name]


def _chain(record: list[Any]) -> ObservableGraph:
    """x → a = x + 1 → b = a * w → c = b.sum(); c's fn checks whether `a` is still held."""

    def last(b: torch.Tensor) -> torch.Tensor:
        record.append(record[0]() if record else None)  # the weakref to `a`, called
        return b.sum()

    def first(x: torch.Tensor) -> torch.Tensor:
        a = x + 1
        record.append(weakref.ref(a))
        return a

    nodes = [
        Node("first", "Add", ["x"], ["a"], first),
        Node("second", "Mul", ["a", "w"], ["b"], torch.mul),
        Node("alias", "Identity", ["b"], ["b2"], passthrough),
        Node("third", "ReduceSum", ["b2"], ["c"], last),
    ]
    w = torch.full((3,), 2.0)
    return ObservableGraph(nodes, input_names=["x"], output_names=["c"], buffers={"w": w})


def test_a_value_is_dropped_after_its_last_reader() -> None:
    for observer in (None, lambda node, outputs: None):
        record: list[Any] = []
        graph = _chain(record)
        with torch.no_grad():
            (c,) = graph.run([torch.ones(3)], observer)
        assert float(c) == 12.0
        assert record[1] is None  # `a` was gone when the last node ran


def test_rewiring_a_node_in_place_is_planned_afresh() -> None:
    graph = _chain([])
    assert float(graph.run([torch.ones(3)])[0]) == 12.0
    graph.nodes[1].inputs = ["a", "x"]  # b = a * x
    assert float(graph.run([torch.ones(3)])[0]) == 6.0
    graph.nodes[3].outputs = ["c2"]  # nothing writes c any more
    with pytest.raises(KeyError, match="graph output reads 'c'"):
        graph.run([torch.ones(3)])
    graph.nodes[3].outputs = ["c"]
    graph.nodes.insert(3, Node("scale", "Mul", ["b2", "w"], ["b3"], torch.mul))
    graph.nodes[4].inputs = ["b3"]
    assert float(graph.run([torch.ones(3)])[0]) == 12.0
    graph.nodes.pop(3)
    graph.nodes[3].inputs = ["b2"]
    assert float(graph.run([torch.ones(3)])[0]) == 6.0


def test_a_copy_runs_on_its_own_state_and_a_move_is_seen() -> None:
    graph = _chain([])
    graph.run([torch.ones(3)])
    twin = copy.deepcopy(graph)
    with torch.no_grad():
        twin.w.fill_(3.0)  # type: ignore[operator]
    assert float(twin.run([torch.ones(3)])[0]) == 18.0
    assert float(graph.run([torch.ones(3)])[0]) == 12.0
    graph.double()  # buffers replaced by float64 copies
    (c,) = graph.run([torch.ones(3, dtype=torch.float64)])
    assert c.dtype == torch.float64 and float(c) == 12.0


def test_a_graph_reading_a_missing_value_names_it() -> None:
    nodes = [Node("n", "Relu", ["nowhere"], ["y"], torch.relu)]
    graph = ObservableGraph(nodes, input_names=["x"], output_names=["y"])
    with pytest.raises(KeyError, match="node 'n' \\(Relu\\) reads 'nowhere'"):
        graph.run([torch.ones(1)])


def _shape_arithmetic_model() -> onnx.ModelProto:
    """y = Reshape(x, [Shape(x)[0], -1]) * sqrt(Shape(x)[1]): values from the input shape."""
    i64 = TensorProto.INT64
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", i64, [1], [0])),
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("o", i64, [1], [1])),
        helper.make_node("Constant", [], ["two"], value=helper.make_tensor("t", i64, [1], [2])),
        helper.make_node("Constant", [], ["rest"], value=helper.make_tensor("r", i64, [1], [-1])),
        helper.make_node("Slice", ["shape", "zero", "one"], ["rows"]),
        helper.make_node("Slice", ["shape", "one", "two"], ["cols"]),
        helper.make_node("Concat", ["rows", "rest"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Cast", ["cols"], ["cols_f"], to=TensorProto.FLOAT),
        helper.make_node("Sqrt", ["cols_f"], ["scale"]),
        helper.make_node("Mul", ["flat", "scale"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "shape_arithmetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "c", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", None])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _counting(fn: Any, name: str, calls: list[str]) -> Any:
    def counted(*args: Any) -> Any:
        calls.append(name)
        return fn(*args)

    return counted


def test_shape_arithmetic_is_reused_per_input_shape_and_redone_for_a_new_one() -> None:
    graph = convert(_shape_arithmetic_model())
    reused = {"Shape_0", "Slice_5", "Slice_6", "Concat_7", "Cast_9", "Sqrt_10"}
    assert reused <= graph.input_shape_nodes
    assert not {"Reshape_8", "Mul_11"} & graph.input_shape_nodes
    calls: list[str] = []
    for node in graph.nodes:
        if node.name in reused:
            node.fn = _counting(node.fn, node.name, calls)
    small, large = torch.randn(2, 3, 4), torch.randn(5, 9, 2)
    seen: set[torch.Size] = set()
    observed: list[tuple[str, list[Any]]] = []
    for x in (small, small, large, large, small):
        calls.clear()
        (y,) = graph.run([x])
        assert torch.equal(y, x.reshape(x.shape[0], -1) * torch.tensor(float(x.shape[1])).sqrt())
        # computed on the first call with this shape only
        assert sorted(calls) == ([] if x.shape in seen else sorted(reused))
        seen.add(x.shape)
        calls.clear()
        observed.clear()
        (again,) = graph.run([x], lambda node, outputs: observed.append((node.name, list(outputs))))
        assert torch.equal(again, y) and not calls
        assert [name for name, _ in observed] == [n.name for n in graph.nodes]
        assert torch.equal(dict(observed)["Sqrt_10"][0], torch.tensor([float(x.shape[1])]).sqrt())


def test_a_shape_read_after_col2im_is_reused() -> None:
    """Col2Im's output shape follows from its input's shape and its image and block shapes."""
    i64 = TensorProto.INT64
    nodes = [
        helper.make_node(
            "Constant", [], ["image"], value=helper.make_tensor("i", i64, [2], [4, 4])
        ),
        helper.make_node(
            "Constant", [], ["block"], value=helper.make_tensor("b", i64, [2], [2, 2])
        ),
        helper.make_node("Col2Im", ["x", "image", "block"], ["folded"]),
        helper.make_node("Shape", ["folded"], ["shape"]),
    ]
    graph = helper.make_graph(
        nodes,
        "col2im_shape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 9])],
        [helper.make_tensor_value_info("shape", i64, [4])],
    )
    converted = convert(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert "Shape_3" in converted.input_shape_nodes
    (shape,) = converted.run([torch.randn(1, 8, 9)])
    assert shape.tolist() == [1, 2, 4, 4]


def test_a_remembered_shape_input_changed_in_place_is_read_again() -> None:
    memo = LastTensorMemo(lambda t: t.tolist())
    target = torch.tensor([2, 3])
    assert memo(target) == [2, 3]
    target[0] = 3  # same tensor, new version
    assert memo(target) == [3, 3]
    assert memo(torch.tensor([1, 6])) == [1, 6]
    weight = torch.ones(2, requires_grad=True)
    memo(weight)
    assert memo._last is None or memo._last[0] is not weight
