"""MI scoring cost: prefix-cached vs reference computation, in one run on the same windows.

    python benchmarks/bench_mi_cache.py [--model bundled] [--windows 4] [--seq-len 128]

Prints wall times, their ratio (target <= 0.6), the block-forward counts, and checks that both
give the same scores. Writes benchmarks/results/mi_cache.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusegpt_core.adapters import num_blocks  # noqa: E402
from fusegpt_core.capture import capture_block_inputs  # noqa: E402
from fusegpt_core.data import load_texts, token_windows  # noqa: E402
from fusegpt_core.importance import block_forward_count, score_blocks  # noqa: E402
from fusegpt_core.loading import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mi_cache.json"))
    args = ap.parse_args()
    loaded = load_model(args.model)
    text, _ = load_texts("bundled", "bundled")
    windows = token_windows(loaded.tokenizer, text, args.seq_len, args.windows)
    inputs = capture_block_inputs(loaded.model, windows)
    times, scores = {}, {}
    for use_cache in (True, False):
        start = time.perf_counter()
        scores[use_cache] = score_blocks(loaded.model, windows, ("mi",), use_cache=use_cache, inputs=inputs)["mi"]
        times[use_cache] = time.perf_counter() - start
    n = num_blocks(loaded.model)
    result = {
        "model": args.model,
        "device": str(loaded.device),
        "blocks": n,
        "windows": args.windows,
        "seq_len": args.seq_len,
        "cached_seconds": round(times[True], 3),
        "reference_seconds": round(times[False], 3),
        "time_ratio": round(times[True] / times[False], 3),
        "block_forwards_cached": block_forward_count(n, True),
        "block_forwards_reference": block_forward_count(n, False),
        "max_abs_difference": max(abs(a - b) for a, b in zip(scores[True], scores[False])),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
