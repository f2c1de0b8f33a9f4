"""Host memory of a run on a model of real width: peak resident memory over the weights' bytes,
per stage, next to what `python -m fusegpt_core plan` predicted for the same command.

Builds a random-weight model from a real model's dimensions (TinyLlama-1.1B's, or Llama-2-7B's with
a few of its 32 blocks so it fits a 24 GiB machine in fp32; no hub needed), saves it once as a local
folder, then runs `python -m fusegpt_core fuse` on it in a child process that samples its own
resident and anonymous memory every 50 ms and tags each sample with the pipeline stage running
(the import of torch and transformers subtracted). The plan predicts resident memory: everything
the run touches, the weights included (they stay file-backed, mmapped from safetensors, on CPU). Writes benchmarks/results/memory.json.

    python benchmarks/bench_memory.py                          # TinyLlama width, 12 blocks, fp32, CPU
    python benchmarks/bench_memory.py --shape llama2-7b --layers 4
    python benchmarks/bench_memory.py --layers 4               # a quicker look
    python benchmarks/bench_memory.py --offload disk --group-size 4   # blocks read from their files
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                      vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
}  # fmt: skip

CHILD = """
import json, os, runpy, sys, threading, time
def rss():  # (resident, anonymous) bytes: mmapped safetensors weights are resident but file-backed
    d = {}
    for line in open('/proc/self/status'):
        if line.startswith(('VmRSS', 'RssAnon')):
            key, value = line.split(':')
            d[key] = int(value.split()[0]) * 1024
    return d['VmRSS'], d['RssAnon']
import torch, transformers  # noqa: F401  the baseline: what importing the stack costs
base = rss()
import fusegpt_core.cli as cli
stage, peaks = ['load'], {}
show = cli._Progress.__call__
def tag(self, event):
    if event.kind == 'stage':
        stage[0] = {'evaluate': 'evaluate', 'finetune': 'finetune'}.get(event.stage, event.stage)
        if event.stage == 'evaluate' and 'result' in event.message:
            stage[0] = 'evaluate result'
        if event.stage in ('fuse', 'finetune'):
            stage[0] = 'finetune'  # a round: its teacher, surgery and training
    return show(self, event)
cli._Progress.__call__ = tag
def record():
    now = rss()
    old = peaks.get(stage[0], (0, 0))
    peaks[stage[0]] = (max(old[0], now[0] - base[0]), max(old[1], now[1] - base[1]))
def sample():
    while True:
        record()
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
sys.argv = ['fusegpt_core'] + sys.argv[1:]
try:
    runpy.run_module('fusegpt_core', run_name='__main__')
except SystemExit:
    pass
record()
print('PEAKS', json.dumps(peaks), flush=True)
"""


def build(folder: Path, layers: int, shape: str) -> int:
    """The random model's folder (made once); returns its weight bytes."""
    import torch
    import transformers

    from fusegpt_core.testing import tiny_tokenizer

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(num_hidden_layers=layers, **SHAPES[shape])
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(folder)
        tokenizer = tiny_tokenizer()  # byte-level: any text works; the vocabulary is the model's
        tokenizer.save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="tinyllama")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--offload", choices=("none", "cpu", "disk"), default="none")
    ap.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "fusegpt-bench"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    args = ap.parse_args()
    folder = Path(f"{args.folder}-{args.shape}-{args.layers}")
    weight_bytes = build(folder, args.layers, args.shape)
    text = Path(tempfile.gettempdir()) / "fusegpt-bench-text.txt"
    from fusegpt_core.testing import sample_text

    text.write_text(sample_text(200_000))
    out = Path(tempfile.mkdtemp()) / "run"
    recipe = ["--remove", "2", "--preset", "tiny", "--set", f"fusion.group_size={args.group_size}", "--device", "cpu",
              "--calib-text", str(text), "--eval-text", str(text), "--offload", args.offload]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    plan_file = out.parent / "plan.json"
    planned = subprocess.run([sys.executable, "-m", "fusegpt_core", "plan", "--model", str(folder), *recipe,
                              "--json", str(plan_file), "--quiet"], env=env, cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    if planned.returncode != 0:
        sys.exit(f"the plan failed:\n{planned.stderr[-2000:]}")
    plan = json.loads(plan_file.read_text())
    argv = ["fuse", "--model", str(folder), *recipe, "--out", str(out), "--quiet"]
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PEAKS")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"the run failed:\n{proc.stderr[-2000:]}")
    measured = json.loads(line.split(" ", 1)[1])  # stage -> (resident, anonymous)
    predicted = {st["name"]: st["host_bytes"] for st in plan["stages"]}
    resident = max(v[0] for v in measured.values())
    anonymous = max(v[1] for v in measured.values())
    stages = {
        name: {
            "resident_gib": round(measured[name][0] / 2**30, 2),
            "anonymous_gib": round(measured[name][1] / 2**30, 2),
            "predicted_gib": round(predicted[name] / 2**30, 2),
        }
        for name in predicted
        if name in measured
    }
    result = {
        "model": f"random, {args.shape} shape, {args.layers} blocks, fp32, group {args.group_size}, offload {args.offload}",
        "offload": args.offload,
        "command": "fuse " + " ".join(recipe),
        "weight_bytes": weight_bytes,
        # resident counts the weights, which stay in the page cache as mmapped safetensors (file-backed);
        # anonymous is what the run itself allocates (the figure: 4.6 x before this work)
        "peak_resident_bytes_above_imports": resident,
        "peak_resident_over_weights": round(resident / weight_bytes, 2),
        "peak_anonymous_bytes_above_imports": anonymous,
        "peak_anonymous_over_weights": round(anonymous / weight_bytes, 2),
        "predicted_peak_host_bytes": plan["peak_host_bytes"],
        "prediction_error_vs_resident": round(plan["peak_host_bytes"] / resident - 1, 3),
        "stages": stages,
    }
    print(json.dumps(result, indent=1))
    path = Path(args.out)
    runs = json.loads(path.read_text()) if path.exists() else []
    runs = [r for r in (runs if isinstance(runs, list) else []) if r.get("model") != result["model"]]
    path.write_text(json.dumps([*runs, result], indent=1))


if __name__ == "__main__":
    main()
