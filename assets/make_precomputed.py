"""Regenerate assets/precomputed_importance.json: the bundled model's scores and a real FuseGPT run on it,
shown instantly in the app (the classroom's first view).

    python assets/make_precomputed.py                  # scores + a FuseGPT run (quick preset, 6 blocks) + baselines
    python assets/make_precomputed.py --no-trajectory  # scores only (about 2 minutes on 2 CPU cores)
    python assets/make_precomputed.py --model bundled-gemma3 --no-trajectory  # -> assets/precomputed_gemma3.json

The scores use the Importance tab's default settings (bundled text, 4 windows x 128 tokens, seed 0).
The run is iterative MI + fusion with the 'quick' preset removing 6 of 30 blocks (about 10 minutes on 2
CPU cores); drop + LoRA then heals the same blocks, and every model (original, plain dropping, both
runs) answers the first example prompts greedily. The file embeds the run's recipe, its MI trajectory,
per-round losses and the results, so the app can say exactly what made them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fusegpt_core.config import preset  # noqa: E402
from fusegpt_core.data import load_texts, token_windows  # noqa: E402
from fusegpt_core.evaluate import drop_blocks, generate  # noqa: E402
from fusegpt_core.importance import DEFAULT_SCORING, rank_agreement, score_blocks  # noqa: E402
from fusegpt_core.loading import load_model  # noqa: E402
from fusegpt_core.pipeline import run  # noqa: E402

OUT_NAMES = {"bundled": "precomputed_importance.json", "bundled-gemma3": "precomputed_gemma3.json"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled", choices=sorted(OUT_NAMES), help="which bundled model")
    ap.add_argument(
        "--out",
        default=None,
        help="default: assets/precomputed_importance.json (bundled) or assets/precomputed_gemma3.json (bundled-gemma3)",
    )
    ap.add_argument("--no-trajectory", action="store_true", help="skip the cpu-demo run")
    ap.add_argument("--remove", type=int, default=6, help="blocks the trajectory run removes")
    ap.add_argument("--method", default="fusegpt", help="method of the trajectory run (fusegpt, drop, ...)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field of the trajectory run, e.g. distill.lr_coef=0.01",
    )
    ap.add_argument("--device", default="cpu", help="device of the trajectory run (cpu, cuda, auto)")
    ap.add_argument("--preset", default="quick", help="preset of the runs (quick: minutes on 2 CPU cores)")
    ap.add_argument("--baselines", default="drop+lora", help="comma list of methods run on the same blocks")
    ap.add_argument("--prompts", type=int, default=3, help="example prompts every model answers")
    ap.add_argument("--keep-scores", action="store_true", help="reuse the scores already in --out")
    args = ap.parse_args()
    args.out = args.out or str(HERE / OUT_NAMES[args.model])

    start = time.perf_counter()
    loaded = load_model(args.model, device="cpu", dtype="float32")
    if args.keep_scores and Path(args.out).exists():
        out = json.loads(Path(args.out).read_text(encoding="utf-8"))
    else:
        out = compute_scores(loaded, start, args.model)
        _write(args.out, out)
        print(f"scores written in {out['seconds_scores']} s", flush=True)

    if not args.no_trajectory:
        overrides = {}
        for item in args.set:
            key, _, value = item.partition("=")
            overrides[key] = json.loads(value)
        if args.device != "cpu":
            loaded = load_model(args.model, device=args.device)
        recipe = preset(args.preset, model=args.model, remove=args.remove, method=args.method, device=args.device,
                        **overrides)  # fmt: skip

        def on_event(ev) -> None:
            if ev.kind in ("stage", "round") or (ev.kind == "log"):
                print(f"[{time.perf_counter() - start:7.1f}s] {ev.stage}: {ev.message}", flush=True)

        result = run(recipe, loaded=loaded, on_event=on_event)
        rep = result.report
        out["trajectory"] = {
            "description": f"({rep['method']} run, {args.preset} preset, {len(rep['removed_blocks'])} blocks)",
            "method": rep["method"],
            "recipe": rep["recipe"],
            "rows": rep["trajectory"],
            "removed": rep["removed_blocks"],
            "status": rep["status"],
        }
        out["example_run"] = {k: rep.get(k) for k in RUN_KEYS}
        models = [("original", loaded.model, loaded.tokenizer), (rep["method"], result.model, result.tokenizer)]
        results = [
            {"model": "original", "ppl": rep["dense_ppl"], "blocks": rep["num_layers_before"]},
            {"model": f"dropped {rep['removed_blocks']}", "ppl": rep["dropped_ppl"], "blocks": rep["num_layers_after"]},
            {"model": rep["method"], "ppl": rep["result_ppl"], "blocks": rep["num_layers_after"]},
        ]
        for method in [m for m in args.baselines.split(",") if m]:
            same = preset(args.preset, model=args.model, blocks=rep["removed_blocks"], method=method,
                          device=args.device, **overrides)  # fmt: skip
            other = run(same, loaded=loaded, on_event=on_event)
            results.append(
                {"model": method, "ppl": other.report["result_ppl"], "blocks": other.report["num_layers_after"]}
            )
            out.setdefault("baseline_runs", {})[method] = {k: other.report.get(k) for k in RUN_KEYS}
            models.append((method, other.model, other.tokenizer))
        dropped = drop_blocks(loaded.model, rep["removed_blocks"])
        models.insert(1, (f"dropped {rep['removed_blocks']}", dropped, loaded.tokenizer))
        prompts = json.loads((HERE / "prompts.json").read_text(encoding="utf-8"))[: args.prompts]
        generations = [
            {"title": p["title"], "prompt": p["prompt"],
             "answers": [{"model": label, "text": generate(m, tok, p["prompt"], max_new_tokens=48)}
                         for label, m, tok in models]}
            for p in prompts
        ]  # fmt: skip
        out["classroom"] = {"results": results, "generations": generations, "recipe": rep["recipe"],
                            "method": rep["method"], "preset": args.preset}  # fmt: skip
        _write(args.out, out)
        print(f"trajectory written ({rep['status']}); total {time.perf_counter() - start:.0f} s", flush=True)


RUN_KEYS = ("method", "status", "dense_ppl", "dropped_ppl", "result_ppl", "removed_blocks", "num_layers_before",
            "num_layers_after", "params_before", "params_after", "rounds", "seconds", "recipe")  # fmt: skip


def compute_scores(loaded, start: float, model: str) -> dict:
    settings = DEFAULT_SCORING
    calib, _ = load_texts(settings["calib_source"], settings["calib_source"], seed=settings["seed"])
    windows = token_windows(loaded.tokenizer, calib, settings["seq_len"], settings["n_score"], seed=settings["seed"])
    print(f"scoring {windows.shape} ...", flush=True)
    scores = score_blocks(loaded.model, windows, metrics=("mi", "bi", "angular", "ppl"))
    agreement = rank_agreement(scores)
    out = {
        "model": model,
        "model_type": loaded.model_type,
        "num_blocks": len(scores["mi"]),
        "settings": settings,
        "scores": scores,
        "rank_agreement": {
            "index": [str(i) for i in agreement.index],
            "columns": [str(c) for c in agreement.columns],
            "data": agreement.round(6).values.tolist(),
        },
        "seconds_scores": round(time.perf_counter() - start, 1),
    }
    return out


def _write(path: str, data: dict) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":
    main()
