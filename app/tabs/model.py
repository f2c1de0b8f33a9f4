"""Tab 1: which model to load, and what was loaded."""

from __future__ import annotations

import gradio as gr

from .. import explain, views, work
from ..state import TEST_SOURCE
from .base import Changes, Tab

SOURCE_KINDS = ("bundled SmolLM2-135M", "bundled Gemma-3-270m", "local folder or .gguf file", "Hub id")
BUNDLED_SOURCES = {SOURCE_KINDS[0]: "bundled", SOURCE_KINDS[1]: "bundled-gemma3"}  # radio choice -> source


class ModelTab(Tab):
    def build(self) -> None:
        gr.Markdown(explain.MODEL)
        kinds = list(SOURCE_KINDS) + ([TEST_SOURCE] if self.app.test_model else [])
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
                self.table = gr.Dataframe(
                    views.model_table(None), label="Loaded model", interactive=False, elem_id="model-info"
                )

    def wire(self) -> None:
        self.source_kind.change(
            lambda kind: gr.update(visible=kind in SOURCE_KINDS[2:]),
            self.source_kind,
            self.source_text,
            api_visibility="private",
        )
        self.load_btn.click(
            self.load_model,
            [self.source_kind, self.source_text, self.device, self.dtype, self.trust],
            [self.shell.status, self.shell.timer],
            api_name="load_model",
            show_progress="hidden",
        )

    def load_model(self, kind, text, device, dtype, trust, request: gr.Request):
        """Load a model: kind is one of the Model radio's choices; text the path or Hub id."""
        session = self.session(request)
        source = {**BUNDLED_SOURCES, TEST_SOURCE: TEST_SOURCE}.get(kind, (text or "").strip())
        dev = None if device == "auto" else device
        dt = None if dtype == "auto" else dtype
        title = f"Load {source or 'model'}"
        if self.app.has_unfinished(session, "load", title):  # e.g. clicked while the first visit loads it
            gr.Info(f"{source} is already being loaded.")
            return gr.skip(), gr.skip()
        if work.is_loaded(session, source, dev, dt, bool(trust)):  # nothing to do: keep what was made on it
            return f"✔ **{title}** finished: it was already loaded.", gr.skip()
        return self.submit(
            session,
            "load",
            title,
            lambda: work.make_load_job(self.app, session, source, dev, dt, bool(trust)),
        )

    def outputs(self) -> list:
        return [self.table]

    def render(self, session, changes: Changes, snap) -> dict:
        return {self.table: views.model_table(session)} if changes("model") else {}
