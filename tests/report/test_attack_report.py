"""The attack report (attack.html): table values, AUROC-vs-ε curve, histograms, triplets."""

from __future__ import annotations

import base64
import io
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from oodprobe.report.attack import (
    REPORT_FILE,
    amplify_perturbation,
    attack_report_html,
    render_attack_report,
)

IMG = re.compile(r'<img src="(data:image/(?:png|jpeg);base64,[^"]*)"[^>]*alt="([^"]*)"')
EVIL = 'tex<&>"q"'
EVIL_HTML = "tex&lt;&amp;&gt;&quot;q&quot;"
EPS = (4 / 255, 8 / 255)
N_IMAGES = 10


def _write_png(path: Path, pixels: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return str(path)


def _entry(index: int, eps: float | None) -> dict[str, Any]:
    """One result entry with the keys run_attack writes; numbers differ per budget."""
    return {
        "attack": f"eps{index}" if eps is not None else "feature-matching",
        "method": "pgd-linf" if eps is not None else "feature-matching",
        "eps": eps,
        "eps_255": None if eps is None else eps * 255,
        "norm": "linf" if eps is not None else None,
        "clean_auroc": 0.9876,
        "attacked_auroc": [0.4321, 0.1234][index],
        "clean_fpr": 0.0625,
        "attacked_fpr": [0.875, 1.0][index],
        "success_rate": [0.75, None][index],
        "score_raised": 1.0,
        "perturbation_mean": {
            "linf": [4 / 255, 8 / 255][index],
            "l2": 1.2345,
            "psnr": [38.25, None][index],
            "ssim": float("nan"),
        },
        "perturbation_max": {"linf": eps or 0.5, "l2": 2.0},
        "loss_history": [-1.0, -2.0],
        "removed_targets": None,
        "class_score_svm": {"auroc": [0.8125, 0.9375][index], "n_fit": 10, "n_held_out": 10},
    }


def _summary(
    tmp_path: Path, budgets: tuple[float | None, ...] = EPS, id_scores: bool = True
) -> dict[str, Any]:
    """A small attack.json with real PNGs under ``tmp_path`` (paths relative to it)."""
    rng = np.random.default_rng(0)
    images = []
    for position in range(N_IMAGES):
        clean = rng.integers(20, 235, size=(12, 12, 3), dtype=np.uint8)
        clean_png = f"batches/eps0/0000/clean/image-{position:05d}.png"
        _write_png(tmp_path / clean_png, clean)
        attacks = []
        for index, eps in enumerate(budgets):
            step = 4 * (index + 1)
            delta = rng.integers(-step, step + 1, size=clean.shape)
            adversarial = np.clip(clean.astype(int) + delta, 0, 255).astype(np.uint8)
            tag = f"eps{index}" if eps is not None else "feature-matching"
            adversarial_png = f"batches/{tag}/0000/adversarial/image-{position:05d}.png"
            _write_png(tmp_path / adversarial_png, adversarial)
            attacks.append(
                {
                    "attack": tag,
                    "eps": eps,
                    "attacked_score": 0.5 + 0.1 * position + index,
                    "accepted": index == 1,
                    "score_raised": True,
                    "adversarial_png": adversarial_png,
                    "linf": step / 255,
                    "l2": 0.5,
                    "psnr": 40.0,
                    "ssim": None,
                }
            )
        images.append(
            {
                "position": position,
                "index": position,
                "source": EVIL if position == 0 else f"textures/{position}.png",
                "clean_score": -1.0 - 0.1 * position if position != 3 else None,
                "clean_accepted": False,
                "clean_png": clean_png,
                "attacks": attacks,
            }
        )
    params: dict[str, Any] = {
        "method": "pgd" if budgets[0] is not None else "feature-matching",
        "encoder": "efficientnet-lite0@64",
        "detector": {"name": "knn", "label": "knn<b>", "params": {"k": 1}},
        "ood_set": EVIL,
        "n": N_IMAGES,
        "batch_size": 16,
        "steps": 5,
        "seed": 0,
        "device": "cpu",
        "precision": "fp32",
        "convention": "oodprobe",
        "tpr": 0.95,
    }
    if budgets[0] is not None:
        params.update({"eps": list(budgets), "norm": "linf", "step_size": None})
    summary: dict[str, Any] = {
        "format": "oodprobe-attack",
        "version": 1,
        "params": params,
        "provenance": {"benchmark": "tiny<script>", "encoder_cache_id": "abc"},
        "threshold": {"value": 0.25, "source": "accepts 95% of the ID test images"},
        "quantization": "PNG uint8 round(x*255)",
        "id_scores": {"n": 50, "mean": 1.0},
        "results": [_entry(index, eps) for index, eps in enumerate(budgets)],
        "class_score_svm_across_budgets": [],
        "images": images,
    }
    if id_scores:
        summary["id_scores"]["scores"] = rng.normal(1.0, 0.3, size=50).tolist()
    return summary


def _section(text: str, anchor: str) -> str:
    start = text.index(f'<section id="{anchor}">')
    return text[start : text.index("</section>", start)]


def _decode(uri: str) -> Image.Image:
    payload = uri.split(",", 1)[1]
    image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    image.load()
    return image


def test_the_report_is_written_beside_attack_json_with_the_table_values(tmp_path: Path) -> None:
    summary = _summary(tmp_path)
    path = render_attack_report(summary, tmp_path / REPORT_FILE)
    assert path == tmp_path / "attack.html"
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<script" not in text.replace("&lt;script", "")
    table = _section(text, "results")
    rows = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>", 1)[1])
    assert len(rows) == 2
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows]
    # attack, ε, clean AUROC, attacked AUROC, Δ, clean FPR, attacked FPR, success, raised,
    # L∞ /255, L2, PSNR, SSIM, removed targets, SVM
    assert cells[0] == [
        "PGD L∞", "4/255", "98.8", "43.2", "−55.6", "6.2", "87.5", "75.0", "100.0",
        "4.00", "1.234", "38.2", "—", "—", "81.2",
    ]  # fmt: skip
    assert cells[1][:8] == [
        "PGD L∞", "8/255", "98.8", "12.3", "−86.4", "6.2", "100.0", "—",
    ]  # fmt: skip
    assert cells[1][9] == "8.00" and cells[1][11] == "—" and cells[1][14] == "93.8"
    assert "attacked FPR@95 %" in table


def test_a_curve_only_with_two_budgets(tmp_path: Path) -> None:
    two = attack_report_html(_summary(tmp_path), tmp_path)
    curve = _section(two, "curve")
    assert len(IMG.findall(curve)) == 1
    with _decode(IMG.findall(curve)[0][0]) as image:
        assert image.size == (round(4.8 * 90), round(3.6 * 90))
    one = attack_report_html(_summary(tmp_path / "one", budgets=(4 / 255,)), tmp_path / "one")
    assert '<section id="curve">' not in one and 'href="#curve"' not in one
    fm = _summary(tmp_path / "fm", budgets=(None,))
    fm["results"][0]["removed_targets"] = {"clean": {"auroc": 0.9}, "attacked": {"auroc": 0.6}}
    matching = attack_report_html(fm, tmp_path / "fm")
    assert '<td class="num">90.0 → 60.0</td>' in matching  # the removed-targets evaluation
    fm["images"][0]["attacks"][0].update({"clean_cosine": 0.25, "attacked_cosine": 0.875})
    fm["images"][0]["target_index"] = 17
    matching = attack_report_html(fm, tmp_path / "fm")
    assert "cosine to target 0.250 → 0.875 (ID training image 17)" in matching
    assert '<section id="curve">' not in matching
    assert '<td class="kind">feature matching</td><td class="num">unbounded</td>' in matching


def test_one_histogram_per_budget_with_or_without_id_scores(tmp_path: Path) -> None:
    text = attack_report_html(_summary(tmp_path), tmp_path)
    histograms = _section(text, "histograms")
    found = IMG.findall(histograms)
    assert len(found) == len(EPS)
    assert all("ID test, clean OOD and attacked OOD" in alt for _, alt in found)
    assert "not in this attack.json" not in histograms
    bare = _summary(tmp_path / "bare", id_scores=False)
    without = _section(attack_report_html(bare, tmp_path / "bare"), "histograms")
    assert len(IMG.findall(without)) == len(EPS)
    assert "only clean vs attacked OOD" in without
    # the ID scores may come from the caller instead (run_attack passes its own)
    given = attack_report_html(bare, tmp_path / "bare", id_scores=np.linspace(0, 1, 20))
    assert "not in this attack.json" not in _section(given, "histograms")
    # and the pictures differ: ID test scores are drawn
    assert IMG.findall(without)[0][0] != IMG.findall(_section(given, "histograms"))[0][0]


def test_triplets_show_clean_amplified_perturbation_and_manipulated(tmp_path: Path) -> None:
    summary = _summary(tmp_path)
    text = attack_report_html(summary, tmp_path)
    gallery = _section(text, "gallery")
    found = IMG.findall(gallery)
    assert len(found) == len(EPS) * 8 * 3  # 8 of 10 images per budget, 3 images each
    kinds = [alt.split(" ", 1)[0] for _, alt in found[:3]]
    assert kinds == ["clean", "perturbation", "manipulated"]
    assert gallery.count('<div class="triplet">') == 16
    assert "first 8 of 10 attacked images" in gallery
    # image 1's caption: clean → attacked score; image 3 has no clean score
    assert "score -1.100 → 0.600" in gallery and "score — → 0.800" in gallery
    # the thumbnails are the saved PNGs (12 px enlarged 8x, nearest neighbour)
    with _decode(found[0][0]) as image:
        clean = np.asarray(Image.open(tmp_path / summary["images"][0]["clean_png"]))
        assert image.size == (96, 96)
        assert np.array_equal(np.asarray(image.convert("RGB"))[::8, ::8], clean)
    # a missing PNG shows a placeholder, the rest still renders
    (tmp_path / summary["images"][0]["clean_png"]).unlink()
    text = attack_report_html(summary, tmp_path, max_images=2)
    gallery = _section(text, "gallery")
    assert gallery.count("image missing") == 2 * len(EPS)  # clean and perturbation, per budget
    assert len(IMG.findall(gallery)) == len(EPS) * (2 * 3 - 2)
    # a path leaving the run folder is not read
    outside = tmp_path.parent / "outside.png"
    _write_png(outside, np.zeros((4, 4, 3), dtype=np.uint8))
    summary["images"][0]["clean_png"] = "../outside.png"
    gallery = _section(attack_report_html(summary, tmp_path, max_images=1), "gallery")
    assert gallery.count("image missing") == 2 * len(EPS)


def test_amplified_perturbation_maps_the_largest_change_to_the_full_range() -> None:
    clean = np.full((2, 2, 3), 100, dtype=np.uint8)
    adversarial = clean.copy()
    adversarial[0, 0, 0] = 104  # +4: white
    adversarial[1, 1, 2] = 98  # −2: half-way to black
    amplified = amplify_perturbation(clean, adversarial)
    assert amplified[0, 0, 0] == 255 and amplified[1, 1, 2] == round(128 - 127 / 2)
    assert amplified[0, 1, 1] == 128
    assert np.all(amplify_perturbation(clean, clean) == 128)


def test_every_string_is_escaped_and_missing_values_show_a_dash(tmp_path: Path) -> None:
    summary = _summary(tmp_path)
    summary["results"][0]["clean_auroc"] = math.nan
    summary["results"][0]["class_score_svm"] = {"skipped": "needs at least 4 images, got 2"}
    text = attack_report_html(summary, tmp_path)
    assert EVIL not in text and EVIL_HTML in text
    assert "knn&lt;b&gt; (k=1)" in text and "knn<b>" not in text
    assert "tiny&lt;script&gt;" in text
    row = re.findall(r"<tr>(.*?)</tr>", _section(text, "results").split("<tbody>", 1)[1])[0]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert cells[2] == "—" and cells[4] == "—" and cells[14] == "—"
    assert 'title="needs at least 4 images, got 2"' in row
    # a summary with almost nothing still renders
    empty = attack_report_html({}, None)
    assert "No attack results." in empty and "<h1>Attack: ? on ? · ?</h1>" in empty


@pytest.mark.parametrize("budgets", [EPS])
def test_svm_across_budgets_table(tmp_path: Path, budgets: tuple[float, ...]) -> None:
    summary = _summary(tmp_path, budgets=budgets)
    summary["class_score_svm_across_budgets"] = [
        {"fit_eps": fit, "test_eps": test, "auroc": 0.5 + fit + test}
        for fit in budgets
        for test in budgets
    ]
    text = _section(attack_report_html(summary, tmp_path), "results")
    assert "Class-score SVM across budgets" in text
    expected = f"{100 * (0.5 + 4 / 255 + 8 / 255):.1f}"
    row = re.findall(r"<tr><td>4/255</td>(.*?)</tr>", text)[0]
    assert re.findall(r"<td[^>]*>(.*?)</td>", row)[1] == expected


def test_run_attack_writes_the_report_with_id_scores(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """End to end: a tiny PGD run (EfficientNet-Lite0 @64 px, 4 images, 2 steps, 2 budgets)."""
    from oodprobe.attack_run import run_attack
    from oodprobe.benchmark_spec import BenchmarkSpec, DataSpec, DetectorSpec, validate

    spec = validate(
        BenchmarkSpec(
            name="tiny-attack-report",
            id_train=DataSpec("fashion-mnist:train", classes=(0, 1), per_class=10),
            id_test=DataSpec("fashion-mnist:test", classes=(0, 1), per_class=5),
            ood=(DataSpec("skimage-textures", name="textures"),),
            encoders=("efficientnet-lite0@64",),
            detectors=(DetectorSpec("knn"),),
            bootstrap=0,
        )
    )
    output = tmp_path_factory.mktemp("attack") / "run"
    run = run_attack(
        spec,
        output,
        eps=EPS,
        steps=2,
        n=4,
        batch_size=4,
        device="cpu",
        cache_root=tmp_path_factory.mktemp("cache"),
    )
    assert run.files["report"] == output / "attack.html"
    text = run.files["report"].read_text()
    for entry in run.summary["results"]:
        assert f'<td class="num">{100 * entry["attacked_auroc"]:.1f}</td>' in text
    assert len(IMG.findall(_section(text, "curve"))) == 1
    histograms = _section(text, "histograms")
    assert len(IMG.findall(histograms)) == 2 and "not in this attack.json" not in histograms
    assert len(IMG.findall(_section(text, "gallery"))) == 2 * 4 * 3
    assert "image missing" not in text
