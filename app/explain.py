"""Short plain-language explanations shown next to each step. Markdown strings only."""

INTRO = """
# FuseGPT Studio
A language model is a stack of **blocks** (transformer layers). Some blocks matter much less than
others. **Pruning** removes them to make the model smaller and faster; **FuseGPT** does not simply
throw them away: it *fuses* each removed block's weights into its neighbours, then briefly
re-trains that neighbourhood so the smaller model behaves like the original.
Go through the tabs from left to right, press **One-click demo** to watch the whole process on
fast settings, or take the **7 · Lesson** tab: a five-minute guided tour for a first visit or a class.
"""

MODEL = """
**Step 1: the model.** The bundled model is *SmolLM2-135M-Instruct* (30 blocks, runs on a laptop
CPU, no download); a second bundled model, *Gemma-3-270m* (18 blocks, another family, under the
Gemma Terms of Use), shows the same ideas on a different architecture. You can also give a folder with a Hugging Face model, a `.gguf` file, or a Hub
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
*fusegpt* is what fusion recovered. **Zero-shot accuracy** (lm-evaluation-harness) puts questions to
every model: the two bundled tasks, from held-out Wikipedia text and needing no network, ask for the
sentence that truly comes next among four, and for a passage's missing last word. Ten items per task
take about a minute and give a first look; the ± (standard error) says how far so few items can mislead. Generations use the same prompt
and settings for every model (greedy by default, so differences come from the models).
"""

EXPORT = """
**Step 6: take it home.** The fused model is a standard Hugging Face folder (safetensors, config,
tokenizer, model card): `AutoModelForCausalLM.from_pretrained(folder)` loads it with no special
code. The recipe reproduces the run from the command line. **GGUF** writes one file per tensor type
that llama.cpp and ollama run as they are (Llama-family and Qwen2 models); each file is read back and
measured on the run's own evaluation text, and its perplexity and size join the Compare table. A Hub
token is used for one push only and is never stored or logged.
"""

LESSON_BLOCKS = """
## A guided lesson: which blocks can a model do without?
About five minutes on a laptop CPU, on the model loaded in tab 1 (the bundled SmolLM2 by default).

### 1 · What is a block?
A language model reads text as **tokens** and turns each one into a list of numbers (a vector). It then
passes these vectors through a **stack of blocks**, all built alike: each block lets every token look at
the tokens before it (*attention*), then transforms each token on its own (*MLP*), and **adds** its result
to what came in. The last vector of each token becomes the prediction of the next token. Because every
block only *adds* a correction, a model can often survive without one of them: the question is which.
"""

LESSON_MI = """
### 2 · What does Macro Influence measure?
Run some text through the model once normally, and once **skipping one block**. Compare the final
vectors of the two runs: if they point in almost the same direction (cosine similarity close to 1),
the block made little difference to what the model computes in the end. **Macro Influence (MI) = 1 −
that cosine similarity**, measured for each block in turn. Low MI = a block the model can most easily
do without. FuseGPT removes the block with the lowest MI first.
"""

LESSON_DROP = """
### 4 · Drop it
Remove the block MI ranks last and measure **perplexity** on text the model has not been tuned on
(how surprised it is by each next token: lower is better), then let both models answer the same prompt.
"""

LESSON_FUSE = """
### 5 · Fuse it instead
**FuseGPT** does not throw the block away: it adds the removed block's weights into its neighbours
through small learnable coefficients, then fine-tunes only that neighbourhood for a short while so its
output matches the original's. Same number of blocks as after dropping: how much comes back?
"""
