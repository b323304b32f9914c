"""`gradhealth migrate`, `keys create` and `serve` as real processes (CONTRACT.md §2)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.db.session import Database
from tests.conftest import postgres_test_url

GRADHEALTH = str(Path(sys.executable).parent / "gradhealth")


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADHEALTH_")}
    env.update(values)
    return env


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRADHEALTH, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=60
    )


def test_migrate_then_create_keys_from_any_directory(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    before = _run(["keys", "create", "--tenant", "acme"], tmp_path, GRADHEALTH_DATA_DIR=data_dir)
    assert before.returncode == 2
    assert "gradhealth migrate" in before.stderr
    migrated = _run(["migrate"], tmp_path, GRADHEALTH_DATA_DIR=data_dir)
    assert migrated.returncode == 0, migrated.stderr
    assert "is at revision" in migrated.stdout
    first = _run(["keys", "create", "--tenant", "acme"], tmp_path, GRADHEALTH_DATA_DIR=data_dir)
    second = _run(["keys", "create", "--tenant", "acme"], tmp_path, GRADHEALTH_DATA_DIR=data_dir)
    assert first.returncode == second.returncode == 0
    key1, key2 = first.stdout.splitlines()[-1], second.stdout.splitlines()[-1]
    assert key1.startswith("gh_") and key1 != key2
    assert "new tenant" in first.stdout and "new tenant" not in second.stdout


def test_migrate_on_postgres_is_idempotent(tmp_path: Path, postgres_database: Database) -> None:
    result = _run(["migrate"], tmp_path, GRADHEALTH_DATABASE_URL=postgres_test_url())
    assert result.returncode == 0, result.stderr
    assert "postgres" in result.stdout


def test_migrate_names_an_unreachable_database(tmp_path: Path) -> None:
    url = "postgresql+psycopg://nobody:secret@127.0.0.1:1/nothing"
    result = _run(["migrate"], tmp_path, GRADHEALTH_DATABASE_URL=url)
    assert result.returncode == 3
    assert "127.0.0.1:1/nothing" in result.stderr
    assert "secret" not in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_serve_prints_a_working_key_on_first_start_only(tmp_path: Path) -> None:
    port = _free_port()
    env = _env(GRADHEALTH_DATA_DIR=str(tmp_path / "data"))

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [GRADHEALTH, "serve", "--port", str(port), "--workers", "0"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            proc.kill()
            pytest.fail(f"serve did not become ready: {proc.communicate()[0]}")
        return proc

    base = f"http://127.0.0.1:{port}"
    proc = start()
    try:
        assert httpx.get(f"{base}/v1/diagnoses").status_code == 401
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    key = next(line for line in out.splitlines() if line.startswith("gh_"))
    assert f"http://127.0.0.1:{port}/docs" in out

    proc = start()
    try:
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{base}/v1/diagnoses", headers=headers).status_code == 200
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert not any(line.startswith("gh_") for line in out.splitlines())
