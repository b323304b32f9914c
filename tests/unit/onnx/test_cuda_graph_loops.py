"""The recurrent step loops replayed as CUDA graphs (cuda_graph_loops): the GRU's and the tanh
RNN's (the LSTM's are in test_lstm_fused_cell.py), as they run where their node is not
replayed whole (pooled_cuda_graphs: test_pooled_cuda_graphs.py) and their persistent kernels
do not apply (test_recurrent_persistent.py). On the CPU nothing is
captured; the `gpu` tests compare replayed passes with eager ones, as an ML engineer's
repeated training steps would run them."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import pytest
import torch
from torch import Tensor

from service.engine.onnx.ops import (
    cuda_graph_loops,
    gru_sequence,
    pooled_cuda_graphs,
    rnn_sequence,
)

Direction = Callable[..., tuple[Tensor, Tensor, None]]

# (direction function, gate count, its Python loops)
CELLS = {
    "gru": (gru_sequence.gru_direction, 3, gru_sequence._forward_steps),
    "rnn": (rnn_sequence.rnn_direction, 1, rnn_sequence._forward_steps),
}


def _layer_args(gates: int, seed: int, device: str) -> list[Tensor]:
    """X [T, B, I], W, R, the bias row, h0 for one direction (steps 7, batch 5, 6 → 16)."""
    g = torch.Generator().manual_seed(seed)
    steps, batch, inputs, hidden = 7, 5, 6, 16

    def randn(*shape: int) -> Tensor:
        return (torch.randn(*shape, generator=g) * 0.4).to(device)

    return [
        randn(steps, batch, inputs),
        randn(gates * hidden, inputs),
        randn(gates * hidden, hidden),
        randn(2 * gates * hidden),
        randn(batch, hidden),
    ]


def _passes(direction: Direction, layers: list[list[Tensor]], reverse: bool) -> list[Tensor]:
    """Both layers' forwards, then one backward: outputs, every input's gradient and the
    per-step hidden-state gradients."""
    leaves = [[t.clone().requires_grad_(True) for t in layer] for layer in layers]
    sink: list[Tensor] = []
    outputs = [direction(X, W, R, B, h0, None, reverse, sink)[:2] for X, W, R, B, h0 in leaves]
    loss = cast(Tensor, sum((o * (k + 1)).sum() for outs in outputs for k, o in enumerate(outs)))
    grads = torch.autograd.grad(loss, [t for leaf in leaves for t in leaf])
    return [o.detach() for outs in outputs for o in outs] + list(grads) + sink


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_cpu_loops_run_as_they_are_and_capture_nothing(cell: str) -> None:
    direction, gates, _ = CELLS[cell]
    before = cuda_graph_loops.captured_loops(), pooled_cuda_graphs.captured_total
    layers = [_layer_args(gates, seed, "cpu") for seed in (1, 2)]
    for _ in range(3):
        _passes(direction, layers, reverse=False)
    assert (cuda_graph_loops.captured_loops(), pooled_cuda_graphs.captured_total) == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_a_repeated_shape_replays_captured_graphs_with_the_eager_results(
    cell: str, reverse: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Second sight of a shape captures the loops; two layers of one shape share the capture,
    both forwards running before either backward (static buffers must not leak between them)."""
    direction, gates, forward_loop = CELLS[cell]
    layers = [_layer_args(gates, seed, "cuda") for seed in (1, 2)]
    # hidden 16 in float32 would run as persistent kernels (gru_persistent.py,
    # rnn_persistent.py): off here
    monkeypatch.setenv("GRADHEALTH_LSTM_PERSISTENT", "0")
    with monkeypatch.context() as eager_only:
        eager_only.setenv("GRADHEALTH_CUDA_GRAPHS", "0")
        eager = _passes(direction, layers, reverse)
    for _ in range(3):  # first call: one eager layer, then the capture; then replays only
        replayed = _passes(direction, layers, reverse)
        for a, b in zip(eager, replayed, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert forward_loop in [loop for loop, _ in cuda_graph_loops.captured_loops()]
