"""The Export tab's GGUF export on the tiny test model (a Llama with a byte-level BPE tokenizer, which GGUF
holds): the job writes one file per tensor type into the session folder, measures each file read back on
the run's own evaluation windows and adds its row to the run's report, which the Compare table shows.
What GGUF cannot hold is refused at the button: one warning, a red status line, no job, no file."""

import types
import warnings
from pathlib import Path

import pytest

from app import views, work
from app.jobs import DONE
from app.state import RunRecord
from app.testing import loaded_session, run_job, tiny_context
from app.ui import build_ui
from fusegpt_core.config import preset
from fusegpt_core.testing import sample_text, state_hash, tiny_model, tiny_tokenizer

TEXT = "text:" + sample_text(30000)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    ctx = tiny_context(tmp_path_factory.mktemp("gguf-sessions"), grace_s=60)
    yield ctx
    ctx.close()


@pytest.fixture(scope="module")
def ui(app):
    demo = build_ui(app)
    assert "export_gguf" in {fn.api_name for fn in demo.fns.values()}  # API clients (and MCP) can call it
    return demo.fusegpt_ui


@pytest.fixture(scope="module")
def fused(app):
    """A session with the test model loaded and one FuseGPT run (its model still has fused layers)."""
    session = loaded_session(app, "gguf-visitor")
    # the tiny preset, cut further (one epoch on four windows): the fused layers are what matters here
    knobs = {"data.calib_source": TEXT, "data.eval_source": TEXT, "data.n_calib": 4, "distill.epochs": 1}
    recipe = preset("tiny", blocks=[4], **knobs)
    snap = run_job(app, session, work.make_run_job(app, session, recipe), kind="run")
    assert snap.status == DONE, snap.error
    return session, session.runs[-1]


def test_gguf_export_writes_measures_and_joins_the_compare_table(app, fused):
    session, run = fused
    base_before = state_hash(session.loaded.model)
    versions = dict(session.versions)
    snap = run_job(app, session, work.make_gguf_job(app, session, run.id, ["f16", "q4_0"]), kind="gguf")
    assert snap.status == DONE, snap.error

    folder = session.workdir / "gguf"
    rows = {row["quant"]: row for row in run.report["quantised"]}
    assert list(rows) == ["f16", "q4_0"]
    for quant, row in rows.items():
        path = folder / f"fused-run{run.id}-fusegpt-{quant}.gguf"
        assert row["file"] == str(path) and row["file_bytes"] == path.stat().st_size
        assert row["compression"] == pytest.approx(row["file_bytes"] / (2 * run.report["params_before"]))
    # measured on the run's own windows: the f16 file reads back as the run's result
    assert rows["f16"]["ppl"] == pytest.approx(run.report["result_ppl"], rel=0.005)
    assert rows["q4_0"]["file_bytes"] < rows["f16"]["file_bytes"]
    assert session.exports["gguf"] == [Path(rows["f16"]["file"]), Path(rows["q4_0"]["file"])]
    assert session.versions["runs"] > versions["runs"] and session.versions["export"] > versions["export"]
    assert state_hash(session.loaded.model) == base_before  # the shared base model is untouched

    table, _, _ = views.compare_views(session)
    gguf_rows = [m for m in table["model"] if "GGUF" in m]
    assert [m.split(" GGUF")[0] for m in gguf_rows] == ["#1 fusegpt + f16", "#1 fusegpt + q4_0"]

    # a type written again replaces its file and its row (the API takes the types as text too)
    snap = run_job(app, session, work.make_gguf_job(app, session, run.id, "f16"), kind="gguf")
    assert snap.status == DONE, snap.error
    assert [row["quant"] for row in run.report["quantised"]] == ["q4_0", "f16"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(Path(p).name for p in session.exports["gguf"])
    assert len(session.exports["gguf"]) == 2


def test_the_page_shows_the_files_and_keeps_the_run_chosen(app, ui, fused):
    session, run = fused
    if not run.report.get("quantised"):  # run alone: write one file
        assert run_job(app, session, work.make_gguf_job(app, session, run.id, ["q8_0"])).status == DONE
    out = ui.render(session, {})
    assert out[ui.export.gguf_files] == [row["file"] for row in run.report["quantised"]]
    seen = out[ui.seen]
    session.bump("runs")  # what a GGUF export does: the compare table is redrawn, the run choice stays
    out = ui.render(session, seen)
    assert ui.compare.table in out and ui.export.run_dd not in out


def _press(ui, session_key: str, run_id, quants) -> tuple[str, list[str]]:
    """Press 'Export as GGUF' as gradio would; returns the status line and the warnings shown."""
    request = types.SimpleNamespace(session_hash=session_key, username=None)
    with warnings.catch_warnings(record=True) as shown:  # gr.Warning outside a page: a Python warning
        warnings.simplefilter("always")
        status, _ = ui.export.export_gguf(run_id, quants, request)
    return status, [str(w.message) for w in shown]


@pytest.mark.parametrize(
    "run_id, quants, message",
    [
        (1, ["q8_0"], "does not support the architecture 'gpt2'"),
        (2, ["q8_0"], "was released to save memory"),
        (1, [], "no quantisation given"),
        (1, "q5_k", "quantisation 'q5_k' is not supported"),  # through the API: any text
        (7, ["q8_0"], "run 7 is not in this session"),
    ],
    ids=["unsupported architecture", "model released", "no type", "unknown type", "no such run"],
)
def test_what_gguf_cannot_hold_is_refused_with_one_message(app, ui, run_id, quants, message):
    session = app.sessions.get("gguf-refusals")
    if not session.runs:
        gpt2 = RunRecord(id=1, label="#1 drop", method="drop", report={"removed_blocks": [1]},
                         model=tiny_model("gpt2", num_layers=2), tokenizer=tiny_tokenizer())  # fmt: skip
        released = RunRecord(id=2, label="#2 drop", method="drop", report={}, model=None, tokenizer=None)
        session.add_run(gpt2, keep_models=3)
        session.add_run(released, keep_models=3)
    jobs = list(session.jobs)
    status, shown = _press(ui, session.key, run_id, quants)
    assert status.startswith("✖") and message in status and "Traceback" not in status, status
    assert len(shown) == 1 and message in shown[0], shown
    assert session.jobs == jobs and not (session.workdir / "gguf").exists()
    assert all("quantised" not in r.report for r in session.runs)


def test_no_run_yet_is_a_warning(app, ui):
    status, shown = _press(ui, "gguf-nothing-yet", None, ["q8_0"])
    assert shown == ["No run to export yet: run a plan first."]
