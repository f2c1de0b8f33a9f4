"""Host memory of a run on a model of real width: peak resident memory over the weights' bytes.

Builds a random-weight model from TinyLlama-1.1B's dimensions (12 of its 22 blocks by default, so
it is quick on a CPU; no hub needed), saves it once as a local folder, then runs
`python -m fusegpt_core fuse` on it in a child process and reads the child's peak resident memory
(VmHWM) minus what the same process holds after importing torch and transformers. Writes
benchmarks/results/memory.json.

    python benchmarks/bench_memory.py                  # TinyLlama width, 12 blocks, fp32, CPU
    python benchmarks/bench_memory.py --layers 4       # a quicker look
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

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                 vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5)  # fmt: skip

CHILD = """
import resource, runpy, sys
def kib():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])
import torch, transformers  # noqa: F401  the baseline: what importing the stack costs
base = kib()
sys.argv = ['fusegpt_core'] + sys.argv[1:]
try:
    runpy.run_module('fusegpt_core', run_name='__main__')
except SystemExit:
    pass
print('PEAK_KIB', kib(), 'BASE_KIB', base, flush=True)
"""


def build(folder: Path, layers: int) -> int:
    """The random model's folder (made once); returns its weight bytes."""
    import torch
    import transformers

    from fusegpt_core.testing import tiny_tokenizer

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(num_hidden_layers=layers, **TINYLLAMA)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(folder)
        tokenizer = tiny_tokenizer()  # byte-level: any text works; the vocabulary is the model's
        tokenizer.save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "fusegpt-bench-tinyllama"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    args = ap.parse_args()
    folder = Path(f"{args.folder}-{args.layers}")
    weight_bytes = build(folder, args.layers)
    text = Path(tempfile.gettempdir()) / "fusegpt-bench-text.txt"
    from fusegpt_core.testing import sample_text

    text.write_text(sample_text(200_000))
    out = Path(tempfile.mkdtemp()) / "run"
    argv = ["fuse", "--model", str(folder), "--remove", "2", "--preset", "tiny", "--set", "fusion.group_size=8",
            "--device", "cpu", "--calib-text", str(text), "--eval-text", str(text), "--out", str(out), "--quiet"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PEAK_KIB")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"the run failed:\n{proc.stderr[-2000:]}")
    _, peak, _, base = line.split()
    peak_bytes = (int(peak) - int(base)) * 1024
    result = {
        "model": f"random, TinyLlama-1.1B width, {args.layers} blocks, fp32",
        "command": "fuse " + " ".join(argv[3:]),
        "weight_bytes": weight_bytes,
        "peak_host_bytes_above_imports": peak_bytes,
        "peak_over_weights": round(peak_bytes / weight_bytes, 2),
    }
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
