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
    "gemma2": transformers.Gemma2Config,
    "gemma3": transformers.Gemma3TextConfig,
}


def _alternating(num_layers: int) -> list[str]:
    """Sliding-window and full-attention blocks in turn, the first one sliding."""
    return [("sliding_attention" if i % 2 == 0 else "full_attention") for i in range(num_layers)]


def tiny_config(
    family: str = "llama", num_layers: int = 6, hidden: int = 32, vocab: int = 259, sliding_window: int | None = None
):
    """A small config of `family`. `sliding_window` (tokens) gives Mistral one window for every block,
    and Qwen2 alternating sliding-window and full-attention blocks; Gemma's blocks always alternate."""
    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
    if family in _LLAMA_LIKE:
        common.update(
            hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=num_layers, num_attention_heads=4,
            num_key_value_heads=2,
        )  # fmt: skip
        if family in ("gemma2", "gemma3"):
            common.update(head_dim=hidden // 4, query_pre_attn_scalar=hidden // 4, sliding_window=sliding_window or 16,
                          layer_types=_alternating(num_layers))  # fmt: skip
        elif family == "qwen2" and sliding_window is not None:
            common.update(use_sliding_window=True, sliding_window=sliding_window, layer_types=_alternating(num_layers))
        elif family == "mistral" and sliding_window is not None:
            common.update(sliding_window=sliding_window)
        return _LLAMA_LIKE[family](**common)
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


FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "opt", "phi", "gemma2", "gemma3")


def tiny_model(
    family: str = "llama",
    num_layers: int = 6,
    seed: int = 0,
    hidden: int = 32,
    attn_implementation: str | None = None,
    sliding_window: int | None = None,
):
    """A random tiny causal LM in eval mode, fp32, requires_grad off. Biases (where the family has
    them) are randomised too so bias fusion is exercised."""
    torch.manual_seed(seed)
    config = tiny_config(family, num_layers, hidden, sliding_window=sliding_window)
    model = transformers.AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation=attn_implementation
    )
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


@torch.no_grad()
def reference_mi(model: torch.nn.Module, windows: torch.Tensor) -> list[float]:
    """Macro Influence from whole-model forwards, block i skipped by a hook that hands its input on:
    the model builds every mask and rotary table itself, so this checks what capture.py records.
    windows: (n, seq) token ids. The final hidden state is the final norm's input."""
    import torch.nn.functional as F

    from .adapters import get_blocks, get_final_norm

    blocks = get_blocks(model)
    store = {}

    def keep_final(module, args):
        store["final"] = args[0].detach()  # (n, seq, hidden)

    def skip(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def final_hidden(skipped: int | None) -> torch.Tensor:
        handle = blocks[skipped].register_forward_hook(skip, with_kwargs=True) if skipped is not None else None
        try:
            model(input_ids=windows, use_cache=False)
        finally:
            if handle is not None:
                handle.remove()
        return store["final"]

    norm_handle = get_final_norm(model).register_forward_pre_hook(keep_final)
    try:
        dense = final_hidden(None)
        return [
            1.0 - F.cosine_similarity(dense.float(), final_hidden(i).float(), dim=-1).mean().item()
            for i in range(len(blocks))
        ]
    finally:
        norm_handle.remove()
