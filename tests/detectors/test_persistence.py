"""Detector files: damaged, truncated, foreign or pickled files fail with exact messages."""

from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from oodprobe.detectors import load_detector, load_detector_with_metadata, save_detector
from oodprobe.detectors.base import FORMAT_VERSION
from oodprobe.detectors.neighbors import KNNDetector
from oodprobe.errors import DetectorFileError

from .conftest import ClusterData


@pytest.fixture
def saved(cluster_data: ClusterData, tmp_path: Path) -> Path:
    detector = KNNDetector(k=3).fit(cluster_data.train_features)
    return save_detector(detector, tmp_path / "knn.safetensors", metadata={"threshold": 0.5})


def read_metadata(path: Path) -> dict[str, str]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return dict(json.loads(raw[8 : 8 + length])["__metadata__"])


def test_round_trip_keeps_params_state_and_metadata(saved: Path, cluster_data: ClusterData) -> None:
    detector, metadata = load_detector_with_metadata(saved)
    assert metadata == {"threshold": 0.5}
    assert detector.get_params()["k"] == 3
    assert detector.train_features_.dtype == np.float32
    assert not saved.with_name(saved.name + ".tmp").exists()


def test_a_flipped_byte_in_the_data_fails_the_checksum(saved: Path) -> None:
    raw = bytearray(saved.read_bytes())
    raw[-5] ^= 0x01  # inside the last tensor's data
    saved.write_bytes(bytes(raw))
    expected = f"{saved} failed its checksum: the file is damaged or was modified"
    with pytest.raises(DetectorFileError, match=f"^{re.escape(expected)}$"):
        load_detector(saved)


def test_a_modified_header_fails_the_checksum(saved: Path) -> None:
    arrays = load_file(str(saved))
    metadata = read_metadata(saved)
    metadata["header"] = metadata["header"].replace('"k": 3', '"k": 4')
    save_file(arrays, str(saved), metadata=metadata)
    with pytest.raises(DetectorFileError, match="failed its checksum"):
        load_detector(saved)


def test_a_truncated_file_is_not_readable(saved: Path) -> None:
    saved.write_bytes(saved.read_bytes()[:-100])
    prefix = f"{saved} is not a readable oodprobe detector file ("
    with pytest.raises(DetectorFileError) as error:
        load_detector(saved)
    assert str(error.value).startswith(prefix)
    assert str(error.value).endswith("); save it again")


def test_a_wrong_format_version_says_to_refit(saved: Path) -> None:
    metadata = read_metadata(saved)
    metadata["format_version"] = str(FORMAT_VERSION + 1)
    save_file(load_file(str(saved)), str(saved), metadata=metadata)
    expected = (
        f"{saved} has format version '{FORMAT_VERSION + 1}'; this oodprobe reads version "
        f"{FORMAT_VERSION}; refit and save the detector with this version"
    )
    with pytest.raises(DetectorFileError, match=f"^{re.escape(expected)}$"):
        load_detector(saved)


def test_a_foreign_safetensors_file_is_not_a_detector(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"weight": np.zeros(3, np.float32)}, str(path))
    with pytest.raises(DetectorFileError, match=f"^{re.escape(str(path))} is not an oodprobe"):
        load_detector(path)


def test_a_text_file_is_not_readable(tmp_path: Path) -> None:
    path = tmp_path / "notes.safetensors"
    path.write_text("not a detector\n")
    with pytest.raises(DetectorFileError, match="is not a readable oodprobe detector file"):
        load_detector(path)


class _Exploit:
    """Unpickling this would create a marker file: loading must never unpickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (self.marker.touch, ())


def test_a_pickle_file_is_rejected_without_unpickling(tmp_path: Path) -> None:
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Exploit(proof)))  # the payload does run when unpickled
    assert proof.exists()
    marker = tmp_path / "unpickled"
    path = tmp_path / "detector.pkl"
    path.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(DetectorFileError, match="is not a readable oodprobe detector file"):
        load_detector(path)
    assert not marker.exists()


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(
        DetectorFileError, match=f"^detector file not found: {re.escape(str(path))}$"
    ):
        load_detector(path)
