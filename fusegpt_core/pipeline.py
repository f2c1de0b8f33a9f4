"""run(recipe) -> compressed model + report: the whole FuseGPT pipeline and its baselines.

The input model is never modified: all surgery happens on a deep copy, so a cancel or a failure
leaves the caller's model exactly as it was. Progress is reported through `on_event`;
`should_stop` is polled between steps (cooperative cancel).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import baselines
from .adapters import get_blocks, remove_blocks, set_blocks
from .capture import BlockInputs, PrefixStates, capture_block_inputs, run_blocks
from .config import Recipe, check_seq_len
from .distill import finetune, group_loss
from .errors import Cancelled, PlanError, TrainingDiverged
from .evaluate import decode_speed, drop_blocks, model_size, perplexity
from .fused_linear import FusedLinear, fold_fused_linears
from .fusion import check_targets, group_span, group_trainable, inject, plan_group, settle_group
from .importance import lowest, score_blocks

LOSS_PROBE_WINDOWS = 8  # calibration windows used for a round's loss before/after figures
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


def load_windows(recipe: Recipe, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows (n_calib, seq), evaluation windows (n_eval, seq)) from disjoint text."""
    from .data import load_texts, token_windows

    d = recipe.data
    calib_text, eval_text = load_texts(d.calib_source, d.eval_source, seed=d.seed)
    calib = token_windows(tokenizer, calib_text, d.seq_len, d.n_calib, seed=d.seed)
    evals = token_windows(tokenizer, eval_text, d.seq_len, None, seed=d.seed)[: d.n_eval]
    return calib, evals


def run(
    recipe: Recipe,
    loaded=None,
    on_event: Callable[[Event], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    windows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RunResult:
    """Run `recipe` and return the compressed (folded, plain HF) model with its report.

    `loaded`: a LoadedModel to start from (else recipe.model is loaded); `windows`: optional
    (calibration, evaluation) token windows to use instead of recipe.data's text sources.
    """
    recipe.validate()
    torch.manual_seed(recipe.data.seed)  # anything not drawn from our own generators
    ctx = _Context(on_event, should_stop)
    if loaded is None:
        from .loading import load_model

        ctx.stage("load", f"loading {recipe.model}")
        loaded = load_model(recipe.model, device=recipe.device, dtype=recipe.dtype)
    original = loaded.model
    n_before = len(get_blocks(original))
    recipe.validate(num_blocks=n_before)
    check_seq_len(recipe.data.seq_len, original.config)

    ctx.stage("data", "preparing calibration and evaluation windows")
    calib, evals = windows if windows is not None else load_windows(recipe, loaded.tokenizer)
    score_windows = calib[: recipe.data.n_score]

    ctx.stage("evaluate", "perplexity of the original model")
    batch = forward_batch(recipe)
    dense_ppl = perplexity(original, evals, batch, ctx.should_stop)
    ctx.emit("log", f"original perplexity {dense_ppl:.3f}")

    ctx.stage("copy", "copying the model (the original stays untouched)")
    work = copy.deepcopy(original)
    work.requires_grad_(False)
    rounds, trajectory, removed, status = _compress(work, recipe, calib, score_windows, ctx)

    ctx.stage("fold", "folding fused weights into plain linears")
    fold_fused_linears(work)
    baselines.merge_lora(work)

    ctx.stage("evaluate", "perplexity of the result and of plain dropping")
    result_ppl = perplexity(work, evals, batch, ctx.should_stop)
    dropped_ppl = perplexity(drop_blocks(original, removed), evals, batch, ctx.should_stop) if removed else dense_ppl
    size_before, size_after = model_size(original), model_size(work)
    speed_before = speed_after = None
    if recipe.eval.measure_speed:
        ctx.stage("speed", "measuring decode speed")
        speed_before = decode_speed(original, loaded.tokenizer, recipe.eval.speed_tokens)
        speed_after = decode_speed(work, loaded.tokenizer, recipe.eval.speed_tokens)

    report = {
        "method": recipe.method,
        "model": loaded.source,
        "status": status,
        "partial": status != "done",
        "dense_ppl": dense_ppl,
        "dropped_ppl": dropped_ppl,
        "fused_ppl": result_ppl,
        "result_ppl": result_ppl,
        "removed_blocks": removed,
        "num_layers_before": n_before,
        "num_layers_after": len(get_blocks(work)),
        "params_before": size_before["params"],
        "params_after": size_after["params"],
        "bytes_before": size_before["bytes"],
        "bytes_after": size_after["bytes"],
        "tokens_per_s_before": speed_before,
        "tokens_per_s_after": speed_after,
        "eval_tokens": int(evals.numel()),
        "calib_tokens": int(calib.numel()),
        "rounds": rounds,
        "trajectory": trajectory,
        "device": str(next(work.parameters()).device),
        "dtype": str(next(work.parameters()).dtype).replace("torch.", ""),
        "recipe": recipe.to_dict(),
    }
    report["seconds"] = ctx.finish()
    report["seconds"]["total"] = round(sum(report["seconds"].values()), 2)
    ctx.on_event(Event("stage", "done", "finished", data={"report": report}))
    return RunResult(report=report, model=work, tokenizer=loaded.tokenizer)


def _compress(
    work: nn.Module, recipe: Recipe, calib: torch.Tensor, score_windows: torch.Tensor, ctx: _Context
) -> tuple[list[dict], list[list[float | None]], list[int], str]:
    """All removal rounds on `work`. Returns (rounds, MI trajectory, removed originals, status)."""
    n_orig = len(get_blocks(work))
    original_index = list(range(n_orig))  # current position -> original block index
    count = len(recipe.blocks) if recipe.blocks is not None else recipe.remove
    batch = forward_batch(recipe)
    trains = recipe.method in ("fusegpt", "drop+lora")
    generator = torch.Generator(device=next(work.parameters()).device).manual_seed(recipe.data.seed)
    needs_inputs = trains or recipe.candidates > 1
    calib_inputs = capture_block_inputs(work, calib, batch) if needs_inputs else None
    # group inputs continue from saved block boundaries (every ~1/8 of the depth), not the embeddings
    prefix = PrefixStates(calib_inputs, stride=-(-n_orig // 8)) if trains else None
    rounds: list[dict] = []
    trajectory: list[list[float | None]] = []
    removed: list[int] = []
    one_shot_order: list[int] | None = None

    for r in range(count):
        ctx.check()
        n_cur = len(get_blocks(work))
        # ---- choose the block to remove (current index p) ----------------------------------
        if recipe.blocks is not None:
            p = original_index.index(recipe.blocks[r])
        elif recipe.selection == "one-shot" and one_shot_order is not None:
            p = original_index.index(one_shot_order[r])
        else:
            ctx.stage("score", f"round {r + 1}/{count}: scoring {n_cur} blocks ({recipe.metric})")
            scores = score_blocks(
                work,
                score_windows,
                metrics=(recipe.metric,),
                use_cache=recipe.use_prefix_cache,
                batch_size=batch,
                on_progress=lambda s, t: ctx.emit("progress", "scoring", s, t),
                should_stop=ctx.should_stop,
            )[recipe.metric]
            by_original: list[float | None] = [None] * n_orig
            for cur, orig in enumerate(original_index):
                by_original[orig] = scores[cur]
            trajectory.append(by_original)
            ctx.emit("scores", f"{recipe.metric} scores", round=r, metric=recipe.metric, scores=by_original)
            p = lowest(scores)
            if recipe.candidates > 1:
                p = _most_absorbable(work, recipe, calib_inputs, scores, n_cur, ctx)
            if recipe.selection == "one-shot":
                ranked = sorted(range(n_cur), key=lambda i: (scores[i], i))
                one_shot_order = [original_index[i] for i in ranked[:count]]
        p_orig = original_index[p]

        # ---- the group ------------------------------------------------------------------------
        manual = (recipe.fusion.targets or {}).get(p_orig)
        if manual is not None:
            missing = [t for t in manual if t not in original_index]
            if missing:
                raise PlanError(f"fusion targets {missing} of block {p_orig} were already removed in an earlier round.")
            targets = [original_index.index(t) for t in manual]
            check_targets(p, targets, n_cur)
        else:
            targets = plan_group(p, n_cur, recipe.fusion.group_size)
        round_info: dict[str, Any] = {
            "round": r,
            "removed": p_orig,
            "targets": [original_index[t] for t in targets],
        }
        t_round = time.perf_counter()
        if recipe.method in ("drop", "average"):
            ctx.stage("fuse", f"round {r + 1}/{count}: removing block {p_orig}")
            if recipe.method == "average":
                baselines.average_into(work, p, baselines.neighbour_of(p, n_cur))
            remove_blocks(work, [p])
        else:
            try:
                _train_round(work, recipe, prefix, p, targets, round_info, generator, ctx, r, count)
            except TrainingDiverged as e:
                round_info["error"] = str(e)
                rounds.append(round_info)
                ctx.emit("log", f"round {r + 1} rolled back: {e}")
                return rounds, trajectory, removed, "diverged"
        if prefix is not None:
            prefix.blocks_changed_from(group_span(p, targets)[0])
        original_index.pop(p)
        removed.append(p_orig)
        round_info["seconds"] = round(time.perf_counter() - t_round, 2)
        rounds.append(round_info)
        ctx.emit("round", f"removed block {p_orig}", r + 1, count, **round_info)
    return rounds, trajectory, removed, "done"


@torch.no_grad()
def removal_error(work: nn.Module, inputs: BlockInputs, p: int, targets: list[int], batch_size: int) -> float:
    """Relative squared error of the group's output when block p is simply skipped, per token
    (||student_t - teacher_t||^2 / ||teacher_t||^2, averaged over the probe windows' tokens):
    comparable across depths, and not ruled by the attention-sink token's huge activations."""
    lo, hi = group_span(p, targets)
    blocks = list(get_blocks(work))
    group_in = run_blocks(blocks[:lo], inputs.hidden[:LOSS_PROBE_WINDOWS], inputs.kwargs, batch_size)
    teacher = run_blocks(blocks[lo : hi + 1], group_in, inputs.kwargs, batch_size)
    student = [b for i, b in enumerate(blocks[lo : hi + 1], lo) if i != p]
    return group_loss(student, group_in, teacher, inputs.kwargs, "token_mse", batch_size)


def _most_absorbable(
    work: nn.Module, recipe: Recipe, inputs: BlockInputs, scores: list[float], n_cur: int, ctx: _Context
) -> int:
    """Among the `recipe.candidates` lowest-scoring blocks, the one whose removal its group feels least."""
    ranked = sorted(range(n_cur), key=lambda i: (scores[i], i))[: recipe.candidates]
    errors = {
        c: removal_error(work, inputs, c, plan_group(c, n_cur, recipe.fusion.group_size), forward_batch(recipe))
        for c in ranked
    }
    ctx.emit("log", "removal error of candidates: " + ", ".join(f"{c}: {e:.4f}" for c, e in errors.items()))
    return min(ranked, key=lambda c: (errors[c], ranked.index(c)))


def _train_round(
    work: nn.Module,
    recipe: Recipe,
    prefix: PrefixStates,
    p: int,
    targets: list[int],
    info: dict[str, Any],
    generator: torch.Generator,
    ctx: _Context,
    r: int,
    count: int,
) -> None:
    """One fusion (or LoRA-healing) round: teacher outputs, surgery, local distillation.

    On TrainingDiverged or Cancelled the group is restored to its pre-round state first."""
    d, f = recipe.distill, recipe.fusion
    calib_inputs = prefix.inputs
    lo, hi = group_span(p, targets)
    blocks_before = list(get_blocks(work))
    ctx.stage("fuse", f"round {r + 1}/{count}: fusing block {info['removed']} into {info['targets']}")
    with torch.no_grad():
        # the group's input: calibration data through the CURRENT blocks before it
        group_in = prefix.at(blocks_before, lo, forward_batch(recipe), ctx.should_stop)
        teacher = run_blocks(
            blocks_before[lo : hi + 1], group_in, calib_inputs.kwargs, forward_batch(recipe), ctx.should_stop
        )
    snapshot = copy.deepcopy(blocks_before[lo : hi + 1])  # for rollback
    layer_types_before = copy.copy(getattr(work.config, "layer_types", None))
    try:
        if recipe.method == "fusegpt":
            inject(work, p, targets, f.coef_rank, f.lora_rank, f.fuse_bias, generator)
        remove_blocks(work, [p])
        new_targets = [t - 1 if t > p else t for t in targets]
        if recipe.method == "fusegpt":
            coefs, settled, others = group_trainable(work, new_targets, train_settled=d.lr_settled != 0)
            lr_first = d.lr_coef
        else:  # drop+lora: the LoRA gets the coefficient budget (rank, learning rate)
            coefs = baselines.add_lora(work, new_targets, rank=max(f.coef_rank, f.lora_rank), seed=recipe.data.seed + r)
            others = baselines.norm_parameters(work, new_targets)
            settled = []
            lr_first = d.lr_lora
        student = list(get_blocks(work))[lo:hi]
        # before/after figures on a fixed slice of the calibration windows (cheap, comparable)
        probe_in, probe_out = group_in[:LOSS_PROBE_WINDOWS], teacher[:LOSS_PROBE_WINDOWS]
        info["loss_before"] = group_loss(student, probe_in, probe_out, calib_inputs.kwargs, d.loss, d.batch_size)
        ctx.stage("finetune", f"round {r + 1}/{count}: fine-tuning the group of block {info['removed']}")
        result = finetune(
            student,
            group_in,
            teacher,
            calib_inputs.kwargs,
            coefs,
            others,
            epochs=d.epochs,
            batch_size=d.batch_size,
            lr_coef=lr_first,
            lr_other=d.lr_lora,
            loss=d.loss,
            betas=tuple(d.betas),
            grad_clip=d.grad_clip,
            divergence_factor=d.divergence_factor,
            settled_params=settled,
            lr_settled=d.lr_settled,
            seed=recipe.data.seed + r,
            on_step=lambda s, t, loss: ctx.emit(
                "loss", f"round {r + 1} step {s}/{t}", s, t, round=r, loss=loss, removed=info["removed"]
            ),
            should_stop=ctx.should_stop,
        )
        if recipe.method == "drop+lora":
            baselines.merge_lora(work)
        else:
            settle_group(work, new_targets)
        info["loss_after"] = group_loss(student, probe_in, probe_out, calib_inputs.kwargs, d.loss, d.batch_size)
        info["loss_first"] = result.losses[0] if result.losses else None
        info["loss_last"] = result.losses[-1] if result.losses else None
        info["losses"] = result.losses
        info["steps"] = result.steps
    except (TrainingDiverged, Cancelled, KeyboardInterrupt):
        restored = blocks_before[:lo] + snapshot + blocks_before[hi + 1 :]
        if layer_types_before is not None:
            work.config.layer_types = layer_types_before
        set_blocks(work, restored, list(range(len(restored))))
        raise


def fused_layers(model: nn.Module) -> list[FusedLinear]:
    return [m for m in model.modules() if isinstance(m, FusedLinear)]
