"""oodprobe study: fit statistics against scipy, the spec, and a real run over encoder blocks."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from oodprobe.benchmark_spec import (
    BenchmarkSpec,
    DataSpec,
    DetectorSpec,
    StudySpec,
    spec_from_dict,
    validate,
)
from oodprobe.errors import InvalidParameterError, OodprobeError
from oodprobe.study import fit_statistics, lp_vs_ft, ood_targets, rank_models, study_spec

# --------------------------------------------------------------------------------------------
# fit statistics: the reference is scipy.stats on the same points


def test_fit_matches_scipy_linregress_pearson_and_spearman() -> None:
    rng = np.random.default_rng(3)
    accuracy = rng.uniform(0.5, 0.95, 9)
    auroc = 0.4 + 0.5 * accuracy + rng.normal(0, 0.03, 9)
    fit = fit_statistics(accuracy, auroc, bootstrap=0)
    line = stats.linregress(accuracy, auroc)
    assert fit["n_models"] == 9
    assert fit["slope"] == pytest.approx(line.slope, rel=1e-12)
    assert fit["intercept"] == pytest.approx(line.intercept, rel=1e-12)
    assert fit["r2"] == pytest.approx(line.rvalue**2, rel=1e-12)
    assert fit["pearson"] == pytest.approx(stats.pearsonr(accuracy, auroc).statistic, rel=1e-12)
    assert fit["spearman"] == pytest.approx(stats.spearmanr(accuracy, auroc).statistic, rel=1e-12)
    assert fit["slope_ci"] is None and fit["band"] is None


def test_bootstrap_intervals_are_percentiles_of_refits_on_resampled_models() -> None:
    rng = np.random.default_rng(0)
    accuracy = rng.uniform(0.5, 0.95, 8)
    auroc = 0.3 + 0.6 * accuracy + rng.normal(0, 0.02, 8)
    fit = fit_statistics(accuracy, auroc, bootstrap=300, confidence=0.9, seed=7)
    # the same resamples, refitted one by one with scipy
    picks = np.random.default_rng(7).integers(0, 8, size=(300, 8))
    slopes, r2s, spearmans = [], [], []
    for pick in picks:
        x, y = accuracy[pick], auroc[pick]
        if np.ptp(x) == 0:
            continue
        line = stats.linregress(x, y)
        slopes.append(line.slope)
        r2s.append(line.rvalue**2)
        spearmans.append(stats.spearmanr(x, y).statistic)
    assert fit["n_bootstrap_used"] == len(slopes)
    assert fit["slope_ci"] == pytest.approx(np.percentile(slopes, [5, 95]), rel=1e-9)
    assert fit["r2_ci"] == pytest.approx(np.percentile(r2s, [5, 95]), rel=1e-9)
    spearmans_finite = np.asarray(spearmans)[np.isfinite(spearmans)]
    assert fit["spearman_ci"] == pytest.approx(np.percentile(spearmans_finite, [5, 95]), rel=1e-9)
    low, high = fit["slope_ci"]
    assert low < fit["slope"] < high
    band = fit["band"]
    assert len(band["x"]) == len(band["low"]) == len(band["high"])
    assert band["x"][0] == pytest.approx(accuracy.min()) and band["x"][-1] == pytest.approx(
        accuracy.max()
    )
    fitted = fit["intercept"] + fit["slope"] * np.asarray(band["x"])
    assert np.all(np.asarray(band["low"]) <= fitted + 1e-12)
    assert np.all(fitted <= np.asarray(band["high"]) + 1e-12)


def test_perfect_line_has_r2_one_and_too_few_models_have_no_statistics() -> None:
    fit = fit_statistics([0.5, 0.6, 0.7, 0.8], [0.6, 0.65, 0.7, 0.75], bootstrap=50)
    assert fit["slope"] == pytest.approx(0.5) and fit["r2"] == pytest.approx(1.0)
    assert fit["spearman"] == pytest.approx(1.0)
    two = fit_statistics([0.5, 0.6], [0.6, 0.7], bootstrap=50)
    assert two["r2"] is None and "at least 3 models" in two["note"]
    flat = fit_statistics([0.5, 0.5, 0.5], [0.6, 0.7, 0.8], bootstrap=50)
    assert flat["slope"] is None and "same accuracy" in flat["note"]
    constant = fit_statistics([0.5, 0.6, 0.7], [0.8, 0.8, 0.8], bootstrap=50)
    assert constant["slope"] == 0 and constant["pearson"] is None and constant["note"]
    json.dumps(constant)  # every value is JSON-able


# --------------------------------------------------------------------------------------------
# the study's spec


def _spec(**changes: object) -> BenchmarkSpec:
    return validate(
        replace(
            BenchmarkSpec(
                name="tiny",
                id_train=DataSpec("digits:train", classes=(0, 1, 2), limit=60),
                id_test=DataSpec("digits:test", classes=(0, 1, 2), limit=30),
                ood=(
                    DataSpec("digits:test", classes=(7, 8), limit=30, name="near", group="near"),
                    DataSpec("skimage-textures", name="textures", group="far"),
                ),
                encoders=("efficientnet-lite0@64",),
                detectors=(DetectorSpec("mahalanobis"),),
                bootstrap=0,
            ),
            **changes,  # type: ignore[arg-type]
        )
    )


def test_study_spec_adds_the_label_free_knn_first_and_needs_two_encoders() -> None:
    spec = study_spec(_spec(), ["efficientnet-lite0@64", "efficientnet-lite1@64"])
    assert [d.display for d in spec.detectors] == ["knn", "mahalanobis"]
    assert spec.encoders == ("efficientnet-lite0@64", "efficientnet-lite1@64")
    with pytest.raises(InvalidParameterError, match="at least two"):
        study_spec(_spec())
    kept = study_spec(
        _spec(detectors=(DetectorSpec("mahalanobis"), DetectorSpec("knn"))),
        ["efficientnet-lite0@64", "efficientnet-lite1@64"],
    )
    assert [d.display for d in kept.detectors] == ["mahalanobis", "knn"]  # already there


def test_study_table_of_the_toml_is_read_and_checked() -> None:
    config = {
        "id": {"train": "digits:train", "test": "digits:test"},
        "ood": [{"source": "skimage-textures"}],
        "study": {"encoders": ["efficientnet-lite0@64", "efficientnet-lite1@64"], "bootstrap": 10},
    }
    spec = spec_from_dict(config)
    assert spec.study == StudySpec(("efficientnet-lite0@64", "efficientnet-lite1@64"), 10, 0.95)
    assert study_spec(spec).encoders == spec.study.encoders
    for study, message in (
        ({"encoders": ["nope:x", "efficientnet-lite0"]}, "unknown encoder"),
        ({"bootstrap": -1}, "bootstrap must be an integer >= 0, got -1"),
        ({"confidence": 1.5}, "confidence must be a number in"),
        ({"models": []}, "unknown key 'models' in \\[study\\]"),
        ({"encoders": ["efficientnet-lite0", "efficientnet-lite0"]}, "must be unique"),
    ):
        with pytest.raises(OodprobeError, match=message):
            spec_from_dict({**config, "study": study})


def test_targets_rank_and_lp_vs_ft_tables() -> None:
    spec = _spec()
    assert ood_targets(spec) == [
        ("near", ["near"]),
        ("textures", ["textures"]),
        ("mean", ["near", "textures"]),  # a group of one set has no mean of its own
    ]
    two_far = replace(spec, ood=(*spec.ood, DataSpec("digits:test", limit=9, name="d")))
    assert [label for label, _ in ood_targets(two_far)] == [
        "near",
        "textures",
        "d",
        "far mean",
        "mean",
    ]
    assert ood_targets(two_far)[3] == ("far mean", ["textures", "d"])

    def model(name: str, acc: float, auroc: float, base: str | None = None) -> dict[str, object]:
        return {
            "encoder": name,
            "base": base,
            "knn_accuracy": acc,
            "probe_accuracy": acc + 0.01,
            "head_accuracy": acc + 0.02 if base else None,
            "auroc": {"knn": {"mean": auroc}},
            "fpr": {"knn": {"mean": 1 - auroc}},
        }

    models = [model("a", 0.7, 0.8), model("b", 0.9, 0.85), model("ft", 0.95, 0.75, base="b")]
    ranking = rank_models(models, "knn", "mean")  # type: ignore[arg-type]
    assert [r["encoder"] for r in ranking] == ["b", "a", "ft"]
    assert [r["rank"] for r in ranking] == [1, 2, 3]
    (row,) = lp_vs_ft(models, ["knn"])  # type: ignore[arg-type]
    assert row["base"] == "b" and row["finetuned"] == "ft"
    assert row["lp_accuracy"] == pytest.approx(0.91) and row["ft_accuracy"] == pytest.approx(0.97)
    assert row["lp_auroc"] == 0.85 and row["ft_auroc"] == 0.75
    assert math.isclose(row["lp_fpr"], 0.15) and math.isclose(row["ft_fpr"], 0.25)


# --------------------------------------------------------------------------------------------
# a real study: blocks of EfficientNet-Lite0 (real weights) on Fashion-MNIST, one forward pass

DEPTHS = ("efficientnet-lite0/block2@64", "efficientnet-lite0/block8@64", "efficientnet-lite0@64")


@pytest.fixture(scope="module")
def real_study(tmp_path_factory: pytest.TempPathFactory) -> object:
    from oodprobe.study import run_study

    root = tmp_path_factory.mktemp("study")
    spec = validate(
        BenchmarkSpec(
            name="depth",
            id_train=DataSpec("fashion-mnist:train", classes=(0, 1, 2, 3, 4), per_class=40),
            id_test=DataSpec("fashion-mnist:test", classes=(0, 1, 2, 3, 4), per_class=30),
            ood=(
                DataSpec(
                    "fashion-mnist:test",
                    classes=(5, 6, 7, 8, 9),
                    per_class=20,
                    name="fashion 5-9",
                    group="near",
                ),
                DataSpec("skimage-textures", name="textures", group="far", limit=60),
            ),
            encoders=DEPTHS,
            detectors=(DetectorSpec("deep-knn", {"k": 5}, "deep"),),
            bootstrap=0,
            gallery_size=0,
            study=StudySpec(bootstrap=200),
        )
    )
    logs: list[str] = []
    result = run_study(
        spec, root / "out", cache_root=root / "cache", progress=False, log=logs.append
    )
    return result, logs, root


def test_real_study_fits_equal_scipy_and_deeper_blocks_classify_better(real_study: object) -> None:
    result, logs, _ = real_study  # type: ignore[misc]
    study = result.study
    models = {model["encoder"]: model for model in study["models"]}
    assert list(models) == list(DEPTHS)
    # one forward pass served the three depths
    assert {model["shared_pass"] for model in models.values()} == {"efficientnet-lite0@64"}
    assert sum("loading" in line for line in logs) == 1
    accuracy = [models[name]["knn_accuracy"] for name in DEPTHS]
    # the early block classifies worse than both deeper ones (the middle and the final features
    # can tie or swap: on the offline study Lite0's block 11 beats its final features)
    assert accuracy[0] + 0.05 < min(accuracy[1:]), accuracy
    assert all(models[name]["probe_accuracy"] is not None for name in DEPTHS)  # probe added
    assert study["detectors"] == ["knn", "deep", "linear-probe"]
    fits = {(f["detector"], f["target"], f["accuracy"]): f for f in study["fits"]}
    for target in ("fashion 5-9", "textures", "mean"):
        fit = fits[("knn", target, "knn")]
        x = [p["accuracy"] for p in fit["points"]]
        y = [p["auroc"] for p in fit["points"]]
        assert x == accuracy
        assert y == [models[name]["auroc"]["knn"][target] for name in DEPTHS]
        line = stats.linregress(x, y)
        assert fit["slope"] == pytest.approx(line.slope, rel=1e-10)
        assert fit["intercept"] == pytest.approx(line.intercept, rel=1e-10, abs=1e-12)
        assert fit["r2"] == pytest.approx(line.rvalue**2, rel=1e-10)
        assert fit["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)
    # the AUROC of each model is the benchmark row's
    row = next(
        r
        for r in result.run.records
        if r["encoder"] == DEPTHS[1] and r["detector"] == "knn" and r["ood_set"] == "textures"
    )
    assert models[DEPTHS[1]]["auroc"]["knn"]["textures"] == row["auroc"]
    files = result.files
    document = json.loads(files["study_json"].read_text())
    assert [m["encoder"] for m in document["models"]] == list(DEPTHS)
    html = files["report"].read_text()
    assert "Study" in html and "R² =" in html
    assert len(files["study_csv"].read_text().strip().splitlines()) == 1 + len(DEPTHS)


def test_study_reruns_from_the_cache(real_study: object) -> None:
    from oodprobe.study import run_study

    result, _, root = real_study  # type: ignore[misc]
    logs: list[str] = []
    again = run_study(
        result.run.spec, root / "again", cache_root=root / "cache", progress=False, log=logs.append
    )
    assert sum("(cache)" in line for line in logs) == 4  # ID train, ID test, two OOD sets
    assert again.study["models"][0]["knn_accuracy"] == result.study["models"][0]["knn_accuracy"]


def test_cli_study_runs_a_config_with_encoders_and_prints_the_fit(
    real_study: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from oodprobe.cli import main

    _, _, root = real_study  # type: ignore[misc]
    config = tmp_path / "study.toml"
    config.write_text(
        """
name = "cli-study"
[id]
train = { source = "fashion-mnist:train", classes = [0, 1, 2, 3, 4], per_class = 40 }
test = { source = "fashion-mnist:test", classes = [0, 1, 2, 3, 4], per_class = 30 }
[[ood]]
source = "fashion-mnist:test"
classes = [5, 6, 7, 8, 9]
per_class = 20
name = "fashion 5-9"
group = "near"
[study]
bootstrap = 50
"""
    )
    code = main(
        [
            "study",
            str(config),
            *(option for name in DEPTHS for option in ("-e", name)),
            "-o",
            str(tmp_path / "out"),
            "--cache-dir",
            str(root / "cache"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "models ranked by" in out and "efficientnet-lite0/block8@64" in out
    assert "R²" in out
    document = json.loads((tmp_path / "out" / "study.json").read_text())
    assert document["bootstrap"] == 50 and len(document["models"]) == 3


def test_cli_study_refuses_one_encoder_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from oodprobe.cli import main

    code = main(["study", "--preset", "offline-default", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().startswith("error: a study compares encoders and needs at least two")
    assert not (tmp_path / "out").exists()


def test_study_sets_a_finetuned_encoder_beside_its_base_and_skips_what_blocks_cannot_serve(
    tmp_path: Path,
) -> None:
    """ID labels 5-9 (not 0..C-1): the head's accuracy maps its columns back to the labels."""
    from oodprobe.features import extract_features
    from oodprobe.finetune import FinetuneRecipe, finetune
    from oodprobe.study import run_study

    spec = validate(
        BenchmarkSpec(
            name="lp-ft",
            id_train=DataSpec("digits:train", classes=(5, 6, 7, 8, 9), per_class=8),
            id_test=DataSpec("digits:test", classes=(5, 6, 7, 8, 9), per_class=6),
            ood=(DataSpec("digits:test", classes=(0, 1, 2), per_class=6, name="0-2"),),
            encoders=("efficientnet-lite0@64",),
            detectors=(
                DetectorSpec("logits", {"score": "msp"}, "head msp"),
                DetectorSpec("linear-probe", {"epochs": 5}, "probe"),
            ),
            bootstrap=0,
            gallery_size=0,
        )
    )
    folder = tmp_path / "ft"
    recipe = FinetuneRecipe(epochs=2, batch_size=8, lr=1e-3, ema_decay=0.0)
    finetune("efficientnet-lite0@64", spec.id_train.create(), folder, recipe=recipe, progress=False)
    finetuned = f"finetuned:{folder}"
    names = ["efficientnet-lite0@64", "efficientnet-lite0/block8@64", finetuned]
    logs: list[str] = []
    result = run_study(
        spec,
        tmp_path / "out",
        encoders=names,
        cache_root=tmp_path / "c",
        progress=False,
        log=logs.append,
    )
    study = result.study
    models = {model["encoder"]: model for model in study["models"]}
    # reference: the fine-tuned head's argmax, mapped to the labels it was trained on (5..9)
    test = extract_features(spec.id_test.create(), finetuned, cache_root=tmp_path / "c")
    assert test.logits is not None and test.labels is not None
    expected = np.mean(np.array([5, 6, 7, 8, 9])[test.logits.argmax(axis=1)] == test.labels)
    assert models[finetuned]["head_accuracy"] == pytest.approx(expected)
    assert models[finetuned]["head_accuracy"] > 0
    assert models[finetuned]["base"] == "efficientnet-lite0@64"
    assert study["fit_excludes"] == [finetuned]
    assert all(p["encoder"] != finetuned for fit in study["fits"] for p in fit["points"])
    # the head's logits cannot be scored on block 8: left out there, kept elsewhere
    assert any("head msp: not applicable" in line for line in logs)
    assert models["efficientnet-lite0/block8@64"]["auroc"]["head msp"]["0-2"] is None
    assert models["efficientnet-lite0@64"]["auroc"]["head msp"]["0-2"] is not None
    table = {row["detector"]: row for row in study["lp_vs_ft"]}
    headline = table["MSP (LP: probe, FT: head msp)"]
    assert headline["lp_accuracy"] == models["efficientnet-lite0@64"]["probe_accuracy"]
    assert headline["ft_accuracy"] == models[finetuned]["head_accuracy"]
    assert headline["lp_auroc"] == models["efficientnet-lite0@64"]["auroc"]["probe"]["mean"]
    assert headline["ft_auroc"] == models[finetuned]["auroc"]["head msp"]["mean"]
    # rows name each encoder by its own cache id, shared pass or not
    from oodprobe.encoders import create_encoder

    ids = {row["encoder"]: row["encoder_cache_id"] for row in result.run.records}
    assert (
        ids["efficientnet-lite0/block8@64"]
        == create_encoder("efficientnet-lite0/block8@64").cache_id
    )
    assert ids["efficientnet-lite0@64"] == create_encoder("efficientnet-lite0@64").cache_id


def test_study_refuses_before_any_work_what_it_cannot_measure(tmp_path: Path) -> None:
    from oodprobe.study import run_study

    with pytest.raises(InvalidParameterError, match="are both 'efficientnet-lite0'"):
        study_spec(_spec(), ["efficientnet-lite0", "efficientnet-lite0@224"])
    with pytest.raises(OodprobeError, match="no fine-tuned model folder"):
        study_spec(_spec(), ["efficientnet-lite0@64", f"finetuned:{tmp_path / 'none'}"])
    few = replace(_spec(), id_train=DataSpec("digits:train", classes=(0, 1, 2), limit=12))
    cache = tmp_path / "cache"
    with pytest.raises(OodprobeError, match="has 12 images; give it at least 20"):
        run_study(
            few,
            tmp_path / "out",
            encoders=["efficientnet-lite0@64", "efficientnet-lite0/block4@64"],
            cache_root=cache,
            progress=False,
        )
    flat = tmp_path / "flat"
    flat.mkdir()
    for index in range(25):
        Image.fromarray(np.full((16, 16, 3), index * 10, np.uint8)).save(flat / f"{index}.png")
    unlabelled = replace(_spec(), id_train=DataSpec(str(flat)))
    with pytest.raises(OodprobeError, match="has no labels"):
        run_study(
            unlabelled,
            tmp_path / "out",
            encoders=["efficientnet-lite0@64", "efficientnet-lite0/block4@64"],
            cache_root=cache,
            progress=False,
        )
    assert not cache.exists()  # nothing was extracted
    with pytest.raises(InvalidParameterError, match="bootstrap must be at most 100000"):
        validate(replace(_spec(), study=StudySpec(bootstrap=10**9)))


def test_each_encoder_of_a_shared_pass_has_the_cache_entry_bench_reads(real_study: object) -> None:
    from oodprobe.features import extract_features

    result, _, root = real_study  # type: ignore[misc]
    cache = root / "cache"
    # one entry per encoder and data set, none left by the shared pass itself
    entries = [p for p in (cache / "features").glob("*/*") if (p / "meta.json").exists()]
    assert len(entries) == len(DEPTHS) * 4
    id_train = result.run.spec.id_train.create()
    for name in DEPTHS:
        alone = extract_features(id_train, name, cache_root=cache, progress=False)
        assert alone.from_cache, name
        assert alone.arrays.keys() == (
            {"features", "logits"} if name == DEPTHS[-1] else {"features"}
        )
    # the arrays are those of a standalone extraction, bit for bit
    fresh = extract_features(id_train, DEPTHS[1], use_cache=False, progress=False)
    cached = extract_features(id_train, DEPTHS[1], cache_root=cache, progress=False)
    assert np.array_equal(fresh.features, cached.features)


def test_a_shared_pass_splits_skip_records_and_shards_like_separate_extractions(
    tmp_path: Path,
) -> None:
    from oodprobe.data import create_dataset
    from oodprobe.encoders import create_shared_encoder
    from oodprobe.features import extract_features, extract_shared_features

    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for index in range(7):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / label / f"{index}.png")
    (folder / "b" / "broken.png").write_bytes(b"not an image")
    dataset = create_dataset(str(folder))
    names = ["efficientnet-lite0/block3@32", "efficientnet-lite0@32"]
    shared, outputs = create_shared_encoder(names)
    split = extract_shared_features(
        dataset, shared, outputs, cache_root=tmp_path / "c", shard_size=4, progress=False
    )
    for name in names:
        alone = extract_features(
            dataset, name, cache_root=tmp_path / "alone", shard_size=4, progress=False
        )
        assert split[name].skipped == alone.skipped and len(alone.skipped) == 1
        assert np.array_equal(split[name].indices, alone.indices)
        assert split[name].arrays.keys() == alone.arrays.keys()
        for key in alone.arrays:
            assert np.array_equal(split[name].arrays[key], alone.arrays[key]), (name, key)
        again = extract_features(dataset, name, cache_root=tmp_path / "c", shard_size=4)
        assert again.from_cache and again.skipped == alone.skipped


def test_encoders_whose_score_folders_would_collide_are_refused(tmp_path: Path) -> None:
    from oodprobe.finetune import FinetuneRecipe, finetune

    recipe = FinetuneRecipe(epochs=1, batch_size=8, ema_decay=0.0)
    dataset = DataSpec("digits:train", classes=(0, 1), per_class=4).create()
    for folder in ("runs/a", "runs_a"):
        finetune("efficientnet-lite0@32", dataset, tmp_path / folder, recipe=recipe, progress=False)
    names = [f"finetuned:{tmp_path}/runs/a", f"finetuned:{tmp_path}/runs_a"]
    with pytest.raises(InvalidParameterError, match="must differ also as file names"):
        study_spec(_spec(), names)
