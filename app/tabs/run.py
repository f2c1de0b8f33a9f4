"""Tab 4: the recipe (preset, method, every knob), Run and Stop, and the run's live view."""

from __future__ import annotations

import secrets
from pathlib import Path

import gradio as gr

from fusegpt_core.config import METHODS, PRESET_INFO, PRESETS, Recipe
from fusegpt_core.errors import FuseGPTError, PlanError

from .. import explain, views, work
from ..recipes import KNOBS, RunSettings, TextChoice, preset_values
from .base import BUSY_POLL_S, Changes, Tab, named

KNOB_PARAMS = [k.key.replace(".", "_") for k in KNOBS]


def knob_widget(knob, value):
    info = knob.info or None
    if knob.kind == "bool":
        return gr.Checkbox(bool(value), label=knob.label, info=info)
    if knob.kind == "choice":
        return gr.Dropdown(list(knob.choices), value=value, label=knob.label, info=info)
    if knob.kind == "pair":
        return gr.Textbox(value, label=knob.label, info=info)
    if knob.kind == "int":
        return gr.Number(value, label=knob.label, info=info, precision=0, minimum=knob.minimum)
    return gr.Number(value, label=knob.label, info=info, minimum=knob.minimum, step=1e-4)


def preset_line(name: str) -> str:
    return f"**{name}**: {PRESET_INFO.get(name, '')}"


class RunTab(Tab):
    knob_params = KNOB_PARAMS

    def build(self) -> None:
        gr.Markdown(explain.RUN)
        defaults = RunSettings()
        with gr.Row():
            with gr.Column(scale=1):
                self.preset = gr.Dropdown(list(PRESETS), value=defaults.preset, label="Preset", elem_id="preset-dd")
                self.preset_md = gr.Markdown(preset_line(defaults.preset), elem_id="preset-info")
            self.method = gr.Radio(
                list(METHODS), value=defaults.method, label="Method", elem_id="method-radio", scale=1
            )
            self.baselines = gr.CheckboxGroup(
                [m for m in METHODS if m != "fusegpt"], value=[], label="Also run on the same plan",
                elem_id="baselines-cb", scale=1,
            )  # fmt: skip
        self.knobs: list = []
        with gr.Accordion("Advanced settings (every knob of the recipe)", open=False):
            for start in range(0, len(KNOBS), 4):
                with gr.Row():
                    for knob, value in zip(KNOBS[start : start + 4], defaults.knobs[start : start + 4]):
                        self.knobs.append(knob_widget(knob, value))
            self.recipe_file = gr.File(
                label="Restore a recipe.json or report.json (settings and plan of an earlier run)",
                file_types=[".json", ".yaml", ".yml"],
                type="filepath",
                elem_id="recipe-upload",
            )
        with gr.Row():
            self.run_btn = gr.Button("Run", variant="primary", elem_id="run-btn")
            self.stop_btn = gr.Button("■ Stop", variant="stop", elem_id="stop-btn-2")
        self.text_note = gr.Markdown(views.text_note(None), elem_id="run-text-note")
        self.estimate = gr.Markdown("", elem_id="run-estimate")
        self.header = gr.Markdown("No run yet.", elem_id="run-header")
        self.recipe_md = gr.Markdown("", elem_id="run-recipe")
        self.loss_plot = gr.Plot(label="Loss per group", elem_id="loss-plot")
        self.traj_plot = gr.Plot(label="MI trajectory of this run", elem_id="run-trajectory")
        self.rounds_df = gr.Dataframe(label="Rounds", interactive=False, elem_id="rounds-table")
        self.absorbed_plot = gr.Plot(label="What each neighbour absorbed", elem_id="absorbed-plot")
        with gr.Accordion("Log", open=False):
            self.log_box = gr.Textbox(lines=10, max_lines=20, label="Log", interactive=False)

    def remember(self, session, preset=None, method=None, baselines=None, knobs=None) -> RunSettings:
        """Store what the Run tab shows in the session (a reload restores it); returns the settings."""
        with session.lock:
            old = session.settings
            session.settings = RunSettings(
                preset=preset if preset is not None else old.preset,
                method=method if method is not None else old.method,
                baselines=list(baselines) if baselines is not None else old.baselines,
                knobs=list(knobs) if knobs is not None else old.knobs,
            )
        return session.settings

    # ---- events ------------------------------------------------------------------------------

    def wire(self) -> None:
        shell, plan = self.shell, self.shell.plan
        estimates = [self.estimate, plan.estimate, plan.diagram]
        self.quick(self.preset.input, self.fill_preset, self.preset, [*self.knobs, self.preset_md, *estimates])
        # Each widget reports only its own value: a preset fill updates every knob, and a change event
        # that carried all of them could be sent while only some were updated and land last, storing a
        # mix of two presets (seen: the tiny preset estimated with the speed test of the one before).
        # Not on the preset's own change: fill_preset stores the preset and its knobs in one go.
        self.quick(self.method.change, named(self.method_changed, ["method"]), [self.method], estimates)
        self.quick(self.baselines.change, named(self.baselines_changed, ["baselines"]), [self.baselines], estimates)
        for i, widget in enumerate(self.knobs):
            self.quick(widget.change, self._knob_handler(i), [widget], estimates, trigger_mode="always_last")
        self.quick(self.recipe_file.upload, self.restore_recipe, self.recipe_file, [shell.status, shell.timer])
        text = shell.importance.text_inputs
        self.run_btn.click(
            named(
                self.start_run, ["preset", "method", "baselines", "kind", "pasted", "upload", "dataset", *KNOB_PARAMS]
            ),
            [self.preset, self.method, self.baselines, *text, *self.knobs],
            [shell.status, shell.timer],
            api_name="start_run",
            show_progress="hidden",
        )
        self.stop_btn.click(shell.stop, [], [shell.status], api_name=False, show_progress="hidden")

    def fill_preset(self, name, request: gr.Request) -> dict:
        session = self.session(request)
        settings = self.remember(session, preset=name, knobs=preset_values(name))
        return {**dict(zip(self.knobs, settings.knobs)), self.preset_md: preset_line(name), **self.estimates(session)}

    def method_changed(self, method, request: gr.Request) -> dict:
        session = self.session(request)
        self.remember(session, method=method)
        return self.estimates(session)

    def baselines_changed(self, baselines, request: gr.Request) -> dict:
        session = self.session(request)
        self.remember(session, baselines=baselines or [])
        return self.estimates(session)

    def _knob_handler(self, index: int):
        def knob_changed(value, request: gr.Request) -> dict:
            return self.knob_changed(index, value, request=request)

        return named(knob_changed, [KNOB_PARAMS[index]])

    def knob_changed(self, index: int, value, request: gr.Request) -> dict:
        session = self.session(request)
        with session.lock:
            knobs = list(session.settings.knobs)
            knobs[index] = value
        self.remember(session, knobs=knobs)
        return self.estimates(session)

    def estimates(self, session) -> dict:
        return {
            self.estimate: views.estimate_text(session, presets=False),
            self.shell.plan.estimate: views.estimate_text(session),
            self.shell.plan.diagram: views.plan_diagram(session),
        }

    def restore_recipe(self, path, request: gr.Request):
        """An uploaded recipe.json (or report.json): its settings and plan, ready to Run again."""
        session = self.session(request)
        if not path:
            return gr.skip(), gr.skip()
        recipe = Recipe.from_file(path)
        notes = restore_into(session, recipe)
        gr.Info(f"Restored {Path(path).name}: press Run to reproduce it. " + " ".join(notes))
        return f"✔ Restored the recipe {Path(path).name}. " + " ".join(notes), gr.Timer(BUSY_POLL_S, active=True)

    def start_run(self, preset, method, baselines, kind, pasted, upload, dataset, *knobs, request: gr.Request):
        """Run the plan with these settings (and each chosen baseline on the same blocks)."""
        session = self.session(request)
        methods = [method] + [b for b in baselines or [] if b != method]
        batch = secrets.randbits(31) if len(methods) > 1 else None
        session.text = TextChoice(kind, pasted or "", upload, dataset)
        status, timer = "", gr.skip()
        for i, m in enumerate(methods):

            def make(m=m):
                settings = self.remember(session, preset, method, baselines, knobs)
                recipe = work.session_recipe(session, settings=RunSettings(settings.preset, m, [], settings.knobs))
                return work.make_run_job(self.app, session, recipe, batch_id=batch)

            s, t = self.submit(session, "run", f"Run {m}", make)
            if i == 0:
                status, timer = s, t
            if s.startswith("✖"):
                break
        return status, timer

    # ---- poll --------------------------------------------------------------------------------

    def outputs(self) -> list:
        return [self.preset, self.preset_md, self.method, self.baselines, *self.knobs, self.text_note, self.header,
                self.recipe_md, self.loss_plot, self.traj_plot, self.rounds_df, self.absorbed_plot, self.log_box]  # fmt: skip

    def render(self, session, changes: Changes, snap) -> dict:
        out: dict = {}
        if changes("settings"):
            s = session.settings
            out.update({self.preset: s.preset, self.preset_md: preset_line(s.preset), self.method: s.method,
                        self.baselines: s.baselines, **dict(zip(self.knobs, s.knobs)),
                        self.text_note: views.text_note(session)})  # fmt: skip
        live_key = (
            (snap.id, snap.live_version, snap.status)
            if snap is not None and snap.kind in ("run", "demo")
            else ("runs", session.versions["runs"])
        )
        if changes("live", live_key):
            live = views.run_live(snap, session)
            out.update({self.header: live["header"], self.recipe_md: live["recipe"], self.loss_plot: live["loss"],
                        self.traj_plot: live["trajectory"], self.rounds_df: live["rounds"],
                        self.absorbed_plot: live["absorbed"], self.log_box: live["log"]})  # fmt: skip
        return out


def restore_into(session, recipe: Recipe) -> list[str]:
    """Put an uploaded recipe's settings, plan and text into the session; notes on what could not be."""
    notes = []
    info = session.model_info or {}
    if session.loaded is not None and recipe.model not in (session.loaded.source, info.get("key")):
        notes.append(f"It was made for model '{recipe.model}', not the loaded one: its block numbers may not fit.")
    n = int(info.get("blocks") or 0)
    if n:
        try:
            recipe.validate(num_blocks=n)
        except FuseGPTError as e:
            raise PlanError(f"this recipe does not fit the loaded model: {e}") from None
    text = TextChoice.from_source(recipe.data.calib_source)
    with session.lock:
        session.settings = RunSettings.from_recipe(recipe, preset_name=session.settings.preset)
        if recipe.blocks is not None:
            session.plan.replace_with(recipe.blocks, recipe.fusion.targets)
        else:
            session.plan.let_metric_choose(recipe.remove)
        if text is not None:
            session.text = text
        else:
            notes.append(
                "Its text (pasted or a file) is not in the recipe: choose the text again on the Importance tab."
            )
    session.bump("settings", "plan")
    return notes
