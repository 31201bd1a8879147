"""The command line: extract, bench, fit/score, and one clear line for every user error."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oodprobe.cli import main


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """scikit-learn digits as PNG folders: ID 0-4 (fit, held-out), OOD 5-9, and a flat folder."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits")
    order = np.random.default_rng(0).permutation(len(digits.target))
    counters: dict[str, int] = {}
    for index in order:
        label = int(digits.target[index])
        part = "fit" if label < 5 else "ood"
        if label < 5 and counters.get("fit", 0) >= 400:
            part = "heldout"
        counters[part] = counters.get(part, 0) + 1
        if counters[part] > 400:
            continue
        folder = root / part / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[index] * 16).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32)).save(folder / f"{index:04d}.png")
    flat = root / "flat"
    flat.mkdir()
    for path in sorted((root / "ood").rglob("*.png"))[:30]:
        (flat / path.name).write_bytes(path.read_bytes())
    return {"fit": root / "fit", "heldout": root / "heldout", "ood": root / "ood", "flat": flat}


def test_help_lists_the_commands_without_importing_torch() -> None:
    probe = (
        "import sys\n"
        "from oodprobe.cli import main\n"
        "code = main(['--help'])\n"
        "print('TORCH-LOADED' if 'torch' in sys.modules else 'NO-TORCH', code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "NO-TORCH 0" in result.stdout  # --help stays instant: no heavy imports
    for command in ("extract", "bench", "fit", "score", "models", "datasets", "detectors"):
        assert command in result.stdout


def test_detectors_lists_every_registered_detector(capsys: pytest.CaptureFixture[str]) -> None:
    from oodprobe.detectors import DETECTORS

    code, out, _ = _run(capsys, "detectors")
    assert code == 0
    for name in DETECTORS:
        assert name in out
    assert "offline-default" in out


def test_extract_prints_path_and_shape_then_reads_the_cache(
    capsys: pytest.CaptureFixture[str], digit_folders: dict[str, Path], tmp_path: Path
) -> None:
    args = [
        "extract",
        str(digit_folders["flat"]),
        "--encoder",
        "efficientnet-lite0@64",
        "--cache-dir",
        str(tmp_path),
        "--json",
    ]
    code, out, _ = _run(capsys, *args)
    assert code == 0
    summary = json.loads(out)
    assert summary["arrays"] == {"features": [30, 1280], "logits": [30, 1000]}
    assert not summary["from_cache"] and summary["n_skipped"] == 0
    assert np.load(Path(summary["path"]) / "features.npy").shape == (30, 1280)
    code, out, _ = _run(capsys, *args)
    assert code == 0 and json.loads(out)["from_cache"]


def test_extract_lists_skipped_files(
    capsys: pytest.CaptureFixture[str], digit_folders: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(digit_folders["flat"].glob("*.png"))[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "empty.png").write_bytes(b"")
    code, out, _ = _run(
        capsys,
        "extract",
        str(folder),
        "--encoder",
        "efficientnet-lite0@64",
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert code == 0
    assert "(3, 1280)" in out
    assert "skipped 1 undecodable image(s)" in out and "empty.png" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["extract", "/no/such/folder"], "/no/such/folder"),
        (["extract", "mnist-5k", "--encoder", "nope"], "unknown encoder 'nope'"),
        (["extract", "no-such-dataset"], "no-such-dataset"),
        (["bench", "--preset", "nope"], "unknown benchmark preset 'nope'"),
        (["bench", "/no/such.toml"], "benchmark config not found: /no/such.toml"),
        (["bench", "--detector", "knnn"], "unknown detector 'knnn'; choose from:"),
        (["bench", "--convention", "mine"], "unknown"),
        (
            ["score", "mnist-5k", "--detector-file", "/no/file.safetensors"],
            "detector file not found: /no/file.safetensors",
        ),
    ],
)
def test_user_errors_are_one_line_with_exit_code_1(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, _, err = _run(capsys, *args)
    assert code == 1
    assert message in _one_error_line(err)


def _write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def _simple_config(
    path: Path, encoder: str, detector: str, train: Path, test: Path, ood: Path
) -> Path:
    """A one-encoder, one-detector benchmark over three folders."""
    return _write_config(
        path,
        f"""
encoders = ["{encoder}"]
detectors = ["{detector}"]
[id]
train = "{train}"
test = "{test}"
[[ood]]
source = "{ood}"
""",
    )


def test_bad_configs_are_one_clear_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, digit_folders: dict[str, Path]
) -> None:
    broken = _write_config(tmp_path / "broken.toml", "name = [unclosed")
    code, _, err = _run(capsys, "bench", str(broken))
    assert code == 1 and "is not valid TOML" in _one_error_line(err)
    typo = _write_config(
        tmp_path / "typo.toml",
        """
[id]
train = "mnist-5k:train"
test = "mnist-5k:test"
[[ood]]
source = "digits:test"
oops = 1
""",
    )
    code, _, err = _run(capsys, "bench", str(typo))
    assert code == 1
    assert _one_error_line(err) == (
        "error: unknown key 'oops' in [[ood]] #1; valid keys: classes, group, limit, name, "
        "per_class, seed, source"
    )
    flat = digit_folders["flat"]
    unlabeled = _simple_config(
        tmp_path / "unlabeled.toml", "efficientnet-lite0@64", "mahalanobis", flat, flat, flat
    )
    code, _, err = _run(capsys, "bench", str(unlabeled))
    assert code == 1
    assert "detector 'mahalanobis' needs class labels" in _one_error_line(err)
    code, _, err = _run(capsys, "bench", str(unlabeled), "--detector", "mcm")
    assert code == 1
    assert "needs a vision-language encoder" in _one_error_line(err)
    assert "'efficientnet-lite0@64' is image-only" in err


def test_a_detector_of_logits_needs_an_encoder_with_a_classifier(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    digit_folders: dict[str, Path],
    tiny_openclip: str,
) -> None:
    config = _simple_config(
        tmp_path / "logits.toml",
        tiny_openclip,
        "logits",
        digit_folders["fit"],
        digit_folders["heldout"],
        digit_folders["ood"],
    )
    code, _, err = _run(capsys, "bench", str(config), "--cache-dir", str(tmp_path / "cache"))
    assert code == 1
    assert _one_error_line(err) == (
        f"error: detector 'logits' scores the encoder's logits, and '{tiny_openclip}' gives "
        "only: features"
    )
    assert not (tmp_path / "cache").exists()  # refused before any extraction


def test_fit_then_score_keeps_the_requested_id_fraction(
    capsys: pytest.CaptureFixture[str], digit_folders: dict[str, Path], tmp_path: Path
) -> None:
    detector_file = tmp_path / "detector.safetensors"
    keep = 0.9
    code, out, err = _run(
        capsys,
        "fit",
        str(digit_folders["fit"]),
        "--output",
        str(detector_file),
        "--encoder",
        "efficientnet-lite0@64",
        "--detector",
        "knn",
        "--keep",
        str(keep),
        "--holdout",
        "0.3",
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert code == 0, err
    assert "held-out ID images" in out
    accepted = {}
    for part in ("heldout", "ood"):
        scores_csv = tmp_path / f"{part}.csv"
        code, out, err = _run(
            capsys,
            "score",
            str(digit_folders[part]),
            "--detector-file",
            str(detector_file),
            "--output",
            str(scores_csv),
            "--cache-dir",
            str(tmp_path / "cache"),
        )
        assert code == 0, err
        with open(scores_csv) as handle:
            rows = list(csv.DictReader(handle))
        assert {row["decision"] for row in rows} <= {"accept", "reject"}
        accepted[part] = np.mean([row["decision"] == "accept" for row in rows])
        n = len(rows)
    # Held-out ID images were seen neither by fit nor by calibration: acceptance ≈ keep
    # within sampling error of both the 120 calibration images and these images.
    tolerance = 3 * np.sqrt(keep * (1 - keep) * (1 / 120 + 1 / n))
    assert abs(accepted["heldout"] - keep) < tolerance
    assert accepted["ood"] < accepted["heldout"]


def test_bench_runs_a_config_end_to_end(
    capsys: pytest.CaptureFixture[str], digit_folders: dict[str, Path], tmp_path: Path
) -> None:
    config = _write_config(
        tmp_path / "bench.toml",
        f"""
name = "digits"
encoders = ["efficientnet-lite0@64"]
bootstrap = 50
gallery_size = 4
[[detectors]]
name = "knn"
[[detectors]]
name = "mahalanobis"
[id]
train = {{ source = "{digit_folders["fit"]}" }}
test = {{ source = "{digit_folders["heldout"]}" }}
[[ood]]
name = "digits 5-9"
source = "{digit_folders["ood"]}"
group = "near"
""",
    )
    output = tmp_path / "out"
    code, out, err = _run(
        capsys,
        "bench",
        str(config),
        "--output",
        str(output),
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert code == 0, err
    assert "digits 5-9" in out and "report:" in out
    results = json.loads((output / "results.json").read_text())
    rows = results["rows"]
    assert {(row["detector"], row["ood_set"]) for row in rows} == {
        ("knn", "digits 5-9"),
        ("mahalanobis", "digits 5-9"),
    }
    for row in rows:
        assert 0.6 < row["auroc"] <= 1.0  # digits 5-9 vs 0-4: clearly above chance
        assert row["auroc_low"] <= row["auroc"] <= row["auroc_high"]
        for metric in ("fpr", "aupr_in", "aupr_out"):
            assert 0.0 <= row[f"{metric}_low"] <= row[metric] <= row[f"{metric}_high"] <= 1.0
        assert row["fpr"] < 0.95  # a detector above chance rejects some OOD at 95% TPR
        assert row["convention"] == "oodprobe" and row["fpr_positive"] == "id"
    with open(output / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2
    with open(output / "scores" / "efficientnet-lite0_64" / "knn.csv") as handle:
        score_rows = list(csv.DictReader(handle))
    assert {row["role"] for row in score_rows} == {"id", "ood"}
    assert (output / "report.html").stat().st_size > 10_000


def test_a_paper_preset_without_its_data_says_where_it_looks(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OODPROBE_DATA", str(tmp_path / "empty"))
    code, _, err = _run(capsys, "bench", "--preset", "cifar10")
    line = _one_error_line(err)
    assert code == 1
    assert line.startswith("error: ID training set 'cifar10:train': cifar10 not found in ")
    assert str(tmp_path / "empty") in line and "--download" in line
    monkeypatch.setenv("OODPROBE_IMAGENET_TRAIN", str(tmp_path / "no-imagenet"))
    code, _, err = _run(capsys, "bench", "--preset", "imagenet")
    line = _one_error_line(err)
    assert code == 1 and str(tmp_path / "no-imagenet") in line
    assert "OODPROBE_IMAGENET_TRAIN" in line
