"""The image-dataset contract shared by folders, file lists and built-in datasets."""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class SkippedImage:
    """An image that could not be decoded and was left out of an extraction."""

    index: int
    source: str
    reason: str


class ImageDataset(abc.ABC):
    """An ordered, indexable collection of images with optional labels and class names.

    ``load(i)`` returns an RGB ``PIL.Image`` or raises :class:`oodprobe.errors.DataError` whose
    message contains ``describe(i)`` (the file path for file-backed datasets).
    ``fingerprint()`` names the ordered contents: it changes whenever any image would.
    Datasets must be picklable: extraction decodes them in worker processes.
    """

    name: str
    labels: np.ndarray | None = None
    class_names: tuple[str, ...] | None = None

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

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Image.Image:
        return self.parent.load(int(self.indices[index]))

    def describe(self, index: int) -> str:
        return self.parent.describe(int(self.indices[index]))

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.parent.fingerprint().encode())
        digest.update(self.indices.tobytes())
        return digest.hexdigest()
