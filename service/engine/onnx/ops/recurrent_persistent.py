"""What the CUDA recurrences' persistent Triton kernels share: every step of a direction in one
launch forward and one backward, for the LSTM (lstm_persistent.py), the GRU (gru_persistent.py)
and the tanh RNN (rnn_persistent.py).

Why: at small sizes the per-step loops are bound by kernel latency, not arithmetic. Even
replayed as CUDA graphs (cuda_graph_loops.py) a step costs a product and one to five small
kernels each way: a 2-layer LSTM of hidden 128 at batch 8 took 2.99× torch's cuDNN on an H100
(bench/README.md, session 2), the GRU and tanh RNN of bench/converter.py's rows 2.16× and 2.51×
on an H200 with their loops captured. Each cell's kernels (_lstm_triton.py, _gru_triton.py,
_rnn_triton.py) loop over the steps inside; every step is still computed one after the other
and the backward still writes ∂L/∂h_t of every step: the observability that issue 2 asks of
recurrent ops is unchanged.

Here: the launch geometry (a group of programs per BLOCK_B batch rows, BLOCK_U hidden units a
program, at most one program per multiprocessor so that a group's barriers can be met), the
barrier counters, and `PersistentLoops`, a cell's loops with its per-step loops' contract: when
they apply, a self-check against the per-step loops on a small problem before a hidden size's
first use, and the fall-back to the per-step loops when a kernel fails. A cell's module supplies
its kernels' launchers and the self-check's problem.

Used for float32 on CUDA with hidden ≤ MAX_HIDDEN where `triton` imports (it ships with torch's
CUDA builds). GRADHEALTH_LSTM_PERSISTENT=0 turns all three cells' kernels off (the name is the
LSTM's, the first cell that had them; one switch, as the three share the machinery and the
way they fail). Kernels that fail to compile or launch (an older Triton, a GPU it does not
support), or that differ from the per-step loops on the self-check, make the process warn and
that cell (or size) go back to the per-step loops, which compute the same thing.
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

# Above this the captured per-step loops are faster (H100, one LSTM layer, 50 steps, batch 32,
# hidden 256: 0.51× cuDNN's time against the kernels' 0.91×; bench/README.md, session 9), and
# Triton 3.9's compiler aborts on the LSTM's forward kernel at hidden 256. The GRU's and RNN's
# kernels keep the LSTM's bound: unmeasured above it.
MAX_HIDDEN = 128
BLOCK_B = 16  # batch rows per program: tl.dot's smallest tile
# Hidden units per program (tl.dot's smallest N): hidden 128 is a group of 8 programs, an
# LSTM's each holding 32 KB of R in shared memory (32 units a program, or 8 warps, were slower
# on the H100)
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
SWITCH = "GRADHEALTH_LSTM_PERSISTENT"

# fp32 results of the same recurrence by two summation orders, over a few steps of unit-scale
# values: ~1e-6 apart; a race or a wrong index is off by far more
SELF_CHECK_TOLERANCE = 1e-3
# The self-check's problem: two programs' batch blocks (batch > BLOCK_B), a few steps
CHECK_STEPS, CHECK_BATCH = 4, BLOCK_B + 3

StepsFn = Callable[..., Any]


class PersistentLoops:
    """One cell's persistent loops: `forward` and `backward` with the contract of its per-step
    loops (which the cell's Python module registers as the fall-back), and `applies`, whether
    they run for a tensor of a step's shape.

    `cell` is the module of the kernels' launchers (lstm_persistent, gru_persistent,
    rnn_persistent): its `forward_steps`, `backward_steps` (looked up at each call: tests
    replace them), `KERNELS_MODULE` and `check_passes(forward, backward, device, hidden)`,
    which runs a forward and a backward loop on the self-check's problem. A kernel that fails
    to compile or launch turns this cell's kernels off for the process (`failed`) and runs the
    per-step loops."""

    def __init__(self, cell: ModuleType, name: str) -> None:
        self.cell, self.name = cell, name
        self.failed = False
        self.fallback: tuple[StepsFn, StepsFn] | None = None
        self.logger = logging.getLogger(cell.__name__)
        # once per process (the module), and per device and hidden size (the check)
        self.kernels = functools.cache(self._import_kernels)
        self.self_check = functools.cache(self._self_check)

    def register_fallback(self, forward_steps: StepsFn, backward_steps: StepsFn) -> None:
        """The per-step loops to run when a kernel fails."""
        self.fallback = (forward_steps, backward_steps)

    def applies(self, tensor: Tensor, hidden: int) -> bool:
        """Whether the kernels run the loops of `tensor`, a [T, B, ·] buffer of the steps
        (float32 on CUDA, hidden ≤ MAX_HIDDEN, every program resident, kernels that import and
        passed the self-check, not switched off)."""
        return not (
            self.failed
            or not tensor.is_cuda
            or tensor.dtype != torch.float32
            # nothing to launch (and a zero-sized grid is an error): the loops return empties
            or tensor.numel() == 0
            or hidden > MAX_HIDDEN
            or not _all_resident(tensor.device, tensor.shape[-2], hidden)
            or os.environ.get(SWITCH, "1") == "0"
            or self.kernels() is None
            or not self.self_check(tensor.device, hidden)
        )

    def forward(self, *inputs: Tensor) -> Any:
        return self._run(self.cell.forward_steps, 0, inputs)

    def backward(self, *inputs: Tensor) -> Any:
        return self._run(self.cell.backward_steps, 1, inputs)

    def _run(self, kernel_steps: StepsFn, which: int, inputs: tuple[Tensor, ...]) -> Any:
        if not self.failed:
            try:
                return kernel_steps(*inputs)
            except Exception as error:  # compile errors come in many types
                self.failed = True
                self.logger.warning(
                    "persistent %s kernels failed (%s: %s); using the per-step loops",
                    self.name,
                    type(error).__name__,
                    error,
                )
        assert self.fallback is not None, f"the {self.name} registers its per-step loops"
        return self.fallback[which](*inputs)

    def _import_kernels(self) -> ModuleType | None:
        """The kernels' module, or None where triton does not import."""
        try:
            return importlib.import_module(self.cell.KERNELS_MODULE)
        except ImportError:
            return None
        except Exception as error:  # a Triton whose jit lacks an option the kernels use
            self.logger.warning(
                "persistent %s kernels unavailable (%s: %s)", self.name, type(error).__name__, error
            )
            return None

    def _self_check(self, device: torch.device, hidden: int) -> bool:
        """Whether the kernels compute what the per-step loops compute, on a small random
        problem of this hidden size (the kernels' tiles depend on it) on this device: once per
        process and size, before any model's layer runs through them. A compiler or GPU on
        which the kernels misbehave (a race between steps would give wrong numbers, not an
        error) then costs speed, never correctness: the layers of that size take the per-step
        loops, with a warning."""
        assert self.fallback is not None, f"the {self.name} registers its per-step loops"
        cell = self.cell
        try:
            failures = barrier_failures(device)
            with torch.no_grad():
                ours = cell.check_passes(cell.forward_steps, cell.backward_steps, device, hidden)
            if barrier_failures(device) != failures:
                raise RuntimeError("a barrier between steps timed out")
        except Exception as error:  # compile errors come in many types
            self.logger.warning(
                "persistent %s kernels failed to run (%s: %s); using the per-step loops",
                self.name,
                type(error).__name__,
                error,
            )
            return False
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference in fp32, as the kernels
        try:
            with torch.no_grad():
                theirs = cell.check_passes(*self.fallback, device, hidden)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        worst = max(float((a - b).abs().max()) for a, b in zip(ours, theirs, strict=True))
        if worst > SELF_CHECK_TOLERANCE:
            self.logger.warning(
                "persistent %s kernels differ from the per-step loops by %.2e at hidden %d on "
                "%s; using the per-step loops",
                self.name,
                worst,
                hidden,
                device,
            )
            return False
        return True


def check_tensors(device: torch.device) -> Callable[..., Tensor]:
    """randn(*shape, scale=1.0) for a self-check's problem: seeded, so that the kernels and the
    per-step loops each get the same problem made afresh (a per-step forward may activate its
    input in place)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device)

    return randn


def launch(kernel: Any, tensors: tuple[Tensor, ...], steps: int, batch: int, hidden: int) -> None:
    """`kernel` over the steps: its tensors, then the barriers' counters, the sizes and the
    tiles, as every cell's kernels take them."""
    arrivals, failures, spin_limit = _barriers(tensors[0].device, batch, hidden)
    kernel[_grid(batch, hidden)](
        *tensors, arrivals, failures, steps, batch, hidden, spin_limit, **_tiles(hidden)
    )


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
    such launch's results are wrong), every cell's kernels counted; reading it waits for the
    GPU."""
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


def _tiles(hidden: int) -> dict[str, int | str | bool]:
    return {
        "BLOCK_B": BLOCK_B,
        "BLOCK_H": _padded(hidden),
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
