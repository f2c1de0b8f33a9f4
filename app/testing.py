"""Helpers for tests and benchmarks that drive the app's jobs without a browser: a context offering
the tiny in-process model, and a way to run one job to its end."""

from __future__ import annotations

from pathlib import Path

from .state import TEST_SOURCE, AppContext, Session, make_context
from .work import make_load_job


def tiny_context(root: Path, grace_s: float = 600) -> AppContext:
    """An app context that offers the tiny test model, with no session reaper (tests close it)."""
    return make_context(test_model="tiny", reaper=False, root=root, grace_s=grace_s)


def run_job(app: AppContext, session: Session, make, kind: str = "job", timeout: float = 180):
    """Submit the job body `make` for `session`, wait for it and return its final snapshot."""
    job = app.runner.submit(make, owner=session.key, kind=kind)
    session.jobs.append(job)
    return app.runner.wait(job, timeout=timeout)


def loaded_session(app: AppContext, key: str) -> Session:
    """The session `key` with the tiny test model loaded (fails the test when loading fails)."""
    session = app.sessions.get(key)
    snap = run_job(app, session, make_load_job(app, session, TEST_SOURCE, None, None, False), "load", timeout=120)
    assert snap.status == "done", snap.error
    return session
