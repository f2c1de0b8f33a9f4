"""Widget values -> Recipe; run-time estimates; plan helpers."""

import pytest

from app.estimate import estimate_run, estimate_text, mi_pass_forwards
from app.plan import Plan, lowest_blocks, removal_order
from app.recipes import KNOB_KEYS, KNOBS, build_recipe, cli_command, preset_values
from fusegpt_core.config import preset
from fusegpt_core.errors import PlanError
from fusegpt_core.fusion import plan_group


def _build(plan, **kw):
    plan = Plan(mode=plan.get("mode", "manual"), blocks=plan.get("blocks", []), targets=plan.get("targets", {}),
                remove=kw.pop("remove", 2))  # fmt: skip
    args = dict(
        model="bundled",
        preset_name="tiny",
        method="fusegpt",
        plan=plan,
        knobs=preset_values("tiny"),
        calib_source="bundled",
        device="cpu",
        dtype="float32",
    )
    args.update(kw)
    return build_recipe(**args)


def test_knobs_cover_known_recipe_keys_and_round_trip():
    assert len(set(KNOB_KEYS)) == len(KNOBS)
    recipe = _build({"mode": "manual", "blocks": [3, 1]})
    assert recipe.to_dict()["distill"] == preset("tiny").to_dict()["distill"]


def test_earlier_coefficients_rate_knob_keeps_zero_and_empty_apart():
    index = KNOB_KEYS.index("distill.lr_settled")
    assert preset_values("cpu-demo")[index] == 0 and preset_values("tiny")[index] is None
    for typed, expected in ((0, 0.0), ("", None), (None, None), (2e-3, 2e-3)):
        knobs = preset_values("tiny")
        knobs[index] = typed
        assert _build({"mode": "manual", "blocks": [1]}, knobs=knobs).distill.lr_settled == expected
    knobs[index] = -1
    with pytest.raises(PlanError, match="lr_settled"):
        _build({"mode": "manual", "blocks": [1]}, knobs=knobs)


def test_manual_plan_keeps_order_and_custom_targets():
    recipe = _build({"mode": "manual", "blocks": [3, 1], "targets": {3: [2, 4], 5: [0]}}, num_blocks=6)
    assert recipe.blocks == [3, 1] and recipe.remove == 2
    assert recipe.fusion.targets == {3: [2, 4]}  # targets of blocks not in the plan are dropped
    assert recipe.data.calib_source == "bundled" and recipe.device == "cpu"


def test_auto_plan_lets_the_metric_choose():
    recipe = _build({"mode": "auto"}, remove=4)
    assert recipe.blocks is None and recipe.remove == 4


def test_group_size_is_clamped_to_the_model():
    recipe = _build(
        {"mode": "manual", "blocks": [1]}, num_blocks=6, preset_name="cpu-demo", knobs=preset_values("cpu-demo")
    )
    assert preset("cpu-demo").fusion.group_size > 6 and recipe.fusion.group_size == 6


def test_plan_errors_are_user_messages():
    with pytest.raises(PlanError, match="no block is chosen"):
        _build({"mode": "manual", "blocks": []})
    with pytest.raises(PlanError, match="at least one block must remain"):
        _build({"mode": "manual", "blocks": [0, 1, 2, 3, 4, 5]}, num_blocks=6)
    bad = preset_values("tiny")
    bad[KNOB_KEYS.index("distill.epochs")] = 1.5
    with pytest.raises(PlanError, match="whole number"):
        _build({"mode": "manual", "blocks": [1]}, knobs=bad)


def test_cli_command_quotes():
    assert cli_command("my recipe.json").startswith("python -m fusegpt_core fuse --recipe 'my recipe.json'")


def test_estimate_grows_with_work():
    small = estimate_run(preset("tiny", remove=2), 30, 0.01, 128)
    big = estimate_run(preset("cpu-demo", remove=6), 30, 0.01, 128)
    assert 0 < small["total"] < big["total"]
    manual = estimate_run(preset("cpu-demo", blocks=[1, 2]), 30, 0.01, 128)
    assert manual["stages"]["score"] == 0  # fixed blocks need no scoring
    assert mi_pass_forwards(4, True) == 4 + 6 and mi_pass_forwards(4, False) == 16
    assert "on this cpu" in estimate_text(small, "cpu")
    # FuseGPT rebuilds its fused weights every step: smaller batches (more steps) cost more, LoRA does not
    fine_tune = {
        (method, batch): estimate_run(
            preset("cpu-demo", blocks=[10, 11], method=method, **{"distill.batch_size": batch}), 30, 0.01, 128
        )["stages"]["fine-tune"]
        for method in ("fusegpt", "drop+lora")
        for batch in (2, 4)
    }
    assert fine_tune["fusegpt", 2] > fine_tune["fusegpt", 4] > fine_tune["drop+lora", 4] == fine_tune["drop+lora", 2]
    # coefficients of earlier rounds left frozen are folded once, not rebuilt every step
    six = {lr: estimate_run(preset("cpu-demo", **{"distill.lr_settled": lr}), 30, 0.01, 128) for lr in (0, None)}
    assert six[0]["stages"]["fine-tune"] < six[None]["stages"]["fine-tune"]


def test_plan_groups_follow_the_core_window_on_remaining_blocks():
    groups = Plan(blocks=[5, 6]).groups(10, 4)
    assert groups[5] == plan_group(5, 10, 4)
    remaining = [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert groups[6] == [remaining[t] for t in plan_group(5, 9, 4)]
    assert Plan(blocks=[5], targets={5: [1, 2]}).groups(10, 4) == {5: [1, 2]}


def test_removal_order_and_lowest():
    scores = [0.5, 0.1, 0.3, 0.05]
    assert removal_order([0, 1, 3], scores) == [3, 1, 0]
    assert removal_order([2, 0], None) == [0, 2]
    assert lowest_blocks(scores, 2) == [1, 3]


def test_estimate_counts_custom_targets_and_the_measured_decode_step():
    window = estimate_run(preset("cpu-demo", blocks=[10]), 30, 0.01, 128)
    narrow = estimate_run(preset("cpu-demo", blocks=[10], **{"fusion.targets": {"10": [11]}}), 30, 0.01, 128)
    wide = estimate_run(preset("cpu-demo", blocks=[10], **{"fusion.targets": {"10": [1, 25]}}), 30, 0.01, 128)
    assert narrow["stages"]["fine-tune"] < window["stages"]["fine-tune"] < wide["stages"]["fine-tune"]
    # the speed stage: a warm-up and five timed generations of 32 tokens per model, the result shallower
    slow = estimate_run(preset("cpu-demo", remove=6), 30, 0.01, 128, decode_token_seconds=0.1)
    assert slow["stages"]["speed"] == pytest.approx(6 * 32 * 0.1 * (1 + 24 / 30))


def test_presets_are_described_and_the_app_starts_on_the_quick_one():
    from app.recipes import DEFAULT_PRESET, RunSettings
    from fusegpt_core.config import PRESET_INFO, PRESETS

    assert set(PRESET_INFO) == set(PRESETS) and DEFAULT_PRESET == "quick" == RunSettings().preset
    quick, demo = (
        estimate_run(preset("quick", remove=2), 30, 0.01, 128),
        estimate_run(preset("cpu-demo", remove=2), 30, 0.01, 128),
    )
    assert quick["total"] < demo["total"] / 2


def test_pair_knobs_parse_two_numbers():
    index = KNOB_KEYS.index("distill.betas")
    knobs = preset_values("tiny")
    assert knobs[index] == "0.9, 0.95"
    knobs[index] = "0.8 0.9"
    assert _build({"mode": "manual", "blocks": [1]}, knobs=knobs).distill.betas == (0.8, 0.9)
    knobs[index] = "0.8"
    with pytest.raises(PlanError, match="two numbers"):
        _build({"mode": "manual", "blocks": [1]}, knobs=knobs)
