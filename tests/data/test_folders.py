"""Image folders and file lists: discovery, labels, names, errors, fingerprints, pickling."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from oodprobe.data import DecodeError, FileListDataset, ImageDataset, ImageFolderDataset
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


# -- symbolic links, duplicates, and any file name the OS allows --------------------------------


def _records(dataset: ImageDataset) -> list[tuple[int, str, str]]:
    return [(item.index, item.source, item.reason) for item in dataset.scan_skipped]


def test_a_folder_symlink_loop_is_listed_not_followed(class_folder: Path) -> None:
    """Before: ``cat/self -> .`` turned each cat image into 41 rows (one per nesting level)."""
    (class_folder / "cat" / "self").symlink_to(".")
    (class_folder / "cat" / "nested" / "up").symlink_to("../..")  # back to the root
    dataset = ImageFolderDataset(class_folder)
    assert dataset.relpaths == ("cat/a.JPG", "cat/b.png", "cat/nested/c.bmp", "dog_breed/x.gif")
    assert dataset.labels is not None and dataset.labels.tolist() == [0, 0, 0, 1]
    assert _records(dataset) == [
        (-1, f"{class_folder}/cat/nested/up", "symbolic link loop (back to .); not followed"),
        (-1, f"{class_folder}/cat/self", "symbolic link loop (back to cat); not followed"),
    ]


def test_a_class_folder_linking_to_the_root_or_to_another_class(class_folder: Path) -> None:
    (class_folder / "all").symlink_to(".")
    (class_folder / "dogs").symlink_to("dog_breed")
    dataset = ImageFolderDataset(class_folder)
    assert dataset.class_names == ("cat", "dog breed")
    assert len(dataset) == 4
    assert _records(dataset) == [
        (-1, f"{class_folder}/all", "symbolic link loop (back to .); not followed"),
        (-1, f"{class_folder}/dogs", "same folder as class folder dog_breed; not a second class"),
    ]


def test_file_symlink_loops_and_dangling_links_are_listed(tmp_path: Path) -> None:
    """Before: a flat folder holding ``x.png -> y.png -> x.png`` raised OSError (a traceback)."""
    write_image(tmp_path / "flat" / "a.png")
    (tmp_path / "flat" / "x.png").symlink_to("y.png")
    (tmp_path / "flat" / "y.png").symlink_to("x.png")
    (tmp_path / "flat" / "gone.png").symlink_to("nowhere.png")
    (tmp_path / "flat" / "gone-folder").symlink_to("nowhere")
    dataset = ImageFolderDataset(tmp_path / "flat")
    assert dataset.relpaths == ("a.png",)
    folder = tmp_path / "flat"
    assert _records(dataset) == [
        (-1, f"{folder}/gone-folder", "dangling symbolic link"),
        (-1, f"{folder}/gone.png", "dangling symbolic link"),
        (-1, f"{folder}/x.png", "symbolic link loop"),
        (-1, f"{folder}/y.png", "symbolic link loop"),
    ]
    write_image(tmp_path / "tree" / "cat" / "a.png")
    (tmp_path / "tree" / "cat" / "b.png").symlink_to("b.png")
    tree = ImageFolderDataset(tmp_path / "tree")
    assert tree.relpaths == ("cat/a.png",)
    assert _records(tree) == [(-1, f"{tmp_path}/tree/cat/b.png", "symbolic link loop")]


def test_an_image_reached_twice_counts_once(class_folder: Path, tmp_path: Path) -> None:
    """A second symbolic or hard link to a counted file, or a second path to a folder."""
    (class_folder / "cat" / "alias.png").symlink_to("b.png")
    os.link(class_folder / "cat" / "a.JPG", class_folder / "cat" / "z-hard.jpg")
    (class_folder / "cat" / "again").symlink_to("nested")
    (class_folder / "dog_breed" / "cat-b.png").symlink_to("../cat/b.png")
    outside = write_image(tmp_path / "pool" / "p.png")
    (class_folder / "dog_breed" / "p1.png").symlink_to(outside)
    (class_folder / "dog_breed" / "p2.png").symlink_to(outside)
    dataset = ImageFolderDataset(class_folder)
    # Each image at its own path (and class), whatever name the links sort under.
    assert dataset.relpaths == (
        "cat/a.JPG",
        "cat/b.png",
        "cat/nested/c.bmp",
        "dog_breed/p1.png",
        "dog_breed/x.gif",
    )
    assert dataset.labels is not None and dataset.labels.tolist() == [0, 0, 0, 1, 1]
    root = class_folder
    assert _records(dataset) == [
        (-1, f"{root}/cat/again", "same folder as cat/nested; walked once"),
        (-1, f"{root}/cat/alias.png", "same file as cat/b.png; counted once"),
        (-1, f"{root}/cat/z-hard.jpg", "same file as cat/a.JPG; counted once"),
        (-1, f"{root}/dog_breed/cat-b.png", "same file as cat/b.png; counted once"),
        (-1, f"{root}/dog_breed/p2.png", "same file as dog_breed/p1.png; counted once"),
    ]


def test_a_class_left_with_only_skipped_paths_says_why(class_folder: Path) -> None:
    (class_folder / "ghost").mkdir()
    (class_folder / "ghost" / "g.png").symlink_to("missing.png")
    with pytest.raises(DataError) as caught:
        ImageFolderDataset(class_folder)
    assert str(caught.value) == (
        f"class folder {class_folder / 'ghost'} has no images ({EXTENSIONS}) of its own "
        f"(1 path(s) skipped, e.g. {class_folder}/ghost/g.png: dangling symbolic link); "
        "add images to it or remove it"
    )


ODD_NAMES = [
    os.fsdecode(b"caf\xe9 latin-1.png"),  # not UTF-8: kept with surrogateescape
    "new\nline.png",
    "  spaces  .png",
    "quotes \" ' `.png",
    "-leading-dash.png",
    "--help.png",
    "ünïcødé 猫 😀.png",
    "back\\slash.png",
    "tab\there.png",
]
ODD_SHOWN = [
    "caf\\xe9 latin-1.png",
    "new\\nline.png",
    "  spaces  .png",
    "quotes \" ' `.png",
    "-leading-dash.png",
    "--help.png",
    "ünïcødé 猫 😀.png",
    "back\\slash.png",
    "tab\\there.png",
]


def test_any_file_name_the_os_allows_loads_and_describes_as_printable_text(
    tmp_path: Path,
) -> None:
    odd_class = os.fsdecode(b"cl\xffss\nname")
    for number, name in enumerate(ODD_NAMES):
        write_image(tmp_path / "root" / odd_class / name, (number, 0, 0))
    write_image(tmp_path / "root" / "plain" / "p.png")
    dataset = ImageFolderDataset(tmp_path / "root")
    assert len(dataset) == len(ODD_NAMES) + 1 and dataset.scan_skipped == ()
    assert dataset.class_names == ("cl\\xffss\\nname", "plain")
    shown = {dataset.describe(i) for i in range(len(ODD_NAMES))}
    assert shown == {f"{tmp_path}/root/cl\\xffss\\nname/{name}" for name in ODD_SHOWN}
    for index in range(len(dataset)):
        text = dataset.describe(index)
        assert text.isprintable()
        text.encode("utf-8")  # no lone surrogates: any writer accepts it
        assert np.asarray(dataset.load(index)).shape == (8, 8, 3)
    reds = sorted(int(np.asarray(dataset.load(i))[0, 0, 0]) for i in range(len(ODD_NAMES)))
    assert reds == list(range(len(ODD_NAMES)))
    (tmp_path / "root" / odd_class / ODD_NAMES[0]).write_bytes(b"broken")
    index = next(i for i in range(len(dataset)) if "caf" in dataset.describe(i))
    with pytest.raises(DecodeError) as caught:
        dataset.load(index)
    assert str(caught.value) == (
        f"cannot decode {tmp_path}/root/cl\\xffss\\nname/caf\\xe9 latin-1.png: not an image file"
    )


def test_a_folder_named_oddly_is_a_printable_dataset_name(tmp_path: Path) -> None:
    folder = tmp_path / os.fsdecode(b"d\xe9\nj\xe0")
    write_image(folder / "a.png")
    dataset = ImageFolderDataset(folder)
    assert dataset.name == f"{tmp_path}/d\\xe9\\nj\\xe0"
    with pytest.raises(DataError) as caught:
        ImageFolderDataset(folder / "missing")
    assert str(caught.value) == (
        f"{tmp_path}/d\\xe9\\nj\\xe0/missing does not exist; pass an image folder or a .txt "
        "file list"
    )


def test_file_list_of_non_utf8_names_with_a_byte_order_mark(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9.png")
    write_image(tmp_path / name, (5, 0, 0))
    write_image(tmp_path / "-x 'y'.png", (6, 0, 0))
    (tmp_path / "list.txt").write_bytes(
        b"\xef\xbb\xbf" + os.fsencode(name) + b"\t1\r\n-x 'y'.png 0\r\n"
    )
    dataset = FileListDataset(tmp_path / "list.txt")
    assert dataset.relpaths == (name, "-x 'y'.png")
    assert dataset.labels is not None and dataset.labels.tolist() == [1, 0]
    assert dataset.describe(0) == f"{tmp_path}/caf\\xe9.png"
    assert [int(np.asarray(dataset.load(i))[0, 0, 0]) for i in range(2)] == [5, 6]


def test_file_list_in_utf16_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("a.png\n", encoding="utf-16")
    with pytest.raises(DataError) as caught:
        FileListDataset(tmp_path / "list.txt")
    assert str(caught.value) == (
        f"{tmp_path / 'list.txt'} line 1 holds a NUL byte, which no file name can; save the "
        "list as UTF-8 text (not UTF-16)"
    )


def test_file_list_counts_a_file_once(tmp_path: Path) -> None:
    write_image(tmp_path / "imgs" / "a.png")
    write_image(tmp_path / "imgs" / "b.png")
    (tmp_path / "imgs" / "link.png").symlink_to("a.png")
    (tmp_path / "list.txt").write_text(
        "imgs/a.png 0\nimgs/b.png 1\nimgs/./a.png 1\nimgs/link.png 2\nimgs/gone.png 2\n"
    )
    dataset = FileListDataset(tmp_path / "list.txt")
    assert dataset.relpaths == ("imgs/a.png", "imgs/b.png", "imgs/gone.png")
    assert dataset.labels is not None and dataset.labels.tolist() == [0, 1, 2]
    assert dataset.class_names == ("0", "1", "2")
    first = f"{tmp_path}/imgs/a.png"
    assert _records(dataset) == [
        (-1, f"{tmp_path}/imgs/./a.png", f"same file as {first}; counted once"),
        (-1, f"{tmp_path}/imgs/link.png", f"same file as {first}; counted once"),
    ]
    with pytest.raises(DecodeError, match=r"gone.png: file not found$"):
        dataset.load(2)  # a missing file stays, and fails when it is decoded


def test_file_list_symlink_loop_and_dangling_link_fail_at_load(tmp_path: Path) -> None:
    (tmp_path / "x.png").symlink_to("y.png")
    (tmp_path / "y.png").symlink_to("x.png")
    (tmp_path / "d.png").symlink_to("nowhere.png")
    (tmp_path / "list.txt").write_text("x.png\nd.png\n")
    dataset = FileListDataset(tmp_path / "list.txt")
    reasons = []
    for index in range(2):
        with pytest.raises(DecodeError) as caught:
            dataset.load(index)
        reasons.append(caught.value.reason)
    assert reasons == ["symbolic link loop", "dangling symbolic link"]


def test_fingerprint_is_computed_once_per_dataset(
    class_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: every call stat-ed every file again (three times per benchmark result row)."""
    dataset = ImageFolderDataset(class_folder)
    subset = dataset.subset([2, 0])
    expected = (dataset.fingerprint(), subset.fingerprint())

    def no_stat(*args: object, **kwargs: object) -> None:
        raise AssertionError("fingerprint() stat-ed a file")

    monkeypatch.setattr(os, "stat", no_stat)
    for _ in range(3):
        assert (dataset.fingerprint(), subset.fingerprint()) == expected


def test_a_folder_of_broken_links_only_says_why_it_has_no_images(tmp_path: Path) -> None:
    (tmp_path / "a.png").symlink_to("gone.png")
    with pytest.raises(DataError) as caught:
        ImageFolderDataset(tmp_path)
    assert str(caught.value) == (
        f"no images in {tmp_path}: expected image files ({EXTENSIONS}) or one subfolder of "
        f"images per class (1 path(s) skipped, e.g. {tmp_path}/a.png: dangling symbolic link)"
    )


def test_imagenet_synset_folders_get_curated_names(tmp_path: Path) -> None:
    from PIL import Image

    from oodprobe.data import create_dataset

    for synset in ("n01440764", "n02012849", "n03126707"):
        (tmp_path / synset).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / synset / "a.png")
    # ImageNet's own mapping file names both cranes "crane": the curated names win
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn02012849 crane\nn03126707 crane\n"
    )
    dataset = create_dataset(str(tmp_path))
    assert dataset.class_names == ("tench", "crane (bird)", "crane (machine)")


def test_subfolders_of_a_flat_folder_are_listed_as_not_read(tmp_path: Path) -> None:
    from PIL import Image

    from oodprobe.data import create_dataset

    (tmp_path / "cats").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "top.png")
    dataset = create_dataset(str(tmp_path))
    assert len(dataset) == 1 and dataset.labels is None
    [record] = dataset.scan_skipped
    assert record.source == str(tmp_path / "cats")
    assert record.reason.startswith("subfolder not read: the folder has images at its top level")
