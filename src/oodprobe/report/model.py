"""The data a report renders: result rows, raw scores for plots, galleries, provenance.

The benchmark runner builds a :class:`ReportData`; :mod:`oodprobe.report` only renders it and
never computes a metric (AUROC, FPR@95, ...). Metric values are fractions in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["MAIN_ROW_KEYS", "Gallery", "GalleryImage", "ReportData", "ScoreSet"]

MAIN_ROW_KEYS: tuple[str, ...] = (
    "encoder",
    "detector",
    "detector_params",
    "ood_set",
    "group",
    "auroc",
    "auroc_low",
    "auroc_high",
    "fpr",
    "fpr_low",
    "fpr_high",
    "aupr_in",
    "aupr_in_low",
    "aupr_in_high",
    "aupr_out",
    "aupr_out_low",
    "aupr_out_high",
    "n_id",
    "n_ood",
    "convention",
    "tpr",
)
"""Keys every result row has, in the column order of ``results.csv``; extra keys follow."""


@dataclass(frozen=True)
class GalleryImage:
    """One gallery picture: the image (any size; the report makes the thumbnail) and its score."""

    image: Image.Image
    caption: str  # e.g. "mnist-5k:test[17]"
    score: float  # higher = more in-distribution


@dataclass(frozen=True)
class Gallery:
    """A titled grid of images chosen by one encoder x detector (e.g. the hardest OOD images)."""

    title: str
    encoder: str
    detector: str
    images: list[GalleryImage]
    description: str = ""


@dataclass(frozen=True)
class ScoreSet:
    """Raw scores of one encoder x detector, for ROC curves and histograms.

    ``id_scores`` (n_id,) and each ``ood_scores[name]`` (n,): higher = more in-distribution.
    ``ood_groups`` maps each OOD set name to ``"near"`` or ``"far"``.
    """

    encoder: str
    detector: str
    id_scores: np.ndarray
    ood_scores: dict[str, np.ndarray]
    ood_groups: dict[str, str] = field(default_factory=dict)


@dataclass
class ReportData:
    """Everything one report shows; rows are flat JSON-able dicts (keys: :data:`MAIN_ROW_KEYS`).

    ``convention`` has ``name``, ``positive``, ``rule``, ``aupr_method``, ``description`` and
    ``tpr``; ``id_accuracy`` is a list of ``{"encoder", "method", "accuracy"}`` (fraction).
    ``study``, when given, is the finished dict of ``oodprobe study`` (models, fits, ranking,
    LP vs FT; layout in :mod:`oodprobe.report.study`): it adds ``study.json``, ``study.csv`` and
    ``study_fits.csv`` and a "Study" section at the top of the report.
    """

    title: str
    rows: list[dict[str, Any]]
    score_sets: list[ScoreSet] = field(default_factory=list)
    galleries: list[Gallery] = field(default_factory=list)
    convention: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    id_accuracy: list[dict[str, Any]] = field(default_factory=list)
    study: dict[str, Any] | None = None
