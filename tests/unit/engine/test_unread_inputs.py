"""An input the exported program never reads gets a note. The case that matters: torch.export
(and the dynamo ONNX exporter, which runs it) makes one tensor passed as two arguments one
input, so `model(input_ids, labels=input_ids)`, Hugging Face's causal-LM idiom, exports a
program that embeds `labels` and ignores `input_ids`."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from tests.support.export import to_onnx, to_torch_export


class TinyCausalLM(nn.Module):
    """Embeds input_ids, predicts each next token; computes its own loss from labels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 8)
        self.head = nn.Linear(8, 11)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.tanh(self.embed(input_ids)))
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def _export(fmt: str, ids: torch.Tensor) -> bytes:
    model = TinyCausalLM()
    if fmt == "pt2":
        return to_torch_export(model, (ids, ids))  # one tensor for both, as in HF examples
    return to_onnx(model, (ids, ids), dynamo=True)


def _batch(input_ids: np.ndarray, labels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, input_ids=input_ids, labels=labels)
    return buffer.getvalue()


IDS = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fmt", ["pt2", "dynamo"])
def test_an_input_merged_with_its_twin_at_export_is_named_with_the_consequence(fmt: str) -> None:
    model = _export(fmt, IDS)
    ids = IDS.numpy()
    same = diagnose(model, _batch(ids, ids), DiagnoseOptions.model_validate({}))
    (note,) = [n for n in same.notes if "does not read its input 'input_ids'" in n]
    assert "reads 'labels' (same shape and dtype) probably in its place" in note
    assert "this diagnosis is unaffected" in note
    assert "labels=input_ids.clone()" in note

    masked = ids.copy()
    masked[:, :2] = 0  # labels that differ from the ids (a masked prefix, say)
    differs = diagnose(model, _batch(ids, masked), DiagnoseOptions.model_validate({}))
    (note,) = [n for n in differs.notes if "does not read its input 'input_ids'" in n]
    assert "the model here reads 'labels' where yours reads 'input_ids'" in note


def test_separate_tensors_at_export_leave_no_note() -> None:
    model = to_torch_export(TinyCausalLM(), (IDS, IDS.clone()))
    ids = IDS.numpy()
    report = diagnose(model, _batch(ids, ids), DiagnoseOptions.model_validate({}))
    assert not [n for n in report.notes if "does not read its input" in n]


class IgnoresItsMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_an_input_nothing_reads_is_said_to_be_ignored() -> None:
    x, mask = torch.randn(5, 4), torch.ones(5, 7)
    buffer = io.BytesIO()
    np.savez(buffer, x=x.numpy(), mask=mask.numpy(), target=np.array([0, 1, 0, 1, 1]))
    report = diagnose(
        to_torch_export(IgnoresItsMask(), (x, mask)),
        buffer.getvalue(),
        DiagnoseOptions.model_validate({}),
    )
    (note,) = [n for n in report.notes if "does not read its input" in n]
    assert note.startswith("the model does not read its input 'mask': the exported graph")
