"""Tiny models and a byte-level tokenizer built in-process, for tests and offline demos.

Nothing here downloads anything: the tokenizer is a byte-level BPE with no merges (one token per
byte) and the models are randomly initialised from small configs of each supported family.
"""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIAL = ["<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """259 tokens: 3 specials + 256 byte symbols; a small chat template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


_LLAMA_LIKE = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
}


def tiny_config(family: str = "llama", num_layers: int = 6, hidden: int = 32, vocab: int = 259):
    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
    if family in _LLAMA_LIKE:
        return _LLAMA_LIKE[family](
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    if family == "gpt2":
        common["n_positions"] = common.pop("max_position_embeddings")
        return transformers.GPT2Config(
            n_embd=hidden, n_layer=num_layers, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common
        )
    if family == "opt":
        return transformers.OPTConfig(
            hidden_size=hidden,
            ffn_dim=hidden * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            word_embed_proj_dim=hidden,
            dropout=0.0,
            **common,
        )
    if family == "phi":
        return transformers.PhiConfig(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            **common,
        )
    raise ValueError(f"unknown family {family}")


FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "opt", "phi")


def tiny_model(family: str = "llama", num_layers: int = 6, seed: int = 0, hidden: int = 32):
    """A random tiny causal LM in eval mode, fp32, requires_grad off. Biases (where the family has
    them) are randomised too so bias fusion is exercised."""
    torch.manual_seed(seed)
    config = tiny_config(family, num_layers, hidden)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    model.eval()
    model.requires_grad_(False)
    return model


def tiny_loaded_model(family: str = "llama", num_layers: int = 6, seed: int = 0):
    """A LoadedModel around tiny_model + tiny_tokenizer (source 'tiny-<family>')."""
    from .loading import LoadedModel

    return LoadedModel(
        model=tiny_model(family, num_layers, seed),
        tokenizer=tiny_tokenizer(),
        source=f"tiny-{family}",
        kind="tiny",
        load_seconds=0.0,
    )


def sample_text(n_chars: int = 20000, seed: int = 0) -> str:
    """Deterministic English-like filler text for tiny-model tests."""
    words = (
        "the model block layer fuse weight token text data learn small large quick brown fox "
        "jumps over lazy dog river mountain city light dark music number"
    ).split()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(words), (n_chars // 4,), generator=g).tolist()
    return " ".join(words[i] for i in idx)[:n_chars]


def state_hash(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor in the state dict (names included): equal hashes mean equal weights."""
    import hashlib

    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
