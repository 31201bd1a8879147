"""One self-contained HTML report: tables, convention, ROC curves, histograms, galleries.

Everything is inline (CSS, ``data:`` images), a Content-Security-Policy forbids any fetch, and
the page has no script. All text goes through :func:`html.escape`. The same input gives the same
bytes: nothing here reads the clock.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from oodprobe import __version__
from oodprobe.report.atomic import write_text_atomic
from oodprobe.report.model import MAIN_ROW_KEYS, Gallery, ReportData
from oodprobe.report.plots import histogram_figure, roc_figure, set_colors, thumbnail
from oodprobe.report.study import study_section
from oodprobe.report.style import CSS
from oodprobe.report.tables import (
    EncoderTable,
    TableCell,
    as_float,
    build_tables,
    compact_json,
    format_ci,
    format_percent,
    fpr_label,
    jsonable,
    mean_auroc,
    ordered_sets,
    ordered_unique,
)

__all__ = ["render_html", "report_html"]

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'none'"
RULES = {
    "first": "first threshold reaching TPR ≥ {tpr}",
    "nearest": "threshold whose TPR is nearest {tpr}",
    "interpolate": "ROC linearly interpolated at TPR {tpr}",
    "quantile": "threshold at the (1 − {tpr}) quantile of ID scores",
    "interp-sklearn": "np.interp at TPR {tpr} on sklearn's default ROC (the PLP authors' code)",
}


def esc(value: Any) -> str:
    """Escaped text of ``value`` for HTML content and attribute values."""
    return html.escape(str(value), quote=True)


def _badge(group: str) -> str:
    return f'<span class="badge {esc(group)}">{esc(group)}</span>' if group else ""


def _params_text(params: Any) -> str:
    """``k=5, temperature=1.0`` from a detector_params dict (compact JSON otherwise)."""
    if isinstance(params, Mapping):
        parts = []
        for key, value in params.items():
            shown = value if isinstance(value, str | int | float | bool) else compact_json(value)
            parts.append(f"{key}={shown}")
        return ", ".join(parts)
    return "" if params is None else compact_json(params)


def _cell(cell: TableCell | None, classes: list[str]) -> str:
    if cell is None:
        return f'<td class="{" ".join(["num", *classes])}">–</td>'
    interval = format_ci(cell.low, cell.high)
    ci = f'<span class="ci">{esc(interval)}</span>' if interval else ""
    names = ["num", *classes, *(["best"] if cell.best else [])]
    return f'<td class="{" ".join(names)}">{esc(format_percent(cell.value))}{ci}</td>'


def _encoder_table(table: EncoderTable, fpr_name: str) -> str:
    """Detectors x (OOD sets, near/far means), AUROC and FPR per column, best highlighted."""
    top = ['<th rowspan="2" class="det">detector</th>']
    sub = []
    for column in table.columns:
        group = table.groups[column]
        mean = " mean" if group == "mean" else ""
        # A mean column is named "near mean": show "mean" with the group's coloured badge.
        label = (
            "mean" + _badge(column.removesuffix(" mean")) if mean else esc(column) + _badge(group)
        )
        top.append(f'<th colspan="2" class="split{mean}">{label}</th>')
        sub.append(
            f'<th class="split{mean}">AUROC ↑</th><th class="{mean.strip()}">{esc(fpr_name)} ↓</th>'
        )
    body = []
    for detector in table.detectors:
        params = _params_text(table.params.get(detector))
        shown = f'<span class="params">{esc(params)}</span>' if params else ""
        cells = [f'<td class="det"><strong>{esc(detector)}</strong>{shown}</td>']
        for column in table.columns:
            extra = ["mean"] if table.groups[column] == "mean" else []
            cells.append(_cell(table.cells[detector].get((column, "auroc")), ["split", *extra]))
            cells.append(_cell(table.cells[detector].get((column, "fpr")), extra))
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f"<h3>Encoder <code>{esc(table.encoder)}</code></h3>"
        '<div class="table-wrap"><table class="results"><thead>'
        f'<tr>{"".join(top)}</tr><tr class="sub">{"".join(sub)}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _convention_box(convention: Mapping[str, Any], fpr_name: str, tpr: float) -> str:
    name = str(convention.get("name") or "unnamed")
    positive = str(convention.get("positive") or "id")
    rule = str(convention.get("rule") or "")
    description = str(convention.get("description") or "")
    if positive == "ood":
        meaning = f"share of ID samples rejected at the threshold that rejects {tpr:.0%} of OOD"
    else:
        meaning = f"share of OOD samples accepted at the threshold that keeps {tpr:.0%} of ID"
    rule_text = RULES.get(rule, rule).format(tpr=f"{tpr:g}")
    rows = [
        ("positive class", "OOD" if positive == "ood" else "ID"),
        (f"{fpr_name} point", rule_text),
        ("AUPR", str(convention.get("aupr_method") or "–")),
    ]
    items = "".join(f"<dt>{esc(key)}</dt><dd>{esc(value)}</dd>" for key, value in rows)
    return (
        f'<aside class="convention"><h3>Convention <code>{esc(name)}</code></h3>'
        + (f"<p><strong>{esc(fpr_name)}</strong>: {esc(description)}</p>" if description else "")
        + f"<p>{esc(fpr_name)} = {esc(meaning)}.</p><dl>{items}</dl>"
        '<p class="note">AUROC does not depend on the convention. Scores: higher = more '
        "in-distribution. Values in %; [low, high] is the bootstrap CI where one was run; "
        "green = best in its column.</p></aside>"
    )


def _details(extra: Mapping[str, Any]) -> str:
    """Extra row keys, one ``key: value`` line each (values as compact JSON unless text)."""
    lines = []
    for key, value in jsonable(extra).items():
        shown = value if isinstance(value, str) else compact_json(value)
        lines.append(f'<div><span class="key">{esc(key)}:</span> {esc(shown)}</div>')
    return "".join(lines)


def _long_table(rows: list[dict[str, Any]], fpr_name: str) -> str:
    """Every row with all four metrics, sample sizes and its extra provenance keys."""
    head = [
        "encoder",
        "detector",
        "OOD set",
        "AUROC",
        fpr_name,
        "AUPR-In",
        "AUPR-Out",
        "n ID",
        "n OOD",
        "details",
    ]
    lines = []
    for row in rows:
        metrics = []
        for metric in ("auroc", "fpr", "aupr_in", "aupr_out"):
            interval = format_ci(row.get(f"{metric}_low"), row.get(f"{metric}_high"))
            ci = f'<span class="ci">{esc(interval)}</span>' if interval else ""
            metrics.append(f'<td class="num">{esc(format_percent(row.get(metric)))}{ci}</td>')
        extra = {key: value for key, value in row.items() if key not in MAIN_ROW_KEYS}
        if row.get("detector_params"):
            extra = {"detector_params": row["detector_params"], **extra}
        lines.append(
            f"<tr><td>{esc(row.get('encoder'))}</td><td>{esc(row.get('detector'))}</td>"
            f"<td>{esc(row.get('ood_set'))}{_badge(str(row.get('group') or ''))}</td>"
            + "".join(metrics)
            + f'<td class="num">{esc(row.get("n_id", "–"))}</td>'
            f'<td class="num">{esc(row.get("n_ood", "–"))}</td>'
            f'<td class="extra mono">{_details(extra)}</td></tr>'
        )
    header = "".join(f"<th>{esc(name)}</th>" for name in head)
    return (
        "<details><summary>All metrics: AUPR, sample sizes, per-row details</summary>"
        f'<div class="table-wrap"><table class="long"><thead><tr>{header}</tr></thead>'
        f"<tbody>{''.join(lines)}</tbody></table></div></details>"
    )


def _id_accuracy(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return ""
    body = "".join(
        f"<tr><td><code>{esc(entry.get('encoder', ''))}</code></td>"
        f"<td>{esc(entry.get('method', ''))}</td>"
        f'<td class="num">{esc(format_percent(entry.get("accuracy")))}</td></tr>'
        for entry in entries
    )
    return (
        '<section id="id-accuracy"><h2>ID classification accuracy</h2><div class="table-wrap">'
        "<table><thead><tr><th>encoder</th><th>method</th><th>accuracy %</th></tr></thead>"
        f"<tbody>{body}</tbody></table></div></section>"
    )


def _figures(report: ReportData, kind: str, positive: str, tpr: float) -> str:
    """ROC (``kind='roc'``) or histogram figures, one per encoder x detector score set."""
    colors = set_colors(
        ordered_sets(report.rows)
        or ordered_unique(n for s in report.score_sets for n in s.ood_scores)
    )
    parts = []
    for score_set in report.score_sets:
        if kind == "roc":
            aurocs = {
                str(row["ood_set"]): as_float(row.get("auroc"))
                for row in report.rows
                if row.get("encoder") == score_set.encoder
                and row.get("detector") == score_set.detector
            }
            uri = roc_figure(score_set, positive=positive, tpr=tpr, aurocs=aurocs, colors=colors)
        else:
            uri = histogram_figure(score_set, positive=positive, tpr=tpr, colors=colors)
        alt = f"{'ROC curves' if kind == 'roc' else 'Score histograms'}: {score_set.detector} "
        alt += f"on {score_set.encoder}"
        parts.append(
            f'<figure><img src="{uri}" alt="{esc(alt)}">'
            f"<figcaption><strong>{esc(score_set.detector)}</strong> · "
            f"<code>{esc(score_set.encoder)}</code> · {score_set.id_scores.size} ID scores"
            "</figcaption></figure>"
        )
    return f'<div class="figures">{"".join(parts)}</div>'


def _gallery(gallery: Gallery, index: int) -> str:
    cards = []
    for item in gallery.images:
        uri, width, height = thumbnail(item.image)
        score = as_float(item.score)
        shown = "–" if score is None else f"{score:.3f}" if abs(score) < 1e3 else f"{score:.4g}"
        cards.append(
            f'<div class="thumb"><div class="frame"><img src="{uri}" width="{width}" '
            f'height="{height}" alt="{esc(item.caption)}"></div>'
            f'<div class="cap mono">{esc(item.caption)}</div>'
            f'<div class="score">score {esc(shown)}</div></div>'
        )
    description = f"<p>{esc(gallery.description)}</p>" if gallery.description else ""
    return (
        f'<h3 id="gallery-{index}">{esc(gallery.title)}</h3>'
        f'<p class="gallery-meta"><code>{esc(gallery.encoder)}</code> · {esc(gallery.detector)}'
        f" · {len(gallery.images)} images · higher score = more in-distribution</p>"
        f'{description}<div class="gallery">{"".join(cards)}</div>'
    )


def kv_table(items: Iterable[tuple[str, Any]], missing: str = "null") -> str:
    """A two-column key/value table: lists and dicts as indented JSON, None as ``missing``."""
    rows = []
    for key, value in items:
        value = jsonable(value)
        if isinstance(value, dict | list):
            text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
            shown = f"<pre>{esc(text)}</pre>"
        else:
            shown = f'<span class="mono">{esc(missing if value is None else value)}</span>'
        rows.append(f"<tr><td>{esc(key)}</td><td>{shown}</td></tr>")
    return f'<table class="kv"><tbody>{"".join(rows)}</tbody></table>'


def _provenance(provenance: Mapping[str, Any]) -> str:
    items = list(jsonable(provenance).items())
    table = kv_table(items) if items else "<p>–</p>"
    return (
        '<section id="provenance"><h2>Provenance</h2><details><summary>Versions, data '
        f"fingerprints, configuration, command line</summary>{table}</details></section>"
    )


def _summary(report: ReportData, tables: list[EncoderTable]) -> str:
    rows = report.rows
    detectors = ordered_unique(str(row["detector"]) for row in rows)
    sets = ordered_sets(rows)
    groups = {str(row["ood_set"]): str(row.get("group") or "") for row in rows}
    near = sum(1 for name in sets if groups[name] == "near")
    far = sum(1 for name in sets if groups[name] == "far")
    n_id = ordered_unique(str(row.get("n_id")) for row in rows if row.get("n_id") is not None)
    parts = [
        f"<strong>{len(tables)}</strong> encoder{'s' if len(tables) != 1 else ''}",
        f"<strong>{len(detectors)}</strong> detector{'s' if len(detectors) != 1 else ''}",
        f"<strong>{len(sets)}</strong> OOD set{'s' if len(sets) != 1 else ''} "
        f"({near} near, {far} far)",
    ]
    if n_id:
        parts.append(f"<strong>{esc(' / '.join(n_id))}</strong> ID test samples")
    scored = [
        (value, table.encoder, det)
        for table in tables
        for det in table.detectors
        if (value := mean_auroc(table, det)) is not None
    ]
    if scored:
        value, encoder, det = max(scored, key=lambda item: item[0])
        parts.append(
            f"best mean AUROC <strong>{esc(format_percent(value))}</strong> "
            f"({esc(det)} on <code>{esc(encoder)}</code>)"
        )
    return " · ".join(parts)


def _section(anchor: str, title: str, body: str, note: str = "") -> str:
    shown = f'<p class="note">{esc(note)}</p>' if note else ""
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{shown}{body}</section>'


def _nav(links: Iterable[tuple[str, str]]) -> str:
    return "<nav>" + "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in links) + "</nav>"


def report_html(report: ReportData) -> str:
    """The complete report page as a string (see :func:`render_html`)."""
    convention = report.convention
    tpr = as_float(convention.get("tpr"))
    if tpr is None:
        tpr = as_float(report.rows[0].get("tpr")) if report.rows else None
    tpr = 0.95 if tpr is None else tpr
    positive = str(convention.get("positive") or "id")
    fpr_name = fpr_label(tpr)
    tables = build_tables(report.rows)
    # Wide tables (over 5 column pairs: OOD sets + means) get the full width, convention above.
    layout = " stacked" if max((len(t.columns) for t in tables), default=0) > 5 else ""
    sections = [study_section(report.study, fpr_name)] if report.study is not None else []
    sections += [
        f'<section id="results"><h2>Results</h2><div class="results-layout{layout}">'
        '<div class="results-tables">'
        + "".join(_encoder_table(table, fpr_name) for table in tables)
        + ("" if report.rows else "<p>No results.</p>")
        + f"</div>{_convention_box(convention, fpr_name, tpr)}</div>"
        + (_long_table(report.rows, fpr_name) if report.rows else "")
        + "</section>",
        _id_accuracy(report.id_accuracy),
    ]
    links = [("study", "Study")] if report.study is not None else []
    links += [("results", "Results")] + [("id-accuracy", "ID accuracy")] * bool(report.id_accuracy)
    if report.score_sets:
        roc_note = f"Dashed line: TPR {tpr:.0%}, the operating point of {fpr_name}."
        hist_note = f"Dashed line: threshold at TPR {tpr:.0%} ({positive.upper()} positive)."
        sections.append(
            _section("roc", "ROC curves", _figures(report, "roc", positive, tpr), roc_note)
        )
        sections.append(
            _section(
                "histograms",
                "Score distributions",
                _figures(report, "hist", positive, tpr),
                hist_note,
            )
        )
        links += [("roc", "ROC curves"), ("histograms", "Score distributions")]
    if report.galleries:
        body = "".join(_gallery(gallery, i) for i, gallery in enumerate(report.galleries))
        sections.append(_section("galleries", "Galleries", body))
        links.append(("galleries", "Galleries"))
    sections.append(_provenance(report.provenance))
    links.append(("provenance", "Provenance"))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(report.title)}</title><style>{CSS}</style></head>\n<body><main>"
        f'<header><h1>{esc(report.title)}</h1><p class="summary">{_summary(report, tables)}</p>'
        f"{_nav(links)}</header>\n"
        + "\n".join(section for section in sections if section)
        + f"\n<footer>Generated by oodprobe {esc(__version__)}.</footer></main></body></html>\n"
    )


def render_html(report: ReportData, path: Path) -> Path:
    """Write ``report`` as one self-contained HTML file at ``path`` and return the path.

    Inline CSS, images as base64 ``data:`` URIs, no scripts and no external URL; the parent
    directory is created if needed. Rendered in full before writing, then written atomically:
    a failure leaves a previous report whole.
    """
    return write_text_atomic(path, report_html(report))
