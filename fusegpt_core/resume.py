"""Checkpoints after each round, and resuming a run from them.

A round's result is fully described by what it changed: which blocks are gone (in order), and the
tensors of the remaining blocks that are no longer the input model's (fused layers' coefficients,
LoRA and absorbed weights of fused donors, trained norms, averaged or merged weights). A checkpoint
stores exactly that, plus what the next round draws from (the initialisation generator's state,
the one-shot scores), so a resumed run computes bit for bit what the uninterrupted run would have.
Tensors the blocks still share with the input model are stored as references to its tensor names,
not copied: a checkpoint of a 7B run is the size of what the rounds trained, not of the model.

Layout: OUT/checkpoint/round-NNN/{state.json, tensors.safetensors}; a round's folder is written under
a temporary name and renamed when complete, so a kill mid-write leaves the previous round's intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import get_blocks, remove_blocks
from .errors import ResumeError
from .fused_linear import FusedLinear

FORMAT = 1
CHECKPOINT = "checkpoint"


@dataclass
class Resumed:
    """What a checkpoint gives back to the pipeline."""

    state: dict[str, Any]
    """state.json: recipe, removed, rounds, trajectory, status, dense_ppl, fingerprints."""
    generator_state: torch.Tensor


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu()


def fingerprint(model: nn.Module, calib: torch.Tensor, read: Callable = _host) -> dict[str, str]:
    """Short hashes that tell whether a checkpoint belongs to this model and these windows: the
    config, each tensor's name and shape with its first 1024 values, and the calibration tokens.
    `read`: a tensor slot -> its values on the host (offloaded blocks: BlockOffload.host_copy)."""
    # where the model was read from is not part of it: the bundled model's first load comes from its GGUF
    # file, later ones from the cache, and a run must resume across the two
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "_model_name_or_path")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in model.state_dict(keep_vars=True).items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(read(t).reshape(-1)[:1024].float().numpy().tobytes())
    return {
        "model": h.hexdigest()[:16],
        "calibration": hashlib.sha256(calib.cpu().numpy().tobytes()).hexdigest()[:16],
    }


def latest(out: Path) -> Path | None:
    """The newest complete round folder under out/checkpoint, or None."""
    folder = Path(out) / CHECKPOINT
    done = sorted(p for p in folder.glob("round-*") if (p / "state.json").exists()) if folder.is_dir() else []
    return done[-1] if done else None


def _named_tensors(module: nn.Module):
    """(path, 'param' | 'buffer', tensor) of every parameter and buffer, non-persistent ones too."""
    for prefix, sub in module.named_modules():
        for kind, table in (("param", sub._parameters), ("buffer", sub._buffers)):
            for name, t in table.items():
                if t is not None:
                    yield (f"{prefix}.{name}" if prefix else name), kind, t


def _key(t: torch.Tensor) -> tuple:
    """Which tensor this is (an offloaded block's meta placeholder is itself: offload.py)."""
    if t.is_meta:
        return ("meta", id(t))
    return (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))


def save(
    out: Path,
    round_index: int,
    state: dict[str, Any],
    original: nn.Module,
    work: nn.Module,
    block_originals: list[int],
    generator: torch.Generator,
    read: Callable = _host,
) -> Path:
    """Write the checkpoint after round `round_index` (0-based) and drop older ones; returns its folder.

    block_originals[c]: the original index of the block now at position c; `read` as in fingerprint."""
    from safetensors.torch import save_file

    shared = {_key(t): name for name, _, t in _named_tensors(original)}
    tensors: dict[str, torch.Tensor] = {"generator_state": generator.get_state()}
    saved_keys: dict[tuple, str] = {}
    blocks_spec = []
    for block, orig in zip(get_blocks(work), block_originals):
        entries: dict[str, dict[str, str]] = {}
        for path, kind, t in _named_tensors(block):
            k = _key(t)
            if k in shared:
                entries[path] = {"kind": kind, "ref": shared[k]}
                continue
            if k not in saved_keys:
                saved_keys[k] = f"t{len(saved_keys)}"
                tensors[saved_keys[k]] = read(t).contiguous()
            entries[path] = {"kind": kind, "key": saved_keys[k]}
        fused = {
            name: {
                "lora_rank": m.lora_rank,
                "conv1d": m.conv1d,
                "num_absorbed": m.num_absorbed,
                "num_settled": m.num_settled,
            }
            for name, m in block.named_modules()
            if isinstance(m, FusedLinear)
        }
        blocks_spec.append({"original": orig, "tensors": entries, "fused": fused})
    folder = Path(out) / CHECKPOINT
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".round-", dir=folder))
    try:
        save_file(tensors, str(tmp / "tensors.safetensors"))
        body = {"format": FORMAT, **state, "round": round_index, "blocks": blocks_spec}
        (tmp / "state.json").write_text(json.dumps(body, indent=1))
        final = folder / f"round-{round_index:03d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for older in folder.glob("round-*"):
        if older != final:
            shutil.rmtree(older, ignore_errors=True)
    return final


def read_state(folder: Path) -> dict[str, Any]:
    """state.json of a checkpoint folder (recipe, removed blocks, rounds, fingerprints)."""
    try:
        state = json.loads((folder / "state.json").read_text())
    except Exception as e:  # unreadable or not JSON
        raise ResumeError(
            f"the checkpoint in '{folder}' cannot be read ({e}); start the run again without --resume."
        ) from None
    if state.get("format") != FORMAT:
        raise ResumeError(
            f"the checkpoint in '{folder}' has format {state.get('format')}, this version reads {FORMAT}."
        )
    return state


def read(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(state.json, the saved tensors) of a checkpoint folder."""
    from safetensors.torch import load_file

    state = read_state(folder)
    try:
        tensors = load_file(str(folder / "tensors.safetensors"))
    except Exception as e:  # a truncated or foreign safetensors file (SafetensorError)
        raise ResumeError(
            f"the checkpoint in '{folder}' cannot be read ({e}); start the run again without --resume."
        ) from None
    return state, tensors


def restore(
    folder: Path, work: nn.Module, original: nn.Module, calib: torch.Tensor, read_tensor: Callable = _host
) -> Resumed:
    """Put `work` (a fresh fork of `original`) in the state the checkpoint in `folder` records
    (`read_tensor` as fingerprint's `read`)."""
    state, tensors = read(folder)
    here = fingerprint(original, calib, read_tensor)
    for what in ("model", "calibration"):
        if state["fingerprint"][what] != here[what]:
            raise ResumeError(
                f"the checkpoint in '{folder.parent.parent}' was made with another {what} "
                f"({'its weights or config differ' if what == 'model' else 'the calibration text or window settings differ'}): "
                "resume with the same model and text, or start a new run."
            )
    # removals in the recorded order, through the same surgery a round does (renumbering, layer_types)
    current = list(range(len(get_blocks(work))))
    for orig in state["removed"]:
        p = current.index(orig)
        remove_blocks(work, [p])
        current.pop(p)
    originals = {name: t for name, _, t in _named_tensors(original)}
    device = next(original.parameters()).device
    for block, spec in zip(get_blocks(work), state["blocks"]):
        _restore_block(block, spec, tensors, originals, device)
    return Resumed(state=state, generator_state=tensors["generator_state"])


def _restore_block(block: nn.Module, spec: dict, tensors: dict, originals: dict, device) -> None:
    def resolve(entry: dict) -> torch.Tensor:
        if "ref" in entry:  # the input model's own tensor object (an offloaded one's placeholder too)
            return originals[entry["ref"]]
        return tensors[entry["key"]].to(device)

    entries = spec["tensors"]
    # 1. the fused layers' structure, their absorbed weights in place
    for name, f in sorted(spec["fused"].items()):
        base = block.get_submodule(name)
        layer = FusedLinear(base, lora_rank=f["lora_rank"], conv1d=f["conv1d"])
        for k in range(f["num_absorbed"]):
            weight = resolve(entries[f"{name}.absorbed_weight_{k}"])
            bias_entry = entries.get(f"{name}.absorbed_bias_{k}")
            rank = (
                tensors[entries[f"{name}.coef_C.{k}"]["key"]].shape[1] if "key" in entries[f"{name}.coef_C.{k}"] else 0
            )
            layer.absorb_weights(
                weight, resolve(bias_entry) if bias_entry else None, coef_rank=rank, fuse_bias=bool(bias_entry)
            )
        layer.num_settled = f["num_settled"]
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, child, layer)
    # 2. every tensor as recorded (shared ones point back at the input model's)
    present = {path for path, _, _ in _named_tensors(block)}
    if present != set(entries):
        raise ResumeError("the checkpoint's blocks do not match the model's structure; start a new run.")
    for path, entry in entries.items():
        prefix, _, name = path.rpartition(".")
        module = block.get_submodule(prefix) if prefix else block
        value = resolve(entry)
        if entry["kind"] == "param":
            if module._parameters[name] is not None and _key(module._parameters[name]) == _key(value):
                continue  # still the shared parameter
            shared = isinstance(value, nn.Parameter)
            module._parameters[name] = value if shared else nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[name] = value
