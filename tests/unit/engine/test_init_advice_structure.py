"""The re-initialisation advice multiplies the layers' scales into one gain only for a plain
chain: in a residual net with normalisation (a transformer) each branch's scale does not
compound through the others, and the rationale says what a small scale does there."""

from __future__ import annotations

import torch
from torch import nn

from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from tests.support.export import to_torch_export
from tests.unit.engine.measure_support import npz_bytes


class Stack(nn.Module):
    def __init__(self, residual: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.residual = residual
        fcs = [nn.Linear(32, 32) for _ in range(4)]
        for fc in fcs:
            nn.init.normal_(fc.weight, std=0.02)  # HF's initializer_range at width 32
        self.fcs = nn.ModuleList(fcs)
        self.norm = nn.LayerNorm(32) if residual else nn.Identity()
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc in self.fcs:
            x = x + torch.tanh(fc(self.norm(x))) if self.residual else torch.tanh(fc(x))
        return self.head(x)


X = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(2))


def _reinit_rationale(residual: bool) -> str:
    report = diagnose(
        to_torch_export(Stack(residual), X),
        npz_bytes(x=X, target=Y),
        DiagnoseOptions(verify_fixes=False),
    )
    assert any(f.kind == "init_scale" for f in report.findings)
    return next(r.rationale for r in report.recommendations if r.fix == "reinitialize_weights")


def test_scales_compound_only_through_a_plain_chain() -> None:
    chain = _reinit_rationale(residual=False)
    assert "compounded over the" in chain
    residual = _reinit_rationale(residual=True)
    assert "compounded" not in residual and "at every layer" not in residual
    assert "contributing little" in residual
