"""The background job runner: states, queue positions, cooperative cancel."""

import threading
import time

import pytest

from app.jobs import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobRunner
from fusegpt_core.errors import DataError


@pytest.fixture
def runner():
    r = JobRunner(workers=1)
    yield r
    r.shutdown()


def _blocker(gate: threading.Event, started: threading.Event | None = None):
    def fn(ctx):
        if started is not None:
            started.set()
        while not gate.is_set():
            ctx.check()
            time.sleep(0.01)
        return "released"

    return fn


def test_done_with_result_and_progress(runner):
    def fn(ctx):
        ctx.stage("work", "doing it")
        ctx.progress(1, 2)
        ctx.set_live("points", [1, 2, 3])
        return 42

    job = runner.submit(fn, owner="a", kind="k", title="Answer")
    snap = runner.wait(job, timeout=5)
    assert snap.status == DONE and snap.finished
    assert runner.result(job) == 42
    assert snap.live["points"] == [1, 2, 3]
    assert snap.position == -1
    assert any("work" in line for line in snap.log)


def test_user_error_is_failed_with_its_message(runner):
    def fn(ctx):
        raise DataError("the pasted text is too short.")

    snap = runner.wait(runner.submit(fn, owner="a", kind="k"), timeout=5)
    assert snap.status == FAILED
    assert snap.error == "the pasted text is too short."


def test_unexpected_error_is_failed_in_one_line(runner):
    def fn(ctx):
        raise ZeroDivisionError("division by zero")

    snap = runner.wait(runner.submit(fn, owner="a", kind="k"), timeout=5)
    assert snap.status == FAILED
    assert "ZeroDivisionError" in snap.error and "\n" not in snap.error


def test_queue_positions_and_single_worker(runner):
    gate, started = threading.Event(), threading.Event()
    first = runner.submit(_blocker(gate, started), owner="a", kind="k")
    second = runner.submit(lambda ctx: 2, owner="b", kind="k")
    third = runner.submit(lambda ctx: 3, owner="c", kind="k")
    assert started.wait(5)
    assert runner.snapshot(first).status == RUNNING and runner.position(first) == 0
    assert runner.snapshot(second).status == QUEUED and runner.position(second) == 1
    assert runner.position(third) == 2
    gate.set()
    assert runner.wait(third, timeout=5).status == DONE
    assert runner.result(second) == 2


def test_cancel_queued_job_never_runs(runner):
    gate, started = threading.Event(), threading.Event()
    runner.submit(_blocker(gate, started), owner="a", kind="k")
    ran = []
    queued = runner.submit(lambda ctx: ran.append(1), owner="a", kind="k")
    assert started.wait(5)
    assert runner.cancel(queued)
    assert runner.snapshot(queued).status == CANCELLED
    gate.set()
    time.sleep(0.2)
    assert ran == []
    assert not runner.cancel(queued)  # already finished


def test_cancel_really_stops_a_running_job(runner):
    counter = {"n": 0}
    started = threading.Event()

    def fn(ctx):
        while True:
            ctx.check()
            counter["n"] += 1
            started.set()
            time.sleep(0.01)

    job = runner.submit(fn, owner="a", kind="k")
    assert started.wait(5)
    assert runner.cancel(job)
    snap = runner.wait(job, timeout=5)
    assert snap.status == CANCELLED
    stopped_at = counter["n"]
    time.sleep(0.2)
    assert counter["n"] == stopped_at  # nothing runs after the stop
    # the worker is free for the next job
    assert runner.wait(runner.submit(lambda ctx: "next", owner="a", kind="k"), timeout=5).status == DONE


def test_cancel_owner_only_touches_that_owner(runner):
    gate, started = threading.Event(), threading.Event()
    mine = runner.submit(_blocker(gate, started), owner="me", kind="k")
    other = runner.submit(lambda ctx: "other", owner="you", kind="k")
    assert started.wait(5)
    assert runner.cancel_owner("me") == 1
    assert runner.wait(mine, timeout=5).status == CANCELLED
    assert runner.wait(other, timeout=5).status == DONE


def test_closure_is_dropped_when_the_job_ends(runner):
    secret = "hf_secret_token"

    def fn(ctx, token=secret):
        return len(token)

    job = runner.submit(fn, owner="a", kind="push")
    runner.wait(job, timeout=5)
    assert runner._jobs[job].fn is None
    assert secret not in " ".join(runner.snapshot(job).log)


def test_eta_from_progress_and_override(runner):
    gate, started = threading.Event(), threading.Event()

    def fn(ctx):
        ctx.stage("s")
        time.sleep(0.05)
        ctx.progress(1, 4)
        started.set()
        gate.wait(5)

    job = runner.submit(fn, owner="a", kind="k")
    assert started.wait(5)
    eta = runner.snapshot(job).eta_s
    assert eta is not None and eta > 0
    runner._jobs[job].eta_override = None
    ctx_job = runner._jobs[job]
    with ctx_job.lock:
        ctx_job.eta_override, ctx_job.eta_set_at = 100.0, time.monotonic()
    assert 99 <= runner.snapshot(job).eta_s <= 100
    gate.set()
    assert runner.wait(job, timeout=5).eta_s is None
