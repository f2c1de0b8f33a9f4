"""Session / job snapshot -> what each widget shows. No gradio: figures, DataFrames and strings.

ui.py wraps these values into component updates; tests call them directly.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from . import plots, tables
from .jobs import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobSnapshot
from .state import Session

STATUS_ICON = {QUEUED: "◷", RUNNING: "▶", DONE: "✔", FAILED: "✖", CANCELLED: "■"}


def metric_labels() -> dict[str, str]:
    from fusegpt_core.importance import METRICS

    return {k: m.label for k, m in METRICS.items()}


# ---- status ---------------------------------------------------------------------------------------


def status_text(snap: JobSnapshot | None, queued_total: int = 0) -> str:
    """One or two lines about the session's current (or last) job, for the status bar."""
    if snap is None:
        return "No job yet. Start with **Load model**, or press **One-click demo**."
    icon = STATUS_ICON.get(snap.status, "")
    if snap.status == QUEUED:
        return f"{icon} **{snap.title}**: waiting in the queue, position {snap.position} (jobs run one at a time)."
    if snap.status == RUNNING:
        parts = [f"{icon} **{snap.title}**: {snap.message}"]
        if snap.total:
            parts.append(f"step {snap.step}/{snap.total}")
        parts.append(f"elapsed {tables.fmt_seconds(snap.elapsed_s)}")
        if snap.eta_s is not None:
            parts.append(f"ETA {tables.fmt_seconds(snap.eta_s)}")
        if snap.stop_requested:
            parts.append("stopping…")
        if queued_total:
            parts.append(f"{queued_total} more queued")
        return " · ".join(parts)
    if snap.status == DONE:
        return f"{icon} **{snap.title}** finished in {tables.fmt_seconds(snap.elapsed_s)}."
    if snap.status == CANCELLED:
        return f"{icon} **{snap.title}** stopped. {snap.error}"
    return f"{icon} **{snap.title}** failed: {snap.error}"


def progress_fraction(snap: JobSnapshot | None) -> float:
    if snap is None or not snap.total:
        return 0.0
    return max(0.0, min(1.0, snap.step / snap.total))


# ---- model ----------------------------------------------------------------------------------------


def model_table(session: Session) -> pd.DataFrame:
    if session.model_info is None:
        return pd.DataFrame({"property": ["model"], "value": ["not loaded yet"]})
    return tables.model_info_table(session.model_info)


def block_choices(session: Session) -> list[str]:
    n = int((session.model_info or {}).get("blocks") or 0)
    return [str(i) for i in range(n)]


# ---- importance -----------------------------------------------------------------------------------


def importance_origin(session: Session) -> str:
    imp = session.importance
    if imp is None:
        if session.model_info is None:
            return "Load a model first."
        return "No scores yet for this model: press **Compute importance**."
    if imp["origin"] == "precomputed":
        s = imp.get("settings", {})
        return (
            f"Showing **precomputed** scores for the bundled model ({s.get('calib_source', 'bundled')} text, "
            f"{s.get('n_score', '?')} x {s.get('seq_len', '?')} tokens). Press **Compute importance** to score "
            "on other text or settings."
        )
    return f"Scores {imp['origin']}."


def importance_figures(session: Session) -> tuple[Any, Any, pd.DataFrame, pd.DataFrame]:
    """(heatmap, agreement figure, agreement table, raw scores table)."""
    labels = metric_labels()
    imp = session.importance
    if imp is None:
        empty = plots.empty_figure("No importance scores yet")
        return (
            empty,
            plots.empty_figure("Rank agreement appears with the scores"),
            pd.DataFrame(),
            pd.DataFrame(),
        )
    heat = plots.importance_heatmap(imp["scores"], labels, selected=session.plan.get("blocks") or [])
    agreement = imp.get("agreement")
    agreement = agreement if isinstance(agreement, pd.DataFrame) else pd.DataFrame()
    return (
        heat,
        plots.rank_agreement_heatmap(agreement, labels),
        tables.agreement_table(agreement, labels),
        tables.scores_table(imp["scores"], labels),
    )


def trajectory_figure(traj: dict[str, Any] | None, title_suffix: str = "") -> Any:
    if not traj or not traj.get("rows"):
        if traj and traj.get("fixed_blocks"):
            return plots.trajectory_heatmap(
                [], [], empty_message="This run removed a fixed list of blocks, so it never re-scored them"
            )
        return plots.trajectory_heatmap([], [])
    title = "Iterative MI: how importance shifts after each removal"
    if traj.get("origin"):
        title += f" ({traj['origin']})"
    return plots.trajectory_heatmap(traj["rows"], traj.get("removed") or [], title=title + title_suffix)


# ---- plan -----------------------------------------------------------------------------------------


def removal_order(blocks: Sequence[int], scores: Sequence[float] | None) -> list[int]:
    """Chosen blocks in the order they will be removed: least important (by MI) first, else by index."""
    blocks = sorted({int(b) for b in blocks})
    if scores and len(scores) >= (max(blocks) + 1 if blocks else 0):
        return sorted(blocks, key=lambda b: (_score(scores[b]), b))
    return blocks


def _score(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.inf


def lowest_blocks(scores: Sequence[float], k: int) -> list[int]:
    """The k least important blocks by a one-shot ranking (the iterative run may pick differently)."""
    order = sorted(range(len(scores)), key=lambda i: (_score(scores[i]), i))
    return sorted(order[: max(k, 0)])


def plan_groups(
    num_blocks: int, order: Sequence[int], custom: dict[int, Sequence[int]], group_size: int
) -> dict[int, list[int]]:
    """Removed block -> its fusion targets, in original indices, as the pipeline will form them:
    the core's reference window on the blocks left at that step, unless custom targets are given."""
    from fusegpt_core.fusion import plan_group

    remaining = list(range(num_blocks))
    groups: dict[int, list[int]] = {}
    for b in order:
        if b not in remaining or len(remaining) < 2:
            continue
        p = remaining.index(b)
        if b in custom and custom[b]:
            groups[b] = [int(t) for t in custom[b]]
        else:
            groups[b] = [remaining[t] for t in plan_group(p, len(remaining), min(group_size, len(remaining)))]
        remaining.remove(b)
    return groups


def plan_diagram(session: Session, group_size: int, focus: int | None = None) -> Any:
    n = int((session.model_info or {}).get("blocks") or 0)
    plan = session.plan
    if plan.get("mode") == "auto" and not plan.get("blocks"):
        fig = plots.block_diagram(
            n, [], {}, title=f"Plan: MI will choose {plan.get('remove', '?')} blocks during the run"
        )
        return fig
    order = list(plan.get("blocks") or [])
    groups = plan_groups(n, order, plan.get("targets") or {}, group_size)
    return plots.block_diagram(n, order, groups, focus=focus)


def plan_summary(session: Session) -> str:
    plan = session.plan
    if plan.get("mode") == "auto":
        return (
            f"MI chooses **{plan.get('remove', '?')}** blocks during the run (iterative: re-scored after each fusion)."
        )
    blocks = plan.get("blocks") or []
    if not blocks:
        return "No block chosen yet."
    custom = plan.get("targets") or {}
    extra = f"; custom targets for {sorted(custom)}" if custom else ""
    n = int((session.model_info or {}).get("blocks") or 0)
    share = f" ({len(blocks) / n:.0%} of {n} blocks)" if n else ""
    return f"Removal order: **{', '.join(str(b) for b in blocks)}**{share}{extra}."


def preview_text(session: Session) -> str:
    p = session.preview
    if not p:
        return "Press **Preview drop** to measure what removing the chosen blocks, with no repair, does to perplexity."
    change = (p["dropped"] / p["dense"] - 1) * 100 if p["dense"] else float("nan")
    return (
        f"Perplexity on {p['tokens']:,} evaluation tokens: original **{p['dense']:.2f}** → "
        f"blocks {p['blocks']} dropped **{p['dropped']:.2f}** ({change:+.1f}%). Fusion's job is to win back this gap."
    )


# ---- run ------------------------------------------------------------------------------------------


def run_live(snap: JobSnapshot | None, session: Session) -> dict[str, Any]:
    """Loss curves, MI trajectory, rounds and log: of the run in progress, of a run that just
    failed or stopped, or else of the session's latest run that trained (drop/average runs have no
    curves to show)."""
    if snap is not None and snap.kind in ("run", "demo") and snap.live.get("method") and snap.status != DONE:
        live = snap.live
        traj = {
            "rows": live.get("trajectory") or [],
            "removed": live.get("removed") or [],
            "origin": "this run",
            "fixed_blocks": bool(live.get("fixed_blocks")),
        }
        rounds = live.get("rounds") or []
        losses = live.get("losses") or {}
        header = progress_header(snap)
        log = "\n".join(snap.log[-60:])
    elif session.runs:
        trained = [r for r in session.runs if any(x.get("losses") for x in r.report.get("rounds") or [])]
        run = (trained or session.runs)[-1]
        rep = run.report
        rounds = rep.get("rounds") or []
        losses = {
            f"round {r['round'] + 1}: block {r['removed']}": list(enumerate(r.get("losses") or [], start=1))
            for r in rounds
        }
        traj = {
            "rows": rep.get("trajectory") or [],
            "removed": rep.get("removed_blocks") or [],
            "origin": run.label,
            "fixed_blocks": (rep.get("recipe") or {}).get("blocks") is not None,
        }
        icon = STATUS_ICON[DONE] if rep.get("status", "done") == "done" else STATUS_ICON[FAILED]
        header = (
            f"{icon} **{run.label}** finished ({rep.get('status', 'done')}): {len(rounds)} rounds in "
            f"{tables.fmt_seconds(rep.get('seconds', {}).get('total'))}."
        )
        if len(session.runs) > 1:
            header += f" {len(session.runs)} runs in this session: see **Compare**."
        log = ""
    else:
        return {
            "header": "No run yet.",
            "loss": plots.loss_curves({}),
            "trajectory": plots.trajectory_heatmap([], []),
            "rounds": tables.rounds_table([]),
            "log": "",
        }
    return {
        "header": header,
        "loss": plots.loss_curves(losses),
        "trajectory": trajectory_figure(traj),
        "rounds": tables.rounds_table(rounds),
        "log": log,
    }


def progress_header(snap: JobSnapshot) -> str:
    """'fusegpt ██████░░░░ round 3/6 · finetune · … · ETA 2 min' while running; a summary once finished."""
    live = snap.live
    done = len(live.get("rounds") or [])
    count = live.get("count") or "?"
    method = live.get("method", "run")
    elapsed = tables.fmt_seconds(snap.elapsed_s)
    if snap.status == DONE:
        return f"{STATUS_ICON[DONE]} **{method}** finished: {done}/{count} rounds in {elapsed}."
    if snap.status in (FAILED, CANCELLED):
        return f"{STATUS_ICON[snap.status]} **{method}** {snap.status} after {done}/{count} rounds: {snap.error}"
    bar_len = 20
    frac = done / count if isinstance(count, int) and count else 0.0
    bar = "█" * int(frac * bar_len) + "░" * (bar_len - int(frac * bar_len))
    eta = f" · ETA {tables.fmt_seconds(snap.eta_s)}" if snap.eta_s is not None else ""
    state = f"queued (position {snap.position})" if snap.status == QUEUED else snap.stage
    return f"**{method}** `{bar}` round {done}/{count} · {state} · {snap.message} · elapsed {elapsed}{eta}"


# ---- compare --------------------------------------------------------------------------------------


def compare_views(session: Session) -> tuple[pd.DataFrame, Any]:
    runs = [{"label": r.label, "report": r.report} for r in session.runs]
    table = tables.compare_table(runs)
    return table, plots.compare_chart(tables.chart_frame(table))


def generations_html(gens: list[dict[str, Any]] | None, prompt: str = "") -> str:
    if not gens:
        return "<div class='gen-empty'>Generations appear here.</div>"
    cards = []
    for g in gens:
        cards.append(
            "<div class='gen-card'>"
            f"<div class='gen-title'>{html.escape(g['label'])} <span class='gen-time'>"
            f"{g['seconds']:.1f} s</span></div>"
            f"<div class='gen-text'>{html.escape(g['text']) or '<i>(empty)</i>'}</div></div>"
        )
    head = f"<div class='gen-prompt'>Prompt: {html.escape(prompt)}</div>" if prompt else ""
    return f"{head}<div class='gen-grid'>{''.join(cards)}</div>"


def run_choices(session: Session) -> list[tuple[str, int]]:
    """(label, run id), newest first, FuseGPT runs before baselines."""
    runs = sorted(reversed(session.runs), key=lambda r: r.method != "fusegpt")
    return [(f"{r.label} (removed {r.report.get('removed_blocks')})", r.id) for r in runs]
