"""A background job runner: one queue, a fixed number of worker threads, cooperative cancel.

No gradio here. A job is a function `fn(ctx: JobContext) -> result`. The function reports progress
through `ctx` and checks `ctx.should_stop()` between steps; the UI reads `snapshot()` copies and
never touches a running job's objects. States: queued -> running -> done | failed | cancelled.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fusegpt_core.errors import Cancelled, FuseGPTError

log = logging.getLogger("fusegpt.app.jobs")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


@dataclass
class JobSnapshot:
    """A frozen copy of a job's visible state, safe to read from any thread."""

    id: int
    owner: str
    kind: str
    title: str
    status: str
    position: int
    """0 while running, n for the n-th job waiting in the queue, -1 when finished."""
    stage: str
    message: str
    step: int
    total: int
    eta_s: float | None
    elapsed_s: float
    error: str
    stop_requested: bool
    live: dict[str, Any]
    live_version: int
    log: list[str]

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class JobContext:
    """What a job function sees: progress reporting, live data and the stop flag."""

    def __init__(self, job: Job):
        self._job = job

    def should_stop(self) -> bool:
        return self._job.stop_event.is_set()

    def check(self) -> None:
        """Raise Cancelled when a stop was requested; call between steps."""
        if self.should_stop():
            raise Cancelled("stopped by the user; the original model is unchanged.")

    def stage(self, stage: str, message: str = "") -> None:
        with self._job.lock:
            self._job.stage, self._job.message = stage, message or stage
            self._job.step, self._job.total = 0, 0
            self._job.stage_started = time.monotonic()
            self._job.eta_s = None
            self._job.append_log(f"[{stage}] {message}" if message else f"[{stage}]")

    def progress(self, step: int, total: int, message: str | None = None) -> None:
        with self._job.lock:
            self._job.step, self._job.total = int(step), int(total)
            if message is not None:
                self._job.message = message
            if self._job.eta_override is None and total > 0 and step > 0:
                spent = time.monotonic() - self._job.stage_started
                self._job.eta_s = spent / step * max(total - step, 0)

    def set_eta(self, seconds: float | None) -> None:
        """An overall estimate from the job itself; replaces the per-stage extrapolation."""
        with self._job.lock:
            self._job.eta_override = seconds
            self._job.eta_set_at = time.monotonic()

    def log(self, line: str) -> None:
        with self._job.lock:
            self._job.append_log(line)

    def update_live(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """Mutate the job's live data (plot series, counters) under its lock."""
        with self._job.lock:
            fn(self._job.live)
            self._job.live_version += 1

    def set_live(self, key: str, value: Any) -> None:
        self.update_live(lambda live: live.__setitem__(key, value))


@dataclass(eq=False)
class Job:
    id: int
    owner: str
    kind: str
    title: str
    fn: Callable[[JobContext], Any] | None
    status: str = QUEUED
    stage: str = "queued"
    message: str = ""
    step: int = 0
    total: int = 0
    eta_s: float | None = None
    eta_override: float | None = None
    eta_set_at: float = 0.0
    error: str = ""
    result: Any = None
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished_at: float | None = None
    stage_started: float = field(default_factory=time.monotonic)
    live: dict[str, Any] = field(default_factory=dict)
    live_version: int = 0
    logs: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200))
    stop_event: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done_event: threading.Event = field(default_factory=threading.Event)

    def append_log(self, line: str) -> None:
        self.logs.append(f"{time.strftime('%H:%M:%S')} {line}")


class JobRunner:
    """One FIFO queue served by `workers` threads (1 by default: heavy jobs never overlap)."""

    def __init__(self, workers: int = 1, keep_finished: int = 200, on_finish: Callable[[Job], None] | None = None):
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._keep_finished = keep_finished
        self._on_finish = on_finish
        self._closed = False
        self._threads = [
            threading.Thread(target=self._worker, name=f"fusegpt-job-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # ---- submitting and controlling --------------------------------------------------------

    def submit(self, fn: Callable[[JobContext], Any], *, owner: str, kind: str, title: str = "") -> int:
        with self._cond:
            if self._closed:
                raise RuntimeError("the job runner is shut down")
            job = Job(id=next(self._ids), owner=owner, kind=kind, title=title or kind, fn=fn)
            job.append_log(f"queued: {job.title}")
            self._jobs[job.id] = job
            self._queue.append(job)
            self._cond.notify()
            self._forget_old()
            return job.id

    def cancel(self, job_id: int) -> bool:
        """Stop a job: a queued one never starts, a running one stops at its next check.

        Returns False when the job is unknown or already finished."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.status in FINISHED:
                return False
            job.stop_event.set()
            if job.status == QUEUED:
                self._queue.remove(job)
                self._finish(job, CANCELLED, "cancelled before it started.")
            else:
                with job.lock:
                    job.message = "stopping after the current step..."
                    job.append_log("stop requested")
            return True

    def cancel_owner(self, owner: str) -> int:
        """Cancel every unfinished job of one owner (a session that went away)."""
        with self._cond:
            ids = [j.id for j in self._jobs.values() if j.owner == owner and j.status not in FINISHED]
        return sum(self.cancel(i) for i in ids)

    def wait(self, job_id: int, timeout: float | None = None) -> JobSnapshot:
        job = self._jobs[job_id]
        job.done_event.wait(timeout)
        return self.snapshot(job_id)

    def shutdown(self, cancel: bool = True, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            jobs = list(self._jobs.values())
            self._cond.notify_all()
        if cancel:
            for j in jobs:
                self.cancel(j.id)
        for t in self._threads:
            t.join(timeout)

    # ---- reading ---------------------------------------------------------------------------

    def result(self, job_id: int) -> Any:
        job = self._jobs.get(job_id)
        return None if job is None else job.result

    def position(self, job_id: int) -> int:
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.status in FINISHED:
                return -1
            if job.status == RUNNING:
                return 0
            return self._queue.index(job) + 1

    def snapshot(self, job_id: int) -> JobSnapshot | None:
        position = self.position(job_id)
        job = self._jobs.get(job_id)
        if job is None:
            return None
        with job.lock:
            now = time.monotonic()
            elapsed = (job.finished_at or now) - job.started if job.started else 0.0
            eta = job.eta_s
            if job.eta_override is not None:  # past its own estimate a job says nothing rather than "0 s"
                left = job.eta_override - (now - job.eta_set_at)
                eta = left if left > 0 else None
            return JobSnapshot(
                id=job.id,
                owner=job.owner,
                kind=job.kind,
                title=job.title,
                status=job.status,
                position=position,
                stage=job.stage,
                message=job.message,
                step=job.step,
                total=job.total,
                eta_s=None if job.status in FINISHED else eta,
                elapsed_s=elapsed,
                error=job.error,
                stop_requested=job.stop_event.is_set(),
                live=_copy_live(job.live),
                live_version=job.live_version,
                log=list(job.logs),
            )

    def jobs_of(self, owner: str) -> list[JobSnapshot]:
        with self._cond:
            ids = [j.id for j in self._jobs.values() if j.owner == owner]
        return [s for s in (self.snapshot(i) for i in ids) if s is not None]

    def queue_length(self) -> int:
        with self._cond:
            return len(self._queue)

    # ---- worker ----------------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
                job = self._queue.popleft()
                job.status, job.started = RUNNING, time.monotonic()
                job.stage_started = job.started
                job.stage = "starting"
            ctx = JobContext(job)
            status, error, result = DONE, "", None
            try:
                result = job.fn(ctx)
            except Cancelled as e:
                status, error = CANCELLED, str(e)
            except FuseGPTError as e:
                status, error = FAILED, str(e)
            except Exception as e:  # an unexpected bug: one line to the user, traceback to the log
                status, error = FAILED, f"internal error ({type(e).__name__}): {e}"
                log.error("job %s (%s) failed:\n%s", job.id, job.kind, traceback.format_exc())
            with self._cond:
                job.result = result
                self._finish(job, status, error)

    def _finish(self, job: Job, status: str, error: str) -> None:
        with job.lock:
            job.status, job.error = status, error
            job.finished_at = time.monotonic()
            job.fn = None  # drop the closure: arguments such as a hub token must not outlive the call
            job.stage = status
            if status == DONE:
                job.message = "finished"
            elif error:
                job.message = error
            job.append_log(f"{status}{': ' + error if error else ''}")
        job.done_event.set()
        if self._on_finish is not None:
            try:
                self._on_finish(job)
            except Exception:
                log.exception("on_finish callback failed")

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.status in FINISHED]
        for j in finished[: max(len(finished) - self._keep_finished, 0)]:
            del self._jobs[j.id]


def _copy_live(live: dict[str, Any]) -> dict[str, Any]:
    """Copy one level deep so the worker can keep appending while the UI renders."""
    out: dict[str, Any] = {}
    for k, v in live.items():
        if isinstance(v, dict):
            out[k] = {kk: list(vv) if isinstance(vv, list) else vv for kk, vv in v.items()}
        elif isinstance(v, list):
            out[k] = [list(x) if isinstance(x, list) else x for x in v]
        else:
            out[k] = v
    return out
