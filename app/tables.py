"""Pure data -> pandas tables for the UI. No gradio, no torch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

COMPARE_COLUMNS = [
    "model",
    "method",
    "blocks",
    "params (M)",
    "perplexity",
    "vs original",
    "tokens/s",
    "memory (MB)",
    "removed blocks",
]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def fmt_seconds(s: float | None) -> str:
    """3.2 s, 2 min 05 s, 1 h 02 min."""
    if s is None or not math.isfinite(s):
        return "?"
    s = max(float(s), 0.0)
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def fmt_params(n: Any) -> str:
    n = _num(n)
    if n is None:
        return "?"
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n / 1e3:.1f} K"


def model_info_table(info: dict[str, Any]) -> pd.DataFrame:
    """Two columns, one row per fact about a loaded model."""
    rows = [
        ("source", info.get("source", "?")),
        ("architecture", info.get("model_type", "?")),
        ("blocks", info.get("blocks", "?")),
        ("parameters", fmt_params(info.get("params"))),
        ("device", info.get("device", "?")),
        ("dtype", info.get("dtype", "?")),
        ("load time", fmt_seconds(info.get("load_seconds"))),
    ]
    if info.get("one_block_ms") is not None:
        rows.append(("one block forward", f"{info['one_block_ms']:.1f} ms ({info.get('timing_shape', '')})"))
    return pd.DataFrame(rows, columns=["property", "value"]).astype({"value": str})


def scores_table(scores: dict[str, Sequence[float | None]], labels: dict[str, str] | None = None) -> pd.DataFrame:
    """Blocks as rows, metrics as columns, raw values (for download and screen readers)."""
    labels = labels or {}
    n = max((len(v) for v in scores.values()), default=0)
    data: dict[str, list] = {"block": list(range(n))}
    for key, vals in scores.items():
        data[labels.get(key, key)] = [
            None if _num(v) is None else round(float(v), 6) for v in list(vals) + [None] * (n - len(vals))
        ]
    return pd.DataFrame(data)


def agreement_table(agreement: pd.DataFrame, labels: dict[str, str] | None = None) -> pd.DataFrame:
    """The Spearman matrix with readable names and two decimals, first column = metric."""
    if agreement is None or agreement.empty:
        return pd.DataFrame({"metric": []})
    labels = labels or {}
    df = agreement.copy().astype(float).round(2)
    df.columns = [labels.get(str(c), str(c)) for c in df.columns]
    df.insert(0, "metric", [labels.get(str(i), str(i)) for i in agreement.index])
    return df.reset_index(drop=True)


def rounds_table(rounds: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per fusion round: what was removed, into which blocks, how the loss moved."""
    rows = []
    for r in rounds:
        first, last = _num(r.get("loss_first")), _num(r.get("loss_last"))
        rows.append(
            {
                "round": r.get("round"),
                "removed": r.get("removed"),
                "targets": ", ".join(str(t) for t in r.get("targets") or []),
                "loss first": None if first is None else round(first, 5),
                "loss last": None if last is None else round(last, 5),
                "seconds": None if _num(r.get("seconds")) is None else round(float(r["seconds"]), 1),
            }
        )
    return pd.DataFrame(rows, columns=["round", "removed", "targets", "loss first", "loss last", "seconds"])


def compare_table(runs: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Original, dropped-only and each run, one row each.

    `runs`: dicts with 'label', 'report' (the pipeline's report) and optionally 'bytes_before',
    'bytes_after' (model memory; else taken from the report). The original and dropped rows come from the reports themselves:
    one original row (the latest report's), one dropped row per distinct set of removed blocks."""
    rows: list[dict[str, Any]] = []
    if not runs:
        return pd.DataFrame(columns=COMPARE_COLUMNS)
    latest = runs[-1]["report"]
    before = next((b for b in (_bytes(r, "bytes_before") for r in reversed(runs)) if b is not None), None)
    rows.append(
        _row(
            "original",
            "-",
            latest.get("num_layers_before"),
            latest.get("params_before"),
            latest.get("dense_ppl"),
            latest.get("dense_ppl"),
            latest.get("tokens_per_s_before"),
            before,
            [],
        )
    )
    seen_drops: set[tuple[int, ...]] = set()
    for run in runs:
        rep = run["report"]
        removed = tuple(rep.get("removed_blocks") or [])
        if removed and removed not in seen_drops and _num(rep.get("dropped_ppl")) is not None:
            seen_drops.add(removed)
            rows.append(
                _row(
                    f"dropped {list(removed)}",
                    "drop (no healing)",
                    rep.get("num_layers_after"),
                    rep.get("params_after"),
                    rep.get("dropped_ppl"),
                    latest.get("dense_ppl"),
                    None,
                    _bytes(run, "bytes_after"),
                    removed,
                )
            )
    for run in runs:
        rep = run["report"]
        status = rep.get("status", "done")
        label = (
            run["label"]
            + (" (partial)" if rep.get("partial") else "")
            + (" (diverged)" if status == "diverged" else "")
        )
        rows.append(
            _row(
                label,
                rep.get("method", "?"),
                rep.get("num_layers_after"),
                rep.get("params_after"),
                rep.get("result_ppl"),
                latest.get("dense_ppl"),
                rep.get("tokens_per_s_after"),
                _bytes(run, "bytes_after"),
                rep.get("removed_blocks") or [],
            )
        )
    return pd.DataFrame(rows, columns=COMPARE_COLUMNS)


def _bytes(run: dict[str, Any], key: str) -> float | None:
    value = run.get(key)
    return _num(value if value is not None else run["report"].get(key))


def _row(model, method, blocks, params, ppl, dense, tps, nbytes, removed) -> dict[str, Any]:
    ppl, dense = _num(ppl), _num(dense)
    delta = None
    if ppl is not None and dense:
        delta = f"{(ppl / dense - 1) * 100:+.1f}%"
    return {
        "model": model,
        "method": method,
        "blocks": blocks,
        "params (M)": None if _num(params) is None else round(params / 1e6, 2),
        "perplexity": None if ppl is None else round(ppl, 3),
        "vs original": delta or "-",
        "tokens/s": None if _num(tps) is None else round(tps, 1),
        "memory (MB)": None if _num(nbytes) is None else round(nbytes / 2**20, 1),
        "removed blocks": ", ".join(str(b) for b in removed),
    }


def chart_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The compare table reshaped for `plots.compare_chart`: model, perplexity, params."""
    if table.empty:
        return pd.DataFrame(columns=["model", "perplexity", "params"])
    params = table["params (M)"].map(lambda v: None if v is None or pd.isna(v) else v * 1e6)
    return pd.DataFrame({"model": table["model"], "perplexity": table["perplexity"], "params": params})
