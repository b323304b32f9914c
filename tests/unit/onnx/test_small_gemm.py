"""The C++ loops' own kernel for small per-step products (service/engine/native/small_gemm.h).

Compiled for AVX-512 and for AVX2 and used on CPUs that have either (AVX-512 where both);
elsewhere the same entry point runs addmm (these tests then check that path). On an AVX-512
CPU every test runs twice: with its AVX-512 build and with the AVX2 build.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.engine import native


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


# what x86-64-v3 (AVX2) and x86-64-v4 (AVX-512) add, as /proc/cpuinfo spells it
X86_64_V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
X86_64_V4 = X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def _cpu_level() -> int:
    flags = _cpu_flags()
    return 2 if flags >= X86_64_V4 else 1 if flags >= X86_64_V3 else 0


# the builds this CPU can run, by the GRADHEALTH_SMALL_GEMM value that picks each: "" (unset)
# is the CPU's own (AVX-512 where it has it, else AVX2, else addmm), "avx2" the AVX2 build
BUILDS = ["", "avx2"] if _cpu_level() == 2 else [""]


@pytest.fixture(scope="module")
def built_loops() -> object:
    native.build()
    built = native.load_recurrent_cpu()
    assert built is not None
    return built


@pytest.fixture(params=BUILDS, ids=lambda b: b or "cpu-default")
def loops(
    built_loops: object, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> object:
    if request.param:
        monkeypatch.setenv("GRADHEALTH_SMALL_GEMM", request.param)
    return built_loops


def test_the_kernel_runs_where_the_cpu_has_avx2_or_avx512(
    built_loops: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    level = _cpu_level()
    assert built_loops.small_gemm_level() == level  # type: ignore[attr-defined]
    assert built_loops.small_gemm_usable() == (level > 0)  # type: ignore[attr-defined]
    monkeypatch.setenv("GRADHEALTH_SMALL_GEMM", "avx2")  # AVX-512 CPUs run the AVX2 build too
    assert built_loops.small_gemm_level() == min(level, 1)  # type: ignore[attr-defined]
    monkeypatch.setenv("GRADHEALTH_SMALL_GEMM", "0")
    assert not built_loops.small_gemm_usable()  # type: ignore[attr-defined]


# batch rows: the 8- and 4-row blocks and single rows; columns: 32- and 16-wide blocks and a
# scalar tail; the recurrent shapes of the bench's small LSTM ([8, 128]·[128, 512] and back)
SHAPES = [(8, 128, 512), (8, 512, 128), (13, 64, 100), (3, 7, 37), (1, 5, 16), (12, 33, 48)]


@pytest.mark.parametrize(("rows", "inner", "cols"), SHAPES)
def test_product_equals_torchs(loops: object, rows: int, inner: int, cols: int) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    x = torch.randn(rows, inner, generator=g)
    w = torch.randn(inner, cols, generator=g)
    other = torch.randn(rows, cols, generator=g)
    got = loops.small_gemm_product(x, w, other)  # type: ignore[attr-defined]
    torch.testing.assert_close(got, torch.addmm(other, x, w), rtol=1e-5, atol=1e-5 * inner**0.5)


def test_strided_rows_as_the_gru_backward_reads_them(loops: object) -> None:
    """x as a [B, 3H] view with rows 4H apart (the GRU's ∂L/∂fh inside its dgates buffer)."""
    g = torch.Generator().manual_seed(7)
    hidden, batch = 40, 6
    buffer = torch.randn(batch, 4 * hidden, generator=g)
    x = buffer[:, : 3 * hidden]
    w = torch.randn(3 * hidden, hidden, generator=g)
    other = torch.randn(batch, hidden, generator=g)
    got = loops.small_gemm_product(x, w, other)  # type: ignore[attr-defined]
    torch.testing.assert_close(got, torch.addmm(other, x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_loops_give_the_same_with_the_kernel_off(
    loops: object, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    """The C++ loops with their small steps on small_gemm.h and on addmm (what CPUs without
    AVX2 run): the same outputs, gradients and per-step hidden gradients."""
    from service.engine.onnx.ops.gru_sequence import gru_direction
    from service.engine.onnx.ops.lstm_sequence import lstm_direction
    from service.engine.onnx.ops.rnn_sequence import rnn_direction

    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    steps, batch, inputs, hidden = 6, 5, 12, 40
    g = torch.Generator().manual_seed(3)

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).requires_grad_(True)

    X, h0, c0 = leaf(steps, batch, inputs), leaf(batch, hidden), leaf(batch, hidden)
    W = leaf(gates * hidden, inputs, scale=inputs**-0.5)
    R = leaf(gates * hidden, hidden, scale=hidden**-0.5)
    B = leaf(2 * gates * hidden, scale=0.1)
    leaves = [X, W, R, B, h0] + ([c0] if op == "LSTM" else [])

    def run() -> list[torch.Tensor]:
        sink: list[torch.Tensor] = []
        if op == "LSTM":
            outputs = list(lstm_direction(X, W, R, B, h0, c0, False, sink))
        else:
            direction = gru_direction if op == "GRU" else rnn_direction
            outputs = list(direction(X, W, R, B, h0, None, False, sink)[:2])
        loss = torch.stack([(o * (k + 1)).sum() for k, o in enumerate(outputs)]).sum()
        return [*(o.detach() for o in outputs), *torch.autograd.grad(loss, leaves), *sink]

    with_kernel = run()
    monkeypatch.setenv("GRADHEALTH_SMALL_GEMM", "0")
    without = run()
    for a, b in zip(with_kernel, without, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
