"""A worker child's cache of loaded models (service/workers/loaded_cache.py) through the real
JobRunner and the real engine: a job on a cached model gives the report a fresh load gives,
and leaves the cached module as it found it (no gradients, same parameters and buffers); a job
that fails on a cached model is run again on a fresh load only when the cache could be at
fault, never for a batch that cannot feed the model."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from service.engine.formats.loaded import LoadedModel
from service.engine.options import DiagnoseOptions
from service.engine.pipeline import diagnose
from service.workers.loaded_cache import LoadedKey, LoadedModelCache
from service.workers.model_cache import ModelCache
from service.workers.protocol import JobRequest
from service.workers.runner import JobRunner
from tests.support.export import to_onnx, to_torch_export, to_torchscript
from tests.support.runner_jobs import comparable_report, npz_batch, store_blob
from tests.support.zoo import ZOO


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _run(runner: JobRunner, model_sha: str, batch_sha: str, job: str) -> dict[str, Any]:
    result = runner.run(
        JobRequest(
            job_id=job,
            kind="diagnose",
            attempt=1,
            model_sha256=model_sha,
            batch_sha256=batch_sha,
            options={"device": "cpu"},
        )
    )
    assert result.ok, result.error_message
    assert result.report is not None
    return result.report


def test_consecutive_jobs_on_a_cached_model_match_a_fresh_load(tmp_path: Path) -> None:
    # a CNN with batch norm: train mode counts batches in num_batches_tracked (a buffer
    # written in place), the case the cache must put back
    zoo = ZOO["cnn_bn"]
    x = zoo.example()
    model = to_torch_export(zoo.build(), x)
    batch = npz_batch(x, np.array([0, 1]))
    model_sha, batch_sha = store_blob(tmp_path, model), store_blob(tmp_path, batch)
    runner = JobRunner(lambda sha: tmp_path / sha, ModelCache(), LoadedModelCache())

    fresh = diagnose(model, batch, DiagnoseOptions.model_validate({"device": "cpu"}))
    first = _run(runner, model_sha, batch_sha, "j1")
    assert runner.loaded.misses == 1 and len(runner.loaded) == 1
    key = next(iter(runner.loaded._entries))
    cached = runner.loaded._entries[key].loaded.module
    before = _state(cached)
    second = _run(runner, model_sha, batch_sha, "j2")
    third = _run(runner, model_sha, batch_sha, "j3")

    assert runner.loaded.hits == 2 and runner.loaded.evicted_changed == 0
    assert comparable_report(first) == comparable_report(fresh.to_jsonable())
    assert comparable_report(second) == comparable_report(first) == comparable_report(third)
    # the hit is visible: no load, no conversion, and a note
    assert first["timing"]["load"] > 0
    assert second["timing"]["load"] < 1e-3 and second["timing"]["convert"] < 0.01
    assert any("worker's cache" in n for n in second["notes"])
    assert not any("worker's cache" in n for n in first["notes"])
    # the cached module is as the jobs found it
    after = _state(cached)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert all(p.grad is None for p in cached.parameters())


def test_a_cached_torchscript_graph_meeting_other_shapes_still_gives_the_fresh_report(
    tmp_path: Path,
) -> None:
    """TorchScript → FX is converted once, for the first batch; a later batch of another size
    runs on it, or (if it cannot) on a fresh load: the cache never changes the outcome."""
    zoo = ZOO["mlp"]
    x = zoo.example()
    model = to_torchscript(zoo.build(), x)
    model_sha = store_blob(tmp_path, model)
    runner = JobRunner(lambda sha: tmp_path / sha, ModelCache(), LoadedModelCache())
    small = npz_batch(x, np.zeros((x.shape[0], 4), dtype=np.float32))
    x_big = torch.randn(7, x.shape[1], generator=torch.Generator().manual_seed(3))
    big = npz_batch(x_big, np.zeros((7, 4), dtype=np.float32))
    _run(runner, model_sha, store_blob(tmp_path, small), "j1")
    report = _run(runner, model_sha, store_blob(tmp_path, big), "j2")
    fresh = diagnose(model, big, DiagnoseOptions.model_validate({"device": "cpu"}))
    assert report["batch"]["size"] == 7
    assert comparable_report(report) == comparable_report(fresh.to_jsonable())


def _linear_model(features: int) -> LoadedModel:
    return LoadedModel(format="onnx", module=nn.Linear(features, features), graph=None, inputs=[])


def _key(name: str) -> LoadedKey:
    return LoadedKey(name, "train", False, True, "cpu")


def test_loaded_cache_is_lru_within_its_parameter_byte_budget() -> None:
    one = 4 * (10 * 10 + 10)  # float32 weight + bias of Linear(10, 10)
    cache = LoadedModelCache(budget_bytes=2 * one)
    a, b, c = _linear_model(10), _linear_model(10), _linear_model(10)
    assert cache.put(_key("a"), a) and cache.put(_key("b"), b)
    assert cache.acquire(_key("a")) is a  # "a" is now the most recently used
    cache.release(_key("a"), a)
    assert cache.put(_key("c"), c)  # over budget: evicts "b"
    assert _key("b") not in cache and _key("a") in cache and _key("c") in cache
    assert cache.size_bytes == 2 * one
    assert not cache.put(_key("huge"), _linear_model(40))  # larger than the whole budget
    assert (cache.hits, cache.misses) == (1, 0)


def test_a_job_that_writes_a_parameter_evicts_the_model() -> None:
    cache = LoadedModelCache()
    model = _linear_model(3)
    cache.put(_key("m"), model)
    loaded = cache.acquire(_key("m"))
    assert loaded is model
    with torch.no_grad():
        model.module.weight.add_(1.0)  # what no job may do to a shared model
    model.module.weight.grad = torch.ones_like(model.module.weight)
    cache.release(_key("m"), model)
    assert _key("m") not in cache and cache.evicted_changed == 1
    assert model.module.weight.grad is None


def _bad_batches(x: torch.Tensor) -> dict[str, tuple[bytes, str, str]]:
    """Batches that cannot feed the model: (batch, error code, what the message must name)."""
    target = np.zeros((x.shape[0], 4), dtype=np.float32)
    missing = io.BytesIO()
    np.savez(missing, target=target)
    return {
        "wrong_shape": (npz_batch(torch.zeros(x.shape[0], 5), target), "bad_batch", "input 'x'"),
        "missing_input": (missing.getvalue(), "bad_batch", "add arrays named x"),
        "loss_mismatch": (
            npz_batch(x, target[:, :3]),
            "bad_input",
            "target shaped like the output",
        ),
    }


@pytest.mark.parametrize("fmt", ["onnx", "torch_export"])
@pytest.mark.parametrize("bad", ["wrong_shape", "missing_input", "loss_mismatch"])
def test_a_bad_batch_on_a_cached_model_fails_at_once_without_a_reload(
    tmp_path: Path, fmt: str, bad: str
) -> None:
    """The batch's fault is not the cache's: one attempt, its own error, the entry kept."""
    zoo = ZOO["mlp"]
    x = zoo.example()
    model = (
        to_onnx(zoo.build(), x, input_names=["x"])
        if fmt == "onnx"
        else to_torch_export(zoo.build(), x)
    )
    model_sha = store_blob(tmp_path, model)
    good = store_blob(tmp_path, npz_batch(x, np.zeros((x.shape[0], 4), dtype=np.float32)))
    runner = JobRunner(lambda sha: tmp_path / sha, ModelCache(), LoadedModelCache())
    _run(runner, model_sha, good, "j1")
    assert (runner.loads, runner.loaded.misses) == (1, 1)

    batch, code, named = _bad_batches(x)[bad]
    result = runner.run(
        JobRequest("j2", "diagnose", 1, model_sha, store_blob(tmp_path, batch), {"device": "cpu"})
    )
    assert not result.ok and result.error_code == code
    assert result.error_message is not None and named in result.error_message
    assert runner.loads == 1 and runner.reloads_after_failure == 0  # attempted once
    assert runner.loaded.hits == 1 and len(runner.loaded) == 1  # on the cached model, kept

    _run(runner, model_sha, good, "j3")
    assert (runner.loads, runner.loaded.hits) == (1, 2)


def test_a_job_failing_inside_a_cached_model_runs_again_on_a_fresh_load(tmp_path: Path) -> None:
    """An internal error may be the cached state's fault: the job runs once more on a fresh
    load, succeeds there, and the broken entry is replaced by the fresh one."""
    zoo = ZOO["mlp"]
    x = zoo.example()
    model_sha = store_blob(tmp_path, to_onnx(zoo.build(), x, input_names=["x"]))
    batch_sha = store_blob(tmp_path, npz_batch(x, np.zeros((x.shape[0], 4), dtype=np.float32)))
    runner = JobRunner(lambda sha: tmp_path / sha, ModelCache(), LoadedModelCache())
    first = _run(runner, model_sha, batch_sha, "j1")
    (key,) = runner.loaded._entries
    broken = runner.loaded._entries[key].loaded
    broken.graph.nodes = []  # a cached graph that lost its nodes: outputs never computed

    second = _run(runner, model_sha, batch_sha, "j2")
    assert runner.loads == 2 and runner.reloads_after_failure == 1
    assert runner.loaded._entries[key].loaded is not broken
    assert second["timing"]["load"] > 0
    assert comparable_report(second) == comparable_report(first)
