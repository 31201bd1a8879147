"""Text corpora: WordNet through NLTK, ImageNet-21k names, user files, the embedding cache."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from oodprobe import cache
from oodprobe.corpus import (
    CORPORA,
    KIND_ADJECTIVE,
    KIND_NOUN,
    LEXNAMES_TEXT,
    Corpus,
    WordNetMissingError,
    clean_terms,
    corpus_cache_dir,
    corpus_embeddings,
    is_plain_term,
    load_corpus,
    make_corpus,
    read_corpus_file,
)
from oodprobe.errors import DataError, InvalidParameterError, UnknownNameError

WORDNET = Path("/usr/share/wordnet")
needs_wordnet = pytest.mark.skipif(
    not (WORDNET / "index.noun").is_file(),
    reason="WordNet is not installed (/usr/share/wordnet); `apt-get install wordnet-base`",
)


def index_lemmas(name: str) -> list[str]:
    """The lemmas of a WordNet index file: first token of each line not starting with a space."""
    lines = (WORDNET / name).read_text(encoding="utf-8").splitlines()
    return [line.split(" ", 1)[0] for line in lines if line and not line.startswith(" ")]


# -- cleaning ---------------------------------------------------------------------------------


def test_clean_terms_underscores_filter_dedupe_and_order() -> None:
    terms, kinds = clean_terms(
        [
            "great_white_shark",
            "China",
            "china",
            "omega-3_fatty_acid",
            "TCP/IP",
            "  tabby   cat ",
            "St._John's_wort",
            "mother-in-law",
            "Aardvark",
            "",
            "red",
        ],
        [KIND_NOUN] * 10 + [KIND_ADJECTIVE],
    )
    assert terms == (
        "Aardvark",
        "china",
        "great white shark",
        "mother-in-law",
        "red",
        "St. John's wort",
        "tabby cat",
    )
    assert kinds == (
        KIND_NOUN,
        KIND_NOUN,
        KIND_NOUN,
        KIND_NOUN,
        KIND_ADJECTIVE,
        KIND_NOUN,
        KIND_NOUN,
    )


def test_clean_terms_joins_kinds_of_one_term() -> None:
    terms, kinds = clean_terms(["red", "Red", "blue"], [KIND_NOUN, KIND_ADJECTIVE, KIND_NOUN])
    assert terms == ("blue", "red")
    assert kinds == (KIND_NOUN, f"{KIND_NOUN}+{KIND_ADJECTIVE}")


def test_plain_terms() -> None:
    assert is_plain_term("St. John's wort") and is_plain_term("a") and is_plain_term("x-ray")
    for term in ("1st class", "20/20", "'hood", "-ish", "café", "a+b", ""):
        assert not is_plain_term(term), term


def test_make_corpus_keeps_digits_and_records_version() -> None:
    corpus = make_corpus(["COVID-19", "dog", "Dog", "cat"])
    assert corpus.terms == ("cat", "COVID-19", "dog")
    assert corpus.kinds == ("term",) * 3 and len(corpus) == 3
    assert corpus.version == make_corpus(["cat", "dog", "COVID-19"], name="other").version
    assert corpus.version != make_corpus(["cat", "dog"]).version
    with pytest.raises(InvalidParameterError, match="no terms left after cleaning"):
        make_corpus(["  ", "_"])


def test_corpus_kind_mask() -> None:
    corpus = Corpus(
        name="c", terms=("a", "b", "c"), kinds=("noun", "adjective", "noun+adjective"), source="s"
    )
    assert corpus.of_kind("noun").tolist() == [True, False, True]
    assert corpus.of_kind("adjective").tolist() == [False, True, True]
    with pytest.raises(InvalidParameterError, match="3 terms but 2 kinds"):
        Corpus(name="c", terms=("a", "b", "c"), kinds=("noun", "noun"), source="s")


# -- user files -------------------------------------------------------------------------------


def test_corpus_file_skips_comments_and_blanks(tmp_path: Path) -> None:
    path = tmp_path / "words.txt"
    path.write_text("\ufeff# my concepts\n\nsea_otter\n  Sea otter \n#skip\nkelp forest\n")
    corpus = load_corpus(path)
    assert corpus.terms == ("kelp forest", "sea otter") and corpus.name == "words.txt"
    assert corpus.source.startswith(f"file {path}")
    assert read_corpus_file(str(path)) == corpus


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "has no terms"),
        (b"# only a comment\n\n   \n", "has no terms"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not UTF-8 text"),
        ("caf\u00e9\n".encode("latin-1"), "is not UTF-8 text"),
    ],
)
def test_corpus_file_refusals(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        load_corpus(path)
    assert "\n" not in str(info.value)


def test_corpus_source_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="is a folder"):
        load_corpus(tmp_path)
    with pytest.raises(UnknownNameError, match=r"unknown corpus .*'wordnett'.*imagenet21k"):
        load_corpus("wordnett")


# -- the built-in corpora ---------------------------------------------------------------------


def test_missing_wordnet_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OODPROBE_WORDNET", str(tmp_path / "no-wordnet"))
    with pytest.raises(WordNetMissingError, match=r"`apt-get install wordnet-base`") as info:
        load_corpus("wordnet-nouns", cache_root=tmp_path / "cache")
    assert "corpus file" in str(info.value)


def test_lexnames_is_the_standard_file() -> None:
    lines = LEXNAMES_TEXT.splitlines()
    assert len(lines) == 45
    assert lines[0] == "00\tadj.all\t3" and lines[3] == "03\tnoun.Tops\t1"
    assert lines[18] == "18\tnoun.person\t1" and lines[44] == "44\tadj.ppl\t3"


@needs_wordnet
def test_nltk_reads_the_debian_files_offline() -> None:
    from oodprobe.corpus import _wordnet_reader

    reader = _wordnet_reader(WORDNET)  # no lexnames in the folder, no nltk.download
    assert reader.get_version() == "3.0"
    nouns, adjectives = index_lemmas("index.noun"), index_lemmas("index.adj")
    assert (len(nouns), len(adjectives)) == (117_798, 21_479)  # WordNet 3.0
    assert sorted(reader.all_lemma_names("n")) == sorted(nouns)
    assert sorted(reader.all_lemma_names("a")) == sorted(adjectives)
    # the lexnames served from memory are in the right order: lexname ids decode correctly
    assert reader.synsets("dog", "n")[0].lexname() == "noun.animal"
    assert reader.synsets("red", "a")[0].lexname() == "adj.all"


@needs_wordnet
@pytest.mark.slow  # reads every synset through NLTK (~10 s) and cleans three corpora
def test_wordnet_corpora_match_the_index_files(tmp_path: Path) -> None:
    nouns, adjectives = index_lemmas("index.noun"), index_lemmas("index.adj")

    def expected(lemmas: list[str]) -> set[str]:
        return {
            lemma.replace("_", " ") for lemma in lemmas if is_plain_term(lemma.replace("_", " "))
        }

    corpora = {
        name: load_corpus(name, cache_root=tmp_path) for name in CORPORA if "wordnet" in name
    }
    noun_corpus, adj_corpus = corpora["wordnet-nouns"], corpora["wordnet-adjectives"]
    # NLTK read every lemma of the index files (in their data-file case), and only those
    assert {term.lower() for term in noun_corpus.terms} == expected(nouns)
    assert {term.lower() for term in adj_corpus.terms} == expected(adjectives)
    assert (len(noun_corpus), len(adj_corpus)) == (117_391, 21_246)
    both = corpora["wordnet"]
    assert len(both) == len({t.lower() for t in noun_corpus.terms + adj_corpus.terms}) == 135_541
    assert both.kinds[both.terms.index("red")] == "noun+adjective"
    assert both.kinds[both.terms.index("dog")] == KIND_NOUN
    assert both.kinds[both.terms.index("bashful")] == KIND_ADJECTIVE
    assert "Labrador retriever" in noun_corpus.terms and "china" in noun_corpus.terms
    assert "China" not in noun_corpus.terms  # case variants: fewest capitals
    assert list(both.terms) == sorted(both.terms, key=lambda term: (term.casefold(), term))
    assert both.source.startswith("WordNet 3.0 (/usr/share/wordnet) via NLTK")


def test_term_list_cache_is_read_and_rebuilt_when_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_corpus("imagenet21k", cache_root=tmp_path)
    [path] = (tmp_path / "corpora").glob("imagenet21k-*.json")
    record = json.loads(path.read_text())
    record["terms"][0] = "tampered"
    path.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="corpus term cache .* is damaged"):
        again = load_corpus("imagenet21k", cache_root=tmp_path)
    assert again == first

    # a good cache file is read, not rebuilt
    def fail() -> Any:
        raise AssertionError("read the source again")

    monkeypatch.setitem(
        CORPORA, "imagenet21k", dataclasses.replace(CORPORA["imagenet21k"], read=fail)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_corpus("imagenet21k", cache_root=tmp_path) == first


def test_imagenet21k_concept_names(tmp_path: Path) -> None:
    corpus = load_corpus("imagenet21k", cache_root=tmp_path)
    assert 19_000 < len(corpus) < 21_843  # first clean lemma of each synset, de-duplicated
    assert {"aardvark", "tench", "crane", "seventy-eight"} <= set(corpus.terms)
    assert all(is_plain_term(term) for term in corpus.terms)
    assert len({term.lower() for term in corpus.terms}) == len(corpus)
    assert set(corpus.kinds) == {KIND_NOUN}


# -- embeddings and their cache -----------------------------------------------------------------


class CountingEncoder:
    """Wraps a text encoder, counting the texts it is asked to encode."""

    def __init__(self, encoder: Any, fail_after: int | None = None) -> None:
        self.encoder, self.texts, self.fail_after = encoder, 0, fail_after
        self.cache_id = encoder.cache_id
        self.text_cache_id = encoder.text_cache_id  # the key of cached text embeddings
        self.name = encoder.name

    def encode_texts(self, texts: Any) -> Any:
        if self.fail_after is not None and self.texts >= self.fail_after:
            raise KeyboardInterrupt
        self.texts += len(texts)
        return self.encoder.encode_texts(texts)


@pytest.fixture(scope="module")
def tiny_encoder(tiny_openclip: str) -> Any:
    from oodprobe.encoders import create_encoder

    return create_encoder(tiny_openclip)


TERMS = make_corpus(
    ["dog", "cat", "red car", "sea otter", "kelp"] + [f"thing {i}" for i in range(9)]
)
PROMPTS = ("a photo of a {}.", "a drawing of a {}.")


def test_embeddings_equal_class_embeddings_and_are_cached(
    tiny_encoder: Any, cache_root: Path
) -> None:
    from oodprobe.encoders.text import compute_class_embeddings

    counting = CountingEncoder(tiny_encoder)
    fresh = corpus_embeddings(
        counting, TERMS, PROMPTS, cache_root=cache_root, shard_terms=4, progress=False
    )
    assert counting.texts == len(TERMS) * len(PROMPTS)
    assert fresh.shape == (len(TERMS), 32) and fresh.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fresh, axis=1), 1.0, atol=1e-6)
    reference = compute_class_embeddings(tiny_encoder, list(TERMS.terms), PROMPTS)
    np.testing.assert_allclose(fresh, reference, atol=1e-6)
    assert (
        corpus_cache_dir(counting, TERMS, PROMPTS, cache_root=cache_root, shard_terms=4)
        / "meta.json"
    ).is_file()

    again = CountingEncoder(tiny_encoder)
    cached = corpus_embeddings(again, TERMS, PROMPTS, cache_root=cache_root, shard_terms=4)
    assert again.texts == 0
    np.testing.assert_array_equal(cached, fresh)
    # other prompts or other terms are other entries
    other = CountingEncoder(tiny_encoder)
    corpus_embeddings(other, TERMS, PROMPTS[:1], cache_root=cache_root, progress=False)
    assert other.texts == len(TERMS)


def test_damaged_entry_is_rebuilt_with_a_warning(tiny_encoder: Any, cache_root: Path) -> None:
    first = corpus_embeddings(tiny_encoder, TERMS, PROMPTS, cache_root=cache_root, progress=False)
    directory = corpus_cache_dir(tiny_encoder, TERMS, PROMPTS, cache_root=cache_root)
    features = directory / "features.npy"
    data = bytearray(features.read_bytes())
    data[-3] ^= 0xFF
    features.write_bytes(bytes(data))
    counting = CountingEncoder(tiny_encoder)
    with pytest.warns(UserWarning, match="corpus embedding cache entry is damaged.*checksum"):
        rebuilt = corpus_embeddings(counting, TERMS, PROMPTS, cache_root=cache_root, progress=False)
    assert counting.texts == len(TERMS) * len(PROMPTS)
    np.testing.assert_array_equal(rebuilt, first)
    (directory / "meta.json").write_text("{not json")
    with pytest.warns(UserWarning, match="damaged.*unreadable"):
        np.testing.assert_array_equal(
            corpus_embeddings(tiny_encoder, TERMS, PROMPTS, cache_root=cache_root, progress=False),
            first,
        )


def test_interrupted_run_resumes_from_its_shards(tiny_encoder: Any, cache_root: Path) -> None:
    interrupted = CountingEncoder(tiny_encoder, fail_after=8 * len(PROMPTS))
    with pytest.raises(KeyboardInterrupt):
        corpus_embeddings(
            interrupted, TERMS, PROMPTS, cache_root=cache_root, shard_terms=4, progress=False
        )
    directory = corpus_cache_dir(tiny_encoder, TERMS, PROMPTS, cache_root=cache_root, shard_terms=4)
    assert not (directory / "meta.json").exists()
    assert len(list(directory.glob("shard-*.safetensors"))) == 2
    # a damaged shard is recomputed, with a warning
    cache.shard_path(directory, 1).write_bytes(b"garbage")
    resumed = CountingEncoder(tiny_encoder)
    with pytest.warns(UserWarning, match="recomputing that shard"):
        embeddings = corpus_embeddings(
            resumed, TERMS, PROMPTS, cache_root=cache_root, shard_terms=4, progress=False
        )
    assert resumed.texts == (len(TERMS) - 4) * len(PROMPTS)
    reference = corpus_embeddings(
        tiny_encoder, TERMS, PROMPTS, cache_root=cache_root / "fresh", progress=False
    )
    np.testing.assert_allclose(embeddings, reference, atol=1e-6)


def test_embedding_parameters_are_checked(tiny_encoder: Any, cache_root: Path) -> None:
    with pytest.raises(InvalidParameterError, match=r"needs a '\{\}'"):
        corpus_embeddings(tiny_encoder, TERMS, ["a photo"], cache_root=cache_root)
    with pytest.raises(InvalidParameterError, match="batch_size must be >= 1, got 0"):
        corpus_embeddings(tiny_encoder, TERMS, cache_root=cache_root, batch_size=0)
