"""The persistent Triton GRU and tanh RNN loops (gru_persistent, rnn_persistent, their kernels
_gru_triton and _rnn_triton, the machinery shared with the LSTM's in recurrent_persistent).

On the CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1 at their import,
as in test_lstm_persistent.py): the same kernel code, checked against gru_sequence's and
rnn_sequence's Python per-step loops and, through `gru_direction` / `rnn_direction`, against
the CPU path. The `gpu` tests run the compiled kernels against the per-step loops on CUDA.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import cast

import pytest
import torch
from torch import Tensor

from service.engine import native
from service.engine.onnx.ops import (
    gru_persistent,
    gru_sequence,
    lstm_persistent,
    recurrent_persistent,
    rnn_persistent,
    rnn_sequence,
)
from tests.unit.onnx.test_lstm_persistent import _ptxas_usage

# cell: (its persistent module, its Python loops' module, the direction function, gate blocks)
CELLS: dict[str, tuple[ModuleType, ModuleType, Callable[..., tuple[Tensor, Tensor, None]], int]] = {
    "gru": (gru_persistent, gru_sequence, gru_sequence.gru_direction, 3),
    "rnn": (rnn_persistent, rnn_sequence, rnn_sequence.rnn_direction, 1),
}
PERSISTENT = [gru_persistent, rnn_persistent, lstm_persistent]  # _gru/_rnn_triton need _lstm's


@pytest.fixture
def interpreted(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every cell's kernels imported under Triton's interpreter (kernels on CPU tensors); the
    modules are dropped afterwards so that later imports compile for the GPU again."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _forget_kernels()
    for cell in PERSISTENT:
        assert cell.kernels() is not None, "triton is a dev dependency: pip install -e .[dev]"
    yield
    _forget_kernels()


def _forget_kernels() -> None:
    for cell in PERSISTENT:
        sys.modules.pop(cell.KERNELS_MODULE, None)
        cell.kernels.cache_clear()


def _problem(
    cell: str, steps: int, batch: int, hidden: int, seed: int = 0, device: str = "cpu"
) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    gates = CELLS[cell][3]

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device)

    return {
        "projected": randn(steps, batch, gates * hidden),
        "R": randn(gates * hidden, hidden, scale=hidden**-0.5),
        "recurrent_bias": randn(gates * hidden, scale=0.5),
        "h0": randn(batch, hidden),
        "dY": randn(steps, batch, hidden),
        "dh_last": randn(batch, hidden),
    }


def _loops(
    cell: str, forward: Callable[..., object], backward: Callable[..., object], p: dict[str, Tensor]
) -> list[Tensor]:
    """Every output of `forward` then `backward` on problem `p` (the projected input cloned:
    the Python forwards activate it in place)."""
    projected, R, h0, dY, dh_last = (p[k] for k in ("projected", "R", "h0", "dY", "dh_last"))
    if cell == "gru":
        gates, from_hidden, Y = cast(
            tuple[Tensor, Tensor, Tensor], forward(projected.clone(), R, p["recurrent_bias"], h0)
        )
        grads = cast(tuple[Tensor, ...], backward(dY, dh_last, gates, from_hidden, h0, Y, R))
        return [gates, from_hidden, Y, *grads]
    Y = cast(Tensor, forward(projected.clone(), R, h0))
    return [Y, *cast(tuple[Tensor, ...], backward(dY, dh_last, Y, R))]


def _both_loops(cell: str, p: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """(persistent outputs, per-step outputs)."""
    persistent, python, _, _ = CELLS[cell]
    ours = _loops(cell, persistent.forward_steps, persistent.backward_steps, p)
    theirs = _loops(cell, python._forward_steps, python._backward_steps, p)
    return ours, theirs


NAMES = {"gru": ["gates", "from_hidden", "Y", "dgates", "dhidden"], "rnn": ["Y", "dpre", "dhidden"]}

# (steps, batch, hidden): one program and several groups (batch > 16, > 32), hidden below, at
# and between the tiles (16, 32-wide chunks, not a power of two), and the largest the path takes
SHAPES = [
    (5, 2, 3),
    (4, 3, 32),
    (6, 20, 40),
    (3, 17, 100),
    (3, 35, 24),
    (2, 3, recurrent_persistent.MAX_HIDDEN),
]


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize(("steps", "batch", "hidden"), SHAPES)
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_interpreted_kernels_equal_the_per_step_loops(
    cell: str, steps: int, batch: int, hidden: int
) -> None:
    persistent, per_step = _both_loops(cell, _problem(cell, steps, batch, hidden))
    for name, a, b in zip(NAMES[cell], persistent, per_step, strict=True):
        assert a.shape == b.shape, name
        try:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


def _direction_inputs(cell: str, device: str = "cpu") -> list[Tensor]:
    """X, W, R, B (the node's bias row, Wb then Rb), h0 of one direction: steps 6, batch 3,
    5 → 7."""
    g, gates = torch.Generator().manual_seed(3), CELLS[cell][3]

    def normal(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_(True)

    return [
        normal(6, 3, 5),
        normal(gates * 7, 5, scale=5**-0.5),
        normal(gates * 7, 7, scale=7**-0.5),
        normal(2 * gates * 7, scale=0.5),
        normal(3, 7),
    ]


def _direction(cell: str, inputs: list[Tensor], reverse: bool, with_bias: bool) -> list[Tensor]:
    """Y, h_T, every input's gradient (B's when given) and the per-step hidden gradients, for
    a loss that weighs every element of Y and h_T differently."""
    X, W, R, B, h0 = inputs
    sink: list[Tensor] = []
    Y, h, _ = CELLS[cell][2](X, W, R, B if with_bias else None, h0, None, reverse, sink)
    g = torch.Generator().manual_seed(1)
    y_weights, h_weights = (torch.randn(t.shape, generator=g).to(t.device) for t in (Y, h))
    loss = (Y * y_weights).sum() + (h * h_weights).sum()
    leaves = [X, W, R, *([B] if with_bias else []), h0]
    grads = torch.autograd.grad(loss, leaves)
    assert len(sink) == 1
    return [Y.detach(), h.detach(), *grads, sink[0]]


@pytest.fixture
def spied(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The log of the persistent launchers' calls, per cell: '<cell> forward' / 'backward'."""
    calls: list[str] = []
    for cell, (persistent, *_) in CELLS.items():
        for way in ("forward", "backward"):
            launcher = getattr(persistent, f"{way}_steps")

            def spy(
                *args: Tensor,
                launcher: Callable[..., object] = launcher,
                name: str = f"{cell} {way}",
            ) -> object:
                calls.append(name)
                return launcher(*args)

            monkeypatch.setattr(persistent, f"{way}_steps", spy)
    return calls


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_direction_through_the_persistent_loops_equals_the_cpu_path(
    monkeypatch: pytest.MonkeyPatch, spied: list[str], cell: str, reverse: bool, with_bias: bool
) -> None:
    """The whole direction (outputs, every input's gradient, the per-step hidden gradients)
    with the node running the persistent loops, as it does on CUDA, against the CPU path."""
    persistent = CELLS[cell][0]
    inputs = _direction_inputs(cell)
    expected = _direction(cell, inputs, reverse, with_bias)
    assert not spied
    with monkeypatch.context() as m:
        m.setenv("GRADHEALTH_NATIVE", "0")  # the C++ loops take CPU tensors before the chooser
        assert native.load_recurrent_cpu() is None
        m.setattr(persistent, "loops_for", lambda tensor: persistent._LOOPS)
        got = _direction(cell, inputs, reverse, with_bias)
    assert spied == [f"{cell} forward", f"{cell} backward"]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_a_failing_kernel_falls_back_to_the_per_step_loops_once_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, cell: str
) -> None:
    class Broken:
        def __getitem__(self, grid: object) -> object:
            def launch(*args: object, **kwargs: object) -> None:
                raise RuntimeError("out of resources: shared memory")

            return launch

    persistent, python, _, _ = CELLS[cell]
    kernels = persistent.kernels()
    monkeypatch.setattr(kernels, f"{cell}_forward_kernel", Broken())
    monkeypatch.setattr(persistent._LOOPS, "failed", False)
    p = _problem(cell, 4, 2, 5)
    inputs = [p["projected"], p["R"], p["h0"]]
    if cell == "gru":
        inputs.insert(2, p["recurrent_bias"])
    with caplog.at_level(logging.WARNING, logger=persistent.__name__):
        got = persistent._LOOPS.forward(inputs[0].clone(), *inputs[1:])
        again = persistent._LOOPS.forward(inputs[0].clone(), *inputs[1:])
    expected = python._forward_steps(inputs[0].clone(), *inputs[1:])
    for a, b, e in zip(*(_as_list(r) for r in (got, again, expected)), strict=True):
        torch.testing.assert_close(a, e)
        torch.testing.assert_close(b, e)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "out of resources" in warnings[0], warnings
    assert persistent._LOOPS.failed
    assert not lstm_persistent._LOOPS.failed  # the other cells' kernels are not affected


def _as_list(result: Tensor | tuple[Tensor, ...]) -> list[Tensor]:
    return [result] if isinstance(result, Tensor) else list(result)


@pytest.fixture
def fresh_self_check() -> Iterator[None]:
    for cell in PERSISTENT:
        cell.self_check.cache_clear()
    yield
    for cell in PERSISTENT:
        cell.self_check.cache_clear()


@pytest.mark.usefixtures("interpreted", "fresh_self_check")
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_self_check_accepts_kernels_that_equal_the_per_step_loops(cell: str) -> None:
    persistent = CELLS[cell][0]
    assert persistent.self_check(torch.device("cpu"), 7)
    assert persistent.self_check(torch.device("cpu"), 40)


@pytest.mark.usefixtures("interpreted", "fresh_self_check")
@pytest.mark.parametrize("fault", ["wrong numbers", "an error"])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_self_check_refuses_kernels_that_misbehave_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, cell: str, fault: str
) -> None:
    """What a race between steps on some GPU would look like (numbers off by far more than
    rounding), or a kernel that does not compile there: the size falls back, with a warning."""
    persistent = CELLS[cell][0]
    honest = persistent.backward_steps

    def faulty(*args: Tensor) -> tuple[Tensor, ...]:
        if fault == "an error":
            raise RuntimeError("PTX assembly aborted")
        dgates, dhidden = honest(*args)
        dhidden[1] += 0.01  # one step's gradient off
        return dgates, dhidden

    monkeypatch.setattr(persistent, "backward_steps", faulty)
    with caplog.at_level(logging.WARNING, logger=persistent.__name__):
        assert not persistent.self_check(torch.device("cpu"), 7)
    (record,) = caplog.records
    expected = "PTX assembly aborted" if fault == "an error" else "differ from the per-step loops"
    assert expected in record.getMessage()
    assert record.name == persistent.__name__


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    ("steps", "batch", "hidden"), [*SHAPES, (24, 8, 128), (50, 64, 128), (7, 200, 40)]
)
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_compiled_kernels_equal_the_per_step_loops_on_cuda(
    cell: str, steps: int, batch: int, hidden: int
) -> None:
    assert not torch.backends.cuda.matmul.allow_tf32  # torch's default: fp32 products
    persistent, per_step = _both_loops(cell, _problem(cell, steps, batch, hidden, device="cuda"))
    for name, a, b in zip(NAMES[cell], persistent, per_step, strict=True):
        try:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_cuda_directions_run_the_persistent_loops_and_equal_the_per_step_loops(
    monkeypatch: pytest.MonkeyPatch, spied: list[str], cell: str, reverse: bool
) -> None:
    """The chooser in the node: a float32 direction of hidden 7 on CUDA runs the kernels,
    with the same outputs and gradients as the per-step loops (the switch off). Eager runs
    only: a node's CUDA graph keeps the loops that ran when it was captured."""
    monkeypatch.setenv("GRADHEALTH_CUDA_GRAPHS", "0")
    inputs = _direction_inputs(cell, "cuda")
    # the check the chooser makes, made first (its launches are spied too); keyed by the
    # tensors' device, `cuda:0`, not `cuda`
    assert CELLS[cell][0].self_check(inputs[0].device, 7)
    spied.clear()
    got = _direction(cell, inputs, reverse, True)
    assert spied == [f"{cell} forward", f"{cell} backward"]
    with monkeypatch.context() as m:
        m.setenv("GRADHEALTH_LSTM_PERSISTENT", "0")
        expected = _direction(cell, inputs, reverse, True)
    assert len(spied) == 2
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_cuda_float32_layers_up_to_max_hidden_take_the_persistent_loops(
    monkeypatch: pytest.MonkeyPatch, cell: str
) -> None:
    persistent, _, _, gates = CELLS[cell]

    def projected(hidden: int, batch: int = 2, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.zeros(3, batch, gates * hidden, device="cuda", dtype=dtype)

    assert persistent.loops_for(projected(128)) is persistent._LOOPS
    assert persistent.loops_for(projected(recurrent_persistent.MAX_HIDDEN + 1)) is None
    # more programs than multiprocessors: a group's barrier could wait for one never started
    assert persistent.loops_for(projected(128, batch=16 * 200)) is None
    assert persistent.loops_for(projected(128, dtype=torch.float16)) is None
    assert persistent.loops_for(projected(128).cpu()) is None
    monkeypatch.setenv("GRADHEALTH_LSTM_PERSISTENT", "0")  # one switch for every cell
    assert persistent.loops_for(projected(128)) is None


@pytest.mark.gpu
@gpu
@pytest.mark.usefixtures("fresh_self_check")
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_a_barrier_that_gives_up_is_counted_and_the_self_check_refuses_the_kernels(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, cell: str
) -> None:
    """With no polls allowed, the programs of a group that arrive before the last cannot wait
    (what a group not all resident would come to, seconds later): the launch counts it, and
    the self-check sends that size to the per-step loops, with a warning."""
    persistent = CELLS[cell][0]
    device = torch.device("cuda")
    monkeypatch.setattr(recurrent_persistent, "SPIN_LIMIT", 0)
    p = _problem(cell, 6, 8, 128, device="cuda")
    before = recurrent_persistent.barrier_failures(device)
    _loops(cell, persistent.forward_steps, persistent.backward_steps, p)
    assert recurrent_persistent.barrier_failures(device) > before
    with caplog.at_level(logging.WARNING, logger=persistent.__name__):
        assert not persistent.self_check(device, 128)
    assert "barrier between steps timed out" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize(
    "kernel",
    ["gru_forward_kernel", "gru_backward_kernel", "rnn_forward_kernel", "rnn_backward_kernel"],
)
def test_every_variant_of_the_kernels_compiles_for_the_h100_without_register_spills(
    kernel: str,
) -> None:
    """As test_lstm_persistent's test of the LSTM's kernels: every variant a CUDA run can ask
    for (each tile width up to MAX_HIDDEN, with `hidden` a multiple of 16, not, or 1),
    compiled for sm_90 on this GPU-less machine, compiles and spills (almost) nothing."""
    module = CELLS[kernel[:3]][0].kernels()
    assert module is not None
    for hidden in (1, 5, 16, 24, 32, 40, 64, 100, recurrent_persistent.MAX_HIDDEN):
        registers, spill_bytes = _ptxas_usage(getattr(module, kernel), hidden)
        assert spill_bytes <= 64, (
            f"{kernel} at hidden {hidden}: {spill_bytes} bytes spilled ({registers} registers)"
        )
