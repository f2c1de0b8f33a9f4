"""Table functions: reports in, DataFrames out."""

from app import tables


def _report(**kw):
    base = dict(
        method="fusegpt",
        dense_ppl=10.0,
        dropped_ppl=20.0,
        result_ppl=12.0,
        removed_blocks=[3, 1],
        num_layers_before=6,
        num_layers_after=4,
        params_before=2_000_000,
        params_after=1_500_000,
        tokens_per_s_before=50.0,
        tokens_per_s_after=65.0,
        status="done",
        partial=False,
    )
    base.update(kw)
    return base


def test_compare_table_rows():
    speed = {"median": 65.0, "low": 60.0, "high": 70.0, "repeats": 5, "new_tokens": 32}
    runs = [
        {"label": "#1 fusegpt", "report": _report(bytes_before=8 * 2**20, bytes_after=6 * 2**20, speed_after=speed)},
        {"label": "#2 fusegpt", "report": _report(removed_blocks=[2], result_ppl=11.0)},
    ]
    df = tables.compare_table(runs)
    assert list(df.columns) == tables.COMPARE_COLUMNS
    assert list(df["model"]) == ["original", "dropped [3, 1]", "dropped [2]", "#1 fusegpt", "#2 fusegpt"]
    assert list(df["perplexity"]) == [10.0, 20.0, 20.0, 12.0, 11.0]
    assert df.loc[3, "vs original"] == "+20.0%"
    assert df.loc[0, "blocks"] == 6 and df.loc[3, "blocks"] == 4
    assert df.loc[0, "params (M)"] == 2.0
    assert df.loc[0, "weights (MB)"] == 8.0
    assert df.loc[3, "removed blocks"] == "3, 1"
    assert df.loc[3, "decode tokens/s (median)"] == 65.0 and df.loc[3, "tokens/s range"] == "60.0 to 70.0 (5 runs)"
    assert df.loc[1, "tokens/s range"] == tables.NOT_MEASURED  # a dropped baseline is never timed


def test_a_drop_run_is_the_dropped_row():
    runs = [
        {"label": "#1 fusegpt", "report": _report()},
        {"label": "#2 drop", "report": _report(method="drop", result_ppl=20.0)},
    ]
    assert list(tables.compare_table(runs)["model"]) == ["original", "#1 fusegpt", "#2 drop"]


def test_compare_table_marks_partial_runs_and_is_empty_without_runs():
    df = tables.compare_table([{"label": "#1 fusegpt", "report": _report(partial=True, status="diverged")}])
    assert "(partial)" in df.loc[2, "model"] and "(diverged)" in df.loc[2, "model"]
    assert tables.compare_table([]).empty


def test_chart_frame():
    df = tables.chart_frame(tables.compare_table([{"label": "#1", "report": _report()}]))
    assert list(df.columns) == ["model", "method", "perplexity", "params"]
    assert df["params"].iloc[0] == 2_000_000


def test_rounds_table():
    df = tables.rounds_table(
        [{"round": 0, "removed": 3, "targets": [1, 2, 4], "loss_first": 0.5, "loss_last": 0.1, "seconds": 1.234}]
    )
    assert df.loc[0, "targets"] == "1, 2, 4" and df.loc[0, "seconds"] == 1.2 and df.loc[0, "round"] == 1


def test_scores_and_agreement_tables():
    import pandas as pd

    df = tables.scores_table({"mi": [0.1, None], "bi": [0.2, 0.3]}, {"mi": "MI"})
    assert list(df.columns) == ["block", "MI", "bi"] and pd.isna(df.loc[1, "MI"])
    agree = pd.DataFrame([[1.0, 0.5], [0.5, 1.0]], index=["mi", "bi"], columns=["mi", "bi"])
    t = tables.agreement_table(agree, {"mi": "MI"})
    assert list(t.columns) == ["metric", "MI", "bi"] and t.loc[0, "bi"] == 0.5


def test_model_info_and_formatting():
    df = tables.model_info_table(
        {
            "source": "bundled",
            "model_type": "llama",
            "blocks": 30,
            "params": 134_515_008,
            "device": "cpu",
            "dtype": "float32",
            "load_seconds": 7.3,
        }
    )
    values = dict(zip(df["property"], df["value"]))
    assert values["parameters"] == "134.5 M" and values["blocks"] == "30" and values["load time"] == "7.3 s"
    assert tables.fmt_seconds(125) == "2 min 05 s"
    assert tables.fmt_seconds(None) == "?"
    assert tables.fmt_params(1.5e9) == "1.50 B"
