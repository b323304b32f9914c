"""The benchmark scripts that bench/gpu_check.sh runs on a lent GPU stay runnable.

A GPU is lent to few sessions, for 15 minutes; a script broken since the last one would spend
that time on a traceback. Here they run on the CPU (converter.py at its quick sizes) or parse
their arguments (lstm_cuda.py needs CUDA to run).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = pytest.mark.slow  # each starts a Python process that imports torch


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=BENCH.parent
    )


def test_converter_bench_runs_the_lstm_rows_as_gpu_check_asks() -> None:
    done = _run(
        str(BENCH / "converter.py"),
        "--quick",
        "--only",
        "lstm",
        "--skip-conversion",
        "--repeats",
        "2",
        "--device",
        "cpu",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("lstm")]
    assert len(rows) == 2 and all(" ratio " in row for row in rows), done.stdout


def test_lstm_cuda_bench_takes_the_flags_gpu_check_passes() -> None:
    done = _run(str(BENCH / "lstm_cuda.py"), "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--repeats" in done.stdout and "--tf32x3" in done.stdout


def test_gpu_check_script_parses() -> None:
    done = subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], capture_output=True)
    assert done.returncode == 0, done.stderr


def test_quantized_models_bench_prints_a_ratio_per_row() -> None:
    done = _run(str(BENCH / "quantized_models.py"), "--quick", "--repeats", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if " ratio " in line]
    assert [row.split()[0] for row in rows] == ["dynamic", "dynamic", "QOperator"], done.stdout
    assert all("vs onnxruntime max abs" in row for row in rows), done.stdout
