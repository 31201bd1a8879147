"""Rendering of benchmark results: JSON/CSV/Markdown files and a self-contained HTML report.

Nothing here computes a metric: the benchmark runner passes finished rows and raw scores in a
:class:`ReportData`, and these functions only arrange, format and plot them.
"""

from oodprobe.report.atomic import write_text_atomic
from oodprobe.report.files import SCHEMA_VERSION, render_csv, render_markdown, write_results
from oodprobe.report.html_report import render_html, report_html
from oodprobe.report.model import MAIN_ROW_KEYS, Gallery, GalleryImage, ReportData, ScoreSet
from oodprobe.report.study import STUDY_SCHEMA_VERSION

__all__ = [
    "MAIN_ROW_KEYS",
    "SCHEMA_VERSION",
    "STUDY_SCHEMA_VERSION",
    "Gallery",
    "GalleryImage",
    "ReportData",
    "ScoreSet",
    "render_csv",
    "render_html",
    "render_markdown",
    "report_html",
    "write_results",
    "write_text_atomic",
]
