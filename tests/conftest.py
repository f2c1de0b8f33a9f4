import os

import pytest
import torch

from fusegpt_core import loading
from fusegpt_core.testing import sample_text, tiny_model, tiny_tokenizer

# Tiny models gain nothing from torch's thread pool, and lose much when the app's threads, chromium or a
# subprocess share the two cores with it (more threads than cores: every op waits for the slowest).
# The tests on the bundled model (marked integration) keep every core.
ALL_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads(request):
    torch.set_num_threads(ALL_THREADS if request.node.get_closest_marker("integration") else 1)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def windows(tokenizer):
    """(12, 64) token windows of deterministic filler text."""
    ids = tokenizer(sample_text(20000))["input_ids"]
    return torch.tensor(ids[: 12 * 64]).view(12, 64)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A 6-block tiny Llama saved as a local model folder (with its tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model("llama", num_layers=6).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def offline_hub(monkeypatch):
    """Pretend the Hub is unreachable, and undo the offline switches the loaders flip."""
    import huggingface_hub.constants

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=2.0: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", os.environ.get("HF_DATASETS_OFFLINE", "0"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    try:
        import datasets.config

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", datasets.config.HF_DATASETS_OFFLINE)
    except ImportError:
        pass
