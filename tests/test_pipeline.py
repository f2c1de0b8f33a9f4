import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from fusegpt_core.adapters import get_blocks
from fusegpt_core.config import preset
from fusegpt_core.errors import Cancelled, PlanError
from fusegpt_core.evaluate import perplexity
from fusegpt_core.export import ExportError, export_model, safe_export_dir
from fusegpt_core.fused_linear import FusedLinear
from fusegpt_core.loading import LoadedModel
from fusegpt_core.pipeline import run
from fusegpt_core.testing import FAMILIES, tiny_loaded_model, tiny_model, tiny_tokenizer


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["fusegpt", "drop", "drop+lora", "average"])
def test_methods_run_and_leave_the_original_untouched(method, windows, tokenizer):
    loaded = tiny_loaded_model("llama", 6)
    before = _state(loaded.model)
    prompt = windows[8:9, :12]
    generated = loaded.model.generate(prompt, max_new_tokens=6, do_sample=False)  # with the KV cache
    events = []
    result = run(preset("tiny", method=method), loaded, on_event=events.append, windows=(windows[:8], windows[8:]))
    r = result.report
    assert _same(before, _state(loaded.model))
    assert len(get_blocks(loaded.model)) == 6 and loaded.model.config.num_hidden_layers == 6
    assert [b.self_attn.layer_idx for b in get_blocks(loaded.model)] == list(range(6))  # not renumbered
    assert torch.equal(loaded.model.generate(prompt, max_new_tokens=6, do_sample=False), generated)
    # copy-on-write: the result shares the tensors no round changed (no whole-model copy was made)
    shared = {p.data_ptr() for p in loaded.model.parameters()}
    embed = result.model.get_input_embeddings().weight
    assert embed.data_ptr() in shared
    changed = {t for rnd in r["rounds"] for t in [*rnd["targets"], rnd["removed"]]}
    if method in ("fusegpt", "drop+lora"):
        for original_index, block in zip(
            [b for b in range(6) if b not in r["removed_blocks"]], get_blocks(result.model)
        ):
            weights = {p.data_ptr() for p in block.parameters()}
            assert (weights <= shared) == (original_index not in changed), original_index
    assert r["num_layers_before"] == 6 and r["num_layers_after"] == 4
    assert len(r["removed_blocks"]) == 2 and len(set(r["removed_blocks"])) == 2
    assert all(math.isfinite(r[k]) for k in ("dense_ppl", "dropped_ppl", "result_ppl"))
    assert r["params_after"] < r["params_before"]
    assert not any(isinstance(m, FusedLinear) for m in result.model.modules())  # folded
    assert {"score", "evaluate"} <= set(r["seconds"])
    assert r["recipe"]["method"] == method
    if method == "drop":
        assert r["result_ppl"] == pytest.approx(r["dropped_ppl"])
    if method in ("fusegpt", "drop+lora"):
        assert any(e.kind == "loss" for e in events)
        for rnd in r["rounds"]:
            assert rnd["loss_after"] < rnd["loss_before"]  # the group learned something
    # the iterative MI trajectory: one row per round, removed blocks blank
    assert len(r["trajectory"]) == 2
    assert r["trajectory"][1][r["removed_blocks"][0]] is None


def test_fusion_beats_dropping_on_its_calibration_data(windows):
    loaded = tiny_loaded_model("llama", 6)
    recipe = preset("tiny", method="fusegpt", blocks=[2], **{"distill.epochs": 6})
    r = run(recipe, loaded, windows=(windows[:8], windows[:8])).report
    assert r["result_ppl"] < r["dropped_ppl"]


def test_manual_blocks_and_targets(windows):
    loaded = tiny_loaded_model("llama", 6)
    recipe = preset("tiny", blocks=[4, 1], **{"fusion.targets": {"4": [3, 5], "1": [0]}})
    r = run(recipe, loaded, windows=(windows[:8], windows[8:])).report
    assert r["removed_blocks"] == [4, 1]
    assert r["rounds"][0]["targets"] == [3, 5] and r["rounds"][1]["targets"] == [0]
    assert r["trajectory"] == []  # nothing was scored: the user chose


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"blocks": [1, 1]}, "more than once"),
        ({"blocks": [9]}, "does not exist"),
        ({"remove": 6}, "at least one block must remain"),
        ({"blocks": [2], "fusion.targets": {"2": [2]}}, "itself"),
        ({"distill.lr_coef": float("nan")}, "lr_coef"),
        ({"fusion.coef_rank": -1}, "coef_rank"),
        ({"distill.epochs": 0}, "epochs"),
    ],
)
def test_impossible_plans_are_refused_before_any_work(overrides, message, windows):
    loaded = tiny_loaded_model("llama", 6)
    before = _state(loaded.model)
    with pytest.raises(PlanError, match=message):
        run(preset("tiny", **overrides), loaded, windows=(windows[:8], windows[8:]))
    assert _same(before, _state(loaded.model))


@pytest.mark.parametrize("stop_at", ["score", "finetune", "evaluate"])
def test_cancel_at_any_stage_leaves_the_original_usable(stop_at, windows):
    loaded = tiny_loaded_model("llama", 6)
    before = _state(loaded.model)
    ppl_before = perplexity(loaded.model, windows[8:])
    seen = {"stop": False, "evaluate_count": 0}

    def on_event(e):
        if e.kind == "stage" and e.stage == "evaluate":
            seen["evaluate_count"] += 1
        if e.kind == "stage" and e.stage == stop_at and (stop_at != "evaluate" or seen["evaluate_count"] == 2):
            seen["stop"] = True

    with pytest.raises(Cancelled):
        run(
            preset("tiny"),
            loaded,
            on_event=on_event,
            should_stop=lambda: seen["stop"],
            windows=(windows[:8], windows[8:]),
        )
    assert _same(before, _state(loaded.model))
    assert perplexity(loaded.model, windows[8:]) == ppl_before


@pytest.mark.parametrize("epochs, batch", [(4, 4), (1, 1)])  # one epoch: guarded after the warm-up
def test_divergence_rolls_the_round_back(windows, epochs, batch):
    loaded = tiny_loaded_model("llama", 6)
    # a learning rate this large makes the loss explode within a few steps
    overrides = {"distill.lr_coef": 9.0, "distill.grad_clip": 0, "distill.epochs": epochs, "distill.batch_size": batch}
    recipe = preset("tiny", blocks=[3, 1], **overrides)
    result = run(recipe, loaded, windows=(windows[:8], windows[8:]))
    r = result.report
    assert r["status"] == "diverged" and r["partial"]
    assert "exploded" in r["rounds"][-1]["error"]  # caught before it turned into NaN
    # the model is the pre-round state: every removed block is accounted for, the result works
    assert r["num_layers_after"] == 6 - len(r["removed_blocks"])
    assert math.isfinite(r["result_ppl"])


FAMILY_CASES = [(f, None) for f in FAMILIES] + [("qwen2", 16)]  # Qwen2 with alternating sliding-window blocks


@pytest.mark.parametrize("family, window", FAMILY_CASES)
def test_every_family_fuses_folds_exports_and_reloads_with_the_same_perplexity(family, window, tmp_path, windows):
    model = tiny_model(family, 6, sliding_window=window)
    loaded = LoadedModel(model, tiny_tokenizer(), f"tiny-{family}", "tiny", 0.0)
    result = run(preset("tiny"), loaded, windows=(windows[:8], windows[8:]))
    assert result.report["status"] == "done"
    folder = export_model(result.model, result.tokenizer, tmp_path / "out", result.report)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert len(get_blocks(reloaded)) == 4 and not any(isinstance(m, FusedLinear) for m in reloaded.modules())
    ppl = perplexity(reloaded, windows[8:])
    assert ppl == pytest.approx(result.report["result_ppl"], rel=1e-5)
    assert (folder / "model.safetensors").exists() and (folder / "recipe.json").exists()
    with pytest.raises(ExportError, match="already exists"):
        export_model(result.model, result.tokenizer, folder, result.report)


@pytest.mark.parametrize(
    "overrides, says, never",
    [
        ({"method": "fusegpt"}, ["fused into its neighbours", "Macro Influence", "re-scored"], ["picked by hand"]),
        ({"method": "drop"}, ["deleted, with no repair", "Macro Influence"], ["fused", "FuseGPT (arXiv"]),
        ({"method": "drop+lora"}, ["LoRA"], ["fused into"]),
        ({"method": "average", "blocks": [3, 1]}, ["averaged", "picked by hand"], ["fused", "Macro Influence"]),
        (
            {"method": "fusegpt", "selection": "one-shot", "candidates": 2},
            ["scored once", "among the 2"],
            ["re-scored"],
        ),
    ],
)
def test_the_model_card_says_what_was_done(overrides, says, never, windows):
    from fusegpt_core.export import model_card

    result = run(preset("tiny", **overrides), tiny_loaded_model("llama", 6), windows=(windows[:8], windows[8:]))
    card = model_card({**result.report, "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    for text in says:
        assert text in card
    for text in never:
        assert text not in card
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "\n# SmolLM2-135M-Instruct, 2 of 6 blocks removed" in card


def test_rounds_record_what_each_target_absorbed(windows):
    r = run(preset("tiny", blocks=[2]), tiny_loaded_model("llama", 6), windows=(windows[:8], windows[8:])).report
    absorbed = r["rounds"][0]["absorbed"]
    assert {a["block"] for a in absorbed} == set(r["rounds"][0]["targets"])
    assert all(a["share"] > 0 for a in absorbed)  # trained coefficients are no longer zero
    assert len(absorbed) == len(r["rounds"][0]["targets"]) * 7  # Llama: 7 linears per block


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "x" * 200, "/abs"])
def test_export_names_cannot_escape(tmp_path, name):
    with pytest.raises(ExportError):
        safe_export_dir(tmp_path, name)


def test_export_name_ok(tmp_path):
    assert safe_export_dir(tmp_path, "smol-fused_1.0") == (tmp_path / "smol-fused_1.0").resolve()


def test_absorbability_aware_selection_picks_among_the_lowest(windows):
    from fusegpt_core.adapters import get_blocks as blocks_of
    from fusegpt_core.capture import capture_block_inputs
    from fusegpt_core.fusion import plan_group
    from fusegpt_core.importance import score_blocks
    from fusegpt_core.selection import removal_error

    loaded = tiny_loaded_model("llama", 6)
    calib = windows[:8]
    scores = score_blocks(loaded.model, calib[:2], ("mi",), batch_size=4)["mi"]
    lowest3 = sorted(range(6), key=lambda i: scores[i])[:3]
    inputs = capture_block_inputs(loaded.model, calib)
    errors = {c: removal_error(loaded.model, inputs, c, plan_group(c, 6, 4), 4) for c in lowest3}
    assert all(e > 0 for e in errors.values())
    recipe = preset("tiny", remove=1, candidates=3, method="drop")
    r = run(recipe, loaded, windows=(calib, windows[8:])).report
    assert r["removed_blocks"][0] == min(lowest3, key=lambda c: errors[c])
    assert len(blocks_of(loaded.model)) == 6


@pytest.mark.parametrize("lr_settled, kept", [(0, True), (None, False)])
def test_earlier_rounds_coefficients_stay_frozen_when_their_rate_is_zero(lr_settled, kept, windows, monkeypatch):
    import fusegpt_core.fusion as fusion

    real_finetune = fusion.finetune
    checked = []

    def watching_finetune(blocks, *args, **kwargs):
        layers = [m for b in blocks for m in b.modules() if isinstance(m, FusedLinear)]
        settled = [p.detach().clone() for m in layers for p in m.trainable_parameters()[1]]
        result = real_finetune(blocks, *args, **kwargs)
        after = [p for m in layers for p in m.trainable_parameters()[1]]
        if settled:
            checked.append(all(torch.equal(a, b) for a, b in zip(settled, after)))
        return result

    monkeypatch.setattr(fusion, "finetune", watching_finetune)
    loaded = tiny_loaded_model("llama", 6)
    recipe = preset("tiny", blocks=[2, 3], **{"distill.lr_settled": lr_settled})  # overlapping groups
    r = run(recipe, loaded, windows=(windows[:8], windows[8:])).report
    assert r["status"] == "done" and checked == [kept]


def test_fewer_windows_than_asked_and_an_unreachable_hub_are_said(monkeypatch, tokenizer):
    from fusegpt_core import data
    from fusegpt_core.errors import DataError
    from fusegpt_core.pipeline import load_windows
    from fusegpt_core.testing import sample_text

    text = sample_text(4000)
    recipe = preset(
        "tiny", **{"data.calib_source": f"text:{text}", "data.eval_source": f"text:{text}", "data.n_calib": 64}
    )
    notes = []
    calib, evals = load_windows(recipe, tokenizer, notes)
    assert calib.shape[0] < recipe.data.n_calib or evals.shape[0] < recipe.data.n_eval
    assert any("fewer than the" in n for n in notes)

    real = data.load_texts

    def offline(calib_source, eval_source, seed=0):
        if calib_source.startswith("hf:"):
            raise DataError("Could not reach the Hugging Face Hub")
        return real(f"text:{text * 8}", f"text:{text * 8}", seed=seed)

    monkeypatch.setattr(data, "load_texts", offline)
    hub = {"data.calib_source": "hf:wikitext2", "data.eval_source": "hf:wikitext2"}
    with pytest.raises(DataError):  # no fallback: an error, as before
        load_windows(preset("tiny", **hub), tokenizer, [])
    notes = []
    load_windows(preset("tiny", **hub, **{"data.fallback_source": "bundled"}), tokenizer, notes)
    assert any("could not be loaded" in n and "'bundled' instead" in n for n in notes)
