"""pooled_cuda_graphs: which calls replay, which inputs are read in place, and that a replay
never overwrites an output somebody still holds.

On the CPU a stand-in graph replays by running the captured function on the call's tensors and
copying its results into the captured outputs, which is what a CUDA graph's replay does to
them; the
`gpu` test replays real CUDA graphs (an LSTM node's, whose results must equal eager ones).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import torch
from torch import Tensor

from service.engine.onnx.ops import pooled_cuda_graphs
from service.engine.onnx.ops.lstm_sequence import lstm_sequence
from tests.support.recurrent_zoo import lstm_sequence_args
from tests.unit.onnx.test_lstm_fused_cell import emulated_kernels  # noqa: F401 - a fixture


class StandInGraph:
    """A CUDA graph's contract on the CPU: capturing computes the outputs once; a replay
    rewrites them in place from the call's tensors (what a graph reads at their addresses).
    Like a CUDA graph it keeps no reference to the tensors it read."""

    replays = 0

    @staticmethod
    def capture(run: Callable[[], Any]) -> Any:
        return run()

    @staticmethod
    def replay(capture: Any, args: list[Tensor | None]) -> None:
        StandInGraph.replays += 1
        for out, new in zip(capture.outputs, capture.body(capture.config, *args), strict=True):
            if out is not None:
                out.copy_(new)


@pytest.fixture
def stand_in_graphs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(pooled_cuda_graphs, "_replayable", lambda inputs: True)
    monkeypatch.setattr(pooled_cuda_graphs, "_new_graph", StandInGraph)
    monkeypatch.setattr(pooled_cuda_graphs, "_replay_graph", StandInGraph.replay)
    monkeypatch.setattr(
        pooled_cuda_graphs, "_capture_graph", lambda graph, run, device: graph.capture(run)
    )
    _forget()
    StandInGraph.replays = 0
    yield
    _forget()


def _forget() -> None:
    pooled_cuda_graphs._pools.clear()
    pooled_cuda_graphs._seen.clear()
    pooled_cuda_graphs._failed.clear()
    pooled_cuda_graphs._static_storages.clear()


def affine(config: float, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    return x @ w * config, (x + 1).sum(0)


def _assert_equal(got: tuple[Tensor | None, ...], expected: tuple[Tensor, ...]) -> None:
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_captured_the_second_time_then_replayed(stand_in_graphs: None) -> None:
    w, x = torch.randn(3, 2), torch.randn(5, 3)
    for _ in range(4):
        x.normal_()  # new values, same address
        _assert_equal(pooled_cuda_graphs.run(affine, 2.0, x, w), affine(2.0, x, w))
    # nothing held the outputs: the one capture replayed every time
    assert pooled_cuda_graphs.captures() == 1
    assert StandInGraph.replays == 3  # calls 2, 3, 4 (the capture itself computes nothing)


def test_a_parameter_is_read_in_place_and_a_fresh_tensor_copied(stand_in_graphs: None) -> None:
    before = pooled_cuda_graphs.captured_total
    w = torch.nn.Parameter(torch.randn(3, 2))
    rows = torch.randn(6, 5, 3)  # rows[k]: the same layout at six addresses
    with torch.no_grad():
        for k in range(6):
            _assert_equal(pooled_cuda_graphs.run(affine, 1.0, rows[k], w), affine(1.0, rows[k], w))
        # one capture: the batch at whatever address is copied, the parameter is read where
        # it is (its address is in the key)
        assert pooled_cuda_graphs.captured_total - before == 1
        ((capture,),) = pooled_cuda_graphs._pools.values()
        assert [i for i, _ in capture._copies] == [0]
        w.mul_(3)  # an optimizer step: same tensor, new values
        _assert_equal(pooled_cuda_graphs.run(affine, 1.0, rows[0], w), affine(1.0, rows[0], w))


def test_a_replay_never_overwrites_an_output_still_held(stand_in_graphs: None) -> None:
    w = torch.randn(3, 2)
    xs = [torch.randn(5, 3) for _ in range(5)]
    pooled_cuda_graphs.run(affine, 1.0, xs[0], w)
    held = [pooled_cuda_graphs.run(affine, 1.0, x, w)[0] for x in xs[1:4]]
    # the second call captured; the third found its outputs held and captured another slot;
    # the fourth found both held and ran eagerly
    assert pooled_cuda_graphs.captures() == pooled_cuda_graphs.SLOTS == 2
    for x, out in zip(xs[1:4], held, strict=True):
        torch.testing.assert_close(out, x @ w)
    del held[0]  # the first slot's outputs are free again
    again = pooled_cuda_graphs.run(affine, 1.0, xs[4], w)[0]
    torch.testing.assert_close(again, xs[4] @ w)
    for x, out in zip(xs[2:4], held, strict=True):
        torch.testing.assert_close(out, x @ w)
    assert pooled_cuda_graphs.captures() == 2


def passthrough(config: None, x: Tensor) -> tuple[Tensor]:
    return (x.view(-1),)  # shares the input's memory: not pure


def test_a_function_whose_output_shares_an_input_is_never_replayed(
    stand_in_graphs: None,
) -> None:
    x = torch.randn(2, 3)
    for _ in range(3):
        (out,) = pooled_cuda_graphs.run(passthrough, None, x)
        assert out is not None and out.data_ptr() == x.data_ptr()
    assert pooled_cuda_graphs.captures() == 0 and len(pooled_cuda_graphs._failed) == 1


def _accumulated_passes(device: str, dtype: torch.dtype, reverse: bool) -> list[Tensor]:
    """Three rounds of gradient accumulation over three batches through lstm_sequence (first
    sight, captures, replays): each round's loss and weight gradients. The saved tensors of a
    round's first pass must survive its second and third passes' replays."""
    batches = [
        [t.detach().to(device).requires_grad_() for t in lstm_sequence_args(6, 3, 4, 32, dtype, k)]
        for k in range(3)
    ]
    _, W, R, b, h0, c0 = batches[0]
    # every leaf's gradient: the weights', and each batch's X, h0 and c0 (their gradients,
    # views of a capture's outputs taken as .grad, keep its slot busy until they are dropped)
    weights = [W, R, b, h0, c0, *(X for X, *_ in batches)]
    results: list[Tensor] = []
    for _ in range(3):
        for w in weights:
            w.grad = None
        loss = torch.zeros((), dtype=dtype, device=device)
        for X, *_ in batches:
            Y, h, c = lstm_sequence(X, W, R, b, h0, c0, reverse=reverse)
            loss = loss + Y.square().sum() + h.sum() * 0.5 + c.mean()
        loss.backward()
        results += [loss.detach(), *(cast(Tensor, w.grad) for w in weights)]
    return results


def _replayed_equals_eager(device: str, dtype: torch.dtype, reverse: bool, tol: float) -> None:
    replayed = _accumulated_passes(device, dtype, reverse)
    with pytest.MonkeyPatch.context() as eager:
        eager.setenv("GRADHEALTH_CUDA_GRAPHS", "0")
        eager.setattr(pooled_cuda_graphs, "_replayable", lambda inputs: False)
        expected = _accumulated_passes(device, dtype, reverse)
    for a, b in zip(replayed, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_nodes_replayed_with_several_passes_before_one_backward(
    stand_in_graphs: None,
    emulated_kernels: list[str],  # noqa: F811 - the fixture
    reverse: bool,
) -> None:
    _replayed_equals_eager("cpu", torch.float64, reverse, 1e-12)
    assert StandInGraph.replays > 0


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_graphs_of_lstm_nodes_equal_eager_runs(reverse: bool) -> None:
    """Real CUDA graphs of the LSTM node's forward and backward (the persistent kernels at
    hidden 32), replayed while earlier passes' outputs are still held: the same losses and
    gradients as eager runs (the same kernels in the same order)."""
    before = pooled_cuda_graphs.captures()
    _replayed_equals_eager("cuda", torch.float32, reverse, 1e-6)
    assert pooled_cuda_graphs.captures() > before
