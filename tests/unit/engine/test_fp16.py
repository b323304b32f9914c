"""fp16 underflow under `--precision fp16`: the gradients that underflow are exactly 0 in an
fp16 autocast pass, so they are counted against an fp32 reference pass of the same batch
(stats.flushed_counts), and loss scaling is recommended and verified in fp16."""

from __future__ import annotations

from typing import cast

import pytest
import torch
from torch import nn

from service.engine import diagnose
from service.engine.advice import recommend
from service.engine.detectors import detect
from service.engine.measure import measure
from service.engine.options import DiagnoseOptions
from service.engine.report import Recommendation
from service.engine.subject import build_subject
from service.engine.verify import verify_recommendations
from tests.support.export import to_onnx, to_torch_export
from tests.unit.engine.measure_support import npz_bytes


def tiny_gradient_model() -> tuple[bytes, bytes, torch.Tensor, nn.Module]:
    """fp32 gradients of the first layer ~1e-10 (a 1e-4-scaled head under output_norm): below
    fp16's 2^-24, while the head's own gradients (~1e-6) stay representable."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        cast(nn.Linear, module[2]).weight.mul_(1e-4)
        cast(nn.Linear, module[2]).bias.zero_()
    x = torch.randn(32, 8)
    return to_torch_export(module, x), npz_bytes(x=x), x, module


def test_precision_is_recorded_and_fp16_flushes_are_counted_against_fp32() -> None:
    model, batch, x, module = tiny_gradient_model()
    options = DiagnoseOptions(precision="fp16", loss="output_norm")
    m = measure(build_subject(model, batch, options), options)
    assert m.precision == "fp16"
    # the reference: which entries an fp16 autocast pass zeroes that fp32 does not
    grads = {}
    for autocast in (True, False):
        module.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            out = module(x)
        out.float().square().mean().backward()
        grads[autocast] = {n: p.grad.clone() for n, p in module.named_parameters()}  # type: ignore[union-attr]
    for p in m.parameters:
        g16, g32 = grads[True][p.name], grads[False][p.name]
        want = ((g16 == 0) & (g32 != 0)).double().mean().item()
        assert p.fp16_underflow_fraction == pytest.approx(want, abs=1e-9), p.name
        assert m.fp32_grad_norms[p.name] == pytest.approx(g32.norm().item(), rel=1e-4)
    first = next(p for p in m.parameters if p.name == "0.weight")
    assert first.fp16_underflow_fraction == 1.0 and first.grad_norm == 0.0


def test_fp16_underflow_is_an_error_and_loss_scaling_is_verified_in_fp16() -> None:
    model, batch, _, _ = tiny_gradient_model()
    report = diagnose(model, batch, DiagnoseOptions(precision="fp16", loss="output_norm"))
    finding = next(f for f in report.findings if f.kind == "fp16_underflow")
    assert finding.severity == "error"
    assert finding.evidence["precision"] == "fp16"
    assert finding.evidence["underflow_fraction"] > 0.5
    index = report.findings.index(finding)
    rec = next(r for r in report.recommendations if r.fix == "loss_scaling")
    assert index in rec.addresses
    assert rec.verified is not None and rec.verified.applied and rec.verified.resolved
    assert "fp16 autocast" in (rec.verified.transform or "")
    assert rec.verified.after["figures"]["fp16_underflow_fraction"] < 0.05


def test_a_half_model_is_analysed_as_fp16_against_an_fp32_copy() -> None:
    """`.half()` models run in fp16 whatever --precision says: the report's precision is fp16,
    a note says why, and what fp16 flushed is counted against an fp32 copy of the model."""
    _, _, x, module = tiny_gradient_model()
    half = module.half()
    x16 = x.half()
    report = diagnose(
        to_torch_export(half, x16), npz_bytes(x=x16), DiagnoseOptions(loss="output_norm")
    )
    assert report.precision == "fp16"
    assert any("float16" in note and "fp16 run" in note for note in report.notes)
    first = next(p for p in report.parameters if p.name == "0.weight")
    assert first.grad_norm == 0.0 and first.fp16_underflow_fraction == 1.0
    finding = next(f for f in report.findings if f.kind == "fp16_underflow")
    assert finding.severity == "error" and finding.evidence["precision"] == "fp16"


def test_loss_scaling_of_a_half_model_is_checked_against_an_fp32_copy() -> None:
    """The recount after loss scaling compares with an fp32 pass, not with the fp16 model
    itself (against which nothing would ever look flushed): a scale of 1 changes nothing."""
    _, _, x, module = tiny_gradient_model()
    half = module.half()
    x16 = x.half()
    options = DiagnoseOptions(loss="output_norm")
    subject = build_subject(to_torch_export(half, x16), npz_bytes(x=x16), options)
    m = measure(subject, options)
    findings = detect(m)
    index = next(i for i, f in enumerate(findings) if f.kind == "fp16_underflow")
    assert findings[index].severity == "error"
    recs = recommend(findings, m)
    assert not [r for r in recs if r.rationale.startswith("Advisory")]  # not a forecast
    unscaled = Recommendation(
        fix="loss_scaling", addresses=[index], rationale="r", params={"scale": 1.0}
    )
    verify_recommendations([unscaled], findings, m, subject, options)
    assert unscaled.verified is not None and unscaled.verified.applied
    assert "fp16 autocast" in (unscaled.verified.transform or "")
    before = unscaled.verified.before["figures"]["fp16_underflow_fraction"]
    after = unscaled.verified.after["figures"]["fp16_underflow_fraction"]
    assert before > 0.5 and after == before
    assert unscaled.verified.resolved is False


class BakedHalf(nn.Module):
    """What a Hugging Face model in float16 bakes into its graph: an RMSNorm computed in fp32
    and cast back to float16 by name, and a causal mask of finfo(float16).min made with
    dtype=torch.float16. In the fp32 copy those casts and dtypes must not clash with fp32."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.ones(8))
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = self.weight * h.to(torch.float16)
        t = x.shape[1]
        mask = torch.full((t, t), torch.finfo(torch.float16).min, dtype=torch.float16).triu(1)
        scores = (h @ h.transpose(1, 2) + mask).softmax(-1)
        return self.fc(scores @ h)


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_a_half_model_with_fp16_baked_into_its_graph_gets_its_fp32_reference(fmt: str) -> None:
    module = BakedHalf().half()
    x = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(1)).half()
    model = to_torch_export(module, x) if fmt == "torch_export" else to_onnx(module, x)
    report = diagnose(model, npz_bytes(x=x), DiagnoseOptions(loss="output_norm"))
    assert report.precision == "fp16"
    assert all(p.fp16_underflow_fraction is not None for p in report.parameters)
    if fmt == "onnx":  # compared with onnxruntime at fp16's own precision
        conversion = report.model.conversion
        assert conversion is not None and conversion.checked
        assert "outputs are float16" in (conversion.reason or "")


class BakedAutocast(nn.Module):
    """A float32 model whose forward runs under fp16 autocast: exported, the casts are baked
    in (ONNX Cast nodes, a .pt2 autocast region) while the parameters stay float32."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_gradient_model()[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            return self.net(x)


@pytest.mark.parametrize("fmt", ["torch_export", "onnx", "onnx_dynamo"])
def test_a_float32_model_with_autocast_baked_in_is_analysed_as_fp16(fmt: str) -> None:
    """Its gradients flush to zero inside the fp16 ops: an fp16 run, counted against an fp32
    copy whose casts and autocast regions are off, and loss scaling verified."""
    module = BakedAutocast()
    x = tiny_gradient_model()[2]
    exports = {
        "torch_export": lambda: to_torch_export(module, x),
        "onnx": lambda: to_onnx(module, x),
        "onnx_dynamo": lambda: to_onnx(module, x, dynamo=True),
    }
    report = diagnose(exports[fmt](), npz_bytes(x=x), DiagnoseOptions(loss="output_norm"))
    assert report.precision == "fp16"
    assert any("compute in float16" in note for note in report.notes)
    module.zero_grad()
    module(x).float().square().mean().backward()  # output_norm's loss
    grads = {n: p.grad for n, p in module.named_parameters()}
    for p in report.parameters:
        torch_grad = grads[p.name]
        assert torch_grad is not None
        assert p.grad_norm == pytest.approx(torch_grad.norm().item(), rel=1e-3, abs=1e-12)
    first = next(p for p in report.parameters if p.name == "net.0.weight")
    assert first.grad_norm == 0.0 and first.fp16_underflow_fraction == 1.0
    finding = next(f for f in report.findings if f.kind == "fp16_underflow")
    assert finding.severity == "error"
    rec = next(r for r in report.recommendations if r.fix == "loss_scaling")
    assert rec.verified is not None and rec.verified.resolved


def test_a_float32_model_without_half_ops_stays_fp32() -> None:
    model, batch, _, _ = tiny_gradient_model()
    report = diagnose(model, batch, DiagnoseOptions(loss="output_norm"))
    assert report.precision == "fp32"
    assert not any("compute in float16" in note for note in report.notes)


class ScaledDown(nn.Module):
    """A healthy tanh MLP whose output is scaled by 3e-5: in fp32 its gradients are small at
    every depth alike (no vanishing); in fp16 nearly all of them flush to zero."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc0, self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.fc0(x))))) * 3e-5


def test_layers_fp16_flushed_are_the_underflow_not_vanishing_gradients() -> None:
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 4, (256,), generator=torch.Generator().manual_seed(2))
    model, batch = to_torch_export(ScaledDown(), x), npz_bytes(x=x, target=target)
    assert diagnose(model, batch, DiagnoseOptions()).verdict == "healthy"  # fp32
    report = diagnose(model, batch, DiagnoseOptions(precision="fp16"))
    assert [f.kind for f in report.findings if f.severity != "info"] == ["fp16_underflow"]
    (finding,) = report.findings
    assert finding.severity == "error" and finding.evidence["flushed_layers"]
    assert "get no gradient in this pass" in finding.message
    assert [r.fix for r in report.recommendations][:1] == ["loss_scaling"]
