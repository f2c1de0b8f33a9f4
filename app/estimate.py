"""How long will a run take? Counts of block forwards times one measured block forward.

A rough cost model, good to a factor of about two: it exists so that a visitor knows before
pressing Run whether to expect seconds, minutes or hours on this hardware. No gradio, no torch.
"""

from __future__ import annotations

from typing import Any

from fusegpt_core.config import Recipe
from fusegpt_core.evaluate import SPEED_REPEATS
from fusegpt_core.selection import PROBE_WINDOWS

BACKWARD_FACTOR = 2.0  # a backward pass costs about twice a forward
# every FuseGPT training step rebuilds the training terms of each fused weight (C_k D_k * W_k, and
# its gradient): on 2 CPU cores about the work of a forward over this many tokens per term (SmolLM2)
REBUILD_TOKENS_PER_TERM = 256
# when earlier rounds' coefficients train again, a group's blocks carry about half a term more per
# earlier round (overlapping groups), up to three rounds back (the bundled model's six rounds, measured)
EXTRA_TERMS_PER_ROUND, EXTRA_ROUNDS_MAX = 0.5, 3


def terms_per_step(recipe: Recipe, round_index: int) -> float:
    """Fused terms each group linear rebuilds per training step in round `round_index` (0-based)."""
    if recipe.distill.lr_settled == 0:  # earlier rounds' terms stay frozen and folded
        return 1.0
    return 1.0 + EXTRA_TERMS_PER_ROUND * min(round_index, EXTRA_ROUNDS_MAX)


def mi_pass_forwards(n_blocks: int, use_cache: bool) -> int:
    """Block forwards per window for one scoring pass (the core's count)."""
    from fusegpt_core.importance import block_forward_count

    return block_forward_count(n_blocks, use_cache)


def _group(recipe: Recipe, round_index: int, n_cur: int) -> tuple[int, int]:
    """(blocks the group's fine-tuning runs through, blocks that absorb the removed one) in a round:
    the reference window of `group_size`, or the span of the user's custom targets."""
    g = min(recipe.fusion.group_size, n_cur)
    if recipe.blocks is None or not recipe.fusion.targets:
        return g, g - 1
    removed = recipe.blocks[round_index]
    targets = recipe.fusion.targets.get(removed)
    if not targets:
        return g, g - 1
    members = [removed, *targets]
    return min(max(members) - min(members) + 1, n_cur), len(targets)


def estimate_run(
    recipe: Recipe,
    n_blocks: int,
    block_seconds: float,
    timed_seq_len: int,
    decode_token_seconds: float | None = None,
) -> dict[str, Any]:
    """Seconds per stage for `recipe` on a model with `n_blocks` blocks.

    block_seconds: one block forward on ONE window of `timed_seq_len` tokens, measured on the
    loaded model. Work scales linearly with tokens (attention's quadratic part is small at these
    lengths). decode_token_seconds: one generated token with the KV cache, measured too (the speed
    stage is many single-token steps, which a batch forward does not predict)."""
    per_window = block_seconds * recipe.data.seq_len / max(timed_seq_len, 1)
    d = recipe.data
    k = max(min(recipe.count(n_blocks), n_blocks - 1), 0)
    chooses = recipe.blocks is None
    score = finetune = 0.0
    for r in range(k):
        n_cur = n_blocks - r
        span, absorbers = _group(recipe, r, n_cur)
        if chooses and (recipe.selection == "iterative" or r == 0):
            # ppl also runs the LM head per skip; counted as one more block
            extra = 1.0 if recipe.metric == "ppl" else 0.0
            score += (mi_pass_forwards(n_cur, recipe.use_prefix_cache) + extra * n_cur) * d.n_score * per_window
        if chooses and recipe.candidates > 1:  # each candidate's removal error: prefix + group on the probe windows
            score += recipe.candidates * (n_cur / 2 + span) * PROBE_WINDOWS * per_window
        if recipe.method in ("fusegpt", "drop+lora"):
            prefix = n_cur / 8  # group inputs continue from states saved every 1/8 of the depth
            teacher = (prefix + span) * d.n_calib
            student = (span - 1) * (1 + BACKWARD_FACTOR) * d.n_calib * recipe.distill.epochs
            if recipe.method == "fusegpt":
                steps = -(-d.n_calib // recipe.distill.batch_size) * recipe.distill.epochs
                rebuild = terms_per_step(recipe, r) * REBUILD_TOKENS_PER_TERM
                student += absorbers * steps * rebuild / max(d.seq_len, 1)
            finetune += (teacher + student + 2 * span * d.n_calib) * per_window
    evaluate = (n_blocks + 2 * (n_blocks - k)) * d.n_eval * per_window * 1.2  # plus embeddings and the head
    speed = 0.0
    if recipe.eval.measure_speed:
        if decode_token_seconds is None:  # no decode timing: single-token steps ~ 30x a batch token
            decode_token_seconds = 30 * block_seconds * n_blocks / max(timed_seq_len, 1)
        # a warm-up and SPEED_REPEATS timed generations for each model; the result has fewer blocks
        per_model = (1 + SPEED_REPEATS) * recipe.eval.speed_tokens * decode_token_seconds
        speed = per_model * (1 + (n_blocks - k) / max(n_blocks, 1))
    stages = {"score": score, "fine-tune": finetune, "evaluate": evaluate, "speed": speed}
    return {"stages": stages, "total": sum(stages.values()), "rounds": k}


def estimate_text(estimate: dict[str, Any], device: str) -> str:
    from .tables import fmt_seconds

    parts = ", ".join(f"{name} {fmt_seconds(s)}" for name, s in estimate["stages"].items() if s >= 0.05)
    return (
        f"≈ **{fmt_seconds(estimate['total'])}** on this {device} ({estimate['rounds']} rounds: {parts or 'instant'})"
    )
