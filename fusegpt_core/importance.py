"""Block importance metrics, all on one set of windows so they can be compared.

Every metric returns one float per current block, and for every metric HIGHER means MORE
important: the block with the lowest score is the first candidate to remove.

- mi: Macro Influence (FuseGPT): 1 - mean_t cos(h_L[t], h_L^{without i}[t]), h_L the output of
  the last block (before the final norm).
- bi: Block Influence (ShortGPT): 1 - mean_t cos(h_i[t], h_{i+1}[t]).
- angular: angular distance between a block's input and output, arccos(cos)/pi, averaged.
- ppl: perplexity with block i skipped minus the dense perplexity (SLEB-style).

Skip variants reuse the cached prefix states: skipping block i starts from h_i, so one pass
costs L + L(L-1)/2 block forwards instead of the reference's L^2, with identical numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .adapters import get_blocks, get_final_norm
from .capture import BlockInputs, capture_block_inputs, run_block
from .errors import Cancelled
from .offload import block_offload

# The scoring settings the app starts with, its precomputed scores use (assets/make_precomputed.py), and
# its lesson and MCP tools score with: calibration text, tokens per window, windows, seed.
DEFAULT_SCORING = {"calib_source": "bundled", "seq_len": 128, "n_score": 4, "seed": 0}


@dataclass(frozen=True)
class MetricInfo:
    name: str
    label: str
    description: str
    needs_skip_runs: bool


METRICS: dict[str, MetricInfo] = {
    "mi": MetricInfo(
        "mi",
        "Macro Influence",
        "How much the model's final hidden state changes when the block is skipped (FuseGPT).",
        True,
    ),
    "bi": MetricInfo(
        "bi",
        "Block Influence",
        "How much the block changes its own input: 1 - cosine(input, output) (ShortGPT).",
        False,
    ),
    "angular": MetricInfo(
        "angular",
        "Angular distance",
        "Angle between the block's input and output hidden states, divided by pi (Gromov et al.).",
        False,
    ),
    "ppl": MetricInfo(
        "ppl",
        "Perplexity increase",
        "How much perplexity on the calibration text rises when the block is removed (SLEB-style).",
        True,
    ),
}


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Sum of per-token cosines over the hidden dim, and the token count. a, b: (batch, seq, hidden)."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1)  # (batch, seq)
    return cos.sum().item(), cos.numel()


def _angular_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1.0, 1.0)
    return (torch.arccos(cos) / math.pi).sum().item()


def _nll_sum(model: nn.Module, final_hidden: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL from the last block's output. final_hidden: (batch, seq, hidden)."""
    logits = model.get_output_embeddings()(get_final_norm(model)(final_hidden)).float()
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(logits.device), reduction="sum"
    )
    return loss.item(), ids[:, 1:].numel()


@torch.no_grad()
def score_blocks(
    model: nn.Module,
    windows: torch.Tensor,
    metrics: tuple[str, ...] | list[str] = ("mi",),
    use_cache: bool = True,
    batch_size: int = 4,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    inputs: BlockInputs | None = None,
) -> dict[str, list[float]]:
    """Score every current block. windows: (n, seq_len) token ids. Returns metric -> scores.

    `use_cache=False` runs the reference computation (every skip variant from block 0).
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {list(METRICS)}")
    blocks = list(get_blocks(model))
    n_blocks = len(blocks)
    if inputs is None:
        inputs = capture_block_inputs(model, windows, batch_size=batch_size)
    calls = inputs.calls
    need_skip = any(METRICS[m].needs_skip_runs for m in metrics)
    want_ppl = "ppl" in metrics

    cos_final = [0.0] * n_blocks  # sum over tokens of cos(h_L, h_L without i)
    cos_local = [0.0] * n_blocks
    ang_local = [0.0] * n_blocks
    nll_skip = [0.0] * n_blocks
    nll_dense = 0.0
    tokens = 0
    nll_tokens = 0
    n_batches = math.ceil(inputs.hidden.shape[0] / batch_size)
    total_steps = n_batches * (n_blocks + 1 if need_skip else 1)
    step = 0

    def tick():
        nonlocal step
        step += 1
        if should_stop is not None and should_stop():
            raise Cancelled("stopped by the user while scoring blocks")
        if on_progress is not None:
            on_progress(step, total_steps)

    store = block_offload(blocks[0])
    streamed = store.active and use_cache and need_skip  # offloaded blocks: each onloaded once per batch
    for b in range(n_batches):
        h0 = calls.placement.fetch(inputs.hidden[b * batch_size : (b + 1) * batch_size])  # (batch, seq, hidden)
        ids = windows[b * batch_size : (b + 1) * batch_size]
        if streamed:
            states, skipped = _streamed_pass(blocks, h0, calls, store, tick)
            final = states[-1]
        else:
            # states[i] is the input of block i; states[n_blocks] the final hidden state
            states = [h0]
            for block in blocks:
                states.append(run_block(block, states[-1], calls))
            final = states[-1]
        tick()
        batch_tokens = h0.shape[0] * h0.shape[1]
        tokens += batch_tokens
        for i in range(n_blocks):
            cos_local[i] += _mean_cos(states[i], states[i + 1])[0]
            ang_local[i] += _angular_sum(states[i], states[i + 1])
        if want_ppl:
            s, n = _nll_sum(model, final, ids)
            nll_dense += s
            nll_tokens += n
        if not need_skip:
            continue
        for i in range(n_blocks):
            if streamed:
                h = skipped[i]
            elif use_cache:
                h = states[i]  # the skipped block's input passes straight on
            else:
                h = h0
                for j in range(i):
                    h = run_block(blocks[j], h, calls)
            if not streamed:
                for j in range(i + 1, n_blocks):
                    h = run_block(blocks[j], h, calls)
            cos_final[i] += _mean_cos(final, h)[0]
            if want_ppl:
                nll_skip[i] += _nll_sum(model, h, ids)[0]
            if not streamed:
                tick()

    sums = {"mi": cos_final, "bi": cos_local, "angular": ang_local}
    return {m: _finish(m, sums, tokens, nll_skip, nll_dense, nll_tokens) for m in metrics}


def _streamed_pass(blocks, h0, calls, store, tick) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The dense pass and every skip variant of one batch with the blocks in the outer loop, each
    block onloaded once: the same block calls as the cached loop, in another order. Returns the
    dense states (input of each block, then the final one) and each variant's final state."""
    states, variants = [h0], {}  # variants[i]: the batch with block i skipped, through the blocks so far
    for j, block in enumerate(blocks):
        with store.held([block]):
            for i in variants:
                variants[i] = run_block(block, variants[i], calls)
            states.append(run_block(block, states[-1], calls))
        variants[j] = states[j]  # block j skipped: its input passes on to block j + 1
        tick()
    return states, [variants[i] for i in range(len(blocks))]


def _finish(metric, sums, tokens, nll_skip, nll_dense, nll_tokens) -> list[float]:
    """Per-block sums over tokens -> the metric's scores (higher = more important)."""
    if metric == "ppl":
        dense = math.exp(nll_dense / nll_tokens)
        return [math.exp(s / nll_tokens) - dense for s in nll_skip]
    if metric == "angular":
        return [a / tokens for a in sums["angular"]]
    return [1.0 - c / tokens for c in sums[metric]]  # mi, bi: 1 - mean cosine


def block_forward_count(n_blocks: int, use_cache: bool) -> int:
    """Block forwards per batch for one MI pass: L + L(L-1)/2 cached, L^2 reference."""
    if use_cache:
        return n_blocks + n_blocks * (n_blocks - 1) // 2
    return n_blocks * n_blocks


def rank_agreement(scores: dict[str, list[float]]) -> pd.DataFrame:
    """Spearman rank correlation between every pair of metrics (a square DataFrame)."""
    frame = pd.DataFrame({METRICS[m].label if m in METRICS else m: v for m, v in scores.items()})
    return frame.rank().corr(method="pearson")


def lowest(scores: list[float], exclude: set[int] | None = None) -> int:
    """Index of the least important block (ties: the earliest), skipping `exclude`."""
    exclude = exclude or set()
    candidates = [i for i in range(len(scores)) if i not in exclude]
    return min(candidates, key=lambda i: (scores[i], i))
