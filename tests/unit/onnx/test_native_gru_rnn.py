"""The GRU's and the tanh RNN's C++ step loops (service/engine/native/recurrent_cpu.cpp) against
the Python loops they replace (gru_sequence.py, rnn_sequence.py): outputs, every input's
gradient and the per-step hidden-state gradients, both dtypes, both directions; and float64
gradchecks through the C++ loops alone.

The extension is built first (a no-op when it is), so these never pass by testing the Python
fallback twice.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from service.engine import native
from service.engine.onnx.ops import _cpu_products
from service.engine.onnx.ops.gru_sequence import gru_direction
from service.engine.onnx.ops.rnn_sequence import rnn_direction

Direction = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
DIRECTIONS: dict[str, tuple[Direction, int]] = {
    "GRU": (gru_direction, 3),
    "RNN": (rnn_direction, 1),
}


@pytest.fixture(scope="module", autouse=True)
def built_extension() -> None:
    native.build()


@pytest.fixture(autouse=True)
def native_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever GRADHEALTH_NATIVE the suite runs under, these tests choose the path themselves."""
    monkeypatch.delenv("GRADHEALTH_NATIVE", raising=False)
    assert native.load_recurrent_cpu() is not None


def _inputs(
    gates: int, steps: int, batch: int, inputs: int, hidden: int, dtype: torch.dtype, seed: int = 0
) -> list[torch.Tensor]:
    """X, W, R, B (the node's bias row, Wb then Rb), h0; weights scaled so that the gates are
    neither saturated nor linear."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(True)

    return [
        normal(steps, batch, inputs),
        normal(gates * hidden, inputs, scale=inputs**-0.5),
        normal(gates * hidden, hidden, scale=hidden**-0.5),
        normal(2 * gates * hidden, scale=0.5),
        normal(batch, hidden),
    ]


def _run(
    op: str, tensors: list[torch.Tensor], reverse: bool, with_bias: bool
) -> list[torch.Tensor]:
    """Y, h_T, then the gradients of X, W, R, B (when given), h0 and the hidden-state gradients
    the backward reports, for a loss that weighs every element of Y and h_T differently."""
    direction, _ = DIRECTIONS[op]
    X, W, R, B, h0 = tensors
    for t in tensors:
        t.grad = None
    hidden_grads: list[torch.Tensor] = []
    Y, h, _ = direction(X, W, R, B if with_bias else None, h0, None, reverse, hidden_grads)
    g = torch.Generator().manual_seed(1)
    y_weights = torch.randn(Y.shape, generator=g, dtype=Y.dtype)
    h_weights = torch.randn(h.shape, generator=g, dtype=h.dtype)
    ((Y * y_weights).sum() + (h * h_weights).sum()).backward()
    assert len(hidden_grads) == 1
    leaves = [X, W, R, *([B] if with_bias else []), h0]
    grads = [t.grad for t in leaves]
    assert all(grad is not None for grad in grads)
    return [Y.detach(), h.detach(), *(grad for grad in grads if grad is not None), hidden_grads[0]]


def _with_python_loops(
    monkeypatch: pytest.MonkeyPatch, run: Callable[[], list[torch.Tensor]]
) -> list[torch.Tensor]:
    """`run()` with the C++ loops turned off, as where they are not built."""
    with monkeypatch.context() as patch:
        patch.setenv("GRADHEALTH_NATIVE", "0")
        assert native.load_recurrent_cpu() is None
        return run()


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("op", ["GRU", "RNN"])
def test_cpp_loops_equal_the_python_loops(
    monkeypatch: pytest.MonkeyPatch,
    op: str,
    dtype: torch.dtype,
    reverse: bool,
    steps: int,
    with_bias: bool,
) -> None:
    tensors = _inputs(DIRECTIONS[op][1], steps, 3, 4, 6, dtype)

    def run() -> list[torch.Tensor]:
        return _run(op, tensors, reverse, with_bias)

    got = run()
    expected = _with_python_loops(monkeypatch, run)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g, e, **tolerance)  # type: ignore[arg-type]
    assert bool((got[-1].abs().sum((1, 2)) > 0).all())  # every step's hidden gradient is there


@pytest.mark.parametrize("op", ["GRU", "RNN"])
def test_cpp_loops_equal_the_python_loops_at_threaded_sizes(
    monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    """Batch and hidden large enough for the row loops to split across threads. Products
    through MKL on both sides: the Python loops' per-step products are addmm (the C++ loops'
    oneDNN products are compared with MKL's in test_cpu_products.py)."""
    monkeypatch.setattr(_cpu_products, "onednn_preferred", lambda: False)
    tensors = _inputs(DIRECTIONS[op][1], 4, 64, 8, 512, torch.float32)

    def run() -> list[torch.Tensor]:
        return _run(op, tensors, False, True)

    for g, e in zip(run(), _with_python_loops(monkeypatch, run), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("op", ["GRU", "RNN"])
def test_gradcheck_through_the_cpp_loops(op: str, reverse: bool, steps: int) -> None:
    direction, gates = DIRECTIONS[op]
    X, W, R, B, h0 = _inputs(gates, steps, 2, 3, 2, torch.float64, seed=5)

    def run(*a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        assert native.load_recurrent_cpu() is not None
        Y, h, _ = direction(*a, None, reverse, None)
        return Y, h

    assert torch.autograd.gradcheck(run, (X, W, R, B, h0), eps=1e-6, atol=1e-6)


def test_the_cpp_loops_check_their_inputs() -> None:
    loops = native.load_recurrent_cpu()
    assert loops is not None
    projected = torch.zeros(2, 3, 15)  # hidden 5
    with pytest.raises(RuntimeError, match="R must be"):
        loops.gru_forward(projected, torch.zeros(12, 5), torch.zeros(12), torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match="same dtype"):
        loops.rnn_forward(
            torch.zeros(2, 3, 4), torch.zeros(4, 4, dtype=torch.float64), torch.zeros(3, 4)
        )
