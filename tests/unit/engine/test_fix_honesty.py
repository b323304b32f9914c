"""What a recommendation shows must be what its code does: a verification judges the
consequence of what it fixes (a vanishing gradient behind dead units), and each snippet runs as
written and changes what the verification changed."""

from __future__ import annotations

import io
import itertools

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from service.engine import diagnose
from service.engine.options import DiagnoseOptions
from service.engine.report import Report
from tests.support.export import to_torch_export

OPTIONS = DiagnoseOptions()


def _batch(inputs: int = 16, classes: int = 4, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, inputs, generator=g), torch.randint(0, classes, (n,), generator=g)


def _diagnose(module: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Report:
    buffer = io.BytesIO()
    np.savez(buffer, x=x.numpy(), target=target.numpy())
    return diagnose(to_torch_export(module.eval(), x), buffer.getvalue(), OPTIONS)


class AllDeadReLU(nn.Module):
    """Both hidden ReLUs behind a bias of −5: every unit is dead, and the gradient to fc1
    vanishes with them. LeakyReLU's slope of 0.01 below zero leaves it vanishing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.out = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        nn.init.constant_(self.fc1.bias, -5.0)
        nn.init.constant_(self.fc2.bias, -5.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


def test_a_swap_that_leaves_the_gradient_vanishing_is_not_resolved() -> None:
    report = _diagnose(AllDeadReLU(), *_batch())
    kinds = {f.kind: f.severity for f in report.findings}
    assert kinds == {"vanishing_gradients": "error", "dead_units": "error"}
    swap = next(r for r in report.recommendations if r.fix == "replace_activation")
    v = swap.verified
    assert v is not None and v.applied
    assert v.after["dead_units"] == {"present": False}  # no exact zeros left to count
    # ...but the gradient they stopped still does not reach fc1
    assert v.after["vanishing_gradients[depth]"]["present"] is True
    assert v.after["figures"]["depth_ratio"] < 0.01
    assert v.resolved is False
    assert "vanishing" in (v.reason or "") and "depth ratio" in (v.reason or "")
    # re-initialising the layers does clear both
    reinit = next(r for r in report.recommendations if r.fix == "reinitialize_weights")
    assert reinit.verified is not None and reinit.verified.resolved is True


def _run_snippet(snippet: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """Runs a snippet on `model` as a user would; the parameters it changed, before."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    exec(snippet, {"model": model})  # the snippet is the code the user gets
    return {n: v for n, v in before.items() if not torch.equal(v, model.get_parameter(n))}


def test_a_reinitialisation_snippet_names_every_tensor() -> None:
    from service.engine.advice.snippets import reinitialize

    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
    names = [f"{i}.weight" for i in range(12)]
    snippet = reinitialize(dict.fromkeys(names, "kaiming"))
    assert "..." not in snippet  # Python's Ellipsis would be a key of `params`
    assert set(_run_snippet(snippet, model)) == set(names)


class FunctionalSigmoids(nn.Module):
    """Sigmoids called as functions in forward(): no module for a loop to replace."""

    def __init__(self, depth: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(depth))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.sigmoid(layer(x))
        return self.head(x)


def test_the_swap_snippet_says_how_to_edit_functional_calls() -> None:
    report = _diagnose(FunctionalSigmoids(), *_batch())
    swap = next(r for r in report.recommendations if r.fix == "replace_activation")
    assert swap.params["to"] == "ReLU"
    # the module loop cannot change torch.sigmoid(x): the snippet shows the line to write
    assert "torch.sigmoid(x) / F.sigmoid(x) / x.sigmoid()  →  F.relu(x)" in swap.snippet
    assert "by hand" in swap.snippet
    # the graph nodes swapped, to find the calls by
    assert swap.verified is not None and "sigmoid" in (swap.verified.transform or "")
    assert "(" in (swap.verified.transform or "")


def test_the_leaky_relu_snippet_names_a_real_function() -> None:
    from service.engine.advice.snippets import replace_activation

    snippet = replace_activation(["relu"], "LeakyReLU", None)
    assert "F.leaky_relu(x, 0.01)" in snippet and "leakyrelu" not in snippet
    assert hasattr(F, "leaky_relu")


def test_the_swap_snippet_reinitialises_what_the_verification_did() -> None:
    from tests.support.pathologies import ZOO

    case = ZOO["deep_sigmoid_mlp"]
    report = diagnose(case.model_bytes("torch_export"), case.batch_bytes(), OPTIONS)
    swap = next(r for r in report.recommendations if r.fix == "replace_activation")
    weights = swap.params["init_weights"]
    assert weights == [f"fc{i}.weight" for i in range(10)]  # not the head, not the biases
    assert swap.verified is not None
    assert f"He-initialised {len(weights)} weight(s)" in (swap.verified.transform or "")
    model = case.module(0)
    changed = _run_snippet(swap.snippet, model)
    assert set(changed) == set(weights)
    assert not any(isinstance(m, nn.Sigmoid) for m in model.modules())


def test_the_forget_gate_bias_param_is_the_value_the_fix_sets() -> None:
    from tests.support.pathologies import Case, GatedRNN

    case = Case("lstm", lambda _s: GatedRNN(nn.LSTM), (8, 30, 4))
    module = case.module()
    with torch.no_grad():
        module.rnn.bias_ih_l0.chunk(4)[1].fill_(-5.0)  # type: ignore[union-attr, operator]
        module.rnn.bias_hh_l0.chunk(4)[1].fill_(-5.0)  # type: ignore[union-attr, operator]
    x, _ = case.batch()
    report = diagnose(to_torch_export(module, x), case.batch_bytes(), OPTIONS)
    rec = next(r for r in report.recommendations if "schemes" in r.params)
    assert rec.params["forget_gate_bias"] == {"rnn": 1.0}  # the snippet's fill_(1.0)
    assert rec.params["current_forget_gate_bias"] == {"rnn": -10.0}  # bias_ih + bias_hh now
    assert "fill_(1.0)" in rec.snippet


class WideThenNarrow(nn.Module):
    """Nine 32-wide ReLU layers at std 1 (~4× He's) and a 32 → 4 head at ~4.2× Xavier's,
    which against 1/√fan_out, the nearer end of Xavier's range, is only ~2×."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        dims = [16] + [32] * 9 + [4]
        layers = [nn.Linear(a, b) for a, b in itertools.pairwise(dims)]
        for layer in layers:
            nn.init.normal_(layer.weight, 0.0, 1.0)
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


def test_init_scale_lists_its_layers_worst_first_by_the_ratio_it_judges() -> None:
    report = _diagnose(WideThenNarrow(), *_batch())
    (f,) = [f for f in report.findings if f.kind == "init_scale"]
    judged = f.evidence["judged_ratio"]
    assert list(judged) == f.layers  # the evidence in the listing's order
    values = [judged[n] for n in f.layers]
    assert values == sorted(values, reverse=True)
    assert f.evidence["worst_judged_ratio"] == values[0]
    assert f.evidence["worst_ratio"] == f.evidence["init_std_ratio"][f.layers[0]]
    # the head's raw ratio is the largest, but judged against 1/√fan_out it is the mildest
    assert f.layers[-1] == "layers.9" and judged["layers.9"] < 2.5
    reinit = next(r for r in report.recommendations if r.fix == "reinitialize_weights")
    total = len(reinit.params["schemes"])
    assert total > 4
    assert f"and {total - 4} more" in (reinit.verified.transform or "")  # type: ignore[union-attr]
