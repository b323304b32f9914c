"""The converted graph on CUDA: same forward and gradients as on the CPU.

Shape arithmetic runs on small CPU tensors while the data lives on the GPU; these models mix
both (Shape → Gather → Concat → Reshape, ConstantOfShape, Expand, Range-free position adds).
Skipped without a CUDA device (run through the device tool).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import pytest
import torch

from service.engine.onnx.convert import convert
from tests.support.export import to_onnx
from tests.support.recurrent_zoo import RECURRENT_ZOO, ZooEntry
from tests.support.zoo import ZOO

DEVICE = "cuda"  # a module constant so the comparisons' logic can be exercised on the CPU too

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize(
    "name", ["resnet", "mobilenet", "vit", "transformer", "gpt", "control_flow"]
)
def test_cuda_matches_cpu(name: str) -> None:
    entry = ZOO[name]
    module = entry.build()
    target = torch.jit.script(module) if entry.scripted else module
    data = to_onnx(target, entry.example())
    x = entry.example()
    results = {}
    for side, device in (("cpu", "cpu"), ("device", DEVICE)):
        graph = convert(onnx.load_from_string(data), mode="train").to(device)
        out = graph(x.to(device))
        out.float().square().mean().backward()
        # a branch the batch does not take (control_flow's If) leaves its weights without a
        # gradient: only the gradients that exist are compared, and they must exist on both
        grads = {
            n: p.grad.detach().cpu()
            for n, p in graph.named_graph_parameters()
            if p.grad is not None
        }
        results[side] = (out.detach().cpu(), grads)
    torch.testing.assert_close(results["device"][0], results["cpu"][0], rtol=1e-3, atol=1e-4)
    assert results["cpu"][1], "no parameter got a gradient"
    assert results["device"][1].keys() == results["cpu"][1].keys()
    for pname, grad in results["cpu"][1].items():
        torch.testing.assert_close(results["device"][1][pname], grad, rtol=2e-3, atol=1e-4)


def _prefixed(name: str) -> Callable[[str], str]:
    """An assert_close `msg` that names the tensor it compared."""
    return lambda message: f"{name}: {message}"


def _output_and_grads(
    model: torch.nn.Module, params: dict[str, torch.nn.Parameter], inputs: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(*inputs)
    out.square().mean().backward()
    grads = {n: p.grad.detach().cpu() for n, p in params.items() if p.grad is not None}
    return out.detach().cpu(), grads


@pytest.mark.parametrize("entry", RECURRENT_ZOO, ids=lambda e: e.name)
def test_recurrent_cuda_matches_the_torch_module(entry: ZooEntry) -> None:
    """LSTM (whole-sequence path with its hand-written backward), GRU and RNN on CUDA: the
    converted graph's output and parameter gradients equal the original module's.

    TF32: cuDNN's RNN kernels may compute fp32 products in TF32 (10-bit mantissa) unless told
    not to, and `torch.backends.cudnn.allow_tf32` is True by default. On an H100 that put the
    cuDNN GRU and tanh RNN ~1e-4 (up to 1e-2 relative on small values) away from the converted
    graph, whose products are full fp32 (cuBLAS TF32 is off by default). Both sides run with
    TF32 off here. And the converted graph on CUDA is compared with the same graph on the CPU,
    tightly, first: a real device-dependent bug in the converter cannot hide in the tolerance
    against cuDNN."""
    module = entry.make()
    inputs = entry.example()
    data = to_onnx(module, inputs)
    on_cpu = convert(onnx.load_from_string(data), mode="train")
    cpu_out, cpu_grads = _output_and_grads(on_cpu, dict(on_cpu.named_graph_parameters()), inputs)

    with torch.no_grad():
        module_on_cpu = module(*inputs)  # only for the failure message below

    module = module.to(DEVICE)
    inputs = tuple(t.to(DEVICE) for t in inputs)
    graph = convert(onnx.load_from_string(data), mode="train").to(DEVICE)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
        expected, expected_grads = _output_and_grads(
            module, dict(module.named_parameters()), inputs
        )
        got, got_grads = _output_and_grads(graph, dict(graph.named_graph_parameters()), inputs)

    torch.testing.assert_close(got, cpu_out, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == cpu_grads.keys()
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=_prefixed(name))

    off = (expected - module_on_cpu).abs().max().item()
    torch.testing.assert_close(
        got,
        expected,
        rtol=1e-4,
        atol=1e-5,
        msg=lambda m: f"{m}\n(the torch module on {DEVICE} vs on the CPU: max abs {off:.3g})",
    )
    converted = dict(graph.named_graph_parameters())
    compared = 0
    for name, grad in expected_grads.items():
        if name in converted and converted[name].shape == grad.shape:
            assert name in got_grads, name
            torch.testing.assert_close(
                got_grads[name], grad, rtol=2e-3, atol=1e-5, msg=_prefixed(name)
            )
            compared += 1
    assert compared >= 4  # the recurrent weights and biases keep their names in the export
