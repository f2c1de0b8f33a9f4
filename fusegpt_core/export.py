"""Export a compressed model as a stock Hugging Face folder, with its recipe, report and card.

Writes go to a hidden temporary folder beside the destination and are renamed into place only
when complete, so a crash, a full disk or a kill never leaves a folder that looks finished.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import FuseGPTError
from .fused_linear import FusedLinear, fold_fused_linears
from .offload import offload_of

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class ExportError(FuseGPTError):
    """The export folder exists, the name is unsafe, or the disk is full."""


def safe_export_dir(base_dir: str | Path, name: str) -> Path:
    """base_dir / name, refusing names that could escape base_dir (/, .., hidden, odd characters)."""
    name = (name or "").strip()
    if not _SAFE_NAME.match(name) or ".." in name:
        raise ExportError(
            f"export name {name!r} is not allowed: use letters, digits, '.', '_' and '-' only (no '/' or '..')."
        )
    base = Path(base_dir).resolve()
    target = (base / name).resolve()
    if target.parent != base:
        raise ExportError(f"export name {name!r} would leave the export folder.")
    return target


def _json_default(value: Any):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (temp file in the same folder + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=_json_default)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


METHOD_TEXT = {
    "fusegpt": (
        "fused into its neighbours (FuseGPT, arXiv 2411.14507): its weights were injected into the same linears of "
        "the blocks of its group through learnable rank-{rank} coefficients, and the group was fine-tuned to "
        "reproduce its original output ({loss} loss, {epochs} epoch(s) over {n_calib} calibration windows)."
    ),
    "drop": "deleted, with no repair.",
    "drop+lora": (
        "deleted, then the blocks of its group were healed with a rank-{lora} LoRA trained to reproduce the group's "
        "original output ({loss} loss, {epochs} epoch(s) over {n_calib} calibration windows), as a baseline for FuseGPT."
    ),
    "average": "averaged into its neighbouring block (linear and norm weights), with no training.",
}
METRIC_NAMES = {
    "mi": "Macro Influence",
    "bi": "Block Influence",
    "angular": "angular distance",
    "ppl": "perplexity increase",
}


def choice_text(recipe: dict[str, Any]) -> str:
    """How the removed blocks were chosen, in one sentence."""
    if recipe.get("blocks") is not None:
        return "The blocks were picked by hand, in this order."
    metric = METRIC_NAMES.get(recipe.get("metric"), recipe.get("metric"))
    how = (
        "scored once on the original model"
        if recipe.get("selection") == "one-shot"
        else "re-scored on the current model after each removal"
    )
    text = f"The blocks were chosen by {metric} ({how})"
    if (recipe.get("candidates") or 1) > 1:
        text += (
            f"; each round removed, among the {recipe['candidates']} least important, the one whose removal its "
            "group's output felt least"
        )
    return text + "."


def model_card(report: dict[str, Any]) -> str:
    recipe = report.get("recipe", {})
    method = report.get("method", recipe.get("method", "fusegpt"))
    removed = report.get("removed_blocks", [])
    data, distill, fusion = recipe.get("data", {}), recipe.get("distill", {}), recipe.get("fusion", {})
    base = report.get("base_model")
    name = (base or str(report.get("model", "model"))).split("/")[-1]

    def fmt(x):
        return f"{x:.3f}" if isinstance(x, (int, float)) else "n/a"

    repair = METHOD_TEXT.get(method, method + ".").format(
        rank=fusion.get("coef_rank"),
        lora=max(fusion.get("coef_rank") or 0, fusion.get("lora_rank") or 0),
        loss=distill.get("loss"),
        epochs=distill.get("epochs"),
        n_calib=data.get("n_calib"),
    )
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    if base:
        front.append(f"base_model: {base}")
    front += [f"tags: [block-pruning, {method}, fusegpt-studio]", "---"]
    rows = [f"| original | {fmt(report.get('dense_ppl'))} |"]
    if method != "drop":
        rows.append(f"| the same blocks deleted, no repair | {fmt(report.get('dropped_ppl'))} |")
    rows.append(f"| this model ({method}) | {fmt(report.get('result_ppl'))} |")
    rounds = [
        f"| {r.get('round', 0) + 1} | {r.get('removed')} | {', '.join(str(t) for t in r.get('targets') or [])} |"
        for r in report.get("rounds") or []
        if "error" not in r
    ]
    lines = [
        *front,
        f"# {name}, {len(removed)} of {report.get('num_layers_before')} blocks removed ({method})",
        "",
        f"{report.get('num_layers_before')} -> {report.get('num_layers_after')} blocks. Removed (original indices, "
        f"in order): {removed}. {choice_text(recipe)} Each removed block was {repair}",
        "",
        "A plain transformers model: load it with `AutoModelForCausalLM.from_pretrained`.",
        "",
        "| | perplexity |",
        "|---|---|",
        *rows,
        "",
        f"Perplexity on {report.get('eval_tokens')} tokens of `{data.get('eval_source')}`"
        f" ({data.get('seq_len')}-token windows).",
    ]
    lines += zero_shot_lines(report.get("zero_shot"), method)
    if rounds and method != "drop":
        lines += ["", "| round | removed block | blocks that absorbed it |", "|---|---|---|", *rounds]
    lines += [
        "",
        "Made with FuseGPT Studio. Reproduce with `python -m fusegpt_core fuse --recipe recipe.json --out DIR`.",
    ]
    if report.get("partial"):
        lines += ["", f"**Partial result** (status: {report.get('status')}): not every planned block was removed."]
    return "\n".join(lines) + "\n"


def zero_shot_lines(zero_shot: dict[str, Any] | None, method: str) -> list[str]:
    """The model card's zero-shot table: one row per model (original, dropped, this one), one column per
    task, acc_norm where the task has it (else acc) with its standard error, as lm-eval computes them."""
    if not zero_shot:
        return []
    labels = [("original", "original"), ("dropped", "the same blocks deleted, no repair"), ("result", "this model")]
    labels = [(key, text) for key, text in labels if key in zero_shot and not (key == "dropped" and method == "drop")]
    tasks = list(zero_shot[labels[0][0]]) if labels else []
    if not tasks:
        return []

    def cell(figures: dict[str, Any] | None) -> str:
        if not figures:
            return "n/a"
        value = figures.get("acc_norm") if figures.get("acc_norm") is not None else figures.get("acc")
        if value is None:
            return "n/a"
        stderr = figures.get("stderr")
        return f"{value:.3f} ± {stderr:.3f}" if isinstance(stderr, (int, float)) else f"{value:.3f}"

    def metric(task: str) -> str:
        figures = zero_shot[labels[0][0]].get(task) or {}
        return "acc_norm" if figures.get("acc_norm") is not None else "acc"

    first = zero_shot[labels[0][0]]
    counts = sorted({str(first[t].get("n")) for t in tasks if first.get(t)})
    rows = [f"| {text} | " + " | ".join(cell(zero_shot[key].get(t)) for t in tasks) + " |" for key, text in labels]
    limit = zero_shot.get("limit")
    return [
        "",
        "| zero-shot | " + " | ".join(f"{t} ({metric(t)})" for t in tasks) + " |",
        "|---|" + "---|" * len(tasks),
        *rows,
        "",
        "Zero-shot accuracy by lm-evaluation-harness (± its standard error) on "
        + (f"the first {limit} items of each task" if limit else f"{'/'.join(counts)} items per task")
        + "; `bundled_*` tasks are built from the evaluation split of the bundled Wikipedia excerpt.",
    ]


def export_model(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    report: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a stock HF folder: safetensors weights, config, tokenizer, report.json, recipe.json,
    README.md. Fused layers are folded first (on the given model, which becomes plain)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"'{out_dir}' already exists: choose another name or allow overwriting.")
    store = fold_fused(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    # the pid in the name lets a later export tell a dead writer's leftovers from a live one's
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-{os.getpid()}-"))
    try:
        config = model.config
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config  # weights are plain tensors now
        if store.active:
            save_offloaded(model, store, tmp)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            write_json(tmp / "report.json", report)
            write_json(tmp / "recipe.json", report.get("recipe", {}))
            (tmp / "README.md").write_text(model_card(report), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(
            f"could not write the export to '{out_dir}': {_reason(e)}. Nothing was left behind."
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def fold_fused(model: nn.Module):
    """Fold the model's fused layers into plain linears, in place (offloaded blocks one at a time);
    returns the model's BlockOffload."""
    store = offload_of(model)
    if any(isinstance(m, FusedLinear) for m in model.modules()):
        if store.active:
            from .pipeline import fold_blocks

            fold_blocks(model, store)
        else:
            fold_fused_linears(model)
    return store


def save_offloaded(model: nn.Module, store, folder: Path) -> None:
    """A model whose blocks are offloaded (offload.py), saved as transformers saves a sharded model:
    one safetensors shard per block, read one block at a time (the model need not fit in memory),
    one for everything else, and the index that maps each tensor to its shard."""
    from safetensors.torch import save_file

    from .adapters import get_adapter

    prefix = get_adapter(model).blocks + "."
    shards: dict[str, dict[str, torch.Tensor]] = {}
    seen: set[int] = set()
    for name, slot in model.state_dict(keep_vars=True).items():
        if id(slot) in seen:  # a tied weight (the LM head): stored once, as transformers does
            continue
        seen.add(id(slot))
        shard = name[len(prefix) :].split(".")[0] if name.startswith(prefix) else "rest"
        shards.setdefault(shard, {})[name] = slot
    order = sorted((k for k in shards if k != "rest"), key=int) + ["rest"]
    weight_map, total = {}, 0
    for i, shard in enumerate(order, start=1):
        file = f"model-{i:05d}-of-{len(order):05d}.safetensors"
        tensors = {name: store.host_copy(slot).contiguous() for name, slot in shards[shard].items()}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors  # one block's tensors in memory at a time
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def _reason(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "the disk is full"
    return error.strerror or str(error)


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Delete `.NAME.partial-PID-*` siblings of `out_dir` (folders or files) whose writer no longer runs
    (killed mid-export)."""
    import psutil

    removed = []
    for candidate in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        pid_text = candidate.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid != os.getpid() and not psutil.pid_exists(pid):
            if candidate.is_dir():
                shutil.rmtree(candidate, ignore_errors=True)
            else:  # a single-file export's leftover (a GGUF)
                candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def zip_folder(folder: str | Path, zip_path: str | Path | None = None) -> Path:
    """Zip a folder (for download); the archive is written atomically beside it by default."""
    folder = Path(folder)
    target = Path(zip_path) if zip_path else folder.with_suffix(".zip")
    tmp_base = target.parent / f".{target.stem}.partial"
    try:
        made = shutil.make_archive(str(tmp_base), "zip", root_dir=folder)
        os.replace(made, target)
    except OSError as e:
        Path(f"{tmp_base}.zip").unlink(missing_ok=True)
        raise ExportError(f"could not write '{target}': {_reason(e)}. Nothing was left behind.") from None
    return target


def push_to_hub(folder: str | Path, repo_id: str, token: str, private: bool = True) -> str:
    """Upload an exported folder. The token is used for this call only: never stored or logged."""
    if not token or not repo_id:
        raise ExportError("pushing to the Hub needs a repository id and a write token.")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id)
    except Exception as e:  # network or permission problem: one line, with the token scrubbed
        message = str(e).replace(token, "***")
        raise ExportError(
            f"push to '{repo_id}' failed: {message.splitlines()[0] if message else type(e).__name__}"
        ) from None
    return f"https://huggingface.co/{repo_id}"
