"""Many visitors: bounded memory (a limit on loaded models, sessions that free theirs) and a small load test.

The load test is the same code as benchmarks/load_test.py, on the tiny model and the in-process app: 8 concurrent
gradio_client sessions, mixed importance / fusion / generation, no failures, nobody sees another's work.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
import time
import weakref
from pathlib import Path

import pytest

from app import work
from app.jobs import DONE, FAILED, JobRunner
from app.state import TEST_SOURCE, ModelCache, RunRecord, SessionRegistry, make_context
from fusegpt_core.errors import ModelLoadError
from fusegpt_core.testing import sample_text, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


class _Model:
    """Stands for a loaded model: weak-referenceable, like LoadedModel."""


def test_the_model_limit_refuses_with_a_message_and_frees_unused_models():
    cache = ModelCache(capacity=1, max_loaded=2)
    a, _ = cache.get(("a", "cpu"), _Model)  # a session holds a ...
    b, _ = cache.get(("b", "cpu"), _Model)  # ... another holds b (a left the cache but is alive)
    assert cache.in_use() == {("a", "cpu"), ("b", "cpu")}
    with pytest.raises(ModelLoadError, match=r"already holds 2 models .*\(a, b\), its limit"):
        cache.get(("c", "cpu"), _Model)
    assert cache.get(("a", "cpu"), _Model) == (a, True)  # a held model is shared, not loaded twice
    del a
    gc.collect()
    c, cached = cache.get(("c", "cpu"), _Model)  # a's session ended: room again
    assert not cached and cache.in_use() == {("b", "cpu"), ("c", "cpu")}
    del b, c
    gc.collect()
    # only cached, nobody holds them: a new model evicts the least recently used one instead of being refused
    cache.get(("d", "cpu"), _Model)
    cache.get(("e", "cpu"), _Model)
    assert len(cache.in_use()) <= 2


def test_an_app_session_over_the_limit_gets_the_message_and_the_next_one_after_a_session_ends(tmp_path):
    ctx = make_context(test_model="tiny", reaper=False, root=tmp_path / "sessions", grace_s=10)
    ctx.models = ModelCache(capacity=1, max_loaded=1)
    try:
        folder = tmp_path / "tiny-folder"
        tiny_model("llama", 4).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)

        first = ctx.sessions.get("first")
        snap = ctx.runner.wait(ctx.runner.submit(work.make_load_job(ctx, first, TEST_SOURCE, None, None, False),
                                                 owner="first", kind="load"), timeout=120)  # fmt: skip
        assert snap.status == DONE, snap.error
        held = weakref.ref(first.loaded)
        ctx.models.clear()  # only the session holds the model now

        second = ctx.sessions.get("second")
        load_other = work.make_load_job(ctx, second, str(folder), "cpu", None, False)
        snap = ctx.runner.wait(ctx.runner.submit(load_other, owner="second", kind="load"), timeout=120)
        assert snap.status == FAILED and "its limit" in snap.error and "tiny (test model)" in snap.error
        assert second.loaded is None and first.loaded is held()

        assert "first" in ctx.sessions.sweep(now=time.monotonic() + 11)  # the first visitor left
        snap = ctx.runner.wait(ctx.runner.submit(load_other, owner="second", kind="load"), timeout=120)
        assert snap.status == DONE, snap.error
        gc.collect()
        assert held() is None  # the first session's model is gone from memory
    finally:
        ctx.close()


def test_run_models_are_bounded_over_all_sessions(tmp_path):
    ctx = make_context(test_model="tiny", reaper=False, root=tmp_path / "sessions")
    ctx.max_run_models = 3
    try:
        records = []
        for i in range(5):
            session = ctx.sessions.get(f"visitor-{i}")
            record = RunRecord(id=1, label="#1 drop", method="drop", report={}, model=_Model(), tokenizer=None)
            session.add_run(record, keep_models=3)
            records.append(record)
            ctx.trim_run_models()
        assert [r.model is not None for r in records] == [False, False, True, True, True]  # the oldest gave way
    finally:
        ctx.close()


def test_a_session_that_ends_frees_its_models(tmp_path):
    runner = JobRunner()
    try:
        registry = SessionRegistry(runner, tmp_path, grace_s=10)
        session = registry.attach("browser-x", "page-x")
        session.workdir.mkdir(parents=True)
        session.loaded = _Model()
        session.add_run(
            RunRecord(id=1, label="#1", method="drop", report={}, model=_Model(), tokenizer=None), keep_models=3
        )
        refs = [weakref.ref(session.loaded), weakref.ref(session.runs[0].model)]
        registry.detach("page-x")
        assert registry.sweep(now=time.monotonic() + 11) == ["page-x"]
        del session
        gc.collect()
        assert [r() for r in refs] == [None, None]
    finally:
        runner.shutdown()


def _load_test_module():
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "benchmarks" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("load_test", module)  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.e2e
def test_eight_concurrent_sessions(live_app):
    pytest.importorskip("gradio_client")
    url, ctx = live_app
    if not ctx.test_model:
        pytest.skip("the small load test drives the tiny test model")
    load_test = _load_test_module()
    text = "\n\n".join(sample_text(3000, seed=s) for s in range(4))
    figures = load_test.run_load(url, sessions=8, tiny=True, pid=os.getpid(), timeout=120, poll=0.5, pasted=text)
    print()
    load_test.print_table(figures)
    assert figures["failures"] == 0, figures["failure_details"]
    assert figures["jobs"] == 8 * 3  # load, importance or run, generate
    assert figures["requests"] >= 8 * 7
    assert figures["wall_s"] < 90


@pytest.mark.e2e
def test_uploads_are_capped_and_stay_with_their_visitor(live_app, tmp_path):
    gradio_client = pytest.importorskip("gradio_client")
    url, ctx = live_app
    if not ctx.test_model:
        pytest.skip("drives the tiny test model")
    alice, bob = gradio_client.Client(url, verbose=False), gradio_client.Client(url, verbose=False)
    status, _ = alice.predict(kind="tiny (test model)", text="", api_name="/load_model")
    _wait_done(alice, "load")

    huge = tmp_path / "huge.txt"
    with huge.open("wb") as handle:
        handle.truncate(21 * 2**20)  # over the 20 MB cap
    with pytest.raises(Exception, match="(?i)size|large|413") as refused:
        alice.predict(kind="upload a file", pasted="", upload=gradio_client.handle_file(str(huge)),
                      api_name="/compute_importance")  # fmt: skip
    print("refused:", refused.value)
    assert [j["kind"] for j in alice.predict(api_name="/job_status")["jobs"]] == ["load"]  # nothing started

    secret = tmp_path / "alice-private-notes.txt"
    secret.write_text("\n\n".join(sample_text(3000, seed=s) for s in range(3)), encoding="utf-8")
    alice.predict(kind="upload a file", pasted="", upload=gradio_client.handle_file(str(secret)), metrics=["mi"],
                  seq_len=32, n=1, api_name="/compute_importance")  # fmt: skip
    _wait_done(alice, "importance")
    assert set(alice.predict(api_name="/results")["importance"]) == {"mi"}
    seen_by_bob = str(bob.predict(api_name="/results")) + str(bob.predict(api_name="/job_status"))
    assert "alice-private-notes" not in seen_by_bob and "'mi'" not in seen_by_bob


def _wait_done(client, kind: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [j for j in client.predict(api_name="/job_status")["jobs"] if j["kind"] == kind]
        if jobs and jobs[-1]["status"] in ("done", "failed", "cancelled"):
            assert jobs[-1]["status"] == "done", jobs[-1]
            return
        time.sleep(0.3)
    raise AssertionError(f"{kind} did not finish")
