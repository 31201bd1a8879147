"""Tests for oodprobe.metrics: hand-checked vectors, analytic Gaussian values, peer conventions."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import mannwhitneyu, multivariate_normal, norm
from sklearn.metrics import auc, precision_recall_curve, roc_curve

from oodprobe.errors import InvalidParameterError, UnknownNameError
from oodprobe.metrics import (
    AUPR_METHODS,
    CONVENTIONS,
    FPR_RULES,
    MetricConvention,
    _Grouping,
    _replicate_metrics,
    aupr,
    auroc,
    evaluate,
    fpr_at_tpr,
    get_convention,
)

Z95 = float(norm.ppf(0.95))

# reference/METRICS.md exact vector: ID = 0..99, OOD = -50..49. Scores 50..99 are ID only, each of
# 0..49 is one ID and one OOD tie, -50..-1 are OOD only. ROC (ID positive): (0, 0) up to
# (0, 0.5), then a diagonal of 50 tied steps to (0.5, 1), then flat to (1, 1).
ID_VECTOR = np.arange(100.0)
OOD_VECTOR = np.arange(-50.0, 50.0)


def grid(mean: float, std: float, n: int) -> npt.NDArray[np.float64]:
    """n evenly spaced quantiles of N(mean, std²): an 'ideal sample' with no sampling noise."""
    return np.asarray(norm.ppf((np.arange(n) + 0.5) / n, mean, std), dtype=np.float64)


# --------------------------------------------------------------------------------------------
# the exact METRICS.md vector


def test_metrics_md_vector_auroc() -> None:
    # ID 50..99 beat all 100 OOD; ID i in 0..49 beats i + 50 OOD and ties one (½):
    # (50 * 100 + sum(i + 50.5 for i < 50)) / 100² = (5000 + 3750) / 10000.
    assert auroc(ID_VECTOR, OOD_VECTOR) == 0.875


@pytest.mark.parametrize(
    ("tpr", "rule", "expected"),
    [
        # At 0.95 the ROC has a point exactly at TPR 0.95 (threshold 5: ID 5..99, OOD 5..49):
        (0.95, "first", 0.45),
        (0.95, "nearest", 0.45),
        (0.95, "interpolate", 0.45),
        (0.95, "interp-sklearn", 0.45),  # the point lies on the diagonal: no flat stretch
        # quantile: threshold = 5th smallest ID (index round(0.05*100) = 5) = 5; OOD > 5: 6..49.
        (0.95, "quantile", 0.44),
        # At 0.952 the rules separate. TPR points 0.95 (FPR 0.45) and 0.96 (threshold 4, FPR 0.46):
        (0.952, "first", 0.46),  # first TPR >= 0.952 is 0.96
        (0.952, "nearest", 0.45),  # |0.95 - 0.952| < |0.96 - 0.952|
        (0.952, "interpolate", 0.452),  # on the diagonal FPR = TPR - 0.5
        (0.952, "interp-sklearn", 0.452),
        (0.952, "quantile", 0.44),  # round(4.8) = 5 -> threshold 5 again
        (0.957, "nearest", 0.46),  # now 0.96 is nearer
        (0.957, "interpolate", 0.457),
        (1.0, "first", 0.5),  # ID 0 kept: OOD 0..49 accepted
        (1.0, "interp-sklearn", 1.0),  # np.interp at TPR 1: the end of the flat top, (1, 1)
        (0.5, "first", 0.0),  # ID 50..99 only
    ],
)
def test_metrics_md_vector_fpr_rules(tpr: float, rule: str, expected: float) -> None:
    value = fpr_at_tpr(ID_VECTOR, OOD_VECTOR, tpr=tpr, rule=rule)  # type: ignore[arg-type]
    assert value == pytest.approx(expected, abs=1e-12)
    # The vector is mirror-symmetric (-OOD = -49..50 is ID shifted), so OOD-positive is equal.
    mirrored = fpr_at_tpr(ID_VECTOR, OOD_VECTOR, tpr=tpr, positive="ood", rule=rule)  # type: ignore[arg-type]
    assert mirrored == pytest.approx(expected, abs=1e-12)


def test_sklearn_default_roc_skips_the_first_point_on_ties() -> None:
    # Why roc_curve(..., drop_intermediate=False): the default keeps only the diagonal's corners.
    labels = np.r_[np.ones(100), np.zeros(100)]
    fpr, tpr, _ = roc_curve(labels, np.r_[ID_VECTOR, OOD_VECTOR])
    assert fpr[np.argmax(tpr >= 0.95)] == 0.5
    assert fpr_at_tpr(ID_VECTOR, OOD_VECTOR) == 0.45


def test_metrics_md_vector_aupr() -> None:
    # ID positive: thresholds 99..50 give precision 1 up to recall 0.5; threshold t in 49..0
    # adds one ID and one OOD: recall (100 - t)/100, precision (100 - t)/(150 - 2t).
    precisions = {t: (100 - t) / (150 - 2 * t) for t in range(50)}
    average_precision = 0.5 + sum(0.01 * p for p in precisions.values())
    trapezoid = 0.5 + sum(
        0.01 * (precisions[t] + precisions.get(t + 1, 1.0)) / 2 for t in range(50)
    )
    assert aupr(ID_VECTOR, OOD_VECTOR) == pytest.approx(average_precision, abs=1e-12)
    assert aupr(ID_VECTOR, OOD_VECTOR, method="trapezoid") == pytest.approx(trapezoid, abs=1e-12)
    assert aupr(ID_VECTOR, OOD_VECTOR, positive="ood") == pytest.approx(average_precision)
    assert round(average_precision, 4) == 0.8857 and round(trapezoid, 4) == 0.8873


def test_average_precision_and_trapezoid_differ_by_hand() -> None:
    # ID [3, 1], OOD [2]. Descending: 3 (ID), 2 (OOD), 1 (ID).
    # AUPR-In points (recall, precision): (0.5, 1), (0.5, 1/2), (1, 2/3).
    #   AP = 0.5 * 1 + 0.5 * 2/3 = 5/6;
    #   trapezoid from (0, 1): 0.5 + 0 + 0.5 * (1/2 + 2/3) / 2 = 19/24.
    # AUPR-Out ranks -scores: -1 (ID), -2 (OOD), -3 (ID): points (0, 0), (1, 1/2), (1, 1/3).
    #   AP = 1 * 1/2; trapezoid: (0, 1) -> (0, 0) -> (1, 1/2) = 1/4.
    assert aupr([3, 1], [2]) == pytest.approx(5 / 6)
    assert aupr([3, 1], [2], method="trapezoid") == pytest.approx(19 / 24)
    assert aupr([3, 1], [2], positive="ood") == pytest.approx(1 / 2)
    assert aupr([3, 1], [2], positive="ood", method="trapezoid") == pytest.approx(1 / 4)
    assert auroc([3, 1], [2]) == 0.5


# --------------------------------------------------------------------------------------------
# Gaussian scores: analytic values


def analytic(id_mean: float, id_std: float, ood_mean: float, ood_std: float) -> dict[str, float]:
    """AUROC = Φ(Δμ / √(σ²_id + σ²_ood)); FPRs at the exact 95 % quantiles."""
    id_threshold = id_mean - Z95 * id_std  # keeps 95 % of ID
    ood_threshold = ood_mean + Z95 * ood_std  # 95 % of OOD at or below it
    return {
        "auroc": float(norm.cdf((id_mean - ood_mean) / np.hypot(id_std, ood_std))),
        "fpr_id": float(norm.sf(id_threshold, ood_mean, ood_std)),  # OOD accepted
        "fpr_ood": float(norm.cdf(ood_threshold, id_mean, id_std)),  # ID rejected
    }


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # reference/METRICS.md quotes 89.5 / 21.3 / 83.7 from one random draw; exact values:
        ((2.0, 0.5, 0.0, 1.5), {"auroc": 0.8970, "fpr_id": 0.2162, "fpr_ood": 0.8250}),
        ((1.0, 1.0, 0.0, 1.0), {"auroc": 0.7602, "fpr_id": 0.7405, "fpr_ood": 0.7405}),
    ],
)
def test_gaussian_quantile_grid_matches_analytic(
    params: tuple[float, float, float, float], expected: dict[str, float]
) -> None:
    exact = analytic(*params)
    assert exact == pytest.approx(expected, abs=1e-4)
    id_scores, ood_scores = grid(*params[:2], 10_000), grid(*params[2:], 10_000)
    assert auroc(id_scores, ood_scores) == pytest.approx(exact["auroc"], abs=1e-3)
    for rule in FPR_RULES:
        fpr_id = fpr_at_tpr(id_scores, ood_scores, rule=rule)  # type: ignore[arg-type]
        fpr_ood = fpr_at_tpr(id_scores, ood_scores, positive="ood", rule=rule)  # type: ignore[arg-type]
        assert fpr_id == pytest.approx(exact["fpr_id"], abs=2e-3)
        assert fpr_ood == pytest.approx(exact["fpr_ood"], abs=2e-3)


@pytest.mark.parametrize(
    ("params", "tolerance"),
    [
        # ~4 sampling SDs at n = 10,000 (delta method on the 95 % quantile + binomial share):
        # SD(AUROC) ≈ 0.002, SD(FPR ID+) ≈ 0.005, SD(FPR OOD+) ≈ 0.017 (so 83.7 is one draw).
        ((2.0, 0.5, 0.0, 1.5), {"auroc": 0.01, "fpr_id": 0.02, "fpr_ood": 0.07}),
        # SD(FPR) ≈ 0.008 both ways; METRICS.md's "≈ 73" is 1.2 SD from the exact 74.05.
        ((1.0, 1.0, 0.0, 1.0), {"auroc": 0.01, "fpr_id": 0.03, "fpr_ood": 0.03}),
    ],
)
def test_gaussian_random_draw_within_sampling_error(
    params: tuple[float, float, float, float], tolerance: dict[str, float]
) -> None:
    rng = np.random.default_rng(0)
    id_scores = rng.normal(params[0], params[1], 10_000)
    ood_scores = rng.normal(params[2], params[3], 10_000)
    exact = analytic(*params)
    oodprobe = evaluate(id_scores, ood_scores)
    openood = evaluate(id_scores, ood_scores, convention="openood")
    assert oodprobe.auroc == openood.auroc
    assert oodprobe.auroc == pytest.approx(exact["auroc"], abs=tolerance["auroc"])
    assert oodprobe.fpr == pytest.approx(exact["fpr_id"], abs=tolerance["fpr_id"])
    assert openood.fpr == pytest.approx(exact["fpr_ood"], abs=tolerance["fpr_ood"])


# --------------------------------------------------------------------------------------------
# edge cases and properties


def test_perfect_separation_and_its_reverse() -> None:
    for rule in FPR_RULES:
        for positive in ("id", "ood"):
            best = fpr_at_tpr([2, 3], [0, 1], rule=rule, positive=positive)  # type: ignore[arg-type]
            worst = fpr_at_tpr([0, 1], [2, 3], rule=rule, positive=positive)  # type: ignore[arg-type]
            assert (best, worst) == (0.0, 1.0)
    assert auroc([2, 3], [0, 1]) == 1.0
    assert auroc([0, 1], [2, 3]) == 0.0
    for method in AUPR_METHODS:
        assert aupr([2, 3], [0, 1], method=method) == 1.0  # type: ignore[arg-type]
        assert aupr([2, 3], [0, 1], method=method, positive="ood") == 1.0  # type: ignore[arg-type]


def test_identical_distributions() -> None:
    scores = np.arange(100.0)
    assert auroc(scores, scores) == 0.5
    # Keeping 95 ID accepts the same 95 OOD.
    assert fpr_at_tpr(scores, scores) == 0.95
    assert fpr_at_tpr(scores, scores, positive="ood") == 0.95


def test_all_scores_tied() -> None:
    # One threshold only: accept everything; the ROC is the diagonal (0, 0) -> (1, 1).
    # AP = precision there = 3 / 5.
    assert auroc([1, 1, 1], [1, 1]) == 0.5
    for rule in ("first", "nearest"):
        assert fpr_at_tpr([1, 1, 1], [1, 1], rule=rule) == 1.0
    assert fpr_at_tpr([1, 1, 1], [1, 1], rule="interpolate") == pytest.approx(0.95)
    assert fpr_at_tpr([1, 1, 1], [1, 1], rule="interp-sklearn") == pytest.approx(0.95)
    assert fpr_at_tpr([1, 1, 1], [1, 1], rule="quantile") == 0.0  # strictly above only
    assert aupr([1, 1, 1], [1, 1]) == pytest.approx(0.6)


def test_single_samples_and_integer_input() -> None:
    assert auroc([1], [0]) == 1.0
    assert fpr_at_tpr([0], [1]) == 1.0
    assert auroc(np.array([3, 1], dtype=np.int32), [2]) == 0.5


def test_inputs_are_not_modified() -> None:
    id_scores, ood_scores = ID_VECTOR.copy(), OOD_VECTOR.copy()
    evaluate(id_scores, ood_scores, convention="openood", bootstrap=5)
    np.testing.assert_array_equal(id_scores, ID_VECTOR)
    np.testing.assert_array_equal(ood_scores, OOD_VECTOR)


tied_scores = st.lists(st.integers(-5, 5), min_size=1, max_size=30).map(
    lambda values: np.asarray(values, dtype=np.float64)
)
distinct_floats = st.lists(
    st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False),
    min_size=2,
    max_size=40,
    unique=True,
)


@settings(max_examples=60, deadline=None)
@given(tied_scores, tied_scores)
def test_auroc_is_antisymmetric_and_equals_mann_whitney(
    id_scores: npt.NDArray[np.float64], ood_scores: npt.NDArray[np.float64]
) -> None:
    value = auroc(id_scores, ood_scores)
    assert value == pytest.approx(1.0 - auroc(ood_scores, id_scores), abs=1e-12)
    u_statistic = mannwhitneyu(id_scores, ood_scores).statistic  # counts ties as ½
    assert value == pytest.approx(u_statistic / (id_scores.size * ood_scores.size), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(tied_scores, tied_scores, st.sampled_from(FPR_RULES), st.floats(0.01, 1.0))
def test_ood_positive_is_id_positive_of_the_mirrored_scores(
    id_scores: npt.NDArray[np.float64],
    ood_scores: npt.NDArray[np.float64],
    rule: str,
    tpr: float,
) -> None:
    ood_positive = fpr_at_tpr(id_scores, ood_scores, tpr=tpr, positive="ood", rule=rule)  # type: ignore[arg-type]
    mirrored = fpr_at_tpr(-ood_scores, -id_scores, tpr=tpr, rule=rule)  # type: ignore[arg-type]
    assert ood_positive == mirrored
    assert 0.0 <= ood_positive <= 1.0


@settings(max_examples=60, deadline=None)
@given(distinct_floats, st.floats(0.01, 1.0))
def test_interpolate_equals_first_without_ties(values: list[float], tpr: float) -> None:
    # Without ties every ROC step is vertical or horizontal, so interpolation changes nothing.
    id_scores, ood_scores = np.asarray(values[::2]), np.asarray(values[1::2])
    first = fpr_at_tpr(id_scores, ood_scores, tpr=tpr, rule="first")
    assert fpr_at_tpr(id_scores, ood_scores, tpr=tpr, rule="interpolate") == first


# --------------------------------------------------------------------------------------------
# peers' numbers: small re-implementations of their published evaluation code


def openood_v15(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[float, float, float]:
    """OpenOOD >= v1.5 evaluator: OOD positive, roc_curve defaults, argmax(tpr >= 0.95)."""
    conf = np.r_[id_scores, ood_scores]
    ood_indicator = np.r_[np.zeros(id_scores.size), np.ones(ood_scores.size)]
    fpr, tpr, _ = roc_curve(ood_indicator, -conf)
    precision_in, recall_in, _ = precision_recall_curve(1 - ood_indicator, conf)
    precision_out, recall_out, _ = precision_recall_curve(ood_indicator, -conf)
    return (
        float(fpr[np.argmax(tpr >= 0.95)]),
        float(auc(recall_in, precision_in)),
        float(auc(recall_out, precision_out)),
    )


def energy_style_fpr(positive: np.ndarray, negative: np.ndarray, recall_level: float) -> float:
    """MCM / energy / outlier-exposure ``fpr_and_fdr_at_recall`` (ID positive in MCM)."""
    scores = np.r_[positive, negative]
    labels = np.r_[np.ones(positive.size), np.zeros(negative.size)]
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, labels = scores[order], labels[order]
    threshold_indices = np.r_[np.where(np.diff(scores))[0], labels.size - 1]
    true_positives = np.cumsum(labels)[threshold_indices]
    false_positives = 1 + threshold_indices - true_positives
    recall = true_positives / true_positives[-1]
    last = true_positives.searchsorted(true_positives[-1])
    recall, false_positives = recall[last::-1], false_positives[last::-1]
    return float(false_positives[np.argmin(np.abs(recall - recall_level))] / negative.size)


def deep_knn_fpr(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Deep k-NN ``get_curve``: threshold = known[round(0.05 n)], FPR = share of novel above."""
    known = np.sort(id_scores)
    threshold = known[round(0.05 * known.size)]
    return float(np.sum(ood_scores > threshold) / ood_scores.size)


def plp_authors_fpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    """The PLP authors' ``fpr95_score`` (reference/METRICS.md): ID positive, sklearn defaults."""
    labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    fpr, tpr_curve, _ = roc_curve(labels, np.r_[id_scores, ood_scores])  # drop_intermediate=True
    if all(tpr_curve < tpr):
        return 0.0
    if all(tpr_curve >= tpr):
        return float(min(fpr[tpr_curve >= tpr]))
    return float(np.interp(tpr, tpr_curve, fpr))


@pytest.mark.parametrize("seed", range(5))
def test_openood_and_pytorch_ood_presets_match_their_code_on_continuous_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    id_scores, ood_scores = rng.normal(1.0, 1.0, 997), rng.normal(0.0, 1.5, 503)
    fpr, aupr_in, aupr_out = openood_v15(id_scores, ood_scores)
    for name in ("openood", "pytorch-ood"):
        result = evaluate(id_scores, ood_scores, convention=name)
        assert result.fpr == fpr
        assert result.aupr_in == pytest.approx(aupr_in, abs=1e-12)
        assert result.aupr_out == pytest.approx(aupr_out, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_mcm_preset_matches_energy_style_code_even_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    tied = rng.integers(0, 30, 211).astype(float), rng.integers(-10, 20, 157).astype(float)
    # Continuous scores: OOD runs between two ID scores make flat ROC stretches, where the
    # reference code keeps the *last* point (largest FPR) at the nearest recall.
    continuous = rng.normal(1.0, 1.0, 200), rng.normal(0.0, 1.0, 1000)
    for id_scores, ood_scores in (tied, continuous):
        for tpr in (0.95, 0.9, 0.5, 0.999):
            expected = energy_style_fpr(id_scores, ood_scores, tpr)
            assert evaluate(id_scores, ood_scores, convention="mcm", tpr=tpr).fpr == expected


@pytest.mark.parametrize("seed", range(5))
def test_deep_knn_preset_matches_their_code(seed: int) -> None:
    rng = np.random.default_rng(seed)
    id_scores = rng.integers(0, 40, 301).astype(float)
    ood_scores = rng.integers(-10, 30, 199).astype(float)
    assert evaluate(id_scores, ood_scores, convention="deep-knn").fpr == deep_knn_fpr(
        id_scores, ood_scores
    )


def test_conventions_table() -> None:
    table = {
        name: (conv.positive, conv.rule, conv.aupr_method) for name, conv in CONVENTIONS.items()
    }
    assert table == {
        "oodprobe": ("id", "first", "average_precision"),
        "openood": ("ood", "first", "trapezoid"),
        "openood-v1": ("id", "first", "trapezoid"),
        "pytorch-ood": ("ood", "first", "trapezoid"),
        "mcm": ("id", "nearest", "average_precision"),
        "plp": ("id", "interp-sklearn", "average_precision"),
        "clipn": ("id", "interp-sklearn", "average_precision"),
        "deep-knn": ("id", "quantile", "average_precision"),
    }
    assert all(name == conv.name and conv.description for name, conv in CONVENTIONS.items())
    assert get_convention("mcm") is CONVENTIONS["mcm"]
    custom = MetricConvention("mine", "ood", "nearest", "trapezoid")
    assert get_convention(custom) is custom


# --------------------------------------------------------------------------------------------
# evaluate and the bootstrap


def test_evaluate_record_names_its_convention() -> None:
    result = evaluate(ID_VECTOR, OOD_VECTOR, convention="openood")
    assert result.as_dict() == pytest.approx(
        {
            "auroc": 0.875,
            "fpr@95": 0.45,
            "aupr_in": 0.8873413482666093,
            "aupr_out": 0.8873413482666093,
            "n_id": 100,
            "n_ood": 100,
            "convention": "openood",
            "tpr": 0.95,
            "fpr_positive": "ood",
            "fpr_rule": "first",
            "aupr_method": "trapezoid",
        }
    )
    assert evaluate([1], [0], tpr=0.9).fpr_name == "fpr@90"
    assert evaluate([1], [0], tpr=0.952).fpr_name == "fpr@95.2"
    assert result.intervals == {}
    with pytest.raises(TypeError):
        result.intervals["auroc"] = (0.0, 1.0)  # type: ignore[index]


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_bootstrap_replicates_equal_sklearn_on_the_resampled_arrays(name: str) -> None:
    rng = np.random.default_rng(1)
    id_scores = rng.integers(0, 25, 60).astype(float)  # heavy ties, some values absent
    ood_scores = rng.integers(-10, 15, 45).astype(float)
    grouping = _Grouping.of(id_scores, ood_scores)
    id_indices = rng.integers(0, id_scores.size, (12, id_scores.size))
    ood_indices = rng.integers(0, ood_scores.size, (12, ood_scores.size))
    for tpr in (0.95, 0.5, 0.01, 1.0):
        convention = CONVENTIONS[name]
        replicates = _replicate_metrics(grouping, id_indices, ood_indices, convention, tpr)
        for row in range(12):
            expected = evaluate(
                id_scores[id_indices[row]], ood_scores[ood_indices[row]], convention=name, tpr=tpr
            )
            for metric in ("auroc", "fpr", "aupr_in", "aupr_out"):
                assert replicates[metric][row] == pytest.approx(
                    getattr(expected, metric), abs=1e-12
                ), (metric, tpr, row)


def auroc_standard_error(n_id: int, n_ood: int, delta: float) -> float:
    """Exact SD of the empirical AUROC for N(delta, 1) vs N(0, 1) (U-statistic variance)."""
    value = float(norm.cdf(delta / np.sqrt(2)))
    # P(X1 > Y, X2 > Y): (X1 - Y, X2 - Y) is bivariate normal, mean delta, var 2, cov 1.
    both = float(multivariate_normal([-delta, -delta], [[2.0, 1.0], [1.0, 2.0]]).cdf([0.0, 0.0]))
    variance = value * (1 - value) + (n_id - 1 + n_ood - 1) * (both - value**2)
    return float(np.sqrt(variance / (n_id * n_ood)))


def test_bootstrap_intervals_contain_the_estimate_match_theory_and_shrink() -> None:
    rng = np.random.default_rng(2)
    widths = {}
    for n in (500, 8000):
        id_scores, ood_scores = rng.normal(1.0, 1.0, n), rng.normal(0.0, 1.0, n)
        result = evaluate(id_scores, ood_scores, bootstrap=400, seed=3)
        for metric, (low, high) in result.intervals.items():
            assert low <= getattr(result, metric) <= high, metric
        low, high = result.intervals["auroc"]
        expected_width = 2 * norm.ppf(0.975) * auroc_standard_error(n, n, 1.0)
        assert high - low == pytest.approx(expected_width, rel=0.2)
        widths[n] = {metric: high - low for metric, (low, high) in result.intervals.items()}
    for metric in ("auroc", "fpr", "aupr_in", "aupr_out"):
        # 16x the samples: about a quarter of the width.
        assert widths[8000][metric] < 0.4 * widths[500][metric], metric


def test_bootstrap_is_deterministic_given_a_seed() -> None:
    rng = np.random.default_rng(4)
    id_scores, ood_scores = rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 300)
    first = evaluate(id_scores, ood_scores, bootstrap=50, seed=7, confidence=0.9)
    assert (
        first.as_dict()
        == evaluate(id_scores, ood_scores, bootstrap=50, seed=7, confidence=0.9).as_dict()
    )
    assert first.intervals != evaluate(id_scores, ood_scores, bootstrap=50, seed=8).intervals
    record = first.as_dict()
    assert (record["bootstrap"], record["confidence"]) == (50, 0.9)
    assert record["fpr@95_low"] <= record["fpr@95"] <= record["fpr@95_high"]


# --------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("id_scores", "ood_scores", "message"),
    [
        ([[1.0, 2.0]], [0.0], "id_scores must be 1-D (n_samples,), got shape (1, 2)"),
        (1.0, [0.0], "id_scores must be 1-D (n_samples,), got shape ()"),
        ([1.0], [], "ood_scores is empty; pass at least one score"),
        (
            [1.0, np.nan, np.inf, -np.inf, 2.0],
            [0.0],
            "id_scores contains 3 non-finite value(s) (1 NaN, 2 inf) out of 5; "
            "drop or fix those samples first",
        ),
        ([1.0], [np.nan], "ood_scores contains 1 non-finite value(s) (1 NaN, 0 inf) out of 1; "
         "drop or fix those samples first"),
        (["a"], [0.0], "id_scores must be a numeric array, got dtype <U1"),
    ],
)  # fmt: skip
def test_invalid_scores(id_scores: Any, ood_scores: Any, message: str) -> None:
    for function in (auroc, fpr_at_tpr, aupr, evaluate):
        with pytest.raises(InvalidParameterError) as raised:
            function(id_scores, ood_scores)
        assert str(raised.value) == message


@pytest.mark.parametrize(
    ("tpr", "message"),
    [
        (0, "tpr must be in (0, 1], got 0; pass a fraction (tpr=0.95 for FPR@95)"),
        (95, "tpr must be in (0, 1], got 95; pass a fraction (tpr=0.95 for FPR@95)"),
        (float("nan"), "tpr must be in (0, 1], got nan; pass a fraction (tpr=0.95 for FPR@95)"),
        ("0.95", "tpr must be a number in (0, 1], got '0.95'"),
        (True, "tpr must be a number in (0, 1], got True"),
    ],
)
def test_invalid_tpr(tpr: Any, message: str) -> None:
    for function in (fpr_at_tpr, evaluate):
        with pytest.raises(InvalidParameterError) as raised:
            function([1.0], [0.0], tpr=tpr)
        assert str(raised.value) == message


def test_unknown_names() -> None:
    cases = [
        (
            lambda: evaluate([1.0], [0.0], convention="openood-v2"),
            "unknown metric convention 'openood-v2'; choose from: clipn, deep-knn, mcm, "
            "oodprobe, openood, openood-v1, plp, pytorch-ood",
        ),
        (
            lambda: fpr_at_tpr([1.0], [0.0], rule="closest"),  # type: ignore[arg-type]
            "unknown FPR rule 'closest'; choose from: first, interp-sklearn, interpolate, nearest, "
            "quantile",
        ),
        (
            lambda: fpr_at_tpr([1.0], [0.0], positive="in"),  # type: ignore[arg-type]
            "unknown positive class 'in'; choose from: id, ood",
        ),
        (
            lambda: aupr([1.0], [0.0], method="auc"),  # type: ignore[arg-type]
            "unknown AUPR method 'auc'; choose from: average_precision, trapezoid",
        ),
        (
            lambda: MetricConvention("mine", "id", "last", "trapezoid"),  # type: ignore[arg-type]
            "unknown FPR rule 'last'; choose from: first, interp-sklearn, interpolate, nearest, "
            "quantile",
        ),
    ]
    for call, message in cases:
        with pytest.raises(UnknownNameError) as raised:
            call()
        assert str(raised.value) == message


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bootstrap": -1}, "bootstrap must be an integer >= 0 (number of resamples), got -1"),
        ({"bootstrap": 10.5}, "bootstrap must be an integer >= 0 (number of resamples), got 10.5"),
        ({"confidence": 95}, "confidence must be in (0, 1), got 95"),
        ({"confidence": "high"}, "confidence must be in (0, 1), got 'high'"),
    ],
)
def test_invalid_bootstrap_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidParameterError) as raised:
        evaluate([1.0], [0.0], **options)  # type: ignore[arg-type]
    assert str(raised.value) == message


# --------------------------------------------------------------------------------------------
# the PLP authors' FPR rule (interp-sklearn), exactly


def test_metrics_md_plp_vector() -> None:
    # ID 0..19, OOD {0.5, 0.6, 0.7, 30}. Threshold 1 keeps 19 of 20 ID (TPR 0.95 exactly) and
    # accepts only OOD 30 (FPR 0.25); lowering it past 0.7, 0.6, 0.5 keeps TPR at 0.95 while FPR
    # climbs to 1.0: a flat stretch at the target. np.interp returns its end.
    id_scores, ood_scores = np.arange(20.0), np.array([0.5, 0.6, 0.7, 30.0])
    assert plp_authors_fpr(id_scores, ood_scores) == 1.0
    assert fpr_at_tpr(id_scores, ood_scores, rule="interp-sklearn") == 1.0
    assert evaluate(id_scores, ood_scores, convention="plp").fpr == 1.0
    assert evaluate(id_scores, ood_scores, convention="clipn").fpr == 1.0
    assert fpr_at_tpr(id_scores, ood_scores, rule="first") == 0.25
    assert fpr_at_tpr(id_scores, ood_scores, rule="interpolate") == 0.25
    # Off the stretch the rules agree: at TPR 0.9 (threshold 2) only OOD 30 is accepted.
    assert fpr_at_tpr(id_scores, ood_scores, tpr=0.9, rule="interp-sklearn") == 0.25
    # OOD positive ranks by negated scores: swapped and negated inputs give the same curve.
    assert fpr_at_tpr(-ood_scores, -id_scores, positive="ood", rule="interp-sklearn") == 1.0


def _plp_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(11)
    cases = []
    # n_id a multiple of 20 (0.95 n_id an integer: the target is hit exactly), or not; heavy
    # ties (small integer ranges), light ties (rounded Gaussians) and continuous scores.
    for n_id, n_ood in ((20, 7), (40, 40), (200, 53), (1000, 1000), (37, 90), (211, 157)):
        cases.append((rng.integers(0, 15, n_id).astype(float), rng.integers(-5, 10, n_ood) * 1.0))
        cases.append((np.round(rng.normal(1, 1, n_id), 1), np.round(rng.normal(0, 1, n_ood), 1)))
        cases.append((rng.normal(1, 1, n_id), rng.normal(0, 1.5, n_ood)))
    return cases


@pytest.mark.parametrize("case", range(18))
def test_plp_convention_equals_the_authors_code(case: int) -> None:
    id_scores, ood_scores = _plp_cases()[case]
    for tpr in (0.95, 0.9, 0.5, 0.999, 1.0, 0.01, 0.975):
        expected = plp_authors_fpr(id_scores, ood_scores, tpr)
        assert abs(evaluate(id_scores, ood_scores, convention="plp", tpr=tpr).fpr - expected) <= (
            1e-12
        ), tpr
        mirrored = plp_authors_fpr(-ood_scores, -id_scores, tpr)
        ood_positive = fpr_at_tpr(
            id_scores, ood_scores, tpr=tpr, positive="ood", rule="interp-sklearn"
        )
        assert abs(ood_positive - mirrored) <= 1e-12, tpr


def test_plp_rule_differs_from_first_where_the_target_is_hit_on_a_flat_stretch() -> None:
    # 0.95 * 1000 = 950 exactly: the authors' value is the end of the flat stretch at TPR 0.95.
    rng = np.random.default_rng(5)
    id_scores, ood_scores = rng.normal(1.0, 1.0, 1000), rng.normal(0.0, 1.0, 5000)
    first = fpr_at_tpr(id_scores, ood_scores, rule="first")
    authors = plp_authors_fpr(id_scores, ood_scores)
    threshold = np.sort(id_scores)[::-1][949]  # keeps 950 ID
    next_id = np.sort(id_scores)[::-1][950]
    assert first == np.mean(ood_scores >= threshold)
    assert authors == np.mean(ood_scores > next_id)  # every OOD above the next ID score
    assert authors > first
    assert evaluate(id_scores, ood_scores, convention="plp").fpr == authors


@settings(max_examples=80, deadline=None)
@given(tied_scores, tied_scores, st.floats(0.01, 1.0))
def test_interp_sklearn_equals_the_authors_code_on_tied_scores(
    id_scores: npt.NDArray[np.float64], ood_scores: npt.NDArray[np.float64], tpr: float
) -> None:
    value = fpr_at_tpr(id_scores, ood_scores, tpr=tpr, rule="interp-sklearn")
    assert abs(value - plp_authors_fpr(id_scores, ood_scores, tpr)) <= 1e-12


@pytest.mark.parametrize(("n_id", "n_ood"), [(60, 45), (40, 13), (47, 80), (20, 20)])
def test_plp_bootstrap_replicates_equal_np_interp_on_the_resampled_arrays(
    n_id: int, n_ood: int
) -> None:
    # The count-based replicates against the authors' code on each resample, rebuilt here:
    # heavy ties, score values absent from a resample, and 0.95 n_id an integer for 60/40/20.
    rng = np.random.default_rng(n_id * 1000 + n_ood)
    id_scores = rng.integers(0, 20, n_id).astype(float)
    ood_scores = rng.integers(-8, 12, n_ood).astype(float)
    grouping = _Grouping.of(id_scores, ood_scores)
    n_rows = 40
    id_indices = rng.integers(0, n_id, (n_rows, n_id))
    ood_indices = rng.integers(0, n_ood, (n_rows, n_ood))
    flat_stretch_rows = 0
    for tpr in (0.95, 0.9, 0.5, 1.0, 0.05):
        for name in ("plp", "clipn"):
            fpr = _replicate_metrics(grouping, id_indices, ood_indices, CONVENTIONS[name], tpr)[
                "fpr"
            ]
            for row in range(n_rows):
                resampled = id_scores[id_indices[row]], ood_scores[ood_indices[row]]
                expected = plp_authors_fpr(*resampled, tpr)
                assert abs(fpr[row] - expected) <= 1e-12, (name, tpr, row)
                if tpr == 0.95 and expected != fpr_at_tpr(*resampled, rule="interpolate"):
                    flat_stretch_rows += 1
    if n_id % 20 == 0:
        assert flat_stretch_rows > 0  # the case that separates the rules did occur
    # OOD positive goes through the mirrored counts.
    mine = MetricConvention("ood-interp", "ood", "interp-sklearn", "average_precision")
    fpr = _replicate_metrics(grouping, id_indices, ood_indices, mine, 0.95)["fpr"]
    for row in range(n_rows):
        resampled = id_scores[id_indices[row]], ood_scores[ood_indices[row]]
        expected = plp_authors_fpr(-resampled[1], -resampled[0])
        assert abs(fpr[row] - expected) <= 1e-12, row


def test_plp_bootstrap_interval_brackets_the_authors_value() -> None:
    rng = np.random.default_rng(8)
    id_scores, ood_scores = np.round(rng.normal(1, 1, 400), 1), np.round(rng.normal(0, 1, 300), 1)
    result = evaluate(id_scores, ood_scores, convention="plp", bootstrap=300, seed=1)
    low, high = result.intervals["fpr"]
    assert result.fpr == plp_authors_fpr(id_scores, ood_scores)
    assert low <= result.fpr <= high
