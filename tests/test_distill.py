"""Local distillation: batching, the KL-over-the-batch loss, divergence guards."""

import pytest
import torch

from fusegpt_core.adapters import get_blocks
from fusegpt_core.capture import capture_block_inputs, run_blocks
from fusegpt_core.config import preset
from fusegpt_core.distill import batch_bounds, finetune, kl_batch_loss
from fusegpt_core.errors import PlanError
from fusegpt_core.fusion import group_trainable, inject
from fusegpt_core.testing import tiny_model


@pytest.mark.parametrize(
    "n, batch, smallest, expected",
    [
        (8, 4, 1, [(0, 4), (4, 8)]),
        (5, 2, 1, [(0, 2), (2, 4), (4, 5)]),
        (5, 2, 2, [(0, 2), (2, 5)]),  # a last batch of one window joins the one before
        (9, 4, 2, [(0, 4), (4, 9)]),
        (3, 8, 2, [(0, 3)]),
    ],
)
def test_batch_bounds(n, batch, smallest, expected):
    assert batch_bounds(n, batch, smallest) == expected


def test_kl_over_a_batch_of_one_window_is_zero():
    a, b = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    assert kl_batch_loss(a, b).item() == 0.0
    assert kl_batch_loss(torch.randn(2, 4, 8), torch.randn(2, 4, 8)).item() > 0


def test_kl_fine_tuning_never_takes_a_step_on_one_window(windows):
    model = tiny_model("llama", 4)
    inputs = capture_block_inputs(model, windows[:5])
    blocks = list(get_blocks(model))
    teacher = run_blocks(blocks, inputs.hidden, inputs.calls)
    inject(model, 1, [0, 2, 3], coef_rank=4, lora_rank=2, generator=torch.Generator().manual_seed(0))
    student = [b for i, b in enumerate(get_blocks(model)) if i != 1]
    coefs, settled, others = group_trainable(model, [0, 2, 3])
    result = finetune(
        student,
        inputs.hidden,
        teacher,
        inputs.calls,
        coefs,
        others,
        epochs=2,
        batch_size=2,
        lr_coef=1e-3,
        lr_other=1e-4,
        loss="kl",
    )
    assert result.steps == 4  # 5 windows at batch 2: batches of 2 and 3, twice
    assert all(loss > 0 for loss in result.losses)


def test_kl_needs_two_windows_per_batch():
    with pytest.raises(PlanError, match="batch_size"):
        preset("tiny", **{"distill.loss": "kl", "distill.batch_size": 1}).validate()
    with pytest.raises(PlanError, match="n_calib"):
        preset("tiny", **{"distill.loss": "kl", "data.n_calib": 1}).validate()
    preset("tiny", **{"distill.loss": "mse", "distill.batch_size": 1}).validate()


def _norm_change(dtype, windows, lr):
    """How far one FuseGPT round moves the group's norm weights, for a tiny model held in `dtype`."""
    from fusegpt_core.adapters import block_norms

    model = tiny_model("llama", 4).to(dtype)
    inputs = capture_block_inputs(model, windows[:8])
    blocks = list(get_blocks(model))
    teacher = run_blocks(blocks, inputs.hidden, inputs.calls)
    inject(model, 1, [0, 2, 3], coef_rank=4, lora_rank=2, generator=torch.Generator().manual_seed(0))
    student = [b for i, b in enumerate(get_blocks(model)) if i != 1]
    before = [p.detach().float().clone() for b in student for n in block_norms(model, b) for p in n.parameters()]
    coefs, _, others = group_trainable(model, [0, 2, 3])
    finetune(student, inputs.hidden, teacher, inputs.calls, coefs, others, epochs=12, batch_size=2, lr_coef=1e-3,
             lr_other=lr, loss="mse", grad_clip=0)  # fmt: skip
    after = [p.detach().float() for b in student for n in block_norms(model, b) for p in n.parameters()]
    assert all(p.dtype == dtype for b in student for n in block_norms(model, b) for p in n.parameters())
    return torch.cat([(a - b).flatten() for a, b in zip(after, before)])


def test_bf16_norms_train_on_fp32_master_copies(windows):
    """bf16 resolves 2^-8 near 1.0: Adam steps of 1e-3 applied to bf16 norm weights would round away.
    With fp32 masters the bf16 norms end where the fp32 run's do, to bf16's rounding."""
    lr = 1e-3  # 48 steps: an fp32 norm weight moves up to about 0.02, each step below bf16 half a step
    fp32 = _norm_change(torch.float32, windows, lr)
    bf16 = _norm_change(torch.bfloat16, windows, lr)
    assert fp32.abs().max() > 4 * 2**-8  # the fp32 norms moved by several bf16 steps
    assert (bf16 - fp32).abs().max() <= 2 * 2**-8 + 0.25 * fp32.abs().max()
    assert (bf16 != 0).float().mean() > 0.5  # most bf16 norm weights moved


def _train_group(windows, checkpoint: bool) -> tuple[list[float], list[torch.Tensor]]:
    model = tiny_model("llama", 4)
    inputs = capture_block_inputs(model, windows[:4])
    teacher = run_blocks(list(get_blocks(model)), inputs.hidden, inputs.calls)
    inject(model, 1, [0, 2, 3], coef_rank=4, lora_rank=2, generator=torch.Generator().manual_seed(0))
    student = [b for i, b in enumerate(get_blocks(model)) if i != 1]
    coefs, _, others = group_trainable(model, [0, 2, 3])
    result = finetune(
        student, inputs.hidden, teacher, inputs.calls, coefs, others,
        epochs=2, batch_size=2, lr_coef=1e-2, lr_other=1e-3, loss="mse", checkpoint=checkpoint,
    )  # fmt: skip
    return result.losses, [p.detach().clone() for p in coefs + others]


def test_gradient_checkpointing_trains_exactly_the_same(windows):
    losses, params = _train_group(windows, checkpoint=False)
    losses_ckpt, params_ckpt = _train_group(windows, checkpoint=True)
    assert losses == losses_ckpt and len(losses) == 4
    assert any((p != 0).any() for p in params[: len(params) // 2])
    for a, b in zip(params, params_ckpt):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
