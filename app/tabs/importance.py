"""Tab 2: the text every action uses, and which blocks matter (heatmaps, agreement, trajectory)."""

from __future__ import annotations

import gradio as gr

from fusegpt_core.importance import DEFAULT_SCORING

from .. import explain, views, work
from ..recipes import HUB_DATASETS, TEXT_KINDS, TextChoice
from .base import Changes, Tab, as_int

METRIC_CHOICES = [
    ("Macro Influence", "mi"),
    ("Block Influence", "bi"),
    ("Angular distance", "angular"),
    ("Perplexity increase", "ppl"),
]


class ImportanceTab(Tab):
    def build(self) -> None:
        gr.Markdown(explain.IMPORTANCE)
        with gr.Accordion("Text (for scoring, the drop preview and runs) and scoring settings", open=False):
            with gr.Row():
                self.text_kind = gr.Radio(
                    list(TEXT_KINDS), value=TEXT_KINDS[0], label="Text used for scoring, preview and runs"
                )
                self.dataset = gr.Dropdown(
                    list(HUB_DATASETS), value=HUB_DATASETS[0], label="Hub dataset", visible=False
                )
            self.pasted = gr.Textbox("", label="Your text", lines=6, visible=False, max_length=2_000_000)
            self.upload = gr.File(label="A UTF-8 .txt file", file_types=[".txt", ".md"], type="filepath", visible=False)
            with gr.Row():
                self.metrics = gr.CheckboxGroup(METRIC_CHOICES, value=[m for _, m in METRIC_CHOICES], label="Metrics")
                self.seq_len = gr.Number(DEFAULT_SCORING["seq_len"], label="Tokens per window", precision=0, minimum=8)
                self.windows = gr.Number(DEFAULT_SCORING["n_score"], label="Windows", precision=0, minimum=1)
                self.seed = gr.Number(DEFAULT_SCORING["seed"], label="Seed", precision=0, minimum=0)
                self.cache = gr.Checkbox(True, label="Reuse prefix states (same numbers, half the work)")
        with gr.Row():
            self.btn = gr.Button("Compute importance", variant="primary", elem_id="importance-btn", scale=1)
            self.text_note = gr.Markdown(views.text_note(None), elem_id="importance-text-note")
        self.origin = gr.Markdown("Load a model first.", elem_id="importance-origin")
        self.heatmap = gr.Plot(label="Importance per block", elem_id="importance-plot")
        with gr.Row():
            with gr.Column(scale=3):
                self.agree_plot = gr.Plot(label="Rank agreement", elem_id="agreement-plot")
            with gr.Column(scale=2):
                gr.Markdown(explain.AGREEMENT)
        self.agree_df = gr.Dataframe(label="Spearman rank correlation", interactive=False, elem_id="agreement-table")
        gr.Markdown(explain.TRAJECTORY)
        self.traj_plot = gr.Plot(label="MI trajectory", elem_id="trajectory-plot")
        with gr.Accordion("Raw scores (table)", open=False):
            self.scores_df = gr.Dataframe(interactive=False, elem_id="scores-table")
        figure, caption = views.two_model_view(self.app)
        if figure is not None:  # shipped scores of both bundled models: there at once, no model needed
            with gr.Accordion("Which blocks matter in two models (precomputed)", open=False):
                gr.Markdown(caption, elem_id="two-models-caption")
                gr.Plot(figure, label="Two models", elem_id="two-models-plot")

    @property
    def text_inputs(self) -> list:
        """The text choice, in TextChoice's field order (other tabs' actions take it as inputs too)."""
        return [self.text_kind, self.pasted, self.upload, self.dataset]

    def text_notes(self) -> list:
        """Every "which text does this use" line, on every tab that has an action using the text."""
        return [self.text_note, self.shell.plan.text_note, self.shell.run.text_note]

    def wire(self) -> None:
        self.text_kind.change(
            lambda kind: (
                gr.update(visible=kind == "paste text"),
                gr.update(visible=kind == "upload a file"),
                gr.update(visible=kind == "hub dataset"),
            ),
            self.text_kind,
            [self.pasted, self.upload, self.dataset],
            api_visibility="private",
        )
        for widget in self.text_inputs:
            self.quick(
                widget.change, self.remember_text, self.text_inputs, self.text_notes(), trigger_mode="always_last"
            )
        self.btn.click(
            self.compute_importance,
            [*self.text_inputs, self.metrics, self.seq_len, self.windows, self.seed, self.cache],
            [self.shell.status, self.shell.timer],
            api_name="compute_importance",
            show_progress="hidden",
        )

    def remember_text(self, kind, pasted, upload, dataset, request: gr.Request) -> dict:
        session = self.session(request)
        session.text = TextChoice(kind, pasted or "", upload, dataset)
        return {note: views.text_note(session) for note in self.text_notes()}

    def compute_importance(self, kind, pasted, upload, dataset, metrics, seq_len, n, seed, cache, request: gr.Request):
        session = self.session(request)

        def make():
            session.text = TextChoice(kind, pasted or "", upload, dataset)
            return work.make_importance_job(
                self.app,
                session,
                calib_source=session.text.source(),
                metrics=list(metrics or []),
                seq_len=as_int(seq_len, "tokens per window", 1),
                n_score=as_int(n, "windows", 1),
                seed=as_int(seed, "seed"),
                use_cache=bool(cache),
            )

        return self.submit(session, "importance", "Compute importance", make)

    def outputs(self) -> list:
        return [self.origin, self.heatmap, self.agree_plot, self.agree_df, self.scores_df, self.traj_plot,
                *self.text_inputs, self.text_note]  # fmt: skip

    def render(self, session, changes: Changes, snap) -> dict:
        out: dict = {}
        if changes("importance"):
            heat, agree, agree_df, scores_df = views.importance_figures(session)
            out.update({self.origin: views.importance_origin(session), self.heatmap: heat, self.agree_plot: agree,
                        self.agree_df: agree_df, self.scores_df: scores_df})  # fmt: skip
        elif changes("plan") and session.importance is not None:
            out[self.heatmap] = views.importance_figures(session)[0]  # the plan's frames moved
        if changes("trajectory"):
            out[self.traj_plot] = views.trajectory_figure(session.trajectory)
        if changes("settings"):
            text = session.text
            out.update({self.text_kind: text.kind, self.pasted: text.pasted, self.upload: text.upload,
                        self.dataset: text.dataset, self.text_note: views.text_note(session)})  # fmt: skip
        return out
