"""Short plain-language explanations shown next to each step. Markdown strings only."""

INTRO = """
# FuseGPT Studio
A language model is a stack of **blocks** (transformer layers). Some blocks matter much less than
others. **Pruning** removes them to make the model smaller and faster; **FuseGPT** does not simply
throw them away: it *fuses* each removed block's weights into its neighbours, then briefly
re-trains that neighbourhood so the smaller model behaves like the original.
Go through the tabs from left to right, or press **One-click demo** to watch the whole process on
fast settings.
"""

MODEL = """
**Step 1: the model.** The bundled model is *SmolLM2-135M-Instruct* (30 blocks, runs on a laptop
CPU, no download). You can also give a folder with a Hugging Face model, a `.gguf` file, or a Hub
id such as `HuggingFaceTB/SmolLM2-360M-Instruct` (needs internet). Supported families: Llama,
Mistral, Qwen2, Gemma-2, Gemma-3, GPT-2, OPT, Phi.
"""

IMPORTANCE = """
**Step 2: which blocks matter?** Each metric asks a different question:

- **Macro Influence (MI)**, FuseGPT's metric: skip one block, run the rest of the model, and measure
  how much the *final* hidden state changes (1 − cosine similarity). A block with **low MI** barely
  changes what the model ends up computing, so it is the safest to remove.
- **Block Influence (BI)** (ShortGPT): how much a block changes its *own* input. Cheap, but local:
  a block can change little by itself and still matter later.
- **Angular distance**: the angle between a block's input and output, a close cousin of BI.
- **Perplexity increase**: how much worse next-word prediction gets without the block.

Colours show each block's **rank within each metric** (dark = least important by that metric); hover for raw values.
The bundled model's scores are precomputed so they appear at once.
"""

AGREEMENT = """
**Do the metrics agree?** Spearman rank correlation: 1 means two metrics order the blocks the same
way, 0 means unrelated orders. Local metrics (BI, angular) often disagree with global ones (MI, PPL)
about middle blocks: that is why the choice of metric matters.
"""

TRAJECTORY = """
**Importance moves.** In the paper's *iterative* mode, after each fusion the remaining blocks are
scored again. Each row is one step (✕ = the block removed at that step; blank = already gone).
Neighbours of a removed block often become *more* important, because they now carry its work.
Until you run a plan, this shows a precomputed FuseGPT run on the bundled model (its recipe is in the title).
"""

PLAN = """
**Step 3: the plan.** Tick the blocks to remove (or click a cell of the importance chart), or let
MI choose for a target number of blocks. Each removed block is fused into a **group** of
neighbours (by default the 7 blocks around it, as in the paper); you can pick the targets yourself.
The **drop preview** shows what removing those blocks *without any repair* does to perplexity:
this is the damage fusion has to undo. The estimate says how long a run of this plan takes with
each preset; **quick** is the one to start with.
"""

RUN = """
**Step 4: fuse.** For each removed block, its weights are injected into every target block
through small learnable coefficients (which start at zero, so the model first equals "block
dropped"), then the group is fine-tuned to reproduce the original group's output (local
distillation). Loss curves show each group learning. **Stop** ends the run between two steps; the
loaded model is never modified. Baselines run the same plan for comparison: *drop* (no repair),
*drop + LoRA* (repair with a plain adapter, same training), *average* (merge weights by averaging).
After each round, *what each neighbour absorbed* shows how much of the removed block every linear
of every target took in. A `recipe.json` from an earlier run (Advanced settings) restores its plan
and settings.
"""

COMPARE = """
**Step 5: compare.** Perplexity measures how surprised the model is by held-out text (lower is
better). *Dropped* is the same blocks removed with no repair: the gap between *dropped* and
*fusegpt* is what fusion recovered. Generations use the same prompt and settings for every model
(greedy by default, so differences come from the models).
"""

EXPORT = """
**Step 6: take it home.** The fused model is a standard Hugging Face folder (safetensors, config,
tokenizer, model card): `AutoModelForCausalLM.from_pretrained(folder)` loads it with no special
code. The recipe reproduces the run from the command line. A Hub token is used for one push
only and is never stored or logged.
"""
