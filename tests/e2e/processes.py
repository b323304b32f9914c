"""Real `gradhealth` processes on loopback ports for the end-to-end tests and
bench/service_costs.py.

Each process gets its own environment (a `GRADHEALTH_*` set, nothing inherited from the
developer's shell) and writes its output to a log file, which a failing test prints.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

GRADHEALTH = str(Path(sys.executable).with_name("gradhealth"))
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 40.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(**overrides: str) -> dict[str, str]:
    """The parent's environment without any GRADHEALTH_ setting, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADHEALTH_")}
    env.update(overrides)
    return env


def run_cli(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRADHEALTH, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@dataclass
class Service:
    """A started `gradhealth` process."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def start(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> Service:
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [GRADHEALTH, *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: cleanup reaches its children
        )
    return Service(name, process, log_path)


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = START_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_healthy(service: Service, timeout: float = START_TIMEOUT_S) -> None:
    def healthy() -> bool:
        if service.process.poll() is not None:
            raise AssertionError(f"{service.name} exited:\n{service.log()}")
        try:
            return httpx.get(f"{service.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, f"{service.name} to answer /healthz", timeout)


def wait_for_log(service: Service, text: str, timeout: float = START_TIMEOUT_S) -> str:
    def found() -> str | None:
        log = service.log()
        if text in log:
            return log
        if service.process.poll() is not None:
            raise AssertionError(f"{service.name} exited:\n{log}")
        return None

    return str(wait_until(found, f"{text!r} in the log of {service.name}", timeout))


def start_serve(data_dir: Path, log_dir: Path) -> tuple[Service, str]:
    """`gradhealth serve` (one worker, the embedded SQLite default in `data_dir`) on a free
    port, once it answers: (the service, the API key it printed for its tenant). The caller
    stops it."""
    port = free_port()
    env = base_env(GRADHEALTH_DATA_DIR=str(data_dir))
    service = start("serve", ["serve", "--port", str(port), "--workers", "1"], env, log_dir)
    service.url = f"http://127.0.0.1:{port}"
    try:
        log = wait_for_log(service, "API key for tenant")
        key = log.split("API key for tenant", 1)[1].splitlines()[1].strip()
        wait_healthy(service)
    except BaseException:
        service.stop()
        raise
    return service, key
