"""The Blocks build, and what a page shows for a fresh and for a finished session (no server)."""

import threading

import gradio as gr
import pytest

from app.state import RunRecord, make_context
from app.ui import build_ui


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    ctx = make_context(test_model="tiny", reaper=False, root=tmp_path_factory.mktemp("ui"))
    demo = build_ui(ctx)
    yield demo, ctx
    ctx.close()


def test_key_events_have_api_names(built):
    demo, _ = built
    names = {fn.api_name for fn in demo.fns.values() if fn.api_name}
    for name in (
        "load_model",
        "compute_importance",
        "preview_drop",
        "start_run",
        "stop",
        "generate",
        "export",
        "one_click_demo",
        "set_plan",
        "job_status",
        "results",
    ):
        assert name in names


def test_render_fresh_session(built):
    demo, ctx = built
    ui = demo.fusegpt_ui
    out = ui.render(ctx.sessions.get("fresh"), {})
    assert "No job yet" in out[ui.status]
    assert out[ui.model.table].iloc[0]["value"] == "not loaded yet"
    assert ui.plan.remove_k not in out  # no model: the slider keeps its range
    assert out[ui.run.preset] == "quick"  # a first visit lands on the fast preset
    seen = out[ui.seen]
    again = ui.render(ctx.sessions.get("fresh"), seen)
    assert ui.importance.heatmap not in again and ui.compare.table not in again  # nothing re-sent without a change
    assert ui.run.preset not in again


def test_render_session_with_a_run(built):
    demo, ctx = built
    ui = demo.fusegpt_ui
    session = ctx.sessions.get("with-run")
    session.model_info = {
        "blocks": 6,
        "model_type": "llama",
        "params": 1000,
        "device": "cpu",
        "dtype": "float32",
        "load_seconds": 0.1,
        "source": "tiny-llama",
    }
    session.bump("model")
    report = {
        "method": "fusegpt",
        "dense_ppl": 10.0,
        "dropped_ppl": 15.0,
        "result_ppl": 11.0,
        "removed_blocks": [4],
        "num_layers_before": 6,
        "num_layers_after": 5,
        "params_before": 1000,
        "params_after": 900,
        "rounds": [
            {
                "round": 0,
                "removed": 4,
                "targets": [2, 3, 5],
                "losses": [0.5, 0.2],
                "loss_first": 0.5,
                "loss_last": 0.2,
                "seconds": 1.0,
            }
        ],
        "trajectory": [[0.3, 0.2, 0.4, 0.5, 0.1, 0.6]],
        "seconds": {"total": 3.0},
        "status": "done",
    }
    session.add_run(
        RunRecord(id=1, label="#1 fusegpt", method="fusegpt", report=report, model=None, tokenizer=None), keep_models=1
    )
    out = ui.render(session, {})
    assert out[ui.plan.remove_k]["maximum"] == 4  # 6 blocks: at least two must remain
    assert list(out[ui.compare.table]["model"]) == ["original", "dropped [4]", "#1 fusegpt"]
    assert "finished" in out[ui.run.header] and "1 round in" in out[ui.run.header]
    assert out[ui.run.loss_plot].data[0].name == "round 1: block 4"
    assert list(out[ui.run.rounds_df]["round"]) == [1]  # numbered from 1, as everywhere on screen
    assert isinstance(out[ui.timer], gr.Timer)


def test_a_reload_restores_the_run_settings(built):
    demo, ctx = built
    ui = demo.fusegpt_ui
    session = ctx.sessions.get("settings")
    from app.recipes import KNOB_KEYS, RunSettings, TextChoice, preset_values

    knobs = preset_values("tiny")
    knobs[KNOB_KEYS.index("distill.epochs")] = 7
    session.settings = RunSettings(preset="tiny", method="drop+lora", baselines=["drop"], knobs=knobs)
    session.text = TextChoice("hub dataset", dataset="c4")
    out = ui.render(session, {})  # what a reloaded page receives
    assert out[ui.run.preset] == "tiny" and out[ui.run.method] == "drop+lora" and out[ui.run.baselines] == ["drop"]
    assert out[ui.run.knobs[KNOB_KEYS.index("distill.epochs")]] == 7
    assert out[ui.importance.text_kind] == "hub dataset" and out[ui.importance.dataset] == "c4"
    assert "hub dataset c4" in out[ui.run.text_note] and "hub dataset c4" in out[ui.plan.text_note]


def _request(key):
    import types

    return types.SimpleNamespace(session_hash=key, username=None)


def test_the_demo_asks_before_replacing_a_hand_made_plan(built):
    demo, ctx = built
    ui = demo.fusegpt_ui
    session = ctx.sessions.get("hand-made")
    session.plan.pick([4, 1])
    row, question, status, _ = ui.demo_or_ask(_request("hand-made"))
    assert row["visible"] is True and "1, 4" in question
    assert session.jobs == [] and session.plan.blocks == [1, 4]  # nothing started, nothing replaced


def test_an_uploaded_recipe_restores_settings_and_plan(built, tmp_path):
    import json

    from app.recipes import KNOB_KEYS
    from app.testing import loaded_session
    from fusegpt_core.config import preset

    demo, ctx = built
    ui = demo.fusegpt_ui
    session = loaded_session(ctx, "restore")
    recipe = preset("tiny", model="tiny-llama", blocks=[4, 2], method="drop+lora", candidates=2,
                    **{"fusion.targets": {"4": [3, 5]}, "distill.epochs": 3, "data.calib_source": "hf:c4"})  # fmt: skip
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe.to_dict()))
    status, _ = ui.run.restore_recipe(str(path), _request("restore"))
    assert status.startswith("✔")
    assert session.plan.blocks == [4, 2] and session.plan.targets == {4: [3, 5]}
    assert session.settings.method == "drop+lora" and session.text.kind == "hub dataset"
    out = ui.render(session, {})
    assert out[ui.run.knobs[KNOB_KEYS.index("distill.epochs")]] == 3
    assert out[ui.run.knobs[KNOB_KEYS.index("candidates")]] == 2
    assert out[ui.run.method] == "drop+lora"
    again = preset("tiny", blocks=[9])
    path.write_text(json.dumps(again.to_dict()))
    with pytest.raises(Exception, match="does not fit the loaded model"):
        ui.run.restore_recipe(str(path), _request("restore"))
    assert session.plan.blocks == [4, 2]  # a recipe that does not fit changes nothing


def test_odd_numbers_in_boxes_give_messages_not_errors(built):
    from app.recipes import KNOB_KEYS
    from app.testing import loaded_session

    demo, ctx = built
    ui = demo.fusegpt_ui
    session = loaded_session(ctx, "odd-numbers")
    session.plan.pick([2])
    ui.run.fill_preset("quick", request=_request("odd-numbers"))
    out = ui.run.knob_changed(KNOB_KEYS.index("fusion.group_size"), 999, request=_request("odd-numbers"))
    assert out[ui.plan.diagram].data  # drawn, with the group clamped to the model's 6 blocks
    assert "Estimated run time" in out[ui.run.estimate]
    out = ui.run.knob_changed(KNOB_KEYS.index("distill.epochs"), -3, request=_request("odd-numbers"))
    assert "No estimate yet" in out[ui.run.estimate] and "distill.epochs" in out[ui.run.estimate]
    handler = next(fn.fn for fn in demo.fns.values() if fn.name == "edit")
    with pytest.warns(UserWarning, match="blocks to remove"):
        result = handler("let MI choose", [], 2.5, _request("odd-numbers"))  # a whole number is needed
    assert all(v == gr.skip() for v in result.values())  # every output keeps its value


def test_a_poll_whose_render_fails_keeps_polling(built, monkeypatch):
    """The page must not stop updating because one render failed: the timer stays on."""
    demo, ctx = built
    ui = demo.fusegpt_ui

    def broken(session, seen):
        raise RuntimeError("dictionary changed size during iteration")

    monkeypatch.setattr(ui, "render", broken)
    out = ui.tick({}, _request("broken-render"))
    timer = out[ui.timer]
    assert getattr(timer, "active", None) is True or timer.get("active") is True
    assert all(v == gr.skip() for k, v in out.items() if k is not ui.timer)


def test_an_idle_page_keeps_polling_slowly(built):
    """No poll reply may switch the timer off (a stale one would freeze the page): an idle page
    polls every IDLE_POLL_S, a busy one every BUSY_POLL_S."""
    from app.tabs.base import BUSY_POLL_S, IDLE_POLL_S

    demo, ctx = built
    ui = demo.fusegpt_ui
    session = ctx.sessions.get("idle-poll")
    timer = ui.render(session, {})[ui.timer]
    assert timer.active is True and timer.value == IDLE_POLL_S > BUSY_POLL_S
    release = threading.Event()
    job = ctx.runner.submit(lambda jc: release.wait(30), owner=session.key, kind="wait")
    session.jobs.append(job)
    timer = ui.render(session, {})[ui.timer]
    release.set()
    assert timer.active is True and timer.value == BUSY_POLL_S
    ctx.runner.wait(job, timeout=30)


def test_load_clicked_while_the_same_load_runs_is_not_queued_again(built):
    demo, ctx = built
    ui = demo.fusegpt_ui
    session = ctx.sessions.get("double-load")
    request = _request("double-load")
    from app.state import TEST_SOURCE

    first = ui.model.load_model(TEST_SOURCE, "", "auto", "auto", False, request)
    second = ui.model.load_model(TEST_SOURCE, "", "auto", "auto", False, request)
    loads = [j for j in ctx.runner.jobs_of(session.key) if j.kind == "load"]
    assert "Load" in first[0] and second == (gr.skip(), gr.skip())
    assert len(loads) == 1
    ctx.runner.wait(loads[0].id, timeout=120)
    third = ui.model.load_model(TEST_SOURCE, "", "auto", "auto", False, request)  # loaded already: no job
    assert "already loaded" in third[0] and len([j for j in ctx.runner.jobs_of(session.key) if j.kind == "load"]) == 1
    other = ui.model.load_model(TEST_SOURCE, "", "cpu", "float32", False, request)  # other settings: a load
    assert len([j for j in ctx.runner.jobs_of(session.key) if j.kind == "load"]) == 2 and "✖" not in other[0]
    ctx.runner.wait(ctx.runner.jobs_of(session.key)[-1].id, timeout=120)
