"""Triton kernels for gru_persistent: a whole GRU direction's steps in one launch each way.

_lstm_triton.py's design (see there) for the GRU with linear_before_reset=1, from its helpers:
the hidden units split across programs, BLOCK_U each, a group of programs per BLOCK_B batch
rows, each program holding its columns of R (three gates) for the whole launch, and the group
meeting at a barrier in global memory after each step. The contract is gru_sequence's Python
loops' (`_forward_steps`, `_backward_steps`): ONNX gate order z, r, n; the forward stores the
activated gates, from_hidden = h_{t-1}·Rᵀ + recurrent_bias and Y; the backward the gradients
of the pre-activations in slots z, r, fh_n (the gradient of the n gate's h-side product), n,
and ∂L/∂h_t of every step.

A step's product needs every unit of h_{t-1} (forward) or of the previous step's z, r and fh_n
gradients (backward), which the group stored one step earlier; what a step needs of its own
units only is carried in registers instead: h_{t-1} (the z ⊙ h term) forward, ∂L/∂h_{t+1} ⊙
z_{t+1} (what step t+1's z ⊙ h term passes back) backward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from service.engine.onnx.ops._lstm_triton import (
    COUNTERS,
    UNSPECIALIZED,
    _group_rows,
    _program_tile,
    _sigmoid,
    _step_barrier,
    _tanh,
    _weight_tile,
)

FORWARD_POINTERS = ["projected", "weights_hh_t", "recurrent_bias", "h0", "gates", "from_hidden"]
FORWARD_POINTERS += ["hiddens"]
BACKWARD_POINTERS = ["grad_y", "grad_h_last", "gates", "from_hidden", "h0", "hiddens"]
BACKWARD_POINTERS += ["weights_hh", "grad_gates", "grad_hiddens"]


@triton.jit(
    do_not_specialize=UNSPECIALIZED, do_not_specialize_on_alignment=FORWARD_POINTERS + COUNTERS
)
def gru_forward_kernel(
    projected,  # [T, B, 3H]: x_t·Wᵀ + Wb + [Rb_z, Rb_r, 0], gates z, r, n
    weights_hh_t,  # Rᵀ [H, 3H], contiguous
    recurrent_bias,  # [3H]: what h·Rᵀ gets added, [0, 0, Rb_n]
    h0,  # [B, H]
    gates,  # [T, B, 3H] out: activated z, r, n
    from_hidden,  # [T, B, 3H] out: h_{t-1}·Rᵀ + recurrent_bias
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
    rows, units, row_ok, mask, state_at, gate_at = _program_tile(batch, hidden, 3, BLOCK_B, BLOCK_U)
    ks = tl.arange(0, BLOCK_H)
    # Rᵀ's columns of this program's units, per gate block q: element (k, j) is Rᵀ[k, q·H + j]
    r_z = _weight_tile(weights_hh_t, 3 * hidden, ks, units, hidden)
    r_r = _weight_tile(weights_hh_t + hidden, 3 * hidden, ks, units, hidden)
    r_n = _weight_tile(weights_hh_t + 2 * hidden, 3 * hidden, ks, units, hidden)
    unit_ok = units < hidden
    bias_z = tl.load(recurrent_bias + units, mask=unit_ok, other=0.0)[None, :]
    bias_r = tl.load(recurrent_bias + hidden + units, mask=unit_ok, other=0.0)[None, :]
    bias_n = tl.load(recurrent_bias + 2 * hidden + units, mask=unit_ok, other=0.0)[None, :]
    group_size = tl.num_programs(0)
    group_arrivals = arrivals + tl.program_id(1)
    in_step = True
    h_at, h_mask = _group_rows(rows, row_ok, ks, hidden, hidden)
    # h_{t-1}, every unit (the products'), and this program's units (the z ⊙ h term's): h0
    # here, later steps' after each barrier and from the step itself (loop-carried)
    h_prev = tl.load(h0 + h_at, mask=h_mask, other=0.0)
    h_own = tl.load(h0 + state_at, mask=mask, other=0.0)
    for t in range(steps):
        fh_z = tl.dot(h_prev, r_z, input_precision=PRECISION) + bias_z
        fh_r = tl.dot(h_prev, r_r, input_precision=PRECISION) + bias_r
        fh_n = tl.dot(h_prev, r_n, input_precision=PRECISION) + bias_n
        step_in = projected + t * batch * 3 * hidden
        z = _sigmoid(tl.load(step_in + gate_at, mask=mask, other=0.0) + fh_z)
        r = _sigmoid(tl.load(step_in + hidden + gate_at, mask=mask, other=0.0) + fh_r)
        n = _tanh(tl.load(step_in + 2 * hidden + gate_at, mask=mask, other=0.0) + r * fh_n)
        h = n + z * (h_own - n)  # (1 − z)·n + z·h, as torch.lerp
        step_gates = gates + t * batch * 3 * hidden
        tl.store(step_gates + gate_at, z, mask=mask)
        tl.store(step_gates + hidden + gate_at, r, mask=mask)
        tl.store(step_gates + 2 * hidden + gate_at, n, mask=mask)
        step_fh = from_hidden + t * batch * 3 * hidden
        tl.store(step_fh + gate_at, fh_z, mask=mask)
        tl.store(step_fh + hidden + gate_at, fh_r, mask=mask)
        tl.store(step_fh + 2 * hidden + gate_at, fh_n, mask=mask)
        tl.store(hiddens + t * batch * hidden + state_at, h, mask=mask)
        h_own = h
        # h_t complete (every unit block's) before any program of the group reads it
        in_step = _step_barrier(in_step, group_arrivals, (t + 1) * group_size, spin_limit)
        # h_t, every unit, as the group stored it: from L2 (".cg"), not this SM's L1
        h_prev = tl.load(
            hiddens + t * batch * hidden + h_at, mask=h_mask, other=0.0, cache_modifier=".cg"
        )
    tl.atomic_add(barrier_failures, tl.where(in_step, 0, 1))


@triton.jit(
    do_not_specialize=UNSPECIALIZED, do_not_specialize_on_alignment=BACKWARD_POINTERS + COUNTERS
)
def gru_backward_kernel(
    grad_y,  # [T, B, H]: ∂L/∂Y
    grad_h_last,  # [B, H]: ∂L/∂h_T
    gates,  # [T, B, 3H]: activated z, r, n
    from_hidden,  # [T, B, 3H]: h_{t-1}·Rᵀ + recurrent_bias
    h0,  # [B, H]
    hiddens,  # [T, B, H]: Y
    weights_hh,  # R [3H, H]
    grad_gates,  # [T, B, 4H] out: ∂L/∂pre-activations in slots z, r, fh_n, n
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
    rows, units, row_ok, mask, state_at, gate_at = _program_tile(batch, hidden, 3, BLOCK_B, BLOCK_U)
    grad_at = rows[:, None] * (4 * hidden) + units[None, :]  # slot 0 of [B, 4H]
    ks = tl.arange(0, BLOCK_H)
    # R's columns of this program's units, per gate block q: element (k, j) is R[q·H + k, j]
    r_z = _weight_tile(weights_hh, hidden, ks, units, hidden)
    r_r = _weight_tile(weights_hh + hidden * hidden, hidden, ks, units, hidden)
    r_n = _weight_tile(weights_hh + 2 * hidden * hidden, hidden, ks, units, hidden)
    group_size = tl.num_programs(0)
    group_arrivals = arrivals + tl.program_id(1)
    in_step = True
    slots_at, slots_mask = _group_rows(rows, row_ok, ks, hidden, 4 * hidden)
    # ∂L/∂h_{t+1} ⊙ z_{t+1}, this program's units: ∂L/∂h_T at the last step (loop-carried)
    through_z = tl.load(grad_h_last + state_at, mask=mask, other=0.0)
    # the z, r and fh_n gradients of step t + 1, every unit (loop-carried: zeros past the last
    # step, then each step's as the group stored it, read after the barrier). tl.full, not
    # tl.zeros: see _lstm_triton's backward kernel
    dg_z = tl.full([BLOCK_B, BLOCK_H], 0.0, tl.float32)
    dg_r = tl.full([BLOCK_B, BLOCK_H], 0.0, tl.float32)
    dg_fh = tl.full([BLOCK_B, BLOCK_H], 0.0, tl.float32)
    for s in range(steps):
        t = steps - 1 - s
        dh = tl.load(grad_y + t * batch * hidden + state_at, mask=mask, other=0.0) + through_z
        # through step t + 1's products with R: Σ_q Σ_n dgates_q[b, n]·R[q·H + n, j]
        dh += tl.dot(dg_z, r_z, input_precision=PRECISION)
        dh += tl.dot(dg_r, r_r, input_precision=PRECISION)
        dh += tl.dot(dg_fh, r_n, input_precision=PRECISION)
        step_gates = gates + t * batch * 3 * hidden
        z = tl.load(step_gates + gate_at, mask=mask, other=0.0)
        r = tl.load(step_gates + hidden + gate_at, mask=mask, other=0.0)
        n = tl.load(step_gates + 2 * hidden + gate_at, mask=mask, other=0.0)
        fh_n = tl.load(
            from_hidden + t * batch * 3 * hidden + 2 * hidden + gate_at, mask=mask, other=0.0
        )
        # h_{t-1}: the previous step's output, or h0 at the first step (slot max(t - 1, 0) is
        # read either way so that no address leaves the buffer)
        earlier = hiddens + tl.maximum(t - 1, 0) * batch * hidden
        h_prev = tl.where(
            t > 0,
            tl.load(earlier + state_at, mask=mask, other=0.0),
            tl.load(h0 + state_at, mask=mask, other=0.0),
        )
        along_n = (1.0 - z) * (1.0 - n * n)  # ∂h_t/∂(n's pre-activation)
        step_out = grad_gates + t * batch * 4 * hidden
        tl.store(step_out + grad_at, (h_prev - n) * (z * (1.0 - z)) * dh, mask=mask)
        tl.store(step_out + hidden + grad_at, along_n * fh_n * (r * (1.0 - r)) * dh, mask=mask)
        tl.store(step_out + 2 * hidden + grad_at, along_n * r * dh, mask=mask)
        tl.store(step_out + 3 * hidden + grad_at, along_n * dh, mask=mask)
        tl.store(grad_hiddens + t * batch * hidden + state_at, dh, mask=mask)
        through_z = dh * z
        # the gradients of step t complete before any program of the group reads them
        in_step = _step_barrier(in_step, group_arrivals, (s + 1) * group_size, spin_limit)
        # slots z, r, fh_n of step t as the group stored them: from L2 (".cg"), not this SM's L1
        done = grad_gates + t * batch * 4 * hidden + slots_at
        dg_z = tl.load(done, mask=slots_mask, other=0.0, cache_modifier=".cg")
        dg_r = tl.load(done + hidden, mask=slots_mask, other=0.0, cache_modifier=".cg")
        dg_fh = tl.load(done + 2 * hidden, mask=slots_mask, other=0.0, cache_modifier=".cg")
    tl.atomic_add(barrier_failures, tl.where(in_step, 0, 1))
