"""GPU check: a Llama-2-7B-shaped random bf16 model, an MI pass and one round of the paper preset
with fewer windows; peak GPU memory per stage, fine-tuning throughput as a fraction of the bf16
matmul peak measured in the same run, the memory plan's prediction beside each figure, and the same
round under a 24 GB budget. Writes benchmarks/results/gpu_check.json. A few minutes on one GPU.

    bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --smoke  # a tiny model on the CPU: checks the script itself
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

from fusegpt_core.adapters import get_blocks  # noqa: E402
from fusegpt_core.config import preset  # noqa: E402
from fusegpt_core.importance import score_blocks  # noqa: E402
from fusegpt_core.loading import LoadedModel  # noqa: E402
from fusegpt_core.memory import plan_memory  # noqa: E402
from fusegpt_core.offload import BlockOffload  # noqa: E402
from fusegpt_core.pipeline import run  # noqa: E402
from fusegpt_core.testing import tiny_tokenizer  # noqa: E402

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 num_hidden_layers=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)  # fmt: skip
SMOKE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=6, vocab_size=256, max_position_embeddings=512)  # fmt: skip


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Measured FLOP/s of an n x n x n matmul in `dtype` (the best of `repeats` timed calls)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def one_round(model, tokenizer, recipe, calib, evals, device) -> dict:
    """One paper-preset round through the pipeline; peak memory per stage and step throughput."""
    stages: dict[str, int | None] = {}
    steps: list[float] = []
    current = ["start"]
    last = [time.perf_counter()]

    def on_event(event):
        if event.kind == "stage":
            stages[current[0]] = max(stages.get(current[0]) or 0, peak_bytes(device) or 0) or None
            current[0] = "evaluate result" if event.stage == "evaluate" and "result" in event.message else event.stage
            reset_peak(device)
            last[0] = time.perf_counter()
        elif event.kind == "loss":
            sync(device)
            now = time.perf_counter()
            steps.append(now - last[0])
            last[0] = now

    loaded = LoadedModel(
        model=model, tokenizer=tokenizer, source="random llama-2-7b shape", kind="local", load_seconds=0
    )
    t0 = time.perf_counter()
    result = run(recipe, loaded, on_event=on_event, windows=(calib, evals))
    stages[current[0]] = peak_bytes(device)
    timed = steps[1:] or steps  # the first step includes warm-up
    seconds_per_step = sorted(timed)[len(timed) // 2] if timed else None
    return {"seconds": round(time.perf_counter() - t0, 1), "stage_peaks": stages, "seconds_per_step": seconds_per_step,
            "report": {k: result.report[k] for k in ("removed_blocks", "dense_ppl", "result_ppl", "rounds")}}  # fmt: skip


def group_flops_per_step(model, recipe) -> float:
    """Matmul FLOPs of one training step of a group: forward 2 P t, backward 4 P t over the group's
    seven blocks (P: their parameters, t: tokens per step); attention's own matmuls not counted."""
    block_params = sum(p.numel() for p in get_blocks(model)[0].parameters())
    tokens = recipe.distill.batch_size * recipe.data.seq_len
    return 6 * (recipe.fusion.group_size - 1) * block_params * tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (checks the script)")
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--budget-gb", type=float, default=24.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type != "cuda" and not args.smoke:
        sys.exit("no CUDA GPU here: run with --smoke to check the script on the CPU")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shape = SMOKE if args.smoke else LLAMA2_7B
    seq_len = 64 if args.smoke else 2048
    out: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype)}

    out["matmul_peak_tflops"] = round(matmul_peak(device, dtype, 256 if args.smoke else 8192, 10) / 1e12, 2)
    print(json.dumps(out), flush=True)

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**shape), dtype=dtype)
    model.eval()
    out["build_seconds"] = round(time.perf_counter() - t0, 1)
    out["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    tokenizer = tiny_tokenizer()  # only for the report's generation settings; windows are random ids
    windows = torch.randint(0, shape["vocab_size"], (args.n_calib + 4, seq_len))
    calib, evals = windows[: args.n_calib], windows[args.n_calib :]

    # an MI pass (the paper's 32 scoring windows would take longer; 8 show the throughput)
    recipe = preset("paper", remove=1, **{"data.n_calib": args.n_calib, "data.n_score": 8, "data.n_eval": 4,
                                          "distill.epochs": 1, "data.seq_len": seq_len, "eval.measure_speed": False})  # fmt: skip
    if args.smoke:
        recipe = preset(
            "tiny", remove=1, **{"data.n_calib": args.n_calib, "data.seq_len": seq_len, "fusion.group_size": 4}
        )
    reset_peak(device)
    t0 = time.perf_counter()
    score_blocks(model, calib[: recipe.data.n_score], metrics=("mi",), batch_size=8)
    sync(device)
    out["mi_pass"] = {"seconds": round(time.perf_counter() - t0, 1), "peak_bytes": peak_bytes(device),
                      "windows": recipe.data.n_score}  # fmt: skip
    print(json.dumps(out["mi_pass"]), flush=True)

    total = torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" else None
    plan = plan_memory(model, recipe, device, dtype, device_budget=total)
    out["plan"] = {"peak_device_bytes": plan.peak_device_bytes, "checkpoint": plan.checkpoint,
                   "stages": {s.name: s.device_bytes for s in plan.stages}}  # fmt: skip
    out["round"] = one_round(model, tokenizer, recipe, calib, evals, device)
    step = out["round"]["seconds_per_step"]
    if step:
        achieved = group_flops_per_step(model, recipe) / step
        out["finetune_tflops"] = round(achieved / 1e12, 2)
        out["finetune_fraction_of_matmul_peak"] = round(achieved / (out["matmul_peak_tflops"] * 1e12), 3)
    print(json.dumps({k: out[k] for k in ("round", "plan") if k in out}, default=str)[:2000], flush=True)

    # the same round under a smaller budget: the plan decides first (offload included), as `fuse` does
    if device.type == "cuda":
        budget = int(args.budget_gb * 1e9)
        small = plan_memory(model, recipe, device, dtype, device_budget=budget, offload=None)
        if small.offload != "none":  # the blocks go to the host (or disk); the device keeps the rest
            BlockOffload(small.offload, device).attach(model)
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))
        entry = {"budget_bytes": budget, "plan_fits": small.fits, "plan_peak": small.peak_device_bytes,
                 "advice": small.advice, "checkpoint": small.checkpoint, "offload": small.offload}  # fmt: skip
        try:
            entry["round"] = one_round(model, tokenizer, recipe, calib, evals, device)
            entry["ran"] = True
        except Exception as e:  # an out-of-memory message from the pipeline, recorded
            entry["ran"], entry["error"] = False, str(e)[:500]
        out["budget_run"] = entry
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
