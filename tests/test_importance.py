import math

import pytest
import torch
import torch.nn.functional as F

from fusegpt_core.adapters import get_blocks, get_final_norm
from fusegpt_core.capture import capture_block_inputs, run_block
from fusegpt_core.evaluate import drop_blocks, perplexity
from fusegpt_core.importance import METRICS, block_forward_count, lowest, rank_agreement, score_blocks
from fusegpt_core.testing import FAMILIES, tiny_model


def _final_hidden(model, windows):
    """Output of the last block (before the final norm), via the model's own forward."""
    store = {}
    handle = get_final_norm(model).register_forward_pre_hook(lambda m, args: store.setdefault("h", args[0]))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    handle.remove()
    return store["h"]


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_mi_equals_reference_and_definition(family, windows):
    model = tiny_model(family, num_layers=5)
    w = windows[:4]
    cached = score_blocks(model, w, metrics=("mi",), use_cache=True, batch_size=2)["mi"]
    reference = score_blocks(model, w, metrics=("mi",), use_cache=False, batch_size=2)["mi"]
    assert cached == reference  # same operations on the same inputs: bit-identical
    # MI_i = 1 - mean cos(h_L, h_L without block i), computed through whole-model forwards
    dense = _final_hidden(model, w)
    for i in range(5):
        skipped = _final_hidden(drop_blocks(model, [i]), w)
        expected = 1 - F.cosine_similarity(dense, skipped, dim=-1).mean().item()
        assert cached[i] == pytest.approx(expected, abs=1e-5)


def test_ppl_metric_matches_dropping_the_block(windows):
    model = tiny_model("llama", num_layers=4)
    w = windows[:4]
    scores = score_blocks(model, w, metrics=("ppl",), batch_size=4)["ppl"]
    dense = perplexity(model, w)
    for i in range(4):
        assert scores[i] == pytest.approx(perplexity(drop_blocks(model, [i]), w) - dense, rel=1e-4, abs=1e-3)


def test_local_metrics(windows):
    model = tiny_model("llama", num_layers=4)
    w = windows[:2]
    scores = score_blocks(model, w, metrics=("bi", "angular"))
    assert set(scores) == {"bi", "angular"}
    # both from each block's own input and output: BI = 1 - mean cos, angular = mean arccos(cos) / pi (per
    # token; the means of a cosine and of its arccos need not rank blocks alike, so each is checked directly)
    inputs = capture_block_inputs(model, w)
    h = inputs.hidden
    for i, block in enumerate(get_blocks(model)):
        out = run_block(block, h, inputs.calls)
        cos = F.cosine_similarity(h, out, dim=-1)  # (n, seq)
        assert scores["bi"][i] == pytest.approx(1 - cos.mean().item(), abs=1e-6)
        assert scores["angular"][i] == pytest.approx((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item(), abs=1e-6)
        h = out
    assert all(0 <= a <= 1 for a in scores["angular"])


def test_forward_counts_are_about_half():
    assert block_forward_count(30, True) == 30 + 30 * 29 // 2
    assert block_forward_count(30, False) == 900
    assert block_forward_count(30, True) / block_forward_count(30, False) < 0.52


def test_rank_agreement_and_lowest():
    table = rank_agreement({"mi": [0.1, 0.5, 0.3], "bi": [0.2, 0.9, 0.4], "angular": [0.9, 0.1, 0.5]})
    assert table.loc["Macro Influence", "Block Influence"] == pytest.approx(1.0)
    assert table.loc["Macro Influence", "Angular distance"] == pytest.approx(-1.0)
    assert lowest([0.3, 0.1, 0.2]) == 1
    assert lowest([0.3, 0.1, 0.2], exclude={1}) == 2


def test_unknown_metric():
    with pytest.raises(ValueError):
        score_blocks(tiny_model("llama", 2), torch.zeros(1, 8, dtype=torch.long), metrics=("nope",))
    assert set(METRICS) == {"mi", "bi", "angular", "ppl"}


def test_blocks_untouched_by_scoring(windows):
    model = tiny_model("llama", num_layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    score_blocks(model, windows[:2], metrics=tuple(METRICS))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(get_blocks(model)) == 3
