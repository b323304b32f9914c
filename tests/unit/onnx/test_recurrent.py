"""RNN / GRU / LSTM builders against onnxruntime over the attribute grid, and their gradients.

Each case is a one-node model run by onnxruntime and by the builder's NodeFn on the same data.
onnxruntime only runs `layout=0`; a `layout=1` case is compared with onnxruntime on the
transposed problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import pytest
import torch
from onnx import helper

from service.engine.onnx.ops.recurrent import RecurrentFn
from service.engine.onnx.registry import UnsupportedAttribute
from tests.support.recurrent_zoo import (
    as_outputs,
    build_node_fn,
    call_recurrent,
    run_onnxruntime,
    single_node_model,
)

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
INPUT_NAMES = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"]


@dataclass
class Case:
    op: str
    direction: str = "forward"
    layout: int = 0
    sequence_lens: bool = False
    initial_state: bool = True
    bias: bool = True
    peepholes: bool = False
    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 14
    steps: int = 4
    batch: int = 3
    input_size: int = 2
    hidden: int = 3
    seed: int = 0
    dtype: Any = np.float32
    weight_scale: float = 0.7  # of W and R; large hidden sizes need ~1/sqrt(hidden)

    def inputs(self) -> list[np.ndarray | None]:
        rng = np.random.default_rng(self.seed)
        gates, dirs = GATES[self.op], 2 if self.direction == "bidirectional" else 1

        def normal(*shape: int, scale: float = 1.0) -> np.ndarray:
            return (rng.standard_normal(shape) * scale).astype(self.dtype)

        seq_first = self.layout == 0
        x_shape = (self.steps, self.batch) if seq_first else (self.batch, self.steps)
        state_shape = (dirs, self.batch) if seq_first else (self.batch, dirs)
        lens = None
        if self.sequence_lens:  # one sequence full length, one empty, the others shorter
            lens = rng.integers(1, self.steps + 1, size=self.batch).astype(np.int32)
            lens[0] = self.steps
            if self.batch > 2:
                lens[-1] = 0
        values: list[np.ndarray | None] = [
            normal(*x_shape, self.input_size),
            normal(dirs, gates * self.hidden, self.input_size, scale=self.weight_scale),
            normal(dirs, gates * self.hidden, self.hidden, scale=self.weight_scale),
            normal(dirs, 2 * gates * self.hidden, scale=0.3) if self.bias else None,
            lens,
            normal(*state_shape, self.hidden) if self.initial_state else None,
        ]
        if self.op == "LSTM":
            values.append(normal(*state_shape, self.hidden) if self.initial_state else None)
            values.append(normal(dirs, 3 * self.hidden) if self.peepholes else None)
        while values[-1] is None:
            values.pop()
        return values

    def node(self, layout: int | None = None) -> Any:
        values = self.inputs()
        names = [n if v is not None else "" for n, v in zip(INPUT_NAMES, values, strict=False)]
        outputs = ["Y", "Y_h"] + (["Y_c"] if self.op == "LSTM" else [])
        attrs = {"hidden_size": self.hidden, "direction": self.direction, **self.attrs}
        if self.opset >= 14:
            attrs["layout"] = self.layout if layout is None else layout
        return helper.make_node(self.op, names, outputs, **attrs)


def onnxruntime_outputs(case: Case) -> list[np.ndarray]:
    values = case.inputs()
    if case.layout == 0:
        return run_onnxruntime(*single_node_model(case.node(), values, opset=case.opset))
    # onnxruntime refuses layout=1: run the transposed problem with layout=0
    swapped = [
        v.transpose(1, 0, 2) if v is not None and i in (0, 5, 6) else v
        for i, v in enumerate(values)
    ]
    y, *states = run_onnxruntime(*single_node_model(case.node(layout=0), swapped, opset=case.opset))
    return [y.transpose(2, 0, 1, 3), *(s.transpose(1, 0, 2) for s in states)]


def converted_outputs(case: Case, requires_grad: bool = False) -> list[torch.Tensor]:
    node = case.node()
    fn = build_node_fn(node, case.opset)
    tensors = [None if v is None else torch.from_numpy(v) for v in case.inputs()]
    if requires_grad:
        for t in tensors:
            if t is not None and t.is_floating_point():
                t.requires_grad_(True)
    return as_outputs(fn(*tensors), len(node.output))


def assert_matches_onnxruntime(case: Case, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    expected = onnxruntime_outputs(case)
    got = converted_outputs(case)
    assert len(got) == len(expected)
    for name, e, g in zip(["Y", "Y_h", "Y_c"], expected, got, strict=False):
        np.testing.assert_allclose(g.detach().numpy(), e, rtol=rtol, atol=atol, err_msg=name)


STRUCTURE = [
    Case(op, direction=d, layout=layout, sequence_lens=lens, seed=i)
    for i, (op, d, layout, lens) in enumerate(
        (op, d, layout, lens)
        for op in GATES
        for d in ("forward", "reverse", "bidirectional")
        for layout in (0, 1)
        for lens in (False, True)
    )
]


@pytest.mark.parametrize(
    "case", STRUCTURE, ids=lambda c: f"{c.op}-{c.direction}-layout{c.layout}-lens{c.sequence_lens}"
)
def test_directions_layouts_and_sequence_lens_match_onnxruntime(case: Case) -> None:
    assert_matches_onnxruntime(case)


ACTIVATIONS = [
    "Sigmoid",
    "Tanh",
    "Relu",
    "HardSigmoid",
    "LeakyRelu",
    "ThresholdedRelu",
    "ScaledTanh",
    "Affine",
    "Elu",
    "Softsign",
    "Softplus",
]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_each_activation_with_and_without_alpha_beta(activation: str) -> None:
    # no alpha/beta: the defaults; then given ones, consumed only by the functions that take them
    assert_matches_onnxruntime(Case("RNN", attrs={"activations": [activation]}))
    assert_matches_onnxruntime(
        Case(
            "RNN",
            direction="bidirectional",
            attrs={
                "activations": [activation, "LeakyRelu"],
                "activation_alpha": [0.3, 0.2],
                "activation_beta": [0.6],
            },
        )
    )
    assert_matches_onnxruntime(
        Case(
            "LSTM",
            sequence_lens=True,
            attrs={
                "activations": ["Sigmoid", activation, activation],
                "activation_alpha": [0.7, 0.4],
                "activation_beta": [0.2, 0.1],
            },
        )
    )
    assert_matches_onnxruntime(
        Case("GRU", attrs={"activations": ["HardSigmoid", activation], "activation_alpha": [0.3]})
    )


ATTRIBUTES = [
    Case("GRU", attrs={"linear_before_reset": 1}),
    Case("GRU", direction="bidirectional", sequence_lens=True, attrs={"linear_before_reset": 1}),
    Case("RNN", attrs={"clip": 0.5}),
    Case("GRU", attrs={"clip": 0.4}),
    Case("GRU", attrs={"clip": 0.4, "linear_before_reset": 1}),
    Case("LSTM", attrs={"clip": 0.3}),
    Case("LSTM", peepholes=True),
    Case("LSTM", peepholes=True, attrs={"clip": 0.3}),
    Case("LSTM", direction="bidirectional", peepholes=True, sequence_lens=True),
    Case("LSTM", attrs={"input_forget": 1}),
    Case("LSTM", peepholes=True, attrs={"input_forget": 1}),
    Case("LSTM", initial_state=False, bias=False),
    Case("GRU", initial_state=False, bias=False, direction="reverse"),
    Case("LSTM", direction="bidirectional", sequence_lens=True, opset=7),
    Case("GRU", opset=7, sequence_lens=True),
    Case("RNN", opset=22, layout=1, direction="bidirectional"),
    Case(
        "LSTM",
        direction="bidirectional",
        attrs={
            "activations": ["Sigmoid", "Tanh", "Tanh", "HardSigmoid", "Affine", "ScaledTanh"],
            "activation_alpha": [0.1, 0.2, 0.3],
            "activation_beta": [0.4, 0.5, 0.6],
        },
    ),
]


@pytest.mark.parametrize("case", ATTRIBUTES, ids=lambda c: f"{c.op}-{c.attrs}-{c.opset}")
def test_attributes_match_onnxruntime(case: Case) -> None:
    assert_matches_onnxruntime(case)


def test_long_sequence_matches_onnxruntime() -> None:
    # 128 steps: the state is carried through a long unrolled loop without drift
    assert_matches_onnxruntime(Case("LSTM", steps=128, batch=2, sequence_lens=True))
    assert_matches_onnxruntime(Case("GRU", steps=128, batch=2, direction="bidirectional"))


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"activations": ["Swish"]}, "Swish"),
        ({"direction": "sideways"}, "sideways"),
        ({"activations": ["Tanh"], "direction": "bidirectional"}, "2 direction"),
        ({"layout": 2}, "layout"),
        ({"clip": -1.0}, "clip"),
    ],
)
def test_unsupported_attribute_values_are_refused_at_build_time(
    attrs: dict[str, Any], message: str
) -> None:
    case = Case("RNN", attrs=attrs)
    with pytest.raises(UnsupportedAttribute, match=message):
        build_node_fn(case.node(layout=attrs.get("layout")), case.opset)


def _onnx_to_torch_gates(t: torch.Tensor, hidden: int) -> torch.Tensor:
    i, o, f, c = t.split(hidden, 0)  # ONNX order i, o, f, c
    return torch.cat([i, f, c, o], 0)  # torch order i, f, g, o


def test_lstm_outputs_and_gradients_equal_torch_lstm() -> None:
    # the unrolled loop and torch's fused LSTM compute the same function: same gradients
    case = Case("LSTM", steps=6, batch=2)
    X, W, R, B, _, h0, c0 = (
        None if v is None else torch.from_numpy(v).requires_grad_(True) for v in case.inputs()
    )
    assert X is not None and W is not None and R is not None and B is not None
    assert h0 is not None and c0 is not None
    fn = build_node_fn(case.node(), case.opset)
    Y, Y_h, Y_c = fn(X, W, R, B, None, h0, c0)
    (Y.square().sum() + Y_h.sum() + Y_c.sum()).backward()

    hidden = case.hidden
    reference = torch.nn.LSTM(case.input_size, hidden)
    with torch.no_grad():
        cast(torch.Tensor, reference.weight_ih_l0).copy_(_onnx_to_torch_gates(W[0], hidden))
        cast(torch.Tensor, reference.weight_hh_l0).copy_(_onnx_to_torch_gates(R[0], hidden))
        cast(torch.Tensor, reference.bias_ih_l0).copy_(
            _onnx_to_torch_gates(B[0, : 4 * hidden], hidden)
        )
        cast(torch.Tensor, reference.bias_hh_l0).copy_(
            _onnx_to_torch_gates(B[0, 4 * hidden :], hidden)
        )
    x_ref, h0_ref, c0_ref = (t.detach().clone().requires_grad_(True) for t in (X, h0, c0))
    y_ref, (h_ref, c_ref) = reference(x_ref, (h0_ref, c0_ref))
    (y_ref.square().sum() + h_ref.sum() + c_ref.sum()).backward()

    torch.testing.assert_close(Y[:, 0], y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(X.grad, x_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(h0.grad, h0_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(c0.grad, c0_ref.grad, rtol=1e-4, atol=1e-6)
    assert W.grad is not None and R.grad is not None and B.grad is not None
    pairs = [
        (W.grad[0], reference.weight_ih_l0.grad),
        (R.grad[0], reference.weight_hh_l0.grad),
        (B.grad[0, : 4 * hidden], reference.bias_ih_l0.grad),
        (B.grad[0, 4 * hidden :], reference.bias_hh_l0.grad),
    ]
    for got, expected in pairs:
        torch.testing.assert_close(
            _onnx_to_torch_gates(got, hidden), expected, rtol=1e-4, atol=1e-6
        )


def test_every_step_receives_gradient_through_the_recurrence() -> None:
    # a loss on the last output only: each earlier step gets gradient solely via the recurrence
    case = Case("GRU", steps=5, batch=2, sequence_lens=True, direction="bidirectional")
    node = case.node()
    fn = build_node_fn(node, case.opset)
    assert isinstance(fn, RecurrentFn)
    fn.record_steps = True
    tensors = [None if v is None else torch.from_numpy(v) for v in case.inputs()]
    X = tensors[0].requires_grad_(True)  # type: ignore[union-attr]
    Y, _ = call_recurrent(fn, tensors)
    assert Y is not None
    assert len(fn.step_hidden) == 2 and all(len(d) == case.steps for d in fn.step_hidden)
    step_grads = torch.autograd.grad(
        Y[-1, 0].sum() + Y[0, 1].sum(), [X, *fn.step_hidden[0], *fn.step_hidden[1]]
    )
    x_grad = step_grads[0]
    assert all(float(x_grad[t].abs().sum()) > 0 for t in range(case.steps))
    forward_steps = step_grads[1 : 1 + case.steps]
    # the recorded states are the ones Y stacks: d loss / d h_t is nonzero for every t
    assert all(float(g.abs().sum()) > 0 for g in forward_steps)


GRADCHECK = [
    Case("RNN", direction="bidirectional", sequence_lens=True),
    Case("GRU", direction="bidirectional", sequence_lens=True),
    Case("GRU", direction="reverse", attrs={"linear_before_reset": 1}, layout=1),
    Case("LSTM", direction="bidirectional", sequence_lens=True, peepholes=True),
    Case("LSTM", attrs={"input_forget": 1, "clip": 5.0}),
]


@pytest.mark.parametrize("case", GRADCHECK, ids=lambda c: f"{c.op}-{c.direction}-{c.attrs}")
def test_gradcheck_float64(case: Case) -> None:
    case = replace(case, dtype=np.float64, steps=3, batch=2, hidden=2)
    node = case.node()
    fn = build_node_fn(node, case.opset)
    values = case.inputs()
    float_positions = [i for i, v in enumerate(values) if v is not None and v.dtype == np.float64]
    tensors = [None if v is None else torch.from_numpy(v) for v in values]

    def run(*floats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = list(tensors)
        for position, value in zip(float_positions, floats, strict=True):
            args[position] = value
        return tuple(as_outputs(fn(*args), len(node.output)))

    floats = [tensors[i].clone().requires_grad_(True) for i in float_positions]  # type: ignore[union-attr]
    assert torch.autograd.gradcheck(run, floats, eps=1e-6, atol=1e-5)


DEFERRED = [
    Case("LSTM", direction="bidirectional", sequence_lens=True),
    Case("LSTM", peepholes=True, attrs={"clip": 2.0}, layout=1),
    Case("RNN", direction="reverse", sequence_lens=True, steps=5),
]


@pytest.mark.parametrize("case", DEFERRED, ids=lambda c: f"{c.op}-{c.direction}-{c.attrs}")
def test_deferred_recurrence_weight_gradient_equals_the_per_step_one(case: Case) -> None:
    """RNN/LSTM compute R's gradient once per call; it must equal the gradient autograd
    accumulates step by step (the same node with the deferral switched off), and the
    per-step states keep receiving their gradients."""
    node = case.node()
    weights = torch.randn(case.steps * 2, generator=torch.Generator().manual_seed(4))

    def grads(deferred: bool) -> list[torch.Tensor]:
        fn = build_node_fn(node, case.opset)
        assert isinstance(fn, RecurrentFn) and fn.linear_recurrence
        fn.linear_recurrence = deferred
        fn.record_steps = True
        tensors = [None if v is None else torch.from_numpy(v) for v in case.inputs()]
        for i in (0, 1, 2):
            tensors[i].requires_grad_(True)  # type: ignore[union-attr]
        Y = as_outputs(call_recurrent(fn, tensors), len(node.output))[0]
        time_axis = 0 if case.layout == 0 else 1
        per_step = Y.movedim(time_axis, 0).flatten(1).sum(1)  # one value per step
        loss = (per_step * weights[: case.steps]).sum()
        leaves = cast(list[torch.Tensor], tensors[:3])  # X, W, R: never None, made leaves above
        return list(torch.autograd.grad(loss, [*leaves, *fn.step_hidden[0]]))

    for got, expected in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_second_order_gradient_through_deferred_recurrence_weights_is_refused() -> None:
    # R's deferred gradient is computed from detached states: differentiating it again
    # must fail loudly rather than return a wrong Hessian term
    case = Case("LSTM")
    fn = build_node_fn(case.node(), case.opset)
    tensors = [None if v is None else torch.from_numpy(v) for v in case.inputs()]
    R = tensors[2].requires_grad_(True)  # type: ignore[union-attr]
    Y = as_outputs(fn(*tensors), 3)[0]
    (r_grad,) = torch.autograd.grad(Y.square().sum(), [R], create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|differentiate twice"):
        r_grad.sum().backward()
