"""CIFAR-10/100 from the official binary or Python (pickle) files, read without running code."""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from oodprobe.data.arrays import ArrayImageDataset
from oodprobe.data.builtin import data_home
from oodprobe.errors import DataError

CifarVariant = Literal["cifar10", "cifar100"]
_RECORD_PIXELS = 3072  # 32×32 pixels × 3 planes (all red, then green, then blue)

# Folder names of the official archives (and of torchvision's download), per variant/format.
_FOLDERS = {
    ("cifar10", "bin"): "cifar-10-batches-bin",
    ("cifar10", "py"): "cifar-10-batches-py",
    ("cifar100", "bin"): "cifar-100-binary",
    ("cifar100", "py"): "cifar-100-python",
}
_BIN_FILES = {
    ("cifar10", "train"): [f"data_batch_{i}.bin" for i in range(1, 6)],
    ("cifar10", "test"): ["test_batch.bin"],
    ("cifar100", "train"): ["train.bin"],
    ("cifar100", "test"): ["test.bin"],
}
_PY_FILES = {
    ("cifar10", "train"): [f"data_batch_{i}" for i in range(1, 6)],
    ("cifar10", "test"): ["test_batch"],
    ("cifar100", "train"): ["train"],
    ("cifar100", "test"): ["test"],
}


def _numpy_reconstruct() -> Callable[..., Any]:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR's Python batches: allows numpy arrays and nothing else callable.

    A pickle can name any importable function and call it while loading (``os.system`` …);
    this one resolves only the globals those files need and refuses every other name.
    """

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            # Python 3 pickles of bytes at protocol < 3 spell them _codecs.encode(text, 'latin1').
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        if module == "_codecs":
            import codecs

            return codecs.encode
        return np.ndarray if name == "ndarray" else _plain_dtype


def _plain_dtype(*args: Any) -> np.dtype[Any]:
    """``numpy.dtype`` for unpickling, refusing object dtypes (CIFAR holds only bytes)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("refused object array")
    return dtype


def load_pickle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load one CIFAR Python-format file with :class:`RestrictedUnpickler`; keys become str."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        # latin1 is what NumPy recommends for arrays pickled by Python 2 (the official files).
        loaded = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as error:
        raise DataError(f"refused to load {path}: {error} (not a CIFAR batch file)") from None
    except Exception as error:  # a malformed pickle can raise almost anything
        raise DataError(f"cannot load {path}: {type(error).__name__}: {error}") from None
    if not isinstance(loaded, dict):
        raise DataError(f"{path} holds a {type(loaded).__name__}, expected a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in loaded.items()}


def _names(values: Any, where: Path) -> tuple[str, ...]:
    if not isinstance(values, list) or not values:
        raise DataError(f"{where}: class names missing or not a list")
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in values)


def _planes_to_images(rows: np.ndarray) -> np.ndarray:
    """``(N, 3072)`` channel-planar rows → ``(N, 32, 32, 3)`` RGB images."""
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def find_cifar(
    variant: CifarVariant, root: str | os.PathLike[str] | None = None
) -> tuple[Path, str] | None:
    """``(folder, "bin"|"py")`` of the first CIFAR copy found in ``root`` or the data folder."""
    base = Path(root) if root is not None else data_home()
    for fmt in ("bin", "py"):
        needed = (_BIN_FILES if fmt == "bin" else _PY_FILES)[(variant, "test")]
        for folder in (base / _FOLDERS[(variant, fmt)], base):
            if all((folder / name).is_file() for name in needed):
                return folder, fmt
    return None


def load_cifar(
    variant: CifarVariant,
    split: str,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    label_type: Literal["fine", "coarse"] = "fine",
) -> ArrayImageDataset:
    """CIFAR-10 or CIFAR-100 (fine labels by default): train 50,000 / test 10,000, 32×32 RGB.

    Reads the official binary (``cifar-10-batches-bin``, ``cifar-100-binary``) or Python
    (``cifar-10-batches-py``, ``cifar-100-python``) folders from ``root`` (the folder itself or
    its parent), else from ``$OODPROBE_DATA``. ``download=True`` fetches the Python format with
    torchvision into that folder when nothing is found.
    """
    found = find_cifar(variant, root)
    if found is None and download:
        from torchvision import datasets

        target = Path(root) if root is not None else data_home()
        (datasets.CIFAR10 if variant == "cifar10" else datasets.CIFAR100)(
            str(target), train=True, download=True
        )
        found = find_cifar(variant, target)
    if found is None:
        folders = " or ".join(_FOLDERS[(variant, fmt)] for fmt in ("bin", "py"))
        where = root if root is not None else f"{data_home()} ($OODPROBE_DATA)"
        raise DataError(
            f"{variant} not found in {where}: extract the official archive there (a folder "
            f"{folders}), pass root=FOLDER, or pass download=True (--download)"
        )
    folder, fmt = found
    if fmt == "bin":
        images, labels, class_names = _read_binary(variant, folder, split, label_type)
    else:
        images, labels, class_names = _read_python(variant, folder, split, label_type)
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataError(f"{folder}: labels outside 0..{len(class_names) - 1}")
    return ArrayImageDataset(f"{variant}:{split}", images, labels, class_names)


def _read_binary(
    variant: CifarVariant, folder: Path, split: str, label_type: str
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    label_bytes = 1 if variant == "cifar10" else 2
    record = label_bytes + _RECORD_PIXELS
    chunks = []
    for name in _BIN_FILES[(variant, split)]:
        path = folder / name
        try:
            raw = np.fromfile(path, dtype=np.uint8)
        except OSError as error:
            raise DataError(f"cannot read {path}: {error.strerror or error}") from None
        if raw.size == 0 or raw.size % record:
            raise DataError(f"{path}: size {raw.size} is not a multiple of {record}-byte records")
        chunks.append(raw.reshape(-1, record))
    table = np.concatenate(chunks)
    # CIFAR-100 records start with the coarse label, then the fine one.
    column = 0 if variant == "cifar10" or label_type == "coarse" else 1
    labels = table[:, column].astype(np.int64)
    if variant == "cifar10":
        names_file = folder / "batches.meta.txt"
    else:
        names_file = folder / f"{label_type}_label_names.txt"
    try:
        lines = names_file.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise DataError(f"cannot read class names {names_file}: {error.strerror}") from None
    class_names = tuple(line.strip() for line in lines if line.strip())
    return _planes_to_images(table[:, label_bytes:]), labels, class_names


def _read_python(
    variant: CifarVariant, folder: Path, split: str, label_type: str
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    label_key = "labels" if variant == "cifar10" else f"{label_type}_labels"
    rows, labels = [], []
    for name in _PY_FILES[(variant, split)]:
        path = folder / name
        batch = load_pickle(path)
        data, batch_labels = batch.get("data"), batch.get(label_key)
        if (
            not isinstance(data, np.ndarray)
            or data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[1] != _RECORD_PIXELS
        ):
            raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, {_RECORD_PIXELS})")
        if not isinstance(batch_labels, list | np.ndarray) or len(batch_labels) != len(data):
            raise DataError(f"{path}: {label_key!r} missing or not one per image")
        rows.append(data)
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    meta_path = folder / ("batches.meta" if variant == "cifar10" else "meta")
    meta = load_pickle(meta_path)
    names_key = "label_names" if variant == "cifar10" else f"{label_type}_label_names"
    class_names = _names(meta.get(names_key), meta_path)
    return _planes_to_images(np.concatenate(rows)), np.concatenate(labels), class_names
