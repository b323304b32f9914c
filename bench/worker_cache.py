"""What a worker child's cache of loaded models saves per job (run:
`.venv/bin/python bench/worker_cache.py`).

In-process, no database: the real `JobRunner` a child uses, on zoo CNNs in each model format,
a job after job on the same model file (what a pipeline or a schedule sends). Baseline in the
same process: the same runner with a cache budget of 0 (every job loads and converts, as before
the cache). Runs alternate between the two, medians over `--jobs`. Prints per model and format:
the engine's own load + convert time per job (report `timing`), the whole job's wall time, and
the ratio cached / uncached, and the same ratio of the process's CPU time per job (less
disturbed than wall time when other processes share the machine). `--formats onnx`
(comma-separated) runs only those formats.

ONNX: the cached job still runs the conformance check on its batch; what it reuses is the
onnxruntime session (and eval-mode twin) kept with the cache entry, built by the first job.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.workers.loaded_cache import LoadedModelCache
from service.workers.model_cache import ModelCache
from service.workers.protocol import JobRequest
from service.workers.runner import JobRunner
from tests.support.export import to_onnx, to_torch_export, to_torchscript
from tests.support.zoo import ZOO

# each called as export(module, example)
EXPORTERS: dict[str, Callable[[nn.Module, torch.Tensor], bytes]] = {
    "onnx": to_onnx,
    "torch_export": to_torch_export,
    "torchscript": to_torchscript,
}


def job(
    runner: JobRunner, model_sha: str, batch_sha: str, device: str
) -> tuple[float, float, float]:
    """(load + convert seconds from the report, wall seconds of the job, CPU seconds of this
    process during the job: steadier than wall time on a machine other processes share)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    result = runner.run(
        JobRequest("bench", "diagnose", 1, model_sha, batch_sha, {"device": device})
    )
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    assert result.ok and result.report is not None, result.error_message
    timing = result.report["timing"]
    return timing["load"] + timing["convert"], wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn_bn,resnet")
    parser.add_argument("--jobs", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--formats", default=",".join(EXPORTERS))
    args = parser.parse_args()
    print(f"worker loaded-model cache, torch {torch.__version__}, device {args.device}")
    print(
        f"{'model':10s} {'format':13s} {'load+convert ms':>24s} {'job wall ms':>22s} "
        f"{'wall ratio':>10s} {'cpu ratio':>9s}"
    )
    print(f"{'':24s} {'uncached':>11s} {'cached':>12s} {'uncached':>10s} {'cached':>11s}")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)

        def store(data: bytes) -> str:
            sha = hashlib.sha256(data).hexdigest()
            (directory / sha).write_bytes(data)
            return sha

        for name in args.models.split(","):
            zoo = ZOO[name]
            x = zoo.example()
            buffer = io.BytesIO()
            np.savez(buffer, x=x.numpy(), target=np.arange(x.shape[0]) % 2)
            batch_sha = store(buffer.getvalue())
            for fmt in args.formats.split(","):
                export = EXPORTERS[fmt]
                model_sha = store(export(zoo.build(), x))
                cached = JobRunner(lambda s: directory / s, ModelCache(), LoadedModelCache())
                uncached = JobRunner(lambda s: directory / s, ModelCache(), LoadedModelCache(0))
                job(cached, model_sha, batch_sha, args.device)  # the miss that fills the cache
                job(uncached, model_sha, batch_sha, args.device)  # same warm-up
                rows: dict[str, list[tuple[float, float, float]]] = {"cached": [], "uncached": []}
                for _ in range(args.jobs):
                    rows["uncached"].append(job(uncached, model_sha, batch_sha, args.device))
                    rows["cached"].append(job(cached, model_sha, batch_sha, args.device))
                assert cached.loaded.hits == args.jobs and uncached.loaded.hits == 0
                med = {
                    k: (
                        statistics.median(r[0] for r in v) * 1e3,
                        statistics.median(r[1] for r in v) * 1e3,
                        statistics.median(r[2] for r in v) * 1e3,
                    )
                    for k, v in rows.items()
                }
                print(
                    f"{name:10s} {fmt:13s} {med['uncached'][0]:11.1f} {med['cached'][0]:12.1f} "
                    f"{med['uncached'][1]:10.1f} {med['cached'][1]:11.1f} "
                    f"{med['cached'][1] / med['uncached'][1]:10.2f} "
                    f"{med['cached'][2] / med['uncached'][2]:9.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
