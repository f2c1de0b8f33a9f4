"""Group planning and weight injection: one fusion round's model surgery.

All indices here are CURRENT block indices (positions in the model as it is now); the pipeline
maps them to and from the original model's indices.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import block_linears, block_norms, get_adapter, get_blocks, get_module, set_module
from .errors import PlanError
from .fused_linear import FusedLinear


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
) -> list[FusedLinear]:
    """Absorb every linear of block `removed` into the same linear of each target block.

    Targets' linears become FusedLinear (if not already); returns the fused layers touched.
    The removed block itself is NOT deleted here. Because the new coefficients start at zero, the
    model computes exactly what it did before (the removed block still runs until deleted).
    """
    check_targets(removed, targets, len(get_blocks(model)))
    adapter = get_adapter(model)
    blocks = get_blocks(model)
    donor = block_linears(model, blocks[removed])
    touched = []
    for t in targets:
        block = blocks[t]
        for name in adapter.linears:
            layer = get_module(block, name)
            if not isinstance(layer, FusedLinear):
                layer = FusedLinear(layer, lora_rank=lora_rank, conv1d=adapter.conv1d, generator=generator)
                set_module(block, name, layer)
            layer.absorb(donor[name], coef_rank=coef_rank, fuse_bias=fuse_bias, generator=generator)
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
