"""The Docker Compose file and Dockerfile hold together (no Docker engine here: the structure is
checked; `docker compose config` validates it where Docker is installed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_services_start_in_order_behind_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"postgres", "migrate", "api", "worker", "scheduler"}
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["scheduler"]["command"] == ["scheduler"]
    for name in ("api", "worker", "scheduler"):
        condition = services[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully"
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])


def test_worker_reserves_nvidia_gpus_and_every_role_uses_postgres(
    compose: dict[str, Any],
) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert worker["command"][0] == "worker" and "--gpus" in worker["command"]
    for name in ("migrate", "api", "worker", "scheduler"):
        env = compose["services"][name]["environment"]
        assert env["GRADHEALTH_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["GRADHEALTH_ENVIRONMENT"] == "production"


def test_dockerfile_runs_the_cli_and_ships_the_migrations() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["gradhealth"]' in text
    assert "COPY migrations ./migrations" in text
    assert "download.pytorch.org/whl/cu" in text  # CUDA torch for the GPU worker


def test_compose_config_validates() -> None:
    """`make test` installs docker-compose where Docker has no compose plugin (Makefile)."""
    plugin = shutil.which("docker") is not None and (
        subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    )
    command = ["docker", "compose"] if plugin else ["docker-compose"]
    assert plugin or shutil.which("docker-compose"), "no Docker Compose: run `make test-tools`"
    result = subprocess.run(
        [*command, "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
