"""The study's files and report section: study.json/.csv, study_fits.csv, Markdown, HTML."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from oodprobe.report import (
    STUDY_SCHEMA_VERSION,
    ReportData,
    render_markdown,
    report_html,
    write_results,
)
from oodprobe.report.plots import STUDY_DPI, _place_labels, short_label
from oodprobe.report.study import NO_FIT_NOTE, study_csv_columns

from .conftest import STUDY_TARGETS, make_report_data

StudyFactory = Callable[..., dict[str, Any]]
IMG = re.compile(r'<img src="(data:image/png;base64,[^"]*)"')
EVIL = 'enc<&>"q"'
EVIL_HTML = "enc&lt;&amp;&gt;&quot;q&quot;"


def _report(study: dict[str, Any] | None, with_rows: bool = False) -> ReportData:
    report = make_report_data() if with_rows else ReportData(title="study <t>", rows=[])
    report.study = study
    return report


def _study_part(text: str) -> str:
    start = text.index('<section id="study">')
    return text[start : text.index("</section>", start)]


def _png(uri: str) -> Image.Image:
    payload = uri.removeprefix("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    image.load()
    return image


def test_study_section_comes_first_with_a_plot_per_primary_fit(
    study_factory: StudyFactory,
) -> None:
    study = study_factory(7)
    text = report_html(_report(study, with_rows=True))
    # the section and its nav link come before the benchmark's own results
    assert text.index('<section id="study">') < text.index('<section id="results">')
    nav = re.search(r"<nav>(.*?)</nav>", text)
    assert nav and nav.group(1).startswith('<a href="#study">Study</a><a href="#results">')
    part = _study_part(text)
    shown, hidden = part.split("<details><summary>Other detectors", 1)
    primary = [fit for fit in study["fits"] if fit["detector"] == "knn"]
    assert len(primary) == 4  # 3 targets on k-NN accuracy + 1 on probe accuracy
    assert len(IMG.findall(shown)) == len(primary)
    assert len(IMG.findall(hidden.split("</details>", 1)[0])) == 3  # mahalanobis, collapsed
    for uri in IMG.findall(part):
        with _png(uri) as image:
            assert image.size == (round(5.6 * STUDY_DPI), round(4.4 * STUDY_DPI))
    # the per-model benchmark tables are still there, below
    assert "<h3>Encoder <code>efficientnet-lite0</code></h3>" in text
    assert len(IMG.findall(text)) == 7 + 2 + 2 + 8 + 4  # study, ROC, histograms, galleries


def test_study_titles_and_tables_show_the_fitted_values(study_factory: StudyFactory) -> None:
    study = study_factory(7)
    part = _study_part(report_html(_report(study)))
    fit = study["fits"][0]  # knn on the near set, with a band
    r2 = fit["r2"]
    assert f"cifar100 &lt;near&gt; — R² = {r2:.2f} (n = 7)" in part
    assert 'alt="OOD AUROC of knn on cifar100 &lt;near&gt; against k-NN accuracy' in part
    # the fit table: slope with its CI, intercept in percent, R² with 3 decimals
    slope_low, slope_high = fit["slope_ci"]
    assert f'{fit["slope"]:.2f}<span class="ci">[{slope_low:.2f}, {slope_high:.2f}]</span>' in part
    assert f">{100 * fit['intercept']:.1f}<span" in part
    assert f'>{r2:.3f}<span class="ci">[{fit["r2_ci"][0]:.3f}, {fit["r2_ci"][1]:.3f}]' in part
    # the impossible fit: dashes and its note, in the table and under its plot
    row = re.search(r"<tr><td>knn</td><td>mean</td><td>linear probe</td>(.*?)</tr>", part)
    assert row is not None
    assert row.group(1).count(">—<") == 5
    assert "every model has the same accuracy: the line is undefined" in row.group(1)
    assert "mean — R² = — (n = 7)" in part
    assert "linear probe accuracy" in part
    # ranking in the given order, percent with one decimal
    first = study["ranking"][0]
    ranking = part.split("<h3>Ranking</h3>", 1)[1]
    assert "Ranked by mean AUROC of knn over all OOD sets, then k-NN accuracy." in ranking
    expected = f'<tr><td class="num">1</td><td><code>{first["encoder"]}</code></td>'
    assert expected.replace(EVIL, EVIL_HTML) in ranking
    assert f"{100 * first['primary_auroc']:.1f}" in ranking
    assert "Linear probe vs fine-tuned" not in part  # empty lp_vs_ft: no table
    # the score is the primary AUROC here, so one column shows both; a different one is shown
    assert "<th>score %</th>" not in ranking
    study["ranking"][0]["score"] = 0.5
    ranking = _study_part(report_html(_report(study))).split("<h3>Ranking</h3>", 1)[1]
    assert "<th>score %</th>" in ranking and '<td class="num">50.0</td></tr>' in ranking


def test_study_escapes_every_name(study_factory: StudyFactory) -> None:
    study = study_factory(7, lp_vs_ft=True)
    study["primary_detector"] = study["detectors"][0] = "knn<b>"
    for fit in study["fits"]:
        if fit["detector"] == "knn":
            fit["detector"] = "knn<b>"
    for model in study["models"]:
        for metric in ("auroc", "fpr"):
            model[metric]["knn<b>"] = model[metric].pop("knn")
    part = _study_part(report_html(_report(study)))
    assert "<b>" not in part and EVIL not in part and "<zoo>" not in part
    assert "<near>" not in part and '"1"' not in part
    assert EVIL_HTML in part and "clip &lt;zoo&gt;" in part and "knn&lt;b&gt;" in part
    assert "ft &lt;&amp;&gt; &quot;1&quot;" in part
    assert len(IMG.findall(part.split("<details>", 1)[0])) == 4  # the renamed primary


def test_lp_vs_ft_table_shows_both_sides_and_the_difference(study_factory: StudyFactory) -> None:
    part = _study_part(report_html(_report(study_factory(3, lp_vs_ft=True))))
    table = part.split("<h3>Linear probe vs fine-tuned</h3>", 1)[1].split("</table>", 1)[0]
    assert "<th>LP FPR@95 %</th>" in table
    cells = re.findall(r'<td class="num">([^<]*)</td>', table)
    assert cells == ["91.2", "93.4", "+2.2", "95.0", "90.0", "−5.0", "30.0", "—", "—"]


@pytest.mark.parametrize("n_models", [1, 2, 12])
def test_study_renders_with_few_or_many_models(
    study_factory: StudyFactory, n_models: int, tmp_path: Path
) -> None:
    study = study_factory(n_models)
    report = _report(study)
    part = _study_part(report_html(report))
    assert len(study["fits"]) == 7
    if n_models < 3:  # no fit has statistics: a note instead of plots of one or two points
        assert len(IMG.findall(part)) == 0
        assert "needs at least 3 models" in part and "No fit could be made" in part
        assert f"near mean — R² = — (n = {n_models})" not in part
    else:
        assert len(IMG.findall(part)) == 7
        assert f"near mean — R² = {study['fits'][1]['r2']:.2f} (n = 12)" in part
    paths = write_results(report, tmp_path)
    with paths["study_csv"].open(newline="", encoding="utf-8") as handle:
        assert len(list(csv.reader(handle))) == 1 + n_models
    assert "## Study: clip \\<zoo>" in paths["markdown"].read_text(encoding="utf-8")


def test_partial_or_odd_study_dicts_still_render() -> None:
    for study in (
        {},
        {"fits": [{"detector": None, "points": [{"encoder": "a", "accuracy": None}]}]},
        {
            "primary_detector": "knn",
            "fits": [
                {
                    "detector": "knn",
                    "target": "t",
                    "accuracy": "knn",
                    "n_models": 3,
                    "slope": float("nan"),
                    "intercept": float("inf"),
                    "points": [
                        {"encoder": f"m{i}", "accuracy": 0.5, "auroc": 0.6} for i in range(3)
                    ],
                    "band": {"x": [0.1, 0.2], "low": [0.1]},  # malformed: skipped
                }
            ],
            "models": [{"encoder": "m0", "auroc": "oops"}],
        },
    ):
        text = report_html(_report(study))
        assert '<section id="study">' in text
    assert NO_FIT_NOTE in text  # NaN slope without a note gets the standard one


def test_write_results_adds_the_study_files(study_factory: StudyFactory, tmp_path: Path) -> None:
    study = study_factory(7)
    paths = write_results(_report(study), tmp_path)
    assert {key: path.name for key, path in paths.items()} == {
        "json": "results.json",
        "csv": "results.csv",
        "markdown": "results.md",
        "study_json": "study.json",
        "study_csv": "study.csv",
        "study_fits_csv": "study_fits.csv",
    }
    assert "study_json" not in write_results(_report(None), tmp_path / "plain")
    assert not (tmp_path / "plain" / "study.json").exists()


def test_study_json_round_trips(study_factory: StudyFactory, tmp_path: Path) -> None:
    study = study_factory(7)
    study["seed"] = np.int64(5)  # numpy values become plain JSON
    text = write_results(_report(study), tmp_path)["study_json"].read_text(encoding="utf-8")
    assert text.startswith('{\n  "schema_version": 1,\n  "name": "clip <zoo>"')
    document = json.loads(text)
    assert document.pop("schema_version") == STUDY_SCHEMA_VERSION == 1
    assert document["seed"] == 5
    assert document["models"][1]["auroc"]["mahalanobis"]["mean"] is None  # NaN -> null
    document["models"][1]["auroc"]["mahalanobis"]["mean"] = study["models"][1]["auroc"][
        "mahalanobis"
    ]["mean"]
    assert math.isnan(document["models"][1]["auroc"]["mahalanobis"]["mean"])
    study["seed"] = 5
    document["models"][1]["auroc"]["mahalanobis"]["mean"] = None
    study["models"][1]["auroc"]["mahalanobis"]["mean"] = None
    assert document == study


def test_study_csv_has_one_line_per_model_and_exact_values(
    study_factory: StudyFactory, tmp_path: Path
) -> None:
    study = study_factory(7)
    path = write_results(_report(study), tmp_path)["study_csv"]
    with path.open(newline="", encoding="utf-8") as handle:
        lines = list(csv.reader(handle))
    header, body = lines[0], lines[1:]
    pairs = [(d, t) for d in ("knn", "mahalanobis") for t in STUDY_TARGETS]
    assert header == [
        "encoder",
        "knn_accuracy",
        "probe_accuracy",
        *(f"auroc {d} / {t}" for d, t in pairs),
        *(f"fpr {d} / {t}" for d, t in pairs),
        "base",
        "shared_pass",
    ]
    assert header == study_csv_columns(study)
    assert "auroc knn / near mean" in header
    assert len(body) == len(study["models"]) == 7
    records = [dict(zip(header, line, strict=True)) for line in body]
    for record, model in zip(records, study["models"], strict=True):
        assert record["encoder"] == model["encoder"]
        assert float(record["knn_accuracy"]) == model["knn_accuracy"]  # every digit
        assert (
            float(record["auroc knn / cifar100 <near>"]) == model["auroc"]["knn"][STUDY_TARGETS[0]]
        )
        assert record["base"] == ""
    assert records[2]["encoder"] == EVIL
    assert records[1]["auroc mahalanobis / mean"] == records[1]["fpr mahalanobis / mean"] == ""


def test_study_fits_csv_has_one_line_per_fit(study_factory: StudyFactory, tmp_path: Path) -> None:
    study = study_factory(7)
    path = write_results(_report(study), tmp_path)["study_fits_csv"]
    with path.open(newline="", encoding="utf-8") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == len(study["fits"]) == 7
    first, last = records[0], records[-1]
    fit = study["fits"][0]
    assert (first["detector"], first["target"], first["accuracy"]) == (
        "knn",
        STUDY_TARGETS[0],
        "knn",
    )
    assert int(first["n_models"]) == 7
    assert float(first["r2"]) == fit["r2"]
    assert [float(first["r2_low"]), float(first["r2_high"])] == fit["r2_ci"]
    assert [float(first["intercept_low"]), float(first["intercept_high"])] == fit["intercept_ci"]
    assert first["note"] == ""
    assert last["accuracy"] == "probe" and last["r2"] == last["slope_low"] == ""
    assert last["note"] == "every model has the same accuracy: the line is undefined"


def test_markdown_has_the_primary_fits_and_the_ranking(study_factory: StudyFactory) -> None:
    study = study_factory(7)
    lines = render_markdown(_report(study, with_rows=True)).splitlines()
    start = lines.index("## Study: clip \\<zoo>")
    assert start < lines.index("## Encoder `efficientnet-lite0`")  # the study comes first
    assert "### Fits of detector knn" in lines
    fit = study["fits"][0]
    row = next(line for line in lines if line.startswith("| cifar100 \\<near> | k-NN |"))
    cells = [cell.strip() for cell in row.strip("|").split(" | ")]
    low, high = fit["r2_ci"]
    assert cells[2] == "7"
    assert cells[5] == f"{fit['r2']:.3f} [{low:.3f}, {high:.3f}]"
    probe = next(line for line in lines if line.startswith("| mean | linear probe |"))
    assert probe.count("| — ") == 5 and "the line is undefined" in probe
    study_lines = lines[start : lines.index("## Encoder `efficientnet-lite0`")]
    assert not any("mahalanobis" in line for line in study_lines)  # primary fits only
    assert "### Ranking by mean AUROC of knn over all OOD sets, then k-NN accuracy" in lines
    ranked = [line for line in lines if re.match(r"\| \d+ \| ", line)]
    assert len(ranked) == 7
    first = study["ranking"][0]
    assert ranked[0].startswith(f"| 1 | {first['encoder'].replace('<', chr(92) + '<')} |")


def test_study_report_is_deterministic(study_factory: StudyFactory) -> None:
    assert report_html(_report(study_factory(7))) == report_html(_report(study_factory(7)))


def test_labels_of_twelve_crowded_points_barely_overlap() -> None:
    # 12 encoders within 2 accuracy points and 3 AUROC points: the worst case of a real study
    rng = np.random.default_rng(1)
    xs = np.linspace(71.0, 73.0, 12) + rng.normal(0, 0.1, 12)
    ys = 88.0 + 1.5 * (xs - 71.0) + rng.normal(0, 0.3, 12)
    names = [f"openclip:ViT-B-{i}/laion2b_s34b_b{i}k" for i in range(12)]
    figure = Figure(figsize=(5.6, 4.4), dpi=STUDY_DPI)
    figure.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.91)
    axes = figure.add_subplot()
    axes.scatter(xs, ys)
    axes.set_xlim(70.5, 73.5)
    axes.set_ylim(87.0, 92.5)
    _place_labels(figure, axes, [(x, y, n) for x, y, n in zip(xs, ys, names, strict=True)], 6.5)
    renderer = FigureCanvasAgg(figure).get_renderer()
    boxes = [text.get_window_extent(renderer) for text in axes.texts]
    assert [text.get_text() for text in axes.texts] == [short_label(n) for n in names]
    overlapping = sum(1 for i, a in enumerate(boxes) for b in boxes[i + 1 :] if a.overlaps(b))
    assert overlapping <= 1
    frame = axes.get_window_extent(renderer)
    assert all(frame.x0 - 2 <= box.x0 and box.x1 <= frame.x1 + 2 for box in boxes)


def test_short_label_keeps_both_ends() -> None:
    assert short_label("openclip:ViT-B-16/openai") == "openclip:ViT-B-16/openai"
    cut = short_label("openclip:ViT-H-14/laion2b_s32b_b79k")
    assert len(cut) == 30 and cut.startswith("openclip:ViT-") and cut.endswith("s32b_b79k")
