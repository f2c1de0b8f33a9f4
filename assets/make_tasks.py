"""Build the bundled offline zero-shot tasks: lm-eval task files (YAML + JSONL) in assets/tasks/.

    python assets/make_tasks.py                 # rewrites assets/tasks/bundled_*/
    python assets/make_tasks.py --out /tmp/t    # somewhere else (the tests compare the two)

Both tasks come from the evaluation articles of the bundled Wikipedia excerpt, split exactly as the rest of
the code splits it for evaluation (data.split_articles with the default seed 0); no calibration article is
read. Every choice is seeded, so the same corpus always gives the same files.

- bundled_nextsent (multiple choice, in the spirit of HellaSwag): one or two sentences of a paragraph, then
  the sentence that truly follows them against three sentences from three other evaluation articles whose
  lengths are close to its own, so that neither raw nor length-normalised log-likelihood can win on length.
- bundled_cloze (in the spirit of LAMBADA): a passage of up to three sentences of a paragraph without its
  last word (a content word of four letters or more); the model must produce that word. Scored as lambada is: `acc` is 1 when the word is the model's
  greedy continuation, token for token. An open-vocabulary cloze has no choices to normalise over, so it has
  no `acc_norm`.

Each JSONL row also names the article(s) its text comes from ("title", "choice_titles"), which the tests use
to check that nothing comes from a calibration article; lm-eval ignores those fields.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fusegpt_core.data import bundled_articles, split_articles  # noqa: E402

SPLIT_SEED = 0  # the evaluation split every run uses by default (DataConfig.seed)
TASK_SEED = 20250113  # draws the items, their distractors and the order of the choices
N_ITEMS = 1000  # per task: the standard error of an accuracy near 0.5 is then about 0.016
# Items are written in random order, so that the first N (lm-eval's --limit) are a fair sample of the task.
# Lengths are kept short because every choice is scored with its whole context: on 2 CPU cores one pass over
# both tasks costs minutes per model, and the benchmark evaluates four models.
CONTEXT_MAX_WORDS = 45  # the next-sentence context: the previous sentence, and the one before if both fit
CLOZE_MAX_SENTENCES = 3  # sentences of a cloze passage, the last one included
CLOZE_WORDS = (25, 70)  # words of a cloze passage, its last word included
SENTENCE_WORDS = (8, 30)  # the lengths of a usable sentence, in words
LENGTH_TOLERANCE = 0.15  # a distractor's length in characters is within 15% of the true sentence's
N_CHOICES = 4

# A full stop after these does not end a sentence ("Dr. Smith", "J. S. Bach", "c. 1500", "U.S. Army").
_ABBREVIATION = re.compile(
    r"(?:\b[A-Z]|\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|No|vs|ca|c|Gen|Col|Lt|Sgt|Rev|Prof|Gov|Sen|Rep|Capt|Maj|Mt|Ft|"
    r"U\.S|e\.g|i\.e|etc|approx|Inc|Co|Ltd|Jan|Feb|Mar|Apr|Aug|Sep|Sept|Oct|Nov|Dec|al|cf|Vol|pp|p|b|d|fl))\.$"
)
# Cloze targets: content words, not function words a model can guess without reading the passage.
_FUNCTION_WORDS = set(
    "that this with from they their there these those which while when where have been were will would could "
    "should about into than then them also only such other more most some what after before being over under "
    "between each very much many both same well does did".split()
)

YAML_HEADER = (
    "# Built by assets/make_tasks.py from the evaluation split of the bundled Wikipedia excerpt; do not edit.\n"
    "# data_files is relative to the repository root: `lm_eval --include_path assets/tasks` works from there,\n"
    "# and fusegpt_core.zeroshot points it at this folder wherever it runs.\n"
)
NEXTSENT_YAML = """task: bundled_nextsent
dataset_path: json
dataset_kwargs:
  data_files:
    test: assets/tasks/bundled_nextsent/bundled_nextsent.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
CLOZE_YAML = """task: bundled_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: assets/tasks/bundled_cloze/bundled_cloze.jsonl
test_split: test
output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{' ' + target}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def evaluation_articles() -> list[tuple[str, str]]:
    """(title, text) of the evaluation articles, exactly as runs split the bundled corpus by default."""
    _calibration, evaluation = split_articles(bundled_articles(), seed=SPLIT_SEED)
    return evaluation


def paragraphs_of(text: str) -> list[str]:
    """The prose lines of an article's text (headings, " = = X = = ", left out)."""
    return [line.strip() for line in text.split("\n") if line.strip() and not line.startswith(" = ")]


def sentences_of(paragraph: str) -> list[str]:
    """A paragraph cut after . ! ? followed by a capital, except after a known abbreviation or an initial."""
    pieces = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", paragraph)
    sentences: list[str] = []
    for piece in pieces:
        if sentences and _ABBREVIATION.search(sentences[-1]):
            sentences[-1] += " " + piece
        else:
            sentences.append(piece)
    return sentences


def _usable(sentence: str) -> bool:
    words = len(sentence.split())
    return SENTENCE_WORDS[0] <= words <= SENTENCE_WORDS[1] and "=" not in sentence


def nextsent_items(articles: list[tuple[str, str]], n_items: int, rng: random.Random) -> list[dict]:
    """Multiple-choice items: one or two sentences -> the true next sentence or 3 distractors."""
    # candidates: (article index, context, true next sentence); distractors: (article index, sentence)
    candidates: list[tuple[int, str, str]] = []
    distractors: list[tuple[int, str]] = []
    for a, (_title, text) in enumerate(articles):
        for paragraph in paragraphs_of(text):
            sentences = sentences_of(paragraph)
            for k, sentence in enumerate(sentences):
                if not _usable(sentence) or k == 0:
                    continue
                distractors.append((a, sentence))  # a sentence from inside a paragraph, like the true ones
                context = sentences[k - 1]
                if k >= 2 and len(f"{sentences[k - 2]} {context}".split()) <= CONTEXT_MAX_WORDS:
                    context = f"{sentences[k - 2]} {context}"
                if len(context.split()) <= CONTEXT_MAX_WORDS:
                    candidates.append((a, context, sentence))
    chosen = rng.sample(range(len(candidates)), min(n_items, len(candidates)))  # in random order: see N_ITEMS
    by_length = sorted(distractors, key=lambda d: len(d[1]))
    items = []
    for i in chosen:
        a, context, true_next = candidates[i]
        low, high = len(true_next) * (1 - LENGTH_TOLERANCE), len(true_next) * (1 + LENGTH_TOLERANCE)
        pool = [d for d in by_length if low <= len(d[1]) <= high and d[0] != a]
        rng.shuffle(pool)
        picked: list[tuple[int, str]] = []
        for d in pool:  # three different articles, none the passage's own
            if all(d[0] != p[0] for p in picked):
                picked.append(d)
            if len(picked) == N_CHOICES - 1:
                break
        if len(picked) < N_CHOICES - 1:
            continue  # too few sentences of that length elsewhere (a very long or very short one)
        options = [(a, true_next), *picked]
        rng.shuffle(options)
        label = next(j for j, o in enumerate(options) if o[1] == true_next and o[0] == a)
        items.append(
            {
                "context": context,
                "choices": [o[1] for o in options],
                "label": label,
                "title": articles[a][0],
                "choice_titles": [articles[o[0]][0] for o in options],
            }
        )
    return items


def cloze_items(articles: list[tuple[str, str]], n_items: int, rng: random.Random) -> list[dict]:
    """LAMBADA-like items: a passage of whole sentences without its last word -> that word."""
    candidates: list[dict] = []
    for title, text in articles:
        for paragraph in paragraphs_of(text):
            sentences = sentences_of(paragraph)
            for j in range(1, len(sentences)):
                ending = re.search(r"\s([A-Za-z]+)[.!?]$", sentences[j])  # a plain word, then the full stop
                if ending is None:
                    continue
                target = ending.group(1)
                if len(target) < 4 or target.lower() in _FUNCTION_WORDS:
                    continue
                passage = " ".join(sentences[max(0, j - CLOZE_MAX_SENTENCES + 1) : j + 1])
                if not CLOZE_WORDS[0] <= len(passage.split()) <= CLOZE_WORDS[1]:
                    continue
                context = passage[: len(passage) - len(ending.group(0))]  # up to the space before the word
                candidates.append({"context": context, "target": target, "title": title})
    chosen = rng.sample(range(len(candidates)), min(n_items, len(candidates)))  # in random order: see N_ITEMS
    return [candidates[i] for i in chosen]


def write_task(folder: Path, name: str, yaml_text: str, items: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(YAML_HEADER + yaml_text, encoding="utf-8")
    with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")


def build(out_dir: Path, n_items: int = N_ITEMS) -> dict[str, int]:
    """Write both tasks under out_dir; {task name: items}."""
    articles = evaluation_articles()
    nextsent = nextsent_items(articles, n_items, random.Random(TASK_SEED))
    cloze = cloze_items(articles, n_items, random.Random(TASK_SEED + 1))
    write_task(out_dir / "bundled_nextsent", "bundled_nextsent", NEXTSENT_YAML, nextsent)
    write_task(out_dir / "bundled_cloze", "bundled_cloze", CLOZE_YAML, cloze)
    return {"bundled_nextsent": len(nextsent), "bundled_cloze": len(cloze)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "tasks"), help="folder for the task folders")
    ap.add_argument("--items", type=int, default=N_ITEMS, help="items per task (fewer when the split has fewer)")
    args = ap.parse_args()
    counts = build(Path(args.out), args.items)
    for name, count in counts.items():
        print(f"{name}: {count} items -> {Path(args.out) / name}")


if __name__ == "__main__":
    main()
