"""The detector contract, over every registered detector (new ones are covered automatically)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score

from oodprobe.detectors import DETECTORS, Detector, create_detector, load_detector
from oodprobe.errors import InvalidParameterError

from .conftest import ClusterData

NAMES = sorted(DETECTORS)
MakeDetector = Callable[[str], Detector]


def fit(detector: Detector, data: ClusterData) -> Detector:
    return detector.fit(data.train_features, data.train_labels)


def params_equal(left: dict[str, Any], right: dict[str, Any]) -> bool:
    if left.keys() != right.keys():
        return False
    return all(np.array_equal(left[key], right[key]) for key in left)


@pytest.fixture(scope="module", params=NAMES)
def fitted(request: pytest.FixtureRequest, cluster_data: ClusterData) -> Detector:
    make_detector: MakeDetector = request.getfixturevalue("make_detector")
    return fit(make_detector(request.param), cluster_data)


def test_every_detector_has_a_factory_and_a_docstring_citation() -> None:
    from .conftest import DETECTOR_FACTORIES

    assert set(NAMES) <= set(DETECTOR_FACTORIES), set(NAMES) - set(DETECTOR_FACTORIES)
    for name in NAMES:
        assert DETECTORS[name].__doc__, f"{name} has no docstring"


@pytest.mark.parametrize("name", NAMES)
def test_fit_returns_self_and_scores_are_finite_float64(
    name: str, make_detector: MakeDetector, cluster_data: ClusterData
) -> None:
    detector = make_detector(name)
    assert fit(detector, cluster_data) is detector
    scores = detector.score_samples(cluster_data.test_features)
    assert scores.dtype == np.float64
    assert scores.shape == (len(cluster_data.test_features),)
    assert np.all(np.isfinite(scores))


def test_scores_are_deterministic_across_calls_and_fits(
    fitted: Detector, cluster_data: ClusterData
) -> None:
    first = fitted.score_samples(cluster_data.test_features)
    np.testing.assert_array_equal(first, fitted.score_samples(cluster_data.test_features))
    refitted = fit(clone(fitted), cluster_data)
    np.testing.assert_array_equal(first, refitted.score_samples(cluster_data.test_features))


@pytest.mark.parametrize("name", NAMES)
def test_inputs_are_not_modified(
    name: str, make_detector: MakeDetector, cluster_data: ClusterData
) -> None:
    features = cluster_data.train_features.copy()
    labels = cluster_data.train_labels.copy()
    queries = cluster_data.test_features.astype(np.float64)  # float64 input: no implicit copy
    queries_before = queries.copy()
    detector = make_detector(name).fit(features, labels)
    detector.score_samples(queries)
    np.testing.assert_array_equal(features, cluster_data.train_features)
    np.testing.assert_array_equal(labels, cluster_data.train_labels)
    np.testing.assert_array_equal(queries, queries_before)


@pytest.mark.parametrize("name", NAMES)
def test_score_before_fit_raises_not_fitted(
    name: str, make_detector: MakeDetector, cluster_data: ClusterData
) -> None:
    with pytest.raises(NotFittedError):
        make_detector(name).score_samples(cluster_data.test_features)


def test_save_load_round_trip_gives_identical_scores(
    fitted: Detector, cluster_data: ClusterData, tmp_path: Path
) -> None:
    path = fitted.save(tmp_path / "detector.safetensors")
    loaded = load_detector(path)
    assert type(loaded) is type(fitted)
    assert params_equal(loaded.get_params(), fitted.get_params())
    queries = np.vstack([cluster_data.test_features, cluster_data.ood_features])
    np.testing.assert_array_equal(loaded.score_samples(queries), fitted.score_samples(queries))


def test_clone_and_get_params_round_trip(fitted: Detector) -> None:
    params = fitted.get_params()
    cloned = clone(fitted)
    assert type(cloned) is type(fitted)
    assert params_equal(cloned.get_params(), params)
    rebuilt = create_detector(fitted.name, **params)
    assert params_equal(rebuilt.get_params(), params)
    with pytest.raises(NotFittedError):  # clone copies hyperparameters, not learned state
        cloned.score_samples(np.zeros((1, 6), np.float32))


def test_higher_scores_mean_in_distribution(fitted: Detector, cluster_data: ClusterData) -> None:
    id_scores = fitted.score_samples(cluster_data.test_features)
    ood_scores = fitted.score_samples(cluster_data.ood_features)
    truth = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    auroc = roc_auc_score(truth, np.r_[id_scores, ood_scores])
    assert auroc > 0.9, f"{fitted.name}: AUROC {auroc:.3f}"


def test_wrong_dimensionality_and_nan_are_rejected(
    fitted: Detector, cluster_data: ClusterData
) -> None:
    with pytest.raises(InvalidParameterError, match=r"dimensions|shape"):
        fitted.score_samples(cluster_data.test_features[:, :5])
    with pytest.raises(InvalidParameterError, match="must be 2-D"):
        fitted.score_samples(cluster_data.test_features[0])
    bad = cluster_data.test_features.copy()
    bad[3, 2] = np.nan
    with pytest.raises(InvalidParameterError, match=r"contains NaN or inf in 1 row\(s\)"):
        fitted.score_samples(bad)


@pytest.mark.parametrize("name", [name for name in NAMES if DETECTORS[name].requires_labels])
def test_detectors_that_need_labels_reject_none(
    name: str, make_detector: MakeDetector, cluster_data: ClusterData
) -> None:
    with pytest.raises(InvalidParameterError, match=f"{name} needs class labels"):
        make_detector(name).fit(cluster_data.train_features)
