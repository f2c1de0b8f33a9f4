"""The classroom's precomputed example (assets/precomputed_importance.json, made by
assets/make_precomputed.py): a real fusion run with its recipe, and how the Compare tab shows it."""

import json

import pytest

from app import views
from app.state import PRECOMPUTED_PATH


def _shipped() -> dict:
    return json.loads(PRECOMPUTED_PATH.read_text(encoding="utf-8"))


def test_the_shipped_trajectory_is_a_fusion_run_that_names_its_recipe():
    pre = _shipped()
    trajectory, run = pre["trajectory"], pre["example_run"]
    assert trajectory["method"] == trajectory["recipe"]["method"] == run["method"] == "fusegpt"
    assert len(trajectory["rows"]) == len(trajectory["removed"]) == len(run["rounds"])  # iterative: one per round
    assert all(len(row) == pre["num_blocks"] for row in trajectory["rows"])
    for row, removed in zip(trajectory["rows"], trajectory["removed"]):
        assert row[removed] is not None  # each round scored the block it then removed
    assert all(r["losses"] and r["loss_last"] < r["loss_first"] for r in run["rounds"])


def test_the_example_compares_fusion_with_dropping_and_lora_on_the_same_blocks():
    pre = _shipped()
    room = pre["classroom"]
    names = [r["model"] for r in room["results"]]
    assert names[0] == "original" and names[1].startswith("dropped") and {"fusegpt", "drop+lora"} <= set(names)
    assert pre["baseline_runs"]["drop+lora"]["removed_blocks"] == pre["trajectory"]["removed"]
    assert all(len(g["answers"]) == len(names) and all(a["text"] for a in g["answers"]) for g in room["generations"])
    caption, table, answers = views.classroom_views(pre)
    assert "Precomputed" in caption and str(pre["trajectory"]["removed"]) in caption
    assert list(table["model"]) == names and table["perplexity"].notna().all()
    assert answers.count("gen-card") == sum(len(g["answers"]) for g in room["generations"])
    assert views.classroom_losses(pre).data  # one loss curve per round


def test_no_example_no_view():
    assert views.classroom_views(None)[0] == "" and views.classroom_losses({}) is None


def test_two_models_side_by_side_by_relative_depth(tmp_path):
    from app import plots
    from app.state import make_context

    ctx = make_context(reaper=False, root=tmp_path)
    try:
        figure, caption = views.two_model_view(ctx)
    finally:
        ctx.close()
    assert "Precomputed" in caption and "SmolLM2-135M" in caption and "Gemma-3-270m" in caption
    smol, gemma = figure.data
    assert len(smol.x) == 30 and len(gemma.x) == 18
    for trace in (smol, gemma):
        assert 0 < min(trace.x) < max(trace.x) < 1 and min(trace.y) == 0 and max(trace.y) == 1  # ranks in each
    # the most important block of each model sits at rank 1 at its own relative depth
    mi = json.loads(PRECOMPUTED_PATH.read_text(encoding="utf-8"))["scores"]["mi"]
    top = max(range(30), key=lambda i: mi[i])
    assert smol.y[top] == 1 and smol.x[top] == pytest.approx((top + 0.5) / 30)
    assert plots.depth_profile({"one": [None, None]}).layout.annotations  # nothing to draw: says so
