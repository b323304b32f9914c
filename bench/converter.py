"""Speed of the ONNX converter's output against the original torch module, and conversion time.

    .venv/bin/python bench/converter.py [--device cpu|cuda] [--repeats 20] [--quick]
                                        [--dynamo [--optimize]]
    .venv/bin/python bench/converter.py --host-overhead [--threads 1]

For a ResNet-style CNN, a transformer encoder and an LSTM (when the recurrent ops are
registered): each module is exported with the legacy exporter in TRAINING mode (`--dynamo`:
with the dynamo exporter, torch's default, its ONNX optimizer off unless `--optimize`),
converted in `train` mode, and the median forward+backward time of the converted graph is
divided by the original module's, both on the same device, measured alternately in one process.
Then the conversion time (bytes → ModelProto → ObservableGraph) of a ~300 MB wide MLP.
Targets (issue 2): ratio ≤ 1.10 on CPU, ≤ 1.05 on CUDA; conversion ≤ 1 s.

`--host-overhead`: the reference-size models (12-layer d=768 encoder, wide ResNet) on TINY
inputs, so that compute is negligible and what is left is host-side (Python, dispatcher,
autograd) cost per step, the part a GPU spends idle: CPU time per forward+backward of the
converted graph vs the module, the graph's nodes (and how many still compute per call, i.e.
are not folded to a stored value), aten ops dispatched in forward and backward, and autograd
nodes recorded per step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from service.engine.onnx.convert import convert, load_onnx
from service.engine.onnx.ops import pooled_cuda_graphs
from service.engine.onnx.registry import lookup
from tests.support.export import to_onnx
from tests.support.op_counts import OpCounter
from tests.support.zoo import ResNet, TransformerEncoder


class LSTMModel(nn.Module):
    """Two recurrent layers (nn.LSTM, or `cell` nn.GRU / nn.RNN) and a linear head on the last
    step."""

    def __init__(self, features: int, hidden: int, cell: type[nn.Module] = nn.LSTM) -> None:
        super().__init__()
        self.lstm = cell(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
    out = model(x)
    out.float().square().mean().backward()


def median_times(
    runs: dict[str, Callable[[], None]], repeats: int, device: torch.device
) -> dict[str, float]:
    for run in runs.values():  # warm up (allocator, kernels, autograd caches)
        for _ in range(3):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():  # alternate so drift hits both equally
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            _sync(device)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    # CPU time of this process: steadier than wall time when other processes share the cores.
    return (
        {name: statistics.median(t) for name, t in times.items()}
        | {f"{name}_min": min(t) for name, t in times.items()}
        | {f"{name}_cpu": statistics.median(t) for name, t in cpu.items()}
    )


def compare(
    name: str,
    module: nn.Module,
    x: torch.Tensor,
    device: torch.device,
    repeats: int,
    only: str = "",
    export: dict[str, bool] | None = None,
) -> float | None:
    """Print and return the converted/original time ratio; None when `only` excludes the row."""
    if only not in name:
        return None
    module.train()
    export = export or {}
    data = to_onnx(module, x, dynamo=export.get("dynamo", False), optimize=export.get("optimize"))
    graph = convert(load_onnx(data), mode="train").to(device)
    if not FUSIONS:
        graph.fusions = []
    module = module.to(device)
    xd = x.to(device)

    def original() -> None:
        module.zero_grad(set_to_none=True)
        training_step(module, xd)

    def converted() -> None:
        graph.zero_grad(set_to_none=True)
        training_step(graph, xd)

    captured, mismatches = pooled_cuda_graphs.captured_total, pooled_cuda_graphs.mismatches_total
    medians = median_times({"torch": original, "converted": converted}, repeats, device)
    # CUDA graphs of LSTM nodes captured while this row ran (warm-up included): a handful;
    # more would mean captures in the timed steps
    captured = pooled_cuda_graphs.captured_total - captured
    mismatches = pooled_cuda_graphs.mismatches_total - mismatches
    if PROFILE:
        _print_profile({"torch": original, "converted": converted}, (module, graph), xd)
    ratio = medians["converted"] / medians["torch"]
    best = medians["converted_min"] / medians["torch_min"]
    cpu = medians["converted_cpu"] / medians["torch_cpu"]
    print(
        f"{name:<22} median: torch {medians['torch'] * 1e3:8.2f} ms, converted "
        f"{medians['converted'] * 1e3:8.2f} ms, ratio {ratio:5.3f} | min ratio {best:5.3f}"
        f" | cpu-time ratio {cpu:5.3f}   ({len(graph.nodes)} nodes"
        + (f", {captured} graphs captured" if device.type == "cuda" else "")
        + (f", {mismatches} REPLAYS DIFFERED from eager runs" if mismatches else "")
        + ")"
    )
    return ratio


PROFILE = False  # --profile
FUSIONS = True  # not --no-fusions


def _print_profile(
    runs: dict[str, Callable[[], None]], models: tuple[nn.Module, nn.Module], x: torch.Tensor
) -> None:
    """Where a step's time goes, each side: aten ops and autograd nodes dispatched, the
    profiler's top operators by host time, and the GPU's busy time."""
    from torch.profiler import ProfilerActivity, profile

    for (name, run), model in zip(runs.items(), models, strict=True):
        counts = _step_counts(model, x)
        activities = [ProfilerActivity.CPU]
        if x.is_cuda:
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            for _ in range(5):
                run()
            _sync(x.device)
        events = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events) / 5
        print(
            f"  {name}: aten ops fwd {counts['aten_fwd']}, bwd {counts['aten_bwd']}, autograd "
            f"nodes {counts['autograd']}; GPU busy {gpu_us / 1e3:.3f} ms per step"
        )
        table = events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48)
        print("\n".join("    " + line for line in table.splitlines()))


def _autograd_nodes(root: torch.Tensor) -> int:
    seen: set[int] = set()
    stack = [root.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return len(seen)


def _step_counts(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> dict[str, int]:
    forward, backward = OpCounter(), OpCounter()
    with forward:
        loss = model(x).float().square().mean()
    nodes = _autograd_nodes(loss)
    with backward:
        loss.backward()
    return {
        "aten_fwd": sum(forward.ops.values()),
        "aten_bwd": sum(backward.ops.values()),
        "autograd": nodes,
    }


def _nodes_called(graph: nn.Module, x: torch.Tensor) -> int:
    """Nodes whose fn a call with `x` runs: not folded at conversion, not a passthrough, not
    shape arithmetic known from an earlier call with the same input shape."""
    graph(x)
    plan_of = getattr(graph, "_run_plan", None)
    if plan_of is None:  # (a checkout from before run plans: bench the baseline with this file)
        return -1
    plan = plan_of()
    schedules = list(plan.by_signature.values()) or [plan.base]
    return len(schedules[-1].computing)


def host_overhead(name: str, module: nn.Module, x: torch.Tensor, repeats: int) -> None:
    """Converted vs module on tiny inputs: host time per step and what is dispatched."""
    module.train()
    graph = convert(load_onnx(to_onnx(module, x)), mode="train")

    def original() -> None:
        module.zero_grad(set_to_none=True)
        training_step(module, x)

    def converted() -> None:
        graph.zero_grad(set_to_none=True)
        training_step(graph, x)

    medians = median_times({"torch": original, "converted": converted}, repeats, x.device)
    counts = {"torch": _step_counts(module, x), "converted": _step_counts(graph, x)}
    ratio = medians["converted_cpu"] / medians["torch_cpu"]
    print(
        f"{name:<34} cpu time per step: torch {medians['torch_cpu'] * 1e3:7.2f} ms, converted "
        f"{medians['converted_cpu'] * 1e3:7.2f} ms, ratio {ratio:5.2f}"
    )
    print(f"{'':<34} graph nodes {len(graph.nodes)}, called per call {_nodes_called(graph, x)}")
    for side, c in counts.items():
        print(
            f"{'':<34} {side:<9}: aten ops forward {c['aten_fwd']:5d}, backward "
            f"{c['aten_bwd']:5d}; autograd nodes {c['autograd']:5d}"
        )


def host_overhead_rows(repeats: int) -> None:
    # The reference encoder's structure (12 layers, 12 heads: the same 1892 nodes) at d=96:
    # at d=768 even 1x4 tokens spend ~100 ms per step writing 85 M weight gradients.
    torch.manual_seed(0)
    encoder = TransformerEncoder(dim=96, heads=12, layers=12, ffn=384)
    host_overhead("transformer d96 x12 heads12, 1x4", encoder, torch.randn(1, 4, 96), repeats)
    torch.manual_seed(0)
    cnn = ResNet(width=16, blocks=4)
    host_overhead("resnet-style CNN w16, 2x3x16x16", cnn, torch.randn(2, 3, 16, 16), repeats)


def wide_mlp_bytes(target_mb: int) -> bytes:
    """A Linear-ReLU-Linear model with ~target_mb MB of float32 weights, built directly."""
    width = 1024
    hidden = max(int(target_mb * 1024 * 1024 / 4 / (2 * width)), 1)
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((hidden, width), np.float32), "fc1.weight"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "fc1.bias"),
        numpy_helper.from_array(rng.standard_normal((width, hidden), np.float32), "fc2.weight"),
        numpy_helper.from_array(np.zeros(width, np.float32), "fc2.bias"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "fc2.weight", "fc2.bias"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "wide_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def conversion_time(target_mb: int) -> None:
    data = wide_mlp_bytes(target_mb)
    timings: list[tuple[float, float]] = []
    for _ in range(3):
        start = time.perf_counter()
        model = load_onnx(data)
        parsed = time.perf_counter()
        graph = convert(model)
        done = time.perf_counter()
        timings.append((parsed - start, done - parsed))
        del graph, model
    parse, conv = min(timings, key=lambda t: t[0] + t[1])
    print(
        f"conversion of a {len(data) / 1e6:.0f} MB model: parse {parse:.3f} s + convert "
        f"{conv:.3f} s = {parse + conv:.3f} s (best of 3)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--only", default="", help="run only the rows whose name contains this")
    parser.add_argument("--skip-conversion", action="store_true", help="no conversion timing")
    parser.add_argument(
        "--dynamo",
        action="store_true",
        help="export with torch.onnx's dynamo exporter (default: the legacy one, TRAINING mode)",
    )
    parser.add_argument(
        "--optimize",
        action="store_true",
        help="with --dynamo: its ONNX optimizer on, as torch.onnx.export does by default",
    )
    parser.add_argument(
        "--size",
        choices=["auto", "small", "reference"],
        default="auto",
        help="reference: the issue's 12-layer d=768 encoder and a wide ResNet (auto: on CUDA)",
    )
    parser.add_argument(
        "--host-overhead",
        action="store_true",
        help="reference-size models on tiny inputs: host time, nodes, aten ops, autograd nodes",
    )
    parser.add_argument(
        "--profile", action="store_true", help="each row: op counts and the profiler's top ops"
    )
    parser.add_argument(
        "--no-fusions",
        action="store_true",
        help="every node runs on its own (no fused attention or linear: onnx/fusions.py)",
    )
    args = parser.parse_args()
    global PROFILE, FUSIONS
    PROFILE = args.profile
    FUSIONS = not args.no_fusions
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.host_overhead:
        print(f"host overhead (cpu), torch {torch.__version__}, threads {torch.get_num_threads()}")
        host_overhead_rows(args.repeats)
        return
    device = torch.device(args.device)
    export = {"dynamo": True, "optimize": args.optimize} if args.dynamo else {}
    scale = 1 if args.quick else 4
    reference = args.size == "reference" or (args.size == "auto" and device.type == "cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {device} ({name}), torch {torch.__version__}, onnx {onnx.__version__}, "
        f"threads {torch.get_num_threads()}"
    )

    torch.manual_seed(0)
    if reference:  # the reference sizes: a 12-layer d=768 encoder, a wide ResNet
        cnn = (ResNet(width=64, blocks=4), torch.randn(32, 3, 64, 64), "w64, 4 blocks, 32x64px")
        encoder = TransformerEncoder(dim=768, heads=12, layers=12, ffn=3072)
        tokens = (encoder, torch.randn(16, 128, 768), "d768 x12, batch 16x128")
    else:
        cnn = (ResNet(width=8 * scale, blocks=4), torch.randn(8, 3, 32, 32), "")
        encoder = TransformerEncoder(dim=64 * scale, heads=4, layers=4, ffn=256 * scale)
        tokens = (encoder, torch.randn(8, 32, 64 * scale), "")
    torch.manual_seed(0)
    compare(
        f"resnet-style CNN {cnn[2]}".strip(),
        cnn[0],
        cnn[1],
        device,
        args.repeats,
        args.only,
        export,
    )
    torch.manual_seed(0)
    compare(
        f"transformer encoder {tokens[2]}".strip(),
        tokens[0],
        tokens[1],
        device,
        args.repeats,
        args.only,
        export,
    )
    if lookup("LSTM", "", 14) is None:
        print("lstm                   skipped: the recurrent ops (LSTM) are not registered yet")
    else:
        torch.manual_seed(0)
        compare(
            "lstm (2 layers)",
            LSTMModel(16 * scale, 32 * scale),
            torch.randn(8, 24, 16 * scale),
            device,
            args.repeats,
            args.only,
            export,
        )
        # a training-sized LSTM: the small one above is bound by per-op overhead, this one by
        # its products (hidden 512, batch 32, 50 steps; --quick: a quarter of each)
        torch.manual_seed(0)
        compare(
            "lstm (2 layers, large)",
            LSTMModel(32 * scale, 128 * scale),
            torch.randn(8 * scale, 50 if scale > 1 else 12, 32 * scale),
            device,
            max(3, args.repeats // 3),
            args.only,
            export,
        )
        # GRU and tanh RNN at the small LSTM's size (not among the rows; their loops
        # share the LSTM's machinery)
        for name, cell in (("gru (2 layers)", nn.GRU), ("rnn (2 layers)", nn.RNN)):
            torch.manual_seed(0)
            compare(
                name,
                LSTMModel(16 * scale, 32 * scale, cell),
                torch.randn(8, 24, 16 * scale),
                device,
                args.repeats,
                args.only,
                export,
            )
    if not args.skip_conversion:
        conversion_time(30 if args.quick else 300)


if __name__ == "__main__":
    main()
