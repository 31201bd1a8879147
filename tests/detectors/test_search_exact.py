"""The exact k-NN search's guarantee: the float64 top-k, ties to the smaller index, any precision.

Every case is checked against a brute-force float64 top-k over all training rows. The cases are
built to defeat a low-precision search: near-ties closer than bfloat16 (and float32) can
resolve, exact duplicates (ties broken by index), tight clusters whose candidate window is
crowded, queries equal to training rows, and the fallback to full rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodprobe.arrays import bfloat16_as_float32, l2_normalize
from oodprobe.detectors import search
from oodprobe.detectors.neighbors import DeepKNNDetector, KNNDetector
from oodprobe.errors import InvalidParameterError

PRECISIONS = ("fp32", "bf16")


def brute_force(train: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 scores of every (query, train row) pair; top-k by score, ties to smaller index."""
    train64 = np.asarray(train, dtype=np.float32).astype(np.float64)
    values = np.empty((len(queries), k))
    indices = np.empty((len(queries), k), dtype=np.int64)
    for row, query in enumerate(np.asarray(queries, dtype=np.float64)):
        scores = np.einsum("ij,j->i", train64, query)
        order = np.lexsort((np.arange(len(train)), -scores))[:k]
        values[row], indices[row] = scores[order], order
    return values, indices


def assert_exact(train: np.ndarray, queries: np.ndarray, k: int, precision: str) -> None:
    values, indices = search.exact_search(train, queries, k, precision=precision)
    expected_values, expected_indices = brute_force(train, queries, k)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(values, expected_values, rtol=0, atol=1e-15)
    # and the scores are the dot products, to float64 accuracy
    blas = np.take_along_axis(
        np.asarray(queries, np.float64) @ train.astype(np.float64).T, indices, axis=1
    )
    np.testing.assert_allclose(values, blas, rtol=0, atol=1e-13)


@pytest.fixture
def count_fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Queries that went through the full-row fallback, appended per call."""
    calls: list[int] = []
    full_rows = search._full_rows

    def counting(index: search.ExactIndex, queries: np.ndarray, k: int) -> object:
        calls.append(len(queries))
        return full_rows(index, queries, k)

    monkeypatch.setattr(search, "_full_rows", counting)
    return calls


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Train blocks of 700 rows and query blocks of 30: the running top-m merge runs."""
    monkeypatch.setattr(search, "_MAX_TRAIN_BLOCK", 700)
    monkeypatch.setattr(search, "_BLOCK_ELEMENTS", 30 * 700)


def unit_rows(rng: np.random.Generator, n: int, dims: int) -> np.ndarray:
    return l2_normalize(rng.normal(size=(n, dims)), dtype=np.float64)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("k", [1, 4, 70])
def test_random_data_across_blocks(precision: str, k: int, small_blocks: None) -> None:
    rng = np.random.default_rng(0)
    train = unit_rows(rng, 2500, 48).astype(np.float32)
    assert_exact(train, unit_rows(rng, 100, 48), k, precision)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("gap", [1e-3, 1e-5, 1e-8, 1e-11])
def test_near_ties_closer_than_the_product_resolves(precision: str, gap: float) -> None:
    """Rows whose scores differ by ``gap``, far below bf16's (and, at 1e-8, float32's) error."""
    rng = np.random.default_rng(1)
    dims, n_queries, n_ties = 64, 20, 12
    queries = unit_rows(rng, n_queries, dims)
    rows = [unit_rows(rng, 1500, dims)]
    for query in queries:
        # rows at exact cosine c - j·gap with the query, in random order
        cosines = 0.9 - gap * rng.permutation(n_ties)
        orthogonal = rng.normal(size=(n_ties, dims))
        orthogonal -= np.outer(orthogonal @ query, query)
        orthogonal /= np.linalg.norm(orthogonal, axis=1, keepdims=True)
        rows.append(cosines[:, None] * query + np.sqrt(1 - cosines**2)[:, None] * orthogonal)
    train = np.concatenate(rows).astype(np.float32)[rng.permutation(1500 + n_queries * n_ties)]
    for k in (1, 5):
        assert_exact(train, queries, k, precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_exact_duplicates_tie_to_the_smaller_index(
    precision: str, count_fallbacks: list[int]
) -> None:
    rng = np.random.default_rng(2)
    distinct = unit_rows(rng, 300, 33).astype(np.float32)  # odd D: rows at every alignment
    copies = rng.integers(1, 45, size=len(distinct))  # up to 44 copies: more than m for k=1
    train = np.repeat(distinct, copies, axis=0)[rng.permutation(int(copies.sum()))]
    queries = np.concatenate([unit_rows(rng, 40, 33), distinct[:20].astype(np.float64)])
    for k in (1, 3, 50):
        assert_exact(train, queries, k, precision)
    assert sum(count_fallbacks) > 0  # 44 copies of a neighbour overflow k + 15 candidates


@pytest.mark.parametrize("precision", PRECISIONS)
def test_tight_clusters(precision: str) -> None:
    """Clusters of cosine ~0.9999: the bf16 window holds many rows; still exact."""
    rng = np.random.default_rng(3)
    centres = unit_rows(rng, 30, 96)
    train = l2_normalize(
        np.repeat(centres, 100, axis=0) + 0.01 * rng.normal(size=(3000, 96)), dtype=np.float32
    )
    queries = l2_normalize(
        np.repeat(centres, 3, axis=0) + 0.01 * rng.normal(size=(90, 96)), dtype=np.float64
    )
    for k in (1, 10):
        assert_exact(train, queries, k, precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_queries_equal_to_training_rows(precision: str) -> None:
    rng = np.random.default_rng(4)
    train = unit_rows(rng, 2000, 40).astype(np.float32)
    queries = train[rng.choice(2000, 50, replace=False)]
    values, indices = search.exact_search(train, queries, 2, precision=precision)
    assert_exact(train, queries, 2, precision)
    np.testing.assert_array_equal(train[indices[:, 0]], queries)  # each finds itself first
    np.testing.assert_allclose(values[:, 0], 1.0, atol=1e-6)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fallback_alone_is_exact(
    precision: str, monkeypatch: pytest.MonkeyPatch, count_fallbacks: list[int]
) -> None:
    """With no extra candidates (m = k) nothing is proven: every query takes the fallback."""
    monkeypatch.setattr(search, "_EXTRA_CANDIDATES", {"fp32": 0, "bf16": 0})
    rng = np.random.default_rng(5)
    train = unit_rows(rng, 1200, 24).astype(np.float32)
    queries = unit_rows(rng, 60, 24)
    assert_exact(train, queries, 3, precision)
    assert sum(count_fallbacks) == 60


def test_the_bound_covers_every_pair_and_is_not_vacuous() -> None:
    """|approximate − float64| <= the bound for every pair, and the bound is small."""
    rng = np.random.default_rng(6)
    dims = 768
    train = unit_rows(rng, 3000, dims).astype(np.float32)
    queries = unit_rows(rng, 40, dims)
    exact = queries @ train.astype(np.float64).T
    limits = {"fp32": 1e-4, "bf16": 1.5e-2}
    for precision, limit in limits.items():
        index = search.prepare_exact(train, precision)
        rounded = search._rounded_queries(queries, precision)
        absolute, relative = search._error_bounds(index, queries, rounded, precision=precision)
        approximate = (rounded @ index.product.T).double().numpy()
        allowed = absolute[:, None] + relative * np.abs(approximate)
        assert np.all(np.abs(approximate - exact) <= allowed)
        assert allowed.max() < limit
    # bf16's bound is at most the a-priori (2u + u²) + γ_D + output rounding, for unit rows
    a_priori = 2 * 2.0**-8 + 2.0**-16 + dims * 2.0**-24 + 2.0**-8
    assert allowed.max() < a_priori


def test_float32_queries_and_a_prepared_index_give_the_same_result() -> None:
    rng = np.random.default_rng(7)
    train = unit_rows(rng, 800, 16).astype(np.float32)
    queries = unit_rows(rng, 30, 16).astype(np.float32)
    index = search.prepare_exact(train, "bf16")
    assert index.product.dtype.itemsize == 2  # the bf16 copy: half of float32
    values, indices = search.exact_search(train, queries, 4, index=index)
    expected = search.exact_search(train, queries, 4, precision="fp32")
    np.testing.assert_array_equal(indices, expected[1])
    np.testing.assert_array_equal(values, expected[0])


def test_detectors_give_identical_scores_at_every_precision() -> None:
    rng = np.random.default_rng(8)
    train = np.repeat(rng.normal(size=(200, 20)), 3, axis=0)  # duplicates
    queries = rng.normal(size=(50, 20))
    for detector in (KNNDetector(k=1), KNNDetector(k=5), DeepKNNDetector(k=7)):
        scores = {
            precision: detector.set_params(search_precision=precision)
            .fit(train)
            .score_samples(queries)
            for precision in search.PRECISIONS
        }
        np.testing.assert_array_equal(scores["fp32"], scores["bf16"])
        np.testing.assert_array_equal(scores["fp32"], scores["auto"])


def test_precision_is_validated_with_the_parameters() -> None:
    with pytest.raises(InvalidParameterError) as error:
        KNNDetector.check_params({"search_precision": "fp16"})
    assert str(error.value) == (
        "detector 'knn': search_precision must be one of auto, fp32, bf16, got 'fp16'"
    )
    with pytest.raises(InvalidParameterError) as error:
        DeepKNNDetector.check_params({"backend": "faiss", "search_precision": "bf16"})
    assert str(error.value) == (
        "detector 'deep-knn': search_precision='bf16' needs backend='exact' (faiss searches "
        "in float32), got backend='faiss'; use backend='exact' or search_precision='auto'"
    )
    with pytest.raises(InvalidParameterError, match="got 'half'"):
        search.resolve_precision("half")
    assert search.resolve_precision("auto") in ("fp32", "bf16")


def test_bf16_rounding_is_torchs_round_to_nearest_even() -> None:
    rng = np.random.default_rng(9)
    values = rng.normal(size=20000) * 10.0 ** rng.uniform(-42, 3, size=20000)
    ties = np.float32(1 + 2.0**-8) * np.arange(1, 50, dtype=np.float32)  # halfway cases
    single = np.concatenate([values.astype(np.float32), ties, np.float32([0, -0.0, 1e-45])])
    expected = torch.from_numpy(single).to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(search._bf16_bits(single).view(np.int16), expected)
    rounded = bfloat16_as_float32(search._bf16_bits(single))
    assert np.all(np.abs(rounded - single) <= 2.0**-8 * np.abs(single) + 2.0**-134)


def test_reduced_float32_matmul_precision_is_overridden_and_restored() -> None:
    rng = np.random.default_rng(10)
    train = unit_rows(rng, 900, 40).astype(np.float32)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert_exact(train, unit_rows(rng, 30, 40), 3, "fp32")
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
