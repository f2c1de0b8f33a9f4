"""GGUF export of the bundled model (and of a fused run's result): perplexity, file size, compression.

Writes the bundled SmolLM2-135M (and, with --run DIR, the model of a `fuse --out DIR` run) as GGUF
at each quantisation, reads every file back through transformers' GGUF reader (dequantised) and
measures perplexity with fusegpt_core.evaluate.perplexity on the same windows of the bundled
evaluation text for every model. Compression is the file's size over the original model's
parameters in 16-bit (the paper's "size after / size before"). At f16 it also checks that the file's
tokenizer encodes a test string to the same ids and that greedy chat generation matches the model
in memory. Writes benchmarks/results/bench_gguf.json.

    python benchmarks/bench_gguf.py                           # the bundled model, f16 / q8_0 / q4_0
    python benchmarks/bench_gguf.py --run out/smol-fused      # and a fused run's result
    python benchmarks/bench_gguf.py --quants q4_0 --windows 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local

from fusegpt_core.data import load_texts, token_windows  # noqa: E402
from fusegpt_core.evaluate import generate, perplexity  # noqa: E402
from fusegpt_core.gguf_export import load_gguf_model, load_gguf_tokenizer, quantisation_rows  # noqa: E402
from fusegpt_core.loading import load_model  # noqa: E402

TEST_STRING = "In 2024, the quick brown fox jumped over 13 lazy dogs; <|im_end|> it said: 'hello!'"
PROMPTS = ("What is the capital of France?", "Write one sentence about rivers.")


def measure(label: str, loaded, windows, quants, folder: Path, size_before: int, batch_size: int) -> dict:
    """The in-memory model's perplexity, then one row per quantisation (see quantisation_rows)."""
    start = time.perf_counter()
    reference = perplexity(loaded.model, windows, batch_size)
    rows = quantisation_rows(
        loaded.model, loaded.tokenizer, folder / f"{label}.gguf", quants, windows, size_before, batch_size=batch_size
    )
    for row in rows:
        row["ppl_vs_memory"] = row["ppl"] / reference - 1
        row["file"] = Path(row["file"]).name  # the folder is temporary unless --keep
        print(
            f"{label:>9} {row['quant']:>5}: ppl {row['ppl']:.3f} ({row['ppl_vs_memory'] * 100:+.2f}% vs in memory "
            f"{reference:.3f}), {row['file_bytes'] / 2**20:.1f} MiB, {row['compression']:.3f} x the original",
            flush=True,
        )
    checks = {}
    if "f16" in quants:
        f16 = folder / next(row["file"] for row in rows if row["quant"] == "f16")
        back_model, back_tokenizer = load_gguf_model(f16), load_gguf_tokenizer(f16)
        checks["tokenizer_ids_match"] = (
            back_tokenizer(TEST_STRING)["input_ids"] == loaded.tokenizer(TEST_STRING)["input_ids"]
        )
        answers = []
        for prompt in PROMPTS:
            ours = generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=24)
            theirs = generate(back_model, back_tokenizer, prompt, max_new_tokens=24)
            answers.append({"prompt": prompt, "in_memory": ours, "from_gguf": theirs, "match": ours == theirs})
        checks["greedy_chat_generation"] = answers
        print(f"{label:>9}   f16: tokenizer ids match {checks['tokenizer_ids_match']}, greedy generations match "
              f"{[a['match'] for a in answers]}", flush=True)  # fmt: skip
    return {
        "label": label,
        "ppl_in_memory": reference,
        "blocks": loaded.model.config.num_hidden_layers,
        "params": loaded.num_params,
        "size_before_bytes": size_before,
        "rows": rows,
        "checks": checks,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None, help="a `fuse --out` folder whose model/ to measure too")
    ap.add_argument("--quants", default="f16,q8_0,q4_0")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument(
        "--keep", default=None, metavar="DIR", help="write the GGUF files here (default: a temporary folder)"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_gguf.json"))
    args = ap.parse_args()
    quants = args.quants.split(",")

    original = load_model("bundled", device="cpu", dtype="float32")
    _, eval_text = load_texts("bundled", "bundled")
    windows = token_windows(original.tokenizer, eval_text, args.seq_len, None)[: args.windows]
    size_before = 2 * original.num_params  # the original model's parameters in 16-bit
    print(f"{windows.shape[0]} windows x {windows.shape[1]} tokens of the bundled evaluation text", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as scratch:
        folder = Path(args.keep or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        models = [measure("original", original, windows, quants, folder, size_before, args.batch_size)]
        del original
        if args.run:
            run_dir = Path(args.run)
            report = json.loads((run_dir / "report.json").read_text())
            fused = load_model(str(run_dir / "model"), device="cpu", dtype="float32")
            result = measure("fused", fused, windows, quants, folder, 2 * report["params_before"], args.batch_size)
            result["run"] = {k: report.get(k) for k in ("method", "removed_blocks", "num_layers_before", "result_ppl")}
            models.append(result)

    summary = {
        "what": "GGUF files read back through transformers (dequantised); perplexity on the same windows",
        "eval": {"text": "bundled", "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])},
        "compression": "file size / the original model's parameters in 16-bit",
        "models": models,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
