"""What a benchmark run writes: per-sample score CSVs, galleries, provenance, and the report.

The runner (:mod:`oodprobe.benchmark`) hands over finished :class:`DetectorOutcome` records;
nothing here computes a metric. Every file is written atomically (temporary file in the same
folder, then renamed), so a failed run never leaves a partial file in place of a good one.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.metadata
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from oodprobe.benchmark_spec import DataSpec, _slug
from oodprobe.files import atomic_write, write_text_atomic

if TYPE_CHECKING:
    from oodprobe.benchmark_spec import BenchmarkSpec
    from oodprobe.features import FeatureSet
    from oodprobe.results import ResultRow


@dataclass
class Split:
    """One dataset of the benchmark and its features for the current encoder."""

    spec: DataSpec
    dataset: Any
    features: FeatureSet
    fingerprint: str


@dataclass
class DetectorOutcome:
    """One encoder × detector: its rows, and the scores behind them (empty when it failed)."""

    encoder: str
    detector: str
    rows: list[ResultRow]
    test: Split
    oods: list[Split]
    id_scores: np.ndarray | None = None
    ood_scores: dict[str, np.ndarray] = field(default_factory=dict)
    accuracy: float | None = None

    @property
    def failed(self) -> bool:
        return self.id_scores is None


OUTPUT_FILES = ("results.json", "results.csv", "results.md", "report.html")
"""The files a run writes into its output folder, beside the ``scores/`` folder."""


def check_output_folder(output: Path) -> None:
    """Refuse, before any work, an output path that a run could not write into."""
    from oodprobe.errors import InvalidParameterError

    if output.exists() and not output.is_dir():
        raise InvalidParameterError(
            f"the output {output} is a file; give a folder (a run writes "
            f"{', '.join(OUTPUT_FILES)} and scores/ into it)"
        )
    for name in OUTPUT_FILES:
        if (output / name).is_dir():
            raise InvalidParameterError(
                f"{output / name} is a folder, and the run writes a file there; remove it or "
                f"choose another output folder"
            )
    scores = output / "scores"
    if scores.exists() and not scores.is_dir():
        raise InvalidParameterError(
            f"{scores} is a file, and the run writes per-image scores into a folder there; "
            f"remove it or choose another output folder"
        )


def versions() -> dict[str, str]:
    """Python and the versions of the packages that can change a number."""
    found = {"python": platform.python_version()}
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
            found[package] = importlib.metadata.version(package)
    return found


def write_scores(output: Path, outcome: DetectorOutcome) -> Path | None:
    """Per-sample scores: one CSV per encoder × detector (set, role, index, source, label, score).

    Returns the path, or None for a detector that failed (it has no scores).
    """
    if outcome.id_scores is None:
        return None
    directory = output / "scores" / _slug(outcome.encoder)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{_slug(outcome.detector)}.csv"
    splits = [(outcome.test, "id", outcome.id_scores)] + [
        (ood, "ood", outcome.ood_scores[ood.spec.label]) for ood in outcome.oods
    ]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as handle:
            writer = csv.writer(handle)
            writer.writerow(["set", "role", "index", "source", "label", "score"])
            for split, role, scores in splits:
                labels = split.features.labels
                indices = split.features.indices
                for row, (index, score) in enumerate(zip(indices, scores, strict=True)):
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

    atomic_write(path, write)
    return path


def _gallery_image(split: Split, row: int, score: float) -> Any:
    from oodprobe.report.model import GalleryImage

    index = int(split.features.indices[row])
    return GalleryImage(
        image=split.dataset.load(index), caption=split.dataset.describe(index), score=score
    )


def galleries(outcome: DetectorOutcome, size: int) -> list[Any]:
    """The OOD images that look most in-distribution, and the ID images that look least."""
    from oodprobe.report.model import Gallery

    if size <= 0 or outcome.id_scores is None:
        return []
    candidates = [
        (float(score), ood, int(row))
        for ood in outcome.oods
        for row, score in enumerate(outcome.ood_scores[ood.spec.label])
    ]
    candidates.sort(key=lambda item: -item[0])
    ood_images = [_gallery_image(ood, row, score) for score, ood, row in candidates[:size]]
    order = np.argsort(outcome.id_scores, kind="stable")[:size]
    id_images = [
        _gallery_image(outcome.test, int(row), float(outcome.id_scores[row])) for row in order
    ]
    return [
        Gallery(
            title=f"OOD images that look most in-distribution — {outcome.detector}",
            encoder=outcome.encoder,
            detector=outcome.detector,
            images=ood_images,
        ),
        Gallery(
            title=f"ID test images that look most out-of-distribution — {outcome.detector}",
            encoder=outcome.encoder,
            detector=outcome.detector,
            images=id_images,
        ),
    ]


def mined_galleries(record: dict[str, Any], id_train: Any) -> list[Any]:
    """One gallery per mined cluster: its names, and the training images nearest its centre
    (captioned, their cosine to the centre as the score)."""
    from oodprobe.report.model import Gallery, GalleryImage

    return [
        Gallery(
            title=f"Mined cluster {cluster['cluster']}: {', '.join(cluster['names']) or '(none)'}",
            encoder=record["encoder"],
            detector="class names mined from the corpus",
            images=[
                GalleryImage(
                    image=id_train.load(example["index"]),
                    caption=example["source"],
                    score=example["similarity"],
                )
                for example in cluster["examples"]
            ],
            description=(
                f"{cluster['size']} ID training images; name scores (share of the cluster "
                f"choosing the name) {', '.join(f'{v:.2f}' for v in cluster['scores']) or '-'};"
                f" score under each image: cosine to the cluster centre"
            ),
        )
        for cluster in record["clusters"]
    ]


def provenance(
    spec: BenchmarkSpec,
    data: dict[str, tuple[DataSpec, Any, str]],
    *,
    seconds: float,
    device: str,
    precision: str,
) -> dict[str, Any]:
    """Where every number came from: command, versions, data fingerprints, settings."""

    def described(role: str) -> dict[str, Any]:
        data_spec, dataset, fingerprint = data[role]
        return {"spec": data_spec.label, "n": len(dataset), "fingerprint": fingerprint}

    return {
        "benchmark": spec.name,
        "description": spec.description,
        "command": " ".join(sys.argv),
        "versions": versions(),
        "encoders": list(spec.encoders),
        "detectors": [
            {"name": d.name, "params": dict(d.params), "label": d.display} for d in spec.detectors
        ],
        "id_train": described("id_train"),
        "id_test": described("id_test"),
        "ood": [{**described(f"ood:{ood.label}"), "group": ood.group} for ood in spec.ood],
        "device": device,
        "precision": precision,
        "bootstrap": spec.bootstrap,
        "seed": spec.seed,
        "seconds": round(seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_outputs(
    spec: BenchmarkSpec,
    output_dir: Path,
    rows: list[ResultRow],
    id_accuracy: list[dict[str, Any]],
    outcomes: list[DetectorOutcome],
    run_provenance: dict[str, Any],
    *,
    study: dict[str, Any] | None = None,
    mined: Sequence[dict[str, Any]] = (),
    id_train: Any = None,
) -> dict[str, Path]:
    """results.json/.csv/.md and report.html for a finished run; returns the paths.

    A study's analysis (:mod:`oodprobe.study`) adds study.json/.csv and the report's study
    section; its score figures are those of the study's primary detector. Class names mined
    from a corpus (``mined``, one record per encoder) go to mined_names.json and the report
    shows each cluster's names with thumbnails of its ID training images (``id_train``).
    """
    from oodprobe.metrics import get_convention
    from oodprobe.report import ReportData, ScoreSet, render_html, write_results

    convention = get_convention(spec.convention)
    score_sets = [
        ScoreSet(
            encoder=outcome.encoder,
            detector=outcome.detector,
            id_scores=outcome.id_scores,
            ood_scores=outcome.ood_scores,
            ood_groups={ood.label: ood.group for ood in spec.ood},
        )
        for outcome in outcomes
        if outcome.id_scores is not None
        # a study's report plots ROC curves and histograms of its primary detector only: nine
        # encoders x five detectors would be 90 figures (30 s of matplotlib on 2 cores)
        and (study is None or outcome.detector == study["primary_detector"])
    ]
    report = ReportData(
        title=f"oodprobe benchmark: {spec.name}",
        rows=[row.as_dict() for row in rows],
        score_sets=score_sets,
        galleries=[
            *(g for record in mined for g in mined_galleries(record, id_train)),
            *(g for outcome in outcomes for g in galleries(outcome, spec.gallery_size)),
        ],
        convention={**convention.as_dict(), "tpr": spec.tpr},
        provenance=run_provenance,
        id_accuracy=id_accuracy,
        study=study,
    )
    files = dict(write_results(report, output_dir))
    files["report"] = render_html(report, output_dir / "report.html")
    files["scores"] = output_dir / "scores"
    if mined:
        files["mined_names"] = write_text_atomic(
            output_dir / "mined_names.json", json.dumps(list(mined), indent=1)
        )
    return files
