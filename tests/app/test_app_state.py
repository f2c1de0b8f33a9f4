"""Per-session state: registry lifetime, model cache, run bookkeeping."""

import threading
import time

import pytest

from app.jobs import CANCELLED, JobRunner
from app.state import ModelCache, RunRecord, Session, SessionRegistry, WindowCache


@pytest.fixture
def runner():
    r = JobRunner()
    yield r
    r.shutdown()


def test_sessions_are_separate(runner, tmp_path):
    reg = SessionRegistry(runner, tmp_path, grace_s=60)
    a, b = reg.get("alice"), reg.get("bob")
    a.plan.pick([1, 2])
    assert b.plan.blocks == [] and a is reg.get("alice") and a is not b


def test_closed_session_is_freed_after_grace(runner, tmp_path):
    reg = SessionRegistry(runner, tmp_path, grace_s=10)
    s = reg.attach("browser-1", "k")
    s.workdir.mkdir(parents=True)
    s.loaded = object()
    started = threading.Event()

    def long_job(ctx):
        started.set()
        while True:
            ctx.check()
            time.sleep(0.01)

    job = runner.submit(long_job, owner="k", kind="run")
    s.jobs.append(job)
    assert started.wait(5)
    reg.detach("k")
    assert reg.sweep(now=time.monotonic() + 5) == []  # a reload within the grace period keeps everything
    assert reg.sweep(now=time.monotonic() + 11) == ["k"]
    assert runner.wait(job, timeout=5).status == CANCELLED
    assert s.loaded is None and not s.workdir.exists()
    assert reg.peek("k") is None


def test_open_page_keeps_session_and_reload_reattaches(runner, tmp_path):
    reg = SessionRegistry(runner, tmp_path, grace_s=10)
    first = reg.attach("browser-1", "page-1")
    first.jobs.append(1)
    assert reg.sweep(now=time.monotonic() + 100) == []  # a page is open
    again = reg.attach("browser-1", "page-2")  # the reload arrives before the old page's unload
    assert again is first and reg.get("page-2") is first
    reg.detach("page-1")
    assert reg.sweep(now=time.monotonic() + 100) == []  # page-2 is still open
    other = reg.attach("browser-2", "page-3")
    assert other is not first
    reg.detach("page-2")
    assert reg.sweep(now=time.monotonic() + 100) == ["page-1"]
    assert reg.peek("page-2") is None and len(reg) == 1


def test_a_page_that_already_started_work_keeps_its_own_session(runner, tmp_path):
    reg = SessionRegistry(runner, tmp_path, grace_s=10)
    old = reg.attach("browser-1", "page-1")
    early = reg.get("page-2")  # a click before the page finished loading
    early.jobs.append(7)
    assert reg.attach("browser-1", "page-2") is early and early is not old


def test_session_cap_frees_the_longest_idle(runner, tmp_path):
    reg = SessionRegistry(runner, tmp_path, grace_s=1000, max_sessions=2)
    for k in ("a", "b", "c"):
        reg.get(k)
        time.sleep(0.01)
    reg.sweep()
    assert reg.peek("a") is None and reg.peek("c") is not None


def test_model_cache_shares_and_evicts():
    cache = ModelCache(capacity=2)
    calls = []

    def loader(name):
        return lambda: calls.append(name) or name

    assert cache.get(("a",), loader("a")) == ("a", False)
    assert cache.get(("a",), loader("a")) == ("a", True)
    cache.get(("b",), loader("b"))
    cache.get(("c",), loader("c"))  # evicts a
    cache.get(("a",), loader("a"))
    assert calls == ["a", "b", "c", "a"]


def test_window_cache():
    cache = WindowCache(capacity=1)
    assert cache.get((1,), lambda: "x") == "x"
    assert cache.get((1,), lambda: "y") == "x"
    cache.get((2,), lambda: "z")
    assert cache.get((1,), lambda: "w") == "w"


def test_add_run_keeps_only_newest_models(tmp_path):
    s = Session(key="k", workdir=tmp_path)
    for i in range(4):
        s.add_run(
            RunRecord(
                id=i,
                label=f"#{i}",
                method="drop",
                report={"trajectory": [[0.1]], "removed_blocks": [0]},
                model=object(),
                tokenizer=None,
            ),
            keep_models=2,
        )
    assert [r.model is not None for r in s.runs] == [False, False, True, True]
    assert s.trajectory["origin"] == "run #3"
    assert s.versions["runs"] == 4
