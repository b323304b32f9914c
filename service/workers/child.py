"""The worker child: a long-lived process that runs jobs one at a time.

Started by the supervisor with the `spawn` method (a fresh interpreter: no inherited database
connections, threads or CUDA state). Before torch is imported it applies its environment
(`CUDA_VISIBLE_DEVICES` pins it to its GPU, or hides every GPU for a CPU child), then imports
torch and the engine once, initialises CUDA once, and answers `ChildReady`. After that each
job costs only its own work. The child never writes job state: the supervisor does, so a child
that is killed mid-job leaves nothing half-written.

A child never outlives its supervisor: on Linux the kernel kills it when the supervisor dies
(`PR_SET_PDEATHSIG`), and elsewhere a watchdog thread exits when the parent's sentinel closes.
Otherwise a supervisor killed mid-job would leave an orphan computing past
`GRADHEALTH_JOB_TIMEOUT_S` (it ignores SIGTERM, see below) while its job waits for its lease.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
from multiprocessing.connection import Connection, wait
from typing import Any

log = logging.getLogger(__name__)


def child_main(
    conn: Connection,
    settings: Any,
    env: dict[str, str],
    torch_threads: int,
    cache_bytes: int,
    loaded_cache_bytes: int | None = None,
) -> None:
    os.environ.update(env)
    if getattr(settings, "environment", "") == "production":
        os.environ.pop("GRADHEALTH_WORKER_TEST_HOLD_S", None)  # a test hook never runs there
    # The supervisor decides when a child stops (SIGTERM goes to the whole process group from
    # a terminal or `docker stop`): the child finishes its job and is then told to exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s child %(process)d %(message)s")

    import torch

    from service.cli.diagnose import quiet_torch_logs

    quiet_torch_logs()  # a job's failure is its result's message, not tracebacks in the log
    _import_engine()
    from service.db.session import Database
    from service.storage.blobs import BlobStore
    from service.workers.loaded_cache import DEFAULT_LOADED_CACHE_BYTES, LoadedModelCache
    from service.workers.model_cache import ModelCache
    from service.workers.protocol import ChildReady, JobRequest
    from service.workers.runner import JobRunner

    torch.set_num_threads(torch_threads)
    device = "cpu"
    if torch.cuda.is_available():
        torch.cuda.init()
        device = f"cuda:0 ({torch.cuda.get_device_name(0)})"
    database = Database.from_settings(settings)
    store = BlobStore(settings, database)
    loaded = LoadedModelCache(
        DEFAULT_LOADED_CACHE_BYTES if loaded_cache_bytes is None else loaded_cache_bytes
    )
    runner = JobRunner(store.blob_path, ModelCache(cache_bytes), loaded)
    conn.send(ChildReady(pid=os.getpid(), device=device))
    try:
        while True:
            try:
                request = conn.recv()
            except EOFError:  # the supervisor is gone
                break
            if request is None:
                break
            assert isinstance(request, JobRequest)
            conn.send(runner.run(request))
    finally:
        database.dispose()


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """End this process when the process that started it dies (see the module docstring)."""
    parent = multiprocessing.parent_process()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if parent is None:
        return
    if parent.pid is not None and os.getppid() != parent.pid:
        os._exit(1)  # the parent died before the line above took effect
    sentinel = parent.sentinel
    threading.Thread(
        target=_exit_when_closed, args=(sentinel,), name="parent-watchdog", daemon=True
    ).start()


def _exit_when_closed(sentinel: int) -> None:
    wait([sentinel])
    log.warning("the supervisor (parent process) is gone: exiting")
    os._exit(1)


def _import_engine() -> None:
    """Import the engine now, not at the first job (its imports cost seconds)."""
    import importlib

    try:
        importlib.import_module("service.engine.pipeline")
    except ModuleNotFoundError as exc:
        log.warning("engine not importable yet (%s); diagnoses will fail", exc)
