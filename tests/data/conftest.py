"""Fixtures that write small image files, folders, file lists and CIFAR stand-ins."""

from __future__ import annotations

import gzip
import io
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CIFAR_TRAIN_PER_BATCH = 3
CIFAR_TEST = 4


def solid(
    color: tuple[int, int, int] = (10, 200, 30), size: tuple[int, int] = (8, 6)
) -> Image.Image:
    """A one-colour RGB image (width, height = size)."""
    return Image.new("RGB", size, color)


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    """``image`` saved to bytes in format ``fmt``."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def write_image(path: Path, color: tuple[int, int, int] = (10, 200, 30), size: int = 8) -> Path:
    """Write a solid RGB image; the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    solid(color, (size, size)).save(path)
    return path


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """``root/{cat,dog_breed}`` with nested, upper-case, hidden and non-image entries."""
    root = tmp_path / "pets"
    write_image(root / "cat" / "b.png", (200, 0, 0))
    write_image(root / "cat" / "a.JPG", (190, 0, 0))
    write_image(root / "cat" / "nested" / "c.bmp", (180, 0, 0))
    write_image(root / "cat" / ".hidden.png")
    write_image(root / "cat" / ".thumbs" / "d.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    write_image(root / "dog_breed" / "x.gif", (0, 0, 200))
    write_image(root / ".git" / "y.png")  # hidden folder: not a class
    return root


@pytest.fixture
def flat_folder(tmp_path: Path) -> Path:
    """Three loose images (and a subfolder that a flat folder ignores)."""
    root = tmp_path / "flat"
    for name in ("2.png", "10.png", "1.webp"):
        write_image(root / name)
    write_image(root / "sub" / "z.png")
    return root


@pytest.fixture
def make_idx(tmp_path: Path) -> Callable[[str, np.ndarray], Path]:
    """Write an unsigned-byte idx file (gzipped when the name ends in .gz)."""

    def make(name: str, array: np.ndarray) -> Path:
        header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
        payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(payload) if name.endswith(".gz") else payload)
        return path

    return make


def cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def planar(images: np.ndarray) -> np.ndarray:
    """``(N, 32, 32, 3)`` → CIFAR's ``(N, 3072)`` rows (red plane, green plane, blue plane)."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


class CifarStandIn:
    """Expected contents of a generated CIFAR folder."""

    def __init__(self, folder: Path, train: np.ndarray, test: np.ndarray) -> None:
        self.folder = folder
        self.train_images, self.train_labels = train, np.arange(len(train)) % 3
        self.test_images, self.test_labels = test, (np.arange(len(test)) + 1) % 3
        self.coarse_train = self.train_labels % 2
        self.coarse_test = self.test_labels % 2


def _batches(n_batches: int) -> tuple[np.ndarray, np.ndarray]:
    return cifar_images(CIFAR_TRAIN_PER_BATCH * n_batches, 1), cifar_images(CIFAR_TEST, 2)


def write_cifar_binary(parent: Path, variant: str) -> CifarStandIn:
    """An official-format binary folder with a few records per file."""
    is10 = variant == "cifar10"
    train, test = _batches(5 if is10 else 1)
    folder = parent / ("cifar-10-batches-bin" if is10 else "cifar-100-binary")
    folder.mkdir(parents=True)
    stand_in = CifarStandIn(folder, train, test)

    def records(images: np.ndarray, fine: np.ndarray, coarse: np.ndarray) -> bytes:
        columns = [fine[:, None]] if is10 else [coarse[:, None], fine[:, None]]
        return np.hstack([*columns, planar(images)]).astype(np.uint8).tobytes()

    if is10:
        for b in range(5):
            part = slice(b * CIFAR_TRAIN_PER_BATCH, (b + 1) * CIFAR_TRAIN_PER_BATCH)
            (folder / f"data_batch_{b + 1}.bin").write_bytes(
                records(train[part], stand_in.train_labels[part], stand_in.coarse_train[part])
            )
        (folder / "test_batch.bin").write_bytes(
            records(test, stand_in.test_labels, stand_in.coarse_test)
        )
        (folder / "batches.meta.txt").write_text("airplane\nautomobile\nbird\n\n")
    else:
        (folder / "train.bin").write_bytes(
            records(train, stand_in.train_labels, stand_in.coarse_train)
        )
        (folder / "test.bin").write_bytes(records(test, stand_in.test_labels, stand_in.coarse_test))
        (folder / "fine_label_names.txt").write_text("apple\naquarium_fish\nbaby\n")
        (folder / "coarse_label_names.txt").write_text("fruit\nfish\n")
    return stand_in


def legacy_pickle(value: object) -> bytes:
    """Protocol-0 pickle naming ``numpy.core.multiarray`` like the official (NumPy 1) files."""
    data = pickle.dumps(value, protocol=0)
    return data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar_python(parent: Path, variant: str, *, legacy: bool = False) -> CifarStandIn:
    """An official-format python folder (pickled dicts with bytes keys)."""
    is10 = variant == "cifar10"
    train, test = _batches(5 if is10 else 1)
    folder = parent / ("cifar-10-batches-py" if is10 else "cifar-100-python")
    folder.mkdir(parents=True)
    stand_in = CifarStandIn(folder, train, test)

    def dump(name: str, value: object) -> None:
        data = legacy_pickle(value) if legacy else pickle.dumps(value, protocol=2)
        (folder / name).write_bytes(data)

    def batch(images: np.ndarray, fine: np.ndarray, coarse: np.ndarray) -> dict[bytes, object]:
        if is10:
            return {b"data": planar(images), b"labels": [int(v) for v in fine]}
        return {
            b"data": planar(images),
            b"fine_labels": [int(v) for v in fine],
            b"coarse_labels": [int(v) for v in coarse],
        }

    if is10:
        for b in range(5):
            part = slice(b * CIFAR_TRAIN_PER_BATCH, (b + 1) * CIFAR_TRAIN_PER_BATCH)
            dump(
                f"data_batch_{b + 1}",
                batch(train[part], stand_in.train_labels[part], stand_in.coarse_train[part]),
            )
        dump("test_batch", batch(test, stand_in.test_labels, stand_in.coarse_test))
        dump("batches.meta", {b"label_names": [b"airplane", b"automobile", b"bird"]})
    else:
        dump("train", batch(train, stand_in.train_labels, stand_in.coarse_train))
        dump("test", batch(test, stand_in.test_labels, stand_in.coarse_test))
        dump(
            "meta",
            {
                b"fine_label_names": [b"apple", b"aquarium_fish", b"baby"],
                b"coarse_label_names": [b"fruit", b"fish"],
            },
        )
    return stand_in
