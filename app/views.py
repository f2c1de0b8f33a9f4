"""Session / job snapshot -> what each widget shows. No gradio: figures, DataFrames and strings.

ui.py wraps these values into component updates; tests call them directly.
"""

from __future__ import annotations

import html
from typing import Any

import pandas as pd

from . import plots, tables
from .jobs import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobSnapshot
from .recipes import TextChoice
from .state import Session

STATUS_ICON = {QUEUED: "◷", RUNNING: "▶", DONE: "✔", FAILED: "✖", CANCELLED: "■"}


METRIC_SHORT = {"mi": "MI", "bi": "BI", "angular": "Angular distance", "ppl": "Perplexity increase"}


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


# ---- model ----------------------------------------------------------------------------------------


def model_table(session: Session | None) -> pd.DataFrame:
    if session is None or session.model_info is None:
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
            f"{s.get('n_score', '?')} x {s.get('seq_len', '?')} tokens"
            + (f"; {imp['caveat']}" if imp.get("caveat") else "")
            + "). Press **Compute importance** to score on other text or settings."
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
    heat = plots.importance_heatmap(imp["scores"], labels, selected=session.plan.blocks)
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


def num_blocks(session: Session) -> int:
    return int((session.model_info or {}).get("blocks") or 0)


def group_size(session: Session) -> int:
    """The group size the next run will use: the Run tab's setting, never wider than the model."""
    size = session.settings.int_value("fusion.group_size", 8)
    n = num_blocks(session)
    return max(2, min(size, n) if n else size)


def plan_diagram(session: Session, focus: int | None = None) -> Any:
    n, plan = num_blocks(session), session.plan
    if plan.auto:
        return plots.block_diagram(n, [], {}, title=f"Plan: MI will choose {_blocks(plan.remove)} during the run")
    return plots.block_diagram(n, plan.blocks, plan.groups(n, group_size(session)), focus=focus)


def _blocks(k: int) -> str:
    return f"{k} block" if k == 1 else f"{k} blocks"


def plan_summary(session: Session) -> str:
    plan = session.plan
    if plan.auto:
        how = (
            "one-shot: scored once, on the original model"
            if session.settings.value("selection") == "one-shot"
            else "iterative: re-scored after each fusion"
        )
        metric = METRIC_SHORT.get(session.settings.value("metric"), "MI")
        return f"{metric} chooses **{_blocks(plan.remove)}** during the run ({how})."
    if not plan.blocks:
        return "No block chosen yet."
    extra = f"; custom targets for {sorted(plan.targets)}" if plan.targets else ""
    n = num_blocks(session)
    share = f" ({len(plan.blocks) / n:.0%} of {n} blocks)" if n else ""
    return f"Removal order: **{', '.join(str(b) for b in plan.blocks)}**{share}{extra}."


def text_note(session: Session | None) -> str:
    """Which text an action uses, shown next to the action."""
    text = session.text if session is not None else TextChoice()
    return f"Text: **{text.describe()}** (chosen in *2 · Importance ▸ Text*; used for scoring, preview and runs)."


def preview_text(session: Session | None) -> str:
    p = session.preview if session is not None else None
    if not p:
        return "Press **Preview drop** to measure what removing the chosen blocks, with no repair, does to perplexity."
    change = (p["dropped"] / p["dense"] - 1) * 100 if p["dense"] else float("nan")
    windows = f"{p['windows'][0]} windows x {p['windows'][1]} tokens" if p.get("windows") else f"{p['tokens']:,} tokens"
    return (
        f"Perplexity on {windows} of {p.get('text', 'the evaluation text')}: original **{p['dense']:.2f}** → "
        f"blocks {p['blocks']} dropped **{p['dropped']:.2f}** ({change:+.1f}%). Fusion's job is to win back this gap. "
        "(A run measures on its own preset's windows, which may differ.)"
    )


# ---- run ------------------------------------------------------------------------------------------


def run_live(snap: JobSnapshot | None, session: Session) -> dict[str, Any]:
    """Header, loss curves, MI trajectory, rounds, what each neighbour absorbed, the recipe and the
    log: of the run in progress, of a run that just failed or stopped, or else of the session's
    latest run that trained (drop/average runs have no curves to show)."""
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
        recipe = recipe_line(live.get("recipe"), "This run's recipe")
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
            f"{icon} **{run.label}** finished ({rep.get('status', 'done')}): {len(rounds)} "
            f"{'round' if len(rounds) == 1 else 'rounds'} in {tables.fmt_seconds(rep.get('seconds', {}).get('total'))}."
        )
        if len(session.runs) > 1:
            header += f" {len(session.runs)} runs in this session: see **Compare**."
        recipe = recipe_line(rep.get("recipe"), f"Recipe of {run.label}")
        log = ""
    else:
        rounds, losses, traj, header, recipe, log = [], {}, None, "No run yet.", "", ""
    return {
        "header": header,
        "recipe": recipe,
        "loss": plots.loss_curves(losses),
        "trajectory": trajectory_figure(traj),
        "rounds": tables.rounds_table(rounds),
        "absorbed": absorbed_figure(rounds),
        "log": log,
    }


def recipe_line(recipe: dict[str, Any] | None, title: str) -> str:
    """One line that says what a run does (so a reload shows what the running job uses)."""
    if not recipe:
        return ""
    d, f, t = recipe.get("data", {}), recipe.get("fusion", {}), recipe.get("distill", {})
    plan = (
        f"blocks {recipe['blocks']}"
        if recipe.get("blocks") is not None
        else f"{recipe.get('remove')} blocks by {recipe.get('metric')}"
    )
    return (
        f"{title}: **{recipe.get('method')}**, {plan} ({recipe.get('selection')}, candidates {recipe.get('candidates')}); "
        f"groups of {f.get('group_size')}, rank {f.get('coef_rank')}; {d.get('n_calib')} windows x {d.get('seq_len')} "
        f"tokens, {t.get('epochs')} epoch(s), batch {t.get('batch_size')}, {t.get('loss')} loss."
    )


def absorbed_figure(rounds: list[dict[str, Any]]) -> Any:
    """The latest trained round's view of how much of its removed block each target took in."""
    trained = [r for r in rounds if r.get("absorbed")]
    if not trained:
        return plots.empty_figure("What each neighbour absorbed appears after a fusion round")
    last = trained[-1]
    return plots.absorbed_heatmap(last["absorbed"], last["removed"], last["round"] + 1)


def progress_header(snap: JobSnapshot) -> str:
    """'fusegpt ██████░░░░ 2/6 rounds done · round 3/6: fine-tuning … · ETA 2 min' while running."""
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
    doing = f"queued (position {snap.position})" if snap.status == QUEUED else snap.message
    return f"**{method}** `{bar}` {done}/{count} rounds done · {doing} · elapsed {elapsed}{eta}"


# ---- compare --------------------------------------------------------------------------------------


def compare_views(session: Session) -> tuple[pd.DataFrame, Any, str]:
    """(table, chart, caption saying what each column measured)."""
    runs = [{"label": r.label, "report": r.report} for r in session.runs]
    table = tables.compare_table(runs)
    return table, plots.compare_chart(tables.chart_frame(table)), tables.compare_caption(runs)


def accuracy_figure(session: Session) -> Any:
    """Zero-shot accuracy of every model of the compare table, per task (the runs' report["zero_shot"])."""
    runs = [{"label": r.label, "report": r.report} for r in session.runs]
    return plots.accuracy_chart(tables.accuracy_frame(runs), tables.items_text(tables.zero_shot_counts(runs)))


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


def classroom_views(pre: dict[str, Any] | None) -> tuple[str, pd.DataFrame, str]:
    """The precomputed example on the bundled model (assets/make_precomputed.py): a caption naming
    what made it, the results table (perplexity, blocks), and the models' answers to a few prompts."""
    room = (pre or {}).get("classroom")
    if not room:
        return "", pd.DataFrame(), ""
    recipe = room.get("recipe") or {}
    removed = (pre.get("trajectory") or {}).get("removed") or []
    d, f = recipe.get("data", {}), recipe.get("fusion", {})
    caption = (
        f"**Precomputed** on the bundled model (not this session's runs): {room['method']} with the "
        f"`{room.get('preset', '?')}` preset removed blocks {removed} (iterative {recipe.get('metric', 'mi')}, "
        f"groups of {f.get('group_size', '?')}, {d.get('n_calib', '?')} calibration windows of "
        f"{d.get('seq_len', '?')} tokens); the baselines healed the same blocks. Regenerate with "
        "`python assets/make_precomputed.py`."
    )
    table = pd.DataFrame(
        [{"model": r["model"], "blocks": r["blocks"], "perplexity": round(float(r["ppl"]), 3)} for r in room["results"]]
    )
    parts = []
    for g in room.get("generations", []):
        cards = "".join(
            f"<div class='gen-card'><div class='gen-title'>{html.escape(a['model'])}</div>"
            f"<div class='gen-text'>{html.escape(a['text']) or '<i>(empty)</i>'}</div></div>"
            for a in g["answers"]
        )
        parts.append(
            f"<div class='gen-prompt'>Prompt: {html.escape(g['prompt'])}</div><div class='gen-grid'>{cards}</div>"
        )
    return caption, table, "".join(parts)


def classroom_losses(pre: dict[str, Any] | None):
    """The precomputed run's fine-tuning loss, one curve per round (None without one)."""
    rounds = ((pre or {}).get("example_run") or {}).get("rounds") or []
    series = {
        f"round {r['round'] + 1}: block {r['removed']}": list(enumerate(r["losses"], start=1))
        for r in rounds
        if r.get("losses")
    }
    return plots.loss_curves(series, "Group fine-tuning loss of each round (precomputed)") if series else None


def run_choices(session: Session) -> list[tuple[str, int]]:
    """(label, run id) for the export list, newest run first."""
    return [
        (f"{r.label} (removed {r.report.get('removed_blocks')})", r.id)
        for r in sorted(session.runs, key=lambda r: -r.id)
    ]


# ---- estimates ------------------------------------------------------------------------------------


def estimate_text(session: Session, presets: bool = True) -> str:
    """How long the next Run takes with its preset, and (`presets`) with every preset, for this plan."""
    from fusegpt_core.config import PRESET_INFO, PRESETS
    from fusegpt_core.errors import FuseGPTError

    from .estimate import estimate_text as stage_text
    from .recipes import RunSettings, preset_values
    from .work import estimate_for, session_recipe

    info = session.model_info
    if not info or not info.get("block_seconds"):
        return "Load a model for a run-time estimate."
    settings = session.settings
    try:
        est = estimate_for(session_recipe(session), info)
    except FuseGPTError as e:
        return f"No estimate yet: {e}"
    first = f"Estimated run time with preset **{settings.preset}**: " + stage_text(est, info["device"])
    if not presets:
        return first
    lines = [
        first,
        "",
        "| preset | what it is for | this plan |",
        "|---|---|---|",
    ]
    for name in PRESETS:
        try:
            other = RunSettings(preset=name, method=settings.method, knobs=preset_values(name))
            total = tables.fmt_seconds(estimate_for(session_recipe(session, settings=other), info)["total"])
        except FuseGPTError:
            total = "n/a"
        mark = " (chosen)" if name == settings.preset else ""
        lines.append(f"| **{name}**{mark} | {PRESET_INFO[name]} | ≈ {total} |")
    lines.append("")
    lines.append("Choose the preset on the **4 · Run** tab.")
    return "\n".join(lines)


BUNDLED_LABELS = {"bundled": "SmolLM2-135M", "bundled-gemma3": "Gemma-3-270m"}


def two_model_view(app) -> tuple[Any, str]:
    """(figure, caption) of the precomputed MI of every bundled model, position normalised by depth."""
    shipped = {"bundled": app.precomputed, **app.precomputed_more}
    series = {BUNDLED_LABELS.get(name, name): pre["scores"]["mi"] for name, pre in shipped.items()
              if pre and (pre.get("scores") or {}).get("mi")}  # fmt: skip
    if len(series) < 2:
        return None, ""
    settings = (app.precomputed or {}).get("settings", {})

    def extremes(scores: list[float]) -> str:
        order = sorted(range(len(scores)), key=lambda i: scores[i])
        return f"most important {_blocks_list(order[::-1][:3])}, least {_blocks_list(order[:3])}"

    per_model = "; ".join(f"{name}: {extremes(mi)}" for name, mi in series.items())
    caption = (
        "**Precomputed** Macro Influence of both bundled models (their shipped scores: "
        f"{settings.get('calib_source', 'bundled')} text, {settings.get('n_score', '?')} x "
        f"{settings.get('seq_len', '?')} tokens; `python assets/make_precomputed.py --model NAME`). "
        "Each model's blocks are ranked within that model; the x axis is the block's relative depth, so an "
        f"18-block and a 30-block model line up. {per_model}."
    )
    return plots.depth_profile(series), caption


def _blocks_list(blocks: list[int]) -> str:
    return "blocks " + ", ".join(str(b) for b in blocks)


# ---- the guided lesson (app/lesson.py) --------------------------------------------------------------


def lesson_views(session: Session | None) -> tuple[str, Any, str, str]:
    """(reveal text, reveal figure, drop text, fuse text) of the session's lesson."""
    from . import lesson

    state = (session.lesson if session is not None else None) or {}
    mi = ((session.importance or {}).get("scores") or {}).get("mi") if session is not None else None
    guess = state.get("guess")
    if session is None or session.model_info is None:
        return "Load a model first (the page loads the bundled one by itself).", plots.empty_figure(
            "The scores appear once you have guessed"), "", ""  # fmt: skip
    if guess is None:
        reveal = "Pick the block you think matters least, then press **Reveal**."
        return reveal, plots.empty_figure("The scores appear once you have guessed"), "", ""
    if not mi:
        return f"Your guess: block **{guess}**. Scoring the blocks…", plots.empty_figure("Scoring…"), "", ""
    v = lesson.guess_verdict(mi, guess)
    if v["rank"] == 1:
        verdict = f"Your guess, block **{guess}**, is the least important block by MI. Well spotted!"
    else:
        verdict = (
            f"Your guess, block **{guess}**, is number **{v['rank']}** of {v['n']} from the bottom "
            f"(MI {v['guess_mi']:.4g}). MI ranks block **{v['least']}** least important (MI {v['least_mi']:.4g})."
        )
    reveal = verdict + (
        " The first blocks usually matter most (they turn tokens into the model's working representation);"
        " blocks in the middle often do overlapping work, which is why they are the first to go."
    )
    figure = plots.guess_bars(mi, guess, v["least"])
    drop = state.get("drop")
    drop_text = ""
    if drop:
        drop_text = (
            f"Without block **{drop['block']}** the perplexity goes from **{drop['dense']:.2f}** to "
            f"**{drop['dropped']:.2f}** ({drop['dropped'] / drop['dense'] - 1:+.0%}; lower is better; "
            f"{drop['tokens']:,} tokens of held-out text).\n\n"
            f"*Prompt:* {html.escape(drop['prompt'])}\n\n"
            f"- **original:** {html.escape(drop['answers']['original'])}\n"
            f"- **block {drop['block']} dropped:** {html.escape(drop['answers']['dropped'])}"
        )
    fuse = state.get("fuse")
    fuse_text = ""
    if fuse:
        back = fuse.get("recovered")
        back_text = f"**{back:.0%}** of what dropping lost came back" if back is not None else "nothing was lost"
        fuse_text = (
            f"Fused into blocks {fuse.get('targets')} and fine-tuned ({fuse['preset']} preset, "
            f"{fuse['seconds']:.0f} s): perplexity **{fuse['fused']:.2f}**, against {fuse['dense']:.2f} for the "
            f"original and {fuse['dropped']:.2f} dropped: {back_text}. The model has one block fewer either way.\n\n"
            f"- **fused ({fuse['run']}):** {html.escape(fuse['answer'])}\n\n"
            "The run is on the **Compare** tab too, next to the original."
        )
    return reveal, figure, drop_text, fuse_text
