"""Triton kernels for rnn_persistent: a whole tanh RNN direction's steps in one launch each way.

_lstm_triton.py's design (see there) for h_t = tanh(x_t·Wᵀ + b + h_{t-1}·Rᵀ), from its helpers:
the hidden units split across programs, BLOCK_U each, a group of programs per BLOCK_B batch
rows, each program holding its columns of R for the whole launch, and the group meeting at a
barrier in global memory after each step. The contract is rnn_sequence's Python loops'
(`_forward_steps`, `_backward_steps`), except that the forward writes Y to its own buffer
rather than over the projected input (rnn_sequence uses only what the loop returns).
"""

from __future__ import annotations

import triton
import triton.language as tl

from service.engine.onnx.ops._lstm_triton import (
    COUNTERS,
    UNSPECIALIZED,
    _group_rows,
    _program_tile,
    _step_barrier,
    _tanh,
    _weight_tile,
)

FORWARD_POINTERS = ["projected", "weights_hh_t", "h0", "hiddens"]
BACKWARD_POINTERS = ["grad_y", "grad_h_last", "hiddens", "weights_hh", "grad_pre", "grad_hiddens"]


@triton.jit(
    do_not_specialize=UNSPECIALIZED, do_not_specialize_on_alignment=FORWARD_POINTERS + COUNTERS
)
def rnn_forward_kernel(
    projected,  # [T, B, H]: x_t·Wᵀ + b
    weights_hh_t,  # Rᵀ [H, H], contiguous
    h0,  # [B, H]
    hiddens,  # [T, B, H] out: Y, h_t
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
    rows, units, row_ok, mask, state_at, _ = _program_tile(batch, hidden, 1, BLOCK_B, BLOCK_U)
    ks = tl.arange(0, BLOCK_H)
    # Rᵀ's columns of this program's units: element (k, j) is Rᵀ[k, j]
    r_t = _weight_tile(weights_hh_t, hidden, ks, units, hidden)
    group_size = tl.num_programs(0)
    group_arrivals = arrivals + tl.program_id(1)
    in_step = True
    h_at, h_mask = _group_rows(rows, row_ok, ks, hidden, hidden)
    # h_{t-1}, every unit: h0 read here, later steps' after each barrier (loop-carried)
    h_prev = tl.load(h0 + h_at, mask=h_mask, other=0.0)
    for t in range(steps):
        step = t * batch * hidden
        pre = tl.load(projected + step + state_at, mask=mask, other=0.0)
        h = _tanh(pre + tl.dot(h_prev, r_t, input_precision=PRECISION))
        tl.store(hiddens + step + state_at, h, mask=mask)
        # h_t complete (every unit block's) before any program of the group reads it
        in_step = _step_barrier(in_step, group_arrivals, (t + 1) * group_size, spin_limit)
        # h_t, every unit, as the group stored it: from L2 (".cg"), not this SM's L1
        h_prev = tl.load(hiddens + step + h_at, mask=h_mask, other=0.0, cache_modifier=".cg")
    tl.atomic_add(barrier_failures, tl.where(in_step, 0, 1))


@triton.jit(
    do_not_specialize=UNSPECIALIZED, do_not_specialize_on_alignment=BACKWARD_POINTERS + COUNTERS
)
def rnn_backward_kernel(
    grad_y,  # [T, B, H]: ∂L/∂Y
    grad_h_last,  # [B, H]: ∂L/∂h_T
    hiddens,  # [T, B, H]: Y
    weights_hh,  # R [H, H]
    grad_pre,  # [T, B, H] out: ∂L/∂pre-activations
    grad_hiddens,  # [T, B, H] out: ∂L/∂h_t through Y and the recurrence
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
    rows, units, row_ok, mask, state_at, _ = _program_tile(batch, hidden, 1, BLOCK_B, BLOCK_U)
    ks = tl.arange(0, BLOCK_H)
    # R's columns of this program's units: element (k, j) is R[k, j]
    r = _weight_tile(weights_hh, hidden, ks, units, hidden)
    group_size = tl.num_programs(0)
    group_arrivals = arrivals + tl.program_id(1)
    in_step = True
    pre_at, pre_mask = _group_rows(rows, row_ok, ks, hidden, hidden)
    # ∂L/∂h_T reaches the last step only: added at the first iteration, zero afterwards
    # (loop-carried: see _lstm_triton's backward kernel)
    extra = tl.load(grad_h_last + state_at, mask=mask, other=0.0)
    # ∂L/∂pre_{t+1}, every unit (loop-carried: zeros past the last step, then each step's as
    # the group stored it, read after the barrier)
    dpre_next = tl.full([BLOCK_B, BLOCK_H], 0.0, tl.float32)
    for s in range(steps):
        t = steps - 1 - s
        step = t * batch * hidden
        dh = tl.load(grad_y + step + state_at, mask=mask, other=0.0) + extra
        extra = extra * 0.0
        # through step t + 1's product with R: Σ_n dpre_{t+1}[b, n]·R[n, j]
        dh += tl.dot(dpre_next, r, input_precision=PRECISION)
        y = tl.load(hiddens + step + state_at, mask=mask, other=0.0)
        tl.store(grad_pre + step + state_at, dh * (1.0 - y * y), mask=mask)
        tl.store(grad_hiddens + step + state_at, dh, mask=mask)
        # ∂L/∂pre_t complete before any program of the group reads it for step t - 1
        in_step = _step_barrier(in_step, group_arrivals, (s + 1) * group_size, spin_limit)
        # from L2 (".cg"), not this SM's L1
        dpre_next = tl.load(
            grad_pre + step + pre_at, mask=pre_mask, other=0.0, cache_modifier=".cg"
        )
    tl.atomic_add(barrier_failures, tl.where(in_step, 0, 1))
