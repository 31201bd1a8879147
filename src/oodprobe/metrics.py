"""OOD metrics with named conventions: AUROC, FPR at a TPR, AUPR, bootstrap confidence intervals.

Every function takes ``(id_scores, ood_scores)``: two 1-D arrays of scores where higher = more
in-distribution, so no label encoding can be passed the wrong way round. AUROC is the same in
every project; FPR@95 and AUPR are not. They depend on which class is *positive* and on how the
95 % operating point is picked (reference/METRICS.md). :class:`MetricConvention` names those
choices, :data:`CONVENTIONS` holds one preset per peer, and :func:`evaluate` records the
convention next to the numbers.

The curves come from ``sklearn.metrics`` (``roc_curve(..., drop_intermediate=False)``: the
default drops collinear points and, on tied scores, skips the first point that reaches the target
TPR), except for the ``interp-sklearn`` rule of the ``plp`` convention, which is the PLP authors'
code: ``np.interp(0.95, tpr, fpr)`` on ``roc_curve(labels, scores)`` with its defaults.
Bootstrap replicates are computed from resampling *counts* over the distinct score values, so
1000 resamples of 10k + 10k scores take about 1.5 s on one CPU core, not a minute of sorts; tests
check that each replicate equals the scikit-learn value on the resampled arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from oodprobe.arrays import Scores
from oodprobe.errors import InvalidParameterError, UnknownNameError

__all__ = [
    "AUPR_METHODS",
    "CONVENTIONS",
    "FPR_RULES",
    "POSITIVE_CLASSES",
    "MetricConvention",
    "MetricResult",
    "aupr",
    "auroc",
    "check_scores",
    "evaluate",
    "fpr_at_tpr",
    "get_convention",
]

Positive: TypeAlias = Literal["id", "ood"]
FprRule: TypeAlias = Literal["first", "nearest", "interpolate", "interp-sklearn", "quantile"]
AuprMethod: TypeAlias = Literal["average_precision", "trapezoid"]
_Floats: TypeAlias = npt.NDArray[np.float64]
_Ints: TypeAlias = npt.NDArray[np.int64]

POSITIVE_CLASSES: tuple[str, ...] = ("id", "ood")
"""``id``: ID is the positive class (FPR = share of OOD accepted). ``ood``: OOD is positive
(FPR = share of ID rejected); scores are negated so that higher = more OOD."""
FPR_RULES: tuple[str, ...] = ("first", "nearest", "interpolate", "interp-sklearn", "quantile")
"""How the operating point at the target TPR is picked; see :func:`fpr_at_tpr`."""
AUPR_METHODS: tuple[str, ...] = ("average_precision", "trapezoid")
"""``average_precision``: step sum (``sklearn.metrics.average_precision_score``).
``trapezoid``: ``auc(recall, precision)``, linear between points (slightly optimistic)."""


# --------------------------------------------------------------------------------------------
# validation


def check_scores(scores: npt.ArrayLike, *, name: str = "scores") -> Scores:
    """Validate a non-empty 1-D finite numeric array of scores and return it as float64."""
    array = np.asarray(scores)
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise InvalidParameterError(f"{name} must be a numeric array, got dtype {array.dtype}")
    if array.ndim != 1:
        raise InvalidParameterError(f"{name} must be 1-D (n_samples,), got shape {array.shape}")
    if array.size == 0:
        raise InvalidParameterError(f"{name} is empty; pass at least one score")
    array = array.astype(np.float64, copy=False)
    finite = np.isfinite(array)
    if not finite.all():
        n_nan = int(np.count_nonzero(np.isnan(array)))
        n_inf = int(array.size - np.count_nonzero(finite) - n_nan)
        raise InvalidParameterError(
            f"{name} contains {n_nan + n_inf} non-finite value(s) ({n_nan} NaN, {n_inf} inf) "
            f"out of {array.size}; drop or fix those samples first"
        )
    return array


def _check_pair(id_scores: npt.ArrayLike, ood_scores: npt.ArrayLike) -> tuple[Scores, Scores]:
    return check_scores(id_scores, name="id_scores"), check_scores(ood_scores, name="ood_scores")


def _check_tpr(tpr: float) -> float:
    if isinstance(tpr, bool) or not isinstance(tpr, int | float | np.floating | np.integer):
        raise InvalidParameterError(f"tpr must be a number in (0, 1], got {tpr!r}")
    if not 0.0 < float(tpr) <= 1.0:
        raise InvalidParameterError(
            f"tpr must be in (0, 1], got {tpr!r}; pass a fraction (tpr=0.95 for FPR@95)"
        )
    return float(tpr)


def _check_choice(value: str, choices: tuple[str, ...], kind: str) -> str:
    if value not in choices:
        raise UnknownNameError(kind, str(value), choices)
    return value


def _oriented(id_scores: Scores, ood_scores: Scores, positive: str) -> tuple[Scores, Scores]:
    """Return (positive_scores, negative_scores), oriented so higher = more positive."""
    if _check_choice(positive, POSITIVE_CLASSES, "positive class") == "id":
        return id_scores, ood_scores
    return -ood_scores, -id_scores


def _labelled(positive_scores: Scores, negative_scores: Scores) -> tuple[_Ints, Scores]:
    labels = np.concatenate(
        [np.ones(positive_scores.size, np.int64), np.zeros(negative_scores.size, np.int64)]
    )
    return labels, np.concatenate([positive_scores, negative_scores])


# --------------------------------------------------------------------------------------------
# point metrics


def auroc(id_scores: npt.ArrayLike, ood_scores: npt.ArrayLike) -> float:
    """Area under the ROC curve: P(ID score > OOD score) + ½ P(tie), the same in every convention.

    ``id_scores`` (n_id,) and ``ood_scores`` (n_ood,): higher = more in-distribution.
    """
    positive, negative = _check_pair(id_scores, ood_scores)
    return float(roc_auc_score(*_labelled(positive, negative)))


def fpr_at_tpr(
    id_scores: npt.ArrayLike,
    ood_scores: npt.ArrayLike,
    *,
    tpr: float = 0.95,
    positive: Positive = "id",
    rule: FprRule = "first",
) -> float:
    """False-positive rate at the operating point with true-positive rate ``tpr`` (FPR@95).

    ``positive="id"``: share of OOD accepted by the threshold that keeps ``tpr`` of ID (this
    project, OpenOOD ≤ v1.0, MCM, PLP). ``positive="ood"``: share of ID rejected by the threshold
    that catches ``tpr`` of OOD (OpenOOD ≥ v1.5, pytorch-ood). The two differ a lot (reference
    test vector: 0.21 vs 0.84) — always report which one.

    ``rule`` picks the point on the full ROC curve (reference/METRICS.md):

    - ``first``: first threshold with TPR ≥ ``tpr`` (OpenOOD, pytorch-ood). A real threshold.
    - ``nearest``: the ROC point whose TPR is nearest ``tpr``; among equally near points the one
      with the largest FPR, and none past the first point with TPR = 1 — as the MCM / energy /
      outlier-exposure reference code (``fpr_and_fdr_at_recall``) does.
    - ``interpolate``: linear interpolation of the full ROC at ``tpr``; where the curve reaches
      ``tpr`` exactly, the first (lowest-FPR) point there. Equal to ``first`` unless tied scores
      make a diagonal ROC segment around the target.
    - ``interp-sklearn``: the PLP authors' ``fpr95_score`` (also CLIPN's): ``np.interp(tpr,
      tpr_curve, fpr_curve)`` on ``sklearn.metrics.roc_curve`` with its default
      ``drop_intermediate=True``. Where the curve is flat at exactly ``tpr`` (OOD scores between
      two ID scores; possible only when ``tpr * n_pos`` is an integer, as 9500 of 10,000),
      ``np.interp`` returns the *last* point there, the highest FPR at that TPR; elsewhere it
      equals ``interpolate``. On ID 0..19 and OOD {0.5, 0.6, 0.7, 30} it gives 1.0 where
      ``first`` and ``interpolate`` give 0.25 (reference/METRICS.md); at ``tpr=1`` it gives 1.0
      (the curve's end). Their code's two guards (0 when no point reaches ``tpr``, the smallest
      FPR when all do) are kept; they cannot fire, as sklearn's curve runs from (0, 0) to TPR 1.
    - ``quantile``: threshold = the ``round((1 - tpr) * n_pos)``-th smallest positive score; FPR =
      share of negatives strictly above it (Deep k-NN, Sun et al., ICML 2022).

    Scores: (n_id,) and (n_ood,), higher = more in-distribution. Returns a fraction in [0, 1].
    """
    target = _check_tpr(tpr)
    _check_choice(rule, FPR_RULES, "FPR rule")
    positive_scores, negative_scores = _oriented(*_check_pair(id_scores, ood_scores), positive)
    if rule == "quantile":
        m = min(round((1.0 - target) * positive_scores.size), positive_scores.size - 1)
        threshold = np.partition(positive_scores, m)[m]
        return float(np.count_nonzero(negative_scores > threshold) / negative_scores.size)
    if rule == "interp-sklearn":
        return _authors_fpr(positive_scores, negative_scores, target)
    fpr, tpr_curve, _ = roc_curve(
        *_labelled(positive_scores, negative_scores), drop_intermediate=False
    )
    return float(_pick_fpr(fpr[None, :], tpr_curve[None, :], target, rule)[0])


def _authors_fpr(positive_scores: Scores, negative_scores: Scores, target: float) -> float:
    """The PLP authors' ``fpr95_score`` with ``target`` for 0.95: their number, bit for bit."""
    # roc_curve's default drop_intermediate=True, as they call it (it cannot change np.interp's
    # value beyond rounding, but this keeps their floats bit for bit).
    fpr, tpr_curve, _ = roc_curve(*_labelled(positive_scores, negative_scores))
    if np.all(tpr_curve < target):
        return 0.0
    if np.all(tpr_curve >= target):
        return float(fpr[tpr_curve >= target].min())
    return float(np.interp(target, tpr_curve, fpr))


def _pick_fpr(fpr: _Floats, tpr: _Floats, target: float, rule: str) -> _Floats:
    """FPR per row of ROC curves (n_curves, n_points) that start at (0, 0) and end at (1, 1).

    Rows may repeat a point (a score value absent from a bootstrap resample); every rule below
    returns the same value with or without such repeats.
    """
    rows = np.arange(fpr.shape[0])
    if rule == "interp-sklearn":
        return _interp_like_numpy(fpr, tpr, target)
    first = np.argmax(tpr >= target, axis=1)  # exists: the last point has TPR = 1 >= target
    if rule == "first":
        return fpr[rows, first]
    if rule == "interpolate":
        before = np.maximum(first - 1, 0)
        tpr_0, tpr_1 = tpr[rows, before], tpr[rows, first]
        fpr_0, fpr_1 = fpr[rows, before], fpr[rows, first]
        span = tpr_1 - tpr_0
        fraction = np.divide(target - tpr_0, span, out=np.ones_like(span), where=span > 0)
        return fpr_0 + fraction * (fpr_1 - fpr_0)
    # nearest: the reference code scans recall from its first 1.0 downwards and keeps the first
    # minimum of |recall - target|, i.e. the last one in threshold order; it has no (0, 0) point.
    distance = np.abs(tpr - target)
    first_full = np.argmax(tpr >= 1.0, axis=1)
    columns = np.arange(fpr.shape[1])
    valid = (columns[None, :] <= first_full[:, None]) & ~((tpr == 0.0) & (fpr == 0.0))
    distance = np.where(valid, distance, np.inf)
    last_nearest = fpr.shape[1] - 1 - np.argmin(distance[:, ::-1], axis=1)
    return fpr[rows, last_nearest]


def _interp_like_numpy(fpr: _Floats, tpr: _Floats, target: float) -> _Floats:
    """``np.interp(target, tpr[b], fpr[b])`` for every row ``b``, with numpy's own arithmetic.

    numpy takes ``j`` = the last index with ``tpr[j] <= target``: ``fpr[j]`` when ``tpr[j]`` equals
    the target (so a flat stretch at the target gives its *end*), else the line through ``j`` and
    ``j + 1``. Repeated points do not change ``j``'s values. Points that sklearn's
    ``drop_intermediate`` removes are collinear with their neighbours, so the line is the same
    one; only rounding (~1e-16) can differ from the authors' dropped curve.
    """
    rows = np.arange(fpr.shape[0])
    n_points = fpr.shape[1]
    last = n_points - 1 - np.argmax((tpr <= target)[:, ::-1], axis=1)  # tpr[:, 0] = 0 <= target
    following = np.minimum(last + 1, n_points - 1)
    tpr_0, tpr_1 = tpr[rows, last], tpr[rows, following]
    fpr_0, fpr_1 = fpr[rows, last], fpr[rows, following]
    exact = (tpr_0 == target) | (last == n_points - 1)
    span = np.where(exact, 1.0, tpr_1 - tpr_0)  # > 0 wherever it is used
    slope = (fpr_1 - fpr_0) / span
    return np.where(exact, fpr_0, slope * (target - tpr_0) + fpr_0)


def aupr(
    id_scores: npt.ArrayLike,
    ood_scores: npt.ArrayLike,
    *,
    positive: Positive = "id",
    method: AuprMethod = "average_precision",
) -> float:
    """Area under the precision-recall curve: AUPR-In (``positive="id"``) or AUPR-Out (``"ood"``).

    AUPR-Out ranks by negated scores. ``method="average_precision"`` is scikit-learn's step sum
    (MCM, energy-style code); ``"trapezoid"`` is ``auc(recall, precision)`` from
    ``precision_recall_curve`` (OpenOOD, pytorch-ood), which interpolates linearly and reads up to
    a few tenths of a point higher on small sets (reference/METRICS.md).
    Scores: (n_id,) and (n_ood,), higher = more in-distribution.
    """
    _check_choice(method, AUPR_METHODS, "AUPR method")
    labels, scores = _labelled(*_oriented(*_check_pair(id_scores, ood_scores), positive))
    if method == "average_precision":
        return float(average_precision_score(labels, scores))
    precision, recall, _ = precision_recall_curve(labels, scores, drop_intermediate=False)
    return float(auc(recall, precision))


# --------------------------------------------------------------------------------------------
# conventions


@dataclass(frozen=True)
class MetricConvention:
    """A named way to compute FPR@TPR and AUPR (reference/METRICS.md). AUROC never depends on it.

    ``positive``: the FPR's positive class (``id`` | ``ood``); ``rule``: how the operating point
    is picked (see :func:`fpr_at_tpr`); ``aupr_method``: ``average_precision`` | ``trapezoid``.
    """

    name: str
    positive: Positive
    rule: FprRule
    aupr_method: AuprMethod
    description: str = ""

    def __post_init__(self) -> None:
        _check_choice(self.positive, POSITIVE_CLASSES, "positive class")
        _check_choice(self.rule, FPR_RULES, "FPR rule")
        _check_choice(self.aupr_method, AUPR_METHODS, "AUPR method")

    def as_dict(self) -> dict[str, str]:
        """The fields (name, positive, rule, aupr_method, description): what a report shows."""
        return dataclasses.asdict(self)


_PRESETS = (
    # name, positive, rule, aupr_method, description
    ("oodprobe", "id", "first", "average_precision",
     "default: ID positive, first threshold keeping >= tpr of ID, average precision"),
    ("openood", "ood", "first", "trapezoid",
     "OpenOOD >= v1.5 (Aug 2023): OOD positive, first threshold with TPR >= tpr, trapezoid AUPR"),
    ("openood-v1", "id", "first", "trapezoid",
     "OpenOOD <= v1.0: ID positive, first threshold with TPR >= tpr, trapezoid AUPR"),
    ("pytorch-ood", "ood", "first", "trapezoid",
     "pytorch-ood OODMetrics: OOD positive, first threshold with TPR >= tpr, trapezoid AUPR"),
    ("mcm", "id", "nearest", "average_precision",
     "MCM / NegLabel / energy-OOD code: ID positive, recall nearest tpr, average precision"),
    ("plp", "id", "interp-sklearn", "average_precision",
     "PLP paper (authors' code): ID positive, np.interp(tpr, tpr_curve, fpr_curve) on sklearn's "
     "default roc_curve (AUPR not reported; average precision here)"),
    ("clipn", "id", "interp-sklearn", "average_precision",
     "CLIPN: ID positive, np.interp on sklearn's default roc_curve (as plp)"),
    ("deep-knn", "id", "quantile", "average_precision",
     "Deep k-NN (Sun et al. 2022): threshold = (1 - tpr) quantile of ID scores, OOD strictly "
     "above it accepted (their AUPR code differs; average precision here)"),
)  # fmt: skip

CONVENTIONS: Mapping[str, MetricConvention] = MappingProxyType(
    {preset[0]: MetricConvention(*preset) for preset in _PRESETS}  # type: ignore[arg-type]
)
"""Presets by name. ``oodprobe`` is the default: ID positive — the FPR is the share of OOD a
detector *accepts*, the number a deployment that keeps 95 % of ID cares about — with the ``first``
rule, because it reports a threshold that exists: the FPR a deployed detector calibrated at that
ID acceptance rate would really show. It is the hand-checkable rule of reference/METRICS.md
(0.45 on its exact vector). Without tied scores it equals the PLP authors' rule (``plp``) unless
``tpr * n_id`` is an integer; then theirs takes the far end of the flat stretch at that TPR (all
OOD scores between that ID score and the next one accepted, see :func:`fpr_at_tpr`). Average
precision does not interpolate linearly between PR points, so it does not overstate AUPR on small
sets.

``plp`` and ``clipn`` run the authors' code itself, ties included. Known tie effects in the
other peers' code, which their presets follow only on tie-free scores:
OpenOOD v1.5 calls ``roc_curve`` with its default ``drop_intermediate=True`` (0.50 instead of
0.45 on the exact vector); OpenOOD v1.0 thresholds at the ⌊0.95 n⌋-th largest ID score and
counts OOD strictly above it (0.44; its TPR is ⌊0.95 n⌋/n, not ⌈0.95 n⌉/n, if 0.95 n is
fractional)."""


def get_convention(name: str | MetricConvention) -> MetricConvention:
    """Return the preset called ``name`` (a :class:`MetricConvention` passes through)."""
    if isinstance(name, MetricConvention):
        return name
    if name not in CONVENTIONS:
        raise UnknownNameError("metric convention", str(name), CONVENTIONS)
    return CONVENTIONS[name]


# --------------------------------------------------------------------------------------------
# evaluate + bootstrap

_METRIC_NAMES = ("auroc", "fpr", "aupr_in", "aupr_out")


@dataclass(frozen=True)
class MetricResult:
    """AUROC, FPR@TPR, AUPR-In/Out for one (ID, OOD) pair, with the convention that made them.

    ``intervals`` maps ``auroc``/``fpr``/``aupr_in``/``aupr_out`` to (low, high) percentile
    bootstrap bounds at ``confidence``; empty when ``bootstrap == 0``.
    """

    convention: MetricConvention
    tpr: float
    auroc: float
    fpr: float
    aupr_in: float
    aupr_out: float
    n_id: int
    n_ood: int
    bootstrap: int = 0
    confidence: float = 0.95
    intervals: Mapping[str, tuple[float, float]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "intervals", MappingProxyType(dict(self.intervals)))

    @property
    def fpr_name(self) -> str:
        """Key of the FPR in :meth:`as_dict`: ``fpr@95`` for tpr 0.95, ``fpr@90`` for 0.9."""
        return f"fpr@{round(self.tpr * 100, 6):g}"

    def as_dict(self) -> dict[str, Any]:
        """Flat record for tables: metrics, sizes, the convention's fields, and CI bounds."""
        names = {"fpr": self.fpr_name}
        record: dict[str, Any] = {
            "auroc": self.auroc,
            self.fpr_name: self.fpr,
            "aupr_in": self.aupr_in,
            "aupr_out": self.aupr_out,
            "n_id": self.n_id,
            "n_ood": self.n_ood,
            "convention": self.convention.name,
            "tpr": self.tpr,
            "fpr_positive": self.convention.positive,
            "fpr_rule": self.convention.rule,
            "aupr_method": self.convention.aupr_method,
        }
        if self.bootstrap:
            record["bootstrap"] = self.bootstrap
            record["confidence"] = self.confidence
            for metric, (low, high) in self.intervals.items():
                record[f"{names.get(metric, metric)}_low"] = low
                record[f"{names.get(metric, metric)}_high"] = high
        return record


def evaluate(
    id_scores: npt.ArrayLike,
    ood_scores: npt.ArrayLike,
    *,
    convention: str | MetricConvention = "oodprobe",
    tpr: float = 0.95,
    bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> MetricResult:
    """AUROC, FPR@``tpr``, AUPR-In and AUPR-Out under a named convention (see CONVENTIONS).

    ``id_scores`` (n_id,), ``ood_scores`` (n_ood,): higher = more in-distribution.
    With ``bootstrap=n > 0``, adds percentile-bootstrap intervals at ``confidence`` from ``n``
    resamples that draw ID and OOD independently with replacement (seeded by ``seed``).
    """
    conv = get_convention(convention)
    target = _check_tpr(tpr)
    id_array, ood_array = _check_pair(id_scores, ood_scores)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int | np.integer) or bootstrap < 0:
        raise InvalidParameterError(
            f"bootstrap must be an integer >= 0 (number of resamples), got {bootstrap!r}"
        )
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, int | float | np.floating | np.integer)
        or not 0.0 < float(confidence) < 1.0
    ):
        raise InvalidParameterError(f"confidence must be in (0, 1), got {confidence!r}")
    intervals: dict[str, tuple[float, float]] = {}
    if bootstrap:
        replicates = _bootstrap(id_array, ood_array, conv, target, int(bootstrap), seed)
        tail = (1.0 - float(confidence)) / 2.0
        for metric in _METRIC_NAMES:
            low, high = np.quantile(replicates[metric], [tail, 1.0 - tail])
            intervals[metric] = (float(low), float(high))
    return MetricResult(
        convention=conv,
        tpr=target,
        auroc=auroc(id_array, ood_array),
        fpr=fpr_at_tpr(id_array, ood_array, tpr=target, positive=conv.positive, rule=conv.rule),
        aupr_in=aupr(id_array, ood_array, positive="id", method=conv.aupr_method),
        aupr_out=aupr(id_array, ood_array, positive="ood", method=conv.aupr_method),
        n_id=int(id_array.size),
        n_ood=int(ood_array.size),
        bootstrap=int(bootstrap),
        confidence=float(confidence),
        intervals=intervals,
    )


# Elements per (resamples x distinct scores) block: bounds memory (~10 arrays of 8 MB).
_BLOCK_ELEMENTS = 1_000_000


@dataclass(frozen=True)
class _Grouping:
    """Each score's rank among the distinct values, highest score first."""

    id_groups: _Ints
    ood_groups: _Ints
    n_groups: int

    @classmethod
    def of(cls, id_scores: Scores, ood_scores: Scores) -> _Grouping:
        unique, inverse = np.unique(np.concatenate([id_scores, ood_scores]), return_inverse=True)
        descending = (unique.size - 1 - inverse).astype(np.int64)
        return cls(descending[: id_scores.size], descending[id_scores.size :], int(unique.size))

    def counts(self, groups: _Ints, indices: _Ints) -> _Ints:
        """(n_resamples, n_groups) how often each distinct score occurs in each resample."""
        n_rows = indices.shape[0]
        flat = groups[indices] + (np.arange(n_rows, dtype=np.int64) * self.n_groups)[:, None]
        counts = np.bincount(flat.ravel(), minlength=n_rows * self.n_groups)
        return counts.reshape(n_rows, self.n_groups)


def _bootstrap(
    id_scores: Scores,
    ood_scores: Scores,
    convention: MetricConvention,
    tpr: float,
    n_resamples: int,
    seed: int | None,
) -> dict[str, _Floats]:
    grouping = _Grouping.of(id_scores, ood_scores)
    rng = np.random.default_rng(seed)
    width = max(grouping.n_groups, id_scores.size, ood_scores.size)
    block = max(1, _BLOCK_ELEMENTS // width)
    parts: list[dict[str, _Floats]] = []
    for start in range(0, n_resamples, block):
        rows = min(block, n_resamples - start)
        id_indices = rng.integers(0, id_scores.size, size=(rows, id_scores.size))
        ood_indices = rng.integers(0, ood_scores.size, size=(rows, ood_scores.size))
        parts.append(_replicate_metrics(grouping, id_indices, ood_indices, convention, tpr))
    return {name: np.concatenate([part[name] for part in parts]) for name in _METRIC_NAMES}


def _replicate_metrics(
    grouping: _Grouping,
    id_indices: _Ints,
    ood_indices: _Ints,
    convention: MetricConvention,
    tpr: float,
) -> dict[str, _Floats]:
    """Metrics of the resamples ``id_scores[id_indices[b]]``, ``ood_scores[ood_indices[b]]``."""
    id_counts = grouping.counts(grouping.id_groups, id_indices)
    ood_counts = grouping.counts(grouping.ood_groups, ood_indices)
    # OOD-positive curves rank by negated scores: the same groups in reverse order.
    ood_first, id_last = ood_counts[:, ::-1], id_counts[:, ::-1]
    if convention.positive == "id":
        fpr = _fpr_from_counts(id_counts, ood_counts, tpr, convention.rule)
    else:
        fpr = _fpr_from_counts(ood_first, id_last, tpr, convention.rule)
    return {
        "auroc": _auroc_from_counts(id_counts, ood_counts),
        "fpr": fpr,
        "aupr_in": _aupr_from_counts(id_counts, ood_counts, convention.aupr_method),
        "aupr_out": _aupr_from_counts(ood_first, id_last, convention.aupr_method),
    }


def _auroc_from_counts(positive: _Ints, negative: _Ints) -> _Floats:
    """Mann-Whitney U / (n_pos n_neg) with ties counting ½ — what roc_auc_score integrates."""
    above = np.cumsum(positive, axis=1) - positive  # positives scoring higher than the group
    wins = (negative * (2 * above + positive)).sum(axis=1) / 2.0
    return np.asarray(wins / (positive.sum(axis=1) * negative.sum(axis=1)), dtype=np.float64)


def _fpr_from_counts(positive: _Ints, negative: _Ints, tpr: float, rule: str) -> _Floats:
    """Vectorised :func:`fpr_at_tpr` on per-group counts ordered from most to least positive."""
    true_positives = np.cumsum(positive, axis=1)
    false_positives = np.cumsum(negative, axis=1)
    n_positive = true_positives[:, -1:]
    n_negative = false_positives[:, -1:]
    if rule == "quantile":
        m = np.minimum(np.round((1.0 - tpr) * n_positive), n_positive - 1)  # same as round()
        group = np.argmax(true_positives >= n_positive - m, axis=1)
        rows = np.arange(positive.shape[0])
        strictly_above = false_positives[rows, group] - negative[rows, group]
        return np.asarray(strictly_above / n_negative[:, 0], dtype=np.float64)
    zero = np.zeros((positive.shape[0], 1))
    fpr = np.hstack([zero, false_positives / n_negative])
    tpr_curve = np.hstack([zero, true_positives / n_positive])
    return _pick_fpr(fpr, tpr_curve, tpr, rule)


def _aupr_from_counts(positive: _Ints, negative: _Ints, method: str) -> _Floats:
    """Vectorised :func:`aupr` on per-group counts ordered from most to least positive."""
    true_positives = np.cumsum(positive, axis=1)
    predicted = true_positives + np.cumsum(negative, axis=1)
    # Leading empty groups sit at the curve's (recall 0, precision 1) start point.
    precision = np.divide(
        true_positives, predicted, out=np.ones(predicted.shape), where=predicted > 0
    )
    recall = true_positives / true_positives[:, -1:]
    recall_step = np.diff(recall, axis=1, prepend=0.0)
    if method == "average_precision":
        return np.asarray((recall_step * precision).sum(axis=1), dtype=np.float64)
    previous = np.hstack([np.ones((precision.shape[0], 1)), precision[:, :-1]])
    return np.asarray((recall_step * (precision + previous) / 2.0).sum(axis=1), dtype=np.float64)
