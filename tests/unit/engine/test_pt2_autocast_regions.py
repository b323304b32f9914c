"""A `.pt2` whose forward runs under `torch.autocast(...)` or `torch.no_grad()`: torch.export
makes the block one higher-order op (`wrap_with_autocast`, `wrap_with_set_grad_enabled`) with
the block as a submodule. Before, the whole block was one opaque node: one layer named after
the module holding it, and no finding inside (a broken layer reported healthy). Its body is now
inlined (service/engine/formats/fx_regions.py), each op run under the block's context."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from service.engine.formats.fx import graph_from_fx
from service.engine.formats.fx_regions import inline_wrapper_regions
from service.engine.formats.torch_export import load_torch_export
from service.engine.graph import ObservableGraph
from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from service.engine.report import Report
from tests.support.export import to_torch_export
from tests.support.runner_jobs import npz_batch

LOW_PRECISION = [torch.float16, torch.bfloat16]


class MLP(nn.Module):
    """Three linear layers, run under autocast to `dtype` (None: no autocast); `broken` makes
    fc2's weight a millionth of its init (vanishing gradients, too small an init, dead ReLUs)."""

    def __init__(self, dtype: torch.dtype | None, *, broken: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 5)
        self.dtype = dtype
        if broken:
            with torch.no_grad():
                self.fc2.weight.mul_(1e-6)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.tanh(self.fc1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return self.body(x)
        with torch.autocast("cpu", dtype=self.dtype):
            return self.body(x).float()


class FrozenBranch(nn.Module):
    """A `torch.no_grad()` block in forward: a feature computed without gradient, added."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(8, 16)
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feature = torch.tanh(self.frozen(x))
        return self.head(torch.relu(self.fc(x) + feature))


def _example() -> tuple[torch.Tensor, np.ndarray]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 8, generator=generator)
    return x, np.arange(16) % 5


def _diagnose(model: nn.Module) -> Report:
    x, target = _example()
    return diagnose(
        to_torch_export(model, x), npz_batch(x, target), DiagnoseOptions.model_validate({})
    )


def _layers(report: Report) -> list[tuple[str, str]]:
    return [(layer.name, layer.op) for layer in report.layers]


def _kinds(report: Report) -> set[tuple[str, str]]:
    """The findings that judge the model. An `info` forecast of fp16 underflow is left out:
    under fp16 autocast the smallest gradients are already fp16 ones (flushed to zero), so
    there is less left to forecast, as in the ONNX export of the same model."""
    return {(f.kind, f.severity) for f in report.findings if f.severity != "info"}


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_an_autocast_region_has_the_layers_of_the_same_model_without_autocast(
    dtype: torch.dtype,
) -> None:
    expected = _layers(_diagnose(MLP(None)))
    assert expected == [("fc1", "linear"), ("fc2", "linear"), ("fc3", "linear")]
    assert _layers(_diagnose(MLP(dtype))) == expected


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_a_broken_layer_inside_an_autocast_region_is_found(dtype: torch.dtype) -> None:
    expected = _kinds(_diagnose(MLP(None, broken=True)))
    assert {k for k, _ in expected} == {"vanishing_gradients", "init_scale", "dead_units"}
    report = _diagnose(MLP(dtype, broken=True))
    assert report.verdict == "unhealthy"
    # the region computes in fp16 (bf16): an fp16 (bf16) run, where fc1's gradients, a
    # millionth of their scale behind fc2, flush to zero in fp16
    assert report.precision == ("fp16" if dtype == torch.float16 else "bf16")
    underflow = {(k, s) for k, s in _kinds(report) if k == "fp16_underflow"}
    assert bool(underflow) == (dtype == torch.float16)
    assert _kinds(report) - underflow == expected


def _graph_and_program(model: nn.Module) -> tuple[ObservableGraph, nn.Module]:
    """The ObservableGraph gradhealth runs, and the loaded program's own module."""
    x, _ = _example()
    data = to_torch_export(model, x)
    graph = load_torch_export(data).graph
    assert graph is not None
    return graph, torch.export.load(io.BytesIO(data)).module()


def _assert_same_outputs_and_gradients(graph: nn.Module, program: nn.Module) -> None:
    x, _ = _example()
    outputs = []
    for module in (graph, program):
        out = module(x)
        out.square().sum().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    ours, theirs = dict(graph.named_parameters()), dict(program.named_parameters())
    assert list(ours) == list(theirs)
    for name, parameter in theirs.items():
        if parameter.grad is None:  # read under no_grad only
            assert ours[name].grad is None, name
        else:
            torch.testing.assert_close(ours[name].grad, parameter.grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_an_inlined_autocast_region_computes_what_the_program_computes(
    dtype: torch.dtype,
) -> None:
    graph, program = _graph_and_program(MLP(dtype))
    linears = [node for node in graph.nodes if node.op_type == "linear"]
    assert len(linears) == 3
    _assert_same_outputs_and_gradients(graph, program)


def test_a_no_grad_block_is_inlined_and_stays_without_gradient() -> None:
    graph, program = _graph_and_program(FrozenBranch())
    assert not any("wrap_with" in node.op_type for node in graph.nodes)
    _assert_same_outputs_and_gradients(graph, program)
    assert graph.get_parameter("frozen.weight").grad is None
    assert graph.get_parameter("fc.weight").grad is not None

    report = _diagnose(FrozenBranch())
    assert [name for name, _ in _layers(report)] == ["frozen", "fc", "head"]


class NestedRegions(nn.Module):
    """An fp32 island (autocast disabled) inside an fp16 region. torch.export.load cannot
    read such a program back (its verifier wants a `val` for a region that returns nothing),
    so this one is checked in memory."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            h = torch.relu(self.fc1(x))
            with torch.autocast("cpu", enabled=False):
                return self.fc2(h.float())


def test_a_region_nested_in_a_region_runs_under_both_contexts() -> None:
    x, _ = _example()
    program = torch.export.export(NestedRegions(), (x,))
    module = program.module()
    assert inline_wrapper_regions(module) == []
    names = [name for name, _ in program.module().named_parameters()]
    graph = graph_from_fx(module, parameter_names=names, input_names=["x"])
    linears = [node for node in graph.nodes if node.op_type == "linear"]
    assert [node.source.meta["val"].dtype for node in linears] == [torch.float16, torch.float32]
    _assert_same_outputs_and_gradients(graph, program.module())


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return torch.cond(h.sum() > 0, lambda t: torch.relu(t), lambda t: t * 2.0, (h,))


def test_a_higher_order_op_left_opaque_is_named_in_a_note() -> None:
    x, _ = _example()
    loaded = load_torch_export(to_torch_export(Branching(), x))
    assert loaded.graph is not None
    notes = loaded.graph.metadata["notes"] + loaded.notes
    assert any("(cond, a higher-order op) runs its body as one node" in n for n in notes)
