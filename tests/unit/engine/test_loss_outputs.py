"""Which output the loss reads, said where the model has several; and the default loss chosen
from the output the model computes, not from a declared (possibly stale) output shape."""

from __future__ import annotations

import io

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from tests.support.export import to_torch_export
from tests.unit.engine.measure_support import npz_bytes


class ReconAndLogits(nn.Module):
    """An autoencoder with a classifier head: two outputs, reconstruction first."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 4)
        self.rec = nn.Linear(4, 6)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.enc(x))
        return self.rec(h), self.head(h)


def test_with_several_outputs_a_note_names_the_one_the_loss_reads() -> None:
    torch.manual_seed(0)
    x, target = torch.randn(8, 6), torch.arange(8) % 5
    report = diagnose(
        to_torch_export(ReconAndLogits(), x), npz_bytes(x=x, target=target), DiagnoseOptions()
    )
    (note,) = [n for n in report.notes if n.startswith("the loss (")]
    first, second = (spec.name for spec in report.model.outputs)
    assert f"first floating-point output, {first!r} [8, 6]" in note
    assert f"({second!r}) take no part in it" in note


def test_output_norm_reads_every_output_and_needs_no_such_note() -> None:
    x = torch.randn(8, 6)
    report = diagnose(to_torch_export(ReconAndLogits(), x), npz_bytes(x=x), DiagnoseOptions())
    assert report.loss.kind == "output_norm"
    assert not [n for n in report.notes if n.startswith("the loss (")]


WEIGHT = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)


def _stale_declaration() -> bytes:
    """x [B, T, 4] · W [4, 5], its output declared [B, 9, 5]: a length the file states but
    does not compute (a dynamic-shape dynamo export declared its example's length)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 9, 5])],
        [numpy_helper.from_array(WEIGHT, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    buffer = io.BytesIO()
    onnx.save(model, buffer)
    return buffer.getvalue()


def test_the_default_loss_follows_the_computed_output_not_a_stale_declared_shape() -> None:
    """Per-step labels [3, 4] for an output computed [3, 4, 5]: cross-entropy over the last
    axis (read from the declared [B, 9, 5], the labels fit no class axis: mse, which failed)."""
    x, target = torch.randn(3, 4, 4), torch.tensor([[0, 4, 2, 1]] * 3)
    report = diagnose(_stale_declaration(), npz_bytes(x=x, target=target), DiagnoseOptions())
    assert report.loss.kind == "cross_entropy"
    logits = x @ torch.from_numpy(WEIGHT)
    expected = torch.nn.functional.cross_entropy(logits.movedim(-1, 1), target)
    assert report.loss.value is not None and abs(report.loss.value - expected.item()) < 1e-5
