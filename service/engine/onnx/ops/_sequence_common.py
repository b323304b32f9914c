"""What the whole-sequence recurrences (lstm_sequence, gru_sequence, rnn_sequence) share: the
autocast cast, the reverse direction as the forward one on the time-flipped sequence, and the
choice between the C++ step loops and the Python ones."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

from service.engine import native
from service.engine.onnx.ops import pooled_cuda_graphs


def native_loops(X: Tensor) -> Any:
    """The C++ step loops (service/engine/native) where built and X is a CPU float tensor, else
    None (the caller runs its Python loops: same results, slower)."""
    if X.device.type != "cpu" or X.dtype not in (torch.float32, torch.float64):
        return None
    return native.load_recurrent_cpu()


def run_in_time_order(
    apply: Callable[..., tuple[Tensor, ...]],
    reverse: bool,
    X: Tensor,
    *others: Tensor | None,
) -> tuple[Tensor, ...]:
    """`apply(X, *others)` with X [T, ...] in the order the steps run; returns its outputs with
    the first (Y, [T, ...]) back in time order.

    Under autocast the inputs are cast to its dtype first, as the products of the unrolled
    path would be; the loop itself then runs with autocast off (its `out=` buffers must keep
    one dtype)."""
    device_type = X.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        X = X.to(dtype)
        others = tuple(None if t is None else t.to(dtype) for t in others)
    if reverse:
        X = X.flip(0)
    with torch.autocast(device_type, enabled=False):
        Y, *rest = apply(X, *others)
    return (Y.flip(0) if reverse else Y, *rest)


def pooled_backward(
    ctx: Any,
    backward_node: Callable[..., tuple[Tensor | None, ...]],
    inputs: int,
    biases: Hashable,
    dY: Tensor,
    dh_last: Tensor,
) -> tuple[Tensor | None, ...]:
    """The GRU's and RNN's autograd backward: `backward_node(config, dY, dh_last, *saved)`
    through pooled_cuda_graphs (one CUDA graph on CUDA, a call elsewhere), config being (which
    of the first `inputs` inputs need a gradient, `biases`, collect ∂L/∂h_t, reverse); the
    collected ∂L/∂h_t goes to ctx.hidden_grads. Returns the Function's input gradients."""
    collect = ctx.hidden_grads is not None
    config = (tuple(ctx.needs_input_grad[:inputs]), biases, collect, ctx.reverse)
    *grads, dhidden = pooled_cuda_graphs.run(backward_node, config, dY, dh_last, *ctx.saved_tensors)
    if collect:
        ctx.hidden_grads.append(dhidden)
    return (*grads, None, None)


def block_rows(blocks: list[int], size: int, device: torch.device) -> Tensor:
    """Indexes of the rows of blocks `blocks` (each `size` rows), in that order."""
    return torch.cat([torch.arange(b * size, (b + 1) * size, device=device) for b in blocks])


def reorder_blocks(weights: Tensor, blocks: list[int], dim: int = 0) -> Tensor:
    """`weights` with its equal blocks along `dim` gathered so that block blocks[j] comes j-th
    (a recurrent layer's gates from one order into another)."""
    rows = block_rows(blocks, weights.shape[dim] // len(blocks), weights.device)
    return weights.index_select(dim, rows)
