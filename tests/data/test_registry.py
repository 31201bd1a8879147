"""create_dataset: specs, splits, paths, class selection, per-class sampling, names, errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from oodprobe.data import (
    DATASETS,
    FileListDataset,
    ImageFolderDataset,
    create_dataset,
    format_class_selection,
    list_datasets,
    parse_class_selection,
    select_images,
)
from oodprobe.errors import DataError, InvalidParameterError, UnknownNameError

from .conftest import write_image


def test_registry_lists_every_dataset() -> None:
    names = [info.name for info in list_datasets()]
    assert names == list(DATASETS)
    assert {"mnist-5k", "fashion-mnist", "digits", "skimage-textures", "cifar10"} <= set(names)
    for info in list_datasets():
        assert set(info.sizes) == set(info.splits)
        assert isinstance(info.is_available(), bool)
        assert info.description and info.n_classes >= 2
    assert DATASETS["mnist-5k"].default_split == "test"
    assert DATASETS["skimage-textures"].default_split == "all"


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError) as caught:
        create_dataset("mnist-50k")
    assert str(caught.value) == "unknown dataset 'mnist-50k'; choose from: " + ", ".join(
        sorted(DATASETS)
    )


def test_bad_split_lists_valid_splits() -> None:
    with pytest.raises(InvalidParameterError) as caught:
        create_dataset("mnist-5k:val")
    assert str(caught.value) == "dataset 'mnist-5k' has no split 'val'; choose from: train, test"
    with pytest.raises(InvalidParameterError) as caught:
        create_dataset("skimage-textures:test")
    assert str(caught.value) == ("dataset 'skimage-textures' has no split 'test'; choose from: all")


def test_default_splits_and_names() -> None:
    assert len(create_dataset("mnist-5k")) == 1000
    assert create_dataset("mnist-5k").name == "mnist-5k:test"
    assert create_dataset("mnist-5k:train").name == "mnist-5k:train"
    assert create_dataset("skimage-textures").name == "skimage-textures"
    assert create_dataset("skimage-textures:all").name == "skimage-textures"


def test_bundled_dataset_takes_no_root() -> None:
    with pytest.raises(InvalidParameterError) as caught:
        create_dataset("digits", root="/data")
    assert str(caught.value) == (
        "dataset 'digits' ships inside an installed package and takes no root, got root='/data'"
    )


def test_classes_keep_original_labels_and_names() -> None:
    full = create_dataset("mnist-5k:test")
    upper = create_dataset("mnist-5k:test", classes=[5, 6, 7, 8, 9])
    assert len(upper) == 500
    assert upper.labels is not None and sorted(set(upper.labels.tolist())) == [5, 6, 7, 8, 9]
    assert upper.class_names == full.class_names
    assert upper.name == "mnist-5k:test[5-9]"
    by_name = create_dataset("mnist-5k:test", classes=["Nine", "five", 6, "7", "eight"])
    assert by_name.fingerprint() == upper.fingerprint()
    assert create_dataset("mnist-5k:test", classes=parse_class_selection("0,2-3")).name == (
        "mnist-5k:test[0,2-3]"
    )


def test_class_selection_errors() -> None:
    with pytest.raises(InvalidParameterError) as caught:
        create_dataset("mnist-5k", classes=[10])
    assert str(caught.value) == (
        "class index 10 is out of range for 'mnist-5k:test', which has classes 0-9"
    )
    with pytest.raises(InvalidParameterError) as caught:
        create_dataset("lfw-subset", classes=["cat"])
    assert str(caught.value) == (
        "unknown class 'cat' in 'lfw-subset'; choose an index 0-1 or a name: face, non-face"
    )


def test_per_class_is_seeded_deterministic_and_ordered() -> None:
    first = create_dataset("mnist-5k:train", per_class=7, seed=3)
    again = create_dataset("mnist-5k:train", per_class=7, seed=3)
    other = create_dataset("mnist-5k:train", per_class=7, seed=4)
    assert first.labels is not None
    assert np.bincount(first.labels).tolist() == [7] * 10
    positions = [int(first.describe(i).split("[")[1][:-1]) for i in range(len(first))]
    assert positions == sorted(positions)  # the dataset's order is kept
    assert first.fingerprint() == again.fingerprint() != other.fingerprint()
    assert first.name == "mnist-5k:train 7/class seed 3"
    assert create_dataset("mnist-5k:train", per_class=7).name == "mnist-5k:train 7/class"
    # Sampling within a class selection: classes first, then per class.
    picked = create_dataset("mnist-5k:train", classes=[1, 2], per_class=1000)
    assert picked.labels is not None and np.bincount(picked.labels).tolist() == [0, 400, 400]


def test_limit_takes_the_first_images() -> None:
    dataset = create_dataset("mnist-5k", classes=[3], limit=5)
    assert len(dataset) == 5 and dataset.name == "mnist-5k:test[3] first 5"
    assert create_dataset("mnist-5k", limit=5000).name == "mnist-5k:test"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"per_class": 0}, "per_class must be a positive integer, got 0"),
        ({"limit": -1}, "limit must be a positive integer, got -1"),
        ({"limit": True}, "limit must be a positive integer, got True"),
    ],
)
def test_invalid_counts(options: dict[str, int], message: str) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        create_dataset("lfw-subset", **options)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_path_specs(class_folder: Path, flat_folder: Path, tmp_path: Path) -> None:
    folder = create_dataset(str(class_folder), classes=["dog breed"])
    assert folder.name == f"{class_folder}[1]"
    assert folder.labels is not None and folder.labels.tolist() == [1]
    assert isinstance(create_dataset(str(class_folder)), ImageFolderDataset)
    write_image(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text("a.png\n")
    listing = create_dataset(str(tmp_path / "list.txt"))
    assert isinstance(listing, FileListDataset) and len(listing) == 1
    with pytest.raises(InvalidParameterError) as caught:
        create_dataset(str(flat_folder), per_class=2)
    assert str(caught.value) == (
        f"per_class=2 needs labels, but {str(flat_folder)!r} is unlabelled; use limit instead"
    )
    assert len(create_dataset(str(flat_folder), limit=2)) == 2


def test_path_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nothing"
    with pytest.raises(DataError) as caught:
        create_dataset(str(missing))
    assert str(caught.value).startswith(
        f"{missing} does not exist; pass an image folder, a .txt list of image paths, or a "
        "built-in dataset (mnist-5k, "
    )
    image = write_image(tmp_path / "one.png")
    with pytest.raises(DataError) as caught:
        create_dataset(str(image))
    assert str(caught.value) == (
        f"{image} is a file; pass an image folder or a .txt file listing image paths "
        "(one per line, optional integer label)"
    )


def test_synset_mapping_found_in_folder(tmp_path: Path) -> None:
    write_image(tmp_path / "n01440764" / "a.png")
    write_image(tmp_path / "n01443537" / "b.png")
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
    )
    dataset = create_dataset(str(tmp_path), classes=["goldfish"])
    assert dataset.class_names == ("tench", "goldfish")
    assert dataset.labels is not None and dataset.labels.tolist() == [1]


def test_selected_folder_subset_pickles(class_folder: Path) -> None:
    dataset = create_dataset(str(class_folder), classes=[0], limit=2)
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy.name == dataset.name and copy.fingerprint() == dataset.fingerprint()
    assert [copy.describe(i) for i in range(2)] == [dataset.describe(i) for i in range(2)]


def test_select_images_on_any_dataset() -> None:
    base = create_dataset("lfw-subset")
    picked = select_images(base, classes=[1], per_class=3, seed=1, name="faces?")
    assert picked.name == "faces?[1] 3/class seed 1" and len(picked) == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0-4,7", [0, 1, 2, 3, 4, 7]),
        (" 3 , 1-2 ,3", [3, 1, 2]),
        ("T-shirt/top,Ankle boot", ["T-shirt/top", "Ankle boot"]),
        ("5-5", [5]),
    ],
)
def test_parse_class_selection(text: str, expected: list[int | str]) -> None:
    assert parse_class_selection(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "",
            "class selection must be comma-separated indices, ranges or names like '0-4,7', got ''",
        ),
        (
            "1,,2",
            "class selection must be comma-separated indices, ranges or names like '0-4,7', "
            "got '1,,2'",
        ),
        ("4-0", "class range must go up, got '4-0' in '4-0'; write 0-4"),
    ],
)
def test_parse_class_selection_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        parse_class_selection(text)
    assert str(caught.value) == message


def test_format_class_selection() -> None:
    assert format_class_selection([7, 0, 1, 2, 3, 4, 9]) == "0-4,7,9"
    assert format_class_selection([2]) == "2"
