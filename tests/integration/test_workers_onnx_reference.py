"""ONNX jobs on a worker's cached model reuse the conformance check's onnxruntime session
(service/workers/loaded_cache.py, service/engine/onnx/conformance.py): built once per cache
entry, the check still run on every job's batch (the report equals a fresh one-shot diagnosis
of that batch), the session counted in the cache's size and freed with its entry."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.engine.formats.onnx import load_onnx_model
from service.engine.onnx.conformance import PROVIDER, ConformanceReference
from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from service.workers.loaded_cache import LoadedModelCache
from service.workers.model_cache import ModelCache
from service.workers.protocol import JobRequest
from service.workers.runner import JobRunner
from tests.support.export import to_onnx
from tests.support.runner_jobs import comparable_report, npz_batch, store_blob
from tests.support.zoo import ZOO


def _run(runner: JobRunner, model_sha: str, batch_sha: str) -> dict[str, Any]:
    result = runner.run(JobRequest("job", "diagnose", 1, model_sha, batch_sha, {"device": "cpu"}))
    assert result.ok, result.error_message
    assert result.report is not None
    return result.report


def _batches(tmp_path: Path, x: torch.Tensor, scales: list[float]) -> list[tuple[bytes, str]]:
    """Batches of x's shape with values of other magnitudes: each job's check has its own
    rounding errors (they grow with the values), so a result kept from an earlier batch shows."""
    out = []
    for seed, scale in enumerate(scales):
        values = scale * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        data = npz_batch(values, np.arange(x.shape[0]) % 2)
        out.append((data, store_blob(tmp_path, data)))
    return out


def test_one_session_per_cached_model_and_each_batch_checked_as_a_fresh_load(
    tmp_path: Path,
) -> None:
    # exported for inference: in train mode the check compares an eval-mode twin (kept too)
    zoo = ZOO["cnn_bn"]
    x = zoo.example()
    model = to_onnx(zoo.build().eval(), x, training=False)
    model_sha = store_blob(tmp_path, model)
    runner = JobRunner(lambda sha: tmp_path / sha, ModelCache(), LoadedModelCache())

    reports = []
    for data, sha in _batches(tmp_path, x, [1.0, 1e2, 1e4]):
        report = _run(runner, model_sha, sha)
        fresh = diagnose(model, data, DiagnoseOptions.model_validate({"device": "cpu"}))
        assert comparable_report(report) == comparable_report(fresh.to_jsonable())
        reports.append(report)

    errors = [r["model"]["conversion"]["max_abs_error"] for r in reports]
    assert errors[0] < errors[1] < errors[2]  # a check per batch, not a result kept
    assert all("eval mode" in r["model"]["conversion"]["reason"] for r in reports)
    (key,) = runner.loaded._entries
    reference = runner.loaded.conformance_reference(key)
    assert reference is not None
    assert reference.sessions_built == 1 and runner.loaded.references_built == 1
    assert (runner.loads, runner.loaded.hits) == (1, 2)


def test_the_session_is_counted_in_the_cache_size_and_freed_with_its_entry(
    tmp_path: Path,
) -> None:
    zoo = ZOO["resnet"]
    x = zoo.example()
    (_, batch_sha), *_ = _batches(tmp_path, x, [1.0])
    first = store_blob(tmp_path, to_onnx(zoo.build(), x))
    runner = JobRunner(lambda sha: tmp_path / sha, ModelCache(), LoadedModelCache())
    _run(runner, first, batch_sha)
    (key,) = runner.loaded._entries
    entry = runner.loaded._entries[key]
    reference = runner.loaded.conformance_reference(key)
    assert reference is not None and reference.size_bytes > 0
    assert runner.loaded.size_bytes == entry.model_bytes + reference.size_bytes
    graph = entry.loaded.graph
    session = weakref.ref(reference.session(entry.loaded.source, graph, [PROVIDER]))
    assert reference.sessions_built == 1

    # a budget for one such entry: a second model's job evicts the first, and its session
    # goes with it even while something still holds the entry's reference object
    runner.loaded.budget_bytes = runner.loaded.size_bytes + runner.loaded.size_bytes // 2
    other = to_onnx(ZOO["resnet"].build().apply(_scale_weights), x)
    _run(runner, store_blob(tmp_path, other), batch_sha)
    assert key not in runner.loaded and len(runner.loaded) == 1
    assert reference.size_bytes == 0
    gc.collect()
    assert session() is None
    (other_key,) = runner.loaded._entries
    other_reference = runner.loaded.conformance_reference(other_key)
    assert other_reference is not None and other_reference is not reference
    assert runner.loaded.size_bytes == (
        runner.loaded._entries[other_key].model_bytes + other_reference.size_bytes
    )


def _scale_weights(module: torch.nn.Module) -> None:
    """Other weights, same architecture (another file, another cache entry)."""
    with torch.no_grad():
        for parameter in module.parameters(recurse=False):
            parameter.mul_(0.5)


def test_a_session_is_not_reused_for_other_providers() -> None:
    zoo = ZOO["mlp"]
    loaded = load_onnx_model(to_onnx(zoo.build(), zoo.example()), check_conversion=False)
    model, graph = loaded.source, loaded.graph
    assert graph is not None
    reference = ConformanceReference()
    cpu = reference.session(model, graph, [PROVIDER])
    assert reference.session(model, graph, [PROVIDER]) is cpu
    # another provider list (an accelerator's, CPU as fallback) gets a session of its own
    other = reference.session(model, graph, ["AzureExecutionProvider", PROVIDER])
    assert other is not cpu and reference.sessions_built == 2
    assert reference.session(model, graph, [PROVIDER]) is not cpu
    reference.close()
    assert reference.size_bytes == 0
