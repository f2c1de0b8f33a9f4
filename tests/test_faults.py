"""Faults: stops at any moment, a loss that turns NaN, a process killed while writing, a full disk, visitor-typed
names, and a Hub token that must not outlive its push.

Everything runs on tiny in-process models; the kill tests start a small Python child and `kill -9` it mid-write.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import types
from collections import deque
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fusegpt_core import distill, loading
from fusegpt_core.config import preset
from fusegpt_core.errors import Cancelled, ModelLoadError
from fusegpt_core.evaluate import perplexity
from fusegpt_core.export import ExportError, export_model, zip_folder
from fusegpt_core.pipeline import run
from fusegpt_core.testing import sample_text, state_hash, tiny_loaded_model, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT = "text:" + sample_text(30000)
TOKEN = "hf_SECRETtoken0123456789abcdefXYZ"


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir()) if folder.parent.exists() else []


# ---------------------------------------------------------------------------------------------------------------
# the app: one context, a session with the tiny model loaded


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    pytest.importorskip("gradio")
    from app.testing import tiny_context

    ctx = tiny_context(tmp_path_factory.mktemp("fault-sessions"))
    yield ctx
    ctx.close()


def _do(app, session, fn, kind="job", timeout=180):
    from app.testing import run_job

    return run_job(app, session, fn, kind, timeout)


def _loaded_session(app, key):
    from app.testing import loaded_session

    return loaded_session(app, key)


def _run(app, session, **overrides):
    from app import work

    recipe = preset("tiny", **{"data.calib_source": TEXT, "data.eval_source": TEXT, **overrides})
    return _do(app, session, work.make_run_job(app, session, recipe), "run")


def _responsive(app, session) -> None:
    """The app still answers: a generation job finishes in seconds."""
    from app import work

    snap = _do(app, session, work.make_generate_job(session, "Hello", {"max_new_tokens": 4}), "generate", timeout=60)
    assert snap.status == "done", snap.error


# ---------------------------------------------------------------------------------------------------------------
# stop at any moment


def _stages_of_a_full_run(windows) -> list[tuple[str, int]]:
    """(stage, occurrence) of every stage event of a complete run, in order."""
    seen: list[tuple[str, int]] = []
    counts: dict[str, int] = {}

    def on_event(e):
        if e.kind == "stage":
            counts[e.stage] = counts.get(e.stage, 0) + 1
            seen.append((e.stage, counts[e.stage]))

    run(_speed_recipe(), tiny_loaded_model("llama", 6), on_event=on_event, windows=windows)
    return seen


def _speed_recipe():
    return preset("tiny", **{"eval.measure_speed": True, "eval.speed_tokens": 4})


def test_a_stop_at_every_stage_leaves_the_original_usable(windows):
    """Stop requested at each stage event of a run (first, second... occurrence): the run either raises Cancelled
    (nothing returned) or, past the last check, returns a complete result; the input model never changes."""
    split = (windows[:8], windows[8:])
    stages = _stages_of_a_full_run(split)
    assert {s for s, _ in stages} >= {"data", "evaluate", "copy", "score", "fuse", "finetune", "fold", "speed"}
    loaded = tiny_loaded_model("llama", 6)
    before, ppl_before = state_hash(loaded.model), perplexity(loaded.model, windows[8:])
    outcomes = {}
    for target in stages:
        counts: dict[str, int] = {}
        flag = {"stop": False}

        def on_event(e, target=target, counts=counts, flag=flag):
            if e.kind == "stage":
                counts[e.stage] = counts.get(e.stage, 0) + 1
                if (e.stage, counts[e.stage]) == target:
                    flag["stop"] = True

        try:
            result = run(
                _speed_recipe(), loaded, on_event=on_event, should_stop=lambda f=flag: f["stop"], windows=split
            )
            outcomes[target] = "complete"
            assert result.report["status"] == "done" and not result.report["partial"]
        except Cancelled:
            outcomes[target] = "cancelled"
        assert state_hash(loaded.model) == before, target
    assert perplexity(loaded.model, windows[8:]) == ppl_before
    print(f"\nstop at each of {len(stages)} stage events: {outcomes}")
    # everything up to the last perplexity is cancellable; only what follows it may finish
    cancellable = [t for t in stages if t[0] not in ("speed", "done")]
    assert all(outcomes[t] == "cancelled" for t in cancellable), outcomes


def test_a_stop_during_scoring_in_the_app(app):
    from app import work

    session = _loaded_session(app, "stop-scoring")
    before_model, before_importance = state_hash(session.loaded.model), session.importance
    job = app.runner.submit(
        work.make_importance_job(
            app, session, calib_source=TEXT, metrics=["mi", "ppl"], seq_len=256, n_score=24, seed=0, use_cache=False
        ),
        owner=session.key,
        kind="importance",
    )
    session.jobs.append(job)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        snap = app.runner.snapshot(job)
        if snap.stage == "score" and snap.step >= 1 or snap.finished:
            break
        time.sleep(0.02)
    assert snap.stage == "score" and not snap.finished, (snap.stage, snap.status)
    app.runner.cancel(job)
    snap = app.runner.wait(job, timeout=60)
    assert snap.status == "cancelled", (snap.status, snap.error)
    assert session.importance is before_importance
    assert state_hash(session.loaded.model) == before_model
    _responsive(app, session)


def test_a_stop_right_before_export_writes_nothing(app):
    from app import work
    from app.jobs import JobContext

    session = _loaded_session(app, "stop-export")
    assert _run(app, session, blocks=[4]).status == "done"
    record = session.runs[-1]

    class Stopped(JobContext):
        def __init__(self):
            self._job = types.SimpleNamespace(stop_event=types.SimpleNamespace(is_set=lambda: True))

        def stage(self, *args, **kwargs):
            pass

    with pytest.raises(Cancelled):
        work.do_export(session, Stopped(), record.id)
    exports = session.workdir / "exports"
    assert not exports.exists() or list(exports.iterdir()) == []
    assert record.export_dir is None and record.zip_path is None and session.exports is None
    _responsive(app, session)


def test_an_interrupt_while_saving_leaves_no_folder(tmp_path, monkeypatch):
    """Ctrl-C (or any exception) in the middle of writing the weights: no export folder, no temporary."""
    import transformers.modeling_utils as modeling_utils

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(modeling_utils, "safe_save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model(tiny_model("llama", 4), tiny_tokenizer(), tmp_path / "out", {"recipe": {}})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# a loss that becomes NaN: the round is rolled back and the run says so


class _NaNAfter:
    """The mse loss, but NaN from the `after`-th training step on (probes without gradients stay finite)."""

    def __init__(self, after: int):
        self.after, self.calls = after, 0

    def __call__(self, student, teacher):
        value = distill.mse_loss(student, teacher)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls >= self.after:
                return value * float("nan")
        return value


def _out_of_memory_at_training(student, teacher):
    if torch.is_grad_enabled():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.6 GiB total)")
    return distill.mse_loss(student, teacher)


def test_out_of_memory_is_one_clear_message_and_changes_nothing(app, monkeypatch, capfd, tmp_path, windows):
    """Simulated: the device runs out of memory in group fine-tuning. The library raises a message that
    names the knobs; the command line prints it as one line (exit 2); an app job fails with it."""
    from fusegpt_core.cli import main
    from fusegpt_core.errors import OutOfMemory

    monkeypatch.setitem(distill.LOSSES, "mse", _out_of_memory_at_training)
    loaded = tiny_loaded_model("llama", 6)
    base = state_hash(loaded.model)
    with pytest.raises(OutOfMemory, match="ran out of memory .* during 'finetune'.*distill.batch_size") as info:
        run(preset("tiny", blocks=[3]), loaded, windows=(windows[:8], windows[8:]))
    assert "\n" not in str(info.value) and state_hash(loaded.model) == base

    folder = tmp_path / "tiny"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(sample_text(20000))
    capfd.readouterr()
    argv = ["fuse", "--model", str(folder), "--preset", "tiny", "--blocks", "3", "--calib-text", str(text),
            "--eval-text", str(text), "--out", str(tmp_path / "out"), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    _, err = capfd.readouterr()
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ran out of memory"), err
    assert "Traceback" not in err and not (tmp_path / "out" / "model").exists()

    session = _loaded_session(app, "oom")
    snap = _run(app, session, blocks=[4])
    assert snap.status == "failed" and "ran out of memory" in snap.error and "internal error" not in snap.error


def test_nan_loss_rolls_the_round_back_through_the_app(app, monkeypatch):
    from app import views, work

    session = _loaded_session(app, "nan")
    base = state_hash(session.loaded.model)
    steps_per_round = 2 * math.ceil(8 / 4)  # tiny preset: 2 epochs of 8 windows in batches of 4
    monkeypatch.setitem(distill.LOSSES, "mse", _NaNAfter(steps_per_round + 2))  # round 2, its second step
    snap = _run(app, session, blocks=[4, 1])
    assert snap.status == "done", snap.error  # the job reports; it does not crash
    assert any("rolled back" in line for line in snap.log), snap.log
    report = session.runs[-1].report
    assert report["status"] == "diverged" and report["partial"]
    assert report["removed_blocks"] == [4] and report["num_layers_after"] == 5
    assert "became nan" in report["rounds"][-1]["error"]
    assert math.isfinite(report["result_ppl"])
    diverged = session.runs[-1].model
    assert all(torch.isfinite(p).all() for p in diverged.parameters())
    table, _, _ = views.compare_views(session)
    assert any("(diverged)" in str(m) for m in table["model"]), table

    # the rolled-back model is exactly the model after round 1: the same as a run that only removes block 4
    monkeypatch.setitem(distill.LOSSES, "mse", distill.mse_loss)
    assert _run(app, session, blocks=[4]).status == "done"
    clean = session.runs[-1].model
    assert diverged.state_dict().keys() == clean.state_dict().keys()
    assert all(torch.equal(diverged.state_dict()[k], clean.state_dict()[k]) for k in clean.state_dict())
    assert state_hash(session.loaded.model) == base

    # an export of the partial run says so in its model card
    snap = _do(app, session, work.make_export_job(session, session.runs[-2].id), "export")
    assert snap.status == "done", snap.error
    card = (session.runs[-2].export_dir / "README.md").read_text()
    assert "Partial result" in card and "diverged" in card


# ---------------------------------------------------------------------------------------------------------------
# kill -9 in the middle of writing an export or the model cache

CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    import transformers.modeling_utils as modeling_utils

    real_save = modeling_utils.safe_save_file

    def half_written(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:  # as if the kill came halfway through the file
            handle.truncate(os.path.getsize(filename) // 2)
        print("MID-WRITE", flush=True)
        time.sleep(600)

    modeling_utils.safe_save_file = half_written
    from fusegpt_core.testing import tiny_model, tiny_tokenizer

    mode, target = sys.argv[1], Path(sys.argv[2])
    model, tokenizer = tiny_model("llama", 4), tiny_tokenizer()
    if mode == "export":
        from fusegpt_core.export import export_model

        export_model(model, tokenizer, target, {{"recipe": {{}}, "model": "tiny"}})
    else:
        from fusegpt_core import loading

        loading.save_atomically(model, tokenizer, target, {{"format": 1, "source": "killed"}})
    print("FINISHED", flush=True)
    """
)


def _kill_mid_write(tmp_path: Path, mode: str, target: Path) -> int:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    child = subprocess.Popen(
        ["nice", "-n", "19", sys.executable, str(script), mode, str(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    try:
        ready, _, _ = select.select([child.stdout], [], [], 180)
        assert ready, "the child never reached the write"
        line = child.stdout.readline()  # the child is mid-write (or died: then this is empty)
        assert line.strip() == "MID-WRITE", line
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return child.pid


def test_kill_9_during_export(tmp_path):
    target = tmp_path / "exports" / "smol-fused"
    pid = _kill_mid_write(tmp_path, "export", target)
    assert not target.exists()  # nothing that looks finished
    leftovers = [p for p in target.parent.iterdir() if p.name.startswith(".smol-fused.partial-")]
    assert len(leftovers) == 1 and f"-{pid}-" in leftovers[0].name
    assert (leftovers[0] / "model.safetensors").exists() and not (leftovers[0] / "tokenizer.json").exists()
    with pytest.raises(ModelLoadError, match="No such file or folder"):
        loading.load_model(str(target), device="cpu")
    # the next export writes a complete folder and removes the dead writer's leftovers
    model, tokenizer = tiny_model("llama", 4), tiny_tokenizer()
    export_model(model, tokenizer, target, {"recipe": {}, "model": "tiny"})
    assert _siblings(target) == ["smol-fused"]
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    assert reloaded.config.num_hidden_layers == 4
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-6)


def test_kill_9_while_writing_the_model_cache(tmp_path):
    target = tmp_path / "cache" / "gguf-smol-0123"
    pid = _kill_mid_write(tmp_path, "cache", target)
    assert not target.exists() and not loading.cache_is_complete(target)
    leftovers = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.tmp-{pid}-")]
    assert len(leftovers) == 1 and not (leftovers[0] / loading.CACHE_MARKER).exists()
    # the next start: the dead writer's temporary is swept, a fresh write completes with its marker
    loading._remove_stale_temporaries(target)
    assert list(target.parent.iterdir()) == []
    marker = {"format": 1, "source": "again"}
    loading.save_atomically(tiny_model("llama", 4), tiny_tokenizer(), target, marker)
    assert loading.cache_is_complete(target, marker) and _siblings(target) == [target.name]
    assert AutoModelForCausalLM.from_pretrained(target).config.num_hidden_layers == 4


def test_a_cache_folder_without_its_marker_is_not_trusted(tmp_path):
    """A folder renamed into place by an older writer, or copied by hand, but without the completion marker."""
    folder = tmp_path / "cache" / "half"
    tiny_model("llama", 4).save_pretrained(folder)
    assert not loading.cache_is_complete(folder)
    (folder / loading.CACHE_MARKER).write_text("{not json")
    assert not loading.cache_is_complete(folder)


# ---------------------------------------------------------------------------------------------------------------
# a full disk


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["weights", "tokenizer", "report", "rename"])
def test_a_full_disk_during_export(where, tmp_path, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    from fusegpt_core import export

    model, tokenizer = tiny_model("llama", 4), tiny_tokenizer()
    if where == "weights":

        def half_then_full(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"\0" * 1000)
            _enospc()

        monkeypatch.setattr(modeling_utils, "safe_save_file", half_then_full)
    elif where == "tokenizer":
        monkeypatch.setattr(tokenizer, "save_pretrained", _enospc)
    elif where == "report":
        monkeypatch.setattr(export, "write_json", _enospc)
    else:  # the final rename of the folder (files inside are replaced by other calls)
        real_replace = os.replace
        monkeypatch.setattr(
            export.os, "replace", lambda src, dst: _enospc() if Path(src).is_dir() else real_replace(src, dst)
        )
    target = tmp_path / "exports" / "out"
    with pytest.raises(ExportError, match="the disk is full. Nothing was left behind"):
        export_model(model, tokenizer, target, {"recipe": {}, "model": "tiny"})
    assert list(target.parent.iterdir()) == []


def test_a_full_disk_while_zipping(tmp_path, monkeypatch):
    import shutil

    folder = export_model(tiny_model("llama", 4), tiny_tokenizer(), tmp_path / "out", {"recipe": {}})

    def partial_archive(base_name, *args, **kwargs):
        Path(f"{base_name}.zip").write_bytes(b"PK partial")
        _enospc()

    monkeypatch.setattr(shutil, "make_archive", partial_archive)
    with pytest.raises(ExportError, match="the disk is full"):
        zip_folder(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_full_disk_while_caching_a_model(tmp_path, monkeypatch):
    model, tokenizer = tiny_model("llama", 4), tiny_tokenizer()
    monkeypatch.setattr(tokenizer, "save_pretrained", _enospc)
    with pytest.raises(OSError):
        loading.save_atomically(model, tokenizer, tmp_path / "cache" / "m", {"format": 1})
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_full_disk_during_an_app_export(app, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    from app import views, work

    session = _loaded_session(app, "disk-full")
    assert _run(app, session, blocks=[4]).status == "done"
    record = session.runs[-1]
    monkeypatch.setattr(modeling_utils, "safe_save_file", _enospc)
    snap = _do(app, session, work.make_export_job(session, record.id), "export")
    assert snap.status == "failed" and "the disk is full" in snap.error
    assert "the disk is full" in views.status_text(snap)
    exports = session.workdir / "exports"
    assert not exports.exists() or list(exports.iterdir()) == []
    assert record.export_dir is None and session.exports is None
    monkeypatch.undo()
    snap = _do(app, session, work.make_export_job(session, record.id), "export")  # space again: it works
    assert snap.status == "done", snap.error
    assert (record.export_dir / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------
# names a visitor types


@pytest.mark.parametrize("run_id", ["../../etc/passwd", "1/../../x", "-1", "1e3", "/tmp/x", "1; rm -rf /"])
def test_the_app_export_refuses_odd_run_names(app, run_id, recwarn):
    from app.state import make_context
    from app.ui import build_ui

    ctx = make_context(test_model="tiny", reaper=False, root=app.sessions.root / "traversal")
    try:
        demo = build_ui(ctx)
        handler = next(fn.fn for fn in demo.fns.values() if fn.api_name == "export")
        before = sorted(p for p in ctx.sessions.root.parent.rglob("*"))
        out = handler(run_id, types.SimpleNamespace(session_hash="visitor"))
        shown = out[3]
        assert isinstance(shown, str) and shown.startswith("✖"), out
        assert "whole number" in shown or "not in this session" in shown
        assert sorted(p for p in ctx.sessions.root.parent.rglob("*")) == before
    finally:
        ctx.close()


def test_session_folders_stay_inside_the_app_folder(app):
    for key in ("../../evil", "/etc", "a/../../b", "..", ""):
        session = app.sessions.get(key)
        assert session.workdir.resolve().parent == app.sessions.root.resolve()


def test_an_app_export_of_the_same_run_keeps_the_existing_folder(app):
    from app import work

    session = _loaded_session(app, "twice")
    assert _run(app, session, blocks=[4]).status == "done"
    record = session.runs[-1]
    assert _do(app, session, work.make_export_job(session, record.id), "export").status == "done"
    weights = record.export_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert _do(app, session, work.make_export_job(session, record.id), "export").status == "done"
    assert weights.stat().st_mtime_ns == stamp  # reused, not silently rewritten
    with pytest.raises(ExportError, match="already exists"):
        export_model(record.model, record.tokenizer, record.export_dir, record.report)


# ---------------------------------------------------------------------------------------------------------------
# a Hub token: used for its push only


class FakeHfApi:
    """Records what the push did; the upload fails with a message that quotes the token, as HTTP errors may."""

    calls: list[tuple] = []
    fail = True

    def __init__(self, token=None, **kwargs):
        FakeHfApi.calls.append(("init", token))
        self._token = token

    def create_repo(self, repo_id, private=True, exist_ok=False, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, private))

    def upload_folder(self, folder_path, repo_id, **kwargs):
        FakeHfApi.calls.append(("upload_folder", folder_path, repo_id))
        logging.getLogger("huggingface_hub.fake").info("uploading %s", folder_path)
        if FakeHfApi.fail:
            raise RuntimeError(f"401 Client Error: Unauthorized (Authorization: Bearer {self._token})\ndetails")


def _strings_reachable_from(root, limit: int = 400_000):
    """Every str reachable from `root` through containers, attributes and closures (models skipped)."""
    seen, queue, out = set(), deque([root]), []
    while queue and len(seen) < limit:
        obj = queue.popleft()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, str):
            out.append(obj)
            continue
        if isinstance(obj, (bytes, int, float, bool, type(None), torch.Tensor, torch.nn.Module, types.ModuleType)):
            continue
        if isinstance(obj, dict):
            queue.extend(obj.keys())
            queue.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset, deque)):
            queue.extend(obj)
        elif isinstance(obj, types.FunctionType):
            queue.extend(c.cell_contents for c in obj.__closure__ or () if _has_contents(c))
            queue.extend(obj.__defaults__ or ())
        elif isinstance(obj, BaseException):
            queue.extend(obj.args)
            queue.extend(x for x in (obj.__cause__, obj.__context__) if x is not None)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            queue.extend(vars(obj).values())
    return out


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("upload_fails", [True, False])
def test_a_hub_token_is_used_for_its_push_only(app, monkeypatch, caplog, capfd, upload_fails, recwarn):
    import huggingface_hub

    from app.ui import build_ui, launch_kwargs

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls, FakeHfApi.fail = [], upload_fails
    caplog.set_level(logging.DEBUG)
    session = _loaded_session(app, f"token-{upload_fails}")
    assert _run(app, session, blocks=[4]).status == "done"
    record = session.runs[-1]

    demo = build_ui(app)
    push = next(fn.fn for fn in demo.fns.values() if fn.name == "push")
    cleared, status, _ = push(str(record.id), "me/smol-fused", TOKEN, types.SimpleNamespace(session_hash=session.key))
    assert cleared == ""  # the password box is emptied at once
    job = session.jobs[-1]
    snap = app.runner.wait(job, timeout=120)
    del push, demo

    # the call used the token, and only the call
    assert ("init", TOKEN) in FakeHfApi.calls and ("create_repo", "me/smol-fused", True) in FakeHfApi.calls
    if upload_fails:
        assert snap.status == "failed" and "401 Client Error" in snap.error and "***" in snap.error
    else:
        assert snap.status == "done" and session.exports["pushed"] == "https://huggingface.co/me/smol-fused"
    # nowhere afterwards: not in the files, the logs, the job, the session or anything the app holds
    for path in session.workdir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert {"report.json", "recipe.json", "README.md"} <= {p.name for p in record.export_dir.iterdir()}
    out, err = capfd.readouterr()
    assert TOKEN not in out and TOKEN not in err and TOKEN not in caplog.text
    visible = app.runner.snapshot(job)
    assert TOKEN not in json.dumps([visible.title, visible.message, visible.error, visible.log, visible.live])
    gc.collect()
    strings = _strings_reachable_from(app)
    assert any("me/smol-fused" in s for s in strings)  # the walk does reach the push job and the session
    assert [s for s in strings if TOKEN in s] == []
    assert launch_kwargs()["run_history"] is False  # gradio keeps no copy of the call's inputs in the page
