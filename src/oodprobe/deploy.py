"""Deployment: fit a detector on ID images with a calibrated threshold; score new images with it.

The threshold is calibrated on held-out ID images (never seen by ``fit``) so that a chosen
fraction of in-distribution images is accepted: ``accept = score >= threshold``. The saved file
names the encoder (and its cache id, so a change of weights is caught) next to the detector.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oodprobe.benchmark import build_detector, check_compatibility, detector_input
from oodprobe.benchmark_spec import BenchmarkSpec, DataSpec, DetectorSpec, validate
from oodprobe.errors import InvalidParameterError

DEPLOYMENT_VERSION = 1


def calibrate_threshold(id_scores: np.ndarray, keep: float) -> float:
    """The largest threshold that accepts at least ``keep`` of ``id_scores`` (score >= t)."""
    if not 0 < keep <= 1:
        raise InvalidParameterError(f"keep must be in (0, 1], got {keep}")
    ordered = np.sort(np.asarray(id_scores, dtype=np.float64))[::-1]
    return float(ordered[max(0, math.ceil(keep * len(ordered)) - 1)])


@dataclass
class Deployment:
    """A fitted detector with its encoder and calibrated threshold."""

    detector: Any
    encoder: str
    encoder_cache_id: str
    threshold: float
    keep: float
    metadata: dict[str, Any]

    def save(self, path: str | os.PathLike[str]) -> Path:
        from oodprobe.detectors import save_detector

        return save_detector(self.detector, path, metadata=self.metadata)


def fit_deployment(
    source: DataSpec,
    encoder_name: str,
    detector: DetectorSpec,
    *,
    keep: float = 0.95,
    holdout: float = 0.2,
    seed: int = 0,
    class_names: list[str] | None = None,
    cache_root: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> Deployment:
    """Fit ``detector`` on ID images, holding ``holdout`` of them out to calibrate a threshold."""
    from oodprobe.encoders import TextImageEncoder, create_encoder
    from oodprobe.features import extract_features

    if not 0 < holdout < 1:
        raise InvalidParameterError(f"holdout must be in (0, 1), got {holdout}")
    if not 0 < keep <= 1:
        raise InvalidParameterError(f"keep must be in (0, 1], got {keep}")
    spec = validate(
        BenchmarkSpec(
            name="deploy",
            id_train=source,
            id_test=source,
            ood=(source,),
            encoders=(encoder_name,),
            detectors=(detector,),
            class_names=tuple(class_names) if class_names else None,
        )
    )
    dataset = source.create()
    encoder = create_encoder(encoder_name)
    check_compatibility(spec, dataset.labels is not None, {encoder_name: encoder})
    features = extract_features(
        dataset, encoder, cache_root=cache_root, device=device, progress=progress
    )
    n_rows = len(features)
    n_holdout = round(holdout * n_rows)
    if n_holdout < 1 or n_rows - n_holdout < 2:
        raise InvalidParameterError(
            f"{source.label} has {n_rows} usable images: too few to hold out {holdout:.0%} for "
            f"calibration and fit on the rest"
        )
    order = np.random.default_rng(seed).permutation(n_rows)
    calibration_rows, fit_rows = np.sort(order[:n_holdout]), np.sort(order[n_holdout:])
    class_embeddings = None
    if isinstance(encoder, TextImageEncoder):
        from oodprobe.encoders.text import compute_class_embeddings

        names = class_names or dataset.class_names
        if names:
            class_embeddings = compute_class_embeddings(encoder, list(names))
    model = build_detector(detector, encoder, class_embeddings)
    input_name = type(model).input_array
    array = detector_input(model, features)
    labels = None
    if type(model).requires_labels:
        labels = features.labels[fit_rows] if features.labels is not None else None
    model.fit(array[fit_rows], labels)
    calibration_scores = model.score_samples(array[calibration_rows])
    threshold = calibrate_threshold(calibration_scores, keep)
    metadata = {
        "deployment_version": DEPLOYMENT_VERSION,
        "encoder": encoder.name,
        "encoder_cache_id": encoder.cache_id,
        "input_array": input_name,
        "threshold": threshold,
        "keep": keep,
        "holdout": holdout,
        "seed": seed,
        "n_fit": len(fit_rows),
        "n_calibration": len(calibration_rows),
        "calibration_acceptance": float(np.mean(calibration_scores >= threshold)),
        "id_source": source.label,
        "id_fingerprint": dataset.fingerprint(),
        "detector_label": detector.display,
    }
    return Deployment(model, encoder.name, encoder.cache_id, threshold, keep, metadata)


@dataclass
class ScoredImages:
    """Scores and accept/reject decisions for a set of images."""

    sources: list[str]
    scores: np.ndarray
    accepted: np.ndarray
    threshold: float
    skipped: list[Any]

    def write_csv(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["source", "score", "decision", "threshold"])
            for source, score, accepted in zip(
                self.sources, self.scores, self.accepted, strict=True
            ):
                writer.writerow(
                    [
                        source,
                        repr(float(score)),
                        "accept" if accepted else "reject",
                        repr(self.threshold),
                    ]
                )
            for item in self.skipped:
                writer.writerow([item.source, "", f"skipped: {item.reason}", repr(self.threshold)])
        return path


def score_with_deployment(
    detector_path: str | os.PathLike[str],
    source: DataSpec,
    *,
    threshold: float | None = None,
    cache_root: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> ScoredImages:
    """Score images with a saved deployment; ``threshold`` overrides the calibrated one."""
    from oodprobe.detectors import load_detector_with_metadata
    from oodprobe.encoders import create_encoder
    from oodprobe.errors import DetectorFileError
    from oodprobe.features import extract_features

    detector, metadata = load_detector_with_metadata(detector_path)
    if metadata.get("deployment_version") != DEPLOYMENT_VERSION:
        raise DetectorFileError(
            f"{detector_path} holds a detector without deployment information; create it with "
            f"'oodprobe fit'"
        )
    encoder = create_encoder(metadata["encoder"])
    if encoder.cache_id != metadata["encoder_cache_id"]:
        raise InvalidParameterError(
            f"the encoder {metadata['encoder']!r} on this machine differs from the one the "
            f"detector was fitted with (weights or preprocessing changed); refit with "
            f"'oodprobe fit'"
        )
    dataset = source.create()
    features = extract_features(
        dataset, encoder, cache_root=cache_root, device=device, progress=progress
    )
    scores = detector.score_samples(detector_input(detector, features))
    cut = float(metadata["threshold"] if threshold is None else threshold)
    return ScoredImages(
        sources=[dataset.describe(int(index)) for index in features.indices],
        scores=scores,
        accepted=scores >= cut,
        threshold=cut,
        skipped=features.skipped,
    )
