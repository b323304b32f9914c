"""The converted graph on CUDA: same forward and gradients as on the CPU.

Shape arithmetic runs on small CPU tensors while the data lives on the GPU; these models mix
both (Shape → Gather → Concat → Reshape, ConstantOfShape, Expand, Range-free position adds).
Skipped without a CUDA device (run through the device tool).
"""

from __future__ import annotations

import onnx
import pytest
import torch

from service.engine.onnx.convert import convert
from tests.support.export import to_onnx
from tests.support.recurrent_zoo import RECURRENT_ZOO, ZooEntry
from tests.support.zoo import ZOO

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
    for device in ("cpu", "cuda"):
        graph = convert(onnx.load_from_string(data), mode="train").to(device)
        out = graph(x.to(device))
        out.float().square().mean().backward()
        grads = {n: p.grad.detach().cpu() for n, p in graph.named_graph_parameters()}
        results[device] = (out.detach().cpu(), grads)
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-3, atol=1e-4)
    for pname, grad in results["cpu"][1].items():
        torch.testing.assert_close(results["cuda"][1][pname], grad, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("entry", RECURRENT_ZOO, ids=lambda e: e.name)
def test_recurrent_cuda_matches_the_torch_module(entry: ZooEntry) -> None:
    """LSTM (whole-sequence path with its hand-written backward), GRU and RNN on CUDA: the
    converted graph's output and parameter gradients equal the original module's."""
    module = entry.make().cuda()
    inputs = tuple(t.cuda() for t in entry.example())
    data = to_onnx(module, inputs)
    graph = convert(onnx.load_from_string(data), mode="train").cuda()
    expected = module(*inputs)
    expected.square().mean().backward()
    got = graph(*inputs)
    got.square().mean().backward()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    converted = dict(graph.named_graph_parameters())
    compared = 0
    for name, param in module.named_parameters():
        if name in converted and converted[name].shape == param.shape:
            assert converted[name].grad is not None
            torch.testing.assert_close(converted[name].grad, param.grad, rtol=2e-3, atol=1e-5)
            compared += 1
    assert compared >= 4  # the recurrent weights and biases keep their names in the export
