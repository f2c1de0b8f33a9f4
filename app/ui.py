"""The Gradio interface: build_ui() -> gr.Blocks. Launching happens only in app.py.

Every button handler is quick: it turns widget values into core arguments, submits a job to the
runner and returns. A gr.Timer polls the session (only while it has unfinished jobs) and renders
whatever changed, using per-view version counters so unchanged plots are not re-sent.
"""

from __future__ import annotations

import inspect
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import gradio as gr

from fusegpt_core.config import METHODS, PRESETS, max_removable
from fusegpt_core.errors import FuseGPTError, PlanError

from . import explain, views, work
from .estimate import estimate_run, estimate_text
from .jobs import FAILED, FINISHED
from .recipes import KNOBS, build_recipe, cli_command, preset_values
from .state import ASSETS, TEST_SOURCE, AppContext, Session, get_context

log = logging.getLogger("fusegpt.app.ui")

SOURCE_KINDS = ("bundled SmolLM2-135M", "local folder or .gguf file", "Hub id")
TEXT_KINDS = ("bundled corpus", "paste text", "upload a file", "hub dataset")
HUB_DATASETS = ("wikitext2", "c4", "ptb")
PLAN_MODES = ("pick blocks", "let MI choose")
MAX_PENDING_PER_SESSION = 6
MAX_UPLOAD = "20mb"


def slider_max_remove(n_blocks: int) -> int:
    """The "blocks to remove" slider's top: the core's limit, but never below 2 (a slider needs
    maximum > minimum; a run beyond the limit explains the refusal)."""
    return max(max_removable(n_blocks), 2)


def launch_kwargs() -> dict[str, Any]:
    """Theme, CSS and the small script that turns heatmap clicks into plan edits (gradio 6 takes
    these in launch(), not in Blocks())."""
    css = (ASSETS / "style.css").read_text(encoding="utf-8") if (ASSETS / "style.css").exists() else None
    js = (ASSETS / "click_to_plan.js").read_text(encoding="utf-8") if (ASSETS / "click_to_plan.js").exists() else None
    # run_history off: gradio would otherwise keep every call's inputs (a Hub token too) in the browser.
    # max_file_size: gradio refuses bigger uploads before storing them (data.py reads at most 20 MB of text).
    return {
        "css": css,
        "js": js,
        "theme": gr.themes.Soft(),
        "run_history": False,
        "max_file_size": MAX_UPLOAD,
    }


def build_ui(app: AppContext | None = None) -> gr.Blocks:
    app = app or get_context()
    ui = _UI(app)
    return ui.build()


def _int_list(values) -> list[int]:
    return [int(v) for v in values or []]


class _UI:
    """Holds the components so handlers can name them; one instance per Blocks."""

    def __init__(self, app: AppContext):
        self.app = app

    # ---- session helpers --------------------------------------------------------------------

    def session(self, request: gr.Request | None) -> Session:
        """This page's session (an API client's too: every client has its own session hash)."""
        key = (request.session_hash if request is not None else None) or "anonymous"
        return self.app.sessions.get(key)

    def submit(self, session: Session, kind: str, title: str, make) -> tuple[str, Any]:
        """Build the job (errors -> a warning and a red status line) and queue it."""
        pending = [j for j in session.jobs if (s := self.app.runner.snapshot(j)) and s.status not in FINISHED]
        if len(pending) >= MAX_PENDING_PER_SESSION:
            gr.Warning("You already have several jobs waiting; let them finish or press Stop.")
            return views.status_text(self.app.active_job(session)), gr.skip()
        try:
            fn = make()
        except FuseGPTError as e:
            gr.Warning(str(e))
            return f"✖ {e}", gr.skip()
        job_id = self.app.runner.submit(fn, owner=session.key, kind=kind, title=title)
        session.jobs.append(job_id)
        session.last_submit = time.monotonic()
        del session.jobs[:-50]
        snap = self.app.runner.snapshot(job_id)
        return views.status_text(snap, self.app.runner.queue_length()), gr.Timer(active=True)

    # ---- layout -----------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        app = self.app
        with gr.Blocks(title="FuseGPT Studio", fill_width=False) as demo:
            self.seen = gr.State({})
            self.browser_id = gr.BrowserState(None, storage_key="fusegpt-studio-session")
            self.timer = gr.Timer(1.0, active=False)

            with gr.Row(elem_id="header"):
                with gr.Column(scale=4):
                    gr.Markdown(explain.INTRO)
                with gr.Column(scale=1, min_width=220):
                    self.demo_btn = gr.Button("▶ One-click demo", variant="primary", elem_id="demo-btn")
                    self.stop_btn = gr.Button("■ Stop", variant="stop", elem_id="stop-btn")
            self.status = gr.Markdown(views.status_text(None), elem_id="job-status")
            # receives heatmap clicks from assets/click_to_plan.js (outside the tabs: always in the page)
            self.click_box = gr.Textbox(visible="hidden", elem_id="plan-click-box")

            with gr.Tabs(elem_id="tabs"):
                with gr.Tab("1 · Model", id="model"):
                    self._model_tab()
                with gr.Tab("2 · Importance", id="importance"):
                    self._importance_tab()
                with gr.Tab("3 · Plan", id="plan"):
                    self._plan_tab()
                with gr.Tab("4 · Run", id="run"):
                    self._run_tab()
                with gr.Tab("5 · Compare", id="compare"):
                    self._compare_tab()
                with gr.Tab("6 · Export", id="export"):
                    self._export_tab()
            self._wire(demo)
        demo.fusegpt_app = app  # for tests: the context and the components this UI uses
        demo.fusegpt_ui = self
        return demo

    def _model_tab(self) -> None:
        app = self.app
        gr.Markdown(explain.MODEL)
        kinds = list(SOURCE_KINDS) + ([TEST_SOURCE] if app.test_model else [])
        with gr.Row():
            with gr.Column(scale=2):
                self.source_kind = gr.Radio(kinds, value=kinds[0], label="Model", elem_id="source-kind")
                self.source_text = gr.Textbox(
                    "",
                    label="Folder, .gguf file or Hub id",
                    placeholder="e.g. /models/my-llama, ./model.gguf or HuggingFaceTB/SmolLM2-360M-Instruct",
                    visible=False,
                )
                with gr.Row():
                    self.device = gr.Dropdown(["auto", "cpu", "cuda"], value="auto", label="Device")
                    self.dtype = gr.Dropdown(["auto", "float32", "bfloat16", "float16"], value="auto", label="Dtype")
                self.trust = gr.Checkbox(False, label="Trust remote code (only for authors you trust)")
                self.load_btn = gr.Button("Load model", variant="primary", elem_id="load-btn")
            with gr.Column(scale=2):
                self.model_df = gr.Dataframe(
                    views.model_table(Session(key="-", workdir=Path("."))),
                    label="Loaded model",
                    interactive=False,
                    elem_id="model-info",
                )

    def _importance_tab(self) -> None:
        gr.Markdown(explain.IMPORTANCE)
        with gr.Accordion("Scoring text and settings", open=False):
            with gr.Row():
                self.text_kind = gr.Radio(list(TEXT_KINDS), value=TEXT_KINDS[0], label="Calibration text")
                self.dataset = gr.Dropdown(list(HUB_DATASETS), value="wikitext2", label="Hub dataset", visible=False)
            self.pasted = gr.Textbox("", label="Your text", lines=6, visible=False, max_length=2_000_000)
            self.upload = gr.File(label="A UTF-8 .txt file", file_types=[".txt", ".md"], type="filepath", visible=False)
            with gr.Row():
                self.metrics = gr.CheckboxGroup(
                    [
                        ("Macro Influence", "mi"),
                        ("Block Influence", "bi"),
                        ("Angular distance", "angular"),
                        ("Perplexity increase", "ppl"),
                    ],
                    value=["mi", "bi", "angular", "ppl"],
                    label="Metrics",
                )
                self.imp_seq = gr.Number(128, label="Tokens per window", precision=0, minimum=8)
                self.imp_n = gr.Number(4, label="Windows", precision=0, minimum=1)
                self.imp_seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                self.imp_cache = gr.Checkbox(True, label="Reuse prefix states (same numbers, half the work)")
        self.imp_btn = gr.Button("Compute importance", variant="primary", elem_id="importance-btn")
        self.imp_origin = gr.Markdown("Load a model first.", elem_id="importance-origin")
        self.heatmap = gr.Plot(label="Importance per block", elem_id="importance-plot")
        with gr.Row():
            with gr.Column(scale=3):
                self.agree_plot = gr.Plot(label="Rank agreement", elem_id="agreement-plot")
            with gr.Column(scale=2):
                gr.Markdown(explain.AGREEMENT)
                self.agree_df = gr.Dataframe(label="Spearman", interactive=False)
        gr.Markdown(explain.TRAJECTORY)
        self.traj_plot = gr.Plot(label="MI trajectory", elem_id="trajectory-plot")
        with gr.Accordion("Raw scores (table)", open=False):
            self.scores_df = gr.Dataframe(interactive=False, elem_id="scores-table")

    def _plan_tab(self) -> None:
        gr.Markdown(explain.PLAN)
        with gr.Row():
            self.plan_mode = gr.Radio(list(PLAN_MODES), value=PLAN_MODES[0], label="How to choose", elem_id="plan-mode")
            self.remove_k = gr.Slider(
                1, slider_max_remove(30), value=6, step=1, label="Blocks to remove", elem_id="remove-k"
            )
            self.fill_btn = gr.Button("Tick MI's lowest blocks", elem_id="fill-btn")
        self.blocks_cb = gr.CheckboxGroup(
            [], value=[], label="Blocks to remove (tick, or click the importance chart)", elem_id="blocks-cb"
        )
        self.plan_md = gr.Markdown("No block chosen yet.", elem_id="plan-summary")
        with gr.Accordion("Fusion groups (which blocks absorb each removed block)", open=False):
            with gr.Row():
                self.focus = gr.Dropdown([], value=None, label="Removed block", elem_id="focus-dd")
                self.targets_cb = gr.CheckboxGroup([], value=[], label="Its targets", elem_id="targets-cb")
            with gr.Row():
                self.apply_targets = gr.Button("Use these targets")
                self.reset_targets = gr.Button("Back to the reference window")
        self.diagram = gr.Plot(label="Plan", elem_id="plan-diagram")
        with gr.Row():
            with gr.Column():
                self.preview_btn = gr.Button("Preview drop (perplexity without repair)", elem_id="preview-btn")
                self.preview_md = gr.Markdown(
                    views.preview_text(Session(key="-", workdir=Path("."))), elem_id="preview-text"
                )
            with gr.Column():
                self.estimate_md = gr.Markdown("Load a model for a run-time estimate.", elem_id="estimate-text")

    def _run_tab(self) -> None:
        gr.Markdown(explain.RUN)
        with gr.Row():
            self.preset = gr.Dropdown(list(PRESETS), value="cpu-demo", label="Preset", elem_id="preset-dd")
            self.method = gr.Radio(list(METHODS), value="fusegpt", label="Method", elem_id="method-radio")
            self.baselines = gr.CheckboxGroup(
                [m for m in METHODS if m != "fusegpt"],
                value=[],
                label="Also run on the same plan",
                elem_id="baselines-cb",
            )
        self.knobs: list[gr.components.Component] = []
        values = preset_values("cpu-demo")
        with gr.Accordion("Advanced settings (every knob of the recipe)", open=False):
            for start in range(0, len(KNOBS), 4):
                with gr.Row():
                    for knob, value in zip(KNOBS[start : start + 4], values[start : start + 4]):
                        self.knobs.append(_knob_widget(knob, value))
        with gr.Row():
            self.run_btn = gr.Button("Run", variant="primary", elem_id="run-btn")
            self.stop_btn2 = gr.Button("■ Stop", variant="stop", elem_id="stop-btn-2")
        self.run_estimate = gr.Markdown("", elem_id="run-estimate")
        self.run_header = gr.Markdown("No run yet.", elem_id="run-header")
        with gr.Row():
            with gr.Column():
                self.loss_plot = gr.Plot(label="Loss per group", elem_id="loss-plot")
            with gr.Column():
                self.run_traj = gr.Plot(label="MI trajectory of this run", elem_id="run-trajectory")
        self.rounds_df = gr.Dataframe(label="Rounds", interactive=False, elem_id="rounds-table")
        with gr.Accordion("Log", open=False):
            self.log_box = gr.Textbox(lines=10, max_lines=20, label="Log", interactive=False)

    def _compare_tab(self) -> None:
        gr.Markdown(explain.COMPARE)
        self.compare_df = gr.Dataframe(label="Models", interactive=False, elem_id="compare-table")
        self.compare_plot = gr.Plot(label="Perplexity", elem_id="compare-plot")
        prompts = self.app.prompts or [{"title": "Hello", "prompt": "Write one sentence about the sea."}]
        with gr.Row():
            self.example = gr.Dropdown([p["title"] for p in prompts], value=prompts[0]["title"], label="Example prompt")
            self.prompt = gr.Textbox(prompts[0]["prompt"], label="Prompt", lines=2, scale=3, elem_id="prompt-box")
        with gr.Row():
            self.max_new = gr.Slider(8, 256, value=64, step=8, label="New tokens")
            self.do_sample = gr.Checkbox(False, label="Sample (off = greedy)")
            self.temperature = gr.Slider(0.1, 1.5, value=0.7, step=0.05, label="Temperature")
            self.top_p = gr.Slider(0.1, 1.0, value=0.9, step=0.05, label="Top-p")
            self.gen_seed = gr.Number(0, label="Seed", precision=0)
        self.gen_btn = gr.Button("Generate with every model", variant="primary", elem_id="generate-btn")
        self.gen_html = gr.HTML(views.generations_html(None), elem_id="generations")

    def _export_tab(self) -> None:
        gr.Markdown(explain.EXPORT)
        with gr.Row():
            self.export_run = gr.Dropdown([], value=None, label="Run", elem_id="export-run", allow_custom_value=True)
            self.export_btn = gr.Button("Prepare download", variant="primary", elem_id="export-btn")
        with gr.Row():
            self.zip_file = gr.File(label="Compressed model (HF folder, zip)", interactive=False, elem_id="zip-file")
            self.recipe_file = gr.File(label="recipe.json", interactive=False, elem_id="recipe-file")
            self.report_file = gr.File(label="report.json", interactive=False, elem_id="report-file")
        self.cli = gr.Code(cli_command(), language="shell", label="Reproduce from the command line", interactive=False)
        with gr.Accordion("Push to the Hugging Face Hub", open=False):
            with gr.Row():
                self.repo = gr.Textbox(label="Repository", placeholder="your-name/smollm2-fused")
                self.token = gr.Textbox(label="Write token (used for this push only)", type="password")
            self.push_btn = gr.Button("Push")
            self.push_md = gr.Markdown("")

    # ---- rendering ----------------------------------------------------------------------------

    def view_outputs(self) -> list:
        return [
            self.seen, self.timer, self.status, self.model_df, self.imp_origin, self.heatmap, self.agree_plot,
            self.agree_df, self.scores_df, self.traj_plot, self.blocks_cb, self.remove_k, self.plan_mode,
            self.plan_md, self.focus, self.targets_cb, self.diagram, self.preview_md, self.run_header,
            self.loss_plot, self.run_traj, self.rounds_df, self.log_box, self.compare_df, self.compare_plot,
            self.gen_html, self.export_run, self.zip_file, self.recipe_file, self.report_file, self.push_md,
        ]  # fmt: skip

    def render(self, session: Session, seen: dict[str, Any]) -> dict:
        """Everything whose version changed since this page last rendered it."""
        app = self.app
        seen = dict(seen or {})
        out: dict = {}
        snap = app.active_job(session)
        out[self.status] = views.status_text(snap, app.runner.queue_length())

        def changed(view: str, version: Any = None) -> bool:
            version = session.versions.get(view) if version is None else version
            if seen.get(view) == version:
                return False
            seen[view] = version
            return True

        n = int((session.model_info or {}).get("blocks") or 0)
        model_changed = changed("model")
        if model_changed:
            out[self.model_df] = views.model_table(session)
            if n >= 2:  # a slider needs maximum > minimum (1)
                out[self.remove_k] = gr.update(maximum=slider_max_remove(n), value=max(n // 5, 1))
        importance_changed = changed("importance")
        plan_changed = changed("plan")
        if importance_changed:
            heat, agree, agree_df, scores_df = views.importance_figures(session)
            out.update(
                {
                    self.imp_origin: views.importance_origin(session),
                    self.heatmap: heat,
                    self.agree_plot: agree,
                    self.agree_df: agree_df,
                    self.scores_df: scores_df,
                }
            )
        elif plan_changed and session.importance is not None:
            out[self.heatmap] = views.importance_figures(session)[0]
        if changed("trajectory"):
            out[self.traj_plot] = views.trajectory_figure(session.trajectory)
        if model_changed or plan_changed:
            plan = session.plan
            chosen = [str(b) for b in plan.get("blocks") or []]
            out[self.blocks_cb] = gr.update(choices=views.block_choices(session), value=chosen)
            out[self.plan_mode] = PLAN_MODES[1] if plan.get("mode") == "auto" else PLAN_MODES[0]
            if plan.get("mode") == "auto" and plan.get("remove"):
                out[self.remove_k] = gr.update(maximum=slider_max_remove(n), value=plan["remove"])
            out[self.plan_md] = views.plan_summary(session)
            out[self.focus] = gr.update(choices=chosen, value=None)
            out[self.targets_cb] = gr.update(choices=views.block_choices(session), value=[])
            out[self.diagram] = views.plan_diagram(session, plan.get("group_size", 8))
        if changed("preview"):
            out[self.preview_md] = views.preview_text(session)
        live_key = (
            (snap.id, snap.live_version, snap.status)
            if snap is not None and snap.kind in ("run", "demo")
            else ("runs", session.versions["runs"])
        )
        if changed("live", live_key):
            live = views.run_live(snap, session)
            out.update(
                {
                    self.run_header: live["header"],
                    self.loss_plot: live["loss"],
                    self.run_traj: live["trajectory"],
                    self.rounds_df: live["rounds"],
                    self.log_box: live["log"],
                }
            )
        if changed("runs"):
            table, chart = views.compare_views(session)
            out[self.compare_df], out[self.compare_plot] = table, chart
            choices = views.run_choices(session)
            out[self.export_run] = gr.update(choices=choices, value=choices[0][1] if choices else None)
        if changed("generations"):
            out[self.gen_html] = views.generations_html(session.generations, session.generation_prompt)
        if changed("export"):
            ex = session.exports or {}
            out[self.zip_file] = str(ex["zip"]) if ex.get("zip") else None
            out[self.recipe_file] = str(ex["recipe"]) if ex.get("recipe") else None
            out[self.report_file] = str(ex["report"]) if ex.get("report") else None
            out[self.push_md] = f"Pushed: {ex['pushed']}" if ex.get("pushed") else ""
        # one warning per failed job, then keep polling only while something is unfinished
        reported = set(seen.get("reported", []))
        unfinished = False
        for job_id in session.jobs:
            s = app.runner.snapshot(job_id)
            if s is None:
                continue
            if s.status not in FINISHED:
                unfinished = True
            elif s.status == FAILED and job_id not in reported:
                reported.add(job_id)
                gr.Warning(f"{s.title}: {s.error}")
        seen["reported"] = sorted(reported)[-100:]
        # Stay active a few seconds after the last submission: a click's "activate" and a render
        # computed just before that click may arrive in either order.
        recent = time.monotonic() - session.last_submit < 5.0
        out[self.timer] = gr.Timer(active=unfinished or recent)
        out[self.seen] = seen
        return out

    # ---- handlers ---------------------------------------------------------------------------

    def _wire(self, demo: gr.Blocks) -> None:
        app = self.app
        views_out = self.view_outputs()

        def on_load(bid: str | None, request: gr.Request):
            bid = bid if isinstance(bid, str) and 16 <= len(bid) <= 64 and bid.isascii() else secrets.token_urlsafe(18)
            session = app.sessions.attach(bid, request.session_hash)
            if app.autoload and session.loaded is None and not session.jobs:
                # a first visit opens on the default model (shared through the cache: seconds after the first)
                source = TEST_SOURCE if app.test_model else "bundled"
                self.submit(
                    session,
                    "load",
                    f"Load {source}",
                    lambda: work.make_load_job(app, session, source, None, None, False),
                )
            out = self.render(session, {})
            out[self.timer] = gr.Timer(active=True)  # the first tick turns it off if nothing runs
            out[self.browser_id] = bid
            return out

        demo.load(on_load, [self.browser_id], [self.browser_id, *views_out], api_visibility="private")

        def on_unload(request: gr.Request):
            app.sessions.detach(request.session_hash)

        demo.unload(on_unload)

        def tick(seen, request: gr.Request):
            return self.render(self.session(request), seen)

        self.timer.tick(
            tick,
            [self.seen],
            views_out,
            show_progress="hidden",
            api_name="poll",
            api_visibility="undocumented",
            concurrency_limit=None,
        )

        # -- model
        def source_visible(kind):
            return gr.update(visible=kind in SOURCE_KINDS[1:])

        self.source_kind.change(source_visible, self.source_kind, self.source_text, api_visibility="private")

        def load_model(kind, text, device, dtype, trust, request: gr.Request):
            """Load a model: kind is one of the Model radio's choices; text the path or Hub id."""
            session = self.session(request)
            source = {SOURCE_KINDS[0]: "bundled", TEST_SOURCE: TEST_SOURCE}.get(kind, (text or "").strip())
            dev = None if device == "auto" else device
            dt = None if dtype == "auto" else dtype
            return self.submit(
                session,
                "load",
                f"Load {source or 'model'}",
                lambda: work.make_load_job(app, session, source, dev, dt, bool(trust)),
            )

        self.load_btn.click(
            load_model,
            [self.source_kind, self.source_text, self.device, self.dtype, self.trust],
            [self.status, self.timer],
            api_name="load_model",
        )

        # -- importance
        def text_visible(kind):
            return (
                gr.update(visible=kind == "paste text"),
                gr.update(visible=kind == "upload a file"),
                gr.update(visible=kind == "hub dataset"),
            )

        self.text_kind.change(
            text_visible, self.text_kind, [self.pasted, self.upload, self.dataset], api_visibility="private"
        )
        text_inputs = [self.text_kind, self.pasted, self.upload, self.dataset]

        def compute_importance(kind, pasted, upload, dataset, metrics, seq_len, n, seed, cache, request: gr.Request):
            session = self.session(request)

            def make():
                source = work.check_source_text(kind, pasted, upload, dataset)
                return work.make_importance_job(
                    app,
                    session,
                    calib_source=source,
                    metrics=list(metrics or []),
                    seq_len=_as_int(seq_len, "tokens per window"),
                    n_score=_as_int(n, "windows"),
                    seed=_as_int(seed, "seed"),
                    use_cache=bool(cache),
                )

            return self.submit(session, "importance", "Compute importance", make)

        self.imp_btn.click(
            compute_importance,
            [*text_inputs, self.metrics, self.imp_seq, self.imp_n, self.imp_seed, self.imp_cache],
            [self.status, self.timer],
            api_name="compute_importance",
        )

        # -- plan (quick edits: no job, the session's plan is updated at once)
        recipe_inputs = [self.preset, self.method, *text_inputs, *self.knobs]
        plan_outputs = [
            self.plan_md,
            self.diagram,
            self.focus,
            self.heatmap,
            self.estimate_md,
            self.run_estimate,
        ]
        group_size_idx = [k.key for k in KNOBS].index("fusion.group_size")

        def plan_render(session: Session, rest) -> tuple:
            group_size = _safe_int(rest[len(text_inputs) + 2 + group_size_idx], 8)
            session.plan["group_size"] = group_size
            chosen = [str(b) for b in session.plan.get("blocks") or []]
            heat = views.importance_figures(session)[0] if session.importance is not None else gr.skip()
            est = self.estimate(session, rest)
            return (
                views.plan_summary(session),
                views.plan_diagram(session, group_size),
                gr.update(choices=chosen, value=chosen[0] if chosen else None),
                heat,
                est,
                est,
            )

        def edit_plan(mode, blocks, k, *rest, request: gr.Request):
            """The plan widgets changed: store the plan and redraw it."""
            session = self.session(request)
            with session.lock:
                scores = (session.importance or {}).get("scores", {}).get("mi")
                chosen = views.removal_order(_int_list(blocks), scores)
                targets = {b: t for b, t in (session.plan.get("targets") or {}).items() if b in chosen}
                session.plan = {
                    **session.plan,
                    "mode": "auto" if mode == PLAN_MODES[1] else "manual",
                    "blocks": chosen if mode != PLAN_MODES[1] else [],
                    "targets": targets,
                    "remove": _safe_int(k, 1),
                }
            return plan_render(session, rest)

        plan_inputs = [self.plan_mode, self.blocks_cb, self.remove_k, *recipe_inputs]
        edit_plan = _positional(edit_plan, len(plan_inputs))
        for trigger in (self.blocks_cb.input, self.plan_mode.input, self.remove_k.input):
            trigger(edit_plan, plan_inputs, plan_outputs, api_visibility="private", trigger_mode="always_last")

        def refresh_plan(*rest, request: gr.Request):
            """The group size changed: redraw the groups."""
            return plan_render(self.session(request), rest)

        group_size_widget = self.knobs[group_size_idx]
        group_size_widget.input(
            _positional(refresh_plan, len(recipe_inputs)),
            recipe_inputs,
            plan_outputs,
            api_visibility="private",
            trigger_mode="always_last",
        )

        def set_plan_api(mode: str, blocks: list[int], k: int, request: gr.Request = None) -> dict:
            """Set the plan: mode 'pick blocks' with block indices, or 'let MI choose' with k blocks."""
            return _plan_api(self, mode, blocks, k, request)

        gr.api(set_plan_api, api_name="set_plan")

        def fill_lowest(k, *rest, request: gr.Request):
            session = self.session(request)
            scores = (session.importance or {}).get("scores", {}).get("mi")
            if not scores:
                gr.Warning("MI scores are needed first: compute importance (Importance tab).")
                return (gr.skip(), gr.skip(), *([gr.skip()] * len(plan_outputs)))
            blocks = views.lowest_blocks(scores, _safe_int(k, 1))
            with session.lock:
                session.plan = {
                    **session.plan,
                    "mode": "manual",
                    "blocks": views.removal_order(blocks, scores),
                    "targets": {},
                }
            return (
                gr.update(value=[str(b) for b in session.plan["blocks"]]),
                PLAN_MODES[0],
                *plan_render(session, rest),
            )

        self.fill_btn.click(
            _positional(fill_lowest, 1 + len(recipe_inputs)),
            [self.remove_k, *recipe_inputs],
            [self.blocks_cb, self.plan_mode, *plan_outputs],
            api_visibility="private",
        )

        def click_block(value, *rest, request: gr.Request):
            """A click on the importance heatmap (see assets/click_to_plan.js) toggles that block."""
            session = self.session(request)
            try:
                block = int(str(value).split(":")[0])
            except ValueError:
                return (gr.skip(), gr.skip(), *([gr.skip()] * len(plan_outputs)))
            n = int((session.model_info or {}).get("blocks") or 0)
            if not 0 <= block < n:
                return (gr.skip(), gr.skip(), *([gr.skip()] * len(plan_outputs)))
            with session.lock:
                blocks = set(session.plan.get("blocks") or [])
                blocks ^= {block}
                if len(blocks) >= n:
                    blocks.discard(block)
                scores = (session.importance or {}).get("scores", {}).get("mi")
                session.plan = {
                    **session.plan,
                    "mode": "manual",
                    "blocks": views.removal_order(blocks, scores),
                }
            return (
                gr.update(value=[str(b) for b in session.plan["blocks"]]),
                PLAN_MODES[0],
                *plan_render(session, rest),
            )

        self.click_box.change(
            _positional(click_block, 1 + len(recipe_inputs)),
            [self.click_box, *recipe_inputs],
            [self.blocks_cb, self.plan_mode, *plan_outputs],
            api_visibility="private",
        )

        def focus_targets(focus, request: gr.Request):
            session = self.session(request)
            n = int((session.model_info or {}).get("blocks") or 0)
            if focus in (None, ""):
                return gr.update(choices=[], value=[]), gr.skip()
            b = int(focus)
            order = session.plan.get("blocks") or []
            earlier = set(order[: order.index(b)]) if b in order else set()
            group_size = session.plan.get("group_size", 8)
            groups = views.plan_groups(n, order, session.plan.get("targets") or {}, group_size)
            choices = [str(i) for i in range(n) if i != b and i not in earlier]
            return (
                gr.update(choices=choices, value=[str(t) for t in groups.get(b, [])]),
                views.plan_diagram(session, group_size, focus=b),
            )

        self.focus.change(focus_targets, [self.focus], [self.targets_cb, self.diagram], api_visibility="private")

        def apply_targets(focus, targets, *rest, request: gr.Request):
            session = self.session(request)
            if focus in (None, ""):
                gr.Warning("Choose a removed block first.")
                return tuple(gr.skip() for _ in plan_outputs)
            if not targets:
                gr.Warning(f"Block {focus} needs at least one target block.")
                return tuple(gr.skip() for _ in plan_outputs)
            with session.lock:
                custom = dict(session.plan.get("targets") or {})
                custom[int(focus)] = sorted(_int_list(targets))
                session.plan = {**session.plan, "targets": custom}
            out = list(plan_render(session, rest))
            out[2] = gr.skip()  # keep the focused block
            out[1] = views.plan_diagram(session, session.plan["group_size"], focus=int(focus))
            return tuple(out)

        def reset_targets(focus, targets, *rest, request: gr.Request):
            session = self.session(request)
            with session.lock:
                custom = dict(session.plan.get("targets") or {})
                if focus not in (None, ""):
                    custom.pop(int(focus), None)
                session.plan = {**session.plan, "targets": custom}
            out = list(plan_render(session, rest))
            out[2] = gr.skip()
            return tuple(out)

        for btn, fn in ((self.apply_targets, apply_targets), (self.reset_targets, reset_targets)):
            btn.click(
                _positional(fn, 2 + len(recipe_inputs)),
                [self.focus, self.targets_cb, *recipe_inputs],
                plan_outputs,
                api_visibility="private",
            )

        def update_estimate(*rest, request: gr.Request):
            session = self.session(request)
            est = self.estimate(session, rest)
            return est, est

        update_estimate = _positional(update_estimate, len(recipe_inputs))
        for w in [self.preset, self.method, *self.knobs]:
            w.change(
                update_estimate,
                [*recipe_inputs],
                [self.estimate_md, self.run_estimate],
                api_visibility="private",
                trigger_mode="always_last",
                show_progress="hidden",
            )

        def preview_drop(kind, pasted, upload, dataset, *knobs, request: gr.Request):
            session = self.session(request)
            values = dict(zip([k.key for k in KNOBS], knobs))

            def make():
                blocks = session.plan.get("blocks") or []
                if session.plan.get("mode") == "auto" or not blocks:
                    raise PlanError("tick the blocks to drop first (the preview needs a fixed list of blocks).")
                source = work.check_source_text(kind, pasted, upload, dataset)
                return work.make_preview_job(
                    app,
                    session,
                    blocks,
                    source,
                    _as_int(values["data.seq_len"], "seq_len"),
                    _as_int(values["data.n_eval"], "n_eval"),
                    _as_int(values["data.seed"], "seed"),
                )

            return self.submit(session, "preview", "Preview drop", make)

        preview_drop = _named(preview_drop, ["kind", "pasted", "upload", "dataset", *KNOB_PARAMS])
        self.preview_btn.click(
            preview_drop,
            [*text_inputs, *self.knobs],
            [self.status, self.timer],
            api_name="preview_drop",
        )

        # -- run
        def fill_preset(name):
            return tuple(preset_values(name))

        self.preset.input(fill_preset, self.preset, self.knobs, api_visibility="private")

        def start_run(preset, method, baselines, kind, pasted, upload, dataset, *knobs, request: gr.Request):
            session = self.session(request)
            methods = [method] + [b for b in baselines or [] if b != method]
            status, timer = "", gr.skip()
            batch = secrets.randbits(31)
            for i, m in enumerate(methods):

                def make(m=m):
                    recipe = self.recipe(session, preset, m, kind, pasted, upload, dataset, knobs)
                    return work.make_run_job(app, session, recipe, batch_id=batch if len(methods) > 1 else None)

                s, t = self.submit(session, "run", f"Run {m}", make)
                if i == 0:
                    status, timer = s, t
                if s.startswith("✖"):
                    break
            return status, timer

        start_run = _named(
            start_run,
            ["preset", "method", "baselines", "kind", "pasted", "upload", "dataset", *KNOB_PARAMS],
        )
        self.run_btn.click(
            start_run,
            [self.preset, self.method, self.baselines, *text_inputs, *self.knobs],
            [self.status, self.timer],
            api_name="start_run",
        )

        def stop(request: gr.Request):
            """Stop this session's running job (between two steps) and drop its queued ones."""
            session = self.session(request)
            n = app.runner.cancel_owner(session.key)
            if n == 0:
                gr.Info("Nothing is running.")
            return views.status_text(app.active_job(session))

        for btn in (self.stop_btn, self.stop_btn2):
            btn.click(stop, [], [self.status], api_name="stop" if btn is self.stop_btn else False)

        # -- compare
        def pick_example(title):
            for p in app.prompts:
                if p["title"] == title:
                    return p["prompt"]
            return gr.skip()

        self.example.input(pick_example, self.example, self.prompt, api_visibility="private")

        def generate(prompt, max_new, do_sample, temperature, top_p, seed, request: gr.Request):
            session = self.session(request)
            settings = {
                "max_new_tokens": _as_int(max_new, "new tokens"),
                "do_sample": bool(do_sample),
                "temperature": float(temperature),
                "top_p": float(top_p),
                "seed": _safe_int(seed, 0),
            }
            return self.submit(
                session, "generate", "Generate", lambda: work.make_generate_job(session, prompt, settings)
            )

        self.gen_btn.click(
            generate,
            [
                self.prompt,
                self.max_new,
                self.do_sample,
                self.temperature,
                self.top_p,
                self.gen_seed,
            ],
            [self.status, self.timer],
            api_name="generate",
        )

        # -- export
        def export(run_id, request: gr.Request):
            session = self.session(request)
            if run_id in (None, ""):
                gr.Warning("No run to export yet: run a plan first.")
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            try:
                run_id = _as_int(run_id, "run")
                recipe_path, report_path = work.write_recipe_files(session, run_id)
            except FuseGPTError as e:
                gr.Warning(str(e))
                return gr.skip(), gr.skip(), gr.skip(), f"✖ {e}", gr.skip()
            status, timer = self.submit(
                session, "export", "Export model", lambda: work.make_export_job(session, run_id)
            )
            return str(recipe_path), str(report_path), cli_command(recipe_path.name), status, timer

        self.export_btn.click(
            export,
            [self.export_run],
            [self.recipe_file, self.report_file, self.cli, self.status, self.timer],
            api_name="export",
        )

        def push(run_id, repo, token, request: gr.Request):
            session = self.session(request)
            if run_id in (None, ""):
                gr.Warning("No run to push yet.")
                return "", gr.skip(), gr.skip()
            status, timer = self.submit(
                session,
                "push",
                f"Push to {repo}",
                lambda: work.make_push_job(session, _as_int(run_id, "run"), repo, token),
            )
            return "", status, timer  # the token box is cleared at once

        self.push_btn.click(
            push,
            [self.export_run, self.repo, self.token],
            [self.token, self.status, self.timer],
            api_name=False,
        )

        # -- one-click demo
        def one_click_demo(request: gr.Request):
            """Load -> importance -> plan -> run (tiny preset) -> compare, as one job."""
            session = self.session(request)
            source = TEST_SOURCE if app.test_model else "bundled"
            prompt = (app.prompts or [{"prompt": "Write one sentence about the sea."}])[0]["prompt"]

            def make():
                from fusegpt_core.config import preset

                recipe = preset("tiny", model=source)
                return work.make_demo_job(app, session, recipe, prompt, source)

            return self.submit(session, "demo", "One-click demo", make)

        self.demo_btn.click(one_click_demo, [], [self.status, self.timer], api_name="one_click_demo")

        # -- API-only views
        def job_status(request: gr.Request = None) -> dict:
            """The session's jobs as JSON: id, kind, status, stage, message, error."""
            session = self.session(request)
            return {
                "jobs": [
                    {
                        "id": s.id,
                        "kind": s.kind,
                        "status": s.status,
                        "stage": s.stage,
                        "message": s.message,
                        "error": s.error,
                        "step": s.step,
                        "total": s.total,
                    }
                    for s in app.runner.jobs_of(session.key)
                ]
            }

        gr.api(job_status, api_name="job_status")

        def results(request: gr.Request = None) -> dict:
            """Model info, importance scores, plan, preview and the compare table as JSON."""
            session = self.session(request)
            table, _ = views.compare_views(session)
            return {
                "model": {k: v for k, v in (session.model_info or {}).items() if isinstance(v, (str, int, float))},
                "importance": (session.importance or {}).get("scores"),
                "plan": {k: v for k, v in session.plan.items() if k != "targets"},
                "preview": {k: v for k, v in (session.preview or {}).items() if k != "key"},
                "compare": table.astype(object).where(table.notna(), None).to_dict(orient="records"),
                "generations": session.generations or [],
            }

        gr.api(results, api_name="results")

    # ---- helpers that need several widgets --------------------------------------------------

    def recipe(self, session: Session, preset, method, kind, pasted, upload, dataset, knobs):
        if session.loaded is None:
            raise PlanError("no model is loaded yet: load one in the Model tab first.")
        info = session.model_info or {}
        plan = session.plan
        knobs = list(knobs)
        if preset != "cpu-demo" and knobs == preset_values("cpu-demo"):
            # settings untouched since page load (an API call that names only a preset): follow the preset
            knobs = preset_values(preset)
        return build_recipe(
            model=session.loaded.source,
            preset_name=preset,
            method=method,
            plan=plan,
            knobs=list(knobs),
            calib_source=work.check_source_text(kind, pasted, upload, dataset),
            device=str(info.get("device", "")).split(":")[0] or None,
            dtype=info.get("dtype"),
            remove=plan.get("remove"),
            num_blocks=int(info.get("blocks") or 0) or None,
        )

    def estimate(self, session: Session, rest) -> str:
        """'≈ 3 min on this cpu' for the current plan and knobs, or why there is no estimate."""
        info = session.model_info
        if not info or not info.get("block_seconds"):
            return "Load a model for a run-time estimate."
        preset, method, kind, pasted, upload, dataset, *knobs = rest
        try:
            recipe = self.recipe(session, preset, method, kind, pasted, upload, dataset, knobs)
        except FuseGPTError as e:
            return f"No estimate yet: {e}"
        est = estimate_run(recipe, int(info["blocks"]), info["block_seconds"], info["timing_seq_len"])
        return "Estimated run time: " + estimate_text(est, info["device"])


def _plan_api(ui: _UI, mode, blocks, k, request) -> dict:
    """set_plan for API clients: mode 'pick blocks' + blocks, or 'let MI choose' + k."""
    session = ui.session(request)
    with session.lock:
        scores = (session.importance or {}).get("scores", {}).get("mi")
        auto = mode == PLAN_MODES[1]
        session.plan = {
            **session.plan,
            "mode": "auto" if auto else "manual",
            "blocks": [] if auto else views.removal_order(_int_list(blocks), scores),
            "targets": {},
            "remove": _safe_int(k, 1),
        }
    session.bump("plan")
    return {k: v for k, v in session.plan.items() if k != "targets"}


KNOB_PARAMS = [k.key.replace(".", "_") for k in KNOBS]


def _named(fn, names: list[str]):
    """fn(*values, request=...) exposed with one named parameter per input, so API clients see
    'distill_epochs' rather than 'param_17'. The request is injected by gradio as the last argument."""

    def wrapper(*args):
        *values, request = args
        return fn(*values, request=request)

    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    params.append(inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request))
    wrapper.__signature__ = inspect.Signature(params)
    wrapper.__annotations__ = {"request": gr.Request}
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def _positional(fn, n: int):
    """For handlers written as fn(a, b, *rest, request=...): gradio injects the request only into
    positional parameters, so expose n plain inputs plus the request."""
    return _named(fn, [f"input_{i}" for i in range(n)])


def _knob_widget(knob, value):
    if knob.kind == "bool":
        return gr.Checkbox(bool(value), label=knob.label, info=knob.info or None)
    if knob.kind == "choice":
        return gr.Dropdown(list(knob.choices), value=value, label=knob.label, info=knob.info or None)
    if knob.kind == "int":
        return gr.Number(value, label=knob.label, info=knob.info or None, precision=0, minimum=knob.minimum)
    return gr.Number(value, label=knob.label, info=knob.info or None, minimum=knob.minimum, step=1e-4)


def _safe_int(value, default: int) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default


def _as_int(value, name: str) -> int:
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise PlanError(f"'{name}' must be a whole number, got {value!r}.") from None
    if as_float != int(as_float) or as_float < 0:
        raise PlanError(f"'{name}' must be a whole number of at least 0, got {value!r}.")
    return int(as_float)
