"""Command line: `python -m fusegpt_core importance|fuse|plan|evaluate|export ...`.

User mistakes end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import check_seq_len
from .errors import FuseGPTError

SOURCE_PREFIXES = ("bundled", "pydoc", "hf:", "text:", "file:")


def text_source(value: str | None, default: str = "bundled") -> str:
    """A CLI text argument -> a data source string: known prefixes pass, anything else is a file."""
    if value is None:
        return default
    if value.startswith(SOURCE_PREFIXES):
        return value
    return f"file:{value}"


def _parse_set(items: list[str]) -> dict[str, object]:
    """--set key=value (dotted keys, JSON values where they parse, else strings)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise FuseGPTError(f"--set expects key=value, got '{item}'.")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


class _Progress:
    """Turns pipeline events into stage lines and tqdm bars on stderr."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bar = None
        self.key = None

    def __call__(self, event) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if event.kind == "stage":
            self._close()
            print(f"[{event.stage}] {event.message}", file=sys.stderr, flush=True)
        elif event.kind in ("progress", "loss") and event.total:
            key = (event.stage, event.total, event.data.get("round"))
            if key != self.key:
                self._close()
                self.bar = tqdm(total=event.total, desc=event.stage, file=sys.stderr, leave=False)
                self.key = key
            self.bar.n = event.step
            if event.kind == "loss":
                self.bar.set_postfix(loss=f"{event.data['loss']:.4g}", refresh=False)
            self.bar.refresh()
        elif event.kind in ("round", "log"):
            self._close()
            print(f"  {event.message}", file=sys.stderr, flush=True)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar, self.key = None, None


def cmd_importance(args) -> int:
    from .adapters import num_blocks
    from .data import load_texts, token_windows
    from .importance import METRICS, block_forward_count, score_blocks
    from .loading import load_model

    metrics = list(METRICS) if args.metric == "all" else args.metric.split(",")
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise FuseGPTError(f"unknown metric {bad[0]!r}; choose from {', '.join(METRICS)} or 'all'.")
    loaded = load_model(
        args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code, offload=args.offload
    )
    check_seq_len(args.seq_len, loaded.model.config, "--seq-len")
    source = text_source(args.eval_text)
    # scoring text: the calibration part of a built-in corpus, or the whole user text
    if source in ("bundled", "pydoc") or source.startswith("hf:"):
        text, _ = load_texts(source, source, seed=args.seed)
    else:
        text, _ = load_texts(source, "pydoc", seed=args.seed)
    windows = token_windows(loaded.tokenizer, text, args.seq_len, args.windows, seed=args.seed)
    progress = _Progress(args.quiet)
    from .pipeline import Event

    start = time.perf_counter()
    scores = score_blocks(
        loaded.model,
        windows,
        metrics=metrics,
        use_cache=not args.no_cache,
        batch_size=args.batch_size,
        on_progress=lambda s, t: progress(Event("progress", "score", step=s, total=t)),
    )
    seconds = time.perf_counter() - start
    progress._close()
    n = num_blocks(loaded.model)
    result = {
        "metric": metrics[0],
        "scores": scores[metrics[0]],
        "metrics": scores,
        "model": args.model,
        "num_blocks": n,
        "use_prefix_cache": not args.no_cache,
        "block_forwards_per_batch": block_forward_count(n, not args.no_cache),
        "windows": int(windows.shape[0]),
        "seq_len": args.seq_len,
        "text": source,
        "seconds": round(seconds, 3),
        "ranking": sorted(range(n), key=lambda i: scores[metrics[0]][i]),
    }
    if args.json:
        from .export import write_json

        write_json(Path(args.json), result)
    else:
        print(json.dumps(result, indent=2))
    print(f"scored {n} blocks in {seconds:.1f}s; least important first: {result['ranking'][:8]}", file=sys.stderr)
    return 0


def build_recipe(args):
    from .config import Recipe, preset

    overrides = _parse_set(args.set)
    if args.recipe:
        recipe = Recipe.from_file(args.recipe)
        d = recipe.to_dict()
        from .config import _set_dotted

        for k, v in overrides.items():
            _set_dotted(d, k, v)
        recipe = Recipe.from_dict(d)
    else:
        recipe = preset(args.preset, **overrides)
    # explicit flags win over the recipe/preset, except that a recipe belongs to its model
    if args.model is not None:
        if args.recipe and recipe.model != args.model:
            from .errors import RecipeError

            raise RecipeError(
                f"the recipe was made for model '{recipe.model}', not '{args.model}': its block choices would not "
                "carry over. Drop --model to reproduce it, or start from a preset for the other model."
            )
        recipe.model = args.model
    if args.remove is not None and args.rate is not None:
        raise FuseGPTError("give --remove (a number of blocks) or --rate (a fraction of them), not both.")
    if args.remove is not None:
        recipe.remove, recipe.rate = args.remove, None
    if args.rate is not None:
        recipe.rate = args.rate
    if args.blocks is not None:
        try:
            recipe.blocks = [int(b) for b in args.blocks.split(",") if b.strip()]
        except ValueError:
            raise FuseGPTError(f"--blocks expects comma-separated block numbers, got '{args.blocks}'.") from None
    if args.method is not None:
        recipe.method = args.method
    if args.calib_text is not None:
        recipe.data.calib_source = text_source(args.calib_text)
    if args.eval_text is not None:
        recipe.data.eval_source = text_source(args.eval_text)
    if args.device is not None:
        recipe.device = args.device
    if args.dtype is not None:
        recipe.dtype = args.dtype
    if args.seed is not None:
        recipe.data.seed = args.seed
    return recipe.validate()


RECIPE_FLAGS = ("model", "remove", "blocks", "method", "recipe", "set", "calib_text", "eval_text", "seed", "rate")


def resumed_recipe(args):
    """The recipe of the run checkpointed in --resume DIR; recipe flags beside it are refused (the
    checkpoint's rounds only make sense for the recipe that made them)."""
    from . import resume
    from .config import Recipe

    given = [f"--{name.replace('_', '-')}" for name in RECIPE_FLAGS if getattr(args, name, None) not in (None, [])]
    if given:
        raise FuseGPTError(f"--resume continues a run with its own recipe: drop {', '.join(given)}.")
    folder = resume.latest(Path(args.resume))
    if folder is None:
        raise FuseGPTError(
            f"there is no checkpoint in '{Path(args.resume) / resume.CHECKPOINT}': a run writes one after each "
            "round, so this run stopped before its first round ended (start it again)."
        )
    recipe = Recipe.from_dict(resume.read_state(folder)["recipe"])
    if args.device is not None:  # where it computes may change; what it computes may not
        recipe.device = args.device
    return recipe.validate()


def cmd_fuse(args) -> int:
    import shutil

    from . import resume
    from .export import ExportError, export_model, write_json
    from .loading import load_model
    from .pipeline import run

    if args.out is None and args.resume is None:
        raise FuseGPTError("fuse needs --out (or --resume DIR to continue a run).")
    out = Path(args.out or args.resume)
    if args.resume is not None and Path(args.resume) != out:
        raise FuseGPTError("--resume DIR continues the run in DIR: its result goes there too (drop --out).")
    if (out / "model").exists() and not args.overwrite:
        raise ExportError(f"'{out / 'model'}' already exists: choose another --out or pass --overwrite.")
    gguf_targets = _gguf_targets(args)  # checked before anything runs
    check_task_args(args, allow_list=False)
    recipe = resumed_recipe(args) if args.resume is not None else build_recipe(args)
    plan = None
    if not args.skip_memory_check:
        plan = memory_plan(recipe, args, args.device_memory)
        if plan is not None and not plan.fits:
            raise FuseGPTError(
                f"{plan.advice} Nothing was run (the estimate: `python -m fusegpt_core plan`; "
                "--skip-memory-check runs anyway)."
            )
    progress = _Progress(args.quiet)
    offload = args.offload
    if offload == "auto":  # the plan's choice: blocks on the device when they fit, else on the host, else on disk
        offload = plan.offload if not args.skip_memory_check and plan is not None else "none"
    if offload != "none":
        print(f"offload: blocks on the {'host' if offload == 'cpu' else 'disk'}", file=sys.stderr)
    loaded = load_model(
        recipe.model,
        device=recipe.device,
        dtype=recipe.dtype,
        trust_remote_code=args.trust_remote_code,
        offload=offload,
        offload_folder=out / "offload" if offload == "disk" else None,
    )
    if gguf_targets:
        from .gguf_export import check_exportable

        check_exportable(loaded.model, loaded.tokenizer)
    result = run(recipe, loaded, on_event=progress, checkpoint_dir=out, resume_run=args.resume is not None)
    progress._close()
    if args.tasks is not None:
        t0 = time.perf_counter()
        result.report["zero_shot"] = zero_shot_of_run(args, loaded, result, progress)
        result.report["seconds"]["zero_shot"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    export_model(result.model, result.tokenizer, out / "model", result.report, overwrite=args.overwrite)
    result.report["seconds"]["export"] = round(time.perf_counter() - t0, 2)
    result.report["seconds"]["load"] = round(loaded.load_seconds, 2)
    if gguf_targets:
        t0 = time.perf_counter()
        result.report["quantised"] = _gguf_rows(result.model, result.tokenizer, recipe, result.report, args)
        result.report["seconds"]["gguf"] = round(time.perf_counter() - t0, 2)
    write_json(out / "report.json", result.report)
    write_json(out / "model" / "report.json", result.report)
    shutil.rmtree(out / resume.CHECKPOINT, ignore_errors=True)  # the result is written: rounds are not needed
    shutil.rmtree(out / "offload", ignore_errors=True)  # blocks a disk-offloaded run wrote
    r = result.report
    print(
        f"{r['method']}: removed {r['removed_blocks']} ({r['num_layers_before']} -> {r['num_layers_after']} blocks); "
        f"ppl dense {r['dense_ppl']:.3f}, dropped {r['dropped_ppl']:.3f}, {r['method']} {r['result_ppl']:.3f}; "
        f"{r['seconds']['total']:.0f}s. Wrote {out / 'report.json'} and {out / 'model'}",
        file=sys.stderr,
    )
    for row in r.get("quantised") or []:
        print(_gguf_line(row), file=sys.stderr)
    return 0


def memory_plan(recipe, args, device_memory: str | None = None, load_if_needed: bool = False):
    """The memory plan of `recipe` on its model, from the config only (nothing is loaded); a GGUF
    file not dequantised yet is loaded (and cached) when `load_if_needed`, else there is no plan (None)."""
    import torch

    from .adapters import num_blocks
    from .loading import available_memory_bytes, pick_device, pick_dtype
    from .memory import model_for_plan, parse_bytes, plan_memory

    device = pick_device(recipe.device)
    dtype = pick_dtype(recipe.dtype, device)
    try:
        budget = parse_bytes(device_memory) if device_memory else available_memory_bytes(device)
    except ValueError as e:
        raise FuseGPTError(f"--device-memory: {e}.") from None
    host = available_memory_bytes(torch.device("cpu")) if device.type != "cpu" else budget
    skeleton = model_for_plan(recipe.model, trust_remote_code=args.trust_remote_code)
    if skeleton is None:
        if not load_if_needed:
            return None
        from .loading import load_model

        skeleton = load_model(recipe.model, device="cpu", trust_remote_code=args.trust_remote_code).model
    recipe.validate(num_blocks=num_blocks(skeleton))
    offload = getattr(args, "offload", "auto")
    return plan_memory(
        skeleton,
        recipe,
        device,
        dtype,
        device_budget=budget,
        host_budget=host,
        offload=None if offload == "auto" else offload,
    )


def cmd_plan(args) -> int:
    from .export import write_json
    from .memory import summary

    recipe = build_recipe(args)
    plan = memory_plan(recipe, args, args.device_memory, load_if_needed=True)
    result = {**plan.to_dict(), "model": recipe.model, "recipe": recipe.to_dict()}
    if args.json:
        write_json(Path(args.json), result)
    else:
        print(json.dumps(result, indent=2))
    print(summary(plan), file=sys.stderr)
    if not plan.fits:
        print(f"does not fit: {plan.advice}", file=sys.stderr)
    return 0


def _evaluated_model(args):
    """The model `evaluate` measures: on one device, or spread by accelerate (--device-map, --max-memory)."""
    from .loading import load_model, parse_max_memory

    device_map = json.loads(args.device_map) if (args.device_map or "").startswith("{") else args.device_map
    return load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                      device_map=device_map, max_memory=parse_max_memory(args.max_memory))  # fmt: skip


def cmd_evaluate(args) -> int:
    from .data import load_texts, token_windows
    from .evaluate import perplexity

    if check_task_args(args):
        return evaluate_zero_shot(args)
    loaded = _evaluated_model(args)
    check_seq_len(args.seq_len, loaded.model.config, "--seq-len")
    source = text_source(args.eval_text)
    _, text = load_texts(source, source, seed=args.seed)
    windows = token_windows(loaded.tokenizer, text, args.seq_len, None, seed=args.seed)[: args.windows]
    ppl = perplexity(loaded.model, windows, args.batch_size)
    print(json.dumps({"model": args.model, "ppl": ppl, "tokens": int(windows.numel()), "text": source}))
    return 0


# ---- zero-shot accuracy through lm-eval (evaluate --tasks, fuse --tasks) --------------------------------


def evaluate_zero_shot(args) -> int:
    """evaluate --tasks list | T1,T2: the task names, or the model's zero-shot accuracy on them."""
    from . import zeroshot

    if args.tasks.strip() == "list":
        print("\n".join(zeroshot.task_names()))
        return 0
    names = zeroshot.parse_tasks(args.tasks)  # checked by check_task_args
    loaded = _evaluated_model(args)
    say = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    result = zeroshot.evaluate_tasks(loaded.model, loaded.tokenizer, names, args.limit, args.batch_size, say)
    result = {**result, "model": args.model}
    if args.json:
        from .export import write_json

        write_json(Path(args.json), result)
    else:
        print(json.dumps(result, indent=2))
    for name, figures in result["tasks"].items():
        print(zero_shot_line(name, figures), file=sys.stderr)
    return 0


def check_task_args(args, allow_list: bool = True) -> bool:
    """--tasks and --limit checked before a model is loaded (a wrong name, or Hub tasks without the Hub,
    fail at once); whether zero-shot tasks were asked for."""
    from .zeroshot import check_tasks

    if args.tasks is None:
        if args.limit is not None:
            raise FuseGPTError("--limit needs --tasks (the tasks whose first N items to evaluate).")
        return False
    if args.tasks.strip() == "list":
        if not allow_list:
            raise FuseGPTError(
                "--tasks takes task names here; see them with `python -m fusegpt_core evaluate --tasks list`."
            )
        return True
    check_tasks(args.tasks, args.limit)
    return True


def zero_shot_line(name: str, figures: dict) -> str:
    """'task: acc 0.412, acc_norm 0.455 +- 0.016 (1000 items)'."""
    parts = [f"{key} {figures[key]:.3f}" for key in ("acc", "acc_norm") if figures.get(key) is not None]
    stderr = f" +- {figures['stderr']:.3f}" if isinstance(figures.get("stderr"), float) else ""
    return f"{name}: {', '.join(parts)}{stderr} ({figures.get('n')} items)"


def zero_shot_of_run(args, loaded, result, progress) -> dict:
    """fuse --tasks: the tasks on the original, the same blocks dropped, and the result."""
    from . import zeroshot
    from .evaluate import drop_blocks

    removed = result.report["removed_blocks"]
    dropped = drop_blocks(loaded.model, removed) if removed else loaded.model
    if result.report["method"] == "drop":
        dropped = result.model  # the same model: evaluated once
    progress._close()
    say = None if args.quiet else (lambda message: print(f"[zero-shot] {message}", file=sys.stderr, flush=True))
    models = {"original": loaded.model, "dropped": dropped, "result": result.model}
    return zeroshot.evaluate_run(models, loaded.tokenizer, args.tasks, args.limit, progress=say)


# ---- GGUF export (fuse --gguf, export) ---------------------------------------------------------------


def _gguf_targets(args) -> dict[str, Path] | None:
    """quant -> GGUF file to write, checked (folder exists, no file there unless --overwrite); None
    without --gguf."""
    from .gguf_export import check_targets

    if args.gguf is None:
        if args.quant is not None:
            raise FuseGPTError("--quant needs --gguf OUT.gguf (the file to write).")
        return None
    return check_targets(args.gguf, args.quant or "f16", args.overwrite)


def _gguf_rows(model, tokenizer, recipe, report: dict, args) -> list[dict]:
    """Write the GGUF files of a run's result and measure each on the run's evaluation windows; the
    compression is the file's size over the original model's parameters in 16-bit."""
    from .gguf_export import quantisation_rows
    from .pipeline import load_windows

    _, windows = load_windows(recipe, tokenizer)
    base = str(report.get("base_model") or recipe.model).rstrip("/").split("/")[-1]
    return quantisation_rows(
        model,
        tokenizer,
        args.gguf,
        args.quant or "f16",
        windows,
        size_before_bytes=2 * int(report["params_before"]),
        overwrite=args.overwrite,
        name=f"{base}-{report.get('method', 'fused')}-{report.get('num_layers_after')}-blocks",
    )


def _gguf_line(row: dict) -> str:
    text = f"{row['quant']}: {row['file']} ({row['file_bytes'] / 2**20:.1f} MiB"
    if row.get("compression") is not None:
        text += f", {row['compression']:.3f} x the original in 16-bit"
    if row.get("ppl") is not None:
        text += f", ppl {row['ppl']:.3f} dequantised"
    return text + ")"


def _run_folder(source: str) -> Path | None:
    """A `fuse --out` folder (its model/ and report.json), else None."""
    folder = Path(source).expanduser()
    if (folder / "model" / "config.json").is_file() and (folder / "report.json").is_file():
        return folder
    return None


def cmd_export(args) -> int:
    from .export import write_json
    from .gguf_export import check_architecture, check_exportable, export_gguf, quantisation_rows
    from .loading import load_model

    targets = _gguf_targets(args)
    run_dir = _run_folder(args.model)
    source = str(run_dir / "model") if run_dir else args.model
    config_file = Path(source).expanduser() / "config.json"
    if config_file.is_file():  # refuse an architecture GGUF cannot hold before reading any weight
        check_architecture(json.loads(config_file.read_text(encoding="utf-8")))
    loaded = load_model(source, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    check_exportable(loaded.model, loaded.tokenizer)
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8")) if run_dir else None
    if not args.measure:
        rows = []
        for quant, target in targets.items():
            export_gguf(loaded.model, loaded.tokenizer, target, quant, overwrite=args.overwrite)
            rows.append({"quant": quant, "file": str(target), "file_bytes": target.stat().st_size})
    else:
        if report is not None:  # the run's own evaluation windows, as its result_ppl
            from .config import Recipe
            from .pipeline import load_windows

            _, windows = load_windows(Recipe.from_dict(report["recipe"]), loaded.tokenizer)
            params_before = int(report["params_before"])
        else:
            from .data import load_texts, token_windows

            check_seq_len(args.seq_len, loaded.model.config, "--seq-len")
            eval_source = text_source(args.eval_text)
            _, text = load_texts(eval_source, eval_source, seed=args.seed)
            windows = token_windows(loaded.tokenizer, text, args.seq_len, None, seed=args.seed)[: args.windows]
            params_before = loaded.num_params
        rows = quantisation_rows(
            loaded.model, loaded.tokenizer, args.gguf, list(targets), windows, 2 * params_before,
            overwrite=args.overwrite, batch_size=args.batch_size,
        )  # fmt: skip
        if report is not None:
            report["quantised"] = rows
            write_json(run_dir / "report.json", report)
            write_json(run_dir / "model" / "report.json", report)
    print(json.dumps({"model": args.model, "files": rows}, indent=2))
    for row in rows:
        print(_gguf_line(row), file=sys.stderr)
    return 0


def _gguf_args(p: argparse.ArgumentParser, required: bool) -> None:
    from .gguf_export import QUANTS

    p.add_argument("--gguf", default=None, required=required, metavar="OUT.gguf",
                   help="also write the result as a GGUF file for llama.cpp / ollama (Llama family and Qwen2)")  # fmt: skip
    p.add_argument("--quant", default=None, metavar="TYPE[,TYPE]",
                   help=f"GGUF tensor type: {', '.join(QUANTS)} (default f16); several, comma-separated, write "
                        "OUT-TYPE.gguf each")  # fmt: skip


def _task_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help=f"lm-eval tasks, e.g. bundled_nextsent,bundled_cloze or piqa,hellaswag, {what}")  # fmt: skip
    p.add_argument("--limit", type=int, default=None, metavar="N", help="with --tasks: the first N items of each")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default: auto)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or auto (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code from the model repo (off by default)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _recipe_args(p: argparse.ArgumentParser) -> None:
    from .config import METHODS, PRESETS

    p.add_argument("--model", default=None, help="'bundled' (default), a folder, a .gguf file or a hub id")
    p.add_argument("--remove", type=int, default=None, help="how many blocks to remove")
    p.add_argument("--rate", type=float, default=None, help="fraction of the blocks to remove: ceil(L x rate)")
    p.add_argument("--blocks", default=None, help="comma-separated blocks to remove (original indices)")
    p.add_argument("--method", choices=METHODS, default=None)
    p.add_argument("--preset", choices=PRESETS, default="cpu-demo")
    p.add_argument("--recipe", default=None, help="JSON/YAML recipe (or a report.json) to reproduce a run")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field, e.g. distill.epochs=4")
    p.add_argument("--calib-text", default=None)
    p.add_argument("--eval-text", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="memory of the compute device to plan for, e.g. 24GiB (default: what is free now)")  # fmt: skip
    p.add_argument("--offload", choices=("auto", "none", "cpu", "disk"), default="auto",
                   help="where the blocks live between uses: on the device (none), host RAM (cpu) or their "
                        "safetensors files (disk); auto: the first that fits the memory plan")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fusegpt_core", description="FuseGPT block fusion for HF models.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("importance", help="score every block (MI, BI, angular, ppl)")
    p.add_argument("--model", default="bundled", help="'bundled', a folder, a .gguf file or a hub id")
    p.add_argument("--metric", default="mi", help="mi, bi, angular, ppl, a comma list, or 'all'")
    p.add_argument("--eval-text", default=None, help="text file (or bundled / pydoc / hf:NAME) to score on")
    p.add_argument("--json", default=None, help="write the result here (else print it)")
    p.add_argument("--no-cache", action="store_true", help="reference computation without prefix caching")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--offload", choices=("none", "cpu", "disk"), default="none",
                   help="keep the blocks in host RAM or their files and stream them to the device")  # fmt: skip
    _common(p)
    p.set_defaults(func=cmd_importance)

    p = sub.add_parser("fuse", help="remove blocks by fusion (or a baseline) and export the result")
    _recipe_args(p)
    p.add_argument(
        "--skip-memory-check", action="store_true", help="run even when the memory plan says it will not fit"
    )
    p.add_argument("--out", default=None, help="output folder: report.json, model/ and per-round checkpoint/")
    p.add_argument(
        "--resume", default=None, metavar="DIR", help="continue the run whose --out was DIR after its last round"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    _gguf_args(p, required=False)
    _task_args(p, "and measure the original, the dropped and the result on them (report.json, model card)")
    _common(p)
    p.set_defaults(func=cmd_fuse)

    p = sub.add_parser("plan", help="predict a run's peak memory per stage, without running it")
    _recipe_args(p)
    p.add_argument("--json", default=None, help="write the plan here (else print it)")
    _common(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("evaluate", help="perplexity of a model on the evaluation text")
    p.add_argument("--model", default="bundled")
    p.add_argument("--eval-text", default=None)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device-map", default=None,
                   help="spread the model over several GPUs (and the host) with accelerate: auto, balanced, or a "
                        "JSON map of module -> device")  # fmt: skip
    p.add_argument(
        "--max-memory", default=None, metavar="DEV=SIZE,...", help="with --device-map, e.g. 0=20GiB,cpu=64GiB"
    )
    _task_args(p, "instead of perplexity: zero-shot accuracy on them ('list': the names)")
    p.add_argument("--json", default=None, help="with --tasks: write the result here (else print it)")
    _common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="write a model (or a fuse run's result) as GGUF for llama.cpp / ollama")
    p.add_argument("--model", default="bundled", help="a fuse --out folder, a model folder, 'bundled', .gguf or hub id")
    _gguf_args(p, required=True)
    p.add_argument("--overwrite", action="store_true", help="replace existing GGUF files")
    p.add_argument("--measure", action="store_true",
                   help="reload each file through transformers and measure its perplexity (a run's report.json "
                        "gains the rows)")  # fmt: skip
    p.add_argument("--eval-text", default=None, help="with --measure, for a model that is not a run's result")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=cmd_export)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quiet:  # transformers' own bars ("Loading weights") would otherwise still reach stderr
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except FuseGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if getattr(args, "command", None) == "fuse":
            print(
                f"stopped: no result was written. Rounds that finished are kept: continue with "
                f"`python -m fusegpt_core fuse --resume {args.out or args.resume}`.",
                file=sys.stderr,
            )
        else:
            print("stopped: nothing was written.", file=sys.stderr)
        return 130
