"""Zero-shot accuracy through lm-evaluation-harness (`lm-eval`), on a model held in memory.

Our model goes to lm-eval wrapped in its `HFLM` class, so nothing is saved and reloaded to be evaluated.
Two kinds of task:

- bundled (names start with "bundled"): built once from the evaluation split of the bundled Wikipedia
  excerpt by assets/make_tasks.py and shipped in assets/tasks/ as lm-eval task files (YAML + JSONL read with
  `dataset_path: json`). They need no network, ever.
- lm-eval's own (piqa, winogrande, hellaswag, arc_easy, arc_challenge, ...): their data comes from the
  Hugging Face Hub, so they fail at once, with one line, when the Hub cannot be reached.

Figures are lm-eval's: `acc`, `acc_norm` (log-likelihood divided by the continuation's length in bytes) and
their standard errors (sqrt(p(1-p)/(n-1))). `stderr` is acc_norm's where the task has it, else acc's.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn

from . import loading
from .errors import FuseGPTError

BUNDLED_PREFIX = "bundled"
BUNDLED_TASKS_DIR = Path(__file__).resolve().parents[1] / "assets" / "tasks"
PAPER_TASKS = ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge")  # arXiv 2411.14507's set
DEFAULT_BATCH_SIZE = 8
LIST_HINT = "see the names with `python -m fusegpt_core evaluate --tasks list`"


class TaskError(FuseGPTError):
    """An unknown task name, lm-eval missing, or a Hub task while the Hub cannot be reached."""


def _lm_eval():
    try:
        import lm_eval
    except ImportError as e:
        raise TaskError("zero-shot tasks need lm-eval; install it with `pip install -r requirements.txt`.") from e
    return lm_eval


def bundled_task_names() -> list[str]:
    """The offline tasks shipped in assets/tasks/, sorted."""
    return sorted(path.stem for path in BUNDLED_TASKS_DIR.glob(f"{BUNDLED_PREFIX}*/{BUNDLED_PREFIX}*.yaml"))


@functools.lru_cache(maxsize=1)
def _hub_task_manager():
    """lm-eval's index of its own tasks (reading its ~15,000 YAML files takes a few seconds: built once)."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager()


def hub_task_names() -> list[str]:
    """lm-eval's own tasks, groups and tags, sorted (their data comes from the Hub)."""
    return [name for name in _hub_task_manager().all_tasks if not name.startswith(BUNDLED_PREFIX)]


def task_names() -> list[str]:
    """Every task `evaluate_tasks` accepts: the bundled offline ones first, then lm-eval's."""
    return bundled_task_names() + hub_task_names()


def parse_tasks(tasks: str | Iterable[str]) -> list[str]:
    """'a,b' or ['a', 'b'] -> ['a', 'b'] (stripped, empty entries and repeats dropped, order kept)."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(item.strip() for item in items if item and item.strip()))
    if not names:
        raise TaskError(f"no task was named; {LIST_HINT}.")
    return names


def check_tasks(tasks: str | Iterable[str], limit: int | None = None) -> list[str]:
    """The task names, checked before any model is loaded: each must exist, and Hub tasks need the Hub.

    An unreachable Hub is found out with a two-second probe (no lm-eval import), so the error comes fast.
    """
    names = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise TaskError(f"the limit must be at least 1 item per task, got {limit}.")
    bundled = set(bundled_task_names())
    unknown_bundled = [n for n in names if n.startswith(BUNDLED_PREFIX) and n not in bundled]
    if unknown_bundled:
        raise TaskError(f"unknown task '{unknown_bundled[0]}': the offline tasks are {', '.join(sorted(bundled))}.")
    hub = [n for n in names if n not in bundled]
    if not hub:
        return names
    if not loading.hub_reachable():
        raise TaskError(
            f"the task(s) {', '.join(hub)} download their data from the Hugging Face Hub, which cannot be "
            f"reached; the offline tasks are {', '.join(sorted(bundled))}."
        )
    known = set(hub_task_names())
    unknown = [n for n in hub if n not in known]
    if unknown:
        raise TaskError(f"unknown task '{unknown[0]}'; {LIST_HINT}.")
    return names


def _datasets_cache() -> str:
    """Where `datasets` may write the Arrow copy of a task's JSONL: our cache folder, else a temporary one
    (a read-only home must not break an evaluation)."""
    try:
        folder = loading.user_cache_dir() / "datasets"
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return str(folder)
    except (FuseGPTError, OSError):
        pass
    return tempfile.mkdtemp(prefix="fusegpt-datasets-")


def bundled_task_config(name: str) -> dict[str, Any]:
    """The YAML config of a bundled task, its data file made absolute (the YAML's path is relative to the
    repository root) and its Arrow cache placed in our cache folder."""
    import yaml

    folder = BUNDLED_TASKS_DIR / name
    config = yaml.safe_load((folder / f"{name}.yaml").read_text(encoding="utf-8"))
    kwargs = dict(config.get("dataset_kwargs") or {})
    kwargs["data_files"] = {split: str(folder / Path(path).name) for split, path in kwargs["data_files"].items()}
    kwargs["cache_dir"] = _datasets_cache()
    config["dataset_kwargs"] = kwargs
    return config


def _figures(metrics: dict[str, Any], n: int | None) -> dict[str, Any]:
    """lm-eval's "acc,none" style keys -> acc, acc_norm, their stderrs, stderr (acc_norm's, else acc's), n."""

    def value(key: str) -> float | None:
        raw = metrics.get(f"{key},none")
        return float(raw) if isinstance(raw, (int, float)) else None  # lm-eval writes "N/A" when it has none

    acc, acc_norm = value("acc"), value("acc_norm")
    acc_stderr, acc_norm_stderr = value("acc_stderr"), value("acc_norm_stderr")
    return {
        "acc": acc,
        "acc_norm": acc_norm,
        "stderr": acc_norm_stderr if acc_norm is not None else acc_stderr,
        "acc_stderr": acc_stderr,
        "acc_norm_stderr": acc_norm_stderr,
        "n": n,
    }


def _no_env_info(results: dict) -> None:
    """Stands in for lm-eval's add_env_info during our calls."""


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: str | Iterable[str],
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[str], None] | None = None,
    samples: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy of an in-memory model on lm-eval tasks.

    Returns {"tasks": {name: {"acc", "acc_norm", "stderr", "acc_stderr", "acc_norm_stderr", "n"}},
    "limit", "seconds", "lm_eval"}; a group or tag name gives one entry per task in it. `limit`: the first
    N items of each task (a quick look; the standard errors grow accordingly). `samples`: instead of a
    limit, which items to evaluate, {task: [item indices]} (lm-eval's own argument; benchmarks use it to
    evaluate several models chunk by chunk).
    """
    names = check_tasks(tasks, limit)
    if limit is not None and samples is not None:
        raise TaskError("give a limit or the items to evaluate (samples), not both.")
    lm_eval = _lm_eval()
    import lm_eval.evaluator as lm_eval_evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    bundled = set(bundled_task_names())
    hub = [n for n in names if n not in bundled]
    # bundled tasks go in as whole config dicts (their data path resolved); Hub ones by name
    specs: list[Any] = [bundled_task_config(n) if n in bundled else n for n in names]
    manager = _hub_task_manager() if hub else TaskManager(include_defaults=False)
    if progress is not None:
        progress(f"zero-shot: {', '.join(names)}" + (f" (first {limit} items each)" if limit else ""))

    start = time.perf_counter()
    quiet = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # lm-eval warns about every pre-built model and unset option; keep errors only
        logger.setLevel(logging.ERROR)
    was_training = model.training
    # lm-eval adds an environment report to every result (torch's collect_env: pip, conda, nvidia-smi, ...
    # run as subprocesses, seconds per call); nothing here reads it, so it is skipped for this call
    add_env_info = getattr(lm_eval_evaluator, "add_env_info", None)
    if add_env_info is not None:
        lm_eval_evaluator.add_env_info = _no_env_info
    try:
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(
            model=wrapped,
            tasks=specs,
            limit=limit,
            samples=samples,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=1000,  # acc and acc_norm have closed-form stderrs; this only bounds other metrics
        )
    finally:
        if add_env_info is not None:
            lm_eval_evaluator.add_env_info = add_env_info
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
        model.train(was_training)  # HFLM puts the model in eval mode

    counts = results.get("n-samples", {})
    out = {
        name: _figures(metrics, (counts.get(name) or {}).get("effective"))
        for name, metrics in results["results"].items()
        if name in counts  # leaf tasks only: a group's line repeats its tasks' figures
    }
    return {
        "tasks": out,
        "limit": limit,
        "seconds": round(time.perf_counter() - start, 2),
        "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
    }


def evaluate_run(
    models: dict[str, nn.Module],
    tokenizer,
    tasks: str | Iterable[str],
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """evaluate_tasks on several models (e.g. original / dropped / result): {label: its "tasks" dict},
    plus the shared "limit" and per-model "seconds". A label whose model is the same object as an
    earlier one's reuses its figures."""
    out: dict[str, Any] = {"limit": limit, "seconds": {}}
    done: dict[int, str] = {}
    for label, model in models.items():
        if id(model) in done:
            out[label] = out[done[id(model)]]
            continue
        if progress is not None:
            progress(f"zero-shot accuracy of the {label} model")
        figures = evaluate_tasks(model, tokenizer, tasks, limit, batch_size)
        out[label] = figures["tasks"]
        out["seconds"][label] = figures["seconds"]
        done[id(model)] = label
    return out
