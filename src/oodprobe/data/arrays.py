"""In-memory image datasets and deterministic, version-independent sampling helpers."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from oodprobe.data.base import ImageDataset
from oodprobe.errors import DataError

ImageArrays = np.ndarray | Sequence[np.ndarray]


class ArrayImageDataset(ImageDataset):
    """Images held as uint8 arrays (``H×W`` grey or ``H×W×3`` RGB), optionally as crops.

    ``images`` is an ``(N, H, W[, 3])`` array, a list of arrays of any sizes, or a picklable
    zero-argument callable returning one (read on first use and not pickled, so worker processes
    re-read it instead of receiving a copy). With ``crops`` (an ``(M, 5)`` int array of
    ``source, top, left, height, width``) item ``i`` is that window of ``images[source]``.
    ``origin`` gives the index shown by ``describe`` (``name[origin[i]]``), so subsets still name
    the original position. The fingerprint hashes ``source_name``, the pixels, crops and labels.
    """

    def __init__(
        self,
        name: str,
        images: ImageArrays | Callable[[], np.ndarray],
        labels: np.ndarray | None,
        class_names: Sequence[str] | None,
        *,
        length: int | None = None,
        crops: np.ndarray | None = None,
        origin: np.ndarray | None = None,
    ) -> None:
        self.name = name
        self.source_name = name
        self._loader: Callable[[], np.ndarray] | None = None
        self._images: ImageArrays | None = None
        if callable(images):
            if length is None:
                raise ValueError("a lazily loaded ArrayImageDataset needs its length")
            self._loader = images
        else:
            self._images = images
        self.crops = None if crops is None else np.asarray(crops, dtype=np.int64)
        if self.crops is not None:
            self._length = len(self.crops)
        elif length is not None:
            self._length = length
        else:
            assert self._images is not None
            self._length = len(self._images)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.class_names = None if class_names is None else tuple(class_names)
        self.origin = (
            np.arange(self._length, dtype=np.int64)
            if origin is None
            else np.asarray(origin, dtype=np.int64)
        )
        self._fingerprint: str | None = None

    @property
    def images(self) -> ImageArrays:
        """The pixel arrays (read now if they are loaded lazily)."""
        if self._images is None:
            assert self._loader is not None
            images = self._loader()
            if len(images) != self._length and self.crops is None:
                raise DataError(
                    f"{self.source_name}: expected {self._length} images, read {len(images)}"
                )
            self._images = images
        return self._images

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        if self._loader is not None:
            state["_images"] = None  # workers re-read the file rather than unpickle a copy
        return state

    def __len__(self) -> int:
        return self._length

    def _pixels(self, index: int) -> np.ndarray:
        if not -self._length <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} images")
        if self.crops is None:
            return np.asarray(self.images[index])
        source, top, left, height, width = (int(v) for v in self.crops[index])
        return np.asarray(self.images[source])[top : top + height, left : left + width]

    def load(self, index: int) -> Image.Image:
        pixels = np.ascontiguousarray(self._pixels(index))
        if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
            raise DataError(f"cannot decode {self.describe(index)}: not a uint8 image array")
        return Image.fromarray(pixels).convert("RGB")

    def describe(self, index: int) -> str:
        return f"{self.source_name}[{int(self.origin[index])}]"

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            digest = hashlib.sha256(self.source_name.encode())
            images = self.images
            if isinstance(images, np.ndarray):
                digest.update(repr((images.shape, images.dtype.str)).encode())
                digest.update(np.ascontiguousarray(images).data)
            else:
                for image in images:
                    array = np.ascontiguousarray(image)
                    digest.update(repr((array.shape, array.dtype.str)).encode())
                    digest.update(array.data)
            for extra in (self.crops, self.labels):
                digest.update(b"-" if extra is None else extra.tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """A copy holding only the selected images, so workers receive just those pixels."""
        chosen = np.asarray(indices, dtype=np.int64)
        labels = None if self.labels is None else self.labels[chosen]
        if self.crops is not None:
            images: ImageArrays = self.images
            crops: np.ndarray | None = self.crops[chosen]
        else:
            source = self.images
            images = (
                source[chosen]
                if isinstance(source, np.ndarray)
                else [source[int(i)] for i in chosen]
            )
            crops = None
        result = ArrayImageDataset(
            self.name, images, labels, self.class_names, crops=crops, origin=self.origin[chosen]
        )
        result.source_name = self.source_name
        return result


def stable_keys(count: int, seed: int, salt: int = 0) -> np.ndarray:
    """Pseudo-random uint64 keys for ``range(count)`` (SplitMix64), identical on every platform.

    NumPy's generators may change their streams between versions; splits and subsamples must
    not, or cached features would silently stop matching the images they describe.
    """
    with np.errstate(over="ignore"):
        state = np.arange(count, dtype=np.uint64) + np.uint64(
            (seed * 0x9E3779B97F4A7C15 + salt * 0xBF58476D1CE4E5B9 + 1) % 2**64
        )
        state = state * np.uint64(0x9E3779B97F4A7C15)
        state ^= state >> np.uint64(30)
        state = state * np.uint64(0xBF58476D1CE4E5B9)
        state ^= state >> np.uint64(27)
        state = state * np.uint64(0x94D049BB133111EB)
        state ^= state >> np.uint64(31)
    return state


def sample_per_class(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of up to ``per_class`` images of each label, chosen by ``seed``, in original order.

    Classes with fewer images keep all of them.
    """
    keys = stable_keys(len(labels), seed, salt=1)
    chosen: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen.append(members[np.argsort(keys[members], kind="stable")[:per_class]])
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified ``(train, test)`` indices, each in original order.

    Each class contributes ``round(n_class * test_fraction)`` images to the test part.
    """
    keys = stable_keys(len(labels), seed, salt=2)
    test: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_test = round(len(members) * test_fraction)
        test.append(members[np.argsort(keys[members], kind="stable")[:n_test]])
    is_test = np.zeros(len(labels), dtype=bool)
    if test:
        is_test[np.concatenate(test)] = True
    return np.flatnonzero(~is_test).astype(np.int64), np.flatnonzero(is_test).astype(np.int64)


def grid_crops(source: int, height: int, width: int, size: int, stride: int) -> np.ndarray:
    """``(source, top, left, size, size)`` rows of a regular grid of square windows, row-major."""
    rows = [
        (source, top, left, size, size)
        for top in range(0, height - size + 1, stride)
        for left in range(0, width - size + 1, stride)
    ]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 5)
