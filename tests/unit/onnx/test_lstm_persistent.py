"""The persistent Triton LSTM loops (lstm_persistent, _lstm_triton).

On the CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1 at their import):
the same kernel code, executed with numpy, checked against lstm_fused_cell's per-step loops
(with the emulated cell kernels of test_lstm_fused_cell) and, through `lstm_sequence`, against
the CPU path. The `gpu` tests run the compiled kernels against the per-step loops on CUDA.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import cast

import pytest
import torch
from torch import Tensor

from service.engine.onnx.ops import lstm_fused_cell, lstm_persistent, recurrent_persistent
from service.engine.onnx.ops.lstm_sequence import lstm_sequence
from tests.support.recurrent_zoo import lstm_sequence_args
from tests.unit.onnx.test_lstm_fused_cell import emulated_kernels  # noqa: F401 - a fixture


@pytest.fixture
def interpreted(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """_lstm_triton imported under Triton's interpreter (kernels on CPU tensors); the module is
    dropped afterwards so that later imports compile for the GPU again."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _forget_kernels()
    module = lstm_persistent.kernels()
    assert module is not None, "triton is a dev dependency: pip install -e .[dev]"
    yield module
    _forget_kernels()


def _forget_kernels() -> None:
    sys.modules.pop(lstm_persistent.KERNELS_MODULE, None)
    lstm_persistent.kernels.cache_clear()


def _problem(
    steps: int, batch: int, hidden: int, seed: int = 0, device: str = "cpu"
) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device)

    return {
        "projected": randn(steps, batch, 4 * hidden),
        "R": randn(4 * hidden, hidden, scale=hidden**-0.5),
        "h0": randn(batch, hidden),
        "c0": randn(batch, hidden),
        "dY": randn(steps, batch, hidden),
        "dh_last": randn(batch, hidden),
        "dc_last": randn(batch, hidden),
    }


def _both_loops(p: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """(persistent outputs, per-step outputs): forward (h0 and Y, cells, gates) then backward
    (dgates, dc0, ∂L/∂h_t) of each."""
    results = []
    for loops in (lstm_persistent, lstm_fused_cell):
        states, cells, gates = loops.forward_steps(p["projected"], p["R"], p["h0"], p["c0"])
        backward = loops.backward_steps(
            p["dY"], p["dh_last"], p["dc_last"], cells, gates, p["c0"], p["R"]
        )
        results.append([states, cells, gates, *backward])
    return results[0], results[1]


# (steps, batch, hidden): one program and several (batch > 16), hidden below, at and between
# the tiles (16, 32-wide chunks, a non-power of two), and the largest the path takes
SHAPES = [(5, 2, 3), (4, 3, 32), (6, 20, 40), (3, 17, 100), (2, 3, lstm_persistent.MAX_HIDDEN)]


@pytest.mark.parametrize(("steps", "batch", "hidden"), SHAPES)
def test_interpreted_kernels_equal_the_per_step_loops(
    interpreted: ModuleType,
    emulated_kernels: list[str],  # noqa: F811 - the fixture
    steps: int,
    batch: int,
    hidden: int,
) -> None:
    persistent, per_step = _both_loops(_problem(steps, batch, hidden))
    names = ["Y", "cells", "gates", "dgates", "dc0", "dhidden"]
    for name, a, b in zip(names, persistent, per_step, strict=True):
        assert a.shape == b.shape, name
        try:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


def test_lstm_sequence_through_the_persistent_loops_equals_the_cpu_path(
    interpreted: ModuleType,
    emulated_kernels: list[str],  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The whole `lstm_sequence` (both directions, outputs, every input's gradient, the
    per-step hidden gradients) with the fused-cell Function running the persistent loops, as
    it does on CUDA, against the CPU Function."""
    chosen: list[bool] = []

    def persistent_loops(projected: Tensor) -> lstm_persistent.PersistentLoops:
        chosen.append(True)
        return lstm_persistent._LOOPS

    args = lstm_sequence_args(6, 3, 5, 7, torch.float32, 0)
    weights = [torch.randn(s) for s in ((6, 3, 7), (3, 7), (3, 7))]
    for reverse in (False, True):
        results = []
        for persistent in (True, False):
            sink: list[Tensor] = []
            if persistent:
                with monkeypatch.context() as m:
                    m.setattr(lstm_persistent, "loops_for", persistent_loops)
                    X, W, R, b, h0, c0 = args
                    outputs = lstm_sequence(X, W, R, b, h0, c0, reverse, sink)
            else:  # the CPU loops
                with monkeypatch.context() as m:
                    m.setattr(lstm_fused_cell, "available", lambda x: False)
                    X, W, R, b, h0, c0 = args
                    outputs = lstm_sequence(X, W, R, b, h0, c0, reverse, sink)
            loss = cast(Tensor, sum((o * w).sum() for o, w in zip(outputs, weights, strict=True)))
            grads = torch.autograd.grad(loss, args)
            results.append([*(o.detach() for o in outputs), *grads, *sink])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert chosen and "forward" not in emulated_kernels  # no per-step cell kernel ran


def test_a_failing_kernel_falls_back_to_the_per_step_loops_once_and_says_so(
    interpreted: ModuleType,
    emulated_kernels: list[str],  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken:
        def __getitem__(self, grid: object) -> object:
            def launch(*args: object, **kwargs: object) -> None:
                raise RuntimeError("out of resources: shared memory")

            return launch

    monkeypatch.setattr(interpreted, "lstm_forward_kernel", Broken())
    monkeypatch.setattr(lstm_persistent._LOOPS, "failed", False)
    p = _problem(4, 2, 5)
    inputs = (p["projected"], p["R"], p["h0"], p["c0"])
    with caplog.at_level(logging.WARNING, logger=lstm_persistent.__name__):
        got = lstm_persistent._LOOPS.forward(*inputs)
        again = lstm_persistent._LOOPS.forward(*inputs)
    expected = lstm_fused_cell.forward_steps(*inputs)
    for a, b, e in zip(got, again, expected, strict=True):
        torch.testing.assert_close(a, e)
        torch.testing.assert_close(b, e)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "out of resources" in warnings[0], warnings
    assert lstm_persistent._LOOPS.failed
    assert lstm_persistent.loops_for(p["projected"]) is None  # off for the rest of the process
    assert emulated_kernels.count("forward") == 3 * 4  # got, again and expected: per-step


@pytest.fixture
def fresh_self_check() -> Iterator[None]:
    lstm_persistent.self_check.cache_clear()
    yield
    lstm_persistent.self_check.cache_clear()


@pytest.mark.usefixtures("fresh_self_check")
def test_self_check_accepts_kernels_that_equal_the_per_step_loops(
    interpreted: ModuleType,
    emulated_kernels: list[str],  # noqa: F811 - the fixture
) -> None:
    assert lstm_persistent.self_check(torch.device("cpu"), 7)
    assert lstm_persistent.self_check(torch.device("cpu"), 40)


@pytest.mark.usefixtures("fresh_self_check")
@pytest.mark.parametrize("fault", ["wrong numbers", "an error"])
def test_self_check_refuses_kernels_that_misbehave_and_says_so(
    interpreted: ModuleType,
    emulated_kernels: list[str],  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    """What a race between steps on some GPU would look like (numbers off by far more than
    rounding), or a kernel that does not compile there: the size falls back, with a warning."""
    honest = lstm_persistent.backward_steps

    def faulty(*args: Tensor) -> tuple[Tensor, ...]:
        if fault == "an error":
            raise RuntimeError("PTX assembly aborted")
        dgates, dc0, dhidden = honest(*args)
        dhidden[1] += 0.01  # one step's gradient off
        return dgates, dc0, dhidden

    monkeypatch.setattr(lstm_persistent, "backward_steps", faulty)
    with caplog.at_level(logging.WARNING, logger=lstm_persistent.__name__):
        assert not lstm_persistent.self_check(torch.device("cpu"), 7)
    (record,) = caplog.records
    expected = "PTX assembly aborted" if fault == "an error" else "differ from the per-step loops"
    assert expected in record.getMessage()


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    ("steps", "batch", "hidden"), [*SHAPES, (24, 8, 128), (50, 64, 128), (7, 200, 40)]
)
def test_compiled_kernels_equal_the_per_step_loops_on_cuda(
    steps: int, batch: int, hidden: int
) -> None:
    assert not torch.backends.cuda.matmul.allow_tf32  # torch's default: fp32 products
    persistent, per_step = _both_loops(_problem(steps, batch, hidden, device="cuda"))
    for a, b in zip(persistent, per_step, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@gpu
def test_cuda_float32_lstms_up_to_max_hidden_take_the_persistent_loops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def projected(hidden: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.zeros(3, 2, 4 * hidden, device="cuda", dtype=dtype)

    assert lstm_persistent.loops_for(projected(128)) is lstm_persistent._LOOPS
    assert lstm_persistent.loops_for(projected(lstm_persistent.MAX_HIDDEN + 1)) is None
    # more programs than multiprocessors: a group's barrier could wait for one never started
    too_many = torch.zeros(2, 16 * 200, 4 * 128, device="cuda")
    assert lstm_persistent.loops_for(too_many) is None
    assert lstm_persistent.loops_for(projected(128, torch.float16)) is None
    assert lstm_persistent.loops_for(projected(128).cpu()) is None
    monkeypatch.setenv("GRADHEALTH_LSTM_PERSISTENT", "0")
    assert lstm_persistent.loops_for(projected(128)) is None


@pytest.mark.gpu
@gpu
@pytest.mark.usefixtures("fresh_self_check")
def test_a_barrier_that_gives_up_is_counted_and_the_self_check_refuses_the_kernels(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With no polls allowed, the programs of a group that arrive before the last cannot wait
    (what a group not all resident would come to, seconds later): the launch counts it, and
    the self-check sends that size to the per-step loops, with a warning."""
    device = torch.device("cuda")
    monkeypatch.setattr(recurrent_persistent, "SPIN_LIMIT", 0)
    p = _problem(6, 8, 128, device="cuda")
    before = lstm_persistent.barrier_failures(device)
    lstm_persistent.forward_steps(p["projected"], p["R"], p["h0"], p["c0"])
    assert lstm_persistent.barrier_failures(device) > before
    with caplog.at_level(logging.WARNING, logger=lstm_persistent.__name__):
        assert not lstm_persistent.self_check(device, 128)
    assert "barrier between steps timed out" in caplog.text


def _ptxas_usage(kernel: object, hidden: int) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) of `kernel` compiled for sm_90 with
    lstm_persistent's tiles for `hidden`: Triton to PTX, then ptxas -v (bundled with triton),
    with the options Triton passes it. No GPU needed."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    tiles = lstm_persistent._tiles(hidden)
    options = {k: tiles.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion")}
    names = list(kernel.arg_names)  # type: ignore[attr-defined]
    pointers = names[: names.index("steps")]
    counters = ("arrivals", "barrier_failures")
    signature = {n: "*i32" if n in counters else "*fp32" for n in pointers}
    signature |= {n: "i32" for n in ("steps", "batch", "hidden", "spin_limit")}
    signature |= {n: "constexpr" for n in tiles}
    # the one specialisation Triton's launcher still makes (_lstm_triton.UNSPECIALIZED):
    # `hidden` a multiple of 16, or a constant 1
    attrs = {}
    constants: dict[str, object] = dict(tiles)
    if hidden == 1:
        signature["hidden"] = "constexpr"
        constants["hidden"] = 1
    elif hidden % 16 == 0:
        attrs[(names.index("hidden"),)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as folder:
        ptx = f"{folder}/kernel.ptx"
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run(
            [
                get_ptxas(90).path,
                "-v",
                "--regAllocOptLevel=2",
                "--gpu-name=sm_90a",
                ptx,
                "-o",
                f"{folder}/kernel.cubin",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    assert registers and spills, log
    return int(registers.group(1)), int(spills.group(1))


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["lstm_forward_kernel", "lstm_backward_kernel"])
def test_every_variant_of_the_kernels_compiles_for_the_h100_without_register_spills(
    kernel: str,
) -> None:
    """Compiled for sm_90 (the H100/H200) on this GPU-less machine, every variant a CUDA run
    can ask for (each tile width up to MAX_HIDDEN, with `hidden` a multiple of 16, not, or 1):
    a kernel that does not compile fails here, not on the first CUDA diagnosis (Triton 3.9's
    compiler aborted the whole process on one variant at hidden 256). Spilled registers
    (local memory on every step) would cost the speed the kernels are for (with pointers
    specialised as 16-byte aligned they spilled 424 bytes at hidden 128); a few words are
    tolerated (Triton versions differ)."""
    module = lstm_persistent.kernels()
    assert module is not None
    for hidden in (1, 5, 16, 24, 32, 40, 64, 100, lstm_persistent.MAX_HIDDEN):
        registers, spill_bytes = _ptxas_usage(getattr(module, kernel), hidden)
        assert spill_bytes <= 64, (
            f"{kernel} at hidden {hidden}: {spill_bytes} bytes spilled ({registers} registers)"
        )
