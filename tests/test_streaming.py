"""Streamed fitting and scoring: partial_fit, memory-mapped inputs, the memory budget."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import numpy.typing as npt
import pytest

from oodprobe.arrays import (
    budget_rows,
    check_features,
    current_memory_budget,
    is_memory_mapped,
    memory_budget,
    parse_memory_budget,
    release_pages,
    row_blocks,
)
from oodprobe.detectors.gaussian import (
    GaussianDetector,
    MahalanobisDetector,
    RelativeMahalanobisDetector,
)
from oodprobe.errors import InvalidParameterError

F64 = npt.NDArray[np.float64]


def _weights(n_classes: int) -> F64:
    weights = np.arange(1, n_classes + 1, dtype=np.float64)
    return weights / weights.sum()


def _data(n: int = 600, dims: int = 6, n_classes: int = 4, seed: int = 0) -> tuple[F64, F64]:
    """Features with a large common offset and unequal class sizes (1/n vs 1/(n-1) matter)."""
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.choice(n_classes, size=n, p=_weights(n_classes)))
    centres = rng.normal(size=(n_classes, dims)) * 3 + 50.0
    scales = rng.uniform(0.5, 2.0, size=(dims,))
    features = centres[labels] + rng.normal(size=(n, dims)) * scales
    return features, labels


def _reference(features: F64, labels: F64, queries: F64, name: str) -> F64:
    """The authors' formulas (PAPER.md) with np.cov and np.linalg.inv, float64."""
    classes = np.unique(labels)
    means = np.array([features[labels == c].mean(axis=0) for c in classes])
    shared = np.mean([np.cov(features[labels == c], rowvar=False) for c in classes], axis=0)
    precision = np.linalg.inv(shared)
    centred = queries[:, None, :] - means[None]
    class_md = np.einsum("ncd,de,nce->nc", centred, precision, centred)
    if name == "mahalanobis":
        return -class_md.min(axis=1)
    mean = features.mean(axis=0)
    background = np.linalg.inv(np.cov(features, rowvar=False))
    offset = queries - mean
    md0 = np.einsum("nd,de,ne->n", offset, background, offset)
    if name == "relative-mahalanobis":
        return -(class_md - md0[:, None]).min(axis=1)
    return -md0


DETECTORS = {
    "gaussian": GaussianDetector,
    "mahalanobis": MahalanobisDetector,
    "relative-mahalanobis": RelativeMahalanobisDetector,
}
# uneven chunk boundaries; the data are sorted by class, so early chunks miss the late classes
# and late chunks the early ones; a chunk of one row too
BOUNDS = [0, 7, 8, 150, 151, 333, 480, 600]


@pytest.mark.parametrize("name", sorted(DETECTORS))
@pytest.mark.parametrize("declared", [False, True])
def test_partial_fit_equals_fit_and_the_reference(name: str, declared: bool) -> None:
    features, labels = _data()
    queries = np.random.default_rng(1).normal(size=(50, 6)) * 4 + 50.0
    whole = DETECTORS[name]().fit(features, labels)
    streamed = DETECTORS[name]()
    counts = dict(zip(*np.unique(labels, return_counts=True), strict=True))
    for start, stop in itertools.pairwise(BOUNDS):
        chunk_labels = labels[start:stop]
        assert declared or name == "gaussian" or len(np.unique(chunk_labels)) < 4
        streamed.partial_fit(
            features[start:stop],
            chunk_labels,
            class_counts=counts if declared and start == 0 and name != "gaussian" else None,
        )
    reference = _reference(features, labels, queries, name)
    for detector in (whole, streamed):
        np.testing.assert_allclose(detector.score_samples(queries), reference, rtol=1e-9)
    np.testing.assert_allclose(
        streamed.score_samples(queries), whole.score_samples(queries), rtol=1e-9
    )
    if name != "gaussian":
        np.testing.assert_allclose(streamed.class_means_, whole.class_means_, rtol=1e-12)
        np.testing.assert_array_equal(streamed.classes_, whole.classes_)


def test_partial_fit_continues_after_a_score_and_saves(tmp_path: Path) -> None:
    from oodprobe.detectors import load_detector

    features, labels = _data()
    detector = MahalanobisDetector()
    detector.partial_fit(features[:300], labels[:300])
    first = detector.score_samples(features[:5])  # finalises what it has so far
    detector.partial_fit(features[300:], labels[300:])
    whole = MahalanobisDetector().fit(features, labels)
    assert not np.allclose(first, whole.score_samples(features[:5]))
    loaded = load_detector(detector.save(tmp_path / "streamed.safetensors"))
    np.testing.assert_allclose(
        loaded.score_samples(features), whole.score_samples(features), rtol=1e-9
    )


def test_partial_fit_errors() -> None:
    features, labels = _data()
    counts = dict(zip(*np.unique(labels, return_counts=True), strict=True))
    detector = MahalanobisDetector().partial_fit(features[:10], labels[:10])
    with pytest.raises(InvalidParameterError, match="class_counts is taken on the first call"):
        detector.partial_fit(features[10:20], labels[10:20], class_counts=counts)
    with pytest.raises(InvalidParameterError, match="has 5 dimensions but the detector"):
        detector.partial_fit(features[10:20, :5], labels[10:20])
    declared = MahalanobisDetector().partial_fit(
        features[:10], labels[:10], class_counts={0: 5, 1: 5}
    )
    with pytest.raises(InvalidParameterError, match="class 2 is not in the class_counts"):
        declared.partial_fit(features[-10:], np.full(10, 2))
    short = MahalanobisDetector().partial_fit(features, labels, class_counts={**counts, 0: 1000})
    with pytest.raises(InvalidParameterError, match=r"declared 1000 samples of class 0 but"):
        short.score_samples(features[:3])
    with pytest.raises(InvalidParameterError, match="class_counts must map labels"):
        MahalanobisDetector().partial_fit(features, labels, class_counts={0: 0})
    with pytest.raises(InvalidParameterError, match="needs class labels"):
        MahalanobisDetector().partial_fit(features)
    wide = np.random.default_rng(0).normal(size=(20, 1100))
    with (
        memory_budget("64MiB"),
        pytest.raises(InvalidParameterError, match=r"10 classes need 0\.1 GiB.*class_counts"),
    ):
        MahalanobisDetector().partial_fit(wide, np.arange(20) % 10)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_fit_on_a_memmap_equals_fit_in_memory(tmp_path: Path, dtype: type) -> None:
    features, labels = _data(n=5000, dims=8, n_classes=5)
    features -= 50.0  # float16 and bf16 hold these values to ~3 digits; equality is exact
    path = tmp_path / "features.bin"
    stored = np.memmap(path, dtype=dtype, mode="w+", shape=features.shape)
    stored[:] = features.astype(dtype)
    stored.flush()
    mapped = np.memmap(path, dtype=dtype, mode="r", shape=features.shape)
    exact = np.asarray(mapped, dtype=np.float64)  # the stored values, in memory
    assert is_memory_mapped(mapped) and not is_memory_mapped(exact)
    for cls in DETECTORS.values():
        streamed, whole = cls().fit(mapped, labels), cls().fit(exact, labels)
        np.testing.assert_allclose(
            streamed.score_samples(mapped), whole.score_samples(exact), rtol=1e-12
        )


def test_memory_budget_parsing_and_block_rows() -> None:
    assert parse_memory_budget("4GiB") == 4 << 30
    assert parse_memory_budget("512 MB") == 512_000_000
    assert parse_memory_budget("1.5g") == 1_500_000_000
    assert parse_memory_budget(1 << 30) == 1 << 30
    assert parse_memory_budget(None) is None
    assert parse_memory_budget("none") is None
    message = "memory_budget must be a number of bytes or a size such as '4GiB'"
    for bad in ("4 parsecs", True, 2.5, "-1GB"):
        with pytest.raises(InvalidParameterError, match=re.escape(message)):
            parse_memory_budget(bad)
    with pytest.raises(InvalidParameterError, match="must be at least 64MiB, got '1MB'"):
        parse_memory_budget("1MB")
    assert current_memory_budget() is None
    assert budget_rows(1000, 4096) == 4096
    with memory_budget("64MiB"):
        assert current_memory_budget() == 64 << 20
        assert budget_rows(1 << 20, 4096) == 8  # 1/8 of 64 MiB in rows of 1 MiB
    assert current_memory_budget() is None


def test_memory_mapped_blocks_release_their_pages(tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil", reason="psutil measures the resident set")
    path = tmp_path / "big.bin"
    rows, dims = 100_000, 1024  # 400 MB of float32
    with open(path, "wb") as handle:
        block = np.ones((10_000, dims), dtype=np.float32)
        for _ in range(rows // 10_000):
            handle.write(block.tobytes())
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=(rows, dims))
    process = psutil.Process()
    before = process.memory_info().rss
    total = 0.0
    for part in row_blocks(rows, 10_000, release=mapped):
        total += float(mapped[part].sum())
    check_features(mapped)
    assert total == rows * dims
    assert process.memory_info().rss - before < 100 << 20  # not the file's 400 MB
    copy_on_write = np.memmap(path, dtype=np.float32, mode="c", shape=(rows, dims))
    copy_on_write[0, 0] = 5.0
    release_pages(copy_on_write)  # private pages hold the change: never released
    assert copy_on_write[0, 0] == 5.0 and not is_memory_mapped(copy_on_write)


def _mapped(path: Path, array: npt.NDArray[np.float32]) -> np.memmap:
    stored = np.memmap(path, dtype=np.float32, mode="w+", shape=array.shape)
    stored[:] = array
    stored.flush()
    return np.memmap(path, dtype=np.float32, mode="r", shape=array.shape)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_exact_search_over_a_mapped_train_equals_in_memory(tmp_path: Path, precision: str) -> None:
    from oodprobe.arrays import l2_normalize
    from oodprobe.detectors import search

    rng = np.random.default_rng(3)
    train = rng.normal(size=(40_000, 128)).astype(np.float32)
    train[30_000:30_050] = train[5:55]  # exact duplicates across shards: ties, the fallback
    train[20_000:20_010] = train[100]
    train = l2_normalize(train, dtype=np.float32)
    queries = l2_normalize(
        np.concatenate([train[:40], rng.normal(size=(300, 128))]), dtype=np.float64
    )
    mapped = _mapped(tmp_path / "train.f32", train)
    with memory_budget("64MiB"):  # shards of 16384 rows: 3 shards
        index = search.prepare_exact(mapped, precision)
        assert index.product is None and index.shard_rows == 16384
        found = search.exact_search(mapped, queries, 12, index=index)
    expected = search.exact_search(train, queries, 12, precision=precision)
    np.testing.assert_array_equal(found[1], expected[1])
    np.testing.assert_array_equal(found[0], expected[0])
    brute = queries @ train.astype(np.float64).T
    top = np.sort(brute, axis=1)[:, ::-1][:, :12]
    np.testing.assert_allclose(found[0], top, rtol=0, atol=1e-12)


def test_knn_keeps_a_large_id_set_on_disk_with_the_same_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from oodprobe.detectors.neighbors import DeepKNNDetector, KNNDetector

    rng = np.random.default_rng(4)
    train = rng.normal(size=(20_000, 256)).astype(np.float16)  # 20 MB normalised: > 64MiB / 4
    queries = rng.normal(size=(200, 256))
    for cls, params in ((KNNDetector, {"k": 5}), (DeepKNNDetector, {"k": 20})):
        whole = cls(**params).fit(train)
        with memory_budget("64MiB"):
            streamed = cls(**params).fit(
                _mapped(tmp_path / f"{cls.name}.f32", train.astype(np.float32))
            )
            assert is_memory_mapped(streamed.train_features_)
            scores = streamed.score_samples(queries)
        assert not is_memory_mapped(whole.train_features_)
        np.testing.assert_array_equal(scores, whole.score_samples(queries))
        np.testing.assert_array_equal(streamed.score_samples(queries), scores)  # no budget now
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(1 << 40, 1 << 40, 1 << 20))
    message = r"needs 0\.0 GiB in .*, which has 0\.0 GiB free; set OODPROBE_SCRATCH_DIR"
    with memory_budget("64MiB"), pytest.raises(InvalidParameterError, match=message):
        KNNDetector().fit(train)


@pytest.mark.parametrize("batch_size", [64, "full"])
def test_probe_trained_from_a_memmap_equals_in_memory(
    tmp_path: Path, batch_size: int | str
) -> None:
    from oodprobe.detectors.probe import train_linear_probe

    features, labels = _data(n=900, dims=16, n_classes=3, seed=5)
    features = (features - 50.0).astype(np.float16)
    path = tmp_path / "probe.f16"
    stored = np.memmap(path, dtype=np.float16, mode="w+", shape=features.shape)
    stored[:] = features
    stored.flush()
    mapped = np.memmap(path, dtype=np.float16, mode="r", shape=features.shape)
    recipe = {
        "epochs": 3,
        "batch_size": batch_size,
        "lr": 1e-2,
        "weight_decay": 1e-3,
        "warmup_fraction": 0.1,
        "seed": 42,
        "device": "cpu",
    }
    codes = labels.astype(np.int64)
    streamed = train_linear_probe(mapped, codes, 3, **recipe)
    # the in-memory paths: the whole set resident on the device, and gathered per batch
    resident = train_linear_probe(features.astype(np.float32), codes, 3, **recipe)
    gathered = train_linear_probe(features, codes, 3, resident_bytes=0, **recipe)
    for reference in (resident, gathered):
        for name in ("weight", "bias", "mean", "std"):
            np.testing.assert_allclose(streamed[name], reference[name], rtol=1e-5, atol=1e-6)
    for name in ("weight", "bias"):  # the same order and arithmetic as the gathered path
        np.testing.assert_array_equal(streamed[name], gathered[name])


def test_plp_and_mcm_score_a_memmap(tmp_path: Path) -> None:
    from oodprobe.detectors.text import MCMDetector, PLPDetector

    rng = np.random.default_rng(6)
    embeddings = rng.normal(size=(4, 16))
    features = (embeddings[rng.integers(0, 4, 800)] + rng.normal(size=(800, 16)) * 0.5).astype(
        np.float32
    )
    mapped = _mapped(tmp_path / "plp.f32", features)
    for cls, params in ((PLPDetector, {"epochs": 2, "device": "cpu"}), (MCMDetector, {})):
        whole = cls(class_embeddings=embeddings, **params).fit(features)
        streamed = cls(class_embeddings=embeddings, **params).fit(mapped)
        np.testing.assert_allclose(
            streamed.score_samples(mapped), whole.score_samples(features), rtol=1e-6
        )


def test_bench_refuses_a_malformed_memory_budget_before_any_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from oodprobe.benchmark import run_benchmark
    from oodprobe.cli import main

    code = main(["bench", "--memory-budget", "3parsecs", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0
    assert "--memory-budget must be a number of bytes or a size such as '4GiB'" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(InvalidParameterError, match="memory_budget must be at least 64MiB"):
        run_benchmark(None, tmp_path / "out2", memory_budget="1MB")  # type: ignore[arg-type]
    assert not (tmp_path / "out2").exists()


def test_study_runs_under_its_memory_budget_and_refuses_a_bad_one_first(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``study --memory-budget`` reaches the fitting (the budget in force inside the run)."""
    from oodprobe import study
    from oodprobe.benchmark_spec import create_benchmark
    from oodprobe.cli import main
    from oodprobe.presets import DEFAULT_STUDY

    seen: list[int | None] = []

    def stop(*args: object, **kwargs: object) -> None:
        seen.append(current_memory_budget())
        raise InvalidParameterError("stopped before extraction")

    monkeypatch.setattr(study, "execute_benchmark", stop)
    with pytest.raises(InvalidParameterError, match="stopped"):
        study.run_study(create_benchmark(DEFAULT_STUDY), tmp_path / "out", memory_budget="256MiB")
    assert seen == [256 << 20] and current_memory_budget() is None
    code = main(["study", "--memory-budget", "3parsecs", "--output", str(tmp_path / "cli")])
    assert code != 0
    assert "--memory-budget must be a number of bytes" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()
