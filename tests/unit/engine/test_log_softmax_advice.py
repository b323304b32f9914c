"""log(softmax(z)) with extreme logits: the softmax underflows to exactly 0 and the log gives
-inf. The advice is F.log_softmax (not a clamp) in every format, and its verification computes
log_softmax on the copy. A verification that removes its finding but brings a new error is not
resolved; new warnings are listed in `after` too."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.engine import diagnose
from service.engine.detectors import detect
from service.engine.measure import measure
from service.engine.options import DiagnoseOptions
from service.engine.report import Recommendation
from service.engine.subject import build_subject
from service.engine.verify import verify_recommendations
from service.engine.verify.transforms import copy_subject, guard_node
from tests.support.export import to_onnx, to_torch_export, to_torchscript
from tests.unit.engine.measure_support import npz_bytes

NLL = DiagnoseOptions(loss="nll")
SCALE = 200.0  # logits 200× their usual size: gaps past ~104 underflow exp in fp32


class LogOfSoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) * SCALE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.softmax(self.logits(x), dim=-1))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 16, generator=g) * 5, torch.randint(0, 4, (32,), generator=g)


def _model_bytes(fmt: str) -> bytes:
    x, _ = _batch()
    module = LogOfSoftmax().eval()
    if fmt == "torch_export":
        return to_torch_export(module, x)
    if fmt == "torchscript":
        return to_torchscript(module, x)
    if fmt == "onnx_legacy":
        return to_onnx(module, x, input_names=["x"])
    if fmt == "onnx_legacy_opset11":  # Softmax before opset 13: over flattened trailing dims
        return to_onnx(module, x, input_names=["x"], opset=11)
    return to_onnx(module, x, input_names=["x"], dynamo=True)


FORMATS = ["torch_export", "torchscript", "onnx_legacy", "onnx_legacy_opset11", "onnx_dynamo"]


def test_the_model_really_underflows() -> None:
    x, target = _batch()
    out = LogOfSoftmax()(x)
    assert torch.isneginf(out).any()
    assert math.isinf(F.nll_loss(out, target).item())


@pytest.mark.parametrize("fmt", FORMATS)
def test_log_of_softmax_is_answered_with_log_softmax_and_verified(fmt: str) -> None:
    x, target = _batch()
    report = diagnose(_model_bytes(fmt), npz_bytes(x=x, target=target), NLL)
    (index,) = [i for i, f in enumerate(report.findings) if f.kind == "non_finite"]
    (rec,) = [r for r in report.recommendations if r.fix == "guard_numerics"]
    assert index in rec.addresses
    # the finding's own guard says the same (detectors/origin_text.py)
    assert "as F.log_softmax(z)" in report.findings[index].message
    assert "clamp its input" not in report.findings[index].message
    assert rec.params["method"] == "log_softmax"
    assert rec.params["softmax_node"] and rec.params["dim"] in (-1, 1)
    assert "F.log_softmax(z, dim=" in rec.snippet and "clamp_min" not in rec.snippet
    assert "log_softmax" in rec.rationale and "clamp_min(1e-6)" not in rec.rationale
    verified = rec.verified
    assert verified is not None and verified.applied
    assert verified.transform is not None and "log_softmax" in verified.transform
    assert verified.after["non_finite"] == {"present": False}
    assert math.isfinite(verified.after["figures"]["loss"])
    # the same function with exact gradients: the large gradients of the 200× logits were
    # there before, hidden by the NaN, so they are revealed, not new, and it is resolved
    assert "new_errors" not in verified.after
    assert verified.resolved is True


@pytest.mark.parametrize("fmt", ["torch_export", "onnx_legacy", "onnx_legacy_opset11"])
def test_the_rewritten_copy_computes_log_softmax_of_the_logits(fmt: str) -> None:
    x, target = _batch()
    subject = build_subject(_model_bytes(fmt), npz_bytes(x=x, target=target), NLL)
    assert subject.graph is not None
    m = measure(subject, NLL)
    assert m.non_finite_origin is not None
    copy_ = copy_subject(subject)
    text = guard_node(copy_, m.non_finite_origin.node)
    assert "log_softmax" in text
    reference = LogOfSoftmax()
    with torch.no_grad():
        got = copy_.graph.run([x])[0]  # type: ignore[union-attr]
        want = F.log_softmax(reference.logits(x), dim=-1)
        original = subject.graph.run([x])[0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert torch.isneginf(original).any()  # the user's model is untouched


class LogOfRelu(nn.Module):
    """log of a ReLU output: about half the entries are exactly 0. The only guard is a clamp,
    and log(1e-6) = -13.8 fed to the head makes its gradient far too large for its weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.log(torch.relu(self.fc(x))))


def test_a_guard_that_brings_a_new_error_is_not_resolved() -> None:
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    subject = build_subject(to_torch_export(LogOfRelu(), x), npz_bytes(x=x), DiagnoseOptions())
    m = measure(subject, DiagnoseOptions())
    findings = detect(m)
    (index,) = [k for k, f in enumerate(findings) if f.kind == "non_finite"]
    assert m.non_finite_origin is not None
    rec = Recommendation(
        fix="guard_numerics",
        addresses=[index],
        rationale="",
        params={"node": m.non_finite_origin.node},
    )
    (done,) = verify_recommendations([rec], findings, m, subject, DiagnoseOptions())
    verified = done.verified
    assert verified is not None and verified.applied
    assert "guarded input 0" in (verified.transform or "")
    assert verified.after["non_finite"] == {"present": False}  # the NaN is gone ...
    assert "exploding_gradients" in verified.after["new_errors"]  # ... but a new error came
    assert verified.resolved is False
    assert "new error" in (verified.reason or "")
    (new,) = [f for f in verified.after["new_findings"] if f["kind"] == "exploding_gradients"]
    assert new["severity"] == "error" and new["message"]


class ExplodingGru(nn.Module):
    """A GRU whose recurrent weights are 8× their init: gradients explode over time; the
    orthogonal re-initialisation removes that, and leaves a steep decay over time instead."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.GRU(8, 32, batch_first=True)
        self.head = nn.Linear(32, 4)
        with torch.no_grad():
            self.rnn.get_parameter("weight_hh_l0").mul_(8.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


def test_new_warnings_of_a_resolved_fix_are_listed() -> None:
    torch.manual_seed(0)
    model = ExplodingGru().eval()
    x, target = torch.randn(16, 60, 8), torch.randint(0, 4, (16,))
    report = diagnose(to_torch_export(model, x), npz_bytes(x=x, target=target), DiagnoseOptions())
    (rec,) = [
        r
        for r in report.recommendations
        if r.fix == "reinitialize_weights" and "orthogonal" in r.params["schemes"].values()
    ]
    verified = rec.verified
    assert verified is not None and verified.applied
    assert verified.after["exploding_gradients[time]"] == {"present": False}
    assert verified.after["figures"]["time_ratio"] < 1e-6  # a severe decay over time now
    # a warning: resolved stands, but the new finding is listed with its numbers
    assert verified.resolved is True
    assert "vanishing_gradients" in verified.after["new_warnings"]
    (new,) = [
        f
        for f in verified.after["new_findings"]
        if f["kind"] == "vanishing_gradients" and f.get("axis") == "time"
    ]
    assert new["severity"] == "warning" and "over time" in new["message"]


def test_the_report_page_lists_what_a_fix_brought() -> None:
    from service.api.pages.report_findings import verification_block
    from service.engine.report import Verification

    html = verification_block(
        Verification(
            applied=True,
            resolved=False,
            reason="the addressed finding(s) are gone, but the fixed copy shows new error(s)",
            before={"non_finite": {"present": True, "severity": "error", "layers": []}},
            after={
                "non_finite": {"present": False},
                "new_errors": ["vanishing_gradients"],
                "new_warnings": ["saturation"],
                "new_findings": [
                    {
                        "kind": "vanishing_gradients",
                        "severity": "error",
                        "axis": "depth",
                        "layers": ["fc1"],
                        "message": "Gradients vanish at every depth.",
                    },
                    {"kind": "saturation", "severity": "warning", "layers": [], "message": "m"},
                ],
            },
        )
    )
    assert "New after the fix" in html and "Gradients vanish at every depth." in html
    assert 'class="pill error"' in html and 'class="pill warning">warning' in html
    assert "tried: not resolved" in html
