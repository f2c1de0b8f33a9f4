"""Plot functions: fixed data in, plotly figures out (no gradio, no model)."""

import math

import pandas as pd
import plotly.graph_objects as go

from app import plots

SCORES = {"mi": [0.4, 0.1, 0.3, 0.2], "bi": [2.0, 4.0, 3.0, 1.0]}


def test_normalise_ranks_keeps_none_and_handles_ties():
    assert plots.normalise([1.0, None, 3.0]) == [0.0, None, 1.0]
    assert plots.normalise([2.0, 2.0]) == [0.5, 0.5]
    assert plots.normalise([1.0, 1.0, 2.0]) == [0.25, 0.25, 1.0]
    assert plots.normalise([None, float("nan")]) == [None, None]
    # one extreme block does not flatten the others
    assert [round(v, 3) for v in plots.normalise([1000.0, 1.0, 2.0, 3.0])] == [1.0, 0.0, 0.333, 0.667]


def test_importance_heatmap_normalises_per_metric_with_raw_hover():
    fig = plots.importance_heatmap(SCORES, selected=[1])
    heat = fig.data[0]
    assert isinstance(heat, go.Heatmap)
    assert list(heat.y) == ["Macro Influence", "Block Influence"]
    assert [round(v, 3) for v in heat.z[0]] == [1.0, 0.0, 0.667, 0.333]
    assert [round(v, 3) for v in heat.z[1]] == [0.333, 1.0, 0.667, 0.0]
    assert heat.customdata[1][1] == 4.0  # raw value on hover
    assert "customdata" in heat.hovertemplate
    frames = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(frames) == 1 and frames[0].x0 == 0.5 and frames[0].x1 == 1.5


def test_importance_heatmap_empty():
    fig = plots.importance_heatmap({})
    assert len(fig.data) == 0 and fig.layout.annotations


def test_rank_agreement_heatmap_writes_values():
    df = pd.DataFrame([[1.0, -0.5], [-0.5, 1.0]], index=["mi", "bi"], columns=["mi", "bi"])
    fig = plots.rank_agreement_heatmap(df)
    assert fig.data[0].zmin == -1 and fig.data[0].zmax == 1
    assert fig.data[0].text[0][1] == "-0.50"
    assert list(fig.data[0].x) == ["Macro Influence", "Block Influence"]


def test_trajectory_blanks_removed_blocks_and_marks_choices():
    rows = [[0.3, 0.1, 0.2, 0.4], [0.5, None, 0.2, 0.6]]
    fig = plots.trajectory_heatmap(rows, removed=[1, 2])
    heat, marks = fig.data
    assert heat.z[1][1] is None
    assert math.isnan(heat.customdata[1][1])
    assert list(marks.x) == [1, 2] and list(marks.y) == ["step 1", "step 2"]


def test_trajectory_empty_message():
    fig = plots.trajectory_heatmap([])
    assert len(fig.data) == 0


def test_block_diagram_cell_kinds():
    fig = plots.block_diagram(6, removed=[4, 1], groups={4: [2, 3, 5], 1: [0, 2]}, focus=1)
    z = fig.data[0].z
    assert list(z[0]) == [0, 0, 2, 2, 3, 2]  # step 1: remove 4, targets 2, 3, 5
    assert list(z[1]) == [2, 3, 2, 0, 1, 0]  # step 2: remove 1; 4 already gone
    assert "<b>remove 1</b>" in list(fig.data[0].y)


def test_block_diagram_without_removals_shows_the_model():
    fig = plots.block_diagram(4, removed=[], groups={})
    assert list(fig.data[0].z[0]) == [0, 0, 0, 0]


def test_loss_curves_one_line_per_group_and_log_scale():
    fig = plots.loss_curves({"round 1": [(1, 1.0), (2, 0.01)], "round 2": [(1, 0.5), (2, float("nan"))]})
    assert [t.name for t in fig.data] == ["round 1", "round 2"]
    assert list(fig.data[1].y) == [0.5]  # NaN dropped
    assert fig.layout.yaxis.type == "log"


def test_compare_chart_bars():
    df = pd.DataFrame(
        {
            "model": ["original", "dropped [3]", "#1 fusegpt"],
            "perplexity": [10.0, 30.0, 12.0],
            "params": [1e6, 8e5, 8e5],
        }
    )
    fig = plots.compare_chart(df)
    assert list(fig.data[0].x) == ["original", "dropped [3]", "#1 fusegpt"]
    assert list(fig.data[0].y) == [10.0, 30.0, 12.0]
    assert "1.0M params" in fig.data[0].text[0]


def test_compare_chart_empty():
    assert len(plots.compare_chart(pd.DataFrame()).data) == 0


def _every_figure():
    """Each figure function with the states a run passes through: nothing yet, one row, one block."""
    yield plots.empty_figure("nothing yet")
    yield plots.importance_heatmap({"mi": [0.2]})  # one metric, one block
    yield plots.importance_heatmap({"mi": [None, None]})
    yield plots.trajectory_heatmap([[0.1, 0.3, None]], [0])  # the first scoring round of a run
    yield plots.trajectory_heatmap([[0.1] * 30] * 6, [1, 2, 3, 4, 5, 6])
    yield plots.rank_agreement_heatmap(pd.DataFrame([[1.0]], index=["mi"], columns=["mi"]))
    yield plots.block_diagram(1, [], {})
    yield plots.block_diagram(30, [4], {4: [3, 5]})
    yield plots.loss_curves({"round 1: block 4": [(1, 0.5)]})
    yield plots.compare_chart(
        pd.DataFrame({"model": ["original"], "method": ["-"], "perplexity": [0.0], "params": [1]})
    )
    yield plots.absorbed_heatmap([{"block": 3, "linear": "mlp.up_proj", "share": 0.1}], removed=4, round_number=1)


def test_every_figure_leaves_its_colour_bar_room_to_draw():
    """gradio's Plot raises a titled figure's top margin to 100 px; plotly.js 3.3 then threw on a one-row
    heatmap 200 px high (its colour bar came out -9 px long) and the page stopped updating. Every figure
    keeps MIN_PLOT_PX of plot area under that margin, and colour bar titles fit on one line."""
    for fig in _every_figure():
        layout = fig.layout
        assert layout.margin.t >= 100
        assert layout.height - layout.margin.t - layout.margin.b >= plots.MIN_PLOT_PX, layout.title.text
        for trace in fig.data:
            bar = getattr(trace, "colorbar", None)
            if bar is not None and bar.title.text:
                assert "<br>" not in bar.title.text


def test_loss_ticks_are_whole_steps_and_methods_have_their_own_colours():
    fig = plots.loss_curves({"a": [(1, 0.5), (2, 0.4), (3, 0.3)]})
    assert fig.layout.xaxis.dtick == 1
    assert plots.loss_curves({"a": [(s, 1.0) for s in range(1, 161)]}).layout.xaxis.dtick == 16
    frame = pd.DataFrame(
        {"model": ["original", "#1 fusegpt", "#2 drop+lora"], "method": ["-", "fusegpt", "drop+lora"],
         "perplexity": [10.0, 12.0, 13.0], "params": [1, 1, 1]}
    )  # fmt: skip
    colours = list(plots.compare_chart(frame).data[0].marker.color)
    assert len(set(colours)) == 3
