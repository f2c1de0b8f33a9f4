"""The memory a run will need, per stage, before it starts: on the compute device and on the host.

Where tensors live (capture.Placement): the weights on the compute device; calibration states
(block inputs, group inputs, teacher outputs, saved prefix states) on the host; on a CPU-only
machine both are the same RAM and their sums add up. The figures come from the model's shapes
(built on the meta device from its config: no weights are read) and the recipe; each stage lists
what it holds, so a reader can check the arithmetic. benchmarks/bench_memory.py compares them with
measured peaks.

Offload (offload.py): with 'none' every block is on the compute device; with 'cpu' the blocks live
in host RAM and with 'disk' in safetensors files, and the device holds what is outside the blocks
plus the blocks in use (one for a forward, the group for a round). `plan_memory(offload=None)`
picks the first mode that fits the budgets. When none fits, `fuse` refuses up front and says which
knob to turn.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters import block_linears, block_norms, count_params, get_adapter, get_blocks
from .config import Recipe

BACKWARD_TRANSIENTS = 4  # fp32 (rows, cols) tensors alive at once in a fused linear's backward
ADAM_COPIES = 4  # a trainable fp32 tensor, its gradient and Adam's two moments
PREFIX_CAP = 2 << 30  # capture.PrefixStates keeps at most this many bytes of saved boundaries


@dataclass
class Stage:
    name: str
    device_bytes: int
    host_bytes: int
    holds: dict[str, int] = field(default_factory=dict)
    """What the stage's peak is made of (bytes), for a reader to check."""


@dataclass
class MemoryPlan:
    device: str
    dtype: str
    weight_bytes: int
    offload: str
    checkpoint: bool
    stages: list[Stage]
    peak_device_bytes: int
    peak_host_bytes: int
    device_budget: int | None = None
    host_budget: int | None = None
    fits: bool = True
    advice: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_bytes(text: str) -> int:
    """'24GiB', '80GB', '512MiB', '1.5e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?|B)?\s*", str(text))
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 24GiB, 80GB, 512MiB)")
    number, unit = float(m.group(1)), (m.group(2) or "B").upper().rstrip("B") or "B"
    powers = {"B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    return int(number * powers[unit])


def skeleton(config, trust_remote_code: bool = False) -> nn.Module:
    """The model `config` describes, on the meta device: shapes only, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


@dataclass
class _Shapes:
    """What the arithmetic needs from a model."""

    params: int
    blocks: int
    block_params: int
    linear_params: int  # per block, the linears fusion touches
    linears: list[tuple[int, int]]  # (rows, cols) of each
    norm_params: int  # per block
    hidden: int
    intermediate: int
    vocab: int
    heads: int


def _shapes(model: nn.Module) -> _Shapes:
    config = model.config
    params = count_params(model)
    block = get_blocks(model)[0]
    linears = [tuple(layer.weight.shape) for layer in block_linears(model, block).values()]
    hidden = int(getattr(config, "hidden_size", None) or config.n_embd)
    intermediate = max(max(r, c) for r, c in linears)
    return _Shapes(
        params=params,
        blocks=len(get_blocks(model)),
        block_params=sum(p.numel() for p in block.parameters()),
        linear_params=sum(r * c for r, c in linears),
        linears=linears,
        norm_params=sum(p.numel() for n in block_norms(model, block) for p in n.parameters()),
        hidden=hidden,
        intermediate=intermediate,
        vocab=int(config.vocab_size),
        heads=int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)),
    )


OFFLOAD_MODES = ("none", "cpu", "disk")


def plan_memory(
    model: nn.Module,
    recipe: Recipe,
    device: torch.device,
    dtype: torch.dtype,
    device_budget: int | None = None,
    host_budget: int | None = None,
    offload: str | None = "none",
) -> MemoryPlan:
    """Peak bytes on the compute device and the host, stage by stage, for `recipe` on `model` (real
    or a meta-device skeleton) computing on `device` in `dtype`. Budgets: bytes free there (None: not
    checked). Gradient checkpointing follows recipe.distill.checkpoint, and None turns it on when the
    device would be short without it. `offload`: where the blocks live (None: the first of none, cpu,
    disk that fits; on a CPU-only machine cpu is the same RAM and is skipped)."""
    if offload is not None:
        return _plan(model, recipe, device, dtype, device_budget, host_budget, offload)
    modes = [m for m in OFFLOAD_MODES if not (m == "cpu" and device.type == "cpu")]
    plans = [_plan(model, recipe, device, dtype, device_budget, host_budget, m) for m in modes]
    return next((p for p in plans if p.fits), plans[-1])


def _plan(model, recipe, device, dtype, device_budget, host_budget, offload: str) -> MemoryPlan:
    get_adapter(model)  # refuses unsupported families by name
    s = _shapes(model)
    b = torch.empty((), dtype=dtype).element_size()
    d, f, t = recipe.data, recipe.fusion, recipe.distill
    k = recipe.count(s.blocks)
    trains = recipe.method in ("fusegpt", "drop+lora")
    targets = min(f.group_size, s.blocks) - 1
    forward_batch = max(t.batch_size, 8)
    weights = s.params * b
    block_linear_bytes = s.linear_params * b

    states = d.n_calib * d.seq_len * s.hidden * b  # one set of calibration states (n, seq, hidden)
    prefix = min(PREFIX_CAP, 7 * states)
    # the logits in the model's dtype, their fp32 upcast (the same tensor for fp32), cross-entropy's log-softmax
    logits = forward_batch * d.seq_len * s.vocab * (b + (4 if b < 4 else 0) + 4)
    forward_acts = forward_batch * d.seq_len * (4 * s.hidden + 2 * s.intermediate) * b
    cpu = device.type == "cpu"
    attention_probs = s.heads * d.seq_len * d.seq_len * b if cpu else 0  # per window per block (math sdpa)

    # what training one group holds: trainables with gradients and Adam moments (fp32), activations
    coef_rank = f.coef_rank if recipe.method == "fusegpt" else max(f.coef_rank, f.lora_rank)
    per_term = sum(min(coef_rank, r, c) * (r + c) for r, c in s.linears)
    lora = sum(f.lora_rank * (r + c) for r, c in s.linears) if recipe.method == "fusegpt" else 0
    terms = max(1, min(k, 3))  # absorbed terms a target carries in a late round (the window moves on)
    trainables = targets * (per_term * terms + lora + s.norm_params) * 4 * ADAM_COPIES
    tokens = t.batch_size * d.seq_len
    per_token = (8 * s.hidden + 4 * s.intermediate) * b  # saved for backward in one block
    window_probs = t.batch_size * attention_probs
    acts_full = targets * (tokens * per_token + window_probs)
    acts_ckpt = targets * tokens * s.hidden * b + tokens * per_token + window_probs
    largest = max(r * c for r, c in s.linears)
    transient = BACKWARD_TRANSIENTS * largest * 4
    fused_donor = block_linear_bytes if k > 1 else 0  # a removed block that had absorbed one: built once
    fused_blocks = min(s.blocks - k, targets * k) if recipe.method == "fusegpt" else 0
    # CPU keeps each fused layer's folded weight (fp32) for speed; a GPU rebuilds it per call, and so
    # does the CPU for offloaded blocks (FusedLinear.keep_fold off)
    folded_cache = fused_blocks * s.linear_params * 4 if cpu and offload == "none" else 0
    largest_fp32 = max(r * c for r, c in s.linears) * 4  # one layer's W_eff built for a call
    changed = min(s.blocks - k, targets * k) * block_linear_bytes if trains else 0

    # where the weights are: all on the device ('none'), or what is outside the blocks plus the
    # blocks in use, the others on the host ('cpu') or on disk ('disk')
    block_bytes = s.block_params * b
    outside = weights - s.blocks * block_bytes

    def placed(resident_blocks: int) -> dict[str, int]:
        if offload == "none":
            return {"weights": weights}
        return {"weights outside the blocks": outside, "blocks in use": resident_blocks * block_bytes}

    host_blocks = {"offloaded blocks": s.blocks * block_bytes} if offload == "cpu" else {}
    group_blocks = targets + 1

    def train_device(checkpoint: bool) -> dict[str, int]:
        return {
            **placed(group_blocks),
            "trainables, gradients, Adam": trainables,
            "activations": acts_ckpt if checkpoint else acts_full,
            "backward transients": transient,
            "fused donor's weights": fused_donor if recipe.method == "fusegpt" else 0,
            "folded weights (CPU)": folded_cache,
            "a batch of states": 2 * tokens * s.hidden * b,
        }

    host_train = {"block inputs": states, "saved prefix states": prefix, "group inputs": states, "teacher": states,
                  **host_blocks}  # fmt: skip
    checkpoint = bool(t.checkpoint)
    if t.checkpoint is None and device_budget is not None and trains:
        need = sum(train_device(False).values()) + (sum(host_train.values()) if cpu else 0)
        checkpoint = need > device_budget

    # changed blocks: on the device without offload; with it, stored where the blocks live
    changed_device = {"changed blocks": changed} if offload == "none" else {}
    changed_host = {"changed blocks": changed} if offload == "cpu" else {}
    stages: list[tuple[str, dict[str, int], dict[str, int]]] = [
        ("load", placed(0), host_blocks),
        ("evaluate", {**placed(1), "logits": logits, "activations": forward_acts}, host_blocks),
    ]
    if recipe.blocks is None:  # the last round scores a model whose earlier rounds' layers are folded (CPU)
        earlier = min(s.blocks - k, targets * (k - 1)) * s.linear_params * 4 if cpu and k > 1 and fused_blocks else 0
        variants = 0
        if offload != "none":  # offloaded fused layers build W_eff per call, one at a time
            earlier = largest_fp32 if earlier else 0
            # blocks stream once per batch: every skip variant of the batch is alive at once
            variants = s.blocks * forward_batch * d.seq_len * s.hidden * b
        stages.append(("score", {**placed(1), "skip variants": variants,
                                 "prefix states": 3 * forward_batch * d.seq_len * s.hidden * b,
                                 "activations": forward_acts, "folded weights (CPU)": earlier}, host_blocks))  # fmt: skip
    if trains:
        stages.append(("finetune", train_device(checkpoint), host_train))
    fold_cache = folded_cache if offload == "none" else (largest_fp32 if fused_blocks else 0)
    stages.append(("fold", {**placed(1), **changed_device, "folded weights (CPU)": fold_cache},
                   {**host_blocks, **changed_host}))  # fmt: skip
    stages.append(("evaluate result", {**placed(1), **changed_device, "logits": logits},
                   {**host_blocks, **changed_host}))  # fmt: skip

    out: list[Stage] = []
    for name, on_device, on_host in stages:
        on_device = {key: v for key, v in on_device.items() if v}
        dev, host = sum(on_device.values()), sum(on_host.values())
        if cpu:  # one memory: the host's figure is the sum
            out.append(Stage(name, dev + host, dev + host, {**on_device, **on_host}))
        else:
            out.append(Stage(name, dev, host, {**on_device, **on_host}))
    peak_device = max(st.device_bytes for st in out)
    peak_host = max(st.host_bytes for st in out)
    plan = MemoryPlan(
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        weight_bytes=weights,
        offload=offload,
        checkpoint=checkpoint,
        stages=out,
        peak_device_bytes=peak_device,
        peak_host_bytes=peak_host,
        device_budget=device_budget,
        host_budget=host_budget,
    )
    short = [(where, need, have) for where, need, have in (("the compute device", peak_device, device_budget),
             ("host RAM", peak_host, host_budget)) if have is not None and need > have]  # fmt: skip
    if short:
        plan.fits = False
        plan.advice = _advice(plan, short, recipe, out)
    return plan


def _advice(plan: MemoryPlan, short, recipe: Recipe, stages: list[Stage]) -> str:
    where, need, have = short[0]
    if plan.weight_bytes > have:  # the weights alone: the loader's own words
        place = "GPU memory" if where == "the compute device" and plan.device != "cpu" else "RAM"
        return (
            f"The model needs about {plan.weight_bytes / 2**30:.1f} GiB but only {have / 2**30:.1f} GiB of {place} "
            "is free; choose a smaller model, a 16-bit dtype, or free some memory."
        )
    worst = max(stages, key=lambda st: st.device_bytes if where == "the compute device" else st.host_bytes)
    top = max(worst.holds.items(), key=lambda kv: kv[1])
    d, t = recipe.data, recipe.distill
    knobs = {
        "weights": f"a half-precision dtype (now {plan.dtype}), offloading the blocks (--offload cpu or disk), "
        "or a smaller model",
        "activations": f"a smaller distill.batch_size (now {t.batch_size}) or data.seq_len (now {d.seq_len}), "
        "or distill.checkpoint=true",
        "logits": f"a smaller data.seq_len (now {d.seq_len})",
        "block inputs": f"fewer data.n_calib windows (now {d.n_calib}) or a shorter data.seq_len (now {d.seq_len})",
        "folded weights (CPU)": "a GPU, or fewer blocks removed per run",
    }
    knob = next((v for key, v in knobs.items() if top[0].startswith(key)), knobs["weights"])
    return (
        f"the run needs about {need / 2**30:.1f} GiB on {where} at its '{worst.name}' stage but "
        f"{have / 2**30:.1f} GiB is available; the largest part is {top[0]} ({top[1] / 2**30:.1f} GiB): "
        f"try {knob}."
    )


def model_for_plan(source: str, trust_remote_code: bool = False) -> nn.Module | None:
    """A meta-device skeleton of `source` ('bundled', a folder, a .gguf file or a hub id), from its
    config only; None for a GGUF file not yet dequantised (transformers reads a GGUF config by
    reading the whole file: 16 s for the bundled model; the loader's own weight check still runs)."""
    from pathlib import Path

    from .loading import (
        BUNDLED,
        _cache_marker,
        _load_config,
        cache_is_complete,
        gguf_cache_folder,
        hub_reachable,
        resolve_source,
    )

    kind, location = resolve_source(source)
    if kind in (BUNDLED, "gguf"):
        path = Path(location)
        folder = gguf_cache_folder(path, bundled=kind == BUNDLED)
        if not path.is_file() or not cache_is_complete(folder, _cache_marker(path)):
            return None
        kind, location = "local", str(folder)
    config = _load_config(kind, location, trust_remote_code, local_only=kind == "local" or not hub_reachable())
    return skeleton(config, trust_remote_code)


def gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.2f} GiB"


def summary(plan: MemoryPlan) -> str:
    lines = [f"{'stage':<16}{'device':>12}{'host':>12}"]
    for st in plan.stages:
        lines.append(f"{st.name:<16}{gib(st.device_bytes):>12}{gib(st.host_bytes):>12}")
    lines.append(
        f"peak: {gib(plan.peak_device_bytes)} on {plan.device}, {gib(plan.peak_host_bytes)} on the host; "
        f"offload {plan.offload}; gradient checkpointing {'on' if plan.checkpoint else 'off'}"
    )
    return "\n".join(lines)
