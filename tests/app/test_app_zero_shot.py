"""Zero-shot accuracy from the Compare tab: the job on the tiny model (lm-eval on the bundled offline tasks),
its figures in the runs' reports, the table's columns, the chart, Stop, and the refusals."""

import json
import threading
import types

import gradio as gr
import pytest

from app import tables, views, work
from app.jobs import CANCELLED, DONE
from app.state import RunRecord
from app.testing import loaded_session, run_job, tiny_context
from fusegpt_core import zeroshot
from fusegpt_core.config import preset
from fusegpt_core.errors import FuseGPTError
from fusegpt_core.evaluate import drop_blocks
from fusegpt_core.testing import sample_text, state_hash

TEXT = "text:" + sample_text(30000)
TASKS = ["bundled_cloze", "bundled_nextsent"]
LIMIT = 5


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    ctx = tiny_context(tmp_path_factory.mktemp("sessions"), grace_s=60)
    yield ctx
    ctx.close()


def _run(app, session, method="fusegpt", blocks=(5, 4)):
    # the tiny preset cut to one epoch on 4 windows: a fused model in seconds (what it repairs does not matter here)
    recipe = preset("tiny", blocks=list(blocks), method=method, **{"data.calib_source": TEXT, "data.eval_source": TEXT,
                    "distill.epochs": 1, "data.n_calib": 4})  # fmt: skip
    snap = run_job(app, session, work.make_run_job(app, session, recipe), kind="run")
    assert snap.status == DONE, snap.error
    return session.runs[-1]


@pytest.fixture(scope="module")
def measured(app):
    """A session with one tiny FuseGPT run, then the zero-shot job on both bundled tasks (real lm-eval)."""
    session = loaded_session(app, "measured")
    _run(app, session, blocks=(5,))  # one round
    before = state_hash(session.loaded.model)
    snap = run_job(app, session, work.make_zero_shot_job(session, TASKS, LIMIT), kind="zero-shot")
    assert snap.status == DONE, snap.error
    assert state_hash(session.loaded.model) == before  # the shared base model is untouched
    return session, snap


def test_the_report_gets_the_original_the_dropped_and_the_result(measured):
    session, snap = measured
    zero_shot = session.runs[-1].report["zero_shot"]
    assert zero_shot["limit"] == LIMIT and set(zero_shot["seconds"]) == {"original", "dropped", "result"}
    for label in ("original", "dropped", "result"):
        assert set(zero_shot[label]) == set(TASKS)
        for figures in zero_shot[label].values():
            assert figures["n"] == LIMIT and 0.0 <= figures["acc"] <= 1.0
        # multiple choice has acc_norm; the open cloze has none
        assert 0.0 <= zero_shot[label]["bundled_nextsent"]["acc_norm"] <= 1.0
        assert zero_shot[label]["bundled_cloze"]["acc_norm"] is None
    assert snap.step == snap.total == 3 * len(TASKS)  # progress went model by model, task by task
    # the run's report file (and so an export) carries the figures
    _, report_path = work.write_recipe_files(session, session.runs[-1].id)
    assert json.loads(report_path.read_text())["zero_shot"]["result"]["bundled_cloze"]["n"] == LIMIT


def test_the_table_shows_one_column_per_task_matching_the_report(measured):
    session, _ = measured
    table, _, caption = views.compare_views(session)
    zero_shot = session.runs[-1].report["zero_shot"]
    columns = {"bundled_cloze": "bundled_cloze acc", "bundled_nextsent": "bundled_nextsent acc_norm"}
    assert list(table.columns) == tables.COMPARE_COLUMNS + list(columns.values())
    assert list(table["model"]) == ["original", "dropped [5]", "#1 fusegpt"]
    for row, label in enumerate(("original", "dropped", "result")):
        for task, column in columns.items():
            figures = zero_shot[label][task]
            metric = "acc_norm" if task == "bundled_nextsent" else "acc"
            assert table.loc[row, column] == f"{figures[metric]:.3f} ± {figures[f'{metric}_stderr']:.3f}"
    assert "Zero-shot accuracy" in caption and f"{LIMIT} items per task" in caption
    figure = views.accuracy_figure(session)
    assert [trace.name for trace in figure.data] == ["bundled_cloze (acc)", "bundled_nextsent (acc_norm)"]
    assert list(figure.data[1].x) == list(table["model"])
    assert f"first {LIMIT} items per task" in figure.layout.title.text


def test_cells_say_what_they_lack():
    both = {"acc": 0.5, "acc_norm": 0.75, "stderr": 0.1, "acc_stderr": 0.2, "acc_norm_stderr": 0.1, "n": 20}
    acc_only = {"acc": 0.25, "acc_norm": None, "stderr": 0.2, "acc_stderr": 0.2, "n": 4}
    report = {"method": "fusegpt", "removed_blocks": [1], "dropped_ppl": 2.0, "quantised": [{"quant": "q8_0"}],
              "zero_shot": {"original": {"t": both}, "dropped": {"t": both}, "result": {"t": acc_only}}}  # fmt: skip
    table = tables.compare_table([{"label": "#1 fusegpt", "report": report}])
    # acc where the task's acc_norm is missing, the items where they differ, "-" for the GGUF file
    assert list(table["t acc_norm"]) == ["0.750 ± 0.100", "0.750 ± 0.100", "0.250 ± 0.200 (acc) (n=4)", "-"]


def test_a_drop_run_is_the_dropped_model_and_released_models_are_skipped(app, monkeypatch):
    """Each model is evaluated once: a drop run's model is the dropped one; a released model is not measured."""
    session = loaded_session(app, "plan")
    drop = _run(app, session, method="drop")
    # a second run with a model of its own (standing in for a fused one: what it computes does not matter)
    fused = RunRecord(id=2, label="#2 fusegpt", method="fusegpt", report={**drop.report, "method": "fusegpt"},
                      model=drop_blocks(session.loaded.model, [4, 5]), tokenizer=session.loaded.tokenizer)  # fmt: skip
    session.add_run(fused, keep_models=3)
    # a third run whose model was released to save memory
    report = {**drop.report, "removed_blocks": [2], "num_layers_after": 5}
    released = RunRecord(id=3, label="#3 drop", method="drop", report=report, model=None, tokenizer=None)
    session.add_run(released, keep_models=3)
    evaluated = []

    def fake_evaluate(model, tokenizer, tasks, limit, *args, **kwargs):
        evaluated.append(model)  # kept alive, so no two models share an id
        return {"tasks": {t: {"acc": 0.5, "acc_norm": None, "stderr": 0.1, "acc_stderr": 0.1, "n": limit} for t in
                          tasks}, "seconds": 0.01}  # fmt: skip

    monkeypatch.setattr(zeroshot, "evaluate_tasks", fake_evaluate)
    snap = run_job(app, session, work.make_zero_shot_job(session, ["bundled_cloze"], 3), kind="zero-shot")
    assert snap.status == DONE, snap.error
    # the original, blocks [4, 5] dropped (the drop run's model too), blocks [2] dropped, the "fused" model
    assert len(evaluated) == 4 and len({id(m) for m in evaluated}) == 4
    assert evaluated[0] is session.loaded.model and any(m is fused.model for m in evaluated)
    assert drop.report["zero_shot"]["result"] == drop.report["zero_shot"]["dropped"]
    assert "result" not in released.report["zero_shot"] and "dropped" in released.report["zero_shot"]
    table, _, _ = views.compare_views(session)
    assert list(table["model"]) == ["original", "#1 drop", "#2 fusegpt", "#3 drop"]
    assert list(table["bundled_cloze acc"]) == ["0.500 ± 0.100"] * 3 + ["-"]  # #3's model was released


def test_stop_between_two_tasks_keeps_what_was_measured(app, monkeypatch):
    session = loaded_session(app, "stop")
    _run(app, session, method="drop")
    first_call, release = threading.Event(), threading.Event()

    def slow_evaluate(model, tokenizer, tasks, limit, *args, **kwargs):
        first_call.set()
        release.wait(30)
        return {"tasks": {t: {"acc": 1.0, "acc_norm": 1.0, "stderr": 0.0, "n": limit} for t in tasks}, "seconds": 0}

    monkeypatch.setattr(zeroshot, "evaluate_tasks", slow_evaluate)
    job = app.runner.submit(work.make_zero_shot_job(session, TASKS, 2), owner=session.key, kind="zero-shot")
    session.jobs.append(job)
    assert first_call.wait(30)
    assert app.runner.cancel_owner(session.key) == 1
    release.set()
    snap = app.runner.wait(job, timeout=30)
    assert snap.status == CANCELLED and "stopped" in snap.error
    zero_shot = session.runs[-1].report["zero_shot"]
    assert list(zero_shot["original"]) == ["bundled_cloze"]  # the figure measured before the stop is kept
    assert "dropped" not in zero_shot


def test_mistakes_are_refused_before_anything_runs(app, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = app.sessions.get("no-model")
    with pytest.raises(FuseGPTError, match="no model is loaded"):
        work.make_zero_shot_job(empty, TASKS, 5)
    session = loaded_session(app, "refusals")
    with pytest.raises(FuseGPTError, match="unknown task 'bundled_nope'.*bundled_cloze"):
        work.make_zero_shot_job(session, ["bundled_nope"], 5)
    with pytest.raises(FuseGPTError, match="piqa.*cannot be reached.*bundled_cloze"):
        work.make_zero_shot_job(session, ["piqa"], 5)
    with pytest.raises(FuseGPTError, match="at least 1"):
        work.make_zero_shot_job(session, TASKS, 0)
    with pytest.raises(FuseGPTError, match="no task"):
        work.make_zero_shot_job(session, [], 5)
    with pytest.raises(FuseGPTError, match="run a plan"):
        work.make_zero_shot_job(session, TASKS, 5)
    assert session.jobs and all(app.runner.snapshot(j).kind != "zero-shot" for j in session.jobs)


def test_the_button_turns_a_mistake_into_a_warning_and_a_red_status_line(app, measured, monkeypatch):
    from app.ui import build_ui

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ui = build_ui(app).fusegpt_ui
    request = types.SimpleNamespace(session_hash="measured", username=None)  # a session with a run
    for tasks, limit, message in ((TASKS, 0, "at least 1"), (["piqa"], 5, "cannot be reached"),
                                  (TASKS, None, "items per task")):  # fmt: skip
        with pytest.warns(UserWarning, match=message):
            status, timer = ui.compare.zero_shot(tasks, limit, request)
        assert status.startswith("✖") and message in status and timer == gr.skip()
    assert ui.compare.accuracy in ui.tokens  # the chart gets its figures through its own event
