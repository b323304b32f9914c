"""Recurrent models for the converter tests, and single-node ONNX helpers.

- `single_node_model` / `run_onnxruntime` / `build_node_fn`: test one op builder against
  onnxruntime without the converter core (a one-node model whose every input is a graph input).
- `RECURRENT_ZOO`: 2-layer bidirectional LSTM, GRU and tanh RNN (batch_first, initial states),
  the shapes the exporters must get through.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper
from torch import nn

from service.engine.onnx import ops  # noqa: F401  (registers the builders)
from service.engine.onnx.ops.recurrent import RecurrentFn
from service.engine.onnx.registry import OpContext, lookup


def single_node_model(
    node: onnx.NodeProto,
    inputs: Sequence[np.ndarray | None],
    *,
    opset: int,
    num_outputs: int | None = None,
    extra_opsets: dict[str, int] | None = None,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A model holding `node` alone; returns it with the feeds for its non-omitted inputs.
    `node.input` names must match `inputs` positionally ("" for None)."""
    feeds = {}
    graph_inputs = []
    for name, value in zip(node.input, inputs, strict=True):
        if not name:
            continue
        assert value is not None
        feeds[name] = value
        graph_inputs.append(
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)
            )
        )
    outputs = [
        helper.make_empty_tensor_value_info(name)
        for name in list(node.output)[: num_outputs or len(node.output)]
        if name
    ]
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    graph = helper.make_graph([node], "single", graph_inputs, outputs)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = min(model.ir_version, 10)  # what the installed onnxruntime reads
    return model, feeds


def run_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return list(session.run(None, feeds))


def node_context(node: onnx.NodeProto, opset: int, mode: str = "train") -> OpContext:
    attrs: dict[str, Any] = {}
    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        attrs[attribute.name] = value
    return OpContext(
        node=node,
        op_type=node.op_type,
        domain=node.domain,
        opset=opset,
        attrs=attrs,
        num_inputs=len(node.input),
        num_outputs=len(node.output),
        mode=mode,
    )


def build_node_fn(node: onnx.NodeProto, opset: int) -> Callable[..., Any]:
    builder = lookup(node.op_type, node.domain, opset)
    assert builder is not None, f"no builder for {node.domain}::{node.op_type}-{opset}"
    return builder(node_context(node, opset))


def call_recurrent(
    fn: RecurrentFn, tensors: Sequence[torch.Tensor | None]
) -> torch.Tensor | tuple[torch.Tensor | None, ...]:
    """`fn(*tensors)` for a recurrent node's ONNX inputs in order; X, W and R are never
    optional there (spelled out so that mypy can match them to RecurrentFn's parameters)."""
    X, W, R, *optional = tensors
    assert X is not None and W is not None and R is not None
    return fn(X, W, R, *optional)


def as_outputs(result: Any, count: int) -> list[Any]:
    """A NodeFn returns the value itself for one output, else a tuple (graph.Node's contract)."""
    return [result] if count == 1 else list(result)


# --- the zoo: torch modules the exporters turn into RNN/GRU/LSTM nodes ---------------------------


class LstmNet(nn.Module):
    """2-layer bidirectional LSTM, batch_first, initial states given as inputs."""

    def __init__(self, input_size: int = 3, hidden: int = 4) -> None:
        super().__init__()
        self.rnn = nn.LSTM(input_size, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, 2)

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x, (h0, c0))
        return self.head(y)


class GruNet(nn.Module):
    def __init__(self, input_size: int = 3, hidden: int = 4) -> None:
        super().__init__()
        self.rnn = nn.GRU(input_size, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, 2)

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x, h0)
        return self.head(y)


class TanhRnnNet(nn.Module):
    def __init__(self, input_size: int = 3, hidden: int = 4) -> None:
        super().__init__()
        self.rnn = nn.RNN(
            input_size,
            hidden,
            num_layers=2,
            bidirectional=True,
            batch_first=True,
            nonlinearity="tanh",
        )
        self.head = nn.Linear(2 * hidden, 2)

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x, h0)
        return self.head(y)


class ProjectedGruNet(nn.Module):
    """Linear → ReLU → GRU, batch-first or sequence-first: the two input layouts exporters meet."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.rnn = nn.GRU(3, 4, batch_first=batch_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(torch.relu(self.proj(x)))[0]


@dataclass
class ZooEntry:
    name: str
    make: Callable[[], nn.Module]
    example: Callable[[], tuple[torch.Tensor, ...]]


def _inputs(with_cell: bool, batch: int = 2, steps: int = 5) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(batch, steps, 3, generator=generator)
    h0 = torch.randn(4, batch, 4, generator=generator) * 0.5
    if not with_cell:
        return x, h0
    return x, h0, torch.randn(4, batch, 4, generator=generator) * 0.5


RECURRENT_ZOO = [
    ZooEntry("lstm", LstmNet, lambda: _inputs(True)),
    ZooEntry("gru", GruNet, lambda: _inputs(False)),
    ZooEntry("rnn_tanh", TanhRnnNet, lambda: _inputs(False)),
]


def lstm_sequence_args(
    steps: int, batch: int, inputs: int, hidden: int, dtype: torch.dtype, seed: int = 0
) -> list[torch.Tensor]:
    """Leaf tensors for `lstm_sequence(X, W, R, bias, h0, c0)` (ONNX gate order), all
    requiring grad: X [T, B, I], W [4H, I], R [4H, H], bias [4H], h0 and c0 [B, H]."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(True)

    return [
        normal(steps, batch, inputs),
        normal(4 * hidden, inputs, scale=0.5),
        normal(4 * hidden, hidden, scale=0.5),
        normal(4 * hidden, scale=0.3),
        normal(batch, hidden),
        normal(batch, hidden),
    ]


def check_against_references(
    module: torch.nn.Module, data: bytes, x: torch.Tensor, rtol: float = 2e-4
) -> None:
    """The ONNX export `data` of `module`, converted in train mode: its forward equals
    onnxruntime's on `x` (fed as the graph's first input) and every parameter's gradient of a
    squared-sum loss equals the module's. (`convert` releases the initializers' bytes of the
    ModelProto it reads: onnxruntime gets its own copy, loaded from the same bytes.)"""
    from service.engine.onnx.convert import convert, load_onnx

    graph = convert(load_onnx(data), mode="train")
    out = graph(x)
    reference_model = load_onnx(data)
    (expected,) = run_onnxruntime(reference_model, {reference_model.graph.input[0].name: x.numpy()})
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    module.zero_grad()
    module(x).square().sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None
        torch.testing.assert_close(graph.parameter(name).grad, param.grad, rtol=rtol, atol=1e-6)
