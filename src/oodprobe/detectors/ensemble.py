"""Ensembles: a score-level ensemble of any detectors, and a probability-level ensemble of heads.

* ``score-ensemble`` — members are detector specs (``["knn:k=1", "mahalanobis"]``); each
  member's score is normalised on held-out ID training data (rank or z-score) and the ensemble
  scores the weighted mean of the normalised scores.
* ``prob-ensemble`` — the COOkeD recipe: the softmax of several classifier heads over the same
  images (the encoder's own head, a linear probe, a CLIP zero-shot head; on one backbone, or
  one head per part of a concatenated encoder, ``heads = ["encoder@1", "probe@2",
  "zero-shot@3"]``) averaged, then MSP, entropy or GEN of the mean distribution.

For the runner: :func:`ensemble_member_specs` gives a score ensemble's members as
``DetectorSpec``\\ s, to build each one as the runner builds any detector (class embeddings,
heads) and pass the built, unfitted detectors as ``member_detectors``;
:func:`prob_ensemble_heads` gives a probability ensemble's head sources, for which the runner
passes ``head_weights``, ``head_biases`` and ``image_projections`` (see
:class:`ProbEnsembleDetector`).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt
from sklearn.base import clone
from sklearn.utils._param_validation import Options
from sklearn.utils.validation import check_is_fitted

from oodprobe.arrays import Features, Labels, Scores, check_features, check_labels, row_blocks
from oodprobe.detectors.base import (
    DETECTORS,
    Choices,
    Detector,
    Number,
    create_detector,
    integer,
    register_detector,
    validate_values,
)
from oodprobe.detectors.posthoc import (
    HEAD_CONSTRAINTS,
    HEAD_SOURCES,
    HeadDetector,
    head_kinds,
    head_row_labels,
    is_head_source,
    store_head_params,
)
from oodprobe.detectors.posthoc_logits import softmax
from oodprobe.errors import InvalidParameterError, OodprobeError

if TYPE_CHECKING:
    import torch

    from oodprobe.benchmark_spec import DetectorSpec

NORMALIZATIONS = ("rank", "zscore")
"""How ``score-ensemble`` puts member scores on one scale (see :class:`ScoreEnsembleDetector`)."""
ENSEMBLE_SCORES = ("msp", "entropy", "gen")
"""What ``prob-ensemble`` scores of the mean distribution."""
DEFAULT_MEMBERS = ("knn", "gaussian")
DEFAULT_HEADS = ("probe", "zero-shot")
_ENSEMBLES = frozenset({"score-ensemble"})  # never a member of a score ensemble (see below)
_BLOCK_ELEMENTS = 1 << 22  # float64 values of one per-row-block temporary when scoring


class _ListOf(Options):
    """A non-empty list (or tuple) whose every item satisfies ``item_ok`` (a constraint).

    An ``Options`` subclass so scikit-learn's ``make_constraint`` accepts it, as ``DeviceName``.
    """

    def __init__(self, item_ok: Any, text: str) -> None:
        super().__init__(list, set())
        self.item_ok, self.text = item_ok, text

    def is_satisfied_by(self, val: Any) -> bool:
        return (
            isinstance(val, (list, tuple))
            and len(val) > 0
            and all(self.item_ok(item) for item in val)
        )

    def describe(self) -> str:
        return self.text

    def __str__(self) -> str:
        return self.text


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, (bool, np.bool_))
        and bool(np.isfinite(value))
    )


_MEMBERS = _ListOf(
    lambda item: isinstance(item, str) and item.strip() != "",
    "non-empty list of detector specs such as ['knn:k=1', 'mahalanobis']",
)
_WEIGHTS = _ListOf(
    lambda item: _is_number(item) and item >= 0, "list of numbers >= 0 (one per member)"
)
_HEADS = _ListOf(
    is_head_source,
    f"non-empty list of head sources ({', '.join(HEAD_SOURCES)}, each optionally @PART of a "
    f"concat: encoder)",
)
_TEMPERATURES = _ListOf(
    lambda item: _is_number(item) and item > 0, "list of numbers > 0 (one per head)"
)
_RUNNER_LIST: list[Any] = [list, tuple, None]


# -- score-level ensemble ---------------------------------------------------------------------


def ensemble_member_specs(params: Mapping[str, Any]) -> list[DetectorSpec]:
    """A score ensemble's members (its ``members`` param, default ``DEFAULT_MEMBERS``), parsed
    with the CLI/TOML detector-option parser and validated: each name registered and not a
    score ensemble, not a detector fitted on attacks, its user parameters valid for its class,
    and every member consuming the same encoder output. Raises InvalidParameterError.

    The runner builds each spec as it builds any detector and passes the unfitted detectors,
    in this order, as ``member_detectors``.
    """
    from oodprobe.benchmark_spec import parse_detector_option

    owner = f"detector {ScoreEnsembleDetector.name!r}"
    members = params.get("members", DEFAULT_MEMBERS)
    validate_values({"members": [_MEMBERS]}, {"members": members}, owner)
    specs = []
    for index, text in enumerate(members):
        where = f"{owner}: members[{index}] {text!r}"
        try:
            spec = parse_detector_option(text)
            cls = DETECTORS.get(spec.name)
            if cls is None:
                raise InvalidParameterError(
                    f"unknown detector {spec.name!r}; choose from: {', '.join(sorted(DETECTORS))}"
                )
            if spec.name in _ENSEMBLES:
                raise InvalidParameterError(
                    "a score ensemble cannot be a member of one (a weighted mean of normalised "
                    "means gains nothing); list its members here instead"
                )
            if cls.fit_labels != "classes":
                raise InvalidParameterError(
                    f"{spec.name!r} is fitted on clean vs attacked images, not on the ID "
                    f"training set; it cannot be a member"
                )
            cls.check_params(dict(spec.params))
        except OodprobeError as error:
            raise InvalidParameterError(f"{where}: {error}") from None
        specs.append(spec)
    arrays = {DETECTORS[spec.name].input_array_for(spec.params) for spec in specs}
    if len(arrays) > 1:
        listing = ", ".join(
            f"{text} ({DETECTORS[spec.name].input_array_for(spec.params)})"
            for text, spec in zip(members, specs, strict=True)
        )
        raise InvalidParameterError(
            f"{owner}: members score different encoder outputs ({listing}); an ensemble scores "
            f"one array, so choose members of one kind"
        )
    return specs


def _check_members_match(
    specs: Sequence[DetectorSpec], detectors: Sequence[Any], what: str
) -> None:
    """Detectors ``detectors`` are the members ``specs`` name: same classes, same parameters."""
    owner = f"detector {ScoreEnsembleDetector.name!r}"
    if len(detectors) != len(specs):
        raise InvalidParameterError(
            f"{owner}: {what} has {len(detectors)} detector(s) but members lists {len(specs)}; "
            f"build one per member, in order (ensemble_member_specs)"
        )
    for index, (spec, detector) in enumerate(zip(specs, detectors, strict=True)):
        if not isinstance(detector, Detector) or detector.name != spec.name:
            got = detector.name if isinstance(detector, Detector) else type(detector).__name__
            raise InvalidParameterError(
                f"{owner}: {what}[{index}] is {got!r} but members[{index}] is {spec.name!r}; "
                f"build one per member, in order (ensemble_member_specs)"
            )
        actual = detector.get_params(deep=False)
        for key, value in spec.params.items():
            if key not in actual or not np.array_equal(actual[key], value):
                raise InvalidParameterError(
                    f"{owner}: {what}[{index}] has {key}={actual.get(key)!r} but members[{index}] "
                    f"sets {key}={value!r}"
                )


def holdout_split(
    n_samples: int, labels: Labels | None, fraction: float, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Seeded ``(fit_rows, holdout_rows)`` of ``range(n_samples)``, each sorted.

    With labels, stratified: each class holds out ``round(n_c · fraction)`` rows, at most
    ``n_c − 1`` (every class stays in the fit part). Without, ``round(n · fraction)`` rows, at
    least 1 and at most ``n − 1``. Raises InvalidParameterError when nothing is held out.
    """
    rng = np.random.default_rng(seed)
    if labels is None:
        groups = [np.arange(n_samples)]
        counts = [min(max(round(n_samples * fraction), 1), n_samples - 1)]
    else:
        groups = [np.flatnonzero(labels == label) for label in np.unique(labels)]
        counts = [min(round(len(rows) * fraction), len(rows) - 1) for rows in groups]
    held = [rng.permutation(rows)[:count] for rows, count in zip(groups, counts, strict=True)]
    holdout = np.sort(np.concatenate(held)).astype(np.int64)
    if len(holdout) == 0:
        raise InvalidParameterError(
            f"score-ensemble: holdout_fraction {fraction:g} of {n_samples} training samples"
            f"{' (stratified by class)' if labels is not None else ''} holds out none; give "
            f"more training samples or a larger holdout_fraction"
        )
    is_held = np.zeros(n_samples, dtype=bool)
    is_held[holdout] = True
    return np.flatnonzero(~is_held).astype(np.int64), holdout


def _describe_state(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    return "nothing" if value is None else type(value).__name__


class _RankNormalizer:
    """The held-out ID scores' mid-rank ECDF, linearly interpolated, with exponential tails.

    At a distinct held-out score ``u_j`` the value is ``(#{h < u_j} + ½ #{h = u_j}) / m``;
    between them, linear; below the smallest, ``F(u_1) · exp((s − u_1) / τ)`` and above the
    largest, ``1 − (1 − F(u_K)) · exp(−(s − u_K) / τ)`` (τ: the held-out scores' standard
    deviation, 1 if they are all equal). Strictly increasing and continuous with values in
    (0, 1), so a single member's ranking (its AUROC, FPR) is kept, also outside the held-out
    range; differentiable almost everywhere. Mid-ranks rather than the fraction ``<= s``: the
    two differ by ``½ #{h = u_j} / m`` (``½ / m`` without ties), a shift that changes no
    ranking, and mid-ranks leave room in (0, F(u_1)) and (F(u_K), 1) for the ordered tails.
    In floating point, scores far outside the held-out range (≈ 40 τ above, 700 τ below) tie
    at 1 (or 0).
    """

    def __init__(self, holdout: npt.NDArray[np.float64]) -> None:
        knots, counts = np.unique(holdout, return_counts=True)
        below = np.cumsum(counts) - counts
        self.knots = knots.astype(np.float64)
        self.values = ((below + 0.5 * counts) / len(holdout)).astype(np.float64)
        spread = float(np.std(holdout))
        self.tau = spread if spread > 0 else 1.0

    def __call__(self, scores: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        knots, values, tau = self.knots, self.values, self.tau
        inside = np.interp(scores, knots, values)
        lower = values[0] * np.exp(np.minimum((scores - knots[0]) / tau, 0.0))
        upper = 1.0 - (1.0 - values[-1]) * np.exp(np.minimum((knots[-1] - scores) / tau, 0.0))
        return np.where(scores < knots[0], lower, np.where(scores > knots[-1], upper, inside))

    def torch(self, scores: torch.Tensor, owner: Detector) -> torch.Tensor:
        import torch

        knots = owner._torch_constant(self.knots, scores)
        values = owner._torch_constant(self.values, scores)
        tau = self.tau
        if len(self.knots) == 1:
            inside = values[0].expand_as(scores)
        else:
            clamped = scores.clamp(knots[0], knots[-1])
            upper_index = torch.searchsorted(knots, clamped.detach().contiguous(), right=True)
            upper_index = upper_index.clamp(1, len(self.knots) - 1)
            left, right = knots[upper_index - 1], knots[upper_index]
            low, high = values[upper_index - 1], values[upper_index]
            # knots distinct in float64 may be equal in the scores' dtype (float32): a segment
            # of zero width (only the last, where clamped == left) is worth its left value
            span = right - left
            span = torch.where(span > 0, span, torch.ones_like(span))
            inside = low + (clamped - left) * (high - low) / span
        # the exponents are clamped at 0 so the branch torch.where drops never overflows
        # (an inf there would make its zero gradient NaN)
        lower = values[0] * torch.exp(((scores - knots[0]) / tau).clamp(max=0.0))
        upper = 1.0 - (1.0 - values[-1]) * torch.exp(((knots[-1] - scores) / tau).clamp(max=0.0))
        return torch.where(scores < knots[0], lower, torch.where(scores > knots[-1], upper, inside))


class _ZScoreNormalizer:
    """``(s − mean) / std`` of the held-out ID scores (std with 1/m)."""

    def __init__(self, holdout: npt.NDArray[np.float64]) -> None:
        self.mean, self.std = float(np.mean(holdout)), float(np.std(holdout))

    def __call__(self, scores: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return (scores - self.mean) / self.std

    def torch(self, scores: torch.Tensor, owner: Detector) -> torch.Tensor:
        return (scores - self.mean) / self.std


@register_detector
class ScoreEnsembleDetector(Detector):
    """Score-level ensemble: the weighted mean of member scores normalised on held-out ID data.

    Score: ``Σ_i w_i N_i(s_i(x))`` with ``Σ_i w_i = 1`` (``weights`` normalised; None = equal),
    ``s_i`` member i's score and ``N_i`` its normalisation, fitted on held-out ID training
    samples: ``rank`` — the interpolated mid-rank ECDF of the held-out scores (the conformal
    p-value of Bates, Candès, Lei, Romano & Sesia, "Testing for outliers with conformal
    p-values", Annals of Statistics 2023, made continuous; see ``_RankNormalizer``), or
    ``zscore`` — ``(s − mean) / std`` of the held-out scores. Higher = more in-distribution.

    ``fit`` splits the ID training features (seeded by ``seed``; stratified by label when labels
    are given) into a fit part and a held-out part of ``holdout_fraction``, fits every member
    on the fit part, and computes the normalisations from the members' scores of the held-out
    part. The members fitted on the fit part are kept, not refitted on all the data: this is
    split-conformal calibration (Bates et al. 2023), where the calibration scores must come from
    the model that scores, on samples it was not fitted on. Refitting would calibrate one model
    and score with another whose training set contains the calibration samples (a 1-NN member
    would give each of them its maximum score, cos = 1), so the mapping would be biased; the
    cost is that members see ``1 − holdout_fraction`` of the training data. (Arrays the runner
    computes from all the training data, such as a probe head, are the same for both parts.)

    ``members``: detector specs as the TOML and CLI accept them (``"knn:k=1"``,
    ``"react:percentile=90"``); each member is validated by its class before any work. A score
    ensemble cannot be a member of another (a weighted mean of normalised means gains nothing:
    list the members in one); any other detector can (a ``prob-ensemble`` too). Members must
    consume the same encoder output. The runner passes the members built with their runner
    arrays (class embeddings, heads) as ``member_detectors`` (unfitted; ``fit`` fits clones);
    without them each member is ``create_detector(spec)``, and one that needs runner arrays is
    refused. Needs labels, text, a head, differentiability: those of the members (the
    ``needs_*`` hooks); ``score_samples_torch`` exists when every member has one.
    """

    name: ClassVar[str] = "score-ensemble"
    differentiable: ClassVar[bool] = True  # with the default members; see is_differentiable
    runner_params: ClassVar[frozenset[str]] = frozenset({"member_detectors"})
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "members": [_MEMBERS],
        "normalize": [Choices(*NORMALIZATIONS)],
        "weights": [_WEIGHTS, None],
        "holdout_fraction": [Number(0, 1, closed="neither")],
        "seed": [integer(0)],
        "member_detectors": _RUNNER_LIST,
    }

    members_: list[Detector]
    holdout_scores_: npt.NDArray[np.float64]

    def __init__(
        self,
        *,
        members: Sequence[str] = DEFAULT_MEMBERS,
        normalize: str = "rank",
        weights: Sequence[float] | None = None,
        holdout_fraction: float = 0.2,
        seed: int = 0,
        member_detectors: Sequence[Detector] | None = None,
    ) -> None:
        self.members = members
        self.normalize = normalize
        self.weights = weights
        self.holdout_fraction = holdout_fraction
        self.seed = seed
        self.member_detectors = member_detectors

    # -- parameters and what they need ---------------------------------------------------------
    @classmethod
    def check_params(cls, params: Mapping[str, Any], *, runner: bool = False) -> None:
        """The base checks, then every member spec, the weights' length and the runner's
        ``member_detectors`` (one per member, in order, of the member's class and params)."""
        super().check_params(params, runner=runner)
        specs = ensemble_member_specs(params)
        weights = params.get("weights")
        if weights is not None:
            if len(weights) != len(specs):
                raise InvalidParameterError(
                    f"detector {cls.name!r}: weights has {len(weights)} entries but members has "
                    f"{len(specs)}; give one weight per member"
                )
            if sum(weights) <= 0:
                raise InvalidParameterError(
                    f"detector {cls.name!r}: weights must not all be 0, got {list(weights)}"
                )
        detectors = params.get("member_detectors")
        if runner and detectors is not None:
            _check_members_match(specs, detectors, "member_detectors")

    @classmethod
    def needs_labels(cls, params: Mapping[str, Any]) -> bool:
        return any(DETECTORS[s.name].needs_labels(s.params) for s in ensemble_member_specs(params))

    @classmethod
    def uses_labels(cls, params: Mapping[str, Any]) -> bool:
        return any(DETECTORS[s.name].uses_labels(s.params) for s in ensemble_member_specs(params))

    @classmethod
    def needs_text(cls, params: Mapping[str, Any]) -> bool:
        return any(DETECTORS[s.name].needs_text(s.params) for s in ensemble_member_specs(params))

    @classmethod
    def needs_head(cls, params: Mapping[str, Any]) -> bool:
        return any(DETECTORS[s.name].needs_head(s.params) for s in ensemble_member_specs(params))

    @classmethod
    def input_array_for(cls, params: Mapping[str, Any]) -> str:
        spec = ensemble_member_specs(params)[0]  # all members consume the same array
        return DETECTORS[spec.name].input_array_for(spec.params)

    @classmethod
    def is_differentiable(cls, params: Mapping[str, Any]) -> bool:
        specs = ensemble_member_specs(params)
        return all(DETECTORS[s.name].is_differentiable(s.params) for s in specs)

    def _weights(self) -> npt.NDArray[np.float64]:
        count = len(self.members)
        if self.weights is None:
            return np.full(count, 1.0 / count)
        weights = np.asarray(self.weights, dtype=np.float64)
        return weights / weights.sum()

    # -- fit and score ---------------------------------------------------------------------------
    def fit(self, features: Features, labels: Labels | None = None) -> ScoreEnsembleDetector:
        """Fit members on the fit part of (n, D) ``features``; normalise on the held-out part."""
        self._validate_params()
        specs = ensemble_member_specs(self.get_params(deep=False))
        features = check_features(features, min_samples=2)
        if labels is not None:
            labels = check_labels(labels, len(features), min_classes=1)
        labelled = [
            text
            for text, spec in zip(self.members, specs, strict=True)
            if DETECTORS[spec.name].needs_labels(spec.params)
        ]
        if labelled and labels is None:
            raise InvalidParameterError(
                f"{self.name} needs class labels: its member(s) {', '.join(labelled)} do; call "
                f"fit(features, labels), or choose label-free members"
            )
        members = self._unfitted_members(specs)
        fit_rows, holdout_rows = holdout_split(
            len(features), labels, float(self.holdout_fraction), int(self.seed)
        )
        fit_features, holdout_features = features[fit_rows], features[holdout_rows]
        fit_labels = None
        classes = None
        if labels is not None:
            fit_labels = labels[fit_rows]
            classes = np.unique(labels)
        holdout = np.empty((len(members), len(holdout_rows)), dtype=np.float64)
        # a member on a probe or zero-shot head takes the indices of the head's rows, as the
        # runner's pipeline.fit_labels gives a top-level detector
        for index, (member, spec) in enumerate(zip(members, specs, strict=True)):
            member_labels = fit_labels
            if fit_labels is not None:
                head = str(spec.params.get("head", "encoder"))
                member_labels = head_row_labels(fit_labels, head, classes)
            try:
                member.fit(fit_features, member_labels)
                holdout[index] = np.sort(member.score_samples(holdout_features))
            except InvalidParameterError as error:
                raise InvalidParameterError(
                    f"{self.name} member {index} ({self.members[index]}): {error}"
                ) from None
        self.n_dims_ = int(features.shape[1])
        self.holdout_scores_ = holdout
        self.runner_members_ = self.member_detectors is not None
        self._prepare_normalizers()
        self.members_ = members
        self._find_torch_refusal(specs)
        return self

    def _find_torch_refusal(self, specs: Sequence[DetectorSpec]) -> None:
        """The message ``score_samples_torch`` raises (None: every member is differentiable)."""
        self._not_differentiable: str | None = None
        for index, spec in enumerate(specs):
            if not DETECTORS[spec.name].is_differentiable(spec.params):
                self._not_differentiable = (
                    f"{self.name} has no differentiable score: its member {index} "
                    f"({self.members[index]}) has none; choose differentiable members"
                )
                return

    def _unfitted_members(self, specs: Sequence[DetectorSpec]) -> list[Detector]:
        if self.member_detectors is not None:
            return [clone(detector) for detector in self.member_detectors]
        for index, spec in enumerate(specs):
            runner = sorted(DETECTORS[spec.name].runner_params)
            if runner:
                raise InvalidParameterError(
                    f"{self.name} member {index} ({self.members[index]}) needs arrays the runner "
                    f"computes ({', '.join(runner)}); build the members with the runner "
                    f"(pipeline.build_detector) and pass them as member_detectors"
                )
        return [create_detector(spec.name, **spec.params) for spec in specs]

    def _prepare_normalizers(self) -> None:
        """The normalisation of each member from its sorted held-out scores (not saved)."""
        normalizer = _RankNormalizer if self.normalize == "rank" else _ZScoreNormalizer
        for index, row in enumerate(self.holdout_scores_):
            if self.normalize == "zscore" and float(np.std(row)) == 0:
                raise InvalidParameterError(
                    f"{self.name} member {index} ({self.members[index]}) gives every held-out ID "
                    f"sample the score {row[0]:g}, so its z-score is undefined; use "
                    f"normalize='rank' or drop the member"
                )
        self._normalizers = [normalizer(row) for row in self.holdout_scores_]

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 weighted mean of the normalised member scores of (n, D) features.

        Higher = more in-distribution.
        """
        check_is_fitted(self)
        features = check_features(features, n_dims=self.n_dims_)
        total = np.zeros(len(features), dtype=np.float64)
        for weight, member, normalizer in zip(
            self._weights(), self.members_, self._normalizers, strict=True
        ):
            scores = np.asarray(member.score_samples(features), dtype=np.float64)
            total += weight * normalizer(scores)
        return total

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) scores of an (n, D) tensor, as ``score_samples``; higher = ID.

        Needs every member to be differentiable; the rank normalisation is piecewise linear
        (exponential in the tails), differentiable almost everywhere.
        """
        features = self._torch_features(features)
        if self._not_differentiable is not None:  # found once, not at each attack step
            raise InvalidParameterError(self._not_differentiable)
        terms = [
            float(weight) * normalizer.torch(member.score_samples_torch(features), self)
            for weight, member, normalizer in zip(
                self._weights(), self.members_, self._normalizers, strict=True
            )
        ]
        return functools.reduce(operator.add, terms)  # members may score in float32 or 64

    # -- persistence: members nested in the file (base.save_detector) -------------------------
    def _params_to_save(self) -> dict[str, Any]:
        # the unfitted member_detectors are clones of the fitted members (saved nested): on
        # load they are restored from those (runner_members_), so they are not saved twice
        return {**super()._params_to_save(), "member_detectors": None}

    def _get_state(self) -> dict[str, Any]:
        state = super()._get_state()
        state.pop("members_", None)
        return state

    def _get_members(self) -> list[Detector]:
        return list(self.members_)

    def _set_state(self, state: dict[str, Any]) -> None:
        super()._set_state(state)
        holdout = getattr(self, "holdout_scores_", None)
        count = len(self.members)
        if (
            not isinstance(holdout, np.ndarray)
            or holdout.ndim != 2
            or holdout.shape[0] != count
            or holdout.shape[1] < 1
            or not np.issubdtype(holdout.dtype, np.floating)
        ):
            raise InvalidParameterError(
                f"state field holdout_scores_ must be a float ({count}, m >= 1) array (one row "
                f"per member), got {_describe_state(holdout)}"
            )
        if np.any(np.diff(holdout, axis=1) < 0):
            raise InvalidParameterError("state field holdout_scores_ has rows that are not sorted")
        if not isinstance(getattr(self, "runner_members_", None), bool):
            raise InvalidParameterError("state field runner_members_ must be true or false")
        self.holdout_scores_ = holdout.astype(np.float64)
        self._prepare_normalizers()

    def _set_members(self, members: list[Detector]) -> None:
        specs = ensemble_member_specs(self.get_params(deep=False))
        _check_members_match(specs, members, "the file's members")
        for index, member in enumerate(members):
            if member.n_dims_ != self.n_dims_:
                raise InvalidParameterError(
                    f"member {index} was fitted on {member.n_dims_} dims, the ensemble on "
                    f"{self.n_dims_}"
                )
        self.members_ = members
        self._find_torch_refusal(specs)
        if self.runner_members_:
            self.member_detectors = [clone(member) for member in members]


# -- probability-level ensemble of heads ------------------------------------------------------


def prob_ensemble_heads(params: Mapping[str, Any]) -> tuple[str, ...]:
    """The head sources of a ``prob-ensemble`` (its ``heads``, default ``DEFAULT_HEADS``): the
    runner resolves each as it resolves a post-hoc detector's ``head`` and passes the lists
    ``head_weights``, ``head_biases`` and ``image_projections`` in this order."""
    ProbEnsembleDetector.check_params({"heads": params.get("heads", DEFAULT_HEADS)})
    return tuple(params.get("heads", DEFAULT_HEADS))


class _Head(HeadDetector):
    """One head of a ``prob-ensemble``: the post-hoc family's mapping of features to logits.

    Internal (never registered, never saved as a detector): it holds one head's checked arrays
    so that ``HeadDetector.head_features`` / ``head_logits`` stay the one home of the mapping.
    """

    name: ClassVar[str] = "prob-ensemble"
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = dict(HEAD_CONSTRAINTS)

    def __init__(
        self,
        *,
        head: str = "encoder",
        head_weight: npt.ArrayLike | None = None,
        head_bias: npt.ArrayLike | None = None,
        image_projection: npt.ArrayLike | None = None,
    ) -> None:
        store_head_params(self, head, (head_weight, head_bias, image_projection))

    def score_samples(self, features: Features) -> Scores:  # pragma: no cover - never scored
        raise NotImplementedError


def score_probabilities(
    probabilities: npt.NDArray[np.float64], score: str, gamma: float = 0.1, top_m: int = 100
) -> Scores:
    """``msp`` (max p), ``entropy`` (``Σ p log p``, the negative entropy) or ``gen``
    (``−Σ_{top-M} p^γ (1 − p)^γ``) per row of (n, C) probabilities; higher = ID.

    Of probabilities, not logits (as ``posthoc_logits``' scores are): a mean of several heads'
    softmaxes is not the softmax of any one logit vector.
    """
    if score == "msp":
        return np.asarray(probabilities.max(axis=1), dtype=np.float64)
    if score == "entropy":
        positive = probabilities > 0
        logs = np.log(np.where(positive, probabilities, 1.0))
        return np.asarray(np.where(positive, probabilities * logs, 0.0).sum(axis=1), np.float64)
    top = min(int(top_m), probabilities.shape[1])
    largest = -np.partition(-probabilities, top - 1, axis=1)[:, :top]
    terms = np.power(largest, gamma) * np.power(np.clip(1.0 - largest, 0.0, None), gamma)
    return np.asarray(-terms.sum(axis=1), dtype=np.float64)


def _power_torch(values: torch.Tensor, exponent: float) -> torch.Tensor:
    """``values ** exponent`` for values >= 0 with a finite gradient at 0 (where it is 0)."""
    import torch

    positive = values > 0
    safe = torch.where(positive, values, torch.ones_like(values))
    return torch.where(positive, safe**exponent, torch.zeros_like(values))


def score_probabilities_torch(
    probabilities: torch.Tensor, score: str, gamma: float = 0.1, top_m: int = 100
) -> torch.Tensor:
    """Differentiable :func:`score_probabilities` of an (n, C) tensor."""
    import torch

    if score == "msp":
        return probabilities.max(dim=1).values
    if score == "entropy":
        positive = probabilities > 0
        safe = torch.where(positive, probabilities, torch.ones_like(probabilities))
        return torch.where(positive, probabilities * torch.log(safe), 0.0).sum(dim=1)
    top = min(int(top_m), probabilities.shape[1])
    largest = torch.topk(probabilities, top, dim=1).values
    terms = _power_torch(largest, gamma) * _power_torch((1.0 - largest).clamp(min=0.0), gamma)
    return -terms.sum(dim=1)


@register_detector
class ProbEnsembleDetector(Detector):
    """Probability-level ensemble of classifier heads over the same images (COOkeD).

    Humblot-Renaux, Franchi, Escalera & Moeslund, "COOkeD: Ensemble-based OOD detection in the
    era of zero-shot CLIP", ICCV Workshops 2025. Score: ``S(p̄)`` of the mean predictive
    distribution ``p̄ = (1/H) Σ_i softmax(z_i / T_i)`` of H heads' logits ``z_i`` (each head's
    ``h_i · W_iᵀ + b_i``, mapped as in the post-hoc family, ``HeadDetector``), with ``S`` the
    ``msp`` (``max_c p̄_c``), ``entropy`` (``Σ_c p̄_c log p̄_c``, the negative entropy) or
    ``gen`` (``−Σ_{top-M} p̄^γ (1 − p̄)^γ``; Liu, Lochman & Zach, CVPR 2023; ``gamma`` = 0.1,
    ``top_m`` = 100, used only by ``gen``). Higher = more in-distribution.

    ``heads``: distinct head sources among ``encoder`` (the encoder's own classifier), ``probe``
    (a linear probe the runner fits on the ID training features) and ``zero-shot`` (a CLIP
    zero-shot head, logit scale × unit class embeddings, so T = 1 is CLIP's own softmax, as in
    COOkeD). ``temperatures``: one per head (None: all 1). Every head must give the same
    classes in the same order (C columns): the runner's duty.

    Runner parameters, lists aligned with ``heads`` (see :func:`prob_ensemble_heads`):
    ``head_weights[i]`` (C × D'_i), ``head_biases[i]`` ((C,) or None = 0) and
    ``image_projections[i]`` ((D × D'_i) or None) — exactly the ``head_weight``,
    ``head_bias`` and ``image_projection`` the runner gives a post-hoc detector whose
    ``head`` is ``heads[i]``.

    Several backbones, as in COOkeD (a classifier, a probe on another backbone, CLIP's
    zero-shot head): on a concatenated encoder (``concat:A+B+C``, the parts' features side by
    side) each head reads one part, ``heads = ["encoder@1", "probe@2", "zero-shot@3"]``; the
    runner pads each part's head with zeros to the concatenated columns, so its logits are
    exactly those of the part alone. Without ``@PART`` every head reads one encoder's features.
    Differences from COOkeD: the authors' classifier is trained end-to-end on the ID data by
    them; here it is any encoder's own head, or a probe. COOkeD scores MSP and entropy; GEN is
    added.
    """

    name: ClassVar[str] = "prob-ensemble"
    requires_head: ClassVar[bool] = True
    differentiable: ClassVar[bool] = True
    runner_params: ClassVar[frozenset[str]] = frozenset(
        {"head_weights", "head_biases", "image_projections"}
    )
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "heads": [_HEADS],
        "temperatures": [_TEMPERATURES, None],
        "score": [Choices(*ENSEMBLE_SCORES)],
        "gamma": [Number(0, closed="neither")],
        "top_m": [integer(1)],
        "head_weights": _RUNNER_LIST,
        "head_biases": _RUNNER_LIST,
        "image_projections": _RUNNER_LIST,
    }

    weights_: list[npt.NDArray[np.float64]]
    biases_: list[npt.NDArray[np.float64]]
    projections_: list[npt.NDArray[np.float64]]

    def __init__(
        self,
        *,
        heads: Sequence[str] = DEFAULT_HEADS,
        temperatures: Sequence[float] | None = None,
        score: str = "msp",
        gamma: float = 0.1,
        top_m: int = 100,
        head_weights: Sequence[npt.ArrayLike] | None = None,
        head_biases: Sequence[npt.ArrayLike | None] | None = None,
        image_projections: Sequence[npt.ArrayLike | None] | None = None,
    ) -> None:
        self.heads = heads
        self.temperatures = temperatures
        self.score = score
        self.gamma = gamma
        self.top_m = top_m
        self.head_weights = head_weights
        self.head_biases = head_biases
        self.image_projections = image_projections

    @classmethod
    def check_params(cls, params: Mapping[str, Any], *, runner: bool = False) -> None:
        """The base checks; heads distinct; one temperature (and runner array) per head."""
        super().check_params(params, runner=runner)
        heads = list(params.get("heads", DEFAULT_HEADS))
        repeated = sorted({head for head in heads if heads.count(head) > 1})
        if repeated:
            raise InvalidParameterError(
                f"detector {cls.name!r}: heads lists {repeated[0]!r} more than once; give each "
                f"head source once"
            )
        names = ["temperatures", *(sorted(cls.runner_params) if runner else [])]
        for name in names:
            value = params.get(name)
            if value is not None and len(value) != len(heads):
                raise InvalidParameterError(
                    f"detector {cls.name!r}: {name} has {len(value)} entries but heads has "
                    f"{len(heads)}; give one per head"
                )

    @classmethod
    def needs_labels(cls, params: Mapping[str, Any]) -> bool:
        # the probe head is fitted by the runner on the labelled ID training set
        return "probe" in head_kinds(prob_ensemble_heads(params))

    @classmethod
    def needs_text(cls, params: Mapping[str, Any]) -> bool:
        return "zero-shot" in head_kinds(prob_ensemble_heads(params))

    def fit(self, features: Features, labels: Labels | None = None) -> ProbEnsembleDetector:
        """Check each head's arrays against (n, D) ``features``; nothing is learned from them."""
        self._validate_params()
        features = check_features(features)
        if self.head_weights is None:
            raise InvalidParameterError(
                f"detector {self.name!r} needs the heads' weights (head_weights, one per entry "
                f"of heads), computed by the runner from the encoder's head, a linear probe or "
                f"class embeddings; pass them to create_detector"
            )
        count = len(self.heads)
        biases = [None] * count if self.head_biases is None else list(self.head_biases)
        projections = (
            [None] * count if self.image_projections is None else list(self.image_projections)
        )
        heads = []
        for index, source in enumerate(self.heads):
            head = _Head(
                head=source,
                head_weight=self.head_weights[index],
                head_bias=biases[index],
                image_projection=projections[index],
            )
            try:
                # one row: the head learns nothing from the data, fit checks its arrays
                heads.append(head.fit(features[:1]))
            except InvalidParameterError as error:
                raise InvalidParameterError(
                    f"detector {self.name!r}: head {index} ({source}): {error}"
                ) from None
        self.n_dims_ = int(features.shape[1])
        self.weights_ = [head.weight_ for head in heads]
        self.biases_ = [head.bias_ for head in heads]
        self.projections_ = [head.projection_ for head in heads]
        self._check_classes()
        self._heads = heads
        return self

    def _check_classes(self) -> None:
        classes = [int(weight.shape[0]) for weight in self.weights_]
        if len(set(classes)) > 1:
            listing = ", ".join(f"{h} {c}" for h, c in zip(self.heads, classes, strict=True))
            raise InvalidParameterError(
                f"detector {self.name!r}: the heads give different numbers of classes "
                f"({listing}); every head must score the same ID classes, in the same order"
            )

    def _temperatures(self) -> list[float]:
        if self.temperatures is None:
            return [1.0] * len(self.heads)
        return [float(value) for value in self.temperatures]

    def probabilities(self, features: Features) -> npt.NDArray[np.float64]:
        """(n, C) mean predictive distribution of the heads for (n, D) features."""
        check_is_fitted(self)
        features = check_features(features, n_dims=self.n_dims_)
        width = max(self.n_dims_, *(w.shape[1] + w.shape[0] for w in self.weights_))
        mean = np.zeros((len(features), self.weights_[0].shape[0]), dtype=np.float64)
        for rows in row_blocks(len(features), max(1, _BLOCK_ELEMENTS // width)):
            block = np.asarray(features[rows], dtype=np.float64)
            for head, temperature in zip(self._heads, self._temperatures(), strict=True):
                # the features are checked once above, not again per block and head
                logits = head.head_logits(head._map_features(block))
                mean[rows] += softmax(logits / temperature)
        return mean / len(self._heads)

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 ``S(p̄)`` of (n, D) features; higher = more in-distribution."""
        return score_probabilities(
            self.probabilities(features), self.score, float(self.gamma), int(self.top_m)
        )

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) scores of an (n, D) tensor, as ``score_samples``; higher = ID."""
        import torch

        features = self._torch_features(features)
        distributions = [
            torch.softmax(head.head_logits_torch(head.head_features_torch(features)) / t, dim=1)
            for head, t in zip(self._heads, self._temperatures(), strict=True)
        ]
        mean = torch.stack(distributions).mean(dim=0)
        return score_probabilities_torch(mean, self.score, float(self.gamma), int(self.top_m))

    def _set_state(self, state: dict[str, Any]) -> None:
        super()._set_state(state)
        count = len(self.heads)
        for name in ("weights_", "biases_", "projections_"):
            value = getattr(self, name, None)
            if (
                not isinstance(value, list)
                or len(value) != count
                or not all(isinstance(item, np.ndarray) for item in value)
            ):
                raise InvalidParameterError(
                    f"state field {name} must be a list of {count} arrays (one per head)"
                )
        heads = []
        for index, source in enumerate(self.heads):
            weight = np.asarray(self.weights_[index], dtype=np.float64)
            bias = np.asarray(self.biases_[index], dtype=np.float64)
            projection = np.asarray(self.projections_[index], dtype=np.float64)
            inner = (
                projection.shape[1] if projection.ndim == 2 and projection.size else self.n_dims_
            )
            if (
                weight.ndim != 2
                or weight.shape[1] != inner
                or bias.shape != (weight.shape[0],)
                or projection.ndim != 2
                or (projection.size and projection.shape[0] != self.n_dims_)
            ):
                raise InvalidParameterError(
                    f"head {index} ({source}) has arrays of shapes {weight.shape}, {bias.shape}, "
                    f"{projection.shape} that do not fit {self.n_dims_}-dim features"
                )
            head = _Head(head=source)
            head._set_state(
                {
                    "n_dims_": self.n_dims_,
                    "weight_": weight,
                    "bias_": bias,
                    "projection_": projection,
                }
            )
            heads.append(head)
        self.weights_ = [head.weight_ for head in heads]
        self.biases_ = [head.bias_ for head in heads]
        self.projections_ = [head.projection_ for head in heads]
        self._check_classes()
        self._heads = heads
