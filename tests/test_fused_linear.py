import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fusegpt_core.fused_linear import FusedLinear, fold_fused_linears


def _linear(conv1d: bool, seed: int, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    if conv1d:
        layer = Conv1D(12, 8)  # nf=out, nx=in; weight (in, out)
        layer.weight.data.normal_()
        layer.bias.data.normal_()
        return layer
    layer = nn.Linear(8, 12, bias=bias)
    if bias:
        layer.bias.data.normal_()
    return layer


@pytest.mark.parametrize("conv1d", [False, True])
def test_fresh_fusion_changes_nothing(conv1d):
    base, donor = _linear(conv1d, 0), _linear(conv1d, 1)
    x = torch.randn(3, 5, 8)
    expected = base(x)
    fused = FusedLinear(copy.deepcopy(base), lora_rank=4, conv1d=conv1d)
    fused.absorb(donor, coef_rank=4)
    assert torch.equal(fused.delta_weight(), torch.zeros_like(fused.delta_weight()))
    torch.testing.assert_close(fused(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("conv1d", [False, True])
def test_effective_weight_formula_and_merge(conv1d):
    base, donor, donor2 = _linear(conv1d, 0), _linear(conv1d, 1), _linear(conv1d, 2)
    fused = FusedLinear(copy.deepcopy(base), lora_rank=3, conv1d=conv1d)
    fused.absorb(donor, coef_rank=4)
    fused.absorb(donor2, coef_rank=2)
    new, settled, lora = fused.trainable_parameters()
    coefs = new + settled
    with torch.no_grad():
        for p in coefs + lora:
            p.add_(torch.randn_like(p) * 0.1)
    # W_eff = W + B A + sum_k (C_k D_k) * W_k, computed by hand
    w = base.weight + fused.lora_B @ fused.lora_A
    w = w + (fused.coef_C[0] @ fused.coef_D[0]) * donor.weight + (fused.coef_C[1] @ fused.coef_D[1]) * donor2.weight
    b = base.bias + fused.bias_coef[0] * donor.bias + fused.bias_coef[1] * donor2.bias
    torch.testing.assert_close(fused.effective_weight(), w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.effective_bias(), b, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 4, 8)
    before = fused(x)
    holder = nn.Sequential(fused)
    assert fold_fused_linears(holder) == 1
    assert type(holder[0]) is type(base)
    torch.testing.assert_close(holder[0](x), before, rtol=1e-5, atol=1e-5)


def test_absorbing_a_fused_layer_uses_its_effective_weight():
    inner = FusedLinear(_linear(False, 3), lora_rank=2)
    inner.absorb(_linear(False, 4), coef_rank=2)
    with torch.no_grad():
        inner.coef_C[0].normal_()
    outer = FusedLinear(_linear(False, 5), lora_rank=0)
    outer.absorb(inner, coef_rank=2)
    torch.testing.assert_close(outer.absorbed_weight_0, inner.effective_weight().detach())


def test_only_coefficients_and_lora_train():
    fused = FusedLinear(_linear(False, 0), lora_rank=2)
    fused.absorb(_linear(False, 1), coef_rank=2)
    new, settled, lora = fused.trainable_parameters()
    assert not fused.base_layer.weight.requires_grad
    assert len(new) == 3 and settled == [] and len(lora) == 2  # C, D, bias coefficient; LoRA A, B
    fused.settle()
    fused.absorb(_linear(False, 2), coef_rank=2)
    new, settled, lora = fused.trainable_parameters()
    assert len(new) == 3 and len(settled) == 3  # the first term's coefficients are settled now
    assert not any(p.requires_grad for p in fused.parameters())  # frozen until a round trains it
    names = {n for n, _ in fused.named_buffers()}
    assert "absorbed_weight_0" in names  # frozen, not a parameter
    assert "absorbed_weight_0" not in {n for n, _ in fused.named_parameters()}


def test_shape_mismatch_is_refused():
    fused = FusedLinear(nn.Linear(8, 12))
    with pytest.raises(ValueError):
        fused.absorb(nn.Linear(8, 10), coef_rank=2)


def test_frozen_forward_reuses_the_weight_and_notices_every_change(monkeypatch):
    fused = FusedLinear(_linear(False, 0), lora_rank=2)
    fused.absorb(_linear(False, 1), coef_rank=2)
    x = torch.randn(2, 3, 8)
    builds = []
    real = FusedLinear.effective_weight
    monkeypatch.setattr(FusedLinear, "effective_weight", lambda self: builds.append(1) or real(self))

    def fresh() -> torch.Tensor:  # the layer's output computed from scratch
        return nn.functional.linear(x, real(fused), fused.effective_bias())

    fused(x), fused(x)
    assert len(builds) == 1  # frozen: built once, reused
    with torch.no_grad():
        fused.coef_C[0].normal_()  # an in-place change (as an optimiser step makes)
    torch.testing.assert_close(fused(x), fresh())
    fused.absorb(_linear(False, 2), coef_rank=2)  # a new term
    with torch.no_grad():
        fused.coef_C[1].normal_()
    torch.testing.assert_close(fused(x), fresh())
    fused.load_state_dict({k: v + 0.5 for k, v in fused.state_dict().items()})
    torch.testing.assert_close(fused(x), fresh())

    # training: gradients reach the coefficients; after the step the frozen output follows
    new, _, lora = fused.trainable_parameters()
    for p in new + lora:
        p.requires_grad_(True)
    fused(x).pow(2).sum().backward()
    assert fused.coef_D[1].grad is not None and fused.coef_D[1].grad.abs().sum() > 0
    torch.optim.SGD(new + lora, lr=0.1).step()
    for p in new + lora:
        p.requires_grad_(False)
    torch.testing.assert_close(fused(x), fresh())


@torch.no_grad()
def _perturb_all_but_the_base(fused: FusedLinear) -> None:
    """Move every coefficient and LoRA matrix off its start (C and B start at zero: no gradient test)."""
    for p in fused.parameters():
        if p is not fused.base_layer.weight:
            p.add_(torch.randn_like(p) * 0.1)


def test_training_with_frozen_earlier_terms_folds_them_once_and_matches_the_plain_formula():
    fused = FusedLinear(_linear(False, 0), lora_rank=2)
    fused.absorb(_linear(False, 1), coef_rank=2)
    fused.settle()
    fused.absorb(_linear(False, 2), coef_rank=2)
    _perturb_all_but_the_base(fused)
    new, settled, lora = fused.trainable_parameters()
    for p in new + lora:  # this round trains the new term and the LoRA; the first term stays frozen
        p.requires_grad_(True)
    x = torch.randn(2, 3, 8)

    def plain_step() -> tuple[torch.Tensor, list[torch.Tensor]]:  # W_eff rebuilt from scratch
        out = nn.functional.linear(x, fused.effective_weight(), fused.effective_bias())
        grads = torch.autograd.grad(out.pow(2).sum(), new + lora)
        return out.detach(), list(grads)

    for _ in range(2):
        out = fused(x)
        grads = torch.autograd.grad(out.pow(2).sum(), new + lora)
        expected, expected_grads = plain_step()
        torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-5)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        folded = fused._frozen_cache[1]
        with torch.no_grad():  # an optimiser step on what trains: the frozen part is kept
            for p, g in zip(new + lora, grads):
                p.sub_(0.01 * g)
        fused(x)
        assert fused._frozen_cache[1] is folded
    assert all(not p.requires_grad for p in settled)
    with torch.no_grad():
        fused.coef_D[0].normal_()  # the frozen term changes after all: noticed
    expected, _ = plain_step()
    torch.testing.assert_close(fused(x).detach(), expected, rtol=1e-5, atol=1e-5)


def _plain_forward(fused: FusedLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer computed straight from the formula, every tensor on autograd's tape."""
    base = fused.base_layer.weight.float()
    weight = base.clone()
    if fused.lora_rank:
        weight = weight + fused.lora_B @ fused.lora_A
    for k in range(fused.num_absorbed):
        weight = weight + (fused.coef_C[k] @ fused.coef_D[k]) * getattr(fused, f"absorbed_weight_{k}").float()
    out = x.float() @ weight if fused.conv1d else nn.functional.linear(x.float(), weight)
    bias = fused.effective_bias()
    return out if bias is None else out + bias.float()


@pytest.mark.parametrize("conv1d", [False, True])
def test_gradients_match_the_plain_formula(conv1d):
    fused = FusedLinear(_linear(conv1d, 0), lora_rank=3, conv1d=conv1d)
    fused.absorb(_linear(conv1d, 1), coef_rank=2)
    fused.absorb(_linear(conv1d, 2), coef_rank=4)
    _perturb_all_but_the_base(fused)
    new, _, lora = fused.trainable_parameters()
    for p in new + lora:
        p.requires_grad_(True)
    x = torch.randn(2, 5, 8, requires_grad=True)
    target = torch.randn(2, 5, 12)
    loss = (fused(x) - target).pow(2).sum()
    grads = torch.autograd.grad(loss, [x, *new, *lora])
    plain = torch.autograd.grad((_plain_forward(fused, x) - target).pow(2).sum(), [x, *new, *lora])
    for g, e in zip(grads, plain):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_backward_keeps_no_tensor_as_large_as_the_weight():
    """What autograd saves between forward and backward: x and the small trainable matrices, not
    W_eff nor an fp32 copy of each absorbed weight (0.8 GB per term in a 7B block)."""
    fused = FusedLinear(nn.Linear(64, 96).to(torch.bfloat16), lora_rank=4)
    for seed in (1, 2):
        torch.manual_seed(seed)
        fused.absorb(nn.Linear(64, 96).to(torch.bfloat16), coef_rank=4)
    new, _, lora = fused.trainable_parameters()
    for p in new + lora:
        p.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(1, 2, 64, dtype=torch.bfloat16)  # fewer tokens than rows: x is small too
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fused(x)
    weight_size = fused.base_layer.weight.numel()
    assert saved and max(saved) < weight_size / 4, saved
    out.float().pow(2).sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in fused.coef_C)  # D's are 0: C starts at 0


def test_without_keeping_the_fold_the_same_sums_give_the_same_bits():
    """keep_fold off (offloaded blocks): nothing kept between calls, outputs bit for bit the kept ones."""
    layers = []
    for keep in (True, False):
        torch.manual_seed(0)
        fused = FusedLinear(_linear(False, 0), lora_rank=2, keep_fold=keep)
        fused.absorb(_linear(False, 1), coef_rank=2)
        fused.settle()
        fused.absorb(_linear(False, 2), coef_rank=2)
        _perturb_all_but_the_base(fused)
        new, _, lora = fused.trainable_parameters()
        for p in new + lora:  # the settled term stays frozen: the kept fold covers it
            p.requires_grad_(True)
        layers.append(fused)
    x = torch.randn(2, 3, 8)
    kept, fresh = (layer(x) for layer in layers)
    assert torch.equal(kept, fresh)
    assert layers[0]._frozen_cache is not None and layers[1]._frozen_cache is None
