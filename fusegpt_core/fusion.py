"""Group planning, weight injection and one fusion round (inject, train, settle).

All indices here are CURRENT block indices (positions in the model as it is now); the pipeline
maps them to and from the original model's indices (selection.BlockIndex).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import baselines
from .adapters import (
    block_linears,
    block_norms,
    fork_module,
    get_adapter,
    get_blocks,
    get_module,
    own_parameters,
    remove_blocks,
    set_blocks,
    set_module,
)
from .capture import BlockCalls
from .distill import finetune, group_loss
from .errors import Cancelled, PlanError, TrainingDiverged
from .fused_linear import FusedLinear, donor_weights

LOSS_PROBE_WINDOWS = 8  # calibration windows for a round's loss before/after figures


def plan_group(removed: int, num_blocks: int, group_size: int = 8) -> list[int]:
    """Target blocks for `removed`: a window of `group_size` consecutive blocks including it,
    placed [p - size//2, p + size - size//2 - 1] and shifted inward at the edges so it stays full
    width (the reference: 8 wide, [p-4 .. p+3]). Returns the window without `removed`."""
    if not 0 <= removed < num_blocks:
        raise PlanError(f"block {removed} does not exist: the model has blocks 0 to {num_blocks - 1}.")
    if num_blocks < 2:
        raise PlanError("the model has a single block: there is nothing to fuse it into.")
    size = min(group_size, num_blocks)
    start = min(max(removed - size // 2, 0), num_blocks - size)
    return [i for i in range(start, start + size) if i != removed]


def group_span(removed: int, targets: list[int]) -> tuple[int, int]:
    """First and last block (inclusive) that the group's fine-tuning runs through."""
    members = [removed, *targets]
    return min(members), max(members)


def check_targets(removed: int, targets: list[int], num_blocks: int) -> None:
    if not targets:
        raise PlanError(f"block {removed} needs at least one target block to fuse into.")
    for t in targets:
        if t == removed:
            raise PlanError(f"block {removed} cannot be fused into itself.")
        if not 0 <= t < num_blocks:
            raise PlanError(f"target block {t} is outside the model (0 to {num_blocks - 1}).")


@torch.no_grad()
def inject(
    model: nn.Module,
    removed: int,
    targets: list[int],
    coef_rank: int,
    lora_rank: int,
    fuse_bias: bool = True,
    generator: torch.Generator | None = None,
    keep_fold: bool = True,
) -> list[FusedLinear]:
    """Absorb every linear of block `removed` into the same linear of each target block.

    Targets' linears become FusedLinear (if not already); returns the fused layers touched.
    The removed block itself is NOT deleted here. Because the new coefficients start at zero, the
    model computes exactly what it did before (the removed block still runs until deleted).
    """
    check_targets(removed, targets, len(get_blocks(model)))
    adapter = get_adapter(model)
    blocks = get_blocks(model)
    # the removed block's weights, built once (its effective ones if it was itself a target before)
    donor = {name: donor_weights(layer) for name, layer in block_linears(model, blocks[removed]).items()}
    touched = []
    for t in targets:
        block = blocks[t]
        for name in adapter.linears:
            layer = get_module(block, name)
            if not isinstance(layer, FusedLinear):
                layer = FusedLinear(
                    layer, lora_rank=lora_rank, conv1d=adapter.conv1d, generator=generator, keep_fold=keep_fold
                )
                set_module(block, name, layer)
            weight, bias = donor[name]
            layer.absorb_weights(weight, bias, coef_rank=coef_rank, fuse_bias=fuse_bias, generator=generator)
            touched.append(layer)
    return touched


def group_trainable(
    model: nn.Module, targets: list[int], train_settled: bool = True
) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """(new coefficients, coefficients settled by earlier rounds, LoRA + norm weights) of the
    target blocks, all set to require grad.

    Coefficients from earlier rounds train again, as in the paper; they are returned apart so
    they can get a gentler learning rate: they start from trained values, and a fresh Adam's
    first full-size steps on a trained C D product can undo it. With `train_settled` False they
    stay frozen and the settled list is empty."""
    blocks = get_blocks(model)
    new: list[nn.Parameter] = []
    settled: list[nn.Parameter] = []
    others: list[nn.Parameter] = []
    for t in targets:
        for layer in block_linears(model, blocks[t]).values():
            if isinstance(layer, FusedLinear):
                n, s, lora = layer.trainable_parameters()
                new += n
                settled += s if train_settled else []
                others += lora
        for norm in block_norms(model, blocks[t]):
            others += [p for p in norm.parameters()]
    for p in new + settled + others:
        p.requires_grad_(True)
    return new, settled, others


def settle_group(model: nn.Module, targets: list[int]) -> None:
    blocks = get_blocks(model)
    for t in targets:
        for layer in block_linears(model, blocks[t]).values():
            if isinstance(layer, FusedLinear):
                layer.settle()


# ---- one round ---------------------------------------------------------------------------------


@dataclass
class RoundResult:
    loss_before: float
    """Group loss on the probe windows right after surgery (= plain removal, the new terms are zero)."""
    loss_after: float
    """The same after fine-tuning."""
    losses: list[float] = field(default_factory=list)
    """Training loss of every optimiser step."""
    absorbed: dict[int, dict[str, float]] = field(default_factory=dict)
    """Target block (current index, after the removal) -> linear -> share of the removed block it
    carries, ||(C D) * W_removed|| / ||W_own|| (drop+lora: the LoRA's ||B A|| / ||W_own||)."""


class _GroupFork:
    """A round works on forks of its group's blocks (new module objects sharing the frozen weights,
    with their own copies of what trains: norms, coefficients, LoRA), so the blocks before the round
    stay as they were: the input model's, or an earlier round's. Rolling back puts them back; the
    only memory this costs is the copies of the trainable tensors."""

    def __init__(self, model: nn.Module, lo: int, hi: int):
        self.blocks = list(get_blocks(model))
        self.layer_types = copy.copy(getattr(model.config, "layer_types", None))
        group = [fork_module(b) for b in self.blocks[lo : hi + 1]]
        for block in group:
            own_trainables(model, block)
        for block in self.blocks[lo : hi + 1]:  # kept for a rollback only: their folded weights can go
            for layer in block.modules():
                if isinstance(layer, FusedLinear):
                    layer._frozen_cache = None
        forked = self.blocks[:lo] + group + self.blocks[hi + 1 :]
        set_blocks(model, forked, list(range(len(forked))))

    def restore(self, model: nn.Module) -> None:
        if self.layer_types is not None:
            model.config.layer_types = self.layer_types
        set_blocks(model, self.blocks, list(range(len(self.blocks))))


def own_trainables(model: nn.Module, block: nn.Module) -> None:
    """Copies of the block's norms and of its fused layers' coefficients and LoRA, so that training
    them leaves the tensors it shares with other models alone (frozen weights stay shared)."""
    for norm in block_norms(model, block):
        own_parameters(norm)
    for layer in block_linears(model, block).values():
        if isinstance(layer, FusedLinear):
            for name, child in layer.named_children():
                if name != "base_layer":
                    own_parameters(child)
            for name, p in list(layer._parameters.items()):  # lora_A, lora_B
                if p is not None:
                    layer._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)


def fuse_round(
    model: nn.Module,
    p: int,
    targets: list[int],
    group_in: torch.Tensor,
    teacher: torch.Tensor,
    calls: BlockCalls,
    *,
    method: str,
    fusion,
    distill,
    generator: torch.Generator,
    seed: int,
    checkpoint: bool = False,
    keep_fold: bool = True,
    on_step: Callable[[int, int, float], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RoundResult:
    """Remove block p of `model` (in place) and heal its group, for 'fusegpt' or 'drop+lora'.

    group_in: (n, seq, hidden) calibration states at the input of the group's first block;
    teacher: the group's output on them, block p still in. `fusion`, `distill`: the recipe's
    FusionConfig and DistillConfig; `checkpoint`: per-block gradient checkpointing; `keep_fold`: new
    fused layers keep their CPU fold (FusedLinear.folded_weight; off for offloaded blocks). On TrainingDiverged, Cancelled or KeyboardInterrupt the group
    is put back as it was before the round, and the error raised again."""
    lo, hi = group_span(p, targets)
    before = _GroupFork(model, lo, hi)
    try:
        # 1. surgery: inject block p into its targets (the new terms are zero), then delete it
        if method == "fusegpt":
            inject(model, p, targets, fusion.coef_rank, fusion.lora_rank, fusion.fuse_bias, generator, keep_fold)
        remove_blocks(model, [p])
        new_targets = [t - 1 if t > p else t for t in targets]
        student = list(get_blocks(model))[lo:hi]
        if method == "fusegpt":
            first, settled, others = group_trainable(model, new_targets, train_settled=distill.lr_settled != 0)
            lr_first = distill.lr_coef
        else:  # drop+lora: the LoRA gets the coefficient budget (rank, learning rate)
            rank = max(fusion.coef_rank, fusion.lora_rank)
            first = baselines.add_lora(model, new_targets, rank=rank, seed=seed)
            others, settled, lr_first = baselines.norm_parameters(model, new_targets), [], distill.lr_lora
        # before/after figures on a fixed slice of the calibration windows (cheap, comparable)
        probe_in, probe_out = group_in[:LOSS_PROBE_WINDOWS], teacher[:LOSS_PROBE_WINDOWS]
        loss_before = group_loss(student, probe_in, probe_out, calls, distill.loss, distill.batch_size)

        # 2. local distillation of the group
        if on_stage is not None:
            on_stage("finetune")
        trained = finetune(
            student,
            group_in,
            teacher,
            calls,
            first,
            others,
            epochs=distill.epochs,
            batch_size=distill.batch_size,
            lr_coef=lr_first,
            lr_other=distill.lr_lora,
            loss=distill.loss,
            betas=tuple(distill.betas),
            grad_clip=distill.grad_clip,
            divergence_factor=distill.divergence_factor,
            checkpoint=checkpoint,
            settled_params=settled,
            lr_settled=distill.lr_settled,
            seed=seed,
            on_step=on_step,
            should_stop=should_stop,
        )

        # 3. settle: record what each target took in, then freeze (fusegpt) or merge (LoRA)
        absorbed = absorbed_shares(model, new_targets, lora=method != "fusegpt")
        if method == "fusegpt":
            settle_group(model, new_targets)
        else:
            baselines.merge_lora(model)
        loss_after = group_loss(student, probe_in, probe_out, calls, distill.loss, distill.batch_size)
    except (TrainingDiverged, Cancelled, KeyboardInterrupt):
        before.restore(model)
        raise
    return RoundResult(loss_before=loss_before, loss_after=loss_after, losses=trained.losses, absorbed=absorbed)


@torch.no_grad()
def absorbed_shares(model: nn.Module, targets: list[int], lora: bool = False) -> dict[int, dict[str, float]]:
    """target -> linear -> the newest absorbed term's share of the layer's own weight (`lora`: the
    peft LoRA's ||B A|| / ||W|| instead)."""
    blocks = get_blocks(model)
    out: dict[int, dict[str, float]] = {}
    for t in targets:
        shares = {}
        for name, layer in block_linears(model, blocks[t]).items():
            if isinstance(layer, FusedLinear) and layer.num_absorbed:
                shares[name] = layer.term_share(layer.num_absorbed - 1)
            elif lora and hasattr(layer, "get_delta_weight"):
                adapter = next(iter(layer.lora_A))
                own = layer.get_base_layer().weight.float()
                shares[name] = (layer.get_delta_weight(adapter).float().norm() / own.norm().clamp_min(1e-12)).item()
        out[t] = shares
    return out
