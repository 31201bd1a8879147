"""Built-in offline datasets: sizes, classes, fixed splits, pixels, fingerprints, pickling."""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from oodprobe.data import (
    DATASETS,
    ArrayImageDataset,
    builtin,
    create_dataset,
    stable_keys,
    stratified_split,
)
from oodprobe.errors import DataError

FASHION = builtin.find_fashion_mnist()


def counts(dataset: object) -> list[int]:
    labels = dataset.labels  # type: ignore[attr-defined]
    return np.bincount(labels, minlength=10).tolist()


def pixel_rows(dataset: ArrayImageDataset) -> set[bytes]:
    return {np.asarray(dataset.images[i]).tobytes() for i in range(len(dataset))}


def test_stable_keys_never_change() -> None:
    # Splits and subsamples derive from these; a change would silently reshuffle every split.
    assert stable_keys(3, 0).tolist() == [
        16294208416658607535,
        7960286522194355700,
        487617019471545679,
    ]
    assert stable_keys(2, 1, salt=2).tolist() != stable_keys(2, 1, salt=1).tolist()


def test_mnist_5k_split() -> None:
    train = builtin.load_mnist_5k("train")
    test = builtin.load_mnist_5k("test")
    assert (len(train), len(test)) == (4000, 1000)
    assert counts(train) == [400] * 10 and counts(test) == [100] * 10
    assert train.class_names is not None
    assert " ".join(train.class_names) == "zero one two three four five six seven eight nine"
    assert not pixel_rows(train) & pixel_rows(test)
    assert test.fingerprint() == builtin.load_mnist_5k("test").fingerprint()
    assert test.name == "mnist-5k:test" and test.describe(999) == "mnist-5k:test[999]"
    image = np.asarray(test.load(0))
    assert image.shape == (28, 28, 3) and image.max() == 255


def test_digits_split_and_scaling() -> None:
    train, test = builtin.load_digits_dataset("train"), builtin.load_digits_dataset("test")
    assert (len(train), len(test)) == (DATASETS["digits"].sizes["train"], 359)
    assert len(train) + len(test) == 1797
    from sklearn.datasets import load_digits

    per_class = np.bincount(load_digits().target)
    assert counts(test) == [round(n * 0.2) for n in per_class]
    assert max(int(np.asarray(test.load(i)).max()) for i in range(20)) == 255
    split_train, split_test = stratified_split(load_digits().target, 0.2, builtin.SPLIT_SEED)
    assert not set(split_train) & set(split_test)
    assert sorted([*split_train, *split_test]) == list(range(1797))


def test_skimage_and_sklearn_sets() -> None:
    textures = builtin.load_skimage_textures()
    assert len(textures) == 192 and counts(textures)[:3] == [64, 64, 64]
    assert textures.class_names == ("brick", "grass", "gravel")
    assert textures.load(5).size == (64, 64)
    photos = builtin.load_skimage_photos()
    assert len(photos) == 100 and counts(photos) == [10] * 10
    assert photos.class_names is not None and "cat" in photos.class_names
    assert photos.load(0).size == (512, 512)  # the astronaut, whole
    assert photos.load(1).size == (256, 256)  # then its crops
    faces = builtin.load_lfw_subset()
    assert len(faces) == 200 and counts(faces)[:2] == [100, 100]
    assert faces.load(0).size == (25, 25)
    sample = builtin.load_sklearn_photos()
    assert len(sample) == 32 and sample.class_names == ("china", "flower")
    assert sample.load(0).size == (640, 427) and sample.load(1).size == (128, 128)


def test_array_dataset_subset_copies_only_selected(tmp_path: Path) -> None:
    test = builtin.load_mnist_5k("test")
    part = test.subset([5, 2])
    assert isinstance(part, ArrayImageDataset)
    assert part.describe(0) == "mnist-5k:test[5]"
    assert np.array_equal(np.asarray(part.load(1)), np.asarray(test.load(2)))
    assert len(pickle.dumps(part)) < 10_000
    textures = builtin.load_skimage_textures().subset([191])
    assert textures.labels is not None and textures.labels.tolist() == [2]


def test_pickle_round_trip_of_builtins() -> None:
    for dataset in (
        builtin.load_mnist_5k("test"),
        builtin.load_skimage_photos(),
        builtin.load_skimage_textures().subset([0, 100]),
    ):
        copy = pickle.loads(pickle.dumps(dataset))
        assert copy.fingerprint() == dataset.fingerprint()
        assert np.array_equal(np.asarray(copy.load(1)), np.asarray(dataset.load(1)))


@pytest.mark.skipif(FASHION is None, reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_sizes_read_headers_only() -> None:
    train = builtin.load_fashion_mnist("train")
    test = builtin.load_fashion_mnist("test")
    assert (len(train), len(test)) == (60_000, 10_000)
    assert counts(train) == [6000] * 10 and counts(test) == [1000] * 10
    assert train.class_names is not None and train.class_names[0] == "T-shirt/top"
    assert train._images is None  # pixels are read on first use, not by len()
    # Pickling a lazily read dataset carries the file name, not 47 MB of pixels.
    assert len(pickle.dumps(train)) < 1_000_000


def test_fashion_mnist_from_root(make_idx: Callable[[str, np.ndarray], Path]) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, prefix, n in (("train", "train", 6), ("test", "t10k", 4)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        make_idx(f"fm/fashion-mnist/{prefix}-images-idx3-ubyte.gz", images)
        path = make_idx(f"fm/fashion-mnist/{prefix}-labels-idx1-ubyte", labels)  # not gzipped
        arrays[split] = images, labels
    root = path.parent.parent
    test = builtin.load_fashion_mnist("test", root)
    assert len(test) == 4 and test.labels is not None and test.labels.tolist() == [0, 1, 2, 3]
    assert np.array_equal(np.asarray(test.load(3))[..., 1], arrays["test"][0][3])
    copy = pickle.loads(pickle.dumps(test))
    assert copy.fingerprint() == test.fingerprint()


def test_fashion_mnist_bad_idx(make_idx: Callable[[str, np.ndarray], Path]) -> None:
    path = make_idx("x-idx1-ubyte", np.zeros(3, dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError) as caught:
        builtin.read_idx(path)
    assert str(caught.value) == f"{path}: expected 3 data bytes, found 2"
    path.write_bytes(b"\0\0\x0d\x01" + b"\0" * 8)
    with pytest.raises(DataError) as caught:
        builtin.read_idx(path)
    assert str(caught.value) == f"{path} is not an unsigned-byte idx file (magic 00000d01)"


def test_fashion_mnist_missing_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OODPROBE_DATA", str(tmp_path))
    monkeypatch.setattr(builtin, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    assert not DATASETS["fashion-mnist"].is_available()
    with pytest.raises(DataError) as caught:
        create_dataset("fashion-mnist:train")
    message = str(caught.value)
    assert message.startswith(f"Fashion-MNIST not found (looked in {tmp_path / 'fashion-mnist'}")
    assert "apt-get install dataset-fashion-mnist" in message
    assert "download=True (--download)" in message


def test_lazy_dataset_decodes_in_worker_processes(
    make_idx: Callable[[str, np.ndarray], Path],
) -> None:
    import torch

    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    path = make_idx("idx/images-idx3-ubyte.gz", images)
    dataset = ArrayImageDataset(
        "stand-in", functools.partial(builtin.read_idx, path), None, None, length=5
    )

    class Pixels(torch.utils.data.Dataset[np.ndarray]):
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, index: int) -> np.ndarray:
            return np.asarray(dataset.load(index))

    loader = torch.utils.data.DataLoader(Pixels(), batch_size=5, num_workers=1)
    (batch,) = list(loader)
    assert np.array_equal(batch.numpy()[..., 0], images)
    assert dataset._images is None  # only the worker read the pixels
