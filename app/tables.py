"""Pure data -> pandas tables for the UI. No gradio, no torch."""

from __future__ import annotations

import math
from collections import Counter
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
    "decode tokens/s (median)",
    "tokens/s range",
    "weights (MB)",
    "removed blocks",
]
NOT_MEASURED = "not measured"


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
        *([("loaded from", info["origin"])] if info.get("origin") else []),
        *([("licence", info["licence"])] if info.get("licence") else []),
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
                "round": r["round"] + 1
                if isinstance(r.get("round"), int)
                else None,  # 1-based, as everywhere on screen
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

    `runs`: dicts with 'label' and 'report' (the pipeline's report). The original row comes from the
    latest report; a "dropped" row (the same blocks deleted with no repair, measured by each run) is
    added per distinct set of removed blocks unless a drop run of those blocks is already a row.
    Zero-shot accuracy (the reports' "zero_shot") adds one column per task, "-" where not measured."""
    if not runs:
        return pd.DataFrame(columns=COMPARE_COLUMNS)
    rows, figures = _compare_rows(runs)
    table = pd.DataFrame(rows, columns=COMPARE_COLUMNS)
    for task, metric in zero_shot_tasks(figures):
        usual = _usual_count([f.get(task) for f in figures])
        table[zero_shot_column(task, metric)] = [accuracy_cell(f.get(task), metric, usual) for f in figures]
    return table


def _compare_rows(runs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, dict]]]:
    """The compare table's rows and, for each row, its zero-shot figures by task ({} where none)."""
    latest = runs[-1]["report"]
    dense = latest.get("dense_ppl")
    before = next((r["report"] for r in reversed(runs) if _num(r["report"].get("bytes_before")) is not None), latest)
    rows = [
        _row("original", "-", latest.get("num_layers_before"), latest.get("params_before"), dense, dense,
             _speed(latest, "before"), before.get("bytes_before"), [])
    ]  # fmt: skip
    figures = [_zero_shot_of(runs, "original")]
    drop_runs = {tuple(r["report"].get("removed_blocks") or []) for r in runs if r["report"].get("method") == "drop"}
    seen_drops: set[tuple[int, ...]] = set()
    for run in runs:
        rep = run["report"]
        removed = tuple(rep.get("removed_blocks") or [])
        if not removed or removed in seen_drops or removed in drop_runs or _num(rep.get("dropped_ppl")) is None:
            continue
        seen_drops.add(removed)
        rows.append(
            _row(f"dropped {list(removed)}", "drop (no healing)", rep.get("num_layers_after"), rep.get("params_after"),
                 rep.get("dropped_ppl"), dense, None, rep.get("bytes_after"), removed)
        )  # fmt: skip
        figures.append(_zero_shot_of([r for r in runs if tuple(r["report"].get("removed_blocks") or []) == removed],
                                     "dropped"))  # fmt: skip
    for run in runs:
        rep = run["report"]
        label = run["label"] + (" (partial)" if rep.get("partial") else "")
        label += " (diverged)" if rep.get("status", "done") == "diverged" else ""
        rows.append(
            _row(label, rep.get("method", "?"), rep.get("num_layers_after"), rep.get("params_after"),
                 rep.get("result_ppl"), dense, _speed(rep, "after"), rep.get("bytes_after"),
                 rep.get("removed_blocks") or [])
        )  # fmt: skip
        figures.append(_zero_shot_of([run], "result"))
        for quantised in rep.get("quantised") or []:  # the result as GGUF: perplexity dequantised, file size
            ratio = _num(quantised.get("compression"))
            size = f", {ratio:.2f} x the original's 16-bit size" if ratio is not None else ""
            rows.append(
                _row(f"{label} + {quantised.get('quant')} GGUF{size}", f"{rep.get('method', '?')} + {quantised.get('quant')}",
                     rep.get("num_layers_after"), rep.get("params_after"), quantised.get("ppl"), dense, None,
                     quantised.get("file_bytes"), rep.get("removed_blocks") or [])
            )  # fmt: skip
            figures.append({})  # a GGUF file is not evaluated on the tasks
    return rows, figures


# ---- zero-shot accuracy (report["zero_shot"]: {"original"|"dropped"|"result": {task: figures}, "limit", ...})


def _zero_shot_of(runs: Sequence[dict[str, Any]], label: str) -> dict[str, dict]:
    """{task: figures} of one model (label "original", "dropped" or "result") from the reports of `runs`;
    a task measured by several of them takes the latest figures (the original is the same model in every run)."""
    out: dict[str, dict] = {}
    for run in runs:
        for task, figures in ((run["report"].get("zero_shot") or {}).get(label) or {}).items():
            if isinstance(figures, dict):
                out[task] = figures
    return out


def accuracy_of(figures: dict[str, Any] | None, metric: str = "acc_norm") -> tuple[str, float] | None:
    """(metric, value) of one task's figures: `metric` where measured, else acc; None where neither is."""
    if not figures:
        return None
    for name in dict.fromkeys((metric, "acc")):
        value = _num(figures.get(name))
        if value is not None:
            return name, value
    return None


def zero_shot_tasks(figures: Sequence[dict[str, dict]]) -> list[tuple[str, str]]:
    """(task, metric shown) for every task measured on some model, in order of first appearance; the
    metric is acc_norm where the task has it (multiple choice), acc otherwise (e.g. an open cloze)."""
    tasks = list(dict.fromkeys(task for f in figures for task in f))
    return [
        (task, "acc_norm" if any(_num((f.get(task) or {}).get("acc_norm")) is not None for f in figures) else "acc")
        for task in tasks
    ]


def zero_shot_column(task: str, metric: str) -> str:
    return f"{task} {metric}"


def _usual_count(figures: Sequence[dict | None]) -> int | None:
    """The most common number of items among one task's figures (cells measured on other counts say theirs)."""
    counts = Counter(f.get("n") for f in figures if f and isinstance(f.get("n"), int))
    return counts.most_common(1)[0][0] if counts else None  # a tie: the count met first (the original's)


def accuracy_cell(figures: dict[str, Any] | None, metric: str, usual_n: int | None = None) -> str:
    """'0.600 ± 0.163'; ' (acc)' where the column's metric is missing, ' (n=5)' where the items differ."""
    found = accuracy_of(figures, metric)
    if found is None:
        return "-"
    name, value = found
    stderr = _num(figures.get(f"{name}_stderr"))
    stderr = _num(figures.get("stderr")) if stderr is None else stderr
    text = f"{value:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")
    text += f" ({name})" if name != metric else ""
    n = figures.get("n")
    return text + (f" (n={n})" if usual_n is not None and isinstance(n, int) and n != usual_n else "")


def accuracy_frame(runs: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Long form of the compare table's accuracy, for `plots.accuracy_chart`: one row per model and task
    measured (model, method, task, metric, accuracy, stderr, n), models in the table's order."""
    columns = ["model", "method", "task", "metric", "accuracy", "stderr", "n"]
    if not runs:
        return pd.DataFrame(columns=columns)
    rows, figures = _compare_rows(runs)
    out = []
    for task, metric in zero_shot_tasks(figures):
        for row, by_task in zip(rows, figures):
            found = accuracy_of(by_task.get(task), metric)
            if found is None:
                continue
            f = by_task[task]
            stderr = _num(f.get(f"{found[0]}_stderr"))
            out.append({"model": row["model"], "method": row["method"], "task": task, "metric": found[0],
                        "accuracy": found[1], "stderr": _num(f.get("stderr")) if stderr is None else stderr,
                        "n": f.get("n")})  # fmt: skip
    return pd.DataFrame(out, columns=columns)


def _speed(report: dict[str, Any], when: str) -> dict[str, Any] | None:
    """The report's decode-speed measurement ('before' or 'after'): median, low, high, repeats."""
    speed = report.get(f"speed_{when}")
    if isinstance(speed, dict) and _num(speed.get("median")) is not None:
        return speed
    median = _num(report.get(f"tokens_per_s_{when}"))  # reports written before medians were kept
    return {"median": median} if median is not None else None


def _row(model, method, blocks, params, ppl, dense, speed, nbytes, removed) -> dict[str, Any]:
    ppl, dense = _num(ppl), _num(dense)
    delta = None
    if ppl is not None and dense:
        delta = f"{(ppl / dense - 1) * 100:+.1f}%"
    spread = NOT_MEASURED
    if speed and _num(speed.get("low")) is not None:
        spread = f"{speed['low']:.1f} to {speed['high']:.1f} ({speed.get('repeats', '?')} runs)"
    elif speed:
        spread = "one figure"
    return {
        "model": model,
        "method": method,
        "blocks": blocks,
        "params (M)": None if _num(params) is None else round(params / 1e6, 2),
        "perplexity": None if ppl is None else round(ppl, 3),
        "vs original": delta or "-",
        "decode tokens/s (median)": round(speed["median"], 1) if speed else None,
        "tokens/s range": spread,
        "weights (MB)": None if _num(nbytes) is None else round(nbytes / 2**20, 1),
        "removed blocks": ", ".join(str(b) for b in removed),
    }


def compare_caption(runs: Sequence[dict[str, Any]]) -> str:
    """What each column of the compare table measured."""
    if not runs:
        return ""
    rep = runs[-1]["report"]
    windows = rep.get("eval_windows")
    where = f"{windows[0]} windows x {windows[1]} tokens" if windows else f"{rep.get('eval_tokens', '?')} tokens"
    text = ((rep.get("recipe") or {}).get("data") or {}).get("eval_source", "the evaluation text")
    speed = rep.get("speed_after") or {}
    return (
        f"**Perplexity**: on {where} of `{text}` (the latest run's windows; every run reports its own original "
        f"and dropped figures on the same windows as its result). **Decode tokens/s**: greedy generation of "
        f"{speed.get('new_tokens', 32)} tokens with the KV cache, median and range of {speed.get('repeats', 5)} "
        "timed generations after a warm-up, taken in turns with the original so a busy machine slows both alike; "
        f"'{NOT_MEASURED}' where the run skipped it. **Weights**: bytes of the parameters in memory; for a GGUF "
        "row, the file's size (its perplexity is that of the model read back from it, dequantised)."
        + zero_shot_caption(runs)
    )


def zero_shot_counts(runs: Sequence[dict[str, Any]]) -> list[int]:
    """The numbers of items per task the zero-shot figures of these runs were measured on, sorted."""
    counts = set()
    for run in runs:
        zero_shot = run["report"].get("zero_shot") or {}
        for label in ("original", "dropped", "result"):
            for figures in (zero_shot.get(label) or {}).values():
                if isinstance(figures, dict) and isinstance(figures.get("n"), int):
                    counts.add(figures["n"])
    return sorted(counts)


def items_text(counts: Sequence[int]) -> str:
    """'5 items per task', '5 to 20 items per task'."""
    if not counts:
        return ""
    span = str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    return f"{span} item{'s' if counts[-1] != 1 else ''} per task"


def zero_shot_caption(runs: Sequence[dict[str, Any]]) -> str:
    counts = zero_shot_counts(runs)
    if not counts:
        return ""
    return (
        f" **Zero-shot accuracy** (one column per task): lm-evaluation-harness on the first {items_text(counts)}, "
        "acc_norm (the choice most likely per byte) where the task has it, else acc, ± its standard error, "
        "which is large on few items; '-' where not measured."
    )


def chart_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The compare table reshaped for `plots.compare_chart`: model, method, perplexity, params."""
    if table.empty:
        return pd.DataFrame(columns=["model", "method", "perplexity", "params"])
    params = table["params (M)"].map(lambda v: None if v is None or pd.isna(v) else v * 1e6)
    return pd.DataFrame(
        {"model": table["model"], "method": table["method"], "perplexity": table["perplexity"], "params": params}
    )
