"""What one `measure()` call asks of the device, counted on the CPU.

On CUDA every host read of a device value (`.item()`, `bool(t)`, `float(t)`, `.cpu()`,
`.tolist()`, `torch.nonzero`, boolean-mask indexing, a host→device `torch.tensor(list)`) waits
until the GPU has drained its queue, and every small probe op is one kernel launch plus its
Python dispatch. Both made the first GPU run of bench/overhead.py cost 2.87× a plain ResNet-50
step (target ≤ 1.10×). These tests keep them counted: one device→host transfer per call (the
`.cpu()` of `measure._to_host`, plus the `.tolist()` of its host copy), and a bounded number of
probe kernels per graph node on the code path a CUDA device takes. They run anywhere.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from service.engine import probes, stats
from service.engine.measure import measure
from service.engine.measurements import Subject
from service.engine.options import DiagnoseOptions
from service.engine.subject import build_subject
from service.engine.verify.transforms import copy_subject, swap_activations
from tests.support.pathologies import ZOO

# aten ops that read a device value on the host (they block until the GPU queue is drained)
_SYNCING_OPS = {
    "aten._local_scalar_dense",  # .item(), float(t), int(t), bool(t), `if t:`
    "aten.is_nonzero",
    "aten.equal",
    "aten.nonzero",  # also what boolean-mask indexing runs
    "aten.masked_select",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
}
# host-side calls that copy between host and device
_TRANSFER_METHODS = ("cpu", "numpy", "tolist", "item", "__array__")
# ops that move no data (views, metadata, allocations): not kernels on a GPU
_NO_KERNEL = {
    "aten.view",
    "aten.detach",
    "aten.select",
    "aten.split",
    "aten.split_with_sizes",
    "aten.unbind",
    "aten.t",
    "aten.alias",
    "aten.unsqueeze",
    "aten.squeeze",
    "aten.expand",
    "aten.slice",
    "aten._unsafe_view",
    "aten.as_strided",
    "aten.permute",
    "aten.transpose",
    "aten.empty",
    "aten.empty_like",
    "aten.empty_strided",
    "aten._reshape_alias",
}


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[func._schema.name.replace("::", ".")] += 1
        if func._schema.name == "aten::index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
        ):
            self.ops["aten.index (boolean mask)"] += 1
        return func(*args, **(kwargs or {}))

    def kernels(self) -> int:
        return sum(n for op, n in self.ops.items() if op not in _NO_KERNEL)


@functools.cache
def _subject(case: str) -> Subject:
    """Exported once per module run (the export is most of these tests' time)."""
    zoo = ZOO[case]
    return build_subject(zoo.model_bytes("torch_export"), zoo.batch_bytes(), DiagnoseOptions())


@pytest.fixture
def transfers(monkeypatch: pytest.MonkeyPatch) -> Iterator[collections.Counter[str]]:
    """Counts the host-transfer calls made while the test runs (the methods still run)."""
    calls: collections.Counter[str] = collections.Counter()

    def counted(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return original(*args, **kwargs)

        return wrapper

    for name in _TRANSFER_METHODS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    # a Python list copied to a device is the same wait in the other direction
    monkeypatch.setattr(torch, "tensor", counted("torch.tensor", torch.tensor))
    monkeypatch.setattr(torch, "as_tensor", counted("torch.as_tensor", torch.as_tensor))
    yield calls


@pytest.mark.parametrize(
    ("case", "micro_batches"),
    [("healthy_residual_cnn_bn", 1), ("healthy_residual_cnn_bn", 2), ("healthy_mlp_layernorm", 1)],
)
def test_a_measure_call_makes_one_host_transfer(
    case: str, micro_batches: int, transfers: collections.Counter[str]
) -> None:
    options = DiagnoseOptions(micro_batches=micro_batches)
    subject = _subject(case)
    measure(subject, options)  # warm-up: first-call work (loss resolution, caches) aside
    transfers.clear()
    with _OpCounter() as counter:
        result = measure(subject, options)
    syncing = {op: n for op, n in counter.ops.items() if op.split(".default")[0] in _SYNCING_OPS}
    syncing.update({op: n for op, n in counter.ops.items() if "boolean mask" in op})
    assert syncing == {}
    assert dict(transfers) == {"cpu": 1, "tolist": 1}  # the `_to_host` copy and its host read
    assert result.non_finite_origin is None and result.micro_batches == micro_batches


def _plain_step_kernels(subject: Subject) -> int:
    """Kernels of the same graph's forward + loss + backward without probes."""
    graph = subject.graph
    assert graph is not None and subject.target is not None
    for _, p in graph.named_graph_parameters():
        p.grad = None
    with _OpCounter() as counter:
        F.cross_entropy(graph.run(list(subject.inputs))[0], subject.target).backward()
    return counter.kernels()


def test_probe_kernels_per_node_are_bounded_on_the_gpu_code_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The statistics a CUDA device computes, run here on the CPU: `var_mean` moments and the
    one-concatenation parameter counts (the CPU picks sums and per-parameter chunks instead,
    which are faster on a CPU and cost more kernels). Per node at most two kernels beyond the
    plain step (a forward statistic and a gradient norm; a ReLU layer's unit peaks and alive
    count are within that budget because views and plain nodes take none), plus a fixed number
    for the parameters, the per-pass stacking and the transfer, whatever the parameter count.
    Before: ~15 per node and ~3 per parameter on this path."""
    monkeypatch.setattr(probes, "moments", stats.var_mean_moments)
    monkeypatch.setattr(stats, "counts_per_parameter", stats.counts_by_concatenation)
    options = DiagnoseOptions()
    subject = _subject("healthy_residual_cnn_bn")
    assert subject.graph is not None
    measure(subject, options)
    plain = _plain_step_kernels(subject)
    with _OpCounter() as counter:
        measure(subject, options)
    nodes = len(subject.graph.nodes)
    parameters = len(subject.graph.named_graph_parameters())
    extra = counter.kernels() - plain
    print(f"{nodes} nodes, {parameters} parameters: {plain} kernels plain, +{extra} measure")
    assert parameters > 10  # the bound below must not scale with them
    assert extra <= 2 * nodes + 40, counter.ops.most_common(15)
    assert counter.ops["aten.var_mean"] >= 1  # the GPU path ran


def test_concatenated_counts_with_an_empty_parameter_match_the_per_parameter_path() -> None:
    """The fused per-parameter sums (`_foreach_norm` over views of the rows) and their fallback
    for empty tensors count exactly as the CPU path."""
    torch.manual_seed(0)
    grads = [torch.randn(40) * 1e-7, torch.zeros(0), torch.randn(3, 5) * 1e5]
    grads[0][3] = float("nan")
    grads[2][1, 1] = float("-inf")
    assert torch.equal(stats.counts_by_concatenation(grads), stats.counts_per_parameter(grads))
    without_empty = [grads[0], grads[2]]
    assert torch.equal(
        stats.counts_by_concatenation(without_empty), stats.counts_per_parameter(without_empty)
    )


def test_comparison_rows_equal_the_clamp_rows_at_every_threshold() -> None:
    """The GPU path's one-comparison-per-row indicators equal the CPU path's clamp arithmetic
    entry by entry: every float32 bit pattern within 300 of each threshold (2^-24, 65504, inf,
    0, FLT_MAX), both signs, NaN payloads, and a stride through all 2^31 magnitudes."""
    near = [
        range(max(t - 300, 0), min(t + 300, 0x7FFFFFFF))
        for t in (stats._TINY_BITS, stats._FP16_MAX_BITS, stats._NON_FINITE_BITS, 0, 0x7F7FFFFF)
    ]
    patterns = [b for r in near for b in r] + [0x7FC00000, 0x7FFFFFFF, 0x7F800001]
    magnitudes = torch.tensor(patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)
    stride = torch.arange(0, 2**31, 4099, dtype=torch.int64).to(torch.int32).view(torch.float32)
    values = torch.cat([magnitudes, -magnitudes, stride, -stride])
    by_clamp = stats._indicator_rows(values)
    assert by_clamp.sum() > 0 and by_clamp[1].sum() < values.numel()  # both outcomes occur
    assert torch.equal(stats._indicator_rows_by_comparison(values), by_clamp)


def _report(result: Any) -> dict[str, Any]:
    dumped = dataclasses.asdict(result)
    dumped.pop("timing")
    return dumped


def test_the_kept_graph_plan_gives_the_first_calls_numbers_and_follows_in_place_changes() -> None:
    """measure() keeps the layer grouping and the probe plan per graph (host time a GPU would
    wait through): a second call measures exactly what the first did, and a graph whose nodes
    were changed in place since (verify's activation swap does that to its copy) is planned
    afresh, as an unrelated copy of it would be."""
    zoo = ZOO["deep_sigmoid_mlp"]
    subject = build_subject(zoo.model_bytes("torch_export"), zoo.batch_bytes(), DiagnoseOptions())
    first = measure(subject)
    assert _report(measure(subject)) == _report(first)
    assert any(layer.activation_stats.activation == "sigmoid" for layer in first.layers)
    swap_activations(subject, {"sigmoid"}, "ReLU")
    swapped = measure(subject)
    assert all(layer.activation_stats.activation != "sigmoid" for layer in swapped.layers)
    assert any(layer.activation_stats.dead_fraction is not None for layer in swapped.layers)
    assert _report(swapped) == _report(measure(copy_subject(subject)))
