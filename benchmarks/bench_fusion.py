"""Quality benchmark: dense vs drop vs drop+LoRA vs FuseGPT on the bundled model.

Removes `--remove` of SmolLM2's 30 blocks with the cpu-demo preset, then reports perplexity on
the held-out split of the bundled Wikipedia corpus and on text of another genre (Python's help
topics), plus parameters, decode speed and wall time. Writes benchmarks/results/fusion.json.

    python benchmarks/bench_fusion.py                # 6 of 30 blocks (20%), both methods
    python benchmarks/bench_fusion.py --methods fusegpt --remove 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusegpt_core.config import preset  # noqa: E402
from fusegpt_core.data import load_texts, token_windows  # noqa: E402
from fusegpt_core.evaluate import drop_blocks, perplexity  # noqa: E402
from fusegpt_core.loading import load_model  # noqa: E402
from fusegpt_core.pipeline import run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--remove", type=int, default=6)
    ap.add_argument("--methods", default="fusegpt,drop+lora")
    ap.add_argument("--preset", default="cpu-demo")
    ap.add_argument("--set", action="append", default=[], help="recipe override key=json")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fusion.json"))
    args = ap.parse_args()

    loaded = load_model(args.model)
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    base = preset(args.preset, model=args.model, remove=args.remove, **overrides)
    # another genre: Python's help topics, never seen in calibration
    other_text, _ = load_texts("pydoc", "bundled")
    other = token_windows(loaded.tokenizer, other_text, base.data.seq_len, None)[: base.data.n_eval]

    rows, reports = [], {}
    blocks = None
    for method in args.methods.split(","):
        recipe = preset(args.preset, model=args.model, remove=args.remove, method=method, **overrides)
        if blocks is not None:  # every method removes the same blocks as the first one chose
            recipe.blocks = blocks
        t0 = time.perf_counter()
        result = run(recipe, loaded, on_event=lambda e: e.kind == "round" and print("  ", e.message, flush=True))
        seconds = time.perf_counter() - t0
        r = result.report
        blocks = blocks or r["removed_blocks"]
        r["other_genre_ppl"] = perplexity(result.model, other)
        reports[method] = r
        rows.append(
            (method, r["result_ppl"], r["other_genre_ppl"], r["params_after"], r["tokens_per_s_after"], seconds)
        )
        print(
            f"{method}: ppl {r['result_ppl']:.3f}, other genre {r['other_genre_ppl']:.3f}, {seconds:.0f}s", flush=True
        )
        if r["status"] != "done":
            print(f"  status {r['status']}: {r['rounds'][-1].get('error')}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_suffix(f".{method.replace('+', '_')}.json").write_text(json.dumps(r, indent=2))

    first = next(iter(reports.values()))
    dense_other = perplexity(loaded.model, other)
    dropped_other = perplexity(drop_blocks(loaded.model, blocks), other)
    summary = {
        "model": args.model,
        "preset": args.preset,
        "overrides": overrides,
        "removed_blocks": blocks,
        "dense": {
            "ppl": first["dense_ppl"],
            "other_genre_ppl": dense_other,
            "params": first["params_before"],
            "tokens_per_s": first["tokens_per_s_before"],
        },
        "drop": {"ppl": first["dropped_ppl"], "other_genre_ppl": dropped_other},
        "methods": {
            m: {
                "ppl": r["result_ppl"],
                "other_genre_ppl": r["other_genre_ppl"],
                "params": r["params_after"],
                "tokens_per_s": r["tokens_per_s_after"],
                "seconds": r["seconds"],
            }
            for m, r in reports.items()
        },
        "reports": reports,
    }
    for m in reports:
        summary["methods"][m]["ratio_vs_drop"] = reports[m]["result_ppl"] / first["dropped_ppl"]
        summary["methods"][m]["other_genre_ratio_vs_drop"] = reports[m]["other_genre_ppl"] / dropped_other
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))

    print(f"\nremoved blocks {blocks} of {first['num_layers_before']}")
    print(f"{'':12s} {'wiki ppl':>10s} {'pydoc ppl':>10s}")
    print(f"{'dense':12s} {first['dense_ppl']:10.3f} {dense_other:10.3f}")
    print(f"{'drop':12s} {first['dropped_ppl']:10.3f} {dropped_other:10.3f}")
    for m, r in reports.items():
        print(
            f"{m:12s} {r['result_ppl']:10.3f} {r['other_genre_ppl']:10.3f}   "
            f"x{summary['methods'][m]['ratio_vs_drop']:.2f} / x{summary['methods'][m]['other_genre_ratio_vs_drop']:.2f} of drop, "
            f"{r['seconds']['total']:.0f}s"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
