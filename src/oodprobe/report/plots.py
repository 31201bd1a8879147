"""Figures and thumbnails as ``data:`` URIs: ROC curves, score histograms, gallery thumbnails.

Figures use matplotlib's object API (``Figure`` + Agg canvas), never pyplot, so rendering does
not touch global state or the user's backend. PNGs carry no timestamp, so output is repeatable.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import roc_curve

from oodprobe.report.model import ScoreSet

__all__ = [
    "data_uri",
    "histogram_figure",
    "roc_figure",
    "set_colors",
    "thumbnail",
]

DPI = 90
ID_COLOR = "#5b6470"
PALETTE = (
    "#2f6fde",
    "#e0672b",
    "#2a9d5c",
    "#c23b7a",
    "#8a5cd6",
    "#b8860b",
    "#1aa3b5",
    "#d64541",
    "#6b8e23",
    "#7f7f7f",
)


def set_colors(names: list[str]) -> dict[str, str]:
    """A stable colour per OOD set name, so a set has the same colour in every figure."""
    return {name: PALETTE[index % len(PALETTE)] for index, name in enumerate(names)}


def _label(text: str) -> str:
    """Text shown literally by matplotlib (``$`` would otherwise start mathtext)."""
    return text.replace("$", r"\$")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """``data:<mime>;base64,...`` for encoded image bytes."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _figure_uri(figure: Figure) -> str:
    """Render ``figure`` to a PNG ``data:`` URI (no timestamp or software metadata)."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return data_uri(buffer.getvalue())


def _finite(scores: np.ndarray) -> np.ndarray:
    """Scores as a flat float array without NaN/inf (plots only; metrics come from the rows)."""
    array = np.asarray(scores, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def roc_figure(
    score_set: ScoreSet,
    *,
    positive: str = "id",
    tpr: float = 0.95,
    aurocs: Mapping[str, float | None] | None = None,
    colors: Mapping[str, str] | None = None,
) -> str:
    """ROC curves, one per OOD set of ``score_set``, as a PNG ``data:`` URI.

    ``positive`` (``id``/``ood``) picks the positive class, as in the metric convention, so the
    dashed line at ``tpr`` marks the operating point of the reported FPR. Legend AUROCs come
    from ``aurocs`` (the result rows), not from the plotted curve.
    """
    figure = Figure(figsize=(4.4, 3.9), layout="constrained")
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], color="#c8ccd2", linewidth=1, linestyle=":")
    axes.axhline(tpr, color="#9aa1aa", linewidth=1, linestyle="--")
    id_scores = _finite(score_set.id_scores)
    for index, (name, ood_scores) in enumerate(score_set.ood_scores.items()):
        ood = _finite(ood_scores)
        if id_scores.size == 0 or ood.size == 0:
            continue
        if positive == "ood":
            truth = np.r_[np.zeros(id_scores.size), np.ones(ood.size)]
            scores = -np.r_[id_scores, ood]
        else:
            truth = np.r_[np.ones(id_scores.size), np.zeros(ood.size)]
            scores = np.r_[id_scores, ood]
        false_rate, true_rate, _ = roc_curve(truth, scores)
        label = name
        group = score_set.ood_groups.get(name)
        if group:
            label += f" ({group})"
        value = (aurocs or {}).get(name)
        if value is not None and math.isfinite(value):
            label += f"  AUROC {100 * value:.1f}"
        color = (colors or {}).get(name, PALETTE[index % len(PALETTE)])
        axes.plot(false_rate, true_rate, color=color, linewidth=1.8, label=_label(label))
    if positive == "ood":
        axes.set_xlabel("FPR: share of ID rejected")
        axes.set_ylabel("TPR: share of OOD rejected")
    else:
        axes.set_xlabel("FPR: share of OOD accepted")
        axes.set_ylabel("TPR: share of ID accepted")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.grid(True, color="#eceef1", linewidth=0.8)
    axes.text(
        0.99,
        tpr - 0.015,
        f"TPR {100 * tpr:g}%",
        ha="right",
        va="top",
        fontsize=7,
        color="#6b7280",
        transform=axes.transAxes,
    )
    if score_set.ood_scores:
        axes.legend(loc="lower right", fontsize=7.5, frameon=True, framealpha=0.9)
    for spine in ("top", "right"):
        axes.spines[spine].set_visible(False)
    return _figure_uri(figure)


def _histogram_range(id_scores: np.ndarray, both: np.ndarray) -> tuple[float, float]:
    """The x range of a histogram: the ID scores' central 99% widened by that width each side.

    Distance-based scores have OOD tails thousands of ID widths long; over the full range the ID
    histogram and the overlap (what decides the metrics) shrink to one bin. Scores outside the
    range are stacked into the edge bins (and counted in the panel).
    """
    full = (float(both.min()), float(both.max()))
    if id_scores.size < 2:
        return full
    first, last = np.quantile(id_scores, [0.005, 0.995])
    width = float(last - first)
    if not width > 0:
        return full
    low, high = max(full[0], float(first) - width), min(full[1], float(last) + width)
    return (low, high) if high > low else full


def histogram_figure(
    score_set: ScoreSet,
    *,
    positive: str = "id",
    tpr: float = 0.95,
    colors: Mapping[str, str] | None = None,
) -> str:
    """Score histograms, one panel per OOD set (ID vs that set), as a PNG ``data:`` URI.

    The dashed line is the threshold at ``tpr`` of the positive class (ID keeps ``tpr`` of ID
    above it; OOD-positive: ``tpr`` of OOD below it), drawn from the quantile for orientation.
    """
    names = list(score_set.ood_scores)
    columns = max(1, min(len(names), 3))
    rows = max(1, math.ceil(len(names) / columns))
    figure = Figure(figsize=(3.5 * columns, 2.5 * rows), layout="constrained")
    id_scores = _finite(score_set.id_scores)
    for index, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, index + 1)
        ood = _finite(score_set.ood_scores[name])
        both = np.r_[id_scores, ood]
        if both.size == 0:
            axes.set_title(_label(f"{name}: no scores"), fontsize=9)
            continue
        low, high = _histogram_range(id_scores, both)
        edges = np.histogram_bin_edges(both, bins=40, range=(low, high))
        color = (colors or {}).get(name, PALETTE[index % len(PALETTE)])
        style = {"bins": edges, "density": True, "histtype": "stepfilled", "alpha": 0.45}
        for values, shade, label in ((id_scores, ID_COLOR, "ID"), (ood, color, _label(name))):
            if values.size:
                clipped_values = np.clip(values, low, high)
                axes.hist(clipped_values, color=shade, label=label, **style)  # type: ignore[arg-type]
        clipped = int(np.sum((both < low) | (both > high)))
        if clipped:
            axes.text(
                0.99,
                0.97,
                f"{clipped} beyond the range\nstacked at the edges",
                transform=axes.transAxes,
                ha="right",
                va="top",
                fontsize=6,
                color="#6b7280",
            )
        reference = id_scores if positive != "ood" else ood
        if reference.size:
            quantile = 1.0 - tpr if positive != "ood" else tpr
            axes.axvline(
                float(np.quantile(reference, quantile)),
                color="#374151",
                linestyle="--",
                linewidth=1,
            )
        group = score_set.ood_groups.get(name)
        axes.set_title(_label(f"ID vs {name}" + (f" ({group})" if group else "")), fontsize=9)
        axes.set_xlabel("score (higher = more in-distribution)", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.set_yticks([])
        axes.legend(fontsize=7, frameon=False, loc="upper left")
        for spine in ("top", "right", "left"):
            axes.spines[spine].set_visible(False)
    return _figure_uri(figure)


def _flatten(image: Image.Image) -> Image.Image:
    """``L`` or ``RGB`` copy of ``image``; transparency is composited onto white."""
    if image.mode in ("L", "RGB"):
        return image
    if image.mode in ("1", "I", "I;16", "F"):
        return image.convert("L")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def thumbnail(image: Image.Image, size: int = 96) -> tuple[str, int, int]:
    """A ``data:`` URI thumbnail fitting ``size`` px, with its width and height.

    Images smaller than ``size`` are enlarged by a whole factor with nearest-neighbour (28x28
    digits stay crisp); larger ones are reduced with Lanczos. PNG, or JPEG when that is smaller
    for a photo-like colour image.
    """
    picture = _flatten(image)
    width, height = picture.size
    longest = max(width, height, 1)
    if longest <= size:
        factor = max(1, size // longest)
        picture = picture.resize((width * factor, height * factor), Image.Resampling.NEAREST)
    else:
        scale = size / longest
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        picture = picture.resize(target, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    data, mime = buffer.getvalue(), "image/png"
    if picture.mode == "RGB" and len(data) > 8_000:
        jpeg = io.BytesIO()
        picture.save(jpeg, format="JPEG", quality=85)
        if jpeg.tell() < len(data):
            data, mime = jpeg.getvalue(), "image/jpeg"
    return data_uri(data, mime), picture.width, picture.height
