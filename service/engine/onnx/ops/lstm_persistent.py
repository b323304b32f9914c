"""The CUDA LSTM's step loops as two persistent Triton kernels: every step of a direction in one
launch forward and one backward.

Why: at small sizes the per-step loops of lstm_fused_cell are bound by kernel latency, not
arithmetic. Even replayed as CUDA graphs (cuda_graph_loops.py) a step costs a product and a cell
kernel each way, ~96 dependent kernels per layer for 24 steps, and a 2-layer LSTM of hidden 128
at batch 8 took 2.99× torch's cuDNN on an H100 (bench/README.md, session 2). Here each direction
is one kernel forward and one backward that loop over the steps inside (_lstm_triton.py).

The contract is lstm_fused_cell's loops' (same arguments, same outputs, torch's gate order,
the activated gates as the backward's workspace), so lstm_fused_cell's forward_loops and
backward_loops take these loops in place of the eager or captured ones. Every step is still
computed one after the other and the backward still writes ∂L/∂h_t of every step
(`grad_hiddens`): the observability that issue 2 asks of recurrent ops is unchanged.

Used for float32 on CUDA with hidden ≤ MAX_HIDDEN where `triton` imports (it ships with torch's
CUDA builds). GRADHEALTH_LSTM_PERSISTENT=0 turns it off. Before the first LSTM of a hidden size
runs through them, the kernels are checked against the per-step loops on a small problem on
that device (`self_check`); if they differ, or fail to compile or launch (an older Triton, a
GPU it does not support), the process warns and that size goes back to the per-step loops,
which compute the same thing.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# Above this the captured per-step loops are faster (H100, one layer, 50 steps, batch 32,
# hidden 256: 0.51× cuDNN's time against these kernels' 0.91×; bench/README.md, session 9),
# and Triton 3.9's compiler aborts on the forward kernel at hidden 256
MAX_HIDDEN = 128
BLOCK_B = 16  # batch rows per program: tl.dot's smallest tile
# Hidden units per program (tl.dot's smallest N): hidden 128 is a group of 8 programs, each
# holding 32 KB of R in shared memory (32 units a program, or 8 warps, were slower on the H100)
BLOCK_U = 16
# tl.dot's input_precision: "ieee" is fp32 FMAs, as torch's fp32 matmuls (TF32 off by
# default); "tf32x3" (three TF32 tensor-core products, close to fp32) is the faster candidate
# bench/lstm_cuda.py --tf32x3 times
PRODUCT_PRECISION = "ieee"
# Polls of a step's barrier before it gives up (each an L2 atomic, ~1 µs): seconds, far beyond
# any step's work, so only a group whose programs are not all resident ever reaches it
SPIN_LIMIT = 1 << 22
# Warps per program; None: 4 (8 were slower on the H100; bench/lstm_cuda.py --warps overrides)
NUM_WARPS: int | None = None

KERNELS_MODULE = "service.engine.onnx.ops._lstm_triton"

# fp32 results of the same recurrence by two summation orders, over a few steps of unit-scale
# values: ~1e-6 apart; a race or a wrong index is off by far more
SELF_CHECK_TOLERANCE = 1e-3

StepsFn = Callable[..., tuple[Tensor, ...]]
_fallback: tuple[StepsFn, StepsFn] | None = None
_failed = False


def register_fallback(forward_steps: StepsFn, backward_steps: StepsFn) -> None:
    """The per-step loops to run when a kernel fails (lstm_fused_cell registers its own)."""
    global _fallback
    _fallback = (forward_steps, backward_steps)


@functools.cache
def kernels() -> ModuleType | None:
    """_lstm_triton, or None where triton does not import."""
    try:
        return importlib.import_module(KERNELS_MODULE)
    except ImportError:
        return None
    except Exception as error:  # a Triton whose jit lacks an option the kernels use
        logger.warning("persistent LSTM kernels unavailable (%s: %s)", type(error).__name__, error)
        return None


def loops_for(projected: Tensor) -> PersistentLoops | None:
    """The persistent loops when they apply to this LSTM's projected input, else None."""
    batch, hidden = projected.shape[-2], projected.shape[-1] // 4
    if (
        _failed
        or not projected.is_cuda
        or projected.dtype != torch.float32
        or hidden > MAX_HIDDEN
        or not _all_resident(projected.device, batch, hidden)
        or os.environ.get("GRADHEALTH_LSTM_PERSISTENT", "1") == "0"
        or kernels() is None
        or not self_check(projected.device, hidden)
    ):
        return None
    return _LOOPS


def _grid(batch: int, hidden: int) -> tuple[int, int]:
    """(unit blocks, batch blocks): a group of programs per BLOCK_B batch rows."""
    return _unit_blocks(hidden), -(-batch // BLOCK_B)


def _unit_blocks(hidden: int) -> int:
    return -(-hidden // _units_per_program(hidden))


def _units_per_program(hidden: int) -> int:
    # Triton's interpreter runs programs one after another: a group there is one program
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return _padded(hidden) if interpreted else BLOCK_U


def _padded(hidden: int) -> int:
    return max(16, 1 << max(0, hidden - 1).bit_length())


def _all_resident(device: torch.device, batch: int, hidden: int) -> bool:
    """Whether every program can be resident at once, one per multiprocessor, as the barriers
    between steps need (a larger batch takes the captured per-step loops, which are faster
    than cuDNN at such sizes anyway)."""
    units, batches = _grid(batch, hidden)
    return units * batches <= _multiprocessors(device)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


_barrier_failures: dict[torch.device, Tensor] = {}


def barrier_failures(device: torch.device) -> int:
    """How many programs' step barriers gave up on `device` since the process started (each
    such launch's results are wrong); reading it waits for the GPU."""
    counter = _barrier_failures.get(_indexed(device))
    return 0 if counter is None else int(counter.item())


def _failure_counter(device: torch.device) -> Tensor:
    device = _indexed(device)
    if device not in _barrier_failures:
        _barrier_failures[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _barrier_failures[device]


def _indexed(device: torch.device) -> torch.device:
    """`cuda` as `cuda:<current>`: one counter per GPU however it is named."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


# The self-check's problem: two programs (batch > BLOCK_B), a few steps
_CHECK_STEPS, _CHECK_BATCH = 4, BLOCK_B + 3


@functools.cache
def self_check(device: torch.device, hidden: int) -> bool:
    """Whether the kernels compute what the per-step loops compute, on a small random problem
    of this hidden size (the kernels' tiles depend on it) on this device: once per process and
    size, before any model's LSTM runs through them. A compiler or GPU on which the kernels
    misbehave (a race between steps would give wrong numbers, not an error) then costs speed,
    never correctness: the LSTMs of that size take the per-step loops, with a warning."""
    assert _fallback is not None, "lstm_fused_cell registers the per-step loops"
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device)

    steps, batch = _CHECK_STEPS, _CHECK_BATCH
    inputs = (randn(steps, batch, 4 * hidden), randn(4 * hidden, hidden, scale=hidden**-0.5))
    h0, c0 = randn(batch, hidden), randn(batch, hidden)
    grads = (randn(steps, batch, hidden), randn(batch, hidden), randn(batch, hidden))
    try:
        failures = barrier_failures(device)
        with torch.no_grad():
            ours = list(forward_steps(*inputs, h0, c0))
            ours += backward_steps(*grads, ours[1], ours[2], c0, inputs[1])
        if barrier_failures(device) != failures:
            raise RuntimeError("a barrier between steps timed out")
    except Exception as error:  # compile errors come in many types
        logger.warning(
            "persistent LSTM kernels failed to run (%s: %s); using the per-step loops",
            type(error).__name__,
            error,
        )
        return False
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference in fp32, as the kernels
    try:
        with torch.no_grad():
            theirs = list(_fallback[0](*inputs, h0, c0))
            theirs += _fallback[1](*grads, theirs[1], theirs[2], c0, inputs[1])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    worst = max(float((a - b).abs().max()) for a, b in zip(ours, theirs, strict=True))
    if worst > SELF_CHECK_TOLERANCE:
        logger.warning(
            "persistent LSTM kernels differ from the per-step loops by %.2e at hidden %d on %s; "
            "using the per-step loops",
            worst,
            hidden,
            device,
        )
        return False
    return True


def _tiles(hidden: int) -> dict[str, int | str | bool]:
    block_h = _padded(hidden)
    return {
        "BLOCK_B": BLOCK_B,
        "BLOCK_H": block_h,
        "BLOCK_U": _units_per_program(hidden),
        "PRECISION": PRODUCT_PRECISION,
        "num_warps": NUM_WARPS or 4,
        # no software pipelining: it would prefetch step t + 1's hidden state (or gate
        # gradients) before step t has stored them; the loop's order is the algorithm
        "num_stages": 1,
        # a·b + c contracted to one FMA, as CUDA compiles by default (Triton 3.9 warns unless
        # it is said; its default changes in 3.10)
        "enable_fp_fusion": True,
    }


def _barriers(device: torch.device, batch: int, hidden: int) -> tuple[Tensor, Tensor, int]:
    """A launch's barrier arguments: zeroed arrival counters (one per group), the device's
    failure counter, the spin limit."""
    groups = _grid(batch, hidden)[1]
    arrivals = torch.zeros(groups, dtype=torch.int32, device=device)
    return arrivals, _failure_counter(device), SPIN_LIMIT


def forward_steps(projected: Tensor, R: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, ...]:
    """The forward loop in one kernel: (h0 then every h_t [T + 1, B, H], cells [T, B, H],
    activated gates [T, B, 4H]), as lstm_fused_cell.forward_steps."""
    module = kernels()
    assert module is not None
    steps, batch, four_h = projected.shape
    hidden = four_h // 4
    hiddens = projected.new_empty(steps + 1, batch, hidden)
    cells = projected.new_empty(steps, batch, hidden)
    gates = torch.empty_like(projected)
    arrivals, failures, spin_limit = _barriers(projected.device, batch, hidden)
    module.lstm_forward_kernel[_grid(batch, hidden)](
        projected.contiguous(),
        R.t().contiguous(),
        h0.contiguous(),
        hiddens,
        c0.contiguous(),
        cells,
        gates,
        arrivals,
        failures,
        steps,
        batch,
        hidden,
        spin_limit,
        **_tiles(hidden),
    )
    return hiddens, cells, gates


def backward_steps(
    dY: Tensor,
    dh_last: Tensor,
    dc_last: Tensor,
    cells: Tensor,
    gates: Tensor,
    c0: Tensor,
    R: Tensor,
) -> tuple[Tensor, ...]:
    """The backward loop in one kernel: (∂L/∂gates [T, B, 4H], ∂L/∂c0, ∂L/∂h_t [T, B, H]), as
    lstm_fused_cell.backward_steps."""
    module = kernels()
    assert module is not None
    steps, batch, hidden = cells.shape
    grad_gates = torch.empty_like(gates)
    grad_hiddens = torch.empty_like(cells)
    grad_c0 = torch.empty_like(c0)
    arrivals, failures, spin_limit = _barriers(cells.device, batch, hidden)
    module.lstm_backward_kernel[_grid(batch, hidden)](
        dY.contiguous(),
        dh_last.contiguous(),
        dc_last.contiguous(),
        cells,
        gates,
        c0.contiguous(),
        R.contiguous(),
        grad_gates,
        grad_hiddens,
        grad_c0,
        arrivals,
        failures,
        steps,
        batch,
        hidden,
        spin_limit,
        **_tiles(hidden),
    )
    return grad_gates, grad_c0, grad_hiddens


class PersistentLoops:
    """forward/backward with lstm_fused_cell's loop contract; a kernel that fails to compile
    or launch turns the persistent path off for the process and runs the per-step loops."""

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        return self._run(forward_steps, 0, inputs)

    def backward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        return self._run(backward_steps, 1, inputs)

    @staticmethod
    def _run(kernel_steps: StepsFn, which: int, inputs: tuple[Tensor, ...]) -> tuple[Any, ...]:
        global _failed
        if not _failed:
            try:
                return kernel_steps(*inputs)
            except Exception as error:  # compile errors come in many types
                _failed = True
                logger.warning(
                    "persistent LSTM kernels failed (%s: %s); using the per-step loops",
                    type(error).__name__,
                    error,
                )
        assert _fallback is not None, "lstm_fused_cell registers the per-step loops"
        return _fallback[which](*inputs)


_LOOPS = PersistentLoops()
