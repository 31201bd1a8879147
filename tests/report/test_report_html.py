"""The HTML report: self-contained, escaped, complete and deterministic."""

from __future__ import annotations

import base64
import dataclasses
import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from oodprobe.report import GalleryImage, ReportData, render_html, report_html
from oodprobe.report.plots import thumbnail

IMG_SRC = re.compile(r"<img\b[^>]*?\bsrc=\"([^\"]*)\"")


def test_html_is_self_contained(report_data: ReportData, tmp_path: Path) -> None:
    path = render_html(report_data, tmp_path / "sub" / "report.html")
    text = path.read_text(encoding="utf-8")
    for reference in ("http://", "https://", 'src="/', "file:", "<link", "url(", "@import"):
        assert reference not in text, reference
    assert "<script" not in text
    assert "default-src 'none'; img-src data:" in text  # the browser enforces it, too
    sources = IMG_SRC.findall(text)
    assert text.count("<img") == len(sources) == 2 + 2 + 8 + 4  # ROC, histograms, galleries
    for source in sources:
        header, _, payload = source.partition(",")
        assert re.fullmatch(r"data:image/(png|jpeg);base64", header), header[:40]
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as image:
            image.load()
            assert image.width > 0 and image.height > 0
    assert 30_000 < path.stat().st_size < 1_000_000


def test_html_escapes_every_text(report_factory: Callable[..., ReportData]) -> None:
    evil = '<script>alert("x")</script>'
    report = report_factory(detectors=("knn", evil))
    report.title = "A & B <b>"
    gallery = report.galleries[0]
    image = GalleryImage(gallery.images[0].image, f"caption {evil}", 1.0)
    report.galleries[0] = dataclasses.replace(gallery, images=[image])
    report.provenance["command_line"] = f"oodprobe run '{evil}'"
    text = report_html(report)
    assert "<script" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert "<title>A &amp; B &lt;b&gt;</title>" in text
    assert "caption &lt;script&gt;" in text


def test_html_shows_tables_convention_and_sections(report_data: ReportData) -> None:
    text = report_html(report_data)
    description = report_data.convention["description"].replace(">", "&gt;")
    assert f"<strong>FPR@95</strong>: {description}" in text
    assert "share of OOD samples accepted at the threshold that keeps 95% of ID" in text
    assert "first threshold reaching TPR ≥ 0.95" in text
    assert "<h3>Encoder <code>efficientnet-lite0</code></h3>" in text
    knn = report_data.rows[0]
    low, high = 100 * knn["auroc_low"], 100 * knn["auroc_high"]
    assert f'<span class="ci">[{low:.1f}, {high:.1f}]</span>' in text
    # mahalanobis is better everywhere in the synthetic data: 8 highlighted cells
    rows = dict(re.findall(r'<tr><td class="det"><strong>(\w+)</strong>(.*?)</tr>', text))
    assert re.findall(r'class="[^"]*\bbest\b', rows["knn"]) == []
    assert len(re.findall(r'class="[^"]*\bbest\b', rows["mahalanobis"])) == 8
    assert 'mean<span class="badge near">near</span>' in text
    assert "91.2" in text and "linear probe" in text
    assert "<details><summary>Versions, data fingerprints" in text
    assert "oodprobe benchmark fashion-near-far --out results/" in text
    assert "OOD images that look most in-distribution — knn on fashion 5-9" in text
    assert "mnist-5k:test[7]" in text and "score 2.500" in text
    for anchor in ("results", "id-accuracy", "roc", "histograms", "galleries", "provenance"):
        assert f'<section id="{anchor}">' in text and f'href="#{anchor}"' in text


def test_html_is_deterministic(
    report_data: ReportData, report_factory: Callable[..., ReportData]
) -> None:
    assert report_html(report_data) == report_html(report_factory())


def test_html_renders_without_plots_galleries_or_rows() -> None:
    text = report_html(ReportData(title="empty", rows=[]))
    assert "<p>No results.</p>" in text and "<img" not in text
    assert 'id="roc"' not in text and 'id="galleries"' not in text


def test_thumbnail_upscales_small_images_with_nearest_neighbour() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    uri, width, height = thumbnail(Image.fromarray(pixels, "L"))
    assert (width, height) == (84, 84)
    data = base64.b64decode(uri.removeprefix("data:image/png;base64,"))
    with Image.open(io.BytesIO(data)) as image:
        big = np.asarray(image)
    assert np.array_equal(big[::3, ::3], pixels) and np.array_equal(big[2::3, 2::3], pixels)


def test_thumbnail_shrinks_large_images_and_flattens_alpha() -> None:
    uri, width, height = thumbnail(Image.new("RGBA", (300, 200), (255, 0, 0, 0)))
    assert (width, height) == (96, 64)
    header, _, payload = uri.partition(",")
    with Image.open(io.BytesIO(base64.b64decode(payload))) as image:
        assert image.mode == "RGB" and image.getpixel((10, 10)) == (255, 255, 255)
    assert header == "data:image/png;base64"
