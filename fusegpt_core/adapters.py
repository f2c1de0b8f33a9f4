"""Where each supported architecture keeps its blocks, linears and norms.

One table entry per family, looked up by `config.model_type`, never by matching model names.
Everything else in the library reaches blocks only through these functions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ModelLoadError


@dataclass(frozen=True)
class ArchAdapter:
    family: str
    blocks: str
    """Dotted path from the CausalLM to the nn.ModuleList of blocks."""
    final_norm: str
    """Dotted path to the norm applied to the last block's output (before the LM head)."""
    linears: tuple[str, ...]
    """Linear layers of one block (dotted, relative to the block) that fusion injects into."""
    norms: tuple[str, ...]
    """Norm layers of one block; their weights are trained during group fine-tuning."""
    conv1d: bool = False
    """True when linears are transformers' Conv1D (weight stored (in, out)), as in GPT-2."""
    num_layers_attr: str = "num_hidden_layers"


_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_LLAMA = ArchAdapter(
    family="llama",
    blocks="model.layers",
    final_norm="model.norm",
    linears=_LLAMA_LINEARS,
    norms=("input_layernorm", "post_attention_layernorm"),
)

# Gemma-2/3: Llama's linears, two more norms around the MLP (Gemma-3 also normalises q and k);
# sliding-window and full-attention blocks alternate (capture.py gives each kind its own mask)
_GEMMA_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
_GEMMA2 = ArchAdapter(
    family="gemma2", blocks="model.layers", final_norm="model.norm", linears=_LLAMA_LINEARS, norms=_GEMMA_NORMS
)
_GEMMA3 = ArchAdapter(
    family="gemma3",
    blocks="model.layers",
    final_norm="model.norm",
    linears=_LLAMA_LINEARS,
    norms=(*_GEMMA_NORMS, "self_attn.q_norm", "self_attn.k_norm"),
)

ADAPTERS: dict[str, ArchAdapter] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,  # same layout; q/k/v carry biases, handled generically
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA3,
    "gpt2": ArchAdapter(
        family="gpt2",
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        linears=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        norms=("ln_1", "ln_2"),
        conv1d=True,
        num_layers_attr="n_layer",
    ),
    "opt": ArchAdapter(
        family="opt",
        blocks="model.decoder.layers",
        final_norm="model.decoder.final_layer_norm",
        linears=(
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "fc1",
            "fc2",
        ),
        norms=("self_attn_layer_norm", "final_layer_norm"),
    ),
    "phi": ArchAdapter(
        family="phi",
        blocks="model.layers",
        final_norm="model.final_layernorm",
        linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"),
        norms=("input_layernorm",),
    ),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(ADAPTERS))


def get_adapter(model: nn.Module) -> ArchAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ModelLoadError(
            f"architecture '{model_type}' is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return ADAPTERS[model_type]


def get_module(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(get_module(root, parent) if parent else root, name, new)


def get_blocks(model: nn.Module) -> nn.ModuleList:
    return get_module(model, get_adapter(model).blocks)


def get_final_norm(model: nn.Module) -> nn.Module:
    return get_module(model, get_adapter(model).final_norm)


def num_blocks(model: nn.Module) -> int:
    return len(get_blocks(model))


def block_linears(model: nn.Module, block: nn.Module) -> dict[str, nn.Module]:
    """name -> linear module (nn.Linear, Conv1D, or a FusedLinear wrapping one)."""
    return {name: get_module(block, name) for name in get_adapter(model).linears}


def block_norms(model: nn.Module, block: nn.Module) -> list[nn.Module]:
    return [get_module(block, name) for name in get_adapter(model).norms]


def set_blocks(model: nn.Module, blocks: list[nn.Module], kept_indices: list[int]) -> None:
    """Replace the model's blocks, renumber layer indices and update the config.

    `kept_indices[j]` is the current index of the block that becomes block j (per-layer config
    such as `layer_types` follows it).

    Renumbering matters: attention modules index the KV cache by `layer_idx`, so a model with
    removed blocks generates garbage (or crashes) with a cache unless indices are 0..L'-1.
    """
    adapter = get_adapter(model)
    set_module(model, adapter.blocks, nn.ModuleList(blocks))
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config
    setattr(config, adapter.num_layers_attr, len(blocks))
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) > max(kept_indices, default=-1):
        # per-layer attention kinds (sliding/full) follow their blocks
        config.layer_types = [layer_types[i] for i in kept_indices]


def remove_blocks(model: nn.Module, indices: list[int]) -> None:
    """Delete blocks (current indices) in place, renumbering the rest."""
    blocks = list(get_blocks(model))
    kept = [i for i in range(len(blocks)) if i not in set(indices)]
    set_blocks(model, [blocks[i] for i in kept], kept)


def count_params(model: nn.Module) -> int:
    """Parameters of the model, counting tied weights once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# ---- copy-on-write ------------------------------------------------------------------------------
# A run never edits its input model and never copies it whole (a 7B model copied is 13 GB more).
# `fork_model` gives a model with its own module objects and config, sharing every weight tensor:
# removing and renumbering blocks then touches only the fork. A round `own`s what it trains (norms,
# coefficients, LoRA) before training it, and folding or averaging writes new tensors instead of
# writing into shared ones, so the input's tensors are never written.


def fork_module(module: nn.Module, old_config=None, new_config=None) -> nn.Module:
    """The same module tree as new objects sharing every parameter and buffer tensor. Attributes
    that point at `old_config` point at `new_config` in the fork."""
    new = copy.copy(module)  # a new object whose __dict__ is a shallow copy of the old one's
    for name, value in module.__dict__.items():
        if isinstance(value, (dict, set)) and name.startswith("_"):  # parameters, buffers, hooks
            setattr(new, name, copy.copy(value))
    new._modules = {name: fork_module(child, old_config, new_config) for name, child in module._modules.items()}
    if new_config is not None and getattr(module, "config", None) is old_config:
        new.config = new_config
    if hasattr(new, "_frozen_cache"):  # a FusedLinear's folded weight belongs to the original's parameters
        new._frozen_cache = None
    return new


def fork_model(model: nn.Module) -> nn.Module:
    """A model that computes what `model` does, with its own structure and config and the same tensors."""
    return fork_module(model, model.config, copy.deepcopy(model.config))


@torch.no_grad()
def own_parameters(module: nn.Module) -> None:
    """Give every parameter under `module` its own copy of the data (before training or editing it)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
