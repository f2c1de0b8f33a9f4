"""The plan: which blocks a run removes, in which order, and which blocks absorb each one.

`Plan` is the one place a plan changes: every edit (ticks, heatmap clicks, "let MI choose", custom
targets, a finished demo, an uploaded recipe) goes through one of its methods, each of which leaves
it consistent (targets only for planned blocks, blocks in removal order). No gradio here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fusegpt_core.config import validate_targets
from fusegpt_core.errors import PlanError
from fusegpt_core.fusion import plan_group
from fusegpt_core.selection import BlockIndex

MANUAL, AUTO = "manual", "auto"


def _score(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.inf


def removal_order(blocks: Sequence[int], scores: Sequence[float] | None) -> list[int]:
    """Chosen blocks in the order they will be removed: least important (by MI) first, else by index."""
    blocks = sorted({int(b) for b in blocks})
    if scores and len(scores) >= (max(blocks) + 1 if blocks else 0):
        return sorted(blocks, key=lambda b: (_score(scores[b]), b))
    return blocks


def lowest_blocks(scores: Sequence[float], k: int) -> list[int]:
    """The k least important blocks by a one-shot ranking (the iterative run may pick differently)."""
    order = sorted(range(len(scores)), key=lambda i: (_score(scores[i]), i))
    return sorted(order[: max(k, 0)])


@dataclass
class Plan:
    mode: str = MANUAL
    """'manual': remove `blocks` in order; 'auto': the run's metric chooses `remove` blocks."""
    blocks: list[int] = field(default_factory=list)
    """Original indices in removal order (manual mode)."""
    targets: dict[int, list[int]] = field(default_factory=dict)
    """Custom groups: removed block -> the blocks that absorb it (original indices)."""
    remove: int = 2
    """How many blocks the metric chooses (auto mode)."""

    @property
    def auto(self) -> bool:
        return self.mode == AUTO

    @property
    def count(self) -> int:
        """Blocks this plan removes."""
        return self.remove if self.auto else len(self.blocks)

    @property
    def empty(self) -> bool:
        """Nothing a visitor made by hand: no ticked block, no custom group."""
        return not self.blocks and not self.targets

    # ---- edits -------------------------------------------------------------------------------

    def pick(self, blocks: Sequence[int], scores: Sequence[float] | None = None) -> None:
        """Remove exactly `blocks` (least important first); custom targets of dropped blocks go."""
        self.mode = MANUAL
        self.blocks = removal_order(blocks, scores)
        self.targets = {b: t for b, t in self.targets.items() if b in self.blocks}

    def toggle(self, block: int, num_blocks: int, scores: Sequence[float] | None = None) -> None:
        """Add or take out one block (a heatmap click); a plan never removes every block."""
        if not 0 <= block < num_blocks:
            raise PlanError(f"block {block} does not exist: the model has blocks 0 to {num_blocks - 1}.")
        chosen = set(self.blocks) ^ {block}
        if len(chosen) >= num_blocks:
            chosen.discard(block)
        self.pick(chosen, scores)

    def pick_lowest(self, scores: Sequence[float], count: int) -> None:
        """Tick the `count` blocks MI ranks lowest; custom targets are cleared."""
        self.targets = {}
        self.pick(lowest_blocks(scores, count), scores)

    def let_metric_choose(self, count: int) -> None:
        self.mode, self.blocks, self.targets, self.remove = AUTO, [], {}, int(count)  # a run refuses < 1

    def set_targets(self, block: int, targets: Sequence[int], num_blocks: int) -> None:
        """Custom targets for one planned block, checked against the blocks still there at its turn."""
        if block not in self.blocks:
            raise PlanError(f"block {block} is not in the plan: tick it first.")
        targets = sorted({int(t) for t in targets})
        if not targets:
            raise PlanError(f"block {block} needs at least one target block.")
        validate_targets(block, targets, num_blocks)  # the core's own messages: itself, outside the model
        earlier = [t for t in targets if t not in self.allowed_targets(block, num_blocks)]
        if earlier:
            raise PlanError(f"fusion targets {earlier} of block {block} are removed by an earlier round of the plan.")
        self.targets[block] = targets

    def reset_targets(self, block: int) -> None:
        """Back to the reference window for `block`."""
        self.targets.pop(block, None)

    def replace_with(self, blocks: Sequence[int], targets: dict[int, list[int]] | None = None) -> None:
        """What a finished run removed, in its order (the demo, an uploaded recipe)."""
        self.mode, self.blocks = MANUAL, [int(b) for b in blocks]
        self.targets = {int(b): [int(t) for t in ts] for b, ts in (targets or {}).items() if int(b) in self.blocks}

    # ---- what it means -----------------------------------------------------------------------

    def allowed_targets(self, block: int, num_blocks: int) -> list[int]:
        """Blocks that can absorb `block`: every other block not removed by an earlier round."""
        earlier = set(self.blocks[: self.blocks.index(block)]) if block in self.blocks else set()
        return [i for i in range(num_blocks) if i != block and i not in earlier]

    def groups(self, num_blocks: int, group_size: int) -> dict[int, list[int]]:
        """Removed block -> its targets (original indices), as the pipeline will form them: the
        custom targets, else the reference window over the blocks left at that round."""
        index = BlockIndex(num_blocks)
        groups: dict[int, list[int]] = {}
        for b in self.blocks:
            if b not in index or len(index) < 2:
                continue
            p = index.current(b)
            if self.targets.get(b):
                groups[b] = list(self.targets[b])
            else:
                window = plan_group(p, len(index), max(2, min(group_size, len(index))))
                groups[b] = [index.original[t] for t in window]
            index.remove(p)
        return groups

    def recipe_fields(self) -> dict[str, Any]:
        """The recipe keys this plan sets: 'blocks', 'remove', 'fusion.targets'."""
        if self.auto:
            if self.remove < 1:
                raise PlanError("choose how many blocks to remove (at least 1).")
            return {"blocks": None, "remove": self.remove, "fusion.targets": None}
        if not self.blocks:
            raise PlanError("no block is chosen: tick blocks in the Plan tab, or let MI choose.")
        targets = {b: list(t) for b, t in self.targets.items() if b in self.blocks}
        return {"blocks": list(self.blocks), "remove": len(self.blocks), "fusion.targets": targets or None}

    def to_dict(self) -> dict[str, Any]:
        """For API clients (JSON keys are strings)."""
        return {
            "mode": self.mode,
            "blocks": list(self.blocks),
            "remove": self.remove,
            "targets": {str(b): t for b, t in self.targets.items()},
        }
