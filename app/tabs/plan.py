"""Tab 3: which blocks go, which blocks absorb each, what dropping them costs, how long a run takes."""

from __future__ import annotations

import gradio as gr

from fusegpt_core.config import max_removable
from fusegpt_core.errors import PlanError

from .. import explain, views, work
from ..recipes import TextChoice
from .base import Changes, Tab, as_int, int_list, named

PLAN_MODES = ("pick blocks", "let MI choose")


def slider_max_remove(n_blocks: int) -> int:
    """The "blocks to remove" slider's top: the core's limit, but never below 2 (a slider needs
    maximum > minimum; a run beyond the limit explains the refusal)."""
    return max(max_removable(n_blocks), 2)


def mi_scores(session) -> list[float] | None:
    return ((session.importance or {}).get("scores") or {}).get("mi")


class PlanTab(Tab):
    def build(self) -> None:
        gr.Markdown(explain.PLAN)
        with gr.Row():
            self.mode = gr.Radio(list(PLAN_MODES), value=PLAN_MODES[0], label="How to choose", elem_id="plan-mode")
            self.remove_k = gr.Slider(
                1, slider_max_remove(30), value=2, step=1, label="Blocks to remove", elem_id="remove-k"
            )
            self.fill_btn = gr.Button("Tick MI's lowest blocks", elem_id="fill-btn")
        self.blocks_cb = gr.CheckboxGroup(
            [], value=[], label="Blocks to remove (tick, or click the importance chart)", elem_id="blocks-cb"
        )
        self.summary = gr.Markdown("No block chosen yet.", elem_id="plan-summary")
        with gr.Accordion("Fusion groups (which blocks absorb each removed block)", open=False):
            with gr.Row():
                self.focus = gr.Dropdown([], value=None, label="Removed block", elem_id="focus-dd")
                self.targets_cb = gr.CheckboxGroup([], value=[], label="Its targets", elem_id="targets-cb")
            with gr.Row():
                self.apply_btn = gr.Button("Use these targets")
                self.reset_btn = gr.Button("Back to the reference window")
        self.diagram = gr.Plot(label="Plan", elem_id="plan-diagram")
        with gr.Row():
            with gr.Column():
                self.preview_btn = gr.Button("Preview drop (perplexity without repair)", elem_id="preview-btn")
                self.text_note = gr.Markdown(views.text_note(None), elem_id="plan-text-note")
                self.preview_md = gr.Markdown(views.preview_text(None), elem_id="preview-text")
            with gr.Column():
                self.estimate = gr.Markdown("Load a model for a run-time estimate.", elem_id="estimate-text")

    # ---- what the plan's widgets show ---------------------------------------------------------

    def plan_outputs(self) -> list:
        """Everything a plan edit redraws (on this tab and the others)."""
        return [self.mode, self.remove_k, self.blocks_cb, self.summary, self.focus, self.targets_cb, self.diagram,
                self.estimate, self.shell.importance.heatmap, self.shell.run.estimate]  # fmt: skip

    def plan_view(self, session, focus: int | None = None) -> dict:
        plan, n = session.plan, views.num_blocks(session)
        chosen = [str(b) for b in plan.blocks]
        estimate = views.estimate_text(session)
        out = {
            self.mode: PLAN_MODES[1] if plan.auto else PLAN_MODES[0],
            self.blocks_cb: gr.update(choices=views.block_choices(session), value=chosen),
            self.summary: views.plan_summary(session),
            self.focus: gr.update(choices=chosen, value=str(focus) if focus is not None else None),
            self.diagram: views.plan_diagram(session, focus=focus),
            self.estimate: estimate,
            self.shell.run.estimate: views.estimate_text(session, presets=False),
        }
        if focus is None:
            out[self.targets_cb] = gr.update(choices=[], value=[])
        if n >= 2:
            out[self.remove_k] = gr.update(maximum=slider_max_remove(n), value=plan.remove)
        if session.importance is not None:
            out[self.shell.importance.heatmap] = views.importance_figures(session)[0]
        return out

    # ---- events ------------------------------------------------------------------------------

    def wire(self) -> None:
        outputs = self.plan_outputs()
        for trigger in (self.blocks_cb.input, self.mode.input, self.remove_k.input):
            self.quick(
                trigger, self.edit, [self.mode, self.blocks_cb, self.remove_k], outputs, trigger_mode="always_last"
            )
        self.quick(self.fill_btn.click, self.fill_lowest, [self.remove_k], outputs)
        self.quick(self.shell.click_box.change, self.click_block, [self.shell.click_box], outputs)
        self.quick(self.focus.change, self.focus_targets, [self.focus], [self.targets_cb, self.diagram])
        self.quick(self.apply_btn.click, self.apply_targets, [self.focus, self.targets_cb], outputs)
        self.quick(self.reset_btn.click, self.reset_targets, [self.focus, self.targets_cb], outputs)
        run = self.shell.run
        self.preview_btn.click(
            named(self.preview_drop, ["kind", "pasted", "upload", "dataset", *run.knob_params]),
            [*self.shell.importance.text_inputs, *run.knobs],
            [self.shell.status, self.shell.timer],
            api_name="preview_drop",
            show_progress="hidden",
        )
        gr.api(self.set_plan, api_name="set_plan")

    def edit(self, mode, blocks, k, request: gr.Request) -> dict:
        """The plan widgets changed: store the plan and redraw it."""
        session = self.session(request)
        with session.lock:
            if mode == PLAN_MODES[1]:
                session.plan.let_metric_choose(as_int(k, "blocks to remove", 1))
            else:
                session.plan.pick(int_list(blocks), mi_scores(session))
        session.bump("plan")
        return self.plan_view(session)

    def fill_lowest(self, k, request: gr.Request) -> dict:
        session = self.session(request)
        if not mi_scores(session):
            raise PlanError("MI scores are needed first: compute importance (Importance tab).")
        with session.lock:
            session.plan.pick_lowest(mi_scores(session), as_int(k, "blocks to remove", 1))
        session.bump("plan")
        return self.plan_view(session)

    def click_block(self, value, request: gr.Request) -> dict:
        """A click on the importance heatmap (see assets/click_to_plan.js) toggles that block."""
        session = self.session(request)
        try:
            block = int(str(value).split(":")[0])
        except ValueError:
            return {}
        with session.lock:
            session.plan.toggle(block, views.num_blocks(session), mi_scores(session))
        session.bump("plan")
        return self.plan_view(session)

    def focus_targets(self, focus, request: gr.Request) -> dict:
        session = self.session(request)
        if focus in (None, ""):
            return {self.targets_cb: gr.update(choices=[], value=[])}
        block, n = int(focus), views.num_blocks(session)
        groups = session.plan.groups(n, views.group_size(session))
        choices = [str(i) for i in session.plan.allowed_targets(block, n)]
        return {
            self.targets_cb: gr.update(choices=choices, value=[str(t) for t in groups.get(block, [])]),
            self.diagram: views.plan_diagram(session, focus=block),
        }

    def apply_targets(self, focus, targets, request: gr.Request) -> dict:
        session = self.session(request)
        if focus in (None, ""):
            raise PlanError("Choose a removed block first.")
        with session.lock:
            session.plan.set_targets(int(focus), int_list(targets), views.num_blocks(session))
        session.bump("plan")
        return self.plan_view(session, focus=int(focus))

    def reset_targets(self, focus, targets, request: gr.Request) -> dict:
        session = self.session(request)
        if focus not in (None, ""):
            with session.lock:
                session.plan.reset_targets(int(focus))
            session.bump("plan")
        return self.plan_view(session, focus=int(focus) if focus not in (None, "") else None)

    def set_plan(self, mode: str, blocks: list[int], k: int, request: gr.Request = None) -> dict:
        """Set the plan: mode 'pick blocks' with block indices, or 'let MI choose' with k blocks."""
        session = self.session(request)
        with session.lock:
            if mode == PLAN_MODES[1]:
                session.plan.let_metric_choose(int(k or 0))
            else:
                session.plan.targets = {}
                session.plan.pick(int_list(blocks), mi_scores(session))
        session.bump("plan")
        return session.plan.to_dict()

    def preview_drop(self, kind, pasted, upload, dataset, *knobs, request: gr.Request):
        """Perplexity of the loaded model with the planned blocks dropped (no repair)."""
        session = self.session(request)

        def make():
            plan = session.plan
            if plan.auto or not plan.blocks:
                raise PlanError("tick the blocks to drop first (the preview needs a fixed list of blocks).")
            session.text = TextChoice(kind, pasted or "", upload, dataset)
            settings = self.shell.run.remember(session, knobs=knobs)
            return work.make_preview_job(
                self.app,
                session,
                plan.blocks,
                session.text.source(),
                settings.int_value("data.seq_len", 128),
                settings.int_value("data.n_eval", 16),
                settings.int_value("data.seed", 0),
            )

        return self.submit(session, "preview", "Preview drop", make)

    def outputs(self) -> list:
        return [*dict.fromkeys([*self.plan_outputs(), self.preview_md, self.text_note])]

    def render(self, session, changes: Changes, snap) -> dict:
        out: dict = {}
        if any([changes("model"), changes("plan"), changes("settings")]):
            out.update(self.plan_view(session))
        if changes("preview"):
            out[self.preview_md] = views.preview_text(session)
        if changes("settings"):
            out[self.text_note] = views.text_note(session)
        return out
