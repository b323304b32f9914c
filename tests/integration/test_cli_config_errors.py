"""A bad GRADHEALTH_* value: one line per bad setting naming the environment variable, the
value and what is expected (not pydantic's field names and error URLs), exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.cli import commands as _commands  # noqa: F401  (registers the commands)


@pytest.mark.parametrize("command", [["serve"], ["api"], ["worker"], ["migrate"]])
def test_a_bad_setting_is_named_by_its_environment_variable(
    command: list[str], tmp_path: Path
) -> None:
    env = {
        "GRADHEALTH_JOB_TIMEOUT_S": "abc",
        "GRADHEALTH_BLOB_STORAGE": "nfs",
        "GRADHEALTH_DATA_DIR": str(tmp_path),
    }
    result = CliRunner().invoke(app, command, env=env)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2, result.output
    timeout = next(line for line in lines if "GRADHEALTH_JOB_TIMEOUT_S" in line)
    assert "'abc'" in timeout and "number" in timeout
    storage = next(line for line in lines if "GRADHEALTH_BLOB_STORAGE" in line)
    assert "'nfs'" in storage and "'db'" in storage
    assert "job_timeout_s" not in result.output
    assert "errors.pydantic.dev" not in result.output
