"""A realistic synthetic ReportData: 2 detectors x 2 OOD sets, CIs for one, galleries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from oodprobe.metrics import CONVENTIONS, evaluate
from oodprobe.report import Gallery, GalleryImage, ReportData, ScoreSet

ENCODER = "efficientnet-lite0"
OOD_GROUPS = {"fashion 5-9": "near", "mnist-5k": "far"}


def digit_like(seed: int, size: int = 28) -> Image.Image:
    """A small grayscale image with a bright stroke, like an MNIST digit."""
    rng = np.random.default_rng(seed)
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    points = [tuple(int(v) for v in rng.integers(4, size - 4, 2)) for _ in range(4)]
    draw.line(points, fill=255, width=3)
    return image


def photo_like(seed: int, size: tuple[int, int] = (200, 140)) -> Image.Image:
    """A larger RGB image with a colour gradient and a disc (exercises the downscale path)."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 255, width, dtype=np.float64)
    pixels = np.stack([np.tile(ramp, (height, 1))] * 3, axis=-1)
    pixels *= rng.uniform(0.3, 1.0, 3)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    ImageDraw.Draw(image).ellipse(
        (40, 20, 120, 100), fill=tuple(int(v) for v in rng.integers(0, 255, 3))
    )
    return image


def _row(
    detector: str,
    params: dict[str, Any],
    ood_set: str,
    id_scores: np.ndarray,
    ood_scores: np.ndarray,
    bootstrap: int,
) -> dict[str, Any]:
    result = evaluate(id_scores, ood_scores, convention="oodprobe", bootstrap=bootstrap, seed=0)
    row: dict[str, Any] = {
        "encoder": ENCODER,
        "detector": detector,
        "detector_params": params,
        "ood_set": ood_set,
        "group": OOD_GROUPS[ood_set],
    }
    for metric in ("auroc", "fpr", "aupr_in", "aupr_out"):
        row[metric] = float(getattr(result, metric))
        low_high = result.intervals.get(metric)
        row[f"{metric}_low"] = None if low_high is None else low_high[0]
        row[f"{metric}_high"] = None if low_high is None else low_high[1]
    row.update(n_id=result.n_id, n_ood=result.n_ood, convention="oodprobe", tpr=0.95)
    row.update(
        id_fingerprint="sha256:1f2e3d",
        ood_fingerprint=f"sha256:{ood_set.replace(' ', '')}",
        versions={"oodprobe": "0.1.0", "numpy": "2.0"},
        prompts=["a photo of a {}."] if detector == "knn" else None,
    )
    return row


def make_report_data(detectors: tuple[str, str] = ("knn", "mahalanobis")) -> ReportData:
    """Gaussian scores; rows from oodprobe.metrics, with bootstrap CIs for the first detector."""
    rng = np.random.default_rng(7)
    rows, score_sets = [], []
    shifts = {"fashion 5-9": 1.0, "mnist-5k": 2.5}
    for index, detector in enumerate(detectors):
        params: dict[str, Any] = {"k": 10} if index == 0 else {"shared_covariance": True}
        id_scores = rng.normal(2.0 + 0.3 * index, 1.0, 400)
        ood = {name: rng.normal(2.0 - shift, 1.2, 300) for name, shift in shifts.items()}
        for name, scores in ood.items():
            rows.append(_row(detector, params, name, id_scores, scores, 200 if index == 0 else 0))
        score_sets.append(ScoreSet(ENCODER, detector, id_scores, ood, dict(OOD_GROUPS)))
    galleries = [
        Gallery(
            title=f"OOD images that look most in-distribution — {detectors[0]} on fashion 5-9",
            encoder=ENCODER,
            detector=detectors[0],
            images=[
                GalleryImage(digit_like(i), f"mnist-5k:test[{i}]", 3.2 - 0.1 * i) for i in range(8)
            ],
        ),
        Gallery(
            title="ID images with the lowest scores",
            encoder=ENCODER,
            detector=detectors[1],
            images=[
                GalleryImage(photo_like(i), f"fashion:test[{40 + i}]", -1.5 + 0.2 * i)
                for i in range(4)
            ],
        ),
    ]
    convention = CONVENTIONS["oodprobe"]
    return ReportData(
        title="Fashion 0-4 vs near and far OOD",
        rows=rows,
        score_sets=score_sets,
        galleries=galleries,
        convention={**convention.as_dict(), "tpr": 0.95},
        provenance={
            "versions": {"oodprobe": "0.1.0", "numpy": "2.0", "torch": "2.14.1"},
            "id_fingerprint": "sha256:1f2e3d",
            "config": {"benchmark": "fashion-near-far", "bootstrap": 200, "seed": 0},
            "started": "2025-01-01T12:00:00Z",
            "command_line": "oodprobe benchmark fashion-near-far --out results/",
        },
        id_accuracy=[{"encoder": ENCODER, "method": "linear probe", "accuracy": 0.9123}],
    )


@pytest.fixture
def report_data() -> ReportData:
    return make_report_data()


@pytest.fixture
def report_factory() -> Callable[..., ReportData]:
    """:func:`make_report_data`, for tests that need variants or a second copy."""
    return make_report_data
