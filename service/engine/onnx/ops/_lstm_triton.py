"""Triton kernels for lstm_persistent: a whole LSTM direction's steps in one launch each way.

Each program owns up to BLOCK_B rows of the batch and every hidden unit, and walks the time
steps in order (forward) or backwards (backward) inside the kernel. The recurrent product of a
step reads the previous step's hidden state (forward) or gate gradients (backward) back from
global memory, where the same program stored them one step earlier, in BLOCK_K-wide chunks;
`debug_barrier` (a block-wide barrier) between steps makes those stores visible to every thread
of the program. R is re-read from L2 each step. The products use `input_precision=PRECISION`: full
fp32, no TF32, like torch's default for fp32 matmuls. The reduction over k is a loop (`range`),
not unrolled (`tl.static_range`): unrolled, the compiler issued every chunk's loads at once and
spilled kilobytes of registers per thread.

Gate order is torch's (i, f, g, o), the same as torch's fused cell kernels, so the buffers match
lstm_fused_cell's loops: `gates` holds the activated gates, `dgates` the gradients of the
pre-activations.

Importing this module needs `triton`; with TRITON_INTERPRET=1 set before the import the kernels
run on CPU tensors through Triton's interpreter (tests/unit/onnx/test_lstm_persistent.py).
"""

from __future__ import annotations

import triton
import triton.language as tl


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
def _program_tile(batch, hidden, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's batch rows and every hidden unit: (rows, units, their in-range masks,
    the [rows, units] mask, offsets into a [B, H] state and into gate block 0 of [B, 4H])."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = tl.arange(0, BLOCK_H)
    row_ok = rows < batch
    unit_ok = units < hidden
    mask = row_ok[:, None] & unit_ok[None, :]
    state_at = rows[:, None] * hidden + units[None, :]
    gate_at = rows[:, None] * (4 * hidden) + units[None, :]
    return rows, units, row_ok, unit_ok, mask, state_at, gate_at


@triton.jit
def lstm_forward_kernel(
    projected,  # [T, B, 4H]: x_t·Wᵀ + biases, torch's gate order
    weights_hh,  # R [4H, H]
    hiddens,  # [T + 1, B, H]: slot 0 holds h0 on entry; slot t + 1 gets h_t
    c0,  # [B, H]
    cells,  # [T, B, H] out
    gates,  # [T, B, 4H] out: activated i, f, g, o
    steps,
    batch,
    hidden,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows, units, row_ok, unit_ok, mask, state_at, gate_at = _program_tile(
        batch, hidden, BLOCK_B, BLOCK_H
    )
    c = tl.load(c0 + state_at, mask=mask, other=0.0)
    for t in range(steps):
        step_gates = projected + t * batch * 4 * hidden
        acc_i = tl.load(step_gates + gate_at, mask=mask, other=0.0)
        acc_f = tl.load(step_gates + hidden + gate_at, mask=mask, other=0.0)
        acc_g = tl.load(step_gates + 2 * hidden + gate_at, mask=mask, other=0.0)
        acc_o = tl.load(step_gates + 3 * hidden + gate_at, mask=mask, other=0.0)
        h_prev = hiddens + t * batch * hidden
        for k0 in range(0, BLOCK_H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < hidden
            h_chunk = tl.load(
                h_prev + rows[:, None] * hidden + ks[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            # Rᵀ's chunk [BLOCK_K, BLOCK_H] of gate block q: element (k, j) is R[q·H + j, k]
            r_at = units[None, :] * hidden + ks[:, None]
            r_mask = k_ok[:, None] & unit_ok[None, :]
            block = hidden * hidden
            r_i = tl.load(weights_hh + r_at, mask=r_mask, other=0.0)
            acc_i += tl.dot(h_chunk, r_i, input_precision=PRECISION)
            r_f = tl.load(weights_hh + block + r_at, mask=r_mask, other=0.0)
            acc_f += tl.dot(h_chunk, r_f, input_precision=PRECISION)
            r_g = tl.load(weights_hh + 2 * block + r_at, mask=r_mask, other=0.0)
            acc_g += tl.dot(h_chunk, r_g, input_precision=PRECISION)
            r_o = tl.load(weights_hh + 3 * block + r_at, mask=r_mask, other=0.0)
            acc_o += tl.dot(h_chunk, r_o, input_precision=PRECISION)
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
        tl.debug_barrier()  # h_t stored by every thread before the next step reads it


@triton.jit
def lstm_backward_kernel(
    grad_y,  # [T, B, H]: ∂L/∂Y
    grad_h_last,  # [B, H]: ∂L/∂h_T
    grad_c_last,  # [B, H]: ∂L/∂c_T
    cells,  # [T, B, H]
    gates,  # [T, B, 4H]: activated i, f, g, o
    c0,  # [B, H]
    weights_hh,  # R [4H, H]
    grad_gates,  # [T + 1, B, 4H] out: ∂L/∂pre-activations; slot T zero on entry
    grad_hiddens,  # [T, B, H] out: ∂L/∂h_t through Y and the recurrence
    grad_c0,  # [B, H] out
    steps,
    batch,
    hidden,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows, units, row_ok, unit_ok, mask, state_at, gate_at = _program_tile(
        batch, hidden, BLOCK_B, BLOCK_H
    )
    dc = tl.load(grad_c_last + state_at, mask=mask, other=0.0)
    # ∂L/∂h_T reaches the last step only: added at the first iteration, zero afterwards
    # (loop-carried rather than a load masked by `t == steps - 1`: scalar-and-block masks
    # are not accepted by every Triton version's interpreter)
    extra = tl.load(grad_h_last + state_at, mask=mask, other=0.0)
    for s in range(steps):
        t = steps - 1 - s
        dh = tl.load(grad_y + t * batch * hidden + state_at, mask=mask, other=0.0) + extra
        extra = extra * 0.0
        # through the recurrence: Σ_n dgates_{t+1}[b, n]·R[n, j] (slot T is zeros)
        later = grad_gates + (t + 1) * batch * 4 * hidden
        for q in tl.static_range(4):
            for k0 in range(0, BLOCK_H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < hidden
                dg_chunk = tl.load(
                    later + rows[:, None] * (4 * hidden) + q * hidden + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                r_chunk = tl.load(
                    weights_hh + (q * hidden + ks[:, None]) * hidden + units[None, :],
                    mask=k_ok[:, None] & unit_ok[None, :],
                    other=0.0,
                )
                dh += tl.dot(dg_chunk, r_chunk, input_precision=PRECISION)
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
        tl.debug_barrier()  # dgates_t stored by every thread before step t - 1 reads them
    tl.store(grad_c0 + state_at, dc, mask=mask)
