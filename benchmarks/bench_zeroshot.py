"""Zero-shot accuracy of dense, drop, drop + LoRA and FuseGPT on the bundled offline tasks (lm-eval).

Removes `--remove` of the bundled SmolLM2's 30 blocks with the cpu-demo preset (FuseGPT chooses the blocks,
drop + LoRA heals the same ones, as in bench_fusion.py), then evaluates the four models on the bundled
lm-eval tasks. The items are taken in chunks (the first `--chunk` of each task for every model, then the
next ...) and the pooled figures are written after every chunk, so a run stopped early still compares the
four models on the same items (the task files list their items in random order, so the first N are a fair
sample). acc / acc_norm are pooled means; their standard errors use lm-eval's own formula
(lm_eval.api.metrics.mean_stderr) on the pooled items. Writes benchmarks/results/bench_zeroshot.json.

A run can be stopped and started again: the fusion runs checkpoint every round under --work and each
finished chunk is kept there (chunks.jsonl), so a restart resumes where it stopped.

    python benchmarks/bench_zeroshot.py                    # 6 of 30 blocks, every item (1,000 per task)
    python benchmarks/bench_zeroshot.py --items 300        # the first 300 items of each task
    python benchmarks/bench_zeroshot.py --threads 1        # a CPU shared with other jobs: 1 thread is faster
    python benchmarks/bench_zeroshot.py --methods fusegpt --items 200   # dense, drop and FuseGPT only
    python benchmarks/bench_zeroshot.py --methods fusegpt --quants f16,q8_0,q4_0 --items 300
        # and dense, drop and FuseGPT written as GGUF at each quantisation and read back (dequantised) by
        # transformers: perplexity, file size and accuracy of each file (the fused + quantised comparison)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusegpt_core import resume, zeroshot  # noqa: E402
from fusegpt_core.config import preset  # noqa: E402
from fusegpt_core.evaluate import drop_blocks  # noqa: E402
from fusegpt_core.gguf_export import load_gguf_model, parse_quants, quantisation_rows  # noqa: E402
from fusegpt_core.loading import load_model  # noqa: E402
from fusegpt_core.pipeline import load_windows, run  # noqa: E402

METRICS = ("acc", "acc_norm")


def pooled(correct: dict[str, float], n: int) -> dict[str, float | int | None]:
    """Pooled accuracies of n items ({metric: items right}) with lm-eval's standard error of a mean."""
    from lm_eval.api.metrics import mean_stderr

    out: dict[str, float | int | None] = {"n": n}
    for metric in METRICS:
        if metric not in correct:
            out[metric], out[f"{metric}_stderr"] = None, None
            continue
        right = round(correct[metric])
        out[metric] = right / n
        out[f"{metric}_stderr"] = mean_stderr([1.0] * right + [0.0] * (n - right)) if n > 1 else None
    out["stderr"] = out["acc_norm_stderr"] if out["acc_norm"] is not None else out["acc_stderr"]
    return out


def table(figures: dict[str, dict[str, dict]], tasks: list[str]) -> str:
    header = f"{'':14s}" + "".join(f" {t + ' acc':>22s} {t + ' acc_norm':>26s}" for t in tasks)
    lines = [header]
    for label, per_task in figures.items():
        cells = []
        for t in tasks:
            f = per_task.get(t) or {}
            for metric, width in (("acc", 22), ("acc_norm", 26)):
                value, stderr = f.get(metric), f.get(f"{metric}_stderr")
                cells.append(f" {f'{value:.3f} ± {stderr:.3f}' if value is not None else '-':>{width}s}")
        lines.append(f"{label:14s}" + "".join(cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--remove", type=int, default=6)
    ap.add_argument("--preset", default="cpu-demo")
    ap.add_argument("--tasks", default=",".join(zeroshot.bundled_task_names()))
    ap.add_argument("--items", type=int, default=None, help="items per task (default: all)")
    ap.add_argument("--chunk", type=int, default=100, help="items per task evaluated on every model in turn")
    ap.add_argument("--batch-size", type=int, default=zeroshot.DEFAULT_BATCH_SIZE)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_zeroshot.json"))
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fusegpt-bench-zeroshot"),
                    help="checkpoints of the fusion runs and the finished chunks (to resume)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--methods", default="fusegpt,drop+lora", help="trained methods besides dense and drop "
                    "(fusegpt first: it chooses the blocks)")  # fmt: skip
    ap.add_argument("--quants", default="", help="also evaluate dense, drop and fusegpt as GGUF files of these "
                    "quantisations, e.g. f16,q8_0,q4_0")  # fmt: skip
    args = ap.parse_args()
    tasks = zeroshot.check_tasks(args.tasks)
    quants = parse_quants(args.quants) if args.quants else []
    if quants and "fusegpt" not in args.methods.split(","):
        ap.error("--quants needs fusegpt among --methods")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.0f}s] {message}", flush=True)

    loaded = load_model(args.model, device="cpu", dtype="float32")
    # the two trained methods, through the same pipeline as `fuse` (FuseGPT picks the blocks)
    runs = {}
    blocks = None
    for method in args.methods.split(","):
        recipe = preset(args.preset, model=args.model, remove=args.remove, method=method)
        if blocks is not None:
            recipe.blocks = blocks
        log(f"{method}: removing {args.remove} blocks ({args.preset})")
        checkpoints = work / method.replace("+", "_")
        result = run(
            recipe,
            loaded,
            on_event=lambda e: e.kind == "round" and log(f"  {e.message}"),
            checkpoint_dir=checkpoints,
            resume_run=resume.latest(checkpoints) is not None,
        )
        blocks = blocks or result.report["removed_blocks"]
        runs[method] = result
        log(f"{method}: ppl {result.report['result_ppl']:.3f} (dropped {result.report['dropped_ppl']:.3f})")
    models = {"dense": loaded.model, "drop": drop_blocks(loaded.model, blocks)}
    models.update({method: result.model for method, result in runs.items()})
    quantised = {}  # label -> its GGUF file's row (quantisation_rows): quant, file_bytes, ppl, compression
    if quants:
        # perplexity of each file on the runs' own evaluation windows, so that it compares with their reports
        _, eval_windows = load_windows(preset(args.preset, model=args.model, remove=args.remove), loaded.tokenizer)
        (work / "gguf").mkdir(exist_ok=True)
        for label in ("dense", "drop", "fusegpt"):
            log(f"{label}: writing GGUF {','.join(quants)} and reading it back")
            rows = quantisation_rows(models[label], loaded.tokenizer, work / "gguf" / f"{label}.gguf", quants,
                                     eval_windows, size_before_bytes=2 * loaded.num_params, overwrite=True)  # fmt: skip
            for row in rows:
                models[f"{label} {row['quant']}"] = load_gguf_model(row["file"])  # the tokenizer stays ours
                quantised[f"{label} {row['quant']}"] = {"of": label, **row}
    sizes = {t: len(_rows(t)) for t in tasks}
    total = {t: min(sizes[t], args.items or sizes[t]) for t in tasks}
    correct = {label: {t: {} for t in tasks} for label in models}
    counted = {label: dict.fromkeys(tasks, 0) for label in models}
    seconds = dict.fromkeys(models, 0.0)
    done_file = work / "chunks.jsonl"  # one line per (model, chunk) finished: {label, first, seconds, tasks}
    finished = {}
    if done_file.exists():
        for line in done_file.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row["blocks"] == blocks and row["chunk"] == args.chunk:
                finished[(row["label"], row["first"])] = row
    summary: dict = {}
    for first in range(0, max(total.values()), args.chunk):
        chunk = {t: list(range(first, min(first + args.chunk, total[t]))) for t in tasks if first < total[t]}
        for label, model in models.items():
            row = finished.get((label, first))
            if row is None:
                t0 = time.perf_counter()
                figures = zeroshot.evaluate_tasks(
                    model, loaded.tokenizer, list(chunk), batch_size=args.batch_size, samples=chunk
                )
                row = {
                    "label": label,
                    "first": first,
                    "chunk": args.chunk,
                    "blocks": blocks,
                    "seconds": time.perf_counter() - t0,
                    "tasks": figures["tasks"],
                }
                with done_file.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row) + "\n")
            seconds[label] += row["seconds"]
            for t, f in row["tasks"].items():
                counted[label][t] += f["n"]
                for metric in METRICS:
                    if f.get(metric) is not None:
                        correct[label][t][metric] = correct[label][t].get(metric, 0.0) + f[metric] * f["n"]
            log(f"{label}: items {first}-{first + args.chunk - 1} done")
        figures_now = {
            label: {t: pooled(correct[label][t], counted[label][t]) for t in tasks if counted[label][t]}
            for label in models
        }
        summary = {
            "model": args.model,
            "preset": args.preset,
            "removed_blocks": blocks,
            "tasks": tasks,
            "items_per_task": {t: counted["dense"][t] for t in tasks},
            "items_available": sizes,
            "zero_shot": figures_now,
            "ppl": {
                "dense": runs["fusegpt"].report["dense_ppl"],
                "drop": runs["fusegpt"].report["dropped_ppl"],
                **{method: result.report["result_ppl"] for method, result in runs.items()},
                **{label: row["ppl"] for label, row in quantised.items()},
            },
            "gguf": {
                label: {k: row[k] for k in ("of", "quant", "file_bytes", "compression")}
                for label, row in quantised.items()
            },
            "seconds_zero_shot": {label: round(s, 1) for label, s in seconds.items()},
            "seconds_fusion": {m: r.report["seconds"]["total"] for m, r in runs.items()},
            "complete": all(counted["dense"][t] == total[t] for t in tasks),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
        print(table(figures_now, tasks), flush=True)
    log(f"wrote {args.out}")


def _rows(task: str) -> list[str]:
    """The items of a bundled task (lines of its JSONL)."""
    config = zeroshot.bundled_task_config(task)
    path = Path(next(iter(config["dataset_kwargs"]["data_files"].values())))
    return path.read_text(encoding="utf-8").splitlines()


if __name__ == "__main__":
    main()
