"""What FuseGPT is compared with, on the same blocks and data.

- drop: delete the block (ShortGPT-style pruning without healing).
- drop+lora: delete the block, then heal its group with LoRA (through peft), trained with the
  same local distillation, steps and data as a fusion round: the difference is fusion itself.
- average: fold the removed block into its neighbour by averaging their weights (LaCo-like),
  no training.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import block_linears, block_norms, get_adapter, get_blocks, get_module, own_parameters, set_module


def add_lora(model: nn.Module, targets: list[int], rank: int, seed: int = 0) -> list[nn.Parameter]:
    """Wrap the linears of the target blocks (current indices) with peft LoRA layers (B = 0, so
    nothing changes yet); returns the new trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    adapter = get_adapter(model)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling 1, like the reference's unscaled LoRA
        lora_dropout=0.0,
        target_modules=list(adapter.linears),
        fan_in_fan_out=adapter.conv1d,
        bias="none",
    )
    params: list[nn.Parameter] = []
    blocks = get_blocks(model)
    torch.manual_seed(seed)
    for t in targets:
        inject_adapter_in_model(config, blocks[t])
        params += [p for n, p in blocks[t].named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Merge every peft LoRA layer into its base layer and put the stock module back."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for block in get_blocks(model):
        for name, module in list(block.named_modules()):
            if isinstance(module, LoraLayer):
                own_parameters(module.get_base_layer())  # peft merges in place; the base may be shared
                module.merge()
                set_module(block, name, module.get_base_layer())
                count += 1
        for attr in ("peft_config", "_hf_peft_config_loaded"):  # left by inject_adapter_in_model
            if attr in block.__dict__:
                delattr(block, attr)
    return count


def norm_parameters(model: nn.Module, targets: list[int]) -> list[nn.Parameter]:
    blocks = get_blocks(model)
    params = [p for t in targets for norm in block_norms(model, blocks[t]) for p in norm.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


@torch.no_grad()
def average_into(model: nn.Module, removed: int, neighbour: int) -> None:
    """Neighbour's linears and norms become the mean of its own and the removed block's."""
    blocks = get_blocks(model)
    donor, receiver = blocks[removed], blocks[neighbour]
    own_parameters(receiver)  # its weights may be shared with the input model: average into copies
    for name, layer in block_linears(model, receiver).items():
        other = get_module(donor, name)
        layer.weight.data.copy_((layer.weight.float() + other.weight.float()).div(2))
        if getattr(layer, "bias", None) is not None and getattr(other, "bias", None) is not None:
            layer.bias.data.copy_((layer.bias.float() + other.bias.float()).div(2))
    for mine, theirs in zip(block_norms(model, receiver), block_norms(model, donor)):
        for p, q in zip(mine.parameters(), theirs.parameters()):
            p.data.copy_((p.float() + q.float()).div(2))


def neighbour_of(removed: int, num_blocks: int) -> int:
    """The block before the removed one (the one after, for block 0)."""
    return removed - 1 if removed > 0 else 1
