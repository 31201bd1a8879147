"""recall_at_k against hand answers, and kneighbors against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from oodprobe.detectors.neighbors import KNNDetector
from oodprobe.detectors.search import recall_at_k
from oodprobe.errors import InvalidParameterError


def test_recall_at_k_hand_answers() -> None:
    assert recall_at_k([[0, 1]], [[1, 0]]) == 1.0  # order within the top-k does not matter
    assert recall_at_k([[0, 5]], [[0, 1]]) == 0.5
    assert recall_at_k([[3, 0], [1, 2]], [[0, 1], [1, 2]], k=1) == 0.5
    assert recall_at_k([[-1, 1]], [[0, 1]]) == 0.5  # faiss' "nothing found" is a miss
    # a row's indices never match another row's truth
    assert recall_at_k([[1], [0]], [[0], [1]]) == 0.0


def test_recall_at_k_refuses_what_it_cannot_compare() -> None:
    with pytest.raises(InvalidParameterError, match="same number of rows"):
        recall_at_k([[0]], [[0], [1]])
    with pytest.raises(InvalidParameterError, match="k=3 is larger"):
        recall_at_k([[0, 1]], [[0, 1]], k=3)
    with pytest.raises(InvalidParameterError, match="k must be >= 1"):
        recall_at_k([[0]], [[0]], k=0)


def test_kneighbors_are_the_brute_force_neighbours_and_recall_of_an_index() -> None:
    rng = np.random.default_rng(0)
    train = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((40, 16)).astype(np.float32)
    exact = KNNDetector(k=5, search_precision="fp32").fit(train)
    similarities, indices = exact.kneighbors(queries)
    unit_train = train / np.linalg.norm(train, axis=1, keepdims=True)
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    cosines = unit_queries.astype(np.float64) @ unit_train.T.astype(np.float64)
    expected = np.argsort(-cosines, axis=1)[:, :5]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(similarities, np.take_along_axis(cosines, expected, 1), rtol=1e-6)
    assert recall_at_k(indices, expected) == 1.0
    hnsw = KNNDetector(k=5, backend="faiss-hnsw", hnsw_m=8, ef_search=16).fit(train)
    approximate = hnsw.kneighbors(queries)[1]
    recall = recall_at_k(approximate, indices)
    found = [len(set(a) & set(e)) / 5 for a, e in zip(approximate, indices, strict=True)]
    assert recall == pytest.approx(np.mean(found))


@pytest.mark.parametrize("backend", ["faiss-ivf", "faiss-hnsw"])
def test_a_faiss_index_is_held_once_and_saved_copied_and_loaded_whole(
    backend: str, tmp_path: object
) -> None:
    """No serialised copy of the index beside the live one (a third copy of the ID set); the
    bytes are made when the detector is saved or copied, and give the same neighbours back."""
    import copy
    import pickle
    from pathlib import Path

    from oodprobe.detectors import load_detector

    rng = np.random.default_rng(1)
    train = rng.standard_normal((2000, 16)).astype(np.float32)
    queries = rng.standard_normal((50, 16)).astype(np.float32)
    detector = KNNDetector(k=3, backend=backend, n_lists=8, n_probe=2, ef_search=8).fit(train)
    assert not hasattr(detector, "index_bytes_")
    expected = detector.score_samples(queries)
    path = Path(str(tmp_path)) / "knn.oodprobe"
    detector.save(path)
    for other in (
        load_detector(path),
        copy.deepcopy(detector),
        pickle.loads(pickle.dumps(detector)),
    ):
        assert not hasattr(other, "index_bytes_")
        np.testing.assert_array_equal(other.score_samples(queries), expected)
        np.testing.assert_array_equal(other.kneighbors(queries)[1], detector.kneighbors(queries)[1])
