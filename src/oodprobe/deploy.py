"""Deployment: fit a detector on ID images with a calibrated threshold; score new images with it.

The threshold is calibrated on held-out ID images (never seen by ``fit``) so that a chosen
fraction of in-distribution images is accepted: ``accept = score >= threshold`` (scores: higher =
more in-distribution). Every argument is checked before any image is decoded.

The saved file records, next to the detector and the threshold, the encoder: its name, its
``cache_id`` (a digest of the library versions, preprocessing and either the hub tag or the
weight file's path, size and mtime), the sha256 of its local weight file(s) where it has any
(``encoder_weights_sha256``; ``None`` for hub tags, whose files the library resolves in its
own cache), and ``encoder_portable_id`` (``cache_id`` with the weights named by that digest, so
the file still applies on another machine with the same weights and libraries).
``score`` refuses an encoder whose weight digest or portable id differ.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from oodprobe.errors import DetectorFileError, InvalidParameterError
from oodprobe.files import atomic_write

if TYPE_CHECKING:
    from oodprobe.benchmark_spec import DataSpec, DetectorSpec
    from oodprobe.data.base import ImageDataset, SkippedImage
    from oodprobe.detectors import Detector
    from oodprobe.encoders import ImageEncoder

DEPLOYMENT_VERSION = 2
# version 1 files (no weight digest) are still read: their encoder is compared by cache_id
_READABLE_VERSIONS = (1, 2)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def calibrate_threshold(id_scores: np.ndarray, keep: float) -> float:
    """The largest threshold that accepts at least ``keep`` of ``id_scores`` (score >= t)."""
    _check_fraction("keep", keep, closed=True)
    ordered = np.sort(np.asarray(id_scores, dtype=np.float64))[::-1]
    if len(ordered) == 0 or not np.isfinite(ordered).all():
        raise InvalidParameterError(
            f"calibration needs finite ID scores, got {len(ordered)} scores with "
            f"{int((~np.isfinite(ordered)).sum())} non-finite"
        )
    return float(ordered[max(0, math.ceil(keep * len(ordered)) - 1)])


@dataclass
class Deployment:
    """A fitted detector with its encoder, calibrated threshold and the images it skipped."""

    detector: Detector
    encoder: str
    encoder_cache_id: str
    threshold: float
    keep: float
    metadata: dict[str, Any]
    skipped: list[SkippedImage] = field(default_factory=list)
    key: bytes | None = field(default=None, repr=False)

    def save(self, path: str | os.PathLike[str], *, key: bytes | None = None) -> Path:
        """Write the detector file (atomic); ``key`` (else the fit's key, else
        ``$OODPROBE_DETECTOR_KEY``) adds an HMAC a keyed load verifies."""
        from oodprobe.detectors import save_detector

        return save_detector(
            self.detector, path, metadata=self.metadata, key=key if key is not None else self.key
        )


def fit_deployment(
    source: DataSpec | ImageDataset,
    encoder_name: str,
    detector: DetectorSpec,
    *,
    keep: float = 0.95,
    holdout: float = 0.2,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    prompts: str | Sequence[str] = "ensemble",
    cache_root: str | os.PathLike[str] | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    download: bool = False,
    key: bytes | None = None,
    progress: bool = True,
) -> Deployment:
    """Fit ``detector`` on ID images, holding ``holdout`` of them out to calibrate a threshold.

    ``source`` is a DataSpec (or an ImageDataset); ``class_names`` and ``prompts`` (a named
    prompt set or a list of ``{}`` templates) feed the text detectors (MCM, PLP) and zero-shot
    heads, class names defaulting to the dataset's. A post-hoc detector's head (its
    constructor arrays, so saved in the file) is the encoder's classifier, a probe fitted on
    the fit rows (never the calibration rows), or the zero-shot head. ``key`` is kept for
    :meth:`Deployment.save`. Everything is validated before any image is decoded: detector name
    and parameters, ``keep``, ``holdout``, ``seed``, device, precision, batch size, workers, the
    encoder name and the detector's compatibility with it and with the data (a head included).
    """
    from oodprobe.detectors.base import resolve_detector_key
    from oodprobe.encoders import create_encoder, encoder_name_traits
    from oodprobe.features import extract_features
    from oodprobe.pipeline import (
        build_detector,
        check_compatibility,
        check_detector_specs,
        compute_text_arrays,
        detector_input,
        fit_labels,
        head_sources,
        id_class_names,
        member_specs,
        needs_text,
    )

    # -- everything that needs no data or model --------------------------------------------
    check_detector_specs([detector])
    _check_fraction("keep", keep, closed=True)
    _check_fraction("holdout", holdout, closed=False)
    _check_int("seed", seed, minimum=0)
    _check_run_options(device, precision, batch_size, num_workers)
    if not isinstance(encoder_name, str):
        raise InvalidParameterError(
            f"the encoder must be a name such as 'efficientnet-lite0', got {encoder_name!r}"
        )
    encoder_name_traits(encoder_name)  # an unknown name fails here, before anything is built
    names = _check_class_names(class_names)
    _check_prompts(prompts)
    resolve_detector_key(key)
    # what the encoder's name tells (a text tower, logits), before the data is even listed
    by_name: dict[str, Any] = {encoder_name: None}
    check_compatibility([detector], labelled=True, id_label="", encoders=by_name)
    # -- the data (a listing, no decoding), then the model ------------------------------------
    dataset, label = _create(source, download)
    labelled = dataset.labels is not None
    check_compatibility([detector], labelled=labelled, id_label=label, encoders=by_name)
    encoder = create_encoder(encoder_name)
    check_compatibility(
        [detector], labelled=labelled, id_label=label, encoders={encoder_name: encoder}
    )
    class_embeddings = None
    if needs_text([detector]):  # before extraction: a missing class list fails now
        class_embeddings = compute_text_arrays(
            encoder,
            id_class_names(names, dataset),
            prompts,
            [detector],
            cache_root=cache_root,
            progress=progress,
            device=device,
        )
    # a post-hoc detector's head (an ensemble member's too) may be fitted on the training rows:
    # built once they are known; any other detector now, before extraction
    model = None
    if not head_sources(detector) and not member_specs(detector):
        model = build_detector(detector, encoder, class_embeddings)
    features = extract_features(
        dataset,
        encoder,
        cache_root=cache_root,
        device=device,
        precision=precision,  # type: ignore[arg-type]
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
    )
    n_rows = len(features)
    n_holdout = round(holdout * n_rows)
    if n_holdout < 1 or n_rows - n_holdout < 2:
        raise InvalidParameterError(
            f"{label} has {n_rows} usable images: too few to hold out {holdout:.0%} for "
            f"calibration and fit on the rest"
        )
    order = np.random.default_rng(seed).permutation(n_rows)
    calibration_rows, fit_rows = np.sort(order[:n_holdout]), np.sort(order[n_holdout:])
    if model is None:  # the head (a probe's: fitted on the fit rows only) goes into the file
        model = build_detector(detector, encoder, class_embeddings, train=features.subset(fit_rows))
    array = detector_input(model, features)
    fit_part = None if features.labels is None else features.labels[fit_rows]
    labels = fit_labels(model, detector, fit_part)
    model.fit(array[fit_rows], labels)
    calibration_scores = model.score_samples(array[calibration_rows])
    threshold = calibrate_threshold(calibration_scores, keep)
    metadata = {
        "deployment_version": DEPLOYMENT_VERSION,
        "encoder": encoder.name,
        "encoder_cache_id": encoder.cache_id,
        "encoder_portable_id": encoder.portable_id,
        "encoder_weights_sha256": encoder.weights_digest,
        "encoder_identity": _readable_identity(encoder),
        "input_array": type(model).input_array_for(model.get_params(deep=False)),
        "threshold": threshold,
        "keep": float(keep),
        "holdout": float(holdout),
        "seed": int(seed),
        "n_fit": len(fit_rows),
        "n_calibration": len(calibration_rows),
        "n_skipped": len(features.skipped),
        "calibration_acceptance": float(np.mean(calibration_scores >= threshold)),
        "id_source": label,
        "id_fingerprint": dataset.fingerprint(),
        "detector_label": detector.display,
    }
    return Deployment(
        model,
        encoder.name,
        encoder.cache_id,
        threshold,
        float(keep),
        metadata,
        skipped=list(features.skipped),
        key=key,
    )


@dataclass
class ScoredImages:
    """Scores (higher = more in-distribution) and accept/reject decisions for a set of images."""

    sources: list[str]
    scores: np.ndarray
    accepted: np.ndarray
    threshold: float
    skipped: list[SkippedImage]

    def write_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write ``source,score,decision,threshold`` rows (skipped images last), atomically.

        The rows go to a temporary file in the same folder, which then replaces ``path``: a
        failure midway leaves an existing CSV as it was. Any file name is written: UTF-8, and
        what UTF-8 cannot encode (a lone surrogate) as a backslash escape.
        """
        path = Path(path)
        if path.is_dir():
            raise InvalidParameterError(
                f"cannot write the scores to {path}: it is a folder; give a file name such as "
                f"{path / 'scores.csv'}"
            )
        cut = repr(float(self.threshold))

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as handle:
                writer = csv.writer(handle)
                writer.writerow(["source", "score", "decision", "threshold"])
                for source, score, accepted in zip(
                    self.sources, self.scores, self.accepted, strict=True
                ):
                    decision = "accept" if accepted else "reject"
                    writer.writerow([source, repr(float(score)), decision, cut])
                for item in self.skipped:
                    writer.writerow([item.source, "", f"skipped: {item.reason}", cut])

        return atomic_write(path, write)


def score_with_deployment(
    detector_path: str | os.PathLike[str],
    source: DataSpec | ImageDataset,
    *,
    threshold: float | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    download: bool = False,
    key: bytes | None = None,
    progress: bool = True,
) -> ScoredImages:
    """Score images with a saved deployment; ``threshold`` overrides the calibrated one.

    With ``key`` (or ``$OODPROBE_DETECTOR_KEY``) the file's HMAC is verified. The file and
    its deployment metadata are validated, and the encoder compared with the one the detector
    was fitted with (weight digest, then portable id), before any image is decoded.
    """
    from oodprobe.detectors import load_detector_with_metadata
    from oodprobe.encoders import create_encoder
    from oodprobe.features import extract_features
    from oodprobe.pipeline import detector_input

    if threshold is not None and not _is_finite_number(threshold):
        raise InvalidParameterError(f"threshold must be a finite number, got {threshold!r}")
    _check_run_options(device, precision, batch_size, num_workers)
    detector, metadata = load_detector_with_metadata(detector_path, key=key)
    array = type(detector).input_array_for(detector.get_params(deep=False))
    info = check_deployment_metadata(metadata, detector_path, array)
    dataset, _ = _create(source, download)
    encoder = create_encoder(info["encoder"])
    check_same_encoder(encoder, info)
    features = extract_features(
        dataset,
        encoder,
        cache_root=cache_root,
        device=device,
        precision=precision,  # type: ignore[arg-type]
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
    )
    scores = detector.score_samples(detector_input(detector, features))
    cut = float(info["threshold"] if threshold is None else threshold)
    return ScoredImages(
        sources=[dataset.describe(int(index)) for index in features.indices],
        scores=scores,
        accepted=scores >= cut,
        threshold=cut,
        skipped=list(features.skipped),
    )


def check_deployment_metadata(
    metadata: Mapping[str, Any], path: str | os.PathLike[str], input_array: str | None = None
) -> dict[str, Any]:
    """The deployment metadata of a loaded detector file, each value checked (one-line errors).

    Raises DetectorFileError for a file without deployment information, or with a value of the
    wrong type or range (a NaN threshold would silently reject every image).
    """
    version: Any = metadata.get("deployment_version")
    if version is None:
        raise DetectorFileError(
            f"{path} holds a detector without deployment information; create it with 'oodprobe fit'"
        )
    if isinstance(version, bool) or version not in _READABLE_VERSIONS:
        raise DetectorFileError(
            f"{path} has deployment version {version!r}; this oodprobe reads versions "
            f"{', '.join(map(str, _READABLE_VERSIONS))}; refit with 'oodprobe fit'"
        )

    def bad(name: str, expected: str) -> DetectorFileError:
        value = " ".join(repr(metadata.get(name, "(missing)")).split())[:60]
        return DetectorFileError(
            f"{path} has an invalid deployment {name}: expected {expected}, got {value}; refit "
            f"with 'oodprobe fit'"
        )

    for name in ("encoder", "encoder_cache_id"):
        if not isinstance(metadata.get(name), str) or not metadata[name]:
            raise bad(name, "a non-empty string")
    if not _is_finite_number(metadata.get("threshold")):
        raise bad("threshold", "a finite number")
    keep: Any = metadata.get("keep")
    if not _is_finite_number(keep) or not 0 < keep <= 1:
        raise bad("keep", "a number in (0, 1]")
    if "input_array" in metadata and metadata["input_array"] not in ("features", "logits"):
        raise bad("input_array", "'features' or 'logits'")
    if input_array is not None and metadata.get("input_array", input_array) != input_array:
        raise bad("input_array", f"{input_array!r}, what the saved detector scores")
    if version >= 2:
        if not isinstance(metadata.get("encoder_portable_id"), str):
            raise bad("encoder_portable_id", "a string")
        if not isinstance(metadata.get("encoder_identity", {}), dict):
            raise bad("encoder_identity", "a JSON object")
        digest = metadata.get("encoder_weights_sha256")
        if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise bad("encoder_weights_sha256", "null or 64 lowercase hex digits")
    return dict(metadata)


def check_same_encoder(encoder: ImageEncoder, info: Mapping[str, Any]) -> None:
    """Refuse an encoder whose weights or preprocessing differ from the fitted one's."""
    name = info["encoder"]
    recorded = info.get("encoder_weights_sha256")
    if recorded is not None:
        current = encoder.weights_digest
        if current is not None and current != recorded:
            raise InvalidParameterError(
                f"the weights of encoder {name!r} on this machine (sha256 {current[:16]}…) are "
                f"not the ones the detector was fitted with (sha256 {recorded[:16]}…); use those "
                f"weights or refit with 'oodprobe fit'"
            )
    if "encoder_portable_id" in info:
        same, what = encoder.portable_id == info["encoder_portable_id"], "preprocessing, library"
    else:  # version 1: the cache id (weight files named by path, size and mtime)
        same, what = encoder.cache_id == info["encoder_cache_id"], "weights, preprocessing, library"
    if not same:
        raise InvalidParameterError(
            f"the encoder {name!r} on this machine differs from the one the detector was fitted "
            f"with ({what} versions or weight source changed); refit with 'oodprobe fit'"
        )


def _readable_identity(encoder: ImageEncoder) -> dict[str, Any]:
    """What names the encoder's weights and code, for people reading the file: library versions,
    model, hub tag or revision, weight file names and sizes (not this machine's folder)."""
    identity = {key: value for key, value in encoder.identity.items() if key != "weights_path"}
    return dict(json.loads(json.dumps(identity, sort_keys=True, default=str)))


def _create(source: Any, download: bool) -> tuple[Any, str]:
    """(dataset, label) of a DataSpec (built, downloading if allowed) or an ImageDataset."""
    if hasattr(source, "create"):
        return source.create(download), str(source.label)
    from oodprobe.data.base import ImageDataset

    if not isinstance(source, ImageDataset):
        raise InvalidParameterError(
            f"the images must be a DataSpec or an ImageDataset, got {type(source).__name__}"
        )
    return source, str(getattr(source, "name", "images"))


def _check_run_options(
    device: str, precision: str, batch_size: int, num_workers: int | None
) -> None:
    from oodprobe.features import resolve_precision, select_device
    from oodprobe.pipeline import check_device

    check_device(device)
    resolve_precision(precision, select_device(device))
    _check_int("batch_size", batch_size, minimum=1)
    if num_workers is not None:
        _check_int("num_workers", num_workers, minimum=0)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidParameterError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_fraction(name: str, value: Any, *, closed: bool) -> None:
    """``value`` in (0, 1] (``closed``) or (0, 1)."""
    upper_ok = _is_finite_number(value) and (value <= 1 if closed else value < 1)
    if not upper_ok or not value > 0:
        interval = "(0, 1]" if closed else "(0, 1)"
        raise InvalidParameterError(f"{name} must be a number in {interval}, got {value!r}")


def _check_class_names(class_names: Sequence[str] | None) -> list[str] | None:
    if class_names is None:
        return None
    if isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names):
        raise InvalidParameterError(
            f"class_names must be a list of strings, got {class_names!r:.80}"
        )
    if not class_names:
        raise InvalidParameterError("class_names must not be empty; omit it to use the data's")
    return list(class_names)


def _check_prompts(prompts: str | Sequence[str]) -> None:
    from oodprobe.encoders.text import PROMPT_SETS

    if isinstance(prompts, str):
        if prompts not in PROMPT_SETS:
            raise InvalidParameterError(
                f"prompts must be one of {', '.join(PROMPT_SETS)} or a list of templates, "
                f"got {prompts!r}"
            )
        return
    if not prompts or not all(isinstance(p, str) and "{}" in p for p in prompts):
        raise InvalidParameterError(
            f"prompts must be a non-empty list of templates each containing '{{}}', got "
            f"{list(prompts)!r:.80}"
        )


def _is_finite_number(value: Any) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(float(value))
    )
