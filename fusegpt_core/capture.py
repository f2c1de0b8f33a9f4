"""Capture what the first block receives, and run blocks on captured states.

Recent transformers pass more than hidden states into each decoder layer (rotary
`position_embeddings`, masks, cache positions). We capture the full call of block 0 once, with
a pre-hook inside a context manager that always removes it, and reuse its kwargs for every block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import get_blocks
from .errors import Cancelled


class _StopForward(Exception):
    """Raised by the capture hook to skip the rest of the model; never leaves this module."""


@dataclass
class BlockInputs:
    hidden: torch.Tensor
    """(n_windows, seq_len, hidden) input of block 0 for every window."""
    kwargs: dict[str, Any]
    """Keyword arguments of a block call, captured with batch 1 so they broadcast to any batch."""


@contextmanager
def _capture_first_block(model: nn.Module, store: dict[str, Any]):
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        store["hidden"] = hidden.detach()
        store["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = get_blocks(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _call_until_first_block(model: nn.Module, input_ids: torch.Tensor) -> dict[str, Any]:
    store: dict[str, Any] = {}
    with _capture_first_block(model, store):
        try:
            model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
    if "hidden" not in store:
        raise RuntimeError("the capture hook on block 0 never fired: the model's forward skipped its blocks")
    return store


def block_kwargs_for(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    out["use_cache"] = False
    for key in ("past_key_values", "past_key_value", "layer_past", "cache"):
        if key in out:
            out[key] = None
    return out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> BlockInputs:
    """windows: (n, seq_len) token ids -> BlockInputs on the model's device."""
    device = next(model.parameters()).device
    windows = windows.to(device)
    first = _call_until_first_block(model, windows[:1])
    hidden = [first["hidden"]]
    for start in range(1, windows.shape[0], batch_size):
        hidden.append(_call_until_first_block(model, windows[start : start + batch_size])["hidden"])
    return BlockInputs(hidden=torch.cat(hidden), kwargs=block_kwargs_for(first["kwargs"]))


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """One block call; layers return a tensor or a tuple whose first item is the hidden state."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def run_blocks(
    blocks: Iterable[nn.Module],
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
    batch_size: int = 8,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Run blocks in order over all windows, a batch at a time. hidden: (n, seq, hidden)."""
    blocks = list(blocks)
    outs = []
    for start in range(0, hidden.shape[0], batch_size):
        if should_stop is not None and should_stop():
            raise Cancelled("stopped by the user")
        h = hidden[start : start + batch_size]
        for block in blocks:
            h = run_block(block, h, kwargs)
        outs.append(h)
    return torch.cat(outs) if outs else hidden[:0]


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
            hidden = run_blocks(blocks[start:stop], hidden, self.inputs.kwargs, batch_size, should_stop)
            start = stop
            if start % self.stride == 0 and start not in self.saved:
                used = sum(t.numel() * t.element_size() for t in self.saved.values())
                if used + hidden.numel() * hidden.element_size() <= self.max_bytes:
                    self.saved[start] = hidden
        return hidden

    def blocks_changed_from(self, depth: int) -> None:
        """Blocks at `depth` and after changed (or moved): forget the states that depended on them."""
        self.saved = {d: h for d, h in self.saved.items() if d <= depth}
