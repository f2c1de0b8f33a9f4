"""Tuning aid: one fusion round on one block of the bundled model, several settings.

    python benchmarks/sweep_round.py --block 17 --config 'distill.lr_coef=0.01' --config '...'

Each --config is a comma list of key=json overrides on the cpu-demo preset. Prints dense,
dropped and fused perplexity (held-out bundled text) and the round's loss before/after.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuning_rows import emit_row, parse_overrides  # noqa: E402

from fusegpt_core.config import preset  # noqa: E402
from fusegpt_core.loading import load_model  # noqa: E402
from fusegpt_core.pipeline import load_windows, run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block", type=int, action="append", default=None)
    ap.add_argument("--config", action="append", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sweep_round.jsonl"))
    args = ap.parse_args()
    loaded = load_model("bundled")
    blocks = args.block or [17]
    windows: dict[str, tuple] = {}  # data settings -> (calibration, evaluation) windows
    for spec in args.config or [""]:
        overrides = parse_overrides(spec)
        recipe = preset("cpu-demo", blocks=blocks, **{"eval.measure_speed": False, **overrides})
        data_key = json.dumps(recipe.to_dict()["data"], sort_keys=True)
        if data_key not in windows:
            windows[data_key] = load_windows(recipe, loaded.tokenizer)
        t0 = time.perf_counter()
        r = run(recipe, loaded, windows=windows[data_key]).report
        row = {
            "config": overrides,
            "blocks": blocks,
            "status": r["status"],  # "diverged": a round was rolled back, fewer blocks were removed
            "removed": r["removed_blocks"],
            "dense": r["dense_ppl"],
            "dropped": r["dropped_ppl"],
            "fused": r["result_ppl"],
            "recovered": (r["dropped_ppl"] - r["result_ppl"]) / (r["dropped_ppl"] - r["dense_ppl"]),
            "loss": [(x.get("loss_before"), x.get("loss_after")) for x in r["rounds"]],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        emit_row(row, args.out)


if __name__ == "__main__":
    main()
