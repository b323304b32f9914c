"""`gradhealth submit` failures that need no server: usage and connection errors map to the
exit codes of CONTRACT.md §2 with a message naming the problem (the happy path and the
server-side rejections run against a real server in test_service.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.cli import commands as _commands  # noqa: F401  (registers the commands)
from tests.e2e.processes import free_port


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    model, batch = tmp_path / "m.onnx", tmp_path / "b.npz"
    model.write_bytes(b"model bytes")
    batch.write_bytes(b"batch bytes")
    return model, batch


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["submit", *args], env=env or {"GRADHEALTH_API_KEY": ""})
    return result.exit_code, result.output


def test_submit_without_an_api_key_is_a_usage_error(files: tuple[Path, Path]) -> None:
    code, output = invoke(str(files[0]), "--batch", str(files[1]))
    assert code == 2 and "GRADHEALTH_API_KEY" in output


def test_submit_of_a_missing_file_names_it(files: tuple[Path, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    code, output = invoke(str(missing), "--batch", str(files[1]), "--api-key", "k")
    assert code == 2 and "nope.onnx" in output


def test_submit_to_a_server_that_is_not_there_is_an_internal_failure(
    files: tuple[Path, Path],
) -> None:
    server = f"http://127.0.0.1:{free_port()}"
    code, output = invoke(
        str(files[0]), "--batch", str(files[1]), "--api-key", "k", "--server", server
    )
    assert code == 3 and "cannot reach" in output
