"""Random masks drawn by sampling (a drop path / stochastic depth: `x.new_empty(...).bernoulli_(
keep) / keep`) are off in train mode like dropout: each sample is its expected value, which is
the module's eval behaviour, so the report equals the model without them and is the same on
every run. ONNX exports write them as RandomUniformLike → Less → Cast (both exporters);
onnxruntime's copy computes the same for the conformance check. With `dropout` they are drawn,
from a generator seeded per diagnosis."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from tests.support.export import to_onnx, to_torch_export
from tests.unit.engine.measure_support import npz_bytes


def drop_path(x: torch.Tensor, p: float, training: bool, floored: bool = False) -> torch.Tensor:
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    if floored:  # Hugging Face's: (keep + rand).floor_()
        mask = (keep + torch.rand(shape, dtype=x.dtype)).floor_()
    else:  # timm's
        mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask / keep


class StochasticDepth(nn.Module):
    def __init__(self, p: float = 0.3, floored: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.p, self.floored = p, floored
        self.blocks = nn.ModuleList(nn.Linear(12, 12) for _ in range(3))
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + drop_path(torch.tanh(block(x)), self.p, self.training, self.floored)
        return self.head(x)


X = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(2))
FORMATS = ["torch_export", "onnx", "onnx_dynamo"]


def _export(module: nn.Module, fmt: str) -> bytes:
    module.train()
    if fmt == "torch_export":
        return to_torch_export(module, X)
    return to_onnx(module, X, input_names=["x"], dynamo=fmt == "onnx_dynamo")


def _without_drop_path() -> tuple[float, dict[str, float]]:
    module = StochasticDepth(p=0.0)
    loss = F.cross_entropy(module(X), Y)
    loss.backward()
    grads = {n: p.grad.norm().item() for n, p in module.named_parameters() if p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("floored", [False, True], ids=["bernoulli", "floor_of_rand"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_drop_path_is_off_in_train_mode_and_the_report_is_the_models_without_it(
    fmt: str, floored: bool
) -> None:
    model, batch = _export(StochasticDepth(floored=floored), fmt), npz_bytes(x=X, target=Y)
    first = diagnose(model, batch, DiagnoseOptions(verify_fixes=False))
    second = diagnose(model, batch, DiagnoseOptions(verify_fixes=False))
    loss, grads = _without_drop_path()
    assert first.loss.value == pytest.approx(loss, rel=1e-5)
    assert second.loss.value == first.loss.value
    ours = {p.name: p.grad_norm for p in first.parameters}
    assert ours == pytest.approx(grads, rel=1e-4)
    if fmt != "torch_export":
        assert any("random mask(s)" in note for note in first.notes)
        conversion = first.model.conversion
        assert conversion is not None and conversion.checked
        assert conversion.max_abs_error is not None and conversion.max_abs_error < 1e-5


@pytest.mark.parametrize("fmt", FORMATS)
def test_with_dropout_the_masks_are_drawn_and_the_same_on_every_run(fmt: str) -> None:
    model, batch = _export(StochasticDepth(p=0.5), fmt), npz_bytes(x=X, target=Y)
    options = DiagnoseOptions(verify_fixes=False, dropout=True)
    first = diagnose(model, batch, options)
    second = diagnose(model, batch, options)
    assert first.loss.value == second.loss.value
    assert first.loss.value != pytest.approx(_without_drop_path()[0], rel=1e-4)
    if fmt != "torch_export":  # onnxruntime computed on the same draws
        conversion = first.model.conversion
        assert conversion is not None and conversion.max_abs_error is not None
        assert conversion.max_abs_error < 1e-5, conversion


class RandomlyMasked(nn.Module):
    """ViT-MAE's random masking: a random permutation of the tokens (argsort of uniform
    noise) keeps half of them; no Bernoulli mask, so no expected value either: the draw is
    the model's computation."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x)  # [B, L, 8]
        noise = torch.rand(tokens.shape[0], tokens.shape[1])
        keep = torch.argsort(noise, dim=1)[:, : tokens.shape[1] // 2]
        kept = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[2]))
        return self.head(torch.tanh(kept).mean(1))


@pytest.mark.parametrize("dynamo", [False, True])
def test_random_draws_of_the_models_own_are_given_to_onnxruntime_for_the_check(
    dynamo: bool,
) -> None:
    """onnxruntime draws other numbers than torch: compared on its own draws, the masked
    tokens differed and the check reported errors of the outputs' own size."""
    x = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(3))
    model = to_onnx(RandomlyMasked(), x, input_names=["x"], dynamo=dynamo)
    report = diagnose(model, npz_bytes(x=x, target=torch.tensor([0, 1, 2, 3])), DiagnoseOptions())
    conversion = report.model.conversion
    assert conversion is not None and conversion.checked
    assert conversion.max_abs_error is not None and conversion.max_abs_error < 1e-5, conversion
    assert "onnxruntime was given the converter's draws" in (conversion.reason or "")
