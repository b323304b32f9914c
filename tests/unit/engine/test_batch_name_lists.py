"""A .pt batch holding hundreds of arrays: messages name the first few and count the rest,
instead of one stderr line listing every name (~800 characters before)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from typer.testing import CliRunner

import service.cli.diagnose  # noqa: F401  (registers the command)
from service.cli import app
from service.engine.batches import shown_names
from tests.support.export import to_torch_export

NAMES = [f"encoder.layer.{i}.attention.output.dense" for i in range(60)]


def _files(tmp_path: Path, arrays: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model, batch = tmp_path / "model.pt2", tmp_path / "batch.pt"
    model.write_bytes(to_torch_export(nn.Linear(4, 2), torch.randn(3, 4)))
    torch.save(arrays, batch)
    return model, batch


def test_too_many_arrays_error_is_one_short_line(tmp_path: Path) -> None:
    model, batch = _files(tmp_path, {n: torch.randn(3, 4) for n in NAMES})
    result = CliRunner().invoke(app, ["diagnose", str(model), "--batch", str(batch)])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "the batch has 60 input arrays (encoder.layer.0.attention.output.dense" in line
    assert "and 55 more" in line and NAMES[-1] not in line
    assert len(line) < 400


def test_ignored_arrays_note_counts_the_rest(tmp_path: Path) -> None:
    model, batch = _files(
        tmp_path, {"input": torch.randn(3, 4)} | {n: torch.randn(3) for n in NAMES}
    )
    # nn.Linear's input is named `input` by torch.export: the other 60 arrays are ignored
    result = CliRunner().invoke(app, ["diagnose", str(model), "--batch", str(batch)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the table wraps notes
    note = text[text.index("60 batch array(s)") :]
    assert "and 55 more" in note and NAMES[-1] not in text


def test_shown_names_keeps_short_lists_whole() -> None:
    assert shown_names(["a", "b"]) == "a, b"
    assert shown_names(list("abcdef")) == "a, b, c, d, e, f"  # "and 1 more" saves nothing
    assert shown_names(list("abcdefg")) == "a, b, c, d, e and 2 more"
