"""Class names for zero-shot prompts: the one home of name cleaning, and curated ImageNet-1k names.

:func:`clean_class_names` is what every class name goes through before it is put in a prompt
(:func:`oodprobe.encoders.text.compute_class_embeddings` calls it): underscores become spaces,
whitespace is collapsed, an ImageNet-1k synset id (``n01440764``) becomes its curated name
(``tench``), and names that would embed identically are numbered, with a warning.

The curated ImageNet-1k names (:func:`imagenet_class_names`) follow one rule:

1. A class is named by the first WordNet lemma of its synset (the lemma lists shipped with timm,
   the same as ImageNet's ``LOC_synset_mapping.txt``: ``n01440764 tench, Tinca tinca`` →
   ``tench``), cleaned as above.
2. Names that collide when case is ignored — CLIP's tokenizers lower-case their input, so
   ``Cardigan`` (the corgi) and ``cardigan`` (the sweater) would get one text embedding — are all
   qualified in parentheses with their WordNet hypernym shortened to one word (:data:`_QUALIFIERS`):
   ``crane (bird)`` / ``crane (machine)``, ``Cardigan (corgi)`` / ``cardigan (sweater)``,
   ``maillot (tights)`` / ``maillot (swimsuit)``. The collisions are detected from the lemmas; the
   table must name exactly the colliding synsets (checked when the names are built, and tested).

This module imports nothing heavy, so the data layer can name synset folders with it.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from functools import cache

from oodprobe.errors import InvalidParameterError

__all__ = [
    "IMAGENET_SYNSETS",
    "class_names_for_synsets",
    "clean_class_name",
    "clean_class_names",
    "duplicate_class_names",
    "imagenet_class_names",
    "imagenet_names_for_folders",
    "is_imagenet_synset",
]

_SYNSET_ID = re.compile(r"n\d{8}")

# WordNet hypernyms, shortened to one word, of the synsets whose first lemmas collide.
_QUALIFIERS: dict[str, str] = {
    "n02012849": "bird",  # crane: wading bird
    "n03126707": "machine",  # crane: lifting device
    "n02113186": "corgi",  # Cardigan, Cardigan Welsh corgi
    "n02963159": "sweater",  # cardigan
    "n03710637": "tights",  # maillot: tights for dancers or gymnasts
    "n03710721": "swimsuit",  # maillot, tank suit
}


def _lemmas() -> tuple[tuple[str, str], ...]:
    from oodprobe._imagenet_lemmas import IMAGENET_LEMMAS

    return IMAGENET_LEMMAS


IMAGENET_SYNSETS: tuple[str, ...] = tuple(synset for synset, _ in _lemmas())
"""The 1000 ImageNet-1k synset ids, sorted: position = the standard class index."""


def clean_class_name(name: str) -> str:
    """``great_white  shark`` → ``great white shark`` (underscores, runs of spaces → one space)."""
    return " ".join(str(name).replace("_", " ").split())


def duplicate_class_names(class_names: Sequence[str]) -> list[str]:
    """The names that occur more than once when case is ignored (lower-cased, sorted).

    Case is ignored because CLIP's tokenizers lower-case text: ``Cardigan`` and ``cardigan`` get
    the same embedding.
    """
    counts = Counter(name.lower() for name in class_names)
    return sorted(name for name, count in counts.items() if count > 1)


@cache
def _imagenet_names() -> tuple[str, ...]:
    first = {synset: clean_class_name(lemmas.split(",")[0]) for synset, lemmas in _lemmas()}
    groups: defaultdict[str, list[str]] = defaultdict(list)
    for synset, name in first.items():
        groups[name.lower()].append(synset)
    colliding = {synset for synsets in groups.values() if len(synsets) > 1 for synset in synsets}
    if colliding != set(_QUALIFIERS):  # the lemma data changed: the table must follow
        raise RuntimeError(
            f"ImageNet name collisions {sorted(colliding)} differ from the qualifier table "
            f"{sorted(_QUALIFIERS)}"
        )
    names = tuple(
        f"{first[synset]} ({_QUALIFIERS[synset]})" if synset in colliding else first[synset]
        for synset in IMAGENET_SYNSETS
    )
    if duplicate_class_names(names):
        raise RuntimeError(f"curated ImageNet names collide: {duplicate_class_names(names)}")
    return names


def imagenet_class_names() -> list[str]:
    """The 1000 curated ImageNet-1k class names, in class-index (sorted synset id) order.

    ``imagenet_class_names()[0] == "tench"``; unique even ignoring case (see the module rule).
    """
    return list(_imagenet_names())


@cache
def _name_of_synset() -> dict[str, str]:
    return dict(zip(IMAGENET_SYNSETS, _imagenet_names(), strict=True))


def is_imagenet_synset(name: str) -> bool:
    """Whether ``name`` is one of the 1000 ImageNet-1k synset ids (``n01440764``)."""
    return _SYNSET_ID.fullmatch(name) is not None and name in _name_of_synset()


def class_names_for_synsets(synsets: Sequence[str]) -> list[str]:
    """Curated names of ImageNet-1k synset ids, in order: ``["n01440764"]`` → ``["tench"]``.

    A subset gets the same names as in the full list (``crane (bird)`` even without the other
    crane). Raises InvalidParameterError naming the first id that is not an ImageNet-1k synset.
    """
    table = _name_of_synset()
    for synset in synsets:
        if synset not in table:
            raise InvalidParameterError(
                f"{synset!r} is not an ImageNet-1k synset id (n01440764 … n15075141); pass "
                "class names for other classes"
            )
    return [table[synset] for synset in synsets]


def imagenet_names_for_folders(folder_names: Sequence[str]) -> list[str] | None:
    """Curated names when every folder is an ImageNet-1k synset id, else None.

    The data layer's hook: a class-folder tree named by synsets (ImageNet's train and val
    layout, or any subset of it) gets ``tench`` … instead of ``n01440764`` ….
    """
    if not folder_names or not all(is_imagenet_synset(name) for name in folder_names):
        return None
    return class_names_for_synsets(folder_names)


def clean_class_names(class_names: Sequence[str]) -> list[str]:
    """Names ready for prompts: cleaned, synset ids named, duplicates numbered with a warning.

    Each name: underscores → spaces and whitespace collapsed (:func:`clean_class_name`); an
    ImageNet-1k synset id becomes its curated name (:func:`class_names_for_synsets`). Names that
    are still equal ignoring case (CLIP lower-cases text, so they would get one embedding) are
    kept apart by numbering the second and later ones ``crane (2)``, ``crane (3)``, with one
    warning line naming them; pass distinct names to avoid it. Empty names raise
    InvalidParameterError.
    """
    if isinstance(class_names, str):
        raise InvalidParameterError(
            f"class names must be a list of names, got the string {class_names!r}"
        )
    cleaned = [clean_class_name(name) for name in class_names]
    empty = [index for index, name in enumerate(cleaned) if not name]
    if empty:
        raise InvalidParameterError(
            f"class names must not be empty; name {empty[0]} of {len(cleaned)} is "
            f"{class_names[empty[0]]!r}"
        )
    cleaned = [_name_of_synset()[name] if is_imagenet_synset(name) else name for name in cleaned]
    duplicates = duplicate_class_names(cleaned)
    if duplicates:
        used = {name.lower() for name in cleaned}
        seen: Counter[str] = Counter()
        numbered = []
        for index, name in enumerate(cleaned):
            key = name.lower()
            seen[key] += 1
            if key in duplicates and seen[key] > 1:
                number = seen[key]
                while f"{key} ({number})" in used:  # never create a new collision
                    number += 1
                cleaned[index] = f"{name} ({number})"
                used.add(cleaned[index].lower())
                numbered.append(cleaned[index])
        warnings.warn(
            f"duplicate class names {duplicates} (case ignored, as CLIP's tokenizer does) "
            f"would get one text embedding; numbered them {numbered}; pass distinct names",
            UserWarning,
            stacklevel=2,
        )
    return cleaned
