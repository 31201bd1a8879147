"""results.json / results.csv / results.md: round trips, column order, table content."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from oodprobe.report import MAIN_ROW_KEYS, SCHEMA_VERSION, ReportData, write_results


def test_write_results_returns_the_three_paths(report_data: ReportData, tmp_path: Path) -> None:
    paths = write_results(report_data, tmp_path / "out")
    assert paths == {
        "json": tmp_path / "out" / "results.json",
        "csv": tmp_path / "out" / "results.csv",
        "markdown": tmp_path / "out" / "results.md",
    }
    assert all(path.is_file() and path.stat().st_size > 0 for path in paths.values())


def test_json_round_trips_rows_and_metadata(report_data: ReportData, tmp_path: Path) -> None:
    text = write_results(report_data, tmp_path)["json"].read_text(encoding="utf-8")
    document = json.loads(text)
    assert document["schema_version"] == SCHEMA_VERSION == 1
    assert document["rows"] == report_data.rows
    assert document["id_accuracy"] == report_data.id_accuracy
    assert document["convention"] == report_data.convention
    assert document["provenance"] == report_data.provenance
    assert [g["title"] for g in document["galleries"]] == [g.title for g in report_data.galleries]
    assert document["galleries"][0]["images"][0] == {"caption": "mnist-5k:test[0]", "score": 3.2}
    assert text.startswith('{\n  "schema_version": 1')  # pretty-printed, version first


def test_json_turns_numpy_and_nan_into_plain_json(report_data: ReportData, tmp_path: Path) -> None:
    report_data.rows[0]["auroc"] = float("nan")
    report_data.rows[0]["n_id"] = np.int64(400)
    report_data.rows[0]["extra_array"] = np.array([1.5, 2.5])
    document = json.loads(write_results(report_data, tmp_path)["json"].read_text())
    assert document["rows"][0]["auroc"] is None
    assert document["rows"][0]["n_id"] == 400
    assert document["rows"][0]["extra_array"] == [1.5, 2.5]


def test_csv_has_main_columns_first_and_one_line_per_row(
    report_data: ReportData, tmp_path: Path
) -> None:
    with write_results(report_data, tmp_path)["csv"].open(newline="", encoding="utf-8") as handle:
        lines = list(csv.reader(handle))
    header, body = lines[0], lines[1:]
    extra = ["id_fingerprint", "ood_fingerprint", "prompts", "versions"]
    assert header == [*MAIN_ROW_KEYS, *extra]
    assert len(body) == len(report_data.rows) == 4
    records = [dict(zip(header, line, strict=True)) for line in body]
    for record, row in zip(records, report_data.rows, strict=True):
        assert (record["encoder"], record["detector"], record["ood_set"]) == (
            row["encoder"],
            row["detector"],
            row["ood_set"],
        )
        assert float(record["auroc"]) == row["auroc"]  # repr keeps every digit
        assert int(record["n_ood"]) == row["n_ood"] == 300
        assert json.loads(record["versions"]) == row["versions"]
    assert records[0]["detector_params"] == '{"k":10}'
    assert records[0]["prompts"] == '["a photo of a {}."]'
    # knn rows carry bootstrap bounds; mahalanobis rows have None -> empty cells
    assert float(records[0]["auroc_low"]) < float(records[0]["auroc"])
    assert records[2]["auroc_low"] == records[2]["auroc_high"] == records[2]["prompts"] == ""


def test_markdown_names_the_convention_and_holds_the_table(
    report_data: ReportData, tmp_path: Path
) -> None:
    text = write_results(report_data, tmp_path)["markdown"].read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0] == "# Fashion 0-4 vs near and far OOD"
    description = report_data.convention["description"]
    assert f"Convention: **oodprobe** — FPR@95: {description}" in lines
    assert "## Encoder `efficientnet-lite0`" in lines
    header = next(line for line in lines if line.startswith("| detector |"))
    assert "fashion 5-9 (near) AUROC ↑" in header and "mnist-5k (far) FPR@95 ↓" in header
    assert "near mean AUROC ↑" in header and "far mean FPR@95 ↓" in header
    knn = next(line for line in lines if line.startswith("| knn |"))
    row = report_data.rows[0]
    expected = f"{100 * row['auroc']:.1f} [{100 * row['auroc_low']:.1f}, "
    assert expected in knn
    mahalanobis = next(line for line in lines if line.startswith("| mahalanobis |"))
    assert "[" not in mahalanobis  # no bootstrap -> no interval
    assert mahalanobis.count("**") == 16  # best everywhere: 8 bold cells
    assert "| efficientnet-lite0 | linear probe | 91.2 |" in lines


def test_markdown_escapes_pipes_and_means_average_sets(tmp_path: Path) -> None:
    row = {
        "encoder": "enc",
        "detector": "a|b",
        "ood_set": "s1",
        "group": "far",
        "auroc": 0.9,
        "fpr": 0.2,
        "tpr": 0.95,
    }
    rows = [row, {**row, "ood_set": "s2", "auroc": 0.7, "fpr": 0.4}]
    report = ReportData(title="t", rows=rows, convention={"name": "oodprobe", "tpr": 0.9})
    text = write_results(report, tmp_path)["markdown"].read_text(encoding="utf-8")
    line = next(line for line in text.splitlines() if line.startswith("| a\\|b |"))
    cells = [cell.strip() for cell in line.strip("|").split(" | ")]
    assert cells[1:] == ["90.0", "20.0", "70.0", "40.0", "80.0", "30.0"]
    assert "FPR@90 ↓" in text
    assert math.isclose(float(cells[5]), 80.0)
