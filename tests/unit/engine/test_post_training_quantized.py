"""A post-training-quantised QDQ model (onnxruntime's quantize_static): its weights are int8
initializers read through DequantizeLinear, so it had no trainable parameter at all (and
crashed with "element 0 of tensors does not require grad"). The dequantized weights are
float parameters under the source's names, with the gradients of fine-tuning from the
checkpoint; its activation quantisers stay fake-quantised, and the one onnxruntime fused a
ReLU into (a range starting at 0) does not count the negatives it clamps as clipping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torch import nn

from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from service.engine.report import Report
from tests.support.export import to_onnx
from tests.unit.engine.measure_support import npz_bytes

X = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(1))


class _Calibration(CalibrationDataReader):
    """The diagnosed batch itself: min/max calibration then clips none of it."""

    def __init__(self) -> None:
        self.batches = iter([{"x": X.numpy()}])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


@pytest.fixture(scope="module", params=["ai.onnx", "com.microsoft"])
def quantized(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> onnx.ModelProto:
    """The default domain's QuantizeLinear/DequantizeLinear, or onnxruntime's contrib ones
    (`UseQDQContribOps`, what its quantiser writes for int16 or int4 below opset 21)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    folder = tmp_path_factory.mktemp("ptq")
    fp32, int8 = folder / "fp32.onnx", folder / "int8.onnx"
    fp32.write_bytes(to_onnx(module, X, input_names=["x"], training=False, opset=17))
    quantize_static(
        str(fp32),
        str(int8),
        _Calibration(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        extra_options={"UseQDQContribOps": request.param == "com.microsoft"},
    )
    model = onnx.load(str(Path(int8)))
    domains = {n.domain or "ai.onnx" for n in model.graph.node if "Quantize" in n.op_type}
    assert domains == {request.param}
    return model


def _fake(x: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
    """int8 fake quantisation as ONNX's QuantizeLinear → DequantizeLinear computes it."""
    q = x / scale
    q = q + (torch.round(q) - q).detach() + zero
    return (q.clamp(-128, 127) - zero) * scale


def _reference(model: onnx.ModelProto) -> tuple[float, dict[str, torch.Tensor]]:
    """The QDQ graph written in torch from its own initializers: loss and weight gradients."""
    init = {
        i.name: torch.from_numpy(onnx.numpy_helper.to_array(i).copy())
        for i in model.graph.initializer
    }
    node_of = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}

    def dequantized(name: str) -> torch.Tensor:
        node = node_of[f"{name}_quantized"]
        q, s, z = (init[i].double() for i in node.input)
        return ((q - z) * s).float().requires_grad_()

    def fake(x: torch.Tensor, index: int) -> torch.Tensor:
        node = [n for n in model.graph.node if n.op_type == "QuantizeLinear"][index]
        return _fake(x, float(init[node.input[1]]), int(init[node.input[2]]))

    weights = {n: dequantized(n) for n in ("0.weight", "0.bias", "2.weight", "2.bias")}
    h = fake(X, 0) @ weights["0.weight"].T + weights["0.bias"]
    h = fake(h, 1)  # its range starts at 0: the ReLU onnxruntime fused into it
    logits = fake(h @ weights["2.weight"].T + weights["2.bias"], 2)
    loss = F.cross_entropy(logits, Y)
    grads = dict(zip(weights, torch.autograd.grad(loss, list(weights.values())), strict=True))
    return loss.item(), grads


def _diagnose(model: onnx.ModelProto) -> Report:
    return diagnose(model.SerializeToString(), npz_bytes(x=X, target=Y), DiagnoseOptions())


def test_a_post_training_quantized_models_weights_are_float_parameters(
    quantized: onnx.ModelProto,
) -> None:
    assert all(
        i.data_type != onnx.TensorProto.FLOAT or "scale" in i.name
        for i in quantized.graph.initializer
    )  # the premise: every weight is an integer
    report = _diagnose(quantized)
    loss, grads = _reference(quantized)
    assert report.loss.value == pytest.approx(loss, rel=1e-6)
    ours = {p.name: p.grad_norm for p in report.parameters}
    assert ours == pytest.approx({n: float(g.norm()) for n, g in grads.items()}, rel=1e-5)
    assert report.model.conversion is not None
    assert report.model.conversion.max_abs_error is not None
    assert report.model.conversion.max_abs_error < 1e-6
    assert any("stored as integers (a post-training-quantised model" in n for n in report.notes)


def test_the_quantiser_a_relu_was_fused_into_does_not_count_negatives_as_clipping(
    quantized: onnx.ModelProto,
) -> None:
    report = _diagnose(quantized)
    fused = [q for q in report.quantizers if q.range_min == 0.0]
    assert len(fused) == 1 and fused[0].input_min is not None and fused[0].input_min < 0
    assert fused[0].clipped_fraction < 0.01
    assert not [f for f in report.findings if f.kind == "quantizer_clipping"]


def test_a_model_with_nothing_trainable_is_a_finding_not_a_crash() -> None:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "nothing",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [8, 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [8, 16])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    report = diagnose(model.SerializeToString(), npz_bytes(x=X), DiagnoseOptions())
    assert [(f.kind, f.severity) for f in report.findings] == [("no_trainable_parameters", "error")]
    assert report.verdict == "unhealthy" and report.parameters == []
