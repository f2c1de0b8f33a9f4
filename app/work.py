"""The bodies of the app's background jobs: each calls fusegpt_core and stores its result in the session.

No gradio here. `make_*_job` functions check what can be checked at once (raising FuseGPTError
for the UI to show) and return a closure for `JobRunner.submit`. The closures run on the job
worker thread, report progress through the JobContext and write results into the Session,
bumping the view versions that the UI's timer renders.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fusegpt_core.config import Recipe, check_seq_len
from fusegpt_core.errors import ModelLoadError, PlanError

from . import gpu
from .estimate import estimate_run, mi_pass_forwards
from .jobs import JobContext
from .plan import Plan
from .recipes import RunSettings, TextChoice, build_recipe, effective_knobs
from .state import TEST_SOURCE, AppContext, RunRecord, Session

log = logging.getLogger("fusegpt.app.work")

Job = Callable[[JobContext], Any]
TIMING_SEQ_LEN = 128


# ---- model --------------------------------------------------------------------------------------


def load_fn(app: AppContext, source: str, device: str | None, dtype: str | None, trust: bool):
    if source == TEST_SOURCE:
        if not app.test_model:
            raise ModelLoadError("the test model is only offered when FUSEGPT_APP_TEST_MODEL is set.")

        def load():
            from fusegpt_core.testing import tiny_loaded_model

            return tiny_loaded_model(family="llama", num_layers=6, seed=0)

        return load

    def load():
        from fusegpt_core.loading import load_model

        return load_model(source, device=device, dtype=dtype, trust_remote_code=trust)

    return load


@torch.no_grad()
def time_block_forward(loaded, seq_len: int = TIMING_SEQ_LEN, repeats: int = 2) -> float:
    """Seconds for one block forward on one window of `seq_len` tokens (a whole forward / blocks)."""
    from fusegpt_core.adapters import num_blocks

    model = loaded.model
    vocab = int(getattr(model.config, "vocab_size", 256))
    ids = torch.arange(seq_len, device=loaded.device).remainder(vocab).unsqueeze(0)  # (1, seq)
    best = float("inf")
    for _ in range(repeats):
        if loaded.device.type == "cuda":
            torch.cuda.synchronize(loaded.device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if loaded.device.type == "cuda":
            torch.cuda.synchronize(loaded.device)
        best = min(best, time.perf_counter() - start)
    return best / max(num_blocks(model), 1)


@torch.no_grad()
def time_decode_token(loaded, new_tokens: int = 4) -> float:
    """Seconds per generated token with the KV cache (greedy, after a warm-up): the decode-speed
    stage of a run costs about this per token, which a batch forward says nothing about."""
    from fusegpt_core.evaluate import decode_speed

    return 1.0 / decode_speed(loaded.model, loaded.tokenizer, new_tokens, repeats=1)["median"]


def do_load(app: AppContext, session: Session, jc: JobContext, source: str, device, dtype, trust: bool) -> None:
    from fusegpt_core.adapters import num_blocks
    from fusegpt_core.loading import bundled_licence

    source = (source or "").strip()
    if not source:
        raise ModelLoadError("no model given: choose the bundled model, a local path or a Hub id.")
    jc.stage("load", f"loading {source}")
    loaded, cached = app.models.get(model_key(source, device, dtype, trust), load_fn(app, source, device, dtype, trust))
    jc.check()
    jc.stage("timing", "timing one block forward and one decode step (for run-time estimates)")
    block_s = time_block_forward(loaded)
    decode_s = time_decode_token(loaded)
    n = num_blocks(loaded.model)
    info = {
        "source": loaded.source,
        "origin": loaded.origin,
        "key": source,
        "load_key": list(model_key(source, device, dtype, trust)),
        "model_type": loaded.model_type,
        "blocks": n,
        "params": loaded.num_params,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "load_seconds": loaded.load_seconds if not cached else loaded.load_seconds,
        "cached": cached,
        "one_block_ms": block_s * 1000,
        "block_seconds": block_s,
        "timing_seq_len": TIMING_SEQ_LEN,
        "timing_shape": f"1 x {TIMING_SEQ_LEN} tokens",
        "decode_token_seconds": decode_s,
    }
    licence, licence_file = bundled_licence(source)
    if licence:
        info["licence"] = licence + (f" (its text ships with the model: {licence_file})" if licence_file else "")
    importance = trajectory = None
    pre = app.precomputed_for(source)
    if pre and pre.get("num_blocks") == n:
        importance = precomputed_importance(pre)
        if loaded.kind != "bundled":  # the Hub's original (a Space), not the GGUF the scores were made on
            importance["caveat"] = "made on the GGUF version of this model, not on the Hub weights loaded now"
        if pre.get("trajectory"):
            trajectory = {
                "rows": pre["trajectory"]["rows"],
                "removed": pre["trajectory"]["removed"],
                "origin": "precomputed: " + pre["trajectory"].get("description", "").strip("()"),
            }
    with session.lock:
        # Loading the model this session already has (a second click, or a click while the page's
        # first visit loaded it) keeps what was made on it: its importance, plan and preview.
        same = loaded is session.loaded and (session.model_info or {}).get("key") == source
        session.loaded = loaded
        session.model_info = info
        if not same:
            session.importance = importance
            session.trajectory = trajectory
            session.plan = Plan()
            session.preview = None
            session.lesson = None
    session.bump("model", *(() if same else ("importance", "trajectory", "plan", "preview", "lesson")))
    jc.log(f"loaded {source}: {n} blocks, {info['params']:,} parameters on {info['device']}")


def precomputed_importance(pre: dict[str, Any]) -> dict[str, Any]:
    agreement = pre.get("rank_agreement") or {}
    df = pd.DataFrame(agreement.get("data") or [], index=agreement.get("index"), columns=agreement.get("columns"))
    return {
        "scores": pre["scores"],
        "agreement": df,
        "origin": "precomputed",
        "settings": pre.get("settings", {}),
    }


def model_key(source: str, device, dtype, trust: bool) -> tuple:
    return (source, device or "auto", dtype or "auto", bool(trust))


def is_loaded(session: Session, source: str, device, dtype, trust: bool) -> bool:
    """Whether the session already has this model, loaded with these settings."""
    info = session.model_info or {}
    return session.loaded is not None and info.get("load_key") == list(model_key(source, device, dtype, trust))


def make_warmup_job(app: AppContext, source: str = "bundled") -> Job:
    """Load the default model into the shared cache at server start, so the first visitor does not wait."""

    def fn(jc: JobContext) -> None:
        jc.stage("load", f"warming up: loading {source}")
        app.models.get(model_key(source, None, None, False), load_fn(app, source, None, None, False))

    return fn


def make_load_job(app: AppContext, session: Session, source: str, device, dtype, trust: bool) -> Job:
    return lambda jc: do_load(app, session, jc, source, device, dtype, trust)


# ---- data ---------------------------------------------------------------------------------------


def _source_key(source: str) -> str:
    """A short cache key for a text source (pasted text is hashed, files by path, size and time)."""
    import hashlib

    if source.startswith("text:"):
        return "text:" + hashlib.sha256(source.encode("utf-8", "replace")).hexdigest()
    if source.startswith("file:"):
        path = Path(source[5:])
        stat = path.stat() if path.exists() else None
        return f"{source}|{stat.st_size if stat else 0}|{stat.st_mtime_ns if stat else 0}"
    return source


def _tok_key(tokenizer) -> tuple:
    return (id(tokenizer), str(getattr(tokenizer, "name_or_path", "")), len(tokenizer))


def read_windows(
    app: AppContext, tokenizer, source: str, seq_len: int, n: int, seed: int, part: str = "calib"
) -> torch.Tensor:
    """Token windows (n, seq_len) from the calibration ('calib') or evaluation ('eval') part of a
    text source, chosen the way the pipeline chooses them; cached per tokenizer and settings."""
    from fusegpt_core.data import load_texts, token_windows

    def make() -> torch.Tensor:
        calib_text, eval_text = load_texts(source, source, seed=seed)
        if part == "calib":
            return token_windows(tokenizer, calib_text, seq_len, n, seed=seed)
        return token_windows(tokenizer, eval_text, seq_len, None, seed=seed)[:n]

    return app.windows.get((*_tok_key(tokenizer), _source_key(source), seq_len, n, seed, part), make)


def run_windows(app: AppContext, tokenizer, recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own (calibration, evaluation) windows for a recipe, cached."""
    from fusegpt_core.pipeline import load_windows

    d = recipe.data
    key = (*_tok_key(tokenizer), "run", _source_key(d.calib_source), _source_key(d.eval_source), d.seq_len, d.n_calib,
           d.n_eval, d.seed)  # fmt: skip
    return app.windows.get(key, lambda: load_windows(recipe, tokenizer))


def require_model(session: Session):
    if session.loaded is None:
        raise ModelLoadError("no model is loaded yet: load one in the Model tab first.")
    return session.loaded


# ---- importance ---------------------------------------------------------------------------------


def do_importance(
    app: AppContext,
    session: Session,
    jc: JobContext,
    loaded,
    calib_source: str,
    metrics: list[str],
    seq_len: int,
    n_score: int,
    seed: int,
    use_cache: bool,
    batch_size: int = 4,
) -> None:
    from fusegpt_core.importance import rank_agreement, score_blocks

    if not metrics:
        raise PlanError("choose at least one metric to compute.")
    check_seq_len(seq_len, loaded.model.config, "tokens per window")
    jc.stage("data", "reading the calibration text")
    windows = read_windows(app, loaded.tokenizer, calib_source, seq_len, n_score, seed)
    jc.check()
    jc.stage("score", f"scoring blocks: {', '.join(metrics)} on {windows.shape[0]} x {seq_len} tokens")
    if gpu.mode() != "off":  # a ZeroGPU Space: the scoring is one GPU call
        info = session.model_info or {}
        n = int(info.get("blocks") or 1)
        estimate = (info.get("block_seconds") or 0) * mi_pass_forwards(n, use_cache) * windows.shape[0]
        scores = gpu.score_in_call(loaded, windows, metrics, use_cache, batch_size,
                                   estimate * seq_len / TIMING_SEQ_LEN or None)  # fmt: skip
    else:
        scores = score_blocks(
            loaded.model,
            windows.to(loaded.device),
            metrics=tuple(metrics),
            use_cache=use_cache,
            batch_size=batch_size,
            on_progress=lambda s, t: jc.progress(s, t, f"forward pass {s}/{t}"),
            should_stop=jc.should_stop,
        )
    agreement = rank_agreement(scores) if len(scores) > 1 else pd.DataFrame()
    with session.lock:
        session.importance = {
            "scores": {k: list(v) for k, v in scores.items()},
            "agreement": agreement,
            "origin": f"computed on {_describe_source(calib_source)} ({windows.shape[0]} x {seq_len} tokens)",
            "settings": {
                "calib_source": _describe_source(calib_source),
                "seq_len": seq_len,
                "n_score": n_score,
            },
        }
    session.bump("importance")


def make_importance_job(app: AppContext, session: Session, **kwargs) -> Job:
    loaded = require_model(session)
    return lambda jc: do_importance(app, session, jc, loaded, **kwargs)


def _describe_source(source: str) -> str:
    if source.startswith("text:"):
        return f"pasted text ({len(source) - 5:,} characters)"
    if source.startswith("file:"):
        return f"uploaded file {Path(source[5:]).name}"
    return source


# ---- drop preview -------------------------------------------------------------------------------


def do_preview(
    app: AppContext,
    session: Session,
    jc: JobContext,
    loaded,
    blocks: list[int],
    source: str,
    seq_len: int,
    n_eval: int,
    seed: int,
) -> None:
    from fusegpt_core.evaluate import drop_blocks, perplexity

    if not blocks:
        raise PlanError("no block is chosen: tick the blocks to drop first.")
    jc.stage("data", "reading the evaluation text")
    windows = read_windows(app, loaded.tokenizer, source, seq_len, n_eval, seed, part="eval").to(loaded.device)
    key = (loaded.source, source, seq_len, n_eval, seed)
    dense = (session.preview or {}).get("dense") if (session.preview or {}).get("key") == key else None
    if dense is None:
        jc.stage("evaluate", "perplexity of the original model")
        dense = perplexity(loaded.model, windows, should_stop=jc.should_stop)
    jc.stage("evaluate", f"perplexity with blocks {sorted(blocks)} dropped")
    dropped_model = drop_blocks(loaded.model, sorted(blocks))
    dropped = perplexity(dropped_model, windows, should_stop=jc.should_stop)
    del dropped_model
    with session.lock:
        session.preview = {
            "key": key,
            "dense": dense,
            "dropped": dropped,
            "blocks": sorted(blocks),
            "tokens": int(windows.numel()),
            "windows": [int(windows.shape[0]), int(windows.shape[1])],
            "text": _describe_source(source),
        }
    session.bump("preview")


def make_preview_job(
    app: AppContext, session: Session, blocks: list[int], source: str, seq_len: int, n_eval: int, seed: int
) -> Job:
    loaded = require_model(session)
    return lambda jc: do_preview(app, session, jc, loaded, list(blocks), source, seq_len, n_eval, seed)


# ---- run ----------------------------------------------------------------------------------------


class RunProgress:
    """Pipeline events -> the job's stage, progress, ETA, log and live plot data."""

    def __init__(self, jc: JobContext, recipe: Recipe, estimate: dict[str, Any] | None):
        self.jc, self.recipe, self.estimate = jc, recipe, estimate
        self.count = len(recipe.blocks) if recipe.blocks is not None else recipe.remove
        self.started = time.monotonic()

    def __call__(self, ev) -> None:
        jc = self.jc
        if ev.kind == "stage":
            jc.stage(ev.stage, ev.message)
        elif ev.kind == "progress":
            jc.progress(ev.step, ev.total, ev.message or None)
        elif ev.kind == "loss":
            name, loss = f"round {ev.data['round'] + 1}: block {ev.data['removed']}", float(ev.data["loss"])
            jc.update_live(lambda live: live["losses"].setdefault(name, []).append((ev.step, loss)))
            jc.progress(ev.step, ev.total)
        elif ev.kind == "scores" and ev.data.get("metric") == self.recipe.metric:
            jc.update_live(lambda live: live["trajectory"].append(list(ev.data["scores"])))
        elif ev.kind == "round":
            self.round_done(ev.step, {k: v for k, v in ev.data.items() if k != "losses"})
        elif ev.kind == "log":
            jc.log(ev.message)

    def round_done(self, done: int, data: dict[str, Any]) -> None:
        self.jc.update_live(lambda live: (live["rounds"].append(data), live["removed"].append(data["removed"])))
        per_round = (time.monotonic() - self.started) / max(done, 1)
        stages = self.estimate["stages"] if self.estimate else {}
        self.jc.set_eta(per_round * max(self.count - done, 0) + stages.get("evaluate", 0.0) + stages.get("speed", 0.0))
        self.jc.log(f"round {done}/{self.count}: removed block {data['removed']} into {data.get('targets')}")


def do_run(
    app: AppContext,
    session: Session,
    jc: JobContext,
    loaded,
    recipe: Recipe,
    batch_id: int | None = None,
    windows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> int:
    """Run one recipe; returns the new run's id. The session's base model is never edited."""
    from fusegpt_core.pipeline import RunResult, run

    recipe = copy.deepcopy(recipe)
    if recipe.blocks is None and batch_id is not None and batch_id in session.batch_blocks:
        # a baseline in the same batch as a FuseGPT run: same blocks, same order
        recipe.blocks = list(session.batch_blocks[batch_id])
        recipe.remove = len(recipe.blocks)
    info = session.model_info or {}
    progress = RunProgress(jc, recipe, estimate_for(recipe, info))
    if progress.estimate is not None:
        jc.set_eta(progress.estimate["total"])
    jc.update_live(
        lambda live: live.update(
            losses={}, trajectory=[], removed=[], rounds=[], method=recipe.method, count=progress.count,
            n_blocks=int(info.get("blocks") or 0), fixed_blocks=recipe.blocks is not None, recipe=recipe.to_dict(),
        )
    )  # fmt: skip
    if windows is None:
        jc.stage("data", "preparing calibration and evaluation windows")
        windows = run_windows(app, loaded.tokenizer, recipe)
    if gpu.mode() != "off":  # a ZeroGPU Space: one GPU call per round (app/gpu.py)
        folder = session.workdir / "gpu-runs" / f"run-{time.time_ns()}"
        per_round = progress.estimate["total"] / max(progress.count, 1) if progress.estimate else None
        key = f"{info.get('key', 'model')}-{id(loaded)}"
        model, tokenizer, report = gpu.run_in_calls(
            key, loaded, recipe, windows, folder, progress, jc.should_stop, per_round
        )
        result = RunResult(report=report, model=model, tokenizer=tokenizer)
    else:
        result = run(recipe, loaded=loaded, on_event=progress, should_stop=jc.should_stop, windows=windows)
    report = result.report
    if batch_id is not None and report.get("removed_blocks"):
        session.batch_blocks.setdefault(batch_id, list(report["removed_blocks"]))
    with session.lock:
        run_id = session.next_run_id
        session.next_run_id += 1
    record = RunRecord(id=run_id, label=f"#{run_id} {recipe.method}", method=recipe.method, report=report,
                       model=result.model, tokenizer=result.tokenizer)  # fmt: skip
    session.add_run(record, keep_models=app.keep_run_models)
    app.trim_run_models()  # memory stays bounded however many sessions run at once
    return run_id


def make_run_job(app: AppContext, session: Session, recipe: Recipe, batch_id: int | None = None) -> Job:
    loaded = require_model(session)
    n = int((session.model_info or {}).get("blocks") or 0)
    if n:
        recipe.validate(num_blocks=n)
    return lambda jc: do_run(app, session, jc, loaded, recipe, batch_id)


# ---- generation ---------------------------------------------------------------------------------


def do_generate(session: Session, jc: JobContext, loaded, prompt: str, settings: dict[str, Any]) -> None:
    from fusegpt_core.evaluate import generate

    if not prompt or not prompt.strip():
        raise PlanError("the prompt is empty: type a question or pick an example.")
    models = [("original", loaded.model, loaded.tokenizer)]
    models += [(r.label, r.model, r.tokenizer) for r in session.runs if r.model is not None]
    out = []
    if gpu.mode() != "off":  # a ZeroGPU Space: every model's answer in one GPU call
        jc.stage("generate", f"generating with {len(models)} models (one GPU call)")
        decode = (session.model_info or {}).get("decode_token_seconds")
        estimate = decode * settings.get("max_new_tokens", 64) * len(models) if decode else None
        answers = gpu.generate_in_call([(m, t) for _, m, t in models], prompt, settings, estimate)
        out = [{"label": label, "text": text, "seconds": s} for (label, _, _), (text, s) in zip(models, answers)]
        models = []  # done
    for i, (label, model, tok) in enumerate(models):
        jc.check()
        jc.stage("generate", f"generating with {label}")
        jc.progress(i, len(models))
        start = time.perf_counter()
        text = generate(model, tok, prompt, **settings)
        out.append({"label": label, "text": text, "seconds": time.perf_counter() - start})
    with session.lock:
        session.generations = out
        session.generation_prompt = prompt
    session.bump("generations")


def make_generate_job(session: Session, prompt: str, settings: dict[str, Any]) -> Job:
    loaded = require_model(session)
    return lambda jc: do_generate(session, jc, loaded, prompt, settings)


# ---- zero-shot accuracy -------------------------------------------------------------------------

ZERO_SHOT_LIMIT = 10
"""Items per task by default: the original, a dropped and a fused model on the two bundled tasks take about a
minute on the bundled model (54 s measured with one CPU core to itself)."""


def zero_shot_task_choices() -> tuple[list[str], list[str]]:
    """(what the task box offers, what it starts with): the bundled offline tasks, chosen, then the paper's
    (their data is on the Hub)."""
    from fusegpt_core.zeroshot import PAPER_TASKS, bundled_task_names

    offline = bundled_task_names()
    return [*offline, *PAPER_TASKS], offline


def _zero_shot_plan(session: Session, loaded) -> tuple[dict[str, Callable[[], Any]], list[tuple[RunRecord, str, str]]]:
    """What to evaluate, each model once: {key: builds the model}, and where each figure goes:
    (run, "original" | "dropped" | "result", key). The original and the dropped models are measured for
    the runs made on the loaded model; a run's own model where it is still in memory."""
    from fusegpt_core.adapters import num_blocks
    from fusegpt_core.evaluate import drop_blocks

    # a run made before another model was loaded has another original; the report names no identity of
    # a local model, so its size tells (block count and parameters as the run found them)
    size = (num_blocks(loaded.model), loaded.num_params)
    models: dict[str, Callable[[], Any]] = {}
    slots: list[tuple[RunRecord, str, str]] = []
    with session.lock:
        records = list(session.runs)
    for record in records:
        removed = sorted(set(record.report.get("removed_blocks") or []))
        on_loaded = (record.report.get("num_layers_before"), record.report.get("params_before")) == size
        dropped = f"dropped {removed}" if removed else "original"  # nothing removed: the original itself
        if on_loaded:
            models["original"] = lambda: loaded.model
            if removed:
                models.setdefault(dropped, lambda r=removed: drop_blocks(loaded.model, r))
            slots += [(record, "original", "original"), (record, "dropped", dropped)]
        model = record.model
        if model is None:
            continue
        if record.method == "drop" and on_loaded:
            slots.append((record, "result", dropped))  # a drop run's model is the dropped one: measured once
        else:
            models[f"run {record.label}"] = lambda m=model: m
            slots.append((record, "result", f"run {record.label}"))
    return models, slots


def do_zero_shot(session: Session, jc: JobContext, loaded, tasks: list[str], limit: int) -> None:
    """Zero-shot accuracy (lm-eval) of the original, of each run's blocks dropped and of each run's model
    still in memory. Figures go into each run's report["zero_shot"] ({"original", "dropped", "result"}: {task:
    figures}, as `fuse --tasks` writes them), merged task by task into what was measured before, so an export
    carries them. Each figure shows as soon as it is measured; a stop (between two tasks) keeps those done."""
    from fusegpt_core.zeroshot import evaluate_tasks

    models, slots = _zero_shot_plan(session, loaded)
    if not models:
        raise PlanError(
            "no model to measure: the runs were made on another model and their own models were released; "
            "run a plan again."
        )
    total = len(models) * len(tasks)
    what = f"{len(models)} models on {', '.join(tasks)} (first {limit} items of each)"
    jc.stage("zero-shot", f"zero-shot accuracy of {what}")
    step = 0
    for key, build in models.items():
        jc.check()
        model = build()
        seconds = 0.0
        for task in tasks:
            jc.check()
            jc.progress(step, total, f"{key}: {task} ({step + 1} of {total})")
            result = evaluate_tasks(model, loaded.tokenizer, [task], limit)
            seconds += result["seconds"]
            where = [(record, label) for record, label, k in slots if k == key]
            _store_zero_shot(session, where, result["tasks"], limit, round(seconds, 2))
            for name, figures in result["tasks"].items():
                shown = [f"{m} {figures[m]:.3f}" for m in ("acc", "acc_norm") if figures.get(m) is not None]
                jc.log(f"{key}, {name}: {', '.join(shown)}")
            step += 1
        del model  # a dropped fork goes before the next model is built
    jc.progress(total, total, f"measured {len(models)} models on {len(tasks)} task(s)")


def _store_zero_shot(session: Session, slots, figures: dict[str, dict], limit: int, seconds: float) -> None:
    with session.lock:
        for record, label in slots:
            zero_shot = record.report.setdefault("zero_shot", {})
            zero_shot.setdefault(label, {}).update(copy.deepcopy(figures))
            zero_shot["limit"] = limit
            zero_shot.setdefault("seconds", {})[label] = seconds
            # an export made before these figures lacks them: the next export writes the folder again
            record.export_dir = record.zip_path = None
    session.bump("runs")


def make_zero_shot_job(session: Session, tasks, limit: int) -> Job:
    """Refuse at once an unknown task, a Hub task while the Hub cannot be reached, a limit under 1, no model
    or no run; the job measures."""
    from fusegpt_core.zeroshot import check_tasks

    loaded = require_model(session)
    names = check_tasks(tasks, limit)
    if not session.runs:
        raise PlanError(
            "nothing to compare yet: run a plan in the Run tab first (the original and the dropped model are "
            "measured next to each run's)."
        )
    return lambda jc: do_zero_shot(session, jc, loaded, names, int(limit))


# ---- export -------------------------------------------------------------------------------------


def do_export(session: Session, jc: JobContext, run_id: int) -> Path:
    from fusegpt_core.export import export_model, safe_export_dir, zip_folder

    record = session.run_by_id(run_id)
    if record is None:
        raise PlanError(f"run {run_id} is not in this session any more.")
    done = record.export_dir is not None and record.zip_path is not None
    if done and record.export_dir.exists() and record.zip_path.exists():
        zipped = record.zip_path  # exported before (folder and zip are written atomically): reused, not rewritten
    else:
        if record.model is None:
            raise PlanError(
                f"the model of run {record.label} was released to save memory (only the newest runs are kept); "
                "its recipe and report can still be downloaded, or run it again."
            )
        jc.check()  # a stop pressed while the job waited in the queue: nothing is written
        jc.stage("export", f"saving run {record.label} as a Hugging Face folder")
        name = f"fused-run{record.id}-{record.method.replace('+', '-')}"
        base = session.workdir / "exports"
        base.mkdir(parents=True, exist_ok=True)
        target = safe_export_dir(base, name)
        folder = export_model(record.model, record.tokenizer, target, record.report, overwrite=True)
        jc.check()
        jc.stage("zip", "zipping the folder for download")
        zipped = zip_folder(folder)
        record.export_dir, record.zip_path = folder, zipped
    with session.lock:
        exports = session.exports if (session.exports or {}).get("run_id") == run_id else {"run_id": run_id}
        session.exports = {**exports, "zip": zipped}
    session.bump("export")
    return zipped


def write_recipe_files(session: Session, run_id: int) -> tuple[Path, Path]:
    """recipe.json and report.json of a run, written to the session folder (cheap, no job)."""
    record = session.run_by_id(run_id)
    if record is None:
        raise PlanError(f"run {run_id} is not in this session any more.")
    folder = session.workdir / f"run{record.id}"
    folder.mkdir(parents=True, exist_ok=True)
    recipe_path, report_path = folder / "recipe.json", folder / "report.json"
    recipe_path.write_text(json.dumps(record.report.get("recipe", {}), indent=2), encoding="utf-8")
    report_path.write_text(json.dumps(record.report, indent=2, default=str), encoding="utf-8")
    with session.lock:
        exports = session.exports if (session.exports or {}).get("run_id") == run_id else {"run_id": run_id}
        session.exports = {**exports, "recipe": recipe_path, "report": report_path}
    session.bump("export")
    return recipe_path, report_path


def make_export_job(session: Session, run_id: int) -> Job:
    return lambda jc: do_export(session, jc, run_id)


def make_push_job(session: Session, run_id: int, repo_id: str, token: str) -> Job:
    """The token lives only in this closure; the runner drops the closure when the job ends."""
    from fusegpt_core.export import push_to_hub

    repo_id = (repo_id or "").strip()
    if not repo_id or "/" not in repo_id:
        raise PlanError("give the Hub repository as 'user/name'.")
    if not token or not token.strip():
        raise PlanError("pushing needs a Hugging Face write token (used for this push only, never stored).")
    secret = token.strip()

    def fn(jc: JobContext) -> str:
        record = session.run_by_id(run_id)
        if record is None:
            raise PlanError(f"run {run_id} is not in this session any more.")
        if record.export_dir is None or not record.export_dir.exists():
            do_export(session, jc, run_id)
        jc.stage("push", f"uploading run {record.label} to {repo_id}")
        url = push_to_hub(record.export_dir, repo_id, secret)
        with session.lock:
            session.exports = {**(session.exports or {}), "run_id": run_id, "pushed": url}
        session.bump("export")
        return url

    return fn


# ---- GGUF export (llama.cpp / ollama) -----------------------------------------------------------


def _run_with_model(session: Session, run_id: int) -> RunRecord:
    record = session.run_by_id(run_id)
    if record is None:
        raise PlanError(f"run {run_id} is not in this session any more.")
    if record.model is None:
        raise PlanError(
            f"the model of run {record.label} was released to save memory (only the newest runs are kept); "
            "run it again to export it as GGUF."
        )
    return record


def make_gguf_job(app: AppContext, session: Session, run_id: int, quants) -> Job:
    """Refuse at once what GGUF cannot hold (no type chosen, an unknown type, a run without its model,
    an architecture or tokenizer llama.cpp's format has no place for); the job writes the files."""
    from fusegpt_core.gguf_export import check_exportable, parse_quants

    chosen = parse_quants(quants or [])
    record = _run_with_model(session, run_id)
    check_exportable(record.model, record.tokenizer)
    return lambda jc: do_gguf_export(app, session, jc, run_id, chosen)


def _run_eval_windows(app: AppContext, jc: JobContext, record: RunRecord) -> torch.Tensor | None:
    """The evaluation windows the run measured its result on, or None where its report has no recipe
    or its text cannot be read any more (the files are then written without a perplexity)."""
    from fusegpt_core.errors import FuseGPTError

    recipe = record.report.get("recipe")
    if not recipe:
        return None
    jc.stage("data", "preparing the run's evaluation windows")
    try:
        _, windows = run_windows(app, record.tokenizer, Recipe.from_dict(recipe))
    except FuseGPTError as e:
        jc.log(f"the run's evaluation text cannot be read any more ({e}); the files are not measured")
        return None
    return windows


def do_gguf_export(app: AppContext, session: Session, jc: JobContext, run_id: int, quants: list[str]) -> list[Path]:
    """Write the run's model as one GGUF file per type into the session folder and measure each (its
    size, and the perplexity of the model read back from it, dequantised, on the run's own evaluation
    windows). Each file's row joins the run's report["quantised"], which the Compare tab shows."""
    from fusegpt_core.gguf_export import export_gguf, quantisation_rows

    record = _run_with_model(session, run_id)
    jc.check()  # a stop pressed while the job waited in the queue: nothing is written
    report = record.report
    windows = _run_eval_windows(app, jc, record)
    # the compression is the file's size over the original model's parameters in 16-bit, as on the command line
    size_before = 2 * int(report.get("params_before") or 0)
    base = str(report.get("base_model") or "model").rstrip("/").split("/")[-1]
    name = f"{base}-{record.method}-{report.get('num_layers_after')}-blocks"
    folder = session.workdir / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for i, quant in enumerate(quants):
        jc.check()
        measured = " and measuring the file read back" if windows is not None else ""
        jc.stage("gguf", f"writing run {record.label} as {quant} GGUF{measured} ({i + 1} of {len(quants)})")
        # the type is always in the name, so files of one run written at different times never collide
        target = folder / f"fused-run{record.id}-{record.method.replace('+', '-')}-{quant}.gguf"
        if windows is None:
            export_gguf(record.model, record.tokenizer, target, quant, overwrite=True, name=name)
            size = target.stat().st_size
            row = {"quant": quant, "file": str(target), "file_bytes": size, "ppl": None, "eval_tokens": None,
                   "size_before_bytes": size_before, "compression": size / size_before if size_before else None}  # fmt: skip
        else:
            (row,) = quantisation_rows(record.model, record.tokenizer, target, [quant], windows, size_before,
                                       overwrite=True, name=name)  # fmt: skip
        jc.log(f"{quant}: {target.name}, {row['file_bytes'] / 2**20:.1f} MiB" +
               (f", perplexity {row['ppl']:.3f} read back" if row["ppl"] is not None else ""))  # fmt: skip
        with session.lock:
            # one row per type: a type written again replaces its row (the file was replaced too)
            rows = [r for r in report.get("quantised") or [] if r.get("quant") != quant]
            report["quantised"] = [*rows, row]
            files = [Path(r["file"]) for r in report["quantised"] if Path(r["file"]).is_file()]
            exports = session.exports if (session.exports or {}).get("run_id") == run_id else {"run_id": run_id}
            session.exports = {**exports, "gguf": files}
        session.bump("export", "runs")  # each file shows as soon as it is measured; a stop keeps those done
    return files


# ---- the one-click demo -------------------------------------------------------------------------


def make_demo_job(app: AppContext, session: Session, recipe: Recipe, prompt: str, source: str) -> Job:
    """load -> importance -> plan (MI's choice) -> run (the given fast recipe) -> compare + generate.

    The Run tab shows the demo's settings and the Plan tab its plan, so both draw what the demo ran."""

    def fn(jc: JobContext) -> int:
        do_load(app, session, jc, source, None, None, False)
        loaded = session.loaded
        d = recipe.data
        if session.importance is None:
            do_importance(app, session, jc, loaded, d.calib_source, ["mi", "bi", "angular"], d.seq_len,
                          max(d.n_score, 2), d.seed, True)  # fmt: skip
        r = copy.deepcopy(recipe)
        r.fusion.group_size = min(r.fusion.group_size, int(session.model_info["blocks"]))
        with session.lock:
            session.settings = RunSettings.from_recipe(r, preset_name=DEMO_PRESET)
            session.text = TextChoice()
            session.plan.let_metric_choose(r.remove)
        session.bump("plan", "settings")
        run_id = do_run(app, session, jc, loaded, r)
        with session.lock:
            session.plan.replace_with(session.run_by_id(run_id).report["removed_blocks"])
        session.bump("plan")
        do_generate(session, jc, loaded, prompt, {"max_new_tokens": 32, "do_sample": False})
        return run_id

    return fn


DEMO_PRESET = "tiny"


def session_recipe(session: Session, settings: RunSettings | None = None, text: TextChoice | None = None) -> Recipe:
    """The recipe the Run button starts: the session's settings, plan and text on its loaded model."""
    if session.loaded is None:
        raise PlanError("no model is loaded yet: load one in the Model tab first.")
    settings, text = settings or session.settings, text or session.text
    info = session.model_info or {}
    return build_recipe(
        model=session.loaded.source,
        preset_name=settings.preset,
        method=settings.method,
        plan=session.plan,
        knobs=effective_knobs(settings.preset, settings.knobs),
        calib_source=text.source(),
        device=str(info.get("device", "")).split(":")[0] or None,
        dtype=info.get("dtype"),
        num_blocks=int(info.get("blocks") or 0) or None,
    )


def estimate_for(recipe: Recipe, info: dict[str, Any]) -> dict[str, Any] | None:
    """Seconds per stage of `recipe` on the loaded model (None before the load timed a block)."""
    if not info.get("block_seconds"):
        return None
    return estimate_run(
        recipe,
        int(info["blocks"]),
        info["block_seconds"],
        info.get("timing_seq_len", TIMING_SEQ_LEN),
        decode_token_seconds=info.get("decode_token_seconds"),
    )
