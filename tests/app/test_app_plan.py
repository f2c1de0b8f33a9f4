"""The typed Plan: every edit keeps it consistent, and its groups are the pipeline's groups."""

import pytest

from app.plan import AUTO, Plan
from fusegpt_core.errors import PlanError
from fusegpt_core.fusion import plan_group

SCORES = [0.5, 0.1, 0.3, 0.05, 0.4, 0.2]


def test_pick_orders_by_mi_and_drops_targets_of_unpicked_blocks():
    plan = Plan()
    plan.pick([0, 1, 3], SCORES)
    assert plan.blocks == [3, 1, 0] and plan.count == 3
    plan.set_targets(1, [2, 4], 6)
    plan.pick([1, 0], SCORES)
    assert plan.blocks == [1, 0] and plan.targets == {1: [2, 4]}
    plan.pick([0], SCORES)
    assert plan.targets == {}


def test_toggle_adds_and_removes_but_never_every_block():
    plan = Plan()
    plan.toggle(2, 3)
    plan.toggle(0, 3)
    assert plan.blocks == [0, 2]
    plan.toggle(1, 3)  # would remove every block: refused quietly
    assert plan.blocks == [0, 2]
    plan.toggle(2, 3)
    assert plan.blocks == [0]
    with pytest.raises(PlanError, match="does not exist"):
        plan.toggle(7, 3)


def test_letting_mi_choose_clears_the_hand_made_plan():
    plan = Plan(blocks=[1, 2], targets={1: [0]})
    assert not plan.empty
    plan.let_metric_choose(4)
    assert plan.mode == AUTO and plan.blocks == [] and plan.targets == {} and plan.count == 4 and plan.empty
    assert plan.recipe_fields() == {"blocks": None, "remove": 4, "fusion.targets": None}
    plan.let_metric_choose(0)
    with pytest.raises(PlanError, match="at least 1"):
        plan.recipe_fields()


@pytest.mark.parametrize(
    "block, targets, message",
    [
        (2, [2], "cannot be fused into itself"),
        (2, [9], "outside the model"),
        (2, [], "at least one target"),
        (5, [1], "not in the plan"),
        (1, [3], "removed by an earlier round"),  # 3 goes first (lowest MI)
    ],
)
def test_impossible_targets_are_refused_and_the_plan_kept(block, targets, message):
    plan = Plan()
    plan.pick([3, 1, 2], SCORES)
    plan.set_targets(2, [0], 6)
    with pytest.raises(PlanError, match=message):
        plan.set_targets(block, targets, 6)
    assert plan.targets == {2: [0]}


def test_groups_follow_the_core_window_on_the_blocks_left():
    plan = Plan(blocks=[5, 6])
    groups = plan.groups(10, 4)
    assert groups[5] == plan_group(5, 10, 4)
    remaining = [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert groups[6] == [remaining[t] for t in plan_group(5, 9, 4)]
    plan.set_targets(6, [7], 10)
    assert plan.groups(10, 4)[6] == [7]
    assert Plan(blocks=[1]).groups(3, 99) == {1: [0, 2]}  # a group size beyond the model is clamped


def test_replace_with_a_runs_blocks():
    plan = Plan(blocks=[1], targets={1: [0]})
    plan.replace_with([4, 2], {2: [1, 3], 9: [0]})
    assert plan.blocks == [4, 2] and plan.targets == {2: [1, 3]}
    assert plan.to_dict() == {"mode": "manual", "blocks": [4, 2], "remove": 2, "targets": {"2": [1, 3]}}
