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
