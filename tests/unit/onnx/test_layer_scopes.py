"""Dynamo ONNX exports name nodes `node_MatMul_13` and, with the exporter's default optimizer,
weights `val_97`; each node records its source module in `pkg.torch.onnx.name_scopes`. Layers
are named by module path from it (`Node.scope`) when their parameters' names are not source
names."""

from __future__ import annotations

import functools

import onnx
import pytest
import torch
from torch import nn

from service.engine.graph import ObservableGraph
from service.engine.layers import group_layers
from service.engine.onnx.convert import convert, module_scope
from tests.support.export import to_onnx


class Block(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 32), nn.GELU(), nn.Linear(32, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(x)


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.emb(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class TinyLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.LSTM(8, 12, batch_first=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0][:, -1])


@functools.cache
def _converted(kind: str) -> tuple[nn.Module, ObservableGraph]:
    module = TinyGPT() if kind == "gpt" else TinyLSTM()
    # optimize=True: what `torch.onnx.export(..., dynamo=True)` does by default
    exported = to_onnx(module, torch.randn(2, 5, 8), dynamo=True, optimize=True)
    return module, convert(onnx.load_from_string(exported))


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_every_layer_is_named_by_a_module_path(kind: str) -> None:
    module, graph = _converted(kind)
    modules = dict(module.named_modules())
    names = [layer.name for layer in group_layers(graph)]
    assert all(name.split("/")[0] in modules for name in names), names


def test_gpt_layers_are_the_blocks_modules() -> None:
    _, graph = _converted("gpt")
    names = {layer.name for layer in group_layers(graph)}
    expected = {"emb", "head"} | {
        f"blocks.{i}.{m}" for i in (0, 1) for m in ("ln", "attn.out_proj", "mlp.0", "mlp.2")
    }
    assert expected <= names, names
    # the optimizer's folded attention scales (`val_81`, one element) are no weights: no
    # extra layer `blocks.0.attn/node_Mul_71` around them
    assert not [name for name in names if "/" in name]
    assert all(p.numel() > 1 for _, p in graph.named_graph_parameters())


def test_lstm_layers_are_rnn_and_fc() -> None:
    _, graph = _converted("lstm")
    assert [layer.name for layer in group_layers(graph)] == ["rnn", "fc"]
    lstm = next(node for node in graph.nodes if node.op_type == "LSTM")
    assert lstm.scope == "rnn"


def test_module_scope_reads_the_innermost_module_path() -> None:
    node = onnx.helper.make_node("MatMul", ["a", "b"], ["c"])
    assert module_scope(node) is None
    entry = node.metadata_props.add()
    entry.key, entry.value = "pkg.torch.onnx.name_scopes", "['', 'blocks.0', 'blocks.0.attn', 'mm']"
    assert module_scope(node) == "blocks.0.attn"
    entry.value = "['', 'add']"
    assert module_scope(node) is None  # a top-level op


def test_module_scope_reads_a_legacy_exports_node_name() -> None:
    """The legacy exporter names nodes by module path: `/blocks.0/attn/MatMul`."""
    assert (
        module_scope(
            onnx.helper.make_node("MatMul", ["a", "b"], ["c"], name="/blocks.0/attn/MatMul")
        )
        == "blocks.0.attn"
    )
    assert (
        module_scope(onnx.helper.make_node("MatMul", ["a", "b"], ["c"], name="/MatMul_3")) is None
    )


def test_torch_export_nodes_carry_their_module_path() -> None:
    from service.engine.formats.torch_export import load_torch_export
    from tests.support.export import to_torch_export

    loaded = load_torch_export(to_torch_export(TinyGPT(), torch.randn(2, 5, 8)))
    assert loaded.graph is not None
    scopes = {node.scope for node in loaded.graph.nodes if node.op_type == "layer_norm"}
    assert scopes == {"blocks.0.ln", "blocks.1.ln"}
