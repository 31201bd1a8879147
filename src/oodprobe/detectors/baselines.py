"""Classic outlier detectors from scikit-learn as baselines: LOF, Isolation Forest, one-class SVM.

Their ``score_samples`` already has our sign (higher = more normal = more in-distribution).
Persistence: a scikit-learn model cannot be saved without pickle, so the saved state is the
training features (plus the hyperparameters, including ``random_state``) and loading refits the
model, deterministically. Loading therefore takes as long as fitting.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.neighbors import VALID_METRICS
from sklearn.utils.validation import check_is_fitted

from oodprobe.arrays import Features, Labels, Scores, check_features, is_bfloat16
from oodprobe.detectors.base import Choices, Detector, Number, integer, register_detector
from oodprobe.errors import InvalidParameterError

# the distances LocalOutlierFactor accepts by name (its own constraint, in our order)
_METRICS = sorted({str(name) for names in VALID_METRICS.values() for name in names})


def _sklearn_input(features: Features) -> Features:
    """``features`` as scikit-learn accepts them: bfloat16 (a numpy kind-'V' dtype to its
    validation) widened to float32, exactly; other float dtypes unchanged."""
    return features.astype(np.float32) if is_bfloat16(features.dtype) else features


class _SklearnBaseline(Detector):
    """Fit stores the training features and fits ``estimator_``; score delegates to it."""

    def _make_estimator(self) -> Any:
        raise NotImplementedError

    def _check_params(self, n_train: int) -> None:
        """Hook: validate hyperparameters against the training-set size (types: constraints)."""

    def _refit(self) -> None:
        estimator = self._make_estimator()
        try:
            estimator.fit(self.train_features_)
        except ValueError as error:  # scikit-learn's own parameter validation
            raise InvalidParameterError(f"{self.name}: {error}") from None
        self.estimator_: BaseEstimator = estimator

    def fit(self, features: Features, labels: Labels | None = None) -> _SklearnBaseline:
        """Fit on (n, D) ID features; labels are ignored. Returns self."""
        self._validate_params()
        features = check_features(features, min_samples=2)
        self._check_params(len(features))
        # a copy, kept for refitting on load
        self.train_features_ = np.array(_sklearn_input(features))
        self.n_dims_ = int(features.shape[1])
        self._refit()
        return self

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 scores of (n, D) features; higher = more in-distribution."""
        check_is_fitted(self)
        features = _sklearn_input(check_features(features, n_dims=self.n_dims_))
        return np.asarray(self.estimator_.score_samples(features), dtype=np.float64)

    def _get_state(self) -> dict[str, Any]:
        return {"train_features_": self.train_features_, "n_dims_": self.n_dims_}

    def _set_state(self, state: dict[str, Any]) -> None:
        super()._set_state(state)
        self._refit()


@register_detector
class LOFDetector(_SklearnBaseline):
    """Local Outlier Factor (novelty mode) on the features.

    Breunig, Kriegel, Ng, Sander, SIGMOD 2000 ("LOF: Identifying Density-Based Local
    Outliers"). Score: ``−LOF(x)`` (``LocalOutlierFactor(novelty=True).score_samples``).
    Differences: none; scikit-learn's implementation, Euclidean distance on the raw features.
    """

    name: ClassVar[str] = "lof"
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "n_neighbors": [integer(1)],
        "metric": [
            Choices(*_METRICS, text="scikit-learn distance name (minkowski, euclidean, cosine, …)")
        ],
    }

    def __init__(self, *, n_neighbors: int = 20, metric: str = "minkowski") -> None:
        self.n_neighbors = n_neighbors
        self.metric = metric

    def _check_params(self, n_train: int) -> None:
        if self.n_neighbors >= n_train:
            raise InvalidParameterError(
                f"n_neighbors={self.n_neighbors} must be smaller than the {n_train} training "
                f"samples; use n_neighbors <= {n_train - 1}"
            )

    def _make_estimator(self) -> Any:
        from sklearn.neighbors import LocalOutlierFactor

        return LocalOutlierFactor(n_neighbors=self.n_neighbors, metric=self.metric, novelty=True)


@register_detector
class IsolationForestDetector(_SklearnBaseline):
    """Isolation Forest on the features.

    Liu, Ting, Zhou, ICDM 2008 ("Isolation Forest"). Score: ``−2^(−E[h(x)]/c(ψ))``, minus the
    anomaly score from the mean path length (``IsolationForest.score_samples``). Differences:
    none; scikit-learn's implementation, seeded by ``random_state``.
    """

    name: ClassVar[str] = "isolation-forest"
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "n_estimators": [integer(1)],
        "max_samples": [Choices("auto"), integer(1), Number(0, 1, closed="right")],
        # an integer seed only: loading refits the forest, which must give the same trees
        "random_state": [integer(0, 2**32 - 1)],
    }

    def __init__(
        self,
        *,
        n_estimators: int = 100,
        max_samples: int | float | str = "auto",
        random_state: int = 0,
    ) -> None:
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.random_state = random_state

    def _make_estimator(self) -> Any:
        from sklearn.ensemble import IsolationForest

        return IsolationForest(
            n_estimators=self.n_estimators,
            max_samples=self.max_samples,
            random_state=self.random_state,
        )


@register_detector
class OneClassSVMDetector(_SklearnBaseline):
    """One-class SVM with an RBF kernel on the features.

    Schölkopf, Platt, Shawe-Taylor, Smola, Williamson, Neural Computation 2001 ("Estimating
    the Support of a High-Dimensional Distribution"). Score: the decision function
    ``Σ_i α_i K(x_i, x)`` (``OneClassSVM.score_samples``). Differences: none; training is
    O(n²) in time and memory, so fit it on a subsample of a large training set.
    """

    name: ClassVar[str] = "one-class-svm"
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "nu": [Number(0, 1, closed="right")],
        "gamma": [Choices("scale", "auto"), Number(0)],
        "kernel": [Choices("linear", "poly", "rbf", "sigmoid")],
    }

    def __init__(
        self, *, nu: float = 0.1, gamma: float | str = "scale", kernel: str = "rbf"
    ) -> None:
        self.nu = nu
        self.gamma = gamma
        self.kernel = kernel

    def _make_estimator(self) -> Any:
        from sklearn.svm import OneClassSVM

        return OneClassSVM(nu=self.nu, gamma=self.gamma, kernel=self.kernel)
