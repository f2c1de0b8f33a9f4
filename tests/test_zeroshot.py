"""Zero-shot accuracy through lm-eval: the bundled offline tasks, the CLI contract, fuse --tasks."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusegpt_core import loading, zeroshot
from fusegpt_core.cli import main
from fusegpt_core.data import bundled_articles, gensim_wiki_path, split_articles
from fusegpt_core.export import model_card
from fusegpt_core.testing import sample_text

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("bundled_cloze", "bundled_nextsent")
needs_corpus = pytest.mark.skipif(
    gensim_wiki_path() is None, reason="the bundled Wikipedia excerpt (gensim's test data) is not installed"
)


def _make_tasks():
    spec = importlib.util.spec_from_file_location("make_tasks", ROOT / "assets" / "make_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(name: str) -> list[dict]:
    path = ROOT / "assets" / "tasks" / name / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def no_network(monkeypatch):
    """Refuses every network connection and records the attempts (a library may swallow the error)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if len(args) > 1 else kwargs)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


def test_bundled_tasks_on_a_tiny_model_give_lm_eval_figures(tiny_dir, tmp_path, no_network):
    out = tmp_path / "zs.json"
    args = ["evaluate", "--model", str(tiny_dir), "--tasks", ",".join(TASKS), "--limit", "3", "--json", str(out)]
    assert main([*args, "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert set(result["tasks"]) == set(TASKS) and result["limit"] == 3
    nextsent, cloze = result["tasks"]["bundled_nextsent"], result["tasks"]["bundled_cloze"]
    for figures in (nextsent, cloze):
        assert set(figures) >= {"acc", "acc_norm", "stderr", "acc_stderr", "acc_norm_stderr", "n"}
        assert figures["n"] == 3 and 0.0 <= figures["acc"] <= 1.0
    # multiple choice: both accuracies, stderr is acc_norm's; the open cloze has no acc_norm
    assert 0.0 <= nextsent["acc_norm"] <= 1.0 and nextsent["stderr"] == nextsent["acc_norm_stderr"]
    assert cloze["acc_norm"] is None and cloze["stderr"] == cloze["acc_stderr"]


def test_task_list_puts_the_bundled_tasks_first(capsys):
    assert main(["evaluate", "--tasks", "list"]) == 0
    names = capsys.readouterr().out.split()
    assert tuple(names[: len(TASKS)]) == TASKS
    assert not any(n.startswith("bundled") for n in names[len(TASKS) :])
    assert set(zeroshot.PAPER_TASKS) <= set(names)


def test_unknown_task_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fusegpt_core", "evaluate", "--tasks", "bundled_nope", "--model", "/no/such"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "unknown task 'bundled_nope'" in proc.stderr and "bundled_nextsent" in proc.stderr


def test_unknown_hub_task_names_the_way_to_list(monkeypatch, capsys):
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=2.0: True)
    assert main(["evaluate", "--tasks", "bundled_cloze,no_such_task_xyz", "--model", "/no/such"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no_such_task_xyz" in err and "--tasks list" in err


def test_hub_tasks_without_the_hub_fail_fast(offline_hub, capsys):
    start = time.perf_counter()
    argv = ["evaluate", "--tasks", ",".join(zeroshot.PAPER_TASKS), "--model", "/no/such", "--limit", "5"]
    assert main(argv) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot be reached" in err and "bundled_nextsent" in err


def test_limit_needs_tasks_and_must_be_positive(capsys):
    assert main(["evaluate", "--limit", "5", "--model", "/no/such"]) == 2
    assert main(["evaluate", "--tasks", "bundled_cloze", "--limit", "0", "--model", "/no/such"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "--limit needs --tasks" in lines[0] and "at least 1" in lines[1]


def test_fuse_checks_its_tasks_before_loading_anything(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["fuse", "--model", "/no/such", "--tasks", "list", "--out", out]) == 2
    assert main(["fuse", "--model", "/no/such", "--tasks", "bundled_nope", "--out", out]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "--tasks list" in lines[0] and "bundled_nope" in lines[1]
    assert not (tmp_path / "run").exists()


@needs_corpus
def test_shipped_task_files_are_what_make_tasks_builds(tmp_path):
    counts = _make_tasks().build(tmp_path)
    for name in TASKS:
        for suffix in (".yaml", ".jsonl"):
            shipped = ROOT / "assets" / "tasks" / name / f"{name}{suffix}"
            assert (tmp_path / name / f"{name}{suffix}").read_bytes() == shipped.read_bytes(), shipped
        assert counts[name] >= 1000
    size = sum(p.stat().st_size for p in (ROOT / "assets" / "tasks").rglob("*") if p.is_file())
    assert size < 2_000_000


@needs_corpus
def test_items_come_from_evaluation_articles_only():
    calibration, evaluation = split_articles(bundled_articles(), seed=0)
    eval_text = dict(evaluation)
    calib_titles = {title for title, _ in calibration}
    for row in _rows("bundled_nextsent"):
        assert row["title"] in eval_text and not set(row["choice_titles"]) & calib_titles
        assert row["context"] in eval_text[row["title"]]
        true_next = row["choices"][row["label"]]
        assert row["choice_titles"][row["label"]] == row["title"]
        assert row["context"] + " " + true_next in eval_text[row["title"]]
        for choice, title in zip(row["choices"], row["choice_titles"]):
            assert choice in eval_text[title]
        # distractors: three other articles, lengths close to the true sentence's
        assert len(set(row["choice_titles"])) == 4
        assert all(abs(len(c) - len(true_next)) <= 0.16 * len(true_next) for c in row["choices"])
    for row in _rows("bundled_cloze"):
        assert row["title"] in eval_text and row["title"] not in calib_titles
        assert row["context"] + " " + row["target"] in eval_text[row["title"]]


def test_fuse_tasks_go_into_the_report_and_the_card(tiny_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(sample_text(3000, seed=s) for s in range(8)))
    out = tmp_path / "run"
    code = main(
        ["fuse", "--model", str(tiny_dir), "--remove", "2", "--preset", "tiny", "--set", "data.n_eval=2"]
        + ["--calib-text", str(text), "--eval-text", str(text), "--out", str(out), "--quiet"]
        + ["--tasks", "bundled_cloze", "--limit", "2"]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    zero_shot = report["zero_shot"]
    assert zero_shot["limit"] == 2
    for label in ("original", "dropped", "result"):
        assert zero_shot[label]["bundled_cloze"]["n"] == 2
    assert "zero_shot" in report["seconds"]
    card = (out / "model" / "README.md").read_text()
    assert "bundled_cloze (acc)" in card and "| this model |" in card


def test_model_card_table_shows_acc_norm_with_its_stderr():
    figures = {"acc": 0.3, "acc_norm": 0.45, "stderr": 0.0157, "n": 1000}
    dropped = {**figures, "acc_norm": 0.34}
    report = {"method": "fusegpt", "zero_shot": {"original": {"t": figures}, "dropped": {"t": dropped}, "result": {}}}
    card = model_card(report)
    assert "| t (acc_norm) |" in card and "| original | 0.450 ± 0.016 |" in card
    assert "| the same blocks deleted, no repair | 0.340 ± 0.016 |" in card and "1000 items" in card
