"""The Blocks build, and what a page shows for a fresh and for a finished session (no server)."""

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
    assert out[ui.model_df].iloc[0]["value"] == "not loaded yet"
    assert ui.remove_k not in out  # no model: the slider keeps its range
    seen = out[ui.seen]
    again = ui.render(ctx.sessions.get("fresh"), seen)
    assert ui.heatmap not in again and ui.compare_df not in again  # nothing re-sent without a change


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
    assert out[ui.remove_k]["maximum"] == 4  # 6 blocks: at least two must remain
    assert list(out[ui.compare_df]["model"]) == ["original", "dropped [4]", "#1 fusegpt"]
    assert "finished" in out[ui.run_header]
    assert out[ui.loss_plot].data[0].name == "round 1: block 4"
    assert isinstance(out[ui.timer], gr.Timer)
