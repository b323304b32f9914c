"""Fake quantisers that clip (quantisation-aware training): a range calibrated too narrow
clamps most of what it quantises, and a clamped value gets no gradient through the
straight-through estimator. The report lists every quantiser with the share it clamps (equal
to torch's own fake-quantisation mask), flags clipping as `quantizer_clipping`, recommends
recalibration and verifies it on a copy (max calibration on the batch, widening only) — the
same in ONNX (both exporters) and torch.export."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from service.engine.report import Report
from tests.support.export import to_onnx, to_torch_export
from tests.unit.engine.measure_support import npz_bytes

X = 3.0 * torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 5, (64,), generator=torch.Generator().manual_seed(1))
FORMATS = ["onnx", "onnx_dynamo", "torch_export"]


class QuantizedMlp(nn.Module):
    """ReLU layers, each output fake-quantised to uint8 with one scale; the weights per
    channel to int8 with a max-calibrated scale (which clips nothing)."""

    head_scale: torch.Tensor
    head_zero: torch.Tensor

    def __init__(self, act_scale: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))
        self.head = nn.Linear(32, 5)
        self.act_scale = act_scale
        self.register_buffer("head_scale", self.head.weight.detach().abs().amax(1) / 127)
        self.register_buffer("head_zero", torch.zeros(5, dtype=torch.int32))
        self.record = False  # a reference call keeps torch's own mask (an export cannot)
        self.clamped: list[float] = []  # per activation quantiser

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clamped = []
        for layer in self.layers:
            x = torch.relu(layer(x))
            if self.record:
                grid = torch.round(x * (1.0 / self.act_scale))
                self.clamped.append(float(((grid < 0) | (grid > 255)).float().mean()))
            x = torch.fake_quantize_per_tensor_affine(x, self.act_scale, 0, 0, 255)
        w = torch.fake_quantize_per_channel_affine(
            self.head.weight, self.head_scale, self.head_zero, 0, -128, 127
        )
        return F.linear(x, w, self.head.bias)


def _export(module: nn.Module, fmt: str) -> bytes:
    if fmt == "torch_export":
        return to_torch_export(module, X)
    return to_onnx(module, X, input_names=["x"], dynamo=fmt == "onnx_dynamo", opset=17)


def _diagnose(model: bytes, verify: bool = True) -> Report:
    return diagnose(model, npz_bytes(x=X, target=Y), DiagnoseOptions(verify_fixes=verify))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_too_narrow_activation_range_is_an_error_with_torchs_clamped_shares(fmt: str) -> None:
    module = QuantizedMlp(act_scale=0.0005)  # range [0, 0.1275] for ReLU outputs up to ~6
    report = _diagnose(_export(module, fmt))
    module.record = True
    module(X)  # torch's masks, on the same batch
    activations = [q for q in report.quantizers if q.quantizes == "activation"]
    assert [q.layer for q in activations] == ["layers.0", "layers.1", "layers.2"]
    assert [q.clipped_fraction for q in activations] == pytest.approx(module.clamped, abs=1e-9)
    first = activations[0]
    assert first.range_min == pytest.approx(0.0)
    assert first.range_max == pytest.approx(255 * 0.0005)
    assert first.input_max is not None and first.range_max is not None
    assert first.covering_scale_factor == pytest.approx(first.input_max / first.range_max, 1e-4)
    (weights,) = [q for q in report.quantizers if q.quantizes == "weight"]
    assert weights.parameters == ["head.weight"] and weights.layer == "head"
    assert weights.per_channel and weights.clipped_fraction == 0.0

    finding = next(f for f in report.findings if f.kind == "quantizer_clipping")
    assert finding.severity == "error"
    assert finding.layers[0] == "layers.0"
    assert "of the output of layers.0 falls outside its range [0, 0.128]" in finding.message
    rec = next(r for r in report.recommendations if r.fix == "recalibrate_quantizers")
    assert set(rec.params["scale_factors"]) == {q.name for q in activations}
    assert rec.verified is not None and rec.verified.resolved is True
    assert rec.verified.before["figures"]["max_clipped_fraction"] == first.clipped_fraction
    assert rec.verified.after["figures"]["max_clipped_fraction"] == 0.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_calibrated_model_lists_its_quantisers_and_has_no_finding(fmt: str) -> None:
    report = _diagnose(_export(QuantizedMlp(act_scale=0.05), fmt), verify=False)
    assert len(report.quantizers) == 4
    assert all(q.clipped_fraction < 0.01 for q in report.quantizers)
    assert not [f for f in report.findings if f.kind == "quantizer_clipping"]


def test_onnxruntimes_integer_kernels_are_not_the_reference_for_a_fake_quantised_graph() -> None:
    """onnxruntime's optimiser fuses DQ → Gemm → Q into integer kernels whose requantisation
    rounds differently (0.0056 max error here before): the conformance check runs the pairs as
    the graph writes them, in float."""
    report = _diagnose(_export(QuantizedMlp(act_scale=0.0005), "onnx"), verify=False)
    conversion = report.model.conversion
    assert conversion is not None and conversion.checked
    assert conversion.max_abs_error is not None and conversion.max_abs_error < 1e-6


def test_a_clip_between_quantize_and_dequantize_is_the_quantisers_range() -> None:
    """torch.ao's reduced-range activations (0..127) are QuantizeLinear(uint8) → Clip(127) →
    DequantizeLinear in a legacy export: the range ends at 127 steps, as torch's does."""
    from tests.unit.engine.test_qat_models import X as QAT_X
    from tests.unit.engine.test_qat_models import eager_qat

    model = eager_qat()
    fake_quants = [m for m in model.modules() if isinstance(m, torch.ao.quantization.FakeQuantize)]
    exported = onnx.load_from_string(to_onnx(model, QAT_X, input_names=["x"], opset=17))
    assert any(n.op_type == "Clip" for n in exported.graph.node)  # the premise
    report = diagnose(
        exported.SerializeToString(),
        npz_bytes(x=QAT_X, target=torch.zeros(QAT_X.shape[0], dtype=torch.long)),
        DiagnoseOptions(verify_fixes=False),
    )
    torch_ranges = sorted(
        round(float((q.quant_max - q.zero_point.max()) * q.scale.max()), 5)
        for q in fake_quants
        if not q.is_per_channel
    )
    ours = sorted(
        round(q.range_max, 5)
        for q in report.quantizers
        if q.range_max is not None and not q.per_channel
    )
    assert ours == torch_ranges
    assert np.isfinite([q.clipped_fraction for q in report.quantizers]).all()


def test_a_range_calibrated_to_end_at_the_batchs_extreme_clips_nothing() -> None:
    """Min/max calibration puts the largest value on the last step, up to float error (x /
    scale lands a hair past it); half a step further it rounds onto the next step: clipped."""
    from service.engine.quantizers import QuantizerCall

    def clamped(values: list[float], scale: float) -> float:
        call = QuantizerCall(
            x=torch.tensor(values),
            scale=torch.tensor(scale),
            zero_point=torch.tensor(0.0),
            low=0.0,
            high=255.0,
            divide=True,
        )
        return float(call.statistics()[0])

    extreme = 2.0
    # a zero point rounded to an integer can put the extreme half a step past the end, and
    # float error a hair further: round() makes it step 256, yet it is the batch's own max
    assert clamped([0.0, 1.0, extreme], extreme / 255.50002) == 0.0
    assert clamped([0.0, 1.0, extreme], extreme / 255.49) == 0.0  # rounds onto the last step
    assert clamped([0.0, 1.0, extreme], extreme / 255.6) == 1.0  # the next step is clamped


def test_micro_batches_measure_the_same_clipping_a_part_at_a_time() -> None:
    """The clipping pass runs in the measurement's parts (no more memory than its own): the
    counts add up to the whole batch's, the extremes are the batch's."""
    model = _export(QuantizedMlp(act_scale=0.0005), "torch_export")
    whole = _diagnose(model, verify=False)
    parted = diagnose(
        model,
        npz_bytes(x=X, target=Y),
        DiagnoseOptions(verify_fixes=True, micro_batches=4),
    )
    assert parted.micro_batches == 4
    for a, b in zip(whole.quantizers, parted.quantizers, strict=True):
        assert b.clipped_fraction == pytest.approx(a.clipped_fraction, abs=1e-12)
        assert (b.input_min, b.input_max) == (a.input_min, a.input_max)
    rec = next(r for r in parted.recommendations if r.fix == "recalibrate_quantizers")
    assert rec.verified is not None and rec.verified.resolved is True
