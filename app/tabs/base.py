"""What every tab shares: the session of a request, submitting a job, and handler plumbing.

A tab is a class with `build()` (its widgets, inside the tab's gr.Tab), `wire()` (its events, once
every tab is built so that it can name other tabs' widgets) and `render(session, changes, snap)`
(the updates the poll timer sends when a view's version changed).
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gradio as gr

from fusegpt_core.errors import FuseGPTError, PlanError

from .. import views
from ..jobs import FINISHED
from ..state import AppContext, Session

if TYPE_CHECKING:
    from ..ui import Shell

log = logging.getLogger("fusegpt.app.ui")

MAX_PENDING_PER_SESSION = 6
BUSY_POLL_S = 1.0  # seconds between two polls of a page while its session has an unfinished job
IDLE_POLL_S = 4.0  # ... and while it has none (the poll never stops: see Shell.render)


class Changes:
    """Which views changed since the page last rendered them (per-page `seen` versions). Within one
    render every tab asking about a view gets the same answer."""

    def __init__(self, session: Session, seen: dict[str, Any]):
        self.session = session
        self.seen = dict(seen or {})
        self._answers: dict[str, bool] = {}

    def __call__(self, view: str, version: Any = None) -> bool:
        if view not in self._answers:
            version = self.session.versions.get(view) if version is None else version
            self._answers[view] = self.seen.get(view) != version
            self.seen[view] = version
        return self._answers[view]


class Tab:
    """Base of the six tabs: access to the shell (context, sessions, job submission, other tabs)."""

    def __init__(self, shell: Shell):
        self.shell = shell
        self.app: AppContext = shell.app

    def build(self) -> None:  # pragma: no cover - every tab defines it
        raise NotImplementedError

    def wire(self) -> None:
        pass

    def render(self, session: Session, changes: Changes, snap) -> dict:
        return {}

    def quick(self, trigger: Callable, fn: Callable, inputs, outputs: list, **kwargs) -> Any:
        """Register a quick (no job, not in the API) event: `fn` (returning a dict of updates) behind
        `safely`, no progress overlay, figures sent through the shell's one-plot events."""
        shell = self.shell

        @functools.wraps(fn)
        def routed(*args, **kw):
            return shell.deliver(fn(*args, **kw), request_in(args, kw))

        routes = shell.route(outputs)
        return trigger(
            safely(routed, routes), inputs, routes, api_visibility="private", show_progress="hidden", **kwargs
        )

    # shortcuts
    def session(self, request: gr.Request | None) -> Session:
        return self.shell.session(request)

    def submit(self, session: Session, kind: str, title: str, make: Callable[[], Any]) -> tuple[str, Any]:
        return self.shell.submit(session, kind, title, make)


def request_in(args: tuple, kwargs: dict) -> Any:
    """The gr.Request among a handler's arguments (gradio passes it where the signature asks)."""
    return next((a for a in (*args, *kwargs.values()) if hasattr(a, "session_hash")), None)


def session_of(app: AppContext, request: gr.Request | None) -> Session:
    """This page's session (an API client's too: every client has its own session hash)."""
    key = (request.session_hash if request is not None else None) or "anonymous"
    return app.sessions.get(key)


def submit_job(app: AppContext, session: Session, kind: str, title: str, make: Callable[[], Any]) -> tuple[str, Any]:
    """Build the job (a user mistake -> a warning and a red status line) and queue it.
    Returns (status line, timer update)."""
    pending = [j for j in session.jobs if (s := app.runner.snapshot(j)) and s.status not in FINISHED]
    if len(pending) >= MAX_PENDING_PER_SESSION:
        gr.Warning("You already have several jobs waiting; let them finish or press Stop.")
        return views.status_text(app.active_job(session)), gr.skip()
    try:
        fn = make()
    except FuseGPTError as e:
        gr.Warning(str(e))
        return f"✖ {e}", gr.skip()
    job_id = app.runner.submit(fn, owner=session.key, kind=kind, title=title)
    session.jobs.append(job_id)
    session.last_submit = time.monotonic()
    del session.jobs[:-50]
    snap = app.runner.snapshot(job_id)
    return views.status_text(snap, app.runner.queue_length()), gr.Timer(BUSY_POLL_S, active=True)


def safely(fn: Callable, outputs: list) -> Callable:
    """`fn` for a quick (no-job) event: a user mistake becomes a warning toast, an unexpected error a
    warning plus a logged traceback, and every output keeps its value. Without this gradio paints
    "Error" on every output and the server log gets a traceback."""

    def keep() -> dict:
        return {c: gr.skip() for c in outputs}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FuseGPTError as e:
            gr.Warning(str(e))
            return keep()
        except Exception as e:  # a bug: keep the page alive, keep the traceback for us
            log.exception("handler %s failed", getattr(fn, "__name__", fn))
            gr.Warning(f"internal error ({type(e).__name__}); the page keeps its state.")
            return keep()

    return wrapper


def named(fn: Callable, names: list[str]) -> Callable:
    """fn(*values, request=...) exposed with one named parameter per input, so API clients see
    'distill_epochs' rather than 'param_17'. gradio injects the request as the last argument."""

    def wrapper(*args):
        *values, request = args
        return fn(*values, request=request)

    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    params.append(inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request))
    wrapper.__signature__ = inspect.Signature(params)
    wrapper.__annotations__ = {"request": gr.Request}
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def as_int(value: Any, name: str, minimum: int = 0) -> int:
    """A whole number from a number box, or a PlanError naming the field."""
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise PlanError(f"'{name}' must be a whole number, got {value!r}.") from None
    if as_float != int(as_float) or as_float < minimum:
        raise PlanError(f"'{name}' must be a whole number of at least {minimum}, got {value!r}.")
    return int(as_float)


def int_list(values) -> list[int]:
    return [int(v) for v in values or []]
