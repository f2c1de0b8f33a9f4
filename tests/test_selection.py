"""Selection strategies through the pipeline: manual, iterative, one-shot, with and without candidates."""

import pytest

from fusegpt_core.config import preset
from fusegpt_core.errors import PlanError
from fusegpt_core.pipeline import run
from fusegpt_core.selection import BlockIndex, OneShot, rank_by_score
from fusegpt_core.testing import tiny_loaded_model


def _run(windows, **overrides):
    loaded = tiny_loaded_model("llama", 8)
    recipe = preset("tiny", method="drop", **{"fusion.group_size": 4, **overrides})
    return run(recipe, loaded, windows=(windows[:8], windows[8:])).report


def test_block_index_maps_both_ways():
    index = BlockIndex(5)
    assert index.remove(1) == 1 and index.remove(2) == 3  # current 2 is original 3 once 1 is gone
    assert index.original == [0, 2, 4] and index.current(4) == 2 and 3 not in index
    assert index.by_original([0.1, 0.2, 0.3]) == [0.1, None, 0.2, None, 0.3]
    with pytest.raises(PlanError, match="already removed"):
        index.current(3)


def test_one_shot_ranks_the_remaining_blocks_by_the_first_scores():
    select, index = OneShot(), BlockIndex(4)
    assert select.wants_scores(0)
    assert select.ranked(0, index, [0.3, 0.1, 0.4, 0.2]) == [1, 3, 0, 2]
    index.remove(1)
    assert not select.wants_scores(1)
    assert select.ranked(1, index, None) == [2, 0, 1]  # originals 3, 0, 2 at their current positions


def test_one_shot_removes_the_lowest_blocks_of_one_scoring(windows):
    r = _run(windows, remove=3, selection="one-shot")
    assert len(r["trajectory"]) == 1  # scored once
    first = r["trajectory"][0]
    assert r["removed_blocks"] == rank_by_score(first)[:3]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_one_shot_with_candidates_picks_among_the_lowest_remaining(seed, windows):
    r = _run(windows, remove=4, selection="one-shot", candidates=3, **{"data.seed": seed})
    assert r["status"] == "done" and len(r["trajectory"]) == 1
    first = r["trajectory"][0]
    remaining = list(range(8))
    for removed in r["removed_blocks"]:
        lowest = sorted(remaining, key=lambda b: (first[b], b))[:3]
        assert removed in lowest
        remaining.remove(removed)


def test_iterative_with_candidates_picks_among_each_rounds_lowest(windows):
    r = _run(windows, remove=3, candidates=2)
    assert len(r["trajectory"]) == 3
    for row, removed in zip(r["trajectory"], r["removed_blocks"]):
        present = [b for b, v in enumerate(row) if v is not None]
        assert removed in sorted(present, key=lambda b: (row[b], b))[:2]


def test_iterative_rescoring_removes_each_rounds_lowest(windows):
    r = _run(windows, remove=3)
    for row, removed in zip(r["trajectory"], r["removed_blocks"]):
        present = [b for b, v in enumerate(row) if v is not None]
        assert removed == min(present, key=lambda b: (row[b], b))


def test_manual_blocks_keep_their_order_and_ignore_candidates(windows):
    r = _run(windows, blocks=[5, 2, 6], candidates=3)
    assert r["removed_blocks"] == [5, 2, 6] and r["trajectory"] == []
