"""The whole-sequence LSTM, GRU and RNN (hand-written backward through time) against the unrolled
autograd path.

test_recurrent.py already compares every direction/layout with onnxruntime; here: float64
gradchecks, equality of values and of every gradient with the unrolled path (which autograd
differentiates step by step), small steps and training-sized ones, the per-step hidden-state
gradients they report, and which nodes take them. The C++ loops against the Python ones:
test_native_lstm.py, test_native_gru_rnn.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch

from service.engine.onnx.ops.gru_sequence import gru_direction
from service.engine.onnx.ops.lstm_sequence import lstm_direction, lstm_sequence
from service.engine.onnx.ops.recurrent import RecurrentFn
from service.engine.onnx.ops.rnn_sequence import rnn_direction
from tests.support.recurrent_zoo import (
    as_outputs,
    build_node_fn,
    call_recurrent,
    lstm_sequence_args,
)
from tests.unit.onnx.test_recurrent import Case


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_float64(reverse: bool, with_bias: bool) -> None:
    X, W, R, b, h0, c0 = lstm_sequence_args(4, 2, 3, 2, torch.float64)

    def run(*a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, w, r, h, c = a[0], a[1], a[2], a[-2], a[-1]
        bias = a[3] if with_bias else None
        return lstm_sequence(x, w, r, bias, h, c, reverse)

    args = (X, W, R, b, h0, c0) if with_bias else (X, W, R, h0, c0)
    assert torch.autograd.gradcheck(run, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_direction_functions_gradcheck_float64(op: str, reverse: bool) -> None:
    """Each direction function with the node's own bias row (Wb then Rb), float64."""
    directions: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]]
    directions = {"LSTM": lstm_direction, "GRU": gru_direction, "RNN": rnn_direction}
    direction = directions[op]
    gates, hidden, g = {"LSTM": 4, "GRU": 3, "RNN": 1}[op], 2, torch.Generator().manual_seed(3)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.7).requires_grad_(True)

    X, W, R = normal(4, 2, 3), normal(gates * hidden, 3), normal(gates * hidden, hidden)
    B, h0, c0 = normal(2 * gates * hidden), normal(2, hidden), normal(2, hidden)

    def run(*a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, h, c = direction(*a[:5], a[5] if op == "LSTM" else None, reverse, None)
        return (y, h) if c is None else (y, h, c)

    args = (X, W, R, B, h0, c0) if op == "LSTM" else (X, W, R, B, h0)
    assert torch.autograd.gradcheck(run, args, eps=1e-6, atol=1e-6)


def _both_paths(case: Case) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs then input gradients of one recurrent node, through the whole-sequence path and
    through the unrolled one, for a loss that weighs every output element differently."""
    node = case.node()
    results = []
    for whole in (True, False):
        fn = build_node_fn(node, case.opset)
        assert isinstance(fn, RecurrentFn) and fn.whole_sequence
        fn.whole_sequence = whole
        tensors = [None if v is None else torch.from_numpy(v) for v in case.inputs()]
        floats = [
            t.requires_grad_(True) for t in tensors if t is not None and t.is_floating_point()
        ]
        outputs = as_outputs(call_recurrent(fn, tensors), len(node.output))
        seed = torch.Generator().manual_seed(7)
        weights = [torch.randn(o.shape, generator=seed) for o in outputs]
        loss = sum((o * w).sum() for o, w in zip(outputs, weights, strict=True))
        grads = torch.autograd.grad(loss, floats)
        results.append(([o.detach() for o in outputs], list(grads)))
    (whole_out, whole_grads), (unrolled_out, unrolled_grads) = results
    for got, expected in zip(whole_out, unrolled_out, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    return whole_grads, unrolled_grads


SMALL = [
    Case(op, direction=direction, layout=layout, initial_state=initial, bias=bias, opset=opset)
    for op in ("LSTM", "GRU", "RNN")
    for direction, layout, initial, bias, opset in (
        ("forward", 0, True, True, 14),
        ("reverse", 1, True, True, 14),
        ("bidirectional", 0, False, True, 14),
        ("bidirectional", 0, True, False, 7),
    )
]
GRU_ATTRS = {"linear_before_reset": 1}  # what torch exports; =0 stays unrolled


def _with_defaults(case: Case) -> Case:
    return replace(case, attrs=GRU_ATTRS) if case.op == "GRU" else case


@pytest.mark.parametrize(
    "case", SMALL, ids=lambda c: f"{c.op}-{c.direction}-l{c.layout}-b{c.bias}-o{c.opset}"
)
def test_gradients_equal_the_unrolled_path(case: Case) -> None:
    for got, expected in zip(*_both_paths(_with_defaults(case)), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_large_steps_still_equal_the_unrolled_path(op: str) -> None:
    """Training-sized steps (hidden 128-256, batch 32, bidirectional)."""
    hidden = 128 if op == "LSTM" else 256
    case = replace(
        Case(op, direction="bidirectional", weight_scale=hidden**-0.5),
        batch=32,
        hidden=hidden,
        input_size=8,
    )
    for got, expected in zip(*_both_paths(_with_defaults(case)), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_hidden_gradients_equal_the_gradients_reaching_each_recorded_step(
    op: str, size: str
) -> None:
    """`hidden_grads` (from the backward through time) is ∂L/∂h_t: the same values autograd
    gives for the states that the unrolled path records (large: training-sized steps)."""
    case = _with_defaults(Case(op, direction="bidirectional", steps=5))
    if size == "large":
        case = replace(case, batch=32, hidden=256, input_size=8, weight_scale=256**-0.5)
    node = case.node()
    weights = torch.randn(case.steps, 2, case.batch, case.hidden)

    def run(fn: RecurrentFn) -> torch.Tensor:
        tensors = [None if v is None else torch.from_numpy(v) for v in case.inputs()]
        tensors[0].requires_grad_(True)  # type: ignore[union-attr]
        Y = as_outputs(call_recurrent(fn, tensors), len(node.output))[0]
        return (Y * weights).sum()

    whole = build_node_fn(node, case.opset)
    assert isinstance(whole, RecurrentFn)
    whole.collect_hidden_grads = True
    run(whole).backward()
    assert [len(d) for d in whole.hidden_grads] == [1, 1]  # one tensor per direction

    unrolled = build_node_fn(node, case.opset)
    assert isinstance(unrolled, RecurrentFn)
    unrolled.record_steps = True
    loss = run(unrolled)
    expected = torch.autograd.grad(loss, [*unrolled.step_hidden[0], *unrolled.step_hidden[1]])
    for d in range(2):
        got = whole.hidden_grads[d][0]
        assert got.shape == (case.steps, case.batch, case.hidden)
        want = torch.stack(expected[d * case.steps : (d + 1) * case.steps])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert bool((got.abs().sum((1, 2)) > 0).all())  # every step receives a gradient


@pytest.mark.parametrize(
    "case",
    [
        Case("LSTM", peepholes=True),
        Case("LSTM", attrs={"clip": 3.0}),
        Case("LSTM", attrs={"input_forget": 1}),
        Case("LSTM", attrs={"activations": ["HardSigmoid", "Tanh", "Tanh"]}),
        Case("GRU"),  # linear_before_reset=0
        Case("GRU", attrs={"linear_before_reset": 1, "clip": 2.0}),
        Case("RNN", attrs={"activations": ["Relu"]}),
    ],
    ids=["peepholes", "clip", "input_forget", "activations", "gru-lbr0", "gru-clip", "rnn-relu"],
)
def test_nodes_outside_the_default_cells_stay_unrolled(case: Case) -> None:
    fn = build_node_fn(case.node(), case.opset)
    assert isinstance(fn, RecurrentFn)
    if case.peepholes:  # decided per call: P is an input
        assert fn.whole_sequence
        fn.collect_hidden_grads = True
        tensors = [None if v is None else torch.from_numpy(v) for v in case.inputs()]
        tensors[0].requires_grad_(True)  # type: ignore[union-attr]
        as_outputs(call_recurrent(fn, tensors), 3)[0].sum().backward()
        assert fn.hidden_grads == [[]]  # the unrolled path ran
    else:
        assert not fn.whole_sequence


def test_autocast_bfloat16_runs_the_loop_in_the_autocast_dtype() -> None:
    X, W, R, b, h0, c0 = lstm_sequence_args(3, 2, 3, 4, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        Y, _, _ = lstm_sequence(X, W, R, b, h0, c0)
    assert Y.dtype == torch.bfloat16
    Y.float().sum().backward()
    assert W.grad is not None and W.grad.dtype == torch.float32
    expected, _, _ = lstm_sequence(X.detach(), W.detach(), R.detach(), b.detach(), h0, c0)
    np.testing.assert_allclose(Y.float().detach().numpy(), expected.detach().numpy(), atol=0.05)
