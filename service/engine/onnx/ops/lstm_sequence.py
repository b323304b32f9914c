"""One LSTM direction over a whole sequence, step by step, with a hand-written backward.

The unrolled autograd version (recurrent.py's steps) records ~9 autograd nodes per time step;
their bookkeeping, not the arithmetic, made the converted LSTM 3.5× slower than torch's fused
kernel. Here the forward is one loop (a product, the activations and the cell update per step,
written into preallocated [T, ...] buffers) and the backward is backpropagation through time
written out (a product and the gate gradients per step); the products that do not depend on
the previous step (x·Wᵀ, dX, dW, dR, db) run once for all steps. On the CPU both loops are C++
(service/engine/native/recurrent_cpu.cpp) where that is built, else the same loops in Python below.
Either way the steps run one at a time (no fused sequence kernel), and the gradient reaching each
step's hidden state, ∂L/∂h_t through `Y` and through the recurrence, is a by-product of the
backward: callers that pass a `hidden_grads` list get it ([T, batch, hidden], time order) when
the backward runs.

On CUDA the steps run through lstm_fused_cell's loops instead (one cell kernel per step each way,
or one persistent kernel for all of them), inside the same autograd Function: its forward and
its backward are each one pure function (lstm_fused_cell.forward_node / backward_node), replayed
as a CUDA graph once its inputs repeat (pooled_cuda_graphs.py).

Covers the LSTM that exporters write for `nn.LSTM`: activations sigmoid/tanh/tanh, no peepholes,
no clip, no coupled input-forget gate, every sequence full length. Gates are in ONNX order
i, o, f, c. Other LSTMs take the unrolled path in recurrent.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from service.engine.onnx.ops import _cpu_products, lstm_fused_cell, pooled_cuda_graphs
from service.engine.onnx.ops._sequence_common import native_loops, reorder_blocks
from service.engine.onnx.ops.integer import dynamically_dequantized
from service.engine.onnx.ops.lstm_products import GradPlan, input_grads, summed_bias


def lstm_direction(
    X: Tensor,
    W: Tensor,
    R: Tensor,
    B: Tensor | None,
    h0: Tensor,
    c0: Tensor | None,
    reverse: bool,
    hidden_grads: list[Tensor] | None,
    gate_blocks: list[int] | None = None,
    *,
    recurrent_bias: Tensor | None = None,
    onnx_shapes: bool = False,
    state_quantizer: StateQuantizer | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One direction of an ONNX LSTM node: B is the node's bias row [8H] (Wb then Rb), each half
    in the gates' order (`gate_blocks`, see lstm_sequence), or the input-side bias [4H] with
    `recurrent_bias` the recurrent one (torch's bias_ih and bias_hh)."""
    assert c0 is not None, "an LSTM always has a cell state"
    return lstm_sequence(
        X,
        W,
        R,
        B,
        h0,
        c0,
        reverse,
        hidden_grads,
        gate_blocks,
        recurrent_bias=recurrent_bias,
        onnx_shapes=onnx_shapes,
        state_quantizer=state_quantizer,
    )


def lstm_sequence(
    X: Tensor,
    W: Tensor,
    R: Tensor,
    bias: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    reverse: bool = False,
    hidden_grads: list[Tensor] | None = None,
    gate_blocks: list[int] | None = None,
    *,
    recurrent_bias: Tensor | None = None,
    onnx_shapes: bool = False,
    state_quantizer: StateQuantizer | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(Y [T, B, H], h_T [B, H], c_T [B, H]) for X [T, B, I], W [4H, I], R [4H, H] (either may
    carry a leading direction axis of 1), h0/c0 with B·H elements, and the biases as
    `summed_bias` reads them (None: no bias). `onnx_shapes`: the outputs as an ONNX LSTM node
    of one direction gives them, Y [T, 1, B, H], Y_h and Y_c [1, B, H].

    `gate_blocks`: which H-wide block of W, R and bias holds the gates i, o, f, c; None for
    ONNX's order [0, 1, 2, 3]; torch's parameters (i, f, g, o) are [0, 3, 1, 2].

    `state_quantizer`: what the recurrent product reads instead of h_{t-1} (a dynamically
    quantised LSTM's rounding, ops/recurrent.py QUANTIZED_STATE), its gradient passed straight
    through: the forward runs the C++ loop where it computes that quantizer itself
    (`dynamically_dequantized`, on the CPU), else the Python loop (the CUDA loops read h as it
    is); the backward is the usual one, with R's gradient from the values the steps read.

    Where the CPU Function applies (the usual case) the whole call, the reverse direction's
    time flip and the outputs' shapes included, is ONE autograd node: the views, slices and
    sums around it cost the small LSTM a tenth of its training step as separate nodes."""
    blocks = ONNX_GATE_BLOCKS if gate_blocks is None else list(gate_blocks)
    device_type = X.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:  # the products in autocast's dtype, as the unrolled path's would be
        dtype = torch.get_autocast_dtype(device_type)
        X, W, R, h0, c0 = (t.to(dtype) for t in (X, W, R, h0, c0))
        bias = None if bias is None else bias.to(dtype)
        recurrent_bias = None if recurrent_bias is None else recurrent_bias.to(dtype)
    fused = lstm_fused_cell.available(X) and state_quantizer is None
    python_forward = not fused and _native_forward(X, state_quantizer) is None
    if blocks != ONNX_GATE_BLOCKS and python_forward:
        # the Python loops read ONNX's order
        hidden = R.shape[-1]
        W = reorder_blocks(W.reshape(-1, W.shape[-1]), blocks)
        R = reorder_blocks(R.reshape(-1, hidden), blocks)
        summed = summed_bias(bias, recurrent_bias, hidden)
        bias = None if summed is None else reorder_blocks(summed, blocks)
        recurrent_bias, blocks = None, ONNX_GATE_BLOCKS
    args = (
        X,
        W,
        R,
        bias,
        recurrent_bias,
        h0,
        c0,
        hidden_grads,
        reverse,
        blocks,
        onnx_shapes,
        state_quantizer,
    )
    if not autocast:
        return _LSTMSequence.apply(*args)
    with torch.autocast(device_type, enabled=False):  # the loops' buffers keep one dtype
        return _LSTMSequence.apply(*args)


# What a step's recurrent product reads instead of h_{t-1} (see lstm_sequence)
StateQuantizer = Callable[[Tensor], Tensor]


def _native_forward(X: Tensor, state_quantizer: StateQuantizer | None) -> Any:
    """The C++ loops where they run X's forward: built, on the CPU, and no state quantizer
    or the one they compute themselves (dynamically_dequantized), else None."""
    if state_quantizer is not None and state_quantizer is not dynamically_dequantized:
        return None
    return native_loops(X)


# Which H-wide block of the gate axis holds i, o, f, c: ONNX's order
ONNX_GATE_BLOCKS = [0, 1, 2, 3]


class _LSTMSequence(torch.autograd.Function):
    """lstm_sequence's one autograd node: inputs as lstm_sequence takes them, X in time order
    (`reverse`: the loops run it backwards), no autograd op outside. The loops are this
    module's on the CPU (C++ where built) and lstm_fused_cell's on CUDA."""

    @staticmethod
    def forward(
        ctx: Any,
        X: Tensor,
        W: Tensor,
        R: Tensor,
        bias: Tensor | None,
        recurrent_bias: Tensor | None,
        h0: Tensor,
        c0: Tensor,
        hidden_grads: list[Tensor] | None,
        reverse: bool,
        gate_blocks: list[int],
        onnx_shapes: bool,
        state_quantizer: StateQuantizer | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        ctx.plan_shapes = (
            (X.shape, W.shape, R.shape, h0.shape, c0.shape),
            (
                None if bias is None else bias.shape,
                None if recurrent_bias is None else recurrent_bias.shape,
            ),
        )
        ctx.hidden_grads, ctx.reverse, ctx.onnx_shapes = hidden_grads, reverse, onnx_shapes
        ctx.gate_blocks = tuple(gate_blocks)
        # unused outputs' gradients stay None (no zero-filled [B, H] pair per call)
        ctx.set_materialize_grads(False)
        ctx.fused = lstm_fused_cell.available(X) and state_quantizer is None
        if ctx.fused:
            # the whole node in one function, replayed as a CUDA graph once its inputs repeat
            # (pooled_cuda_graphs.py). `states`: h0 then every h_t [T + 1, B, H] in the order
            # the steps ran; tanh(cells) is not kept: the backward recomputes it
            outputs = pooled_cuda_graphs.run(
                lstm_fused_cell.forward_node,
                (reverse, ctx.gate_blocks),
                X,
                W,
                R,
                bias,
                recurrent_bias,
                h0,
                c0,
            )
            states, cells, gates, h_last, c_last = (
                cast(Tensor, outputs[k]) for k in (0, 1, 2, 4, 5)
            )
            ctx.save_for_backward(X, W, R, h0, c0, gates, cells, None, states)
            Y = states[1:] if outputs[3] is None else outputs[3]
            return _LSTMSequence._outputs(ctx, Y, h_last, c_last)
        batch, hidden = X.shape[1], R.shape[-1]
        W, R = W.reshape(-1, W.shape[-1]), R.reshape(-1, hidden)
        h0, c0 = h0.reshape(batch, hidden), c0.reshape(batch, hidden)
        # in the order the steps run; contiguous: on a transposed X (a batch-first input)
        # F.linear takes matmul's path at half the speed, and the backward's dW product would
        # copy it again
        X = (X.flip(0) if reverse else X).contiguous()
        summed = summed_bias(bias, recurrent_bias, hidden)
        projected = _cpu_products.linear(X, W, summed)  # [T, B, 4H]: all steps at once
        loops = native_loops(X)  # the backward's too, whatever the forward's quantizer
        # R's gradient reads h_{t-1} as the steps read it: Y (h0 apart), or what was read
        read: Tensor | None = None
        if loops is not None and _native_forward(X, state_quantizer) is not None:
            packed_R = _cpu_products.packed_step_weight(R, batch)
            if state_quantizer is not None:  # rows as _forward_steps' `read` (the last unused)
                read = projected.new_zeros(X.shape[0] + 1, batch, hidden)
            gates, cells, tanh_cells, Y = loops.lstm_forward(
                projected.contiguous(), R, h0, c0, gate_blocks, packed_R, read
            )
        else:
            assert gate_blocks == ONNX_GATE_BLOCKS, "the Python loops read ONNX's gate order"
            gates, cells, tanh_cells, Y, read = _forward_steps(
                projected, R, h0, c0, state_quantizer
            )
        hiddens = Y if read is None else read
        ctx.save_for_backward(X, W, R, h0, c0, gates, cells, tanh_cells, hiddens)
        ctx.loops = loops
        # h_T and c_T as their own tensors: views of Y or of a saved buffer could be changed
        # in place by a caller and corrupt the backward
        h_last, c_last = Y[-1].clone(), cells[-1].clone()
        return _LSTMSequence._outputs(ctx, Y.flip(0) if reverse else Y, h_last, c_last)

    @staticmethod
    def _outputs(
        ctx: Any, Y: Tensor, h_last: Tensor, c_last: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Y in the input's time order, h_T, c_T, shaped as the caller asked."""
        if ctx.onnx_shapes:
            return Y.unsqueeze(1), h_last.unsqueeze(0), c_last.unsqueeze(0)
        return Y, h_last, c_last

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, dY: Tensor | None, dh_last: Tensor | None, dc_last: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        # `hiddens`: Y [T, B, H], or (fused) h0 then Y [T + 1, B, H]
        X, W, R, h0, c0, gates, cells, tanh_cells, hiddens = ctx.saved_tensors
        shapes, biases = ctx.plan_shapes
        x_shape, w_shape, r_shape, h0_shape, c0_shape = shapes
        plan = GradPlan(
            x_shape=x_shape,
            w_shape=w_shape,
            r_shape=r_shape,
            h0_shape=h0_shape,
            c0_shape=c0_shape,
            bias_shape=biases[0],
            recurrent_bias_shape=biases[1],
            needs=tuple(ctx.needs_input_grad[:7]),
            reverse=ctx.reverse,
        )
        collect = ctx.hidden_grads is not None
        if ctx.fused:
            *fused_grads, dhidden = pooled_cuda_graphs.run(
                lstm_fused_cell.backward_node,
                (ctx.gate_blocks, plan, collect),
                dY,
                dh_last,
                dc_last,
                X,
                W,
                R,
                h0,
                c0,
                gates,
                cells,
                hiddens,
            )
            if collect:
                assert dhidden is not None
                ctx.hidden_grads.append(dhidden)
            return (*fused_grads, None, None, None, None, None)
        steps, batch, hidden = cells.shape
        if dY is None:
            dY = cells.new_zeros(steps, batch, hidden)
        dY = dY.reshape(steps, batch, hidden)
        dY = dY.flip(0) if ctx.reverse else dY
        dh_last, dc_last = (
            _kept_zeros(batch, hidden, cells) if d is None else d.reshape(batch, hidden)
            for d in (dh_last, dc_last)
        )
        if ctx.loops is not None:
            packed_Rt = _cpu_products.packed_step_weight(R.t(), gates.shape[1])
            blocks = list(ctx.gate_blocks)
            dgates, dhidden, dc0 = ctx.loops.lstm_backward(
                dY, dh_last, dc_last, gates, cells, tanh_cells, c0, R, blocks, packed_Rt
            )
        else:
            dgates, dhidden, dc0 = _backward_steps(
                dY, dh_last, dc_last, gates, cells, tanh_cells, c0, R
            )
        if collect:
            ctx.hidden_grads.append(dhidden.flip(0) if ctx.reverse else dhidden)
        grads = input_grads(plan, X, W, R, h0, hiddens, dgates, dc0)
        return (*grads, None, None, None, None, None)


_kept: dict[tuple[int, int, torch.dtype, torch.device], Tensor] = {}


def _kept_zeros(batch: int, hidden: int, like: Tensor) -> Tensor:
    """A zeros [batch, hidden] tensor kept for reuse: the gradient of an unused h_T or c_T.
    The loops only read it (the C++ backward clones dc_last before updating it)."""
    key = (batch, hidden, like.dtype, like.device)
    zeros = _kept.get(key)
    if zeros is None:
        if len(_kept) >= 16:  # a few shapes in a process; never grows without bound
            _kept.clear()
        zeros = _kept[key] = like.new_zeros(batch, hidden)
    return zeros


def _forward_steps(
    projected: Tensor,
    R: Tensor,
    h0: Tensor,
    c0: Tensor,
    state_quantizer: StateQuantizer | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The forward loop in Python (where the C++ one is not built, for other dtypes, and with a
    `state_quantizer`): (activated gates i, o, f, c [T, B, 4H], cells, tanh(cells), Y [T, B, H],
    and with a quantizer the h_{t-1} each step read, [T + 1, B, H] as input_grads takes such a
    buffer (its last row unused), else None)."""
    steps, batch = projected.shape[0], projected.shape[1]
    hidden = R.shape[1]
    gates = torch.empty_like(projected)
    cells = projected.new_empty(steps, batch, hidden)
    tanh_cells = torch.empty_like(cells)
    Y = torch.empty_like(cells)
    # per-step views, made once: slicing inside the loop would cost as much as the ops
    p_t, g_t = projected.unbind(0), gates.unbind(0)
    sig_t, cand_t = gates[..., : 3 * hidden].unbind(0), gates[..., 3 * hidden :].unbind(0)
    i_t, o_t, f_t = (gates[..., k * hidden : (k + 1) * hidden].unbind(0) for k in range(3))
    c_t, tc_t, y_t = cells.unbind(0), tanh_cells.unbind(0), Y.unbind(0)
    R_t = R.t().contiguous()  # row-major operands: MKL is 1.5-3x slower on a transposed view
    read = None if state_quantizer is None else projected.new_zeros(steps + 1, batch, hidden)
    h, c = h0, c0
    for t in range(steps):
        if read is not None and state_quantizer is not None:
            h = read[t].copy_(state_quantizer(h))
        pre = torch.addmm(p_t[t], h, R_t, out=g_t[t])  # x_t·Wᵀ + b + h_{t-1}·Rᵀ
        torch.sigmoid(pre[:, : 3 * hidden], out=sig_t[t])
        torch.tanh(pre[:, 3 * hidden :], out=cand_t[t])
        torch.mul(f_t[t], c, out=c_t[t])
        c_t[t].addcmul_(i_t[t], cand_t[t])
        torch.tanh(c_t[t], out=tc_t[t])
        torch.mul(o_t[t], tc_t[t], out=y_t[t])
        h, c = y_t[t], c_t[t]
    return gates, cells, tanh_cells, Y, read


def _backward_steps(
    dY: Tensor,
    dh_last: Tensor,
    dc_last: Tensor,
    gates: Tensor,
    cells: Tensor,
    tanh_cells: Tensor,
    c0: Tensor,
    R: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backpropagation through time in Python: (dgates [T, B, 4H], ∂L/∂h_t [T, B, H], dc0)."""
    steps, batch, four_h = gates.shape
    hidden = four_h // 4
    i, o, f, g = gates.split(hidden, -1)
    c_prev = torch.cat([c0.unsqueeze(0), cells[:-1]], 0)
    # ∂L/∂(pre-activation) = dc·F for the i, f, c gates and dh·F for o, with F from the
    # forward's values alone: computed here for all steps at once
    factors = torch.empty_like(gates)
    F_i, F_o, F_f, F_c = factors.split(hidden, -1)
    torch.mul(g, i * (1 - i), out=F_i)
    torch.mul(tanh_cells, o * (1 - o), out=F_o)
    torch.mul(c_prev, f * (1 - f), out=F_f)
    torch.mul(i, 1 - g * g, out=F_c)
    dc_from_h = o * (1 - tanh_cells * tanh_cells)  # ∂c_t/∂h_t's factor: o·(1 − tanh²c)
    dgates = torch.empty_like(gates)
    dhidden = torch.empty_like(cells)  # ∂L/∂h_t, through Y and through the recurrence
    by_gate = (steps, batch, 4, hidden)
    f4_t, dg4_t = factors.view(by_gate).unbind(0), dgates.view(by_gate).unbind(0)
    dg_t = dgates.unbind(0)
    fo_t, dgo_t = F_o.unbind(0), dgates[..., hidden : 2 * hidden].unbind(0)
    a_t, f_t, dy_t, dh_t = dc_from_h.unbind(0), f.unbind(0), dY.unbind(0), dhidden.unbind(0)
    last = steps - 1
    dh = torch.add(dy_t[last], dh_last, out=dh_t[last])
    dc = torch.addcmul(dc_last, dh, a_t[last])
    for t in range(last, -1, -1):
        if t < last:
            dh = torch.addmm(dy_t[t], dg_t[t + 1], R, out=dh_t[t])
            dc = torch.addcmul(dc * f_t[t + 1], dh, a_t[t])
        torch.mul(f4_t[t], dc.unsqueeze(1), out=dg4_t[t])  # i, f, c gates (o overwritten)
        torch.mul(fo_t[t], dh, out=dgo_t[t])
    return dgates, dhidden, dc * f_t[0]
