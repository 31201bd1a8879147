"""split_dataset: seeded, stratified, disjoint train/test parts of one dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from oodprobe.data import ArrayImageDataset, ImageFolderDataset, SkippedImage, split_dataset
from oodprobe.data.arrays import stable_keys
from oodprobe.errors import DataError, InvalidParameterError

from .conftest import write_image


def _dataset(counts: list[int], name: str = "pets") -> ArrayImageDataset:
    labels = np.repeat(np.arange(len(counts)), counts)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))  # classes interleaved, as on disk
    images = rng.integers(0, 256, (len(labels), 4, 4, 3), dtype=np.uint8)
    return ArrayImageDataset(name, images, labels[order], [f"c{i}" for i in range(len(counts))])


def _origin(part: object) -> list[int]:
    assert isinstance(part, ArrayImageDataset)
    return part.origin.tolist()


def test_split_is_stratified_disjoint_and_complete() -> None:
    counts = [10, 7, 2, 1, 25]
    dataset = _dataset(counts)
    train, test = split_dataset(dataset, 0.2, seed=3)
    assert dataset.labels is not None and train.labels is not None and test.labels is not None
    # per class: round(n * 0.2), halves up, within 1 .. n - 1; a single image stays in train
    expected_test = {0: 2, 1: 1, 2: 1, 3: 0, 4: 5}
    assert {c: int(np.sum(test.labels == c)) for c in range(5)} == expected_test
    assert {c: int(np.sum(train.labels == c)) for c in range(5)} == {
        c: counts[c] - expected_test[c] for c in range(5)
    }
    tr, te = _origin(train), _origin(test)
    assert sorted(tr + te) == list(range(len(dataset))) and not set(tr) & set(te)
    assert tr == sorted(tr) and te == sorted(te)  # dataset order kept
    np.testing.assert_array_equal(train.labels, dataset.labels[tr])
    assert train.class_names == test.class_names == dataset.class_names
    assert train.name == "pets (train, test_fraction=0.2, seed=3)"
    assert test.name == "pets (test, test_fraction=0.2, seed=3)"


def test_split_takes_the_lowest_seeded_keys_of_each_class() -> None:
    """Reference: within a class, the test images are those with the smallest SplitMix64 keys."""
    dataset = _dataset([9, 6])
    assert dataset.labels is not None
    _, test = split_dataset(dataset, 0.34, seed=11)
    keys = stable_keys(len(dataset), 11, salt=3)
    expected: list[int] = []
    for label, n_test in ((0, 3), (1, 2)):  # round(9 * 0.34) = 3, round(6 * 0.34) = 2
        members = np.flatnonzero(dataset.labels == label)
        expected.extend(members[np.argsort(keys[members], kind="stable")][:n_test].tolist())
    assert _origin(test) == sorted(expected)


def test_split_is_deterministic_and_seeded() -> None:
    dataset = _dataset([30, 30])
    first = split_dataset(dataset, 0.5, seed=0)
    again = split_dataset(_dataset([30, 30]), 0.5, seed=0)
    other = split_dataset(dataset, 0.5, seed=1)
    assert _origin(first[1]) == _origin(again[1])
    assert first[1].fingerprint() == again[1].fingerprint()
    assert _origin(first[1]) != _origin(other[1])
    assert first[0].fingerprint() != first[1].fingerprint()


def test_unlabelled_split_and_tiny_datasets() -> None:
    images = np.zeros((5, 4, 4), np.uint8)
    train, test = split_dataset(ArrayImageDataset("flat", images, None, None), 0.01)
    assert (len(train), len(test)) == (4, 1)  # at least one test image
    train, test = split_dataset(ArrayImageDataset("flat", images, None, None), 0.99)
    assert (len(train), len(test)) == (1, 4)  # at least one train image
    with pytest.raises(DataError) as caught:
        split_dataset(ArrayImageDataset("one", images[:1], None, None), 0.5)
    assert str(caught.value) == (
        "cannot split 'one' into train and test: it has 1 image(s), at least 2 are needed"
    )


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1, float("nan"), "0.2", True, None])
def test_test_fraction_must_be_inside_zero_one(fraction: object) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        split_dataset(_dataset([4]), fraction)  # type: ignore[arg-type]
    assert str(caught.value) == (
        f"test_fraction must be a number between 0 and 1 (both excluded), got {fraction!r}"
    )


def test_seed_must_be_an_integer() -> None:
    with pytest.raises(InvalidParameterError) as caught:
        split_dataset(_dataset([4]), 0.5, seed="x")  # type: ignore[arg-type]
    assert str(caught.value) == "seed must be an integer, got 'x'"


def test_folder_split_keeps_paths_and_lists_scan_records_once(tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        for number in range(5):
            write_image(tmp_path / "pets" / cls / f"{number}.png")
    (tmp_path / "pets" / "cat" / "gone.png").symlink_to("nowhere.png")
    dataset = ImageFolderDataset(tmp_path / "pets")
    train, test = split_dataset(dataset, 0.2)
    assert len(train) == 8 and len(test) == 2
    assert {train.describe(i) for i in range(8)} | {test.describe(i) for i in range(2)} == {
        f"{tmp_path}/pets/{cls}/{n}.png" for cls in ("cat", "dog") for n in range(5)
    }
    record = SkippedImage(-1, f"{tmp_path}/pets/cat/gone.png", "dangling symbolic link")
    assert train.scan_skipped == (record,) and test.scan_skipped == ()
    assert dataset.scan_skipped == (record,)


def test_split_is_exported_from_the_package() -> None:
    import oodprobe.data

    assert "split_dataset" in oodprobe.data.__all__
