"""Capture what the blocks receive, and run blocks on captured states.

A decoder layer gets more than hidden states: rotary `position_embeddings`, a causal mask, cache
positions, passed as keywords by most families and positionally by some (GPT-2 passes its causal
mask as the third positional argument). And not every block gets the same: where sliding-window
and full-attention blocks alternate (Gemma-2/3, Qwen2 with mixed `layer_types`), each kind has its
own mask (and Gemma-3 its own rotary table). So one forward of one window records the WHOLE call
of every block, grouped by the block's attention kind; blocks of one kind must have received the
same arguments, or capture refuses the model. `run_block` then calls each block with its kind's
arguments, wherever the block has moved to.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters import get_blocks
from .errors import Cancelled

_CACHE_KEYS = ("past_key_values", "past_key_value", "layer_past", "cache")


class _StopForward(Exception):
    """Raised by the capture hook to skip the rest of the model; never leaves this module."""


@dataclass
class BlockCall:
    """Everything a block call receives besides the hidden states, captured with batch 1 so that
    each tensor broadcasts to any batch: masks (1, 1, seq, seq), cos/sin (1, seq, head_dim)."""

    args: tuple
    """Positional arguments after the hidden states."""
    kwargs: dict[str, Any]


def attention_kind(block: nn.Module) -> str | None:
    """The block's attention kind ('sliding_attention', 'full_attention') where its modules carry
    one (transformers sets `layer_type` on the attention from `config.layer_types`), else None."""
    for module in block.modules():
        kind = getattr(module, "layer_type", None)
        if isinstance(kind, str):
            return kind
    return None


@dataclass
class Placement:
    """Where calibration states live and where blocks compute: the one place that moves them.

    Block inputs, group inputs and teacher outputs are as large as the calibration set (the paper's
    1024 x 2048 tokens of a 7B model: 17 GB each in bf16), so they stay on the host (RAM, pinned
    when the device is a GPU, so copies overlap with compute) and one batch at a time goes to the
    device. On a CPU-only machine both are the CPU and nothing moves. `moved` counts the bytes each
    way (tests read it)."""

    device: torch.device
    """Where blocks compute: the model's device."""
    host: torch.device = field(default_factory=lambda: torch.device("cpu"))
    moved: Counter = field(default_factory=Counter)

    @property
    def pinned(self) -> bool:
        return self.device.type == "cuda" and self.host.type == "cpu"

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Room on the host for states of `shape`, filled batch by batch (no list + cat double peak)."""
        return torch.empty(shape, dtype=dtype, device=self.host, pin_memory=self.pinned)

    def fetch(self, states: torch.Tensor) -> torch.Tensor:
        """A batch of states, on the device."""
        self.moved["to device"] += states.numel() * states.element_size()
        return states.to(self.device, non_blocking=self.pinned)

    def store(self, into: torch.Tensor, start: int, batch: torch.Tensor) -> None:
        """Write a computed batch (on the device) into host states at rows start.."""
        self.moved["to host"] += batch.numel() * batch.element_size()
        into[start : start + batch.shape[0]].copy_(batch.detach())


class BlockCalls:
    """The call arguments of each attention kind of block (one kind for most models), and where
    their hidden states live (`placement`)."""

    def __init__(self, by_kind: dict[str | None, BlockCall], placement: Placement):
        self.by_kind = by_kind
        self.placement = placement

    def for_block(self, block: nn.Module) -> BlockCall:
        kind = attention_kind(block)
        if kind not in self.by_kind:
            raise RuntimeError(f"no captured call for blocks of attention kind {kind!r}")
        return self.by_kind[kind]


@dataclass
class BlockInputs:
    hidden: torch.Tensor
    """(n_windows, seq_len, hidden) input of block 0 for every window, on the host."""
    calls: BlockCalls
    """The rest of each block's call."""


def _without_cache(call: BlockCall) -> BlockCall:
    """No KV cache inside captured calls: blocks are re-run many times on the same positions."""
    from transformers.cache_utils import Cache

    args = tuple(None if isinstance(a, Cache) else a for a in call.args)
    kwargs = {k: (None if k in _CACHE_KEYS or isinstance(v, Cache) else v) for k, v in call.kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return BlockCall(args, kwargs)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and (a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    return a is b or a == b


def _same_call(a: BlockCall, b: BlockCall) -> bool:
    return _same_value(a.args, b.args) and _same_value(a.kwargs, b.kwargs)


@contextmanager
def _record_calls(blocks: list[nn.Module], store: list, stop_after_first: bool):
    """Pre-hooks that append (block index, hidden, BlockCall) for each block call; always removed."""

    def make_hook(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            store.append((index, hidden.detach(), BlockCall(tuple(args[1:]), rest)))
            if stop_after_first:
                raise _StopForward

        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _forward(model: nn.Module, input_ids: torch.Tensor, blocks: list[nn.Module], stop_after_first: bool) -> list:
    store: list = []
    with _record_calls(blocks[:1] if stop_after_first else blocks, store, stop_after_first):
        try:
            model(input_ids=input_ids, use_cache=False)
        except _StopForward:  # block 0 never ran: an offloaded one goes back (its forward hook did not fire)
            from .offload import block_offload

            block_offload(blocks[0]).release(blocks[0])
    if not store:
        raise RuntimeError("the capture hook on block 0 never fired: the model's forward skipped its blocks")
    return store


def capture_calls(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, BlockCalls]:
    """One forward of `input_ids` (1, seq): (block 0's input (1, seq, hidden) on the device, the
    calls by kind; their tensors stay on the device: masks and rotary tables are small)."""
    blocks = list(get_blocks(model))
    store = _forward(model, input_ids, blocks, stop_after_first=False)
    if len(store) != len(blocks):
        raise RuntimeError(f"the model's forward called {len(store)} of its {len(blocks)} blocks")
    by_kind: dict[str | None, BlockCall] = {}
    for index, _, call in store:
        kind = attention_kind(blocks[index])
        call = _without_cache(call)
        if kind not in by_kind:
            by_kind[kind] = call
        elif not _same_call(by_kind[kind], call):
            raise RuntimeError(
                f"blocks of one attention kind ({kind or 'the only kind'}) received different arguments "
                f"(block {index} differs): this architecture needs per-block calls, which are not supported."
            )
    return store[0][1], BlockCalls(by_kind, Placement(device=next(model.parameters()).device))


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> BlockInputs:
    """windows: (n, seq_len) token ids -> BlockInputs, the states on the host."""
    device = next(model.parameters()).device
    windows = windows.to(device)
    first, calls = capture_calls(model, windows[:1])
    blocks = list(get_blocks(model))
    hidden = calls.placement.empty((windows.shape[0], *first.shape[1:]), first.dtype)  # (n, seq, hidden)
    calls.placement.store(hidden, 0, first)
    for start in range(1, windows.shape[0], batch_size):
        batch = _forward(model, windows[start : start + batch_size], blocks, stop_after_first=True)[0][1]
        calls.placement.store(hidden, start, batch)
    return BlockInputs(hidden=hidden, calls=calls)


def run_block(block: nn.Module, hidden: torch.Tensor, calls: BlockCalls) -> torch.Tensor:
    """One block call; layers return a tensor or a tuple whose first item is the hidden state."""
    call = calls.for_block(block)
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def run_blocks(
    blocks: Iterable[nn.Module],
    hidden: torch.Tensor,
    calls: BlockCalls,
    batch_size: int = 8,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Run blocks in order over all windows, a batch at a time on the device. hidden: (n, seq,
    hidden) states on the host; returns the outputs, on the host too. Offloaded blocks run one
    at a time over every batch, so each is onloaded once (the same computations, in another order)."""
    from .offload import block_offload

    blocks = list(blocks)
    store = block_offload(blocks[0]) if blocks else None
    if store is not None and store.active and len(blocks) > 1:
        for block in blocks:
            with store.held([block]):
                hidden = run_blocks([block], hidden, calls, batch_size, should_stop)
        return hidden
    out = calls.placement.empty(tuple(hidden.shape), hidden.dtype)
    for start in range(0, hidden.shape[0], batch_size):
        if should_stop is not None and should_stop():
            raise Cancelled("stopped by the user")
        h = calls.placement.fetch(hidden[start : start + batch_size])  # (batch, seq, hidden)
        for block in blocks:
            h = run_block(block, h, calls)
        calls.placement.store(out, start, h)
    return out


class PrefixStates:
    """Calibration hidden states at a few block boundaries of the CURRENT model.

    A fusion round changes only blocks from its group's first block on, so the states before it
    stay valid, and the next round's group input continues from the nearest saved boundary instead
    of from the embeddings (the prefix was over half of a round's gradient-free passes). States are kept
    every `stride` blocks while they fit in `max_bytes` (they are as large as the calibration set).
    """

    def __init__(self, inputs: BlockInputs, stride: int, max_bytes: int = 2 << 30):
        self.inputs = inputs
        self.stride = max(1, stride)
        self.max_bytes = max_bytes
        self.saved: dict[int, torch.Tensor] = {}  # block index -> states at that block's input

    def at(
        self,
        blocks: list[nn.Module],
        depth: int,
        batch_size: int,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """States at the input of block `depth`, i.e. after blocks[:depth]; (n, seq, hidden)."""
        start = max((d for d in self.saved if d <= depth), default=0)
        hidden = self.saved.get(start, self.inputs.hidden)
        while start < depth:
            stop = min(depth, (start // self.stride + 1) * self.stride)
            hidden = run_blocks(blocks[start:stop], hidden, self.inputs.calls, batch_size, should_stop)
            start = stop
            if start % self.stride == 0 and start not in self.saved:
                used = sum(t.numel() * t.element_size() for t in self.saved.values())
                if used + hidden.numel() * hidden.element_size() <= self.max_bytes:
                    self.saved[start] = hidden
        return hidden

    def blocks_changed_from(self, depth: int) -> None:
        """Blocks at `depth` and after changed (or moved): forget the states that depended on them."""
        self.saved = {d: h for d, h in self.saved.items() if d <= depth}
