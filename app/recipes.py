"""Widget values -> a core `Recipe`, and the table of knobs the Run tab shows. No gradio here.

The UI builds one widget per `Knob` in `KNOBS` order and hands the values back in that order, so
the recipe builder and the widgets can never disagree about which value is which.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fusegpt_core.config import METHODS, PRESETS, Recipe, preset
from fusegpt_core.errors import PlanError


@dataclass(frozen=True)
class Knob:
    key: str
    """Dotted recipe key, e.g. 'distill.epochs'."""
    label: str
    kind: str
    """'int', 'float', 'bool' or 'choice'."""
    info: str = ""
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    optional: bool = False
    """An empty field means None (the recipe's own default), not a mistake."""


KNOBS: tuple[Knob, ...] = (
    Knob(
        "selection",
        "Block selection",
        "choice",
        "iterative: re-score after each fusion (the paper)",
        ("iterative", "one-shot"),
    ),
    Knob(
        "metric",
        "Metric that chooses blocks",
        "choice",
        "used when the plan lets the metric choose",
        ("mi", "bi", "angular", "ppl"),
    ),
    Knob("use_prefix_cache", "Reuse prefix states when scoring", "bool", "same numbers, about half the work"),
    Knob("data.seq_len", "Tokens per window", "int", "calibration, scoring and evaluation", minimum=8),
    Knob("data.n_calib", "Calibration windows", "int", "for group fine-tuning (paper: 1024)", minimum=1),
    Knob("data.n_score", "Scoring windows", "int", "for importance (paper: 32)", minimum=1),
    Knob("data.n_eval", "Evaluation windows", "int", "for perplexity", minimum=1),
    Knob("data.seed", "Seed", "int", minimum=0),
    Knob(
        "fusion.group_size",
        "Group size",
        "int",
        "blocks per fusion group, the removed one included (paper: 8)",
        minimum=2,
    ),
    Knob("fusion.coef_rank", "Coefficient rank r", "int", "rank of C·D (paper: 128)", minimum=1),
    Knob("fusion.lora_rank", "LoRA rank", "int", "on each group block's own weights; 0 = off", minimum=0),
    Knob("fusion.fuse_bias", "Fuse biases too", "bool", "models with biases (Qwen2, GPT-2, OPT)"),
    Knob(
        "distill.epochs",
        "Epochs per round",
        "int",
        "passes over the calibration windows (paper: 20)",
        minimum=1,
    ),
    Knob("distill.batch_size", "Batch size", "int", "windows per optimiser step", minimum=1),
    Knob("distill.lr_coef", "Learning rate: coefficients", "float", "C, D (paper: 1e-3)"),
    Knob("distill.lr_lora", "Learning rate: LoRA + norms", "float", "(paper: 9.65e-6)"),
    Knob(
        "distill.lr_settled",
        "Learning rate: earlier rounds' coefficients",
        "float",
        "when their group trains again (paper: 1e-3); 0 = frozen, faster on CPU; empty = the LoRA rate",
        minimum=0,
        optional=True,
    ),
    Knob(
        "distill.loss",
        "Loss",
        "choice",
        "kl: the paper's, over the batch dimension; token_mse: error relative to each token's norm",
        ("mse", "token_mse", "kl", "cosine"),
    ),
    Knob("distill.grad_clip", "Gradient clip", "float", "0 = off", minimum=0),
    Knob(
        "distill.divergence_factor",
        "Roll back when loss grows by",
        "float",
        "times the warm-up's worst batch",
        minimum=1,
    ),
    Knob("eval.measure_speed", "Measure decode speed", "bool"),
    Knob("eval.speed_tokens", "Tokens for the speed test", "int", minimum=1),
)
KNOB_KEYS = tuple(k.key for k in KNOBS)


def _get_dotted(d: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        d = d[part]
    return d


def knob_values(recipe: Recipe) -> list[Any]:
    """The recipe's value for each knob, in KNOBS order (to fill the widgets from a preset)."""
    d = recipe.to_dict()
    return [_get_dotted(d, k) for k in KNOB_KEYS]


def preset_values(name: str) -> list[Any]:
    return knob_values(preset(name))


def _coerce(knob: Knob, value: Any) -> Any:
    if knob.kind == "int":
        if value is None or value == "":
            raise PlanError(f"'{knob.label}' ({knob.key}) is empty: type a whole number.")
        as_float = float(value)
        if as_float != int(as_float):
            raise PlanError(f"'{knob.label}' ({knob.key}) = {value} is not a whole number.")
        return int(as_float)
    if knob.kind == "float":
        if knob.optional and (value is None or value == ""):
            return None
        if value is None or value == "":
            raise PlanError(f"'{knob.label}' ({knob.key}) is empty: type a number.")
        return float(value)
    if knob.kind == "bool":
        return bool(value)
    return value


def build_recipe(
    *,
    model: str,
    preset_name: str,
    method: str,
    plan: dict[str, Any],
    knobs: Sequence[Any],
    calib_source: str,
    device: str | None,
    dtype: str | None,
    remove: int | None = None,
    num_blocks: int | None = None,
) -> Recipe:
    """A validated Recipe from widget values.

    plan: {'mode': 'manual' | 'auto', 'blocks': [original indices, removal order],
           'targets': {removed: [targets]} (custom groups only)}.
    In 'auto' mode the metric picks `remove` blocks during the run; in 'manual' mode the listed
    blocks are removed in the listed order. With `num_blocks`, a group is never wider than the
    model (a 6-block model gets groups of at most 6) and the plan is checked against the model."""
    if preset_name not in PRESETS:
        raise PlanError(f"unknown preset '{preset_name}'; choose one of {', '.join(PRESETS)}.")
    if method not in METHODS:
        raise PlanError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}.")
    if len(knobs) != len(KNOBS):
        raise PlanError(f"expected {len(KNOBS)} settings, got {len(knobs)}.")
    overrides = {k.key: _coerce(k, v) for k, v in zip(KNOBS, knobs)}
    overrides.update(
        {
            "model": model,
            "method": method,
            "device": None if device in (None, "", "auto") else device,
            "dtype": None if dtype in (None, "", "auto") else dtype,
            "data.calib_source": calib_source,
            "data.eval_source": calib_source,
        }
    )
    mode = plan.get("mode", "manual")
    if mode == "manual":
        blocks = [int(b) for b in plan.get("blocks") or []]
        if not blocks:
            raise PlanError("no block is chosen: tick blocks in the Plan tab, or let MI choose.")
        overrides["blocks"] = blocks
        overrides["remove"] = len(blocks)
        targets = {int(k): [int(t) for t in v] for k, v in (plan.get("targets") or {}).items() if int(k) in blocks}
        overrides["fusion.targets"] = targets or None
    else:
        if not remove or int(remove) < 1:
            raise PlanError("choose how many blocks to remove (at least 1).")
        overrides["blocks"] = None
        overrides["remove"] = int(remove)
        overrides["fusion.targets"] = None
    if num_blocks:
        overrides["fusion.group_size"] = min(overrides["fusion.group_size"], num_blocks)
    recipe = preset(preset_name, **overrides)
    return recipe.validate(num_blocks=num_blocks)


def cli_command(recipe_file: str = "recipe.json") -> str:
    """The command line that reproduces a run from its recipe file."""
    return f"python -m fusegpt_core fuse --recipe {shlex.quote(recipe_file)} --out fused-model"
