"""One fit for the depth profile: the report's `profiles.depth.growth_factor` and the
detectors' per-layer factor come from the same robust (Theil–Sen) fit, and layers without a
‖∂L/∂a‖ are left out of it, counted in the profile."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from service.engine.detectors.profile import sig
from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from tests.support.export import to_torch_export
from tests.unit.engine.measure_support import fit_growth, npz_bytes


def test_profile_and_finding_report_the_same_fit() -> None:
    torch.manual_seed(0)
    # a sigmoid stack whose last layer (no activation) breaks the geometric decay: a
    # least-squares fit and the robust fit then differ, so only one function can match both
    layers: list[nn.Module] = []
    for _ in range(9):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    module = nn.Sequential(*layers, nn.Linear(16, 4))
    x = torch.randn(16, 16)
    target = torch.randint(0, 4, (16,))
    report = diagnose(
        to_torch_export(module, x),
        npz_bytes(x=x, target=target),
        DiagnoseOptions(verify_fixes=False),
    )
    depth = report.profiles.depth
    assert depth.layers_left_out == 0
    assert depth.growth_factor == fit_growth([v for v in depth.grad_norms if v])
    (finding,) = [f for f in report.findings if f.kind == "vanishing_gradients"]
    assert finding.evidence["growth_factor"] == depth.growth_factor
    assert abs(finding.evidence["per_layer_factor"] * depth.growth_factor - 1) < 1e-12
    assert f"×{sig(depth.growth_factor)} per layer towards the output" in finding.message


class DetachedProbe(nn.Module):
    """A side layer whose output is detached before it is used: no gradient ever reaches it,
    so its ‖∂L/∂a‖ is not observed."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.probe = nn.Linear(8, 8)
        self.mid = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.emb(idx))
        last = out[:, -1]
        return self.fc(torch.tanh(self.mid(last) + self.probe(last).detach()))


def test_layers_without_an_activation_gradient_are_left_out_of_the_fit_and_counted() -> None:
    torch.manual_seed(0)
    idx = torch.randint(0, 20, (4, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = to_torch_export(DetachedProbe(), idx)
    report = diagnose(
        model, npz_bytes(idx=idx), DiagnoseOptions(loss="output_norm", verify_fixes=False)
    )
    depth = report.profiles.depth
    by_name = {layer.name: layer for layer in report.layers}
    missing = [n for n, layer in by_name.items() if layer.activation_grad_norm is None]
    assert missing == ["probe"]  # detached: no gradient reaches its output
    assert depth.layers_left_out == 1 and depth.left_out == ["probe"]
    assert "probe" not in depth.layers
    assert depth.growth_factor == fit_growth(depth.grad_norms)  # type: ignore[arg-type]
    assert any("1 layer(s) have no measured ‖∂L/∂a‖" in note for note in report.notes)
