"""Run a benchmark: extract (cached) → fit each detector once → score every OOD set → metrics.

This is where encoders and detectors meet: detectors see arrays, the runner feeds them the
features (or logits) of each encoder, class embeddings for text detectors, and labels for the
detectors that need them. Results go to an output folder as JSON/CSV, per-sample scores, and a
self-contained HTML report.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oodprobe.benchmark_spec import BenchmarkSpec, DataSpec, DetectorSpec
from oodprobe.errors import DataError, InvalidParameterError

Log = Callable[[str], None]
# result columns; "fpr" is the FPR at the spec's TPR (``tpr`` column), in the named convention
_METRICS = ("auroc", "fpr", "aupr_in", "aupr_out")


@dataclass
class BenchmarkRun:
    """What a run produced: result rows, ID accuracies, and where the files are."""

    spec: BenchmarkSpec
    rows: list[dict[str, Any]]
    id_accuracy: list[dict[str, Any]]
    output_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class _Split:
    """One dataset and its features for the current encoder."""

    spec: DataSpec
    dataset: Any
    features: Any  # FeatureSet


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in (
        "oodprobe",
        "numpy",
        "scikit-learn",
        "torch",
        "torchvision",
        "open_clip_torch",
        "transformers",
        "timm",
        "faiss-cpu",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return versions


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def detector_input(detector: Any, features: Any) -> np.ndarray:
    """The array a detector consumes: the features, or the classifier logits for ``logits``."""
    name = type(detector).input_array
    array = features.arrays.get(name)
    if array is None:
        raise InvalidParameterError(
            f"detector {type(detector).name!r} needs the encoder's {name}, and "
            f"{features.encoder_name!r} has none (it gives: {', '.join(features.arrays)})"
        )
    return np.asarray(array)


def check_compatibility(spec: BenchmarkSpec, labelled: bool, encoders: dict[str, Any]) -> None:
    """Fail fast, before any extraction, on detectors the data or encoders cannot serve."""
    from oodprobe.detectors import DETECTORS
    from oodprobe.encoders import TextImageEncoder

    for detector in spec.detectors:
        cls = DETECTORS[detector.name]
        if cls.requires_labels and not labelled:
            raise InvalidParameterError(
                f"detector {detector.name!r} needs class labels, but the ID training data "
                f"{spec.id_train.label!r} has none; use a folder with one subfolder per class, "
                f"or a label-free detector (knn, deep-knn, gaussian)"
            )
        for name, encoder in encoders.items():
            if cls.requires_text and not isinstance(encoder, TextImageEncoder):
                raise InvalidParameterError(
                    f"detector {detector.name!r} needs a vision-language encoder with a text "
                    f"tower (openclip:…, hf: CLIP/SigLIP), but {name!r} is image-only"
                )
            if cls.input_array not in encoder.outputs:
                raise InvalidParameterError(
                    f"detector {detector.name!r} scores the encoder's {cls.input_array}, and "
                    f"{name!r} gives only: {', '.join(encoder.outputs)}"
                )


def build_detector(spec: DetectorSpec, encoder: Any, class_embeddings: np.ndarray | None) -> Any:
    """Instantiate a detector; text detectors get class embeddings and the image projection."""
    from oodprobe.detectors import DETECTORS, create_detector

    params = dict(spec.params)
    if DETECTORS[spec.name].requires_text:
        projection = encoder.image_projection
        params["class_embeddings"] = class_embeddings
        params["image_projection"] = (
            None if projection is None else projection.detach().float().cpu().numpy()
        )
    return create_detector(spec.name, **params)


def _create(data: DataSpec, role: str, download: bool) -> Any:
    """Build one dataset of the spec; a data error names the role it plays in the benchmark."""
    try:
        return data.create(download)
    except DataError as error:
        raise DataError(f"{role} {data.label!r}: {error}") from error


def run_benchmark(
    spec: BenchmarkSpec,
    output_dir: str | Path,
    *,
    cache_root: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    download: bool = False,
    progress: bool = True,
    log: Log = lambda message: None,
) -> BenchmarkRun:
    """Run every encoder × detector × OOD set of ``spec``; write results and the report."""
    from oodprobe.encoders import create_encoder
    from oodprobe.features import extract_features

    started = time.perf_counter()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    datasets = {
        "id_train": _create(spec.id_train, "ID training set", download),
        "id_test": _create(spec.id_test, "ID test set", download),
    }
    ood_datasets = [_create(ood, "OOD set", download) for ood in spec.ood]
    labelled = datasets["id_train"].labels is not None
    encoders = {name: create_encoder(name) for name in spec.encoders}
    check_compatibility(spec, labelled, encoders)
    rows: list[dict[str, Any]] = []
    id_accuracy: list[dict[str, Any]] = []
    report_parts: list[dict[str, Any]] = []

    def extract(data_spec: DataSpec, dataset: Any, encoder: Any) -> _Split:
        features = extract_features(
            dataset,
            encoder,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            cache_root=cache_root,
            progress=progress,
        )
        origin = (
            "cache" if features.from_cache else f"{features.stats['images_per_second']:.0f} img/s"
        )
        log(
            f"  {data_spec.label}: {len(features)} images ({origin})"
            + (f", {len(features.skipped)} skipped" if features.skipped else "")
        )
        return _Split(data_spec, dataset, features)

    for encoder_name, encoder in encoders.items():
        log(f"[{encoder_name}] extracting features")
        train = extract(spec.id_train, datasets["id_train"], encoder)
        test = extract(spec.id_test, datasets["id_test"], encoder)
        oods = [extract(s, d, encoder) for s, d in zip(spec.ood, ood_datasets, strict=True)]
        class_embeddings = _class_embeddings(spec, encoder, train)
        if train.features.labels is not None and test.features.labels is not None:
            id_accuracy.append(_knn_accuracy(encoder_name, train, test))
        for detector_spec in spec.detectors:
            log(f"[{encoder_name}] {detector_spec.display}")
            part = _evaluate_detector(
                spec, detector_spec, encoder, class_embeddings, train, test, oods
            )
            rows.extend(part["rows"])
            if part.get("accuracy") is not None:
                id_accuracy.append(
                    {
                        "encoder": encoder_name,
                        "method": detector_spec.display,
                        "accuracy": part["accuracy"],
                    }
                )
            report_parts.append(part)
            _write_scores(output, encoder_name, detector_spec.display, test, oods, part)
    run = BenchmarkRun(spec, rows, id_accuracy, output, seconds=time.perf_counter() - started)
    run.files = _write_outputs(run, report_parts, datasets, ood_datasets)
    return run


def _class_embeddings(spec: BenchmarkSpec, encoder: Any, train: _Split) -> np.ndarray | None:
    from oodprobe.detectors import DETECTORS
    from oodprobe.encoders.text import PROMPT_SETS, compute_class_embeddings

    if not any(DETECTORS[d.name].requires_text for d in spec.detectors):
        return None
    names = spec.class_names or train.dataset.class_names
    if not names:
        raise InvalidParameterError(
            "text detectors need class names: set [id].class_names in the config or use a "
            "dataset with named classes"
        )
    prompts = PROMPT_SETS[spec.prompts] if isinstance(spec.prompts, str) else spec.prompts
    return compute_class_embeddings(encoder, list(names), prompts)


def _knn_accuracy(encoder_name: str, train: _Split, test: _Split) -> dict[str, Any]:
    from oodprobe.detectors.neighbors import knn_accuracy

    accuracy = knn_accuracy(
        train.features.features,
        train.features.labels,
        test.features.features,
        test.features.labels,
        k=20,
        temperature=0.02,
    )
    return {
        "encoder": encoder_name,
        "method": "knn classifier (k=20, T=0.02)",
        "accuracy": float(accuracy),
    }


def _evaluate_detector(
    spec: BenchmarkSpec,
    detector_spec: DetectorSpec,
    encoder: Any,
    class_embeddings: np.ndarray | None,
    train: _Split,
    test: _Split,
    oods: list[_Split],
) -> dict[str, Any]:
    from oodprobe.metrics import evaluate, get_convention

    detector = build_detector(detector_spec, encoder, class_embeddings)
    fit_started = time.perf_counter()
    labels = train.features.labels if type(detector).requires_labels else None
    detector.fit(detector_input(detector, train.features), labels)
    fit_seconds = time.perf_counter() - fit_started
    id_scores = detector.score_samples(detector_input(detector, test.features))
    accuracy = None
    if hasattr(detector, "predict") and test.features.labels is not None and labels is not None:
        predictions = detector.predict(detector_input(detector, test.features))
        accuracy = float(np.mean(predictions == test.features.labels))
    convention = get_convention(spec.convention)
    params = {
        key: value
        for key, value in detector.get_params(deep=False).items()
        if not isinstance(value, np.ndarray)
    }
    rows = []
    ood_scores = {}
    for ood in oods:
        scores = detector.score_samples(detector_input(detector, ood.features))
        ood_scores[ood.spec.label] = scores
        result = evaluate(
            id_scores,
            scores,
            convention=convention,
            tpr=spec.tpr,
            bootstrap=spec.bootstrap,
            seed=spec.seed,
        )
        row: dict[str, Any] = {
            "encoder": encoder.name,
            "detector": detector_spec.display,
            "detector_name": detector_spec.name,
            "detector_params": params,
            "ood_set": ood.spec.label,
            "group": ood.spec.group,
            **{name: getattr(result, name) for name in _METRICS},
            **{
                f"{name}_{end}": bound
                for name in _METRICS
                for end, bound in zip(
                    ("low", "high"), result.intervals.get(name, (None, None)), strict=True
                )
            },
            "n_id": result.n_id,
            "n_ood": result.n_ood,
            "convention": convention.name,
            "tpr": spec.tpr,
            "fpr_positive": convention.positive,
            "fpr_rule": convention.rule,
            "aupr_method": convention.aupr_method,
            "bootstrap": spec.bootstrap,
            "fit_seconds": round(fit_seconds, 4),
            "encoder_cache_id": encoder.cache_id,
            "id_train": spec.id_train.label,
            "id_test": spec.id_test.label,
            "id_train_fingerprint": train.dataset.fingerprint(),
            "id_test_fingerprint": test.dataset.fingerprint(),
            "ood_fingerprint": ood.dataset.fingerprint(),
            "n_train": len(train.features),
        }
        if type(detector).requires_text:
            row["prompts"] = spec.prompts if isinstance(spec.prompts, str) else list(spec.prompts)
            row["class_names"] = list(spec.class_names or train.dataset.class_names or [])
        rows.append(row)
    return {
        "encoder": encoder.name,
        "detector": detector_spec.display,
        "rows": rows,
        "id_scores": id_scores,
        "ood_scores": ood_scores,
        "accuracy": accuracy,
        "test": test,
        "oods": oods,
    }


def _write_scores(
    output: Path,
    encoder_name: str,
    detector_label: str,
    test: _Split,
    oods: list[_Split],
    part: dict[str, Any],
) -> None:
    """Per-sample scores: one CSV per encoder × detector (set, index, source, label, score)."""
    import csv

    directory = output / "scores" / _slug(encoder_name)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{_slug(detector_label)}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["set", "role", "index", "source", "label", "score"])
        splits = [(test, "id", part["id_scores"])] + [
            (ood, "ood", part["ood_scores"][ood.spec.label]) for ood in oods
        ]
        for split, role, scores in splits:
            labels = split.features.labels
            for row, (index, score) in enumerate(zip(split.features.indices, scores, strict=True)):
                writer.writerow(
                    [
                        split.spec.label,
                        role,
                        int(index),
                        split.dataset.describe(int(index)),
                        "" if labels is None else int(labels[row]),
                        repr(float(score)),
                    ]
                )


def _galleries(part: dict[str, Any], size: int) -> list[Any]:
    """The OOD images that look most in-distribution, and the ID images that look least."""
    from oodprobe.report.model import Gallery, GalleryImage

    if size <= 0:
        return []
    candidates = [
        (float(score), ood, int(row))
        for ood in part["oods"]
        for row, score in enumerate(part["ood_scores"][ood.spec.label])
    ]
    candidates.sort(key=lambda item: -item[0])
    ood_images = [
        GalleryImage(
            image=ood.dataset.load(int(ood.features.indices[row])),
            caption=ood.dataset.describe(int(ood.features.indices[row])),
            score=score,
        )
        for score, ood, row in candidates[:size]
    ]
    test: _Split = part["test"]
    order = np.argsort(part["id_scores"], kind="stable")[:size]
    id_images = [
        GalleryImage(
            image=test.dataset.load(int(test.features.indices[row])),
            caption=test.dataset.describe(int(test.features.indices[row])),
            score=float(part["id_scores"][row]),
        )
        for row in order
    ]
    return [
        Gallery(
            title=f"OOD images that look most in-distribution — {part['detector']}",
            encoder=part["encoder"],
            detector=part["detector"],
            images=ood_images,
        ),
        Gallery(
            title=f"ID test images that look most out-of-distribution — {part['detector']}",
            encoder=part["encoder"],
            detector=part["detector"],
            images=id_images,
        ),
    ]


def _write_outputs(
    run: BenchmarkRun,
    parts: list[dict[str, Any]],
    datasets: dict[str, Any],
    ood_datasets: list[Any],
) -> dict[str, Path]:
    from oodprobe.metrics import get_convention
    from oodprobe.report import ReportData, ScoreSet, render_html, write_results

    spec = run.spec
    convention = get_convention(spec.convention)
    score_sets = [
        ScoreSet(
            encoder=part["encoder"],
            detector=part["detector"],
            id_scores=part["id_scores"],
            ood_scores=part["ood_scores"],
            ood_groups={ood.label: ood.group for ood in spec.ood},
        )
        for part in parts
    ]
    galleries = [gallery for part in parts for gallery in _galleries(part, spec.gallery_size)]
    provenance = {
        "benchmark": spec.name,
        "description": spec.description,
        "command": " ".join(sys.argv),
        "versions": _versions(),
        "encoders": list(spec.encoders),
        "detectors": [
            {"name": d.name, "params": dict(d.params), "label": d.display} for d in spec.detectors
        ],
        "id_train": {
            "spec": spec.id_train.label,
            "n": len(datasets["id_train"]),
            "fingerprint": datasets["id_train"].fingerprint(),
        },
        "id_test": {
            "spec": spec.id_test.label,
            "n": len(datasets["id_test"]),
            "fingerprint": datasets["id_test"].fingerprint(),
        },
        "ood": [
            {"spec": s.label, "group": s.group, "n": len(d), "fingerprint": d.fingerprint()}
            for s, d in zip(spec.ood, ood_datasets, strict=True)
        ],
        "bootstrap": spec.bootstrap,
        "seconds": round(run.seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    report = ReportData(
        title=f"oodprobe benchmark: {spec.name}",
        rows=run.rows,
        score_sets=score_sets,
        galleries=galleries,
        convention={
            "name": convention.name,
            "positive": convention.positive,
            "rule": convention.rule,
            "aupr_method": convention.aupr_method,
            "description": convention.description,
            "tpr": spec.tpr,
        },
        provenance=provenance,
        id_accuracy=run.id_accuracy,
    )
    files = dict(write_results(report, run.output_dir))
    files["report"] = render_html(report, run.output_dir / "report.html")
    files["scores"] = run.output_dir / "scores"
    return files
