"""The dynamo exporter's optimizer merges equal initializers, folds `Transpose(weight)` into
`val_N` initializers and drops all-zero Gemm biases; the converter restores the source module's
parameters from the export's metadata (service/engine/onnx/source_parameters.py), so every
parameter of a `torch.onnx.export(..., dynamo=True)` file has its source name and shape and
reports its own gradient."""

from __future__ import annotations

import functools

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from service.engine.graph import ObservableGraph
from service.engine.onnx.conformance import check_conversion
from service.engine.onnx.convert import convert
from service.engine.onnx.source_parameters import FX_NODE_KEY
from tests.support.export import to_onnx


class Encoder(nn.Module):
    """`nn.TransformerEncoder` deep-copies its layer: both layers start as the same tensors,
    and LayerNorm weights (ones) and biases (zeros) are equal across layers too."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x))


class Tied(nn.Module):
    """Input and output embedding share one tensor: it must stay one parameter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.mid(self.emb(ids))), self.emb.weight)


X = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(1))


@functools.cache
def _exported(kind: str) -> tuple[nn.Module, bytes]:
    module: nn.Module = Encoder() if kind == "encoder" else Tied()
    example = X if kind == "encoder" else IDS
    # optimize=True: what `torch.onnx.export(..., dynamo=True)` does by default
    return module, to_onnx(module, example, dynamo=True, optimize=True)


def _gradients(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    module.zero_grad()
    module(x).square().mean().backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _graph_gradients(graph: ObservableGraph, x: torch.Tensor) -> dict[str, torch.Tensor]:
    graph.run([x])[0].square().mean().backward()
    return {n: p.grad for n, p in graph.named_graph_parameters() if p.grad is not None}


def test_the_optimizer_did_merge_fold_and_drop() -> None:
    """The premise: without the restore the file's initializers are not the module's."""
    module, exported = _exported("encoder")
    names = {i.name for i in onnx.load_from_string(exported).graph.initializer}
    source = {n for n, _ in module.named_parameters()}
    assert "enc.layers.1.norm1.weight" not in names  # merged into layer 0's
    assert any(name.startswith("val_") for name in names)  # folded transposes
    assert "enc.layers.0.self_attn.out_proj.bias" not in names  # zeros, dropped
    assert len(source - names) >= 10


def test_every_source_parameter_is_back_with_its_own_gradient() -> None:
    module, exported = _exported("encoder")
    graph = convert(onnx.load_from_string(exported))
    expected = _gradients(module, X)
    ours = _graph_gradients(graph, X)
    assert set(ours) == set(expected)
    for name, grad in expected.items():
        assert torch.allclose(ours[name], grad, rtol=2e-3, atol=1e-6), name
    notes = " ".join(graph.metadata["notes"])
    assert "merged parameters with identical values" in notes and "also stood for" in notes
    assert "= enc.layers.0.linear1.weightᵀ" in notes
    assert "enc.layers.0.self_attn.out_proj.bias" in notes


def test_onnxruntime_still_gets_the_folded_weights() -> None:
    _, exported = _exported("encoder")
    model = onnx.load_from_string(exported)
    graph = convert(model)  # releases the proto's weights: the check refills them
    assert graph.metadata["transposed_initializers"]
    check = check_conversion(model, graph, [X])
    assert check.checked and check.max_abs_error is not None
    assert check.max_abs_error < 1e-5, check


def test_tied_weights_stay_one_parameter() -> None:
    module, exported = _exported("tied")
    graph = convert(onnx.load_from_string(exported))
    names = [n for n, _ in graph.named_graph_parameters()]
    assert names.count("emb.weight") == 1
    expected = _gradients(module, IDS)
    ours = _graph_gradients(graph, IDS)
    assert torch.allclose(ours["emb.weight"], expected["emb.weight"], rtol=2e-3, atol=1e-7)
    assert "storing a transposed copy (emb.weight)" in " ".join(graph.metadata["notes"])


def test_without_the_exporters_metadata_nothing_is_invented() -> None:
    _, exported = _exported("encoder")
    model = onnx.load_from_string(exported)
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key != FX_NODE_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    graph = convert(model)
    names = {n for n, _ in graph.named_graph_parameters()}
    assert names == {i.name for i in model.graph.initializer} & names
    assert "enc.layers.1.norm1.weight" not in names
    assert "transposed_initializers" not in graph.metadata


class SlicedPositions(nn.Module):
    """`pos[:, :T]`: the optimizer computes the slice ahead into a constant of its own name."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pos = nn.Parameter(torch.randn(1, 6, 16) * 0.1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x + self.pos[:, : x.shape[1]])


def test_a_parameter_computed_ahead_by_the_optimizer_names_its_source() -> None:
    exported = to_onnx(SlicedPositions(), X[:, :6], dynamo=True, optimize=True)
    graph = convert(onnx.load_from_string(exported))
    names = {n for n, _ in graph.named_graph_parameters()}
    assert "pos" not in names  # what the file holds is the computed slice
    (note,) = [n for n in graph.metadata["notes"] if "computed some parameters ahead" in n]
    assert "from pos" in note and "optimize=False" in note


class GroupNormBlocks(nn.Module):
    """GroupNorm exports as InstanceNormalization then Mul/Add by its weight and bias, which
    the optimizer folds into [C, 1, 1] initializers, merged across layers (all ones/zeros)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.norm1, self.norm2 = nn.GroupNorm(2, 8), nn.GroupNorm(2, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(self.norm1(self.conv1(x)))
        return nn.functional.silu(self.norm2(self.conv2(h)))


IMAGES = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))


def test_a_folded_and_merged_normalisation_vector_is_each_layers_parameter_again() -> None:
    module = GroupNormBlocks()
    exported = to_onnx(module, IMAGES, dynamo=True, optimize=True)
    model = onnx.load_from_string(exported)
    assert any(i.name.startswith("val_") and len(i.dims) == 3 for i in model.graph.initializer)
    graph = convert(model)
    expected = _gradients(module, IMAGES)
    ours = _graph_gradients(graph, IMAGES)
    assert set(ours) == set(expected)
    for name, grad in expected.items():
        assert ours[name].shape == grad.shape, name
        assert torch.allclose(ours[name], grad, rtol=2e-3, atol=1e-6), name
    assert any("stored reshaped" in note for note in graph.metadata["notes"])
    check = check_conversion(model, graph, [IMAGES])  # weights released: refilled, reshaped
    assert check.checked and check.max_abs_error is not None and check.max_abs_error < 1e-5
