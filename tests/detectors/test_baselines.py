"""scikit-learn baselines: same scores as the wrapped estimator, refit on load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import LocalOutlierFactor
from sklearn.svm import OneClassSVM

from oodprobe.detectors import load_detector
from oodprobe.detectors.baselines import (
    IsolationForestDetector,
    LOFDetector,
    OneClassSVMDetector,
)
from oodprobe.errors import InvalidParameterError

from .conftest import ClusterData

CASES: list[tuple[Any, Any]] = [
    (LOFDetector(n_neighbors=7), LocalOutlierFactor(n_neighbors=7, novelty=True)),
    (
        IsolationForestDetector(n_estimators=30, random_state=5),
        IsolationForest(n_estimators=30, random_state=5),
    ),
    (OneClassSVMDetector(nu=0.2, gamma=0.3), OneClassSVM(nu=0.2, gamma=0.3)),
]


@pytest.mark.parametrize(("detector", "estimator"), CASES, ids=lambda case: type(case).__name__)
def test_scores_equal_the_sklearn_estimator(
    detector: Any, estimator: Any, cluster_data: ClusterData, tmp_path: Path
) -> None:
    detector.fit(cluster_data.train_features, cluster_data.train_labels)
    expected = estimator.fit(cluster_data.train_features).score_samples(cluster_data.ood_features)
    scores = detector.score_samples(cluster_data.ood_features)
    np.testing.assert_array_equal(scores, expected)
    # saved without pickle: the features are stored and the model refitted on load
    path = detector.save(tmp_path / "baseline.safetensors")
    loaded = load_detector(path)
    np.testing.assert_array_equal(loaded.score_samples(cluster_data.ood_features), scores)
    assert type(loaded.estimator_) is type(estimator)


def test_isolation_forest_scores_depend_on_the_seed(cluster_data: ClusterData) -> None:
    scores = [
        IsolationForestDetector(n_estimators=10, random_state=seed)
        .fit(cluster_data.train_features)
        .score_samples(cluster_data.test_features)
        for seed in (0, 1)
    ]
    assert not np.array_equal(*scores)


@pytest.mark.parametrize(
    ("detector", "message"),
    [
        (
            LOFDetector(n_neighbors=200),
            "n_neighbors=200 must be smaller than the 200 training samples; use n_neighbors <= 199",
        ),
        (LOFDetector(n_neighbors=0), "detector 'lof': n_neighbors must be an integer >= 1, got 0"),
        (
            IsolationForestDetector(n_estimators=0),
            "detector 'isolation-forest': n_estimators must be an integer >= 1, got 0",
        ),
        (
            OneClassSVMDetector(nu=1.5),
            "detector 'one-class-svm': nu must be a number in (0, 1], got 1.5",
        ),
        (
            OneClassSVMDetector(kernel="cubic"),
            "detector 'one-class-svm': kernel must be one of linear, poly, rbf, sigmoid, "
            "got 'cubic'",
        ),
        (
            LOFDetector(metric="eucliden"),
            "detector 'lof': metric must be a scikit-learn distance name (minkowski, euclidean, "
            "cosine, …), got 'eucliden'",
        ),
    ],
)
def test_invalid_parameters_raise_one_line_errors(
    detector: Any, message: str, cluster_data: ClusterData
) -> None:
    with pytest.raises(InvalidParameterError) as error:
        detector.fit(cluster_data.train_features)
    assert str(error.value) == message


@pytest.mark.parametrize(("detector", "estimator"), CASES, ids=lambda case: type(case).__name__)
def test_bfloat16_features_score_as_their_float32_values(
    detector: Any, estimator: Any, cluster_data: ClusterData, tmp_path: Path
) -> None:
    """A bfloat16 cache entry (``--store-dtype bfloat16``) is scored as its exact float32 values
    (scikit-learn's validation refuses the ml_dtypes kind-'V' dtype), and saves and loads."""
    import ml_dtypes

    train = cluster_data.train_features.astype(ml_dtypes.bfloat16)
    test = cluster_data.ood_features.astype(ml_dtypes.bfloat16)
    detector.fit(train)
    expected = estimator.fit(train.astype(np.float32)).score_samples(test.astype(np.float32))
    np.testing.assert_allclose(detector.score_samples(test), expected, rtol=1e-6, atol=1e-9)
    detector.save(tmp_path / "bf16.oodprobe")
    loaded = load_detector(tmp_path / "bf16.oodprobe")
    np.testing.assert_allclose(loaded.score_samples(test), expected, rtol=1e-6, atol=1e-9)
