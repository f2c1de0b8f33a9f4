"""llama.cpp on our GGUF files: perplexity and decode speed of the original and the fused model, at
the same quantisation. Optional, outside CI: it needs `llama-cpp-python` (a source package that
compiles llama.cpp, minutes on 2 cores: `pip install llama-cpp-python`), and says so when it is missing.

Exports the original model and the model of a `fuse --out DIR` run with fusegpt_core.gguf_export
(or takes two GGUF files), then in llama.cpp: perplexity over the same token windows of the bundled
evaluation text (tokenized by our tokenizer, so both models see the same ids) and greedy decode
tokens/s after a prompt. Writes benchmarks/results/bench_gguf_llamacpp.json.

    python benchmarks/bench_gguf_llamacpp.py --run out/smol-fused --quant q4_0
    python benchmarks/bench_gguf_llamacpp.py --original a.gguf --fused b.gguf
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        print(
            "llama_cpp is not importable: this benchmark runs our GGUF files in llama.cpp through "
            "llama-cpp-python, which is not installed here (`pip install llama-cpp-python` compiles llama.cpp; "
            "minutes on 2 cores). Nothing was measured.",
            file=sys.stderr,
        )
        sys.exit(2)
    return llama_cpp


def llama_cpp_perplexity(llm, windows) -> float:
    """exp(mean next-token NLL) over windows (n, seq) of token ids, each window evaluated from scratch."""
    import numpy as np

    nll, count = 0.0, 0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        scores = getattr(llm, "scores", None)
        logits = np.asarray(scores if scores is not None else llm._scores, dtype=np.float64)[: len(window)]
        logits = logits[:-1]  # (seq - 1, vocab): the prediction of each next token
        top = logits.max(axis=1, keepdims=True)
        log_norm = (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]
        targets = np.asarray(window[1:])
        nll += float((log_norm - logits[np.arange(len(targets)), targets]).sum())
        count += len(targets)
    return math.exp(nll / count)


def llama_cpp_decode_speed(llm, prompt_ids: list[int], new_tokens: int, repeats: int) -> dict:
    """Greedy decode tokens/s after the prompt (the prompt's own evaluation is not timed)."""
    rates = []
    for _ in range(repeats + 1):  # the first is a warm-up
        generated, started = 0, None
        for _token in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
            if started is None:  # the first token comes after the prompt is evaluated
                started = time.perf_counter()
            else:
                generated += 1
            if generated == new_tokens:
                break
        rates.append(new_tokens / (time.perf_counter() - started))
    rates = rates[1:]
    return {"median": statistics.median(rates), "low": min(rates), "high": max(rates), "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None, help="a `fuse --out` folder: its model/ is the fused model")
    ap.add_argument("--original-model", default=None, help="the model the run started from (default: its recipe's)")
    ap.add_argument("--original", default=None, metavar="GGUF", help="an original model's GGUF file, instead")
    ap.add_argument("--fused", default=None, metavar="GGUF", help="a fused model's GGUF file, instead of --run")
    ap.add_argument("--quant", default="q4_0")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_gguf_llamacpp.json"))
    args = ap.parse_args()
    llama_cpp = import_llama_cpp()  # before any model is loaded
    if not args.run and not (args.original and args.fused):
        ap.error("give --run DIR, or both --original and --fused GGUF files")

    from fusegpt_core.data import load_texts, token_windows
    from fusegpt_core.gguf_export import export_gguf, load_gguf_tokenizer
    from fusegpt_core.loading import load_model

    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as scratch:
        files = {"original": args.original, "fused": args.fused}
        if args.run:
            report = json.loads((Path(args.run) / "report.json").read_text())
            sources = {
                "original": args.original_model or report["recipe"]["model"],
                "fused": str(Path(args.run) / "model"),
            }
            for label, source in sources.items():
                if files[label] is None:
                    loaded = load_model(source, device="cpu", dtype="float32")
                    files[label] = str(
                        export_gguf(loaded.model, loaded.tokenizer, Path(scratch) / f"{label}.gguf", args.quant)
                    )
                    del loaded
        tokenizer = load_gguf_tokenizer(files["original"])
        _, text = load_texts("bundled", "bundled")
        windows = token_windows(tokenizer, text, args.seq_len, None)[: args.windows]
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Tell me about rivers."}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        rows = []
        for label, path in files.items():
            llm = llama_cpp.Llama(
                model_path=path, n_ctx=max(args.seq_len, len(prompt) + args.new_tokens + 8), logits_all=True,
                n_threads=args.threads, verbose=False,
            )  # fmt: skip
            row = {
                "model": label,
                "file": path,
                "file_bytes": Path(path).stat().st_size,
                "ppl": llama_cpp_perplexity(llm, windows),
                "decode_tokens_per_s": llama_cpp_decode_speed(llm, prompt, args.new_tokens, args.repeats),
            }
            rows.append(row)
            print(f"{label:>8}: ppl {row['ppl']:.3f}, {row['decode_tokens_per_s']['median']:.1f} tokens/s, "
                  f"{row['file_bytes'] / 2**20:.1f} MiB", flush=True)  # fmt: skip
            del llm
    summary = {
        "what": "llama.cpp (llama-cpp-python) on our GGUF files",
        "quant": args.quant if args.run else "as given",
        "eval": {"text": "bundled", "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])},
        "llama_cpp_version": getattr(llama_cpp, "__version__", "unknown"),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
