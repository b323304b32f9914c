"""Every ONNX backend test case shipped with `onnx` that the converter accepts must pass.

Unsupported cases must be refused with `UnsupportedModelError` before running (that is a
pass too: never a silent wrong result). See backend_cases.py for where cases come from.
"""

from __future__ import annotations

import functools

import pytest

from tests.unit.onnx.backend_cases import Case, all_cases, run_case

# Supported cases today (bench/onnx_backend.py prints the exact number): a drop below this
# floor means an op or attribute stopped being accepted.
MIN_PASSING = 1914


@functools.cache
def _cases() -> dict[str, Case]:
    return {f"{c.suite}/{c.name}": c for c in all_cases()}


@functools.cache
def _result(key: str) -> tuple[str, str]:
    return run_case(_cases()[key])


def _params() -> list[pytest.param]:  # type: ignore[valid-type]
    # The `light` suite holds real CNNs (VGG-19, DenseNet-121, ...): seconds each.
    return [
        pytest.param(key, marks=[pytest.mark.slow] if key.startswith("light/") else [])
        for key in sorted(_cases())
    ]


@pytest.mark.parametrize("key", _params())
def test_backend_case(key: str) -> None:
    status, detail = _result(key)
    assert status in ("pass", "unsupported", "random"), detail


def test_backend_coverage_floor() -> None:
    passed = sum(_result(key)[0] == "pass" for key in _cases())
    assert passed >= MIN_PASSING
