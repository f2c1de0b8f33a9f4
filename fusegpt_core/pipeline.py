"""run(recipe) -> compressed model + report: the whole FuseGPT pipeline and its baselines.

The input model is never modified and never copied whole: the run works on a fork of it (its own
module objects and config, the same weight tensors; see adapters.fork_model), and every round copies
only what it trains, so a cancel or a failure leaves the caller's model exactly as it was. Progress is reported through `on_event`;
`should_stop` is polled between steps (cooperative cancel).

Where things are decided: which block goes next in selection.py, which blocks absorb it and how a
round heals its group in fusion.py, how a group trains in distill.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import baselines, resume
from .adapters import fork_model, fork_module, get_blocks, remove_blocks, set_blocks
from .capture import BlockInputs, PrefixStates, capture_block_inputs, run_blocks
from .config import Recipe, check_seq_len
from .errors import Cancelled, OutOfMemory, PlanError, TrainingDiverged
from .evaluate import decode_speeds, drop_blocks, model_size, perplexity
from .fused_linear import FusedLinear, fold_fused_linears
from .fusion import check_targets, fuse_round, group_span, plan_group
from .importance import score_blocks
from .offload import BlockOffload, offload_of
from .selection import BlockIndex, OneShot, most_absorbable, strategy

FORWARD_BATCH = 8  # windows per batch of gradient-free passes (scoring, teachers, perplexity): on
# CPU a block forward costs 15% less per window at 8 than at the small training batches


def forward_batch(recipe: Recipe) -> int:
    """Windows per gradient-free forward batch: never fewer than the training batch."""
    return max(recipe.distill.batch_size, FORWARD_BATCH)


@dataclass
class Event:
    kind: str
    """'stage' | 'progress' | 'loss' | 'scores' | 'round' | 'log'."""
    stage: str
    message: str = ""
    step: int = 0
    total: int = 0
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    report: dict[str, Any]
    model: nn.Module
    tokenizer: Any


class _Context:
    """Event helpers and stage timing for one run."""

    def __init__(self, on_event, should_stop):
        self.on_event = on_event or (lambda e: None)
        self.should_stop = should_stop or (lambda: False)
        self.seconds: dict[str, float] = {}
        self._stage = None
        self._t0 = 0.0

    def stage(self, name: str, message: str) -> None:
        self._close_stage()
        self._stage, self._t0 = name, time.perf_counter()
        self.on_event(Event("stage", name, message))

    def _close_stage(self) -> None:
        if self._stage is not None:
            self.seconds[self._stage] = self.seconds.get(self._stage, 0.0) + time.perf_counter() - self._t0
            self._stage = None

    def emit(self, kind: str, message: str = "", step: int = 0, total: int = 0, **data) -> None:
        self.on_event(Event(kind, self._stage or "", message, step, total, data))

    def check(self) -> None:
        if self.should_stop():
            raise Cancelled("stopped by the user")

    def finish(self) -> dict[str, float]:
        self._close_stage()
        return {k: round(v, 2) for k, v in self.seconds.items()}


def load_windows(recipe: Recipe, tokenizer, notes: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows (n_calib, seq), evaluation windows (n_eval, seq)) from disjoint text.

    What a user should know about the data (a hub source replaced by the fallback, fewer windows
    than asked) is appended to `notes`."""
    from .data import load_texts, token_windows
    from .errors import DataError

    d = recipe.data
    notes = notes if notes is not None else []
    try:
        calib_text, eval_text = load_texts(d.calib_source, d.eval_source, seed=d.seed)
    except DataError as e:
        hub = any(s.lower().startswith("hf:") for s in (d.calib_source, d.eval_source))
        if not hub or d.fallback_source is None:
            raise
        notes.append(
            f"{d.calib_source} / {d.eval_source} could not be loaded ({e}); calibrated and evaluated on "
            f"'{d.fallback_source}' instead: figures are not comparable with the paper's."
        )
        calib_text, eval_text = load_texts(d.fallback_source, d.fallback_source, seed=d.seed)
    calib = token_windows(tokenizer, calib_text, d.seq_len, d.n_calib, seed=d.seed)
    evals = token_windows(tokenizer, eval_text, d.seq_len, None, seed=d.seed)[: d.n_eval]
    for name, got, asked in (("calibration", calib.shape[0], d.n_calib), ("evaluation", evals.shape[0], d.n_eval)):
        if got < asked:
            notes.append(
                f"the {name} text gives {got} windows of {d.seq_len} tokens, fewer than the {asked} asked: "
                f"the run uses {got} (give more text or shorten data.seq_len)."
            )
    return calib, evals


def run(
    recipe: Recipe,
    loaded=None,
    on_event: Callable[[Event], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    windows: tuple[torch.Tensor, torch.Tensor] | None = None,
    checkpoint_dir: Path | None = None,
    resume_run: bool = False,
) -> RunResult:
    """Run `recipe` and return the compressed (folded, plain HF) model with its report.

    `loaded`: a LoadedModel to start from (else recipe.model is loaded); `windows`: optional
    (calibration, evaluation) token windows to use instead of recipe.data's text sources.
    `checkpoint_dir`: write a checkpoint there after every round (resume.py); with `resume_run`,
    continue from the newest one instead of starting over.
    """
    recipe.validate()
    torch.manual_seed(recipe.data.seed)  # anything not drawn from our own generators
    ctx = _Context(on_event, should_stop)
    if loaded is None:
        from .loading import load_model

        ctx.stage("load", f"loading {recipe.model}")
        loaded = load_model(recipe.model, device=recipe.device, dtype=recipe.dtype)
    try:
        return _run_loaded(recipe, loaded, ctx, windows, checkpoint_dir, resume_run)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise out_of_memory(e, recipe, loaded, ctx) from None


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's "can't allocate memory" RuntimeError."""
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def out_of_memory(error: BaseException, recipe: Recipe, loaded, ctx: _Context) -> OutOfMemory:
    """One sentence: where memory ran out, that nothing was changed, and which knob to turn."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    d, t = recipe.data, recipe.distill
    stage = ctx._stage or "the run"
    first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    return OutOfMemory(
        f"ran out of memory on {loaded.device} during '{stage}' ({first}). The model was not changed. "
        f"Try a smaller distill.batch_size (now {t.batch_size}) or data.seq_len (now {d.seq_len}), fewer "
        f"data.n_calib windows (now {d.n_calib}; their hidden states are kept), or a half-precision dtype "
        f"(now {str(loaded.dtype).replace('torch.', '')})."
    )


def _run_loaded(recipe: Recipe, loaded, ctx: _Context, windows, checkpoint_dir, resume_run) -> RunResult:
    original = loaded.model
    recipe.validate(num_blocks=len(get_blocks(original)))
    check_seq_len(recipe.data.seq_len, original.config)
    resume_from = None
    if resume_run:
        resume_from = resume.latest(checkpoint_dir)
        if resume_from is None:
            raise resume.ResumeError(f"there is no checkpoint to resume in '{checkpoint_dir}'.")

    ctx.stage("data", "preparing calibration and evaluation windows")
    notes: list[str] = []
    calib, evals = windows if windows is not None else load_windows(recipe, loaded.tokenizer, notes)
    for note in notes:
        ctx.emit("log", "note: " + note)

    batch = forward_batch(recipe)
    store = offload_of(original)  # where the blocks live between uses (offload.py; "none": on the device)
    if store.active:
        ctx.emit(
            "log", f"blocks offloaded to the {'host' if store.mode == 'cpu' else 'disk'}, onloaded one group at a time"
        )
    checkpoints = None
    if checkpoint_dir is not None:
        print_ = resume.fingerprint(original, calib, store.host_copy)
        checkpoints = Checkpoints(Path(checkpoint_dir), original, print_, resume_from, read=store.host_copy)
    if resume_from is not None:
        dense_ppl = resume.read_state(resume_from)["dense_ppl"]
        ctx.emit("log", f"resuming from {resume_from}")
    else:
        ctx.stage("evaluate", "perplexity of the original model")
        dense_ppl = perplexity(original, evals, batch, ctx.should_stop)
    ctx.emit("log", f"original perplexity {dense_ppl:.3f}")
    if checkpoints is not None:
        checkpoints.dense_ppl = dense_ppl

    if recipe.distill.checkpoint is None:
        recipe = recipe_with_checkpointing(recipe, original)
        if recipe.distill.checkpoint:
            ctx.emit("log", "memory is short for the group's activations: gradient checkpointing is on")

    ctx.stage("copy", "forking the model (its own structure, the same weights: the original stays untouched)")
    work = fork_model(original)
    outcome = compress(work, recipe, calib, ctx, checkpoints)

    ctx.stage("fold", "folding fused weights into plain linears")
    fold_blocks(work, store)
    baselines.merge_lora(work)

    ctx.stage("evaluate", "perplexity of the result and of plain dropping")
    removed = outcome.removed
    figures = {
        "dense_ppl": dense_ppl,
        "result_ppl": perplexity(work, evals, batch, ctx.should_stop),
        "dropped_ppl": perplexity(drop_blocks(original, removed), evals, batch, ctx.should_stop)
        if removed
        else dense_ppl,
        "speed_before": None,
        "speed_after": None,
    }
    if recipe.eval.measure_speed:
        ctx.stage("speed", "measuring decode speed")
        speeds = decode_speeds([original, work], loaded.tokenizer, recipe.eval.speed_tokens)
        figures["speed_before"], figures["speed_after"] = speeds

    report = _report(recipe, loaded, original, work, outcome, figures, calib, evals)
    report["notes"] = notes
    report["offload"] = store.mode
    report["seconds"] = ctx.finish()
    report["seconds"]["total"] = round(sum(report["seconds"].values()), 2)
    ctx.on_event(Event("stage", "done", "finished", data={"report": report}))
    return RunResult(report=report, model=work, tokenizer=loaded.tokenizer)


def fold_blocks(work: nn.Module, store: BlockOffload) -> None:
    """Fold every fused linear into a plain one, a block at a time (an offloaded block is onloaded
    for its fold and its folded weights stored again)."""
    if not store.active:
        fold_fused_linears(work)
        return
    blocks = list(get_blocks(work))
    for i, block in enumerate(blocks):
        if not any(isinstance(m, FusedLinear) for m in block.modules()):
            continue
        with store.held([block]):
            folded = fork_module(block)
            fold_fused_linears(folded)
            store.adopt([folded])
        blocks[i] = folded
    set_blocks(work, blocks, list(range(len(blocks))))


def recipe_with_checkpointing(recipe: Recipe, model: nn.Module) -> Recipe:
    """`recipe` with distill.checkpoint decided: on when the memory plan says the compute device is
    short of room for the group's activations (memory.plan_memory), else off."""
    from .loading import available_memory_bytes
    from .memory import plan_memory

    param = next(model.parameters())
    here = [p for p in model.parameters() if p.device == param.device]  # not offloaded blocks' placeholders
    budget = available_memory_bytes(param.device) + sum(p.numel() * p.element_size() for p in here)  # already in place
    offload = offload_of(model).mode
    plan = plan_memory(model, recipe, param.device, param.dtype, device_budget=budget, offload=offload)
    d = recipe.to_dict()
    d["distill"]["checkpoint"] = plan.checkpoint
    return Recipe.from_dict(d)


def _report(recipe, loaded, original, work, outcome, figures, calib, evals) -> dict[str, Any]:
    from .loading import base_model_id

    size_before, size_after = model_size(original), model_size(work)
    speed_before, speed_after = figures["speed_before"], figures["speed_after"]
    return {
        "method": recipe.method,
        "model": loaded.source,
        "base_model": base_model_id(loaded),
        "status": outcome.status,
        "partial": outcome.status != "done",
        "dense_ppl": figures["dense_ppl"],
        "dropped_ppl": figures["dropped_ppl"],
        "result_ppl": figures["result_ppl"],
        "removed_blocks": outcome.removed,
        "num_layers_before": size_before["blocks"],
        "num_layers_after": size_after["blocks"],
        "params_before": size_before["params"],
        "params_after": size_after["params"],
        "bytes_before": size_before["bytes"],
        "bytes_after": size_after["bytes"],
        "tokens_per_s_before": speed_before["median"] if speed_before else None,
        "tokens_per_s_after": speed_after["median"] if speed_after else None,
        "speed_before": speed_before,
        "speed_after": speed_after,
        "eval_tokens": int(evals.numel()),
        "eval_windows": [int(evals.shape[0]), int(evals.shape[1])],
        "calib_tokens": int(calib.numel()),
        "rounds": outcome.rounds,
        "trajectory": outcome.trajectory,
        "device": str(next(work.parameters()).device),
        "dtype": str(next(work.parameters()).dtype).replace("torch.", ""),
        "recipe": recipe.to_dict(),
    }


@dataclass
class Compression:
    """What the removal rounds did."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    trajectory: list[list[float | None]] = field(default_factory=list)
    """Scores of every round that scored, over original blocks (None: already removed)."""
    removed: list[int] = field(default_factory=list)
    """Original indices, in removal order."""
    status: str = "done"
    """'done', or 'diverged' when a round was rolled back (the rounds before it stand)."""


@dataclass
class Checkpoints:
    """Where a run writes its per-round checkpoints, and the one it resumes from (if any)."""

    out: Path
    original: nn.Module
    fingerprint: dict[str, str]
    resume_from: Path | None = None
    dense_ppl: float | None = None
    read: Callable = resume._host
    """A tensor slot -> its values on the host (offloaded blocks: BlockOffload.host_copy)."""

    def save(self, recipe: Recipe, r: int, work: nn.Module, index: BlockIndex, out: Compression, generator) -> None:
        state = {
            "recipe": recipe.to_dict(),
            "fingerprint": self.fingerprint,
            "dense_ppl": self.dense_ppl,
            "removed": out.removed,
            "rounds": out.rounds,
            "trajectory": out.trajectory,
            "status": out.status,
        }
        resume.save(self.out, r, state, self.original, work, index.original, generator, self.read)


def compress(
    work: nn.Module, recipe: Recipe, calib: torch.Tensor, ctx: _Context, checkpoints: Checkpoints | None = None
) -> Compression:
    """All removal rounds of `recipe` on `work`, in place. calib: (n_calib, seq) token ids.
    With `checkpoints`, each finished round is written to disk, and a run that resumes starts
    from the rounds its checkpoint holds."""
    index = BlockIndex(len(get_blocks(work)))
    select = strategy(recipe.selection, recipe.blocks)
    count = recipe.count(len(index))
    generator = torch.Generator(device=next(work.parameters()).device).manual_seed(recipe.data.seed)
    out = Compression()
    if checkpoints is not None and checkpoints.resume_from is not None:
        resumed = resume.restore(checkpoints.resume_from, work, checkpoints.original, calib, checkpoints.read)
        offload_of(work).adopt(get_blocks(work))  # the restored tensors go where the blocks live
        state = resumed.state
        out = Compression(state["rounds"], state["trajectory"], state["removed"], state["status"])
        for original in out.removed:
            index.remove(index.current(original))
        generator.set_state(resumed.generator_state)
        if isinstance(select, OneShot) and out.trajectory:
            select.first_scores = out.trajectory[0]
        if out.status != "done":
            return out  # the run had ended on a rolled-back round
    trains = recipe.method in ("fusegpt", "drop+lora")
    needs_inputs = trains or (recipe.candidates > 1 and recipe.blocks is None)
    calib_inputs = capture_block_inputs(work, calib, forward_batch(recipe)) if needs_inputs else None
    # group inputs continue from saved block boundaries (every ~1/8 of the depth), not the embeddings
    prefix = PrefixStates(calib_inputs, stride=-(-index.num_original // 8)) if trains else None

    for r in range(len(out.removed), count):
        ctx.check()
        p = _choose(work, recipe, select, index, r, count, calib, calib_inputs, out, ctx)
        targets = _targets(recipe, index, p)
        info: dict[str, Any] = {
            "round": r,
            "removed": index.original[p],
            "targets": [index.original[t] for t in targets],
        }
        started = time.perf_counter()
        if trains:
            try:
                info.update(_heal(work, recipe, prefix, p, targets, index, generator, ctx, r, count))
            except TrainingDiverged as e:
                info["error"] = str(e)
                out.rounds.append(info)
                out.status = "diverged"
                ctx.emit("log", f"round {r + 1} rolled back: {e}")
                return out
            prefix.blocks_changed_from(group_span(p, targets)[0])
        else:
            ctx.stage("fuse", f"round {r + 1}/{count}: removing block {info['removed']}")
            if recipe.method == "average":
                q = baselines.neighbour_of(p, len(index))
                store, blocks = offload_of(work), list(get_blocks(work))
                with store.held([blocks[p], blocks[q]]):
                    baselines.average_into(work, p, q)
                    store.adopt([get_blocks(work)[q]])
            remove_blocks(work, [p])
        out.removed.append(index.remove(p))
        info["seconds"] = round(time.perf_counter() - started, 2)
        out.rounds.append(info)
        if checkpoints is not None:
            checkpoints.save(recipe, r, work, index, out, generator)
        ctx.emit("round", f"removed block {info['removed']}", r + 1, count, **info)
    return out


def _choose(
    work: nn.Module,
    recipe: Recipe,
    select,
    index: BlockIndex,
    r: int,
    count: int,
    calib: torch.Tensor,
    calib_inputs: BlockInputs | None,
    out: Compression,
    ctx: _Context,
) -> int:
    """The current index of the block round `r` removes (scoring first when the strategy asks)."""
    scores = None
    if select.wants_scores(r):
        ctx.stage("score", f"round {r + 1}/{count}: scoring {len(index)} blocks ({recipe.metric})")
        scores = score_blocks(
            work,
            calib[: recipe.data.n_score],
            metrics=(recipe.metric,),
            use_cache=recipe.use_prefix_cache,
            batch_size=forward_batch(recipe),
            on_progress=lambda s, t: ctx.emit("progress", "scoring", s, t),
            should_stop=ctx.should_stop,
        )[recipe.metric]
        by_original = index.by_original(scores)
        out.trajectory.append(by_original)
        ctx.emit("scores", f"{recipe.metric} scores", round=r, metric=recipe.metric, scores=by_original)
    ranked = select.ranked(r, index, scores)
    if recipe.candidates == 1 or len(ranked) == 1:
        return ranked[0]
    candidates = ranked[: recipe.candidates]
    p, errors = most_absorbable(work, calib_inputs, candidates, recipe.fusion.group_size, forward_batch(recipe))
    ctx.emit(
        "log", "removal error of candidates: " + ", ".join(f"{index.original[c]}: {e:.4f}" for c, e in errors.items())
    )
    return p


def _targets(recipe: Recipe, index: BlockIndex, p: int) -> list[int]:
    """The blocks (current indices) that absorb block p: the user's, or the reference window."""
    manual = (recipe.fusion.targets or {}).get(index.original[p])
    if manual is None:
        return plan_group(p, len(index), recipe.fusion.group_size)
    missing = [t for t in manual if t not in index]
    if missing:
        raise PlanError(
            f"fusion targets {missing} of block {index.original[p]} were already removed in an earlier round."
        )
    targets = [index.current(t) for t in manual]
    check_targets(p, targets, len(index))
    return targets


def _heal(
    work: nn.Module,
    recipe: Recipe,
    prefix: PrefixStates,
    p: int,
    targets: list[int],
    index: BlockIndex,
    generator: torch.Generator,
    ctx: _Context,
    r: int,
    count: int,
) -> dict[str, Any]:
    """The teacher for block p's group, then one fusion (or LoRA-healing) round; its figures."""
    removed, calls, batch = index.original[p], prefix.inputs.calls, forward_batch(recipe)
    label = f"{r + 1}/{count}"
    lo, hi = group_span(p, targets)
    blocks = list(get_blocks(work))
    ctx.stage("fuse", f"round {label}: fusing block {removed} into {[index.original[t] for t in targets]}")
    with torch.no_grad():
        # the group's input: calibration data through the CURRENT blocks before it; (n_calib, seq, hidden)
        group_in = prefix.at(blocks, lo, batch, ctx.should_stop)
    store = offload_of(work)
    with store.held(blocks[lo : hi + 1]):  # the group stays on the device for the whole round
        with torch.no_grad():
            teacher = run_blocks(blocks[lo : hi + 1], group_in, calls, batch, ctx.should_stop)
        result = fuse_round(
            work,
            p,
            targets,
            group_in,
            teacher,
            calls,
            method=recipe.method,
            fusion=recipe.fusion,
            distill=recipe.distill,
            generator=generator,
            seed=recipe.data.seed + r,
            checkpoint=bool(recipe.distill.checkpoint),
            keep_fold=not store.active,  # offloaded: memory first, no fp32 fold kept per fused layer
            on_step=lambda s, t, loss: ctx.emit(
                "loss", f"round {label} step {s}/{t}", s, t, round=r, loss=loss, removed=removed
            ),
            on_stage=lambda _: ctx.stage("finetune", f"round {label}: fine-tuning the group of block {removed}"),
            should_stop=ctx.should_stop,
        )
        store.adopt(get_blocks(work)[lo:hi])  # the healed group (one block fewer) goes back where blocks live
    after = index.original[:p] + index.original[p + 1 :]  # original index of each block once p is gone
    return {
        "loss_before": result.loss_before,
        "loss_after": result.loss_after,
        "loss_first": result.losses[0] if result.losses else None,
        "loss_last": result.losses[-1] if result.losses else None,
        "losses": result.losses,
        "steps": len(result.losses),
        "absorbed": [
            {"block": after[t], "linear": name, "share": share}
            for t, shares in result.absorbed.items()
            for name, share in shares.items()
        ],
    }
