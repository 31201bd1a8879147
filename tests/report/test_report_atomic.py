"""Result files are written atomically: a failed write leaves the previous file whole."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from oodprobe.report import ReportData, render_html, write_results, write_text_atomic
from oodprobe.report import files as report_files


def _leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "results.md"
    target.write_text("old, complete\n")
    # many good lines, then a lone surrogate UTF-8 cannot encode: the write fails midway
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(target, "new line\n" * 10_000 + "\udcff")
    assert target.read_text() == "old, complete\n"
    assert _leftovers(tmp_path) == []


def test_the_written_file_is_complete_with_ordinary_permissions(tmp_path: Path) -> None:
    target = tmp_path / "new" / "notes.md"
    assert write_text_atomic(target, "a\nb\n") == target
    assert target.read_bytes() == b"a\nb\n"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0o600
    assert _leftovers(target.parent) == []


def test_write_results_renders_everything_before_touching_a_file(
    report_data: ReportData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_results(report_data, tmp_path)
    before = {kind: path.read_bytes() for kind, path in paths.items()}

    def broken(report: ReportData) -> str:
        raise RuntimeError("rendering failed")

    monkeypatch.setattr(report_files, "render_markdown", broken)
    report_data.rows[0]["auroc"] = 0.123  # would change results.json and results.csv
    with pytest.raises(RuntimeError, match="rendering failed"):
        write_results(report_data, tmp_path)
    assert {kind: path.read_bytes() for kind, path in paths.items()} == before
    assert _leftovers(tmp_path) == []


def test_render_html_keeps_the_old_report_when_rendering_fails(
    report_data: ReportData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from oodprobe.report import html_report

    target = tmp_path / "report.html"
    target.write_text("<p>previous report</p>")

    def broken(report: ReportData) -> str:
        raise RuntimeError("plot failed")

    monkeypatch.setattr(html_report, "report_html", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        render_html(report_data, target)
    assert target.read_text() == "<p>previous report</p>"
