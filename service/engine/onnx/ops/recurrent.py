"""RNN, GRU and LSTM (default domain, opset 7 on), unrolled one time step at a time.

Why not `torch.nn.LSTM` & co.: the fused kernels hide the per-step states, and gradhealth's time
profile needs the gradient that reaches each step. Here the input projection `X·Wᵀ + Wb` is one
matmul over all steps (it has no recurrence), then a Python loop applies the recurrence with plain
torch ops, so autograd sees every step and `Y` stacks exactly the tensors the loop produced.
For RNN and LSTM the steps read R detached and R's gradient is one matmul per call
(`_DeferredRGrad` on the input projection): the per-step dR was the unrolled backward's largest
cost. Consequence: a second-order gradient through R raises (once_differentiable) instead of
being silently wrong; first-order gradients, per-step states and their hooks are unchanged.

Semantics follow the ONNX spec where it is precise and onnxruntime where it is not (the tests
compare against onnxruntime over the attribute grid):
- `sequence_lens`: a step at or past a sequence's length leaves its state unchanged and writes
  zeros to `Y`; the reverse direction therefore starts at the sequence's last valid step. A
  sequence of length 0 gives zero `Y_h` / `Y_c` (not its initial state), as onnxruntime does.
- `activation_alpha` / `activation_beta` are consumed in order by the activations that take them
  (as onnxruntime does); an activation left without a value uses onnxruntime's default, which
  for ThresholdedRelu, ScaledTanh and Affine is 0 rather than the spec's (see _ACTIVATIONS).
- `activations` must list every direction's functions (onnxruntime refuses a short list too).
- `clip` bounds every gate's pre-activation (peephole terms included).

Opset versions 7, 14 and 22 differ only in `layout` (added in 14, defaults to 0) and in the
element types allowed, so one builder per op serves all of them.

Also here, for the time profile: `sequence_axes(graph)` tells which axis of each graph input
a recurrent node reads as time (exporters produce both batch-first and sequence-first inputs),
and `RecurrentFn.record_steps` exposes each step's hidden state for gradient hooks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from service.engine.graph import Node, ObservableGraph
from service.engine.onnx.ops._sequence_common import reorder_blocks
from service.engine.onnx.ops.gru_sequence import gru_direction
from service.engine.onnx.ops.integer import dynamically_dequantized
from service.engine.onnx.ops.lstm_sequence import lstm_direction
from service.engine.onnx.ops.rnn_sequence import rnn_direction
from service.engine.onnx.registry import OpContext, UnsupportedAttribute, register


def _as_str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# name (lower case) → (takes alpha, takes beta, default alpha, default beta, function).
# Defaults are onnxruntime's: where the spec's "same as the ONNX operator" would give
# ThresholdedRelu alpha 1.0 and Affine/ScaledTanh alpha 1.0, onnxruntime uses 0 for all
# of them. A model means what its runtime computes, and the engine's conformance check
# compares against onnxruntime, so its values win.
_ActivationFn = Callable[[Tensor, float, float], Tensor]
_ACTIVATIONS: dict[str, tuple[bool, bool, float, float, _ActivationFn]] = {
    "sigmoid": (False, False, 0.0, 0.0, lambda x, a, b: torch.sigmoid(x)),
    "tanh": (False, False, 0.0, 0.0, lambda x, a, b: torch.tanh(x)),
    "relu": (False, False, 0.0, 0.0, lambda x, a, b: torch.relu(x)),
    "hardsigmoid": (True, True, 0.2, 0.5, lambda x, a, b: torch.clamp(a * x + b, 0.0, 1.0)),
    "leakyrelu": (True, False, 0.01, 0.0, lambda x, a, b: F.leaky_relu(x, a)),
    "thresholdedrelu": (True, False, 0.0, 0.0, lambda x, a, b: torch.where(x > a, x, 0.0)),
    "scaledtanh": (True, True, 0.0, 0.0, lambda x, a, b: a * torch.tanh(b * x)),
    "affine": (True, True, 0.0, 0.0, lambda x, a, b: a * x + b),
    "elu": (True, False, 1.0, 0.0, lambda x, a, b: F.elu(x, a)),
    "softsign": (False, False, 0.0, 0.0, lambda x, a, b: F.softsign(x)),
    "softplus": (False, False, 0.0, 0.0, lambda x, a, b: F.softplus(x)),
}


@dataclass(frozen=True)
class Activation:
    """One entry of the `activations` attribute, with its alpha/beta resolved."""

    name: str
    alpha: float
    beta: float

    def __call__(self, x: Tensor) -> Tensor:
        return _ACTIVATIONS[self.name.lower()][4](x, self.alpha, self.beta)

    @property
    def fn(self) -> Callable[[Tensor], Tensor]:
        """The activation as a one-argument callable, torch's own function where one exists:
        steps call it a few times per time step, so the indirection is left out."""
        direct = _DIRECT_ACTIVATIONS.get(self.name.lower())
        return direct if direct is not None else self


_DIRECT_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
}


def _activations(ctx: OpContext, per_direction: Sequence[str], directions: int) -> list[Activation]:
    """Resolve `activations` / `activation_alpha` / `activation_beta` into one list per node:
    `per_direction` entries for the first direction, then for the second if bidirectional."""
    names = [_as_str(n) for n in ctx.attr("activations", [])] or list(per_direction) * directions
    if len(names) != len(per_direction) * directions:  # onnxruntime refuses it too
        raise UnsupportedAttribute(
            f"activations has {len(names)} entries; {ctx.op_type} with {directions} direction(s) "
            f"needs {len(per_direction) * directions} ({len(per_direction)} per direction)"
        )
    alphas = list(ctx.attr("activation_alpha", []))
    betas = list(ctx.attr("activation_beta", []))
    resolved = []
    for name in names:
        spec = _ACTIVATIONS.get(name.lower())
        if spec is None:
            raise UnsupportedAttribute(
                f"activation {name!r} is not supported; supported: "
                + ", ".join(sorted(_ACTIVATIONS))
            )
        takes_alpha, takes_beta, alpha, beta, _ = spec
        if takes_alpha and alphas:
            alpha = float(alphas.pop(0))
        if takes_beta and betas:
            beta = float(betas.pop(0))
        resolved.append(Activation(name, alpha, beta))
    return resolved


@dataclass(frozen=True)
class _Settings:
    op_type: str
    directions: int  # 1 or 2
    reverse_only: bool  # direction == "reverse"
    layout: int
    clip: float | None
    activations: list[Activation]  # per_direction entries for each direction, in order
    num_outputs: int


def _settings(ctx: OpContext, per_direction: Sequence[str]) -> _Settings:
    direction = _as_str(ctx.attr("direction", "forward"))
    if direction not in ("forward", "reverse", "bidirectional"):
        raise UnsupportedAttribute(
            f"direction {direction!r}: expected forward, reverse or bidirectional"
        )
    directions = 2 if direction == "bidirectional" else 1
    layout = int(ctx.attr("layout", 0))
    if layout not in (0, 1):
        raise UnsupportedAttribute(f"layout {layout}: expected 0 or 1")
    clip = ctx.attr("clip")
    if clip is not None and float(clip) <= 0:
        raise UnsupportedAttribute(f"clip {clip}: expected a positive threshold")
    return _Settings(
        op_type=ctx.op_type,
        directions=directions,
        reverse_only=direction == "reverse",
        layout=layout,
        clip=None if clip is None else float(clip),
        activations=_activations(ctx, per_direction, directions),
        num_outputs=ctx.num_outputs,
    )


# A step: (input projection at t [B, G·H], hidden [B, H], cell [B, H] or None) → (hidden, cell)
Step = Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]

# One direction over the whole sequence: (X [T, batch, input], W [G·H, input], R [G·H, H],
# the node's bias row [2·G·H] or None, h0, c0 or None, reverse, a list collecting ∂L/∂h_t or
# None) → (Y [T, batch, H], h_T, c_T or None)
SequenceFn = Callable[..., tuple[Tensor, Tensor, Tensor | None]]

# A step maker: (R [G·H, H], Rb [G·H] or None, P [3·H] or None, activations, clip)
# → (step, the part of Rb that is folded into the input projection, or None).
# Folding a bias into the one big input matmul saves an add per step; it is exact wherever
# the bias is added outside any product (all but GRU's Rbh with linear_before_reset=1).
StepMaker = Callable[..., tuple[Step, Tensor | None]]


class RecurrentFn:
    """The NodeFn of one RNN/GRU/LSTM node.

    Set `record_steps = True` to keep, after each call, the hidden state computed at every step
    (`step_hidden[direction][t]`, shape [batch, hidden], in time order). Both `Y[t]` and the
    next step are computed from it, so a gradient hook on it sees the full gradient reaching
    step t (through `Y` and through the recurrence), which a hook on `Y` does not.
    """

    def __init__(
        self,
        settings: _Settings,
        make_step: StepMaker,
        gates: int,
        has_cell: bool,
        linear_recurrence: bool = False,
    ) -> None:
        self.settings = settings
        self.make_step = make_step
        self.gates = gates
        self.has_cell = has_cell  # LSTM: a cell state runs beside the hidden state
        # RNN, LSTM: every gate's pre-activation is x_t + h_{t-1}·Rᵀ (plus terms without R), so
        # R's gradient is Σ_t dx_tᵀ·h_{t-1} and is computed once per call (see _DeferredRGrad)
        self.linear_recurrence = linear_recurrence
        self.record_steps = False
        self.step_hidden: list[list[Tensor]] = []
        # Nodes as torch exports them (default activations, no clip/peepholes, GRU with
        # linear_before_reset=1) run each direction through a whole-sequence function: the
        # same per-step loop with a hand-written backward through time (lstm_sequence.py,
        # gru_sequence.py, rnn_sequence.py). Set by the builders; `whole_sequence = False`
        # forces the unrolled path (tests compare the two).
        self.sequence_fn: SequenceFn | None = None
        self.whole_sequence = False
        # Set `collect_hidden_grads` to get ∂L/∂h_t of every step from the whole-sequence path:
        # after the backward of each call, `hidden_grads[direction]` holds one
        # [T, batch, hidden] tensor in time order (empty if the unrolled path ran)
        self.collect_hidden_grads = False
        self.hidden_grads: list[list[Tensor]] = []
        # Where W, R and B hold each ONNX gate (LSTM: i, o, f, c; GRU: z, r, n), as H-wide
        # block indexes; None = ONNX's own order. Set by `use_gate_blocks` when the converter
        # feeds the node torch's parameters directly instead of the exporter's reordering
        # Slice/Concat chain (service/engine/onnx/recurrent_weights.py).
        self.gate_blocks: list[int] | None = None
        # A one-direction node's whole computation as ONE autograd node, its outputs shaped as
        # the node's (LSTM: lstm_sequence.lstm_direction with onnx_shapes): the per-direction
        # indexing, bias slicing and output stacking around `sequence_fn` would each be a node
        # of their own. Set by the LSTM builder; None: every node goes through `sequence_fn`.
        self.layer_fn: SequenceFn | None = None
        # What the recurrent product reads instead of h_{t-1}, where the model quantises it at
        # every step (onnxruntime's DynamicQuantizeLSTM, see QUANTIZED_STATE), in the unrolled
        # path (the whole-sequence function is given its own). Only for an LSTM: its h_{t-1}
        # enters a step through R alone.
        self.state_quantizer: Callable[[Tensor], Tensor] | None = None

    def __call__(
        self,
        X: Tensor,
        W: Tensor,
        R: Tensor,
        B: Tensor | None = None,
        sequence_lens: Tensor | None = None,
        initial_h: Tensor | None = None,
        initial_c: Tensor | None = None,
        P: Tensor | None = None,
    ) -> Tensor | tuple[Tensor | None, ...]:
        s = self.settings
        if s.layout == 1:  # [batch, seq, ...] → [seq, batch, ...]
            X = X.transpose(0, 1)
            initial_h = None if initial_h is None else initial_h.transpose(0, 1)
            initial_c = None if initial_c is None else initial_c.transpose(0, 1)
        # zero states that shape arithmetic made (ConstantOfShape of a Shape: the legacy
        # exporter's h0 for a dynamic batch) are CPU tensors, also when X is on a GPU
        initial_h = None if initial_h is None else initial_h.to(X.device)
        initial_c = None if initial_c is None else initial_c.to(X.device)
        steps, batch = X.shape[0], X.shape[1]
        hidden = R.shape[-1]
        if W.shape[0] != s.directions or W.shape[1] != self.gates * hidden:
            raise ValueError(
                f"{s.op_type}: W has shape {tuple(W.shape)}, expected "
                f"[{s.directions}, {self.gates * hidden}, input_size]"
            )
        outputs = self.one_direction(X, W, R, B, None, sequence_lens, initial_h, initial_c, P)
        if outputs is not None:
            return outputs
        valid = nonempty = None
        if sequence_lens is not None:
            lens = sequence_lens.to(device=X.device, dtype=torch.long)
            if bool((lens < steps).any()):  # all full length: the mask would change nothing
                t = torch.arange(steps, device=X.device).unsqueeze(1)
                valid = (t < lens.unsqueeze(0)).unsqueeze(-1)  # [seq, batch, 1]
                nonempty = (lens > 0).unsqueeze(-1)  # [batch, 1]
        ys: list[Tensor] = []
        last_h: list[Tensor] = []
        last_c: list[Tensor | None] = []
        self.step_hidden = []
        self.hidden_grads = [[] for _ in range(s.directions)]
        whole_sequence = (
            self.whole_sequence and P is None and valid is None and not self.record_steps
        )
        if self.gate_blocks is not None and not (whole_sequence and steps > 0):
            # the step functions read ONNX's order: gather the gate blocks into it
            W, R = reorder_blocks(W, self.gate_blocks, 1), reorder_blocks(R, self.gate_blocks, 1)
            bias_blocks = self.gate_blocks + [b + len(self.gate_blocks) for b in self.gate_blocks]
            B = None if B is None else reorder_blocks(B, bias_blocks, 1)
        for d in range(s.directions):
            reverse = s.reverse_only or d == 1
            h0 = X.new_zeros(batch, hidden) if initial_h is None else initial_h[d]
            c0 = None
            if self.has_cell:
                c0 = X.new_zeros(batch, hidden) if initial_c is None else initial_c[d]
            c: Tensor | None
            if whole_sequence and steps > 0 and self.sequence_fn is not None:
                sink = self.hidden_grads[d] if self.collect_hidden_grads else None
                bias = None if B is None else _direction(B, d)
                y, h, c = self.sequence_fn(
                    X, _direction(W, d), _direction(R, d), bias, h0, c0, reverse, sink
                )
            else:
                y, h, c = self._unrolled_direction(d, X, W, R, B, P, h0, c0, valid, reverse)
            if nonempty is not None:  # an empty sequence ends in zero states (as onnxruntime)
                h = torch.where(nonempty, h, torch.zeros_like(h))
                c = None if c is None else torch.where(nonempty, c, torch.zeros_like(c))
            ys.append(y)
            last_h.append(h)
            last_c.append(c)
        Y = _stacked(ys, 1)  # [seq, dirs, batch, hidden]
        Y_h = _stacked(last_h, 0)  # [dirs, batch, hidden]
        Y_c = None if last_c[0] is None else _stacked(last_c, 0)  # type: ignore[arg-type]
        if s.layout == 1:
            Y = Y.permute(2, 0, 1, 3)  # [batch, seq, dirs, hidden]
            Y_h = Y_h.transpose(0, 1)
            Y_c = None if Y_c is None else Y_c.transpose(0, 1)
        outputs = (Y, Y_h, Y_c)[: s.num_outputs]
        return outputs[0] if len(outputs) == 1 else outputs  # type: ignore[return-value]

    def one_direction(
        self,
        X: Tensor,
        W: Tensor,
        R: Tensor,
        B: Tensor | None,
        recurrent_bias: Tensor | None,
        sequence_lens: Tensor | None,
        initial_h: Tensor | None,
        initial_c: Tensor | None,
        P: Tensor | None,
    ) -> Tensor | tuple[Tensor | None, ...] | None:
        """The node's outputs through `layer_fn` (one autograd node), with W and R with or
        without their direction axis, B the node's bias row, or the input-side bias with
        `recurrent_bias` the recurrent one. None where that does not apply: no `layer_fn`,
        more than one direction, layout 1, sequence_lens, peepholes, recorded steps, no steps
        (the caller runs the node as it would otherwise)."""
        s = self.settings
        if (
            self.layer_fn is None
            or not self.whole_sequence
            or self.record_steps
            or s.directions != 1
            or s.layout != 0
            or sequence_lens is not None
            or P is not None
            or X.shape[0] == 0
        ):
            return None
        batch, hidden = X.shape[1], R.shape[-1]
        self.step_hidden = []
        self.hidden_grads = [[]]
        sink = self.hidden_grads[0] if self.collect_hidden_grads else None
        h0 = X.new_zeros(batch, hidden) if initial_h is None else initial_h
        c0 = X.new_zeros(batch, hidden) if initial_c is None else initial_c
        Y, Y_h, Y_c = self.layer_fn(
            X, W, R, B, h0, c0, s.reverse_only, sink, recurrent_bias=recurrent_bias
        )
        outputs = (Y, Y_h, Y_c)[: s.num_outputs]
        return outputs[0] if len(outputs) == 1 else outputs

    def _unrolled_direction(
        self,
        d: int,
        X: Tensor,
        W: Tensor,
        R: Tensor,
        B: Tensor | None,
        P: Tensor | None,
        h0: Tensor,
        c0: Tensor | None,
        valid: Tensor | None,
        reverse: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Direction `d` through the step functions, every step recorded by autograd."""
        s = self.settings
        steps, hidden = X.shape[0], R.shape[-1]
        per_dir = len(s.activations) // s.directions
        w_bias = None if B is None else B[d, : self.gates * hidden]
        r_bias = None if B is None else B[d, self.gates * hidden :]
        # Steps read R detached when its gradient is deferred to one matmul per call: a
        # per-step dR (a [G·H, batch]·[batch, H] product plus an accumulation into R's
        # gradient) was the largest cost of the unrolled backward.
        defer_r_grad = self.linear_recurrence and torch.is_grad_enabled() and R.requires_grad
        step, folded = self.make_step(
            R[d].detach() if defer_r_grad else R[d],
            r_bias,
            None if P is None else P[d],
            s.activations[d * per_dir : (d + 1) * per_dir],
            s.clip,
        )
        bias = w_bias if folded is None or w_bias is None else w_bias + folded
        # [seq, batch, G·H]: the input side has no recurrence, so one matmul for all steps
        projected = F.linear(X, W[d], bias)
        previous: list[Tensor] | None = None
        if defer_r_grad:
            previous = []  # filled by _unroll with the stacked h_{t-1}
            projected = _DeferredRGrad.apply(projected, R[d], previous)
        record: list[Tensor] | None = None
        if self.record_steps:
            record = [h0] * steps  # placeholders, all overwritten
            self.step_hidden.append(record)
        return self._unroll(projected, valid, reverse, h0, c0, step, record, previous)

    def _unroll(
        self,
        projected: Tensor,
        valid: Tensor | None,
        reverse: bool,
        h: Tensor,
        c: Tensor | None,
        step: Step,
        record: list[Tensor] | None,
        previous: list[Tensor] | None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        steps = projected.shape[0]
        inputs = projected.unbind(0)  # one autograd node for all steps, not one per index
        outputs: list[Tensor] = list(inputs)  # placeholders, all overwritten
        h_before: list[Tensor] = list(inputs)  # h_{t-1} as step t reads it (deferred dR only)
        quantized = self.state_quantizer
        for t in range(steps - 1, -1, -1) if reverse else range(steps):
            read = h if quantized is None else quantized(h)
            if previous is not None:
                h_before[t] = read
            h_new, c_new = step(inputs[t], read, c)
            if valid is None:
                h, c = h_new, c_new
                outputs[t] = h_new
            else:  # padding step: state held, output zero (as onnxruntime)
                outputs[t] = torch.where(valid[t], h_new, torch.zeros_like(h_new))
                h = torch.where(valid[t], h_new, h)
                if c is not None and c_new is not None:
                    c = torch.where(valid[t], c_new, c)
            if record is not None:
                record[t] = h_new
        if previous is not None:
            with torch.no_grad():  # a constant of R's gradient, not part of the graph
                previous.append(torch.stack(h_before, 0))
        return torch.stack(outputs, 0), h, c


class _DeferredRGrad(torch.autograd.Function):
    """Identity on the input projection [seq, batch, G·H] that also takes R [G·H, H].

    Its backward runs after every step's (each step reads a slice of the projection) and then
    holds dx_t = d loss / d(x_t + h_{t-1}·Rᵀ) for all t: R's gradient is one matmul,
    Σ_t dx_tᵀ·h_{t-1}, with the h_{t-1} that `_unroll` stacked into `previous` (detached: a
    second-order gradient through R is refused rather than wrong, see once_differentiable).
    """

    @staticmethod
    def forward(ctx: Any, projected: Tensor, R: Tensor, previous: list[Tensor]) -> Tensor:
        ctx.previous = previous
        return projected.view_as(projected)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        (h_before,) = ctx.previous
        gates = grad.shape[-1]
        r_grad = grad.reshape(-1, gates).t().mm(h_before.reshape(-1, h_before.shape[-1]))
        return grad, r_grad, None


def _clipped(clip: float | None) -> Callable[[Tensor], Tensor]:
    if clip is None:
        return lambda x: x
    return lambda x: torch.clamp(x, -clip, clip)


def _rnn_step(
    R: Tensor, r_bias: Tensor | None, _p: Tensor | None, acts: list[Activation], clip: float | None
) -> tuple[Step, Tensor | None]:
    f = acts[0].fn
    cl = _clipped(clip)
    R_t = R.t()

    def step(x: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return f(cl(torch.addmm(x, h, R_t))), None

    return step, r_bias


def _gru_step_factory(linear_before_reset: bool) -> StepMaker:
    def make(
        R: Tensor,
        r_bias: Tensor | None,
        _p: Tensor | None,
        acts: list[Activation],
        clip: float | None,
    ) -> tuple[Step, Tensor | None]:
        f, g = acts
        cl = _clipped(clip)
        hidden = R.shape[-1]
        R_t, R_zr_t, R_h_t = R.t(), R[: 2 * hidden].t(), R[2 * hidden :].t()
        folded, inner_bias = r_bias, None
        if linear_before_reset and r_bias is not None:
            # Rbh sits inside r ⊙ (h·Rhᵀ + Rbh): only Rbz, Rbr fold into the projection
            zr_bias, h_bias = r_bias[: 2 * hidden], r_bias[2 * hidden :]
            folded = torch.cat([zr_bias, torch.zeros_like(h_bias)])
            inner_bias = torch.cat([torch.zeros_like(zr_bias), h_bias])

        def step(x: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
            x_zr, x_h = x[:, : 2 * hidden], x[:, 2 * hidden :]
            if linear_before_reset:  # one matmul for all three gates
                h_all = torch.mm(h, R_t) if inner_bias is None else torch.addmm(inner_bias, h, R_t)
                z, r = f(cl(x_zr + h_all[:, : 2 * hidden])).chunk(2, -1)
                candidate = g(cl(x_h + r * h_all[:, 2 * hidden :]))
            else:
                z, r = f(cl(torch.addmm(x_zr, h, R_zr_t))).chunk(2, -1)
                candidate = g(cl(torch.addmm(x_h, r * h, R_h_t)))
            # (1 - z) ⊙ candidate + z ⊙ h, as one op
            return torch.lerp(candidate, h, z), None

        return step, folded

    return make


def _lstm_step(
    R: Tensor,
    r_bias: Tensor | None,
    P: Tensor | None,
    acts: list[Activation],
    clip: float | None,
    input_forget: bool = False,
) -> tuple[Step, Tensor | None]:
    f, g, h_act = (a.fn for a in acts)
    cl = _clipped(clip)
    hidden = R.shape[-1]
    R_t = R.t()
    p_i, p_o, p_f = (None, None, None) if P is None else P.split(hidden, -1)
    # gates are laid out i, o, f, c: without peepholes the first three share one call of f
    grouped = P is None and not input_forget
    if grouped and clip is None:
        return _default_lstm_step(R, f, g, h_act), r_bias

    def step(x: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
        assert c is not None
        gates = torch.addmm(x, h, R_t)
        if grouped:
            i, o, forget = f(cl(gates[:, : 3 * hidden])).chunk(3, -1)
            c_new = torch.addcmul(forget * c, i, g(cl(gates[:, 3 * hidden :])))
            return o * h_act(c_new), c_new
        x_i, x_o, x_f, x_c = gates.split(hidden, -1)
        if p_i is not None and p_f is not None:
            x_i = x_i + p_i * c
            x_f = x_f + p_f * c
        i = f(cl(x_i))
        forget = 1 - i if input_forget else f(cl(x_f))
        c_new = torch.addcmul(forget * c, i, g(cl(x_c)))
        if p_o is not None:
            x_o = x_o + p_o * c_new
        o = f(cl(x_o))
        return o * h_act(c_new), c_new

    return step, r_bias


def _default_lstm_step(R: Tensor, f: Any, g: Any, h_act: Any) -> Step:
    """The common case (torch's nn.LSTM: no peepholes, clip or coupled gates) with as few ops
    per step as the math allows: one split (its backward is one cat, where two slices would
    each zero-fill a [batch, 4·H] gradient), one call of f for i, o, f."""
    hidden = R.shape[-1]
    R_t = R.t()
    split = [3 * hidden, hidden]

    def step(x: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
        assert c is not None
        sig, cand = torch.addmm(x, h, R_t).split(split, 1)
        i, o, forget = f(sig).chunk(3, 1)
        c_new = torch.addcmul(forget * c, i, g(cand))
        return o * h_act(c_new), c_new

    return step


def _stacked(per_direction: Sequence[Tensor], dim: int) -> Tensor:
    """torch.stack; for one direction a view (no copy forward, none backward)."""
    if len(per_direction) == 1:
        return per_direction[0].unsqueeze(dim)
    return torch.stack(list(per_direction), dim)


def _direction(weights: Tensor, d: int) -> Tensor:
    """weights[d]; for one direction a squeeze, whose backward is a view where indexing's
    zero-fills a [1, G·H, ...] gradient and copies into it."""
    return weights.squeeze(0) if weights.shape[0] == 1 else weights[d]


def use_gate_blocks(fn: RecurrentFn, gate_blocks: list[int]) -> bool:
    """Make `fn` take W, R and B with its gates in `gate_blocks` order (see
    RecurrentFn.gate_blocks); False where its whole-sequence function cannot (the LSTM's
    computes in any order, the GRU's gathers ONNX's; the others keep ONNX's order)."""
    if fn.sequence_fn is lstm_direction:
        fn.gate_blocks = list(gate_blocks)
        fn.sequence_fn = functools.partial(lstm_direction, gate_blocks=fn.gate_blocks)
        fn.layer_fn = functools.partial(fn.sequence_fn, onnx_shapes=True)
        return True
    if fn.sequence_fn is gru_direction:
        fn.gate_blocks = list(gate_blocks)
        fn.sequence_fn = functools.partial(gru_direction, gate_blocks=fn.gate_blocks)
        return True
    return False


def _use_sequence_fn(fn: RecurrentFn, sequence_fn: SequenceFn, *defaults: Callable) -> None:
    """Route `fn` through `sequence_fn` when its node has no clip and every direction uses
    `defaults` as its activations (the cases the whole-sequence functions implement)."""
    s = fn.settings
    if s.clip is None and [a.fn for a in s.activations] == list(defaults) * s.directions:
        fn.sequence_fn, fn.whole_sequence = sequence_fn, True


@register("RNN", since=7)
def rnn(ctx: OpContext) -> RecurrentFn:
    fn = RecurrentFn(
        _settings(ctx, ["Tanh"]), _rnn_step, gates=1, has_cell=False, linear_recurrence=True
    )
    _use_sequence_fn(fn, rnn_direction, torch.tanh)
    return fn


@register("GRU", since=7)
def gru(ctx: OpContext) -> RecurrentFn:
    settings = _settings(ctx, ["Sigmoid", "Tanh"])
    lbr = int(ctx.attr("linear_before_reset", 0))
    if lbr not in (0, 1):
        raise UnsupportedAttribute(f"linear_before_reset {lbr}: expected 0 or 1")
    fn = RecurrentFn(settings, _gru_step_factory(bool(lbr)), gates=3, has_cell=False)
    if lbr:  # what torch exports for nn.GRU
        _use_sequence_fn(fn, gru_direction, torch.sigmoid, torch.tanh)
    return fn


# An attribute of the LSTM nodes that quantized_lstm.py writes for onnxruntime's
# DynamicQuantizeLSTM (no ONNX LSTM has it): 1 = the recurrent product reads h_{t-1}
# dynamically quantised to uint8 at every step, its rounding passing the gradient straight
# through, as that op computes it
QUANTIZED_STATE = "gradhealth_quantized_state"


def _dynamically_fake_quantized(h: Tensor) -> Tensor:
    """`dynamically_dequantized` with h's gradient: exactly its values (h − h is 0)."""
    return dynamically_dequantized(h) + (h - h.detach())


@register("LSTM", since=7)
def lstm(ctx: OpContext) -> RecurrentFn:
    settings = _settings(ctx, ["Sigmoid", "Tanh", "Tanh"])
    input_forget = int(ctx.attr("input_forget", 0))
    if input_forget not in (0, 1):
        raise UnsupportedAttribute(f"input_forget {input_forget}: expected 0 or 1")
    make = functools.partial(_lstm_step, input_forget=bool(input_forget))
    fn = RecurrentFn(settings, make, gates=4, has_cell=True, linear_recurrence=True)
    quantized = bool(int(ctx.attr(QUANTIZED_STATE, 0)))
    if quantized:  # the unrolled path's (peepholes, sequence_lens, ...)
        fn.state_quantizer = _dynamically_fake_quantized
    if not input_forget:  # peepholes (an input, P) are checked per call
        # lstm_direction itself where it reads h_{t-1} rounded (in its autograd Function: the
        # values alone)
        sequence_fn = (
            functools.partial(lstm_direction, state_quantizer=dynamically_dequantized)
            if quantized
            else lstm_direction
        )
        _use_sequence_fn(fn, sequence_fn, torch.sigmoid, torch.tanh, torch.tanh)
        if fn.whole_sequence:
            fn.layer_fn = functools.partial(sequence_fn, onnx_shapes=True)
    return fn


@register("DynamicQuantizeLSTM", domain="com.microsoft")
def dynamic_quantize_lstm(ctx: OpContext) -> RecurrentFn:
    """onnxruntime's quantised LSTM is rewritten before any op is built, as a fake-quantised
    LSTM (quantized_lstm.py); a node that reaches this builder is one it could not rewrite."""
    raise UnsupportedAttribute(
        "converted only in quantize_dynamic's form: no sequence_lens, and W, R and their "
        "scales and zero points stored as initializers (to keep the LSTM in float, quantise "
        "the float model with quantize_dynamic(..., op_types_to_quantize=[...]) leaving out "
        "'LSTM')"
    )


# --- where the time axis of a graph input is ------------------------------------------------

RECURRENT_OPS = frozenset({"RNN", "GRU", "LSTM"})

# Ops whose output keeps the axes of their first input, in order (elementwise with
# broadcasting from constants, normalisation over the last axis, a MatMul by a weight).
_AXIS_PRESERVING = frozenset(
    {"Identity", "Cast", "CastLike", "Dropout", "Relu", "LeakyRelu", "PRelu", "Elu", "Selu"}
    | {"Celu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Gelu"}
    | {"Erf", "Mish", "Swish", "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Exp", "Log", "Sqrt"}
    | {"Pow", "Clip", "Softmax", "LogSoftmax", "LayerNormalization", "MatMul"}
)


@dataclass(frozen=True)
class SequenceAxes:
    """The axes of a graph input that a recurrent node reads as batch and as time."""

    batch: int
    time: int


def sequence_axes(graph: ObservableGraph) -> dict[str, SequenceAxes]:
    """graph input name → its batch and time axes, for the inputs that reach the `X` of an
    RNN/GRU/LSTM node through transposes and axis-preserving ops.

    Exporters lay inputs out both ways: `batch_first=True` modules get [batch, seq, feature]
    inputs and a Transpose before a layout-0 node; seq-first ones feed [seq, batch, feature]
    straight in. Reading axis 1 as time is right for the first and wrong for the second.
    An input reached two ways with different axes, or through an op that moves axes in ways
    not followed here (Reshape, Gather, ...), is left out.
    """
    producer = {out: node for node in graph.nodes for out in node.outputs if out}
    stored = set(graph.param_names) | set(graph.buffer_names) | set(graph.constants)
    inputs = set(graph.input_names)
    found: dict[str, SequenceAxes | None] = {}
    for node in graph.nodes:
        if node.op_type not in RECURRENT_OPS or node.domain not in ("", "ai.onnx"):
            continue
        layout = int(_onnx_attr(node, "layout", 0))
        # axes of X as (batch, time), followed backwards to the graph inputs
        pending = [(node.inputs[0], (1, 0) if layout == 0 else (0, 1))]
        seen: set[str] = set()
        while pending:
            value, (batch, time) = pending.pop()
            if value in seen or value in stored or not value:
                continue
            seen.add(value)
            if value in inputs:
                axes = SequenceAxes(batch, time)
                found[value] = axes if found.get(value, axes) == axes else None
                continue
            source = producer.get(value)
            if source is None:
                continue
            if source.op_type == "Transpose":
                perm = _onnx_attr(source, "perm", None)
                if perm is None:  # default: reverse all axes, rank unknown here
                    continue
                pending.append((source.inputs[0], (int(perm[batch]), int(perm[time]))))
            elif source.op_type in _AXIS_PRESERVING:
                followed = source.inputs[:1] if source.op_type == "MatMul" else source.inputs
                pending.extend((name, (batch, time)) for name in followed)
    return {name: axes for name, axes in found.items() if axes is not None}


def _onnx_attr(node: Node, name: str, default: Any) -> Any:
    if name in node.attrs:
        return node.attrs[name]
    for attribute in getattr(node.source, "attribute", ()):
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default
