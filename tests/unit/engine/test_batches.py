"""Batch files (CONTRACT.md §2): formats from content, input matching, targets, every error."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_save
from torch import nn

from service.engine import diagnose
from service.engine.batches import TARGET_NAMES, load_batch, match_batch
from service.engine.options import DiagnoseOptions
from service.engine.report import TensorSpec
from service.errors import BatchError
from tests.support.export import to_torch_export
from tests.unit.engine.measure_support import npz_bytes

SPECS = [
    TensorSpec(name="image", shape=["batch", 3], dtype="float32"),
    TensorSpec(name="mask", shape=[None, 2], dtype="int64"),
]


def _pt(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _arrays() -> dict[str, torch.Tensor]:
    return {"image": torch.randn(4, 3), "mask": torch.ones(4, 2, dtype=torch.int64)}


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "pt"])
def test_each_format_loads_with_names_and_order(fmt: str) -> None:
    arrays = _arrays()
    data = {
        "npz": lambda: npz_bytes(**arrays),
        "safetensors": lambda: safetensors_save(arrays),
        "pt": lambda: _pt(arrays),
    }[fmt]()
    batch = load_batch(data)
    assert batch.format == fmt
    # safetensors writers lay data out by dtype then name (int64 before float32): that is its
    # file order; npz and .pt keep the order the arrays were saved in
    assert list(batch.arrays) == (["mask", "image"] if fmt == "safetensors" else ["image", "mask"])
    for name, tensor in arrays.items():
        assert torch.equal(batch.arrays[name], tensor)


def test_arrays_named_like_inputs_feed_them_whatever_the_file_order() -> None:
    arrays = _arrays()
    data = npz_bytes(mask=arrays["mask"], image=arrays["image"])  # reversed order
    matched = match_batch(load_batch(data), SPECS)
    assert torch.equal(matched.inputs[0], arrays["image"])
    assert torch.equal(matched.inputs[1], arrays["mask"])
    assert [a.feeds for a in matched.info.arrays] == ["image", "mask"]
    assert matched.info.size == 4


def test_unnamed_arrays_feed_inputs_in_file_order() -> None:
    arrays = _arrays()
    matched = match_batch(load_batch(npz_bytes(a=arrays["image"], b=arrays["mask"])), SPECS)
    assert torch.equal(matched.inputs[0], arrays["image"])
    assert [(a.name, a.feeds) for a in matched.info.arrays] == [("a", "image"), ("b", "mask")]


@pytest.mark.parametrize("target_name", TARGET_NAMES)
def test_target_names_are_never_inputs(target_name: str) -> None:
    arrays = _arrays()
    target = torch.tensor([0, 1, 2, 1])
    data = npz_bytes(**{target_name: target}, **arrays)  # the target first in the file
    matched = match_batch(load_batch(data), SPECS)
    assert matched.target is not None and torch.equal(matched.target, target)
    assert torch.equal(matched.inputs[0], arrays["image"])
    roles = {a.name: a.role for a in matched.info.arrays}
    assert roles[target_name] == "target"


def test_a_model_input_named_like_a_target_takes_that_array() -> None:
    """A model that computes its own loss takes `labels` as an input (Hugging Face's
    `model(input_ids, labels=labels).loss`): the array feeds it and there is no target."""
    specs = [
        TensorSpec(name="input_ids", shape=["batch", 6], dtype="int64"),
        TensorSpec(name="labels", shape=["batch", 6], dtype="int64"),
    ]
    ids = torch.randint(0, 9, (4, 6))
    labels = torch.randint(0, 9, (4, 6))
    matched = match_batch(load_batch(npz_bytes(input_ids=ids, labels=labels)), specs)
    assert matched.target is None
    assert torch.equal(matched.inputs[1], labels)
    assert {a.name: a.role for a in matched.info.arrays}["labels"] != "target"


def test_float_arrays_are_cast_to_the_declared_float_dtype() -> None:
    specs = [TensorSpec(name="x", shape=[2, 3], dtype="float16")]
    matched = match_batch(load_batch(npz_bytes(x=np.zeros((2, 3), np.float32))), specs)
    assert matched.inputs[0].dtype == torch.float16


def test_an_optional_tensor_input_is_fed_and_checked_as_its_element() -> None:
    specs = [TensorSpec(name="x", shape=[2, 3], dtype="optional(float32)")]
    matched = match_batch(load_batch(npz_bytes(x=np.zeros((2, 3), np.float64))), specs)
    assert matched.inputs[0].dtype == torch.float32
    with pytest.raises(
        BatchError,
        match=r"optional\(float32\) but the batch gives int64; convert that array to float32$",
    ):
        match_batch(load_batch(npz_bytes(x=np.zeros((2, 3), np.int64))), specs)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"not a batch at all", "not .npz"),
        (b"PK\x03\x04garbage", "damaged zip"),
    ],
)
def test_unreadable_files(data: bytes, message: str) -> None:
    with pytest.raises(BatchError, match=message):
        load_batch(data)


def test_npz_with_object_arrays_is_refused_without_unpickling() -> None:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(BatchError, match="no pickle"):
        load_batch(buffer.getvalue())


def test_pt_with_arbitrary_objects_is_refused_by_weights_only() -> None:
    import datetime  # any class outside torch's weights_only allow-list

    with pytest.raises(BatchError, match="weights_only"):
        load_batch(_pt({"x": datetime.date(2020, 1, 1)}))


def test_pt_entries_must_be_tensors() -> None:
    with pytest.raises(BatchError, match=r"'x' of the \.pt batch is a int"):
        load_batch(_pt({"x": 3}))


def test_missing_input_is_named() -> None:
    with pytest.raises(BatchError, match="add arrays named mask"):
        match_batch(load_batch(npz_bytes(image=torch.randn(4, 3))), SPECS)


def test_extra_arrays_are_an_error_when_not_named_like_inputs() -> None:
    data = npz_bytes(a=torch.randn(4, 3), b=torch.ones(4, 2), c=torch.ones(4))
    with pytest.raises(BatchError, match="3 input arrays"):
        match_batch(load_batch(data), SPECS)


def test_wrong_shape_names_the_input_and_the_shapes() -> None:
    arrays = _arrays() | {"image": torch.randn(4, 5)}
    with pytest.raises(BatchError, match=r"input 'image' expects shape \[batch, 3\].*\[4, 5\]"):
        match_batch(load_batch(npz_bytes(**arrays)), SPECS)


def test_wrong_rank_names_the_input() -> None:
    arrays = _arrays() | {"mask": torch.ones(4, dtype=torch.int64)}
    with pytest.raises(BatchError, match="input 'mask' expects shape"):
        match_batch(load_batch(npz_bytes(**arrays)), SPECS)


def test_wrong_dtype_kind_names_the_input() -> None:
    arrays = _arrays() | {"mask": torch.ones(4, 2)}
    with pytest.raises(BatchError, match="input 'mask' expects int64 but the batch gives float32"):
        match_batch(load_batch(npz_bytes(**arrays)), SPECS)


class TimestepEmbedding(nn.Module):
    """A diffusion model's integer timesteps, cast to float for their sinusoidal embedding
    (torch.export asserts the traced dtype where it casts)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.arange(8, dtype=torch.float32) / 8
        return self.fc(torch.sin(t[:, None].float() * freqs))


def test_int32_timesteps_feed_an_int64_input_of_a_pt2() -> None:
    """int32 values for an int64 input failed at `_assert_tensor_metadata` in a .pt2, where
    ONNX and TorchScript read them."""
    t = torch.arange(4) * 100
    model, target = to_torch_export(TimestepEmbedding(), t), np.arange(4) % 3
    wide = diagnose(model, npz_bytes(t=t, target=target), DiagnoseOptions())
    narrow = diagnose(model, npz_bytes(t=t.int(), target=target), DiagnoseOptions())
    assert narrow.loss.value == wide.loss.value
    assert [p.grad_norm for p in narrow.parameters] == [p.grad_norm for p in wide.parameters]
    with pytest.raises(BatchError, match="values do not fit it"):  # uint8 ← 300
        match_batch(
            load_batch(npz_bytes(t=torch.tensor([300]))),
            [TensorSpec(name="t", shape=[1], dtype="uint8")],
        )
