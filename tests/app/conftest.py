"""Shared fixtures for the app tests: the repo root on sys.path and a tiny in-process model."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_loaded():
    from fusegpt_core.testing import tiny_loaded_model

    return tiny_loaded_model(family="llama", num_layers=6, seed=0)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def live_app(tmp_path_factory):
    """The app served in-process on a free port, with the tiny test model offered (or the
    bundled one only, when FUSEGPT_E2E_BUNDLED=1). Yields (url, AppContext)."""
    import os

    from app.state import make_context
    from app.ui import build_ui, launch_kwargs

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    bundled = os.environ.get("FUSEGPT_E2E_BUNDLED") == "1"
    ctx = make_context(
        test_model=None if bundled else "tiny", reaper=False, root=tmp_path_factory.mktemp("e2e-sessions"), grace_s=120
    )
    demo = build_ui(ctx)
    demo.queue(default_concurrency_limit=16)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    yield f"http://127.0.0.1:{port}/", ctx
    demo.close()
    ctx.close()
