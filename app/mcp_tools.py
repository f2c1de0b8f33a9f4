"""The app as a tool for agents: three API endpoints that gradio also serves as MCP tools when its mcp
extra is installed (`launch(mcp_server=True)`, see ui.launch_kwargs): block importance, a removal plan
with its memory estimate, and a fusion run. Each call is self-contained (it names its model), runs
through the app's job queue like a visitor's job, and returns JSON.

Gradio builds each tool's description and argument schema from the docstring and type hints below.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import gradio as gr

from fusegpt_core.errors import FuseGPTError
from fusegpt_core.importance import DEFAULT_SCORING as SCORING

from . import work
from .state import TEST_SOURCE, AppContext

TOOL_TIMEOUT_S = 3600.0  # a fusion run on a CPU takes minutes; the call waits that long at most
OWNER = "mcp"


def mcp_available() -> bool:
    """Whether gradio's MCP extra (the `mcp` package) is installed."""
    return importlib.util.find_spec("mcp") is not None


class Tools:
    def __init__(self, app: AppContext):
        self.app = app

    # ---- helpers ----------------------------------------------------------------------------

    def _run(self, title: str, fn) -> Any:
        """Run `fn(jc)` as a job in the app's queue and return its result; a user mistake -> gr.Error."""
        job = self.app.runner.submit(fn, owner=OWNER, kind="mcp", title=title)
        snap = self.app.runner.wait(job, timeout=TOOL_TIMEOUT_S)
        if snap.status != "done":
            raise gr.Error(f"{title}: {snap.error or snap.status}")
        return self.app.runner.result(job)

    def _loaded(self, jc, model: str):
        source = (model or "bundled").strip()
        if source == TEST_SOURCE and not self.app.test_model:
            raise FuseGPTError("the test model is offered only in test mode; use 'bundled' or a Hub id.")
        loaded, _ = self.app.models.get(work.model_key(source, None, None, False),
                                        work.load_fn(self.app, source, None, None, False))  # fmt: skip
        jc.check()
        return loaded

    # ---- the tools ----------------------------------------------------------------------------

    def block_importance(self, model: str = "bundled", metric: str = "mi", windows: int = SCORING["n_score"],
                         tokens_per_window: int = SCORING["seq_len"]) -> dict:  # fmt: skip
        """Score every transformer block of a language model by how much it matters.

        Args:
            model: 'bundled' (SmolLM2-135M-Instruct), 'bundled-gemma3' (Gemma-3-270m), a local folder or .gguf file, or a Hugging Face Hub id.
            metric: 'mi' (Macro Influence: 1 - cosine similarity of the final hidden state with and without the block; FuseGPT's metric), 'bi' (Block Influence), 'angular' or 'ppl' (perplexity increase).
            windows: how many windows of calibration text (the bundled Wikipedia excerpt) to score on.
            tokens_per_window: tokens in each window.

        Returns:
            {'model', 'blocks', 'metric', 'scores' (one per block, higher = more important), 'least_important_first' (block indices)}.
        """

        def fn(jc):
            from fusegpt_core.importance import score_blocks

            loaded = self._loaded(jc, model)
            x = work.read_windows(self.app, loaded.tokenizer, SCORING["calib_source"], int(tokens_per_window),
                                  int(windows), SCORING["seed"])  # fmt: skip
            scores = score_blocks(loaded.model, x.to(loaded.device), metrics=(metric,), should_stop=jc.should_stop)
            values = [float(v) for v in scores[metric]]
            return {"model": model, "blocks": len(values), "metric": metric, "scores": values,
                    "least_important_first": sorted(range(len(values)), key=lambda i: values[i])}  # fmt: skip

        return self._run(f"MCP: importance of {model}", fn)

    def plan_removal(self, model: str = "bundled", remove: int = 6, preset: str = "quick",
                     group_size: int = 0) -> dict:  # fmt: skip
        """Plan a FuseGPT compression: which blocks Macro Influence would remove, the fusion group of each, and the memory the run needs.

        Args:
            model: 'bundled', 'bundled-gemma3', a local folder or .gguf file, or a Hugging Face Hub id.
            remove: how many blocks to remove.
            preset: the run's settings: 'tiny' (seconds), 'quick' (minutes on a CPU), 'cpu-demo' or 'paper' (the paper's, for a GPU).
            group_size: blocks in each fusion group (0: the preset's).

        Returns:
            {'model', 'blocks' (total), 'remove' (first guess: the lowest one-shot MI; an iterative run re-scores after each removal), 'groups' (removed block -> blocks it is fused into), 'memory' (predicted peak bytes per stage on this server's device)}.
        """

        def fn(jc):
            from fusegpt_core.adapters import num_blocks
            from fusegpt_core.config import preset as make_preset
            from fusegpt_core.fusion import plan_group
            from fusegpt_core.importance import score_blocks
            from fusegpt_core.memory import plan_memory

            loaded = self._loaded(jc, model)
            n = num_blocks(loaded.model)
            recipe = make_preset(preset, model=model, remove=int(remove))
            if group_size:
                recipe.fusion.group_size = int(group_size)
            recipe.fusion.group_size = min(recipe.fusion.group_size, n)
            recipe.validate(num_blocks=n)
            x = work.read_windows(
                self.app, loaded.tokenizer, *(SCORING[k] for k in ("calib_source", "seq_len", "n_score", "seed"))
            )
            mi = score_blocks(loaded.model, x.to(loaded.device), metrics=("mi",), should_stop=jc.should_stop)["mi"]
            chosen = sorted(range(n), key=lambda i: mi[i])[: int(remove)]
            memory = plan_memory(loaded.model, recipe, loaded.device, loaded.dtype)
            return {"model": model, "blocks": n, "remove": chosen, "mi": [float(v) for v in mi],
                    "groups": {str(b): plan_group(b, n, recipe.fusion.group_size) for b in chosen},
                    "memory": memory.to_dict()}  # fmt: skip

        return self._run(f"MCP: plan for {model}", fn)

    def fuse_blocks(self, model: str = "bundled", remove: int = 2, blocks: str = "", method: str = "fusegpt",
                    preset: str = "tiny") -> dict:  # fmt: skip
        """Compress a language model by removing transformer blocks (FuseGPT fuses each into its neighbours and fine-tunes them), and measure the result.

        Args:
            model: 'bundled', 'bundled-gemma3', a local folder or .gguf file, or a Hugging Face Hub id.
            remove: how many blocks to remove (iterative Macro Influence chooses them), when `blocks` is empty.
            blocks: comma-separated block indices to remove instead, e.g. '12,17'.
            method: 'fusegpt', 'drop' (plain removal), 'drop+lora' or 'average'.
            preset: 'tiny' (seconds, repairs little), 'quick' (minutes on a CPU), 'cpu-demo' or 'paper'.

        Returns:
            {'model', 'method', 'removed_blocks', 'blocks_before', 'blocks_after', 'params_before', 'params_after', 'perplexity': {'original', 'dropped', 'result'}, 'seconds', 'status'}.
        """

        def fn(jc):
            from fusegpt_core.adapters import num_blocks
            from fusegpt_core.config import preset as make_preset
            from fusegpt_core.errors import PlanError
            from fusegpt_core.pipeline import run

            loaded = self._loaded(jc, model)
            n = num_blocks(loaded.model)
            try:
                chosen = [int(b) for b in blocks.split(",") if b.strip()] if blocks else None
            except ValueError:
                raise PlanError(f"blocks must be comma-separated numbers, got {blocks!r}.") from None
            recipe = make_preset(preset, model=model, method=method, **({"blocks": chosen} if chosen else
                                                                         {"remove": int(remove)}))  # fmt: skip
            recipe.fusion.group_size = min(recipe.fusion.group_size, n)
            recipe.validate(num_blocks=n)
            report = run(recipe, loaded=loaded, should_stop=jc.should_stop).report
            return {"model": model, "method": report["method"], "removed_blocks": report["removed_blocks"],
                    "blocks_before": report["num_layers_before"], "blocks_after": report["num_layers_after"],
                    "params_before": report["params_before"], "params_after": report["params_after"],
                    "perplexity": {"original": report["dense_ppl"], "dropped": report["dropped_ppl"],
                                   "result": report["result_ppl"]},
                    "seconds": report.get("seconds"), "status": report["status"]}  # fmt: skip

        return self._run(f"MCP: {method} on {model}", fn)


def register(app: AppContext) -> Tools:
    """Add the tools as API endpoints of the Blocks being built (call inside `with gr.Blocks()`)."""
    tools = Tools(app)
    for fn in (tools.block_importance, tools.plan_removal, tools.fuse_blocks):
        gr.api(fn, api_name=fn.__name__)
    return tools
