"""Post-hoc detectors of detectors/posthoc.py against reference formulas written out here.

Each reference follows the authors' code (cited per test) on the same arrays, independently of
the implementation: ViM's ``benchmark.py`` (haoqiwang/vim), ReAct's clipping, ASH's and
SCALE's ``topk`` shaping of a (b, D, 1, 1) map, DICE's ``RouteDICE``, SHE's class patterns,
NNGuide's confidence-scaled bank and fDBD's ``run_imagenet.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from scipy.special import logsumexp
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score

from oodprobe.detectors import DETECTORS, create_detector, load_detector, save_detector
from oodprobe.detectors.posthoc import HeadDetector, kept_units, vim_principal_dims
from oodprobe.errors import InvalidParameterError

POSTHOC = [
    "vim",
    "vim-residual",
    "react",
    "ash-p",
    "ash-b",
    "ash-s",
    "scale",
    "dice",
    "she",
    "nnguide",
    "fdbd",
]
N_CLASSES, N_DIMS = 5, 16
Array = npt.NDArray[np.float64]


class Data:
    """Non-negative (post-ReLU-like) features of 5 classes in 16 dims and a random head."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        prototypes = np.maximum(rng.normal(size=(N_CLASSES, N_DIMS)), 0) * 3
        self.train_labels = np.repeat(np.arange(N_CLASSES), 40)
        self.test_labels = np.tile(np.arange(N_CLASSES), 10)
        self.train = self._sample(rng, prototypes, self.train_labels)
        self.test = self._sample(rng, prototypes, self.test_labels)
        self.ood = (np.abs(rng.normal(size=(50, N_DIMS))) * 1.5).astype(np.float32)
        # the nearest-prototype rule as a linear head: labels agree with its predictions
        self.weight = prototypes
        self.bias = -0.5 * (prototypes**2).sum(axis=1)

    @staticmethod
    def _sample(
        rng: np.random.Generator, prototypes: Array, labels: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]:
        noise = np.abs(rng.normal(scale=0.5, size=(len(labels), N_DIMS)))
        return (prototypes[labels] + noise).astype(np.float32)

    def head(self) -> dict[str, Array]:
        return {"head_weight": self.weight, "head_bias": self.bias}

    def logits(self, features: npt.ArrayLike) -> Array:
        return np.asarray(features, dtype=np.float64) @ self.weight.T + self.bias


@pytest.fixture(scope="module")
def data() -> Data:
    return Data()


def fitted(name: str, data: Data, **params: Any) -> HeadDetector:
    detector = create_detector(name, **data.head(), **params)
    assert isinstance(detector, HeadDetector)
    return detector.fit(data.train, data.train_labels)


def energy(logits: Array) -> Array:
    return np.asarray(logsumexp(logits, axis=1), dtype=np.float64)


# -- registration and parameters ------------------------------------------------------------


def test_every_posthoc_detector_is_registered_needs_a_head_and_is_differentiable() -> None:
    for name in POSTHOC:
        cls = DETECTORS[name]
        assert cls.requires_head and cls.differentiable, name
        assert {"head_weight", "head_bias", "image_projection"} == set(cls.runner_params)
        assert "head" in [info.name for info in cls.param_info()]


@pytest.mark.parametrize(
    ("name", "defaults"),
    [
        ("vim", {"dim": None}),
        ("react", {"percentile": 90.0}),
        ("ash-p", {"percentile": 90.0}),
        ("ash-b", {"percentile": 65.0}),
        ("ash-s", {"percentile": 90.0}),
        ("scale", {"percentile": 85.0}),
        ("dice", {"sparsity": 0.9}),
        ("she", {"pattern_samples": "auto"}),
        ("nnguide", {"k": 10}),
    ],
)
def test_defaults_are_the_authors(name: str, defaults: dict[str, Any]) -> None:
    params = create_detector(name).get_params()
    assert {key: params[key] for key in defaults} == defaults
    assert params["head"] == "encoder"


def test_fit_without_a_head_says_what_is_missing(data: Data) -> None:
    with pytest.raises(InvalidParameterError, match="needs the classifier head's weight"):
        create_detector("react").fit(data.train)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("react", {"percentile": 101}, r"percentile must be a number in \[0, 100\]"),
        ("ash-s", {"percentile": 100}, r"percentile must be a number in \[0, 100\)"),
        ("dice", {"sparsity": 1.0}, r"sparsity must be a number in \[0, 1\)"),
        ("vim", {"dim": 0}, "dim must be an integer >= 1 or None"),
        ("nnguide", {"k": 0}, "k must be an integer >= 1"),
        ("she", {"pattern_samples": "all"}, "pattern_samples must be one of auto, correct"),
    ],
)
def test_out_of_range_parameters_are_refused_in_one_line(
    name: str, params: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidParameterError, match=message):
        create_detector(name, **params)


# -- ViM ------------------------------------------------------------------------------------


def test_vim_principal_dims_follow_the_authors_rule() -> None:
    assert [vim_principal_dims(d) for d in (4096, 2048, 1280, 768)] == [1000, 1000, 512, 512]
    assert [vim_principal_dims(d) for d in (767, 512, 6, 1)] == [383, 256, 3, 1]


def vim_reference(data: Data, dim: int, queries: Array) -> tuple[Array, Array]:
    """(ViM score, residual score) as the authors' ``benchmark.py`` computes them."""
    from numpy.linalg import norm, pinv
    from sklearn.covariance import EmpiricalCovariance

    train = data.train.astype(np.float64)
    origin = -np.matmul(pinv(data.weight), data.bias)
    covariance = EmpiricalCovariance(assume_centered=True).fit(train - origin).covariance_
    eig_vals, eigen_vectors = np.linalg.eig(covariance)
    basis = np.ascontiguousarray((eigen_vectors.T[np.argsort(eig_vals * -1)[dim:]]).T)
    virtual_train = norm(np.matmul(train - origin, basis), axis=-1)
    alpha = data.logits(train).max(axis=-1).mean() / virtual_train.mean()
    residual = norm(np.matmul(queries - origin, basis), axis=-1)
    return -alpha * residual + energy(data.logits(queries)), -residual


@pytest.mark.parametrize("dim", [4, 8])
def test_vim_and_its_residual_equal_the_authors_formula(data: Data, dim: int) -> None:
    queries = np.vstack([data.test, data.ood]).astype(np.float64)
    vim, residual = vim_reference(data, dim, queries)
    np.testing.assert_allclose(fitted("vim", data, dim=dim).score_samples(queries), vim, 1e-9)
    np.testing.assert_allclose(
        fitted("vim-residual", data, dim=dim).score_samples(queries), residual, 1e-9, 1e-12
    )


def test_vim_residual_is_zero_inside_the_principal_subspace_and_the_norm_outside() -> None:
    rng = np.random.default_rng(3)
    basis = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    inside, outside = basis[:, :3], basis[:, 3:]
    weight, bias = rng.normal(size=(4, 8)), np.zeros(4)  # origin −W⁺b = 0
    train = rng.normal(size=(100, 3)) @ inside.T * 4
    detector = create_detector("vim-residual", dim=3, head_weight=weight, head_bias=bias)
    detector.fit(train + 1e-9 * rng.normal(size=train.shape))
    queries = rng.normal(size=(10, 3)) @ inside.T
    np.testing.assert_allclose(detector.score_samples(queries), 0.0, atol=1e-7)
    offsets = rng.normal(size=(10, 5))
    expected = -np.linalg.norm(offsets, axis=1)
    np.testing.assert_allclose(detector.score_samples(queries + offsets @ outside.T), expected)


def test_vim_refuses_a_dim_that_leaves_no_residual(data: Data) -> None:
    with pytest.raises(InvalidParameterError, match=r"dim=16 leaves no residual.*use dim < 16"):
        fitted("vim", data, dim=16)


# -- ReAct ----------------------------------------------------------------------------------


def test_react_at_percentile_100_is_the_plain_energy(data: Data) -> None:
    detector = fitted("react", data, percentile=100)
    assert detector.threshold_ == pytest.approx(float(data.train.max()))
    np.testing.assert_allclose(
        detector.score_samples(data.train), energy(data.logits(data.train)), 1e-12
    )


@pytest.mark.parametrize("percentile", [50, 90])
def test_react_clips_at_the_training_percentile(data: Data, percentile: float) -> None:
    detector = fitted("react", data, percentile=percentile)
    # over all entries, as compute_threshold.py
    clip = np.percentile(data.train.astype(np.float64), percentile)
    assert detector.threshold_ == pytest.approx(clip)
    queries = np.vstack([data.test, data.ood])
    expected = energy(data.logits(np.clip(queries, None, clip)))
    np.testing.assert_allclose(detector.score_samples(queries), expected, 1e-12)


# -- ASH and SCALE: the authors' shaping of a (b, D, 1, 1) map ------------------------------


def ash_reference(features: Array, variant: str, percentile: float) -> Array:
    """ash_p / ash_b / ash_s of andrijazz/ash (``ash.py``) and SCALE's ``scale``."""
    x = torch.tensor(features, dtype=torch.float64)[:, :, None, None]
    original = x.clone()
    b, c, h, w = x.shape
    s1 = x.sum(dim=[1, 2, 3])
    n = x.shape[1:].numel()
    k = n - int(np.round(n * percentile / 100.0))
    t = x.view((b, c * h * w))
    v, i = torch.topk(t, k, dim=1)
    if variant == "ash-b":
        t.zero_().scatter_(dim=1, index=i, src=(s1 / k).unsqueeze(dim=1).expand(v.shape))
    else:
        t.zero_().scatter_(dim=1, index=i, src=v)
    if variant in ("ash-s", "scale"):
        s2 = x.sum(dim=[1, 2, 3])
        x = (original if variant == "scale" else x) * torch.exp(s1 / s2)[:, None, None, None]
    return np.asarray(x.view(b, -1).numpy(), dtype=np.float64)


@pytest.mark.parametrize("name", ["ash-p", "ash-b", "ash-s", "scale"])
@pytest.mark.parametrize("percentile", [0, 65, 90, 95])  # 95: one unit of 16 kept
def test_ash_and_scale_equal_the_authors_shaping(data: Data, name: str, percentile: int) -> None:
    queries = np.vstack([data.test, data.ood]).astype(np.float64)
    detector = fitted(name, data, percentile=percentile)
    expected = energy(data.logits(ash_reference(queries, name, percentile)))
    np.testing.assert_allclose(detector.score_samples(queries), expected, 1e-10)


@pytest.mark.parametrize("name", ["ash-s", "scale"])
def test_ash_s_and_scale_torch_scores_of_float64_features_reach_past_float32(name: str) -> None:
    """At percentile 99.5 of 1280 dense non-negative units, s1/s2 reaches ~100, past float32's
    ln(max) of 88.7: the torch score of float32 features overflows (its documented limit), and
    that of float64 features equals the float64 numpy score, with a finite gradient."""
    import torch

    rng = np.random.default_rng(0)
    features = rng.random((40, 1280))
    weight, bias = rng.normal(0, 0.01, (5, 1280)), rng.normal(size=5)
    detector = create_detector(name, percentile=99.5, head_weight=weight, head_bias=bias)
    detector.fit(features)
    expected = detector.score_samples(features)
    assert np.isfinite(expected).all() and expected.max() > 1e30  # beyond exp(88)
    tensor = torch.tensor(features, dtype=torch.float64, requires_grad=True)
    scores = detector.score_samples_torch(tensor)
    np.testing.assert_allclose(scores.detach().numpy(), expected, rtol=1e-9)
    scores.sum().backward()
    assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
    single = detector.score_samples_torch(torch.tensor(features, dtype=torch.float32))
    assert not torch.isfinite(single).all()


def test_ash_p_at_percentile_0_is_the_plain_energy(data: Data) -> None:
    queries = np.vstack([data.test, data.ood])
    np.testing.assert_allclose(
        fitted("ash-p", data, percentile=0).score_samples(queries),
        energy(data.logits(queries)),
        1e-12,
    )


def test_kept_units_is_the_authors_count() -> None:
    assert [kept_units(2048, p) for p in (65, 85, 90)] == [717, 307, 205]
    assert kept_units(6, 90) == 1


def test_ash_refuses_a_percentile_that_keeps_no_unit(data: Data) -> None:
    with pytest.raises(InvalidParameterError, match=r"percentile=99 keeps none of the head's 16"):
        fitted("ash-s", data, percentile=99)


@pytest.mark.parametrize("name", ["ash-s", "scale"])
def test_sharpening_stays_finite_on_features_with_negative_entries(name: str) -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(50, 8))
    detector = create_detector(name, head_weight=rng.normal(size=(3, 8)), percentile=50)
    detector.fit(train)
    queries = rng.normal(size=(200, 8))
    queries[0] = -np.abs(queries[0])  # every entry negative: s2 < 0
    queries[1] = 0.0  # s1 = s2 = 0
    queries[2, :] = 1e-3
    queries[2, 0] = 5.0  # tiny s2 relative to s1 would overflow exp(s1/s2) unclipped
    queries[2, 1:4] = -2.0
    assert np.all(np.isfinite(detector.score_samples(queries)))


def test_ash_keeps_exactly_k_units_breaking_ties_by_lowest_index() -> None:
    detector = create_detector("ash-p", head_weight=np.eye(4), percentile=50).fit(np.ones((3, 4)))
    shaped = detector.shape(np.array([[3.0, 2.0, 2.0, 1.0], [0.0, 0.0, 0.0, 1.0]]))  # k = 2
    np.testing.assert_array_equal(shaped, [[3.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    torch_shaped = detector._shape_torch(torch.tensor([[0.0, 0.0, 0.0, 1.0]]))
    np.testing.assert_array_equal(torch_shaped.numpy(), [[0.0, 0.0, 0.0, 1.0]])


def test_ash_b_fills_k_units_with_the_rows_mean_over_them_when_most_units_are_zero() -> None:
    # post-ReLU features: 10 of 16 units are 0, and ASH-B at p = 50 keeps k = 8 units, so two
    # zeros are kept and get the fill s1 / 8 as well (the authors' topk keeps 8 too)
    rng = np.random.default_rng(0)
    features = np.zeros((20, 16))
    features[:, :6] = rng.uniform(1, 2, size=(20, 6))
    detector = create_detector("ash-b", head_weight=rng.normal(size=(3, 16)), percentile=50)
    detector.fit(features)
    shaped = detector.shape(features)
    assert np.all(np.count_nonzero(shaped, axis=1) == 8)
    np.testing.assert_allclose(shaped.sum(axis=1), features.sum(axis=1))
    np.testing.assert_allclose(shaped[:, :8], features.sum(axis=1, keepdims=True) / 8 * np.ones(8))
    torch_scores = detector.score_samples_torch(torch.tensor(features, dtype=torch.float32))
    np.testing.assert_allclose(torch_scores.numpy(), detector.score_samples(features), 1e-5)


# -- DICE -----------------------------------------------------------------------------------


def test_dice_at_sparsity_0_is_the_plain_energy(data: Data) -> None:
    queries = np.vstack([data.test, data.ood])
    np.testing.assert_allclose(
        fitted("dice", data, sparsity=0).score_samples(queries), energy(data.logits(queries)), 1e-12
    )


def test_dice_equals_the_authors_route_dice(data: Data) -> None:
    # RouteDICE.calculate_mask_weight: contrib > np.percentile(contrib, p); 80 weights at
    # p = 90 keep the same 8 as the top-count rule
    contrib = data.train.astype(np.float64).mean(axis=0)[None, :] * data.weight
    mask = contrib > np.percentile(contrib, 90)
    assert mask.sum() == round(0.1 * contrib.size)
    queries = np.vstack([data.test, data.ood]).astype(np.float64)
    expected = energy(queries @ (data.weight * mask).T + data.bias)
    detector = fitted("dice", data, sparsity=0.9)
    np.testing.assert_allclose(detector.score_samples(queries), expected, 1e-12)
    assert np.count_nonzero(detector.masked_weight_) == 8


# -- SHE ------------------------------------------------------------------------------------


def test_she_patterns_are_means_of_correctly_classified_features(data: Data) -> None:
    train = data.train.astype(np.float64)
    predictions = data.logits(train).argmax(axis=1)
    labels = data.train_labels.copy()
    labels[:5] = (labels[:5] + 1) % N_CLASSES  # a few wrong labels: excluded from the patterns
    detector = create_detector("she", **data.head()).fit(data.train, labels)
    assert detector.pattern_samples_ == "correct"
    correct = predictions == labels
    patterns = np.stack([train[correct & (labels == c)].mean(axis=0) for c in range(N_CLASSES)])
    np.testing.assert_allclose(detector.patterns_, patterns, 1e-12)
    queries = np.vstack([data.test, data.ood]).astype(np.float64)
    expected = (queries * patterns[data.logits(queries).argmax(axis=1)]).sum(axis=1)
    np.testing.assert_allclose(detector.score_samples(queries), expected, 1e-12)


def test_she_groups_by_prediction_without_labels_or_with_another_label_space(
    data: Data,
) -> None:
    train = data.train.astype(np.float64)
    predictions = data.logits(train).argmax(axis=1)
    patterns = np.stack([train[predictions == c].mean(axis=0) for c in range(N_CLASSES)])
    for labels in (None, data.train_labels + N_CLASSES, (data.train_labels + 1) % N_CLASSES):
        detector = create_detector("she", **data.head()).fit(data.train, labels)
        assert detector.pattern_samples_ == "predicted"
        np.testing.assert_allclose(detector.patterns_, patterns, 1e-12)
    # a probe or zero-shot head is built on the ID classes: its labels are always used
    shifted = (data.train_labels + 1) % N_CLASSES
    probe = create_detector("she", head="probe", **data.head()).fit(data.train, shifted)
    assert probe.pattern_samples_ == "correct"


def test_she_correct_needs_labels_of_the_heads_classes(data: Data) -> None:
    detector = create_detector("she", pattern_samples="correct", **data.head())
    with pytest.raises(InvalidParameterError, match="needs labels that index the head's 5"):
        detector.fit(data.train)


def test_she_scores_a_class_without_patterns_zero() -> None:
    weight = np.eye(3)  # class 2 is never predicted on the training features
    train = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    detector = create_detector("she", head_weight=weight).fit(train)
    np.testing.assert_array_equal(detector.pattern_counts_, [1, 1, 0])
    np.testing.assert_allclose(detector.score_samples(np.array([[0.0, 0.0, 1.0]])), [0.0])


# -- NNGuide --------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 10])
def test_nnguide_equals_the_authors_formula(data: Data, k: int) -> None:
    def unit(features: Array) -> Array:
        features = np.asarray(features, dtype=np.float64)
        return features / np.linalg.norm(features, axis=1, keepdims=True)

    bank = unit(data.train) * energy(data.logits(data.train))[:, None]  # feas · confs
    queries = np.vstack([data.test, data.ood]).astype(np.float64)
    similarities = unit(queries) @ bank.T
    guidance = -np.sort(-similarities, axis=1)[:, :k].mean(axis=1)  # faiss IndexFlatIP top-k
    expected = guidance * energy(data.logits(queries))
    detector = fitted("nnguide", data, k=k)
    np.testing.assert_allclose(detector.score_samples(queries), expected, rtol=1e-6)


def test_nnguide_refuses_more_neighbours_than_training_samples(data: Data) -> None:
    with pytest.raises(InvalidParameterError, match="k=201 is larger than the 200 training"):
        fitted("nnguide", data, k=201)


# -- fDBD -----------------------------------------------------------------------------------


def test_fdbd_equals_the_authors_formula_averaged_over_the_other_classes(data: Data) -> None:
    weight = torch.tensor(data.weight)
    train_mean = torch.tensor(data.train.astype(np.float64)).mean(dim=0)
    denominator_matrix = torch.zeros((N_CLASSES, N_CLASSES), dtype=torch.float64)
    for p in range(N_CLASSES):  # run_imagenet.py of litianliu/fDBD-OOD
        denominator = torch.norm(weight - weight[p, :], dim=1)
        denominator[p] = 1
        denominator_matrix[p, :] = denominator
    queries = np.vstack([data.test, data.ood]).astype(np.float64)
    logits = torch.tensor(data.logits(queries))
    values, nn_idx = logits.max(1)
    logits_sub = torch.abs(logits - values.repeat(N_CLASSES, 1).T)
    feats = torch.tensor(queries)
    authors = torch.sum(logits_sub / denominator_matrix[nn_idx], axis=1) / torch.norm(
        feats - train_mean, dim=1
    )
    expected = authors.numpy() / (N_CLASSES - 1)
    np.testing.assert_allclose(fitted("fdbd", data).score_samples(queries), expected, 1e-9)


def test_fdbd_refuses_a_head_with_identical_class_rows(data: Data) -> None:
    weight = data.weight.copy()
    weight[3] = weight[1]
    detector = create_detector("fdbd", head_weight=weight)
    with pytest.raises(InvalidParameterError, match="classes 1 and 3 of the head have the same"):
        detector.fit(data.train)


# -- the zero-shot head: every method sees the joint-space embedding ------------------------


@pytest.mark.parametrize("name", POSTHOC)
def test_a_projection_maps_the_features_first(name: str, data: Data) -> None:
    rng = np.random.default_rng(1)
    projection = rng.normal(size=(N_DIMS, 8))

    def joint(features: npt.ArrayLike) -> Array:
        unit = np.asarray(features, np.float64)
        unit = unit / np.linalg.norm(unit, axis=1, keepdims=True) @ projection
        return np.asarray(unit / np.linalg.norm(unit, axis=1, keepdims=True), np.float64)

    weight = 10 * rng.normal(size=(N_CLASSES, 8))
    params = {"dim": 4} if name.startswith("vim") else {}
    params |= {"percentile": 50} if name in ("ash-p", "ash-b", "ash-s", "scale") else {}
    projected = create_detector(
        name, head="zero-shot", head_weight=weight, image_projection=projection, **params
    ).fit(data.train, data.train_labels)
    mapped = create_detector(name, head="zero-shot", head_weight=weight, **params)
    mapped.fit(joint(data.train), data.train_labels)
    queries = np.vstack([data.test, data.ood])
    np.testing.assert_allclose(
        projected.score_samples(queries), mapped.score_samples(joint(queries)), 1e-9, 1e-12
    )


# -- the contract: fit, input checks, torch scores, files -----------------------------------


# small settings for 16 dims and 200 samples (at ASH-S's and SCALE's ImageNet percentiles,
# 2 of 16 units are kept; DICE's p = 0.9 keeps 8 of 80 weights)
SMALL: dict[str, dict[str, Any]] = {
    "vim": {"dim": 6},
    "vim-residual": {"dim": 6},
    "ash-s": {"percentile": 50},
    "scale": {"percentile": 50},
    "dice": {"sparsity": 0.5},
    "nnguide": {"k": 5},
}


def params_for(name: str) -> dict[str, Any]:
    return SMALL.get(name, {})


@pytest.mark.parametrize("name", POSTHOC)
def test_fit_returns_self_without_mutating_input_and_separates_ood(name: str, data: Data) -> None:
    detector = create_detector(name, **data.head(), **params_for(name))
    train, labels = data.train.copy(), data.train_labels.copy()
    weight = data.weight.copy()
    queries = np.vstack([data.test, data.ood]).astype(np.float64)
    before = queries.copy()
    assert detector.fit(train, labels) is detector
    scores = detector.score_samples(queries)
    np.testing.assert_array_equal(train, data.train)
    np.testing.assert_array_equal(labels, data.train_labels)
    np.testing.assert_array_equal(queries, before)
    np.testing.assert_array_equal(weight, data.weight)
    assert scores.dtype == np.float64 and scores.shape == (100,) and np.all(np.isfinite(scores))
    truth = np.r_[np.ones(len(data.test)), np.zeros(len(data.ood))]
    assert roc_auc_score(truth, scores) > 0.85, name


@pytest.mark.parametrize("name", POSTHOC)
def test_unfitted_and_misshapen_inputs_are_refused(name: str, data: Data) -> None:
    detector = create_detector(name, **data.head(), **params_for(name))
    with pytest.raises(NotFittedError):
        detector.score_samples(data.test)
    with pytest.raises(NotFittedError):
        detector.score_samples_torch(torch.tensor(data.test))
    detector.fit(data.train, data.train_labels)
    with pytest.raises(InvalidParameterError, match="has 15 dimensions but the detector was"):
        detector.score_samples(data.test[:, :15])
    with pytest.raises(InvalidParameterError, match=r"must have shape \(n_samples, 16\)"):
        detector.score_samples_torch(torch.tensor(data.test[:, :15]))
    with pytest.raises(InvalidParameterError, match="head_weight has shape"):
        create_detector(name, head_weight=data.weight[:, :15]).fit(data.train, data.train_labels)
    with pytest.raises(InvalidParameterError, match=r"head_bias must be a finite \(5,\) array"):
        create_detector(name, head_weight=data.weight, head_bias=np.zeros(4)).fit(data.train)


@pytest.mark.parametrize("name", POSTHOC)
def test_torch_scores_match_numpy_and_have_gradients(name: str, data: Data) -> None:
    detector = fitted(name, data, **params_for(name))
    queries = np.vstack([data.test[:10], data.ood[:10]])
    features = torch.tensor(queries, dtype=torch.float32, requires_grad=True)
    scores = detector.score_samples_torch(features)
    assert scores.dtype == torch.float32 and scores.shape == (20,)
    expected = detector.score_samples(queries)
    np.testing.assert_allclose(scores.detach().double().numpy(), expected, rtol=1e-5, atol=1e-5)
    scores.sum().backward()
    assert features.grad is not None and torch.all(torch.isfinite(features.grad))
    assert torch.count_nonzero(features.grad) > 0
    # bf16 input: computed in float32, close to the float64 score of the rounded input
    rounded = torch.tensor(queries, dtype=torch.bfloat16, requires_grad=True)
    half = detector.score_samples_torch(rounded)
    assert half.dtype == torch.float32
    exact = detector.score_samples(rounded.detach().double().numpy())
    np.testing.assert_allclose(half.detach().double().numpy(), exact, rtol=1e-4, atol=1e-4)
    half.sum().backward()
    assert rounded.grad is not None and rounded.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("name", POSTHOC)
def test_save_load_round_trip_keeps_parameters_state_and_scores(
    name: str, data: Data, tmp_path: Path
) -> None:
    detector = fitted(name, data, **params_for(name))
    path = save_detector(detector, tmp_path / f"{name}.safetensors")
    loaded = load_detector(path)
    assert type(loaded) is type(detector)
    params = loaded.get_params()
    assert params.keys() == detector.get_params().keys()
    np.testing.assert_array_equal(params["head_weight"], data.weight)
    state, loaded_state = detector._get_state(), loaded._get_state()
    assert state.keys() == loaded_state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(loaded_state[key], value, err_msg=key)
    queries = np.vstack([data.test, data.ood])
    np.testing.assert_array_equal(loaded.score_samples(queries), detector.score_samples(queries))
    torch_scores = loaded.score_samples_torch(torch.tensor(queries, dtype=torch.float64))
    np.testing.assert_allclose(torch_scores.numpy(), detector.score_samples(queries), 1e-9)


def test_she_asks_the_runner_for_labels_where_they_index_the_head() -> None:
    """``correct`` needs labels; ``auto`` uses them when the ID set has them, else predicts."""
    from oodprobe.benchmark_spec import DetectorSpec
    from oodprobe.pipeline import fit_labels, needs_labels

    cls = DETECTORS["she"]
    assert cls.needs_labels({"pattern_samples": "correct"})
    assert not cls.needs_labels({}) and not cls.needs_labels({"head": "zero-shot"})
    assert not cls.needs_labels({"pattern_samples": "predicted"})
    assert cls.uses_labels({}) and cls.uses_labels({"head": "zero-shot"})
    assert not cls.uses_labels({"pattern_samples": "predicted"})
    assert not DETECTORS["react"].needs_labels({"head": "probe"})  # the probe's own need aside
    # the runner: an unlabelled ID set is no reason to refuse zero-shot SHE; labels go to fit
    zero_shot = DetectorSpec("she", {"head": "zero-shot"})
    assert not needs_labels(zero_shot)
    assert needs_labels(DetectorSpec("she", {"head": "probe"}))  # the probe needs them
    labels = np.array([3, 1, 3])
    detector = create_detector("she", head="zero-shot")
    # as the indices of the zero-shot head's rows (the sorted classes present)
    np.testing.assert_array_equal(fit_labels(detector, zero_shot, labels), [1, 0, 1])
    predicted = DetectorSpec("she", {"pattern_samples": "predicted"})
    grouped = create_detector("she", pattern_samples="predicted")
    assert fit_labels(grouped, predicted, labels) is None


def test_scores_are_blocked_rows_of_one_computation(
    data: Data, monkeypatch: pytest.MonkeyPatch
) -> None:
    from oodprobe.detectors import posthoc

    queries = np.vstack([data.test, data.ood])
    detectors = {name: fitted(name, data, **params_for(name)) for name in POSTHOC}
    whole = {name: detector.score_samples(queries) for name, detector in detectors.items()}
    monkeypatch.setattr(posthoc, "_BLOCK_ELEMENTS", 1)  # one row per block
    for name, detector in detectors.items():
        blocked = detector.score_samples(queries)
        np.testing.assert_allclose(blocked, whole[name], rtol=1e-12, atol=1e-12, err_msg=name)
