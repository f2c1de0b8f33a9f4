"""The accelerator's work on a ZeroGPU Space: every job that computes on it goes through one decorated
function, `gpu_call(task, args, seconds)`: a fusion run as one call per round (continuing from the round
checkpoint), block scoring and generation as one call each.

ZeroGPU lends a GPU to one decorated function call at a time (`@spaces.GPU`): the call runs in a
worker forked from the app's process, its arguments and result cross the boundary pickled, and it
has a time limit. So a run here is a loop of calls, each doing at most one more round of the run
checkpointed in a folder (fusegpt_core.resume) and, once every round is done, the fold, the
evaluation and the export of the result into that folder. What crosses a call is small and plain:
a model key, the recipe as a dict, token ids, a folder name; back come the pipeline's events
(replayed into the job's progress) and the report. The worker finds the model by its key in
`MODELS`, which it inherits from the app's process (a fork shares its memory). A call that the time
limit ends loses only its unfinished round: the next call starts it again from the checkpoint.

Where the `spaces` package is absent (a laptop, CI, a CPU Space) nothing is decorated and runs go
through the pipeline in the app's process as before. FUSEGPT_GPU=fork swaps in `fork_gpu`, a
stand-in that really forks and pickles as ZeroGPU does (tests use it); FUSEGPT_GPU=off turns the
GPU path off even on a ZeroGPU Space.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import pickle
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fusegpt_core.config import Recipe
from fusegpt_core.errors import Cancelled, FuseGPTError

MODELS: dict[str, Any] = {}
"""Loaded models by key, registered before a call: the forked worker reads its model here."""

MAX_CALL_S = int(os.environ.get("FUSEGPT_GPU_MAX_S", "120"))  # ZeroGPU's default limit for one call
MIN_CALL_S = 30
STOP_FILE = "STOP"


class GpuCallError(RuntimeError):
    """A GPU call that did not come back (its time limit, the quota, the worker died)."""


def mode() -> str:
    """'zerogpu' (the spaces package on a ZeroGPU Space), 'fork' (the stand-in) or 'off'."""
    wanted = os.environ.get("FUSEGPT_GPU", "auto").strip().lower()
    if wanted in ("off", "fork"):
        return wanted
    if os.environ.get("SPACES_ZERO_GPU"):
        try:
            import spaces  # noqa: F401
        except ImportError:
            return "off"
        return "zerogpu"
    return "off"


def fork_gpu(duration: Callable[..., float] | float):
    """A stand-in for spaces.GPU: the call runs in a forked process, its arguments and its result
    pickled across, and it is ended after `duration` seconds (a callable gets the call's arguments)."""

    def decorate(fn):
        def call(*args):
            limit = duration(*args) if callable(duration) else duration
            payload = pickle.dumps(args)  # what ZeroGPU sends; fails here if something does not pickle
            context = multiprocessing.get_context("fork")
            receive, send = context.Pipe(duplex=False)
            worker = context.Process(target=_worker, args=(fn, payload, send), daemon=True)
            worker.start()
            send.close()
            if not receive.poll(limit):
                worker.kill()
                worker.join()
                raise GpuCallError(f"the GPU call ran past its {limit:.0f} s limit")
            try:
                ok, value = pickle.loads(receive.recv_bytes())
            except EOFError:
                raise GpuCallError("the GPU worker died without an answer") from None
            finally:
                worker.join()
            if not ok:
                raise value
            return value

        return call

    return decorate


def _worker(fn, payload: bytes, send) -> None:
    # A forked child's OpenMP pool is the parent's, gone: a parallel CPU op would wait for it forever.
    # One thread avoids the pool (ZeroGPU's worker computes on the GPU; this stand-in on the CPU).
    torch.set_num_threads(1)
    try:
        answer = pickle.dumps((True, fn(*pickle.loads(payload))))
    except BaseException as e:  # the error (or one about a result that does not pickle) goes back instead
        answer = pickle.dumps((False, e if _picklable(e) else GpuCallError(f"{type(e).__name__}: {e}")))
    send.send_bytes(answer)
    send.close()


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
        return True
    except Exception:
        return False


def _call_seconds(task: str, args: dict, seconds: float) -> float:
    return seconds


def gpu_call(task: str, args: dict, seconds: float):
    """THE function ZeroGPU runs (decorated by `gpu_function`): in the worker, with the GPU for this call
    only. task 'fusion_round' (args of fusion_round), 'score' (of score_blocks_call) or 'generate' (of
    generate_call); models are named by their key in MODELS. `seconds` is the call's duration."""
    tasks = {"fusion_round": fusion_round, "score": score_blocks_call, "generate": generate_call}
    if task not in tasks:
        raise ValueError(f"unknown GPU task {task!r}")
    return tasks[task](**args)


def _on_gpu(loaded):
    if torch.cuda.is_available() and next(loaded.model.parameters()).device.type != "cuda":
        loaded.model.to("cuda")  # ZeroGPU: the worker has the GPU for this call only
    return loaded


def score_blocks_call(model_key: str, windows: torch.Tensor, metrics: list[str], use_cache: bool, batch_size: int):
    """Block scores {metric: [float]} of a model (in the worker)."""
    from fusegpt_core.importance import score_blocks

    loaded = _on_gpu(MODELS[model_key])
    device = next(loaded.model.parameters()).device
    scores = score_blocks(loaded.model, windows.to(device), metrics=tuple(metrics), use_cache=use_cache,
                          batch_size=batch_size)  # fmt: skip
    return {k: [float(v) for v in values] for k, values in scores.items()}


def generate_call(model_keys: list[str], prompt: str, settings: dict):
    """Each model's answer to `prompt` (in the worker): [(text, seconds)], in the order of model_keys."""
    import time

    from fusegpt_core.evaluate import generate

    out = []
    for key in model_keys:
        loaded = _on_gpu(MODELS[key])
        start = time.perf_counter()
        out.append((generate(loaded.model, loaded.tokenizer, prompt, **settings), time.perf_counter() - start))
    return out


def fusion_round(model_key: str, recipe: dict, windows: tuple[torch.Tensor, torch.Tensor], folder: str):
    """One more round of the run checkpointed in `folder` (in the worker; all of its remaining work when
    no round is left: fold, evaluate, export to folder/result). Returns (events, outcome) with outcome
    'round', 'finished' or 'stopped'."""
    from fusegpt_core.export import export_model
    from fusegpt_core.pipeline import run

    loaded = _on_gpu(MODELS[model_key])
    out = Path(folder)
    events: list = []
    rounds = {"done": 0}

    def on_event(ev) -> None:
        events.append(ev)
        if ev.kind == "round":
            rounds["done"] += 1

    def should_stop() -> bool:  # after one round (the checkpoint is written), or when the user pressed Stop
        return rounds["done"] >= 1 or (out / STOP_FILE).exists()

    r = Recipe.from_dict(recipe)
    resume_run = (out / "checkpoint").is_dir()
    try:
        result = run(r, loaded=loaded, on_event=on_event, should_stop=should_stop, windows=windows,
                     checkpoint_dir=out, resume_run=resume_run)  # fmt: skip
    except Cancelled:
        return events, ("stopped" if (out / STOP_FILE).exists() else "round")
    export_model(result.model, result.tokenizer, out / "result", result.report, overwrite=True)
    return events, "finished"


def gpu_function():
    """gpu_call behind the decorator of this machine: spaces.GPU, the fork stand-in, or none."""
    current = mode()
    if current == "zerogpu":
        import spaces

        return spaces.GPU(duration=_call_seconds)(gpu_call)
    if current == "fork":
        return fork_gpu(_call_seconds)(gpu_call)
    return gpu_call


def _seconds(estimate: float | None) -> int:
    """A call's duration: twice the estimate (the call also moves the model), within ZeroGPU's bounds."""
    return min(MAX_CALL_S, max(MIN_CALL_S, math.ceil(2 * estimate))) if estimate else MAX_CALL_S


class Registered:
    """Models put in MODELS for the calls of one job (a forked worker finds them there), removed after."""

    def __init__(self, models: dict[str, Any]):
        self.models = models

    def __enter__(self) -> list[str]:
        MODELS.update(self.models)
        return list(self.models)

    def __exit__(self, *exc) -> None:
        for key in self.models:
            MODELS.pop(key, None)


def score_in_call(loaded, windows: torch.Tensor, metrics: list[str], use_cache: bool, batch_size: int,
                  estimate: float | None) -> dict[str, list[float]]:  # fmt: skip
    """Block scores computed in one GPU call."""
    with Registered({f"score-{id(loaded)}": loaded}) as (key,):
        args = {"model_key": key, "windows": windows.cpu(), "metrics": list(metrics), "use_cache": use_cache,
                "batch_size": batch_size}  # fmt: skip
        return gpu_function()("score", args, _seconds(estimate))


class _Model:
    """A (model, tokenizer) pair as MODELS holds it (a run's model is not a LoadedModel)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer


def generate_in_call(models: list[tuple[Any, Any]], prompt: str, settings: dict, estimate: float | None):
    """Every (model, tokenizer)'s answer to `prompt`, in one GPU call: [(text, seconds)]."""
    keyed = {f"generate-{i}-{id(m)}": _Model(m, t) for i, (m, t) in enumerate(models)}
    with Registered(keyed) as keys:
        return gpu_function()("generate", {"model_keys": keys, "prompt": prompt, "settings": dict(settings)},
                              _seconds(estimate))  # fmt: skip


def run_in_calls(
    model_key: str,
    loaded,
    recipe: Recipe,
    windows: tuple[torch.Tensor, torch.Tensor],
    folder: Path,
    on_event: Callable,
    should_stop: Callable[[], bool],
    round_seconds: float | None,
):
    """A whole run as a loop of GPU calls, one round each; returns the result as a LoadedModel-like
    (model, tokenizer) pair and the report. A Stop between or during calls ends it cleanly."""
    from fusegpt_core.loading import load_model

    MODELS[model_key] = loaded
    folder.mkdir(parents=True, exist_ok=True)
    # a round's estimate with room for the call's own work (moving the model, the first capture), capped
    seconds = _seconds(round_seconds)
    call = gpu_function()
    watcher = _StopWatcher(should_stop, folder / STOP_FILE)
    watcher.start()
    failures = 0
    try:
        while True:  # one round per call, then the finishing call; a failed call is tried once more
            if should_stop():
                raise Cancelled("stopped by the user; the original model is unchanged.")
            try:
                args = {"model_key": model_key, "recipe": recipe.to_dict(), "windows": windows, "folder": str(folder)}
                events, outcome = call("fusion_round", args, seconds)
            except (Cancelled, FuseGPTError):
                raise
            except Exception as e:  # the time limit, the quota, a worker that died
                failures += 1
                on_event(_log(f"GPU call failed ({e}); {'trying again' if failures < 2 else 'giving up'}"))
                if failures >= 2:
                    raise FuseGPTError(
                        f"ZeroGPU: {e}. The run stopped; its finished rounds are lost with it, the original "
                        "model is unchanged. Try again later, or with fewer blocks or a smaller preset."
                    ) from None
                seconds = min(MAX_CALL_S, 2 * seconds)  # the round starts again from the checkpoint
                continue
            failures = 0
            for ev in events:
                if ev.kind == "stage" and ev.stage == "done":
                    continue  # the final report is read from the export
                on_event(ev)
            if outcome == "stopped":
                raise Cancelled("stopped by the user; the original model is unchanged.")
            if outcome == "finished":
                done = next(ev for ev in reversed(events) if ev.kind == "stage" and ev.stage == "done")
                result = load_model(str(folder / "result"), device="cpu")
                return result.model, result.tokenizer, done.data["report"]
    finally:
        watcher.stop()
        MODELS.pop(model_key, None)


def _log(message: str):
    from fusegpt_core.pipeline import Event

    return Event("log", "", message)


class _StopWatcher:
    """Turns the job's Stop into a file the GPU worker sees (it is another process)."""

    def __init__(self, should_stop: Callable[[], bool], path: Path):
        self.should_stop, self.path = should_stop, path
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(0.2):
            if self.should_stop():
                self.path.touch()
                return

    def stop(self) -> None:
        self._done.set()
