"""CIFAR loaders on generated stand-ins of the official binary and Python formats."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from oodprobe.data import DATASETS, create_dataset, load_cifar
from oodprobe.data.cifar import load_pickle
from oodprobe.errors import DataError

from .conftest import CifarStandIn, write_cifar_binary, write_cifar_python


def assert_matches(stand_in: CifarStandIn, root: Path, variant: str, **options: object) -> None:
    coarse = options.get("label_type") == "coarse"
    train_labels = stand_in.coarse_train if coarse else stand_in.train_labels
    test_labels = stand_in.coarse_test if coarse else stand_in.test_labels
    for split, images, labels in (
        ("train", stand_in.train_images, train_labels),
        ("test", stand_in.test_images, test_labels),
    ):
        dataset = load_cifar(variant, split, root, **options)  # type: ignore[arg-type]
        assert len(dataset) == len(images)
        assert dataset.labels is not None and dataset.labels.tolist() == labels.tolist()
        for index in (0, len(images) - 1):
            assert np.array_equal(np.asarray(dataset.load(index)), images[index])
        assert dataset.name == f"{variant}:{split}"


def test_cifar10_binary(tmp_path: Path) -> None:
    stand_in = write_cifar_binary(tmp_path, "cifar10")
    assert_matches(stand_in, tmp_path, "cifar10")
    assert_matches(stand_in, stand_in.folder, "cifar10")  # the folder itself works too
    names = load_cifar("cifar10", "test", tmp_path).class_names
    assert names == ("airplane", "automobile", "bird")


def test_cifar100_binary_fine_and_coarse(tmp_path: Path) -> None:
    stand_in = write_cifar_binary(tmp_path, "cifar100")
    assert_matches(stand_in, tmp_path, "cifar100")
    assert_matches(stand_in, tmp_path, "cifar100", label_type="coarse")
    assert load_cifar("cifar100", "test", tmp_path).class_names == (
        "apple",
        "aquarium_fish",
        "baby",
    )
    assert load_cifar("cifar100", "test", tmp_path, label_type="coarse").class_names == (
        "fruit",
        "fish",
    )


@pytest.mark.parametrize("legacy", [False, True], ids=["protocol2", "protocol0-numpy.core"])
def test_cifar10_python(tmp_path: Path, legacy: bool) -> None:
    stand_in = write_cifar_python(tmp_path, "cifar10", legacy=legacy)
    assert_matches(stand_in, tmp_path, "cifar10")
    assert load_cifar("cifar10", "train", tmp_path).class_names == (
        "airplane",
        "automobile",
        "bird",
    )


def test_cifar100_python(tmp_path: Path) -> None:
    stand_in = write_cifar_python(tmp_path, "cifar100", legacy=True)
    assert_matches(stand_in, tmp_path, "cifar100")
    assert_matches(stand_in, tmp_path, "cifar100", label_type="coarse")


def test_registry_and_data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OODPROBE_DATA", str(tmp_path))
    assert not DATASETS["cifar10"].is_available()
    write_cifar_binary(tmp_path, "cifar10")
    assert DATASETS["cifar10"].is_available()
    dataset = create_dataset("cifar10", classes=["bird"])
    assert dataset.name == "cifar10:test[2]"
    assert dataset.labels is not None and dataset.labels.tolist() == [2]


def test_missing_cifar_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_cifar("cifar100", "test", tmp_path)
    assert str(caught.value) == (
        f"cifar100 not found in {tmp_path}: extract the official archive there (a folder "
        "cifar-100-binary or cifar-100-python), pass root=FOLDER, or pass download=True "
        "(--download)"
    )


def test_binary_with_partial_record(tmp_path: Path) -> None:
    stand_in = write_cifar_binary(tmp_path, "cifar10")
    path = stand_in.folder / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError) as caught:
        load_cifar("cifar10", "test", tmp_path)
    assert str(caught.value) == f"{path}: size 12291 is not a multiple of 3073-byte records"


class Exploit:
    """Pickles as a call to os.system: loading it with plain pickle would run a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    stand_in = write_cifar_python(tmp_path, "cifar10")
    marker = tmp_path / "pwned"
    path = stand_in.folder / "test_batch"
    path.write_bytes(pickle.dumps({b"data": Exploit(marker)}, protocol=2))
    with pytest.raises(DataError) as caught:
        load_cifar("cifar10", "test", tmp_path)
    module = os.system.__module__  # "posix" on Linux
    assert str(caught.value) == (
        f"refused to load {path}: refused global {module}.system (not a CIFAR batch file)"
    )
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "refused"),
    [
        (pickle.dumps(print, protocol=2), "refused global __builtin__.print"),
        (pickle.dumps(np.array([1, None], dtype=object)), "refused object array"),
        (b"cposix\nsystem\n(S'true'\ntR.", "refused global posix.system"),
    ],
    ids=["builtin", "object-array", "protocol0-call"],
)
def test_restricted_unpickler_refuses_other_globals(
    tmp_path: Path, payload: bytes, refused: str
) -> None:
    path = tmp_path / "batch"
    path.write_bytes(payload)
    with pytest.raises(DataError) as caught:
        load_pickle(path)
    assert str(caught.value) == f"refused to load {path}: {refused} (not a CIFAR batch file)"


def test_python_batch_with_wrong_contents(tmp_path: Path) -> None:
    stand_in = write_cifar_python(tmp_path, "cifar10")
    path = stand_in.folder / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError) as caught:
        load_cifar("cifar10", "test", tmp_path)
    assert str(caught.value) == f"{path}: 'data' must be a uint8 array of shape (N, 3072)"
