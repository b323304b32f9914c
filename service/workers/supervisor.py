"""The worker supervisor: claims jobs from the queue and runs them in long-lived children.

One child process per GPU (pinned with `CUDA_VISIBLE_DEVICES`) or N CPU children. A child
initialises torch/CUDA once and runs one job at a time; the supervisor holds every database
write of job state (claim, heartbeat, result, failure), so what a child does can never leave a
row half-written.

What the supervisor guarantees, and how:
- a job that runs past `Settings.job_timeout_s` is stopped: its child is killed and replaced,
  and the job fails with `timeout` (no retry: it would time out again);
- a cancelled running job (`cancel_requested`) is stopped within `CANCEL_CHECK_INTERVAL_S`:
  child killed and replaced, status `cancelled`;
- a child that dies (segfault, OOM killer, `kill -9`) is replaced and its job goes back to the
  queue; the attempt counts, so a model that always crashes its worker ends `failed` with
  `worker_crashed` after `max_attempts`;
- leases of running jobs are renewed every `lease_s / HEARTBEATS_PER_LEASE`; a supervisor
  that dies altogether stops renewing and any other supervisor's reaper requeues its jobs;
- `stop()` (from any thread or a signal handler) stops claiming, lets running jobs finish for
  up to `grace_s`, then gives the rest back to the queue without counting the attempt; a
  second `stop()` gives them back at once.

One loop, no threads of its own: it sleeps in `multiprocessing.connection.wait` on the
children's pipes and sentinels, a self-pipe that `stop()` writes to, and (Postgres) the LISTEN
connection, so it wakes for "a child answered or died", "stop" and "a job was queued".
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from service.config import Settings
from service.db.session import Database
from service.queue import jobs
from service.queue.wakeup import POLL_INTERVAL_POSTGRES_S, POLL_INTERVAL_SQLITE_S, Listener
from service.workers.child import child_main
from service.workers.loaded_cache import DEFAULT_LOADED_CACHE_BYTES
from service.workers.model_cache import DEFAULT_MODEL_CACHE_BYTES
from service.workers.protocol import ChildReady, JobRequest, JobResult

log = logging.getLogger(__name__)

HEARTBEATS_PER_LEASE = 3  # a lease survives two lost heartbeats
CANCEL_CHECK_INTERVAL_S = 0.5
REAP_INTERVAL_S = 5.0  # how often this supervisor requeues other workers' expired leases
GRACEFUL_STOP_S = 30.0
CHILD_EXIT_TIMEOUT_S = 5.0
RESPAWN_BACKOFF_S = 1.0  # after a child died before it was ready; doubles up to the max
MAX_RESPAWN_BACKOFF_S = 30.0
IDLE_WAIT_S = 1.0


@dataclass
class Slot:
    """One child's place: its device, its process and the job it runs."""

    index: int
    label: str
    env: dict[str, str]
    torch_threads: int
    process: BaseProcess | None = None
    conn: Connection | None = None
    ready: bool = False
    device: str = ""
    worker_id: str = ""
    job: jobs.ClaimedJob | None = None
    job_started: float = 0.0
    respawn_at: float = 0.0
    respawn_backoff_s: float = RESPAWN_BACKOFF_S
    results: int = field(default=0)

    @property
    def idle(self) -> bool:
        return self.ready and self.job is None and self.process is not None


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def default_slots(cpus: int | None, gpus: list[int] | None) -> list[Slot]:
    cores = os.cpu_count() or 1
    if gpus:
        threads = max(1, cores // len(gpus))
        return [
            Slot(i, f"gpu {gpu}", {"CUDA_VISIBLE_DEVICES": str(gpu)}, threads)
            for i, gpu in enumerate(gpus)
        ]
    count = cpus or 1
    threads = max(1, cores // count)
    return [Slot(i, f"cpu {i}", {"CUDA_VISIBLE_DEVICES": ""}, threads) for i in range(count)]


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        *,
        cpus: int | None = None,
        gpus: list[int] | None = None,
        database: Database | None = None,
        grace_s: float = GRACEFUL_STOP_S,
        model_cache_bytes: int = DEFAULT_MODEL_CACHE_BYTES,
        loaded_cache_bytes: int = DEFAULT_LOADED_CACHE_BYTES,
    ) -> None:
        if cpus is not None and gpus:
            raise ValueError("give either cpus or gpus, not both")
        if cpus is not None and cpus < 1:
            raise ValueError("cpus must be at least 1")
        self.settings = settings
        self.slots = default_slots(cpus, gpus)
        # CPU children cannot run a job that asks for `device: cuda`: they leave it to GPU
        # workers (jobs.claim); "auto" and "cpu" run anywhere
        self.has_cuda = bool(gpus)
        self.grace_s = grace_s
        self.model_cache_bytes = model_cache_bytes
        self.loaded_cache_bytes = loaded_cache_bytes
        self._own_database = database is None
        self.database = database or Database.from_settings(settings)
        self._ctx = get_context("spawn")
        self._host = socket.gethostname()
        self._stop_requests = 0
        self._stop_deadline: float | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()
        self._claim_now = True
        heartbeat_s = settings.lease_s / HEARTBEATS_PER_LEASE
        self._intervals = {
            "heartbeat": heartbeat_s,
            "cancel": CANCEL_CHECK_INTERVAL_S,
            "reap": REAP_INTERVAL_S,
            "poll": POLL_INTERVAL_POSTGRES_S
            if self.database.is_postgres
            else POLL_INTERVAL_SQLITE_S,
        }
        self._last: dict[str, float] = dict.fromkeys(self._intervals, 0.0)

    # -- control (any thread, or a signal handler) ---------------------------------------------

    def start(self) -> None:
        """Run the loop in a background thread (`gradhealth serve`)."""
        self._thread = threading.Thread(target=self.run_forever, name="gradhealth-supervisor")
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming; finish or requeue running jobs. A second call requeues at once.
        Only sets a counter and writes one byte: safe in a signal handler."""
        self._stop_requests += 1
        # A full or closed pipe is fine: the loop is awake or gone anyway.
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"s")

    def join(self, timeout: float | None = None) -> bool:
        """Wait for `run_forever` to return; True if it did."""
        return self._finished.wait(timeout)

    def children(self) -> list[dict[str, Any]]:
        """A snapshot for tests and logs: label, pid, device, running job id."""
        return [
            {
                "label": s.label,
                "pid": s.process.pid if s.process is not None else None,
                "ready": s.ready,
                "device": s.device,
                "job_id": s.job.id if s.job is not None else None,
            }
            for s in self.slots
        ]

    # -- the loop ------------------------------------------------------------------------------

    def run_forever(self) -> None:
        self._finished.clear()
        listener = None
        if self.database.is_postgres:
            listener = Listener(self.database.engine.url.render_as_string(hide_password=False))
        try:
            for slot in self.slots:
                self._spawn(slot)
            while not self._guarded_loop_once(listener):
                pass
        finally:
            self._shutdown_children()
            if listener is not None:
                listener.close()
            if self._own_database:
                self.database.dispose()
            self._finished.set()
            log.info("supervisor stopped")

    def _guarded_loop_once(self, listener: Listener | None) -> bool:
        """A defect in one turn must not stop the pool: log it, pause, go on."""
        try:
            return self._loop_once(listener)
        except Exception:
            log.exception("supervisor loop failed; continuing in %.0f s", IDLE_WAIT_S)
            time.sleep(IDLE_WAIT_S)
            return False

    def _loop_once(self, listener: Listener | None) -> bool:
        """One turn; True when the supervisor is done."""
        now = time.monotonic()
        self._collect_messages()
        self._reap_dead_children(now)
        self._enforce_timeouts(now)
        if self._due("cancel", now):
            self._stop_cancelled()
        if self._due("heartbeat", now):
            self._heartbeat()
        if self._due("reap", now):
            self._db_call(jobs.requeue_expired)
        if self._stop_requests:
            if self._stop_deadline is None:
                self._stop_deadline = now + self.grace_s
                log.info("stopping: running jobs get %.0f s to finish", self.grace_s)
            busy = [s for s in self.slots if s.job is not None]
            if not busy:
                return True
            if self._stop_requests > 1 or now >= self._stop_deadline:
                for slot in busy:
                    self._give_back(slot)
                return True
        else:
            self._respawn_due(now)
            if self._claim_now or self._due("poll", now):
                self._claim_now = False
                self._dispatch()
        self._wait(listener)
        return False

    def _due(self, what: str, now: float) -> bool:
        if now - self._last[what] >= self._intervals[what]:
            self._last[what] = now
            return True
        return False

    def _wait(self, listener: Listener | None) -> None:
        waitables: list[Any] = [self._wake_r]
        for slot in self.slots:
            if slot.process is not None and slot.conn is not None:
                waitables += [slot.conn, slot.process.sentinel]
        fileno = listener.fileno() if listener is not None else None
        if fileno is not None:
            waitables.append(fileno)
        # Sleep exactly until the next periodic duty, so that a poll is never a tick late.
        duties = ["reap"]
        if any(s.job is not None for s in self.slots):
            duties += ["cancel", "heartbeat"]
        if any(s.idle for s in self.slots) and not self._stop_requests:
            duties.append("poll")
        now = time.monotonic()
        timeout = min(self._last[d] + self._intervals[d] - now for d in duties)
        ready = wait(waitables, timeout=min(IDLE_WAIT_S, max(0.0, timeout)))
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        heard = listener is not None and (fileno is None or fileno in ready)
        if heard and listener is not None and listener.drain().new_job:
            self._claim_now = True

    # -- children ------------------------------------------------------------------------------

    def _spawn(self, slot: Slot) -> None:
        parent_conn, child_conn = self._ctx.Pipe()
        process = self._ctx.Process(
            target=child_main,
            args=(
                child_conn,
                self.settings,
                slot.env,
                slot.torch_threads,
                self.model_cache_bytes,
                self.loaded_cache_bytes,
            ),
            name=f"gradhealth-worker-{slot.label}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        slot.process, slot.conn, slot.ready = process, parent_conn, False
        slot.worker_id = f"{self._host}:{os.getpid()}/{process.pid}"
        log.info("started child %s for %s", process.pid, slot.label)

    def _respawn_due(self, now: float) -> None:
        for slot in self.slots:
            if slot.process is None and now >= slot.respawn_at:
                self._spawn(slot)

    def _retire(self, slot: Slot, *, kill: bool) -> None:
        """Forget a slot's child (killing it first if asked); it is replaced by `_respawn_due`."""
        if slot.process is not None and kill and slot.process.is_alive():
            slot.process.kill()
            slot.process.join(CHILD_EXIT_TIMEOUT_S)
        if slot.conn is not None:
            slot.conn.close()
        if not slot.ready:  # died while starting: do not spin on a child that cannot start
            slot.respawn_at = time.monotonic() + slot.respawn_backoff_s
            slot.respawn_backoff_s = min(MAX_RESPAWN_BACKOFF_S, slot.respawn_backoff_s * 2)
        else:
            slot.respawn_at = 0.0
        slot.process, slot.conn, slot.ready, slot.job = None, None, False, None

    def _collect_messages(self) -> None:
        for slot in self.slots:
            self._receive(slot)

    def _receive(self, slot: Slot) -> None:
        """Handle every message the slot's child has written so far."""
        while slot.conn is not None and slot.process is not None:
            try:
                if not slot.conn.poll():
                    break
                message = slot.conn.recv()
            except (EOFError, OSError):
                break  # the child died: `_reap_dead_children` handles it
            if isinstance(message, ChildReady):
                slot.ready, slot.device = True, message.device
                slot.respawn_backoff_s = RESPAWN_BACKOFF_S
                self._claim_now = True
                log.info("child %s ready on %s", message.pid, message.device)
            elif isinstance(message, JobResult) and slot.job is not None:
                job, slot.job = slot.job, None
                slot.results += 1
                self._record_result(job, message)
                self._claim_now = True

    def _reap_dead_children(self, now: float) -> None:
        for slot in self.slots:
            if slot.process is None or slot.process.is_alive():
                continue
            # A child that sent its result and then died (in its exit, say) between
            # `_collect_messages` and here: the result is in the pipe, record it rather than
            # count a crash against a job that finished.
            self._receive(slot)
            reason = describe_exit(slot.process.exitcode)
            job = slot.job
            log.warning("child %s (%s) died: %s", slot.process.pid, slot.label, reason)
            self._retire(slot, kill=False)
            if job is not None:
                self._db_call(
                    jobs.fail,
                    job.id,
                    code=jobs.ERROR_WORKER_CRASHED,
                    message=f"the worker process running the job died ({reason})",
                    retry=True,
                )

    def _enforce_timeouts(self, now: float) -> None:
        limit = self.settings.job_timeout_s
        for slot in self.slots:
            if slot.job is None or now - slot.job_started <= limit:
                continue
            job = slot.job
            log.warning("job %s ran past %.0f s: stopping it", job.id, limit)
            self._retire(slot, kill=True)
            self._db_call(
                jobs.fail,
                job.id,
                code=jobs.ERROR_TIMEOUT,
                message=(
                    f"the job ran longer than GRADHEALTH_JOB_TIMEOUT_S={limit:g} s and was "
                    "stopped; send a smaller batch or raise the limit"
                ),
            )

    def _shutdown_children(self) -> None:
        for slot in self.slots:
            if slot.conn is not None and slot.process is not None and slot.process.is_alive():
                with contextlib.suppress(OSError):
                    slot.conn.send(None)
        for slot in self.slots:
            if slot.process is not None:
                slot.process.join(CHILD_EXIT_TIMEOUT_S)
                self._retire(slot, kill=True)

    # -- jobs ----------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        for slot in self.slots:
            if not slot.idle:
                continue
            job = self._claim(slot)
            if job is None:
                return
            assert slot.conn is not None
            slot.job, slot.job_started = job, time.monotonic()
            request = JobRequest(
                job_id=job.id,
                kind=job.kind,
                attempt=job.attempts,
                model_sha256=job.model_sha256,
                batch_sha256=job.batch_sha256,
                options=job.options,
            )
            # If the child just died, `_reap_dead_children` requeues the job.
            with contextlib.suppress(OSError):
                slot.conn.send(request)
            log.info("job %s (%s, attempt %d) → %s", job.id, job.kind, job.attempts, slot.label)

    def _claim(self, slot: Slot) -> jobs.ClaimedJob | None:
        try:
            # SQLite: a read first (no write lock; see service/db/session.py), the claim only
            # when there is something to take.
            with self.database.session(read_only=True) as session:
                if not self.database.is_postgres and not jobs.has_available(
                    session, cuda=self.has_cuda
                ):
                    return None
            with self.database.session() as session:
                job = jobs.claim(
                    session, slot.worker_id, lease_s=self.settings.lease_s, cuda=self.has_cuda
                )
                session.commit()
                return job
        except SQLAlchemyError as exc:
            log.warning("cannot claim (%s); retrying at the next poll", exc)
            return None

    def _record_result(self, job: jobs.ClaimedJob, result: JobResult) -> None:
        def record(session: Any) -> None:
            if not result.ok:
                jobs.fail(
                    session,
                    job.id,
                    code=result.error_code or jobs.ERROR_INTERNAL,
                    message=result.error_message or "the job failed",
                )
                return
            if job.kind == jobs.KIND_INSPECT:
                written = jobs.complete_inspection(session, job.id, result.model_info or {})
            else:
                written = jobs.complete(
                    session, job.id, report=result.report or {}, verdict=result.verdict
                )
            if not written and jobs.cancelled_among(session, [job.id]):
                jobs.finish_cancelled(session, job.id)

        self._db_call(record)
        log.info("job %s done: %s", job.id, "ok" if result.ok else result.error_code)

    def _running(self) -> dict[str, Slot]:
        return {s.job.id: s for s in self.slots if s.job is not None}

    def _stop_cancelled(self) -> None:
        running = self._running()
        if not running:
            return
        cancelled = self._db_call(jobs.cancelled_among, list(running), read_only=True)
        for job_id in cancelled or ():
            log.info("job %s cancelled: stopping it", job_id)
            self._retire(running[job_id], kill=True)
            self._db_call(jobs.finish_cancelled, job_id)

    def _heartbeat(self) -> None:
        for slot in self.slots:
            if slot.job is None:
                continue
            result = self._db_call(
                jobs.heartbeat, slot.worker_id, [slot.job.id], lease_s=self.settings.lease_s
            )
            if result is not None and slot.job.id not in result.renewed | result.stop:
                log.warning(
                    "job %s: lease lost (requeued elsewhere); finishing it anyway", slot.job.id
                )

    def _give_back(self, slot: Slot) -> None:
        job = slot.job
        self._retire(slot, kill=True)
        if job is not None:
            self._db_call(jobs.requeue, job.id, reason="the worker shut down; the job was requeued")
            log.info("job %s given back to the queue", job.id)

    def _db_call(self, fn: Any, *args: Any, read_only: bool = False, **kwargs: Any) -> Any:
        """`fn(session, ...)` in its own committed transaction. A database error is logged, not
        raised: the loop must go on, and every write here is safe to lose (an unrenewed lease
        expires, an unrecorded result is recomputed)."""
        try:
            with self.database.session(read_only=read_only) as session:
                value = fn(session, *args, **kwargs)
                if not read_only:
                    session.commit()
                return value
        except SQLAlchemyError as exc:
            log.error("database call %s failed: %s", getattr(fn, "__name__", fn), exc)
            return None
