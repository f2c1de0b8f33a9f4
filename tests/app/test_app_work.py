"""The app's job bodies on a tiny in-process model: load, importance, preview, run, stop, export."""

import zipfile

import pytest
import torch

from app import views, work
from app.jobs import CANCELLED, DONE, FAILED
from app.recipes import TextChoice
from app.state import TEST_SOURCE
from app.testing import loaded_session, run_job, tiny_context
from fusegpt_core.config import preset
from fusegpt_core.testing import sample_text, state_hash

TEXT = "text:" + sample_text(30000)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    ctx = tiny_context(tmp_path_factory.mktemp("sessions"), grace_s=60)
    yield ctx
    ctx.close()


def test_flow_load_importance_preview_run_generate_export(app):
    session = loaded_session(app, "flow")
    info = session.model_info
    assert info["blocks"] == 6 and info["model_type"] == "llama" and info["block_seconds"] > 0
    assert session.importance is None  # no precomputed scores for the test model

    snap = run_job(
        app,
        session,
        work.make_importance_job(
            app, session, calib_source=TEXT, metrics=["mi", "bi", "ppl"], seq_len=32, n_score=2, seed=0, use_cache=True
        ),
    )
    assert snap.status == DONE, snap.error
    scores = session.importance["scores"]
    assert set(scores) == {"mi", "bi", "ppl"} and all(len(v) == 6 for v in scores.values())
    assert session.importance["agreement"].shape == (3, 3)

    snap = run_job(app, session, work.make_preview_job(app, session, [4, 5], TEXT, 32, 2, 0))
    assert snap.status == DONE, snap.error
    assert session.preview["dense"] > 0 and session.preview["dropped"] > 0

    before = state_hash(session.loaded.model)
    recipe = preset("tiny", blocks=[5, 4], **{"data.calib_source": TEXT, "data.eval_source": TEXT})
    snap = run_job(app, session, work.make_run_job(app, session, recipe), kind="run")
    assert snap.status == DONE, snap.error
    assert snap.live["rounds"] and snap.live["losses"]
    run = session.runs[-1]
    assert run.report["removed_blocks"] == [5, 4] and run.report["num_layers_after"] == 4
    assert state_hash(session.loaded.model) == before  # the shared base model is untouched

    table, _, caption = views.compare_views(session)
    assert list(table["model"]) == ["original", "dropped [5, 4]", "#1 fusegpt"]
    assert "windows" in caption and "median" in caption

    snap = run_job(app, session, work.make_generate_job(session, "Hello", {"max_new_tokens": 4}))
    assert snap.status == DONE, snap.error
    assert [g["label"] for g in session.generations] == ["original", "#1 fusegpt"]

    recipe_path, report_path = work.write_recipe_files(session, run.id)
    assert '"blocks"' in recipe_path.read_text() and report_path.exists()
    snap = run_job(app, session, work.make_export_job(session, run.id))
    assert snap.status == DONE, snap.error
    names = zipfile.ZipFile(session.exports["zip"]).namelist()
    assert "config.json" in names and "model.safetensors" in names and "recipe.json" in names


def test_stop_during_a_run_leaves_the_model_intact(app):
    session = loaded_session(app, "stop")
    before = state_hash(session.loaded.model)
    recipe = preset(
        "tiny", blocks=[1, 2, 3], **{"data.calib_source": TEXT, "data.eval_source": TEXT, "distill.epochs": 400}
    )
    job = app.runner.submit(work.make_run_job(app, session, recipe), owner=session.key, kind="run")
    session.jobs.append(job)
    import time

    deadline = time.monotonic() + 60
    while app.runner.snapshot(job).stage != "finetune" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.runner.snapshot(job).stage == "finetune"
    app.runner.cancel(job)
    snap = app.runner.wait(job, timeout=30)
    assert snap.status == CANCELLED
    assert session.runs == []
    assert state_hash(session.loaded.model) == before
    assert len(list(session.loaded.model.model.layers)) == 6


def test_user_errors_fail_the_job_with_one_line(app):
    session = app.sessions.get("errors")
    snap = run_job(app, session, work.make_load_job(app, session, "/no/such/model", None, None, False))
    assert snap.status == FAILED and "No such file or folder" in snap.error
    with pytest.raises(Exception, match="no model is loaded"):
        work.make_preview_job(app, session, [1], TEXT, 32, 2, 0)
    with pytest.raises(Exception, match="too short"):
        TextChoice("paste text", "tiny").source()
    with pytest.raises(Exception, match="write token"):
        work.make_push_job(session, 1, "me/model", "")


def test_one_click_demo_job(app):
    session = app.sessions.get("demo")
    recipe = preset("tiny", model=TEST_SOURCE, **{"data.calib_source": TEXT, "data.eval_source": TEXT})
    snap = run_job(app, session, work.make_demo_job(app, session, recipe, "Hi", TEST_SOURCE), kind="demo", timeout=180)
    assert snap.status == DONE, snap.error
    assert session.importance and session.runs and session.generations
    assert session.plan.blocks == session.runs[0].report["removed_blocks"]
    # the Run tab shows the settings the demo ran with, so the plan diagram draws its groups
    assert session.settings.preset == work.DEMO_PRESET
    assert session.settings.int_value("fusion.group_size", 0) == recipe.fusion.group_size


def test_timings_for_estimates(tiny_loaded):
    assert 0 < work.time_block_forward(tiny_loaded, seq_len=16) < 5
    assert 0 < work.time_decode_token(tiny_loaded) < 5
    assert isinstance(torch.__version__, str)


def test_loading_the_loaded_model_again_keeps_the_plan(app):
    """A second click on Load (or one while the first visit loads the same model) must not wipe
    what the visitor made on it."""
    session = loaded_session(app, "reload")
    session.plan.let_metric_choose(2)
    session.importance = {"scores": {"mi": [0.1] * 6}}
    snap = run_job(app, session, work.make_load_job(app, session, TEST_SOURCE, None, None, False), "load")
    assert snap.status == DONE, snap.error
    assert session.plan.auto and session.plan.remove == 2 and session.importance is not None


def test_a_run_through_forked_gpu_calls_gives_the_in_process_result(app, monkeypatch):
    """ZeroGPU's way (app/gpu.py): one forked, pickled call per round, continuing from the round
    checkpoint, then one that folds, evaluates and exports; the same report as a run in-process."""
    session = loaded_session(app, "gpu-fork")
    recipe = preset("tiny", remove=2, **{"data.calib_source": TEXT, "data.eval_source": TEXT})
    snap = run_job(app, session, work.make_run_job(app, session, recipe), kind="run")
    assert snap.status == DONE, snap.error
    monkeypatch.setenv("FUSEGPT_GPU", "fork")
    snap = run_job(app, session, work.make_run_job(app, session, recipe), kind="run")
    assert snap.status == DONE, snap.error
    plain, forked = session.runs[-2].report, session.runs[-1].report
    for key in ("dense_ppl", "dropped_ppl", "result_ppl", "removed_blocks", "num_layers_after"):
        assert forked[key] == plain[key], key
    assert len(snap.live["rounds"]) == 2 and snap.live["losses"]  # the calls' events reached the live view
