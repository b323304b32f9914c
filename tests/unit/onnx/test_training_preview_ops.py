"""The ai.onnx.preview.training optimizers (Adagrad, Adam, Momentum; ops/training_preview.py):
the backend cases, onnx's ReferenceEvaluator past the first step (T > 0, which the backend
data never reaches) with one and several optimised tensors, float64 gradcheck w.r.t. every
float input, and what is refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from service.engine.onnx.convert import convert
from service.errors import UnsupportedModelError
from tests.unit.onnx.backend_cases import node_cases_named, run_case

TRAINING = "ai.onnx.preview.training"
BACKEND_CASES = (
    "test_adagrad",
    "test_adagrad_multiple",
    "test_adam",
    "test_adam_multiple",
    "test_momentum",
    "test_nesterov_momentum",
    "test_momentum_multiple",
)
# Per op: its accumulators (inputs after X and G, one new value each) and attributes that
# make every term of its formula count (regularisation, decay, post-regularisation).
OPTIMIZERS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "Adagrad": (("H",), {"norm_coefficient": 0.01, "decay_factor": 0.1, "epsilon": 1e-5}),
    "Adam": (
        ("V", "H"),
        {
            "alpha": 0.9,
            "beta": 0.8,
            "epsilon": 1e-5,
            "norm_coefficient": 0.01,
            "norm_coefficient_post": 0.02,
        },
    ),
    "Momentum": (
        ("V",),
        {"alpha": 0.9, "beta": 0.7, "norm_coefficient": 0.01, "mode": "standard"},
    ),
    "Nesterov": (
        ("V",),
        {"alpha": 0.9, "beta": 0.7, "norm_coefficient": 0.01, "mode": "nesterov"},
    ),
}


@pytest.mark.parametrize("name", BACKEND_CASES)
def test_backend_case_passes(name: str) -> None:
    assert run_case(node_cases_named(BACKEND_CASES)[name]) == ("pass", "")


def _optimizer_model(
    op: str, count: int, elem: int, attrs: dict[str, Any] | None = None
) -> onnx.ModelProto:
    """One optimiser node updating `count` tensors of shape [2, 3]: inputs R, T, X1.., G1..,
    then each accumulator's 1..count; outputs the new X1.., then each new accumulator."""
    accumulators, default_attrs = OPTIMIZERS[op]
    groups = ("X", "G", *accumulators)
    names = [f"{group}{i}" for group in groups for i in range(1, count + 1)]
    outputs = [f"{group}{i}_new" for group in groups if group != "G" for i in range(1, count + 1)]
    node = helper.make_node(
        "Momentum" if op == "Nesterov" else op,
        ["R", "T", *names],
        outputs,
        domain=TRAINING,
        **(default_attrs if attrs is None else attrs),
    )
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("R", elem, []),
            helper.make_tensor_value_info("T", TensorProto.INT64, []),
            *(helper.make_tensor_value_info(n, elem, [2, 3]) for n in names),
        ],
        [helper.make_tensor_value_info(n, elem, [2, 3]) for n in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(TRAINING, 1)])
    model.ir_version = 8
    return model


def _feeds(op: str, count: int, dtype: np.dtype[Any], step: int) -> list[np.ndarray]:
    """R, T = step, then X, G and accumulators (squared-gradient ones positive: √ of them)."""
    rng = np.random.default_rng(step)
    accumulators = OPTIMIZERS[op][0]
    tensors = [rng.standard_normal((2, 3)) for _ in range(2 * count)]
    for name in accumulators:
        values = [rng.standard_normal((2, 3)) for _ in range(count)]
        tensors += [np.abs(v) + 0.5 for v in values] if name == "H" else values
    return [np.array(0.1, dtype), np.array(step, np.int64), *(t.astype(dtype) for t in tensors)]


@pytest.mark.parametrize("op", sorted(OPTIMIZERS))
@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("step", [0, 4])
def test_matches_reference_evaluator(op: str, count: int, step: int) -> None:
    model = _optimizer_model(op, count, TensorProto.FLOAT)
    feeds = _feeds(op, count, np.dtype(np.float32), step)
    names = [i.name for i in model.graph.input]
    want = ReferenceEvaluator(model).run(None, dict(zip(names, feeds, strict=True)))
    with torch.no_grad():
        got = convert(model, mode="eval").run([torch.from_numpy(f) for f in feeds])
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", sorted(OPTIMIZERS))
@pytest.mark.parametrize("step", [0, 4])
def test_gradcheck_wrt_every_float_input(op: str, step: int) -> None:
    """R, every X, G and accumulator, two optimised tensors at once, in float64."""
    graph = convert(_optimizer_model(op, 2, TensorProto.DOUBLE), mode="eval")
    r, t, *tensors = (torch.from_numpy(f) for f in _feeds(op, 2, np.dtype(np.float64), step))
    leaves = [v.clone().requires_grad_(True) for v in (r, *tensors)]

    def update(rate: torch.Tensor, *values: torch.Tensor) -> Any:
        return graph(rate, t, *values)

    assert torch.autograd.gradcheck(update, leaves, eps=1e-6, atol=1e-5)


def test_float_learning_rate_for_double_tensors() -> None:
    """R and the tensors are separate type parameters: a float R updates double tensors."""
    model = _optimizer_model("Adam", 1, TensorProto.DOUBLE)
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    feeds = _feeds("Adam", 1, np.dtype(np.float64), 2)
    feeds[0] = feeds[0].astype(np.float32)
    names = [i.name for i in model.graph.input]
    want = ReferenceEvaluator(model).run(None, dict(zip(names, feeds, strict=True)))
    got = convert(model, mode="eval").run([torch.from_numpy(f) for f in feeds])
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float64
        np.testing.assert_allclose(g.detach().numpy(), w, rtol=1e-6)


def test_unknown_momentum_mode_is_refused() -> None:
    attrs = {**OPTIMIZERS["Momentum"][1], "mode": "heavy"}
    with pytest.raises(UnsupportedModelError) as info:
        convert(_optimizer_model("Momentum", 1, TensorProto.FLOAT, attrs), mode="eval")
    assert "Momentum mode 'heavy' is not one of standard, nesterov" in info.value.message


def test_inputs_not_grouped_per_tensor_are_refused() -> None:
    """Adam takes R, T and 4 inputs per tensor: 2 + 5 inputs cannot be split so."""
    model = _optimizer_model("Adam", 1, TensorProto.FLOAT)
    model.graph.node[0].input.append("X1")
    with pytest.raises(UnsupportedModelError) as info:
        convert(model, mode="eval")
    assert "Adam takes R, T and 4 inputs per optimised tensor" in info.value.message
