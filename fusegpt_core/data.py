"""Text sources -> plain text -> token windows, for calibration and evaluation.

Sources: the bundled English Wikipedia excerpt shipped with gensim's test data ("bundled"), Python's own help
topics ("pydoc"), a user's file or pasted text, and three Hugging Face datasets (WikiText-2, C4, PTB). When the
same source serves calibration and evaluation, the two texts come from disjoint parts of it.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import importlib.util
import json
import os
import random
import re
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from fusegpt_core import loading
from fusegpt_core.errors import DataError, FuseGPTError

BUNDLED = "bundled"  # the gensim English Wikipedia excerpt (pydoc topics when gensim is missing)
PYDOC = "pydoc"  # Python's help topics, always available
GENSIM_WIKI = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# where a folder without gensim (a Space: scripts/build_space.py) keeps a copy of the same excerpt
SHIPPED_CORPUS = "assets/corpus/enwiki-excerpt.xml.bz2"
CORPUS_CACHE_NAME = "bundled-wiki-corpus.json"
CORPUS_FORMAT = 1  # bump when the markup stripping changes, so old caches are rebuilt
MIN_ARTICLE_WORDS = 50  # shorter articles (stubs, lists of links) are dropped
CALIB_FRACTION = 0.75  # share of a user text used for calibration when it also serves evaluation

# Sections that hold only references and links once the markup is stripped.
_DROPPED_SECTIONS = {
    "references",
    "notes",
    "external links",
    "see also",
    "further reading",
    "bibliography",
    "sources",
    "citations",
    "footnotes",
    "notes and references",
}
# Links into these namespaces are images, categories or interwiki, not prose.
_DROPPED_LINK_PREFIXES = ("file:", "image:", "category:", "media:")

# name -> how to fetch it; calibration always reads `calib_split`, evaluation `eval_split`, so they never overlap.
HF_DATASETS = {
    "wikitext2": {
        "path": "Salesforce/wikitext",
        "name": "wikitext-2-raw-v1",
        "calib_split": "train",
        "eval_split": "test",
        "column": "text",
    },
    "c4": {
        "path": "allenai/c4",
        # one shard each (the usual GPTQ-style choice), not the whole 300 GB
        "data_files": {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        "calib_split": "train",
        "eval_split": "validation",
        "column": "text",
        "max_docs": {"train": 5000, "validation": 1100},
    },
    "ptb": {
        "path": "ptb-text-only/ptb_text_only",
        "name": "penn_treebank",
        "calib_split": "train",
        "eval_split": "test",
        "column": "sentence",
    },
}
_HF_ALIASES = {
    "wikitext2": "wikitext2",
    "wikitext-2": "wikitext2",
    "wikitext": "wikitext2",
    "c4": "c4",
    "ptb": "ptb",
}
_SOURCE_FORMS = "'bundled', 'pydoc', 'file:PATH' (or a path), 'text:<your text>', 'hf:wikitext2', 'hf:c4' or 'hf:ptb'"


# ----------------------------------------------------------------------------------------------------------
# wiki markup -> plain text


def _remove_nested(text: str, opener: str, closer: str) -> str:
    """Remove every `opener ... closer` span, nested ones included ({{a {{b}} c}} goes as a whole)."""
    out: list[str] = []
    depth = 0
    i = 0
    while i < len(text):
        if text.startswith(opener, i):
            depth += 1
            i += len(opener)
        elif depth and text.startswith(closer, i):
            depth -= 1
            i += len(closer)
        else:
            if depth == 0:
                out.append(text[i])
            i += 1
    return "".join(out)


def _replace_link(match: re.Match) -> str:
    """[[target]] -> target; [[target|label]] -> label; file, category and interwiki links -> nothing."""
    inner = match.group(1)
    target = inner.split("|", 1)[0].strip().lstrip(":").lower()
    if target.startswith(_DROPPED_LINK_PREFIXES) or re.match(r"^[a-z]{2,3}(-[a-z]+)*:", target):
        return ""
    return inner.rsplit("|", 1)[-1]


def _heading_line(level: int, title: str) -> str:
    # WikiText style: "== History ==" -> " = = History = = "
    return " " + "= " * level + title + " =" * level + " "


def strip_wiki_markup(text: str) -> str:
    """MediaWiki markup -> WikiText-like plain text: prose, headings as " = = X = = " lines, no markup."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)  # comments
    text = re.sub(r"<ref[^>]*/>", "", text, flags=re.I)  # <ref name="x"/>
    text = re.sub(r"<ref[^>]*>.*?</ref\s*>", "", text, flags=re.I | re.S)  # <ref>...</ref>
    for tag in ("math", "gallery", "timeline", "syntaxhighlight", "source", "score", "imagemap", "chem"):
        text = re.sub(rf"<{tag}[^>]*>.*?</{tag}\s*>", "", text, flags=re.I | re.S)
    # The few templates that carry prose: {{lang|grc|word}}, {{lang-grc|word}} -> word; {{convert|5|km}} -> 5 km
    text = re.sub(r"\{\{lang\|[^|{}]*\|([^|{}]*)[^{}]*\}\}", r"\1", text, flags=re.I)
    text = re.sub(r"\{\{lang-[^|{}]*\|([^|{}]*)[^{}]*\}\}", r"\1", text, flags=re.I)
    text = re.sub(r"\{\{convert\|([^|{}]*)\|([^|{}]*)[^{}]*\}\}", r"\1 \2", text, flags=re.I)
    text = _remove_nested(text, "{{", "}}")  # templates, infoboxes, citations
    text = _remove_nested(text, "{|", "|}")  # tables
    # Links: resolve the innermost first so [[File:x|a [[b]] c]] goes as a whole.
    previous = None
    while previous != text:
        previous = text
        text = re.sub(r"\[\[([^\[\]]*)\]\]", _replace_link, text)
    text = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)  # [http://x label] -> label
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.I)
    text = re.sub(r"</?[A-Za-z][^>]*>", "", text)  # remaining tags (<small>, <sup>, ...) keep their content
    text = re.sub(r"'{2,}", "", text)  # ''italic'', '''bold'''
    text = re.sub(r"__[A-Z]+__", "", text)  # __NOTOC__
    text = html.unescape(text).replace("\xa0", " ")

    lines: list[str] = []
    skip_below = 0  # > 0 while inside a dropped section of that heading level
    for raw in text.split("\n"):
        line = raw.strip()
        heading = re.match(r"^(={1,6})\s*(.*?)\s*\1$", line)
        if heading:
            level, title = len(heading.group(1)), heading.group(2).strip()
            if skip_below and level > skip_below:
                continue
            skip_below = level if title.lower() in _DROPPED_SECTIONS else 0
            if not skip_below and title:
                lines.append(_heading_line(level, title))
            continue
        if skip_below:
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list and indent markers
        if not line or line.startswith(("|", "!")):  # leftovers of broken tables
            continue
        # punctuation orphaned by removed templates: "( ; x)" -> "(x)", "()" -> "", "word ," -> "word,"
        line = re.sub(r"\(\s*[,;:]\s*", "(", line)
        line = re.sub(r"\(\s*\)", "", line)
        line = re.sub(r"\s+([,.;:!?)])", r"\1", line)
        line = re.sub(r"[ \t]{2,}", " ", line).strip()
        if line:
            lines.append(line)
    # A heading with no prose under it (everything was markup) is noise.
    kept = [line for i, line in enumerate(lines) if not _is_heading(line) or _has_prose_after(lines, i)]
    return "\n".join(kept).strip()


def _is_heading(line: str) -> bool:
    return line.startswith(" = ")


def _has_prose_after(lines: list[str], i: int) -> bool:
    level = lines[i].count("=") // 2
    for line in lines[i + 1 :]:
        if not _is_heading(line):
            return True
        if line.count("=") // 2 <= level:
            return False
    return False


# ----------------------------------------------------------------------------------------------------------
# the bundled corpus


def gensim_wiki_path() -> Path | None:
    """The Wikipedia excerpt in gensim's test data, located without importing gensim (slow, heavy deps),
    or the copy a Space folder ships next to the code."""
    shipped = Path(__file__).resolve().parents[1] / SHIPPED_CORPUS
    if shipped.is_file():
        return shipped
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        return None
    for folder in spec.submodule_search_locations or []:
        candidate = Path(folder) / GENSIM_WIKI
        if candidate.is_file():
            return candidate
    return None


def _parse_wiki_dump(path: Path) -> list[tuple[str, str]]:
    """(title, plain text) of every real article in a bz2 MediaWiki XML dump: main namespace, no redirects."""
    articles: list[tuple[str, str]] = []
    with bz2.open(path, "rb") as handle:
        for _event, element in ET.iterparse(handle, events=("end",)):
            if element.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in element}
            title = (fields["title"].text or "").strip() if "title" in fields else ""
            namespace = (fields["ns"].text or "0").strip() if "ns" in fields else "0"
            text = ""
            revision = fields.get("revision")
            if revision is not None:
                for child in revision:
                    if child.tag.rsplit("}", 1)[-1] == "text":
                        text = child.text or ""
            element.clear()  # keep memory flat while streaming
            if namespace != "0" or "redirect" in fields or text.lstrip().lower().startswith("#redirect"):
                continue
            if "(disambiguation)" in title:
                continue
            plain = strip_wiki_markup(text)
            if len(plain.split()) >= MIN_ARTICLE_WORDS:
                articles.append((title, plain))
    return articles


def pydoc_articles() -> list[tuple[str, str]]:
    """Python's own help topics (pydoc_data ships with CPython) as (topic, text) articles."""
    from pydoc_data.topics import topics

    articles = []
    for title in sorted(topics):
        text = "\n".join(line.rstrip() for line in topics[title].strip().splitlines())
        if len(text.split()) >= 20:
            articles.append((title, text))
    return articles


def _atomic_write_json(path: Path, payload: dict) -> None:
    """Write JSON to a temporary sibling, then os.replace it over `path`: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            json.dump(payload, handle, ensure_ascii=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


_articles_memo: dict[str, list[tuple[str, str]]] = {}  # per process: parsing takes seconds, reading JSON less


def bundled_articles() -> list[tuple[str, str]]:
    """(title, plain text) of the bundled Wikipedia excerpt; Python's help topics when gensim is not installed.

    Parsed once, then cached as JSON under loading.user_cache_dir() (rebuilt when the dump or the parser change).
    """
    dump = gensim_wiki_path()
    if dump is None:
        return list(pydoc_articles())
    stat = dump.stat()
    stamp = {"format": CORPUS_FORMAT, "source": str(dump), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo_key = json.dumps(stamp, sort_keys=True)
    if memo_key in _articles_memo:
        return list(_articles_memo[memo_key])

    try:
        cache = loading.user_cache_dir() / CORPUS_CACHE_NAME
    except FuseGPTError:
        cache = None  # no writable cache folder: parse every time
    articles = None
    if cache is not None and cache.is_file():
        try:
            payload = json.loads(cache.read_text(encoding="utf-8"))
            if all(payload.get(k) == v for k, v in stamp.items()):
                articles = [(str(title), str(text)) for title, text in payload["articles"]]
        except (OSError, ValueError, KeyError, TypeError):
            articles = None  # unreadable cache: parse again and overwrite it
    if articles is None:
        articles = _parse_wiki_dump(dump)
        if cache is not None:
            try:
                _atomic_write_json(cache, {**stamp, "articles": articles})
            except OSError:
                pass  # a read-only cache only costs the parse next time
    _articles_memo[memo_key] = articles
    return list(articles)


def split_articles(
    articles: list[tuple[str, str]], eval_fraction: float = 0.25, seed: int = 0
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split whole articles into (calibration, evaluation), disjoint and deterministic for a seed.

    Which articles go to evaluation is a seeded shuffle; both lists keep the original article order.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}.")
    if len(articles) < 2:
        raise DataError(f"Splitting needs at least 2 articles, got {len(articles)}; give more text.")
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(articles) - 1, max(1, round(len(articles) * eval_fraction)))
    eval_ids = set(order[:n_eval])
    calib = [a for i, a in enumerate(articles) if i not in eval_ids]
    evaluation = [a for i, a in enumerate(articles) if i in eval_ids]
    return calib, evaluation


def join_articles(articles: list[tuple[str, str]]) -> str:
    """WikiText layout: " = Title = " then the body; articles separated by blank lines."""
    return "\n\n".join(f"{_heading_line(1, title)}\n{text}" for title, text in articles)


# ----------------------------------------------------------------------------------------------------------
# user text


def _check_text(text: str, what: str, max_bytes: int) -> str:
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise DataError(f"{what} is {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.1f} MB limit; use a shorter text.")
    if "\x00" in text:
        raise DataError(f"{what} contains NUL bytes, so it looks binary; give plain UTF-8 text.")
    if not text.strip():
        raise DataError(f"{what} is empty; give some text.")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text_file(path: str | Path, max_bytes: int = 20_000_000) -> str:
    """A user's UTF-8 text file, checked: exists, at most `max_bytes`, not binary, not empty."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"No such file: '{path}'; check the path.")
    if not path.is_file():
        raise DataError(f"'{path}' is not a file; give a plain text file.")
    size = path.stat().st_size
    if size > max_bytes:
        raise DataError(
            f"The file '{path}' is {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.1f} MB limit; use a shorter excerpt."
        )
    data = path.read_bytes()
    if b"\x00" in data:
        raise DataError(f"The file '{path}' contains NUL bytes, so it is binary, not text; give a UTF-8 text file.")
    try:
        text = data.decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        raise DataError(
            f"The file '{path}' is not valid UTF-8 (bad byte at offset {e.start}); save it as UTF-8 plain text."
        ) from e
    return _check_text(text, f"The file '{path}'", max_bytes)


def split_text(text: str, calib_fraction: float = CALIB_FRACTION) -> tuple[str, str]:
    """Split one text into (calibration, evaluation) without overlap.

    By paragraphs (blank-line separated): cut at the paragraph boundary closest to `calib_fraction` of the
    characters, keeping at least one paragraph on each side. A single paragraph is cut by characters, at the
    first whitespace after that point so no word is split.
    """
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) >= 2:
        total = sum(len(p) for p in paragraphs)
        running, cuts = 0, []
        for i, paragraph in enumerate(paragraphs[:-1]):
            running += len(paragraph)
            cuts.append((abs(running - calib_fraction * total), i + 1))
        k = min(cuts)[1]
        return "\n\n".join(paragraphs[:k]), "\n\n".join(paragraphs[k:])
    single = text.strip()
    cut = int(len(single) * calib_fraction)
    space = re.search(r"\s", single[cut:])
    if space is not None and cut + space.start() < len(single) - 1:
        cut += space.start()
    calib, evaluation = single[:cut].strip(), single[cut:].strip()
    if not calib or not evaluation:
        raise DataError("The text is too short to split into a calibration part and an evaluation part.")
    return calib, evaluation


# ----------------------------------------------------------------------------------------------------------
# Hugging Face datasets


def load_hf_text(name: str, role: str) -> str:
    """The calibration ("calib": train split) or evaluation ("eval": test/validation split) text of a Hub dataset.

    Never hangs on an unreachable Hub: when a quick probe fails, only the local datasets cache is tried.
    """
    key = _HF_ALIASES.get(name.strip().lower())
    if key is None:
        raise DataError(f"Unknown Hugging Face dataset '{name}'; use one of: {', '.join(sorted(HF_DATASETS))}.")
    spec = HF_DATASETS[key]
    split = spec["calib_split"] if role == "calib" else spec["eval_split"]
    offline = not loading.hub_reachable()
    if offline:
        loading.set_hub_offline()  # before importing datasets, which reads the variables at import
    unreachable = DataError(
        f"Could not reach the Hugging Face Hub to download '{key}' and it is not cached locally; "
        "use the bundled corpus or your own text file."
    )
    try:
        import datasets
    except ImportError as e:
        raise DataError("Hub datasets need the `datasets` package; install it with `pip install datasets`.") from e

    kwargs = {"split": split}
    if "name" in spec:
        kwargs["name"] = spec["name"]
    if "data_files" in spec:
        kwargs["data_files"] = {split: spec["data_files"][split]}
    try:
        try:
            dataset = datasets.load_dataset(spec["path"], **kwargs)
        except RuntimeError as e:
            if "scripts are no longer supported" not in str(e):
                raise
            # script-based repos (ptb) keep an automatic parquet copy on this branch
            dataset = datasets.load_dataset(spec["path"], revision="refs/convert/parquet", **kwargs)
    except Exception as e:  # network, cache and format errors all end the same way for the user
        if offline:
            raise unreachable from e
        raise DataError(
            f"Could not load the dataset '{key}' from the Hugging Face Hub ({str(e).strip()[:200]}); "
            "use the bundled corpus or your own text file."
        ) from e
    max_docs = spec.get("max_docs", {}).get(split)
    if max_docs is not None:
        dataset = dataset.select(range(min(max_docs, len(dataset))))
    # "\n\n"-joined like the paper's WikiText-2 evaluation
    return "\n\n".join(dataset[spec["column"]])


# ----------------------------------------------------------------------------------------------------------
# sources


def parse_source(source: str) -> tuple[str, str]:
    """What a source string names: ("articles", "bundled"|"pydoc") | ("file", path) | ("text", text) | ("hf", name)."""
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"No text source was given; use {_SOURCE_FORMS}.")
    if source.startswith("text:"):
        return "text", source[len("text:") :]
    stripped = source.strip()
    lowered = stripped.lower()
    if lowered in (BUNDLED, PYDOC):
        return "articles", lowered
    if lowered.startswith("hf:"):
        name = lowered[3:].strip()
        if name not in _HF_ALIASES:
            raise DataError(f"Unknown Hugging Face dataset '{name}'; use hf:wikitext2, hf:c4 or hf:ptb.")
        return "hf", _HF_ALIASES[name]
    if lowered.startswith("file:"):
        path = Path(stripped[len("file:") :].strip()).expanduser()
        return "file", str(path.resolve()) if path.exists() else str(path)
    path = Path(stripped).expanduser()
    if path.is_file():
        return "file", str(path.resolve())
    if "/" in stripped or "\\" in stripped or re.search(r"\.[A-Za-z0-9]{1,5}$", stripped):
        raise DataError(f"No such file: '{stripped}'; check the path.")
    raise DataError(f"Unknown text source '{stripped}'; use {_SOURCE_FORMS}.")


def _articles_of(name: str) -> list[tuple[str, str]]:
    articles = bundled_articles() if name == BUNDLED else pydoc_articles()
    if not articles:
        raise DataError(f"The '{name}' corpus is empty; use another source.")
    return articles


def _whole_text(kind: str, value: str, role: str, max_bytes: int) -> str:
    if kind == "articles":
        return join_articles(_articles_of(value))
    if kind == "file":
        return read_text_file(value, max_bytes)
    if kind == "text":
        return _check_text(value, "The pasted text", max_bytes)
    return load_hf_text(value, role)


def load_texts(
    calib_source: str, eval_source: str, seed: int = 0, max_upload_bytes: int = 20_000_000
) -> tuple[str, str]:
    """(calibration text, evaluation text) from two sources.

    Sources: "bundled", "pydoc", "file:PATH" or an existing file path, "text:<pasted text>", "hf:wikitext2",
    "hf:c4", "hf:ptb". When both name the same source, the texts come from disjoint parts: whole articles
    split by `split_articles(seed=seed)` for the corpora, train vs test/validation splits for Hub datasets,
    and `split_text` (first ~75% / rest) for a file or pasted text. Different sources are each used whole
    (Hub datasets still use their train split for calibration and their test split for evaluation).
    """
    calib_kind, calib_value = parse_source(calib_source)
    eval_kind, eval_value = parse_source(eval_source)
    if (calib_kind, calib_value) == (eval_kind, eval_value):
        if calib_kind == "articles":
            calib_articles, eval_articles = split_articles(_articles_of(calib_value), seed=seed)
            return join_articles(calib_articles), join_articles(eval_articles)
        if calib_kind == "hf":
            return load_hf_text(calib_value, "calib"), load_hf_text(eval_value, "eval")
        return split_text(_whole_text(calib_kind, calib_value, "calib", max_upload_bytes))
    return (
        _whole_text(calib_kind, calib_value, "calib", max_upload_bytes),
        _whole_text(eval_kind, eval_value, "eval", max_upload_bytes),
    )


# ----------------------------------------------------------------------------------------------------------
# tokens


_TOKEN_CACHE: dict[tuple[int, str], tuple[object, list[int]]] = {}
_TOKEN_CACHE_SIZE = 4  # a few texts (calibration, evaluation, another genre) per process


def _token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a whole text, remembered for the last few (tokenizer, text) pairs: the bundled
    corpus takes seconds to tokenize and every run, preview and score needs it again."""
    key = (id(tokenizer), hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest())
    if key not in _TOKEN_CACHE:
        if len(_TOKEN_CACHE) >= _TOKEN_CACHE_SIZE:
            _TOKEN_CACHE.pop(next(iter(_TOKEN_CACHE)))
        # the tokenizer is kept in the entry so its id cannot be reused by another one meanwhile
        _TOKEN_CACHE[key] = (tokenizer, tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return _TOKEN_CACHE[key][1]


def added_special_ids(tokenizer) -> tuple[list[int], list[int]]:
    """(leading, trailing): the ids a tokenizer puts before and after every text by default, seen by
    encoding a word with and without them. Gemma and Llama-2 lead with a BOS; SmolLM2 and GPT-2 add
    none. Gemma in particular is far off without it (bundled Gemma-3: perplexity 269 without, 37 with)."""
    try:
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a")["input_ids"]
    except Exception:  # a tokenizer without special-token handling
        return [], []
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    return [], []


def token_windows(tokenizer, text: str, seq_len: int, n_windows: int | None, seed: int = 0) -> torch.LongTensor:
    """Cut `text` into non-overlapping windows of `seq_len` tokens -> LongTensor (n, seq_len).

    The whole text is tokenized once as a plain token stream and cut from the start; where the tokenizer
    starts every text with special ids (a BOS), each window starts with them too and holds that many fewer
    text tokens, as the model saw in training. The tail shorter than a window is dropped. n_windows=None returns every window in order. Otherwise
    n_windows of them are chosen by a seeded torch.Generator and returned in text order; when the text has
    fewer windows than asked (but at least one), all of them are returned rather than raising.
    Raises DataError when the text does not fill even one window.
    """
    if seq_len < 1:
        raise DataError(f"The sequence length must be at least 1 token, got {seq_len}.")
    if n_windows is not None and n_windows < 1:
        raise DataError(f"The number of windows must be at least 1, got {n_windows}.")
    ids = _token_ids(tokenizer, text)  # list[int], whole text
    prefix = added_special_ids(tokenizer)[0][: seq_len - 1]  # e.g. [bos]
    per_window = seq_len - len(prefix)  # text tokens in each window
    n_available = len(ids) // per_window
    if n_available < 1:
        raise DataError(
            f"The text has {len(ids)} tokens, shorter than one window of {seq_len}; "
            "give more text or a shorter sequence length."
        )
    windows = torch.tensor(ids[: n_available * per_window], dtype=torch.long).view(n_available, per_window)
    if prefix:
        windows = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(n_available, -1), windows], dim=1)
    if n_windows is None or n_windows >= n_available:
        return windows
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n_available, generator=generator)[:n_windows].sort().values  # (n_windows,)
    return windows[chosen]
