"""Post-hoc scores of the head's softmax: GEN, KL-matching, GradNorm, entropy, temperature MSP.

Each detector here is a :class:`~oodprobe.detectors.posthoc.HeadDetector`: it sees the
features the head is applied to, ``h`` (n × D'), and the head ``(W, b)``; the logits are
``z = h @ W.T + b`` and ``p = softmax(z)``. Every score is higher = more in-distribution, in
float64 on the numpy path; the torch path (``score_samples_torch``) is differentiable and
computes in float32 at least.

Probabilities are handled in the log domain (``log p = z − logsumexp(z)``), so a confident
row whose tail probabilities underflow, or whose top probability rounds to 1, still gets the
exact value (and finite gradients): see :func:`generalized_entropy` for ``log(1 − p)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt
from scipy.special import logsumexp

from oodprobe.arrays import Features, Labels, Scores, check_labels, row_blocks
from oodprobe.detectors.base import Number, integer, register_detector
from oodprobe.detectors.posthoc import (
    HEAD_CONSTRAINTS,
    HeadDetector,
    parse_head_source,
    store_head_params,
)
from oodprobe.detectors.probe import TEMPERATURE, msp, score_logits_torch
from oodprobe.errors import InvalidParameterError

if TYPE_CHECKING:
    import torch

_CHUNK = 8192  # rows per block of (n, C) float64 temporaries
# the interval searched for the temperature of ``temp-msp`` (log T is searched, bounded)
TEMPERATURE_BOUNDS = (1e-2, 1e2)


# -- shared pieces ----------------------------------------------------------------------------


def shifted_exponentials(
    logits: npt.ArrayLike,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per row ``s = z − max z``, ``e = exp(s)`` and ``t = Σ e`` (1 ≤ t ≤ C), in float64.

    The shared first step of every softmax score here (one exponential pass, in place where it
    can be: scipy's ``logsumexp`` is several times slower at 1000 classes); ``p = e / t`` and
    ``log p = s − log t``.
    """
    shifted = np.array(logits, dtype=np.float64)
    shifted -= shifted.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return shifted, exponentials, exponentials.sum(axis=1)


def softmax(logits: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """(n, C) ``softmax(z)`` in float64, shifted by the row maximum (no overflow)."""
    _, exponentials, total = shifted_exponentials(logits)
    exponentials /= total[:, None]
    return exponentials


def log_softmax(logits: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """(n, C) ``log softmax(z)`` in float64, shifted by the row maximum (finite for finite z)."""
    shifted, _, total = shifted_exponentials(logits)
    shifted -= np.log(total)[:, None]
    return shifted


def log_one_minus_softmax(logits: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """(n, C) ``log(1 − softmax(z))`` in float64, exact also where ``p`` rounds to 1.

    ``log1p(−p)`` is accurate for ``p ≤ 1/2``; only a row's top class can exceed 1/2, and for
    it ``1 − p_top = Σ_{j≠top} p_j`` is summed without the top term (``1 − p`` would round to
    0 when the rest is below 1e-16 of it). ``−inf`` only where every other class underflows.
    """
    shifted, exponentials, total = shifted_exponentials(logits)
    rows, top = np.arange(len(shifted)), shifted.argmax(axis=1)
    exponentials[rows, top] = 0.0
    with np.errstate(divide="ignore"):  # log 0 = −inf: the rest underflowed entirely
        log_rest = np.log(exponentials.sum(axis=1)) - np.log(total)
    exponentials /= total[:, None]  # the probabilities, 0 at the top class
    log_q = np.log1p(-exponentials)
    log_q[rows, top] = log_rest
    return log_q


def _torch_log_one_minus_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Differentiable :func:`log_one_minus_softmax` (no NaN gradient where ``p`` rounds to 1)."""
    import torch

    top = logits.argmax(dim=1, keepdim=True)
    is_top = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True)
    total = torch.logsumexp(logits, dim=1, keepdim=True)
    # the top class's probability is masked to 0 *before* log1p, so its (discarded) branch has a
    # finite gradient: a where() over log1p(−1) would back-propagate 0 · inf = NaN
    probabilities = torch.exp(logits - total).masked_fill(is_top, 0.0)
    others = torch.logsumexp(logits.masked_fill(is_top, -math.inf), dim=1, keepdim=True)
    return torch.where(is_top, others - total, torch.log1p(-probabilities))


def _require_classes(detector: HeadDetector) -> None:
    """Softmax scores need a head with at least 2 classes (one class: a constant softmax)."""
    if len(detector.weight_) < 2:
        raise InvalidParameterError(
            f"detector {detector.name!r} needs a head with at least 2 classes (its softmax is "
            f"constant for 1), got head_weight of shape {detector.weight_.shape}"
        )


class _LogitHeadDetector(HeadDetector):
    """A head detector whose score is a function of the logits only."""

    def _torch_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head_logits_torch(self.head_features_torch(features))

    def _score_logits(self, logits: npt.NDArray[np.float64]) -> Scores:
        raise NotImplementedError

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 scores of (n, D) features, higher = more in-distribution."""
        return self._score_blocks(features, lambda h: self._score_logits(self.head_logits(h)))


def _params(**extra: list[Any]) -> dict[str, list[Any]]:
    return {**extra, **HEAD_CONSTRAINTS}


# -- GEN --------------------------------------------------------------------------------------


def generalized_entropy(logits: npt.ArrayLike, gamma: float, top_m: int) -> Scores:
    """GEN score ``−Σ_{j ∈ top-M} p_j^γ (1 − p_j)^γ`` per row of (n, C) logits; higher = ID.

    Each term is ``exp(γ (log p_j + log(1 − p_j)))``, with ``log(1 − p)`` as in
    :func:`log_one_minus_softmax`, computed for the M most probable classes only; ``M`` is
    capped at C.
    """
    shifted, exponentials, total = shifted_exponentials(logits)
    rows, top = np.arange(len(shifted)), shifted.argmax(axis=1)
    exponentials[rows, top] = 0.0
    log_total = np.log(total)
    with np.errstate(divide="ignore"):  # log 0 = −inf: the rest underflowed entirely
        log_rest = np.log(exponentials.sum(axis=1)) - log_total
    m = min(int(top_m), shifted.shape[1])
    if m < shifted.shape[1]:
        # the M most probable classes (their order does not matter for a sum); ties at the
        # maximum may leave ``top`` out, and a tie's terms are equal to its
        selected = np.argpartition(-shifted, m - 1, axis=1)[:, :m]
        log_p = np.take_along_axis(shifted, selected, axis=1)
        is_top = selected == top[:, None]
    else:
        log_p = shifted
        is_top = np.zeros(shifted.shape, dtype=bool)
        is_top[rows, top] = True
    log_p -= log_total[:, None]
    probabilities = np.exp(log_p)
    probabilities[is_top] = 0.0  # its log(1 − p) is log_rest; keeps log1p away from log 0
    log_q = np.where(is_top, log_rest[:, None], np.log1p(-probabilities))
    log_p += log_q
    log_p *= gamma
    return np.asarray(-np.exp(log_p).sum(axis=1), dtype=np.float64)


@register_detector
class GENDetector(_LogitHeadDetector):
    """GEN, the generalized entropy of the head's top-M probabilities.

    Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution
    Detection", CVPR 2023. Score: ``−Σ_{j ∈ top-M} p_j^γ (1 − p_j)^γ`` with ``p =
    softmax(h·Wᵀ + b)``. Defaults are the authors' (``benchmark.py`` of XixiLiu95/GEN):
    ``gamma = 0.1``, ``top_m = 100`` (M; capped at the number of classes). Differences: none
    in the formula (the authors' sum and sign); terms are computed in the log domain, exact
    where ``p`` underflows or rounds to 1. pytorch-ood's ``GEN`` clamps ``p`` to
    ``[1e-7, 1 − 1e-7]`` and averages instead of summing, so its values differ on confident
    rows (the clamp is a floor of ``≈ 0.2`` per term at γ = 0.1).
    """

    name: ClassVar[str] = "gen"
    differentiable: ClassVar[bool] = True
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = _params(
        gamma=[Number(0, closed="neither")], top_m=[integer(1)]
    )

    def __init__(
        self,
        *,
        gamma: float = 0.1,
        top_m: int = 100,
        head: str = "encoder",
        head_weight: npt.ArrayLike | None = None,
        head_bias: npt.ArrayLike | None = None,
        image_projection: npt.ArrayLike | None = None,
    ) -> None:
        self.gamma = gamma
        self.top_m = top_m
        store_head_params(self, head, (head_weight, head_bias, image_projection))

    def _fit_head(self, features: npt.NDArray[np.float64], labels: Labels | None) -> None:
        _require_classes(self)

    def _score_logits(self, logits: npt.NDArray[np.float64]) -> Scores:
        return generalized_entropy(logits, float(self.gamma), int(self.top_m))

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) GEN scores of an (n, D) tensor; matches ``score_samples``."""
        import torch

        logits = self._torch_logits(features)
        log_p = torch.log_softmax(logits, dim=1)
        terms = torch.exp(float(self.gamma) * (log_p + _torch_log_one_minus_softmax(logits)))
        m = min(int(self.top_m), logits.shape[1])
        if m < logits.shape[1]:
            terms = terms.gather(1, logits.topk(m, dim=1).indices)
        return -terms.sum(dim=1)


# -- KL-matching ------------------------------------------------------------------------------


def kl_to_nearest(logits: npt.ArrayLike, typical_log_probs: npt.NDArray[np.float64]) -> Scores:
    """``min_k KL(softmax(z) ‖ d_k)`` per row of (n, C) logits, over (K, C) ``log d_k``."""
    shifted, exponentials, total = shifted_exponentials(logits)
    log_total = np.log(total)
    exponentials /= total[:, None]  # p
    # KL(p ‖ d) = Σ p log p − Σ p log d, with Σ p log p = Σ p s − log t (Σ p = 1); a p that
    # underflows to 0 contributes 0 to both sums
    divergences = np.einsum("ij,ij->i", exponentials, shifted) - log_total
    cross = exponentials @ typical_log_probs.T
    return np.asarray((divergences[:, None] - cross).min(axis=1), dtype=np.float64)


@register_detector
class KLMatchingDetector(_LogitHeadDetector):
    """KL-matching: KL divergence of the softmax to the nearest typical class posterior.

    Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt & Song, "Scaling
    Out-of-Distribution Detection for Real-World Settings", ICML 2022. Score:
    ``−min_k KL(p(x) ‖ d_k)``, ``d_k`` the mean softmax of the ID samples the head predicts as
    class ``k``. No hyperparameters. The form and sign follow OpenOOD's
    ``KLMatchingPostprocessor`` (``−pairwise_distances_argmin_min(p, d, metric=KL(p‖q))``, as
    the ViM authors' ``benchmark.py``) and pytorch-ood's ``KLMatching`` (which returns
    ``+min_k``, an outlier score). Like pytorch-ood, the minimum runs over the classes the head
    predicts for at least one fitted sample (OpenOOD's ``d_k`` of a never-predicted class is
    the NaN mean of no rows). Differences: the paper fits ``d_k`` on a held-out ID validation
    set; ``fit`` uses the ID training features it is given (no labels needed). ``d_k`` is
    kept as ``log d_k`` (a log-mean-exp of log-probabilities), so it never underflows to 0
    (pytorch-ood replaces ``log 0`` by the float minimum).
    """

    name: ClassVar[str] = "kl-matching"
    differentiable: ClassVar[bool] = True
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = _params()

    typical_log_probs_: npt.NDArray[np.float64]
    typical_classes_: npt.NDArray[np.int64]

    def __init__(
        self,
        *,
        head: str = "encoder",
        head_weight: npt.ArrayLike | None = None,
        head_bias: npt.ArrayLike | None = None,
        image_projection: npt.ArrayLike | None = None,
    ) -> None:
        store_head_params(self, head, (head_weight, head_bias, image_projection))

    def _fit_head(self, features: npt.NDArray[np.float64], labels: Labels | None) -> None:
        """``log d_k`` (K, C) of every predicted class ``k`` (``typical_classes_``, sorted)."""
        _require_classes(self)
        # per predicted class: log Σ p (a running logsumexp over row blocks) and the row count;
        # a dict, not a (C, C) array: a 21k-class head predicts only some classes
        log_sums: dict[int, npt.NDArray[np.float64]] = {}
        counts: dict[int, int] = {}
        for rows in row_blocks(len(features), _CHUNK):
            logits = self.head_logits(features[rows])
            log_p = log_softmax(logits)
            predicted = logits.argmax(axis=1)
            for label in np.unique(predicted).tolist():
                block = log_p[predicted == label]
                block_sum = logsumexp(block, axis=0)
                if label in log_sums:
                    block_sum = np.logaddexp(log_sums[label], block_sum)
                log_sums[label] = block_sum
                counts[label] = counts.get(label, 0) + len(block)
        classes = sorted(log_sums)
        self.typical_classes_ = np.asarray(classes, dtype=np.int64)
        self.typical_log_probs_ = np.stack(
            [log_sums[label] - math.log(counts[label]) for label in classes]
        )

    def _score_logits(self, logits: npt.NDArray[np.float64]) -> Scores:
        return -kl_to_nearest(logits, self.typical_log_probs_)

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) KL-matching scores of an (n, D) tensor; as ``score_samples``."""
        import torch

        logits = self._torch_logits(features)
        log_p = torch.log_softmax(logits, dim=1)
        probabilities = log_p.exp()
        log_d = self._torch_constant(self.typical_log_probs_, logits)
        divergences = (probabilities * log_p).sum(dim=1, keepdim=True) - probabilities @ log_d.T
        return -divergences.amin(dim=1)


# -- GradNorm ---------------------------------------------------------------------------------


def gradnorm(
    head_features: npt.NDArray[np.float64],
    logits: npt.NDArray[np.float64],
    temperature: float = 1.0,
) -> Scores:
    """``‖∂L/∂W‖₁ = ‖h‖₁ · Σ_c |C·softmax(z/T)_c − 1| / T`` per row; higher = ID.

    ``L = −Σ_c log softmax(z/T)_c`` (cross-entropy to all-ones targets, the authors' loss), so
    ``∂L/∂z = (C·p − 1)/T`` and ``∂L/∂W = (∂L/∂z) hᵀ``, a rank-one matrix whose L1 norm is the
    product of the two vectors' L1 norms.
    """
    logits = np.asarray(logits, dtype=np.float64)
    n_classes = logits.shape[1]
    _, probabilities, total = shifted_exponentials(logits / temperature)
    probabilities *= n_classes / total[:, None]  # C·p
    probabilities -= 1.0
    logit_norm = np.abs(probabilities).sum(axis=1)
    return np.asarray(np.abs(head_features).sum(axis=1) * logit_norm / temperature, np.float64)


@register_detector
class GradNormDetector(HeadDetector):
    """GradNorm in closed form: the L1 norm of the head weight's gradient of a uniform loss.

    Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional Shifts in
    the Wild", NeurIPS 2021. Score: ``‖h‖₁ · Σ_c |C·softmax(z/T)_c − 1| / T``, which is
    ``‖∂L/∂W‖₁`` for ``L = −Σ_c log softmax(z/T)_c`` exactly (derivation in :func:`gradnorm`).
    As the authors' ``test_ood.py`` (deeplearning-wisc/gradnorm_ood): ``T = 1``, all-ones
    targets summed over classes (``= C · KL(u ‖ softmax) + const``), the gradient of the last
    layer's *weight* only (``model.head.conv.weight``, no bias), larger = ID. Differences: none
    in the value; it is computed without backpropagation, for a batch at once (the authors run
    one image per backward pass). pytorch-ood's ``GradNorm`` averages over classes (its values
    are ours / C, negated) and, without a ``param_filter``, adds the bias gradient. With
    ``head="probe"`` the gradient is that of the folded head acting on the raw features.
    """

    name: ClassVar[str] = "gradnorm"
    differentiable: ClassVar[bool] = True
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = _params(temperature=TEMPERATURE)

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        head: str = "encoder",
        head_weight: npt.ArrayLike | None = None,
        head_bias: npt.ArrayLike | None = None,
        image_projection: npt.ArrayLike | None = None,
    ) -> None:
        self.temperature = temperature
        store_head_params(self, head, (head_weight, head_bias, image_projection))

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 GradNorm scores of (n, D) features, higher = more in-distribution."""
        temperature = float(self.temperature)
        return self._score_blocks(features, lambda h: gradnorm(h, self.head_logits(h), temperature))

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) GradNorm scores of an (n, D) tensor; as ``score_samples``."""
        import torch

        temperature = float(self.temperature)
        head_features = self.head_features_torch(features)
        logits = self.head_logits_torch(head_features)
        probabilities = torch.softmax(logits / temperature, dim=1)
        logit_norm = (logits.shape[1] * probabilities - 1.0).abs().sum(dim=1)
        return head_features.abs().sum(dim=1) * logit_norm / temperature


# -- entropy ----------------------------------------------------------------------------------


def negative_entropy(logits: npt.ArrayLike) -> Scores:
    """``Σ_c p_c log p_c = −H(softmax(z))`` per row of (n, C) logits; higher = ID."""
    shifted, exponentials, total = shifted_exponentials(logits)
    # Σ p (s − log t) = Σ e s / t − log t, since Σ p = 1
    return np.asarray(
        np.einsum("ij,ij->i", exponentials, shifted) / total - np.log(total), dtype=np.float64
    )


@register_detector
class EntropyDetector(_LogitHeadDetector):
    """Negative Shannon entropy of the head's softmax.

    Chan, Rottmann & Gottschalk, "Entropy Maximization and Meta Classification for
    Out-of-Distribution Detection in Semantic Segmentation", ICCV 2021 (the reference
    pytorch-ood's ``Entropy`` cites; the GEN authors' "Shannon entropy" baseline is the same
    score). Score: ``Σ_c p_c log p_c = −H(p)``, ``p = softmax(h·Wᵀ + b)``. No
    hyperparameters. Differences: none; computed from ``log p`` (pytorch-ood clips ``p`` to
    ``≥ 1e-7`` before the log, which changes rows with tiny probabilities).
    """

    name: ClassVar[str] = "entropy"
    differentiable: ClassVar[bool] = True
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = _params()

    def __init__(
        self,
        *,
        head: str = "encoder",
        head_weight: npt.ArrayLike | None = None,
        head_bias: npt.ArrayLike | None = None,
        image_projection: npt.ArrayLike | None = None,
    ) -> None:
        store_head_params(self, head, (head_weight, head_bias, image_projection))

    def _fit_head(self, features: npt.NDArray[np.float64], labels: Labels | None) -> None:
        _require_classes(self)

    def _score_logits(self, logits: npt.NDArray[np.float64]) -> Scores:
        return negative_entropy(logits)

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) negative entropies of an (n, D) tensor; as ``score_samples``."""
        import torch

        log_p = torch.log_softmax(self._torch_logits(features), dim=1)
        return (log_p.exp() * log_p).sum(dim=1)


# -- temperature-scaled MSP -------------------------------------------------------------------


def fit_temperature(
    logits: npt.NDArray[np.float64],
    labels: Labels,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> float:
    """The temperature minimising the mean NLL ``logsumexp(z/T) − z_y/T`` of labelled logits.

    Brent's bounded search over ``log T`` in ``log(bounds)`` (the NLL is convex in ``1/T``,
    so unimodal in ``log T``), to ``1e-6`` in ``log T``.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    true_logits = logits[np.arange(len(logits)), labels]

    def nll(log_temperature: float) -> float:
        inverse = math.exp(-log_temperature)
        return float(np.mean(logsumexp(logits * inverse, axis=1) - true_logits * inverse))

    result = minimize_scalar(
        nll,
        bounds=(math.log(bounds[0]), math.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(result.x))


def holdout_split(
    n_rows: int, fraction: float, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(kept rows sorted, held-out rows): ``round(fraction · n)`` rows (at least 1) of a
    permutation seeded by ``seed`` are held out; temp-msp's split."""
    order = np.random.default_rng(seed).permutation(n_rows)
    count = max(1, round(fraction * n_rows))
    return np.sort(order[count:]), order[:count]


@register_detector
class TemperatureMSPDetector(_LogitHeadDetector):
    """Maximum softmax probability at a temperature fitted on held-out labelled ID data.

    Temperature scaling: Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural
    Networks", ICML 2017; MSP: Hendrycks & Gimpel, ICLR 2017 (ODIN, Liang et al., ICLR 2018,
    without its input perturbation). Score: ``max_c softmax(z/T)_c``, ``T`` minimising the
    NLL of the held-out ID samples. ``fit`` holds out ``holdout_fraction`` of the ID training
    features (a permutation seeded by ``seed``) and fits ``log T`` on them by Brent's bounded
    search in ``[1e-2, 1e2]`` (``scipy.optimize.minimize_scalar``; pytorch-ood's
    ``TemperatureScaling`` runs 50 L-BFGS steps on ``T`` from 1, Guo et al.'s code L-BFGS too).
    The labels must be the head's own classes (indices into its rows). With ``head="probe"``
    the runner fits the probe on the other rows only (:meth:`probe_rows`), so that, as in Guo
    et al., the temperature is fitted on data the classifier was not trained on; an encoder's
    own head (trained elsewhere) sees every row.
    """

    name: ClassVar[str] = "temp-msp"
    requires_labels: ClassVar[bool] = True
    differentiable: ClassVar[bool] = True
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = _params(
        holdout_fraction=[Number(0, 1, closed="right")], seed=[integer(0)]
    )

    temperature_: float

    def __init__(
        self,
        *,
        holdout_fraction: float = 0.2,
        seed: int = 0,
        head: str = "encoder",
        head_weight: npt.ArrayLike | None = None,
        head_bias: npt.ArrayLike | None = None,
        image_projection: npt.ArrayLike | None = None,
    ) -> None:
        self.holdout_fraction = holdout_fraction
        self.seed = seed
        store_head_params(self, head, (head_weight, head_bias, image_projection))

    def _fit_head(self, features: npt.NDArray[np.float64], labels: Labels | None) -> None:
        _require_classes(self)
        if labels is None:
            raise InvalidParameterError(
                "temp-msp needs class labels (the head's class of each ID training sample) to "
                "fit its temperature: call fit(features, labels)"
            )
        labels = check_labels(labels, len(features), min_classes=1)
        n_classes = len(self.weight_)
        if labels.max() >= n_classes:
            raise InvalidParameterError(
                f"temp-msp: labels must index the head's {n_classes} classes (0..{n_classes - 1})"
                f", got a label {int(labels.max())}; {self._label_advice()}"
            )
        _, held_out = holdout_split(len(features), float(self.holdout_fraction), int(self.seed))
        logits = self.head_logits(features[held_out])
        accuracy = float(np.mean(logits.argmax(axis=1) == labels[held_out]))
        if accuracy <= 1.0 / n_classes:
            raise InvalidParameterError(
                f"temp-msp: the head predicts the given labels no better than chance (accuracy "
                f"{accuracy:.3f} on {len(held_out)} held-out samples, {n_classes} classes), so "
                f"they are probably not the head's classes; {self._label_advice()}"
            )
        self.temperature_ = fit_temperature(logits, labels[held_out])

    @classmethod
    def probe_rows(cls, params: Mapping[str, Any], n_rows: int) -> npt.NDArray[np.int64] | None:
        """The rows ``fit`` does not hold out: the ones a probe head may be fitted on."""
        defaults = {info.name: info.default for info in cls.param_info()}
        merged = {**defaults, **params}
        fit_rows, _ = holdout_split(n_rows, float(merged["holdout_fraction"]), int(merged["seed"]))
        return fit_rows

    def _label_advice(self) -> str:
        """How to get labels that index this head's classes (the fix, per head source)."""
        if parse_head_source(self.head)[0] == "probe":
            return (
                "a probe head's row c is the c-th of its sorted classes: pass the labels as "
                "those indices (np.unique(labels, return_inverse=True)[1])"
            )
        return (
            "these are not the head's classes (e.g. another data set's classes under an "
            "ImageNet head): use head='probe' (a linear probe fitted on these labels)"
        )

    def _score_logits(self, logits: npt.NDArray[np.float64]) -> Scores:
        return msp(logits, self.temperature_)

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) temperature-scaled MSP of an (n, D) tensor; as ``score_samples``."""
        return score_logits_torch(self._torch_logits(features), "msp", self.temperature_)
