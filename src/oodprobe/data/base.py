"""The image-dataset contract shared by folders, file lists and built-in datasets."""

from __future__ import annotations

import abc
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: ``SkippedImage.index`` of a record made while scanning a folder or file list (a symbolic-link
#: loop, a dangling link, a second link to a counted file): it names no dataset index.
SCAN_INDEX = -1


@dataclass(frozen=True)
class SkippedImage:
    """An image (or a path found while scanning) that was left out of an extraction.

    ``index`` is the dataset index of an image that could not be decoded, or :data:`SCAN_INDEX`
    (-1) for what a folder scan did not count (see ``ImageDataset.scan_skipped``). ``source`` is
    printable text (:func:`printable_path`); ``reason`` a short stable phrase.
    """

    index: int
    source: str
    reason: str


def printable_path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """Any OS path as printable, one-line text that every writer (terminal, CSV, JSON) accepts.

    Bytes that are not UTF-8 (held in ``str`` paths as lone surrogates by Python's
    ``surrogateescape``) become ``\\xNN``; control and other non-printable characters (newline,
    tab, escape …) become ``\\n``, ``\\t``, ``\\x1b`` … ; everything else, spaces, quotes,
    leading dashes and non-ASCII letters included, is kept as it is. Display text only: open
    files by their real path, never by this string.
    """
    name = os.fspath(path)
    if isinstance(name, str):
        try:
            raw = os.fsencode(name)
        except UnicodeEncodeError:  # surrogates that surrogateescape did not make
            raw = name.encode("utf-8", "surrogatepass")
    else:
        raw = name
    text = raw.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    escaped = repr(char)[1:-1]  # '\n', '\t', '\x1b', '\u2028' …
    return escaped if escaped != char else f"\\x{ord(char):02x}"


class ImageDataset(abc.ABC):
    """An ordered, indexable collection of images with optional labels and class names.

    ``load(i)`` returns an RGB ``PIL.Image`` or raises :class:`oodprobe.errors.DataError` whose
    message contains ``describe(i)`` (the file path for file-backed datasets).
    ``describe(i)`` is printable text (:func:`printable_path`) even for file names that are
    not UTF-8 or hold newlines. ``fingerprint()`` names the ordered contents: it changes whenever
    any image would; it is computed once per dataset object (build a new object to see later
    changes on disk). ``scan_skipped`` lists what building the dataset left out without losing
    an image (symbolic-link loops, dangling links, duplicates); extraction reports them in
    ``FeatureSet.skipped``. Datasets must be picklable: extraction decodes them in worker
    processes.
    """

    name: str
    labels: np.ndarray | None = None
    class_names: tuple[str, ...] | None = None
    scan_skipped: tuple[SkippedImage, ...] = ()

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def load(self, index: int) -> Image.Image:
        """Decode image ``index`` as RGB; raise DataError naming ``describe(index)`` on failure."""

    @abc.abstractmethod
    def describe(self, index: int) -> str:
        """Where image ``index`` comes from: a path, or ``name[index]`` for in-memory data."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Hex digest of the ordered contents (paths with size and mtime, or array bytes)."""

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """A view of the images at ``indices`` (in that order), keeping labels and class names."""
        return SubsetDataset(self, np.asarray(indices, dtype=np.int64))


class SubsetDataset(ImageDataset):
    """Images of a parent dataset at the given indices."""

    def __init__(self, parent: ImageDataset, indices: np.ndarray) -> None:
        self.parent = parent
        self.indices = indices
        self.name = parent.name
        self.class_names = parent.class_names
        self.labels = None if parent.labels is None else parent.labels[indices]
        # What the parent's scan left out stays visible through every view of it.
        self.scan_skipped = parent.scan_skipped
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Image.Image:
        return self.parent.load(int(self.indices[index]))

    def describe(self, index: int) -> str:
        return self.parent.describe(int(self.indices[index]))

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            digest = hashlib.sha256(self.parent.fingerprint().encode())
            digest.update(self.indices.tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint
