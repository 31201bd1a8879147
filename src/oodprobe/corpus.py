"""Text corpora for label mining (NegLabel's negatives, ClusterMine's positives) and their cache.

A :class:`Corpus` is a cleaned, de-duplicated, sorted tuple of terms with a part of speech per
term. Built-in corpora (:data:`CORPORA`), all read offline:

* ``wordnet-nouns`` / ``wordnet-adjectives``: every noun / adjective lemma of WordNet 3.0
  (Miller, 1995), read from the Debian ``wordnet-base`` files (``/usr/share/wordnet``, or
  ``$OODPROBE_WORDNET``) through NLTK's ``WordNetCorpusReader``. NegLabel (Jiang et al., ICLR
  2024) mines its negative labels from these two parts of speech. The Debian folder lacks the
  ``lexnames`` file the reader opens first, and NLTK >= 3.9 refuses files outside the reader's
  root (a folder of symbolic links resolves outside it), so the reader is given the standard
  45-line ``lexnames`` from memory and reads everything else from the Debian folder itself;
  nothing is downloaded (no ``nltk.download``). Lemmas keep the case of WordNet's data files
  (``Labrador retriever``); of case variants (``China`` the country, ``china`` the porcelain)
  the one with fewest capitals is kept, as CLIP's tokenizer lower-cases text anyway.
* ``wordnet``: both; a term that is both a noun and an adjective (``red``) appears once, of kind
  ``noun+adjective``.
* ``imagenet21k``: the first lemma of each of the 21,843 ImageNet-21k synsets (the lists timm's
  wheel ships under ``timm/data/_info/``), as concept names.

After cleaning (below): 117,391 nouns of WordNet's 117,798 noun lemmas, 21,246 adjectives of
21,479, 135,541 terms in ``wordnet`` (3,096 of them both), 20,068 ImageNet-21k names.

Cleaning (:func:`clean_terms`): underscores → spaces and runs of whitespace → one
(:func:`oodprobe.classnames.clean_class_name`); for the built-in corpora, terms with a digit or
a character other than letters, space, ``-``, ``'`` and ``.`` are dropped (``omega-3 fatty
acid``, ``TCP/IP``, ``atomic number 6``: NegLabel's code keeps them, but a number in a prompt
says little about an image). Duplicates ignoring case are dropped (CLIP lower-cases text, so they
would embed identically; NegLabel de-duplicates exact strings). Terms are sorted case-insensitively.

A user corpus file (:func:`read_corpus_file`) holds one term per line in UTF-8; blank lines and
lines starting with ``#`` are skipped; its terms are cleaned and de-duplicated the same way but
not filtered by character (a user who writes ``COVID-19`` means it).

:func:`corpus_embeddings` embeds a corpus with a text tower (the prompt-averaged embeddings of
:func:`oodprobe.encoders.text.compute_class_embeddings`) and caches them like image features:
one entry per (text tower ``text_cache_id``, prompts, corpus ``version``) in the feature cache's
format (:mod:`oodprobe.cache`: sharded atomic writes that resume after an interruption, checksums on
every read, a damaged entry rebuilt with a warning).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from oodprobe import cache
from oodprobe.classnames import clean_class_name
from oodprobe.errors import CacheError, DataError, InvalidParameterError, UnknownNameError
from oodprobe.files import write_text_atomic

if TYPE_CHECKING:
    import torch

    from oodprobe.encoders.base import TextImageEncoder

__all__ = [
    "CORPORA",
    "CORPUS_SHARD_TERMS",
    "KIND_ADJECTIVE",
    "KIND_NOUN",
    "KIND_TERM",
    "WORDNET_DIR",
    "Corpus",
    "WordNetMissingError",
    "clean_terms",
    "corpus_cache_dir",
    "corpus_embeddings",
    "is_plain_term",
    "load_corpus",
    "make_corpus",
    "read_corpus_file",
]

KIND_NOUN = "noun"
KIND_ADJECTIVE = "adjective"
KIND_TERM = "term"  # a user's term: part of speech unknown
_BOTH = f"{KIND_NOUN}+{KIND_ADJECTIVE}"

# Bumped when cleaning changes: part of every corpus version, so cached embeddings follow.
_CLEANING_VERSION = 1
CORPUS_SHARD_TERMS = 1024
"""Terms per cache shard: the unit of resumption and of the progress bar."""

WORDNET_DIR = Path("/usr/share/wordnet")
"""Where Debian's ``wordnet-base`` puts WordNet 3.0; ``$OODPROBE_WORDNET`` overrides it."""

# WordNet 3.0's lexicographer files (wninput(5WN)): number, name, syntactic category. The
# reader needs only the names, in this order; Debian's wordnet-base leaves the file out.
_LEXNAME_LIST = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
)
_LEXNAMES = _LEXNAME_LIST.split()
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
LEXNAMES_TEXT = "".join(
    f"{index:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n"
    for index, name in enumerate(_LEXNAMES)
)

_PLAIN_TERM = re.compile(r"[A-Za-z][A-Za-z .'\-]*")
_WORDNET_FILES = ("index.noun", "index.adj", "data.noun", "data.adj", "noun.exc", "adj.exc")
_TIMM_LEMMAS = "imagenet_synset_to_lemma.txt"
_TIMM_21K = "imagenet21k_goog_synsets.txt"


class WordNetMissingError(DataError, FileNotFoundError):
    """The WordNet database files are not on this machine."""


@dataclass(frozen=True)
class Corpus:
    """Cleaned, de-duplicated terms in a stable order, each with its part of speech.

    ``kinds[i]`` is ``noun``, ``adjective``, ``noun+adjective`` or ``term`` (a user's, part of
    speech unknown); :meth:`of_kind` selects by it. ``source`` says where the terms came from;
    ``version`` (computed) is a digest of the terms and the cleaning rules, the corpus's part
    of an embedding cache key: the embeddings depend on the terms alone, so two sources with
    the same terms share one entry.
    """

    name: str
    terms: tuple[str, ...]
    kinds: tuple[str, ...]
    source: str
    version: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.terms:
            raise InvalidParameterError(f"corpus {self.name!r} has no terms")
        if len(self.kinds) != len(self.terms):
            raise InvalidParameterError(
                f"corpus {self.name!r} has {len(self.terms)} terms but {len(self.kinds)} kinds"
            )
        payload = json.dumps([_CLEANING_VERSION, list(self.terms)], ensure_ascii=False)
        object.__setattr__(self, "version", hashlib.sha256(payload.encode()).hexdigest()[:24])

    def __len__(self) -> int:
        return len(self.terms)

    def of_kind(self, kind: str) -> np.ndarray:
        """(N,) bool mask of the terms of part of speech ``kind`` (``noun+adjective`` counts
        for both ``noun`` and ``adjective``)."""
        return np.array([kind in term_kind.split("+") for term_kind in self.kinds], dtype=bool)


# -- cleaning ---------------------------------------------------------------------------------


def is_plain_term(term: str) -> bool:
    """Whether a cleaned term is letters, spaces, ``-``, ``'`` and ``.``, starting with a letter."""
    return _PLAIN_TERM.fullmatch(term) is not None


def _preferred(variants: Iterable[str]) -> str:
    """Of spellings that differ in case only, the one with fewest capitals (then the first in
    code-point order): ``china`` over ``China``."""
    return min(variants, key=lambda term: (sum(char.isupper() for char in term), term))


def clean_terms(
    terms: Iterable[str], kinds: Iterable[str] | None = None, *, plain_only: bool = True
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Clean, filter and de-duplicate terms; sorted case-insensitively. Returns (terms, kinds).

    Each term: underscores → spaces, whitespace collapsed; empty ones are dropped, and with
    ``plain_only`` so are those failing :func:`is_plain_term`. Terms equal ignoring case become
    one, spelled by :func:`_preferred`, whose kind joins theirs (``noun`` and ``adjective`` →
    ``noun+adjective``). ``kinds`` defaults to ``term`` for every term.
    """
    terms = list(terms)
    kind_list = [KIND_TERM] * len(terms) if kinds is None else list(kinds)
    if len(kind_list) != len(terms):
        raise InvalidParameterError(f"got {len(terms)} terms but {len(kind_list)} kinds")
    spellings: dict[str, set[str]] = {}
    term_kinds: dict[str, set[str]] = {}
    for raw, kind in zip(terms, kind_list, strict=True):
        term = clean_class_name(raw)
        if not term or (plain_only and not is_plain_term(term)):
            continue
        key = term.casefold()
        spellings.setdefault(key, set()).add(term)
        term_kinds.setdefault(key, set()).update(kind.split("+"))
    order = sorted(spellings, key=lambda key: (key, _preferred(spellings[key])))
    kind_order = {KIND_NOUN: 0, KIND_ADJECTIVE: 1}
    return (
        tuple(_preferred(spellings[key]) for key in order),
        tuple(
            "+".join(sorted(term_kinds[key], key=lambda kind: (kind_order.get(kind, 2), kind)))
            for key in order
        ),
    )


def make_corpus(
    terms: Iterable[str],
    *,
    name: str = "custom",
    kinds: Iterable[str] | None = None,
    source: str = "given terms",
    plain_only: bool = False,
) -> Corpus:
    """A :class:`Corpus` of the given terms, cleaned and de-duplicated by :func:`clean_terms`."""
    cleaned, cleaned_kinds = clean_terms(terms, kinds, plain_only=plain_only)
    if not cleaned:
        raise InvalidParameterError(f"corpus {name!r} has no terms left after cleaning")
    return Corpus(name=name, terms=cleaned, kinds=cleaned_kinds, source=source)


# -- user files -------------------------------------------------------------------------------


def read_corpus_file(path: str | os.PathLike[str]) -> Corpus:
    """A corpus from a UTF-8 file of one term per line (blank lines and ``# comments`` skipped).

    DataError, in one line, for a missing file, a folder, a binary or non-UTF-8 file, or one
    with no terms.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"corpus file {path} {what}; pass a text file of one term per line")
    data = path.read_bytes()
    try:
        if b"\x00" in data:
            raise UnicodeError("NUL byte")
        text = data.decode("utf-8-sig")
    except UnicodeError:
        raise DataError(
            f"corpus file {path} is not UTF-8 text (binary?); write one term per line in UTF-8"
        ) from None
    lines = [line.strip() for line in text.splitlines()]
    terms = [line for line in lines if line and not line.startswith("#")]
    if not terms:
        raise DataError(
            f"corpus file {path} has no terms (only blank lines and # comments); write one "
            "term per line"
        )
    cleaned, kinds = clean_terms(terms, plain_only=False)
    digest = hashlib.sha256(data).hexdigest()[:16]
    return Corpus(
        name=path.name, terms=cleaned, kinds=kinds, source=f"file {path} (sha256 {digest})"
    )


# -- WordNet through NLTK ---------------------------------------------------------------------


def wordnet_dir() -> Path:
    """``$OODPROBE_WORDNET`` if set, else :data:`WORDNET_DIR`."""
    return Path(os.environ.get("OODPROBE_WORDNET") or WORDNET_DIR).expanduser()


def _missing_wordnet(directory: Path, what: str) -> WordNetMissingError:
    return WordNetMissingError(
        f"WordNet is not installed: {what}. Install it with `apt-get install wordnet-base` "
        f"(Debian/Ubuntu, as root), set OODPROBE_WORDNET to a WordNet 3.0 dict folder (now "
        f"{directory}), or pass a corpus file of one term per line"
    )


def _wordnet_reader(directory: Path) -> Any:
    """NLTK's ``WordNetCorpusReader`` on ``directory``, offline, with the standard lexnames."""
    missing = [name for name in _WORDNET_FILES if not (directory / name).is_file()]
    if missing:
        raise _missing_wordnet(directory, f"{directory / missing[0]} not found")
    try:
        import nltk.data
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError:
        raise WordNetMissingError(
            "the WordNet corpora are read with NLTK, which is not installed; "
            "`pip install 'nltk>=3.9'`, or pass a corpus file of one term per line"
        ) from None

    class DebianWordNetReader(WordNetCorpusReader):
        def open(self, file: str) -> Any:
            if file == "lexnames":  # not in Debian's wordnet-base; standard for WordNet 3.0
                return io.StringIO(LEXNAMES_TEXT)
            return super().open(file)

        def map_wn(self, version: str = "wordnet") -> None:
            # Maps synsets to another WordNet version for the multilingual data (OMW), which
            # is not used here; NLTK would look for its downloaded "wordnet" corpus.
            return None

    root = str(directory.resolve())
    if root not in nltk.data.path:  # NLTK >= 3.9 opens files only under its data path
        nltk.data.path.append(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available"
        return DebianWordNetReader(root, None)


@functools.cache
def _wordnet_lemmas(directory: Path) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(source description, ((lemma as spelled in data files, kind), ...)) of nouns and
    adjectives; read once per process (~10 s), as the three WordNet corpora share it."""
    import nltk

    reader = _wordnet_reader(directory)
    pairs = tuple(
        (lemma, kind)
        for pos, kind in (("n", KIND_NOUN), ("a", KIND_ADJECTIVE))
        for synset in reader.all_synsets(pos)  # "a" includes the satellites ("s")
        for lemma in synset.lemma_names()
    )
    source = f"WordNet {reader.get_version()} ({directory}) via NLTK {nltk.__version__}"
    return source, pairs


def _timm_info_dir() -> Path:
    from importlib.util import find_spec

    spec = find_spec("timm")  # locate, not import: timm imports torch
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the imagenet21k corpus is read from timm's wheel; `pip install timm`")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "_info"


def _imagenet21k_lemmas() -> tuple[str, list[tuple[str, str]]]:
    """The first lemma without digits of each ImageNet-21k synset (the lists timm ships)."""
    from importlib.metadata import version

    info = _timm_info_dir()
    try:
        synsets = (info / _TIMM_21K).read_text(encoding="utf-8").split()
        lines = (info / _TIMM_LEMMAS).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise DataError(f"cannot read timm's ImageNet-21k lists in {info}: {error}") from None
    lemmas = dict(line.split("\t", 1) for line in lines if "\t" in line)
    pairs = []
    for synset in synsets:
        names = [clean_class_name(name) for name in lemmas.get(synset, "").split(",")]
        plain = [name for name in names if is_plain_term(name)]
        if plain:
            pairs.append((plain[0], KIND_NOUN))
    return f"ImageNet-21k synsets ({len(synsets)}) of timm {version('timm')}", pairs


@dataclass(frozen=True)
class _CorpusSource:
    read: Callable[[], tuple[str, list[tuple[str, str]]]]
    inputs: Callable[[], list[Path]]  # the files whose change invalidates the term-list cache


def _wordnet_source(kinds: tuple[str, ...]) -> _CorpusSource:
    def read() -> tuple[str, list[tuple[str, str]]]:
        source, pairs = _wordnet_lemmas(wordnet_dir())
        return source, [(term, kind) for term, kind in pairs if kind in kinds]

    def inputs() -> list[Path]:
        return [wordnet_dir() / name for name in _WORDNET_FILES]

    return _CorpusSource(read, inputs)


CORPORA: dict[str, _CorpusSource] = {
    "wordnet": _wordnet_source((KIND_NOUN, KIND_ADJECTIVE)),
    "wordnet-nouns": _wordnet_source((KIND_NOUN,)),
    "wordnet-adjectives": _wordnet_source((KIND_ADJECTIVE,)),
    "imagenet21k": _CorpusSource(
        _imagenet21k_lemmas,
        lambda: [_timm_info_dir() / _TIMM_21K, _timm_info_dir() / _TIMM_LEMMAS],
    ),
}
"""The built-in corpora, by name (see the module docstring)."""


def _terms_cache_path(name: str, root: Path) -> Path | None:
    """The cached term list of a built-in corpus, keyed on its input files' path, size and
    mtime; None when an input is missing (reading the source then says what to install)."""
    stats = []
    for path in CORPORA[name].inputs():
        try:
            info = path.stat()
        except OSError:
            return None
        stats.append([str(path.resolve()), info.st_size, info.st_mtime_ns])
    key = cache.cache_key(
        {"kind": "corpus-terms", "corpus": name, "cleaning": _CLEANING_VERSION, "inputs": stats}
    )
    return root / "corpora" / f"{name}-{key[:24]}.json"


def _read_terms_cache(path: Path, name: str) -> Corpus | None:
    """The corpus a term-list cache file holds, or None (with a warning if it is damaged)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        terms, kinds = tuple(record["terms"]), tuple(record["kinds"])
        digest = hashlib.sha256(json.dumps([terms, kinds]).encode()).hexdigest()
        if digest != record["sha256"]:
            raise CacheError("checksum mismatch")
        return Corpus(name=name, terms=terms, kinds=kinds, source=str(record["source"]))
    except (OSError, ValueError, KeyError, TypeError, CacheError, InvalidParameterError) as error:
        warnings.warn(
            f"corpus term cache {path} is damaged ({cache._one_line(error)}); rebuilding it",
            stacklevel=4,
        )
        return None


def load_corpus(source: str | os.PathLike[str], *, cache_root: Path | None = None) -> Corpus:
    """A built-in corpus by name (:data:`CORPORA`) or a user's corpus file by path.

    A built-in corpus is built once and its cleaned term list cached under ``cache_root``
    (default :func:`oodprobe.cache.default_cache_root`) in ``corpora/`` (reading WordNet through
    NLTK takes ~10 s; the cached list ~0.1 s). WordNetMissingError if WordNet is absent;
    UnknownNameError for a name that is neither registered nor a file.
    """
    text = os.fspath(source)
    if text in CORPORA:
        root = cache.default_cache_root() if cache_root is None else Path(cache_root)
        path = _terms_cache_path(text, root)
        corpus = None if path is None else _read_terms_cache(path, text)
        if corpus is not None:
            return corpus
        described, pairs = CORPORA[text].read()
        terms, kinds = clean_terms(
            [term for term, _ in pairs], [kind for _, kind in pairs], plain_only=True
        )
        corpus = Corpus(name=text, terms=terms, kinds=kinds, source=described)
        record = {
            "name": text,
            "source": described,
            "terms": list(terms),
            "kinds": list(kinds),
            "sha256": hashlib.sha256(json.dumps([terms, kinds]).encode()).hexdigest(),
        }
        if path is not None:
            write_text_atomic(path, json.dumps(record))
        return corpus
    file = Path(text).expanduser()
    if file.exists() or os.sep in text or "/" in text or file.suffix:
        return read_corpus_file(file)
    raise UnknownNameError("corpus (or a corpus file path)", text, CORPORA)


# -- embeddings and their cache -----------------------------------------------------------------


def _embedding_key(
    encoder: TextImageEncoder, corpus: Corpus, prompts: Sequence[str], shard_terms: int
) -> str:
    return cache.cache_key(
        {
            "kind": "corpus-embeddings",
            "method": "prompt-mean-unit",  # compute_class_embeddings' formula
            "encoder": encoder.text_cache_id,
            "prompts": list(prompts),
            "corpus": corpus.version,
            "n_terms": len(corpus),
            "shard_terms": shard_terms,
        }
    )


def corpus_cache_dir(
    encoder: TextImageEncoder,
    corpus: Corpus,
    prompts: Sequence[str] | None = None,
    *,
    cache_root: Path | None = None,
    shard_terms: int = CORPUS_SHARD_TERMS,
) -> Path:
    """The cache entry folder of these embeddings (complete when it holds ``meta.json``)."""
    from oodprobe.encoders.text import PROMPT_ENSEMBLE

    prompts = PROMPT_ENSEMBLE if prompts is None else tuple(prompts)
    root = cache.default_cache_root() if cache_root is None else Path(cache_root)
    return cache.entry_dir(root, _embedding_key(encoder, corpus, prompts, shard_terms))


def _check_rows(arrays: dict[str, np.ndarray], start: int, stop: int, where: object) -> None:
    """CacheError unless ``arrays`` are float32 (n, E) ``features`` of terms ``start:stop``
    with their ``indices``."""
    features, indices = arrays.get("features"), arrays.get("indices")
    if (
        set(arrays) != {"features", "indices"}
        or features is None
        or indices is None
        or features.dtype != np.float32
        or features.ndim != 2
        or len(features) != stop - start
        or not np.array_equal(indices, np.arange(start, stop))
    ):
        raise CacheError(f"{where} does not hold float32 embeddings of terms {start}-{stop - 1}")


def _valid_shard(directory: Path, shard: int, key: str, start: int, stop: int) -> bool:
    """Whether shard ``shard`` on disk holds this key's terms ``start:stop`` (else deleted)."""
    path = cache.shard_path(directory, shard)
    if not path.is_file():
        return False
    try:
        arrays, extra = cache.read_shard(directory, shard)
        if extra.get("key") != key:
            raise CacheError(f"shard {path} belongs to another cache key")
        _check_rows(arrays, start, stop, path)
    except CacheError as error:
        warnings.warn(f"{error}; recomputing that shard", stacklevel=4)
        path.unlink(missing_ok=True)
        return False
    return True


def corpus_embeddings(
    encoder: TextImageEncoder,
    corpus: Corpus,
    prompts: Sequence[str] | None = None,
    *,
    cache_root: Path | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = True,
    shard_terms: int = CORPUS_SHARD_TERMS,
) -> np.ndarray:
    """(N, E) float32 unit-row text embeddings of the corpus terms, cached on disk.

    Row i is ``normalize(mean_p normalize(text(prompt_p(term_i))))`` over ``prompts`` (default
    the five-prompt ensemble, :data:`oodprobe.encoders.text.PROMPT_ENSEMBLE`), computed by
    :func:`oodprobe.encoders.text.compute_class_embeddings` in shards of ``shard_terms`` terms.
    Cached under ``cache_root`` (default :func:`oodprobe.cache.default_cache_root`) keyed on the
    text tower's ``text_cache_id`` (shared by the encoder's ``,local``, tapped and concatenated
    variants), the prompts and ``corpus.version``; a second call reads the cache and encodes
    nothing, an interrupted run resumes from its finished shards, a damaged entry is rebuilt
    with a warning. ``device`` None leaves the encoder where it is; otherwise it runs
    on that device (``auto``, ``cpu``, ``cuda``) and is restored afterwards. ``progress`` shows
    a rich progress bar on stderr while encoding.
    """
    from oodprobe.encoders.text import PROMPT_ENSEMBLE, compute_class_embeddings
    from oodprobe.features import _progress_bar, borrowed_encoder, select_device

    prompts = PROMPT_ENSEMBLE if prompts is None else tuple(prompts)
    if not prompts or any(not isinstance(p, str) or "{}" not in p for p in prompts):
        raise InvalidParameterError(f"each prompt needs a '{{}}' for the term, got {prompts}")
    for label, value in (("batch_size", batch_size), ("shard_terms", shard_terms)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidParameterError(f"{label} must be >= 1, got {value!r}")
    root = cache.default_cache_root() if cache_root is None else Path(cache_root)
    key = _embedding_key(encoder, corpus, prompts, shard_terms)
    directory = cache.entry_dir(root, key)
    n_terms = len(corpus)
    with cache.locked(directory):
        if (directory / "meta.json").exists():
            try:
                arrays, _ = cache.read_entry(directory, key=key)
                _check_rows(arrays, 0, n_terms, directory)
                return np.asarray(arrays["features"])
            except CacheError as error:
                warnings.warn(
                    f"corpus embedding cache entry is damaged ({error}); rebuilding it",
                    stacklevel=2,
                )
                cache.remove_entry(directory)
        n_shards = -(-n_terms // shard_terms)
        meta = {
            "key": key,
            "kind": "corpus-embeddings",
            "encoder": getattr(encoder, "name", type(encoder).__name__),
            "encoder_cache_id": encoder.text_cache_id,
            "prompts": list(prompts),
            "corpus": {"name": corpus.name, "version": corpus.version, "source": corpus.source},
            "n_terms": n_terms,
            "shard_terms": shard_terms,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

        def write_missing() -> None:
            ranges = [
                (shard, shard * shard_terms, min((shard + 1) * shard_terms, n_terms))
                for shard in range(n_shards)
            ]
            missing = [r for r in ranges if not _valid_shard(directory, r[0], key, r[1], r[2])]
            if not missing:
                return
            directory.mkdir(parents=True, exist_ok=True)
            borrow = (
                borrowed_encoder(encoder, select_device(device))
                if device is not None
                else contextlib.nullcontext()
            )
            total = sum(stop - start for _, start, stop in missing)
            with borrow, _progress_bar(progress, total, f"embedding {corpus.name}") as advance:
                for shard, start, stop in missing:
                    rows = compute_class_embeddings(
                        encoder, corpus.terms[start:stop], prompts, batch_size=batch_size
                    )
                    arrays: dict[str, np.ndarray] = {
                        "features": np.ascontiguousarray(rows, dtype=np.float32),
                        "indices": np.arange(start, stop, dtype=np.int64),
                    }
                    cache.write_shard(directory, shard, arrays, {"key": key})
                    advance(stop - start)

        # shards that pass alone but disagree (another embedding width): started again once
        cache.fill_entry(
            directory,
            write_missing,
            lambda: cache.write_entry(directory, n_shards, meta),
            "corpus embedding",
            stacklevel=3,
        )
        arrays, _ = cache.read_entry(directory, key=key, verify=False)
        _check_rows(arrays, 0, n_terms, directory)
        return np.asarray(arrays["features"])


def check_corpus_source(source: Any) -> None:
    """Refuse, without reading it, a corpus that :func:`load_corpus` could not load.

    A built-in name whose input files are missing (WordNet not installed) says what to install;
    anything else must name an existing file. For checking a spec before any work.
    """
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source):
        raise InvalidParameterError(
            f"a corpus is a built-in name ({', '.join(CORPORA)}) or a file path, got {source!r}"
        )
    text = os.fspath(source)
    if text in CORPORA:
        missing = [path for path in CORPORA[text].inputs() if not path.is_file()]
        if missing and text.startswith("wordnet"):
            raise _missing_wordnet(wordnet_dir(), f"{missing[0]} not found")
        if missing:
            raise DataError(f"corpus {text!r} needs {missing[0]}, which is missing")
        return
    if not Path(text).expanduser().is_file():
        raise UnknownNameError("corpus (or a corpus file path)", text, CORPORA)
