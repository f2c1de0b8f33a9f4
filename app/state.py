"""Per-session state and the one place for process-wide objects (job runner, model cache, sessions).

No gradio here. A `Session` belongs to one visitor (one browser); the `SessionRegistry` creates
them on demand, notices when their pages close, and frees them after a grace period (so that a
page reload finds its results again). Loaded base models are shared read-only across sessions
through `ModelCache`: the pipeline never edits its input model; it works on a fork sharing its tensors.
"""

from __future__ import annotations

import collections
import gc
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusegpt_core.errors import ModelLoadError

from .jobs import FINISHED, JobRunner
from .plan import Plan
from .recipes import RunSettings, TextChoice

log = logging.getLogger("fusegpt.app.state")

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PRECOMPUTED_PATH = ASSETS / "precomputed_importance.json"
# precomputed scores of the other bundled models (assets/make_precomputed.py --model NAME)
PRECOMPUTED_MORE = {"bundled-gemma3": ASSETS / "precomputed_gemma3.json"}
PROMPTS_PATH = ASSETS / "prompts.json"
TEST_MODEL_ENV = "FUSEGPT_APP_TEST_MODEL"
TEST_SOURCE = "tiny (test model)"

VIEWS = ("model", "importance", "trajectory", "plan", "settings", "preview", "runs", "generations", "export",
         "lesson")  # fmt: skip


@dataclass
class RunRecord:
    """One finished run of a session: its report and (while memory allows) its model."""

    id: int
    label: str
    method: str
    report: dict[str, Any]
    model: Any | None
    tokenizer: Any | None
    export_dir: Path | None = None
    zip_path: Path | None = None
    created: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class Session:
    key: str
    workdir: Path
    lock: threading.RLock = field(default_factory=threading.RLock)
    connections: set[str] = field(default_factory=set)
    last_seen: float = field(default_factory=time.monotonic)
    last_submit: float = 0.0
    # ---- what the visitor has done ----
    loaded: Any | None = None
    """fusegpt_core.loading.LoadedModel shared read-only through ModelCache."""
    model_info: dict[str, Any] | None = None
    importance: dict[str, Any] | None = None
    """{'scores': {metric: [float]}, 'agreement': DataFrame, 'origin': str, 'settings': dict}."""
    trajectory: dict[str, Any] | None = None
    """{'rows': [[float|None]], 'removed': [int], 'origin': str}."""
    plan: Plan = field(default_factory=Plan)
    settings: RunSettings = field(default_factory=RunSettings)
    """The Run tab's preset, method, baselines and knobs as last used (restored on reload)."""
    text: TextChoice = field(default_factory=TextChoice)
    """The text for scoring, preview and runs as last chosen (restored on reload)."""
    preview: dict[str, Any] | None = None
    runs: list[RunRecord] = field(default_factory=list)
    generations: list[dict[str, Any]] | None = None
    generation_prompt: str = ""
    exports: dict[str, Any] | None = None
    lesson: dict[str, Any] | None = None
    """The guided lesson's progress (app/lesson.py): {'guess', 'block', 'drop', 'fuse'}."""
    jobs: list[int] = field(default_factory=list)
    batch_blocks: dict[int, list[int]] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=lambda: {v: 0 for v in VIEWS})
    figures: dict[tuple[str, str], Any] = field(default_factory=dict)
    """Figures waiting for their Plot's own event, by (page, plot id) (see ui.Shell.deliver)."""
    next_run_id: int = 1

    def bump(self, *views: str) -> None:
        with self.lock:
            for v in views:
                self.versions[v] = self.versions.get(v, 0) + 1

    def add_run(self, record: RunRecord, keep_models: int) -> None:
        """Append a run; only the newest `keep_models` runs keep their model in memory."""
        with self.lock:
            self.runs.append(record)
            with_model = [r for r in self.runs if r.model is not None]
            for old in with_model[: max(len(with_model) - keep_models, 0)]:
                old.model = None
            traj = record.report.get("trajectory") or []
            if traj:
                self.trajectory = {
                    "rows": traj,
                    "removed": list(record.report.get("removed_blocks") or []),
                    "origin": f"run {record.label}",
                }
        self.bump("runs", "trajectory", "export")

    def run_by_id(self, run_id: int) -> RunRecord | None:
        return next((r for r in self.runs if r.id == run_id), None)

    def release(self) -> None:
        """Drop everything heavy this session holds (models, files)."""
        with self.lock:
            self.loaded = None
            for r in self.runs:
                r.model = None
            self.generations = None
            self.exports = None
        shutil.rmtree(self.workdir, ignore_errors=True)


class ModelCache:
    """Loaded base models shared read-only across sessions, keyed by (source, device, dtype).

    The newest `capacity` models stay cached for the next visitor. At most `max_loaded` different models are
    alive at once, counting those that left the cache but a session still holds: a load beyond that first
    drops cached models nobody uses, and is refused with a message when every one of them is in use."""

    def __init__(self, capacity: int = 2, max_loaded: int = 3):
        self.capacity = capacity
        self.max_loaded = max(max_loaded, capacity)
        self._items: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self._alive: dict[tuple, weakref.ref] = {}  # every model handed out, while something holds it
        self._loading: set[tuple] = set()
        self._lock = threading.Lock()

    def get(self, key: tuple, load: Callable[[], Any]) -> tuple[Any, bool]:
        """(model, was_cached). Loading happens outside the lock; jobs are serialised anyway."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key], True
            ref = self._alive.get(key)
            held = ref() if ref is not None else None
            if held is not None:  # left the cache, but a session still uses it: share it again
                self._remember(key, held)
                return held, True
            self._make_room()
            self._loading.add(key)
        try:
            loaded = load()
        finally:
            with self._lock:
                self._loading.discard(key)
        with self._lock:
            self._remember(key, loaded)
        return loaded, False

    def in_use(self) -> set[tuple]:
        """Keys of the models alive now: cached, being loaded, or held by a session."""
        with self._lock:
            return self._in_use()

    def _in_use(self) -> set[tuple]:
        for k in [k for k, ref in self._alive.items() if ref() is None]:
            del self._alive[k]
        return set(self._alive) | set(self._items) | self._loading

    def _make_room(self) -> None:
        if len(self._in_use()) < self.max_loaded:
            return
        gc.collect()  # models released by ended sessions may sit in reference cycles
        for k in list(self._items):  # least recently used first; a model a session holds stays alive
            if len(self._in_use()) < self.max_loaded:
                break
            del self._items[k]
            gc.collect()
        in_use = self._in_use()
        if len(in_use) >= self.max_loaded:
            names = ", ".join(sorted(str(k[0]) for k in in_use))
            raise ModelLoadError(
                f"the server already holds {len(in_use)} models for its visitors ({names}), its limit; "
                "use one of them (the bundled model is shared by everyone) or try again when other sessions end."
            )

    def _remember(self, key: tuple, loaded: Any) -> None:
        self._items[key] = loaded
        self._items.move_to_end(key)
        try:
            self._alive[key] = weakref.ref(loaded)
        except TypeError:  # not weak-referenceable (tests cache plain values): counted while cached
            pass
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class WindowCache:
    """Token windows by (tokenizer, text source, sizes, seed): tokenising a corpus takes seconds,
    and every job on the same text and model would otherwise redo it. Small and bounded."""

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._items: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value


class SessionRegistry:
    """Sessions by page key (gradio's session hash; every page and API client has its own).

    A reloaded page gets a new session hash; `attach` links it back to the session that the same
    browser had (through a random id the page keeps in localStorage), so a reload finds its
    results. A session with no open page and no request for `grace_s` seconds is freed."""

    def __init__(self, runner: JobRunner, root: Path, grace_s: float = 300.0, max_sessions: int = 200):
        self.runner = runner
        self.root = root
        self.grace_s = grace_s
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}  # page key -> session (a reload adds a second key)
        self._browsers: dict[str, Session] = {}  # browser id -> its latest session
        self._lock = threading.Lock()

    def get(self, key: str) -> Session:
        self.sweep()
        with self._lock:
            s = self._sessions.get(key)
            if s is None:
                safe = "".join(c for c in key if c.isalnum())[:32] or "anon"
                s = Session(key=key, workdir=self.root / safe)
                self._sessions[key] = s
            s.last_seen = time.monotonic()
            return s

    def peek(self, key: str) -> Session | None:
        with self._lock:
            return self._sessions.get(key)

    def attach(self, browser_id: str, connection: str) -> Session:
        """A page opened: the session of this page, or the one its browser had before a reload."""
        self.sweep()
        with self._lock:
            current = self._sessions.get(connection)
            previous = self._browsers.get(browser_id)
            if previous is not None and previous is not current and (current is None or not current.jobs):
                session = previous  # a reload: the new page continues the old session
            elif current is not None:
                session = current
            else:
                safe = "".join(c for c in connection if c.isalnum())[:32] or "anon"
                session = Session(key=connection, workdir=self.root / safe)
            self._sessions[connection] = session
            self._browsers[browser_id] = session
            with session.lock:
                session.connections.add(connection)
                session.last_seen = time.monotonic()
            return session

    def detach(self, connection: str) -> None:
        """A page closed: its session's grace period starts when no page is left."""
        with self._lock:
            s = self._sessions.get(connection)
        if s is not None:
            with s.lock:
                s.connections.discard(connection)
                s.last_seen = time.monotonic()

    def sweep(self, now: float | None = None) -> list[str]:
        """Free sessions with no open page and no request for `grace_s` seconds; returns their keys.

        (API clients never open a page: they stay alive as long as they keep calling.)"""
        now = time.monotonic() if now is None else now
        with self._lock:
            unique = {id(s): s for s in self._sessions.values()}
            idle = {i: now - s.last_seen for i, s in unique.items() if not s.connections}
            expired = {i for i, t in idle.items() if t >= self.grace_s}
            # a hard cap: if too many sessions pile up, the longest-idle go first
            excess = len(unique) - len(expired) - self.max_sessions
            if excess > 0:
                rest = sorted(((t, i) for i, t in idle.items() if i not in expired), reverse=True)
                expired |= {i for _, i in rest[:excess]}
            removed = [unique[i] for i in expired]
            for table in (self._sessions, self._browsers):
                for k in [k for k, s in table.items() if id(s) in expired]:
                    del table[k]
        for s in removed:
            self.runner.cancel_owner(s.key)
            s.release()
            log.info("session %s freed", s.key[:8])
        return [s.key for s in removed]

    def __len__(self) -> int:
        with self._lock:
            return len({id(s) for s in self._sessions.values()})

    def all(self) -> list[Session]:
        with self._lock:
            return list({id(s): s for s in self._sessions.values()}.values())


@dataclass
class AppContext:
    """Everything process-wide: built once per process by `get_context()` (tests build their own)."""

    runner: JobRunner
    sessions: SessionRegistry
    models: ModelCache
    precomputed: dict[str, Any] | None
    prompts: list[dict[str, str]]
    test_model: str | None
    windows: WindowCache = field(default_factory=WindowCache)
    keep_run_models: int = 3
    max_run_models: int = 12
    """Fused models kept in memory over all sessions together; the oldest runs give theirs up first."""
    autoload: bool = True
    """Load the default model when a page first opens (FUSEGPT_APP_AUTOLOAD=0 turns it off)."""
    precomputed_more: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Precomputed scores of the other bundled models, by the name the user types ('bundled-gemma3')."""

    def precomputed_for(self, source: str) -> dict[str, Any] | None:
        """The shipped scores (and run) of a bundled model, None for any other source."""
        return self.precomputed if source == "bundled" else self.precomputed_more.get(source)

    def active_job(self, session: Session):
        """The session's oldest unfinished job snapshot (the one running), else its newest job's
        snapshot, else None."""
        snaps = [self.runner.snapshot(j) for j in session.jobs]
        snaps = [s for s in snaps if s is not None]
        live = [s for s in snaps if s.status not in FINISHED]
        if live:
            return live[0]
        return snaps[-1] if snaps else None

    def has_unfinished(self, session: Session, kind: str, title: str) -> bool:
        """Whether the session has a queued or running job of this kind and title."""
        snaps = (self.runner.snapshot(j) for j in session.jobs)
        return any(s is not None and s.status not in FINISHED and (s.kind, s.title) == (kind, title) for s in snaps)

    def trim_run_models(self) -> int:
        """Release the models of the oldest runs (of any session) beyond `max_run_models`; returns how many."""
        held = sorted(
            ((r.created, r.id, s, r) for s in self.sessions.all() for r in s.runs if r.model is not None),
            key=lambda t: (t[0], t[1]),
        )
        released = 0
        for _, _, session, record in held[: max(len(held) - self.max_run_models, 0)]:
            with session.lock:
                record.model = None
            session.bump("runs", "export")
            released += 1
        return released

    def close(self) -> None:
        self.runner.shutdown()
        self.models.clear()


def load_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("could not read %s (%s)", path, e)
        return default


def make_context(
    workers: int = 1,
    grace_s: float | None = None,
    test_model: str | None = None,
    root: Path | None = None,
    reaper: bool = True,
) -> AppContext:
    if grace_s is None:
        grace_s = float(os.environ.get("FUSEGPT_SESSION_GRACE_S", "300"))
    if test_model is None:
        test_model = os.environ.get(TEST_MODEL_ENV) or None
    root = root or Path(tempfile.gettempdir()) / "fusegpt-studio" / f"p{os.getpid()}"
    root.mkdir(parents=True, exist_ok=True)
    runner = JobRunner(workers=workers)
    sessions = SessionRegistry(runner, root, grace_s=grace_s)
    precomputed = load_json(PRECOMPUTED_PATH, None) if PRECOMPUTED_PATH.exists() else None
    prompts = load_json(PROMPTS_PATH, [])
    more = {name: load_json(path, None) for name, path in PRECOMPUTED_MORE.items() if path.exists()}
    ctx = AppContext(
        runner=runner,
        sessions=sessions,
        models=ModelCache(max_loaded=int(os.environ.get("FUSEGPT_MAX_MODELS", "3"))),
        precomputed=precomputed,
        prompts=prompts,
        test_model=test_model,
        autoload=os.environ.get("FUSEGPT_APP_AUTOLOAD", "1") != "0",
        max_run_models=int(os.environ.get("FUSEGPT_MAX_RUN_MODELS", "12")),
        precomputed_more={name: pre for name, pre in more.items() if pre},
    )
    if reaper:
        _start_reaper(sessions, period=min(30.0, max(grace_s / 2, 1.0)))
    return ctx


def _start_reaper(sessions: SessionRegistry, period: float) -> None:
    def loop() -> None:
        while True:
            time.sleep(period)
            try:
                sessions.sweep()
            except Exception:
                log.exception("session sweep failed")

    threading.Thread(target=loop, name="fusegpt-session-reaper", daemon=True).start()


_CONTEXT: AppContext | None = None
_CONTEXT_LOCK = threading.Lock()


def get_context() -> AppContext:
    global _CONTEXT
    with _CONTEXT_LOCK:
        if _CONTEXT is None:
            _CONTEXT = make_context()
        return _CONTEXT
