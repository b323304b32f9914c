"""Ops of linear-attention and state-space models (opset 27+): CausalConvWithState and
LinearAttention.

Both follow onnx's reference implementation (onnx.reference.ops.op_causal_conv_with_state,
op_linear_attention), which the tests compare against. Half-precision inputs are computed in
float32 as the reference does (its expected outputs are rounded once, at the end); float64
stays float64 so that gradcheck sees exact derivatives.

LinearAttention is the exact sequential recurrence, one step per token with torch ops,
vectorised over batch and heads: `chunk_size` is the spec's tuning hint for chunk-parallel
kernels and changes no output, so it is accepted and ignored. Autograd keeps one state per
step, [B, H_kv, d_k, d_v] · T, which is what backpropagating through the recurrence needs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from service.engine.graph import NodeFn
from service.engine.onnx.ops._util import require
from service.engine.onnx.registry import OpContext, register

ACTIVATIONS = ("none", "silu", "swish")  # swish is the spec's alias of silu
UPDATE_RULES = ("linear", "gated", "delta", "gated_delta")


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32 for half types (as the reference computes), float64 kept."""
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


def _declared(ctx: OpContext, index: int) -> bool:
    """Whether optional input `index` is given ("" or absent = omitted)."""
    names = list(ctx.node.input) if ctx.node is not None else []
    return index < len(names) and bool(names[index])


def _pack(outputs: tuple[Tensor | None, ...], count: int) -> Any:
    return outputs[0] if count <= 1 else outputs[:count]


# --- CausalConvWithState -------------------------------------------------------------------


@register("CausalConvWithState", since=27)
def causal_conv_with_state(ctx: OpContext) -> NodeFn:
    activation = str(ctx.attr("activation", "none"))
    require(
        activation in ACTIVATIONS,
        f"activation '{activation}' is not one of {', '.join(ACTIVATIONS)}",
    )
    silu = activation != "none"
    want_output = ctx.output_used(0)
    count = ctx.num_outputs

    def fn(
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None = None,
        past_state: Tensor | None = None,
    ) -> Any:
        if input.dim() != 3 or weight.dim() != 3:
            raise ValueError(
                "CausalConvWithState: input must be (batch, channels, length) and weight "
                f"(channels, 1, k); got {tuple(input.shape)} and {tuple(weight.shape)}"
            )
        batch, channels, _ = input.shape
        k = weight.shape[2]
        if weight.shape[:2] != (channels, 1):
            raise ValueError(
                f"CausalConvWithState: weight {tuple(weight.shape)} is not ({channels}, 1, k)"
            )
        if past_state is None:
            past_state = input.new_zeros(batch, channels, k - 1)
        elif tuple(past_state.shape) != (batch, channels, k - 1):
            raise ValueError(
                f"CausalConvWithState: past_state {tuple(past_state.shape)} is not "
                f"({batch}, {channels}, {k - 1})"
            )
        padded = torch.cat([past_state.to(input.dtype), input], 2)
        # the last k-1 positions of past‖input: more than the input when it is shorter than k-1
        present = padded[:, :, padded.shape[2] - (k - 1) :]
        output = _causal_conv(padded, weight, bias, silu) if want_output else None
        return _pack((output, present), count)

    return fn


def _causal_conv(padded: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    """Depthwise valid conv of the left-padded input, then the optional SiLU. Rounded to the
    input's dtype after the conv and again after the activation, as the reference does."""
    dtype = padded.dtype
    compute = _compute_dtype(dtype)
    out = F.conv1d(
        padded.to(compute),
        weight.to(compute),
        None if bias is None else bias.to(compute),
        groups=padded.shape[1],
    ).to(dtype)
    if silu:
        out = F.silu(out.to(compute)).to(dtype)
    return out


# --- LinearAttention -----------------------------------------------------------------------


@register("LinearAttention", since=27)
def linear_attention(ctx: OpContext) -> NodeFn:
    rule = str(ctx.attr("update_rule", "gated_delta"))
    require(rule in UPDATE_RULES, f"update_rule '{rule}' is not one of {', '.join(UPDATE_RULES)}")
    q_heads, kv_heads = ctx.attr("q_num_heads"), ctx.attr("kv_num_heads")
    require(
        q_heads is not None and kv_heads is not None,
        "q_num_heads and kv_num_heads are required",
    )
    q_heads, kv_heads = int(q_heads), int(kv_heads)
    require(
        q_heads > 0 and kv_heads > 0 and q_heads % kv_heads == 0,
        f"q_num_heads {q_heads} must be a positive multiple of kv_num_heads {kv_heads}",
    )
    gated = rule in ("gated", "gated_delta")
    delta = rule in ("delta", "gated_delta")
    # the reference refuses a missing or a superfluous decay/beta: refuse it before any compute
    require(
        _declared(ctx, 4) == gated,
        f"update_rule '{rule}' {'requires' if gated else 'forbids'} the decay input",
    )
    require(
        _declared(ctx, 5) == delta,
        f"update_rule '{rule}' {'requires' if delta else 'forbids'} the beta input",
    )
    scale_attr = float(ctx.attr("scale", 0.0))
    want_output = ctx.output_used(0)
    count = ctx.num_outputs

    def fn(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        past_state: Tensor | None = None,
        decay: Tensor | None = None,
        beta: Tensor | None = None,
    ) -> Any:
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.dim() != 3:
                raise ValueError(f"LinearAttention: {name} must be (B, T, H·D), got {x.shape}")
        batch, steps, q_width = query.shape
        if q_width % q_heads or value.shape[2] % kv_heads:
            raise ValueError(
                f"LinearAttention: query width {q_width} / value width {value.shape[2]} not "
                f"divisible by q_num_heads {q_heads} / kv_num_heads {kv_heads}"
            )
        d_k, d_v = q_width // q_heads, value.shape[2] // kv_heads
        if key.shape[2] != kv_heads * d_k:
            raise ValueError(
                f"LinearAttention: key width {key.shape[2]} is not kv_num_heads·d_k = "
                f"{kv_heads}·{d_k}"
            )
        state_dtype = query.dtype if past_state is None else past_state.dtype
        compute = _compute_dtype(query.dtype, state_dtype)
        scale = scale_attr if scale_attr != 0.0 else 1.0 / math.sqrt(d_k)

        # [B, T, H·D] → [B, T, H, D]; the query grouped per KV head, [B, T, H_kv, G, d_k]:
        # query head h reads KV head h // G (the reference's repeat along heads); the scale is
        # folded into the query once instead of applied to every step's read
        q = query.to(compute).reshape(batch, steps, kv_heads, q_heads // kv_heads, d_k) * scale
        k = key.to(compute).reshape(batch, steps, kv_heads, d_k)
        v = value.to(compute).reshape(batch, steps, kv_heads, d_v)
        gate = None if decay is None else _decay_gate(decay, batch, steps, kv_heads, d_k, compute)
        rate = None if beta is None else _beta(beta, batch, steps, kv_heads, compute)

        if past_state is None:
            state = q.new_zeros(batch, kv_heads, d_k, d_v)
        elif tuple(past_state.shape) != (batch, kv_heads, d_k, d_v):
            raise ValueError(
                f"LinearAttention: past_state {tuple(past_state.shape)} is not "
                f"({batch}, {kv_heads}, {d_k}, {d_v})"
            )
        else:
            state = past_state.to(compute)

        reads: list[Tensor] = []
        for t in range(steps):
            state = _step(state, k[:, t], v[:, t], gate, rate, t)
            if want_output:
                # o[b, h, g, m] = Σ_d q[b, h, g, d] · S[b, h, d, m]
                reads.append(torch.matmul(q[:, t], state))
        output = None
        if want_output:
            # T × [B, H_kv, G, d_v] → [B, T, H_q·d_v]
            stacked = torch.stack(reads, 1) if reads else q.new_zeros(batch, 0, q_heads, d_v)
            output = stacked.reshape(batch, steps, q_heads * d_v).to(query.dtype)
        return _pack((output, state.to(state_dtype)), count)

    return fn


def _decay_gate(
    decay: Tensor, batch: int, steps: int, heads: int, d_k: int, dtype: torch.dtype
) -> Tensor:
    """exp(decay) as [B, T, H_kv, d_k or 1, 1]: per key dimension (GLA/RWKV-6) or per head
    (DeltaNet/RetNet), told apart by the packed width as the reference does."""
    width = decay.shape[-1] if decay.dim() == 3 else -1
    if width not in (heads, heads * d_k):
        raise ValueError(
            f"LinearAttention: decay {tuple(decay.shape)} is not (B, T, kv_num_heads) or "
            f"(B, T, kv_num_heads·d_k) = (.., {heads}) or (.., {heads * d_k})"
        )
    return torch.exp(decay.to(dtype).reshape(batch, steps, heads, width // heads, 1))


def _beta(beta: Tensor, batch: int, steps: int, heads: int, dtype: torch.dtype) -> Tensor:
    """beta as [B, T, H_kv or 1, 1]: per KV head, or one rate shared by all heads."""
    width = beta.shape[-1] if beta.dim() == 3 else -1
    if width not in (heads, 1):
        raise ValueError(
            f"LinearAttention: beta {tuple(beta.shape)} is not (B, T, kv_num_heads) or (B, T, 1)"
        )
    return beta.to(dtype).reshape(batch, steps, width, 1)


def _step(
    state: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, rate: Tensor | None, t: int
) -> Tensor:
    """One token of the recurrence: state [B, H, d_k, d_v], k [B, H, d_k], v [B, H, d_v].

    gated: S ← exp(g)·S; delta: v ← β·(v − Sᵀk) with the (decayed) S; then S ← S + k ⊗ v.
    """
    if gate is not None:
        state = state * gate[:, t]
    if rate is not None:
        retrieved = torch.matmul(k.unsqueeze(-2), state).squeeze(-2)  # Sᵀk: [B, H, d_v]
        v = rate[:, t] * (v - retrieved)
    return state + k.unsqueeze(-1) * v.unsqueeze(-2)
