"""Checkpoints after each round, and resuming: the same result as a run that was never stopped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fusegpt_core import resume
from fusegpt_core.config import preset
from fusegpt_core.errors import Cancelled, ResumeError
from fusegpt_core.pipeline import run
from fusegpt_core.testing import sample_text, tiny_loaded_model, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _recipe(method: str, **overrides):
    # settled coefficients train again (the paper's way), so a resumed round must restore them exactly
    return preset("tiny", method=method, remove=3, **{"distill.lr_settled": 1e-3, **overrides})


def _stop_after_round(n: int):
    """should_stop and on_event that cancel the run once `n` rounds have finished."""
    done = []

    def on_event(event):
        if event.kind == "round":
            done.append(event.step)

    return on_event, lambda: len(done) >= n


@pytest.mark.parametrize(
    "method, overrides",
    [("fusegpt", {}), ("fusegpt", {"selection": "one-shot"}), ("drop+lora", {}), ("average", {})],
)
def test_a_resumed_run_equals_one_never_stopped(method, overrides, windows, tmp_path):
    recipe = _recipe(method, **overrides)
    data = (windows[:8], windows[8:12])
    whole = run(recipe, tiny_loaded_model("llama", 6), windows=data)

    on_event, should_stop = _stop_after_round(2)
    loaded = tiny_loaded_model("llama", 6)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with pytest.raises(Cancelled):
        run(recipe, loaded, windows=data, checkpoint_dir=tmp_path, on_event=on_event, should_stop=should_stop)
    folder = resume.latest(tmp_path)
    assert folder is not None and folder.name == "round-001"  # rounds 0 and 1, older ones cleaned up
    assert [p.name for p in (tmp_path / "checkpoint").iterdir()] == ["round-001"]

    resumed = run(recipe, loaded, windows=data, checkpoint_dir=tmp_path, resume_run=True)
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in before.items())  # input untouched
    a, b = whole.report, resumed.report
    assert b["removed_blocks"] == a["removed_blocks"] and len(b["rounds"]) == 3
    assert b["result_ppl"] == a["result_ppl"] and b["dense_ppl"] == a["dense_ppl"]
    assert b["trajectory"] == a["trajectory"]
    sa, sb = whole.model.state_dict(), resumed.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_checkpoint_stores_what_rounds_changed_not_the_model(windows, tmp_path):
    loaded = tiny_loaded_model("llama", 6)
    on_event, should_stop = _stop_after_round(1)
    with pytest.raises(Cancelled):
        run(_recipe("fusegpt"), loaded, windows=(windows[:8], windows[8:12]), checkpoint_dir=tmp_path,
            on_event=on_event, should_stop=should_stop)  # fmt: skip
    folder = resume.latest(tmp_path)
    state = json.loads((folder / "state.json").read_text())
    refs = [e for block in state["blocks"] for e in block["tensors"].values() if "ref" in e]
    assert refs and all(e["ref"] in dict(loaded.model.named_parameters()) for e in refs)
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    assert (folder / "tensors.safetensors").stat().st_size < weights / 2


def test_the_fingerprint_is_the_models_not_where_it_was_read_from(windows, tmp_path):
    from fusegpt_core.loading import load_model

    for name in ("a", "b"):
        tiny_model("llama", num_layers=2).save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    a, b = (load_model(str(tmp_path / name), device="cpu").model for name in ("a", "b"))
    assert a.config._name_or_path != b.config._name_or_path
    assert resume.fingerprint(a, windows) == resume.fingerprint(b, windows)
    b.config.rms_norm_eps *= 2  # the config itself still counts
    assert resume.fingerprint(a, windows) != resume.fingerprint(b, windows)


def test_resume_refuses_another_model_or_text(windows, tmp_path):
    recipe = _recipe("fusegpt")
    on_event, should_stop = _stop_after_round(1)
    with pytest.raises(Cancelled):
        run(recipe, tiny_loaded_model("llama", 6), windows=(windows[:8], windows[8:12]), checkpoint_dir=tmp_path,
            on_event=on_event, should_stop=should_stop)  # fmt: skip
    with pytest.raises(ResumeError, match="another model"):
        run(recipe, tiny_loaded_model("llama", 6, seed=1), windows=(windows[:8], windows[8:12]),
            checkpoint_dir=tmp_path, resume_run=True)  # fmt: skip
    with pytest.raises(ResumeError, match="another calibration"):
        run(recipe, tiny_loaded_model("llama", 6), windows=(windows[1:9], windows[8:12]), checkpoint_dir=tmp_path,
            resume_run=True)  # fmt: skip
    (resume.latest(tmp_path) / "tensors.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ResumeError, match="cannot be read"):
        run(recipe, tiny_loaded_model("llama", 6), windows=(windows[:8], windows[8:12]), checkpoint_dir=tmp_path,
            resume_run=True)  # fmt: skip
    with pytest.raises(ResumeError, match="no checkpoint"):
        run(recipe, tiny_loaded_model("llama", 6), checkpoint_dir=tmp_path / "empty", resume_run=True)


def _fuse(model_dir: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fusegpt_core", "fuse", "--model", str(model_dir), "--remove", "4",
            "--preset", "tiny", "--set", "distill.epochs=6", "--set", "data.n_eval=2", "--calib-text", str(text),
            "--eval-text", str(text), "--out", str(out), "--quiet", "--device", "cpu", *extra]  # fmt: skip


def test_fuse_resume_after_a_real_kill_gives_the_uninterrupted_result(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("llama", num_layers=8).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(sample_text(3000, seed=s) for s in range(8)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    whole = tmp_path / "whole"
    subprocess.run(_fuse(model_dir, text, whole), check=True, env=env, cwd=ROOT, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_fuse(model_dir, text, killed), env=env, cwd=ROOT)
    deadline = time.time() + 300
    while resume.latest(killed) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup, no handler: as a crash or an OOM killer would
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "report.json").exists(), "the run finished before the kill: nothing was tested"
    assert resume.latest(killed) is not None

    done = subprocess.run(
        [sys.executable, "-m", "fusegpt_core", "fuse", "--resume", str(killed), "--quiet"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    a = json.loads((whole / "report.json").read_text())
    b = json.loads((killed / "report.json").read_text())
    assert b["removed_blocks"] == a["removed_blocks"] and b["result_ppl"] == a["result_ppl"]
    assert [r["loss_after"] for r in b["rounds"]] == [r["loss_after"] for r in a["rounds"]]
    assert not (killed / "checkpoint").exists()  # the result is written: the checkpoint went

    from safetensors.torch import load_file

    wa, wb = (
        load_file(str(whole / "model" / "model.safetensors")),
        load_file(str(killed / "model" / "model.safetensors")),
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_flags_are_checked(tmp_path):
    from fusegpt_core.cli import main

    assert main(["fuse", "--resume", str(tmp_path), "--remove", "3"]) == 2
    assert main(["fuse", "--resume", str(tmp_path)]) == 2  # no checkpoint there
