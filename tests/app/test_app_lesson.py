"""The guided lesson (app/lesson.py) on the tiny test model: guess, reveal, drop, fuse, each step
built on the tabs' own functions, with numbers that agree with each other."""

import math

import pytest

from app import lesson, views
from app.testing import loaded_session, run_job, tiny_context
from fusegpt_core.errors import PlanError


@pytest.fixture
def ctx(tmp_path):
    app = tiny_context(tmp_path)
    yield app
    app.close()


def test_the_lesson_from_guess_to_fusion(ctx):
    session = loaded_session(ctx, "lesson")
    n = session.model_info["blocks"]
    with pytest.raises(PlanError, match="reveal the scores first"):
        lesson.make_drop_job(ctx, session)  # nothing to drop before the scores
    with pytest.raises(PlanError, match="does not exist"):
        lesson.set_guess(session, n)
    assert "Pick the block" in views.lesson_views(session)[0]

    lesson.set_guess(session, 1)
    assert "Scoring" in views.lesson_views(session)[0]  # no scores yet: the reveal waits for them
    snap = run_job(ctx, session, lesson.make_reveal_job(ctx, session), "importance")
    assert snap.status == "done", snap.error
    mi = session.importance["scores"]["mi"]
    least = lesson.least_important(session)
    assert least == min(range(n), key=lambda i: mi[i])
    verdict = lesson.guess_verdict(mi, 1)
    assert verdict["least"] == least and 1 <= verdict["rank"] <= n
    reveal, figure, drop_text, fuse_text = views.lesson_views(session)
    assert f"block **{least}**" in reveal and figure.data and not drop_text and not fuse_text

    snap = run_job(ctx, session, lesson.make_drop_job(ctx, session), "lesson")
    assert snap.status == "done", snap.error
    drop = session.lesson["drop"]
    assert drop["block"] == least and drop["dropped"] > 0 and drop["dense"] > 0
    assert set(drop["answers"]) == {"original", "dropped"}

    snap = run_job(ctx, session, lesson.make_fuse_job(ctx, session), "run", timeout=300)
    assert snap.status == "done", snap.error
    fuse = session.lesson["fuse"]
    report = session.runs[-1].report
    assert report["removed_blocks"] == [least] and report["num_layers_after"] == n - 1  # a real run, on Compare
    # the drop step and the run measured on the same windows: the same original and dropped perplexity
    assert math.isclose(fuse["dense"], drop["dense"], rel_tol=1e-6)
    assert math.isclose(fuse["dropped"], drop["dropped"], rel_tol=1e-6)
    if fuse["dropped"] > fuse["dense"]:
        expected = (fuse["dropped"] - fuse["fused"]) / (fuse["dropped"] - fuse["dense"])
        assert math.isclose(fuse["recovered"], expected)
    text = views.lesson_views(session)[3]
    assert f"{fuse['fused']:.2f}" in text and "Compare" in text

    lesson.set_guess(session, 0)  # a new guess starts the lesson again
    assert session.lesson == {"guess": 0} and not views.lesson_views(session)[2]
