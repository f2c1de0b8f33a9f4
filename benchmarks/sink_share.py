"""Why plain MSE is a poor distillation loss here: the attention-sink token's hidden state.

For a few calibration windows of the bundled model, prints (and writes to
benchmarks/results/sink_share.json) per block output: the share of all squared hidden-state mass
that sits on each window's first token, that token's mean square against the others', and the
share held by the 5 largest channels.

    python benchmarks/sink_share.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusegpt_core.config import preset  # noqa: E402
from fusegpt_core.loading import load_model  # noqa: E402
from fusegpt_core.pipeline import load_windows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sink_share.json"))
    args = ap.parse_args()
    loaded = load_model(args.model)
    calib, _ = load_windows(preset("cpu-demo", model=args.model), loaded.tokenizer)
    with torch.no_grad():
        hidden = loaded.model(calib[: args.windows].to(loaded.model.device), output_hidden_states=True).hidden_states
    rows = []
    print(f"{'block out':>9} {'first-token share':>18} {'first / other mean sq':>22} {'top-5 channel share':>20}")
    # hidden_states[i] is block i-1's output; the last entry has the final norm applied, so skip it
    for layer in range(1, len(hidden) - 1):
        h = hidden[layer].float()  # (windows, seq, hidden)
        per_token = h.pow(2).mean(-1)  # (windows, seq)
        per_channel = h.pow(2).mean((0, 1))  # (hidden,)
        row = {
            "block": layer - 1,
            "first_token_share": (per_token[:, 0].sum() / per_token.sum()).item(),
            "first_over_other": (per_token[:, 0].mean() / per_token[:, 1:].mean()).item(),
            "top5_channel_share": (per_channel.topk(5).values.sum() / per_channel.sum()).item(),
        }
        rows.append(row)
        print(
            f"{row['block']:>9} {row['first_token_share']:>18.4f} {row['first_over_other']:>22.0f} "
            f"{row['top5_channel_share']:>20.4f}"
        )
    Path(args.out).write_text(json.dumps({"model": args.model, "windows": args.windows, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
