"""Quantisation-aware-training (QAT) models, as users export them: torch.ao's eager QAT
(FakeQuantize modules: the legacy ONNX exporter writes QuantizeLinear → [Clip] →
DequantizeLinear; TorchScript keeps aten's fake_quantize ops) and fake quantisation called
directly as NVIDIA's pytorch-quantization / ModelOpt quantisers do (both ONNX exporters and
torch.export). Every format's report has torch's own loss and per-parameter gradients (the
straight-through estimator of training), full per-layer probes, and only the source model's
parameters: a quantiser's scale and a Conv-BN module's running statistics are state."""

from __future__ import annotations

import copy
import functools
import io
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch import nn

from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from service.engine.report import Report
from tests.support.export import to_onnx, to_torch_export
from tests.unit.engine.measure_support import npz_bytes

X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(1))


class SmallCnn(nn.Module):
    def __init__(self, batchnorm: bool) -> None:
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8) if batchnorm else nn.Identity()
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(self.quant(x))))
        return self.dequant(self.fc(x.flatten(1)))


def eager_qat(batchnorm: bool = False) -> nn.Module:
    """torch.ao's eager QAT flow: fuse, prepare, calibrate the observers, then freeze them."""
    torch.manual_seed(0)
    model = SmallCnn(batchnorm).train()
    model.qconfig = tq.get_default_qat_qconfig("fbgemm", version=0)  # FakeQuantize modules
    fused = [["conv", "bn", "relu"]] if batchnorm else [["conv", "relu"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        tq.fuse_modules_qat(model, fused, inplace=True)
        tq.prepare_qat(model, inplace=True)
        for _ in range(3):
            model(X)
    model.apply(tq.disable_observer)
    return model


class DirectFakeQuant(nn.Module):
    """Quantisers as pytorch-quantization's TensorQuantizer writes them: per-tensor int8
    activations, per-channel int8 weights with an amax-derived scale."""

    conv_scale: torch.Tensor
    zero: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)
        self.register_buffer("conv_scale", self.conv.weight.detach().abs().amax((1, 2, 3)) / 127)
        self.register_buffer("zero", torch.zeros(8, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.fake_quantize_per_tensor_affine(x, 0.02, 0, -128, 127)
        w = torch.fake_quantize_per_channel_affine(
            self.conv.weight, self.conv_scale, self.zero, 0, -128, 127
        )
        x = F.relu(F.conv2d(x, w, self.conv.bias, padding=1))
        x = torch.fake_quantize_per_tensor_affine(x, 0.05, 0, -128, 127)
        return self.fc(x.flatten(1))


def _torch_reference(model: nn.Module) -> tuple[float, dict[str, float]]:
    reference = copy.deepcopy(model)
    loss = F.cross_entropy(reference(X), Y)
    loss.backward()
    grads = {n: p.grad.norm().item() for n, p in reference.named_parameters() if p.grad is not None}
    return loss.item(), grads


def _torchscript(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # check_trace would run the model again: its output equals, its state need not
        torch.jit.save(torch.jit.trace(model, (X,), check_trace=False), buffer)
    return buffer.getvalue()


EXPORTERS: dict[str, Callable[[nn.Module], bytes]] = {
    "onnx": lambda m: to_onnx(m, X, input_names=["x"], opset=17),
    "onnx_dynamo": lambda m: to_onnx(m, X, input_names=["x"], dynamo=True),
    "torch_export": lambda m: to_torch_export(m, X),
    "torchscript": _torchscript,
}


def _diagnose(model: bytes) -> Report:
    return diagnose(model, npz_bytes(x=X, target=Y), DiagnoseOptions(verify_fixes=False))


def _divided_fake_quant(module: tq.FakeQuantize, x: torch.Tensor) -> torch.Tensor:
    """FakeQuantize's forward as ONNX's QuantizeLinear computes it: x / scale, where torch
    multiplies by the reciprocal (a value within an ulp of a rounding tie lands one step
    apart; onnxruntime agrees with the division)."""
    observer = module.activation_post_process
    shape = [1] * x.dim()
    if module.is_per_channel:
        shape[module.ch_axis] = -1
    scale, zero_point = module.scale.reshape(shape), module.zero_point.reshape(shape).float()
    scaled = x / scale
    rounded = scaled + (torch.round(scaled) - scaled).detach() + zero_point
    return (rounded.clamp(observer.quant_min, observer.quant_max) - zero_point) * scale


def _with_onnx_division(model: nn.Module) -> nn.Module:
    divided = copy.deepcopy(model)
    for module in divided.modules():
        if isinstance(module, tq.FakeQuantize):
            module.forward = functools.partial(_divided_fake_quant, module)  # type: ignore[method-assign]
    return divided


def _assert_equals_torch(report: Report, model: nn.Module, rel: float = 1e-5) -> None:
    loss, grads = _torch_reference(model)
    assert report.loss.value == pytest.approx(loss, rel=rel)
    ours = {p.name: p.grad_norm for p in report.parameters}
    # a bias before a batch norm has no gradient but float noise (1e-8)
    assert ours == pytest.approx(grads, rel=max(rel, 1e-4), abs=1e-6)
    assert report.model.probe_coverage == "full", report.model.probe_coverage_reason


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_eager_qat_model_reports_torchs_loss_and_gradients(fmt: str) -> None:
    """torch.ao's FakeQuantize modules (the dynamo exporter and torch.export refuse them:
    their observer switch is data-dependent Python control flow)."""
    model = eager_qat()
    report = _diagnose(EXPORTERS[fmt](model))
    _assert_equals_torch(report, _with_onnx_division(model) if fmt == "onnx" else model)
    if fmt == "onnx":
        _assert_equals_torch(report, model, rel=5e-3)  # the torch model's own rounding
        # both ends of each fake quantiser: a pair, not integers
        note = "fake quantisation with the straight-through gradient"
        assert any(note in n for n in report.notes)
        assert report.model.conversion is not None
        assert report.model.conversion.max_abs_error == pytest.approx(0.0, abs=1e-5)
        assert "fake quantiser(s)" in (report.model.conversion.reason or "")


@pytest.mark.parametrize("fmt", list(EXPORTERS))
def test_direct_fake_quantisation_reports_torchs_loss_and_gradients(fmt: str) -> None:
    model = DirectFakeQuant()
    report = _diagnose(EXPORTERS[fmt](model))
    _assert_equals_torch(report, model, rel=2e-3 if fmt.startswith("onnx") else 1e-5)


def test_a_qat_conv_bn_modules_running_statistics_are_no_parameters() -> None:
    """torch.ao's ConvBnReLU2d scales its weight by bn.weight / sqrt(running_var): the graph
    reads running_var outside a BatchNormalization, and it still is a buffer."""
    model = copy.deepcopy(eager_qat(batchnorm=True))
    exported = copy.deepcopy(model)  # the export's forward updates the running statistics
    report = _diagnose(to_onnx(exported, X, input_names=["x"], opset=17))
    names = {p.name for p in report.parameters}
    assert names == {n for n, _ in model.named_parameters()}
    assert "conv.bn.running_var" not in names
    assert report.model.parameter_count == sum(p.numel() for p in model.parameters())
    _assert_equals_torch(report, _with_onnx_division(exported))
