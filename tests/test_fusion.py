import pytest
import torch

from fusegpt_core.adapters import get_blocks, remove_blocks
from fusegpt_core.capture import PrefixStates, capture_block_inputs, run_blocks
from fusegpt_core.errors import PlanError
from fusegpt_core.evaluate import drop_blocks
from fusegpt_core.fused_linear import FusedLinear
from fusegpt_core.fusion import group_trainable, inject, plan_group
from fusegpt_core.testing import FAMILIES, tiny_model


def test_reference_window():
    assert plan_group(10, 30) == [6, 7, 8, 9, 11, 12, 13]  # [p-4 .. p+3]
    assert plan_group(0, 30) == [1, 2, 3, 4, 5, 6, 7]  # shifted inward, still 8 wide
    assert plan_group(29, 30) == [22, 23, 24, 25, 26, 27, 28]
    assert plan_group(2, 5) == [0, 1, 3, 4]  # a model smaller than the group: all other blocks
    assert plan_group(1, 6, group_size=3) == [0, 2]


@pytest.mark.parametrize("bad", [-1, 30])
def test_window_rejects_missing_block(bad):
    with pytest.raises(PlanError, match="does not exist"):
        plan_group(bad, 30)


def test_injection_rejects_bad_targets():
    model = tiny_model("llama", 4)
    with pytest.raises(PlanError, match="itself"):
        inject(model, 1, [1, 2], coef_rank=2, lora_rank=0)
    with pytest.raises(PlanError, match="outside"):
        inject(model, 1, [7], coef_rank=2, lora_rank=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_fused_group_equals_plain_removal(family, windows):
    """C and B start at zero: right after injection and deletion the model is 'block p dropped'."""
    model = tiny_model(family, num_layers=6)
    dropped = drop_blocks(model, [2])
    inject(model, 2, plan_group(2, 6, 4), coef_rank=4, lora_rank=2)
    remove_blocks(model, [2])
    assert any(isinstance(m, FusedLinear) for m in model.modules())
    w = windows[:2]
    with torch.no_grad():
        torch.testing.assert_close(model(w).logits, dropped(w).logits, rtol=0, atol=1e-5)


def test_a_fused_donor_is_built_once_for_all_its_targets():
    """A block that absorbed an earlier one gives away its effective weights: one tensor per linear,
    shared by every target (not one copy per target: 7 copies of a block in the reference window)."""
    model = tiny_model("llama", num_layers=6)
    inject(model, 2, [1, 3], coef_rank=2, lora_rank=0)  # block 1 and 3 become fused layers
    remove_blocks(model, [2])
    inject(model, 1, [0, 2, 3], coef_rank=2, lora_rank=0)  # the fused block 1 goes into three targets
    blocks = get_blocks(model)
    q = [blocks[t].self_attn.q_proj for t in (0, 2, 3)]
    last = [layer.num_absorbed - 1 for layer in q]
    ptrs = {getattr(layer, f"absorbed_weight_{k}").data_ptr() for layer, k in zip(q, last)}
    assert len(ptrs) == 1
    torch.testing.assert_close(
        getattr(q[0], f"absorbed_weight_{last[0]}"), blocks[1].self_attn.q_proj.effective_weight()
    )


def test_trainable_set_is_coefficients_lora_and_norms():
    model = tiny_model("llama", 6)
    inject(model, 3, [1, 2, 4], coef_rank=2, lora_rank=2)
    remove_blocks(model, [3])
    coefs, settled, others = group_trainable(model, [1, 2, 3])
    n_linears = 7 * 3
    assert len(coefs) == 2 * n_linears and settled == []  # C and D (Llama has no biases)
    assert len(others) == 2 * n_linears + 2 * 3  # LoRA A, B + two norms per block
    trainable = {id(p) for p in coefs + others}
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in trainable]
    assert frozen == []


def test_removal_renumbers_layers_and_generation_with_cache_works(tokenizer):
    model = tiny_model("qwen2", 6)  # qwen2 also carries per-layer `layer_types`
    remove_blocks(model, [1, 4])
    blocks = get_blocks(model)
    assert [b.self_attn.layer_idx for b in blocks] == [0, 1, 2, 3]
    assert model.config.num_hidden_layers == 4
    assert len(model.config.layer_types) == 4
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = model.generate(input_ids=ids, use_cache=True, **kw)
    without = model.generate(input_ids=ids, use_cache=False, **kw)
    assert torch.equal(with_cache, without)


def test_losses_agree_on_zero_and_token_mse_is_not_ruled_by_one_huge_token():
    from fusegpt_core.distill import LOSSES, kl_batch_loss, mse_loss, token_mse_loss

    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 16, 8, generator=g)
    for fn in LOSSES.values():
        assert fn(teacher, teacher).abs().item() < 1e-5
    noise = 0.1 * torch.randn(teacher.shape, generator=g)
    # an attention-sink-like first token, 1000 x larger than the rest, with the same relative error
    sink = teacher.clone()
    sink[:, 0] *= 1000
    noisy_sink = sink + noise * torch.where(torch.arange(16) == 0, 1000.0, 1.0)[None, :, None]
    assert token_mse_loss(noisy_sink, sink).item() == pytest.approx(token_mse_loss(teacher + noise, teacher).item())
    assert mse_loss(noisy_sink, sink).item() > 1000 * mse_loss(teacher + noise, teacher).item()
    # relative: scaling both sides changes nothing
    assert token_mse_loss(3 * (teacher + noise), 3 * teacher).item() == pytest.approx(
        token_mse_loss(teacher + noise, teacher).item()
    )
    assert kl_batch_loss(teacher + noise, teacher).item() > 0


def test_prefix_states_match_a_full_pass_and_forget_what_a_round_changed():
    model = tiny_model("llama", num_layers=8)
    windows = torch.randint(0, 200, (3, 16))
    inputs = capture_block_inputs(model, windows, batch_size=2)
    prefix = PrefixStates(inputs, stride=2)
    blocks = list(get_blocks(model))
    torch.testing.assert_close(prefix.at(blocks, 5, 2), run_blocks(blocks[:5], inputs.hidden, inputs.calls))
    assert sorted(prefix.saved) == [2, 4]  # boundaries passed on the way
    # a round changes block 3 (and removes it): states after block 3 are stale, the ones before stay
    with torch.no_grad():
        blocks[3].mlp.down_proj.weight.mul_(3.0)
    prefix.blocks_changed_from(3)
    assert sorted(prefix.saved) == [2]
    remove_blocks(model, [3])
    blocks = list(get_blocks(model))
    torch.testing.assert_close(prefix.at(blocks, 6, 2), run_blocks(blocks[:6], inputs.hidden, inputs.calls))
    # the memory cap: nothing is kept when one state set does not fit
    small = PrefixStates(inputs, stride=1, max_bytes=inputs.hidden.numel() * inputs.hidden.element_size() - 1)
    small.at(blocks, 4, 2)
    assert small.saved == {}
