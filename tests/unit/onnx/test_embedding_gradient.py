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
