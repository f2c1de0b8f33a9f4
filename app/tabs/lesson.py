"""Tab 7: the guided lesson (app/lesson.py): guess, reveal, drop, fuse."""

from __future__ import annotations

import gradio as gr

from fusegpt_core.errors import PlanError

from .. import explain, lesson, views
from .base import Changes, Tab, as_int


class LessonTab(Tab):
    def build(self) -> None:
        gr.Markdown(explain.LESSON_BLOCKS)
        gr.Markdown(explain.LESSON_MI)
        gr.Markdown("### 3 · Guess before you look")
        with gr.Row():
            self.guess = gr.Dropdown([], value=None, label="The block you think matters least", elem_id="lesson-guess",
                                     allow_custom_value=True)  # fmt: skip
            self.reveal_btn = gr.Button("Reveal the scores", variant="primary", elem_id="lesson-reveal-btn")
        self.reveal = gr.Markdown("", elem_id="lesson-reveal")
        self.plot = gr.Plot(label="Macro Influence", elem_id="lesson-plot")
        gr.Markdown(explain.LESSON_DROP)
        self.drop_btn = gr.Button("Drop the least important block", elem_id="lesson-drop-btn")
        self.drop = gr.Markdown("", elem_id="lesson-drop")
        gr.Markdown(explain.LESSON_FUSE)
        self.fuse_btn = gr.Button("Fuse it into its neighbours instead", elem_id="lesson-fuse-btn")
        self.fuse = gr.Markdown("", elem_id="lesson-fuse")

    def wire(self) -> None:
        shell = self.shell
        self.reveal_btn.click(self.reveal_scores, [self.guess], [shell.status, shell.timer], api_visibility="private",
                              show_progress="hidden")  # fmt: skip
        self.drop_btn.click(self.drop_block, [], [shell.status, shell.timer], api_visibility="private",
                            show_progress="hidden")  # fmt: skip
        self.fuse_btn.click(self.fuse_block, [], [shell.status, shell.timer], api_visibility="private",
                            show_progress="hidden")  # fmt: skip

    def reveal_scores(self, guess, request: gr.Request):
        session = self.session(request)
        if guess in (None, ""):
            gr.Warning("Pick a block first: the one you think matters least.")
            return gr.skip(), gr.skip()
        try:
            lesson.set_guess(session, as_int(guess, "guess"))
        except PlanError as e:
            gr.Warning(str(e))
            return f"✖ {e}", gr.skip()
        if lesson.least_important(session) is not None:  # scores already there (precomputed): reveal now
            return views.status_text(self.app.active_job(session)), gr.skip()
        return self.submit(session, "importance", "Lesson: score the blocks",
                           lambda: lesson.make_reveal_job(self.app, session))  # fmt: skip

    def drop_block(self, request: gr.Request):
        session = self.session(request)
        return self.submit(session, "lesson", "Lesson: drop a block", lambda: lesson.make_drop_job(self.app, session))

    def fuse_block(self, request: gr.Request):
        session = self.session(request)
        return self.submit(session, "run", "Lesson: fuse a block", lambda: lesson.make_fuse_job(self.app, session))

    def outputs(self) -> list:
        return [self.guess, self.reveal, self.plot, self.drop, self.fuse]

    def render(self, session, changes: Changes, snap) -> dict:
        out: dict = {}
        if changes("model"):
            out[self.guess] = gr.update(choices=views.block_choices(session), value=None)
        if changes("lesson") | changes("importance"):
            out[self.reveal], out[self.plot], out[self.drop], out[self.fuse] = views.lesson_views(session)
        return out
