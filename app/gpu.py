"""Fusion runs on a ZeroGPU Space: one GPU call per round, continuing from the round checkpoint.

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


def _call_seconds(model_key, recipe, windows, folder, seconds) -> float:
    return seconds


def fusion_call(model_key: str, recipe: dict, windows: tuple[torch.Tensor, torch.Tensor], folder: str, seconds: float):
    """One GPU call, in the worker: one more round of the run checkpointed in `folder` (all of its
    remaining work when no round is left: fold, evaluate, export to folder/result). Returns
    (events, outcome) with outcome 'round', 'finished' or 'stopped'."""
    from fusegpt_core.export import export_model
    from fusegpt_core.pipeline import run

    loaded = MODELS[model_key]
    if torch.cuda.is_available() and loaded.device.type != "cuda":
        loaded.model.to("cuda")  # ZeroGPU: the worker has the GPU for this call only
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
    """fusion_call behind the decorator of this machine: spaces.GPU, the fork stand-in, or none."""
    current = mode()
    if current == "zerogpu":
        import spaces

        return spaces.GPU(duration=_call_seconds)(fusion_call)
    if current == "fork":
        return fork_gpu(_call_seconds)(fusion_call)
    return fusion_call


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
    seconds = min(MAX_CALL_S, max(MIN_CALL_S, math.ceil(2 * round_seconds)) if round_seconds else MAX_CALL_S)
    call = gpu_function()
    watcher = _StopWatcher(should_stop, folder / STOP_FILE)
    watcher.start()
    failures = 0
    try:
        while True:  # one round per call, then the finishing call; a failed call is tried once more
            if should_stop():
                raise Cancelled("stopped by the user; the original model is unchanged.")
            try:
                events, outcome = call(model_key, recipe.to_dict(), windows, str(folder), seconds)
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
