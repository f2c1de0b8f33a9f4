"""What ZeroGPU's way of running costs: the same fusion run on the bundled model in the app's process
and as forked, pickled calls (app/gpu.py with FUSEGPT_GPU=fork: one call per round, then one that
folds, evaluates and exports), and the bytes that cross each call. Writes
benchmarks/results/gpu_calls.json.

    python benchmarks/bench_gpu_calls.py                 # tiny preset, 2 blocks
    python benchmarks/bench_gpu_calls.py --remove 3
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app import work  # noqa: E402
from app.jobs import DONE  # noqa: E402
from app.state import make_context  # noqa: E402
from app.testing import run_job  # noqa: E402
from fusegpt_core.config import preset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--remove", type=int, default=2)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_calls.json"))
    args = ap.parse_args()
    app = make_context(reaper=False, root=Path(tempfile.mkdtemp()))
    session = app.sessions.get("bench")
    snap = run_job(app, session, work.make_load_job(app, session, "bundled", "cpu", None, False), "load", 600)
    assert snap.status == DONE, snap.error
    recipe = preset(args.preset, remove=args.remove)
    windows = work.run_windows(app, session.loaded.tokenizer, recipe)
    sizes = {"recipe": len(pickle.dumps(recipe.to_dict())), "windows": len(pickle.dumps(windows))}

    timings = {}
    for mode in ("off", "fork"):
        os.environ["FUSEGPT_GPU"] = mode
        start = time.perf_counter()
        snap = run_job(app, session, work.make_run_job(app, session, recipe), "run", 3600)
        assert snap.status == DONE, snap.error
        timings[mode] = time.perf_counter() - start
    calls = args.remove + 1
    plain, forked = session.runs[-2].report, session.runs[-1].report
    result = {
        "model": "bundled (SmolLM2-135M, fp32, CPU)",
        "recipe": f"{args.preset}, remove {args.remove}",
        "seconds_in_process": round(timings["off"], 1),
        "seconds_forked_calls": round(timings["fork"], 1),
        "calls": calls,
        "overhead_per_call_seconds": round((timings["fork"] - timings["off"]) / calls, 2),
        "bytes_sent_per_call": sum(sizes.values()),
        "sent": sizes,
        "same_result_ppl": plain["result_ppl"] == forked["result_ppl"],
        "note": "the result comes back as an exported folder, loaded by the app (included in the forked time)",
    }
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))
    app.close()


if __name__ == "__main__":
    main()
