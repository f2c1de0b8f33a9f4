"""Which block goes next: the selection strategies, and the map between current and original indices.

A run removes one block per round. Before each round a strategy says whether it needs fresh
importance scores of the CURRENT model, then ranks the blocks still present, most removable
first (current indices):

- manual: the user's list, in the user's order (never scores);
- iterative (the paper): re-score every block of the current model each round, rank by score;
- one-shot: score once, on the original model; every round ranks the remaining blocks by those
  first scores.

`candidates` > 1 works on top of iterative and one-shot alike: among the first `candidates`
blocks of the ranking, the round removes the one whose plain removal its group feels least
(`removal_error`, measured on the current model). One-shot with candidates therefore still scores
once, and never looks up a block an earlier round removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .adapters import get_blocks
from .capture import BlockInputs, run_blocks
from .distill import group_loss
from .errors import PlanError
from .fusion import group_span, plan_group

PROBE_WINDOWS = 8  # calibration windows that measure a candidate's removal error


class BlockIndex:
    """Current position <-> original block index, as rounds remove blocks.

    `original[c]` is the original index of the block now at position c. The engine and the app's
    plan views both use it, so they can never disagree about which block is which."""

    def __init__(self, num_blocks: int):
        self.original: list[int] = list(range(num_blocks))
        self.num_original = num_blocks

    def __len__(self) -> int:
        return len(self.original)

    def __contains__(self, original: int) -> bool:
        return original in self.original

    def current(self, original: int) -> int:
        """Where original block `original` is now; PlanError if an earlier round removed it."""
        if original not in self.original:
            raise PlanError(f"block {original} was already removed in an earlier round.")
        return self.original.index(original)

    def remove(self, current: int) -> int:
        """Forget the block at position `current`; returns its original index."""
        return self.original.pop(current)

    def by_original(self, values: Sequence[float]) -> list[float | None]:
        """Values per current block -> a list over original blocks (None for removed ones)."""
        out: list[float | None] = [None] * self.num_original
        for current, original in enumerate(self.original):
            out[original] = values[current]
        return out


def rank_by_score(scores: Sequence[float]) -> list[int]:
    """Indices by ascending score (least important first); ties: the earlier block first."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))


class Manual:
    """The user's blocks (original indices) in the user's order."""

    def __init__(self, blocks: Sequence[int]):
        self.blocks = list(blocks)

    def wants_scores(self, round_index: int) -> bool:
        return False

    def ranked(self, round_index: int, index: BlockIndex, scores: Sequence[float] | None) -> list[int]:
        return [index.current(self.blocks[round_index])]


class Iterative:
    """Re-score the current model every round and rank by its scores (the paper's method)."""

    def wants_scores(self, round_index: int) -> bool:
        return True

    def ranked(self, round_index: int, index: BlockIndex, scores: Sequence[float] | None) -> list[int]:
        return rank_by_score(scores)


class OneShot:
    """Score the original model once; every round ranks the remaining blocks by those scores."""

    def __init__(self):
        self.first_scores: list[float | None] | None = None  # by original index

    def wants_scores(self, round_index: int) -> bool:
        return self.first_scores is None

    def ranked(self, round_index: int, index: BlockIndex, scores: Sequence[float] | None) -> list[int]:
        if self.first_scores is None:
            self.first_scores = index.by_original(scores)
        return rank_by_score([self.first_scores[original] for original in index.original])


def strategy(selection: str, blocks: Sequence[int] | None):
    """The strategy for a recipe's `selection` and `blocks`."""
    if blocks is not None:
        return Manual(blocks)
    return OneShot() if selection == "one-shot" else Iterative()


@torch.no_grad()
def removal_error(model: nn.Module, inputs: BlockInputs, p: int, targets: list[int], batch_size: int) -> float:
    """Relative squared error of the group's output when block p is simply skipped, per token
    (||student_t - teacher_t||^2 / ||teacher_t||^2, averaged over the probe windows' tokens):
    comparable across depths, and not ruled by the attention-sink token's huge activations."""
    lo, hi = group_span(p, targets)
    blocks = list(get_blocks(model))
    group_in = run_blocks(blocks[:lo], inputs.hidden[:PROBE_WINDOWS], inputs.calls, batch_size)  # (probe, seq, hidden)
    teacher = run_blocks(blocks[lo : hi + 1], group_in, inputs.calls, batch_size)
    student = [b for i, b in enumerate(blocks[lo : hi + 1], lo) if i != p]
    return group_loss(student, group_in, teacher, inputs.calls, "token_mse", batch_size)


def most_absorbable(
    model: nn.Module, inputs: BlockInputs, candidates: Sequence[int], group_size: int, batch_size: int
) -> tuple[int, dict[int, float]]:
    """Among `candidates` (current indices, most removable first), the block whose removal its
    group feels least (ties: the earlier candidate), and every candidate's removal error."""
    n = len(get_blocks(model))
    errors = {c: removal_error(model, inputs, c, plan_group(c, n, group_size), batch_size) for c in candidates}
    return min(candidates, key=lambda c: (errors[c], list(candidates).index(c))), errors
