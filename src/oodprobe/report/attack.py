"""The attack report: one self-contained ``attack.html`` beside an attack run's ``attack.json``.

An attack run (:func:`oodprobe.attack_run.run_attack`) nudges OOD images until a detector takes
them for in-distribution: the paper's feature-matching attack (Adaloglou, Michels, Kaiser,
Kollmann, TMLR 2024) or white-box PGD on the detector's own score (Madry et al., ICLR 2018).
This module only lays out what the run computed: the parameters and provenance, a table per
budget ε (clean vs attacked AUROC / FPR, success rate, perturbation sizes, the removed-targets
evaluation, the class-score SVM of Uelwer, Michels, De Candido, KI 2021), the AUROC-vs-ε curve,
score histograms of ID test, clean OOD and attacked OOD per ε, and a gallery of triplets per ε:
clean image, perturbation amplified, manipulated image, with each image's clean → attacked score.

Scores are higher = more in-distribution. AUROC, FPR and rates are fractions shown as percent
with one decimal. Any value may be None or NaN: it shows as "—", never an error. The images are
the run's saved PNGs (paths in ``attack.json`` relative to the run folder); a missing PNG shows
as a placeholder. Everything is inline (CSS, ``data:`` images), a Content-Security-Policy
forbids any fetch, there is no script, and every string goes through :func:`html.escape`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from oodprobe.report.atomic import write_text_atomic
from oodprobe.report.html_report import esc, kv_table
from oodprobe.report.plots import (
    ID_COLOR,
    PALETTE,
    _figure_uri,
    _finite,
    _histogram_range,
    _label,
    style_score_axes,
    thumbnail,
)
from oodprobe.report.style import CSS
from oodprobe.report.tables import as_float, fpr_label

__all__ = [
    "REPORT_FILE",
    "amplify_perturbation",
    "attack_report_html",
    "attack_section",
    "render_attack_report",
]

REPORT_FILE = "attack.html"
MISSING = "—"
GALLERY_SIZE = 8
THUMB = 96
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'none'"
CLEAN_COLOR = PALETTE[0]
ATTACKED_COLOR = PALETTE[3]
EXTRA_CSS = """
.triplets { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr));
  gap: 10px; }
.triplet { border: 1px solid var(--line); border-radius: 6px; padding: 6px; }
.triplet .row { display: flex; gap: 6px; justify-content: space-between; }
.triplet .cell { flex: 1 1 0; text-align: center; }
.triplet .frame { height: 96px; display: flex; align-items: center; justify-content: center;
  background: #f3f4f6; border-radius: 4px; font-size: 11px; color: var(--muted); }
.triplet img { image-rendering: pixelated; max-width: 96px; max-height: 96px; }
.triplet .kind { font-size: 10.5px; color: var(--muted); }
.triplet .cap { font-size: 11px; margin-top: 4px; overflow-wrap: anywhere; line-height: 1.35; }
.triplet .score { font-variant-numeric: tabular-nums; }
.accepted { color: #8a1c1c; font-weight: 600; }
table.attack td.kind { white-space: nowrap; }
"""


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _text(value: Any, default: str = "") -> str:
    return default if value is None else str(value)


def _percent(value: Any) -> str:
    number = as_float(value)
    return MISSING if number is None else f"{100.0 * number:.1f}"


def _number(value: Any, digits: int = 3) -> str:
    number = as_float(value)
    if number is None:
        return MISSING
    return f"{number:.{digits}f}" if abs(number) < 1e4 else f"{number:.4g}"


def _score(value: Any) -> str:
    number = as_float(value)
    if number is None:
        return MISSING
    return f"{number:.3f}" if abs(number) < 1e3 else f"{number:.4g}"


def _eps_text(entry: Mapping[str, Any]) -> str:
    """``4/255`` (or ``0.0123``) for a PGD budget, ``unbounded`` for feature matching."""
    eps = as_float(entry.get("eps"))
    if eps is None:
        return "unbounded"
    levels = eps * 255
    if abs(levels - round(levels)) < 1e-6:
        return f"{round(levels)}/255"
    return f"{eps:.4g}"


def _attack_kind(entry: Mapping[str, Any]) -> str:
    """``PGD L∞`` / ``PGD L2`` for a budgeted attack, ``feature matching`` otherwise."""
    method = _text(entry.get("method"), "?")
    if as_float(entry.get("eps")) is None:
        return method.replace("-", " ").replace("_", " ")
    norm = {"linf": "L∞", "l2": "L2"}.get(_text(entry.get("norm")), _text(entry.get("norm")))
    if method.startswith("pgd"):  # run_attack names it pgd-linf / pgd-l2; the norm follows
        method = "PGD"
    return f"{method} {norm}".strip()


def _attack_title(entry: Mapping[str, Any]) -> str:
    """``PGD L∞ ε = 4/255``, or ``feature matching``."""
    if as_float(entry.get("eps")) is None:
        return _attack_kind(entry)
    return f"{_attack_kind(entry)} ε = {_eps_text(entry)}"


def _delta_points(before: Any, after: Any) -> str:
    low, high = as_float(before), as_float(after)
    if low is None or high is None:
        return MISSING
    return f"{100.0 * (high - low):+.1f}".replace("-", "−")


# -- images ------------------------------------------------------------------------------------


def amplify_perturbation(clean: np.ndarray, adversarial: np.ndarray) -> np.ndarray:
    """The perturbation δ = adversarial − clean as a (H, W, 3) uint8 image centred at grey.

    δ is scaled so that max |δ| maps to the full range: 128 + 127·δ / max|δ| (all grey for an
    unchanged image). ``clean`` and ``adversarial`` are (H, W, 3) uint8 arrays of one image.
    """
    delta = adversarial.astype(np.float64) - clean.astype(np.float64)
    largest = float(np.abs(delta).max()) if delta.size else 0.0
    scaled = np.zeros_like(delta) if largest == 0 else delta / largest
    return np.clip(np.rint(128.0 + 127.0 * scaled), 0, 255).astype(np.uint8)


def _read_png(root: Path | None, relative: Any) -> np.ndarray | None:
    """The (H, W, 3) uint8 pixels of a saved PNG, or None when absent or unreadable."""
    if root is None or not isinstance(relative, str) or not relative:
        return None
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):  # only the run's own files go into the page
        return None
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError):
        return None


def _image_cell(pixels: np.ndarray | None, kind: str, alt: str) -> str:
    if pixels is None:
        frame = '<div class="frame">image missing</div>'
    else:
        uri, width, height = thumbnail(Image.fromarray(pixels), size=THUMB)
        frame = (
            f'<div class="frame"><img src="{uri}" width="{width}" height="{height}" '
            f'alt="{esc(alt)}"></div>'
        )
    return f'<div class="cell">{frame}<div class="kind">{esc(kind)}</div></div>'


# -- figures -----------------------------------------------------------------------------------


def _budget_points(results: Sequence[Mapping[str, Any]]) -> list[tuple[float, Any, Any]]:
    """``(ε·255, clean AUROC, attacked AUROC)`` of the results with a numeric budget, by ε."""
    points = []
    for entry in results:
        eps = as_float(entry.get("eps"))
        if eps is not None:
            points.append((255.0 * eps, entry.get("clean_auroc"), entry.get("attacked_auroc")))
    return sorted(points, key=lambda point: point[0])


def auroc_curve_figure(results: Sequence[Mapping[str, Any]], *, title: str = "") -> str | None:
    """AUROC (ID test vs OOD) against ε, clean and attacked, as a PNG URI; None under 2 budgets.

    The clean line is each budget's clean AUROC (the same images, so a flat line unless the
    results disagree). Points with a missing AUROC are left out of their line.
    """
    points = _budget_points(results)
    if len(points) < 2:
        return None
    figure = Figure(figsize=(4.8, 3.6), layout="constrained")
    axes = figure.add_subplot()
    for index, (label, color, marker) in enumerate(
        (("clean OOD", CLEAN_COLOR, "o"), ("attacked OOD", ATTACKED_COLOR, "s"))
    ):
        pairs = [(point[0], as_float(point[1 + index])) for point in points]
        shown = [(x, 100.0 * y) for x, y in pairs if y is not None]
        if shown:
            xs, ys = zip(*shown, strict=True)
            axes.plot(xs, ys, color=color, marker=marker, linewidth=1.8, markersize=4, label=label)
    axes.axhline(50, color="#c8ccd2", linewidth=1, linestyle=":")
    axes.set_xlabel("budget ε (/255)", fontsize=9)
    axes.set_ylabel("AUROC, ID test vs OOD (%)", fontsize=9)
    axes.set_ylim(0, 101)
    axes.set_xticks([x for x, *_ in points])
    axes.set_xticklabels([f"{x:g}" for x, *_ in points])
    axes.tick_params(labelsize=8)
    axes.grid(True, color="#eceef1", linewidth=0.8)
    if title:
        axes.set_title(_label(title), fontsize=10)
    axes.legend(loc="lower left", fontsize=7.5, frameon=True, framealpha=0.9)
    for spine in ("top", "right"):
        axes.spines[spine].set_visible(False)
    return _figure_uri(figure)


def score_histogram_figure(
    id_scores: Any,
    clean_scores: Any,
    attacked_scores: Any,
    *,
    threshold: float | None = None,
    title: str = "",
) -> str:
    """Histograms of the detector's scores: ID test (if given), clean OOD, attacked OOD (PNG URI).

    Higher = more in-distribution; the dashed line is the run's threshold. The x range follows
    the ID scores where there are some (values beyond it are stacked in the edge bins).
    """
    id_array = _finite(np.asarray([] if id_scores is None else id_scores, dtype=np.float64))
    clean = _finite(np.asarray(clean_scores, dtype=np.float64))
    attacked = _finite(np.asarray(attacked_scores, dtype=np.float64))
    figure = Figure(figsize=(4.8, 2.9), layout="constrained")
    axes = figure.add_subplot()
    every = np.r_[id_array, clean, attacked]
    if every.size == 0:
        axes.set_title(_label(f"{title}: no scores" if title else "no scores"), fontsize=9)
        return _figure_uri(figure)
    reference = id_array if id_array.size else np.r_[clean, attacked]
    low, high = _histogram_range(reference, every)
    if not high > low:
        low, high = low - 0.5, high + 0.5
    edges = np.histogram_bin_edges(every, bins=40, range=(low, high))
    series = (
        (id_array, ID_COLOR, f"ID test (n = {id_array.size})"),
        (clean, CLEAN_COLOR, f"clean OOD (n = {clean.size})"),
        (attacked, ATTACKED_COLOR, f"attacked OOD (n = {attacked.size})"),
    )
    for values, color, label in series:
        if values.size:
            axes.hist(
                np.clip(values, low, high),
                bins=edges,  # type: ignore[arg-type]
                density=True,
                histtype="stepfilled",
                alpha=0.4,
                color=color,
                label=label,
            )
    clipped = int(np.sum((every < low) | (every > high)))
    if clipped:
        axes.text(
            0.99, 0.97, f"{clipped} beyond the range\nstacked at the edges",
            transform=axes.transAxes, ha="right", va="top", fontsize=6, color="#6b7280",
        )  # fmt: skip
    if threshold is not None and math.isfinite(threshold):
        axes.axvline(threshold, color="#374151", linestyle="--", linewidth=1)
    style_score_axes(axes, title)
    return _figure_uri(figure)


# -- sections ----------------------------------------------------------------------------------


def _detector_text(detector: Any) -> str:
    record = _map(detector)
    label = _text(record.get("label") or record.get("name"), "?")
    params = _map(record.get("params"))
    if params:
        label += " (" + ", ".join(f"{key}={value}" for key, value in params.items()) + ")"
    return label


def _parameters(summary: Mapping[str, Any]) -> str:
    params = _map(summary.get("params"))
    provenance = _map(summary.get("provenance"))
    threshold = _map(summary.get("threshold"))
    shown: list[tuple[str, Any]] = [
        ("method", params.get("method")),
        ("detector", _detector_text(params.get("detector"))),
        ("encoder", params.get("encoder")),
        ("OOD set", params.get("ood_set")),
        ("images attacked", params.get("n")),
        ("steps", params.get("steps")),
    ]
    if params.get("method") == "pgd":
        budgets = [_eps_text({"eps": eps}) for eps in _list(params.get("eps"))]
        shown += [
            ("budgets ε", ", ".join(budgets) or None),
            ("norm", params.get("norm")),
            ("step size", "ε/16" if params.get("step_size") is None else params["step_size"]),
        ]
    else:
        shown += [
            ("learning rate", params.get("lr")),
            ("targets", params.get("targets")),
            ("smoothness λ", params.get("smoothness")),
        ]
    shown += [
        ("batch size", params.get("batch_size")),
        ("seed", params.get("seed")),
        ("device / precision", f"{_text(params.get('device'), '?')} / "
         f"{_text(params.get('precision'), '?')}"),
        ("threshold", f"{_score(threshold.get('value'))} ({_text(threshold.get('source'), '?')})"),
        ("metric convention", f"{_text(params.get('convention'), '?')}, "
         f"{fpr_label(params.get('tpr'))}; ID test is the positive class"),
        ("quantisation", summary.get("quantization")),
    ]  # fmt: skip
    detector = _map(provenance.get("detector"))
    if detector.get("deployment"):
        shown.append(("deployment", detector.get("deployment")))
    box = (
        '<div class="convention"><h3>Parameters</h3>'
        f"{kv_table([(key, value) for key, value in shown if value is not None], MISSING)}</div>"
    )
    details = (
        "<details><summary>Provenance: versions, data fingerprints, encoder weights</summary>"
        f"{kv_table(list(provenance.items()), MISSING)}</details>"
        if provenance
        else ""
    )
    return f'<section id="parameters"><h2>Parameters and provenance</h2>{box}{details}</section>'


def _td(text: str, numeric: bool = True, title: str = "") -> str:
    css = ' class="num"' if numeric else ""
    hint = f' title="{esc(title)}"' if title else ""
    return f"<td{css}{hint}>{esc(text)}</td>"


def _results_table(summary: Mapping[str, Any]) -> str:
    params = _map(summary.get("params"))
    fpr_name = fpr_label(params.get("tpr"))
    results = [_map(entry) for entry in _list(summary.get("results"))]
    header = [
        "attack",
        "ε",
        "clean AUROC %",
        "attacked AUROC %",
        "Δ AUROC",
        f"clean {fpr_name} %",
        f"attacked {fpr_name} %",
        "success rate %",
        "score raised %",
        "L∞ (/255)",
        "L2",
        "PSNR dB",
        "SSIM",
        "removed targets AUROC % (clean → attacked)",
        "class-score SVM AUROC %",
    ]
    rows = []
    for entry in results:
        sizes = _map(entry.get("perturbation_mean"))
        linf = as_float(sizes.get("linf"))
        removed = _map(entry.get("removed_targets"))
        if removed:
            removed_text = (
                f"{_percent(_map(removed.get('clean')).get('auroc'))} → "
                f"{_percent(_map(removed.get('attacked')).get('auroc'))}"
            )
        else:
            removed_text = MISSING
        svm = _map(entry.get("class_score_svm"))
        svm_text = _percent(svm.get("auroc")) if svm else MISSING
        cells = [
            f'<td class="kind">{esc(_attack_kind(entry))}</td>',
            _td(_eps_text(entry)),
            _td(_percent(entry.get("clean_auroc"))),
            _td(_percent(entry.get("attacked_auroc"))),
            _td(_delta_points(entry.get("clean_auroc"), entry.get("attacked_auroc"))),
            _td(_percent(entry.get("clean_fpr"))),
            _td(_percent(entry.get("attacked_fpr"))),
            _td(_percent(entry.get("success_rate"))),
            _td(_percent(entry.get("score_raised"))),
            _td(MISSING if linf is None else f"{255.0 * linf:.2f}"),
            _td(_number(sizes.get("l2"))),
            _td(_number(sizes.get("psnr"), 1)),
            _td(_number(sizes.get("ssim"))),
            _td(removed_text),
            _td(svm_text, title=_text(svm.get("skipped"))),
        ]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    if not rows:
        return "<p>No attack results.</p>"
    head = "".join(f"<th>{esc(name)}</th>" for name in header)
    return (
        f'<div class="table-wrap"><table class="attack"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
        '<p class="note">AUROC and FPR: ID test (positive) vs the OOD images, clean and '
        "attacked, scored from the saved PNGs. Success rate: of the OOD images the threshold "
        "rejected clean, the share it accepts attacked. Score raised: share of images whose "
        "score went up. Sizes are means over images of the saved PNGs (L∞ in 1/255 levels, L2 "
        "in [0, 1] pixel units). Removed targets: the detector refitted without the attack's "
        "target images. Class-score SVM (Uelwer et al., KI 2021): AUROC of telling clean from "
        f"attacked images on held-out images, clean positive. Δ in percentage points; {MISSING} "
        "= not computed.</p>"
    )


def _svm_across(summary: Mapping[str, Any]) -> str:
    cells = [_map(cell) for cell in _list(summary.get("class_score_svm_across_budgets"))]
    if not cells:
        return ""
    fits = list(dict.fromkeys(_eps_text({"eps": cell.get("fit_eps")}) for cell in cells))
    tests = list(dict.fromkeys(_eps_text({"eps": cell.get("test_eps")}) for cell in cells))
    values = {
        (_eps_text({"eps": c.get("fit_eps")}), _eps_text({"eps": c.get("test_eps")})): c
        for c in cells
    }
    head = "<th>fitted at \\ tested at</th>" + "".join(f"<th>{esc(t)}</th>" for t in tests)
    rows = "".join(
        f"<tr><td>{esc(fit)}</td>"
        + "".join(_td(_percent(_map(values.get((fit, test))).get("auroc"))) for test in tests)
        + "</tr>"
        for fit in fits
    )
    return (
        "<h3>Class-score SVM across budgets</h3>"
        '<p class="note">AUROC % of the SVM fitted on images attacked at one budget, evaluated '
        "on held-out images attacked at each budget.</p>"
        f'<div class="table-wrap"><table class="attack"><thead><tr>{head}</tr></thead>'
        f"<tbody>{rows}</tbody></table></div>"
    )


def _id_scores(summary: Mapping[str, Any], id_scores: Any) -> np.ndarray | None:
    """ID test scores: the argument, else ``summary["id_scores"]["scores"]``, else None."""
    values = id_scores if id_scores is not None else _map(summary.get("id_scores")).get("scores")
    if values is None:
        return None
    try:
        array = np.asarray(
            [np.nan if value is None else value for value in np.ravel(values)], dtype=np.float64
        )
    except (TypeError, ValueError):
        return None
    return array


def _image_scores(images: Sequence[Mapping[str, Any]], index: int) -> tuple[list[Any], list[Any]]:
    """(clean scores, attacked scores) of every image for attack number ``index``."""
    clean, attacked = [], []
    for image in images:
        attacks = _list(image.get("attacks"))
        item = _map(attacks[index]) if index < len(attacks) else {}
        clean.append(as_float(image.get("clean_score")))
        attacked.append(as_float(item.get("attacked_score")))
    return (
        [np.nan if v is None else v for v in clean],
        [np.nan if v is None else v for v in attacked],
    )


def _histograms(
    summary: Mapping[str, Any], id_scores: np.ndarray | None, results: list[Mapping[str, Any]]
) -> str:
    images = [_map(image) for image in _list(summary.get("images"))]
    threshold = as_float(_map(summary.get("threshold")).get("value"))
    figures = []
    for index, entry in enumerate(results):
        clean, attacked = _image_scores(images, index)
        title = _attack_title(entry)
        uri = score_histogram_figure(id_scores, clean, attacked, threshold=threshold, title=title)
        alt = f"score histograms of ID test, clean OOD and attacked OOD, {title}"
        figures.append(
            f'<figure><img src="{uri}" alt="{esc(alt)}"><figcaption><strong>{esc(title)}'
            f"</strong> · {len(images)} OOD images</figcaption></figure>"
        )
    note = "Dashed line: the run's threshold. Higher score = more in-distribution."
    if id_scores is None:
        note += (
            " The ID test scores are not in this attack.json, so only clean vs attacked OOD "
            "are shown."
        )
    return (
        f'<section id="histograms"><h2>Score distributions before and after</h2>'
        f'<p class="note">{esc(note)}</p><div class="figures">{"".join(figures)}</div></section>'
    )


def _triplet(image: Mapping[str, Any], item: Mapping[str, Any], root: Path | None) -> str:
    clean = _read_png(root, image.get("clean_png"))
    adversarial = _read_png(root, item.get("adversarial_png"))
    amplified = None
    if clean is not None and adversarial is not None and clean.shape == adversarial.shape:
        amplified = amplify_perturbation(clean, adversarial)
    source = _text(image.get("source"), f"image {_text(image.get('position'), '?')}")
    before, after = _score(image.get("clean_score")), _score(item.get("attacked_score"))
    accepted = item.get("accepted") is True
    verdict = (
        ' · <span class="accepted">accepted</span>' if accepted and not image.get("clean_accepted")
        else " · accepted clean" if image.get("clean_accepted") else " · rejected"
    )  # fmt: skip
    linf = as_float(item.get("linf"))
    size = MISSING if linf is None else f"{255.0 * linf:.1f}/255"
    cosine = ""  # feature matching: the features' cosine to the target image's, before → after
    if "clean_cosine" in item or "attacked_cosine" in item:
        cosine = (
            f"<br>cosine to target {esc(_number(item.get('clean_cosine')))} → "
            f"{esc(_number(item.get('attacked_cosine')))}"
        )
        if image.get("target_index") is not None:
            cosine += f" (ID training image {esc(image.get('target_index'))})"
    cells = (
        _image_cell(clean, "clean", f"clean {source}")
        + _image_cell(amplified, "perturbation (amplified)", f"perturbation of {source}")
        + _image_cell(adversarial, "manipulated", f"manipulated {source}")
    )
    return (
        f'<div class="triplet"><div class="row">{cells}</div><div class="cap">'
        f'<span class="mono">{esc(source)}</span><br><span class="score">score '
        f"{esc(before)} → {esc(after)}</span>{verdict} · L∞ {esc(size)}{cosine}</div></div>"
    )


def _galleries(
    summary: Mapping[str, Any],
    results: list[Mapping[str, Any]],
    root: Path | None,
    max_images: int,
) -> str:
    images = [_map(image) for image in _list(summary.get("images"))]
    parts = []
    for index, entry in enumerate(results):
        shown = []
        for image in images[:max_images]:
            attacks = _list(image.get("attacks"))
            if index < len(attacks):
                shown.append(_triplet(image, _map(attacks[index]), root))
        parts.append(
            f"<h3>{esc(_attack_title(entry))}</h3>"
            f'<p class="gallery-meta">first {len(shown)} of {len(images)} attacked images · '
            "clean, perturbation δ scaled so max |δ| is full range (grey = 0), manipulated · "
            "score clean → attacked</p>"
            f'<div class="triplets">{"".join(shown)}</div>'
        )
    body = "".join(parts)
    return f'<section id="gallery"><h2>Clean, perturbation, manipulated</h2>{body}</section>'


def attack_section(
    summary: Mapping[str, Any],
    root: Path | None = None,
    *,
    id_scores: Any = None,
    max_images: int = GALLERY_SIZE,
) -> str:
    """The attack's sections (table, curve, histograms, galleries) as HTML, without the page.

    ``root`` is the run folder the summary's PNG paths are relative to (None: no images);
    ``id_scores`` the ID test scores, when ``summary`` lacks ``id_scores.scores``.
    """
    results = [_map(entry) for entry in _list(summary.get("results"))]
    curve = auroc_curve_figure(results)
    parts = [
        '<section id="results"><h2>Clean vs attacked, per budget</h2>',
        _results_table(summary),
        _svm_across(summary),
        "</section>",
    ]
    if curve is not None:
        parts.append(
            '<section id="curve"><h2>AUROC against the budget ε</h2><div class="figures">'
            f'<figure><img src="{curve}" alt="AUROC of clean and attacked OOD against ε">'
            "<figcaption>ID test vs clean OOD and vs attacked OOD; dotted: chance."
            "</figcaption></figure></div></section>"
        )
    parts.append(_histograms(summary, _id_scores(summary, id_scores), results))
    parts.append(_galleries(summary, results, root, max_images))
    return "".join(parts)


def _title(summary: Mapping[str, Any]) -> str:
    """``Attack: pgd on knn · efficientnet-lite0`` (the detector's parameters are in the box)."""
    params = _map(summary.get("params"))
    method = _text(params.get("method"), "?")
    record = _map(params.get("detector"))
    detector = _text(record.get("label") or record.get("name"), "?")
    return f"Attack: {method} on {detector} · {_text(params.get('encoder'), '?')}"


def _headline(summary: Mapping[str, Any]) -> str:
    params = _map(summary.get("params"))
    results = [_map(entry) for entry in _list(summary.get("results"))]
    parts = [
        f"<strong>{esc(_text(params.get('n'), '?'))}</strong> images of "
        f"<code>{esc(_text(params.get('ood_set'), '?'))}</code>",
        f"<strong>{len(results)}</strong> attack{'s' if len(results) != 1 else ''}",
    ]
    for entry in results:
        parts.append(
            f"{esc(_eps_text(entry))}: AUROC <strong>{esc(_percent(entry.get('clean_auroc')))}"
            f" → {esc(_percent(entry.get('attacked_auroc')))}</strong>"
        )
    return " · ".join(parts)


def attack_report_html(
    summary: Mapping[str, Any],
    root: Path | None = None,
    *,
    id_scores: Any = None,
    max_images: int = GALLERY_SIZE,
) -> str:
    """The complete attack report page as a string (see :func:`render_attack_report`)."""
    from oodprobe import __version__

    title = _title(summary)
    links = [("parameters", "Parameters"), ("results", "Results")]
    if auroc_curve_figure_needed(summary):
        links.append(("curve", "AUROC vs ε"))
    links += [("histograms", "Score distributions"), ("gallery", "Images")]
    nav = "<nav>" + "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in links) + "</nav>"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}{EXTRA_CSS}</style></head>\n<body><main>"
        f'<header><h1>{esc(title)}</h1><p class="summary">{_headline(summary)}</p>{nav}'
        "</header>\n"
        + _parameters(summary)
        + "\n"
        + attack_section(summary, root, id_scores=id_scores, max_images=max_images)
        + f"\n<footer>Generated by oodprobe {esc(__version__)}.</footer></main></body></html>\n"
    )


def auroc_curve_figure_needed(summary: Mapping[str, Any]) -> bool:
    """Whether the summary has at least two numeric budgets (so an AUROC-vs-ε curve)."""
    return len(_budget_points([_map(entry) for entry in _list(summary.get("results"))])) >= 2


def render_attack_report(
    summary: Mapping[str, Any],
    path: str | Path,
    *,
    root: str | Path | None = None,
    id_scores: Any = None,
    max_images: int = GALLERY_SIZE,
) -> Path:
    """Write the attack report for ``summary`` (``attack.json``'s content) at ``path``.

    ``root`` (default: ``path``'s folder, where ``attack.json`` lives) is what the summary's PNG
    paths are relative to; ``id_scores`` the ID test scores for the histograms when the summary
    lacks ``id_scores.scores``; ``max_images`` triplets per attack. Rendered in full, then
    written atomically. Returns the path.
    """
    target = Path(path)
    folder = target.parent if root is None else Path(root)
    text = attack_report_html(summary, folder, id_scores=id_scores, max_images=max_images)
    return write_text_atomic(target, text)
