"""The non-finite origin: first node producing NaN/Inf in the forward pass, else the node whose
backward first produced a non-finite gradient, in one pass (no detect_anomaly)."""

from __future__ import annotations

from typing import cast

import pytest
import torch
from torch import nn

from service.engine.layers import canonical
from service.engine.measure import measure
from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from service.engine.subject import build_subject
from tests.support.export import to_onnx, to_torch_export, to_torchscript
from tests.unit.engine.measure_support import npz_bytes, onnx_available

FORMATS = ["torch_export", "torchscript"] + (["onnx"] if onnx_available() else [])


class LogOfNegative(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.log(self.fc1(x)))  # fc1 gives negative values → NaN


class SqrtOfZero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        # forward is finite (sqrt(0) = 0), the backward of sqrt at 0 is infinite
        return self.fc2(torch.sqrt(h * 0.0) + h)


def _export(module: nn.Module, x: torch.Tensor, fmt: str) -> bytes:
    if fmt == "torch_export":
        return to_torch_export(module, x)
    if fmt == "torchscript":
        return to_torchscript(module, x)
    return to_onnx(module, x, input_names=["x"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_origin_is_the_log(fmt: str) -> None:
    torch.manual_seed(0)
    module, x = LogOfNegative(), torch.randn(8, 4)
    subject = build_subject(_export(module, x, fmt), npz_bytes(x=x), DiagnoseOptions())
    m = measure(subject)
    origin = m.non_finite_origin
    assert origin is not None
    assert origin.phase == "forward"
    assert canonical(origin.op_type) == "log"
    assert any(p.non_finite for p in m.parameters)  # the NaN reaches the gradients too


@pytest.mark.parametrize("fmt", FORMATS)
def test_backward_origin_is_the_sqrt(fmt: str) -> None:
    torch.manual_seed(0)
    module, x = SqrtOfZero(), torch.randn(8, 4)
    subject = build_subject(_export(module, x, fmt), npz_bytes(x=x), DiagnoseOptions())
    m = measure(subject)
    assert m.loss.value is not None and torch.isfinite(torch.tensor(m.loss.value))
    origin = m.non_finite_origin
    assert origin is not None
    assert origin.phase == "backward"
    assert canonical(origin.op_type) == "sqrt"
    bad = {p.name for p in m.parameters if p.non_finite}
    assert bad == {"fc1.weight", "fc1.bias"}  # fc2 sees finite gradients


def test_healthy_model_has_no_origin_and_counts_match() -> None:
    torch.manual_seed(0)
    module, x = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)), torch.randn(8, 4)
    subject = build_subject(to_torch_export(module, x), npz_bytes(x=x), DiagnoseOptions())
    m = measure(subject)
    assert m.non_finite_origin is None
    assert all(p.non_finite_count == 0 and not p.non_finite for p in m.parameters)


def test_fp16_underflow_fraction_matches_reference() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 1))
    with torch.no_grad():
        # gradients into layer 0 around 1e-8: below 2^-24
        cast(nn.Linear, module[1]).weight.mul_(1e-6)
    x = torch.randn(8, 16)
    subject = build_subject(to_torch_export(module, x), npz_bytes(x=x), DiagnoseOptions())
    m = measure(subject)
    module.zero_grad()
    module(x).square().mean().backward()
    for p in m.parameters:
        g = dict(module.named_parameters())[p.name].grad
        assert g is not None
        want = ((g.abs() < 2.0**-24) & (g != 0)).double().mean().item()
        assert p.fp16_underflow_fraction == pytest.approx(want, abs=1e-9)
    assert m.parameters[0].fp16_underflow_fraction > 0.5


def test_nan_in_the_batch_is_reported_as_the_input() -> None:
    module, x = nn.Sequential(nn.ReLU(), nn.Linear(4, 2)), torch.randn(8, 4)
    data = to_torch_export(module, x)
    x[3, 1] = float("nan")
    m = measure(build_subject(data, npz_bytes(x=x), DiagnoseOptions()))
    assert m.non_finite_origin is not None
    assert (m.non_finite_origin.op_type, m.non_finite_origin.phase) == ("input", "forward")
    assert m.non_finite_origin.node == "x"  # the batch's array, as the user named it
    report = diagnose(data, npz_bytes(x=x), DiagnoseOptions())
    (finding,) = [f for f in report.findings if f.kind == "non_finite"]
    assert "the batch's array `x` holds 1 NaN value, the first at `x[3, 1]`" in finding.message
    # no op of the model to guard: no guard_numerics pointing at a node that does not exist
    assert not [r for r in report.recommendations if r.fix == "guard_numerics"]


class AdditiveMask(nn.Module):
    """scores + mask: the batch's mask holds 0 where a position is attended, -inf where not."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(1, 2) / 8**0.5 + mask[:, None, :]
        return self.out(scores.softmax(-1) @ x).mean(1)


def _masked_batch(fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    x, mask = torch.randn(4, 6, 8), torch.zeros(4, 6)
    mask[:, 4:] = fill
    return x, mask


@pytest.mark.parametrize("fmt", ["torch_export", "onnx"])
def test_an_additive_minus_inf_mask_in_the_batch_is_no_origin(fmt: str) -> None:
    torch.manual_seed(0)
    module = AdditiveMask()
    x, mask = _masked_batch(float("-inf"))
    if fmt == "torch_export":
        data = to_torch_export(module, (x, mask))
    else:
        data = to_onnx(module, (x, mask), input_names=["x", "mask"])
    m = measure(build_subject(data, npz_bytes(x=x, mask=mask), DiagnoseOptions()))
    assert m.non_finite_origin is None
    assert any("'mask' holds -inf entries" in note for note in m.notes)


def test_a_plus_inf_or_nan_in_that_mask_is_still_the_origin() -> None:
    torch.manual_seed(0)
    module = AdditiveMask()
    for fill in (float("inf"), float("nan")):
        x, mask = _masked_batch(fill)
        data = to_torch_export(module, (x, mask))
        m = measure(build_subject(data, npz_bytes(x=x, mask=mask), DiagnoseOptions()))
        assert m.non_finite_origin is not None and m.non_finite_origin.node == "mask"


class MaskedEncoder(nn.Module):
    """nn.TransformerEncoder with torch's own causal mask (`full((T, T), -inf)` then `triu`)
    and a key padding mask (bool; MultiheadAttention turns it into -inf by masked_fill)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        encoded = self.enc(x, mask=causal, src_key_padding_mask=pad, is_causal=False)
        return self.out(encoded.mean(1))


@pytest.mark.parametrize("fmt", ["torch_export", "onnx_dynamo"])
def test_torchs_causal_and_padding_masks_are_no_origin(fmt: str) -> None:
    """And the dynamo optimizer's `zeros_like(pad)`, folded from the padding input's shape
    alone, is a constant, not a parameter (it was a layer initialised "0×" too small)."""
    torch.manual_seed(0)
    module = MaskedEncoder()
    x, pad = torch.randn(4, 6, 16), torch.zeros(4, 6, dtype=torch.bool)
    pad[:, 5:] = True
    if fmt == "torch_export":
        data = to_torch_export(module, (x, pad))
    else:
        data = to_onnx(module, (x, pad), dynamo=True, optimize=True, input_names=["x", "pad"])
    m = measure(build_subject(data, npz_bytes(x=x, pad=pad), DiagnoseOptions()))
    assert m.non_finite_origin is None
    assert {p.name for p in m.parameters} == {n for n, _ in module.named_parameters()}


class PaddedAttentionWithWeights(nn.Module):
    """MultiheadAttention returning its weights: torch's unfused path adds the padding mask
    (zeros masked_fill'd with -inf) to the scores in one baddbmm; the dynamo exporter writes
    the fill as a CastLike of a -inf constant."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        y, _ = self.mha(x, x, x, key_padding_mask=ids == 0, need_weights=True)
        return self.head((x + y).mean(1))


@pytest.mark.parametrize("fmt", ["torch_export", "onnx_dynamo_unoptimized"])
def test_a_padding_mask_added_by_baddbmm_or_cast_like_is_no_origin(fmt: str) -> None:
    torch.manual_seed(0)
    module = PaddedAttentionWithWeights()
    ids = torch.randint(1, 10, (4, 6), generator=torch.Generator().manual_seed(1))
    ids[0, 4:] = 0
    if fmt == "torch_export":
        data = to_torch_export(module, ids)
    else:
        data = to_onnx(module, ids, dynamo=True, optimize=False, input_names=["ids"])
    report = diagnose(data, npz_bytes(ids=ids), DiagnoseOptions())
    assert not [f for f in report.findings if f.kind == "non_finite"]
    assert not [r for r in report.recommendations if r.fix == "guard_numerics"]


class ExtendedMask(nn.Module):
    """Hugging Face's extended attention mask: (1 - mask) * finfo.min, added to the scores.
    Finite, but a float32 sum of a few finfo.min entries overflows to -inf."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.q, self.k = nn.Embedding(50, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        extended = (1.0 - attention_mask[:, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        scores = self.q(h) @ self.k(h).transpose(1, 2) / 8**0.5 + extended
        return self.out((scores.softmax(-1) @ h)[:, 0])


@pytest.mark.parametrize("fmt", ["torch_export", "onnx_dynamo"])
def test_large_finite_mask_values_are_not_mistaken_for_inf(fmt: str) -> None:
    torch.manual_seed(0)
    module = ExtendedMask()
    ids, mask = torch.randint(0, 50, (4, 7)), torch.ones(4, 7, dtype=torch.long)
    mask[:, 5:] = 0
    if fmt == "torch_export":
        data = to_torch_export(module, (ids, mask))
    else:
        names = ["ids", "attention_mask"]
        data = to_onnx(module, (ids, mask), dynamo=True, optimize=True, input_names=names)
    batch = npz_bytes(ids=ids, attention_mask=mask, labels=torch.randint(0, 2, (4,)))
    m = measure(build_subject(data, batch, DiagnoseOptions()))
    assert m.non_finite_origin is None


class Rescaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x * 1e-38)


def test_a_batch_of_large_finite_values_is_no_input_origin() -> None:
    """Every entry -3e38: finite, though their float32 sum is not."""
    data = to_torch_export(Rescaled(), torch.randn(8, 4))
    x = torch.full((8, 4), -3e38)
    m = measure(build_subject(data, npz_bytes(x=x), DiagnoseOptions(loss="output_norm")))
    assert m.non_finite_origin is None
    assert not [note for note in m.notes if "holds -inf" in note]  # nor taken for a mask


class RelativePositionBuckets(nn.Module):
    """T5's relative position buckets: log(|i - j| / 2) is -inf on the diagonal, cast to an
    integer and selected away by `where` (small distances keep their exact bucket); the loss
    and every gradient stay finite."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Embedding(8, 1)
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1])
        distance = (positions[None, :] - positions[:, None]).abs()
        large = 2 + (torch.log(distance.float() / 2) * 2).to(torch.long)
        buckets = torch.where(distance < 2, distance, large.clamp(max=7))
        return self.fc(x) + self.bias(buckets).squeeze(-1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_inf_that_reaches_no_loss_or_gradient_is_told_not_judged(fmt: str) -> None:
    torch.manual_seed(0)
    module, x = RelativePositionBuckets(), torch.randn(4, 6, 6)
    report = diagnose(_export(module, x, fmt), npz_bytes(x=x), DiagnoseOptions())
    (finding,) = [f for f in report.findings if f.kind == "non_finite"]
    assert finding.severity == "info" and finding.evidence["reaches_loss"] is False
    assert canonical(finding.evidence["origin"]["op_type"]) == "log"
    assert "reach neither the loss nor any gradient" in finding.message
    assert report.verdict == "healthy"
    (advice,) = [r for r in report.recommendations if r.fix == "guard_numerics"]
    assert advice.rationale.startswith("Advisory")


def test_an_inf_that_reaches_the_loss_stays_an_error() -> None:
    torch.manual_seed(0)
    module, x = LogOfNegative(), torch.randn(8, 4)
    report = diagnose(to_onnx(module, x, input_names=["x"]), npz_bytes(x=x), DiagnoseOptions())
    (finding,) = [f for f in report.findings if f.kind == "non_finite"]
    assert finding.severity == "error" and finding.evidence["reaches_loss"] is True
    assert report.verdict == "unhealthy"
