"""Where a model's blocks live between uses: on the compute device, on the host, or on disk.

A model larger than the accelerator keeps its blocks on the host (RAM, pinned on CUDA) or on disk
(safetensors files, read when a block runs) and moves one block, or one fusion group, to the
device at a time: the sequential onloading of GPTQ-style quantisers. Everything that is not a
block (embeddings, final norm, LM head) stays on the device.

`BlockOffload` is the one object that moves block weights. It puts a placeholder in every
parameter and buffer slot of an offloaded block (cpu: the host tensor itself; disk: a tensor on
the `meta` device) and hooks the block's forward: the pre-hook puts device copies in the slots,
the post-hook puts the placeholders back. Code that needs blocks resident for longer (a fusion
round trains its group) holds them (`with offload.held(blocks):`). After a round, the group's new
blocks are adopted: their new tensors go to the host or disk; the frozen ones they share with
the blocks they came from keep pointing at the stored copy (nothing is written twice).

A tensor shared by several blocks (a removed block's weights absorbed by each of its targets) is
stored once and, while any of its blocks is resident, onloaded once. Forks of a block
(adapters.fork_module) share its placeholders and hooks, so the input model's blocks and a run's
forks of them use the same stored tensors.

Offloading changes where tensors are, never what is computed: results are bit for bit the same in
every mode (tests/test_offload.py).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .adapters import get_blocks
from .errors import PlanError

MODES = ("none", "cpu", "disk")


def _slots(block: nn.Module) -> Iterator[tuple[dict, str, torch.Tensor]]:
    """(table, name, tensor) of every parameter and buffer under `block`, non-persistent ones too."""
    for sub in block.modules():
        for table in (sub._parameters, sub._buffers):
            for name, t in list(table.items()):
                if t is not None:
                    yield table, name, t


def _ident(t: torch.Tensor) -> tuple:
    """Which tensor this is: two tensor objects over the same memory (a .detach(), a Parameter
    around it) are the same tensor; a meta placeholder is itself."""
    if t.is_meta:
        return ("meta", id(t))
    return (str(t.device), t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))


def _like(t: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """`data` in the role of `t`: a Parameter (with t's requires_grad) where t is one."""
    if isinstance(t, nn.Parameter):
        return nn.Parameter(data, requires_grad=t.requires_grad)
    return data


class BlockOffload:
    """Keeps the blocks of models on the host or on disk between their uses on `device`."""

    def __init__(self, mode: str, device: torch.device | str, folder: str | Path | None = None):
        if mode not in MODES:
            raise PlanError(f"unknown offload mode '{mode}': choose one of {', '.join(MODES)}.")
        self.mode = mode
        self.device = torch.device(device)
        self.host = torch.device("cpu")
        self._folder = Path(folder) if folder is not None else None
        self._remove_own_folder: weakref.finalize | None = None
        self._stored: dict[int, torch.Tensor] = {}  # key -> placeholder (cpu: the host tensor; disk: meta)
        self._key_of: dict[tuple, int] = {}  # _ident(placeholder) -> key
        self._disk: dict[int, tuple[str, str, torch.dtype]] = {}  # key -> (file, tensor name in it, dtype)
        self._loaded: dict[int, list] = {}  # key -> [device tensor, number of resident blocks using it]
        self._loaded_key: dict[tuple, int] = {}  # _ident(device tensor) -> key
        self._resident: dict[int, list] = {}  # id(block) -> [(table, name, placeholder, key)]
        self._held: Counter = Counter()  # id(block) -> how many `held` contexts hold it
        self._files = 0
        if self.active:
            return_freed_memory()
        self.peak_resident_bytes = 0

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def pinned(self) -> bool:
        return self.device.type == "cuda"

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="fusegpt-offload-"))
            # the folder goes with this object even when nobody calls close(): a dropped model, an exit
            self._remove_own_folder = weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)
        self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder

    # ---- taking blocks in -------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Offload every block of `model` (its other modules stay where they are)."""
        self.adopt(get_blocks(model))

    @torch.no_grad()
    def adopt(self, blocks: Iterable[nn.Module]) -> None:
        """Offload these blocks: tensors already stored keep their stored copy, new ones are stored
        (on the host, or written to one new safetensors file); hooks onload them per forward. A
        held block keeps its tensors on the device until it is released."""
        if not self.active:
            return
        pending: dict[str, torch.Tensor] = {}
        fresh: dict[tuple, int] = {}  # _ident(new tensor) -> its key: a tensor in several slots is stored once
        for block in blocks:
            self._hook(block)
            record = self._resident.get(id(block))  # a held block: its new tensors stay on the device for now
            for table, name, t in _slots(block):
                ident = _ident(t)
                if ident in self._key_of:
                    continue  # a placeholder already
                key = self._loaded_key.get(ident, fresh.get(ident))
                if key is None:
                    key = fresh[ident] = len(self._stored)
                    if self.mode == "cpu":
                        host = t.detach().to(self.host)
                        placeholder = _like(t, host.pin_memory() if self.pinned else host)
                    else:
                        pending[f"t{key}"] = t.detach().to(self.host).contiguous()
                        placeholder = _like(t, torch.empty(t.shape, dtype=t.dtype, device="meta"))
                    self._stored[key] = placeholder
                    self._key_of[_ident(placeholder)] = key
                if record is None:
                    table[name] = self._stored[key]
                else:  # resident: count this use of the device tensor, put the placeholder back on release
                    entry = self._loaded.setdefault(key, [t, 0])
                    entry[1] += 1
                    self._loaded_key[_ident(entry[0])] = key
                    record.append((table, name, self._stored[key], key))
        if pending:
            from safetensors.torch import save_file

            path = self.folder / f"part-{self._files:05d}.safetensors"
            self._files += 1
            save_file(pending, str(path))
            for name, t in pending.items():
                self._disk[int(name[1:])] = (str(path), name, t.dtype)

    def adopt_from_file(self, block: nn.Module, files: dict[str, tuple[str, str]]) -> None:
        """Offload a block whose slots hold meta tensors, reading them from existing safetensors
        files: files[slot path] = (file, tensor name). Nothing is written (a lazily loaded model)."""
        if self.mode != "disk":
            raise ValueError("only disk offload reads blocks from their files")
        for prefix, sub in block.named_modules():
            for table in (sub._parameters, sub._buffers):
                for name, t in list(table.items()):
                    path = f"{prefix}.{name}" if prefix else name
                    if t is None or path not in files:
                        continue
                    key = len(self._stored)
                    placeholder = t if t.is_meta else _like(t, torch.empty(t.shape, dtype=t.dtype, device="meta"))
                    self._stored[key] = placeholder
                    self._key_of[_ident(placeholder)] = key
                    self._disk[key] = (*files[path], t.dtype)
                    table[name] = placeholder
        self._hook(block)

    def _hook(self, block: nn.Module) -> None:
        """Forward hooks that onload `block` for its call (forks inherit them: fork_module)."""
        if any(getattr(h, "offload", None) is self for h in block._forward_pre_hooks.values()):
            return

        def before(module, args):
            if not self._held[id(module)]:
                self.onload(module)

        def after(module, args, output):
            self.release(module)

        before.offload = after.offload = self
        block.register_forward_pre_hook(before)
        block.register_forward_hook(after)

    # ---- moving -----------------------------------------------------------------------------

    @torch.no_grad()
    def onload(self, block: nn.Module) -> None:
        """Put device copies of the block's stored tensors in its slots (shared ones loaded once)."""
        if not self.active or id(block) in self._resident:
            return
        for module in block.modules():  # an offloaded fused layer keeps no fp32 fold between calls
            if getattr(module, "keep_fold", None) is True:
                module.keep_fold = False
        record = []
        for table, name, t in _slots(block):
            key = self._key_of.get(_ident(t))
            if key is not None:
                table[name] = self._acquire(key)
                record.append((table, name, t, key))
        self._resident[id(block)] = record
        resident = sum(d.numel() * d.element_size() for d, _ in self._loaded.values())
        self.peak_resident_bytes = max(self.peak_resident_bytes, resident)

    def offload(self, block: nn.Module) -> None:
        """Put the placeholders back; a device copy goes when no resident block uses it."""
        for module in block.modules():  # a fused layer's folded weight (CPU speed cache) goes with the block
            if getattr(module, "_frozen_cache", None) is not None:
                module._frozen_cache = None
        for table, name, placeholder, key in self._resident.pop(id(block), []):
            table[name] = placeholder
            entry = self._loaded[key]
            entry[1] -= 1
            if entry[1] == 0:
                del self._loaded[key]
                self._loaded_key.pop(_ident(entry[0]), None)

    def release(self, block: nn.Module) -> None:
        """Offload `block` unless something holds it (a forward that stopped inside it, for one)."""
        if not self._held[id(block)]:
            self.offload(block)

    def _acquire(self, key: int) -> torch.Tensor:
        if key in self._loaded:
            self._loaded[key][1] += 1
            return self._loaded[key][0]
        placeholder = self._stored[key]
        data = self._read(key, self.device)
        tensor = _like(placeholder, data)
        self._loaded[key] = [tensor, 1]
        self._loaded_key[_ident(tensor)] = key
        return tensor

    def _read(self, key: int, device: torch.device) -> torch.Tensor:
        if self.mode == "cpu":
            return self._stored[key].detach().to(device, non_blocking=self.pinned)
        from safetensors import safe_open

        path, name, dtype = self._disk[key]
        with safe_open(path, framework="pt", device=str(device)) as f:
            return f.get_tensor(name).to(dtype)  # a file of another dtype: converted per read

    @contextmanager
    def held(self, blocks: Iterable[nn.Module]):
        """Keep these blocks resident on the device inside the block (a round trains them)."""
        blocks = list(blocks)
        for block in blocks:
            self._held[id(block)] += 1
            self.onload(block)
        try:
            yield
        finally:
            for block in blocks:
                self._held[id(block)] -= 1
                if not self._held[id(block)]:
                    del self._held[id(block)]
                    self.offload(block)

    def host_copy(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor a slot stands for, on the host (a placeholder is read; others are moved)."""
        key = self._key_of.get(_ident(t))
        if key is None:
            return t.detach().to(self.host)
        return self._read(key, self.host)

    def close(self) -> None:
        """Forget everything stored; the offload folder goes if this object made it."""
        self._stored.clear()
        self._key_of.clear()
        self._loaded.clear()
        self._loaded_key.clear()
        if self._remove_own_folder is not None:
            self._remove_own_folder()
            self._folder, self._remove_own_folder = None, None


def return_freed_memory() -> bool:
    """Have glibc give freed buffers of 1 MiB and more back to the system at once (Linux only).

    Left alone, glibc raises its mmap threshold up to 32 MiB after big frees, and the per-call
    buffers of offloaded blocks (a fused layer's W_eff, a block's activations) are then carved from a
    heap that does not shrink: the process keeps their memory after freeing it. Offloading trades
    speed for memory, so it asks for this; returns whether it could."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 1 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 20))
    except (OSError, AttributeError):
        return False


NO_OFFLOAD = BlockOffload("none", "cpu")


def block_offload(block: nn.Module) -> BlockOffload:
    """The BlockOffload that keeps this block (through its hooks), else NO_OFFLOAD."""
    for hook in block._forward_pre_hooks.values():
        owner = getattr(hook, "offload", None)
        if isinstance(owner, BlockOffload):
            return owner
    return NO_OFFLOAD


def offload_of(model: nn.Module) -> BlockOffload:
    """The BlockOffload that keeps this model's blocks, else NO_OFFLOAD."""
    blocks = get_blocks(model)
    return block_offload(blocks[0]) if len(blocks) else NO_OFFLOAD
