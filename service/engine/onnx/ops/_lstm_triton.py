"""Triton kernels for lstm_persistent: a whole LSTM direction's steps in one launch each way.

The hidden units are split across programs, BLOCK_U units each, and a group of programs (one
per unit block) shares BLOCK_B rows of the batch. Each program keeps its columns of R (all four
gates) in shared memory for the whole launch, so R is read once per launch rather than once per
step, and walks the time steps in order (forward) or backwards (backward). A step's recurrent
product needs every unit of the previous step's hidden state (forward) or gate gradients
(backward), which the group's programs stored one step earlier: the group meets at a barrier
in global memory after each step (`_group_barrier`). The first version (session 4) ran one
program per batch block over every unit, re-reading R from L2 each step: on an H100 it ran at
~35 G multiply-adds/s on a single SM and took 1.9× cuDNN's time for one layer of hidden 128,
batch 8 (bench/README.md, session 9).

Every program of a group must be resident at once (a barrier waits for all of them):
recurrent_persistent launches at most one program per multiprocessor. A barrier gives up after
`spin_limit` polls and counts the failure in `barrier_failures` (results then are wrong, never
a hang); recurrent_persistent's self-check reads it.

The products use `input_precision=PRECISION`: full fp32, no TF32, like torch's default for fp32
matmuls. Gate order is torch's (i, f, g, o), the same as torch's fused cell kernels, so the
buffers match lstm_fused_cell's loops: `gates` holds the activated gates, `dgates` the
gradients of the pre-activations.

Importing this module needs `triton`; with TRITON_INTERPRET=1 set before the import the kernels
run on CPU tensors through Triton's interpreter (tests/unit/onnx/test_lstm_persistent.py). The
interpreter runs programs one after another, so there a group is one program (BLOCK_U covers
every unit) and its barriers pass at once.

The GRU's and tanh RNN's kernels (_gru_triton.py, _rnn_triton.py) are built the same way from
this module's helpers (`_sigmoid`, `_tanh`, the barrier, the tiles), which is why those take
the number of gate blocks rather than assuming four.
"""

from __future__ import annotations

import triton
import triton.language as tl

# What Triton would otherwise compile variants for: integers by value (== 1, a multiple of 16)
# and pointers by alignment. Steps and batch vary from model to model, each variant is a
# compile on first use, and pointers known to be 16-byte aligned made the compiler vectorise
# loads into 255 registers and 424 bytes of spill a thread (hidden 128; 72 registers and none
# without). `hidden` stays specialised: the variants that can run are the tile widths times
# three, and tests/unit/onnx/test_lstm_persistent.py (test_recurrent_persistent.py for the
# GRU's and RNN's kernels, which use these lists too) compiles every one for sm_90.
UNSPECIALIZED = ["steps", "batch", "spin_limit"]
FORWARD_POINTERS = ["projected", "weights_hh_t", "h0", "hiddens", "c0", "cells", "gates"]
BACKWARD_POINTERS = ["grad_y", "grad_h_last", "grad_c_last", "cells", "gates", "c0", "weights_hh"]
BACKWARD_POINTERS += ["grad_gates", "grad_hiddens", "grad_c0"]
COUNTERS = ["arrivals", "barrier_failures"]


@triton.jit
def _sigmoid(x):
    # tl.sigmoid's own formula, spelled out: tl.sigmoid is a @jit function of Triton's standard
    # library, compiled (not interpreted) when something imported triton before
    # TRITON_INTERPRET was set, as torch's exporters do in the same test process
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # 2·σ(2x) − 1: within ~1e-7 of tanh absolutely (fp32 rounding of the subtraction); the
    # interpreter that runs the kernels in CPU tests has no libdevice, and one formula for both
    # keeps the tested code the code that runs on the GPU
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _group_barrier(arrivals, target, spin_limit):
    """Wait until `target` arrivals are counted at `arrivals` (this program's included);
    True unless `spin_limit` polls ran out first. The block barrier before the release makes
    every thread's stores of this step part of what the release publishes; the acquire makes
    the group's stores visible to the loads after it."""
    tl.debug_barrier()
    seen = tl.atomic_add(arrivals, 1, sem="release") + 1
    spins = 0
    while (seen < target) & (spins < spin_limit):
        seen = tl.atomic_add(arrivals, 0, sem="acquire")
        spins += 1
    tl.debug_barrier()
    return seen >= target


@triton.jit
def _step_barrier(in_step, arrivals, target, spin_limit):
    """`in_step` and whether the group met at `_group_barrier`: after one failed wait the
    rest do not wait (the launch's results are flagged wrong already)."""
    limit = tl.where(in_step, spin_limit, 0)
    return in_step & _group_barrier(arrivals, target, limit)


@triton.jit
def _weight_tile(weights, k_stride, ks, units, hidden):
    """One gate's [BLOCK_H, BLOCK_U] tile that this program keeps: element (k, j) at
    `weights + k·k_stride + j` (zero outside the hidden size)."""
    at = ks[:, None] * k_stride + units[None, :]
    mask = (ks < hidden)[:, None] & (units < hidden)[None, :]
    return tl.load(weights + at, mask=mask, other=0.0)


@triton.jit
def _gate_tiles(weights, k_stride, gate_stride, ks, units, hidden):
    """The four gates' tiles (`_weight_tile`), gate q's at `weights + q·gate_stride`."""
    return (
        _weight_tile(weights, k_stride, ks, units, hidden),
        _weight_tile(weights + gate_stride, k_stride, ks, units, hidden),
        _weight_tile(weights + 2 * gate_stride, k_stride, ks, units, hidden),
        _weight_tile(weights + 3 * gate_stride, k_stride, ks, units, hidden),
    )


@triton.jit
def _program_tile(batch, hidden, GATES: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr):
    """This program's batch rows and hidden units: (rows, units, the rows' in-range mask, the
    [rows, units] mask, offsets into a [B, H] state and into gate block 0 of a step's
    [B, GATES·H] gates). Program axis 0 walks the unit blocks, so a group's programs are
    launched next to each other; axis 1 is the batch block."""
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    row_ok = rows < batch
    mask = row_ok[:, None] & (units < hidden)[None, :]
    state_at = rows[:, None] * hidden + units[None, :]
    gate_at = rows[:, None] * (GATES * hidden) + units[None, :]
    return rows, units, row_ok, mask, state_at, gate_at


@triton.jit
def _group_rows(rows, row_ok, ks, hidden, row_stride):
    """(offsets, mask) of every hidden unit of this program's rows in a buffer whose rows are
    `row_stride` apart: what the whole group stored in a step, read after the barrier."""
    return rows[:, None] * row_stride + ks[None, :], row_ok[:, None] & (ks < hidden)[None, :]


@triton.jit(
    do_not_specialize=UNSPECIALIZED, do_not_specialize_on_alignment=FORWARD_POINTERS + COUNTERS
)
def lstm_forward_kernel(
    projected,  # [T, B, 4H]: x_t·Wᵀ + biases, torch's gate order
    weights_hh_t,  # Rᵀ [H, 4H], contiguous
    h0,  # [B, H]
    hiddens,  # [T + 1, B, H] out: slot 0 gets h0 (the backward's dR reads h_{t-1}), t + 1 h_t
    c0,  # [B, H]
    cells,  # [T, B, H] out
    gates,  # [T, B, 4H] out: activated i, f, g, o
    arrivals,  # [batch blocks] int32, zeros on entry: the groups' barrier counters
    barrier_failures,  # [1] int32: += 1 per program whose barrier gave up
    steps,
    batch,
    hidden,
    spin_limit,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_U: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows, units, row_ok, mask, state_at, gate_at = _program_tile(batch, hidden, 4, BLOCK_B, BLOCK_U)
    ks = tl.arange(0, BLOCK_H)
    # Rᵀ's columns of this program's units, per gate block q: element (k, j) is Rᵀ[k, q·H + j]
    # (Rᵀ rather than R: read along its rows, the tiles go to shared memory in the layout the
    # products load with ldmatrix; read transposed from R they took scalar, conflicting loads)
    r_i, r_f, r_g, r_o = _gate_tiles(weights_hh_t, 4 * hidden, hidden, ks, units, hidden)
    group_size = tl.num_programs(0)
    group_arrivals = arrivals + tl.program_id(1)
    in_step = True
    c = tl.load(c0 + state_at, mask=mask, other=0.0)
    h_at, h_mask = _group_rows(rows, row_ok, ks, hidden, hidden)
    # h_{t-1}, every unit: h0 read here, later steps' after each barrier (loop-carried)
    h_prev = tl.load(h0 + h_at, mask=h_mask, other=0.0)
    tl.store(hiddens + state_at, tl.load(h0 + state_at, mask=mask, other=0.0), mask=mask)
    for t in range(steps):
        step_gates = projected + t * batch * 4 * hidden
        acc_i = tl.load(step_gates + gate_at, mask=mask, other=0.0)
        acc_f = tl.load(step_gates + hidden + gate_at, mask=mask, other=0.0)
        acc_g = tl.load(step_gates + 2 * hidden + gate_at, mask=mask, other=0.0)
        acc_o = tl.load(step_gates + 3 * hidden + gate_at, mask=mask, other=0.0)
        acc_i += tl.dot(h_prev, r_i, input_precision=PRECISION)
        acc_f += tl.dot(h_prev, r_f, input_precision=PRECISION)
        acc_g += tl.dot(h_prev, r_g, input_precision=PRECISION)
        acc_o += tl.dot(h_prev, r_o, input_precision=PRECISION)
        i = _sigmoid(acc_i)
        f = _sigmoid(acc_f)
        g = _tanh(acc_g)
        o = _sigmoid(acc_o)
        c = f * c + i * g
        h = o * _tanh(c)
        step_out = gates + t * batch * 4 * hidden
        tl.store(step_out + gate_at, i, mask=mask)
        tl.store(step_out + hidden + gate_at, f, mask=mask)
        tl.store(step_out + 2 * hidden + gate_at, g, mask=mask)
        tl.store(step_out + 3 * hidden + gate_at, o, mask=mask)
        tl.store(cells + t * batch * hidden + state_at, c, mask=mask)
        tl.store(hiddens + (t + 1) * batch * hidden + state_at, h, mask=mask)
        # h_t complete (every unit block's) before any program of the group reads it
        in_step = _step_barrier(in_step, group_arrivals, (t + 1) * group_size, spin_limit)
        # h_t, every unit, as the group stored it: from L2 (".cg"), not this SM's L1
        h_prev = tl.load(
            hiddens + (t + 1) * batch * hidden + h_at, mask=h_mask, other=0.0, cache_modifier=".cg"
        )
    tl.atomic_add(barrier_failures, tl.where(in_step, 0, 1))


@triton.jit(
    do_not_specialize=UNSPECIALIZED, do_not_specialize_on_alignment=BACKWARD_POINTERS + COUNTERS
)
def lstm_backward_kernel(
    grad_y,  # [T, B, H]: ∂L/∂Y
    grad_h_last,  # [B, H]: ∂L/∂h_T
    grad_c_last,  # [B, H]: ∂L/∂c_T
    cells,  # [T, B, H]
    gates,  # [T, B, 4H]: activated i, f, g, o
    c0,  # [B, H]
    weights_hh,  # R [4H, H]
    grad_gates,  # [T, B, 4H] out: ∂L/∂pre-activations
    grad_hiddens,  # [T, B, H] out: ∂L/∂h_t through Y and the recurrence
    grad_c0,  # [B, H] out
    arrivals,  # [batch blocks] int32, zeros on entry: the groups' barrier counters
    barrier_failures,  # [1] int32: += 1 per program whose barrier gave up
    steps,
    batch,
    hidden,
    spin_limit,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_U: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows, units, row_ok, mask, state_at, gate_at = _program_tile(batch, hidden, 4, BLOCK_B, BLOCK_U)
    ks = tl.arange(0, BLOCK_H)
    # R's columns of this program's units, per gate block q: element (k, j) is R[q·H + k, j]
    r_i, r_f, r_g, r_o = _gate_tiles(weights_hh, hidden, hidden * hidden, ks, units, hidden)
    group_size = tl.num_programs(0)
    group_arrivals = arrivals + tl.program_id(1)
    in_step = True
    gate_rows_at, gate_rows_mask = _group_rows(rows, row_ok, ks, hidden, 4 * hidden)
    dc = tl.load(grad_c_last + state_at, mask=mask, other=0.0)
    # ∂L/∂h_T reaches the last step only: added at the first iteration, zero afterwards
    # (loop-carried rather than a load masked by `t == steps - 1`: scalar-and-block masks
    # are not accepted by every Triton version's interpreter)
    extra = tl.load(grad_h_last + state_at, mask=mask, other=0.0)
    # dgates_{t+1}, every unit (loop-carried: zeros past the last step, then each step's as
    # the group stored it, read after the barrier). tl.full, not tl.zeros: tl.zeros is a @jit
    # function of Triton's standard library, which the interpreter cannot call where triton
    # was imported before TRITON_INTERPRET was set (see _sigmoid)
    dg_i = tl.full([BLOCK_B, BLOCK_H], 0.0, tl.float32)
    dg_f = tl.full([BLOCK_B, BLOCK_H], 0.0, tl.float32)
    dg_g = tl.full([BLOCK_B, BLOCK_H], 0.0, tl.float32)
    dg_o = tl.full([BLOCK_B, BLOCK_H], 0.0, tl.float32)
    for s in range(steps):
        t = steps - 1 - s
        dh = tl.load(grad_y + t * batch * hidden + state_at, mask=mask, other=0.0) + extra
        extra = extra * 0.0
        # through the recurrence: Σ_n dgates_{t+1}[b, n]·R[n, j]
        dh += tl.dot(dg_i, r_i, input_precision=PRECISION)
        dh += tl.dot(dg_f, r_f, input_precision=PRECISION)
        dh += tl.dot(dg_g, r_g, input_precision=PRECISION)
        dh += tl.dot(dg_o, r_o, input_precision=PRECISION)
        step_gates = gates + t * batch * 4 * hidden
        i = tl.load(step_gates + gate_at, mask=mask, other=0.0)
        f = tl.load(step_gates + hidden + gate_at, mask=mask, other=0.0)
        g = tl.load(step_gates + 2 * hidden + gate_at, mask=mask, other=0.0)
        o = tl.load(step_gates + 3 * hidden + gate_at, mask=mask, other=0.0)
        tanh_c = _tanh(tl.load(cells + t * batch * hidden + state_at, mask=mask, other=0.0))
        # c_{t-1}: the previous step's cell, or c0 at the first step (slot max(t - 1, 0) is
        # read either way so that no address leaves the buffer)
        earlier = cells + tl.maximum(t - 1, 0) * batch * hidden
        c_prev = tl.where(
            t > 0,
            tl.load(earlier + state_at, mask=mask, other=0.0),
            tl.load(c0 + state_at, mask=mask, other=0.0),
        )
        dc += dh * o * (1.0 - tanh_c * tanh_c)
        step_out = grad_gates + t * batch * 4 * hidden
        tl.store(step_out + gate_at, dc * g * i * (1.0 - i), mask=mask)
        tl.store(step_out + hidden + gate_at, dc * c_prev * f * (1.0 - f), mask=mask)
        tl.store(step_out + 2 * hidden + gate_at, dc * i * (1.0 - g * g), mask=mask)
        tl.store(step_out + 3 * hidden + gate_at, dh * tanh_c * o * (1.0 - o), mask=mask)
        tl.store(grad_hiddens + t * batch * hidden + state_at, dh, mask=mask)
        dc = dc * f
        # dgates_t complete before any program of the group reads it for step t - 1
        in_step = _step_barrier(in_step, group_arrivals, (s + 1) * group_size, spin_limit)
        # every gate gradient of step t as the group stored it: from L2 (".cg"), not this
        # SM's L1
        done = grad_gates + t * batch * 4 * hidden + gate_rows_at
        dg_i = tl.load(done, mask=gate_rows_mask, other=0.0, cache_modifier=".cg")
        dg_f = tl.load(done + hidden, mask=gate_rows_mask, other=0.0, cache_modifier=".cg")
        dg_g = tl.load(done + 2 * hidden, mask=gate_rows_mask, other=0.0, cache_modifier=".cg")
        dg_o = tl.load(done + 3 * hidden, mask=gate_rows_mask, other=0.0, cache_modifier=".cg")
    tl.store(grad_c0 + state_at, dc, mask=mask)
    tl.atomic_add(barrier_failures, tl.where(in_step, 0, 1))
