"""capture.py records every block's whole call: MI from captured calls equals MI from whole-model
forwards with one block skipped, for every family, under eager and sdpa attention."""

import pytest
import torch

from fusegpt_core.adapters import get_blocks
from fusegpt_core.capture import BlockCall, _same_call, attention_kind, capture_block_inputs, run_blocks
from fusegpt_core.importance import score_blocks
from fusegpt_core.testing import FAMILIES, reference_mi, tiny_model

NO_SDPA = {"gemma2"}  # transformers refuses sdpa for Gemma-2 (attention logit soft-capping)
CASES = [(f, impl, None) for f in FAMILIES for impl in ("eager", "sdpa") if not (impl == "sdpa" and f in NO_SDPA)]
# sliding windows shorter than the 64-token windows: Mistral one window for all blocks, Qwen2 alternating kinds
CASES += [("mistral", impl, 16) for impl in ("eager", "sdpa")] + [("qwen2", impl, 16) for impl in ("eager", "sdpa")]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 259, (4, 64), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family, impl, window", CASES)
def test_mi_matches_whole_model_forwards_with_a_block_skipped(family, impl, window, ids):
    model = tiny_model(family, 4, attn_implementation=impl, sliding_window=window)
    assert model.config._attn_implementation == impl
    reference = reference_mi(model, ids)
    for use_cache in (True, False):
        scores = score_blocks(model, ids, ("mi",), use_cache=use_cache, batch_size=2)["mi"]
        assert scores == pytest.approx(reference, abs=1e-6)
    assert max(reference) > 1e-3  # the blocks do something, so a wrong mask would show


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_alternating_blocks_get_their_own_mask(family, ids):
    model = tiny_model(family, 4, attn_implementation="eager", sliding_window=16)
    inputs = capture_block_inputs(model, ids)
    kinds = [attention_kind(b) for b in get_blocks(model)]
    assert kinds == ["sliding_attention", "full_attention"] * 2
    masks = {k: c.kwargs["attention_mask"] for k, c in inputs.calls.by_kind.items()}
    assert masks.keys() == {"sliding_attention", "full_attention"}
    assert not torch.equal(masks["sliding_attention"], masks["full_attention"])
    # after removing a block, the calls follow the blocks (not their positions)
    from fusegpt_core.adapters import remove_blocks

    remove_blocks(model, [0])
    blocks = list(get_blocks(model))
    assert [attention_kind(b) for b in blocks] == ["full_attention", "sliding_attention", "full_attention"]
    captured = run_blocks(blocks, inputs.hidden, inputs.calls, batch_size=2)
    store = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, a: store.setdefault("h", a[0]))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    torch.testing.assert_close(captured, store["h"])


def test_gpt2_mask_is_captured_although_passed_positionally(ids):
    model = tiny_model("gpt2", 2, attn_implementation="eager")
    inputs = capture_block_inputs(model, ids)
    call = inputs.calls.for_block(get_blocks(model)[0])
    masks = [a for a in call.args if isinstance(a, torch.Tensor)]
    assert masks and masks[0].shape[-2:] == (64, 64)  # (1, 1, seq, seq) broadcasts to any batch


def test_calls_compare_by_value():
    a = torch.ones(2)
    assert _same_call(BlockCall((a,), {"x": 1}), BlockCall((a.clone(),), {"x": 1}))
    assert not _same_call(BlockCall((a,), {"x": 1}), BlockCall((a * 2,), {"x": 1}))
    assert not _same_call(BlockCall((a,), {"x": 1}), BlockCall((a,), {"x": 2}))
    assert not _same_call(BlockCall((a,), {}), BlockCall((None,), {}))


def test_calibration_states_live_on_the_host_and_go_to_the_device_one_batch_at_a_time(ids):
    """On this CPU-only machine the host and the device are both the CPU; the placement still
    records every move, so each stage's traffic is known: all states stored once on the host,
    one fetch per batch, nothing kept on the device."""
    from fusegpt_core.distill import finetune
    from fusegpt_core.fusion import group_trainable, inject

    model = tiny_model("llama", 4)
    inputs = capture_block_inputs(model, ids, batch_size=2)
    placement = inputs.calls.placement
    state_bytes = inputs.hidden.numel() * inputs.hidden.element_size()
    assert inputs.hidden.device == placement.host and placement.device == next(model.parameters()).device
    assert placement.moved == {"to host": state_bytes}  # captured batch by batch straight into host states

    placement.moved.clear()
    blocks = list(get_blocks(model))
    teacher = run_blocks(blocks, inputs.hidden, inputs.calls, batch_size=2)
    assert teacher.device == placement.host
    assert placement.moved == {"to device": state_bytes, "to host": state_bytes}

    placement.moved.clear()
    inject(model, 1, [0, 2, 3], coef_rank=4, lora_rank=2, generator=torch.Generator().manual_seed(0))
    student = [b for i, b in enumerate(get_blocks(model)) if i != 1]
    coefs, _, others = group_trainable(model, [0, 2, 3])
    finetune(student, inputs.hidden, teacher, inputs.calls, coefs, others, epochs=3, batch_size=2,
             lr_coef=1e-3, lr_other=1e-4)  # fmt: skip
    assert placement.moved == {"to device": 3 * 2 * state_bytes}  # inputs and teacher, every epoch; nothing back
