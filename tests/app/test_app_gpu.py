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
                return gpu.fusion_call(*args)

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
