"""Whose fault a failed forward is (measure._forward_failure).

A batch that matches the model's declared inputs can still fail to run: through the batch
(dims the declaration cannot express) or through gradhealth. For ONNX, onnxruntime decides; a
converter defect must not reach the user as "check your batch" (exit 2), and bad input must
not be reported as a gradhealth defect.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.engine.onnx import registry
from service.engine.onnx.registry import OpContext
from service.engine.pipeline import diagnose
from service.errors import BadInputError, EngineError


def _model(reshape_to: list[int]) -> bytes:
    """x [N, F] (both dims free) → Reshape(reshape_to) → MatMul W [4, 3] → Tanh."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape"], ["flat"], name="reshape"),
            helper.make_node("MatMul", ["flat", "W"], ["mm"], name="project"),
            helper.make_node("Tanh", ["mm"], ["y"], name="squash"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "F"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 3])],
        [
            numpy_helper.from_array(np.array(reshape_to, dtype=np.int64), "shape"),
            numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def _batch(rows: int, features: int) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.ones((rows, features), dtype=np.float32))
    return buffer.getvalue()


def test_a_batch_that_onnxruntime_cannot_run_either_is_bad_input() -> None:
    # 3×5 = 15 values cannot be reshaped to [-1, 4]: the declared [N, F] cannot say so
    with pytest.raises(BadInputError) as caught:
        diagnose(_model([-1, 4]), _batch(3, 5))
    message = caught.value.message
    assert not isinstance(caught.value, EngineError)
    assert "at node 'reshape' (Reshape)" in message
    assert "onnxruntime fails on it too" in message
    assert "check that the batch's shapes" in message


def test_a_converter_failure_on_a_batch_onnxruntime_runs_is_an_engine_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A converter defect planted in Tanh's implementation (the only way to have one on
    purpose): the batch is fine, onnxruntime runs it, so the error is gradhealth's."""

    def broken_tanh(ctx: OpContext) -> registry.NodeFn:
        def run(x: object) -> object:
            raise RuntimeError("planted converter defect")

        return run

    monkeypatch.setitem(
        registry._REGISTRY, ("", "Tanh"), [registry._Entry(since=1, builder=broken_tanh)]
    )
    model, batch = _model([-1, 4]), _batch(3, 4)
    with pytest.raises(EngineError) as caught:
        diagnose(model, batch)
    error = caught.value
    assert error.status == 500 and error.code == "engine_error"
    assert "at node 'squash' (Tanh): planted converter defect" in error.message
    assert "onnxruntime runs the same batch" in error.message

    monkeypatch.undo()  # the same model and batch run once the defect is gone
    report = diagnose(model, batch)
    assert report.model.conversion is not None and report.model.conversion.checked


def test_a_model_onnxruntime_cannot_load_leaves_the_error_with_the_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No reference to ask (onnxruntime refuses the model): the error stays bad input, as
    for the formats that run their own code, without claiming anything of onnxruntime."""
    from service.engine.onnx import conformance

    def unavailable(*args: object) -> str | None:
        raise conformance.ReferenceUnavailable("onnxruntime cannot load the model: test")

    monkeypatch.setattr(conformance, "reference_failure", unavailable)
    with pytest.raises(BadInputError) as caught:
        diagnose(_model([-1, 4]), _batch(3, 5))
    assert not isinstance(caught.value, EngineError)
    assert "onnxruntime" not in caught.value.message


def test_the_model_file_is_valid_onnx() -> None:
    onnx.checker.check_model(onnx.load_from_string(_model([-1, 4])))


def _inconsistent_lstm() -> bytes:
    """x declared [2, 3, 4] (all fixed) into an LSTM of hidden size 2 whose initial cell state
    is [1, 3, 5]: no batch can run it (onnxruntime loads it and fails at run time)."""
    rng = np.random.default_rng(0)
    weights = {
        "W": (1, 8, 4),
        "R": (1, 8, 2),
        "h0": (1, 3, 2),
        "c0": (1, 3, 5),
    }
    graph = helper.make_graph(
        [
            helper.make_node(
                "LSTM", ["x", "W", "R", "", "", "h0", "c0"], ["y"], name="lstm", hidden_size=2
            )
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
            for name, shape in weights.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def test_a_model_failing_on_exactly_its_declared_shapes_is_said_to_be_inconsistent() -> None:
    """The exporter wrote a file that fails on its own declared input shapes (seen: an
    nn.LSTM with proj_size through the dynamo exporter): asking to check the batch would send
    the user after the wrong thing."""
    buffer = io.BytesIO()
    np.savez(buffer, x=np.ones((2, 3, 4), dtype=np.float32))
    with pytest.raises(BadInputError) as caught:
        diagnose(_inconsistent_lstm(), buffer.getvalue())
    message = caught.value.message
    assert "onnxruntime fails on it too" in message
    assert "the model file itself is inconsistent" in message
    assert "check that the batch's shapes" not in message
