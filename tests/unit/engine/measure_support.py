"""Small models, batch files and plain-autograd references for the measurement tests.

The reference runs the ORIGINAL torch module with ordinary autograd (forward hooks that call
`retain_grad`), so every statistic `measure()` reports through the converted graph and its
on-device probes is checked against an independent computation.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.support.export import to_onnx, to_torch_export, to_torchscript


@dataclass
class LayerRef:
    name: str  # the layer name measure() should give (the module path of its weight)
    output_module: str  # the module whose output is the layer's output
    activation: str | None = None


@dataclass
class Case:
    name: str
    module: nn.Module
    inputs: list[torch.Tensor]
    target: torch.Tensor | None
    loss: str
    layers: list[LayerRef]
    sequence: bool = False
    check_layers: bool = True  # False: the layer structure differs per format (recurrent ops)
    extra: dict[str, Any] = field(default_factory=dict)


def mlp_case() -> Case:
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Linear(6, 8),
        nn.Sigmoid(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )
    with torch.no_grad():  # large weights: some saturation and some dead units to measure
        cast(nn.Linear, module[2]).weight.mul_(4.0)
        cast(nn.Linear, module[4]).bias.sub_(0.6)
    x = torch.randn(12, 6) * 2
    y = torch.randint(0, 3, (12,))
    layers = [
        LayerRef("0", "1", "sigmoid"),
        LayerRef("2", "3", "tanh"),
        LayerRef("4", "5", "relu"),
        LayerRef("6", "6", None),
    ]
    return Case("mlp", module, [x], y, "cross_entropy", layers)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.bn(self.conv(x))).flatten(1))


def cnn_case() -> Case:
    torch.manual_seed(1)
    module = SmallCNN()
    x = torch.randn(6, 2, 5, 5)
    y = torch.randn(6, 3)
    layers = [
        LayerRef("conv", "conv", None),
        LayerRef("bn", "act", "relu"),
        LayerRef("head", "head", None),
    ]
    return Case("cnn", module, [x], y, "mse", layers)


class TanhRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 5, batch_first=True)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def rnn_case() -> Case:
    torch.manual_seed(2)
    module = TanhRNN()
    x = torch.randn(4, 9, 3)
    return Case("rnn", module, [x], None, "output_norm", [], sequence=True, check_layers=False)


CASES: dict[str, Callable[[], Case]] = {"mlp": mlp_case, "cnn": cnn_case, "rnn": rnn_case}


def export(case: Case, fmt: str) -> bytes:
    example = case.inputs[0] if len(case.inputs) == 1 else case.inputs
    with warnings.catch_warnings():
        # torch.export warns about nn.RNN's `_flat_weights` attribute; harmless here
        warnings.simplefilter("ignore")
        if fmt == "torch_export":
            return to_torch_export(case.module, example)
        if fmt == "torchscript":
            return to_torchscript(case.module, example)
        return to_onnx(case.module, example, input_names=["x"])


def onnx_available() -> bool:
    try:
        import service.engine.onnx.convert
        import service.engine.onnx.loading  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def npz_bytes(**arrays: torch.Tensor | np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # cast: numpy's stub types **kwds as its own keyword `allow_pickle: bool`
    np.savez(
        buffer,
        **cast(
            dict[str, Any],
            {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in arrays.items()},
        ),
    )
    return buffer.getvalue()


def case_batch(case: Case) -> bytes:
    arrays: dict[str, torch.Tensor] = {f"in{i}": x for i, x in enumerate(case.inputs)}
    if case.target is not None:
        arrays["target"] = case.target
    return npz_bytes(**arrays)


def plain_loss(kind: str, output: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    if kind == "cross_entropy":
        assert target is not None, kind
        return F.cross_entropy(output, target)
    if kind == "mse":
        assert target is not None, kind
        return F.mse_loss(output, target)
    if kind == "output_norm":
        return output.square().mean()
    raise AssertionError(kind)


def reference(case: Case, *, train: bool = True) -> dict[str, Any]:
    """Every statistic, by plain autograd on the original module."""
    module = case.module.train(train)
    modules = dict(module.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for ref in case.layers:

        def hook(_m: nn.Module, _i: Any, out: torch.Tensor, name: str = ref.name) -> None:
            out.retain_grad()
            captured[name] = out

        handles.append(modules[ref.output_module].register_forward_hook(hook))
    module.zero_grad(set_to_none=True)
    inputs = [x.clone().requires_grad_(case.sequence) for x in case.inputs]
    output = module(*inputs)
    loss = plain_loss(case.loss, output, case.target)
    loss.backward()
    for handle in handles:
        handle.remove()
    params = {}
    for name, p in module.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        params[name] = {
            "grad_norm": g.norm().item(),
            "weight_norm": p.detach().norm().item(),
            "non_finite_count": int((~torch.isfinite(g)).sum()),
            "underflow": ((g.abs() < 2.0**-24) & (g != 0)).double().mean().item(),
            "overflow": (g.abs() > 65504).double().mean().item(),
            "std": p.detach().double().std(unbiased=False).item(),
        }
    layers = {}
    for ref in case.layers:
        out = captured[ref.name].detach().double()
        activation_grad = captured[ref.name].grad
        assert activation_grad is not None, ref.name
        entry = {
            "activation_grad_norm": activation_grad.norm().item(),
            "mean": out.mean().item(),
            "std": out.std(unbiased=False).item(),
        }
        if ref.activation == "sigmoid":
            entry["saturated"] = (out * (1 - out) < 0.01).double().mean().item()
        if ref.activation == "tanh":
            entry["saturated"] = (1 - out * out < 0.01).double().mean().item()
        if ref.activation == "relu":
            entry["dead"] = 1.0 - (out != 0).any(dim=0).double().mean().item()
        layers[ref.name] = entry
    result: dict[str, Any] = {"loss": loss.item(), "params": params, "layers": layers}
    if case.sequence:
        input_grad = inputs[0].grad
        assert input_grad is not None
        g = input_grad.double()
        result["time"] = g.square().sum(dim=(0, 2)).sqrt().tolist()
    return result


def fit_growth(norms: list[float]) -> float:
    """Theil–Sen in numpy: exp(median of the pairwise slopes of log norm against index)."""
    logs = np.log(np.asarray(norms, dtype=np.float64))
    i, j = np.triu_indices(len(logs), k=1)
    return math.exp(float(np.median((logs[j] - logs[i]) / (j - i))))
