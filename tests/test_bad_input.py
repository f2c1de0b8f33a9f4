"""Every kind of bad input, as one table: the library, the command line and the app give one clear message and
change nothing.

Each case of `CASES` names the exception the library raises and a fragment of its message, and says how the same
mistake is made on the command line (a real `python -m fusegpt_core` process: exit code 2, one line, no traceback,
no output folder) and in the app (the Python functions behind the UI events, called with a session that holds a
loaded model and results: the visible message must name the problem and the session's model, importance and runs
must be exactly as before). The last test counts the cases.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
import types
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from fusegpt_core import loading
from fusegpt_core.config import Recipe, preset
from fusegpt_core.data import load_texts, token_windows
from fusegpt_core.errors import DataError, FuseGPTError, ModelLoadError, PlanError, RecipeError
from fusegpt_core.gguf_export import GGUFExportError
from fusegpt_core.pipeline import run
from fusegpt_core.testing import sample_text, state_hash, tiny_loaded_model, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GOOD_TEXT = "\n\n".join(sample_text(2500, seed=s) for s in range(6))  # ~15k tokens with the byte tokenizer
OVER_CAP = 25_000_000  # bytes: over data.py's 20 MB upload limit (a sparse file: nothing is really written)
OLD_GGUF = b"an older GGUF file"  # what a refused GGUF export must leave in place


@dataclass
class Case:
    name: str
    group: str
    """'model' | 'text' | 'plan' | 'recipe' | 'export'."""
    error: type[FuseGPTError]
    match: str
    """A fragment of the library's message (case-insensitive)."""
    lib: Callable[[dict[str, Any]], Any]
    """Makes the mistake through the library; must raise `error`."""
    cli: list[str] | None = None
    """The same mistake on the command line ({placeholders} name files of the `env` fixture)."""
    cli_match: str | None = None
    app: Callable[[AppDriver], str] | None = None
    """The same mistake in the app; returns what the visitor sees."""
    app_match: str | None = None
    note: str = ""
    """Why a path is missing, where it is."""
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# library helpers


def _load(name: str) -> Callable[[dict], Any]:
    return lambda env: loading.load_model(env[name], device="cpu")


def _text(source_key: str, seq_len: int = 64, prefix: str = "file:") -> Callable[[dict], Any]:
    """The pipeline's data path: calibration/evaluation texts, then token windows."""

    def go(env):
        source = prefix + env[source_key] if prefix == "file:" else prefix + source_key
        calib, evaluation = load_texts(source, source)
        token_windows(env["tokenizer"], calib, seq_len, 2)
        token_windows(env["tokenizer"], evaluation, seq_len, None)

    return go


def _plan(**overrides) -> Callable[[dict], Any]:
    """run() on the tiny model: the plan must be refused before any work, the model untouched."""

    def go(env):
        loaded = env["loaded"]
        before = state_hash(loaded.model)
        try:
            run(preset("tiny", **overrides), loaded, windows=env["windows"])
        finally:
            assert state_hash(loaded.model) == before

    return go


def _recipe(name: str) -> Callable[[dict], Any]:
    return lambda env: Recipe.from_file(env[name]).validate(num_blocks=6)


def _gguf_target(name: str, quants: str = "q8_0") -> Callable[[dict], Any]:
    """The checks `export --gguf` and `fuse --gguf` make before anything is loaded or written."""
    from fusegpt_core.gguf_export import check_targets

    return lambda env: check_targets(env[name], quants)


def _gguf_model(env) -> None:
    """A loaded model whose architecture GGUF has no graph for (GPT-2's learned positions, GELU)."""
    from fusegpt_core.gguf_export import check_exportable

    check_exportable(tiny_model("gpt2", num_layers=2), env["tokenizer"])


def _quant_without_gguf(env) -> None:
    """The command line's rule, through its own function: --quant only says how to write --gguf's file."""
    from fusegpt_core.cli import _gguf_targets, parser

    _gguf_targets(parser().parse_args(["fuse", "--model", env["tiny"], "--quant", "q8_0", "--out", "x"]))


# ---------------------------------------------------------------------------------------------------------------
# the app: the functions behind the UI events, called as gradio would call them


class AppDriver:
    """Calls the UI's event functions (looked up by api name / function name) for one session."""

    SESSION = "bad-input-visitor"

    def __init__(self, demo, ctx):
        self.demo, self.ctx = demo, ctx
        self.fns = {}
        for fn in demo.fns.values():
            self.fns.setdefault(fn.api_name, fn.fn)
            self.fns.setdefault(fn.name, fn.fn)
        self.request = types.SimpleNamespace(session_hash=self.SESSION, username=None)
        from app.recipes import preset_values

        self.tiny_knobs = preset_values("tiny")

    @property
    def session(self):
        return self.ctx.sessions.get(self.SESSION)

    def _outcome(self, returned, jobs_before: int) -> str:
        """What the visitor sees: the status line the handler returned, or the status of the job it queued."""
        from app import views

        status = returned[0] if isinstance(returned, tuple) else returned
        session = self.session
        if len(session.jobs) > jobs_before:
            snap = self.ctx.runner.wait(session.jobs[-1], timeout=120)
            return views.status_text(snap)
        return str(status)

    def load(self, kind: str, text: str = "") -> str:
        jobs = len(self.session.jobs)
        return self._outcome(self.fns["load_model"](kind, text, "auto", "auto", False, self.request), jobs)

    def importance(self, kind="bundled corpus", pasted="", upload=None, seq_len=32) -> str:
        jobs = len(self.session.jobs)
        out = self.fns["compute_importance"](
            kind, pasted, upload, "wikitext2", ["mi"], seq_len, 1, 0, True, self.request
        )
        return self._outcome(out, jobs)

    def _recipe_inputs(self, knobs: dict[str, Any]) -> list[Any]:
        from app.recipes import KNOB_KEYS

        values = list(self.tiny_knobs)
        for key, value in knobs.items():
            values[KNOB_KEYS.index(key)] = value
        return ["tiny", "fusegpt", "paste text", GOOD_TEXT, None, "wikitext2", *values]

    def run(self, blocks=None, k=2, targets=None, **knobs) -> str:
        """Set the plan (pick blocks, or let MI choose k), optionally a block's targets, then press Run."""
        mode = "pick blocks" if blocks is not None else "let MI choose"
        self.fns["set_plan"](mode, blocks or [], k, self.request)
        inputs = self._recipe_inputs(knobs)
        for removed, chosen in (targets or {}).items():
            with warnings.catch_warnings(record=True) as shown:  # gr.Warning outside a page: a Python warning
                warnings.simplefilter("always")
                self.fns["apply_targets"](str(removed), [str(t) for t in chosen], self.request)
            if shown:  # the visitor sees the toast, and the plan keeps its earlier targets
                return f"⚠ {shown[-1].message}"
        preset_name, method, *rest = inputs
        jobs = len(self.session.jobs)
        return self._outcome(self.fns["start_run"](preset_name, method, [], *rest, self.request), jobs)


def _app_load(env_key: str, kind: str = "local folder or .gguf file") -> Callable[[AppDriver], str]:
    return lambda d: d.load(kind, d.env[env_key] if env_key in d.env else env_key)


def _app_upload(env_key: str, seq_len: int = 32) -> Callable[[AppDriver], str]:
    return lambda d: d.importance("upload a file", upload=d.env[env_key], seq_len=seq_len)


def _app_gguf(quants: Any) -> Callable[[AppDriver], str]:
    """'Export as GGUF' on the session's run (an API client may send any text as the types)."""
    return lambda d: d._outcome(d.fns["export_gguf"](1, quants, d.request), len(d.session.jobs))


# ---------------------------------------------------------------------------------------------------------------
# the table

FUSE = ["fuse", "--preset", "tiny", "--out", "{tmp}/out"]
FUSE_TINY = ["fuse", "--model", "{tiny}", "--preset", "tiny", "--calib-text", "{good}", "--eval-text", "{good}"]
FUSE_TINY += ["--out", "{tmp}/out"]

CASES: list[Case] = [
    # ---- model -------------------------------------------------------------------------------------------------
    Case("model: nonexistent path", "model", ModelLoadError, "No such file or folder", _load("missing_dir"),
         cli=["fuse", "--model", "{missing_dir}", *FUSE[1:]], app=_app_load("missing_dir")),
    Case("model: nonexistent hub id", "model", ModelLoadError, "Hugging Face Hub", _load("missing_hub"),
         cli=["fuse", "--model", "{missing_hub}", *FUSE[1:]], app=_app_load("missing_hub", "Hub id"),
         note="offline here, so the message is the 'cannot reach the Hub and not cached' one"),
    Case("model: folder without weights", "model", ModelLoadError, "no weights", _load("no_weights"),
         cli=["fuse", "--model", "{no_weights}", *FUSE[1:]], app=_app_load("no_weights")),
    Case("model: folder without config.json", "model", ModelLoadError, "no config.json", _load("no_config"),
         cli=["fuse", "--model", "{no_config}", *FUSE[1:]], app=_app_load("no_config")),
    Case("model: truncated safetensors", "model", ModelLoadError, "truncated", _load("truncated_st"),
         cli=["fuse", "--model", "{truncated_st}", *FUSE[1:]], app=_app_load("truncated_st")),
    Case("model: garbage safetensors", "model", ModelLoadError, "corrupt or incomplete", _load("garbage_st"),
         cli=["fuse", "--model", "{garbage_st}", *FUSE[1:]], app=_app_load("garbage_st")),
    Case("model: corrupt GGUF", "model", ModelLoadError, "corrupt or incomplete", _load("garbage_gguf"),
         cli=["fuse", "--model", "{garbage_gguf}", *FUSE[1:]], app=_app_load("garbage_gguf")),
    Case("model: truncated GGUF", "model", ModelLoadError, "corrupt or incomplete", _load("truncated_gguf"),
         cli=["fuse", "--model", "{truncated_gguf}", *FUSE[1:]], app=_app_load("truncated_gguf")),
    Case("model: encoder-only (BERT)", "model", ModelLoadError, "architecture 'bert' is not supported",
         _load("bert"), cli=["fuse", "--model", "{bert}", *FUSE[1:]], app=_app_load("bert")),
    Case("model: unsupported decoder (gpt_neox)", "model", ModelLoadError, "architecture 'gpt_neox' is not supported",
         _load("neox"), cli=["fuse", "--model", "{neox}", *FUSE[1:]], app=_app_load("neox")),
    Case("model: needs remote code", "model", ModelLoadError, "trust_remote_code", _load("remote_code"),
         cli=["fuse", "--model", "{remote_code}", *FUSE[1:]], app=_app_load("remote_code")),
    Case("model: pickle that runs code", "model", ModelLoadError, "Could not load the weights", _load("evil_pickle"),
         cli=["fuse", "--model", "{evil_pickle}", *FUSE[1:]], app=_app_load("evil_pickle"),
         extra={"never_created": "pwned"}),
    Case("model: more memory than the machine has", "model", ModelLoadError, "GiB of RAM is free", _load("huge"),
         cli=["fuse", "--model", "{huge}", *FUSE[1:]], app=_app_load("huge"),
         note="refused from config.json alone: the estimate is in the message"),
    Case("model: a file, not a folder", "model", ModelLoadError, "is a file", _load("config_file"),
         cli=["fuse", "--model", "{config_file}", *FUSE[1:]], app=_app_load("config_file")),
    # ---- text --------------------------------------------------------------------------------------------------
    Case("text: empty file", "text", DataError, "is empty", _text("empty_txt"),
         cli=[*FUSE_TINY[:5], "--calib-text", "{empty_txt}", "--eval-text", "{empty_txt}", *FUSE_TINY[-2:]],
         app=_app_upload("empty_txt")),
    Case("text: whitespace-only file", "text", DataError, "is empty", _text("blank_txt"),
         cli=[*FUSE_TINY[:5], "--calib-text", "{blank_txt}", "--eval-text", "{blank_txt}", *FUSE_TINY[-2:]],
         app=_app_upload("blank_txt")),
    Case("text: shorter than one window", "text", DataError, "shorter than one window", _text("short_txt", 512),
         cli=[*FUSE_TINY[:5], "--calib-text", "{short_txt}", "--eval-text", "{short_txt}", "--set",
              "data.seq_len=512", *FUSE_TINY[-2:]],
         app=_app_upload("short_txt", 512)),
    Case("text: binary upload", "text", DataError, "binary", _text("binary_txt"),
         cli=[*FUSE_TINY[:5], "--calib-text", "{binary_txt}", "--eval-text", "{binary_txt}", *FUSE_TINY[-2:]],
         app=_app_upload("binary_txt")),
    Case("text: not UTF-8", "text", DataError, "not valid UTF-8", _text("latin1_txt"),
         cli=[*FUSE_TINY[:5], "--calib-text", "{latin1_txt}", "--eval-text", "{latin1_txt}", *FUSE_TINY[-2:]],
         app=_app_upload("latin1_txt")),
    Case("text: upload over the size cap", "text", DataError, "over the 20.0 MB limit", _text("huge_txt"),
         cli=[*FUSE_TINY[:5], "--calib-text", "{huge_txt}", "--eval-text", "{huge_txt}", *FUSE_TINY[-2:]],
         app=_app_upload("huge_txt")),
    Case("text: missing file", "text", DataError, "No such file", _text("missing_txt"),
         cli=[*FUSE_TINY[:5], "--calib-text", "{missing_txt}", "--eval-text", "{missing_txt}", *FUSE_TINY[-2:]],
         app=_app_upload("missing_txt")),
    Case("text: empty paste", "text", DataError, "is empty", _text("", prefix="text:"),
         app=lambda d: d.importance("paste text", pasted=""), app_match="too short",
         note="no pasted text on the command line; the app asks for 200+ characters before starting a job"),
    Case("text: whitespace-only paste", "text", DataError, "is empty", _text("   \n\t  \n", prefix="text:"),
         app=lambda d: d.importance("paste text", pasted=" \n\t " * 100), app_match="too short"),
    Case("text: paste shorter than one window", "text", DataError, "shorter than one window",
         _text(sample_text(300), 512, prefix="text:"),
         app=lambda d: d.importance("paste text", pasted=sample_text(300), seq_len=512)),
    # ---- plan --------------------------------------------------------------------------------------------------
    Case("plan: block index out of range", "plan", PlanError, "block 9 does not exist", _plan(blocks=[9]),
         cli=[*FUSE_TINY, "--blocks", "9"], app=lambda d: d.run(blocks=[9])),
    Case("plan: negative block index", "plan", PlanError, "block -1 does not exist", _plan(blocks=[-1]),
         cli=[*FUSE_TINY, "--blocks=-1"], app=lambda d: d.run(blocks=[-1])),
    Case("plan: duplicated block", "plan", PlanError, "more than once", _plan(blocks=[2, 2]),
         cli=[*FUSE_TINY, "--blocks", "2,2"],
         note="the app keeps each ticked block once: see test_app_merges_a_duplicated_block"),
    Case("plan: remove every block", "plan", PlanError, "at least one block must remain",
         _plan(blocks=[0, 1, 2, 3, 4, 5]), cli=[*FUSE_TINY, "--blocks", "0,1,2,3,4,5"],
         app=lambda d: d.run(blocks=[0, 1, 2, 3, 4, 5])),
    Case("plan: remove every block (count)", "plan", PlanError, "at least one block must remain", _plan(remove=6),
         cli=[*FUSE_TINY, "--remove", "6"], app=lambda d: d.run(k=6)),
    Case("plan: remove all but one", "plan", PlanError, "single remaining block", _plan(blocks=[0, 1, 2, 3, 4]),
         cli=[*FUSE_TINY, "--blocks", "0,1,2,3,4"], app=lambda d: d.run(blocks=[0, 1, 2, 3, 4])),
    Case("plan: remove zero blocks", "plan", PlanError, "remove = 0", _plan(remove=0),
         cli=[*FUSE_TINY, "--remove", "0"], app=lambda d: d.run(k=0), app_match="at least 1"),
    Case("plan: fusion target equals the removed block", "plan", PlanError, "cannot be fused into itself",
         _plan(blocks=[2], **{"fusion.targets": {"2": [2]}}),
         cli=[*FUSE_TINY, "--blocks", "2", "--set", 'fusion.targets={"2": [2]}'],
         app=lambda d: d.run(blocks=[2], targets={2: [2]})),
    Case("plan: fusion target outside the model", "plan", PlanError, "outside the model",
         _plan(blocks=[2], **{"fusion.targets": {"2": [9]}}),
         cli=[*FUSE_TINY, "--blocks", "2", "--set", 'fusion.targets={"2": [9]}'],
         app=lambda d: d.run(blocks=[2], targets={2: [9]})),
    Case("plan: empty target list", "plan", PlanError, "empty list of fusion targets",
         _plan(blocks=[2], **{"fusion.targets": {"2": []}}),
         cli=[*FUSE_TINY, "--blocks", "2", "--set", 'fusion.targets={"2": []}'],
         note="the app refuses an empty target choice with its own warning before it reaches the plan"),
    Case("plan: group larger than the model", "plan", PlanError, "larger than the model",
         _plan(blocks=[2], **{"fusion.group_size": 12}),
         cli=[*FUSE_TINY, "--blocks", "2", "--set", "fusion.group_size=12"],
         note="the app clamps the group size to the model's block count by design (its presets assume 30 blocks)"),
    Case("plan: negative coefficient rank", "plan", PlanError, "fusion.coef_rank", _plan(**{"fusion.coef_rank": -1}),
         cli=[*FUSE_TINY, "--set", "fusion.coef_rank=-1"], app=lambda d: d.run(blocks=[2], **{"fusion.coef_rank": -1})),
    Case("plan: negative LoRA rank", "plan", PlanError, "fusion.lora_rank", _plan(**{"fusion.lora_rank": -4}),
         cli=[*FUSE_TINY, "--set", "fusion.lora_rank=-4"], app=lambda d: d.run(blocks=[2], **{"fusion.lora_rank": -4})),
    Case("plan: zero epochs", "plan", PlanError, "distill.epochs", _plan(**{"distill.epochs": 0}),
         cli=[*FUSE_TINY, "--set", "distill.epochs=0"], app=lambda d: d.run(blocks=[2], **{"distill.epochs": 0})),
    Case("plan: zero batch size", "plan", PlanError, "distill.batch_size", _plan(**{"distill.batch_size": 0}),
         cli=[*FUSE_TINY, "--set", "distill.batch_size=0"],
         app=lambda d: d.run(blocks=[2], **{"distill.batch_size": 0})),
    Case("plan: learning rate 0", "plan", PlanError, "distill.lr_coef", _plan(**{"distill.lr_coef": 0.0}),
         cli=[*FUSE_TINY, "--set", "distill.lr_coef=0"], app=lambda d: d.run(blocks=[2], **{"distill.lr_coef": 0.0})),
    Case("plan: learning rate NaN", "plan", PlanError, "distill.lr_lora", _plan(**{"distill.lr_lora": float("nan")}),
         cli=[*FUSE_TINY, "--set", "distill.lr_lora=NaN"],
         app=lambda d: d.run(blocks=[2], **{"distill.lr_lora": float("nan")})),
    Case("plan: negative learning rate", "plan", PlanError, "distill.lr_coef", _plan(**{"distill.lr_coef": -0.1}),
         cli=[*FUSE_TINY, "--set", "distill.lr_coef=-0.1"],
         app=lambda d: d.run(blocks=[2], **{"distill.lr_coef": -0.1})),
    Case("plan: Adam betas not two numbers", "plan", PlanError, "distill.betas",
         _plan(**{"distill.betas": [0.9]}), cli=[*FUSE_TINY, "--set", "distill.betas=[0.9]"]),
    Case("plan: divergence factor below 1", "plan", PlanError, "distill.divergence_factor",
         _plan(**{"distill.divergence_factor": 0.5}), cli=[*FUSE_TINY, "--set", "distill.divergence_factor=0.5"],
         app=lambda d: d.run(blocks=[2], **{"distill.divergence_factor": 0.5})),
    Case("plan: text window of 0 tokens", "plan", PlanError, "data.seq_len", _plan(**{"data.seq_len": 0}),
         cli=[*FUSE_TINY, "--set", "data.seq_len=0"], app=lambda d: d.run(blocks=[2], **{"data.seq_len": 0})),
    Case("plan: window longer than the model's positions", "plan", PlanError, "longer than the 512 positions",
         _plan(**{"data.seq_len": 1024}), cli=[*FUSE_TINY, "--set", "data.seq_len=1024"],
         app=lambda d: d.run(blocks=[2], **{"data.seq_len": 1024})),
    Case("text: importance window longer than the model's positions", "text", PlanError, "longer than the 512",
         lambda env: _cli_importance_seq_len(env), cli=["importance", "--model", "{tiny}", "--eval-text", "{good}",
         "--seq-len", "2048"], app=lambda d: d.importance("paste text", pasted=GOOD_TEXT, seq_len=2048)),
    # ---- recipe files ------------------------------------------------------------------------------------------
    Case("recipe: malformed JSON", "recipe", RecipeError, "is not valid JSON", _recipe("bad_json"),
         cli=["fuse", "--recipe", "{bad_json}", "--out", "{tmp}/out"]),
    Case("recipe: malformed YAML", "recipe", RecipeError, "is not valid YAML", _recipe("bad_yaml"),
         cli=["fuse", "--recipe", "{bad_yaml}", "--out", "{tmp}/out"]),
    Case("recipe: unknown key", "recipe", RecipeError, "unknown recipe key 'colour'", _recipe("unknown_key"),
         cli=["fuse", "--recipe", "{unknown_key}", "--out", "{tmp}/out"]),
    Case("recipe: unknown nested key", "recipe", RecipeError, "unknown recipe key 'distill.epoch'",
         _recipe("unknown_nested"), cli=["fuse", "--recipe", "{unknown_nested}", "--out", "{tmp}/out"]),
    Case("recipe: a list, not a mapping", "recipe", RecipeError, "must be a mapping", _recipe("not_mapping"),
         cli=["fuse", "--recipe", "{not_mapping}", "--out", "{tmp}/out"]),
    Case("recipe: section that is not a mapping", "recipe", RecipeError, "'distill' must be a mapping",
         _recipe("scalar_section"), cli=["fuse", "--recipe", "{scalar_section}", "--out", "{tmp}/out"]),
    Case("recipe: targets of the wrong shape", "recipe", RecipeError, "fusion.targets", _recipe("bad_targets"),
         cli=["fuse", "--recipe", "{bad_targets}", "--out", "{tmp}/out"]),
    Case("recipe: betas that are not numbers", "recipe", RecipeError, "distill.betas", _recipe("bad_betas"),
         cli=["fuse", "--recipe", "{bad_betas}", "--out", "{tmp}/out"]),
    Case("recipe: missing file", "recipe", RecipeError, "does not exist", _recipe("missing_recipe"),
         cli=["fuse", "--recipe", "{missing_recipe}", "--out", "{tmp}/out"]),
    Case("recipe: made for another model", "recipe", RecipeError, "was made for model 'bundled'",
         lambda env: _other_model_recipe(env),
         cli=["fuse", "--recipe", "{other_model}", "--model", "{tiny}", "--out", "{tmp}/out"]),
    Case("recipe: blocks of a deeper model", "recipe", PlanError, "block 20 does not exist",
         lambda env: Recipe.from_file(env["deep_blocks"]).validate(num_blocks=6),
         cli=["fuse", "--recipe", "{deep_blocks}", "--out", "{tmp}/out"]),
    # ---- export (GGUF for llama.cpp / ollama) ------------------------------------------------------------------
    Case("export: GGUF into a missing folder", "export", GGUFExportError, "does not exist: create it first",
         _gguf_target("gguf_nowhere"), cli=["export", "--model", "{tiny}", "--gguf", "{gguf_nowhere}"]),
    Case("export: GGUF file exists, no --overwrite", "export", GGUFExportError,
         "already exists: choose another name or pass --overwrite", _gguf_target("gguf_existing"),
         cli=["export", "--model", "{tiny}", "--gguf", "{gguf_existing}"], extra={"unchanged": "gguf_existing"}),
    Case("export: unknown GGUF type", "export", GGUFExportError,
         "quantisation 'q5_k' is not supported; choose from f16, bf16, q8_0, q4_0",
         _gguf_target("gguf_free", "q8_0,q5_k"),
         cli=["export", "--model", "{tiny}", "--gguf", "{tmp}/m.gguf", "--quant", "q8_0,q5_k"],
         app=_app_gguf("q8_0,q5_k")),
    Case("export: architecture GGUF cannot hold (gpt2)", "export", GGUFExportError,
         "does not support the architecture 'gpt2'", _gguf_model,
         cli=["export", "--model", "{gpt2_config}", "--gguf", "{tmp}/m.gguf"],
         note="the command line refuses it from config.json, before reading a weight; the app before its job "
              "(tests/app/test_app_gguf.py)"),
    Case("export: --quant without --gguf", "export", FuseGPTError, "--quant needs --gguf", _quant_without_gguf,
         cli=[*FUSE_TINY, "--quant", "q8_0"]),
]  # fmt: skip

APP_CASES = [c for c in CASES if c.app is not None]


def _cli_importance_seq_len(env):
    from fusegpt_core.config import check_seq_len

    check_seq_len(2048, env["loaded"].model.config, "--seq-len")


def _other_model_recipe(env):
    """The command line's rule, through its library function: a recipe keeps the model it was made for."""
    from fusegpt_core.cli import build_recipe, parser

    args = parser().parse_args(["fuse", "--recipe", env["other_model"], "--model", env["tiny"], "--out", "x"])
    build_recipe(args)


# ---------------------------------------------------------------------------------------------------------------
# the files the cases use


class _OpensAFile:
    """Unpickling this would create a file: weights_only loading must refuse it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _empty_safetensors(path: Path) -> None:
    header = b"{}"
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def _config_folder(folder: Path, config: dict) -> str:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    _empty_safetensors(folder / "model.safetensors")
    return str(folder)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad-input")
    tokenizer = tiny_tokenizer()
    files: dict[str, Any] = {"tokenizer": tokenizer, "base": base}

    tiny = base / "tiny"
    tiny_model("llama", num_layers=6).save_pretrained(tiny)
    tokenizer.save_pretrained(tiny)
    files["tiny"] = str(tiny)
    files["config_file"] = str(tiny / "config.json")
    (base / "good.txt").write_text(GOOD_TEXT, encoding="utf-8")
    files["good"] = str(base / "good.txt")

    files["missing_dir"] = str(base / "no" / "such" / "model")
    files["missing_hub"] = "fusegpt-nobody/no-such-model-0"
    no_weights = base / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny / "config.json").read_text())
    files["no_weights"] = str(no_weights)
    no_config = base / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes())
    files["no_config"] = str(no_config)
    for name, cut in (("truncated_st", 0.5), ("garbage_st", None)):
        folder = base / name
        folder.mkdir()
        for f in tiny.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        data = (tiny / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: int(len(data) * cut)] if cut else b"\xff" * 64)
        files[name] = str(folder)
    (base / "garbage.gguf").write_bytes(os.urandom(2048))
    files["garbage_gguf"] = str(base / "garbage.gguf")
    # a real GGUF header (magic, version 3) that promises 10 tensors and 5 metadata entries, then ends
    (base / "truncated.gguf").write_bytes(struct.pack("<4sIQQ", b"GGUF", 3, 10, 5))
    files["truncated_gguf"] = str(base / "truncated.gguf")
    files["bert"] = _config_folder(
        base / "bert",
        {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 259},
    )  # fmt: skip
    files["neox"] = _config_folder(
        base / "neox",
        {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, "vocab_size": 259},
    )  # fmt: skip
    files["remote_code"] = _config_folder(
        base / "remote-code",
        {"model_type": "my_secret_arch", "auto_map": {"AutoModelForCausalLM": "modeling.MyModel"}},
    )
    huge = json.loads((tiny / "config.json").read_text())
    huge.update(hidden_size=65536, intermediate_size=262144, num_hidden_layers=4, num_attention_heads=64,
                num_key_value_heads=64, vocab_size=32000)  # fmt: skip  # ~1.1e12 bytes in float32
    files["huge"] = _config_folder(base / "huge", huge)
    evil = base / "evil-pickle"
    evil.mkdir()
    (evil / "config.json").write_text((tiny / "config.json").read_text())
    files["pwned"] = str(base / "pwned.txt")
    torch.save({"model.embed_tokens.weight": _OpensAFile(files["pwned"])}, evil / "pytorch_model.bin")
    files["evil_pickle"] = str(evil)

    (base / "empty.txt").write_bytes(b"")
    (base / "blank.txt").write_text("  \n\n\t \n   \n", encoding="utf-8")
    (base / "short.txt").write_text(sample_text(150) + "\n\n" + sample_text(150, seed=1), encoding="utf-8")
    (base / "binary.txt").write_bytes(b"PK\x03\x04\x00\x00" + os.urandom(3000))
    (base / "latin1.txt").write_bytes(("Café crème, naïve façade. " * 400).encode("latin-1"))
    with (base / "huge.txt").open("wb") as handle:
        handle.truncate(OVER_CAP)
    for name in ("empty", "blank", "short", "binary", "latin1", "huge"):
        files[f"{name}_txt"] = str(base / f"{name}.txt")
    files["missing_txt"] = str(base / "missing.txt")

    recipes = {
        "bad_json": ("r1.json", '{"model": "bundled", "remove": 3,'),
        "bad_yaml": ("r2.yaml", "model: bundled\nremove: [3\n"),
        "unknown_key": ("r3.json", json.dumps({"model": "bundled", "colour": "blue"})),
        "unknown_nested": ("r4.yaml", "model: bundled\ndistill:\n  epoch: 3\n"),
        "not_mapping": ("r5.json", json.dumps([1, 2, 3])),
        "scalar_section": ("r6.json", json.dumps({"distill": 5})),
        "bad_targets": ("r7.json", json.dumps({"blocks": [2], "fusion": {"targets": [1, 3]}})),
        "bad_betas": ("r8.json", json.dumps({"distill": {"betas": "fast"}})),
        "other_model": ("r9.json", json.dumps({**preset("tiny").to_dict(), "model": "bundled"})),
        "deep_blocks": ("r10.json", json.dumps({**preset("tiny").to_dict(), "model": str(tiny), "blocks": [20, 25]})),
    }
    for key, (name, content) in recipes.items():
        (base / name).write_text(content, encoding="utf-8")
        files[key] = str(base / name)
    files["missing_recipe"] = str(base / "missing.json")

    files["gguf_nowhere"] = str(base / "no-such-folder" / "m.gguf")
    (base / "existing.gguf").write_bytes(OLD_GGUF)
    files["gguf_existing"] = str(base / "existing.gguf")
    files["gguf_free"] = str(base / "free.gguf")
    files["gpt2_config"] = _config_folder(
        base / "gpt2",
        {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 259, "n_positions": 512},
    )

    files["loaded"] = tiny_loaded_model("llama", 6)
    ids = tokenizer(sample_text(20000))["input_ids"]
    windows = torch.tensor(ids[: 12 * 64]).view(12, 64)
    files["windows"] = (windows[:8], windows[8:])
    return files


@pytest.fixture(scope="module", autouse=True)
def isolated(tmp_path_factory):
    """A private model cache, and no Hub: a missing hub id fails at once, the same on every machine."""
    import huggingface_hub.constants

    mp = pytest.MonkeyPatch()
    mp.setenv("FUSEGPT_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    yield
    mp.undo()


def _tree(folder: str | Path) -> list[str]:
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ---------------------------------------------------------------------------------------------------------------
# the library


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_library(case: Case, env):
    cache_before = _tree(os.environ["FUSEGPT_CACHE"])
    with pytest.raises(case.error) as info:
        case.lib(env)
    message = str(info.value)
    assert case.match.lower() in message.lower(), message
    assert "\n" not in message.strip() and len(message) < 600, message  # one line, not a dump
    assert _tree(os.environ["FUSEGPT_CACHE"]) == cache_before  # no half-written cache
    if "never_created" in case.extra:
        assert not Path(env[case.extra["never_created"]]).exists()
    if "unchanged" in case.extra:
        assert Path(env[case.extra["unchanged"]]).read_bytes() == OLD_GGUF


# ---------------------------------------------------------------------------------------------------------------
# the command line: every case through `main()`, the function `python -m fusegpt_core` runs (stderr captured at the
# file-descriptor level, so library warnings would count as extra lines); one case per group, or every case with
# FUSEGPT_TEST_ALL_CLI=1 (about 10 s each on 2 cores), also in a real `python -m fusegpt_core` process.

CLI_CASES = [c for c in CASES if c.cli is not None]
_REPRESENTATIVE = {"model: truncated safetensors", "model: more memory than the machine has", "text: not UTF-8",
                   "plan: learning rate NaN", "recipe: malformed YAML", "recipe: made for another model"}  # fmt: skip
PROCESS_CASES = [c for c in CLI_CASES if os.environ.get("FUSEGPT_TEST_ALL_CLI") == "1" or c.name in _REPRESENTATIVE]


def _argv(case: Case, env: dict[str, Any], tmp: Path) -> list[str]:
    values = {k: v for k, v in env.items() if isinstance(v, str)} | {"tmp": str(tmp)}
    argv = []
    for part in case.cli:
        for key, value in values.items():
            part = part.replace("{" + key + "}", value)
        argv.append(part)
    return [*argv, "--quiet"]


def _check_cli(case: Case, code: int, stdout: str, stderr: str, tmp: Path, env: dict[str, Any]) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert (case.cli_match or case.match).lower() in lines[0].lower(), lines[0]
    assert stdout == ""
    assert _tree(tmp) == []  # no output folder, no partial files
    if "never_created" in case.extra:
        assert not Path(env[case.extra["never_created"]]).exists()
    if "unchanged" in case.extra:
        assert Path(env[case.extra["unchanged"]]).read_bytes() == OLD_GGUF


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.name for c in CLI_CASES])
def test_command_line(case: Case, env, tmp_path, capfd):
    from fusegpt_core.cli import main

    out = tmp_path / "out-root"
    out.mkdir()
    capfd.readouterr()
    code = main(_argv(case, env, out))
    stdout, stderr = capfd.readouterr()
    _check_cli(case, code, stdout, stderr, out, env)


@pytest.fixture(scope="module")
def processes(env, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    process_env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}

    def one(i_case):
        i, case = i_case
        tmp = root / f"case{i}"
        tmp.mkdir()
        proc = subprocess.run(
            ["nice", "-n", "19", sys.executable, "-m", "fusegpt_core", *_argv(case, env, tmp)],
            cwd=ROOT,
            env=process_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        return case.name, (proc, tmp)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, enumerate(PROCESS_CASES)))


@pytest.mark.parametrize("case", PROCESS_CASES, ids=[c.name for c in PROCESS_CASES])
def test_command_line_process(case: Case, processes, env):
    proc, tmp = processes[case.name]
    _check_cli(case, proc.returncode, proc.stdout, proc.stderr, tmp, env)


# ---------------------------------------------------------------------------------------------------------------
# the app: a session with a loaded model, importance scores and a run; each mistake must leave them as they were


@pytest.fixture(scope="module")
def driver(env, tmp_path_factory):
    pytest.importorskip("gradio")
    from app.state import RunRecord
    from app.testing import loaded_session, tiny_context
    from app.ui import build_ui

    ctx = tiny_context(tmp_path_factory.mktemp("app-sessions"))
    d = AppDriver(build_ui(ctx), ctx)
    d.env = {k: v for k, v in env.items() if isinstance(v, str)}
    session = loaded_session(ctx, d.session.key)
    shown = d.importance("paste text", pasted=GOOD_TEXT, seq_len=32)
    assert "finished" in shown, shown
    session.add_run(
        RunRecord(id=1, label="#1 drop", method="drop", report={"removed_blocks": [4]}, model=None, tokenizer=None),
        keep_models=3,
    )
    yield d
    ctx.close()


def _session_snapshot(session) -> dict[str, Any]:
    """Everything a visitor has, compared by value (and the model by identity and weights)."""
    return {
        "loaded": id(session.loaded),
        "weights": state_hash(session.loaded.model),
        "blocks": len(session.loaded.model.model.layers),
        "model_info": dict(session.model_info),
        "importance": json.dumps(session.importance["scores"], sort_keys=True),
        "importance_origin": session.importance["origin"],
        "trajectory": repr(session.trajectory),
        "runs": [(r.id, r.label, json.dumps(r.report, sort_keys=True, default=str)) for r in session.runs],
        "generations": repr(session.generations),
        "exports": repr(session.exports),
        "preview": repr(session.preview),
    }


@pytest.mark.parametrize("case", APP_CASES, ids=[c.name for c in APP_CASES])
def test_app(case: Case, driver, recwarn):
    session = driver.session
    before = _session_snapshot(session)
    plan_before = copy.deepcopy(session.plan)
    jobs_before = list(session.jobs)
    shown = case.app(driver)
    print(f"{case.name}: {shown}")
    try:
        assert (case.app_match or case.match).lower() in shown.lower(), shown
        assert shown.startswith(("✖", "❌", "⚠")) or "failed" in shown, shown  # shown as a failure
        assert "Traceback" not in shown and "internal error" not in shown
        assert _session_snapshot(session) == before
        new = [driver.ctx.runner.snapshot(j) for j in session.jobs if j not in jobs_before]
        assert all(s.status == "failed" for s in new), [(s.kind, s.status) for s in new]
        if "never_created" in case.extra:
            assert not Path(driver.env[case.extra["never_created"]]).exists()
    finally:
        with session.lock:
            session.plan = plan_before


def test_app_merges_a_duplicated_block(driver):
    """The one plan mistake the app cannot make: ticking a block twice keeps it once."""
    from app.plan import Plan

    driver.fns["set_plan"]("pick blocks", [2, 2], 1, driver.request)
    try:
        assert driver.session.plan.blocks == [2]
    finally:
        driver.session.plan = Plan()


def test_number_of_cases():
    by_group: dict[str, int] = {}
    for c in CASES:
        by_group[c.group] = by_group.get(c.group, 0) + 1
    paths = {"library": len(CASES), "command line": len(CLI_CASES), "app": len(APP_CASES)}
    print(f"\n{len(CASES)} bad-input cases: {by_group}; exercised through {paths}")
    assert len({c.name for c in CASES}) == len(CASES)
    assert len(CASES) >= 55 and len(CLI_CASES) >= 50 and len(APP_CASES) >= 40
    assert set(by_group) == {"model", "text", "plan", "recipe", "export"}
