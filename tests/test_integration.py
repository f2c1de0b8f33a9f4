"""A few end-to-end checks on the bundled SmolLM2-135M (30 Llama blocks); kept small for 2 cores."""

import math

import pytest
from transformers import AutoModelForCausalLM

from fusegpt_core.config import preset
from fusegpt_core.evaluate import generate, perplexity
from fusegpt_core.export import export_model
from fusegpt_core.importance import score_blocks
from fusegpt_core.loading import load_model
from fusegpt_core.pipeline import load_windows, run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bundled():
    return load_model("bundled")


@pytest.fixture(scope="module")
def recipe():
    return preset(
        "tiny",
        blocks=[17],
        **{"data.seq_len": 64, "data.n_calib": 8, "data.n_eval": 4, "fusion.group_size": 8, "distill.epochs": 1},
    )


def test_cached_mi_matches_reference_on_the_bundled_model(bundled, recipe):
    calib, _ = load_windows(recipe, bundled.tokenizer)
    w = calib[:1, :32]
    cached = score_blocks(bundled.model, w, ("mi",), use_cache=True)["mi"]
    reference = score_blocks(bundled.model, w, ("mi",), use_cache=False)["mi"]
    assert cached == reference
    assert len(cached) == 30
    assert cached[0] == max(cached)  # the first block matters most in SmolLM2


def test_one_fusion_round_exports_a_plain_29_block_model(bundled, recipe, tmp_path):
    before = perplexity(bundled.model, load_windows(recipe, bundled.tokenizer)[1])
    result = run(recipe, bundled)
    r = result.report
    assert r["num_layers_after"] == 29 and r["removed_blocks"] == [17]
    assert math.isfinite(r["result_ppl"]) and r["result_ppl"] < 2 * r["dense_ppl"]
    folder = export_model(result.model, result.tokenizer, tmp_path / "smol-29", r)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    _, evals = load_windows(recipe, bundled.tokenizer)
    assert perplexity(reloaded, evals) == pytest.approx(r["result_ppl"], rel=1e-4)
    assert perplexity(bundled.model, evals) == before  # the session's model is untouched
    text = generate(reloaded, result.tokenizer, "What is the capital of France?", max_new_tokens=8)
    assert isinstance(text, str) and text
