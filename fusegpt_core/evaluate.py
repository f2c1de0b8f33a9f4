"""Perplexity, generation, size and decode speed."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import count_params, fork_model, get_blocks, remove_blocks
from .errors import Cancelled, PlanError

SPEED_REPEATS = 5  # timed generations per model in decode_speeds


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    should_stop: Callable[[], bool] | None = None,
) -> float:
    """exp(mean next-token NLL) over non-overlapping windows (n, seq_len), every token weighted equally."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        if should_stop is not None and should_stop():
            raise Cancelled("stopped by the user during evaluation")
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()  # (batch, seq, vocab)
        nll += F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def drop_blocks(model: nn.Module, blocks: list[int]) -> nn.Module:
    """`model` with the given blocks (current indices) skipped: a fork sharing every weight (no copy),
    the input untouched."""
    n = len(get_blocks(model))
    bad = [b for b in blocks if not 0 <= b < n]
    if bad:
        raise PlanError(f"block(s) {bad} do not exist: the model has blocks 0 to {n - 1}.")
    if len(set(blocks)) >= n:
        raise PlanError(f"cannot remove all {n} blocks.")
    out = fork_model(model)
    remove_blocks(out, sorted(set(blocks)))
    return out


def _prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return ids


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
) -> str:
    """Answer `prompt` (through the chat template when the tokenizer has one). Greedy by default,
    so differences between models come from the models, not the sampling."""
    if not prompt or not prompt.strip():
        raise PlanError("the prompt is empty: type a question or pick an example.")
    device = next(model.parameters()).device
    ids = _prompt_ids(tokenizer, prompt).to(device)
    torch.manual_seed(seed)
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": tokenizer.pad_token_id}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:  # silence warnings from generation configs that ship sampling defaults
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


@torch.no_grad()
def decode_speeds(
    models: list[nn.Module], tokenizer, new_tokens: int = 32, prompt_tokens: int = 16, repeats: int = SPEED_REPEATS
) -> list[dict[str, float]]:
    """Greedy decode speed with the KV cache of each model, in tokens/s.

    One warm-up generation per model, then `repeats` timed generations taken in turns (A B A B ...)
    so that a machine busy with something else slows every model alike. Per model: the median, the
    lowest and highest of the repeats, their count and the tokens generated each time."""
    device = next(models[0].parameters()).device
    vocab = min(getattr(models[0].config, "vocab_size", 1000), 1000)
    ids = torch.arange(5, 5 + prompt_tokens, device=device).remainder(vocab).unsqueeze(0)  # (1, prompt)
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer is not None else 0,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    for model in models:
        model.generate(**kwargs)  # warm-up: allocator, kernels, caches
    timings: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for model, times in zip(models, timings):
            _sync(device)
            start = time.perf_counter()
            model.generate(**kwargs)
            _sync(device)
            times.append(new_tokens / (time.perf_counter() - start))
    return [
        {"median": statistics.median(t), "low": min(t), "high": max(t), "repeats": repeats, "new_tokens": new_tokens}
        for t in timings
    ]


def decode_speed(model: nn.Module, tokenizer, new_tokens: int = 32, repeats: int = SPEED_REPEATS) -> dict[str, float]:
    """decode_speeds of one model."""
    return decode_speeds([model], tokenizer, new_tokens, repeats=repeats)[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_size(model: nn.Module) -> dict[str, int]:
    """Parameters (tied weights once), bytes of parameters, and block count."""
    seen: set[int] = set()
    nbytes = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            nbytes += p.numel() * p.element_size()
    return {"params": count_params(model), "bytes": nbytes, "blocks": len(get_blocks(model))}
