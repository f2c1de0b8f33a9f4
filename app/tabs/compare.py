"""Tab 5: every model side by side (perplexity, speed, size, zero-shot accuracy) and their generations for one
prompt."""

from __future__ import annotations

import gradio as gr

from .. import explain, views, work
from .base import Changes, Tab, as_int

DEFAULT_PROMPT = {"title": "Hello", "prompt": "Write one sentence about the sea."}


class CompareTab(Tab):
    def build(self) -> None:
        gr.Markdown(explain.COMPARE)
        self.table = gr.Dataframe(label="Models", interactive=False, elem_id="compare-table", wrap=True)
        self.caption = gr.Markdown("", elem_id="compare-caption")
        self.chart = gr.Plot(label="Perplexity", elem_id="compare-plot")
        choices, offline = work.zero_shot_task_choices()
        with gr.Row(equal_height=True):
            self.tasks = gr.Dropdown(
                choices,
                value=offline,
                multiselect=True,
                allow_custom_value=True,  # any lm-eval task name; the job checks it
                label="Zero-shot tasks",
                info="bundled_* need no network; the others (any lm-eval name) download their data from the Hub",
                scale=3,
                elem_id="zero-shot-tasks",
            )
            self.limit = gr.Number(work.ZERO_SHOT_LIMIT, label="Items per task", precision=0, elem_id="zero-shot-limit")
            self.zero_shot_btn = gr.Button("Measure zero-shot accuracy", elem_id="zero-shot-btn", scale=1)
        self.accuracy = gr.Plot(label="Zero-shot accuracy", elem_id="accuracy-plot")
        prompts = self.app.prompts or [DEFAULT_PROMPT]
        with gr.Row():
            self.example = gr.Dropdown([p["title"] for p in prompts], value=prompts[0]["title"], label="Example prompt")
            self.prompt = gr.Textbox(prompts[0]["prompt"], label="Prompt", lines=2, scale=3, elem_id="prompt-box")
        with gr.Row():
            self.max_new = gr.Slider(8, 256, value=64, step=8, label="New tokens")
            self.do_sample = gr.Checkbox(False, label="Sample (off = greedy)")
            self.temperature = gr.Slider(0.1, 1.5, value=0.7, step=0.05, label="Temperature")
            self.top_p = gr.Slider(0.1, 1.0, value=0.9, step=0.05, label="Top-p")
            self.seed = gr.Number(0, label="Seed", precision=0)
        self.gen_btn = gr.Button("Generate with every model", variant="primary", elem_id="generate-btn")
        self.generations = gr.HTML(views.generations_html(None), elem_id="generations")
        caption, table, answers = views.classroom_views(self.app.precomputed)
        if caption:  # a real FuseGPT run on the bundled model, shipped in assets/: there before any run here
            with gr.Accordion("A precomputed example: fusion, plain dropping and drop + LoRA", open=True):
                gr.Markdown(caption, elem_id="classroom-caption")
                gr.Dataframe(table, interactive=False, elem_id="classroom-table")
                losses = views.classroom_losses(self.app.precomputed)
                if losses is not None:
                    gr.Plot(losses, label="Fine-tuning loss (precomputed)", elem_id="classroom-losses")
                gr.HTML(answers, elem_id="classroom-generations")

    def wire(self) -> None:
        self.example.input(self.pick_example, self.example, self.prompt, api_visibility="private")
        self.gen_btn.click(
            self.generate,
            [self.prompt, self.max_new, self.do_sample, self.temperature, self.top_p, self.seed],
            [self.shell.status, self.shell.timer],
            api_name="generate",
            show_progress="hidden",
        )

        self.zero_shot_btn.click(
            self.zero_shot,
            [self.tasks, self.limit],
            [self.shell.status, self.shell.timer],
            api_name="zero_shot",
            show_progress="hidden",
        )

    def pick_example(self, title):
        return next((p["prompt"] for p in self.app.prompts if p["title"] == title), gr.skip())

    def generate(self, prompt, max_new, do_sample, temperature, top_p, seed, request: gr.Request):
        """Answer the prompt with the original and every run's model (same settings for all)."""
        session = self.session(request)

        def make():
            settings = {
                "max_new_tokens": as_int(max_new, "new tokens", 1),
                "do_sample": bool(do_sample),
                "temperature": float(temperature),
                "top_p": float(top_p),
                "seed": as_int(seed or 0, "seed"),
            }
            return work.make_generate_job(session, prompt, settings)

        return self.submit(session, "generate", "Generate", make)

    def zero_shot(self, tasks, limit, request: gr.Request):
        """Zero-shot accuracy (lm-eval) of the original, each run's blocks dropped and each run's model."""
        session = self.session(request)

        def make():
            return work.make_zero_shot_job(session, tasks or [], as_int(limit, "items per task", 1))

        return self.submit(session, "zero-shot", "Zero-shot accuracy", make)

    def outputs(self) -> list:
        return [self.table, self.caption, self.chart, self.accuracy, self.generations]

    def render(self, session, changes: Changes, snap) -> dict:
        out: dict = {}
        if changes("runs"):
            out[self.table], out[self.chart], out[self.caption] = views.compare_views(session)
            out[self.accuracy] = views.accuracy_figure(session)
        if changes("generations"):
            out[self.generations] = views.generations_html(session.generations, session.generation_prompt)
        return out
