"""Running one job inside a worker child: fetch the inputs, call the engine, shape the result.

Errors: a `GradhealthError` from the engine (bad model, bad batch, unsupported op) fails the
job with its code and message, without a retry (the same inputs give the same error). Any
other exception fails it as `internal_error`: the child survived, so it is not a crash.

CUDA out-of-memory: the pass is retried with the batch split into twice as many micro-batches
(gradient accumulation, `DiagnoseOptions.micro_batches`) up to `MAX_OOM_MICRO_BATCHES`; the
report's `micro_batches` and `notes` say so. Only then does the job fail (`out_of_memory`).

Test hook (tests only, documented in README "Workers and scaling"): with the environment
variable `GRADHEALTH_WORKER_TEST_HOLD_S=<seconds>` a child pauses that long after fetching the
inputs of a job's FIRST attempt, so that end-to-end tests can kill, time out or cancel a job
while it runs without depending on how fast the machine is. Unset, it does nothing.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.errors import BadInputError, BatchError, GradhealthError
from service.queue.jobs import CUDA_WAIT_S, ERROR_INTERNAL, KIND_INSPECT
from service.workers.loaded_cache import LoadedKey, LoadedModelCache
from service.workers.model_cache import ModelCache
from service.workers.protocol import JobRequest, JobResult

log = logging.getLogger(__name__)

MAX_OOM_MICRO_BATCHES = 64
ERROR_OUT_OF_MEMORY = "out_of_memory"
TEST_HOLD_ENV = "GRADHEALTH_WORKER_TEST_HOLD_S"


class OutOfMemoryFailure(GradhealthError):
    code = ERROR_OUT_OF_MEMORY
    status = 422


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _release_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def diagnose_with_oom_retry(
    run: Callable[[Any], Any],
    options: Any,
    *,
    max_micro_batches: int = MAX_OOM_MICRO_BATCHES,
    on_oom: Callable[[], None] | None = None,
) -> Any:
    """`run(options) -> Report`; on out-of-memory, retry with twice the micro-batches
    (`on_oom()` first frees what the caller can)."""
    notes: list[str] = []
    while True:
        try:
            report = run(options)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if on_oom is not None:
                on_oom()
            _release_device_memory()
            tried = options.micro_batches
            if tried * 2 > max_micro_batches:
                raise OutOfMemoryFailure(
                    f"the device ran out of memory even with the batch split into {tried} "
                    "micro-batches; send a smaller batch or use a device with more memory"
                ) from exc
            notes.append(
                f"the device ran out of memory with micro_batches={tried}; "
                f"retried with micro_batches={tried * 2} (gradient accumulation)"
            )
            log.warning("job out of memory with micro_batches=%d; retrying", tried)
            options = options.model_copy(update={"micro_batches": tried * 2})
            continue
        if notes:
            report.notes.extend(notes)
            report.micro_batches = options.micro_batches
        return report


def inspect_model(data: bytes) -> dict[str, Any]:
    """Format, declared inputs/outputs and trainable parameter count of an uploaded model,
    through the engine's own loader (no batch, no conversion check: this is metadata).

    Inputs and outputs are CONTRACT §4's (name, shape, dtype), as far as the file declares
    them: ONNX and torch.export declare all three (a dynamic dim is its symbol's name, an
    unnamed one None). TorchScript declares only the names of its inputs and the number of
    its outputs: their `shape` and `dtype` are None (unknown), never a made-up value."""
    from service.engine.options import DiagnoseOptions
    from service.engine.subject import load_model

    options = DiagnoseOptions.model_validate({"device": "cpu", "check_conversion": False})
    loaded = load_model(data, options)
    parameters = [p for p in loaded.module.parameters() if p.requires_grad]
    inputs = [spec.model_dump(mode="json") for spec in loaded.inputs]
    outputs = [spec.model_dump(mode="json") for spec in loaded.outputs]
    if loaded.format == "torchscript":
        inputs = [{"name": spec.name, "shape": None, "dtype": None} for spec in loaded.inputs]
        outputs = [
            {"name": name, "shape": None, "dtype": None}
            for name in torchscript_output_names(loaded.source)
        ]
    return {
        "format": loaded.format,
        "inputs": inputs,
        "outputs": outputs,
        "parameter_count": int(sum(p.numel() for p in parameters)),
    }


def torchscript_output_names(module: Any) -> list[str]:
    """`output` for a forward returning one tensor, `output_0`, `output_1`, ... for a tuple:
    the schema gives the count, TorchScript keeps no output names."""
    try:
        returns = module.forward.schema.returns
    except (AttributeError, RuntimeError):
        return []
    if len(returns) != 1:
        return [f"output_{i}" for i in range(len(returns))]
    kind = returns[0].type
    elements = kind.elements() if hasattr(kind, "elements") and kind.kind() == "TupleType" else []
    return [f"output_{i}" for i in range(len(elements))] if elements else ["output"]


def worker_device(options: Any) -> tuple[Any, str | None]:
    """The device a job asks for, as this child can give it.

    A child sees one GPU at most (pinned with CUDA_VISIBLE_DEVICES), so `cuda:N` means "a GPU"
    here: it runs on this child's (with a note). A child without CUDA gets a `cuda` job only
    after it waited `CUDA_WAIT_S` for a GPU worker (jobs.claim): it fails, saying so."""
    import torch

    spec = str(options.device or "auto").strip().lower()
    if not spec.startswith("cuda"):
        return options, None
    if not torch.cuda.is_available():
        raise BadInputError(
            f"the job asks for device {options.device!r}, but no GPU worker took it within "
            f"{CUDA_WAIT_S:g} s and this worker has no GPU; start `gradhealth worker --gpus ...` "
            "against this database, or send device auto or cpu"
        )
    if spec in ("cuda", "cuda:0") or torch.cuda.device_count() > 1:
        return options, None
    note = (
        f"device {options.device!r} ran on this worker's GPU ({torch.cuda.get_device_name(0)}): "
        "each worker child is pinned to one GPU"
    )
    return options.model_copy(update={"device": "cuda"}), note


class JobRunner:
    """Lives as long as its child; `blob_path(sha256) -> Path` reads uploads (BlobStore).

    `models` keeps serialized bytes (saves the database read), `loaded` keeps loaded models
    (saves parsing and converting; see loaded_cache.py)."""

    def __init__(
        self,
        blob_path: Callable[[str], Path],
        models: ModelCache,
        loaded: LoadedModelCache | None = None,
    ) -> None:
        self.blob_path = blob_path
        self.models = models
        self.loaded = loaded if loaded is not None else LoadedModelCache()
        self.loads = 0  # models loaded from their bytes (cache misses and reloads)
        self.reloads_after_failure = 0  # jobs run again on a fresh load after failing cached

    def model_bytes(self, sha256: str) -> bytes:
        data = self.models.get(sha256)
        if data is None:
            data = self.blob_path(sha256).read_bytes()
            self.models.put(sha256, data)
        return data

    def run(self, request: JobRequest) -> JobResult:
        started = time.perf_counter()
        try:
            return self._run(request)
        except GradhealthError as exc:
            return JobResult(
                request.job_id, ok=False, error_code=exc.code, error_message=exc.message
            )
        except Exception as exc:
            log.error("job %s failed:\n%s", request.job_id, traceback.format_exc())
            return JobResult(
                request.job_id,
                ok=False,
                error_code=ERROR_INTERNAL,
                error_message=f"internal error in the worker: {type(exc).__name__}: {exc}",
                engine_s=time.perf_counter() - started,
            )

    def _run(self, request: JobRequest) -> JobResult:
        model = self.model_bytes(request.model_sha256)
        batch_path = None if request.batch_sha256 is None else self.blob_path(request.batch_sha256)
        _test_hold(request)
        started = time.perf_counter()
        if request.kind == KIND_INSPECT:
            info = inspect_model(model)
            return JobResult(
                request.job_id, ok=True, model_info=info, engine_s=time.perf_counter() - started
            )
        if batch_path is None:
            raise GradhealthError("a diagnosis needs a batch", code="bad_batch", status=422)

        from service.engine.options import DiagnoseOptions

        options, device_note = worker_device(DiagnoseOptions.model_validate(request.options))
        report = self.diagnose(request.model_sha256, model, batch_path, options)
        if device_note:
            report.notes.append(device_note)
        return JobResult(
            request.job_id,
            ok=True,
            report=report.to_jsonable(),
            verdict=report.verdict,
            engine_s=time.perf_counter() - started,
        )

    def diagnose(self, sha256: str, model: bytes, batch: Path | bytes, options: Any) -> Any:
        """`engine.diagnose` on this child's cached LoadedModel of `model` (loaded on a miss).

        On a miss the load is timed here and written into the report's `timing.load` (the
        engine sees a pre-loaded model); on a hit `timing.load` is ~0 and a note says so. A job
        that fails on a cached model is run once more on a fresh load only when the failure
        could be the cached model's fault (`worth_a_fresh_load`): the cache must never change an
        outcome (e.g. a TorchScript graph converted for the first batch's shapes meeting a batch
        of other shapes), but a batch that cannot feed the model fails at once, with its own
        error, not after a second load and run."""
        from service.engine.pipeline import diagnose
        from service.engine.subject import load_model, pick_device

        key = LoadedKey(
            sha256=sha256,
            mode=options.mode,
            dropout=bool(options.dropout),
            check_conversion=bool(options.check_conversion),
            device=str(pick_device(options.device)),
        )
        loaded = self.loaded.acquire(key)
        if loaded is not None:
            try:
                report = self._diagnose_on(key, loaded, model, batch, options, diagnose)
            except Exception as exc:
                if not worth_a_fresh_load(exc, loaded):
                    raise
                log.warning("job on cached model %s failed (%s); reloading", sha256[:12], exc)
                self.loaded.discard(key)
                self.reloads_after_failure += 1
            else:
                report.notes.append(
                    f"model reused from this worker's cache of loaded models (sha256 "
                    f"{sha256[:12]}…): no load or conversion in this job's timing"
                )
                return report
        started = time.perf_counter()
        loaded = load_model(model, options)
        load_s = time.perf_counter() - started
        self.loads += 1
        self.loaded.put(key, loaded)
        report = self._diagnose_on(key, loaded, model, batch, options, diagnose)
        report.timing.load = load_s
        report.timing.total += load_s
        return report

    def _diagnose_on(
        self,
        key: LoadedKey,
        loaded: Any,
        model: bytes,
        batch: Path | bytes,
        options: Any,
        diagnose: Callable[..., Any],
    ) -> Any:
        def on_oom() -> None:
            self.loaded.clear_except(key)  # other cached models hold device memory

        # ONNX: the onnxruntime session of the conformance check, kept with the cache entry
        # (None when the model is not kept: then the check builds one for this job only)
        reference = self.loaded.conformance_reference(key)
        try:
            return diagnose_with_oom_retry(
                lambda opts: diagnose(
                    model, batch, opts, loaded=loaded, conformance_reference=reference
                ),
                options,
                on_oom=on_oom,
            )
        finally:
            self.loaded.release(key, loaded)


def worth_a_fresh_load(exc: BaseException, loaded: Any) -> bool:
    """Whether a job that failed on a cached model could succeed (or fail otherwise) on a
    fresh load of the same file, so that running it again is worth a load and a second run.

    - Out of memory after every micro-batch split (`OutOfMemoryFailure`): no; a fresh copy
      needs the same memory.
    - `BatchError` (code `bad_batch`: the batch file unreadable, an input missing, a shape or
      dtype that does not fit the inputs the FILE declares): no; nothing cached takes part.
    - Any other error about the user's input (`GradhealthError` with a 4xx status: the model
      failing to run on the batch's shapes, a target that does not fit the output for the
      loss, an option): no for ONNX and torch.export, whose cached model is the file's and
      nothing else (jobs leave it as they found it, loaded_cache.py). Yes for TorchScript: its
      FX graph was converted once, for the batch of the model's first job, and may be
      specialised to that batch's shapes; a fresh load converts it for this batch.
    - Anything else (an internal error, a 5xx): yes; the cached state may be what broke.
    """
    if isinstance(exc, (OutOfMemoryFailure, BatchError)):
        return False
    if isinstance(exc, GradhealthError) and exc.is_client_error:
        return bool(getattr(loaded, "format", None) == "torchscript")
    return True


def _test_hold(request: JobRequest) -> None:
    hold = os.environ.get(TEST_HOLD_ENV)
    if hold and request.attempt == 1:
        log.warning("%s=%s: holding job %s (tests only)", TEST_HOLD_ENV, hold, request.job_id)
        time.sleep(float(hold))
