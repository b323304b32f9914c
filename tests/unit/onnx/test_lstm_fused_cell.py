"""The CUDA whole-sequence LSTM (lstm_fused_cell) and its plumbing.

torch's fused cell kernels exist only for CUDA. On the CPU the tests put `emulated_cell_*`
(the same arithmetic in plain torch, torch's gate order i, f, g, o) in their place and check
the loop, the gate reordering, the backward through time and the per-step hidden gradients
against the unrolled path; the `gpu` test checks that the emulation computes what the real
kernels compute, which is what makes the CPU tests meaningful.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import cast

import pytest
import torch
from torch import Tensor

from service.engine.onnx.ops import lstm_fused_cell
from service.engine.onnx.ops import lstm_sequence as lstm_sequence_module
from service.engine.onnx.ops.lstm_sequence import ONNX_GATE_BLOCKS, lstm_sequence
from tests.support.recurrent_zoo import lstm_sequence_args


def emulated_cell_forward(
    input_gates: Tensor,
    hidden_gates: Tensor,
    cx: Tensor,
    input_bias: Tensor | None = None,
    hidden_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    gates = input_gates + hidden_gates
    if input_bias is not None and hidden_bias is not None:
        gates = gates + input_bias + hidden_bias
    i, f, g, o = gates.chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cy = f * cx + i * g
    return o * cy.tanh(), cy, torch.cat([i, f, g, o], 1)


def emulated_cell_backward(
    grad_hy: Tensor, grad_cy: Tensor, cx: Tensor, cy: Tensor, workspace: Tensor, has_bias: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    i, f, g, o = workspace.chunk(4, 1)
    tanh_cy = cy.tanh()
    dc = grad_cy + grad_hy * o * (1 - tanh_cy * tanh_cy)
    d_gates = torch.cat(
        [
            dc * g * i * (1 - i),
            dc * cx * f * (1 - f),
            dc * i * (1 - g * g),
            grad_hy * tanh_cy * o * (1 - o),
        ],
        1,
    )
    return d_gates, dc * f, d_gates.sum(0) if has_bias else None


@pytest.fixture
def emulated_kernels(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The emulation in place of the CUDA kernels; yields the log of the cell calls made."""
    calls: list[str] = []

    def forward(*args: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        calls.append("forward")
        return emulated_cell_forward(*args)

    def backward(*args: object) -> tuple[Tensor, Tensor, Tensor | None]:
        calls.append("backward")
        return emulated_cell_backward(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(lstm_fused_cell, "cell_forward", forward)
    monkeypatch.setattr(lstm_fused_cell, "cell_backward", backward)
    monkeypatch.setattr(lstm_fused_cell, "available", lambda x: True)
    yield calls


def _args(dtype: torch.dtype, hidden: int = 3, seed: int = 0) -> list[Tensor]:
    return lstm_sequence_args(5, 2, 4, hidden, dtype, seed)


def _lstm_sequence(
    args: Sequence[Tensor], reverse: bool = False, hidden_grads: list[Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """`lstm_sequence(*args, ...)` for the six tensors of `_args`, spelled out so that mypy
    can match them to its parameters."""
    X, W, R, bias, h0, c0 = args
    return lstm_sequence(X, W, R, bias, h0, c0, reverse=reverse, hidden_grads=hidden_grads)


@pytest.mark.parametrize("reverse", [False, True])
def test_fused_cell_path_equals_the_cpu_path(
    emulated_kernels: list[str], reverse: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = _args(torch.float64)
    weights = [torch.randn(s) for s in ((5, 2, 3), (2, 3), (2, 3))]
    results = []
    for fused in (True, False):
        sink: list[Tensor] = []
        if fused:
            outputs = _lstm_sequence(args, reverse=reverse, hidden_grads=sink)
        else:  # the CPU loops
            with monkeypatch.context() as cpu:
                cpu.setattr(lstm_fused_cell, "available", lambda x: False)
                outputs = _lstm_sequence(args, reverse=reverse, hidden_grads=sink)
        loss = cast(Tensor, sum((o * w).sum() for o, w in zip(outputs, weights, strict=True)))
        grads = torch.autograd.grad(loss, args)
        results.append(([o.detach() for o in outputs], grads, sink))
    (out_a, grads_a, sink_a), (out_b, grads_b, sink_b) = results
    for a, b in zip([*out_a, *grads_a, *sink_a], [*out_b, *grads_b, *sink_b], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert len(sink_a) == 1 and sink_a[0].shape == (5, 2, 3)
    assert emulated_kernels == ["forward"] * 5 + ["backward"] * 5  # one cell call per step


@pytest.mark.parametrize("gate_blocks", [ONNX_GATE_BLOCKS, [0, 3, 1, 2]])
def test_an_lstm_on_the_fused_loops_is_one_autograd_node(
    emulated_kernels: list[str], gate_blocks: list[int]
) -> None:
    """As on the CPU, the projection, the bias sum, a reverse direction's flips, the ONNX
    output shapes and (for weights in ONNX's order) the reordering into torch's live inside
    the one Function: every output's grad_fn is it, and it feeds the leaves directly (each
    autograd node is host time a waiting GPU pays for)."""
    X, W, R, b, h0, c0 = _args(torch.float64)
    outputs = lstm_sequence(
        X, W, R, b, h0, c0, reverse=True, gate_blocks=gate_blocks, onnx_shapes=True
    )
    nodes = {type(o.grad_fn).__name__ for o in outputs}
    assert nodes == {"_LSTMSequenceBackward"}
    node = outputs[0].grad_fn
    assert node is not None
    feeds = {type(fn).__name__ for fn, _ in node.next_functions if fn is not None}
    assert feeds == {"AccumulateGrad"}
    assert "forward" in emulated_kernels  # the fused loops ran


def test_fused_cell_path_gradcheck(emulated_kernels: list[str]) -> None:
    X, W, R, b, h0, c0 = _args(torch.float64, hidden=2)
    assert torch.autograd.gradcheck(
        lambda *a: lstm_sequence(*a), (X, W, R, b, h0, c0), eps=1e-6, atol=1e-6
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_emulation_matches_torchs_cuda_kernels() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    batch, hidden = 3, 5
    gates_in, gates_h = (torch.randn(batch, 4 * hidden, device="cuda", generator=g) for _ in "ab")
    cx = torch.randn(batch, hidden, device="cuda", generator=g)
    real = torch.ops.aten._thnn_fused_lstm_cell(gates_in, gates_h, cx)
    emulated = emulated_cell_forward(gates_in, gates_h, cx)
    for a, b in zip(real, emulated, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    hy, cy, workspace = real
    grad_hy, grad_cy = torch.randn_like(hy), torch.randn_like(cy)
    real_back = torch.ops.aten._thnn_fused_lstm_cell_backward_impl(
        grad_hy, grad_cy, cx, cy, workspace, False
    )
    emulated_back = emulated_cell_backward(grad_hy, grad_cy, cx, cy, workspace, False)
    for a, b in zip(real_back[:2], emulated_back[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_whole_sequence_equals_the_cpu_one() -> None:
    args = _args(torch.float32, hidden=8)
    cuda_args = [a.detach().cuda().requires_grad_(True) for a in args]
    assert lstm_fused_cell.available(cuda_args[0])
    for reverse in (False, True):
        cpu_out = _lstm_sequence(args, reverse=reverse)
        gpu_out = _lstm_sequence(cuda_args, reverse=reverse)
        cpu_grads = torch.autograd.grad(cast(Tensor, sum(o.sum() for o in cpu_out)), args)
        gpu_grads = torch.autograd.grad(cast(Tensor, sum(o.sum() for o in gpu_out)), cuda_args)
        for a, b in zip([*cpu_out, *cpu_grads], [*gpu_out, *gpu_grads], strict=True):
            torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_repeated_shape_replays_captured_graphs_with_the_eager_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Second sight of a shape captures the loops; two layers of one shape share the capture,
    both forwards running before either backward (static buffers must not leak between them)."""
    from service.engine.onnx.ops import cuda_graph_loops

    layers = [[a.detach().cuda() for a in _args(torch.float32, hidden=16, seed=s)] for s in (1, 2)]

    def run() -> list[Tensor]:
        leaves = [[t.clone().requires_grad_(True) for t in layer] for layer in layers]
        outputs = [_lstm_sequence(leaf) for leaf in leaves]  # both forwards, then one backward
        loss = cast(
            Tensor, sum((o * (k + 1)).sum() for outs in outputs for k, o in enumerate(outs))
        )
        grads = torch.autograd.grad(loss, [t for leaf in leaves for t in leaf])
        return [o.detach() for outs in outputs for o in outs] + list(grads)

    # hidden 16 in float32 would run as persistent kernels (lstm_persistent.py): off here
    monkeypatch.setenv("GRADHEALTH_LSTM_PERSISTENT", "0")
    with monkeypatch.context() as eager_only:
        eager_only.setenv("GRADHEALTH_CUDA_GRAPHS", "0")
        eager = run()
    for _ in range(3):  # first call: one eager layer, then the capture; then replays only
        replayed = run()
        for a, b in zip(eager, replayed, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    loops = [loop for loop, _ in cuda_graph_loops.captured_loops()]
    assert lstm_fused_cell.forward_steps in loops and lstm_fused_cell.backward_steps in loops


def test_fused_cell_path_takes_torchs_gate_order_as_is(emulated_kernels: list[str]) -> None:
    """Weights already in torch's order (a folded export: gate_blocks [0, 3, 1, 2]) skip the
    reordering and give what the same weights gathered into ONNX's order give."""
    X, W, R, b, h0, c0 = _args(torch.float64)
    onnx_rows = torch.cat([torch.arange(k * 3, (k + 1) * 3) for k in (0, 3, 1, 2)])
    expected = lstm_sequence(X, W[onnx_rows], R[onnx_rows], b[onnx_rows], h0, c0)
    got = lstm_sequence(X, W, R, b, h0, c0, gate_blocks=[0, 3, 1, 2])
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e)
    assert lstm_fused_cell._torch_gate_order(3, X.device, [0, 3, 1, 2]) is None
    assert emulated_kernels.count("forward") == 2 * 5


@pytest.mark.parametrize("used", [0, 1, 2])
@pytest.mark.parametrize("fused", [True, False])
def test_an_unused_output_is_a_zero_gradient(
    emulated_kernels: list[str], used: int, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a graph reads only Y, or only h_T, or only c_T, the other outputs' gradients are
    None in the backward (not materialised as zeros by autograd each call; the CPU loops read
    kept zeros, the CUDA node makes its own inside its graph): the same gradients as when
    those outputs are read with a weight of 0, and the zeros kept stay zero."""
    if not fused:
        monkeypatch.setattr(lstm_fused_cell, "available", lambda x: False)
    args = _args(torch.float64)
    results = []
    for others in (False, True):
        outputs = _lstm_sequence(args, reverse=True)
        loss = outputs[used].square().sum()
        if others:  # gradients of exactly zero reach the other outputs
            loss = loss + sum((o * 0).sum() for k, o in enumerate(outputs) if k != used)
        results.append(torch.autograd.grad(loss, args))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert all(float(g.abs().sum()) > 0 for g in results[0][:3])
    assert all(not bool(z.any()) for z in lstm_sequence_module._kept.values())
    if not fused:
        assert lstm_sequence_module._kept  # the unused outputs read kept zeros
