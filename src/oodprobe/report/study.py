"""Rendering of a study: ``study.json``, ``study.csv``, ``study_fits.csv``, Markdown and HTML.

A study runs one benchmark over many encoders and fits OOD AUROC against ID accuracy across
models (Adaloglou, Michels, Kaiser, Kollmann, "Adapting Contrastive Language-Image Pretrained
(CLIP) Models for Out-of-Distribution Detection", TMLR 2024, claim 1: k-NN accuracy predicts
label-free OOD AUROC, R² ≥ 0.92). :mod:`oodprobe.study` computes every number
(fits, confidence intervals, bands, ranking) and hands a finished dict; this module only lays it
out. Accuracies, AUROC and FPR are fractions in [0, 1] shown as percent with one decimal; a slope
is AUROC per accuracy, a plain number. Any value may be None or NaN (a fit needs at least three
models with different accuracies): it shows as "—", never an error.

The dict's keys (all read with defaults, so a partial dict still renders): ``name``,
``benchmark``, ``accuracy_method``, ``primary_detector``, ``detectors``, ``targets``,
``bootstrap``, ``confidence``, ``seed``, ``models`` (``encoder``, ``base``, ``shared_pass``,
``knn_accuracy``, ``probe_accuracy``, ``auroc[detector][target]``, ``fpr[detector][target]``),
``fits`` (``detector``, ``target``, ``accuracy``, ``n_models``, ``slope``, ``intercept``, ``r2``,
``pearson``, ``spearman``, their ``*_ci`` pairs, ``points``, ``band``, ``note``), ``ranking``,
``ranking_by`` and ``lp_vs_ft``.
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from oodprobe.report.plots import study_fit_figure
from oodprobe.report.tables import as_float, csv_cell, jsonable, md_escape, ordered_unique

__all__ = [
    "STUDY_SCHEMA_VERSION",
    "fit_title",
    "render_study_csv",
    "render_study_fits_csv",
    "study_csv_columns",
    "study_document",
    "study_markdown",
    "study_section",
]

STUDY_SCHEMA_VERSION = 1
"""Version of the ``study.json`` layout; bumped when a key is renamed or removed."""

MISSING = "—"
NO_FIT_NOTE = "fit not possible: it needs at least 3 models whose accuracies differ"
ACCURACY_NAMES = {"knn": "k-NN", "probe": "linear probe"}
ACCURACY_AXES = {"knn": "k-NN accuracy (%)", "probe": "linear-probe accuracy (%)"}
FIT_STATS = ("slope", "intercept", "r2", "pearson", "spearman")


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _text(value: Any, default: str = "") -> str:
    return default if value is None else str(value)


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _percent(value: Any) -> str:
    """A fraction as a percentage with one decimal (``0.9512`` -> ``95.1``), or ``—``."""
    number = as_float(value)
    return MISSING if number is None else f"{100.0 * number:.1f}"


def _number(value: Any, digits: int) -> str:
    number = as_float(value)
    return MISSING if number is None else f"{number:.{digits}f}"


def _delta(before: Any, after: Any) -> str:
    """``after − before`` in percentage points with its sign (``+1.2``, ``−0.4``), or ``—``."""
    low, high = as_float(before), as_float(after)
    if low is None or high is None:
        return MISSING
    points = 100.0 * (high - low)
    return f"{points:+.1f}".replace("-", "−")


def accuracy_name(kind: Any) -> str:
    """``k-NN`` / ``linear probe`` for a fit's ``accuracy`` key (``knn`` / ``probe``)."""
    return ACCURACY_NAMES.get(str(kind), str(kind))


def accuracy_axis(kind: Any) -> str:
    """The x-axis label of a fit plot: ``k-NN accuracy (%)`` or ``linear-probe accuracy (%)``."""
    return ACCURACY_AXES.get(str(kind), f"{kind} accuracy (%)")


def fit_title(fit: Mapping[str, Any]) -> str:
    """``near mean — R² = 0.93 (n = 9)``; ``R² = —`` when the fit has no value."""
    n_models = fit.get("n_models")
    count = MISSING if n_models is None else str(n_models)
    return f"{_text(fit.get('target'))} — R² = {_number(fit.get('r2'), 2)} (n = {count})"


def fit_note(fit: Mapping[str, Any]) -> str:
    """The fit's own note, or a standard one when a statistic is missing without one."""
    note = _text(fit.get("note"))
    if not note and any(as_float(fit.get(key)) is None for key in ("slope", "r2")):
        return NO_FIT_NOTE
    return note


def _detectors(study: Mapping[str, Any]) -> list[str]:
    """Detectors in the study's order, then any a model has that the list lacks."""
    named = [str(name) for name in _list(study.get("detectors"))]
    found = (
        str(detector)
        for model in _list(study.get("models"))
        for metric in ("auroc", "fpr")
        for detector in _map(_map(model).get(metric))
    )
    return ordered_unique([*named, *found])


def _targets(study: Mapping[str, Any]) -> list[str]:
    """Targets in the study's order (OOD sets, then means), then any others the models have."""
    named = [str(name) for name in _list(study.get("targets"))]
    found = (
        str(target)
        for model in _list(study.get("models"))
        for metric in ("auroc", "fpr")
        for values in _map(_map(model).get(metric)).values()
        for target in _map(values)
    )
    return ordered_unique([*named, *found])


def _score_differs(ranking: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any ranking score differs from the primary AUROC (else one column shows both)."""
    return any(
        as_float(entry.get("score")) != as_float(entry.get("primary_auroc")) for entry in ranking
    )


def _metric(model: Mapping[str, Any], metric: str, detector: str, target: str) -> Any:
    return _map(_map(model.get(metric)).get(detector)).get(target)


# -- files -------------------------------------------------------------------------------------


def study_document(study: Mapping[str, Any]) -> dict[str, Any]:
    """The ``study.json`` content: ``schema_version`` first, then the study dict, JSON-safe.

    NaN and infinities become ``null``; numpy values become Python numbers. A
    ``schema_version`` key inside ``study`` is replaced by this layout's version.
    """
    document: dict[str, Any] = {"schema_version": STUDY_SCHEMA_VERSION}
    document.update({key: value for key, value in study.items() if key != "schema_version"})
    result: dict[str, Any] = jsonable(document)
    return result


def study_csv_columns(study: Mapping[str, Any]) -> list[str]:
    """``study.csv`` columns: encoder, both accuracies, AUROC then FPR per detector x target.

    Named ``auroc knn / near mean`` and ``fpr knn / near mean``; ``base`` and ``shared_pass``
    (which encoder a fine-tuned one came from, which feature pass it shared) come last.
    """
    pairs = [(det, target) for det in _detectors(study) for target in _targets(study)]
    return [
        "encoder",
        "knn_accuracy",
        "probe_accuracy",
        *(f"auroc {det} / {target}" for det, target in pairs),
        *(f"fpr {det} / {target}" for det, target in pairs),
        "base",
        "shared_pass",
    ]


def _write_csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([csv_cell(value) for value in row])
    return buffer.getvalue()


def render_study_csv(study: Mapping[str, Any]) -> str:
    """``study.csv``: one line per model; fractions exactly (``repr``), '' where missing."""
    pairs = [(det, target) for det in _detectors(study) for target in _targets(study)]
    rows = []
    for item in _list(study.get("models")):
        model = _map(item)
        rows.append(
            [
                model.get("encoder"),
                model.get("knn_accuracy"),
                model.get("probe_accuracy"),
                *(_metric(model, "auroc", det, target) for det, target in pairs),
                *(_metric(model, "fpr", det, target) for det, target in pairs),
                model.get("base"),
                model.get("shared_pass"),
            ]
        )
    return _write_csv(study_csv_columns(study), rows)


FIT_COLUMNS: tuple[str, ...] = (
    "detector",
    "target",
    "accuracy",
    "n_models",
    "slope",
    "slope_low",
    "slope_high",
    "intercept",
    "intercept_low",
    "intercept_high",
    "r2",
    "r2_low",
    "r2_high",
    "pearson",
    "pearson_low",
    "pearson_high",
    "spearman",
    "spearman_low",
    "spearman_high",
    "n_bootstrap_used",
    "note",
)
"""``study_fits.csv`` columns; the points and the band are in ``study.json``."""


def render_study_fits_csv(study: Mapping[str, Any]) -> str:
    """``study_fits.csv``: one line per fit (detector x target x accuracy kind)."""
    rows = []
    for item in _list(study.get("fits")):
        fit = _map(item)
        record: dict[str, Any] = {key: fit.get(key) for key in FIT_COLUMNS}
        for stat in FIT_STATS:
            pair = _list(fit.get(f"{stat}_ci"))
            record[f"{stat}_low"], record[f"{stat}_high"] = pair if len(pair) == 2 else (None, None)
        rows.append([record[key] for key in FIT_COLUMNS])
    return _write_csv(FIT_COLUMNS, rows)


# -- Markdown ----------------------------------------------------------------------------------


def _md_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


FIT_HEADER = ("slope [CI]", "intercept % [CI]", "R² [CI]", "Pearson r [CI]", "Spearman ρ [CI]")


def fit_cells(fit: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(value, interval)`` texts of slope, intercept, R², Pearson r and Spearman ρ.

    The slope is a plain number (AUROC per accuracy, 2 decimals); the intercept is the AUROC at
    0 accuracy in percent; R², r and ρ have 3 decimals. Missing values are ``—`` with no interval.
    """
    cells = []
    for stat in FIT_STATS:
        scale, digits = (100.0, 1) if stat == "intercept" else (1.0, 2 if stat == "slope" else 3)
        value = as_float(fit.get(stat))
        if value is None:
            cells.append((MISSING, ""))
            continue
        pair = [as_float(bound) for bound in _list(fit.get(f"{stat}_ci"))]
        interval = ""
        if len(pair) == 2 and pair[0] is not None and pair[1] is not None:
            interval = f"[{scale * pair[0]:.{digits}f}, {scale * pair[1]:.{digits}f}]"
        cells.append((f"{scale * value:.{digits}f}", interval))
    return cells


def _intro(study: Mapping[str, Any]) -> tuple[str, str]:
    """(what was run, how it was fitted) as plain text, for the Markdown and the HTML."""
    models = _list(study.get("models"))
    count = f"{len(models)} model{'s' if len(models) != 1 else ''}"
    benchmark = _text(study.get("benchmark"), "?")
    method = _text(study.get("accuracy_method"), "?")
    run = f"benchmark {benchmark} over {count}; ID accuracy: {method}"
    confidence = as_float(study.get("confidence"))
    level = f"{100 * (0.95 if confidence is None else confidence):g}%"
    bootstrap, seed = study.get("bootstrap"), study.get("seed")
    how = f"least squares of OOD AUROC on ID accuracy across models; {level} intervals"
    if bootstrap:
        how += f" from {bootstrap} bootstrap resamples of the models"
    if seed is not None:
        how += f" (seed {seed})"
    return run, how


def study_markdown(study: Mapping[str, Any]) -> list[str]:
    """Markdown lines: the study's fits for the primary detector, then the ranking."""
    primary = _text(study.get("primary_detector"))
    run, how = _intro(study)
    lines = [f"## Study: {md_escape(_text(study.get('name'), 'unnamed'))}", ""]
    lines += [f"{md_escape(run)}. Fits: {md_escape(how)}.", ""]
    fits = [_map(fit) for fit in _list(study.get("fits"))]
    mine = [fit for fit in fits if _text(fit.get("detector")) == primary]
    lines += [f"### Fits of detector {md_escape(primary)}", ""]
    if mine:
        header = ["target", "accuracy", "n", *FIT_HEADER, "note"]
        lines += [_md_row(header), "|---|---|" + "---:|" * 6 + "---|"]
        for fit in mine:
            cells = [
                md_escape(_text(fit.get("target"))),
                md_escape(accuracy_name(fit.get("accuracy"))),
                _text(fit.get("n_models"), MISSING),
                *(f"{value} {interval}".strip() for value, interval in fit_cells(fit)),
                md_escape(fit_note(fit)),
            ]
            lines.append(_md_row(cells))
    else:
        lines.append("No fits for the primary detector.")
    lines.append("")
    ranking = [_map(entry) for entry in _list(study.get("ranking"))]
    by = _text(study.get("ranking_by"))
    lines += ["### Ranking" + (f" by {md_escape(by)}" if by else ""), ""]
    if ranking:
        score = _score_differs(ranking)
        header = ["rank", "encoder", "k-NN accuracy %", f"{md_escape(primary)} AUROC %"]
        lines += [
            _md_row(header + ["score %"] * score),
            "|---:|---|---:|---:|" + "---:|" * score,
        ]
        for entry in ranking:
            cells = [
                _text(entry.get("rank"), MISSING),
                md_escape(_text(entry.get("encoder"))),
                _percent(entry.get("knn_accuracy")),
                _percent(entry.get("primary_auroc")),
                *[_percent(entry.get("score"))] * score,
            ]
            lines.append(_md_row(cells))
    else:
        lines.append("No models to rank.")
    lines += ["", "Full study tables: study.csv (models), study_fits.csv (fits), study.json.", ""]
    return lines


# -- HTML --------------------------------------------------------------------------------------


def _td(text: str, numeric: bool = False, ci: str = "") -> str:
    shown = f'<span class="ci">{_esc(ci)}</span>' if ci else ""
    return f'<td class="num">{_esc(text)}{shown}</td>' if numeric else f"<td>{_esc(text)}</td>"


def _code(text: Any) -> str:
    return f"<code>{_esc(text)}</code>"


def _table(header: Sequence[str], rows: Sequence[str], css: str = "study") -> str:
    head = "".join(f"<th>{_esc(name)}</th>" for name in header)
    return (
        f'<div class="table-wrap"><table class="{css}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _figure(fit: Mapping[str, Any], confidence: float) -> str:
    title = fit_title(fit)
    note = fit_note(fit)
    uri = study_fit_figure(
        fit,
        title=title,
        xlabel=accuracy_axis(fit.get("accuracy")),
        confidence=confidence,
        note=note,
    )
    detector, target = _text(fit.get("detector")), _text(fit.get("target"))
    kind = accuracy_name(fit.get("accuracy"))
    alt = f"OOD AUROC of {detector} on {target} against {kind} accuracy, one point per model"
    (slope, slope_ci), _, _, (pearson, _), (spearman, _) = fit_cells(fit)
    stats = f"slope {slope}" + (f" {slope_ci}" if slope_ci else "")
    stats += f" · Pearson r {pearson} · Spearman ρ {spearman}"
    if {slope, pearson, spearman} == {MISSING}:
        stats = "no fit"
    shown = f'<div class="fit-note">{_esc(note)}</div>' if note else ""
    return (
        f'<figure class="study-fit"><img src="{uri}" alt="{_esc(alt)}">'
        f"<figcaption><strong>{_esc(detector)}</strong> · {_esc(title)} · against "
        f"{_esc(kind)} accuracy · {_esc(stats)}{shown}</figcaption></figure>"
    )


def _fit_table(fits: Sequence[Mapping[str, Any]]) -> str:
    header = ["detector", "target", "accuracy", "n models", *FIT_HEADER, "note"]
    rows = []
    for fit in fits:
        cells = [
            _td(_text(fit.get("detector"))),
            _td(_text(fit.get("target"))),
            _td(accuracy_name(fit.get("accuracy"))),
            _td(_text(fit.get("n_models"), MISSING), numeric=True),
            *(_td(value, numeric=True, ci=interval) for value, interval in fit_cells(fit)),
        ]
        cells.append(f'<td class="note-cell">{_esc(fit_note(fit))}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return _table(header, rows)


def _ranking_table(study: Mapping[str, Any], primary: str) -> str:
    entries = [_map(item) for item in _list(study.get("ranking"))]
    probe = any(as_float(entry.get("probe_accuracy")) is not None for entry in entries)
    score = _score_differs(entries)
    rows = []
    for entry in entries:
        rows.append(
            "<tr>"
            + _td(_text(entry.get("rank"), MISSING), numeric=True)
            + f"<td>{_code(_text(entry.get('encoder')))}</td>"
            + _td(_percent(entry.get("knn_accuracy")), numeric=True)
            + (_td(_percent(entry.get("probe_accuracy")), numeric=True) if probe else "")
            + _td(_percent(entry.get("primary_auroc")), numeric=True)
            + (_td(_percent(entry.get("score")), numeric=True) if score else "")
            + "</tr>"
        )
    if not rows:
        return "<p>No models to rank.</p>"
    header = ["rank", "encoder", "k-NN accuracy %"]
    header += ["linear-probe accuracy %"] * probe + [f"{primary} AUROC %"]
    header += ["score %"] * score
    return _table(header, rows)


def _lp_vs_ft_table(entries: Sequence[Mapping[str, Any]], fpr_name: str) -> str:
    header = ["base (linear probe)", "fine-tuned", "detector", "target", "LP accuracy %"]
    header += ["FT accuracy %", "Δ", "LP AUROC %", "FT AUROC %", "Δ"]
    header += [f"LP {fpr_name} %", f"FT {fpr_name} %", "Δ"]
    rows = []
    for entry in entries:
        cells = [
            f"<td>{_code(_text(entry.get('base')))}</td>",
            f"<td>{_code(_text(entry.get('finetuned')))}</td>",
            _td(_text(entry.get("detector"))),
            _td(_text(entry.get("target"))),
        ]
        for metric in ("accuracy", "auroc", "fpr"):
            before, after = entry.get(f"lp_{metric}"), entry.get(f"ft_{metric}")
            cells += [_td(_percent(before), numeric=True), _td(_percent(after), numeric=True)]
            cells.append(_td(_delta(before, after), numeric=True))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return _table(header, rows)


def _models_table(study: Mapping[str, Any], fpr_name: str) -> str:
    """Every model's accuracies and AUROC / FPR per detector x target (``study.csv``)."""
    detectors, targets = _detectors(study), _targets(study)
    header = ["encoder", "base", "k-NN accuracy %", "linear-probe accuracy %"]
    header += [f"{det} AUROC % · {target}" for det in detectors for target in targets]
    header += [f"{det} {fpr_name} % · {target}" for det in detectors for target in targets]
    rows = []
    for item in _list(study.get("models")):
        model = _map(item)
        base = model.get("base")
        cells = [
            f"<td>{_code(_text(model.get('encoder')))}</td>",
            f"<td>{MISSING if base is None else _code(base)}</td>",
            _td(_percent(model.get("knn_accuracy")), numeric=True),
            _td(_percent(model.get("probe_accuracy")), numeric=True),
        ]
        for metric in ("auroc", "fpr"):
            cells += [
                _td(_percent(_metric(model, metric, det, target)), numeric=True)
                for det in detectors
                for target in targets
            ]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    if not rows:
        return "<p>No models.</p>"
    return (
        "<details><summary>All models: accuracy, AUROC and "
        f"{_esc(fpr_name)} per detector and target</summary>"
        + _table(header, rows, css="study long")
        + "</details>"
    )


def study_section(study: Mapping[str, Any], fpr_name: str = "FPR@95") -> str:
    """The report's "Study" section: fit plots, fit table, ranking, LP vs FT, all models."""
    primary = _text(study.get("primary_detector"))
    confidence = as_float(study.get("confidence"))
    confidence = 0.95 if confidence is None else confidence
    run, how = _intro(study)
    fits = [_map(fit) for fit in _list(study.get("fits"))]
    mine = [fit for fit in fits if _text(fit.get("detector")) == primary]
    others = [fit for fit in fits if _text(fit.get("detector")) != primary]
    parts = [
        f'<p class="study-meta">{_esc(run)}.</p>',
        f'<p class="note">Fits: {_esc(how)}. One point per model; the line is the least-squares '
        "fit, the shaded area its band. Slope: AUROC points per accuracy point. "
        f"Values in %; {MISSING} = not computable.</p>",
    ]
    excluded = [_text(name) for name in _list(study.get("fit_excludes"))]
    if excluded:
        parts.append(
            '<p class="note">Left out of the fits (fine-tuned; the finding concerns pretrained '
            f"models, see linear probe vs fine-tuned): {_esc(', '.join(excluded))}.</p>"
        )
    parts.append(f"<h3>Detector <code>{_esc(primary)}</code>: OOD AUROC against ID accuracy</h3>")
    fitted = [fit for fit in fits if as_float(fit.get("slope")) is not None]
    if mine and not fitted:  # e.g. a base and its fine-tuned model: one point per plot
        notes = ordered_unique(_text(fit.get("note")) for fit in mine if fit.get("note"))
        parts.append(
            f'<p class="note">No fit could be made ({_esc("; ".join(notes) or "no statistics")}'
            "), so no plots: a fit needs at least three pretrained models with different "
            "accuracies.</p>"
        )
        mine, others = [], []
    elif mine:
        figures = "".join(_figure(fit, confidence) for fit in mine)
        parts.append(f'<div class="figures">{figures}</div>')
    else:
        parts.append("<p>No fits for the primary detector.</p>")
    if others:
        names = ", ".join(ordered_unique(_text(fit.get("detector")) for fit in others))
        figures = "".join(_figure(fit, confidence) for fit in others)
        parts.append(
            f"<details><summary>Other detectors ({_esc(names)}): {len(others)} "
            f"plot{'s' if len(others) != 1 else ''}</summary>"
            f'<div class="figures">{figures}</div></details>'
        )
    parts.append("<h3>Fits</h3>")
    parts.append(_fit_table(fits) if fits else "<p>No fits.</p>")
    by = _text(study.get("ranking_by"))
    parts.append("<h3>Ranking</h3>" + (f'<p class="note">Ranked by {_esc(by)}.</p>' if by else ""))
    parts.append(_ranking_table(study, primary))
    lp_vs_ft = [_map(entry) for entry in _list(study.get("lp_vs_ft"))]
    if lp_vs_ft:
        parts.append(
            '<h3>Linear probe vs fine-tuned</h3><p class="note">Δ = fine-tuned − linear probe, '
            "in percentage points.</p>" + _lp_vs_ft_table(lp_vs_ft, fpr_name)
        )
    parts.append(_models_table(study, fpr_name))
    name = _text(study.get("name"), "unnamed")
    return f'<section id="study"><h2>Study <code>{_esc(name)}</code></h2>{"".join(parts)}</section>'
