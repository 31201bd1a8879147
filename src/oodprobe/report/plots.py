"""Figures and thumbnails as ``data:`` URIs: ROC curves, score histograms, gallery thumbnails.

Figures use matplotlib's object API (``Figure`` + Agg canvas), never pyplot, so rendering does
not touch global state or the user's backend. PNGs carry no timestamp, so output is repeatable.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import roc_curve

from oodprobe.report.model import ScoreSet
from oodprobe.report.tables import as_float

__all__ = [
    "data_uri",
    "histogram_figure",
    "roc_figure",
    "set_colors",
    "short_label",
    "study_fit_figure",
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


def _figure_uri(figure: Figure, dpi: float = DPI) -> str:
    """Render ``figure`` to a PNG ``data:`` URI (no timestamp or software metadata)."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
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
        style_score_axes(axes, f"ID vs {name}" + (f" ({group})" if group else ""))
    return _figure_uri(figure)


def style_score_axes(axes: Any, title: str) -> None:
    """The look of a score histogram panel: title, score axis, legend, no y ticks or frame."""
    if title:
        axes.set_title(_label(title), fontsize=9)
    axes.set_xlabel("score (higher = more in-distribution)", fontsize=8)
    axes.tick_params(labelsize=7)
    axes.set_yticks([])
    axes.legend(fontsize=7, frameon=False, loc="upper left")
    for spine in ("top", "right", "left"):
        axes.spines[spine].set_visible(False)


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


# -- study scatter plots ------------------------------------------------------------------------

POINT_COLOR = "#2f6fde"
LINE_COLOR = "#374151"
BAND_COLOR = "#9db8ec"
LABEL_SIZE = 6.5  # points: readable in the PNG, small enough for 12 names on one plot
LABEL_CHARS = 30
STUDY_DPI = 110  # the study's headline plots: sharper than the others, so small labels read


def short_label(name: str, limit: int = LABEL_CHARS) -> str:
    """``name`` cut in the middle to ``limit`` characters (both ends tell encoders apart)."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return f"{name[:head]}…{name[len(name) - (limit - 1 - head) :]}"


def _finite_pairs(points: Sequence[Mapping[str, Any]]) -> list[tuple[float, float, str]]:
    """``(accuracy %, AUROC %, encoder)`` of each point whose two values are finite numbers."""
    pairs = []
    for point in points:
        accuracy, auroc = as_float(point.get("accuracy")), as_float(point.get("auroc"))
        if accuracy is not None and auroc is not None:
            pairs.append((100.0 * accuracy, 100.0 * auroc, str(point.get("encoder", ""))))
    return pairs


def _band_arrays(band: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The band's ``x``, ``low``, ``high`` in percent, or None when absent or malformed."""
    if not isinstance(band, Mapping):
        return None
    try:
        arrays = [np.asarray(band.get(key), dtype=np.float64) for key in ("x", "low", "high")]
    except (TypeError, ValueError):
        return None
    if any(a.ndim != 1 for a in arrays) or len({a.size for a in arrays}) != 1 or not arrays[0].size:
        return None
    x, low, high = (100.0 * a for a in arrays)
    order = np.argsort(x, kind="stable")
    return x[order], low[order], high[order]


def _limits(
    values: list[float], minimum_span: float = 2.0, pad: float = 0.1
) -> tuple[float, float]:
    """Axis limits around ``values`` with ``pad`` of the span each side (span >= minimum_span)."""
    if not values:
        return 0.0, 100.0
    low, high = min(values), max(values)
    span = max(high - low, minimum_span)
    middle = (low + high) / 2
    return middle - span * (0.5 + pad), middle + span * (0.5 + pad)


# Label offsets in points, nearest first; labels further out get a thin leader line.
_OFFSETS = [
    (radius * dx, radius * dy)
    for radius in (5.0, 11.0, 18.0)
    for dx, dy in ((1, 0.6), (1, -0.6), (-1, 0.6), (-1, -0.6), (0, 1.3), (0, -1.3), (1, 0), (-1, 0))
]


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return width * height if width > 0 and height > 0 else 0.0


def _place_labels(
    figure: Figure, axes: Any, pairs: list[tuple[float, float, str]], fontsize: float
) -> None:
    """Annotate each point with its encoder, choosing offsets greedily to avoid overlaps.

    Works in display points: text sizes come from the Agg renderer, point positions from the
    (fixed) axes transform. Each label takes the nearest offset whose box overlaps the fewest
    other labels and markers and stays inside the axes; deterministic for the same input.
    """
    from matplotlib.font_manager import FontProperties

    canvas = FigureCanvasAgg(figure)
    renderer = canvas.get_renderer()
    scale = 72.0 / figure.dpi  # display pixels -> points
    prop = FontProperties(size=fontsize)
    box = axes.get_window_extent(renderer)
    frame = (box.x0 * scale, box.y0 * scale, box.x1 * scale, box.y1 * scale)
    centres = [
        (float(px) * scale, float(py) * scale)
        for px, py in axes.transData.transform([(x, y) for x, y, _ in pairs])
    ]
    marker = 3.0
    taken = [(cx - marker, cy - marker, cx + marker, cy + marker) for cx, cy in centres]
    order = sorted(range(len(pairs)), key=lambda i: (centres[i][0], centres[i][1]))
    for index in order:
        x, y, name = pairs[index]
        text = _label(short_label(name))
        width, height, _ = renderer.get_text_width_height_descent(text, prop, ismath=False)
        width, height = width * scale + 1.0, height * scale + 1.0
        cx, cy = centres[index]
        best: tuple[float, int] | None = None
        for choice, (dx, dy) in enumerate(_OFFSETS):
            left = cx + dx if dx > 0 else cx + dx - width if dx < 0 else cx - width / 2
            bottom = cy + dy if dy > 0 else cy + dy - height if dy < 0 else cy - height / 2
            label_box = (left, bottom, left + width, bottom + height)
            cost = sum(_overlap(label_box, other) for other in taken)
            inside = _overlap(label_box, frame)
            cost += 4.0 * (width * height - inside)  # leaving the axes is worse than crowding
            cost += 0.05 * choice  # prefer near offsets when otherwise equal
            if best is None or cost < best[0]:
                best = (cost, choice)
        assert best is not None
        dx, dy = _OFFSETS[best[1]]
        left = cx + dx if dx > 0 else cx + dx - width if dx < 0 else cx - width / 2
        bottom = cy + dy if dy > 0 else cy + dy - height if dy < 0 else cy - height / 2
        taken.append((left, bottom, left + width, bottom + height))
        far = abs(dx) > 6 or abs(dy) > 7
        axes.annotate(
            text,
            (x, y),
            xytext=(dx, dy),
            textcoords="offset points",
            ha="left" if dx > 0 else "right" if dx < 0 else "center",
            va="bottom" if dy > 0 else "top" if dy < 0 else "center",
            fontsize=fontsize,
            color="#1f2937",
            arrowprops={"arrowstyle": "-", "color": "#9aa1aa", "linewidth": 0.5} if far else None,
            annotation_clip=False,
        )


def study_fit_figure(
    fit: Mapping[str, Any],
    *,
    title: str,
    xlabel: str,
    ylabel: str = "OOD AUROC (%)",
    confidence: float = 0.95,
    note: str = "",
) -> str:
    """Scatter of AUROC against ID accuracy over models, with the fit line and band (PNG URI).

    ``fit`` is one entry of a study's ``fits``: ``points`` (``encoder``, ``accuracy``,
    ``auroc`` fractions), ``slope``/``intercept`` (AUROC per accuracy, in fractions) and an
    optional ``band`` at ``confidence`` (``x``, ``low``, ``high`` fractions, drawn with
    ``fill_between``).
    Axes are in percent. Points with a missing value are left out; nothing is recomputed.
    """
    pairs = _finite_pairs(fit.get("points") or [])
    band = _band_arrays(fit.get("band"))
    figure = Figure(figsize=(5.6, 4.4), dpi=STUDY_DPI)
    figure.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.91)
    axes = figure.add_subplot()
    xs = [x for x, _, _ in pairs]
    ys = [y for _, y, _ in pairs]
    xlim = _limits(xs, pad=0.14)
    ylim = _limits(ys, pad=0.16)
    slope, intercept = as_float(fit.get("slope")), as_float(fit.get("intercept"))
    if band is not None:
        band_x, low, high = band
        finite = np.isfinite(band_x) & np.isfinite(low) & np.isfinite(high)
        axes.fill_between(
            band_x,
            low,
            high,
            where=finite,
            color=BAND_COLOR,
            alpha=0.35,
            linewidth=0,
            label=f"{100 * confidence:g}% band",
        )
    if slope is not None and intercept is not None:
        if band is not None and np.isfinite(band[0]).any():
            line_x = np.array([np.nanmin(band[0]), np.nanmax(band[0])])
        else:
            line_x = np.array(xlim)
        # slope is AUROC per accuracy (both fractions), so in percent: y% = 100 b0 + b1 x%.
        axes.plot(
            line_x,
            100.0 * intercept + slope * line_x,
            color=LINE_COLOR,
            linewidth=1.3,
            label="least squares",
        )
    axes.scatter(xs, ys, s=22, color=POINT_COLOR, zorder=3, edgecolors="white", linewidths=0.6)
    axes.set_xlim(*xlim)
    axes.set_ylim(*ylim)
    axes.set_xlabel(_label(xlabel), fontsize=9)
    axes.set_ylabel(_label(ylabel), fontsize=9)
    axes.set_title(_label(title), fontsize=10)
    axes.tick_params(labelsize=8)
    axes.grid(True, color="#eceef1", linewidth=0.8)
    for spine in ("top", "right"):
        axes.spines[spine].set_visible(False)
    if not pairs:
        note = note or "no models with both values"
    if note:
        axes.text(
            0.02, 0.98, _label(note), ha="left", va="top", transform=axes.transAxes,
            fontsize=7.5, color="#8a4b00", wrap=True,
        )  # fmt: skip
    _place_labels(figure, axes, pairs, LABEL_SIZE)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right", fontsize=7, frameon=True, framealpha=0.9)
    return _figure_uri(figure, dpi=STUDY_DPI)
