"""An nn.Embedding's padding_idx and scale_grad_by_freq change its weight's gradient, not its
lookup: ONNX's Gather cannot say so, the dynamo exporter's node metadata does (ops/indexing.py
embedding_gradient). Converted gradients equal the source module's."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from service.engine.onnx.convert import convert
from tests.support.export import to_onnx


class Tagger(nn.Module):
    def __init__(self, **embedding: object) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8, **embedding)  # type: ignore[arg-type]
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))


def _ids() -> torch.Tensor:
    ids = torch.randint(1, 10, (6, 5), generator=torch.Generator().manual_seed(1))
    ids[:, -2:] = 0  # padding
    ids[0, :3] = 4  # a repeated token (scale_grad_by_freq)
    return ids


@pytest.mark.parametrize("optimize", [True, False])
@pytest.mark.parametrize(
    "embedding",
    [
        {"padding_idx": 0},
        {"scale_grad_by_freq": True},
        {"padding_idx": 0, "scale_grad_by_freq": True},
        {},
    ],
)
def test_an_embeddings_gradient_equals_torchs(optimize: bool, embedding: dict[str, object]) -> None:
    torch.manual_seed(0)
    module, ids = Tagger(**embedding), _ids()
    graph = convert(onnx.load_from_string(to_onnx(module, ids, dynamo=True, optimize=optimize)))
    module(ids).square().mean().backward()
    graph(ids).square().mean().backward()
    got = dict(graph.named_graph_parameters())["emb.weight"].grad
    assert module.emb.weight.grad is not None and got is not None
    torch.testing.assert_close(got, module.emb.weight.grad, rtol=1e-6, atol=1e-8)
    if "padding_idx" in embedding:
        assert torch.count_nonzero(got[0]) == 0


def test_a_legacy_exports_padding_row_is_read_off_the_weight() -> None:
    """The legacy exporter drops padding_idx; the weight's one all-zero row tells it (and a
    note says so)."""
    torch.manual_seed(0)
    module, ids = Tagger(padding_idx=0), _ids()
    graph = convert(onnx.load_from_string(to_onnx(module, ids, input_names=["ids"])))
    module(ids).square().mean().backward()
    graph(ids).square().mean().backward()
    got = dict(graph.named_graph_parameters())["emb.weight"].grad
    assert module.emb.weight.grad is not None and got is not None
    torch.testing.assert_close(got, module.emb.weight.grad, rtol=1e-6, atol=1e-8)
    (note,) = [n for n in graph.metadata.get("notes", []) if "padding_idx" in n]
    assert note.startswith("emb.weight's row 0 is all zeros")


@pytest.mark.parametrize("zero_rows", [0, 2])
def test_without_exactly_one_zero_row_every_row_gets_its_gradient(zero_rows: int) -> None:
    torch.manual_seed(0)
    module, ids = Tagger(), _ids()
    with torch.no_grad():
        module.emb.weight[:zero_rows] = 0.0
    graph = convert(onnx.load_from_string(to_onnx(module, ids, input_names=["ids"])))
    graph(ids).square().mean().backward()
    got = dict(graph.named_graph_parameters())["emb.weight"].grad
    assert got is not None and torch.count_nonzero(got[0]) > 0
    assert not [n for n in graph.metadata.get("notes", []) if "padding_idx" in n]
