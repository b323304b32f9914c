"""Probe overhead: a full diagnosis pass vs a plain forward+backward of the same module.

    .venv/bin/python bench/overhead.py [--device cpu|cuda] [--repeats N] [--full-size] [--profile]
    .venv/bin/python bench/overhead.py --host-overhead [--repeats N]

For each model: the median time of
- `plain`: the original nn.Module, forward + loss + backward (eager PyTorch), the baseline;
- `graph`: the same model loaded from its `.pt2` as an ObservableGraph, run without observer;
- `measure`: `measure(subject)`, the whole measurement pass (probes, hooks, parameter
  statistics, the one host transfer, the report objects),
and the ratios graph/plain and measure/plain; the peak-memory ratio, on CUDA from
torch.cuda.max_memory_allocated (measure vs plain, in process), on the CPU with `--memory` from
the resident-set high-water mark of one step in a fresh child process per variant (the step's
own memory: activations, gradients, probe temporaries; the weights loaded before are excluded;
glibc's mmap threshold fixed at 64 KiB so that freed temporaries do not stay resident).

`--profile` (CUDA): after the timings, one more `measure()` under torch.profiler and under
`torch.cuda.set_sync_debug_mode("warn")`: the kernel count and CUDA time of `measure` against
`plain`, the top kernels by CUDA time, and every host-device synchronisation with the line that
caused it (the design allows one: the transfer at the end).

`--host-overhead` (CPU, no GPU needed): the host time of the pass, which bounds it on a GPU
(the H100 ran ResNet-50's measure() with the GPU busy 24.8 of 62.2 ms). The same structures with
tiny tensors (ResNet-50 width 8 at 32 px, batch 2; the 24-layer sigmoid MLP at width 16, batch 4),
so that compute is negligible, timed on one thread as process CPU time: measure/unprobed (the
graph's own forward+backward) and measure/plain (the nn.Module). `gpu path` rows compute the
statistics as a CUDA device does (var_mean moments, one-concatenation parameter counts); `cpu
path` rows as the CPU does.

Models: ResNet-50 (bottleneck blocks [3, 4, 6, 3], width 64, BatchNorm), ViT-B (patch 16,
d=768, 12 layers, 12 heads), a 24-layer sigmoid MLP, a 2-layer LSTM. On CPU the default sizes
are smaller (fewer pixels / tokens / widths, same structure; the table says which) because a
2-core machine needs seconds per ResNet-50 step; `--full-size` uses the GPU sizes anyway.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engine.measure import measure
from service.engine.options import DiagnoseOptions
from service.engine.subject import build_subject
from tests.support.export import to_torch_export


# -- models ------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.down: nn.Module | None = None
        if stride != 1 or inplanes != planes * 4:
            self.down = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet50(nn.Module):
    def __init__(self, classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )  # fmt: skip
        blocks: list[nn.Module] = []
        inplanes = width
        stages = zip([3, 4, 6, 3], [width, 2 * width, 4 * width, 8 * width], strict=True)
        for i, (count, planes) in enumerate(stages):
            for j in range(count):
                blocks.append(Bottleneck(inplanes, planes, 2 if (j == 0 and i > 0) else 1))
                inplanes = planes * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(inplanes, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class ViT(nn.Module):
    def __init__(self, image: int, patch: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        tokens = (image // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.encoder(x))[:, 0])


def sigmoid_mlp(width: int, depth: int = 24) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


class LSTMNet(nn.Module):
    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


@dataclass
class Bench:
    name: str
    size: str
    build: Callable[[], nn.Module]
    x: torch.Tensor
    classes: int


def benches(full: bool) -> list[Bench]:
    torch.manual_seed(0)
    if full:
        return [
            Bench("resnet50", "224px, batch 32", ResNet50, torch.randn(32, 3, 224, 224), 1000),
            Bench("vit_b", "224px/16, d768x12, batch 32",
                  lambda: ViT(224, 16, 768, 12, 12), torch.randn(32, 3, 224, 224), 1000),
            Bench("sigmoid_mlp24", "width 1024, batch 512",
                  lambda: sigmoid_mlp(1024), torch.randn(512, 1024), 10),
            Bench("lstm2", "hidden 512, 100 steps, batch 64",
                  lambda: LSTMNet(128, 512), torch.randn(64, 100, 128), 10),
        ]  # fmt: skip
    return [
        Bench("resnet50", "full depth/width, 128px, batch 8 (CPU size)",
              ResNet50, torch.randn(8, 3, 128, 128), 1000),
        Bench("vit_b", "d384x6, 6 heads, 128px/16, batch 8 (CPU size)",
              lambda: ViT(128, 16, 384, 6, 6), torch.randn(8, 3, 128, 128), 1000),
        Bench("sigmoid_mlp24", "width 256, batch 512 (CPU size)",
              lambda: sigmoid_mlp(256), torch.randn(512, 256), 10),
        Bench("lstm2", "hidden 256, 50 steps, batch 32 (CPU size)",
              lambda: LSTMNet(64, 256), torch.randn(32, 50, 64), 10),
    ]  # fmt: skip


# -- timing ------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds per call: wall time on CUDA; on the CPU, process CPU time, because the
    shared 2-core machines this runs on make wall time mostly a measure of the neighbours."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    fn()  # warm-up (allocator, autotuning)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        _sync(device)
        times.append(clock() - start)
    return statistics.median(times)


def _peak(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return float(torch.cuda.max_memory_allocated(device))


def _subject(
    bench: Bench, module: nn.Module, target: torch.Tensor, options: DiagnoseOptions
) -> Any:
    import io

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = to_torch_export(module, bench.x)
    batch = io.BytesIO()
    np.savez(batch, x=bench.x.numpy(), target=target.numpy())
    return build_subject(data, batch.getvalue(), options)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(bench: Bench, variant: str) -> None:
    """CPU peak memory of one step, in a fresh process: the resident-set high-water mark
    (VmHWM, reset through /proc/self/clear_refs) minus the resident set just before the step.
    Prints the bytes as one JSON number."""
    import gc
    import json

    module = bench.build().train()
    target = torch.randint(0, bench.classes, (bench.x.shape[0],))
    options = DiagnoseOptions(device="cpu", verify_fixes=False)
    step: Callable[[], object]
    if variant == "measure":
        subject = _subject(bench, module, target, options)
        del module

        def step() -> object:
            return measure(subject, options)

    elif variant == "graph":
        graph = _subject(bench, module, target, options).graph
        del module

        def step() -> object:
            return F.cross_entropy(graph.run([bench.x])[0], target).backward()

    else:

        def step() -> object:
            return F.cross_entropy(module(bench.x), target).backward()

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    step()
    print(json.dumps((_status_kib("VmHWM") - before) * 1024))


def memory_ratio_cpu(bench: Bench, threads: int) -> float | None:
    import json
    import os
    import subprocess

    # A fixed mmap threshold: large temporaries are mapped and unmapped instead of being kept
    # in glibc's heap, whose fragmentation would otherwise count freed memory in the resident
    # set (by default the probes' freed temporaries showed as +40 MiB on the sigmoid MLP)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    used = {}
    for variant in ("plain", "graph", "measure"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", variant, "--only", bench.name,
             "--threads", str(threads), "--device", "cpu"],
            capture_output=True, text=True, check=True, env=env,
        )  # fmt: skip
        used[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"  {bench.name} step memory (MiB): "
        + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in used.items())
    )
    return used["measure"] / used["plain"] if used["plain"] > 0 else None


def _kernels(fn: Callable[[], object], device: torch.device) -> Any:
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    return prof


def _device_events(prof: Any) -> list[Any]:
    return [e for e in prof.events() if getattr(e, "device_type", None) is not None
            and str(e.device_type).endswith("CUDA")]  # fmt: skip


def _event_us(event: Any) -> float:
    for name in ("device_time_total", "cuda_time_total", "device_time", "cuda_time"):
        value = getattr(event, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0


_PROFILE_LATER: list[tuple[Bench, dict[str, Callable[[], object]], torch.device]] = []


def profile_report(
    bench: Bench, fns: dict[str, Callable[[], object]], device: torch.device
) -> None:
    """Kernel counts and CUDA time per variant, the top kernels of `measure`, and the host-device
    synchronisations `measure` performs (set_sync_debug_mode warns once per sync)."""
    for name, fn in fns.items():
        kernels = _device_events(_kernels(fn, device))
        busy = sum(_event_us(e) for e in kernels) / 1e3
        wall = _median_time(fn, device, 3) * 1e3
        # busy well below wall: the GPU waits for the host (launch-bound, or host-side work
        # before the first kernel / after the transfer)
        print(
            f"  {bench.name} {name}: {len(kernels)} kernels, GPU busy {busy:.2f} ms "
            f"(kernel time, unprofiled wall {wall:.2f} ms)"
        )
    timing = getattr(fns["measure"](), "timing", None)
    if timing:  # forward/backward: device time between CUDA events; analysis: the host rest
        print(f"  {bench.name} measure timing: " + ", ".join(
            f"{k} {v * 1e3:.2f} ms" for k, v in timing.items()))  # fmt: skip
    prof = _kernels(fns["measure"], device)
    print(f"  {bench.name} measure, top kernels by CUDA time:")
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=15)
    print("\n".join("    " + line for line in table.splitlines()))
    import traceback

    syncs: list[str] = []

    def record(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if "/service/" in f.filename]
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else filename
            syncs.append(f"{where}: {str(message).splitlines()[0]}")

    fns["measure"]()
    _sync(device)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # restored by catch_warnings
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fns["measure"]()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"  {bench.name} measure: {len(syncs)} host-device synchronisation(s)")
    for line in syncs[:20]:
        print(f"    {line}")


def run(
    bench: Bench, device: torch.device, repeats: int, profile: bool = False
) -> dict[str, float | None]:
    module = bench.build().train()
    target = torch.randint(0, bench.classes, (bench.x.shape[0],))
    options = DiagnoseOptions(device=str(device), verify_fixes=False)
    subject = _subject(bench, module, target, options)
    module = module.to(device)
    x, y = bench.x.to(device), target.to(device)
    params = list(module.parameters())

    def plain() -> None:
        for p in params:
            p.grad = None
        F.cross_entropy(module(x), y).backward()

    graph = subject.graph
    assert graph is not None
    graph_params = [p for _, p in graph.named_graph_parameters()]

    def unprobed() -> None:
        for p in graph_params:
            p.grad = None
        F.cross_entropy(graph.run([x])[0], y).backward()

    def diagnosis() -> Any:
        return measure(subject, options)

    result: dict[str, float | None] = {}
    # interleave the variants so machine-load drift hits them alike
    t_plain, t_graph, t_measure = [], [], []
    for _ in range(max(1, repeats // 3)):
        t_plain.append(_median_time(plain, device, 3))
        t_graph.append(_median_time(unprobed, device, 3))
        t_measure.append(_median_time(diagnosis, device, 3))
    result["plain_s"] = statistics.median(t_plain)
    result["graph_s"] = statistics.median(t_graph)
    result["measure_s"] = statistics.median(t_measure)
    peak_plain, peak_measure = _peak(plain, device), _peak(diagnosis, device)
    result["peak_ratio"] = (
        peak_measure / peak_plain if peak_plain and peak_measure is not None else None
    )
    if profile and device.type == "cuda":  # after the table row is printed (main)
        _PROFILE_LATER.append(
            (bench, {"plain": plain, "graph": unprobed, "measure": diagnosis}, device)
        )
    return result


def host_overhead(repeats: int) -> None:
    """Tiny-tensor host-time ratios (see the module docstring, `--host-overhead`)."""
    from service.engine import probes, stats

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tiny = [
        Bench("resnet50", "width 8, 32px, batch 2", lambda: ResNet50(10, 8),
              torch.randn(2, 3, 32, 32), 10),
        Bench("sigmoid_mlp24", "width 16, batch 4", lambda: sigmoid_mlp(16),
              torch.randn(4, 16), 10),
    ]  # fmt: skip
    cpu_paths = (probes.moments, stats.counts_per_parameter)
    gpu_paths = (stats.var_mean_moments, stats.counts_by_concatenation)
    print(f"host time (process CPU, 1 thread, torch {torch.__version__}), median per step")
    print(f"{'model':<15}{'size':<26}{'path':<10}{'plain':>9}{'graph':>9}{'measure':>9}"
          f"{'meas/graph':>12}{'meas/plain':>12}")  # fmt: skip
    for bench in tiny:
        _host_rows(bench, repeats, cpu_paths, gpu_paths)


def _host_rows(bench: Bench, repeats: int, cpu_paths: Any, gpu_paths: Any) -> None:
    from service.engine import probes, stats

    module = bench.build().train()
    target = torch.randint(0, bench.classes, (bench.x.shape[0],))
    options = DiagnoseOptions(device="cpu", verify_fixes=False)
    subject = _subject(bench, module, target, options)
    graph = subject.graph
    assert graph is not None
    params = list(module.parameters())
    graph_params = [p for _, p in graph.named_graph_parameters()]

    def plain() -> None:
        for p in params:
            p.grad = None
        F.cross_entropy(module(bench.x), target).backward()

    def unprobed() -> None:
        for p in graph_params:
            p.grad = None
        F.cross_entropy(graph.run([bench.x])[0], target).backward()

    def diagnosis() -> object:
        return measure(subject, options)

    for path, (moments, counts) in (("gpu path", gpu_paths), ("cpu path", cpu_paths)):
        probes.moments, stats.counts_per_parameter = moments, counts
        try:
            times: dict[str, list[float]] = {"plain": [], "graph": [], "measure": []}
            for _ in range(max(1, repeats)):  # interleaved against load drift
                for name, fn in (("plain", plain), ("graph", unprobed),
                                 ("measure", diagnosis)):  # fmt: skip
                    times[name].append(_median_time(fn, torch.device("cpu"), 15))
        finally:
            probes.moments, stats.counts_per_parameter = cpu_paths
        tp, tg, tm = (statistics.median(times[k]) for k in ("plain", "graph", "measure"))
        print(f"{bench.name:<15}{bench.size:<26}{path:<10}{tp * 1e3:>7.2f}ms"
              f"{tg * 1e3:>7.2f}ms{tm * 1e3:>7.2f}ms{tm / tg:>11.2f}x{tm / tp:>11.2f}x",
              flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated model names")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="CPU: also measure the peak-memory ratio (two child processes per model)",
    )
    parser.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="CUDA: kernel counts, top kernels and host-device syncs of one measure() per model",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (1: OpenMP spin-waits on a busy machine would count as CPU time)",
    )
    parser.add_argument(
        "--host-overhead",
        action="store_true",
        help="CPU: host-time ratios of measure() on tiny tensors (what bounds it on a GPU)",
    )
    args = parser.parse_args()
    if args.host_overhead:
        host_overhead(args.repeats)
        return
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    full = args.full_size or device.type == "cuda"
    if args.memory_child:
        (bench,) = [b for b in benches(full) if b.name == args.only]
        memory_child(bench, args.memory_child)
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    clock = "wall time" if device.type == "cuda" else "process CPU time"
    print(f"median {clock} per step; ratios against `plain` in the same process")
    print(f"{'model':<15}{'size':<48}{'plain':>9}{'graph/pl':>10}{'meas/pl':>9}{'peak':>7}")
    only = {n for n in args.only.split(",") if n}
    for bench in benches(full):
        if only and bench.name not in only:
            continue
        r = run(bench, device, args.repeats, args.profile)
        if device.type == "cpu" and args.memory:
            r["peak_ratio"] = memory_ratio_cpu(bench, args.threads)
        plain = r["plain_s"] or 1.0
        peak = f"{r['peak_ratio']:.2f}" if r["peak_ratio"] is not None else "n/a"
        print(
            f"{bench.name:<15}{bench.size:<48}{plain * 1e3:>7.1f}ms"
            f"{(r['graph_s'] or 0) / plain:>9.2f}x{(r['measure_s'] or 0) / plain:>8.2f}x{peak:>7}",
            flush=True,
        )
        while _PROFILE_LATER:
            try:  # a profiler problem must not cost the timings of the models after it
                profile_report(*_PROFILE_LATER.pop())
            except Exception as exc:
                print(f"  profile failed: {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main()
