"""Gaussian, Mahalanobis and relative Mahalanobis against the brute-force formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from oodprobe.detectors import gaussian as gaussian_module
from oodprobe.detectors.gaussian import (
    GaussianDetector,
    MahalanobisDetector,
    RelativeMahalanobisDetector,
)
from oodprobe.errors import InvalidParameterError

from .conftest import ClusterData


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    truth = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return float(roc_auc_score(truth, np.r_[id_scores, ood_scores]))


def squared_distances(features: np.ndarray, mean: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    centred = features - mean
    return np.einsum("nd,de,ne->n", centred, np.linalg.inv(covariance), centred)


# -- the formulas as the authors' code writes them (Adaloglou et al., TMLR 2024) -------------
# compute_maha_vals: features in float64; per class the mean and torch.cov (divisor n_c - 1),
# the class covariances averaged and inverted with inverse(); the background Gaussian is the
# mean and torch.cov of all training features. Scores: -min_c MD_c and -min_c (MD_c - MD_0).


def authors_statistics(
    features: np.ndarray, labels: np.ndarray
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    data = torch.as_tensor(features).double()
    labels_t = torch.as_tensor(labels)
    means, covariances = [], []
    for c in torch.unique(labels_t):
        rows = data[labels_t == c]
        means.append(rows.mean(dim=0))
        covariances.append(rows.T.cov())
    shared_inverse = torch.stack(covariances).mean(dim=0).inverse()
    return means, shared_inverse, data.mean(dim=0), data.T.cov().inverse()


def authors_distance(
    queries: torch.Tensor, mean: torch.Tensor, inverse: torch.Tensor
) -> torch.Tensor:
    centred = queries - mean
    return (centred @ inverse * centred).sum(dim=1)


def authors_scores(
    features: np.ndarray, labels: np.ndarray, queries: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(Mahalanobis, relative Mahalanobis) scores of ``queries`` as the authors compute them."""
    means, shared_inverse, background_mean, background_inverse = authors_statistics(
        features, labels
    )
    queries_t = torch.as_tensor(queries).double()
    per_class = torch.stack([authors_distance(queries_t, m, shared_inverse) for m in means])
    background = authors_distance(queries_t, background_mean, background_inverse)
    mahalanobis = -per_class.min(dim=0).values
    relative = -(per_class - background).min(dim=0).values
    return mahalanobis.numpy(), relative.numpy()


@pytest.fixture(scope="module")
def unequal_classes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correlated features, 3 classes of 50/80/120 samples with different covariances.

    Queries: half near the classes, half far, so rankings mix ID-like and OOD-like points.
    """
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1, 2], [50, 80, 120])
    mixing = rng.normal(size=(3, 5, 5))
    centres = 4 * rng.normal(size=(3, 5))
    features = np.einsum("nd,nde->ne", rng.normal(size=(250, 5)), mixing[labels])
    features += centres[labels]
    near = centres[rng.integers(0, 3, 30)] + 1.5 * rng.normal(size=(30, 5))
    queries = np.vstack([near, rng.normal(scale=4, size=(30, 5))])
    return features.astype(np.float32), labels, queries


def test_mahalanobis_equals_the_authors_formula_on_unequal_classes(
    unequal_classes: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    features, labels, queries = unequal_classes
    expected, _ = authors_scores(features, labels, queries)
    scores = MahalanobisDetector().fit(features, labels).score_samples(queries)
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(np.argsort(scores), np.argsort(expected))
    # the same formula with numpy (np.cov is unbiased by default, np.linalg.inv)
    data = features.astype(np.float64)
    class_means = [data[labels == c].mean(axis=0) for c in range(3)]
    averaged = np.mean([np.cov(data[labels == c].T) for c in range(3)], axis=0)
    numpy_expected = -np.min([squared_distances(queries, m, averaged) for m in class_means], 0)
    np.testing.assert_allclose(scores, numpy_expected, rtol=1e-9, atol=1e-9)


def test_relative_mahalanobis_equals_the_authors_formula_on_unequal_classes(
    unequal_classes: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    features, labels, queries = unequal_classes
    _, expected = authors_scores(features, labels, queries)
    scores = RelativeMahalanobisDetector().fit(features, labels).score_samples(queries)
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(np.argsort(scores), np.argsort(expected))


def test_the_maximum_likelihood_estimator_is_a_named_choice_and_differs(
    unequal_classes: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """``covariance="ml"``: divisors n_c and N (Lee et al.'s EmpiricalCovariance, pytorch-ood)."""
    features, labels, queries = unequal_classes
    data = features.astype(np.float64)
    class_means = [data[labels == c].mean(axis=0) for c in range(3)]
    averaged = np.mean([np.cov(data[labels == c].T, bias=True) for c in range(3)], axis=0)
    per_class = np.array([squared_distances(queries, m, averaged) for m in class_means])
    background = squared_distances(queries, data.mean(axis=0), np.cov(data.T, bias=True))
    ml = {
        "mahalanobis": MahalanobisDetector(covariance="ml"),
        "relative": RelativeMahalanobisDetector(covariance="ml"),
        "gaussian": GaussianDetector(covariance="ml"),
    }
    scores = {
        key: detector.fit(features, labels).score_samples(queries) for key, detector in ml.items()
    }
    np.testing.assert_allclose(scores["mahalanobis"], -per_class.min(axis=0), rtol=1e-9)
    np.testing.assert_allclose(
        scores["relative"], -(per_class - background).min(axis=0), rtol=1e-9, atol=1e-9
    )
    np.testing.assert_allclose(scores["gaussian"], -background, rtol=1e-9)
    # with unequal class sizes the two estimators give different values and rankings
    unbiased = MahalanobisDetector().fit(features, labels).score_samples(queries)
    assert not np.allclose(unbiased, scores["mahalanobis"], rtol=1e-3)
    relative = RelativeMahalanobisDetector().fit(features, labels).score_samples(queries)
    assert not np.array_equal(np.argsort(relative), np.argsort(scores["relative"]))


def test_gaussian_equals_the_single_gaussian_formula(
    unequal_classes: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    features, labels, queries = unequal_classes
    _, _, mean, inverse = authors_statistics(features, labels)  # the authors' background model
    expected = -authors_distance(torch.as_tensor(queries), mean, inverse).numpy()
    scores = GaussianDetector().fit(features).score_samples(queries)
    np.testing.assert_allclose(scores, expected, rtol=1e-9)
    data = features.astype(np.float64)
    np.testing.assert_allclose(
        scores, -squared_distances(queries, data.mean(axis=0), np.cov(data.T)), rtol=1e-9
    )


@pytest.mark.parametrize("balanced", [False, True])  # True: the one-product path of _moments
def test_relative_mahalanobis_equals_its_formula_in_blocks(
    unequal_classes: tuple[np.ndarray, np.ndarray, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    balanced: bool,
) -> None:
    monkeypatch.setattr(gaussian_module, "_ROWS", 7)  # many row blocks in fit and score
    features, labels, queries = unequal_classes
    if balanced:
        keep = np.r_[0:40, 50:90, 130:170]
        features, labels = features[keep], labels[keep]
    _, expected = authors_scores(features, labels, queries)
    scores = RelativeMahalanobisDetector().fit(features, labels).score_samples(queries)
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-9)


def test_a_class_with_one_sample_is_refused_for_the_unbiased_estimator(
    unequal_classes: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    features, labels, queries = unequal_classes
    features, labels = features[:131], labels[:131].copy()
    labels[-1] = 7  # class 7: one sample
    expected = (
        "relative-mahalanobis: class 7 has 1 training sample; an unbiased covariance "
        "(divisor n − 1) needs at least 2 per class: add samples of that class, drop it, or "
        "use covariance='ml'"
    )
    with pytest.raises(InvalidParameterError) as error:
        RelativeMahalanobisDetector().fit(features, labels)
    assert str(error.value) == expected
    # the maximum-likelihood estimator keeps the class: its mean, a zero covariance
    detector = MahalanobisDetector(covariance="ml").fit(features, labels)
    np.testing.assert_allclose(detector.class_means_[-1], features[-1], rtol=1e-6)
    assert np.all(np.isfinite(detector.score_samples(queries)))


def test_relative_mahalanobis_helps_where_shared_background_dimensions_dominate() -> None:
    """Two classes at ±4 on axis 0, OOD between them at 0; 300 background dimensions N(0, 1).

    MD²_c is dominated by the background's chi²(300) (std ≈ 24), which hides the OOD's
    extra ≈ 15 on axis 0; MD²_0 contains the same background term, so RMD cancels it.
    (Measured: MD AUROC 0.55, RMD 0.99.)
    """
    rng = np.random.default_rng(0)

    def sample(centres: np.ndarray) -> np.ndarray:
        features = rng.normal(size=(len(centres), 301))
        features[:, 0] += centres
        return features

    labels = rng.integers(0, 2, 3000)
    train = sample(np.where(labels == 0, -4.0, 4.0))
    test = sample(np.where(rng.integers(0, 2, 500) == 0, -4.0, 4.0))
    ood = sample(np.zeros(500))
    mahalanobis = MahalanobisDetector().fit(train, labels)
    relative = RelativeMahalanobisDetector().fit(train, labels)
    md_auroc = auroc(mahalanobis.score_samples(test), mahalanobis.score_samples(ood))
    rmd_auroc = auroc(relative.score_samples(test), relative.score_samples(ood))
    assert md_auroc < 0.8 and rmd_auroc > 0.95, (md_auroc, rmd_auroc)


@pytest.mark.parametrize(
    "cls", [GaussianDetector, MahalanobisDetector, RelativeMahalanobisDetector]
)
def test_torch_scores_match_and_gradients_are_right(
    cls: type[GaussianDetector], cluster_data: ClusterData
) -> None:
    detector = cls().fit(cluster_data.train_features, cluster_data.train_labels)
    queries = cluster_data.ood_features[:5].astype(np.float64)
    features = torch.tensor(queries, requires_grad=True)
    scores = detector.score_samples_torch(features)
    np.testing.assert_allclose(scores.detach().numpy(), detector.score_samples(queries), rtol=1e-9)
    assert torch.autograd.gradcheck(detector.score_samples_torch, (features,))
    if cls is GaussianDetector:  # ∇(−MD²) = −2 Σ⁻¹ (x − μ)
        data = cluster_data.train_features.astype(np.float64)
        precision = np.linalg.inv(np.cov(data.T))
        expected = -2 * (queries - data.mean(axis=0)) @ precision
        scores.sum().backward()
        assert features.grad is not None
        np.testing.assert_allclose(features.grad.numpy(), expected, rtol=1e-6)


def test_float32_and_float64_inputs_agree(cluster_data: ClusterData) -> None:
    detector = MahalanobisDetector().fit(cluster_data.train_features, cluster_data.train_labels)
    queries = cluster_data.test_features
    np.testing.assert_array_equal(
        detector.score_samples(queries), detector.score_samples(queries.astype(np.float64))
    )


def test_fewer_samples_than_dimensions_warn() -> None:
    features = np.random.default_rng(0).normal(size=(10, 20))
    with pytest.warns(UserWarning, match=r"gaussian: 10 training samples in 1 group\(s\) cannot"):
        GaussianDetector().fit(features)
    with pytest.warns(UserWarning, match=r"mahalanobis: 10 training samples in 2 group\(s\)"):
        MahalanobisDetector().fit(features, np.arange(10) % 2)


def test_rank_deficient_covariance_uses_the_pseudo_inverse() -> None:
    rng = np.random.default_rng(0)
    features = np.zeros((100, 4))
    features[:, :2] = rng.normal(size=(100, 2))  # dims 2, 3 constant: Σ has rank 2
    detector = GaussianDetector().fit(features)  # constant channels: no warning
    assert detector.whitening_.shape == (4, 2)
    queries = rng.normal(size=(5, 4))
    expected = -squared_distances(
        queries[:, :2], features[:, :2].mean(0), np.cov(features[:, :2].T)
    )
    np.testing.assert_allclose(detector.score_samples(queries), expected, rtol=1e-10)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda f, y: MahalanobisDetector().fit(f),
            "mahalanobis needs class labels: call fit(features, labels)",
        ),
        (
            lambda f, y: RelativeMahalanobisDetector().fit(f, np.zeros(len(f))),
            "labels must contain at least 2 classes, got 1",
        ),
        (lambda f, y: MahalanobisDetector().fit(f, y[:-1]), "labels has 199 entries"),
        (lambda f, y: MahalanobisDetector().fit(f[:0], y[:0]), "features needs at least 2"),
        (lambda f, y: GaussianDetector().fit(f[:1]), "features needs at least 2 sample(s), got 1"),
        (
            lambda f, y: GaussianDetector().fit(np.ones((10, 3))),
            "the training feature covariance is zero",
        ),
        (
            lambda f, y: GaussianDetector().fit(f).score_samples(f[:, :2]),
            "features has 2 dimensions but the detector was fitted on 6",
        ),
        (
            lambda f, y: GaussianDetector().fit(f).score_samples_torch(torch.zeros(3, 2)),
            "features must have shape (n_samples, 6), got (3, 2)",
        ),
    ],
)
def test_invalid_input_raises_one_line_errors(
    call: object, message: str, cluster_data: ClusterData
) -> None:
    with pytest.raises(InvalidParameterError) as error:
        call(cluster_data.train_features, cluster_data.train_labels)  # type: ignore[operator]
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_a_large_common_offset_does_not_cost_precision(
    unequal_classes: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """The one-pass moments subtract a reference point first, as real embeddings need."""
    features, labels, queries = unequal_classes
    data = features.astype(np.float64)
    shifted = RelativeMahalanobisDetector().fit(data + 1e4, labels).score_samples(queries + 1e4)
    plain = RelativeMahalanobisDetector().fit(data, labels).score_samples(queries)
    np.testing.assert_allclose(shifted, plain, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "cls", [GaussianDetector, MahalanobisDetector, RelativeMahalanobisDetector]
)
def test_half_precision_input_is_scored_in_float64_without_overflow(
    cls: type[GaussianDetector], dtype: torch.dtype
) -> None:
    """Squared distances beyond 65504 (fp16's largest value) came back as NaN before."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [60, 90, 150])
    scales = np.geomspace(1e-2, 1.0, 32)  # some directions of small variance
    features = 3.0 + rng.normal(size=(300, 32)) * scales + 0.5 * rng.normal(size=(3, 32))[labels]
    queries = torch.tensor(3.0 + 3 * rng.normal(size=(20, 32)), dtype=dtype, requires_grad=True)
    rounded = queries.detach().double().numpy()
    # the premise: squared distances here exceed what float16 can hold
    assert np.abs(GaussianDetector().fit(features).score_samples(rounded)).max() > 65504
    detector = cls().fit(features, labels)
    scores = detector.score_samples_torch(queries)
    assert scores.dtype == torch.float64
    np.testing.assert_allclose(scores.detach().numpy(), detector.score_samples(rounded), rtol=1e-9)
    scores.sum().backward()
    assert queries.grad is not None
    # the gradient comes back in the input's dtype: finite in bfloat16; here its true values
    # (-2 Σ⁻¹ (x − μ), up to ~1e5) exceed float16's range, which no computation can avoid
    if dtype == torch.bfloat16:
        assert bool(torch.isfinite(queries.grad).all())
