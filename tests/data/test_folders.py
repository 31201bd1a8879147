"""Image folders and file lists: discovery, labels, names, errors, fingerprints, pickling."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from oodprobe.data import DecodeError, FileListDataset, ImageFolderDataset
from oodprobe.errors import DataError

from .conftest import write_image

EXTENSIONS = "bmp, gif, jpeg, jpg, pgm, png, ppm, tif, tiff, webp"


def test_class_folder_labels_names_and_order(class_folder: Path) -> None:
    dataset = ImageFolderDataset(class_folder)
    assert dataset.relpaths == ("cat/a.JPG", "cat/b.png", "cat/nested/c.bmp", "dog_breed/x.gif")
    assert dataset.labels is not None
    assert dataset.labels.dtype == np.int64
    assert dataset.labels.tolist() == [0, 0, 0, 1]
    assert dataset.class_names == ("cat", "dog breed")
    assert dataset.name == str(class_folder)
    assert dataset.describe(3) == os.path.join(class_folder, "dog_breed/x.gif")
    assert np.asarray(dataset.load(1))[0, 0].tolist() == [200, 0, 0]
    assert np.asarray(dataset.load(3))[0, 0].tolist() == [0, 0, 200]


def test_synset_mapping_names(tmp_path: Path) -> None:
    for wnid in ("n01443537", "n01440764"):
        write_image(tmp_path / "train" / wnid / "0.png")
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n\n")
    dataset = ImageFolderDataset(tmp_path / "train", class_names_file=mapping)
    assert dataset.class_names == ("tench", "goldfish")
    assert dataset.folder_names == ("n01440764", "n01443537")


def test_flat_folder_is_unlabelled(flat_folder: Path) -> None:
    dataset = ImageFolderDataset(flat_folder)
    assert dataset.relpaths == ("1.webp", "10.png", "2.png")
    assert dataset.labels is None and dataset.class_names is None
    assert dataset.load(0).size == (8, 8)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        ImageFolderDataset(tmp_path / "nope")
    assert str(caught.value) == (
        f"{tmp_path / 'nope'} does not exist; pass an image folder or a .txt file list"
    )


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError) as caught:
        ImageFolderDataset(tmp_path)
    assert str(caught.value) == (
        f"no images in {tmp_path}: expected image files ({EXTENSIONS}) or one subfolder of "
        "images per class"
    )


def test_class_folder_without_images(class_folder: Path) -> None:
    (class_folder / "empty_class").mkdir()
    (class_folder / "empty_class" / "readme.md").write_text("x")
    with pytest.raises(DataError) as caught:
        ImageFolderDataset(class_folder)
    assert str(caught.value) == (
        f"class folder {class_folder / 'empty_class'} has no images ({EXTENSIONS}); "
        "add images to it or remove it"
    )


def test_broken_image_error_names_its_path(class_folder: Path) -> None:
    broken = class_folder / "cat" / "b.png"
    broken.write_bytes(broken.read_bytes()[:40])
    dataset = ImageFolderDataset(class_folder)
    with pytest.raises(DecodeError) as caught:
        dataset.load(1)
    assert dataset.describe(1) in str(caught.value)
    assert caught.value.reason in {"image file is truncated", "not an image file"}


def test_file_list_with_labels(tmp_path: Path) -> None:
    write_image(tmp_path / "imgs" / "a.png", (1, 2, 3))
    write_image(tmp_path / "imgs" / "b c.png", (4, 5, 6))
    outside = write_image(tmp_path / "elsewhere" / "d.png", (7, 8, 9))
    listing = tmp_path / "lists" / "val.txt"
    listing.parent.mkdir()
    listing.write_text(f"# path label\n\n../imgs/a.png 2\n../imgs/b c.png\t0\n{outside}  1\n   \n")
    dataset = FileListDataset(listing)
    assert len(dataset) == 3
    assert dataset.labels is not None and dataset.labels.tolist() == [2, 0, 1]
    assert dataset.class_names == ("0", "1", "2")
    assert dataset.describe(1) == os.path.join(listing.parent, "../imgs/b c.png")
    assert dataset.describe(2) == str(outside)
    colours = [np.asarray(dataset.load(i))[0, 0].tolist() for i in range(3)]
    assert colours == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    named = FileListDataset(listing, class_names=["cat", "dog", "fish"])
    assert named.class_names == ("cat", "dog", "fish")


def test_file_list_without_labels_and_with_spaces(tmp_path: Path) -> None:
    write_image(tmp_path / "my photo.png")
    write_image(tmp_path / "b.png")
    (tmp_path / "list.txt").write_text("my photo.png\nb.png\n")
    dataset = FileListDataset(tmp_path / "list.txt")
    assert dataset.relpaths == ("my photo.png", "b.png")  # listed order, not sorted
    assert dataset.labels is None and dataset.class_names is None


def test_file_list_errors(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("a.png 0\nb.png\n")
    with pytest.raises(DataError) as caught:
        FileListDataset(listing)
    assert str(caught.value) == (
        f"{listing} line 2: no label, but line 1 has one; give every line a label or none"
    )
    listing.write_text("# nothing\n\n")
    with pytest.raises(DataError) as caught:
        FileListDataset(listing)
    assert str(caught.value) == f"file list {listing} lists no images; write one path per line"
    with pytest.raises(DataError) as caught:
        FileListDataset(tmp_path / "missing.txt")
    assert str(caught.value) == (
        f"{tmp_path / 'missing.txt'} does not exist; pass a text file of image paths"
    )
    listing.write_text("a.png\tcat\n")
    with pytest.raises(DataError) as caught:
        FileListDataset(listing)
    assert str(caught.value) == "label must be an integer >= 0, got 'cat' in line 'a.png\\tcat'"


def test_file_list_missing_entry_fails_at_load(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("gone.png\n")
    dataset = FileListDataset(tmp_path / "list.txt")
    with pytest.raises(DecodeError) as caught:
        dataset.load(0)
    assert str(caught.value) == f"cannot decode {tmp_path / 'gone.png'}: file not found"


def test_fingerprint_tracks_file_changes(class_folder: Path) -> None:
    first = ImageFolderDataset(class_folder).fingerprint()
    assert ImageFolderDataset(class_folder).fingerprint() == first
    target = class_folder / "cat" / "b.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = ImageFolderDataset(class_folder).fingerprint()
    assert touched != first
    target.write_bytes(target.read_bytes() + b"\0" * 16)  # a different size
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    resized = ImageFolderDataset(class_folder).fingerprint()
    assert resized not in {first, touched}
    # Untracked files (hidden, non-image) do not count.
    (class_folder / "cat" / "other.txt").write_text("x")
    write_image(class_folder / "cat" / ".x.png")
    assert ImageFolderDataset(class_folder).fingerprint() == resized


def test_fingerprint_includes_labels(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "l0.txt").write_text("a.png 0\n")
    (tmp_path / "l1.txt").write_text("a.png 1\n")
    assert (
        FileListDataset(tmp_path / "l0.txt").fingerprint()
        != FileListDataset(tmp_path / "l1.txt").fingerprint()
    )


def test_pickle_round_trip(class_folder: Path, tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text("a.png 0\n")
    for dataset in (
        ImageFolderDataset(class_folder),
        FileListDataset(tmp_path / "list.txt"),
        ImageFolderDataset(class_folder).subset([3, 0]),
    ):
        copy = pickle.loads(pickle.dumps(dataset))
        assert len(copy) == len(dataset)
        assert copy.fingerprint() == dataset.fingerprint()
        assert copy.describe(0) == dataset.describe(0)
        assert np.array_equal(np.asarray(copy.load(0)), np.asarray(dataset.load(0)))
        assert copy.labels is not None and dataset.labels is not None
        assert copy.labels.tolist() == dataset.labels.tolist()
