"""Image files on disk: class-per-subfolder trees, flat folders, and text lists of paths."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from oodprobe.data.base import ImageDataset
from oodprobe.data.decode import decode_image
from oodprobe.errors import DataError

#: File extensions (lower case, with the dot) that count as images when scanning folders.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_EXTENSION_LIST = ", ".join(sorted(ext[1:] for ext in IMAGE_EXTENSIONS))


def is_image_file(name: str) -> bool:
    """Whether a file name has an image extension (case-insensitive) and is not hidden."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _scan_images(folder: Path, *, recursive: bool) -> list[str]:
    """Relative POSIX paths of the image files under ``folder``, sorted; hidden entries skipped."""
    found: list[str] = []
    if not recursive:
        with os.scandir(folder) as entries:
            found = [e.name for e in entries if e.is_file() and is_image_file(e.name)]
        return sorted(found)
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        relative = Path(directory).relative_to(folder)
        found.extend((relative / f).as_posix() for f in files if is_image_file(f))
    return sorted(found)


def read_class_names_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read an ImageNet-style ``LOC_synset_mapping.txt``: ``n01440764 tench, Tinca tinca`` lines.

    Returns ``{folder name: first listed name}``; blank lines and ``#`` comments are ignored.
    """
    mapping: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise DataError(f"cannot read class names file {path}: {error.strerror or error}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise DataError(
                f"{path} line {number}: expected 'FOLDER NAME[, OTHER NAMES]', got {line!r}"
            )
        mapping[parts[0]] = parts[1].split(",")[0].strip()
    return mapping


class _FileDataset(ImageDataset):
    """Shared parts of datasets backed by files listed relative to a root folder."""

    root: str
    relpaths: tuple[str, ...]
    max_pixels: int | None

    def __len__(self) -> int:
        return len(self.relpaths)

    def path(self, index: int) -> str:
        """Path of image ``index`` (the root joined with its listed path)."""
        return os.path.join(self.root, self.relpaths[index])

    def load(self, index: int) -> Image.Image:
        return decode_image(self.path(index), max_pixels=self.max_pixels)

    def describe(self, index: int) -> str:
        return self.path(index)

    def fingerprint(self) -> str:
        """Hash of the ordered (listed path, size, mtime_ns) and the labels; stats files now."""
        digest = hashlib.sha256(type(self).__name__.encode())
        for relpath in self.relpaths:
            try:
                stat = os.stat(os.path.join(self.root, relpath))
                entry = f"{relpath}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
            except OSError:
                entry = f"{relpath}\0missing\n"
            digest.update(entry.encode("utf-8", "surrogateescape"))
        if self.labels is not None:
            digest.update(self.labels.tobytes())
        return digest.hexdigest()


class ImageFolderDataset(_FileDataset):
    """Images in a folder: one subfolder per class (labelled) or loose files (unlabelled).

    Layout is decided by the top level of ``root``: if it holds image files it is a *flat*
    folder (those files only, no labels); otherwise each non-hidden subfolder is a class, in
    sorted order (label = position), with its images found recursively. Class names are the
    folder names with underscores as spaces, or looked up in ``class_names_file`` (ImageNet's
    ``LOC_synset_mapping.txt`` format, ``n01440764 tench, Tinca tinca`` → ``tench``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        class_names_file: str | os.PathLike[str] | None = None,
        name: str | None = None,
        max_pixels: int | None = None,
    ) -> None:
        folder = Path(root)
        if not folder.exists():
            raise DataError(f"{folder} does not exist; pass an image folder or a .txt file list")
        if not folder.is_dir():
            raise DataError(f"{folder} is not a folder; pass an image folder or a .txt file list")
        self.root = str(folder)
        self.name = name if name is not None else str(root)
        self.max_pixels = max_pixels
        top_images = _scan_images(folder, recursive=False)
        class_dirs = sorted(
            entry.name
            for entry in os.scandir(folder)
            if entry.is_dir() and not entry.name.startswith(".")
        )
        if top_images or not class_dirs:
            if not top_images:
                raise DataError(
                    f"no images in {folder}: expected image files ({_EXTENSION_LIST}) or one "
                    "subfolder of images per class"
                )
            self.relpaths = tuple(top_images)
            self.labels = None
            self.class_names = None
            self.folder_names: tuple[str, ...] = ()
            return
        relpaths: list[str] = []
        labels: list[int] = []
        for label, class_dir in enumerate(class_dirs):
            images = _scan_images(folder / class_dir, recursive=True)
            if not images:
                raise DataError(
                    f"class folder {folder / class_dir} has no images ({_EXTENSION_LIST}); "
                    "add images to it or remove it"
                )
            relpaths.extend(f"{class_dir}/{image}" for image in images)
            labels.extend([label] * len(images))
        mapping = read_class_names_file(class_names_file) if class_names_file else {}
        self.folder_names = tuple(class_dirs)
        self.class_names = tuple(mapping.get(d, d.replace("_", " ")) for d in class_dirs)
        self.relpaths = tuple(relpaths)
        self.labels = np.asarray(labels, dtype=np.int64)


class FileListDataset(_FileDataset):
    """Images listed in a text file, one path per line, optionally followed by an integer label.

    Paths are relative to the list's folder (absolute paths are kept). Blank lines and lines
    starting with ``#`` are ignored. A label is a second column separated by a tab, or by
    whitespace when the last word is an integer; either every line has a label or none does.
    Listed files are not checked up front: a missing one fails at ``load`` (and is skipped).
    """

    def __init__(
        self,
        txt_path: str | os.PathLike[str],
        *,
        class_names: Sequence[str] | None = None,
        name: str | None = None,
        max_pixels: int | None = None,
    ) -> None:
        list_path = Path(txt_path)
        try:
            text = list_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(
                f"{list_path} does not exist; pass a text file of image paths"
            ) from None
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read file list {list_path}: {error}") from None
        self.root = str(list_path.parent)
        self.name = name if name is not None else str(txt_path)
        self.max_pixels = max_pixels
        entries = [_parse_line(line) for line in text.splitlines()]
        numbered = [(n, e) for n, e in enumerate(entries, start=1) if e is not None]
        if not numbered:
            raise DataError(f"file list {list_path} lists no images; write one path per line")
        with_label = [n for n, (_, label) in numbered if label is not None]
        if with_label and len(with_label) != len(numbered):
            without = next(n for n, (_, label) in numbered if label is None)
            raise DataError(
                f"{list_path} line {without}: no label, but line {with_label[0]} has one; "
                "give every line a label or none"
            )
        self.relpaths = tuple(path for _, (path, _) in numbered)
        if with_label:
            self.labels = np.asarray([label for _, (_, label) in numbered], dtype=np.int64)
            n_classes = int(self.labels.max()) + 1
            if class_names is not None and len(class_names) < n_classes:
                raise DataError(
                    f"{list_path} has labels up to {n_classes - 1} but only "
                    f"{len(class_names)} class names were given"
                )
            self.class_names = (
                tuple(class_names) if class_names is not None else tuple(map(str, range(n_classes)))
            )
        else:
            self.labels = None
            self.class_names = tuple(class_names) if class_names is not None else None


def _parse_line(line: str) -> tuple[str, int | None] | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    if "\t" in stripped:
        path, _, rest = stripped.partition("\t")
        rest = rest.strip()
        if rest:
            return path.strip(), _parse_label(rest, line)
        return path.strip(), None
    parts = stripped.rsplit(None, 1)
    if len(parts) == 2 and parts[1].lstrip("-").isdigit():
        return parts[0], _parse_label(parts[1], line)
    return stripped, None


def _parse_label(text: str, line: str) -> int:
    try:
        label = int(text)
    except ValueError:
        raise DataError(f"label must be an integer >= 0, got {text!r} in line {line!r}") from None
    if label < 0:
        raise DataError(f"label must be an integer >= 0, got {label} in line {line!r}")
    return label
