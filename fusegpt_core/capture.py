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
