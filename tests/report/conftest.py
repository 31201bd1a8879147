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


# -- a study (``oodprobe study``): encoders x detectors, fits of AUROC on k-NN accuracy ---------

STUDY_ENCODERS = (
    "openclip:ViT-B-16/openai",
    "openclip:ViT-B-16/laion2b_s34b_b88k",
    'enc<&>"q"',
    "openclip:ViT-L-14/openai",
    "timm:vit_small_patch14_dinov2",
    "hf:openai/clip-vit-base-patch16",
    "efficientnet-lite0",
    "openclip:ViT-B-32/laion2b_s34b_b79k",
    "openclip:ViT-H-14/laion2b_s32b_b79k",
    "timm:resnet50",
    "openclip:convnext_base/laion400m_s13b_b51k",
    "finetuned:/runs/ft-vitb16/checkpoint.pt",
)
STUDY_TARGETS = ("cifar100 <near>", "near mean", "mean")
FIT_KEYS = ("slope", "intercept", "r2", "pearson", "spearman")


def least_squares_fit(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Fit statistics as the study computes them (numpy here, for a known answer)."""
    accuracy = np.array([p["accuracy"] for p in points])
    auroc = np.array([p["auroc"] for p in points])
    none = {
        **dict.fromkeys(FIT_KEYS),
        **{f"{key}_ci": None for key in FIT_KEYS},
        "band": None,
    }
    if len(points) < 3:
        return {**none, "note": f"needs at least 3 models, has {len(points)}"}
    slope, intercept = np.polyfit(accuracy, auroc, 1)
    pearson = float(np.corrcoef(accuracy, auroc)[0, 1])
    grid = np.linspace(accuracy.min(), accuracy.max(), 20)
    return {
        "slope": float(slope),
        "intercept": float(intercept),
        "r2": pearson**2,
        "pearson": pearson,
        "spearman": 0.9,
        "slope_ci": [float(slope) - 0.2, float(slope) + 0.2],
        "intercept_ci": [float(intercept) - 0.1, float(intercept) + 0.1],
        "r2_ci": [pearson**2 - 0.05, min(1.0, pearson**2 + 0.02)],
        "pearson_ci": [pearson - 0.04, min(1.0, pearson + 0.01)],
        "spearman_ci": [0.8, 0.95],
        "band": {
            "x": grid.tolist(),
            "low": (intercept + slope * grid - 0.01).tolist(),
            "high": (intercept + slope * grid + 0.01).tolist(),
        },
        "note": None,
    }


def make_study(n_models: int = 7, lp_vs_ft: bool = False) -> dict[str, Any]:
    """A study dict as :func:`oodprobe.study.analyse` builds it: 2 detectors, 3 targets.

    AUROC grows with k-NN accuracy plus noise. Fits: every detector x target on k-NN accuracy
    (with bands) and, for the primary detector on "mean", one on linear-probe accuracy whose
    statistics are None with a note (as when the probe accuracies are all one value).
    """
    rng = np.random.default_rng(3)
    names = STUDY_ENCODERS[:n_models]
    accuracy = np.linspace(0.70, 0.74, n_models) + rng.normal(0, 0.004, n_models)
    detectors = ["knn", "mahalanobis"]
    models = []
    for index, name in enumerate(names):
        auroc: dict[str, dict[str, float | None]] = {}
        for det_index, detector in enumerate(detectors):
            auroc[detector] = {
                target: float(0.1 + 1.1 * accuracy[index] - 0.03 * det_index + rng.normal(0, 0.01))
                for target in STUDY_TARGETS
            }
        models.append(
            {
                "encoder": name,
                "base": None,
                "shared_pass": name,
                "knn_accuracy": float(accuracy[index]),
                "probe_accuracy": 0.8,
                "auroc": auroc,
                "fpr": {d: {t: 1.0 - v for t, v in row.items()} for d, row in auroc.items()},
            }
        )
    if n_models > 1:
        models[1]["auroc"]["mahalanobis"]["mean"] = float("nan")  # a failed detector
        models[1]["fpr"]["mahalanobis"]["mean"] = None
    fits = []
    for detector in detectors:
        for target in STUDY_TARGETS:
            points = [
                {"encoder": m["encoder"], "accuracy": m["knn_accuracy"], "auroc": value}
                for m in models
                if np.isfinite(value := m["auroc"][detector][target])
            ]
            fit = {"detector": detector, "target": target, "accuracy": "knn"}
            fits.append(
                {**fit, "n_models": len(points), **least_squares_fit(points), "points": points}
            )
    probe_points = [
        {"encoder": m["encoder"], "accuracy": 0.8, "auroc": m["auroc"]["knn"]["mean"]}
        for m in models
    ]
    fits.append(
        {
            "detector": "knn",
            "target": "mean",
            "accuracy": "probe",
            "n_models": n_models,
            **dict.fromkeys(FIT_KEYS),
            **{f"{key}_ci": None for key in FIT_KEYS},
            "band": None,
            "note": "every model has the same accuracy: the line is undefined",
            "points": probe_points,
        }
    )
    order = sorted(models, key=lambda m: -m["auroc"]["knn"]["mean"])
    ranking = [
        {
            "rank": rank,
            "encoder": m["encoder"],
            "knn_accuracy": m["knn_accuracy"],
            "probe_accuracy": m["probe_accuracy"],
            "primary_auroc": m["auroc"]["knn"]["mean"],
            "score": m["auroc"]["knn"]["mean"],
        }
        for rank, m in enumerate(order, start=1)
    ]
    table = []
    if lp_vs_ft:
        table.append(
            {
                "base": names[0],
                "finetuned": 'ft <&> "1"',
                "detector": "knn",
                "lp_accuracy": 0.912,
                "ft_accuracy": 0.934,
                "lp_auroc": 0.95,
                "ft_auroc": 0.9,
                "lp_fpr": 0.3,
                "ft_fpr": None,
                "target": "mean",
            }
        )
    return {
        "name": "clip <zoo>",
        "benchmark": "cifar10-near-far",
        "accuracy_method": "knn classifier (k=20, T=0.02)",
        "primary_detector": "knn",
        "detectors": detectors,
        "targets": list(STUDY_TARGETS),
        "bootstrap": 200,
        "confidence": 0.95,
        "seed": 0,
        "models": models,
        "fits": fits,
        "ranking": ranking,
        "ranking_by": "mean AUROC of knn over all OOD sets, then k-NN accuracy",
        "lp_vs_ft": table,
    }


@pytest.fixture
def study_factory() -> Callable[..., dict[str, Any]]:
    """:func:`make_study`, for tests that need a study with n models."""
    return make_study
