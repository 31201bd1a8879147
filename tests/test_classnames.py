"""Tests for oodprobe.classnames: curated ImageNet-1k names and the one home of name cleaning."""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from oodprobe.classnames import (
    IMAGENET_SYNSETS,
    class_names_for_synsets,
    clean_class_name,
    clean_class_names,
    duplicate_class_names,
    imagenet_class_names,
    imagenet_names_for_folders,
    is_imagenet_synset,
)
from oodprobe.errors import InvalidParameterError


def timm_lemmas() -> list[tuple[str, str]]:
    """(synset, lemmas) in class-index order, from timm's public ImageNetInfo (the source)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [(info.index_to_label_name(i), info.index_to_description(i)) for i in range(1000)]


def test_shipped_lemmas_equal_timms_and_are_the_sorted_synsets() -> None:
    from oodprobe._imagenet_lemmas import IMAGENET_LEMMAS

    assert list(IMAGENET_LEMMAS) == timm_lemmas()
    assert len(IMAGENET_SYNSETS) == 1000
    assert list(IMAGENET_SYNSETS) == sorted(set(IMAGENET_SYNSETS))
    assert IMAGENET_SYNSETS[0] == "n01440764" and IMAGENET_SYNSETS[-1] == "n15075141"


def test_imagenet_names_are_1000_unique_first_lemmas() -> None:
    names = imagenet_class_names()
    assert len(names) == 1000
    assert len({name.lower() for name in names}) == 1000  # unique even as CLIP lower-cases
    assert names[0] == "tench"
    assert names[1] == "goldfish"
    assert names[2] == "great white shark"  # "great white shark, white shark, man-eater, …"
    assert all(name == " ".join(name.split()) and "_" not in name for name in names)
    # Every name not in a collision is its synset's first lemma, verbatim.
    for (synset, lemmas), name in zip(timm_lemmas(), names, strict=True):
        first = lemmas.split(",")[0].strip()
        assert name == first or name.startswith(f"{first} ("), (synset, name)


def test_the_colliding_synsets_are_found_from_the_lemmas_and_all_qualified() -> None:
    # Independent detection: first lemmas grouped ignoring case.
    groups: defaultdict[str, list[str]] = defaultdict(list)
    for synset, lemmas in timm_lemmas():
        groups[lemmas.split(",")[0].strip().lower()].append(synset)
    colliding = {key: synsets for key, synsets in groups.items() if len(synsets) > 1}
    assert colliding == {
        "crane": ["n02012849", "n03126707"],
        "cardigan": ["n02113186", "n02963159"],
        "maillot": ["n03710637", "n03710721"],
    }
    named = dict(zip(IMAGENET_SYNSETS, imagenet_class_names(), strict=True))
    assert [named[s] for s in ("n02012849", "n03126707")] == ["crane (bird)", "crane (machine)"]
    assert [named[s] for s in ("n02113186", "n02963159")] == [
        "Cardigan (corgi)",
        "cardigan (sweater)",
    ]
    assert [named[s] for s in ("n03710637", "n03710721")] == [
        "maillot (tights)",
        "maillot (swimsuit)",
    ]
    assert imagenet_class_names()[134] == "crane (bird)"  # class index 134 / 517
    assert imagenet_class_names()[517] == "crane (machine)"


def test_class_names_for_synsets_keeps_order_and_full_list_names() -> None:
    assert class_names_for_synsets(["n03126707", "n01440764"]) == ["crane (machine)", "tench"]
    assert class_names_for_synsets(list(IMAGENET_SYNSETS)) == imagenet_class_names()
    with pytest.raises(InvalidParameterError) as raised:
        class_names_for_synsets(["n01440764", "n00004475"])  # ImageNet-21k "organism"
    assert str(raised.value) == (
        "'n00004475' is not an ImageNet-1k synset id (n01440764 … n15075141); pass class names "
        "for other classes"
    )


def test_folder_hook_names_synset_trees_only() -> None:
    assert imagenet_names_for_folders(["n01440764", "n01443537"]) == ["tench", "goldfish"]
    assert imagenet_names_for_folders(["n01440764", "cats"]) is None
    assert imagenet_names_for_folders(["n00004475"]) is None
    assert imagenet_names_for_folders([]) is None
    assert is_imagenet_synset("n01440764")
    assert not is_imagenet_synset("n0144076") and not is_imagenet_synset("N01440764")


def test_clean_class_name() -> None:
    assert clean_class_name("great_white  shark ") == "great white shark"
    assert clean_class_name("\tsea_\nanemone") == "sea anemone"
    assert clean_class_name("Cardigan") == "Cardigan"  # case is kept


def test_clean_class_names_maps_synsets_and_cleans_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert clean_class_names(["n01440764", "tabby_cat", "n02012849"]) == [
            "tench",
            "tabby cat",
            "crane (bird)",
        ]
        assert clean_class_names(list(IMAGENET_SYNSETS)) == imagenet_class_names()


def test_duplicates_ignoring_case_are_numbered_with_one_warning_line() -> None:
    with pytest.warns(UserWarning) as record:
        names = clean_class_names(["crane", "Crane", "tench", "crane_"])
    assert names == ["crane", "Crane (2)", "tench", "crane (3)"]
    assert len(record) == 1
    message = str(record[0].message)
    assert message == (
        "duplicate class names ['crane'] (case ignored, as CLIP's tokenizer does) would get one "
        "text embedding; numbered them ['Crane (2)', 'crane (3)']; pass distinct names"
    )
    assert "\n" not in message


def test_numbering_never_creates_a_new_collision() -> None:
    with pytest.warns(UserWarning):
        names = clean_class_names(["crane", "crane", "crane (2)"])
    assert names == ["crane", "crane (3)", "crane (2)"]
    assert not duplicate_class_names(names)


def test_the_standard_first_lemma_list_gets_numbered() -> None:
    # The LOC_synset_mapping first names (what a mapping file gives) collide three times.
    first_lemmas = [lemmas.split(",")[0] for _, lemmas in timm_lemmas()]
    assert duplicate_class_names(first_lemmas) == ["cardigan", "crane", "maillot"]
    with pytest.warns(
        UserWarning, match=r"duplicate class names \['cardigan', 'crane', 'maillot'\]"
    ):
        names = clean_class_names(first_lemmas)
    assert len({name.lower() for name in names}) == 1000


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["cat", " _ "], "class names must not be empty; name 1 of 2 is ' _ '"),
        ("cat", "class names must be a list of names, got the string 'cat'"),
    ],
)
def test_bad_class_names(names: object, message: str) -> None:
    with pytest.raises(InvalidParameterError) as raised:
        clean_class_names(names)  # type: ignore[arg-type]
    assert str(raised.value) == message


def test_import_is_light() -> None:
    # The data layer may import it: no torch, no timm.
    code = (
        "import sys, oodprobe.classnames as c; c.imagenet_class_names(); "
        "print('torch' in sys.modules, 'timm' in sys.modules)"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert output.split() == ["False", "False"]


class RecordingTextEncoder:
    """Stands in for a CLIP text tower: records the prompts, embeds each as a one-hot row."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def encode_texts(self, texts: list[str]) -> Any:
        import torch

        start = len(self.texts)
        self.texts.extend(texts)
        return torch.eye(64)[start : start + len(texts)]


def test_a_synset_folder_tree_is_prompted_by_curated_names(tmp_path: Path) -> None:
    # The ImageNet layout (train/n01440764/*.JPEG …) end to end: dataset → prompts.
    from PIL import Image

    from oodprobe.data import create_dataset
    from oodprobe.encoders.text import PROMPT_ENSEMBLE, compute_class_embeddings

    for synset in ("n01440764", "n02012849", "n03126707"):
        (tmp_path / synset).mkdir()
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / synset / "a.png")
    dataset = create_dataset(str(tmp_path))
    encoder = RecordingTextEncoder()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no duplicate warning: the cranes are told apart
        embeddings = compute_class_embeddings(encoder, list(dataset.class_names))  # type: ignore[arg-type]
    assert embeddings.shape == (3, 64)
    assert encoder.texts == [
        prompt.format(name)
        for name in ("tench", "crane (bird)", "crane (machine)")
        for prompt in PROMPT_ENSEMBLE
    ]
    assert encoder.texts[0] == "a photo of a tench."
