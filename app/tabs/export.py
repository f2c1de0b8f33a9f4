"""Tab 6: a run's model as a Hugging Face folder (zip), its recipe and report, GGUF files for llama.cpp and
ollama, and a push to the Hub."""

from __future__ import annotations

import gradio as gr

from fusegpt_core.errors import FuseGPTError
from fusegpt_core.gguf_export import QUANTS

from .. import explain, views, work
from ..recipes import cli_command
from .base import Changes, Tab, as_int


class ExportTab(Tab):
    def build(self) -> None:
        gr.Markdown(explain.EXPORT)
        with gr.Row():
            self.run_dd = gr.Dropdown(
                [], value=None, label="Run (newest first)", elem_id="export-run", allow_custom_value=True
            )
            self.export_btn = gr.Button("Prepare download", variant="primary", elem_id="export-btn")
        with gr.Row():
            self.zip_file = gr.File(label="Compressed model (HF folder, zip)", interactive=False, elem_id="zip-file")
            self.recipe_file = gr.File(label="recipe.json", interactive=False, elem_id="recipe-file")
            self.report_file = gr.File(label="report.json", interactive=False, elem_id="report-file")
        with gr.Row():
            self.quants = gr.CheckboxGroup(
                list(QUANTS),
                value=["q8_0"],
                label="GGUF tensor types (one file each)",
                info="bits per weight: f16 and bf16 16, q8_0 about 8.5, q4_0 about 4.5 (its output matrix at 8.5)",
                elem_id="gguf-quants",
            )
            self.gguf_btn = gr.Button("Export as GGUF (llama.cpp / ollama)", elem_id="gguf-btn")
        # the files themselves rather than a zip: llama.cpp and ollama open a .gguf as it is, and
        # quantised weights hardly compress
        self.gguf_files = gr.File(label="GGUF files", file_count="multiple", interactive=False, elem_id="gguf-files")
        self.cli = gr.Code(cli_command(), language="shell", label="Reproduce from the command line", interactive=False)
        with gr.Accordion("Push to the Hugging Face Hub", open=False):
            with gr.Row():
                self.repo = gr.Textbox(label="Repository", placeholder="your-name/smollm2-fused")
                self.token = gr.Textbox(label="Write token (used for this push only)", type="password")
            self.push_btn = gr.Button("Push")
            self.push_md = gr.Markdown("")

    def wire(self) -> None:
        shell = self.shell
        self.export_btn.click(
            self.export,
            [self.run_dd],
            [self.recipe_file, self.report_file, self.cli, shell.status, shell.timer],
            api_name="export",
            show_progress="hidden",
        )
        self.gguf_btn.click(
            self.export_gguf,
            [self.run_dd, self.quants],
            [shell.status, shell.timer],
            api_name="export_gguf",
            show_progress="hidden",
        )
        self.push_btn.click(
            self.push,
            [self.run_dd, self.repo, self.token],
            [self.token, shell.status, shell.timer],
            api_name=False,
            show_progress="hidden",
        )

    def export(self, run_id, request: gr.Request):
        """Write the run's recipe and report at once, and queue the model's export (a zip)."""
        session = self.session(request)
        if run_id in (None, ""):
            gr.Warning("No run to export yet: run a plan first.")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            run_id = as_int(run_id, "run")
            recipe_path, report_path = work.write_recipe_files(session, run_id)
        except FuseGPTError as e:
            gr.Warning(str(e))
            return gr.skip(), gr.skip(), gr.skip(), f"✖ {e}", gr.skip()
        status, timer = self.submit(session, "export", "Export model", lambda: work.make_export_job(session, run_id))
        return str(recipe_path), str(report_path), cli_command(recipe_path.name), status, timer

    def export_gguf(self, run_id, quants, request: gr.Request):
        """Queue the run's GGUF export: one file per tensor type, each measured, its row added to the
        Compare table. What GGUF cannot hold is refused here, before the job, with one message."""
        session = self.session(request)
        if run_id in (None, ""):
            gr.Warning("No run to export yet: run a plan first.")
            return gr.skip(), gr.skip()

        def make():
            return work.make_gguf_job(self.app, session, as_int(run_id, "run"), quants)

        return self.submit(session, "gguf", "Export GGUF", make)

    def push(self, run_id, repo, token, request: gr.Request):
        session = self.session(request)
        if run_id in (None, ""):
            gr.Warning("No run to push yet.")
            return "", gr.skip(), gr.skip()

        def make():
            return work.make_push_job(session, as_int(run_id, "run"), repo, token)

        status, timer = self.submit(session, "push", f"Push to {repo}", make)
        return "", status, timer  # the token box is cleared at once

    def outputs(self) -> list:
        return [self.run_dd, self.zip_file, self.recipe_file, self.report_file, self.gguf_files, self.push_md]

    def render(self, session, changes: Changes, snap) -> dict:
        out: dict = {}
        if changes("runs"):
            choices = views.run_choices(session)
            # only a change in the list of runs resets the choice to the newest: a GGUF export bumps
            # "runs" too (its rows join the Compare table) and must leave the run it exported chosen
            if changes("export-run-choices", str(choices)):
                out[self.run_dd] = gr.update(choices=choices, value=choices[0][1] if choices else None)
        if changes("export"):
            ex = session.exports or {}
            out[self.zip_file] = str(ex["zip"]) if ex.get("zip") else None
            out[self.recipe_file] = str(ex["recipe"]) if ex.get("recipe") else None
            out[self.report_file] = str(ex["report"]) if ex.get("report") else None
            out[self.gguf_files] = [str(path) for path in ex.get("gguf") or []] or None
            out[self.push_md] = f"Pushed: {ex['pushed']}" if ex.get("pushed") else ""
        return out
