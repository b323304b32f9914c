"""The graph runs wherever it is moved, with whatever strides the kernels there return.

What a GPU run found, checked on the CPU:
- an exported RNN creates its initial state with `aten.zeros(..., device=cpu)` (the device it
  was traced on): after `.to(cuda)` that state stayed on the CPU. The `meta` device stands in
  for CUDA here: a tensor left behind on the CPU fails the same way.
- the trace drops a `.contiguous()` that was a no-op on the CPU, so the graph's `aten.view`
  meets a non-contiguous tensor where a kernel lays out its output differently (CUDA's
  attention backends; here the math backend of scaled_dot_product_attention, or a
  channels-last convolution).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from service.engine.formats.torch_export import load_torch_export
from service.engine.graph import Node, ObservableGraph
from service.engine.options import DiagnoseOptions
from service.engine.subject import build_subject
from service.engine.verify.transforms import copy_subject
from tests.support.export import to_torch_export
from tests.unit.engine.measure_support import CASES, case_batch, export, onnx_available

FORMATS = ["torch_export", "torchscript"] + (["onnx"] if onnx_available() else [])


def _prefixed(name: str) -> Callable[[str], str]:
    """An assert_close `msg` that names the tensor it compared."""
    return lambda message: f"{name}: {message}"


def _grad(tensor: torch.Tensor) -> torch.Tensor:
    assert tensor.grad is not None, "backward reached every parameter"
    return tensor.grad


def held_tensors(graph: ObservableGraph) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {n: t for n, t in graph.named_parameters()}
    tensors.update(graph.named_buffers())
    return tensors


def run_on_meta(graph: ObservableGraph, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run on `meta` inputs; every float value any node produces must be on `meta` too (meta
    kernels of some ops, matmul among them, do not check that their operands share a device,
    so the outputs alone could hide a CPU tensor made on the way)."""
    elsewhere: list[str] = []

    def observer(node: Node, outputs: Sequence[Any]) -> None:
        for value in outputs:
            floating = isinstance(value, torch.Tensor) and value.is_floating_point()
            if floating and value.device.type != "meta":
                elsewhere.append(f"{node.name} ({node.op_type}): {value.device}")

    outputs = graph.run([x.to("meta") for x in inputs], observer)
    assert not elsewhere, elsewhere
    return [o for o in outputs if isinstance(o, torch.Tensor)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_the_graph_runs_where_it_was_moved(case_name: str, fmt: str) -> None:
    case = CASES[case_name]()
    subject = build_subject(export(case, fmt), case_batch(case), DiagnoseOptions(device="cpu"))
    graph = subject.graph
    assert graph is not None and graph.device == torch.device("cpu")
    graph.to("meta")
    assert graph.device.type == "meta"
    left = [n for n, t in held_tensors(graph).items() if t.device.type != "meta"]
    assert not left, left
    if fmt == "onnx":
        # ONNX keeps small integer constants (shapes) on the CPU on purpose, and its recurrent
        # ops ask autocast about the device, which knows no `meta`: the state is checked, the
        # run is left to the CUDA tests (tests/unit/onnx/test_cuda.py)
        return
    assert not [n for n, v in graph.constants.items() if isinstance(v, torch.Tensor)]
    outputs = run_on_meta(graph, subject.inputs)
    assert outputs and all(o.device.type == "meta" for o in outputs)


def test_a_copy_of_the_graph_follows_its_own_moves() -> None:
    """Fix verification deep-copies the graph (sharing the node functions): the copy's nodes
    read the copy's device."""
    case = CASES["rnn"]()
    subject = build_subject(
        export(case, "torch_export"), case_batch(case), DiagnoseOptions(device="cpu")
    )
    assert subject.graph is not None
    twin = copy_subject(subject).graph
    assert twin is not None and twin is not subject.graph
    twin.to("meta")
    assert all(o.device.type == "meta" for o in run_on_meta(twin, subject.inputs))
    assert subject.graph.device == torch.device("cpu")  # the original stays where it was
    (out,) = subject.graph.run(subject.inputs)
    torch.testing.assert_close(out, case.module(*subject.inputs))


class Attention(nn.Module):
    """The ViT attention's reshapes: `transpose(1, 2).contiguous().view(...)` after SDPA."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).contiguous().view(b, n, 8))


class ConvThenView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], -1))


def graph_and_grads(
    graph: ObservableGraph, x: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    graph.zero_grad()
    (out,) = graph.run([x])
    out.square().mean().backward()
    return out.detach(), {n: _grad(p).clone() for n, p in graph.named_graph_parameters()}


def module_and_grads(
    module: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad()
    out = module(x)
    out.square().mean().backward()
    return out.detach(), {n: _grad(p).clone() for n, p in module.named_parameters()}


def test_a_view_after_attention_runs_whatever_layout_the_backend_returns() -> None:
    torch.manual_seed(0)
    module, x = Attention(), torch.randn(2, 5, 8)
    graph = load_torch_export(to_torch_export(module, x)).graph
    assert graph is not None
    ops = [n.op_type for n in graph.nodes]
    # the trace kept no copy between the transpose and the view (`.contiguous()` was a no-op)
    assert ops[ops.index("transpose") + 1] == "view", ops
    with sdpa_kernel(SDPBackend.MATH):  # a contiguous [b, heads, n, d] output
        got, got_grads = graph_and_grads(graph, x)
        want, want_grads = module_and_grads(module, x)
    torch.testing.assert_close(got, want)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, msg=_prefixed(name))


def test_a_view_of_a_channels_last_activation() -> None:
    torch.manual_seed(0)
    module, x = ConvThenView(), torch.randn(2, 3, 5, 5)
    graph = load_torch_export(to_torch_export(module, x)).graph
    assert graph is not None and "view" in [n.op_type for n in graph.nodes]
    # the convolution keeps its input's memory format: its output cannot be viewed as [b, -1]
    got, got_grads = graph_and_grads(graph, x.contiguous(memory_format=torch.channels_last))
    want, want_grads = module_and_grads(module, x)
    torch.testing.assert_close(got, want)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, msg=_prefixed(name))
