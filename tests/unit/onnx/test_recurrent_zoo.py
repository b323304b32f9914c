"""The recurrent zoo (2-layer bidirectional LSTM, GRU, tanh RNN; batch_first; initial states)
through both exporters and the converter: forward equals onnxruntime, and for the legacy
training-mode export every parameter's gradient (and the input's, per time step) equals the
torch module's.

How parameter names come out:
- legacy exporter (`dynamo=False`, TRAINING, no constant folding): the module's own tensors stay
  initializers under their torch names (`rnn.weight_ih_l0`, `rnn.bias_hh_l1_reverse`, ...); the
  graph slices and concatenates them into the W/R/B inputs of the LSTM/GRU/RNN nodes, so the
  gradients reach them by name.
- dynamo exporter: the packed W/R/B are precomputed into new initializers (`val_97` of shape
  [2, 4·hidden, input] = both directions of `weight_ih_l0`, in ONNX gate order), and Linear
  weights are stored transposed; only names that survive unchanged (e.g. `head.bias`) can be
  reported as in the source model. The tanh RNN is unrolled into MatMul/Tanh nodes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from service.engine.onnx.convert import convert
from service.engine.onnx.ops.recurrent import SequenceAxes, sequence_axes
from tests.support.export import to_onnx, to_torch_export
from tests.support.recurrent_zoo import (
    RECURRENT_ZOO,
    ProjectedGruNet,
    ZooEntry,
    run_onnxruntime,
)


def _exported(
    entry: ZooEntry, dynamo: bool, opset: int | None = None
) -> tuple[torch.nn.Module, onnx.ModelProto]:
    torch.manual_seed(0)
    module = entry.make()
    return module, onnx.load_from_string(
        to_onnx(module, entry.example(), dynamo=dynamo, opset=opset, training=True)
    )


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    initializers = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


@pytest.mark.parametrize(
    "dynamo",
    # the dynamo exporter takes 1.5-5 s per model
    [False, pytest.param(True, marks=pytest.mark.slow)],
    ids=["legacy", "dynamo"],
)
@pytest.mark.parametrize("entry", RECURRENT_ZOO, ids=lambda e: e.name)
def test_forward_equals_onnxruntime(entry: ZooEntry, dynamo: bool) -> None:
    _, model = _exported(entry, dynamo)
    example = entry.example()
    feeds = {n: t.numpy() for n, t in zip(_graph_inputs(model), example, strict=True)}
    (expected,) = run_onnxruntime(model, feeds)
    graph = convert(model, mode="train")
    with torch.no_grad():
        got = graph(*example)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("opset", [None, 9], ids=["default_opset", "opset9"])
@pytest.mark.parametrize("entry", RECURRENT_ZOO, ids=lambda e: e.name)
def test_legacy_training_export_gradients_equal_torch(entry: ZooEntry, opset: int | None) -> None:
    module, model = _exported(entry, dynamo=False, opset=opset)
    assert opset is None or model.opset_import[0].version == opset
    example = entry.example()
    # the same forward as onnxruntime's, then the same gradients as torch's
    feeds = {n: t.numpy() for n, t in zip(_graph_inputs(model), example, strict=True)}
    (expected,) = run_onnxruntime(model, feeds)
    graph = convert(model, mode="train")  # releases the proto's copy of the weights
    with torch.no_grad():
        np.testing.assert_allclose(graph(*example).numpy(), expected, rtol=1e-4, atol=1e-6)
    weights = torch.randn(2, 5, 2, generator=torch.Generator().manual_seed(1))

    x_torch = example[0].clone().requires_grad_(True)
    (module(x_torch, *example[1:]) * weights).sum().backward()
    x_graph = example[0].clone().requires_grad_(True)
    (graph(x_graph, *example[1:]) * weights).sum().backward()

    torch_parameters = dict(module.named_parameters())
    converted = dict(graph.named_graph_parameters())
    assert set(torch_parameters) <= set(converted), "every torch parameter keeps its name"
    for name, parameter in torch_parameters.items():
        assert parameter.grad is not None and converted[name].grad is not None, name
        torch.testing.assert_close(converted[name].grad, parameter.grad, rtol=2e-3, atol=1e-6)
    # the gradient per time step of the input: what the time profile is made of
    torch.testing.assert_close(x_graph.grad, x_torch.grad, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("entry", RECURRENT_ZOO, ids=lambda e: e.name)
def test_sequence_axes_of_batch_first_zoo_inputs(entry: ZooEntry) -> None:
    _, model = _exported(entry, dynamo=False)
    graph = convert(model)
    # the data input is batch-first; the initial states are not sequences
    assert sequence_axes(graph) == {graph.input_names[0]: SequenceAxes(batch=0, time=1)}


@pytest.mark.parametrize(
    "dynamo", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["legacy", "dynamo"]
)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_sequence_axes_follow_the_layout_through_projection_and_transpose(
    batch_first: bool, dynamo: bool
) -> None:
    torch.manual_seed(0)
    model = onnx.load_from_string(
        to_onnx(ProjectedGruNet(batch_first), torch.randn(2, 5, 3), dynamo=dynamo)
    )
    graph = convert(model)
    expected = SequenceAxes(batch=0, time=1) if batch_first else SequenceAxes(batch=1, time=0)
    assert sequence_axes(graph) == {graph.input_names[0]: expected}


@pytest.mark.parametrize("cls", [torch.nn.RNN, torch.nn.LSTM, torch.nn.GRU])
def test_torch_export_of_recurrent_modules_raises_no_warning(cls: type[torch.nn.Module]) -> None:
    # pytest turns warnings into errors: torch.export's note about nn.RNN's `_flat_weights`
    # would fail every test that exports a recurrent model as a torch.export program
    data = to_torch_export(cls(3, 4, batch_first=True), torch.randn(2, 5, 3))
    assert data
