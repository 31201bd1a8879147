"""Detector files: damaged, truncated, foreign, pickled, forged or tampered files fail with exact
messages; the HMAC (with a key) catches what the checksum cannot: a deliberate edit."""

from __future__ import annotations

import hashlib
import hmac
import json
import pickle
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from oodprobe.detectors import load_detector, load_detector_with_metadata, save_detector
from oodprobe.detectors.base import FORMAT_VERSION, KEY_ENV
from oodprobe.detectors.neighbors import KNNDetector
from oodprobe.errors import DetectorFileError, InvalidParameterError

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


# -- forging: what anyone can do to a file without the key -------------------------------------

KEY = b"a secret only the detector's owner holds"


def _reference_content(arrays: dict[str, np.ndarray], header: str) -> list[bytes]:
    """The checksummed bytes, as the format defines them: the header, then for each array in
    name order ``NAME|DTYPE|SHAPE`` and its bytes."""
    parts = [header.encode()]
    for name in sorted(arrays):
        array = arrays[name]
        parts += [f"{name}|{array.dtype.str}|{array.shape}".encode(), array.tobytes()]
    return parts


def forge(
    path: Path,
    edit_header: Callable[[dict[str, Any]], None] = lambda header: None,
    edit_arrays: Callable[[dict[str, np.ndarray]], None] = lambda arrays: None,
) -> None:
    """Edit a detector file and recompute its sha256, as a forger would (keeping its HMAC)."""
    arrays = load_file(str(path))
    metadata = read_metadata(path)
    content = json.loads(metadata["header"])
    edit_header(content)
    edit_arrays(arrays)
    header = json.dumps(content, sort_keys=True)
    metadata["header"] = header
    metadata["sha256"] = hashlib.sha256(b"".join(_reference_content(arrays, header))).hexdigest()
    save_file(arrays, str(path), metadata=metadata)


def _set_k(content: dict[str, Any]) -> None:
    content["params"]["k"] = 4


@pytest.fixture
def signed(cluster_data: ClusterData, tmp_path: Path) -> Path:
    detector = KNNDetector(k=3).fit(cluster_data.train_features)
    return save_detector(detector, tmp_path / "signed.safetensors", key=KEY)


def test_a_signed_file_carries_the_hmac_of_its_content_and_round_trips(
    signed: Path, cluster_data: ClusterData
) -> None:
    metadata = read_metadata(signed)
    arrays = load_file(str(signed))
    mac = hmac.new(KEY, b"".join(_reference_content(arrays, metadata["header"])), "sha256")
    assert metadata["hmac_sha256"] == mac.hexdigest()
    expected = KNNDetector(k=3).fit(cluster_data.train_features)
    for key in (KEY, None):  # with the key: verified; without: checksum only
        loaded = load_detector(signed, key=key)
        np.testing.assert_array_equal(
            loaded.score_samples(cluster_data.ood_features),
            expected.score_samples(cluster_data.ood_features),
        )


def test_a_forged_header_with_a_recomputed_checksum_is_refused_with_the_key(
    signed: Path,
) -> None:
    forge(signed, _set_k)
    # without the key the forgery is accepted: the sha256 detects damage, not tampering
    assert load_detector(signed).get_params()["k"] == 4
    expected = f"{signed} failed its HMAC check: modified, or signed with another key"
    with pytest.raises(DetectorFileError, match=f"^{re.escape(expected)}$"):
        load_detector(signed, key=KEY)


def test_a_wrong_key_is_refused(signed: Path) -> None:
    expected = f"{signed} failed its HMAC check: modified, or signed with another key"
    with pytest.raises(DetectorFileError, match=f"^{re.escape(expected)}$"):
        load_detector(signed, key=b"another key")


def test_a_file_without_hmac_is_refused_when_a_key_is_set(saved: Path) -> None:
    expected = (
        f"{saved} has no HMAC: it was saved without a key, so a key cannot verify it; save it "
        f"again with the key, or load it without one (checksum only)"
    )
    with pytest.raises(DetectorFileError, match=f"^{re.escape(expected)}$"):
        load_detector(saved, key=KEY)


def test_the_key_comes_from_the_environment_when_none_is_passed(
    saved: Path, signed: Path, monkeypatch: pytest.MonkeyPatch, cluster_data: ClusterData
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    load_detector(signed)  # verified with the environment's key
    with pytest.raises(DetectorFileError, match="has no HMAC"):
        load_detector(saved)
    detector = KNNDetector(k=3).fit(cluster_data.train_features)
    path = save_detector(detector, saved.with_name("env.safetensors"))  # signed with it too
    assert "hmac_sha256" in read_metadata(path)
    monkeypatch.setenv(KEY_ENV, "another key")
    with pytest.raises(DetectorFileError, match="failed its HMAC check"):
        load_detector(path)


def test_a_key_that_is_not_bytes_is_refused(saved: Path) -> None:
    with pytest.raises(InvalidParameterError, match=r"^a detector key must be non-empty bytes"):
        load_detector(saved, key="text")  # type: ignore[arg-type]


# -- every loaded value is validated, whatever the digests say ---------------------------------


def test_a_forged_negative_k_is_one_line_naming_the_file(saved: Path) -> None:
    forge(saved, lambda content: content["params"].update(k=-3))
    expected = (
        f"{saved} holds an invalid knn detector: detector 'knn': k must be an integer >= 1, got -3"
    )
    with pytest.raises(DetectorFileError, match=f"^{re.escape(expected)}$"):
        load_detector(saved)


def test_a_forged_unknown_or_missing_parameter_is_refused(saved: Path) -> None:
    forge(saved, lambda content: content["params"].update(kk=3))
    with pytest.raises(DetectorFileError, match=r"unknown parameter\(s\) kk; refit"):
        load_detector(saved)

    def drop(content: dict[str, Any]) -> None:
        del content["params"]["kk"], content["params"]["k"]

    forge(saved, drop)
    expected = (
        f"{saved} does not hold a valid knn detector: missing parameter(s) k; refit and save it"
    )
    with pytest.raises(DetectorFileError, match=f"^{re.escape(expected)}$"):
        load_detector(saved)


def test_a_missing_state_array_is_named_on_load(saved: Path) -> None:
    forge(saved, edit_arrays=lambda arrays: arrays.pop("state.train_features_"))
    expected = (
        f"{saved} holds an invalid knn detector: missing state field train_features_; refit and "
        f"save it"
    )
    with pytest.raises(DetectorFileError, match=f"^{re.escape(expected)}$"):
        load_detector(saved)


def test_a_missing_n_dims_is_named_on_load(saved: Path) -> None:
    forge(saved, lambda content: content["state"].pop("n_dims_"))
    with pytest.raises(DetectorFileError, match=r"missing state field n_dims_; refit and save it$"):
        load_detector(saved)


def test_a_state_of_the_wrong_width_is_refused_on_load(saved: Path) -> None:
    forge(saved, lambda content: content["state"].update(n_dims_=5))  # the features have 6
    with pytest.raises(DetectorFileError, match=r"holds an invalid knn detector: its state does"):
        load_detector(saved)


def test_a_nan_in_a_state_array_is_refused(saved: Path) -> None:
    def poison(arrays: dict[str, np.ndarray]) -> None:
        arrays["state.train_features_"] = arrays["state.train_features_"].copy()
        arrays["state.train_features_"][0, 0] = np.nan

    forge(saved, edit_arrays=poison)
    expected = (
        f"{saved} holds an invalid knn detector: state field train_features_ has non-finite "
        f"values (NaN or infinity)"
    )
    with pytest.raises(DetectorFileError, match=f"^{re.escape(expected)}$"):
        load_detector(saved)


def test_a_state_name_that_is_not_a_fitted_attribute_is_refused(saved: Path) -> None:
    forge(saved, lambda content: content["state"].update(score_samples="x"))
    with pytest.raises(DetectorFileError, match=r"'score_samples' is not a state field$"):
        load_detector(saved)


def test_an_unknown_detector_name_lists_the_known_ones(saved: Path) -> None:
    forge(saved, lambda content: content.update(detector="nope"))
    with pytest.raises(DetectorFileError, match="holds a detector 'nope' this oodprobe does not"):
        load_detector(saved)


def test_a_header_of_the_wrong_shape_is_one_line(saved: Path) -> None:
    forge(saved, lambda content: content.update(params=[1, 2]))
    expected = f"{saved} has an invalid header: 'params' must be a JSON object, got [1, 2]"
    with pytest.raises(DetectorFileError, match=f"^{re.escape(expected)}$"):
        load_detector(saved)


def test_saving_a_nan_in_the_metadata_is_refused(cluster_data: ClusterData, tmp_path: Path) -> None:
    detector = KNNDetector(k=3).fit(cluster_data.train_features)
    with pytest.raises(DetectorFileError, match="not plain JSON with finite numbers"):
        save_detector(detector, tmp_path / "nan.safetensors", metadata={"threshold": np.nan})
    assert not list(tmp_path.iterdir())


def test_a_gaussian_file_from_before_the_covariance_parameter_loads_as_ml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files written before ``covariance`` existed were fitted with 1/n: they load as ``ml``."""
    from oodprobe.detectors import create_detector
    from oodprobe.detectors.gaussian import MahalanobisDetector

    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(120, 6)), np.arange(120) % 3
    fitted = create_detector("mahalanobis", covariance="ml").fit(features, labels)
    real_get_params = MahalanobisDetector.get_params

    def without_covariance(self: Any, deep: bool = True) -> dict[str, Any]:
        params = real_get_params(self, deep=deep)
        params.pop("covariance")
        return params

    monkeypatch.setattr(MahalanobisDetector, "get_params", without_covariance)
    path = save_detector(fitted, tmp_path / "old.safetensors")
    monkeypatch.undo()
    loaded = load_detector(path)
    assert loaded.covariance == "ml"
    np.testing.assert_array_equal(loaded.score_samples(features), fitted.score_samples(features))
