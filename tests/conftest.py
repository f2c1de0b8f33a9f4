import pytest
import torch

from fusegpt_core.testing import sample_text, tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def windows(tokenizer):
    """(12, 64) token windows of deterministic filler text."""
    ids = tokenizer(sample_text(20000))["input_ids"]
    return torch.tensor(ids[: 12 * 64]).view(12, 64)
