"""The command line: extract, bench, fit/score, and one clear line for every user error."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="module")
def digit_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature cache for the tests over the 400-image digit folders (each extracted once)."""
    return tmp_path_factory.mktemp("digit-cache")


def test_help_lists_the_commands_without_importing_torch() -> None:
    probe = (
        "import sys\n"
        "from oodprobe.cli import main\n"
        "code = main(['--help']) + main(['bench', '--help'])\n"
        "heavy = [name for name in ('torch', 'sklearn') if name in sys.modules]\n"
        "print('HEAVY-LOADED' if heavy else 'NO-TORCH', code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "NO-TORCH 0" in result.stdout  # --help stays instant: no torch, no scikit-learn
    for command in ("extract", "bench", "fit", "score", "models", "datasets", "detectors"):
        assert command in result.stdout


def _help_options(out: str) -> dict[str, str]:
    """``--option`` -> its line in a command's --help (rich panel rows start with '│')."""
    options = {}
    for line in out.splitlines():
        names = [token for token in line.split() if token.startswith("--")]
        if line.startswith("│") and names:
            options[names[0]] = line
    return options


def test_help_shows_choices_as_choices(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from oodprobe.benchmark_spec import benchmark_names
    from oodprobe.metrics import CONVENTIONS

    monkeypatch.setenv("COLUMNS", "250")  # one line per option: the choices stay whole
    code, out, _ = _run(capsys, "bench", "--help")
    assert code == 0
    lines = _help_options(out)
    assert f"<{'|'.join(benchmark_names())}>" in lines["--preset"]
    assert f"<{'|'.join(CONVENTIONS)}>" in lines["--convention"]
    assert "<ensemble|single|clipn>" in lines["--prompts"]
    assert "[auto|cpu|cuda|cuda:N|mps]" in lines["--device"]
    assert "<auto|fp32|fp16|bf16>" in lines["--precision"]
    for option in ("--seed", "--workers", "--bootstrap"):
        assert option in lines
    code, out, _ = _run(capsys, "extract", "--help")
    assert code == 0 and "<skip|raise>" in out
    for command in ("fit", "score"):
        code, out, _ = _run(capsys, command, "--help")
        options = _help_options(out)
        assert "<ensemble|single|clipn>" in options.get("--prompts", "<ensemble|single|clipn>")
        for option in ("--download", "--workers", "--precision", "--batch-size", "--key-file"):
            assert option in options, (command, option)
    assert {"--class-names", "--prompts"} <= set(_help_options(_run(capsys, "fit", "--help")[1]))


def test_the_choices_in_help_are_the_librarys() -> None:
    """The CLI spells some names (building --help must not import torch); they must agree."""
    from typing import get_args

    from oodprobe import cli
    from oodprobe.benchmark_spec import benchmark_names
    from oodprobe.encoders.text import PROMPT_SETS
    from oodprobe.features import OnError, Precision
    from oodprobe.metrics import CONVENTIONS

    assert get_args(Precision) == cli.PRECISIONS
    assert get_args(OnError) == cli.ON_ERROR
    assert tuple(CONVENTIONS) == cli.CONVENTION_NAMES
    assert tuple(PROMPT_SETS) == cli.PROMPT_SET_NAMES
    assert get_args(cli.PresetName) == tuple(benchmark_names())


def test_detectors_lists_each_detector_with_its_parameters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from oodprobe.detectors import DETECTORS

    code, out, _ = _run(capsys, "detectors")
    assert code == 0
    blocks = {
        block.splitlines()[0].split(":")[0]: block.splitlines() for block in out.split("\n\n")[1:-1]
    }
    assert list(blocks) == list(DETECTORS)
    for name, cls in DETECTORS.items():
        params = cls.param_info()
        lines = blocks[name][2:]  # after the summary and the "needs: …; scores: …" line
        assert len(lines) == max(1, len(params)), lines
        for line, info in zip(lines, params, strict=False):
            # one whole line per parameter, "    name=default   allowed": nothing folds
            setting, _, allowed = line.strip().partition(" ")
            assert setting.partition("=")[0] == info.name
            assert allowed.strip() == info.allowed
            assert info.name not in cls.runner_params
    knn = {line.split("=")[0].strip(): line for line in blocks["knn"][2:]}
    assert knn["k"].startswith(f"    k={DETECTORS['knn']().k} ")  # the constructor's default
    assert out.splitlines()[-1].startswith(
        "benchmark presets (oodprobe bench --preset NAME): offline-default"
    )


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
    (folder / "x.png").symlink_to("y.png")  # a link loop: left out by the walk, not undecodable
    (folder / "y.png").symlink_to("x.png")
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
    assert "skipped 1 undecodable image(s) and 2 path(s) left out by the folder walk:" in out
    assert "empty.png" in out and "x.png: symbolic link loop" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["extract", "/no/such/folder"], "/no/such/folder"),
        (["extract", "mnist-5k", "--encoder", "nope"], "unknown encoder 'nope'"),
        (["extract", "no-such-dataset"], "no-such-dataset"),
        (
            ["bench", "--preset", "nope"],
            "error: Invalid value for '--preset': 'nope' is not one of 'offline-default', "
            "'offline-study', 'cifar10', 'cifar100', 'imagenet', 'imagenet-classifier', "
            "'imagenet-cooked'. (see 'oodprobe bench --help')",
        ),
        (
            ["extract", "mnist-5k", "--device", "gpu"],
            "error: Invalid value for '--device': 'gpu' is not one of auto, cpu, cuda, cuda:N, "
            "mps (see 'oodprobe extract --help')",
        ),
        (
            ["extract", "mnist-5k", "--precision", "fp8"],
            "error: Invalid value for '--precision': 'fp8' is not one of 'auto', 'fp32', "
            "'fp16', 'bf16'. (see 'oodprobe extract --help')",
        ),
        (
            ["extract", "mnist-5k", "--on-error", "keep"],
            "error: Invalid value for '--on-error': 'keep' is not one of 'skip', 'raise'. "
            "(see 'oodprobe extract --help')",
        ),
        (
            ["bench", "--workers", "-1"],
            "error: Invalid value for '--workers': Input should be greater than or equal to 0 "
            "(see 'oodprobe bench --help')",
        ),
        (
            ["bench", "--prompts", "many"],
            "error: Invalid value for '--prompts': 'many' is not one of 'ensemble', 'single', "
            "'clipn'. "
            "(see 'oodprobe bench --help')",
        ),
        (
            ["fit", "mnist-5k", "-o", "d.safetensors", "--key-file", "/no/key"],
            "error: cannot read --key-file /no/key: No such file or directory",
        ),
        (["bench", "/no/such.toml"], "benchmark config not found: /no/such.toml"),
        (["bench", "--detector", "knnn"], "unknown detector 'knnn'; choose from:"),
        (
            ["bench", "--convention", "mine"],
            "error: Invalid value for '--convention': 'mine' is not one of 'oodprobe', 'openood', "
            "'openood-v1', 'pytorch-ood', 'mcm', 'plp', 'clipn', 'deep-knn'. "
            "(see 'oodprobe bench --help')",
        ),
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
    line = _one_error_line(err)
    assert line == message if message.startswith("error: ") else message in line


def test_an_output_that_is_a_folder_is_refused_before_any_work(
    capsys: pytest.CaptureFixture[str], digit_folders: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "existing"
    folder.mkdir()
    cache = tmp_path / "cache"
    code, _, err = _run(
        capsys, "fit", str(digit_folders["fit"]), "-o", str(folder), "--cache-dir", str(cache)
    )
    assert code == 1
    assert _one_error_line(err) == (
        f"error: --output {folder} is a directory; give a file path, e.g. "
        f"{folder / 'detector.safetensors'}"
    )
    code, _, err = _run(
        capsys,
        "score",
        str(digit_folders["ood"]),
        "-d",
        str(tmp_path / "detector.safetensors"),
        "-o",
        str(folder),
        "--cache-dir",
        str(cache),
    )
    assert code == 1
    assert _one_error_line(err) == (
        f"error: --output {folder} is a directory; give a file path, e.g. {folder / 'scores.csv'}"
    )
    assert not cache.exists()  # nothing was extracted


def test_an_empty_key_file_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("\n")
    code, _, err = _run(
        capsys,
        "score",
        "mnist-5k",
        "-d",
        str(tmp_path / "d.safetensors"),
        "--key-file",
        str(key_file),
    )
    assert code == 1
    assert _one_error_line(err) == (
        f"error: --key-file {key_file} is empty; write a secret into it, e.g. "
        f"'openssl rand -hex 32 > {key_file}'"
    )


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU"
)
def test_a_missing_gpu_is_one_line_before_any_work(
    capsys: pytest.CaptureFixture[str], digit_folders: dict[str, Path], tmp_path: Path
) -> None:
    for command in (
        ["extract", str(digit_folders["flat"])],
        ["bench"],
        ["fit", str(digit_folders["fit"]), "-o", str(tmp_path / "d.safetensors")],
        ["score", str(digit_folders["flat"]), "-d", str(tmp_path / "d.safetensors")],
    ):
        code, _, err = _run(
            capsys, *command, "--device", "cuda", "--cache-dir", str(tmp_path / "cache")
        )
        assert code == 1, command
        assert _one_error_line(err) == (
            "error: device 'cuda' was requested but no CUDA GPU is available; use --device "
            "auto or cpu"
        )
    assert not (tmp_path / "cache").exists()


def test_a_library_error_while_options_are_parsed_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import oodprobe.pipeline
    from oodprobe.errors import InvalidParameterError

    def refuse(device: str) -> str:
        raise InvalidParameterError(f"device {device!r} is busy")

    monkeypatch.setattr(oodprobe.pipeline, "check_device", refuse)
    code, _, err = _run(capsys, "extract", "mnist-5k", "--device", "cpu")
    assert (code, _one_error_line(err)) == (1, "error: device 'cpu' is busy")


def test_warnings_are_one_line_each_and_shown_once(capsys: pytest.CaptureFixture[str]) -> None:
    import warnings

    from oodprobe.cli import _one_line_warnings

    before = warnings.showwarning
    with _one_line_warnings():
        for _ in range(3):
            warnings.warn("class 'cat' lost 2 images", stacklevel=1)
        warnings.warn("a second\nmessage  spread out", RuntimeWarning, stacklevel=1)
        warnings.warn("old API", DeprecationWarning, stacklevel=1)  # hidden, as by default
    assert warnings.showwarning is before
    assert capsys.readouterr().err.splitlines() == [
        "warning: class 'cat' lost 2 images",
        "warning: a second message spread out",
    ]


def test_class_names_come_from_a_list_or_a_file(tmp_path: Path) -> None:
    from oodprobe.cli import _class_names
    from oodprobe.errors import InvalidParameterError

    assert _class_names("cat, dog ,bird") == ["cat", "dog", "bird"]
    names = tmp_path / "names.txt"
    names.write_text("tench\ngoldfish, Carassius auratus\n\n")
    assert _class_names(str(names)) == ["tench", "goldfish, Carassius auratus"]
    with pytest.raises(InvalidParameterError, match="holds no names"):
        _class_names(" , ")


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
    capsys: pytest.CaptureFixture[str],
    digit_folders: dict[str, Path],
    digit_cache: Path,
    tmp_path: Path,
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
        str(digit_cache),
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
            str(digit_cache),
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
    capsys: pytest.CaptureFixture[str],
    digit_folders: dict[str, Path],
    digit_cache: Path,
    tmp_path: Path,
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
        str(digit_cache),
        "--seed",
        "3",
        "--workers",
        "0",
        "--precision",
        "fp32",
    )
    assert code == 0, err
    assert "digits 5-9" in out and "report:" in out
    # log lines are plain text: "[encoder]" is not swallowed as a rich markup tag
    assert "[efficientnet-lite0@64] extracting features" in out
    # 400 training images < 1280 dimensions: the Gaussian fit warns, once, in one line
    assert [line for line in err.splitlines() if "warning" in line.lower()] == [
        "warning: mahalanobis: 400 training samples in 5 group(s) cannot estimate a full-rank "
        "covariance of 1280 dimensions; distances then ignore every direction outside the "
        "training features and can rank OOD data as in-distribution: fit on more samples than "
        "dimensions"
    ]
    results = json.loads((output / "results.json").read_text())
    assert results["provenance"]["seed"] == 3  # --seed replaced the config's 0
    rows = results["rows"]
    assert {row["precision"] for row in rows} == {"fp32"}
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


@pytest.fixture(scope="module")
def fitted_detector(
    digit_folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """A small knn detector file (30 digits 5-9), and the feature cache it used."""
    root = tmp_path_factory.mktemp("fitted")
    detector_file, cache = root / "detector.safetensors", root / "cache"
    code = main(
        [
            "fit",
            str(digit_folders["flat"]),
            "-o",
            str(detector_file),
            "-d",
            "knn:k=1",
            "--encoder",
            "efficientnet-lite0@64",
            "--cache-dir",
            str(cache),
        ]
    )
    assert code == 0
    return detector_file, cache


def _images_with_one_broken(digit_folders: dict[str, Path], folder: Path) -> Path:
    folder.mkdir()
    for path in sorted(digit_folders["flat"].glob("*.png"))[:4]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def test_score_lists_skipped_images(
    capsys: pytest.CaptureFixture[str],
    digit_folders: dict[str, Path],
    fitted_detector: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    detector_file, cache = fitted_detector
    folder = _images_with_one_broken(digit_folders, tmp_path / "images")
    scores_csv = tmp_path / "scores.csv"
    code, out, err = _run(
        capsys,
        "score",
        str(folder),
        "-d",
        str(detector_file),
        "-o",
        str(scores_csv),
        "--cache-dir",
        str(cache),
    )
    assert code == 0, err
    lines = out.splitlines()
    header = lines.index(f"skipped 1 undecodable image(s) of {folder}:")
    assert lines[header + 1].startswith("  ") and "broken.png: " in lines[header + 1]
    assert "4 images scored" in out and ", 1 skipped (listed in the CSV)" in out
    with open(scores_csv) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5 and rows[-1]["decision"].startswith("skipped: ")


def test_a_failed_score_keeps_the_previous_csv(
    capsys: pytest.CaptureFixture[str],
    digit_folders: dict[str, Path],
    fitted_detector: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from oodprobe import deploy
    from oodprobe.errors import DataError

    detector_file, cache = fitted_detector
    scores_csv = tmp_path / "scores.csv"
    scores_csv.write_text("source,score,decision,threshold\nold.png,1.0,accept,0.5\n")
    previous = scores_csv.read_bytes()
    score_with_deployment = deploy.score_with_deployment

    class Unwritable:
        """A source whose text cannot be produced: the CSV writer fails on the last row."""

        def __str__(self) -> str:
            raise DataError("disk full")

    def scored_with_a_bad_last_row(*args: Any, **kwargs: Any) -> deploy.ScoredImages:
        scored = score_with_deployment(*args, **kwargs)
        scored.sources[-1] = Unwritable()  # type: ignore[call-overload]
        return scored

    monkeypatch.setattr(deploy, "score_with_deployment", scored_with_a_bad_last_row)
    args = ["score", str(digit_folders["flat"]), "-d", str(detector_file), "-o", str(scores_csv)]
    code, _, err = _run(capsys, *args, "--cache-dir", str(cache))
    assert code == 1
    assert [line for line in err.splitlines() if "error" in line] == ["error: disk full"]
    assert scores_csv.read_bytes() == previous
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scores.csv"]  # no temporary


def test_fit_lists_skipped_images_and_a_key_file_signs_the_detector(
    capsys: pytest.CaptureFixture[str],
    digit_folders: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OODPROBE_DETECTOR_KEY", raising=False)
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(digit_folders["flat"].glob("*.png"))[:12]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    key, other_key = tmp_path / "key", tmp_path / "other-key"
    key.write_text("correct horse battery staple\n")
    other_key.write_text("wrong")
    detector_file = tmp_path / "detector.safetensors"
    common = ["--encoder", "efficientnet-lite0@64", "--cache-dir", str(tmp_path / "cache")]
    code, out, err = _run(
        capsys,
        "fit",
        str(folder),
        "-o",
        str(detector_file),
        "-d",
        "knn:k=1",
        "--holdout",
        "0.25",
        "--workers",
        "0",
        "--precision",
        "fp32",
        "--key-file",
        str(key),
        *common,
    )
    assert code == 0, err
    lines = out.splitlines()
    header = lines.index(f"skipped 1 undecodable image(s) of {folder}:")
    assert "broken.png: " in lines[header + 1]
    assert "fitted on 9 images" in out  # 12 decodable: 3 held out, 9 fitted

    score = ["score", str(folder), "-d", str(detector_file), "-o", str(tmp_path / "s.csv")]
    common = common[2:]  # score takes the encoder from the detector file
    code, _, err = _run(capsys, *score, "--key-file", str(other_key), *common)
    assert code == 1
    assert _one_error_line(err) == (
        f"error: {detector_file} failed its HMAC check: modified, or signed with another key"
    )
    monkeypatch.setenv("OODPROBE_DETECTOR_KEY", "wrong")  # the library's default key source
    code, _, err = _run(capsys, *score, *common)
    assert code == 1 and "failed its HMAC check" in _one_error_line(err)
    monkeypatch.setenv("OODPROBE_DETECTOR_KEY", "correct horse battery staple")
    code, out, err = _run(capsys, *score, *common)
    assert code == 0, err
    code, out, err = _run(capsys, *score, "--key-file", str(key), *common)
    assert code == 0, err
    assert "12 images scored" in out


def test_fit_takes_class_names_and_prompts_for_text_detectors(
    capsys: pytest.CaptureFixture[str],
    digit_folders: dict[str, Path],
    tmp_path: Path,
    tiny_openclip: str,
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(digit_folders["flat"].glob("*.png"))[:10]:
        (folder / path.name).write_bytes(path.read_bytes())
    args = ["fit", str(folder), "-o", str(tmp_path / "mcm.safetensors"), "-d", "mcm"]
    args += ["-e", tiny_openclip, "--cache-dir", str(tmp_path / "cache")]
    code, _, err = _run(capsys, *args)
    assert code == 1  # a flat folder names no classes
    assert "(or --class-names)" in _one_error_line(err)
    assert not (tmp_path / "cache").exists()  # refused before extraction
    names = tmp_path / "names.txt"
    names.write_text("five\nsix\nseven\n")
    for class_names in ("five,six,seven", str(names)):
        code, out, err = _run(capsys, *args, "--class-names", class_names, "--prompts", "single")
        assert code == 0, err
        assert "saved " in out


def test_bench_lists_skipped_images_and_failed_detectors(
    capsys: pytest.CaptureFixture[str], digit_folders: dict[str, Path], tmp_path: Path
) -> None:
    flat = sorted(digit_folders["flat"].glob("*.png"))
    parts = {"train": flat[:12], "test": flat[12:20], "ood": flat[20:25]}
    for part, paths in parts.items():
        (tmp_path / part).mkdir()
        for path in paths:
            (tmp_path / part / path.name).write_bytes(path.read_bytes())
    (tmp_path / "ood" / "broken.png").write_bytes(b"not a png")
    config = _write_config(
        tmp_path / "small.toml",
        f"""
name = "small"
encoders = ["efficientnet-lite0@64"]
bootstrap = 0
gallery_size = 2
[[detectors]]
name = "knn"
params = {{ k = 1 }}
[[detectors]]
name = "lof"
[id]
train = "{tmp_path / "train"}"
test = "{tmp_path / "test"}"
[[ood]]
name = "others"
source = "{tmp_path / "ood"}"
""",
    )
    code, out, err = _run(
        capsys, "bench", str(config), "-o", str(tmp_path / "out"), "--cache-dir", str(tmp_path)
    )
    assert code == 0, err
    lines = out.splitlines()
    header = lines.index("skipped 1 undecodable image(s) of others:")
    assert lines[header + 1].startswith("  ") and "broken.png: " in lines[header + 1]
    # lof's 20 neighbours need more than the 12 training images: its row records the error
    failed = [line for line in lines if line.startswith("lof on efficientnet-lite0@64 failed: ")]
    assert len(failed) == 1
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    lof = next(row for row in rows if row["detector"] == "lof")
    assert failed[0].endswith(lof["error"]) and lof["auroc"] is None
    warning = [line for line in err.splitlines() if line.startswith("warning: detector 'lof'")]
    assert warning == [f"warning: detector 'lof' failed: {lof['error']}"]


def test_openmp_threads_sleep_when_idle_unless_the_user_chose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CLI sets OMP_WAIT_POLICY=PASSIVE before torch loads; a user's own value is kept."""
    import os

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["datasets"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(["datasets"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    script = "import oodprobe.cli, sys; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 0
