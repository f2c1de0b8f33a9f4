"""The guided lesson: guess the least important block, see the scores, drop it, fuse it.

Built on the same functions as the tabs (importance scores, the drop preview's perplexity, a run of
the pipeline, generation), so what the lesson shows is what the tabs would show for the same choice.
Its state lives in `session.lesson` (the "lesson" view): {'guess', 'block', 'drop', 'fuse'}.
"""

from __future__ import annotations

import time
from typing import Any

from fusegpt_core.errors import PlanError
from fusegpt_core.importance import DEFAULT_SCORING

from . import work
from .jobs import Job, JobContext
from .state import AppContext, Session

LESSON_PRESET = "quick"  # one block fused in a couple of minutes on 2 CPU cores
TEST_PRESET = "tiny"  # the in-process test model: seconds
NEW_TOKENS = 32
DEFAULT_PROMPT = "Write one sentence about the sea."


def lesson_prompt(app: AppContext) -> str:
    return (app.prompts or [{"prompt": DEFAULT_PROMPT}])[0]["prompt"]


def least_important(session: Session) -> int | None:
    """The block with the lowest Macro Influence in the session's scores (None before any)."""
    mi = ((session.importance or {}).get("scores") or {}).get("mi")
    if not mi:
        return None
    finite = [(v, i) for i, v in enumerate(mi) if v is not None]
    return min(finite)[1] if finite else None


def guess_verdict(scores: list[float], guess: int) -> dict[str, Any]:
    """Where a guessed block stands in MI's order: rank 1 = least important."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    return {"guess": guess, "rank": order.index(guess) + 1, "n": len(scores), "least": order[0],
            "guess_mi": scores[guess], "least_mi": scores[order[0]]}  # fmt: skip


def set_guess(session: Session, guess: int) -> None:
    n = int((session.model_info or {}).get("blocks") or 0)
    if not 0 <= guess < n:
        raise PlanError(f"block {guess} does not exist: the model has blocks 0 to {n - 1}.")
    with session.lock:
        session.lesson = {"guess": guess}
    session.bump("lesson")


def lesson_recipe(app: AppContext, session: Session, block: int):
    from fusegpt_core.config import preset

    name = TEST_PRESET if app.test_model else LESSON_PRESET
    info = session.model_info or {}
    recipe = preset(name, model=session.loaded.source, blocks=[block], method="fusegpt",
                    device=str(info.get("device", "cpu")).split(":")[0])  # fmt: skip
    recipe.eval.measure_speed = False  # the lesson is about quality; the Compare tab times models
    recipe.fusion.group_size = min(recipe.fusion.group_size, int(info.get("blocks") or recipe.fusion.group_size))
    return recipe


def _block_to_remove(session: Session) -> int:
    block = least_important(session)
    if block is None:
        raise PlanError("reveal the scores first (step 3): the lesson removes the block MI ranks last.")
    return block


def do_drop(app: AppContext, session: Session, jc: JobContext, loaded) -> None:
    """Step 4: perplexity and an answer of the model with MI's least important block dropped."""
    from fusegpt_core.evaluate import drop_blocks, generate, perplexity

    block = _block_to_remove(session)
    recipe = lesson_recipe(app, session, block)
    jc.stage("data", "reading the evaluation text")
    _, evals = work.run_windows(app, loaded.tokenizer, recipe)
    evals = evals.to(loaded.device)
    jc.stage("evaluate", "perplexity of the original model")
    dense = perplexity(loaded.model, evals, should_stop=jc.should_stop)
    dropped_model = drop_blocks(loaded.model, [block])
    jc.stage("evaluate", f"perplexity with block {block} dropped")
    dropped = perplexity(dropped_model, evals, should_stop=jc.should_stop)
    prompt = lesson_prompt(app)
    jc.stage("generate", "answers of the original and the dropped model")
    answers = {
        "original": generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=NEW_TOKENS),
        "dropped": generate(dropped_model, loaded.tokenizer, prompt, max_new_tokens=NEW_TOKENS),
    }
    del dropped_model
    with session.lock:
        session.lesson = {**(session.lesson or {}), "block": block, "fuse": None,
                          "drop": {"block": block, "dense": dense, "dropped": dropped, "prompt": prompt,
                                   "answers": answers, "tokens": int(evals.numel())}}  # fmt: skip
    session.bump("lesson")


def do_fuse(app: AppContext, session: Session, jc: JobContext, loaded) -> None:
    """Step 5: the same block fused into its neighbours (a FuseGPT run) instead of dropped."""
    from fusegpt_core.evaluate import generate

    block = _block_to_remove(session)
    recipe = lesson_recipe(app, session, block)
    start = time.perf_counter()
    run_id = work.do_run(app, session, jc, loaded, recipe)  # also appears on the Compare tab
    record = session.run_by_id(run_id)
    report = record.report
    jc.stage("generate", "the answer of the fused model")
    prompt = lesson_prompt(app)
    answer = generate(record.model, record.tokenizer, prompt, max_new_tokens=NEW_TOKENS) if record.model else ""
    dense, dropped, fused = report.get("dense_ppl"), report.get("dropped_ppl"), report.get("result_ppl")
    recovered = (
        (dropped - fused) / (dropped - dense) if None not in (dense, dropped, fused) and dropped > dense else None
    )
    with session.lock:
        session.lesson = {**(session.lesson or {}), "block": block,
                          "fuse": {"block": block, "dense": dense, "dropped": dropped, "fused": fused,
                                   "recovered": recovered, "targets": (report.get("rounds") or [{}])[0].get("targets"),
                                   "answer": answer, "prompt": prompt, "run": record.label,
                                   "preset": TEST_PRESET if app.test_model else LESSON_PRESET,
                                   "seconds": time.perf_counter() - start}}  # fmt: skip
    session.bump("lesson")


def make_drop_job(app: AppContext, session: Session) -> Job:
    loaded = work.require_model(session)
    _block_to_remove(session)  # refuse at once, not in the queue
    return lambda jc: do_drop(app, session, jc, loaded)


def make_fuse_job(app: AppContext, session: Session) -> Job:
    loaded = work.require_model(session)
    _block_to_remove(session)
    return lambda jc: do_fuse(app, session, jc, loaded)


def make_reveal_job(app: AppContext, session: Session) -> Job:
    """Scores for the reveal when the session has none (precomputed ones reveal at once)."""
    return work.make_importance_job(app, session, metrics=["mi"], use_cache=True, **DEFAULT_SCORING)
