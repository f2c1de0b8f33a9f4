"""A real browser (Debian's chromium through Playwright) goes through the whole app:
load -> importance -> plan -> run -> compare -> export, with a screenshot of every step.

Screenshots go to $FUSEGPT_SCREENSHOTS (default out/screenshots/); with FUSEGPT_UPDATE_SCREENSHOTS=1
they are also copied to assets/screenshots/ for the README. FUSEGPT_E2E_BUNDLED=1 runs the same
flow on the bundled SmolLM2 (slower) instead of the tiny test model.
"""

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ROOT = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("FUSEGPT_SCREENSHOTS", ROOT / "out" / "screenshots"))
BUNDLED = os.environ.get("FUSEGPT_E2E_BUNDLED") == "1"
LONG = 300_000 if BUNDLED else 180_000  # upper bounds: a busy 2-core machine is slow


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed at /usr/bin/chromium")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Checker:
    """Fails on any error the app shows: a red status line, an error toast, a page error."""

    def __init__(self, page):
        self.page = page
        self.page_errors: list[str] = []
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))

    def no_errors(self, step: str) -> None:
        status = self.page.inner_text("#job-status")
        assert "✖" not in status and "failed" not in status, f"{step}: {status}"
        toasts = self.page.locator(".toast-body, [data-testid='toast-body']")
        texts = [toasts.nth(i).inner_text() for i in range(toasts.count())]
        bad = [t for t in texts if "error" in t.lower() or "warning" in t.lower() or "failed" in t.lower()]
        assert not bad, f"{step}: the app showed {bad}"
        assert not self.page_errors, f"{step}: page errors {self.page_errors}"

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _wait_done(page, title: str, timeout: int = LONG) -> None:
    expect = playwright_api.expect
    expect(page.locator("#job-status")).to_contain_text(re.compile(rf"{re.escape(title)}.* finished"), timeout=timeout)


def _open_and_load(page, url: str) -> None:
    """Open the app and load the test model (the bundled one with FUSEGPT_E2E_BUNDLED=1)."""
    page.goto(url)
    page.wait_for_selector("#load-btn", timeout=60_000)
    _wait_done(page, "Load")  # the first visit's own load of the default model
    if not BUNDLED:
        page.get_by_test_id("tiny (test model)-radio-label").click()
    page.click("#load-btn")
    _wait_done(page, "Load")


def _click_heatmap(page, block: int) -> None:
    """What a click on a heatmap cell does (plotly's click event), without aiming the mouse at a cell."""
    page.wait_for_function(
        "document.querySelector('#importance-plot .js-plotly-plot')?.dataset.fusegptBound === '1'", timeout=10_000
    )
    page.wait_for_timeout(600)  # a redraw may have dropped the listener: the page re-binds within 0.5 s
    page.evaluate(
        """(block) => {
            const plot = document.querySelector('#importance-plot .js-plotly-plot');
            plot.emit('plotly_click', {points: [{x: block, y: 'Macro Influence'}]});
        }""",
        block,
    )


def test_whole_flow_in_a_browser(live_app, browser):
    url, _ = live_app
    expect = playwright_api.expect
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    check = Checker(page)
    # 1. model
    _open_and_load(page, url)
    expect(page.locator("#model-info")).to_contain_text("llama")
    check.no_errors("load")
    check.shot("1-model")

    # 2. importance: computed here for the test model; precomputed for the bundled one
    _tab(page, "2 · Importance")
    if not BUNDLED:
        page.click("#importance-btn")
        _wait_done(page, "Compute importance")
    expect(page.locator("#importance-origin")).to_contain_text("computed" if not BUNDLED else "precomputed")
    expect(page.locator("#importance-plot .js-plotly-plot")).to_be_visible()
    expect(page.locator("#agreement-plot .js-plotly-plot")).to_be_visible()
    check.no_errors("importance")
    check.shot("2-importance")

    # 3. plan
    blocks = page.locator("#blocks-cb")
    if BUNDLED:  # MI's two lowest blocks: a plan worth showing
        _tab(page, "3 · Plan")
        slider_box = page.locator("#remove-k input[type=number]")
        slider_box.fill("2")
        slider_box.press("Enter")
        page.click("#fill-btn")
        expect(page.locator("#plan-summary")).to_contain_text("Removal order", timeout=20_000)
    else:
        # clicking a heatmap cell puts that block in the plan
        _click_heatmap(page, 1)
        _tab(page, "3 · Plan")
        expect(page.locator("#plan-summary")).to_contain_text("Removal order: 1", timeout=20_000)
        blocks.get_by_label("5", exact=True).check()
        expect(page.locator("#plan-summary")).to_contain_text("5", timeout=20_000)
        # the heatmap was redrawn with the new plan: a second click still toggles exactly once
        _tab(page, "2 · Importance")
        _click_heatmap(page, 2)
        _tab(page, "3 · Plan")
        expect(blocks.get_by_label("2", exact=True)).to_be_checked(timeout=20_000)
        blocks.get_by_label("2", exact=True).uncheck()
        expect(blocks.get_by_label("2", exact=True)).not_to_be_checked()
        expect(blocks.get_by_label("1", exact=True)).to_be_checked()
    expect(page.locator("#plan-diagram .js-plotly-plot")).to_be_visible()
    page.click("#preview-btn")
    _wait_done(page, "Preview drop")
    expect(page.locator("#preview-text")).to_contain_text("dropped")
    expect(page.locator("#estimate-text")).to_contain_text("Estimated run time")
    check.no_errors("plan")
    check.shot("3-plan")

    # 4. run: the tiny preset, FuseGPT and a drop baseline on the same plan
    _tab(page, "4 · Run")
    page.locator("#preset-dd input").click()
    page.get_by_role("option", name="tiny", exact=True).click()
    expect(page.locator("#run-estimate")).to_contain_text("preset tiny", timeout=20_000)
    page.wait_for_timeout(1500)  # every knob's change has settled: the stored settings are the tiny preset's
    expect(page.locator("#run-estimate")).not_to_contain_text("speed")  # tiny does not time decoding
    page.locator("#baselines-cb").get_by_label("drop", exact=True).check()
    page.click("#run-btn")
    _wait_done(page, "Run drop")
    expect(page.locator("#run-header")).to_contain_text("finished")
    expect(page.locator("#loss-plot .js-plotly-plot")).to_be_visible()
    expect(page.locator("#rounds-table")).to_contain_text("1")
    check.no_errors("run")
    _tab(page, "4 · Run")
    page.locator("#run-header").scroll_into_view_if_needed()
    check.shot("4-run")

    # 5. compare
    _tab(page, "5 · Compare")
    table = page.locator("#compare-table")
    expect(table).to_contain_text("original")
    expect(table).to_contain_text("#1 fusegpt")
    expect(table).to_contain_text("#2 drop")
    expect(page.locator("#compare-plot .js-plotly-plot")).to_be_visible()
    page.click("#generate-btn")
    _wait_done(page, "Generate")
    expect(page.locator("#generations .gen-card")).to_have_count(3)
    # zero-shot accuracy on the bundled offline tasks (chosen by default), two items each: one column per task
    limit_box = page.locator("#zero-shot-limit input")
    limit_box.fill("2")
    limit_box.press("Enter")
    page.click("#zero-shot-btn")
    _wait_done(page, "Zero-shot accuracy")
    expect(table).to_contain_text("bundled_nextsent acc_norm", timeout=20_000)
    expect(table).to_contain_text("±")
    expect(page.locator("#accuracy-plot .js-plotly-plot")).to_be_visible()
    check.no_errors("compare")
    check.shot("5-compare")

    # 6. export
    _tab(page, "6 · Export")
    page.click("#export-btn")
    _wait_done(page, "Export model")
    expect(page.locator("#zip-file")).to_contain_text(".zip")
    expect(page.locator("#recipe-file")).to_contain_text("recipe.json")
    # the same run as a GGUF file (q8_0 by default), measured; its row joins the Compare table
    expect(page.locator("#gguf-quants").get_by_label("q8_0", exact=True)).to_be_checked()
    page.click("#gguf-btn")
    _wait_done(page, "Export GGUF")
    expect(page.locator("#gguf-files")).to_contain_text(re.compile(r"q8_0\s*\.gguf"))  # name and suffix apart
    check.no_errors("export")
    check.shot("6-export")
    _tab(page, "5 · Compare")
    expect(page.locator("#compare-table")).to_contain_text("q8_0 GGUF", timeout=20_000)
    check.no_errors("export (compare)")

    # a reload finds the session's results again
    page.reload()
    page.wait_for_selector("#load-btn", timeout=60_000)
    _tab(page, "5 · Compare")
    expect(page.locator("#compare-table")).to_contain_text("#1 fusegpt", timeout=20_000)
    check.no_errors("reload")

    if os.environ.get("FUSEGPT_UPDATE_SCREENSHOTS") == "1":
        dest = ROOT / "assets" / "screenshots"
        dest.mkdir(parents=True, exist_ok=True)
        for png in SHOTS.glob("*.png"):
            shutil.copy(png, dest / png.name)
    page.close()


def _pick(page, dropdown: str, value: str) -> None:
    """Choose `value` in a gradio Dropdown by typing it (the list of choices is the model's blocks)."""
    box = page.locator(f"{dropdown} input")
    box.click()
    page.get_by_role("option", name=value, exact=True).click()


def test_guided_lesson_in_a_browser(live_app, browser):
    """A first visit takes the lesson: guess, reveal, drop, fuse. Records the seconds from opening the page
    to the first heatmap and to the end of the lesson (out/browser_timings.json; the README quotes the
    bundled-model figures, FUSEGPT_E2E_BUNDLED=1)."""
    url, _ = live_app
    expect = playwright_api.expect
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    check = Checker(page)
    start = time.monotonic()
    page.goto(url)
    page.wait_for_selector("#load-btn", timeout=60_000)
    _wait_done(page, "Load")  # the first visit loads the default model by itself
    timings = {"model": "bundled" if BUNDLED else "tiny (test model)"}
    if BUNDLED:  # its scores are precomputed: the heatmap is there as soon as the model is
        _tab(page, "2 · Importance")
        expect(page.locator("#importance-origin")).to_contain_text("precomputed")
        expect(page.locator("#importance-plot .js-plotly-plot")).to_be_visible()
        timings["first_heatmap_s"] = round(time.monotonic() - start, 1)
    _tab(page, "7 · Lesson")
    _pick(page, "#lesson-guess", "3")
    page.click("#lesson-reveal-btn")
    expect(page.locator("#lesson-reveal")).to_contain_text("Your guess, block **3**".replace("**", ""), timeout=LONG)
    expect(page.locator("#lesson-plot .js-plotly-plot")).to_be_visible()
    timings.setdefault("first_heatmap_s", round(time.monotonic() - start, 1))  # scored here for the test model
    page.click("#lesson-drop-btn")
    expect(page.locator("#lesson-drop")).to_contain_text("the perplexity goes from", timeout=LONG)
    page.click("#lesson-fuse-btn")
    expect(page.locator("#lesson-fuse")).to_contain_text("perplexity", timeout=LONG * 2)
    timings["lesson_end_s"] = round(time.monotonic() - start, 1)
    check.no_errors("lesson")
    page.locator("#lesson-drop").scroll_into_view_if_needed()
    check.shot("8-lesson")
    SHOTS.mkdir(parents=True, exist_ok=True)
    (SHOTS.parent / "browser_timings.json").write_text(json.dumps(timings, indent=1), encoding="utf-8")
    print("browser timings:", timings)
    page.close()


def test_stop_button_stops_a_run(live_app, browser):
    url, _ = live_app
    expect = playwright_api.expect
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    _open_and_load(page, url)
    _tab(page, "3 · Plan")
    page.locator("#plan-mode").get_by_label("let MI choose").check()
    _tab(page, "4 · Run")
    page.locator("#run-btn").click()  # cpu-demo preset: long enough to stop
    expect(page.locator("#job-status")).to_contain_text("Run fusegpt", timeout=30_000)
    page.locator("#stop-btn-2").click()
    expect(page.locator("#job-status")).to_contain_text("stopped", timeout=60_000)
    page.close()


def test_one_click_demo_asks_first_and_finishes_on_the_page(live_app, browser):
    """The demo after a hand-made plan, with the Run tab's plots already drawn once (the state that
    froze the page): it asks before replacing the plan, then the page follows it to the end."""
    url, _ = live_app
    expect = playwright_api.expect
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    check = Checker(page)
    _open_and_load(page, url)
    _tab(page, "4 · Run")  # mounts the Run tab's plots: later figures redraw them
    expect(page.locator("#loss-plot .js-plotly-plot")).to_be_visible()
    _tab(page, "3 · Plan")
    page.locator("#blocks-cb").get_by_label("3", exact=True).check()
    expect(page.locator("#plan-summary")).to_contain_text("Removal order: 3", timeout=20_000)
    page.click("#demo-btn")
    expect(page.locator("#demo-confirm")).to_be_visible(timeout=20_000)
    expect(page.locator("#demo-confirm")).to_contain_text("replaces your plan")
    page.click("#demo-yes")
    _wait_done(page, "One-click demo", timeout=LONG * 2)  # on the page, without a reload
    check.no_errors("demo")
    _tab(page, "4 · Run")
    expect(page.locator("#run-header")).to_contain_text("finished")
    expect(page.locator("#preset-dd input")).to_have_value("tiny")  # the settings the demo ran with
    _tab(page, "5 · Compare")
    expect(page.locator("#compare-table")).to_contain_text("#1 fusegpt")
    expect(page.locator("#generations .gen-card")).to_have_count(2)
    _tab(page, "3 · Plan")
    expect(page.locator("#plan-summary")).to_contain_text("Removal order")
    check.shot("7-demo")
    page.close()


def test_a_figure_that_cannot_render_does_not_stop_the_page(live_app, browser, monkeypatch):
    """A figure plotly.js throws on (a one-row heatmap whose colour bar has no room) must fail alone."""
    import plotly.graph_objects as go

    from app import views

    drawn = views.trajectory_figure

    def degenerate(traj, title_suffix=""):
        """A sound figure at first, then (once the run has scored) what the Run tab drew before the
        height guard: a Plot that already shows a figure and is redrawn with a bad one froze pages."""
        if not traj or not traj.get("rows"):
            return drawn(traj, title_suffix)
        bar = dict(title=dict(text="MI rank<br>in its step"), len=0.9)
        fig = go.Figure(go.Heatmap(z=[[0.0, 0.5, 1.0]], colorbar=bar))
        fig.update_layout(title=dict(text="trajectory"), height=200, margin=dict(t=50, b=45))
        return fig

    monkeypatch.setattr(views, "trajectory_figure", degenerate)
    url, _ = live_app
    expect = playwright_api.expect
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    _open_and_load(page, url)
    _tab(page, "3 · Plan")
    page.locator("#plan-mode").get_by_label("let MI choose").check()  # scored: the trajectory gets a row
    expect(page.locator("#plan-summary")).to_contain_text("MI chooses", timeout=20_000)
    _tab(page, "4 · Run")
    expect(page.locator("#run-trajectory .js-plotly-plot")).to_be_visible()  # drawn once, sound
    page.locator("#preset-dd input").click()
    page.get_by_role("option", name="tiny", exact=True).click()
    page.click("#run-btn")
    _wait_done(page, "Run fusegpt")  # the status line kept updating
    expect(page.locator("#rounds-table")).to_contain_text("1")  # and the other views too
    expect(page.locator("#loss-plot .js-plotly-plot")).to_be_visible()
    assert any("axis scaling" in e for e in errors), errors  # the figure really could not be drawn
    _tab(page, "5 · Compare")  # tabs still switch, later jobs still show
    page.click("#generate-btn")
    _wait_done(page, "Generate")
    expect(page.locator("#generations .gen-card")).to_have_count(2)
    page.close()
