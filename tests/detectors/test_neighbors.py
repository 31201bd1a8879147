"""k-NN detectors, the search code and the k-NN classifier against brute force and sklearn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from oodprobe.arrays import l2_normalize
from oodprobe.detectors import load_detector, search
from oodprobe.detectors.neighbors import (
    DeepKNNDetector,
    KNNDetector,
    knn_accuracy,
    knn_classify,
)
from oodprobe.errors import InvalidParameterError

from .conftest import ClusterData


def unit(features: np.ndarray) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def random_features() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.normal(size=(3000, 24)).astype(np.float32), rng.normal(size=(300, 24)).astype(
        np.float32
    )


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """3 train blocks of 1000 (15 groups of 64 + a tail of 40) and query blocks of 65 rows."""
    monkeypatch.setattr(search, "_MAX_TRAIN_BLOCK", 1000)
    monkeypatch.setattr(search, "_BLOCK_ELEMENTS", 65 * 1000)


@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_exact_search_equals_brute_force_across_blocks(
    random_features: tuple[np.ndarray, np.ndarray], small_blocks: None, k: int
) -> None:
    train, queries = (l2_normalize(array, dtype=np.float32) for array in random_features)
    values, indices = search.exact_search(train, queries, k)  # k 1, 3: group prefilter
    brute = queries.astype(np.float64) @ train.T.astype(np.float64)
    expected = -np.sort(-brute, axis=1)[:, :k]
    np.testing.assert_allclose(values, expected, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(brute, indices, 1), expected, atol=1e-6)
    assert np.all(np.diff(values, axis=1) <= 0)  # sorted, nearest first


def test_knn_k1_is_the_max_cosine(random_features: tuple[np.ndarray, np.ndarray]) -> None:
    train, queries = random_features
    scores = KNNDetector(k=1).fit(train).score_samples(queries)
    np.testing.assert_allclose(scores, (unit(queries) @ unit(train).T).max(axis=1), atol=1e-12)


def test_knn_topk_is_the_mean_exp_cosine_over_temperature(
    random_features: tuple[np.ndarray, np.ndarray],
) -> None:
    train, queries = random_features
    cosines = -np.sort(-(unit(queries) @ unit(train).T), axis=1)[:, :7]
    expected = np.exp(cosines / 0.1).mean(axis=1)
    scores = KNNDetector(k=7, temperature=0.1).fit(train).score_samples(queries)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def test_deep_knn_is_minus_the_kth_distance_of_sklearn(
    random_features: tuple[np.ndarray, np.ndarray],
) -> None:
    train, queries = random_features
    distances, _ = NearestNeighbors(n_neighbors=20).fit(unit(train)).kneighbors(unit(queries))
    scores = DeepKNNDetector(k=20).fit(train).score_samples(queries)
    np.testing.assert_allclose(scores, -distances[:, -1], atol=1e-6)


def test_faiss_backends(random_features: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    train, queries = random_features
    exact = DeepKNNDetector(k=10).fit(train).score_samples(queries)
    flat = DeepKNNDetector(k=10, backend="faiss").fit(train).score_samples(queries)
    np.testing.assert_allclose(flat, exact, atol=1e-6)
    # IVF probing every list is exhaustive, hence exact
    ivf = DeepKNNDetector(k=10, backend="faiss-ivf", n_lists=8, n_probe=8).fit(train)
    np.testing.assert_allclose(ivf.score_samples(queries), exact, atol=1e-6)
    loaded = load_detector(ivf.save(tmp_path / "ivf.safetensors"))
    np.testing.assert_array_equal(loaded.score_samples(queries), ivf.score_samples(queries))
    hnsw = KNNDetector(k=1, backend="faiss-hnsw", ef_search=256).fit(train)
    exact_max = KNNDetector(k=1).fit(train).score_samples(queries)
    agreement = np.mean(np.isclose(hnsw.score_samples(queries), exact_max, atol=1e-9))
    assert agreement >= 0.95  # approximate: nearly every query finds its true nearest neighbour


def test_faiss_ivf_with_too_few_probed_neighbours_says_what_to_raise() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(400, 8)).astype(np.float32)
    detector = KNNDetector(k=300, backend="faiss-ivf", n_lists=10, n_probe=1).fit(train)
    with pytest.raises(InvalidParameterError, match="raise n_probe \\(now 1\\)"):
        detector.score_samples(train[:5])


@pytest.mark.parametrize("cls", [KNNDetector, DeepKNNDetector])
def test_torch_scores_match_and_gradients_flow(
    cls: type[KNNDetector] | type[DeepKNNDetector], cluster_data: ClusterData
) -> None:
    params = {"k": 3, "temperature": 0.5} if cls is KNNDetector else {"k": 3}
    detector = cls(**params).fit(cluster_data.train_features)
    queries = cluster_data.test_features[:6].astype(np.float64)
    features = torch.tensor(queries, requires_grad=True)
    scores = detector.score_samples_torch(features)
    np.testing.assert_allclose(scores.detach().numpy(), detector.score_samples(queries), atol=1e-12)
    scores.sum().backward()
    assert features.grad is not None and torch.all(features.grad.norm(dim=1) > 0)
    assert torch.autograd.gradcheck(
        detector.score_samples_torch, (features.detach().requires_grad_(),)
    )


def test_knn_classifier_is_perfect_on_separable_clusters(cluster_data: ClusterData) -> None:
    accuracy = knn_accuracy(
        cluster_data.train_features,
        cluster_data.train_labels,
        cluster_data.test_features,
        cluster_data.test_labels,
    )
    assert accuracy == 1.0


def test_knn_classifier_weighs_votes_by_exp_cosine_over_temperature() -> None:
    # query e_0: one class-7 neighbour at cos 1, two class-3 neighbours at cos 0.8
    train = np.array([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6], [-1.0, 0.0]])
    labels = np.array([7, 3, 3, 9])
    query = np.array([[1.0, 0.0]])
    # T = 0.02: exp(50) > 2·exp(40): the close neighbour wins; T = 10: 2·e^0.08 > e^0.1
    assert knn_classify(train, labels, query, k=3, temperature=0.02).tolist() == [7]
    assert knn_classify(train, labels, query, k=3, temperature=10.0).tolist() == [3]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda data: KNNDetector(k=0).fit(data),
            "detector 'knn': k must be an integer >= 1, got 0",
        ),
        (
            lambda data: DeepKNNDetector(k=True).fit(data),
            "detector 'deep-knn': k must be an integer >= 1, got True",
        ),
        (
            lambda data: DeepKNNDetector(k=201).fit(data),
            "k=201 is larger than the 200 training samples; use k <= 200",
        ),
        (
            lambda data: KNNDetector(backend="annoy").fit(data),
            "detector 'knn': backend must be one of exact, faiss, faiss-ivf, faiss-hnsw, "
            "got 'annoy'",
        ),
        (
            lambda data: KNNDetector(k=2, temperature=0.0).fit(data),
            "detector 'knn': temperature must be a finite number >= 1/700 (so exp(cos/T) fits "
            "in float64), got 0.0",
        ),
        (lambda data: KNNDetector().fit(data[:0]), "features needs at least 1 sample(s), got 0"),
        (
            lambda data: KNNDetector(backend="faiss-ivf", n_lists=500).fit(data),
            "n_lists=500 is larger than the 200 training samples; use n_lists <= 200 or leave "
            "it unset",
        ),
        (
            lambda data: knn_classify(data, np.zeros(200), data, temperature=-1),
            "knn_classify: temperature must be a finite number >= 1/700 (so exp(cos/T) fits in "
            "float64), got -1",
        ),
        (
            lambda data: KNNDetector().fit(data).score_samples(data[:, :3]),
            "features has 3 dimensions but the detector was fitted on 6",
        ),
        (
            lambda data: knn_classify(data, np.zeros(199), data),
            "labels has 199 entries but features has 200 rows",
        ),
        (
            lambda data: knn_classify(data, np.zeros(200), data, k=500),
            "k=500 is larger than the 200 training samples",
        ),
    ],
)
def test_invalid_input_raises_one_line_errors(
    call: object, message: str, cluster_data: ClusterData
) -> None:
    with pytest.raises(InvalidParameterError) as error:
        call(cluster_data.train_features)  # type: ignore[operator]
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)
