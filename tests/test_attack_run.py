"""run_attack and `oodprobe attack`: end to end on EfficientNet-Lite0 @64 px, resume, errors."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from oodprobe.attack import load_attack_images
from oodprobe.attack_run import parse_eps, run_attack
from oodprobe.benchmark_spec import BenchmarkSpec, DataSpec, DetectorSpec, validate
from oodprobe.errors import InvalidParameterError, OodprobeError

EPS = (4 / 255, 8 / 255)
OPTIONS: dict[str, Any] = {
    "eps": EPS,
    "steps": 5,
    "n": 8,
    "batch_size": 4,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def spec() -> BenchmarkSpec:
    """Fashion-MNIST 0-4 (20 per class) as ID, scikit-image textures as OOD, Lite0 at 64 px."""
    return validate(
        BenchmarkSpec(
            name="tiny-attack",
            id_train=DataSpec("fashion-mnist:train", classes=(0, 1, 2, 3, 4), per_class=20),
            id_test=DataSpec("fashion-mnist:test", classes=(0, 1, 2, 3, 4), per_class=10),
            ood=(DataSpec("skimage-textures", name="textures"),),
            encoders=("efficientnet-lite0@64",),
            detectors=(DetectorSpec("knn"),),
            bootstrap=0,
        )
    )


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def whole(spec: BenchmarkSpec, shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One uninterrupted PGD run at 4/255 and 8/255 (5 steps, 8 images, batches of 4)."""
    output = tmp_path_factory.mktemp("whole") / "run"
    return run_attack(spec, output, cache_root=shared_cache, **OPTIONS)


def _without_timing(summary: dict[str, Any]) -> dict[str, Any]:
    stripped = copy.deepcopy(summary)
    stripped.pop("timing")
    stripped["provenance"].pop("created")
    return stripped


def test_pgd_run_drops_auroc_within_budget_on_saved_pngs(whole: Any) -> None:
    summary = whole.summary
    assert json.loads((whole.output_dir / "attack.json").read_text()) == summary
    assert summary["format"] == "oodprobe-attack"
    assert summary["params"]["eps"] == list(EPS) and summary["params"]["steps"] == 5
    assert summary["provenance"]["encoder_cache_id"] == summary["params"]["encoder_cache_id"]
    assert summary["params"]["detector"]["params"]["k"] == 1
    assert set(summary["params"]["data_fingerprints"]) == {"id_train", "id_test", "ood"}
    assert [entry["eps"] for entry in summary["results"]] == list(EPS)
    for entry in summary["results"]:
        print(
            f"\neps {entry['eps_255']:.0f}/255: AUROC {entry['clean_auroc']:.3f} -> "
            f"{entry['attacked_auroc']:.3f}, FPR {entry['clean_fpr']:.3f} -> "
            f"{entry['attacked_fpr']:.3f}, success {entry['success_rate']}, SVM AUROC "
            f"{entry['class_score_svm']['auroc']:.3f}"
        )
        assert entry["clean_auroc"] >= 0.95
        assert entry["attacked_auroc"] <= entry["clean_auroc"] - 0.3
        assert entry["attacked_fpr"] > entry["clean_fpr"]
        assert entry["success_rate"] is not None and entry["success_rate"] >= 0.5
        assert entry["perturbation_max"]["linf"] <= entry["eps"] + 1e-6
        assert entry["class_score_svm"]["n_held_out"] == 8
        assert entry["removed_targets"] is None
    # the SVM fitted at one budget, evaluated on held-out images attacked at each budget
    across = summary["class_score_svm_across_budgets"]
    assert [(cell["fit_eps"], cell["test_eps"]) for cell in across] == [
        (fit, test) for fit in EPS for test in EPS
    ]
    assert across[0]["auroc"] == summary["results"][0]["class_score_svm"]["auroc"]
    assert across[3]["auroc"] == summary["results"][1]["class_score_svm"]["auroc"]
    # the budget holds on the saved PNGs themselves, in whole 1/255 levels
    threshold = summary["threshold"]["value"]
    for image in summary["images"]:
        clean = np.rint(load_attack_images([whole.output_dir / image["clean_png"]]).numpy() * 255)
        for attack, eps in zip(image["attacks"], EPS, strict=True):
            path = whole.output_dir / attack["adversarial_png"]
            adversarial = np.rint(load_attack_images([path]).numpy() * 255)
            assert np.abs(adversarial - clean).max() <= math.floor(eps * 255 + 1e-6)
            assert attack["accepted"] == (attack["attacked_score"] >= threshold)
            # PGD keeps the best iterate: the float image's score never falls below the clean
            assert attack["float_attacked_score"] >= attack["float_clean_score"]
    # success rate: of the OOD images rejected clean, the fraction accepted attacked
    rejected = [image for image in summary["images"] if not image["clean_accepted"]]
    expected = np.mean([image["attacks"][0]["accepted"] for image in rejected])
    assert summary["results"][0]["success_rate"] == pytest.approx(expected)
    for timing in summary["timing"]["attacks"]:
        assert timing["seconds_per_image_step"] > 0
        print(f"{timing['attack']}: {timing['seconds_per_image_step']:.4f} s per image per step")


def test_an_interrupted_run_resumes_to_the_whole_runs_results(
    spec: BenchmarkSpec, shared_cache: Path, whole: Any, tmp_path: Path
) -> None:
    output = tmp_path / "run"
    calls: list[dict[str, Any]] = []

    def stop_after_first(info: dict[str, Any]) -> None:
        calls.append(info)
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run_attack(spec, output, cache_root=shared_cache, after_batch=stop_after_first, **OPTIONS)
    assert calls == [{"attack": "eps0", "batch": 0, "n_batches": 2}]
    assert (output / "batches" / "eps0" / "0000" / "batch.json").is_file()
    assert not (output / "batches" / "eps0" / "0001").exists()
    assert not (output / "attack.json").exists()
    resumed = run_attack(spec, output, cache_root=shared_cache, **OPTIONS)
    assert resumed.batches_resumed == 1
    assert _without_timing(resumed.summary) == _without_timing(whole.summary)
    again = run_attack(spec, output, cache_root=shared_cache, **OPTIONS)
    assert again.batches_resumed == 4
    assert _without_timing(again.summary) == _without_timing(whole.summary)


def test_a_folder_of_another_run_is_refused_unless_forced(
    spec: BenchmarkSpec, shared_cache: Path, tmp_path: Path
) -> None:
    output = tmp_path / "run"
    options = {**OPTIONS, "eps": (4 / 255,), "steps": 2}
    run_attack(spec, output, cache_root=shared_cache, **options)
    with pytest.raises(InvalidParameterError, match=r"other parameters \(steps differs\).*force"):
        run_attack(spec, output, cache_root=shared_cache, **{**options, "steps": 3})
    forced = run_attack(
        spec, output, cache_root=shared_cache, force=True, **{**options, "steps": 3}
    )
    assert forced.batches_resumed == 0 and forced.summary["params"]["steps"] == 3


def test_feature_matching_run_reports_the_removed_targets_evaluation(
    spec: BenchmarkSpec, shared_cache: Path, tmp_path: Path
) -> None:
    run = run_attack(
        spec,
        tmp_path / "fm",
        method="feature-matching",
        steps=10,
        lr=1e-2,
        n=8,
        batch_size=4,
        device="cpu",
        cache_root=shared_cache,
    )
    (entry,) = run.summary["results"]
    print(
        f"\nfeature matching: AUROC {entry['clean_auroc']:.3f} -> {entry['attacked_auroc']:.3f}, "
        f"targets removed {entry['removed_targets']['attacked']['auroc']:.3f}"
    )
    assert entry["eps"] is None and entry["method"] == "feature-matching"
    assert entry["attacked_auroc"] < entry["clean_auroc"] - 0.1
    assert entry["removed_targets"]["clean"]["n_id"] == 50
    for image in run.summary["images"]:
        assert image["target_index"] >= 0
        (attack,) = image["attacks"]
        assert attack["attacked_cosine"] > attack["clean_cosine"]
    assert run.summary["params"]["smoothness"] == 5e3


def test_a_deployment_files_threshold_gives_the_success_rate(
    spec: BenchmarkSpec, shared_cache: Path, tmp_path: Path
) -> None:
    from oodprobe.deploy import fit_deployment

    deployment = fit_deployment(
        spec.id_train,
        "efficientnet-lite0@64",
        DetectorSpec("knn"),
        cache_root=shared_cache,
        device="cpu",
        progress=False,
    )
    path = deployment.save(tmp_path / "knn.oodprobe")
    run = run_attack(
        spec,
        tmp_path / "run",
        deployment=path,
        cache_root=shared_cache,
        **{**OPTIONS, "eps": (8 / 255,)},
    )
    assert run.summary["threshold"]["value"] == deployment.threshold
    assert run.summary["params"]["detector"]["deployment"] == str(path)
    (entry,) = run.summary["results"]
    rejected = [image for image in run.summary["images"] if not image["clean_accepted"]]
    assert rejected
    expected = np.mean([image["attacks"][0]["accepted"] for image in rejected])
    assert entry["success_rate"] == pytest.approx(expected)
    with pytest.raises(InvalidParameterError, match="holds its fitted detector"):
        run_attack(spec, tmp_path / "other", deployment=path, detector="knn")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"detector": "lof"}, "detector 'lof' has no differentiable score"),
        ({"eps": ("4/0",)}, "eps must be a number such as 4/255 or 0.0157, got '4/0'"),
        ({"eps": (2.0,)}, r"an L∞ budget eps must be <= 1"),
        ({"eps": ()}, "eps must name at least one budget"),
        ({"n": 0}, "n must be an integer >= 1, got 0"),
        ({"n": 100_000}, "n = 100000 images to attack, and the OOD set 'textures' has"),
        ({"method": "fgsm"}, "method must be one of pgd, feature-matching, got 'fgsm'"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"targets": "far"}, "targets must be one of random, nearest, got 'far'"),
        ({"smoothness": -1.0}, "smoothness must be smooth"),
        ({"ood": "nope"}, "unknown OOD set 'nope'; choose from: textures"),
        ({"detector": "knnn"}, "unknown detector 'knnn'"),
        ({"detector": "class-score-svm"}, "fitted on clean vs attacked images"),
        ({"detector": "knn:k=0"}, "k"),
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
    ],
)
def test_bad_values_are_refused_before_any_output(
    spec: BenchmarkSpec, tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    output = tmp_path / "run"
    with pytest.raises(OodprobeError, match=message):
        run_attack(spec, output, cache_root=tmp_path / "cache", device="cpu", **options)
    assert not output.exists()
    assert not (tmp_path / "cache").exists()


def test_feature_matching_accepts_a_detector_without_a_torch_score(spec: BenchmarkSpec) -> None:
    # feature matching never differentiates the detector; lof is only evaluated. Refused here
    # on a later value, to show the detector itself passed.
    with pytest.raises(InvalidParameterError, match="n must be"):
        run_attack(spec, "unused", method="feature-matching", detector="lof", n=0)


def test_parse_eps() -> None:
    assert parse_eps("4/255") == pytest.approx(4 / 255)
    assert parse_eps(" 0.5 ") == 0.5
    assert parse_eps(2) == 2.0
    for bad in ("", "a/b", "-1/255", "0", "nan", True):
        with pytest.raises(InvalidParameterError, match="eps must be"):
            parse_eps(bad)


def test_cli_attack_prints_the_table_and_writes_attack_json(
    spec: BenchmarkSpec, shared_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from oodprobe.cli import main

    config = tmp_path / "tiny.toml"
    config.write_text(
        'name = "tiny-attack"\nencoders = ["efficientnet-lite0@64"]\nbootstrap = 0\n'
        "[id]\n"
        'train = { source = "fashion-mnist:train", classes = "0-4", per_class = 20 }\n'
        'test = { source = "fashion-mnist:test", classes = "0-4", per_class = 10 }\n'
        '[[ood]]\nname = "textures"\nsource = "skimage-textures"\n'
        '[[detectors]]\nname = "mahalanobis"\n'  # bench's; the attack takes -d (knn)
    )
    output = tmp_path / "out"
    arguments = [
        "attack",
        str(config),
        "--steps",
        "3",
        "--n",
        "4",
        "--batch-size",
        "2",
        "--eps",
        "4/255",
        "--eps",
        "0.03",
        "-o",
        str(output),
        "--device",
        "cpu",
        "--cache-dir",
        str(shared_cache),
    ]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "attacked AUROC" in printed and "4/255" in printed
    assert "s per image per step" in printed and str(output / "attack.json") in printed
    summary = json.loads((output / "attack.json").read_text())
    assert [entry["eps"] for entry in summary["results"]] == [4 / 255, 0.03]
    assert summary["params"]["detector"]["name"] == "knn"

    assert main(["attack", str(config), "--eps", "four", "-o", str(tmp_path / "bad")]) == 1
    error = capsys.readouterr().err.strip()
    assert error == "error: eps must be a number such as 4/255 or 0.0157, got 'four'"
    assert not (tmp_path / "bad").exists()
    assert main(["attack", str(config), "--method", "fgsm"]) == 1
    assert "fgsm" in capsys.readouterr().err


def test_l2_pgd_keeps_its_budget_on_the_saved_pngs(
    spec: BenchmarkSpec, shared_cache: Path, tmp_path: Path
) -> None:
    eps = 0.5
    run = run_attack(
        spec,
        tmp_path / "l2",
        eps=(eps,),
        norm="l2",
        steps=3,
        n=4,
        batch_size=4,
        device="cpu",
        cache_root=shared_cache,
    )
    (entry,) = run.summary["results"]
    assert entry["method"] == "pgd-l2" and entry["norm"] == "l2"
    for image in run.summary["images"]:
        clean = load_attack_images([run.output_dir / image["clean_png"]]).double()
        (attack,) = image["attacks"]
        adversarial = load_attack_images([run.output_dir / attack["adversarial_png"]]).double()
        assert float((adversarial - clean).norm()) <= eps + 1e-6
        assert attack["l2"] <= eps + 1e-6
    assert entry["attacked_auroc"] < entry["clean_auroc"]


def test_pgd_through_a_tiny_clip_and_mcm(
    spec: BenchmarkSpec, tiny_openclip: str, shared_cache: Path, tmp_path: Path
) -> None:
    """The real CLIP path: pre-projection features, the projection and MCM's text embeddings."""
    run = run_attack(
        spec,
        tmp_path / "clip",
        encoder=tiny_openclip,
        detector="mcm",
        eps=(8 / 255,),
        steps=3,
        n=4,
        batch_size=2,
        device="cpu",
        cache_root=shared_cache,
    )
    assert run.summary["params"]["encoder"] == tiny_openclip
    assert run.summary["params"]["detector"]["name"] == "mcm"
    (entry,) = run.summary["results"]
    assert entry["class_score_svm"] is None  # the image tower of CLIP has no logits
    for image in run.summary["images"]:
        (attack,) = image["attacks"]
        assert attack["float_attacked_score"] >= attack["float_clean_score"]
    assert np.mean([image["attacks"][0]["score_raised"] for image in run.summary["images"]]) > 0


def test_cli_choices_are_the_librarys() -> None:
    from oodprobe import attack_run, cli

    assert cli.ATTACK_METHODS == attack_run.METHODS
    assert cli.ATTACK_TARGETS == attack_run.TARGET_MODES
    assert cli.ATTACK_SMOOTHNESS == attack_run.SMOOTHNESS_NAMES


def test_nearest_targets_are_the_closest_training_images(
    spec: BenchmarkSpec, shared_cache: Path, tmp_path: Path
) -> None:
    options: dict[str, Any] = {
        "method": "feature-matching",
        "steps": 1,
        "n": 4,
        "batch_size": 4,
        "device": "cpu",
        "cache_root": shared_cache,
    }
    nearest = run_attack(spec, tmp_path / "nearest", targets="nearest", **options)
    chosen = run_attack(spec, tmp_path / "random", targets="random", **options)
    assert nearest.summary["params"]["targets"] == "nearest"
    for close, other in zip(nearest.summary["images"], chosen.summary["images"], strict=True):
        # the nearest target has the highest cosine of all training images to the clean image
        assert close["attacks"][0]["clean_cosine"] >= other["attacks"][0]["clean_cosine"] - 1e-4
    assert [image["target_index"] for image in nearest.summary["images"]] != [
        image["target_index"] for image in chosen.summary["images"]
    ]


def test_svm_transfer_across_attack_kinds(
    whole: Any, spec: BenchmarkSpec, shared_cache: Path, tmp_path: Path, capsys: Any
) -> None:
    """Fitted on each attack, tested on each: the diagonal is each run's own held-out AUROC."""
    from oodprobe.attack_run import class_score_svm_transfer
    from oodprobe.cli import main

    matching = run_attack(
        spec,
        tmp_path / "fm",
        method="feature-matching",
        steps=3,
        lr=1e-2,
        n=8,
        batch_size=4,
        device="cpu",
        cache_root=shared_cache,
    )
    result = class_score_svm_transfer([whole.output_dir, matching.output_dir], tmp_path / "svm")
    names = result["attacks"]
    assert names == ["pgd-linf eps 4/255", "pgd-linf eps 8/255", "feature-matching"]
    cells = {(cell["fit"], cell["test"]): cell["auroc"] for cell in result["cells"]}
    assert len(cells) == 9
    own = [entry["class_score_svm"]["auroc"] for entry in whole.results + matching.results]
    assert [cells[(name, name)] for name in names] == pytest.approx(own, abs=1e-12)
    # the budgets' cross cells are the run's own across-budget table
    for cell in whole.summary["class_score_svm_across_budgets"]:
        fit = f"pgd-linf eps {cell['fit_eps'] * 255:.3g}/255"
        test = f"pgd-linf eps {cell['test_eps'] * 255:.3g}/255"
        assert cells[(fit, test)] == pytest.approx(cell["auroc"], abs=1e-12)
    written = json.loads((tmp_path / "svm" / "svm_transfer.json").read_text())
    assert written["cells"] == result["cells"]

    assert main(["attack-svm", str(whole.output_dir), str(matching.output_dir)]) == 0
    assert "feature-matching" in capsys.readouterr().out
    other = run_attack(
        spec,
        tmp_path / "n4",
        eps=(4 / 255,),
        steps=1,
        n=4,
        batch_size=4,
        device="cpu",
        cache_root=shared_cache,
    )
    with pytest.raises(InvalidParameterError, match=r"other images.*\(n: 4 vs 8\)"):
        class_score_svm_transfer([whole.output_dir, other.output_dir])
    assert main(["attack-svm", str(tmp_path / "nothing")]) == 1
    assert "holds no finished attack run" in capsys.readouterr().err


def test_pgd_on_a_post_hoc_detector_and_an_ensemble(
    spec: BenchmarkSpec, shared_cache: Path, tmp_path: Path
) -> None:
    """The runner's head (Lite0's ImageNet head, from the cached features) and an ensemble's
    members reach PGD; every reported success raised the attacked detector's own score."""
    options: dict[str, Any] = {
        "eps": (8 / 255,),
        "steps": 3,
        "n": 4,
        "batch_size": 4,
        "device": "cpu",
        "cache_root": shared_cache,
    }
    for detector in ("react", 'score-ensemble:members=["knn","deep-knn:k=5"]'):
        run = run_attack(spec, tmp_path / str(len(detector)), detector=detector, **options)
        assert run.summary["params"]["detector"]["name"] == detector.partition(":")[0]
        for image in run.summary["images"]:
            (attack,) = image["attacks"]
            assert attack["float_attacked_score"] >= attack["float_clean_score"]
        assert any(image["attacks"][0]["score_raised"] for image in run.summary["images"])
    with pytest.raises(InvalidParameterError, match="no differentiable score"):
        run_attack(
            spec, tmp_path / "lof", detector='score-ensemble:members=["knn","lof"]', **options
        )
    assert not (tmp_path / "lof").exists()
