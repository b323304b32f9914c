"""The pieces a worker child is made of, without processes: the model cache, the CUDA
out-of-memory policy (retry with more micro-batches, say so in the report) and which failures
on a cached model are worth a fresh load."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from service.engine.formats.loaded import LoadedModel
from service.engine.options import DiagnoseOptions
from service.engine.report import Environment, LossInfo, ModelInfo, Report
from service.errors import BadInputError, BatchError, GradhealthError
from service.workers.model_cache import ModelCache
from service.workers.runner import (
    OutOfMemoryFailure,
    diagnose_with_oom_retry,
    inspect_model,
    is_out_of_memory,
    worth_a_fresh_load,
)


def a_report(micro_batches: int) -> Report:
    return Report(
        model=ModelInfo(format="onnx", sha256="0" * 64),
        loss=LossInfo(kind="mse", value=1.0),
        device="cuda:0",
        micro_batches=micro_batches,
        environment=Environment(gradhealth="test", torch=torch.__version__, device_name="gpu"),
    )


class RunsOutOfMemoryBelow:
    """The engine's behaviour under memory pressure: OOM until the batch is split enough."""

    def __init__(self, needed_micro_batches: int) -> None:
        self.needed = needed_micro_batches
        self.tried: list[int] = []

    def __call__(self, options: Any) -> Report:
        self.tried.append(options.micro_batches)
        if options.micro_batches < self.needed:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return a_report(options.micro_batches)


def test_out_of_memory_is_retried_with_twice_the_micro_batches() -> None:
    run = RunsOutOfMemoryBelow(4)
    report = diagnose_with_oom_retry(run, DiagnoseOptions.model_validate({}))
    assert run.tried == [1, 2, 4]
    assert report.micro_batches == 4
    assert len(report.notes) == 2 and "micro_batches=4" in report.notes[-1]


def test_out_of_memory_gives_up_past_the_limit() -> None:
    run = RunsOutOfMemoryBelow(1000)
    with pytest.raises(OutOfMemoryFailure, match="8 micro-batches"):
        diagnose_with_oom_retry(run, DiagnoseOptions.model_validate({}), max_micro_batches=8)
    assert run.tried == [1, 2, 4, 8]


def test_other_errors_are_not_retried() -> None:
    def broken(options: Any) -> Report:
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        diagnose_with_oom_retry(broken, DiagnoseOptions.model_validate({}))
    assert not is_out_of_memory(ValueError("out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))


def test_model_cache_evicts_least_recently_used_within_its_budget() -> None:
    cache = ModelCache(budget_bytes=10)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.get("a") == b"1234"  # "a" is now the most recently used
    cache.put("c", b"1234")  # 12 bytes > 10: evicts "b"
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.size_bytes == 8
    cache.put("huge", b"x" * 11)  # larger than the whole budget: not kept
    assert "huge" not in cache and len(cache) == 2
    assert (cache.hits, cache.misses) == (1, 0)


class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 3)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(features)
        return h.relu(), h.sum(dim=1)


def test_torchscript_inspection_says_what_it_knows_and_marks_the_rest_unknown() -> None:
    from tests.support.export import to_onnx, to_torchscript

    example = torch.randn(2, 4)
    scripted = inspect_model(to_torchscript(TwoHeads(), example))
    assert scripted["format"] == "torchscript"
    assert scripted["inputs"] == [{"name": "features", "shape": None, "dtype": None}]
    assert scripted["outputs"] == [
        {"name": "output_0", "shape": None, "dtype": None},
        {"name": "output_1", "shape": None, "dtype": None},
    ]
    assert scripted["parameter_count"] == 4 * 3 + 3
    # a format that declares shapes and dtypes keeps them
    onnx_info = inspect_model(to_onnx(TwoHeads(), example, input_names=["features"]))
    assert onnx_info["inputs"][0]["shape"] == [2, 4]
    assert onnx_info["inputs"][0]["dtype"] == "float32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a worker without a GPU does")
def test_a_cuda_job_on_a_worker_without_gpu_fails_saying_why() -> None:
    from service.errors import BadInputError
    from service.workers.runner import worker_device

    options = DiagnoseOptions.model_validate({"device": "auto"})
    assert worker_device(options) == (options, None)
    with pytest.raises(BadInputError, match="no GPU worker took it within"):
        worker_device(DiagnoseOptions.model_validate({"device": "cuda"}))


@pytest.mark.parametrize(
    ("error", "fmt", "reload"),
    [
        (BatchError("input 'x' expects shape [3, 8]"), "torchscript", False),
        (BadInputError("loss 'mse' needs a target shaped like the output"), "onnx", False),
        (BadInputError("loss 'mse' needs a target shaped like the output"), "torch_export", False),
        # TorchScript's cached FX graph was converted for an earlier batch's shapes
        (BadInputError("running the model on the batch failed"), "torchscript", True),
        (OutOfMemoryFailure("even with 64 micro-batches"), "onnx", False),
        (KeyError("node_output"), "onnx", True),
        (GradhealthError("internal"), "torch_export", True),
    ],
)
def test_a_fresh_load_is_tried_only_where_the_cached_model_could_be_at_fault(
    error: Exception, fmt: str, reload: bool
) -> None:
    module = nn.Linear(2, 2)
    loaded = LoadedModel(format=fmt, module=module, graph=None, inputs=[])  # type: ignore[arg-type]
    assert worth_a_fresh_load(error, loaded) is reload
