"""Write a model as one GGUF file that llama.cpp and ollama load: f16, bf16, q8_0 or q4_0.

The `gguf` package gives the file writer, the tensor name map and the quantisers; what llama.cpp
expects beyond that is ours:

- Architectures: HF `llama` (SmolLM2 and Llama) and `mistral` become GGUF `llama`, `qwen2` stays
  `qwen2`. Anything else is refused before a byte is written.
- Rotary layout: llama.cpp's `llama` graph rotates adjacent pairs of each head's dimensions (the
  original Meta layout), HF rotates its two halves, so the rows of the Q and K projections (and their
  biases) are reordered per head. `qwen2` uses the halves layout itself: no reordering.
- A tied LM head (SmolLM2) is not written: without `output.weight` llama.cpp (and transformers'
  GGUF reader) reuse `token_embd.weight`.
- Tensor types: 1-D tensors (norms, biases) stay f32; a matrix whose rows are not a whole number of
  32-value blocks cannot be q8_0/q4_0 and is kept f16. At q4_0 the output matrix (the LM head, or the
  tied embedding that serves as one) is q8_0: llama.cpp's own quantiser keeps it at 6 bits, which
  the `gguf` package cannot write.
- Tokenizer: byte-level BPE (`gpt2` in GGUF terms) from the HF fast tokenizer: tokens, types,
  merges, special ids, whether BOS/EOS are added, the chat template, and the pre-tokenizer's
  llama.cpp name (`smollm`, `llama-bpe`, `qwen2`, `gpt-2`), recognised from the tokenizer's own
  pre-tokenizer. Sentencepiece-style vocabularies (Llama 2, Mistral v0.1) are refused.

The file is written under a hidden temporary name beside the target and renamed into place when
complete, so a failure never leaves a file that looks finished.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from .data import added_special_ids
from .export import ExportError, _reason, fold_fused, remove_stale_partials
from .offload import offload_of

QUANTS = ("f16", "bf16", "q8_0", "q4_0")
QUANT_BLOCK = 32  # values per block of q8_0 and q4_0: a quantised row must be a multiple of it
# HF model_type -> the GGUF architecture llama.cpp runs it as
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

# pre-tokenizer steps (see _pre_tokenizer_steps) -> llama.cpp's name for the same split
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# ByteLevel's setting: (its own GPT-2 regex on, a space added before the text); llama.cpp never adds one
PRE_TOKENIZERS = {
    (("ByteLevel", (True, False)),): "gpt-2",
    (("Digits", True), ("ByteLevel", (True, False))): "smollm",  # digits one by one, then GPT-2's regex
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", (False, False))): "llama-bpe",
    (("Split", _QWEN2_SPLIT), ("ByteLevel", (False, False))): "qwen2",
}
# SmolLM's vocabulary (49152 tokens starting with these): a tokenizer rebuilt from a GGUF by
# transformers (the bundled model's) has lost its digit splitting and looks like plain GPT-2, but
# the vocabulary was learned with digits split, as llama.cpp's `smollm` does.
_SMOLLM_FIRST_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>"]
_SMOLLM_VOCAB_SIZE = 49152


class GGUFExportError(ExportError):
    """The model, tokenizer, quantisation or target path cannot be written as GGUF."""


def _tensor_type(quant: str):
    q = gguf.GGMLQuantizationType
    return {"f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0, "q4_0": q.Q4_0}[quant]


def _file_type(quant: str) -> int:
    f = gguf.LlamaFileType
    return {"f16": f.MOSTLY_F16, "bf16": f.MOSTLY_BF16, "q8_0": f.MOSTLY_Q8_0, "q4_0": f.MOSTLY_Q4_0}[quant]


# ----------------------------------------------------------------------------------------------------------
# checks that run before any work


def parse_quants(text: str | Sequence[str]) -> list[str]:
    """'q8_0' or 'f16,q4_0' (or a list) -> ['f16', 'q4_0']; refuses a type this module cannot write."""
    items = text.split(",") if isinstance(text, str) else list(text)
    quants = []
    for item in items:
        quant = item.strip().lower()
        if quant not in QUANTS:
            raise GGUFExportError(f"quantisation {item.strip()!r} is not supported; choose from {', '.join(QUANTS)}.")
        if quant not in quants:
            quants.append(quant)
    if not quants:
        raise GGUFExportError(f"no quantisation given; choose from {', '.join(QUANTS)}.")
    return quants


def gguf_paths(path: str | Path, quants: Sequence[str]) -> dict[str, Path]:
    """quant -> file: the path itself for one quantisation, NAME-QUANT.gguf beside it for several."""
    path = Path(path)
    if len(quants) == 1:
        return {quants[0]: path}
    return {quant: path.with_name(f"{path.stem}-{quant}{path.suffix}") for quant in quants}


def check_target(path: str | Path, overwrite: bool = False) -> Path:
    """The GGUF file to write: named *.gguf, in a folder that exists, not there yet unless `overwrite`."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".gguf":
        raise GGUFExportError(f"the GGUF file name '{path}' must end in .gguf.")
    if not path.parent.is_dir():
        raise GGUFExportError(f"the folder '{path.parent}' does not exist: create it first, or choose another path.")
    if path.is_dir():
        raise GGUFExportError(f"'{path}' is a folder: give the path of the .gguf file to write.")
    if path.exists() and not overwrite:
        raise GGUFExportError(f"'{path}' already exists: choose another name or pass --overwrite.")
    return path


def check_targets(path: str | Path, quants: str | Sequence[str], overwrite: bool = False) -> dict[str, Path]:
    """quant -> checked target file (see `gguf_paths` and `check_target`), for every quantisation asked."""
    return {quant: check_target(target, overwrite) for quant, target in gguf_paths(path, parse_quants(quants)).items()}


def check_exportable(model: nn.Module, tokenizer) -> None:
    """Refuse, with one line, a model or tokenizer this module cannot write (nothing is written)."""
    _architecture(model.config)
    _hyperparameters(model)
    _vocabulary(tokenizer, _embedding_rows(model))


def check_architecture(config: Any) -> str:
    """The GGUF architecture of a config (object or config.json dict); refuses one we cannot write."""
    if isinstance(config, dict):
        config = SimpleNamespace(**config)
    return _architecture(config)


def _architecture(config) -> str:
    model_type = getattr(config, "model_type", None) or "unknown"
    if model_type not in ARCHITECTURES:
        raise GGUFExportError(
            f"GGUF export does not support the architecture '{model_type}'; supported: "
            f"{', '.join(sorted(ARCHITECTURES))} (Llama family, incl. SmolLM2, and Qwen2)."
        )
    activation = getattr(config, "hidden_act", "silu")
    if activation != "silu":
        raise GGUFExportError(f"GGUF export needs SiLU feed-forward blocks; this model uses '{activation}'.")
    return ARCHITECTURES[model_type]


def _embedding_rows(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


# ----------------------------------------------------------------------------------------------------------
# hyperparameters


@dataclass
class Hyperparameters:
    arch: str  # GGUF architecture: "llama" | "qwen2"
    blocks: int
    hidden: int
    feed_forward: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    rms_eps: float
    rope_theta: float
    rope_linear_factor: float | None = None  # rope.scaling.type = linear
    rope_freq_factors: torch.Tensor | None = None  # (head_dim / 2,) llama3 scaling: frequency i is divided by it


def _hyperparameters(model: nn.Module) -> Hyperparameters:
    """What the GGUF metadata states, read from the model as it is now (a fused model has fewer blocks)."""
    from .adapters import get_blocks

    config = model.config
    arch = _architecture(config)
    blocks = get_blocks(model)
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    _check_blocks_alike(model, blocks, heads * head_dim, kv_heads * head_dim)

    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    linear_factor, freq_factors = None, None
    if rope_type == "linear":
        linear_factor = float(rope["factor"])
    elif rope_type == "llama3" and arch == "llama":
        freq_factors = _llama3_frequency_factors(config, theta, head_dim)
    elif rope_type != "default":
        raise GGUFExportError(
            f"GGUF export cannot write the rotary scaling '{rope_type}' for {arch}; supported: none, linear, "
            "llama3 (Llama only)."
        )

    context = int(getattr(config, "max_position_embeddings", 2048))
    window = _sliding_window(config)
    if window is not None and window < context:
        # llama.cpp runs these graphs with full attention everywhere: within the window that is
        # exactly what the model computes, so the file states the window as its context length
        context = window
    return Hyperparameters(
        arch=arch,
        blocks=len(blocks),
        hidden=hidden,
        feed_forward=int(config.intermediate_size),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        context=context,
        rms_eps=float(config.rms_norm_eps),
        rope_theta=theta,
        rope_linear_factor=linear_factor,
        rope_freq_factors=freq_factors,
    )


def _sliding_window(config) -> int | None:
    """The attention window of a model that uses one (Mistral: every block; Qwen2: when enabled)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    if getattr(config, "model_type", None) == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return int(window)


def _llama3_frequency_factors(config, theta: float, head_dim: int) -> torch.Tensor:
    """llama.cpp's `rope_freqs` for Llama 3 scaling: how much each rotary frequency is divided by,
    that is the plain RoPE frequency over the one transformers computes for this config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")  # (head_dim / 2,)
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (plain / scaled.double()).float()


def _check_blocks_alike(model: nn.Module, blocks: nn.ModuleList, q_rows: int, kv_rows: int) -> None:
    """GGUF states one shape for every block: refuse blocks whose linears differ (or heads that do not
    fit). A fused layer is measured by the linear it wraps (its folded weight has the same shape)."""
    from .adapters import block_linears

    def shapes(block: nn.Module) -> dict[str, tuple[int, ...]]:
        linears = block_linears(model, block).items()
        return {name: tuple(getattr(layer, "base_layer", layer).weight.shape) for name, layer in linears}

    if not len(blocks):
        raise GGUFExportError("the model has no blocks left to write.")
    first = shapes(blocks[0])
    for index, block in enumerate(blocks):
        if shapes(block) != first:
            raise GGUFExportError(
                f"block {index} differs in shape from block 0; GGUF states one shape for every block."
            )
    q, k = first.get("self_attn.q_proj"), first.get("self_attn.k_proj")
    if q is None or k is None or q[0] != q_rows or k[0] != kv_rows:
        raise GGUFExportError(
            "the attention projections do not match the head counts in the config; cannot state them in GGUF."
        )


# ----------------------------------------------------------------------------------------------------------
# tokenizer


@dataclass
class Vocabulary:
    pre: str  # llama.cpp's pre-tokenizer name
    tokens: list[str]  # by id; ordinary tokens in the byte-level alphabet, added tokens as their text
    token_types: list[int]  # gguf.TokenType per token
    merges: list[str]  # "left right", best first
    special_ids: dict[str, int]  # bos / eos / unk / pad -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | list[dict[str, str]] | None


def _vocabulary(tokenizer, rows: int) -> Vocabulary:
    """The tokenizer as GGUF metadata, for an embedding of `rows` tokens (extra rows are padding)."""
    from tokenizers import pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("GGUF export needs a fast (tokenizers) tokenizer; this one is a slow Python tokenizer.")
    spec = json.loads(backend.to_str())
    model_spec = spec.get("model") or {}
    if model_spec.get("type") != "BPE":
        raise GGUFExportError(
            f"GGUF export writes byte-level BPE tokenizers; this one is {model_spec.get('type') or 'unknown'}."
        )
    if model_spec.get("byte_fallback") or _uses_metaspace(spec):
        raise GGUFExportError(
            "GGUF export does not write sentencepiece-style tokenizers yet (Llama 2, Mistral v0.1); "
            "supported: byte-level BPE (SmolLM2, Llama 3, Qwen2)."
        )
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise GGUFExportError(f"GGUF export cannot state the tokenizer's normalizer ({normalizer.get('type')}).")

    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    if max(vocab.values()) >= rows:
        raise GGUFExportError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model embeds only {rows} tokens."
        )
    added = {index: token for index, token in tokenizer.added_tokens_decoder.items()}
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    tokens = [f"[PAD{i}]" for i in range(rows)]  # rows no token uses, named as llama.cpp names them
    types = [int(gguf.TokenType.UNUSED)] * rows
    for token, index in vocab.items():
        tokens[index] = token
        if index in added:
            types[index] = int(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        elif set(token) <= alphabet:
            types[index] = int(gguf.TokenType.NORMAL)
        else:
            raise GGUFExportError(f"the tokenizer is not byte-level BPE (token {token!r} is not byte-encoded).")

    merges = [m if isinstance(m, str) else " ".join(m) for m in model_spec.get("merges") or []]
    special_ids = {}
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            special_ids[role] = int(token_id)
    leading, trailing = added_special_ids(tokenizer)
    return Vocabulary(
        pre=_pre_tokenizer_name(spec, tokens),
        tokens=tokens,
        token_types=types,
        merges=merges,
        special_ids=special_ids,
        add_bos="bos" in special_ids and leading == [special_ids["bos"]],
        add_eos="eos" in special_ids and trailing == [special_ids["eos"]],
        chat_template=_chat_template(tokenizer),
    )


def _uses_metaspace(spec: dict) -> bool:
    """Sentencepiece-style: spaces become '▁' (a Metaspace pre-tokenizer or a Replace normalizer)."""
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer"), spec.get("decoder")])
    return "Metaspace" in text or "\u2581" in text


def _pre_tokenizer_steps(spec: dict) -> tuple[tuple[str, Any], ...]:
    """The pre-tokenizer as (step, setting) pairs: ByteLevel -> (use_regex, add_prefix_space), Digits ->
    its individual_digits, Split -> its regex; a Sequence is flattened."""
    pre = spec.get("pre_tokenizer")
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    described = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            described.append((kind, (bool(step.get("use_regex", True)), bool(step.get("add_prefix_space", True)))))
        elif kind == "Digits":
            described.append((kind, bool(step.get("individual_digits", False))))
        elif kind == "Split":
            pattern = step.get("pattern") or {}
            described.append((kind, pattern.get("Regex", pattern.get("String"))))
        else:
            described.append((kind, None))
    return tuple(described)


def _pre_tokenizer_name(spec: dict, tokens: list[str]) -> str:
    steps = _pre_tokenizer_steps(spec)
    name = PRE_TOKENIZERS.get(steps)
    if name is None:
        shown = ", ".join(kind for kind, _ in steps) or "none"
        raise GGUFExportError(
            f"GGUF export does not recognise the tokenizer's pre-tokenizer ({shown}); recognised: "
            "those of SmolLM2, Llama 3, Qwen2 and GPT-2."
        )
    if name == "gpt-2" and len(tokens) == _SMOLLM_VOCAB_SIZE and tokens[:5] == _SMOLLM_FIRST_TOKENS:
        return "smollm"
    return name


def _chat_template(tokenizer) -> str | list[dict[str, str]] | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: gguf writes "default" as the main one
        return [{"name": name, "template": text} for name, text in template.items()]
    return template or None


# ----------------------------------------------------------------------------------------------------------
# tensors


@dataclass
class _TensorPlan:
    gguf_name: str
    shape: tuple[int, ...]  # torch layout: (rows, row length)
    ggml_type: Any  # gguf.GGMLQuantizationType
    read: Any  # () -> float32 numpy array of `shape`, in llama.cpp's layout

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quant_shape_to_byte_shape(self.shape, self.ggml_type)))


def _rotary_rows_to_pairs(values: np.ndarray, heads: int) -> np.ndarray:
    """Reorder the rows of a Q or K projection (or bias), (heads * head_dim, ...), from HF's layout
    (each head's first half then its second half) to llama.cpp's (the two halves interleaved)."""
    head_dim = values.shape[0] // heads
    split = values.reshape(heads, 2, head_dim // 2, *values.shape[1:])  # (head, half, i, ...)
    return split.swapaxes(1, 2).reshape(values.shape)  # (head, i, half, ...)


def _weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, Any]]:
    """(HF name, tensor slot, its BlockOffload) of each weight once: a tied LM head is skipped (it is
    the embedding); an offloaded block's slot is a placeholder that its BlockOffload reads."""
    store = offload_of(model)
    seen: set[int] = set()
    for name, slot in model.state_dict(keep_vars=True).items():
        if id(slot) in seen:
            continue
        seen.add(id(slot))
        yield name, slot, store


def _plan_tensors(model: nn.Module, hp: Hyperparameters, quant: str) -> list[_TensorPlan]:
    """Every tensor of the file, in order, with its GGUF name, type and a reader for its values."""
    arch = gguf.MODEL_ARCH.LLAMA if hp.arch == "llama" else gguf.MODEL_ARCH.QWEN2
    name_map = gguf.get_tensor_name_map(arch, hp.blocks)
    weights = []  # (GGUF name, slot, its BlockOffload)
    for name, slot, store in _weights(model):
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"the tensor '{name}' has no GGUF name; cannot write this model.")
        weights.append((gguf_name, slot, store))
    tied = all(gguf_name != "output.weight" for gguf_name, _, _ in weights)
    plans = []
    for gguf_name, slot, store in weights:
        shape = tuple(slot.shape)
        is_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
        heads = None  # Q and K of the llama graph: rows reordered per head
        if hp.arch == "llama" and ".attn_q." in gguf_name:
            heads = hp.heads
        elif hp.arch == "llama" and ".attn_k." in gguf_name:
            heads = hp.kv_heads
        plans.append(_TensorPlan(gguf_name, shape, _choose_type(shape, quant, is_output), _reader(slot, store, heads)))
    if hp.rope_freq_factors is not None:
        factors = hp.rope_freq_factors.numpy().astype(np.float32)
        plans.append(
            _TensorPlan("rope_freqs.weight", tuple(factors.shape), gguf.GGMLQuantizationType.F32, lambda: factors)
        )
    return plans


def _reader(slot: torch.Tensor, store, heads: int | None):
    def read() -> np.ndarray:
        tensor = store.host_copy(slot) if store.active else slot.detach()
        values = tensor.to("cpu", torch.float32).numpy()
        return _rotary_rows_to_pairs(values, heads) if heads is not None else values

    return read


def _choose_type(shape: tuple[int, ...], quant: str, is_output: bool):
    """f32 for vectors; the asked type for matrices, except where llama.cpp's rules say otherwise."""
    q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return q.F32
    if quant in ("f16", "bf16"):
        return _tensor_type(quant)
    if shape[-1] % QUANT_BLOCK:
        return q.F16  # rows that are not whole blocks cannot be quantised
    if quant == "q4_0" and is_output:
        return q.Q8_0  # the output matrix is kept at higher precision (llama.cpp: 6-bit)
    return _tensor_type(quant)


def _encode(values: np.ndarray, ggml_type) -> np.ndarray:
    """float32 values -> the bytes (or f16/f32 array) GGUF stores for `ggml_type`."""
    if ggml_type == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if ggml_type == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(values, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), ggml_type)  # uint8 rows


# ----------------------------------------------------------------------------------------------------------
# writing


def export_gguf(
    model: nn.Module,
    tokenizer,
    path: str | Path,
    quant: str = "f16",
    overwrite: bool = False,
    name: str | None = None,
) -> Path:
    """Write `model` and `tokenizer` as one GGUF file at `path` (quant: f16, bf16, q8_0 or q4_0).

    Fused layers are folded first (on the given model, which becomes plain), as `export_model` does.
    Raises GGUFExportError, with nothing written, for a model, tokenizer, quantisation or path that
    cannot be written."""
    (quant,) = parse_quants([quant])
    path = check_target(path, overwrite)
    fold_fused(model)
    hp = _hyperparameters(model)
    vocabulary = _vocabulary(tokenizer, _embedding_rows(model))
    plans = _plan_tensors(model, hp, quant)

    writer = gguf.GGUFWriter(path=None, arch=hp.arch)
    _add_metadata(writer, hp, vocabulary, quant, name or _model_name(model))
    for plan in plans:
        byte_shape = gguf.quant_shape_to_byte_shape(plan.shape, plan.ggml_type)
        writer.add_tensor_info(plan.gguf_name, byte_shape, np.dtype(np.uint8), plan.nbytes, raw_dtype=plan.ggml_type)

    remove_stale_partials(path)
    # the pid in the name tells a live writer's file from a dead one's
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.partial-{os.getpid()}-")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer.open_output_file(tmp)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for plan in plans:  # one tensor in memory at a time
            writer.write_tensor_data(_encode(plan.read(), plan.ggml_type))
        writer.close()
        os.replace(tmp, path)
    except OSError as e:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise GGUFExportError(f"could not write '{path}': {_reason(e)}. Nothing was left behind.") from None
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _model_name(model: nn.Module) -> str:
    source = str(getattr(model.config, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "")
    return Path(source).name or "model"


def _add_metadata(writer, hp: Hyperparameters, vocabulary: Vocabulary, quant: str, name: str) -> None:
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_vocab_size(len(vocabulary.tokens))
    writer.add_context_length(hp.context)
    writer.add_embedding_length(hp.hidden)
    writer.add_feed_forward_length(hp.feed_forward)
    writer.add_block_count(hp.blocks)
    writer.add_head_count(hp.heads)
    writer.add_head_count_kv(hp.kv_heads)
    if hp.head_dim * hp.heads != hp.hidden:  # llama.cpp assumes hidden / heads otherwise
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    if hp.rope_linear_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hp.rope_linear_factor)
    writer.add_layer_norm_rms_eps(hp.rms_eps)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.token_types)
    writer.add_token_merges(vocabulary.merges)
    ids = vocabulary.special_ids
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):  # fmt: skip
        if role in ids:
            add(ids[role])
    writer.add_add_bos_token(vocabulary.add_bos)
    writer.add_add_eos_token(vocabulary.add_eos)
    if vocabulary.chat_template:
        writer.add_chat_template(vocabulary.chat_template)


# ----------------------------------------------------------------------------------------------------------
# reading back and measuring


def load_gguf_model(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model in a GGUF file, read by transformers' own GGUF reader (dequantised), in eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer transformers builds from a GGUF file's metadata."""
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def quantisation_rows(
    model: nn.Module,
    tokenizer,
    path: str | Path,
    quants: Sequence[str],
    windows: torch.Tensor,
    size_before_bytes: int,
    overwrite: bool = False,
    batch_size: int = 4,
    name: str | None = None,
) -> list[dict[str, Any]]:
    """Write `model` once per quantisation (see `gguf_paths`) and measure each file: its size, the
    perplexity on `windows` of the model transformers reads back from it (dequantised), and the
    total compression as size after / size before (`size_before_bytes`: the original model, e.g.
    its parameters in 16-bit). Every target is checked before the first is written."""
    from .evaluate import perplexity

    targets = check_targets(path, quants, overwrite)
    check_exportable(model, tokenizer)
    fold_fused(model)  # once, not per file
    rows = []
    for quant, target in targets.items():
        export_gguf(model, tokenizer, target, quant, overwrite=overwrite, name=name)
        reread = load_gguf_model(target)
        ppl = perplexity(reread, windows, batch_size)
        del reread
        size = target.stat().st_size
        rows.append(
            {
                "quant": quant,
                "file": str(target),
                "file_bytes": size,
                "ppl": ppl,
                "eval_tokens": int(windows.numel()),
                "size_before_bytes": int(size_before_bytes),
                "compression": size / size_before_bytes if size_before_bytes else math.nan,
            }
        )
    return rows
