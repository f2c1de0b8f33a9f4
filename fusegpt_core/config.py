"""Every knob of a run, as dataclasses with per-field docs, validation and presets.

A `Recipe` holds everything needed to reproduce a run; it round-trips through JSON/YAML and
rejects unknown keys by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PlanError, RecipeError

METHODS = ("fusegpt", "drop", "drop+lora", "average")
LOSSES = ("kl", "mse", "token_mse", "cosine")
SELECTIONS = ("iterative", "one-shot")


@dataclass
class DataConfig:
    calib_source: str = "bundled"
    """Where calibration text comes from: 'bundled', 'pydoc', 'file:PATH', 'text:...', 'hf:wikitext2'."""
    eval_source: str = "bundled"
    """Where evaluation text comes from; the same source as calibration is split, never overlapping."""
    seq_len: int = 256
    """Tokens per window, for calibration, scoring and evaluation."""
    n_calib: int = 32
    """Windows used for group fine-tuning (the paper: 1024 x 2048 tokens)."""
    n_score: int = 4
    """Windows used to score block importance (the paper: the first 32 calibration windows)."""
    n_eval: int = 16
    """Windows used for perplexity (non-overlapping, from the start of the evaluation text)."""
    seed: int = 0
    """Seed for choosing calibration windows and initialising the fusion coefficients."""
    fallback_source: str | None = None
    """Used for calibration and evaluation when a Hugging Face source cannot be reached (offline, no
    cache); the report says so. None: an unreachable source is an error (the paper preset: 'bundled')."""


@dataclass
class FusionConfig:
    group_size: int = 8
    """Blocks in a fusion group, the removed one included (the paper: 8)."""
    coef_rank: int = 128
    """Rank r of the coefficient matrices C (out, r) and D (r, in)."""
    lora_rank: int = 128
    """Rank of the LoRA on each group block's own weights; 0 turns it off."""
    fuse_bias: bool = True
    """Inject the removed block's biases too (models with biases: Qwen2, GPT-2, OPT)."""
    targets: dict[int, list[int]] | None = None
    """Manual groups: removed block (original index) -> target blocks (original indices)."""


@dataclass
class DistillConfig:
    epochs: int = 8
    """Passes over the calibration windows per fusion round."""
    batch_size: int = 4
    """Windows per optimiser step."""
    lr_coef: float = 1e-2
    """Learning rate of the fusion coefficients C, D (and bias coefficients)."""
    lr_lora: float = 1e-3
    """Learning rate of the LoRA matrices and the group's norm weights."""
    lr_settled: float | None = None
    """Learning rate of coefficients trained in earlier rounds when their group trains again;
    None uses lr_lora (stable on CPU presets); the paper uses the coefficient rate. 0 keeps them
    frozen (not the paper's method; on CPU a step then rebuilds only the new fused terms)."""
    loss: str = "mse"
    """'kl' (the paper's KL over the batch dimension), 'mse', 'token_mse' (squared error relative to
    each teacher token's norm, so the attention-sink token does not dominate) or 'cosine'."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas (the paper's)."""
    grad_clip: float = 1.0
    """Gradient norm clip; 0 turns it off."""
    divergence_factor: float = 10.0
    """Roll the round back when, after the warm-up, a batch's loss exceeds this many times the
    warm-up's worst batch (or the loss is NaN or infinite)."""
    checkpoint: bool | None = None
    """Per-block gradient checkpointing during fine-tuning (one more forward per step, the same
    numbers, a group's activations down to one block's); None: on when the memory plan says the
    compute device is short (see memory.py)."""


@dataclass
class EvalConfig:
    measure_speed: bool = True
    """Measure decode tokens/s of the original and the result."""
    speed_tokens: int = 32
    """New tokens generated for the speed measurement."""


@dataclass
class Recipe:
    model: str = "bundled"
    """'bundled', a local folder, a .gguf file or a Hugging Face hub id."""
    method: str = "fusegpt"
    """'fusegpt', 'drop', 'drop+lora' or 'average'."""
    remove: int = 6
    """How many blocks to remove (ignored when `blocks` is given)."""
    rate: float | None = None
    """Fraction of the blocks to remove, ceil(L x rate) of L (the paper's 25%: 8 of Llama-2-7B's 32);
    when set it replaces `remove` (ignored when `blocks` is given)."""
    blocks: list[int] | None = None
    """Blocks to remove, by original index, in removal order; None lets the metric choose."""
    selection: str = "iterative"
    """'iterative' (re-score after each fusion, the paper), 'one-shot' (score once)."""
    metric: str = "mi"
    """Importance metric that chooses blocks: 'mi', 'bi', 'angular' or 'ppl'."""
    candidates: int = 1
    """Consider this many least important blocks and remove the one whose plain removal changes its
    group's output least (relative error on calibration windows); 1 is the paper's argmin."""
    use_prefix_cache: bool = True
    """Reuse prefix hidden states when scoring (about half the block forwards, identical numbers)."""
    device: str | None = None
    """'cpu', 'cuda' or None for automatic."""
    dtype: str | None = None
    """'float32', 'bfloat16' or None for automatic (bf16 on GPU, fp32 on CPU)."""
    data: DataConfig = field(default_factory=DataConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ---- validation -------------------------------------------------------------------------

    def validate(self, num_blocks: int | None = None) -> Recipe:
        """Raise PlanError naming the field and the bad value; returns self for chaining."""
        _check(self.method in METHODS, "method", self.method, f"one of {', '.join(METHODS)}")
        _check(self.selection in SELECTIONS, "selection", self.selection, "'iterative' or 'one-shot'")
        _check(self.metric in ("mi", "bi", "angular", "ppl"), "metric", self.metric, "mi, bi, angular or ppl")
        _check(self.distill.loss in LOSSES, "distill.loss", self.distill.loss, "kl, mse, token_mse or cosine")
        for name, value in [
            ("data.seq_len", self.data.seq_len),
            ("data.n_calib", self.data.n_calib),
            ("data.n_score", self.data.n_score),
            ("data.n_eval", self.data.n_eval),
            ("distill.epochs", self.distill.epochs),
            ("distill.batch_size", self.distill.batch_size),
            ("fusion.coef_rank", self.fusion.coef_rank),
            ("fusion.group_size", self.fusion.group_size),
            ("candidates", self.candidates),
        ]:
            _check(isinstance(value, int) and value >= 1, name, value, "a whole number of at least 1")
        _check(
            isinstance(self.fusion.lora_rank, int) and self.fusion.lora_rank >= 0,
            "fusion.lora_rank",
            self.fusion.lora_rank,
            "a whole number of at least 0",
        )
        _check(self.fusion.group_size >= 2, "fusion.group_size", self.fusion.group_size, "at least 2")
        if self.distill.loss == "kl":  # a softmax over a batch of one window is 1: the loss would be 0
            _check(
                self.distill.batch_size >= 2,
                "distill.batch_size",
                self.distill.batch_size,
                "at least 2 for the kl loss",
            )
            _check(self.data.n_calib >= 2, "data.n_calib", self.data.n_calib, "at least 2 for the kl loss")
        rates = [("distill.lr_coef", self.distill.lr_coef), ("distill.lr_lora", self.distill.lr_lora)]
        if self.distill.lr_settled not in (None, 0):  # 0: earlier rounds' coefficients stay frozen
            rates.append(("distill.lr_settled", self.distill.lr_settled))
        for name, value in rates:
            ok = isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < 10
            _check(ok, name, value, "a positive finite number below 10")
        _check(
            _number(self.distill.grad_clip) and self.distill.grad_clip >= 0,
            "distill.grad_clip",
            self.distill.grad_clip,
            "0 or more",
        )
        factor = self.distill.divergence_factor
        _check(_number(factor) and factor > 1, "distill.divergence_factor", factor, "a finite number above 1")
        betas = self.distill.betas
        ok = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas)
        _check(ok, "distill.betas", betas, "two numbers in [0, 1)")
        _check(
            isinstance(self.data.seed, int) and self.data.seed >= 0,
            "data.seed",
            self.data.seed,
            "a whole number of 0 or more",
        )
        _check(
            isinstance(self.eval.speed_tokens, int) and self.eval.speed_tokens >= 1,
            "eval.speed_tokens",
            self.eval.speed_tokens,
            "a whole number of at least 1",
        )
        if self.blocks is None and self.rate is not None:
            _check(_number(self.rate) and 0 < self.rate < 1, "rate", self.rate, "a fraction between 0 and 1")
        elif self.blocks is None:
            _check(isinstance(self.remove, int) and self.remove >= 1, "remove", self.remove, "at least 1")
        else:
            _check(isinstance(self.blocks, list), "blocks", self.blocks, "a list of block numbers")
        if num_blocks is not None:
            self.validate_for_model(num_blocks)
        return self

    def count(self, num_blocks: int) -> int:
        """How many blocks the run removes from a model of `num_blocks`."""
        if self.blocks is not None:
            return len(self.blocks)
        if self.rate is not None:
            return math.ceil(num_blocks * self.rate - 1e-9)  # 0.25 of 32 is 8, not 9 from rounding noise
        return self.remove

    def validate_for_model(self, num_blocks: int) -> None:
        """Checks that need the model's block count."""
        count = self.count(num_blocks)
        if count > num_blocks - 1:
            raise PlanError(
                f"cannot remove {count} of {num_blocks} blocks: at least one block must remain "
                f"(choose at most {max_removable(num_blocks)})."
            )
        if count == num_blocks - 1:
            raise PlanError(
                f"cannot remove {count} of {num_blocks} blocks: a single remaining block cannot absorb all the "
                f"others (choose at most {max_removable(num_blocks)})."
            )
        if self.blocks is not None:
            validate_block_list(self.blocks, num_blocks)
        if self.fusion.group_size > num_blocks:
            raise PlanError(
                f"fusion.group_size {self.fusion.group_size} is larger than the model's {num_blocks} blocks."
            )
        for removed, targets in (self.fusion.targets or {}).items():
            validate_targets(int(removed), targets, num_blocks)

    # ---- (de)serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["distill"]["betas"] = list(self.distill.betas)
        if self.fusion.targets is not None:
            d["fusion"]["targets"] = {str(k): list(v) for k, v in self.fusion.targets.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        if not isinstance(d, dict):
            raise RecipeError("a recipe must be a mapping of option names to values.")
        return _build(cls, d, prefix="")

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file '{path}' does not exist.")
        text = path.read_text(encoding="utf-8", errors="replace")
        is_yaml = path.suffix.lower() in (".yaml", ".yml")
        try:
            if is_yaml:
                import yaml

                d = yaml.safe_load(text)
            else:
                d = json.loads(text)
        except Exception as e:  # malformed file: one line naming the file and the parser's complaint
            raise RecipeError(
                f"recipe file '{path}' is not valid {'YAML' if is_yaml else 'JSON'}: {_parse_problem(e)}"
            ) from None
        if isinstance(d, dict) and "recipe" in d and "dense_ppl" in d:
            d = d["recipe"]  # a report.json also works as a recipe
        return cls.from_dict(d)


def _parse_problem(error: Exception) -> str:
    """A parser's complaint on one line (YAML's spans several, with a caret drawing)."""
    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(error).split())[:300]


def _number(value: Any) -> bool:
    """A finite real number (bool excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise PlanError(f"{name} = {value!r} is not valid: expected {expected}.")


def max_removable(num_blocks: int) -> int:
    """The most blocks a run may remove: two must remain (a single block cannot absorb all others)."""
    return max(num_blocks - 2, 0)


def check_seq_len(seq_len: int, model_config, name: str = "data.seq_len") -> None:
    """Refuse windows longer than the model's position table (GPT-2 and OPT would index past it)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0 and seq_len > limit:
        raise PlanError(
            f"{name} = {seq_len} is longer than the {limit} positions the model knows; choose at most {limit}."
        )


def validate_block_list(blocks: list[int], num_blocks: int) -> None:
    for b in blocks:
        if not isinstance(b, int) or not 0 <= b < num_blocks:
            raise PlanError(f"block {b!r} does not exist: the model has blocks 0 to {num_blocks - 1}.")
    if len(set(blocks)) != len(blocks):
        dup = sorted({b for b in blocks if blocks.count(b) > 1})
        raise PlanError(f"block(s) {dup} are listed more than once.")
    if len(blocks) >= num_blocks:
        raise PlanError(f"cannot remove all {num_blocks} blocks: at least one must remain.")


def validate_targets(removed: int, targets: list[int], num_blocks: int) -> None:
    if not targets:
        raise PlanError(f"block {removed} has an empty list of fusion targets.")
    for t in targets:
        if not isinstance(t, int) or not 0 <= t < num_blocks:
            raise PlanError(f"fusion target {t!r} of block {removed} is outside the model (0 to {num_blocks - 1}).")
        if t == removed:
            raise PlanError(f"block {removed} cannot be fused into itself: choose neighbouring blocks as targets.")
    if len(set(targets)) != len(targets):
        raise PlanError(f"fusion targets of block {removed} list a block more than once.")


def _build(cls, d: dict[str, Any], prefix: str):
    """Build a (nested) dataclass from a dict, rejecting unknown keys by their dotted name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key not in fields:
            raise RecipeError(f"unknown recipe key '{prefix}{key}' (known: {', '.join(sorted(fields))}).")
        sub = _NESTED.get(key) if cls is Recipe else None
        if sub is not None:
            if not isinstance(value, dict):
                raise RecipeError(f"recipe key '{prefix}{key}' must be a mapping.")
            kwargs[key] = _build(sub, value, prefix=f"{prefix}{key}.")
        elif key == "betas":
            try:
                kwargs[key] = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise RecipeError(f"recipe key '{prefix}{key}' must be two numbers, got {value!r}.") from None
        elif key == "targets" and value is not None:
            try:
                kwargs[key] = {int(k): [int(t) for t in v] for k, v in value.items()}
            except (AttributeError, TypeError, ValueError):
                raise RecipeError(
                    f"recipe key '{prefix}{key}' must map a removed block to a list of target blocks, "
                    f'e.g. {{"5": [3, 4, 6]}}; got {value!r}.'
                ) from None
        else:
            kwargs[key] = value
    return cls(**kwargs)


_NESTED = {"data": DataConfig, "fusion": FusionConfig, "distill": DistillConfig, "eval": EvalConfig}


def preset(name: str, **overrides: Any) -> Recipe:
    """A named starting point. 'cpu-demo' is tuned for 2 CPU cores; 'paper' follows arXiv 2411.14507."""
    if name == "cpu-demo":
        # tuned on the bundled model (benchmarks/sweep_round.py, README "Results"): token_mse beats
        # MSE (ruled by the attention-sink token); fresh data beats repeated epochs (256 windows seen
        # once beat 32 seen 8 times at the same 128 steps, 384 beat 256); coefficient rank 64 beats 32
        # (96 and 128 did not beat 64); batch 2 beats 4; lr 1e-2 beats 5e-3, 1.3e-2 and 2e-2; freezing
        # earlier rounds' coefficients (lr_settled=0) makes later rounds' steps about twice as fast for
        # a small loss, and the time buys more data; absorbability-aware selection among the 3 lowest-MI
        # blocks
        recipe = Recipe(
            candidates=3,
            data=DataConfig(seq_len=128, n_calib=320, n_score=4, n_eval=16),
            fusion=FusionConfig(coef_rank=64, lora_rank=16),
            distill=DistillConfig(epochs=1, batch_size=2, lr_coef=1e-2, lr_lora=1e-3, lr_settled=0, loss="token_mse"),
        )
    elif name == "quick":  # the app's first run: cpu-demo's recipe on a fifth of its calibration data
        recipe = preset("cpu-demo")
        recipe.data.n_calib = 64
    elif name == "tiny":  # for tests and a first look: seconds, not minutes
        recipe = Recipe(
            remove=2,
            data=DataConfig(seq_len=64, n_calib=8, n_score=2, n_eval=4),
            fusion=FusionConfig(group_size=4, coef_rank=8, lora_rank=4),
            distill=DistillConfig(epochs=2, batch_size=4, lr_coef=3e-2, lr_lora=1e-3, loss="mse"),
            eval=EvalConfig(measure_speed=False),
        )
    elif name == "paper":
        recipe = Recipe(
            remove=8,
            dtype=None,
            rate=0.25,
            data=DataConfig(
                calib_source="hf:wikitext2",
                eval_source="hf:wikitext2",
                fallback_source="bundled",
                seq_len=2048,
                n_calib=1024,
                n_score=32,
                n_eval=64,
            ),
            fusion=FusionConfig(group_size=8, coef_rank=128, lora_rank=128),
            distill=DistillConfig(epochs=20, batch_size=8, lr_coef=1e-3, lr_lora=9.65e-6, lr_settled=1e-3, loss="kl"),
        )
    else:
        raise RecipeError(f"unknown preset '{name}' (known: {', '.join(PRESETS)}).")
    d = recipe.to_dict()
    if "remove" in overrides and "rate" not in overrides:
        d["rate"] = None  # a count asked for replaces the preset's rate
    for key, value in overrides.items():
        _set_dotted(d, key, value)
    return Recipe.from_dict(d)


PRESETS = ("quick", "cpu-demo", "tiny", "paper")
PRESET_INFO = {
    "quick": "a first fusion in a few minutes on a laptop CPU: cpu-demo's settings on 64 calibration windows",
    "cpu-demo": "the tuned CPU recipe (README 'Results'): 320 windows per round, about 2 min per block on 2 cores",
    "tiny": "seconds: for tests and a look at the workflow; repairs little",
    "paper": "arXiv 2411.14507's setting (1024 x 2048-token windows, 20 epochs): for a GPU",
}


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        if p not in d or not isinstance(d[p], dict):
            raise RecipeError(f"unknown recipe key '{key}'.")
        d = d[p]
    d[parts[-1]] = value
