"""The HTML report in a real browser: headless Chromium loads it without errors and draws it.

Two Chromium runs of a few seconds each: ``--screenshot`` on the report as written, and
``--dump-dom`` on a copy with a probe script injected at the top of ``<head>`` (the report itself
has no script, and its Content-Security-Policy forbids one, so the copy relaxes only
``script-src``). The probe records script errors, ``console.error`` calls, resources that fail to
load and CSP violations, and on ``load`` writes them, with the number of images whose
``naturalWidth > 0``, into a ``<pre id="probe">`` that the dumped DOM carries back.
Debian's package is ``chromium`` (``make setup`` installs it when run as root).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from oodprobe.report import ReportData, render_html

from .conftest import make_study

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not installed (Debian: apt-get install chromium; `make setup` "
    "does it when run as root)",
)

WINDOW = (1280, 2000)
PROBE = """<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (event) {
    var target = event.target;
    if (target && target !== window && target.tagName) {
      errors.push("failed to load " + target.tagName + " " + String(target.src).slice(0, 60));
    } else {
      errors.push("uncaught: " + event.message);
    }
  }, true);
  document.addEventListener("securitypolicyviolation", function (event) {
    errors.push("CSP " + event.violatedDirective + " blocked " + event.blockedURI);
  });
  var consoleError = console.error;
  console.error = function () {
    errors.push("console.error: " + Array.prototype.join.call(arguments, " "));
    consoleError.apply(console, arguments);
  };
  window.addEventListener("load", function () {
    var images = Array.prototype.slice.call(document.images);
    var loaded = images.filter(function (image) {
      return image.complete && image.naturalWidth > 0;
    }).length;
    var out = document.createElement("pre");
    out.id = "probe";
    out.textContent = JSON.stringify({images: images.length, loaded: loaded, errors: errors});
    document.body.appendChild(out);
  });
})();
</script>"""


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium with networking, sync and updates off, in a throwaway profile."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # tests may run as root in a container
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--virtual-time-budget=5000",
        *args,
    ]
    environment = {**os.environ, "HOME": str(profile)}  # keep ~/.config untouched
    return subprocess.run(
        command, capture_output=True, text=True, timeout=90, env=environment, check=False
    )


def _probe(page: Path, tmp_path: Path) -> dict[str, Any]:
    """Load ``page`` with the probe injected and return what the probe recorded."""
    text = page.read_text(encoding="utf-8")
    assert "script-src 'none'" in text
    text = text.replace("script-src 'none'", "script-src 'unsafe-inline'")
    probed = page.with_name(f"probed-{page.name}")
    probed.write_text(text.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    result = _chromium(["--dump-dom", probed.as_uri()], tmp_path / "profile-dom")
    match = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.DOTALL)
    assert match, (
        f"probe output missing; rc={result.returncode}, stderr tail:\n{result.stderr[-2000:]}"
    )
    record: dict[str, Any] = json.loads(html.unescape(match.group(1)))
    return record


def test_report_loads_in_chromium_without_errors(report_data: ReportData, tmp_path: Path) -> None:
    page = render_html(report_data, tmp_path / "report.html")
    record = _probe(page, tmp_path)
    assert record["errors"] == []
    assert record["images"] == 2 + 2 + 8 + 4  # ROC, histograms, gallery thumbnails
    assert record["loaded"] == record["images"]


def test_report_with_a_study_loads_in_chromium_without_errors(
    report_data: ReportData, tmp_path: Path
) -> None:
    report_data.study = make_study(12, lp_vs_ft=True)
    page = render_html(report_data, tmp_path / "report.html")
    record = _probe(page, tmp_path)
    assert record["errors"] == []
    assert record["images"] == 7 + 2 + 2 + 8 + 4  # study fits, ROC, histograms, galleries
    assert record["loaded"] == record["images"]


def test_probe_catches_a_broken_image_and_a_blocked_fetch(tmp_path: Path) -> None:
    # The negative control: the same probe reports what the report must never do.
    page = tmp_path / "broken.html"
    report = render_html(ReportData(title="broken", rows=[]), page).read_text(encoding="utf-8")
    broken = (
        '<img src="data:image/png;base64,AAAA" alt="x"><img src="https://example.invalid/a.png">'
    )
    page.write_text(report.replace("<main>", "<main>" + broken, 1), encoding="utf-8")
    record = _probe(page, tmp_path)
    assert (record["images"], record["loaded"]) == (2, 0)
    assert any(error.startswith("failed to load IMG data:image/png") for error in record["errors"])
    assert any(error.startswith("CSP img-src blocked https://") for error in record["errors"])


def test_report_screenshot_is_drawn(report_data: ReportData, tmp_path: Path) -> None:
    page = render_html(report_data, tmp_path / "report.html")
    shot = tmp_path / "report.png"
    result = _chromium([f"--screenshot={shot}", page.as_uri()], tmp_path / "profile-shot")
    assert shot.is_file(), f"no screenshot; rc={result.returncode}\n{result.stderr[-2000:]}"
    with Image.open(shot) as image:
        assert image.size == WINDOW
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    ink = np.abs(pixels - 255).sum(axis=-1) > 60  # clearly not white
    assert 0.03 < ink.mean() < 0.6, f"share of non-white pixels {ink.mean():.3f}"
    colours = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 200  # text, plots and thumbnails, not a flat page
    # the first rows are the header, the tables and the plots, so every band has some ink
    bands = ink[:1800].reshape(9, -1).mean(axis=1)
    assert (bands > 0.005).all(), bands
    if target := os.environ.get("OODPROBE_SCREENSHOT"):
        shutil.copyfile(shot, target)
