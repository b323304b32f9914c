"""`ObservableGraph.run` over its slot plan gives what a plain name → value interpreter gives,
observed or not, and notices every change made to the graph after the plan was made."""

from __future__ import annotations

import copy
import functools
import weakref
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from service.engine.graph import ConstantResult, Node, ObservableGraph, passthrough
from service.engine.onnx.convert import convert, load_onnx
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
        assert outputs[node.name][0] is node.fn.value  # type: ignore[union-attr]


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
    graph.nodes[1].inputs[1] = "x"  # b = a * x
    assert float(graph.run([torch.ones(3)])[0]) == 6.0
    graph.nodes[3].inputs = ["a"]
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
