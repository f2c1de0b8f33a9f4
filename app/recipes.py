"""Widget values -> a core `Recipe`, and the table of knobs the Run tab shows. No gradio here.

The UI builds one widget per `Knob` in `KNOBS` order and hands the values back in that order, so
the recipe builder and the widgets can never disagree about which value is which.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusegpt_core.config import METHODS, PRESETS, Recipe, preset
from fusegpt_core.errors import DataError, PlanError

from .plan import Plan


@dataclass(frozen=True)
class Knob:
    key: str
    """Dotted recipe key, e.g. 'distill.epochs'."""
    label: str
    kind: str
    """'int', 'float', 'bool', 'choice' or 'pair' (two numbers typed as "0.9, 0.95")."""
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
    Knob(
        "candidates",
        "Candidates per round",
        "int",
        "1 = the lowest-scored block (the paper); n = of the n lowest, the one its group feels least",
        minimum=1,
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
    Knob("distill.betas", "Adam betas", "pair", "two numbers (paper: 0.9, 0.95)"),
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
    values = [_get_dotted(d, k) for k in KNOB_KEYS]
    return [", ".join(f"{v:g}" for v in value) if knob.kind == "pair" else value for knob, value in zip(KNOBS, values)]


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
    if knob.kind == "pair":
        try:
            pair = [float(v) for v in str(value).replace(",", " ").split()]
        except ValueError:
            pair = []
        if len(pair) != 2:
            raise PlanError(f"'{knob.label}' ({knob.key}) = {value!r}: type two numbers, e.g. 0.9, 0.95.")
        return pair
    return value


def build_recipe(
    *,
    model: str,
    preset_name: str,
    method: str,
    plan: Plan,
    knobs: Sequence[Any],
    calib_source: str,
    device: str | None,
    dtype: str | None,
    num_blocks: int | None = None,
) -> Recipe:
    """A validated Recipe from the Run tab's values and the plan.

    In auto mode the metric picks `plan.remove` blocks during the run; in manual mode the planned
    blocks are removed in order. With `num_blocks`, a group is never wider than the model (a 6-block
    model gets groups of at most 6) and the plan is checked against the model."""
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
            **plan.recipe_fields(),
        }
    )
    if num_blocks:
        overrides["fusion.group_size"] = min(overrides["fusion.group_size"], num_blocks)
    recipe = preset(preset_name, **overrides)
    return recipe.validate(num_blocks=num_blocks)


# ---- what a session remembers of the widgets ------------------------------------------------------


TEXT_KINDS = ("bundled corpus", "paste text", "upload a file", "hub dataset")
HUB_DATASETS = ("wikitext2", "c4", "ptb")


@dataclass
class TextChoice:
    """The text used for scoring, the drop preview and runs (one choice for all three)."""

    kind: str = TEXT_KINDS[0]
    pasted: str = ""
    upload: str | None = None
    dataset: str = HUB_DATASETS[0]

    def source(self) -> str:
        """The core's data source string; DataError when the choice is incomplete."""
        if self.kind == "bundled corpus":
            return "bundled"
        if self.kind == "paste text":
            if not self.pasted or len(self.pasted.strip()) < 200:
                raise DataError("the pasted text is too short: paste at least a few paragraphs (200+ characters).")
            return "text:" + self.pasted
        if self.kind == "upload a file":
            if not self.upload:
                raise DataError("no file uploaded: drop a .txt file on the upload box first.")
            return f"file:{self.upload}"
        if self.kind == "hub dataset":
            return f"hf:{self.dataset}"
        raise DataError(f"unknown text source '{self.kind}'.")

    def describe(self) -> str:
        """'the bundled corpus', 'pasted text (1,234 characters)', ..."""
        if self.kind == "paste text":
            return (
                f"pasted text ({len(self.pasted.strip()):,} characters)"
                if self.pasted.strip()
                else "pasted text (empty)"
            )
        if self.kind == "upload a file":
            return f"uploaded file {Path(self.upload).name}" if self.upload else "an uploaded file (none yet)"
        if self.kind == "hub dataset":
            return f"hub dataset {self.dataset}"
        return "the bundled corpus"

    @classmethod
    def from_source(cls, source: str) -> TextChoice | None:
        """The choice that gives `source`; None for pasted text and files (not in a recipe file)."""
        if source in ("bundled", "pydoc"):
            return cls()
        if source.startswith("hf:") and source[3:] in HUB_DATASETS:
            return cls(kind="hub dataset", dataset=source[3:])
        return None


DEFAULT_PRESET = "quick"


@dataclass
class RunSettings:
    """The Run tab's choices, kept per session: a reload shows what the next Run will use."""

    preset: str = DEFAULT_PRESET
    method: str = "fusegpt"
    baselines: list[str] = field(default_factory=list)
    knobs: list[Any] = field(default_factory=lambda: preset_values(DEFAULT_PRESET))

    def value(self, key: str) -> Any:
        return self.knobs[KNOB_KEYS.index(key)]

    def int_value(self, key: str, default: int) -> int:
        try:
            return int(float(self.value(key)))
        except (TypeError, ValueError):
            return default

    @classmethod
    def from_recipe(cls, recipe: Recipe, preset_name: str = DEFAULT_PRESET) -> RunSettings:
        return cls(preset=preset_name, method=recipe.method, baselines=[], knobs=knob_values(recipe))


def effective_knobs(preset_name: str, knobs: Sequence[Any]) -> list[Any]:
    """The knob values a run uses: those shown, except that an API call which names another preset
    but leaves every setting at the page's defaults gets that preset's settings."""
    knobs = list(knobs)
    if preset_name != DEFAULT_PRESET and preset_name in PRESETS and knobs == preset_values(DEFAULT_PRESET):
        return preset_values(preset_name)
    return knobs


def cli_command(recipe_file: str = "recipe.json") -> str:
    """The command line that reproduces a run from its recipe file."""
    return f"python -m fusegpt_core fuse --recipe {shlex.quote(recipe_file)} --out fused-model"
