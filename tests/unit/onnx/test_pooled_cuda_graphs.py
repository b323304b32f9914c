"""pooled_cuda_graphs: which calls replay, which inputs are read in place, and that a replay
never overwrites an output somebody still holds.

On the CPU a stand-in graph replays by running the captured function on the call's tensors and
copying its results into the captured outputs, which is what a CUDA graph's replay does to
them; the `gpu` tests replay real CUDA graphs (the LSTM's, GRU's and tanh RNN's nodes, whose
results must equal eager ones).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar, cast

import pytest
import torch
from torch import Tensor

from service.engine.onnx.ops import pooled_cuda_graphs
from service.engine.onnx.ops.gru_sequence import gru_direction
from service.engine.onnx.ops.lstm_sequence import lstm_sequence
from service.engine.onnx.ops.rnn_sequence import rnn_direction
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


def test_captures_reading_a_freed_parameter_are_dropped(stand_in_graphs: None) -> None:
    """A worker lets a diagnosed model go: the captures that read its parameters in place
    can never replay (their key holds the addresses) and are dropped at the next new key,
    with the device memory they hold; captures of live parameters stay."""
    x = torch.randn(5, 3)
    kept, dropped = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(3, 2))
    with torch.no_grad():
        for _ in range(2):
            pooled_cuda_graphs.run(affine, 1.0, x, kept)
            pooled_cuda_graphs.run(affine, 1.0, x, dropped)
        assert pooled_cuda_graphs.captures() == 2
        pooled_cuda_graphs.run(affine, 1.0, torch.randn(4, 3), kept)  # a new key: both live
        assert pooled_cuda_graphs.captures() == 2
        del dropped
        pooled_cuda_graphs.run(affine, 1.0, torch.randn(6, 3), kept)  # another new key
        assert pooled_cuda_graphs.captures() == 1
        replays = StandInGraph.replays
        _assert_equal(pooled_cuda_graphs.run(affine, 1.0, x, kept), affine(1.0, x, kept))
        assert pooled_cuda_graphs.captures() == 1 and StandInGraph.replays == replays + 1


class FrozenInputsGraph(StandInGraph):
    """A faulty graph: every replay computes from the tensors of its first replay, as a graph
    reading a stale address would."""

    frozen: ClassVar[dict[int, list[Tensor | None]]] = {}

    @staticmethod
    def replay(capture: Any, args: list[Tensor | None]) -> None:
        first = [None if a is None else a.clone() for a in args]
        frozen = FrozenInputsGraph.frozen.setdefault(id(capture), first)
        for out, new in zip(capture.outputs, capture.body(capture.config, *frozen), strict=True):
            out.copy_(new)


def test_a_replay_that_differs_from_its_eager_run_is_not_used(
    stand_in_graphs: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pooled_cuda_graphs, "_replay_graph", FrozenInputsGraph.replay)
    mismatches = pooled_cuda_graphs.mismatches_total
    w, x = torch.randn(3, 2), torch.randn(5, 3)
    for _ in range(4):
        x.normal_()  # new values at the same address: the faulty graph still reads the old
        _assert_equal(pooled_cuda_graphs.run(affine, 2.0, x, w), affine(2.0, x, w))
    # call 2 captured (its replay equal), call 3's replay differed: eager from then on
    assert pooled_cuda_graphs.mismatches_total == mismatches + 1
    assert pooled_cuda_graphs.captures() == 0 and len(pooled_cuda_graphs._failed) == 1
    assert "replay of tests.unit.onnx.test_pooled_cuda_graphs.affine differed" in caplog.text


def test_only_the_first_replays_are_checked(stand_in_graphs: None) -> None:
    calls = 0

    def counted(config: float, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        nonlocal calls
        calls += 1
        return affine(config, x, w)

    w, x = torch.randn(3, 2), torch.randn(5, 3)
    per_call = []
    for _ in range(6):
        before = calls
        pooled_cuda_graphs.run(counted, 1.0, x, w)
        per_call.append(calls - before)
    # 1: eager; 2: capture, eager check, replay; 3: eager check, replay; then the replay alone
    # (the stand-in's replay runs the function, a CUDA graph's does not)
    assert per_call == [1, 3, 2, 1, 1, 1]


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


GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _layer_args(cell: str, device: str, dtype: torch.dtype, seed: int) -> list[Tensor]:
    """Leaves for one direction: X [T, B, I], W, R, the bias row (lstm_sequence's [4H], the
    GRU's and RNN's node row [2gH]), h0, and c0 for the LSTM; steps 6, batch 3, 4 → 32."""
    if cell == "lstm":
        args = lstm_sequence_args(6, 3, 4, 32, dtype, seed)
    else:
        g, gates = torch.Generator().manual_seed(seed), GATES[cell]

        def normal(*shape: int, scale: float = 1.0) -> Tensor:
            return torch.randn(*shape, generator=g, dtype=dtype) * scale

        args = [
            normal(6, 3, 4),
            normal(gates * 32, 4, scale=0.5),
            normal(gates * 32, 32, scale=0.3),
            normal(2 * gates * 32, scale=0.3),
            normal(3, 32),
        ]
    return [t.detach().to(device).requires_grad_() for t in args]


def _layer(cell: str, args: list[Tensor], reverse: bool, sink: list[Tensor]) -> list[Tensor]:
    """One direction's outputs (Y, h_T and, for the LSTM, c_T), ∂L/∂h_t appended to `sink`."""
    if cell == "lstm":
        X, W, R, b, h0, c0 = args
        return list(lstm_sequence(X, W, R, b, h0, c0, reverse=reverse, hidden_grads=sink))
    X, W, R, b, h0 = args
    direction = gru_direction if cell == "gru" else rnn_direction
    return list(direction(X, W, R, b, h0, None, reverse, sink)[:2])


def _accumulated_passes(cell: str, device: str, dtype: torch.dtype, reverse: bool) -> list[Tensor]:
    """Three rounds of gradient accumulation over three batches through one recurrent
    direction (first sight, captures, replays): each round's loss, every leaf's gradient and
    the per-step hidden-state gradients collected. The saved tensors of a round's first pass
    must survive its second and third passes' replays, and the collected hidden-state
    gradients (held) every later replay."""
    batches = [_layer_args(cell, device, dtype, k) for k in range(3)]
    # every leaf's gradient: the weights', and each batch's X and initial states (their
    # gradients, views of a capture's outputs taken as .grad, keep its slot busy until they
    # are dropped)
    weights = [*batches[0][1:], *(X for X, *_ in batches)]
    results: list[Tensor] = []
    for _ in range(3):
        for w in weights:
            w.grad = None
        loss = torch.zeros((), dtype=dtype, device=device)
        sink: list[Tensor] = []
        for X, *_ in batches:
            # X * 1: a fresh tensor each pass, as a batch or another layer's output is, so
            # copied into the capture (a leaf would be read in place: a capture per batch)
            outputs = _layer(cell, [X * 1, *batches[0][1:]], reverse, sink)
            loss = loss + sum((o.square() * (k + 1)).mean() for k, o in enumerate(outputs))
        loss.backward()
        results += [loss.detach(), *(cast(Tensor, w.grad) for w in weights), *sink]
    return results


def _replayed_equals_eager(
    cell: str, device: str, dtype: torch.dtype, reverse: bool, tol: float
) -> None:
    mismatches = pooled_cuda_graphs.mismatches_total
    replayed = _accumulated_passes(cell, device, dtype, reverse)
    # equal to eager runs by the replays themselves, not by the check's eager fallback
    assert pooled_cuda_graphs.mismatches_total == mismatches
    with pytest.MonkeyPatch.context() as eager:
        eager.setenv("GRADHEALTH_CUDA_GRAPHS", "0")
        eager.setattr(pooled_cuda_graphs, "_replayable", lambda inputs: False)
        expected = _accumulated_passes(cell, device, dtype, reverse)
    assert len(replayed) == len(expected)
    for a, b in zip(replayed, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", sorted(GATES))
def test_recurrent_nodes_replayed_with_several_passes_before_one_backward(
    stand_in_graphs: None,
    emulated_kernels: list[str],  # noqa: F811 - the fixture
    cell: str,
    reverse: bool,
) -> None:
    _replayed_equals_eager(cell, "cpu", torch.float64, reverse, 1e-12)
    assert StandInGraph.replays > 0


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", sorted(GATES))
def test_cuda_graphs_of_recurrent_nodes_equal_eager_runs(cell: str, reverse: bool) -> None:
    """Real CUDA graphs of a recurrent node's forward and backward (each cell's persistent
    kernels at hidden 32), replayed while earlier passes' outputs are still held: the same
    losses and gradients as eager runs (the same kernels in the same order)."""
    before = pooled_cuda_graphs.captured_total
    _replayed_equals_eager(cell, "cuda", torch.float32, reverse, 1e-6)
    assert pooled_cuda_graphs.captured_total > before
