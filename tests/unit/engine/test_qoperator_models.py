"""Statically quantised models in onnxruntime's QOperator format (`quantize_static(...,
quant_format=QuantFormat.QOperator)`): every layer is an integer op (QLinearConv, QGemm,
QLinearAdd, ...), so no weight had a gradient. The conversion writes them as QDQ
(onnx/qoperator_as_qdq.py): the weights are float parameters under the source's names, with the
gradients of fine-tuning from the checkpoint with fake-quantised activations.

The forward is compared with onnxruntime's integer kernels: the rewrite computes each op in float
between a dequantization and a quantisation, which can round a value near a boundary the other
way (one step there, then carried on); on these models nothing moves at all. The gradients are
compared with the same fake-quantised computation written in torch (`_cnn_reference`,
`_mlp_reference`): the same float32 operations in another order, so a few ulps apart (2e-4
relative covers them, and also a rare activation whose rounding tie the two orders break apart).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torch import nn

from service.engine.onnx.convert import convert
from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from tests.support.export import to_onnx
from tests.support.quantized_reference import initializers
from tests.support.recurrent_zoo import run_onnxruntime
from tests.unit.engine.measure_support import npz_bytes

IMAGES = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
FEATURES = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
LABELS = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(1))
ONE_HOT = F.one_hot(torch.randint(0, 6, (8,), generator=torch.Generator().manual_seed(3)), 6)
GRADIENT_TOLERANCE = 2e-4


class SmallCNN(nn.Module):
    """Conv + ReLU, MaxPool, a residual Add, GlobalAveragePool, Flatten, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = h + F.relu(self.conv2(h))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class SmallMLP(nn.Module):
    """Sigmoid, LeakyRelu, Concat, Mul and Softmax between three Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 12), nn.Linear(16, 12), nn.Linear(24, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, leaky = torch.sigmoid(self.a(x)), F.leaky_relu(self.b(x), 0.1)
        return torch.softmax(self.c(torch.cat([gate, leaky], dim=1)) * gate[:, :6], dim=1)


class _Calibration(CalibrationDataReader):
    """The compared batch itself: min/max calibration then clips none of it."""

    def __init__(self, x: torch.Tensor) -> None:
        self.batches = iter([{"x": x.numpy()}])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def _quantized(
    folder: Path, module: nn.Module, x: torch.Tensor, activations: QuantType, per_channel: bool
) -> onnx.ModelProto:
    fp32, int8 = folder / "fp32.onnx", folder / "int8.onnx"
    fp32.write_bytes(to_onnx(module, x, input_names=["x"], training=False, opset=17))
    quantize_static(
        str(fp32),
        str(int8),
        _Calibration(x),
        quant_format=QuantFormat.QOperator,
        activation_type=activations,
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
    )
    return onnx.load(str(int8))


# (module, its input, activation type, per-channel weights) by case name
_BUILDS: dict[str, tuple[type[nn.Module], torch.Tensor, QuantType, bool]] = {
    "cnn_uint8_per_tensor": (SmallCNN, IMAGES, QuantType.QUInt8, False),
    "cnn_int8_per_channel": (SmallCNN, IMAGES, QuantType.QInt8, True),
    "mlp": (SmallMLP, FEATURES, QuantType.QUInt8, False),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, onnx.ModelProto]:
    built = {}
    for name, (module, x, activations, per_channel) in _BUILDS.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(name)
        built[name] = _quantized(folder, module().eval(), x, activations, per_channel)
    return built


@pytest.fixture
def cnn(models: dict[str, onnx.ModelProto]) -> onnx.ModelProto:
    return models["cnn_uint8_per_tensor"]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The conversion releases the initializers' bytes of what it converts: a copy to convert."""
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied


class _FakeQuantized:
    """The quantised model's own parameters in torch: fake quantisation as a QuantizeLinear →
    DequantizeLinear pair computes it, dequantized weights (leaves with gradients)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.init = initializers(model)
        self.weights: dict[str, torch.Tensor] = {}

    def fake(self, x: torch.Tensor, value: str) -> torch.Tensor:
        scale, zero = self.init[f"{value}_scale"], self.init[f"{value}_zero_point"]
        info = torch.iinfo(zero.dtype)
        q = x / scale
        q = q + (torch.round(q) - q).detach() + zero.float()
        return (q.clamp(info.min, info.max) - zero.float()) * scale

    def weight(self, layer: str, input_scale: str) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.init[f"{layer}.weight_quantized"]
        scale, zero = self.init[f"{layer}.weight_scale"], self.init[f"{layer}.weight_zero_point"]
        shape = [-1] + [1] * (q.dim() - 1)  # per output channel, or one for all
        weight = (q.float() - zero.float().reshape(shape)) * scale.reshape(shape)
        bias_scale = self.init[f"{input_scale}_scale"] * scale
        bias = self.init[f"{layer}.bias_quantized"].float() * bias_scale
        self.weights[f"{layer}.weight"] = weight.requires_grad_()
        self.weights[f"{layer}.bias"] = bias.requires_grad_()
        return self.weights[f"{layer}.weight"], self.weights[f"{layer}.bias"]


def _cnn_reference(model: onnx.ModelProto) -> tuple[torch.Tensor, _FakeQuantized]:
    """SmallCNN as its QOperator model computes it, in float with fake quantisation (the ReLUs
    are the conv outputs' ranges, which start at 0)."""
    r = _FakeQuantized(model)
    x = r.fake(IMAGES, "x")
    h = r.fake(F.conv2d(x, *r.weight("conv1", "x"), padding=1), "/conv1/Conv_output_0")
    h = F.max_pool2d(h, 2)
    c = r.fake(
        F.conv2d(h, *r.weight("conv2", "/conv1/Conv_output_0"), padding=1), "/conv2/Conv_output_0"
    )
    h = r.fake(h + c, "/Add_output_0")
    h = r.fake(h.mean(dim=(2, 3), keepdim=True), "/GlobalAveragePool_output_0").flatten(1)
    output = model.graph.output[0].name
    return r.fake(F.linear(h, *r.weight("fc", "/GlobalAveragePool_output_0")), output), r


def _mlp_reference(model: onnx.ModelProto) -> tuple[torch.Tensor, _FakeQuantized]:
    r = _FakeQuantized(model)
    x = r.fake(FEATURES, "x")
    gate = r.fake(
        torch.sigmoid(r.fake(F.linear(x, *r.weight("a", "x")), "/a/Gemm_output_0")),
        "/Sigmoid_output_0",
    )
    leaky = r.fake(
        F.leaky_relu(r.fake(F.linear(x, *r.weight("b", "x")), "/b/Gemm_output_0"), 0.1),
        "/LeakyRelu_output_0",
    )
    h = r.fake(torch.cat([gate, leaky], dim=1), "/Concat_output_0")
    h = r.fake(F.linear(h, *r.weight("c", "/Concat_output_0")), "/c/Gemm_output_0")
    h = r.fake(h * r.fake(gate[:, :6], "/Slice_output_0"), "/Mul_output_0")
    return r.fake(torch.softmax(h, dim=1), model.graph.output[0].name), r


def _cnn_loss(output: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, LABELS)


def _mlp_loss(output: torch.Tensor) -> torch.Tensor:
    return ((output - ONE_HOT) ** 2).sum()


Reference = Callable[[onnx.ModelProto], tuple[torch.Tensor, _FakeQuantized]]
_CASES: dict[str, tuple[torch.Tensor, Reference, Callable[[torch.Tensor], torch.Tensor]]] = {
    "cnn": (IMAGES, _cnn_reference, _cnn_loss),
    "mlp": (FEATURES, _mlp_reference, _mlp_loss),
}


@pytest.fixture(params=list(_BUILDS))
def case(
    request: pytest.FixtureRequest, models: dict[str, onnx.ModelProto]
) -> tuple[str, onnx.ModelProto]:
    return request.param.split("_")[0], models[request.param]


def _premise(model: onnx.ModelProto) -> None:
    """The model computes on integers: QLinear ops, no float layer op."""
    ops = {n.op_type for n in model.graph.node}
    assert ops & {"QLinearConv", "QGemm"} and not ops & {"Conv", "Gemm", "MatMul"}


def test_the_forward_is_onnxruntimes(case: tuple[str, onnx.ModelProto]) -> None:
    name, model = case
    _premise(model)
    x = _CASES[name][0]
    (expected,) = run_onnxruntime(model, {"x": x.numpy()})
    output = model.graph.output[0].name
    step = float(initializers(model)[f"{output}_scale"])
    with torch.no_grad():
        (got,) = convert(_copy(model)).run([x])
    # a few output steps at most (a float rounding near a boundary); here none
    steps = np.abs(got.numpy() - expected) / step
    assert steps.max() <= 2 and (steps < 0.5).mean() > 0.95


def test_every_layers_weight_is_a_parameter_with_the_reference_gradient(
    case: tuple[str, onnx.ModelProto],
) -> None:
    name, model = case
    x, reference, loss_of = _CASES[name]
    graph = convert(_copy(model))
    (output,) = graph.run([x])
    loss_of(output).backward()
    ours = {n: p.grad for n, p in graph.named_parameters()}
    expected_output, r = reference(model)
    expected = dict(
        zip(
            r.weights,
            torch.autograd.grad(loss_of(expected_output), list(r.weights.values())),
            strict=True,
        )
    )
    # the float model's names, each Conv/Gemm weight and bias, nothing else (no scale)
    assert set(ours) == set(expected)
    torch.testing.assert_close(output.detach(), expected_output.detach(), rtol=1e-5, atol=1e-6)
    for parameter, gradient in expected.items():
        grad = ours[parameter]
        assert grad is not None and float(grad.norm()) > 0, parameter
        torch.testing.assert_close(grad, gradient, rtol=GRADIENT_TOLERANCE, atol=1e-6)


def test_the_diagnosis_of_a_qoperator_model_reports_the_rewrite(cnn: onnx.ModelProto) -> None:
    report = diagnose(
        cnn.SerializeToString(), npz_bytes(x=IMAGES, target=LABELS), DiagnoseOptions()
    )
    names = {p.name for p in report.parameters}
    assert {"conv1.weight", "conv2.weight", "fc.weight"} <= names
    assert all(p.grad_norm is not None and p.grad_norm > 0 for p in report.parameters)
    assert any("onnxruntime's QOperator format" in n for n in report.notes)
    assert report.model.conversion is not None
    assert report.model.conversion.max_abs_error is not None
    step = float(initializers(cnn)[f"{cnn.graph.output[0].name}_scale"])
    assert report.model.conversion.max_abs_error <= 2 * step


def test_a_qlinear_node_in_a_form_not_rewritten_keeps_its_integer_op(cnn: onnx.ModelProto) -> None:
    # a scale computed by the graph (here an Identity of the initializer) is no form the rewrite
    # knows: the node stays integer (exact), what comes before it loses its gradient (and is
    # no parameter), and the report says which node
    model = _copy(cnn)
    pool = next(n for n in model.graph.node if n.op_type == "QLinearGlobalAveragePool")
    computed = onnx.helper.make_node("Identity", [pool.input[1]], ["computed_scale"])
    pool.input[1] = "computed_scale"
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([computed, *nodes])
    (expected,) = run_onnxruntime(model, {"x": IMAGES.numpy()})
    graph = convert(model)
    assert any("not rewritten" in n and pool.name in n for n in graph.metadata["notes"])
    (output,) = graph.run([IMAGES])
    np.testing.assert_array_equal(output.detach().numpy(), expected)
    _cnn_loss(output).backward()
    grads = {n: p.grad for n, p in graph.named_parameters()}
    # no gradient can reach the convolutions' weights: state, not parameters (gradient_paths)
    assert grads["fc.weight"] is not None and "conv1.weight" not in grads
