"""How good is the app's run-time estimate? The estimate and the measured stage times of a 2-block run of
the `quick` and `cpu-demo` presets on the bundled model. Writes benchmarks/results/estimate_check.json.

    python benchmarks/estimate_check.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.estimate import estimate_run  # noqa: E402
from app.work import TIMING_SEQ_LEN, time_block_forward, time_decode_token  # noqa: E402
from fusegpt_core.config import preset  # noqa: E402
from fusegpt_core.loading import load_model  # noqa: E402
from fusegpt_core.pipeline import run  # noqa: E402


def main() -> None:
    loaded = load_model("bundled")
    block_s, decode_s = time_block_forward(loaded), time_decode_token(loaded)  # what the app measures at load
    out = {"block_ms": block_s * 1000, "decode_token_ms": decode_s * 1000, "runs": []}
    for name in ("quick", "cpu-demo"):
        recipe = preset(name, remove=2)
        est = estimate_run(recipe, 30, block_s, TIMING_SEQ_LEN, decode_token_seconds=decode_s)
        start = time.perf_counter()
        report = run(recipe, loaded).report
        row = {
            "preset": name,
            "remove": 2,
            "estimate_s": {k: round(v, 1) for k, v in est["stages"].items()},
            "estimate_total_s": round(est["total"], 1),
            "measured_s": report["seconds"],
            "wall_s": round(time.perf_counter() - start, 1),
            "removed": report["removed_blocks"],
            "dense_ppl": report["dense_ppl"],
            "dropped_ppl": report["dropped_ppl"],
            "result_ppl": report["result_ppl"],
        }
        out["runs"].append(row)
        print(json.dumps(row), flush=True)
    path = ROOT / "benchmarks" / "results" / "estimate_check.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
