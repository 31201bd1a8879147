"""Machine- and human-readable result files: ``results.json``, ``results.csv``, ``results.md``."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from oodprobe.report.atomic import write_text_atomic
from oodprobe.report.model import MAIN_ROW_KEYS, ReportData
from oodprobe.report.study import (
    render_study_csv,
    render_study_fits_csv,
    study_document,
    study_markdown,
)
from oodprobe.report.tables import (
    EncoderTable,
    build_tables,
    csv_cell,
    format_ci,
    format_percent,
    fpr_label,
    jsonable,
    md_escape,
)

__all__ = ["SCHEMA_VERSION", "csv_columns", "render_csv", "render_markdown", "write_results"]

SCHEMA_VERSION = 1
"""Version of the ``results.json`` layout; bumped when a key is renamed or removed."""


def results_document(report: ReportData) -> dict[str, Any]:
    """The ``results.json`` content: rows, ID accuracy, convention, provenance, gallery index."""
    galleries = [
        {
            "title": gallery.title,
            "encoder": gallery.encoder,
            "detector": gallery.detector,
            "images": [{"caption": item.caption, "score": item.score} for item in gallery.images],
        }
        for gallery in report.galleries
    ]
    return jsonable(
        {
            "schema_version": SCHEMA_VERSION,
            "title": report.title,
            "convention": report.convention,
            "rows": report.rows,
            "id_accuracy": report.id_accuracy,
            "galleries": galleries,
            "provenance": report.provenance,
        }
    )


def csv_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Column order: :data:`MAIN_ROW_KEYS`, then every other key in sorted order."""
    extra = sorted({str(key) for row in rows for key in row} - set(MAIN_ROW_KEYS))
    return [*MAIN_ROW_KEYS, *extra]


def render_csv(rows: list[dict[str, Any]]) -> str:
    """``results.csv``: one line per row (encoder x detector x OOD set), stable column order."""
    columns = csv_columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([csv_cell(row.get(column)) for column in columns])
    return buffer.getvalue()


def _md_table(table: EncoderTable, fpr_name: str) -> list[str]:
    """Markdown lines: detectors x (OOD set AUROC, FPR) columns, with CI when present."""
    header = ["detector"]
    for column in table.columns:
        group = table.groups[column]
        tag = f" ({group})" if group in ("near", "far") else ""
        header += [f"{column}{tag} AUROC ↑", f"{column}{tag} {fpr_name} ↓"]
    lines = [
        "| " + " | ".join(md_escape(cell) for cell in header) + " |",
        "|" + "---|" + "---:|" * (len(header) - 1),
    ]
    for detector in table.detectors:
        cells = [md_escape(detector)]
        for column in table.columns:
            for metric in ("auroc", "fpr"):
                cell = table.cells[detector].get((column, metric))
                if cell is None:
                    cells.append("–")
                    continue
                text = format_percent(cell.value)
                interval = format_ci(cell.low, cell.high)
                text = f"{text} {interval}" if interval else text
                cells.append(f"**{text}**" if cell.best else text)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(report: ReportData) -> str:
    """``results.md``: per encoder a detectors x OOD sets table, means, and ID accuracy.

    With a study, its ranking and the primary detector's fits come first.
    """
    convention = report.convention
    tpr = convention.get("tpr", report.rows[0].get("tpr") if report.rows else None)
    fpr_name = fpr_label(tpr)
    lines = [f"# {report.title}", ""]
    description = str(convention.get("description") or "")
    name = str(convention.get("name") or "unnamed")
    detail = f" — {fpr_name}: {md_escape(description)}" if description else ""
    lines.append(f"Convention: **{md_escape(name)}**{detail}")
    lines += [
        "",
        "Values are percentages; [low, high] is the bootstrap confidence interval where one was "
        f"computed. AUROC: higher is better; {fpr_name}: lower is better; **bold** = best in its "
        "column. Scores: higher = more in-distribution.",
        "",
    ]
    if report.study is not None:
        lines += study_markdown(report.study)
    for table in build_tables(report.rows):
        lines += [f"## Encoder `{table.encoder}`", "", *_md_table(table, fpr_name), ""]
    if report.id_accuracy:
        lines += ["## ID classification accuracy", "", "| encoder | method | accuracy |"]
        lines.append("|---|---|---:|")
        for entry in report.id_accuracy:
            encoder = md_escape(str(entry.get("encoder", "")))
            method = md_escape(str(entry.get("method", "")))
            lines.append(f"| {encoder} | {method} | {format_percent(entry.get('accuracy'))} |")
        lines.append("")
    return "\n".join(lines)


def _json_text(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_results(report: ReportData, output_dir: Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv`` and ``results.md`` into ``output_dir``.

    Returns ``{"json": path, "csv": path, "markdown": path}``; with ``report.study`` also
    ``study.json``, ``study.csv`` (one line per model) and ``study_fits.csv`` (one per fit)
    under ``"study_json"``, ``"study_csv"`` and ``"study_fits_csv"``. The directory is created
    if needed; NaN/inf values become JSON ``null`` and empty CSV cells. Every file is rendered
    before any is written, and each is written atomically: a failure leaves the previous files
    whole.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": output_dir / "results.json",
        "csv": output_dir / "results.csv",
        "markdown": output_dir / "results.md",
    }
    texts = {
        "json": _json_text(results_document(report)),
        "csv": render_csv(report.rows),
        "markdown": render_markdown(report),
    }
    if report.study is not None:
        paths.update(
            study_json=output_dir / "study.json",
            study_csv=output_dir / "study.csv",
            study_fits_csv=output_dir / "study_fits.csv",
        )
        texts.update(
            study_json=_json_text(study_document(report.study)),
            study_csv=render_study_csv(report.study),
            study_fits_csv=render_study_fits_csv(report.study),
        )
    for kind, text in texts.items():
        write_text_atomic(paths[kind], text)
    return paths
