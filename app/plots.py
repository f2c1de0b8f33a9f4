"""Pure data -> plotly figure functions. No gradio, no torch: lists, dicts and DataFrames in."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go

# Colours chosen to read on light and dark themes and for common colour-vision deficiencies.
REMOVED = "#d62728"
TARGET = "#1f77b4"
KEPT = "#dfe3e8"
EARLIER = "#8c8c8c"
FONT = dict(size=12)
# one colour per method in the compare chart: the original grey, plain dropping dark grey
METHOD_COLOURS = {"-": KEPT, "drop": EARLIER, "fusegpt": TARGET, "drop+lora": "#ff7f0e", "average": "#9467bd"}

DEFAULT_LABELS = {
    "mi": "Macro Influence",
    "bi": "Block Influence",
    "angular": "Angular distance",
    "ppl": "PPL increase",
}


# gradio's gr.Plot raises a titled figure's top margin to 100 px. A heatmap's colour bar needs room
# for its title inside the plot area: a one-row heatmap 200 px high left it -9 px long, plotly.js
# 3.3 (gradio's) threw "Something went wrong with axis scaling", and a Plot that threw once kept
# throwing and stopped the page's updates. Every figure here keeps a plot area of at least
# MIN_PLOT_PX, and colour bar titles stay on one line.
TOP_MARGIN, BOTTOM_MARGIN, MIN_PLOT_PX = 100, 45, 130


def _layout(fig: go.Figure, title: str, height: int = 320) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0.01, xanchor="left", font=dict(size=14)),
        height=max(int(height), TOP_MARGIN + BOTTOM_MARGIN + MIN_PLOT_PX),
        margin=dict(l=60, r=20, t=TOP_MARGIN, b=BOTTOM_MARGIN),
        font=FONT,
        paper_bgcolor="rgba(0,0,0,0)",
        plot_bgcolor="rgba(0,0,0,0)",
    )
    return fig


def empty_figure(message: str, height: int = 260) -> go.Figure:
    """A blank figure that says why it is blank (nothing computed yet, no run, ...)."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font=dict(size=14))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, "", height)


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def normalise(values: Sequence[float | None]) -> list[float | None]:
    """Rank-normalise to [0, 1] over the finite entries (lowest 0, highest 1, ties share their mean
    rank); None and NaN stay None. Ranks, not min-max: one extreme block (often block 0) would
    otherwise paint every other block the same colour."""
    finite = sorted((v, i) for i, v in enumerate(values) if _finite(v))
    out: list[float | None] = [None for _ in values]
    if not finite:
        return out
    n = len(finite)
    start = 0
    while start < n:
        end = start
        while end + 1 < n and finite[end + 1][0] == finite[start][0]:
            end += 1
        mean_rank = (start + end) / 2
        for k in range(start, end + 1):
            out[finite[k][1]] = 0.5 if n == 1 else mean_rank / (n - 1)
        start = end + 1
    return out


def _rank_heatmap(
    rows: Sequence[Sequence[float | None]], n: int, labels: list[str], colorbar_title: str, hovertemplate: str
) -> go.Heatmap:
    """One heatmap row per entry of `rows`, `n` block columns; colour is the rank within the row
    (0..1), hover shows the raw value. Short rows are padded with blanks (removed blocks)."""
    padded = [list(row) + [None] * (n - len(row)) for row in rows]
    return go.Heatmap(
        z=[normalise(row) for row in padded],
        x=list(range(n)),
        y=labels,
        customdata=[[v if _finite(v) else float("nan") for v in row] for row in padded],
        colorscale="Viridis",
        zmin=0,
        zmax=1,
        xgap=1,
        ygap=1,
        colorbar=dict(title=dict(text=colorbar_title), tickvals=[0, 1], ticktext=["low", "high"], len=0.9),
        hovertemplate=hovertemplate,
    )


def importance_heatmap(
    scores: dict[str, Sequence[float | None]],
    labels: dict[str, str] | None = None,
    selected: Sequence[int] = (),
    title: str = "Block importance (colour: rank within each metric, dark = least important)",
) -> go.Figure:
    """Metrics as rows, blocks as columns. Colour is the rank within each metric; hover shows raw values.

    `selected` blocks (original indices) get a red frame: they are the current plan."""
    if not scores:
        return empty_figure("No importance scores yet")
    labels = {**DEFAULT_LABELS, **(labels or {})}
    keys = list(scores)
    n = max(len(v) for v in scores.values())
    rows = [scores[k] for k in keys]
    fig = go.Figure(
        _rank_heatmap(
            rows,
            n,
            [labels.get(k, k) for k in keys],
            colorbar_title="rank",
            hovertemplate="block %{x}<br>%{y}: %{customdata:.4g}<br>rank %{z:.2f} (0 = least important)<extra></extra>",
        )
    )
    for b in selected:
        fig.add_shape(
            type="rect",
            x0=b - 0.5,
            x1=b + 0.5,
            y0=-0.5,
            y1=len(keys) - 0.5,
            line=dict(color=REMOVED, width=3),
        )
    fig.update_xaxes(title_text="block (original index)", dtick=1 if n <= 40 else 5)
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, height=150 + 38 * len(keys))


def rank_agreement_heatmap(agreement: pd.DataFrame, labels: dict[str, str] | None = None) -> go.Figure:
    """Spearman rank correlation between metrics, -1..1, with the value written in each cell."""
    if agreement is None or agreement.empty:
        return empty_figure("Rank agreement needs at least two metrics")
    labels = {**DEFAULT_LABELS, **(labels or {})}
    names = [labels.get(str(c), str(c)) for c in agreement.columns]
    rows = [labels.get(str(i), str(i)) for i in agreement.index]
    vals = agreement.to_numpy(dtype=float)
    text = [[("" if math.isnan(v) else f"{v:.2f}") for v in row] for row in vals]
    fig = go.Figure(
        go.Heatmap(
            z=vals,
            x=names,
            y=rows,
            zmin=-1,
            zmax=1,
            colorscale="RdBu",
            text=text,
            texttemplate="%{text}",
            hovertemplate="%{y} vs %{x}: Spearman %{z:.3f}<extra></extra>",
            colorbar=dict(title=dict(text="Spearman")),
        )
    )
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, "Do the metrics agree? (Spearman rank correlation)", height=330)


def trajectory_heatmap(
    trajectory: Sequence[Sequence[float | None]],
    removed: Sequence[int] = (),
    title: str = "Iterative MI: how importance shifts after each removal",
    empty_message: str = "The MI trajectory appears once a run has scored its first round",
) -> go.Figure:
    """Rows: fusion step (scores measured before that step's removal); columns: original blocks.

    Blocks already removed are blank; the block chosen at each step is marked with an x."""
    if not trajectory:
        return empty_figure(empty_message)
    n = max(len(r) for r in trajectory)
    steps = [f"step {i + 1}" for i in range(len(trajectory))]
    fig = go.Figure(
        _rank_heatmap(
            trajectory,
            n,
            steps,
            colorbar_title="MI rank",
            hovertemplate="%{y}, block %{x}<br>MI %{customdata:.4g}<extra></extra>",
        )
    )
    marks = [(steps[i], b) for i, b in enumerate(removed[: len(steps)])]
    if marks:
        fig.add_trace(
            go.Scatter(
                x=[b for _, b in marks],
                y=[s for s, _ in marks],
                mode="markers",
                marker=dict(symbol="x", size=12, color=REMOVED, line=dict(width=1)),
                name="removed at this step",
                hovertemplate="%{y}: block %{x} removed<extra></extra>",
            )
        )
    fig.update_layout(showlegend=bool(marks), legend=dict(orientation="h", y=-0.25))
    fig.update_xaxes(title_text="block (original index)", dtick=1 if n <= 40 else 5)
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, height=150 + 30 * len(trajectory))


def block_diagram(
    num_blocks: int,
    removed: Sequence[int],
    groups: dict[int, Sequence[int]],
    focus: int | None = None,
    title: str = "Plan: which blocks go, and where their weights are fused",
) -> go.Figure:
    """One row per removal step (in order), one cell per original block.

    Red: removed at this step; blue: its fusion targets; grey: removed at an earlier step.
    The `focus` block's row is labelled in bold."""
    if num_blocks <= 0:
        return empty_figure("Load a model to see its blocks")
    rows = list(removed) or [None]
    z, text, hover = [], [], []
    for step, r in enumerate(rows):
        earlier = set(rows[:step]) if r is not None else set()
        targets = set(groups.get(r, ())) if r is not None else set()
        zr, tr, hr = [], [], []
        for b in range(num_blocks):
            if b == r:
                zr.append(3), tr.append("✕"), hr.append("removed at this step")
            elif b in earlier:
                zr.append(1), tr.append(""), hr.append("already removed")
            elif b in targets:
                zr.append(2), tr.append("+"), hr.append(f"target: absorbs block {r}")
            else:
                zr.append(0), tr.append(""), hr.append("kept")
        z.append(zr), text.append(tr), hover.append(hr)
    labels = []
    for r in rows:
        if r is None:
            labels.append("no block chosen")
        else:
            labels.append(f"<b>remove {r}</b>" if r == focus else f"remove {r}")
    colorscale = [
        [0.0, KEPT],
        [0.249, KEPT],
        [0.25, EARLIER],
        [0.499, EARLIER],
        [0.5, TARGET],
        [0.749, TARGET],
        [0.75, REMOVED],
        [1.0, REMOVED],
    ]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(num_blocks)),
            y=labels,
            zmin=-0.5,
            zmax=3.5,
            colorscale=colorscale,
            showscale=False,
            xgap=2,
            ygap=2,
            text=text,
            texttemplate="%{text}",
            customdata=hover,
            hovertemplate="block %{x}: %{customdata}<extra></extra>",
        )
    )
    for name, colour in [("removed", REMOVED), ("fusion target", TARGET), ("removed earlier", EARLIER)]:
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                marker=dict(size=12, color=colour, symbol="square"),
                name=name,
            )
        )
    fig.update_layout(showlegend=True, legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    fig.update_xaxes(title_text="block (original index)", dtick=1 if num_blocks <= 40 else 5, showgrid=False)
    fig.update_yaxes(autorange="reversed", showgrid=False)
    return _layout(fig, title, height=130 + 32 * len(rows))


def loss_curves(series: dict[str, Sequence[tuple[int, float]]], title: str = "Group fine-tuning loss") -> go.Figure:
    """One line per fusion group: (step, loss) pairs. Log scale when the losses span a decade."""
    if not series or not any(series.values()):
        return empty_figure("Loss curves appear when fine-tuning starts")
    fig = go.Figure()
    lo, hi = math.inf, -math.inf
    for name, points in series.items():
        pts = [(s, v) for s, v in points if _finite(v)]
        if not pts:
            continue
        lo, hi = min(lo, min(v for _, v in pts)), max(hi, max(v for _, v in pts))
        fig.add_trace(
            go.Scatter(
                x=[s for s, _ in pts],
                y=[v for _, v in pts],
                mode="lines+markers" if len(pts) < 30 else "lines",
                name=name,
                hovertemplate=f"{name}<br>step %{{x}}: loss %{{y:.4g}}<extra></extra>",
            )
        )
    if lo > 0 and hi / lo > 10:
        fig.update_yaxes(type="log")
    last = max((s for points in series.values() for s, v in points if _finite(v)), default=1)
    # whole steps only: a tick every step for short rounds, about ten ticks for long ones
    fig.update_xaxes(title_text="optimiser step in the group", tick0=0, dtick=max(1, math.ceil(last / 10)))
    fig.update_yaxes(title_text="loss")
    fig.update_layout(legend=dict(orientation="h", y=-0.3))
    return _layout(fig, title, height=340)


def compare_chart(table: pd.DataFrame) -> go.Figure:
    """Perplexity per model (bars, lower is better), parameters as text on each bar."""
    if table is None or table.empty or "perplexity" not in table:
        return empty_figure("Run a plan to compare models")
    df = table[table["perplexity"].map(_finite)]
    if df.empty:
        return empty_figure("No perplexity measured yet")
    methods = df["method"] if "method" in df else ["?"] * len(df)
    colours = [METHOD_COLOURS.get(str(m).split(" ")[0], TARGET) for m in methods]
    text = [
        f"{p:.2f}" + (f"<br>{params / 1e6:.1f}M params" if _finite(params) else "")
        for p, params in zip(df["perplexity"], df.get("params", [None] * len(df)))
    ]
    fig = go.Figure(
        go.Bar(
            x=df["model"],
            y=df["perplexity"],
            marker_color=colours,
            marker_line=dict(color="#444", width=1),
            text=text,
            textposition="outside",
            hovertemplate="%{x}<br>perplexity %{y:.3f}<extra></extra>",
        )
    )
    top, bottom = float(df["perplexity"].max()), float(df["perplexity"].min())
    if bottom > 0 and top / bottom > 20:  # one broken model must not hide the others
        fig.update_yaxes(
            title_text="perplexity, log scale (lower is better)",
            type="log",
            range=[math.log10(bottom) - 0.3, math.log10(top) + 0.4],
        )
    else:
        fig.update_yaxes(title_text="perplexity (lower is better)", range=[0, top * 1.25])
    return _layout(fig, "Perplexity on the evaluation text", height=360)


# one colour per zero-shot task (Okabe-Ito: distinct for common colour-vision deficiencies)
TASK_COLOURS = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442")


def accuracy_chart(frame: pd.DataFrame, items: str = "") -> go.Figure:
    """Zero-shot accuracy per model (x) and task (one bar each, grouped) with ± one standard error.
    `frame`: tables.accuracy_frame's rows (model, task, metric, accuracy, stderr, n); `items`: how many
    items per task, for the title."""
    if frame is None or frame.empty:
        return empty_figure("Measure zero-shot accuracy to compare the models on tasks", height=220)
    models = list(dict.fromkeys(frame["model"]))
    fig = go.Figure()
    for i, (task, rows) in enumerate(frame.groupby("task", sort=False)):
        metric = rows["metric"].iloc[0] if rows["metric"].nunique() == 1 else "acc_norm / acc"
        fig.add_trace(
            go.Bar(
                name=f"{task} ({metric})",
                x=rows["model"],
                y=rows["accuracy"],
                error_y=dict(type="data", array=[s if _finite(s) else 0.0 for s in rows["stderr"]], visible=True),
                marker_color=TASK_COLOURS[i % len(TASK_COLOURS)],
                customdata=list(
                    zip(rows["metric"], [s if _finite(s) else float("nan") for s in rows["stderr"]], rows["n"])
                ),  # fmt: skip
                hovertemplate=f"%{{x}}<br>{task}: %{{customdata[0]}} %{{y:.3f}} ± %{{customdata[1]:.3f}}"
                "<br>%{customdata[2]} items<extra></extra>",
            )
        )
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"))
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=models)
    fig.update_yaxes(title_text="accuracy (higher is better)", range=[0, 1.05])
    title = "Zero-shot accuracy, ± one standard error" + (f" · first {items}" if items else "")
    return _layout(fig, title, height=380)


def absorbed_heatmap(rows: Sequence[dict], removed: int, round_number: int) -> go.Figure:
    """What one round's targets took in: rows = target blocks, columns = linears, colour = share
    ||(C D) * W_removed|| / ||W_own|| of each fused linear (rows: {'block', 'linear', 'share'})."""
    if not rows:
        return empty_figure("What each neighbour absorbed appears after a fusion round")
    blocks = sorted({int(r["block"]) for r in rows})
    linears = list(dict.fromkeys(str(r["linear"]) for r in rows))
    share = {(int(r["block"]), str(r["linear"])): float(r["share"]) for r in rows}
    z = [[share.get((b, name)) for name in linears] for b in blocks]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[name.split(".")[-1] for name in linears],
            y=[f"block {b}" for b in blocks],
            colorscale="Blues",
            zmin=0,
            xgap=1,
            ygap=1,
            colorbar=dict(title=dict(text="share")),
            hovertemplate="%{y}, %{x}: took in %{z:.3g} x its own weight's norm<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    title = f"Round {round_number}: how much of block {removed} each neighbour took in, per linear"
    return _layout(fig, title, height=150 + 28 * len(blocks))


def depth_profile(series: dict[str, Sequence[float | None]], metric_label: str = "Macro Influence") -> go.Figure:
    """Which blocks matter in several models at once: x = a block's position as a share of its model's
    depth (block i of n at (i + 0.5) / n), y = its rank-normalised score within its own model (0 = least
    important there, 1 = most), one line per model. Ranks make models of different scales comparable."""
    drawn = {name: values for name, values in series.items() if any(_finite(v) for v in values)}
    if not drawn:
        return empty_figure("Scores of two models appear here")
    fig = go.Figure()
    for name, values in drawn.items():
        n = len(values)
        ranks = normalise(values)
        kept = [(i, r, values[i]) for i, r in enumerate(ranks) if r is not None]
        fig.add_trace(
            go.Scatter(
                x=[(i + 0.5) / n for i, _, _ in kept],
                y=[r for _, r, _ in kept],
                mode="lines+markers",
                name=f"{name} ({n} blocks)",
                customdata=[[i, v] for i, _, v in kept],
                hovertemplate=f"{name}<br>block %{{customdata[0]}} of {n}<br>{metric_label} %{{customdata[1]:.4g}}"
                "<br>rank %{y:.2f}<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="position in the model (0 = input side, 1 = output side)", range=[0, 1])
    fig.update_yaxes(title_text=f"{metric_label} rank in its model (0 = least important)", range=[-0.05, 1.05])
    fig.update_layout(legend=dict(orientation="h", y=-0.3))
    return _layout(fig, f"Which blocks matter in two models ({metric_label}, position normalised by depth)", 380)


def guess_bars(scores: Sequence[float | None], guess: int | None, least: int | None) -> go.Figure:
    """The lesson's reveal: MI of every block as bars, the visitor's guess and MI's least important block marked."""
    if not scores:
        return empty_figure("The scores appear once you have guessed")
    colours = [REMOVED if i == least else TARGET if i == guess else KEPT for i in range(len(scores))]
    fig = go.Figure(
        go.Bar(
            x=list(range(len(scores))),
            y=[v if _finite(v) else None for v in scores],
            marker_color=colours,
            marker_line=dict(color="#444", width=1),
            hovertemplate="block %{x}: Macro Influence %{y:.4g}<extra></extra>",
        )
    )
    fig.update_xaxes(
        title_text="block (red: least important by MI; blue: your guess)", dtick=1 if len(scores) <= 32 else 2
    )
    fig.update_yaxes(title_text="Macro Influence (higher = matters more)", type="log", dtick=1, tickformat=".2g")
    return _layout(fig, "Macro Influence of every block", height=340)
