import json

import pytest

from fusegpt_core.config import PRESETS, Recipe, preset
from fusegpt_core.errors import PlanError, RecipeError


def test_round_trip_json_and_yaml(tmp_path):
    recipe = preset("cpu-demo", blocks=[3, 5], **{"fusion.targets": {"3": [2, 4]}, "distill.loss": "kl"})
    (tmp_path / "r.json").write_text(json.dumps(recipe.to_dict()))
    assert Recipe.from_file(tmp_path / "r.json") == recipe
    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe.to_dict()))
    assert Recipe.from_file(tmp_path / "r.yaml") == recipe
    assert recipe.fusion.targets == {3: [2, 4]}


def test_a_report_is_a_recipe(tmp_path):
    recipe = preset("tiny", remove=3)
    (tmp_path / "report.json").write_text(json.dumps({"dense_ppl": 1.0, "recipe": recipe.to_dict()}))
    assert Recipe.from_file(tmp_path / "report.json") == recipe


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("{not json", ".json", "not valid JSON"),
        ("a: [1, 2", ".yaml", "not valid YAML"),
        ('{"bogus": 1}', ".json", "unknown recipe key 'bogus'"),
        ('{"distill": {"lr": 1}}', ".json", "unknown recipe key 'distill.lr'"),
        ("[1, 2]", ".json", "mapping"),
    ],
)
def test_bad_recipe_files(tmp_path, content, suffix, message):
    path = tmp_path / f"r{suffix}"
    path.write_text(content)
    with pytest.raises(RecipeError, match=message):
        Recipe.from_file(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.from_file(tmp_path / "nope.json")


@pytest.mark.parametrize(
    "field, value",
    [
        ("method", "magic"),
        ("distill.loss", "l1"),
        ("distill.lr_lora", 0),
        ("distill.lr_coef", -1.0),
        ("distill.lr_settled", -1e-3),
        ("fusion.lora_rank", -2),
        ("distill.batch_size", 0),
        ("data.seq_len", 0),
        ("fusion.group_size", 1),
    ],
)
def test_validation_names_the_field(field, value):
    with pytest.raises(PlanError, match=field.replace(".", r"\.")):
        preset("tiny", **{field: value}).validate()


def test_model_dependent_checks():
    with pytest.raises(PlanError, match="larger than the model"):
        preset("cpu-demo", remove=1).validate(num_blocks=4)
    with pytest.raises(PlanError, match="at least one"):
        preset("tiny", remove=30).validate(num_blocks=30)
    preset("cpu-demo").validate(num_blocks=30)


def test_presets():
    assert set(PRESETS) == {"quick", "cpu-demo", "tiny", "paper"}
    quick, demo = preset("quick").to_dict(), preset("cpu-demo").to_dict()
    assert quick["data"].pop("n_calib") == 64 and demo["data"].pop("n_calib") == 320
    assert quick == demo  # the quick preset is cpu-demo on a fifth of the data
    paper = preset("paper")
    assert (paper.data.seq_len, paper.distill.epochs, paper.distill.loss) == (2048, 20, "kl")
    assert paper.distill.lr_lora == pytest.approx(9.65e-6)
    with pytest.raises(RecipeError):
        preset("nope")


def test_rate_removes_a_fraction_of_the_blocks_and_a_count_replaces_it():
    from fusegpt_core.config import preset

    paper = preset("paper")
    assert paper.rate == 0.25 and paper.count(32) == 8 and paper.count(30) == 8 and paper.count(22) == 6
    assert preset("paper", remove=3).count(32) == 3  # a count asked for wins over the preset's rate
    assert preset("tiny", rate=0.5).count(6) == 3
    assert preset("tiny", rate=0.5, blocks=[1]).count(6) == 1
    with pytest.raises(PlanError, match="rate"):
        preset("tiny", rate=1.5).validate()
    with pytest.raises(PlanError, match="cannot remove 5 of 6"):
        preset("tiny", rate=0.8).validate(num_blocks=6)
