"""Tests for fusegpt_core.data: markup stripping, the bundled corpus, text sources and token windows."""

from __future__ import annotations

import bz2
import time

import pytest
import torch

from fusegpt_core import data
from fusegpt_core.errors import DataError


class CharTokenizer:
    """One token per character (ids = code points): enough to test windowing, no download."""

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": [ord(c) for c in text]}


def make_word_tokenizer():
    """A real transformers fast tokenizer (word level, built in memory)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = "the cat sat on mat a dog ran in park".split()
    vocab = {token: i for i, token in enumerate(["[UNK]", "[EOS]", *words])}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory):
    """A private cache dir for this module: the corpus is parsed once (a few seconds) and cached there."""
    folder = tmp_path_factory.mktemp("fusegpt-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FUSEGPT_CACHE", str(folder))
        patch.setattr(data, "_articles_memo", {})
        yield folder


# ----------------------------------------------------------------------------------------------------------
# markup stripping


def test_strip_nested_templates():
    text = "Before {{Infobox|name={{nowrap|X {{small|y}}}}|z=1}} after {{cite web|url=http://a}}."
    assert data.strip_wiki_markup(text) == "Before after."


def test_strip_links():
    text = (
        "A [[political philosophy]] of [[self-governance|self-governed]] [[dog]]s."
        "[[File:Flag.svg|thumb|The [[flag]] of it]][[Category:Things]][[de:Anarchismus]]"
    )
    assert data.strip_wiki_markup(text) == "A political philosophy of self-governed dogs."


def test_strip_external_links_and_formatting():
    text = "'''Bold''' and ''italic'' see [http://example.com the site] or [http://bare.example]."
    assert data.strip_wiki_markup(text) == "Bold and italic see the site or."


def test_strip_tables_refs_comments():
    text = (
        'Intro<ref>A citation {{cite|x}}</ref> text<ref name="n"/> here.<!-- hidden -->\n'
        '{| class="wikitable"\n|-\n! Head\n|-\n| cell || {| nested\n| inner\n|}\n|}\n'
        "After &amp; <small>small</small> done."
    )
    assert data.strip_wiki_markup(text) == "Intro text here.\nAfter & small done."


def test_strip_headings_lists_and_dropped_sections():
    text = (
        "Lead paragraph here.\n== History ==\n* first item\n# second item\n=== Early ===\nOld days.\n"
        "== References ==\n* a reference\n=== More refs ===\nstill refs\n== Legacy ==\nLasting."
    )
    expected = (
        "Lead paragraph here.\n = = History = = \nfirst item\nsecond item\n = = = Early = = = \nOld days.\n"
        " = = Legacy = = \nLasting."
    )
    assert data.strip_wiki_markup(text) == expected


def test_strip_prose_templates_and_orphaned_punctuation():
    text = "Angola {{IPA|x}}, in ({{lang-pt|República de Angola}}; {{IPAc|y}}) is {{convert|100|km|mi}} wide ( )."
    assert data.strip_wiki_markup(text) == "Angola, in (República de Angola;) is 100 km wide."


def _write_dump(path, pages):
    ns = "http://www.mediawiki.org/xml/export-0.10/"
    body = "".join(
        f"<page><title>{title}</title><ns>{namespace}</ns>{extra}"
        f'<revision><text xml:space="preserve">{text}</text></revision></page>'
        for title, namespace, extra, text in pages
    )
    path.write_bytes(bz2.compress(f'<mediawiki xmlns="{ns}">{body}</mediawiki>'.encode()))


def test_parse_dump_skips_redirects_and_stubs(tmp_path):
    long_text = "'''Alpha''' is a word. " * 30
    dump = tmp_path / "dump.xml.bz2"
    _write_dump(
        dump,
        [
            ("Alpha", "0", "", long_text),
            ("Beta", "0", '<redirect title="Alpha" />', "#REDIRECT [[Alpha]]"),
            ("Gamma", "0", "", "#redirect [[Alpha]]"),
            ("Stub", "0", "", "Too short."),
            ("Talk:Alpha", "1", "", long_text),
            ("Alpha (disambiguation)", "0", "", long_text),
        ],
    )
    articles = data._parse_wiki_dump(dump)
    assert [title for title, _ in articles] == ["Alpha"]
    assert articles[0][1].startswith("Alpha is a word.")


# ----------------------------------------------------------------------------------------------------------
# the bundled corpus


def test_gensim_wiki_path():
    path = data.gensim_wiki_path()
    if path is None:
        pytest.skip("gensim is not installed")
    assert path.name.startswith("enwiki-latest") and path.is_file()


def test_bundled_articles(corpus_cache, monkeypatch):
    articles = data.bundled_articles()
    assert len(articles) >= 20
    assert all(title and len(text.split()) >= 20 for title, text in articles)
    joined = "\n".join(text for _, text in articles)
    for markup in ("{{", "}}", "<ref", "'''", "[[Category:"):
        assert markup not in joined
    if data.gensim_wiki_path() is not None:
        assert (corpus_cache / data.CORPUS_CACHE_NAME).is_file()
        # a new process (empty memo) reads the JSON cache instead of parsing again
        monkeypatch.setattr(data, "_articles_memo", {})
        monkeypatch.setattr(data, "_parse_wiki_dump", lambda path: pytest.fail("parsed again, cache ignored"))
        assert data.bundled_articles() == articles


def test_bundled_falls_back_to_pydoc(monkeypatch):
    monkeypatch.setattr(data, "gensim_wiki_path", lambda: None)
    articles = data.bundled_articles()
    assert articles == data.pydoc_articles()
    assert len(articles) > 20


def test_split_articles_disjoint_and_deterministic():
    articles = [(f"T{i}", f"text {i}") for i in range(40)]
    calib, evaluation = data.split_articles(articles, eval_fraction=0.25, seed=0)
    assert len(evaluation) == 10 and len(calib) == 30
    assert not {t for t, _ in calib} & {t for t, _ in evaluation}
    assert sorted(calib + evaluation) == sorted(articles)
    assert data.split_articles(articles, seed=0) == (calib, evaluation)
    assert data.split_articles(articles, seed=1)[1] != evaluation
    assert calib == sorted(calib, key=lambda a: int(a[0][1:]))  # original order kept
    with pytest.raises(DataError):
        data.split_articles(articles[:1])
    with pytest.raises(DataError):
        data.split_articles(articles, eval_fraction=1.0)


def test_load_texts_bundled_same_source_disjoint(corpus_cache):
    calib, evaluation = data.load_texts("bundled", "bundled", seed=0)
    titles = lambda text: {line for line in text.split("\n") if line.startswith(" = ") and line.count("=") == 2}  # noqa: E731
    assert titles(calib) and titles(evaluation)
    assert not titles(calib) & titles(evaluation)
    assert data.load_texts("bundled", "bundled", seed=0) == (calib, evaluation)
    assert data.load_texts("bundled", "bundled", seed=3) != (calib, evaluation)


def test_load_texts_different_sources_whole(corpus_cache):
    calib, evaluation = data.load_texts("pydoc", "text:Some pasted evaluation text.")
    assert calib == data.join_articles(data.pydoc_articles())
    assert evaluation == "Some pasted evaluation text."


# ----------------------------------------------------------------------------------------------------------
# user text


def test_load_texts_text_same_source_split():
    paragraphs = [f"Paragraph number {i} with some words." for i in range(8)]
    source = "text:" + "\n\n".join(paragraphs)
    calib, evaluation = data.load_texts(source, source)
    assert calib.split("\n\n") == paragraphs[:6]
    assert evaluation.split("\n\n") == paragraphs[6:]


def test_split_single_paragraph_by_characters():
    text = " ".join(f"word{i}" for i in range(100))
    calib, evaluation = data.split_text(text)
    assert calib + " " + evaluation == text
    assert 0.7 < len(calib) / len(text) < 0.8


def test_load_texts_file_same_source(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First part.\r\n\r\nSecond part.\n\nThird part.\n\nFourth part.", encoding="utf-8")
    calib, evaluation = data.load_texts(f"file:{path}", str(path))  # both spellings name the same file
    assert calib == "First part.\n\nSecond part.\n\nThird part."
    assert evaluation == "Fourth part."
    assert not set(calib.split("\n\n")) & set(evaluation.split("\n\n"))


def test_user_text_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\t \n")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    binary = tmp_path / "image.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    big = tmp_path / "big.txt"
    big.write_text("x" * 2000)
    cases = [
        ("text:", "empty"),
        ("text:   \n ", "empty"),
        (f"file:{empty}", "empty.txt"),
        (f"file:{latin}", "latin1.txt' is not valid UTF-8"),
        (f"file:{binary}", "image.png' contains NUL bytes"),
        (f"file:{tmp_path / 'missing.txt'}", "No such file"),
        (str(tmp_path / "missing.txt"), "No such file"),
        (f"file:{tmp_path}", "is not a file"),
        ("", "No text source"),
        ("wikipedia", "Unknown text source"),
        ("hf:imagenet", "Unknown Hugging Face dataset"),
    ]
    for source, message in cases:
        with pytest.raises(DataError, match=message):
            data.load_texts(source, "pydoc")
    with pytest.raises(DataError, match=r"big.txt' is 0.0 MB, over the 0.0 MB limit"):
        data.load_texts(f"file:{big}", "pydoc", max_upload_bytes=1000)
    with pytest.raises(DataError, match="over the"):
        data.load_texts("text:" + "y" * 2000, "pydoc", max_upload_bytes=1000)


def test_hf_dataset_unreachable_is_fast(offline_hub):
    start = time.perf_counter()
    with pytest.raises(DataError, match="Could not reach the Hugging Face Hub to download 'wikitext2'"):
        data.load_texts("hf:wikitext2", "hf:wikitext2")
    assert time.perf_counter() - start < 20


# ----------------------------------------------------------------------------------------------------------
# token windows


def test_token_windows_all_in_order():
    text = "".join(chr(65 + i % 26) for i in range(1000))
    windows = data.token_windows(CharTokenizer(), text, seq_len=64, n_windows=None)
    assert windows.shape == (15, 64) and windows.dtype == torch.long
    assert windows.flatten().tolist() == [ord(c) for c in text[: 15 * 64]]


def test_token_windows_seeded_choice():
    text = "".join(chr(0x4E00 + i) for i in range(100 * 10))  # distinct tokens: every window is unique
    all_windows = data.token_windows(CharTokenizer(), text, 10, None)
    first = data.token_windows(CharTokenizer(), text, 10, 5, seed=0)
    assert first.shape == (5, 10)
    assert torch.equal(first, data.token_windows(CharTokenizer(), text, 10, 5, seed=0))
    assert not torch.equal(first, data.token_windows(CharTokenizer(), text, 10, 5, seed=1))
    starts = [int(row[0]) for row in first]
    assert starts == sorted(starts)  # in text order
    assert all(any(torch.equal(row, w) for w in all_windows) for row in first)  # whole, aligned windows


def test_token_windows_fewer_than_asked_returns_all():
    windows = data.token_windows(CharTokenizer(), "x" * 35, seq_len=10, n_windows=8)
    assert windows.shape == (3, 10)


def test_token_windows_too_short():
    with pytest.raises(DataError, match="The text has 5 tokens, shorter than one window of 10"):
        data.token_windows(CharTokenizer(), "short", seq_len=10, n_windows=2)


def test_token_windows_real_tokenizer():
    tokenizer = make_word_tokenizer()
    text = "the cat sat on the mat " * 20  # 120 words
    windows = data.token_windows(tokenizer, text, seq_len=16, n_windows=None)
    assert windows.shape == (7, 16)
    assert windows[0, :6].tolist() == tokenizer("the cat sat on the mat", add_special_tokens=False)["input_ids"]


class BosCharTokenizer(CharTokenizer):
    """CharTokenizer that, like Gemma's and Llama-2's tokenizers, starts every text with a BOS (id 1)."""

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = super().__call__(text)["input_ids"]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


class BosEosCharTokenizer(CharTokenizer):
    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = super().__call__(text)["input_ids"]
        return {"input_ids": [1, *ids, 2] if add_special_tokens else ids}


def test_the_special_ids_a_tokenizer_adds_are_seen_on_both_sides():
    assert data.added_special_ids(BosEosCharTokenizer()) == ([1], [2])
    windows = data.token_windows(BosEosCharTokenizer(), "abcdefghij" * 5, seq_len=10, n_windows=None)
    assert windows[:, 0].tolist() == [1] * 5 and 2 not in windows.tolist()  # a window starts as a text does


def test_token_windows_start_with_the_tokenizers_bos():
    text = "abcdefghij" * 5  # 50 characters
    windows = data.token_windows(BosCharTokenizer(), text, seq_len=10, n_windows=None)
    assert windows.shape == (5, 10)  # 9 text tokens a window: 50 // 9 = 5 windows
    assert windows[:, 0].tolist() == [1] * 5
    assert "".join(chr(i) for i in windows[:, 1:].reshape(-1).tolist()) == text[:45]  # contiguous, no gaps
    assert data.added_special_ids(BosCharTokenizer()) == ([1], [])
    assert data.added_special_ids(CharTokenizer()) == ([], [])  # no BOS: windows as before
    assert data.token_windows(CharTokenizer(), text, seq_len=10, n_windows=None).shape == (5, 10)
