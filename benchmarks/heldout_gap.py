"""Tuning aid: how well one fusion round's local fit carries over to unseen text.

    python benchmarks/heldout_gap.py --config 'data.n_calib=256;distill.epochs=1'

Removes block 17 of the bundled model with the cpu-demo preset (plus the overrides), then measures
the group's token-relative error (`token_mse`) against the unfused group on calibration windows
and on held-out windows, before (plain removal) and after fine-tuning, and the perplexity.
Appends one JSON row per config to benchmarks/results/heldout_gap.jsonl.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuning_rows import emit_row, parse_overrides  # noqa: E402

from fusegpt_core.adapters import get_blocks  # noqa: E402
from fusegpt_core.capture import capture_block_inputs, run_blocks  # noqa: E402
from fusegpt_core.config import preset  # noqa: E402
from fusegpt_core.distill import group_loss  # noqa: E402
from fusegpt_core.loading import load_model  # noqa: E402
from fusegpt_core.pipeline import load_windows, run  # noqa: E402

BLOCK = 17
GROUP = range(13, 21)  # the reference window of block 17 in 30 blocks: [p-4, p+3]


@torch.no_grad()
def group_errors(original, fused, windows) -> tuple[float, float]:
    """(plain removal, fused) token-relative error of the group's output on `windows`."""
    before, after = list(get_blocks(original)), list(get_blocks(fused))
    inputs = capture_block_inputs(original, windows, 8)
    group_in = run_blocks(before[: GROUP.start], inputs.hidden, inputs.calls)
    teacher = run_blocks(before[GROUP.start : GROUP.stop], group_in, inputs.calls)
    dropped = [before[i] for i in GROUP if i != BLOCK]
    student = after[GROUP.start : GROUP.stop - 1]
    return tuple(group_loss(g, group_in, teacher, inputs.calls, "token_mse", 8) for g in (dropped, student))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", action="append", default=None, help="key=json overrides, ';'-separated")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "heldout_gap.jsonl"))
    args = ap.parse_args()
    loaded = load_model("bundled")
    for spec in args.config or [""]:
        overrides = parse_overrides(spec)
        recipe = preset("cpu-demo", blocks=[BLOCK], **{"eval.measure_speed": False, **overrides})
        calib, evals = load_windows(recipe, loaded.tokenizer)
        t0 = time.perf_counter()
        result = run(recipe, loaded, windows=(calib, evals))
        row = {
            "config": overrides,
            "dropped_ppl": result.report["dropped_ppl"],
            "result_ppl": result.report["result_ppl"],
            "calibration_error": group_errors(loaded.model, result.model, calib[:8]),
            "heldout_error": group_errors(loaded.model, result.model, evals),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        emit_row(row, args.out)


if __name__ == "__main__":
    main()
