"""The Gradio interface: build_ui() -> gr.Blocks, assembled from one module per tab (app/tabs/).
Launching happens only in app.py.

Every button handler is quick: it turns widget values into core arguments, submits a job to the
runner and returns. A gr.Timer polls the session (every second while it has unfinished jobs, every
few seconds otherwise) and each tab
renders whatever changed, using per-view version counters so unchanged plots are not re-sent.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from typing import Any

import gradio as gr

from . import explain, mcp_tools, views, work
from .jobs import FAILED, FINISHED
from .state import ASSETS, TEST_SOURCE, AppContext, Session, get_context
from .tabs.base import BUSY_POLL_S, IDLE_POLL_S, Changes, session_of, submit_job
from .tabs.compare import CompareTab
from .tabs.export import ExportTab
from .tabs.importance import ImportanceTab
from .tabs.lesson import LessonTab
from .tabs.model import ModelTab
from .tabs.plan import PlanTab
from .tabs.run import RunTab

log = logging.getLogger("fusegpt.app.ui")

MAX_UPLOAD = "20mb"
_TOKENS = itertools.count(1)
# (label, id and attribute of the shell, class); order = the tab strip's order
TABS = (
    ("1 · Model", "model", ModelTab),
    ("2 · Importance", "importance", ImportanceTab),
    ("3 · Plan", "plan", PlanTab),
    ("4 · Run", "run", RunTab),
    ("5 · Compare", "compare", CompareTab),
    ("6 · Export", "export", ExportTab),
    ("7 · Lesson", "lesson", LessonTab),
)


def launch_kwargs() -> dict[str, Any]:
    """Theme, CSS and the small script that turns heatmap clicks into plan edits (gradio 6 takes
    these in launch(), not in Blocks())."""
    css = (ASSETS / "style.css").read_text(encoding="utf-8") if (ASSETS / "style.css").exists() else None
    js = (ASSETS / "click_to_plan.js").read_text(encoding="utf-8") if (ASSETS / "click_to_plan.js").exists() else None
    # run_history off: gradio would otherwise keep every call's inputs (a Hub token too) in the browser.
    # max_file_size: gradio refuses bigger uploads before storing them (data.py reads at most 20 MB of text).
    # mcp_server: the API endpoints (app/mcp_tools.py's tools among them) are MCP tools too, at /gradio_api/mcp/
    return {"css": css, "js": js, "theme": gr.themes.Soft(), "run_history": False, "max_file_size": MAX_UPLOAD,
            "mcp_server": mcp_tools.mcp_available()}  # fmt: skip


def build_ui(app: AppContext | None = None) -> gr.Blocks:
    return Shell(app or get_context()).build()


class Shell:
    """The page around the tabs: header, status line, poll timer, the one-click demo, Stop, and the
    API-only views. Tabs reach each other through it (`shell.plan.estimate`, ...)."""

    model: ModelTab
    importance: ImportanceTab
    plan: PlanTab
    run: RunTab
    compare: CompareTab
    export: ExportTab
    lesson: LessonTab

    def __init__(self, app: AppContext):
        self.app = app
        self.tabs: list = []

    def session(self, request: gr.Request | None) -> Session:
        return session_of(self.app, request)

    def submit(self, session: Session, kind: str, title: str, make) -> tuple[str, Any]:
        return submit_job(self.app, session, kind, title, make)

    # ---- layout -----------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="FuseGPT Studio", fill_width=False) as demo:
            self.seen = gr.State({})
            self.browser_id = gr.BrowserState(None, storage_key="fusegpt-studio-session")
            self.timer = gr.Timer(BUSY_POLL_S, active=True)
            with gr.Row(elem_id="header"):
                with gr.Column(scale=4):
                    gr.Markdown(explain.INTRO)
                with gr.Column(scale=1, min_width=220):
                    self.demo_btn = gr.Button("▶ One-click demo", variant="primary", elem_id="demo-btn")
                    self.stop_btn = gr.Button("■ Stop", variant="stop", elem_id="stop-btn")
            with gr.Row(visible=False, elem_id="demo-confirm") as self.confirm_row:
                self.confirm_md = gr.Markdown("")
                self.confirm_yes = gr.Button("Replace my plan and run the demo", variant="primary", elem_id="demo-yes")
                self.confirm_no = gr.Button("Keep my plan", elem_id="demo-no")
            self.status = gr.Markdown(views.status_text(None), elem_id="job-status")
            # receives heatmap clicks from assets/click_to_plan.js (outside the tabs: always in the page)
            self.click_box = gr.Textbox(visible="hidden", elem_id="plan-click-box")
            with gr.Tabs(elem_id="tabs"):
                for label, key, cls in TABS:
                    with gr.Tab(label, id=key):
                        tab = cls(self)
                        tab.build()
                    setattr(self, key, tab)
                    self.tabs.append(tab)
            # every Plot gets its figures through an event of its own (see deliver)
            self.tokens = {
                plot: gr.State(0) for tab in self.tabs for plot in vars(tab).values() if isinstance(plot, gr.Plot)
            }
            self.wire(demo)
            for tab in self.tabs:
                tab.wire()
        demo.fusegpt_app = self.app  # for tests: the context and the components this UI uses
        demo.fusegpt_ui = self
        return demo

    def outputs(self) -> list:
        """Everything the poll may update, each component once."""
        own = [self.seen, self.timer, self.status]
        return list(dict.fromkeys(own + [c for tab in self.tabs for c in tab.outputs()]))

    # ---- figures: one event per Plot ------------------------------------------------------------
    # A Plot whose figure plotly.js cannot draw throws in the browser; when that Plot shares an event
    # with other outputs, gradio stops updating the whole page (the poll keeps reaching the server,
    # the page shows none of it). So no event outputs a Plot next to anything else: an event's
    # figures are parked in the session and a token State per Plot changes; the token's change event
    # (its only output: that Plot) fetches the figure. A figure that fails then fails alone.

    def route(self, outputs: list) -> list:
        """An event's outputs with each Plot replaced by its token."""
        return list(dict.fromkeys(self.tokens.get(c, c) for c in outputs))

    def deliver(self, out: Any, request) -> Any:
        """An event's dict of updates with each figure parked for its Plot's own event."""
        if not isinstance(out, dict) or request is None:
            return out
        session = self.session(request)
        for plot in [c for c in out if c in self.tokens]:
            figure = out.pop(plot)
            if figure is gr.skip() or isinstance(figure, dict) and figure.get("__type__") == "update":
                continue
            session.figures[(request.session_hash, plot._id)] = figure
            out[self.tokens[plot]] = next(_TOKENS)
        return out

    def figure_event(self, plot: gr.Plot):
        def show_figure(request: gr.Request):
            return self.session(request).figures.pop((request.session_hash, plot._id), gr.skip())

        return show_figure

    # ---- rendering ----------------------------------------------------------------------------

    def render(self, session: Session, seen: dict[str, Any]) -> dict:
        """Everything whose version changed since this page last rendered it."""
        changes = Changes(session, seen)
        snap = self.app.active_job(session)
        out: dict = {self.status: views.status_text(snap, self.app.runner.queue_length())}
        for tab in self.tabs:
            out.update(tab.render(session, changes, snap))
        # one warning per failed job, then keep polling only while something is unfinished
        reported = set(changes.seen.get("reported", []))
        unfinished = False
        for job_id in session.jobs:
            s = self.app.runner.snapshot(job_id)
            if s is None:
                continue
            if s.status not in FINISHED:
                unfinished = True
            elif s.status == FAILED and job_id not in reported:
                reported.add(job_id)
                gr.Warning(f"{s.title}: {s.error}")
        changes.seen["reported"] = sorted(reported)[-100:]
        # The timer never switches off: an idle page polls slowly. A page whose timer a stale reply
        # switched off (a poll computed just before a click, arriving after it) would stop updating
        # while the server goes on; a slow poll recovers within IDLE_POLL_S instead.
        recent = time.monotonic() - session.last_submit < 5.0
        out[self.timer] = gr.Timer(BUSY_POLL_S if unfinished or recent else IDLE_POLL_S, active=True)
        out[self.seen] = changes.seen
        return out

    # ---- events -------------------------------------------------------------------------------

    def wire(self, demo: gr.Blocks) -> None:
        for plot, token in self.tokens.items():
            token.change(
                self.figure_event(plot), [], [plot], api_visibility="private", show_progress="hidden", queue=False
            )
        outputs = self.route(self.outputs())
        # no progress overlay on any event: gradio's "processing | 0.2/0.3s" would flicker over the status line
        demo.load(
            self.on_load,
            [self.browser_id],
            [self.browser_id, *outputs],
            api_visibility="private",
            show_progress="hidden",
        )
        demo.unload(self.on_unload)
        self.timer.tick(
            self.tick,
            [self.seen],
            outputs,
            show_progress="hidden",
            api_name="poll",
            api_visibility="undocumented",
            concurrency_limit=None,
        )
        self.stop_btn.click(self.stop, [], [self.status], api_name="stop", show_progress="hidden")
        confirm = [self.confirm_row, self.confirm_md, self.status, self.timer]
        self.demo_btn.click(self.demo_or_ask, [], confirm, api_visibility="private", show_progress="hidden")
        self.confirm_yes.click(lambda: gr.update(visible=False), [], [self.confirm_row], api_visibility="private").then(
            self.one_click_demo, [], [self.status, self.timer], api_name="one_click_demo", show_progress="hidden"
        )
        self.confirm_no.click(lambda: gr.update(visible=False), [], [self.confirm_row], api_visibility="private")
        gr.api(self.job_status, api_name="job_status")
        gr.api(self.results, api_name="results")
        mcp_tools.register(self.app)  # block_importance, plan_removal, fuse_blocks (MCP tools too)

    def on_load(self, bid: str | None, request: gr.Request):
        bid = bid if isinstance(bid, str) and 16 <= len(bid) <= 64 and bid.isascii() else secrets.token_urlsafe(18)
        session = self.app.sessions.attach(bid, request.session_hash)
        if self.app.autoload and session.loaded is None and not session.jobs:
            # a first visit opens on the default model (shared through the cache: seconds after the first)
            source = TEST_SOURCE if self.app.test_model else "bundled"
            make = lambda: work.make_load_job(self.app, session, source, None, None, False)  # noqa: E731
            self.submit(session, "load", f"Load {source}", make)
        out = self.render(session, {})  # a reload restores every view, the settings included
        out[self.timer] = gr.Timer(BUSY_POLL_S, active=True)  # the first tick slows it if nothing runs
        out[self.browser_id] = bid
        return self.deliver(out, request)

    def on_unload(self, request: gr.Request):
        self.app.sessions.detach(request.session_hash)
        session = self.app.sessions.peek(request.session_hash)
        if session is not None:  # figures parked for the closed page
            for key in [k for k in session.figures if k[0] == request.session_hash]:
                session.figures.pop(key, None)

    def tick(self, seen, request: gr.Request):
        """One poll. A render that fails (a bug, or a job changing what it reads mid-render) must not
        stop the polling, or the page would stop updating while the server goes on: the error is
        logged, every output keeps its value and the timer stays on, so the next tick renders again."""
        try:
            return self.deliver(self.render(self.session(request), seen), request)
        except Exception:
            log.exception("rendering a poll failed; polling goes on")
            outputs = self.route(self.outputs())
            return {**{c: gr.skip() for c in outputs}, self.timer: gr.Timer(BUSY_POLL_S, active=True)}

    def stop(self, request: gr.Request):
        """Stop this session's running job (between two steps) and drop its queued ones."""
        session = self.session(request)
        if self.app.runner.cancel_owner(session.key) == 0:
            gr.Info("Nothing is running.")
        return views.status_text(self.app.active_job(session))

    def demo_or_ask(self, request: gr.Request):
        """The demo replaces the plan: ask first when the visitor made one by hand."""
        session = self.session(request)
        if session.plan.empty:
            status, timer = self.one_click_demo(request)
            return gr.update(visible=False), gr.skip(), status, timer
        question = (
            f"The demo replaces your plan ({views.plan_summary(session)}) and the Run tab's settings "
            "with its own fast ones."
        )
        return gr.update(visible=True), question, gr.skip(), gr.skip()

    def one_click_demo(self, request: gr.Request):
        """Load -> importance -> plan -> run (tiny preset) -> compare, as one job."""
        session = self.session(request)
        source = TEST_SOURCE if self.app.test_model else "bundled"
        prompt = (self.app.prompts or [{"prompt": "Write one sentence about the sea."}])[0]["prompt"]

        def make():
            from fusegpt_core.config import preset

            return work.make_demo_job(self.app, session, preset(work.DEMO_PRESET, model=source), prompt, source)

        return self.submit(session, "demo", "One-click demo", make)

    def job_status(self, request: gr.Request = None) -> dict:
        """The session's jobs as JSON: id, kind, status, stage, message, error."""
        session = self.session(request)
        keys = ("id", "kind", "status", "stage", "message", "error", "step", "total")
        return {"jobs": [{k: getattr(s, k) for k in keys} for s in self.app.runner.jobs_of(session.key)]}

    def results(self, request: gr.Request = None) -> dict:
        """Model info, importance scores, plan, preview and the compare table as JSON."""
        session = self.session(request)
        table, _, _ = views.compare_views(session)
        return {
            "model": {k: v for k, v in (session.model_info or {}).items() if isinstance(v, (str, int, float))},
            "importance": (session.importance or {}).get("scores"),
            "plan": session.plan.to_dict(),
            "preview": {k: v for k, v in (session.preview or {}).items() if k != "key"},
            "compare": table.astype(object).where(table.notna(), None).to_dict(orient="records"),
            "generations": session.generations or [],
        }
