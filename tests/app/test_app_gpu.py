"""app/gpu.py: the fork stand-in for ZeroGPU's decorator, and a run continuing after a failed call."""

import time

import pytest

from app import gpu, work
from app.jobs import DONE
from app.testing import loaded_session, run_job, tiny_context
from fusegpt_core.config import preset
from fusegpt_core.testing import sample_text

TEXT = "text:" + sample_text(30000)


def _square(x):
    return x * x


def _sleep(seconds):
    time.sleep(seconds)


def _unpicklable_result():
    return lambda: None


def test_the_fork_stand_in_pickles_and_keeps_the_time_limit():
    assert gpu.fork_gpu(5)(_square)(7) == 49
    with pytest.raises(gpu.GpuCallError, match="limit"):
        gpu.fork_gpu(0.5)(_sleep)(30)
    with pytest.raises(Exception, match="pickle|lambda"):
        gpu.fork_gpu(5)(_unpicklable_result)()
    with pytest.raises(Exception, match="pickle|lambda"):
        gpu.fork_gpu(5)(_square)(lambda: None)  # an argument that would not cross the boundary


def test_a_call_that_fails_once_is_tried_again_and_the_run_continues(tmp_path, monkeypatch):
    app = tiny_context(tmp_path / "sessions")
    try:
        session = loaded_session(app, "retry")
        calls = {"n": 0}

        def flaky():
            def call(*args):
                calls["n"] += 1
                if calls["n"] == 2:  # the second call (round 2) dies, as a call past its limit does
                    raise gpu.GpuCallError("the GPU call ran past its 30 s limit")
                return gpu.gpu_call(*args)

            return call

        monkeypatch.setenv("FUSEGPT_GPU", "fork")
        monkeypatch.setattr(gpu, "gpu_function", flaky)
        recipe = preset("tiny", remove=2, **{"data.calib_source": TEXT, "data.eval_source": TEXT})
        snap = run_job(app, session, work.make_run_job(app, session, recipe), kind="run")
        assert snap.status == DONE, snap.error
        assert calls["n"] == 2 + 1 + 1  # two rounds, the failed call again, the finishing call
        assert session.runs[-1].report["num_layers_after"] == 4
        assert any("GPU call failed" in line for line in snap.log)
    finally:
        app.close()


def test_scoring_and_generation_go_through_gpu_calls_with_the_same_results(tmp_path, monkeypatch):
    """Under the fork stand-in, importance and generation are GPU calls (forked, pickled) and give what
    the app's own process gives."""
    app = tiny_context(tmp_path / "sessions")
    try:
        session = loaded_session(app, "calls")
        kwargs = dict(calib_source=TEXT, metrics=["mi", "bi"], seq_len=32, n_score=2, seed=0, use_cache=True)
        settings = {"max_new_tokens": 6, "do_sample": False}
        assert run_job(app, session, work.make_importance_job(app, session, **kwargs), "importance").status == DONE
        here = session.importance["scores"]
        assert run_job(app, session, work.make_generate_job(session, "Hello", settings), "generate").status == DONE
        answer_here = session.generations[0]["text"]

        calls = []
        forked_call = gpu.fork_gpu(gpu._call_seconds)(gpu.gpu_call)

        def counted():
            def call(task, args, seconds):
                calls.append(task)
                assert gpu.MIN_CALL_S <= seconds <= gpu.MAX_CALL_S
                return forked_call(task, args, seconds)

            return call

        monkeypatch.setenv("FUSEGPT_GPU", "fork")
        monkeypatch.setattr(gpu, "gpu_function", counted)
        assert run_job(app, session, work.make_importance_job(app, session, **kwargs), "importance").status == DONE
        assert run_job(app, session, work.make_generate_job(session, "Hello", settings), "generate").status == DONE
        forked = session.importance["scores"]
        assert set(forked) == set(here)
        for metric in here:  # one thread in the worker: the same sums up to float rounding
            assert forked[metric] == pytest.approx(here[metric], rel=1e-4, abs=1e-6)
        assert session.generations[0]["text"] == answer_here
        assert calls == ["score", "generate"]  # one GPU call each
        assert not gpu.MODELS  # nothing left registered after the calls
    finally:
        app.close()
