"""Group-level fine-tuning: the student group (without the removed block) learns to reproduce the
teacher group's output on the group's own input (local distillation)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .capture import BlockCalls, run_block
from .errors import Cancelled, PlanError, TrainingDiverged

# Every loss takes student and teacher hidden states (batch, seq, hidden) and returns a scalar.


def kl_batch_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The reference loss: KL(teacher || student) with the softmax over the BATCH dimension (dim 0),
    per (token, channel) position, 'batchmean' reduction. Depends on the batch size, and is 0 for a
    batch of one window (see min_batch)."""
    return F.kl_div(
        F.log_softmax(student.float(), dim=0),
        F.log_softmax(teacher.float(), dim=0),
        log_target=True,
        reduction="batchmean",
    )


def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student.float(), teacher.float())


def token_mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared error of each token relative to the teacher token's own squared norm, averaged over
    tokens. Plain MSE is ruled by the attention-sink token: after SmolLM2's block 11 the first token
    of a window has 10^4 x the others' mean square, over 98% of the MSE (benchmarks/sink_share.py)."""
    s, t = student.float(), teacher.float()
    return ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-6)).mean()  # per-token ratios (batch, seq)


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1).mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "kl": kl_batch_loss,
    "mse": mse_loss,
    "token_mse": token_mse_loss,
    "cosine": cosine_loss,
}


def min_batch(loss: str) -> int:
    """Fewest windows a batch of `loss` needs: the KL's softmax over a batch of one window is 1, so
    its loss (and gradient) would be exactly zero."""
    return 2 if loss == "kl" else 1


def batch_bounds(n: int, batch_size: int, smallest: int = 1) -> list[tuple[int, int]]:
    """(start, stop) of consecutive batches over n windows. A last batch under `smallest` windows
    joins the batch before it (one batch of batch_size + 1 windows) instead of being a step alone."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < smallest:
        (start, _), (_, stop) = bounds[-2], bounds.pop()
        bounds[-1] = (start, stop)
    return bounds


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `total`: a fresh Adam takes
    full-size steps at once, which knocked trained LoRA/coefficient products off course in later rounds."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * s / max(total, 1)))
    )


def check_divergence(value: torch.Tensor, step: int, warmup_losses: list[float] | None, factor: float) -> None:
    """Raise TrainingDiverged when the loss is NaN/inf, or exceeds `factor` x the worst batch of the
    warm-up (`warmup_losses`, None while still warming up). The warm-up's worst batch is the reference
    because the model had barely moved then, and batches differ a lot in difficulty (the first batch
    alone is no reference); the warm-up fits in the first epoch, so one-epoch rounds are guarded too."""
    if not torch.isfinite(value):
        raise TrainingDiverged(f"the fine-tuning loss became {value.item()} at step {step + 1}")
    if warmup_losses:
        reference = max(warmup_losses)
        if reference > 0 and value.item() > factor * reference:
            raise TrainingDiverged(
                f"the fine-tuning loss exploded to {value.item():.4g} "
                f"({value.item() / reference:.1f}x the warm-up's worst batch) at step {step + 1}"
            )


class MasterCopies:
    """fp32 master copies of the trainable tensors that are not fp32 (a bf16 model's norm weights):
    Adam steps on the master, and the model's own tensor gets the master's rounded value after each
    step. Stepping a bf16 weight directly loses every update below its resolution (near 1.0 bf16
    resolves 2^-8; at the paper's lr of 9.65e-6 the norms would never move)."""

    def __init__(self, params: list[nn.Parameter]):
        self.masters = {id(p): (p, p.detach().float().clone()) for p in params if p.dtype != torch.float32}
        self.trained = [self.masters[id(p)][1] if id(p) in self.masters else p for p in params]

    def of(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """What the optimizer steps for `params`: the master where there is one, else the tensor itself."""
        return [self.masters[id(p)][1] if id(p) in self.masters else p for p in params]

    def take_grads(self) -> None:
        for p, master in self.masters.values():
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def write_back(self) -> None:
        for p, master in self.masters.values():
            p.copy_(master)


@dataclass
class DistillResult:
    losses: list[float] = field(default_factory=list)
    """Training loss of every optimiser step."""
    steps: int = 0


def finetune(
    blocks: list[nn.Module],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    calls: BlockCalls,
    coef_params: list[nn.Parameter],
    other_params: list[nn.Parameter],
    *,
    settled_params: list[nn.Parameter] | None = None,
    lr_settled: float | None = None,
    epochs: int,
    batch_size: int,
    lr_coef: float,
    lr_other: float,
    loss: str = "mse",
    betas: tuple[float, float] = (0.9, 0.95),
    grad_clip: float = 1.0,
    divergence_factor: float = 10.0,
    checkpoint: bool = False,
    seed: int = 0,
    on_step: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DistillResult:
    """Train the student `blocks` so that running them on `inputs` gives `targets`.

    inputs, targets: (n_windows, seq_len, hidden). A fresh Adam with two learning rates and a
    cosine decay over all steps of this round, as in the paper, after a linear warm-up (one epoch,
    at most a quarter of the steps). Raises TrainingDiverged when the loss is NaN/inf or, after
    the warm-up, grows past `divergence_factor` x the warm-up's worst batch; Cancelled on stop.
    `checkpoint`: keep only each block's input for backward and run the block again there (per-block
    gradient checkpointing: the activations of one block instead of the group's, for one more
    forward per step; the numbers are the same).
    """
    loss_fn = LOSSES[loss]
    settled_params = settled_params or []
    params = coef_params + other_params + settled_params
    masters = MasterCopies(params)
    groups = [{"params": masters.of(coef_params), "lr": lr_coef}]
    if other_params:
        groups.append({"params": masters.of(other_params), "lr": lr_other})
    if settled_params:
        groups.append({"params": masters.of(settled_params), "lr": lr_settled if lr_settled is not None else lr_other})
    optimizer = torch.optim.Adam(groups, betas=betas, foreach=True)
    n = inputs.shape[0]
    if n < min_batch(loss):
        raise PlanError(f"the '{loss}' loss needs at least {min_batch(loss)} calibration windows, got {n}.")
    bounds = batch_bounds(n, batch_size, min_batch(loss))
    total = epochs * len(bounds)
    warmup = max(1, min(len(bounds), total // 4))
    scheduler = warmup_cosine(optimizer, warmup, total)
    generator = torch.Generator().manual_seed(seed)
    result = DistillResult()
    # blocks stay in eval mode: no dropout, so the student sees what the teacher saw
    try:
        step = 0
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start, stop in bounds:
                if should_stop is not None and should_stop():
                    raise Cancelled("stopped by the user during group fine-tuning")
                idx = order[start:stop]
                h = calls.placement.fetch(inputs[idx])  # (batch, seq, hidden) from the host
                for block in blocks:
                    if checkpoint:
                        h = torch.utils.checkpoint.checkpoint(run_block, block, h, calls, use_reentrant=False)
                    else:
                        h = run_block(block, h, calls)
                value = loss_fn(h, calls.placement.fetch(targets[idx]))
                check_divergence(value, step, result.losses[:warmup] if step >= warmup else None, divergence_factor)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                masters.take_grads()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(masters.trained, grad_clip)
                optimizer.step()
                masters.write_back()
                scheduler.step()
                step += 1
                result.losses.append(value.item())
                result.steps = step
                if on_step is not None:
                    on_step(step, total, value.item())
    finally:
        for p in params:
            p.grad = None
            p.requires_grad_(False)
    return result


@torch.no_grad()
def group_loss(
    blocks: list[nn.Module],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    calls: BlockCalls,
    loss: str,
    batch_size: int,
) -> float:
    """Mean loss of `blocks` on all windows, without training (for before/after figures)."""
    loss_fn = LOSSES[loss]
    total, count = 0.0, 0
    for start, stop in batch_bounds(inputs.shape[0], batch_size, min_batch(loss)):
        h = calls.placement.fetch(inputs[start:stop])  # (batch, seq, hidden)
        for block in blocks:
            h = run_block(block, h, calls)
        total += loss_fn(h, calls.placement.fetch(targets[start:stop])).item() * h.shape[0]
        count += h.shape[0]
    return total / max(count, 1)
