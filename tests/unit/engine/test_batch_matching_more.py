"""Matching batch arrays to model inputs beyond the all-named / all-in-order cases: some arrays
named like inputs and some not, a .pt2 dict argument's entries named by their keys, TorchScript
inputs with defaults left out of the batch; and TorchScript's outputs in the report."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_save
from torch import nn

from service.engine import diagnose
from service.engine.batches import load_batch, match_batch
from service.engine.options import DiagnoseOptions
from service.engine.report import TensorSpec
from service.engine.subject import build_subject
from service.errors import BatchError
from tests.support.export import to_torch_export
from tests.unit.engine.measure_support import npz_bytes

NO_VERIFY = DiagnoseOptions(device="cpu", verify_fixes=False)


def _pt(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _scripted(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


# --- some arrays named like inputs, some not ---------------------------------------------------

XW = [
    TensorSpec(name="x", shape=["batch", 4], dtype="float32"),
    TensorSpec(name="w", shape=["batch", 4], dtype="float32"),
]


def test_an_array_named_like_an_input_feeds_it_when_another_is_not_named() -> None:
    """`weights` (no input's name) came first in the file and `x` second: all inputs went to
    file order, `x` feeding `w`, without a word."""
    x, w = torch.randn(6, 4), torch.rand(6, 4)
    matched = match_batch(load_batch(npz_bytes(weights=w, x=x)), XW)
    assert torch.equal(matched.inputs[0], x) and torch.equal(matched.inputs[1], w)
    assert [(a.name, a.feeds) for a in matched.info.arrays] == [("x", "x"), ("weights", "w")]
    (note,) = matched.notes
    assert "file order: weights → w" in note


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.o = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.a(x))) * w[:, :3]


def test_partly_named_batch_gives_the_plain_autograd_loss() -> None:
    model = Gated()
    x, w, y = torch.randn(6, 4) * 3, torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    truth = F.cross_entropy(model(x, w), y).item()
    report = diagnose(
        to_torch_export(model, (x, w)), npz_bytes(weights=w, x=x, target=y), NO_VERIFY
    )
    assert report.loss.value == pytest.approx(truth, rel=1e-5)
    assert any("weights → w" in n for n in report.notes)


MIXED = [
    TensorSpec(name="image", shape=["batch", 3], dtype="float32"),
    TensorSpec(name="mask", shape=[None, 2], dtype="int64"),
]


def test_an_impossible_order_assignment_names_the_arrays_to_rename() -> None:
    data = npz_bytes(m=torch.ones(4, 2, dtype=torch.int64), img=torch.randn(4, 3))
    with pytest.raises(BatchError) as raised:
        match_batch(load_batch(data), MIXED)
    message = str(raised.value)
    assert "input 'image' expects float32 but the batch gives int64" in message
    assert "array 'm' fed input 'image' by its place in the file" in message
    assert message.endswith("name the arrays after the inputs they feed: image, mask)")


def test_more_unnamed_arrays_than_unnamed_inputs_is_an_error_naming_both() -> None:
    data = npz_bytes(x=torch.randn(4, 4), a=torch.randn(4, 4), b=torch.randn(4, 4))
    with pytest.raises(
        BatchError, match=r"other 2 \(a, b\) are more than the 1 input\(s\) left \(w\)"
    ):
        match_batch(load_batch(data), XW)


# --- a .pt2 dict argument ----------------------------------------------------------------------


DictCase = tuple[bytes, torch.Tensor, torch.Tensor, torch.Tensor, float]


def _export(module: nn.Module, *args: dict[str, torch.Tensor]) -> bytes:
    """A .pt2 of a model taking dicts (tests.support.export takes tensors only)."""
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(module, args), buffer)
    return buffer.getvalue()


class DictIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.o = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, d: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.o(torch.relu(self.a(d["x"]) + 5 * self.b(d["z"])))


@pytest.fixture(scope="module")
def dict_case() -> DictCase:
    model = DictIn()
    x, z, y = torch.randn(4, 3), torch.randn(4, 3) * 10, torch.tensor([0, 1, 1, 0])
    truth = F.cross_entropy(model({"x": x, "z": z}), y).item()
    return _export(model, {"x": x, "z": z}), x, z, y, truth


@pytest.mark.parametrize(
    "batch",
    [
        lambda x, z, y: npz_bytes(z=z, x=x, target=y),  # the keys the user wrote, z first
        lambda x, z, y: safetensors_save({"d.z": z, "d.x": x, "target": y}),
        lambda x, z, y: npz_bytes(**{"d/z": z, "d/x": x, "target": y}),
        lambda x, z, y: _pt({"d": {"z": z, "x": x}, "target": y}),  # nested, flattened
    ],
    ids=["keys", "dotted", "slashed", "nested_pt"],
)
def test_dict_entries_are_fed_by_their_keys(
    dict_case: DictCase, batch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bytes]
) -> None:
    model, x, z, y, truth = dict_case
    report = diagnose(model, batch(x, z, y), NO_VERIFY)
    assert [i.name for i in report.model.inputs] == ["d_x", "d_z"]
    assert {a.feeds: a.name.replace("/", ".") for a in report.batch.arrays if a.feeds} in (
        {"d_x": "x", "d_z": "z"},
        {"d_x": "d.x", "d_z": "d.z"},
    )
    assert report.loss.value == pytest.approx(truth, rel=1e-5)


def test_a_missing_dict_entry_is_asked_for_by_its_key(dict_case: DictCase) -> None:
    model, x, _, y, _ = dict_case
    with pytest.raises(BatchError, match=r"add arrays named d_z \(or z, d\.z, d/z\)$"):
        diagnose(model, npz_bytes(x=x, target=y), NO_VERIFY)


class TwoDicts(nn.Module):
    def forward(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        return a["x"] - b["x"]


def test_a_key_two_dict_arguments_share_needs_the_argument_name() -> None:
    from service.engine.formats.torch_export import load_torch_export

    ones, twos = torch.ones(2, 3), torch.full((2, 3), 2.0)
    loaded = load_torch_export(_export(TwoDicts(), {"x": ones}, {"x": ones}))
    arrays = load_batch(npz_bytes(**{"b.x": twos, "a.x": ones}))
    matched = match_batch(arrays, loaded.inputs, aliases=loaded.input_aliases)
    assert torch.equal(matched.inputs[0], ones) and torch.equal(matched.inputs[1], twos)
    # `x` alone could be either: it is no alias of both, and file order decides (with a note)
    matched = match_batch(
        load_batch(npz_bytes(x=ones, y2=twos)), loaded.inputs, aliases=loaded.input_aliases
    )
    assert [a.feeds for a in matched.info.arrays] == ["a_x", "b_x"] and matched.notes


# --- TorchScript inputs with defaults --------------------------------------------------------


class OptionalBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.o = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:  # noqa: UP045 (TorchScript)
        h = self.a(x)
        if bias is not None:
            h = h + bias
        return self.o(torch.relu(h))


def test_a_torchscript_input_with_a_default_may_be_left_out() -> None:
    model = OptionalBias()
    x, bias, y = torch.randn(4, 3), torch.randn(4, 4), torch.tensor([0, 1, 1, 0])
    data = _scripted(model)
    report = diagnose(data, npz_bytes(x=x, target=y), NO_VERIFY)
    assert report.loss.value == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)
    assert [i.name for i in report.model.inputs] == ["x"]
    assert any("bias have a default" in n for n in report.notes)
    assert report.model.probe_coverage == "parameters_only"
    assert "left to their defaults" in (report.model.probe_coverage_reason or "")
    fed = diagnose(data, npz_bytes(x=x, bias=bias, target=y), NO_VERIFY)  # named: it is fed
    assert fed.loss.value == pytest.approx(F.cross_entropy(model(x, bias), y).item(), rel=1e-5)
    assert [i.name for i in fed.model.inputs] == ["x", "bias"]


def test_a_left_out_input_before_a_fed_one_is_refused() -> None:
    specs = [TensorSpec(name=n, shape=[], dtype="tensor") for n in ("x", "bias", "scale")]
    data = npz_bytes(x=np.zeros((2, 3), np.float32), scale=np.ones((2, 3), np.float32))
    with pytest.raises(BatchError, match="bias have no batch array but inputs after them do"):
        match_batch(load_batch(data), specs, optional={"bias", "scale"})
    matched = match_batch(load_batch(npz_bytes(x=np.zeros(2))), specs, optional={"bias", "scale"})
    assert [s.name for s in matched.specs] == ["x"]


# --- TorchScript outputs ---------------------------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.a(x), "aux": self.b(x).double()}


def test_torchscript_outputs_are_reported_from_the_first_forward() -> None:
    x = torch.randn(4, 3)
    single = build_subject(_scripted(OptionalBias()), npz_bytes(x=x), NO_VERIFY)
    assert [o.model_dump() for o in single.model_info.outputs] == [
        {"name": "output", "shape": [4, 2], "dtype": "float32"}
    ]
    heads = build_subject(_scripted(TwoHeads()), npz_bytes(x=x), NO_VERIFY)
    assert [(o.name, o.shape, o.dtype) for o in heads.model_info.outputs] == [
        ("logits", [4, 2], "float32"),
        ("aux", [4, 5], "float64"),
    ]
