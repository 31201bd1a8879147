"""The post-hoc family: scores of a classifier's penultimate features and its linear head.

Every method here is a function of the pooled features ``f`` (n × D) and the head's weight ``W``
(C × D') and bias ``b`` (C,), given as constructor arrays by the runner (``head_weight``,
``head_bias``); no detector holds a model. ``head`` records where the head came from:

* ``encoder`` — the encoder's own classifier (EfficientNet-Lite's ImageNet head, a timm
  classifier, a fine-tuned model's head): ``logits = f @ W.T + b``;
* ``probe`` — a linear probe fitted by the runner on the ID training features (its
  standardisation folded into ``W`` and ``b``, so the head is affine in ``f`` as well);
* ``zero-shot`` — a CLIP zero-shot head: the features are first mapped into the joint space,
  ``h = normalize(normalize(f) @ image_projection)`` (the projection given when the features are
  pre-projection), and ``W`` is CLIP's logit scale times the unit class embeddings, ``b = 0``.

On a concatenated encoder (``concat:A+B``), ``SOURCE@K`` is that head on part K alone (zeros
in the other parts' columns; :func:`parse_head_source`): the logits are the part's, while a
method that also reads the features (ViM's residual, ReAct's clip, GradNorm's norm) reads all
of the concatenation's.

The methods see ``h`` (the features the head is applied to: ``f`` itself for the first two)
and the head; :meth:`HeadDetector.head_features` and :meth:`HeadDetector.head_logits` are the one
home of that mapping.

Detectors here, each with its paper, formula, the authors' defaults and the differences in its
class docstring: ``vim`` and ``vim-residual``, ``react``, ``ash-p``, ``ash-b``, ``ash-s``,
``scale``, ``dice``, ``she``, ``nnguide``, ``fdbd`` (the softmax-based ones are in
``posthoc_logits.py``). What they fit (ViM's subspace, ReAct's clip, DICE's mask, SHE's
patterns, NNGuide's bank, fDBD's mean) is fitted in ``fit`` on the ID training features only.
Numpy scores are float64, computed in row blocks (:meth:`HeadDetector.head_feature_blocks`);
every torch score is differentiable, piecewise where a method selects units, neighbours or a
class (without gradient) and is smooth in the selected values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt
from sklearn.utils.validation import check_is_fitted

from oodprobe.arrays import (
    Features,
    Labels,
    Scores,
    check_features,
    check_labels,
    l2_normalize,
    row_blocks,
    rows_per_block,
)
from oodprobe.detectors import search
from oodprobe.detectors.base import Choices, Detector, Number, integer, register_detector
from oodprobe.detectors.probe import negative_energy, score_logits_torch
from oodprobe.errors import InvalidParameterError

if TYPE_CHECKING:
    import torch

_BLOCK_ELEMENTS = 1 << 22  # float64 values of one per-row-block temporary (32 MiB)

HEAD_SOURCES = ("encoder", "probe", "zero-shot")
"""Where a post-hoc detector's head comes from (see the module docstring)."""

_PART = re.compile(r"(?P<source>[a-z-]+)(?:@(?P<part>[1-9][0-9]*))?\Z")


def parse_head_source(head: str) -> tuple[str, int | None]:
    """``SOURCE[@PART]`` → (one of ``HEAD_SOURCES``, 1-based part or None).

    ``probe@2`` is a probe on part 2 of a concatenated encoder (``concat:A+B``; see
    ``oodprobe.encoders.concat``), ``encoder@1`` part 1's own classifier, ``zero-shot@3`` the
    zero-shot head of part 3 (its text part). InvalidParameterError for anything else.
    """
    match = _PART.match(head) if isinstance(head, str) else None
    if match is None or match["source"] not in HEAD_SOURCES:
        raise InvalidParameterError(
            f"head source {head!r} is not one of {', '.join(HEAD_SOURCES)}, optionally with "
            f"@PART (a part of a concat: encoder, from 1), e.g. 'probe@2'"
        )
    part = match["part"]
    return match["source"], None if part is None else int(part)


def head_kinds(heads: Sequence[str]) -> tuple[str, ...]:
    """The sources of ``heads`` without their parts: ``("probe@2", "encoder")`` →
    ``("probe", "encoder")``."""
    return tuple(parse_head_source(head)[0] for head in heads)


def is_head_source(head: Any) -> bool:
    """Whether ``head`` is a valid ``SOURCE[@PART]`` (see :func:`parse_head_source`)."""
    try:
        parse_head_source(head)
    except InvalidParameterError:
        return False
    return True


class HeadSource(Choices):
    """Constraint: a head source, ``encoder``, ``probe`` or ``zero-shot``, optionally ``@PART``."""

    def __init__(self) -> None:
        super().__init__(*HEAD_SOURCES)

    def is_satisfied_by(self, val: Any) -> bool:
        return is_head_source(val)

    def describe(self) -> str:
        return f"one of {', '.join(HEAD_SOURCES)}, optionally @PART of a concat: encoder"


def head_row_labels(
    labels: npt.NDArray[np.integer[Any]], head: str, classes: npt.ArrayLike | None = None
) -> npt.NDArray[np.integer[Any]]:
    """ID labels as the indices of a head's rows, where the rows are the ID classes.

    A ``probe`` head's row c is the c-th sorted class it was fitted on, and a ``zero-shot``
    head's the c-th sorted class of the ID training set (``pipeline.id_class_names``);
    ``classes`` are those sorted classes (default: ``np.unique(labels)``). Other heads (an
    encoder's own) are indexed by the labels themselves: returned unchanged.
    """
    if parse_head_source(head)[0] not in ("probe", "zero-shot"):
        return labels
    known = np.unique(labels) if classes is None else np.asarray(classes)
    return np.searchsorted(known, labels).astype(np.int64)


# the runner's arrays: never set by a user (``head`` is theirs)
HEAD_CONSTRAINTS: dict[str, list[Any]] = {
    "head": [HeadSource()],
    "head_weight": ["array-like", None],
    "head_bias": ["array-like", None],
    "image_projection": ["array-like", None],
}


class HeadDetector(Detector):
    """Base of the post-hoc detectors: features + the head ``(W, b)`` as arrays.

    Subclasses list ``head``, ``head_weight``, ``head_bias`` and ``image_projection`` as
    keyword parameters (defaults ``"encoder"``, ``None``, ``None``, ``None``), merge
    ``HEAD_CONSTRAINTS`` into their constraints, and implement ``_fit_head(h, labels)`` (what
    the method learns from the ID training features ``h`` mapped by :meth:`head_features`; the
    head's arrays are checked and stored before it runs) and ``score_samples``.
    ``fit`` sets ``n_dims_`` (columns of the raw features), ``weight_`` (C × D') and ``bias_``
    (C,) float64.
    """

    requires_head: ClassVar[bool] = True
    runner_params: ClassVar[frozenset[str]] = frozenset(
        {"head_weight", "head_bias", "image_projection"}
    )

    head: str
    head_weight: npt.ArrayLike | None
    head_bias: npt.ArrayLike | None
    image_projection: npt.ArrayLike | None
    weight_: npt.NDArray[np.float64]
    bias_: npt.NDArray[np.float64]

    def fit(self, features: Features, labels: Labels | None = None) -> HeadDetector:
        """Check the head's arrays against ``features`` (n, D); learn the method's state."""
        self._validate_params()
        features = check_features(features, dtype=np.float64)
        weight, bias, projection = self._checked_head(int(features.shape[1]))
        self.n_dims_ = int(features.shape[1])
        self.weight_, self.bias_ = weight, bias
        self.projection_ = projection
        # head_features' mapping, without checking the features a second time
        self._fit_head(self._map_features(np.asarray(features, dtype=np.float64)), labels)
        return self

    def _fit_head(self, features: npt.NDArray[np.float64], labels: Labels | None) -> None:
        """What the method learns from the mapped ID training features (default: nothing)."""

    @classmethod
    def probe_rows(cls, params: Mapping[str, Any], n_rows: int) -> npt.NDArray[np.int64] | None:
        """Rows of the ``n_rows`` ID training features a runner-fitted ``probe`` head may be
        fitted on (None: all); a method that holds rows out for itself keeps them from it."""
        return None

    def _checked_head(
        self, n_dims: int
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """(W, b, projection) as float64, their shapes checked against ``n_dims`` features.

        The projection is an empty (0, 0) array when there is none (a saved state must be an
        array, not None).
        """
        if self.head_weight is None:
            raise InvalidParameterError(
                f"detector {self.name!r} needs the classifier head's weight (head_weight), "
                f"computed by the runner from the encoder's head, a linear probe or class "
                f"embeddings; pass it to create_detector"
            )
        weight: npt.NDArray[np.float64] = np.asarray(
            check_features(self.head_weight, name="head_weight", dtype=np.float64), np.float64
        )
        bias = (
            np.zeros(len(weight))
            if self.head_bias is None
            else np.asarray(self.head_bias, dtype=np.float64)
        )
        if bias.shape != (len(weight),) or not np.all(np.isfinite(bias)):
            raise InvalidParameterError(
                f"head_bias must be a finite ({len(weight)},) array (one per class of "
                f"head_weight), got shape {bias.shape}"
            )
        projection: npt.NDArray[np.float64] = np.zeros((0, 0))
        inner = n_dims
        if self.image_projection is not None:
            projection = np.asarray(
                check_features(self.image_projection, name="image_projection", dtype=np.float64),
                dtype=np.float64,
            )
            if projection.shape[0] != n_dims:
                raise InvalidParameterError(
                    f"image_projection has shape {projection.shape}; it must have {n_dims} rows "
                    f"(the feature dims)"
                )
            inner = int(projection.shape[1])
        if weight.shape[1] != inner:
            raise InvalidParameterError(
                f"head_weight has shape {weight.shape} and the head's input has {inner} dims; "
                f"the head does not fit these features"
            )
        return weight, bias, projection

    # -- the one home of the head's input and its logits ---------------------------------------
    def head_features(self, features: Features) -> npt.NDArray[np.float64]:
        """(n, D') float64 input of the head: ``f``, or CLIP's joint-space embedding of ``f``."""
        check_is_fitted(self)
        features = check_features(features, n_dims=self.n_dims_, dtype=np.float64)
        return self._map_features(np.asarray(features, dtype=np.float64))

    def _map_features(self, features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """:meth:`head_features` of already checked float64 features."""
        if self.projection_.size == 0:
            return features
        return np.asarray(l2_normalize(l2_normalize(features) @ self.projection_), np.float64)

    def head_feature_blocks(
        self, features: Features, width: int = 0
    ) -> Iterator[tuple[slice, npt.NDArray[np.float64]]]:
        """Yield ``(rows, h)``: :meth:`head_features` of consecutive row blocks of ``features``.

        ``features`` is checked once (fitted detector, dims, finite values); blocks hold about
        2^22 values of the widest per-row temporary (``width`` columns, at least D' and C), so
        scoring any number of rows needs bounded memory.
        """
        check_is_fitted(self)
        features = check_features(features, n_dims=self.n_dims_)
        widest = max(width, self.n_dims_, *self.weight_.shape)
        for rows in row_blocks(len(features), rows_per_block(widest, _BLOCK_ELEMENTS)):
            yield rows, self._map_features(np.asarray(features[rows], dtype=np.float64))

    def _score_blocks(
        self,
        features: Features,
        score: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]],
        width: int = 0,
    ) -> Scores:
        """(n,) float64 ``score(h)`` of the mapped features, computed per row block."""
        blocks = [score(h) for _, h in self.head_feature_blocks(features, width)]
        return np.concatenate(blocks).astype(np.float64, copy=False)

    def head_logits(self, head_features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """(n, C) logits ``h @ W.T + b`` of mapped features ``h`` (from :meth:`head_features`)."""
        return np.asarray(head_features @ self.weight_.T + self.bias_, dtype=np.float64)

    def head_features_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable :meth:`head_features` of an (n, D) tensor, in float32 at least."""
        import torch

        features = self._torch_features(features)
        if self.projection_.size == 0:
            return features
        joint = torch.nn.functional.normalize(features, dim=1)
        return torch.nn.functional.normalize(joint @ self._torch_constant(self.projection_, joint))

    def head_logits_torch(self, head_features: torch.Tensor) -> torch.Tensor:
        """Differentiable :meth:`head_logits` of a tensor from :meth:`head_features_torch`."""
        weight = self._torch_constant(self.weight_, head_features)
        return head_features @ weight.T + self._torch_constant(self.bias_, head_features)


# -- shared pieces ----------------------------------------------------------------------------

PERCENTILE: list[Any] = [Number(0, 100, closed="both")]
# ASH and SCALE keep the top (100 − p) % of the units: at p = 100 none would be left
PRUNE_PERCENTILE: list[Any] = [Number(0, 100, closed="left")]
_TINY = 1e-12


def store_head_params(detector: HeadDetector, head: str, arrays: tuple[Any, Any, Any]) -> None:
    """Store the four head parameters of a subclass's ``__init__`` under their own names."""
    detector.head = head
    detector.head_weight, detector.head_bias, detector.image_projection = arrays


def energy_torch(logits: torch.Tensor) -> torch.Tensor:
    """Negative free energy ``logsumexp(z)`` of (n, C) logits (float32 at least); higher = ID.

    The torch twin of ``negative_energy``: probe's ``score_logits_torch``, its one home.
    """
    return score_logits_torch(logits, "energy")


# -- ViM and its residual ---------------------------------------------------------------------


def vim_principal_dims(n_dims: int) -> int:
    """The ViM authors' principal-subspace size for D-dimensional features.

    1000 for D >= 2048 and 512 for D >= 768 (``benchmark.py`` of haoqiwang/vim), else D // 2
    (their rule gives 512 also below 768 dims, which leaves no residual there).
    """
    if n_dims >= 2048:
        return 1000
    if n_dims >= 768:
        return 512
    return max(1, n_dims // 2)


class _ResidualDetector(HeadDetector):
    """Shared fit of ViM and its residual: origin ``u``, residual basis of ``h − u``."""

    dim: int | None
    differentiable: ClassVar[bool] = True
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "dim": [integer(1), None],
        **HEAD_CONSTRAINTS,
    }

    def __init__(
        self,
        *,
        dim: int | None = None,
        head: str = "encoder",
        head_weight: npt.ArrayLike | None = None,
        head_bias: npt.ArrayLike | None = None,
        image_projection: npt.ArrayLike | None = None,
    ) -> None:
        self.dim = dim
        store_head_params(self, head, (head_weight, head_bias, image_projection))

    def _fit_head(self, features: npt.NDArray[np.float64], labels: Labels | None) -> None:
        n_dims = int(features.shape[1])
        dim = vim_principal_dims(n_dims) if self.dim is None else int(self.dim)
        if dim >= n_dims:
            raise InvalidParameterError(
                f"detector {self.name!r}: dim={dim} leaves no residual of the head's "
                f"{n_dims}-dimensional input; use dim < {n_dims} (or leave it unset)"
            )
        # the origin: the point the head maps to zero logits, u = −W⁺ b
        self.origin_ = np.asarray(-np.linalg.pinv(self.weight_) @ self.bias_, dtype=np.float64)
        second_moment = np.zeros((n_dims, n_dims))
        for rows in row_blocks(len(features), rows_per_block(n_dims, _BLOCK_ELEMENTS)):
            centered = features[rows] - self.origin_
            second_moment += centered.T @ centered
        second_moment /= len(features)
        eigenvalues, eigenvectors = np.linalg.eigh(second_moment)
        order = np.argsort(-eigenvalues, kind="stable")
        self.dim_ = dim
        self.residual_basis_ = np.ascontiguousarray(eigenvectors[:, order[dim:]])

    def residual_norms(self, head_features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """(n,) ``‖(h − u) R‖`` of mapped features ``h``: the norm outside the principal space."""
        return np.asarray(
            np.linalg.norm((head_features - self.origin_) @ self.residual_basis_, axis=1),
            dtype=np.float64,
        )

    def _residual_norms_torch(self, head_features: torch.Tensor) -> torch.Tensor:
        import torch

        centered = head_features - self._torch_constant(self.origin_, head_features)
        projected = centered @ self._torch_constant(self.residual_basis_, head_features)
        return torch.linalg.vector_norm(projected, dim=1)


@register_detector
class ViMDetector(_ResidualDetector):
    """Virtual-logit matching: the head's energy minus a scaled residual norm.

    Wang, Li, Zhang, Zhang, "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022.
    Score: ``logsumexp(z) − α·‖(h − u) R‖`` with ``u = −W⁺ b``, ``R`` the eigenvectors of the
    uncentred second moment of ``h − u`` (ID training features) beyond the top ``dim``, and
    ``α = Σ max_c z_c / Σ ‖(h − u) R‖`` over the training features. Defaults from the
    authors' ``benchmark.py``: ``dim`` 1000 for D >= 2048, 512 for D >= 768; below 768 dims,
    where their rule leaves no residual, D // 2 (:func:`vim_principal_dims`). Differences:
    ``eigh`` instead of ``eig`` (the matrix is symmetric: real, sorted eigenpairs; the same
    subspace); on a zero-shot head, ``h`` is the joint-space embedding (``b = 0``, so
    ``u = 0``). The torch score is differentiable everywhere.
    """

    name: ClassVar[str] = "vim"

    def _fit_head(self, features: npt.NDArray[np.float64], labels: Labels | None) -> None:
        super()._fit_head(features, labels)
        max_logits, residuals = 0.0, 0.0
        for rows in row_blocks(len(features), rows_per_block(max(self.weight_.shape))):
            max_logits += float(self.head_logits(features[rows]).max(axis=1).sum())
            residuals += float(self.residual_norms(features[rows]).sum())
        if residuals <= _TINY * len(features):
            raise InvalidParameterError(
                f"detector 'vim': the ID training features have no residual outside the "
                f"{self.dim_}-dimensional principal space, so the virtual logit cannot be "
                f"scaled; use a smaller dim"
            )
        self.alpha_ = max_logits / residuals

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 ViM scores of (n, D) features, higher = more in-distribution."""

        def score(head_features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
            energy = negative_energy(self.head_logits(head_features))
            return energy - self.alpha_ * self.residual_norms(head_features)

        return self._score_blocks(features, score)

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) ViM scores of an (n, D) tensor; matches ``score_samples``."""
        head_features = self.head_features_torch(features)
        energy = energy_torch(self.head_logits_torch(head_features))
        return energy - self.alpha_ * self._residual_norms_torch(head_features)


@register_detector
class ViMResidualDetector(_ResidualDetector):
    """ViM's residual alone: minus the norm of the features outside the principal space.

    Wang, Li, Zhang, Zhang, CVPR 2022 (the "Residual" baseline of the authors'
    ``benchmark.py``). Score: ``−‖(h − u) R‖`` with ``u = −W⁺ b`` and ``R`` as in ``vim``
    (same ``dim`` rule and differences). Uses the head only for the origin ``u``.
    """

    name: ClassVar[str] = "vim-residual"

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 minus residual norms of (n, D) features, higher = more ID."""
        return self._score_blocks(features, lambda h: -self.residual_norms(h))

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) minus residual norms of an (n, D) tensor; as ``score_samples``."""
        return -self._residual_norms_torch(self.head_features_torch(features))


# -- ReAct ------------------------------------------------------------------------------------


@register_detector
class ReActDetector(HeadDetector):
    """ReAct: energy of the head on features clipped at a percentile of the ID activations.

    Sun, Guo, Li, "ReAct: Out-of-distribution Detection With Rectified Activations", NeurIPS
    2021. Score: ``logsumexp(min(h, c) W^T + b)``, ``c`` the ``percentile``-th percentile of
    all entries of the ID training features (fitted in ``fit``). Defaults from the authors'
    code (deeplearning-wisc/react, ``compute_threshold.py``): percentile 90, energy score,
    clipping the pooled penultimate features from above only. Difference: the authors
    estimate ``c`` on ID validation images; here it is fitted on the ID training features
    (never on test or OOD data). The torch score is piecewise differentiable (zero gradient in
    clipped units).
    """

    name: ClassVar[str] = "react"
    differentiable: ClassVar[bool] = True
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "percentile": PERCENTILE,
        **HEAD_CONSTRAINTS,
    }

    def __init__(
        self,
        *,
        percentile: float = 90.0,
        head: str = "encoder",
        head_weight: npt.ArrayLike | None = None,
        head_bias: npt.ArrayLike | None = None,
        image_projection: npt.ArrayLike | None = None,
    ) -> None:
        self.percentile = percentile
        store_head_params(self, head, (head_weight, head_bias, image_projection))

    def _fit_head(self, features: npt.NDArray[np.float64], labels: Labels | None) -> None:
        self.threshold_ = float(np.percentile(features, float(self.percentile)))

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 ReAct energies of (n, D) features, higher = more in-distribution."""

        def score(head_features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
            clipped = np.minimum(head_features, self.threshold_)
            return negative_energy(self.head_logits(clipped))

        return self._score_blocks(features, score)

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Piecewise-differentiable (n,) ReAct energies of an (n, D) tensor."""
        clipped = self.head_features_torch(features).clamp(max=self.threshold_)
        return energy_torch(self.head_logits_torch(clipped))


# -- activation shaping: ASH-P, ASH-B, ASH-S and SCALE ------------------------------------------


def kept_units(n_dims: int, percentile: float) -> int:
    """Units ASH keeps of ``n_dims``: ``n − round(n · p / 100)`` (the authors' count)."""
    return n_dims - int(np.round(n_dims * percentile / 100.0))


def _top_mask(features: npt.NDArray[np.float64], n_kept: int) -> npt.NDArray[np.bool_]:
    """(n, D) mask of each row's ``n_kept`` largest entries; ties broken by lowest index.

    Exactly ``n_kept`` per row, as ``torch.topk`` keeps (which picks an unspecified subset of
    ties). Ties matter: post-ReLU features are mostly exact zeros (77 % for EfficientNet-Lite0
    on digits), so at ASH-B's 65th percentile the k-th largest is often 0.
    """
    column = features.shape[1] - n_kept
    kth = np.partition(features, column, axis=1)[:, column : column + 1]
    greater = features > kth
    ties = features == kth
    needed = n_kept - greater.sum(axis=1, keepdims=True)
    return np.asarray(greater | (ties & (np.cumsum(ties, axis=1) <= needed)))


def _top_mask_torch(features: torch.Tensor, n_kept: int) -> torch.Tensor:
    """:func:`_top_mask` of a tensor (without gradient: a choice of units)."""
    import torch

    with torch.no_grad():
        kth = torch.topk(features, n_kept, dim=1).values[:, -1:]
        greater = features > kth
        ties = features == kth
        needed = n_kept - greater.sum(dim=1, keepdim=True)
        return greater | (ties & (torch.cumsum(ties, dim=1) <= needed))


def sharpening_exponent(
    total: npt.NDArray[np.float64], kept: npt.NDArray[np.float64], bound: float
) -> npt.NDArray[np.float64]:
    """ASH-S's and SCALE's ``s1 / s2``, clipped to ``[1, bound]`` (1 where ``s2 <= 0``).

    For the non-negative (post-ReLU) features the papers assume, ``1 <= s1/s2 <= D/k`` always
    holds, so the clip changes nothing there; on features with negative entries it keeps
    ``exp(s1/s2)`` finite.
    """
    safe = np.where(kept > 0, kept, 1.0)
    return np.asarray(np.clip(np.where(kept > 0, total / safe, 1.0), 1.0, bound), np.float64)


def _sharpening_exponent_torch(
    total: torch.Tensor, kept: torch.Tensor, bound: float
) -> torch.Tensor:
    import torch

    positive = kept > 0
    ratio = total / torch.where(positive, kept, torch.ones_like(kept))
    return torch.where(positive, ratio, torch.ones_like(ratio)).clamp(1.0, bound)


class _ShapingDetector(HeadDetector):
    """Shared parameters, fit and scoring of ASH-P/-B/-S and SCALE: shape ``h``, then energy."""

    percentile: float
    differentiable: ClassVar[bool] = True
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "percentile": PRUNE_PERCENTILE,
        **HEAD_CONSTRAINTS,
    }

    def _fit_head(self, features: npt.NDArray[np.float64], labels: Labels | None) -> None:
        n_dims = int(features.shape[1])
        n_kept = kept_units(n_dims, float(self.percentile))
        if n_kept < 1:
            largest = 100.0 * (n_dims - 0.5) / n_dims
            raise InvalidParameterError(
                f"detector {self.name!r}: percentile={self.percentile:g} keeps none of the "
                f"head's {n_dims} input units; use a percentile below {largest:g}"
            )
        self.n_kept_ = n_kept

    def shape(self, head_features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """The method's shaped (n, D') features (see the class docstring)."""
        raise NotImplementedError

    def _shape_torch(self, head_features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 energies of the shaped (n, D) features, higher = more ID."""
        return self._score_blocks(
            features, lambda h: negative_energy(self.head_logits(self.shape(h)))
        )

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Piecewise-differentiable (n,) energies of the shaped features of an (n, D) tensor.

        The kept units are chosen without gradient; the score is differentiable in them.
        """
        shaped = self._shape_torch(self.head_features_torch(features))
        return energy_torch(self.head_logits_torch(shaped))


@register_detector
class ASHPDetector(_ShapingDetector):
    """ASH-P: energy of the head on features pruned to their largest units.

    Djurisic et al., ICLR 2023 (see ``ash-s``). Score: ``logsumexp(W (h ⊙ m) + b)``, ``m``
    keeping each row's ``k = D − round(D·p/100)`` largest entries. Default percentile 90, the
    authors' ImageNet setting for ASH-P (their Table 1). Differences: see ``ash-s``.
    Piecewise differentiable.
    """

    name: ClassVar[str] = "ash-p"

    def __init__(
        self,
        *,
        percentile: float = 90.0,
        head: str = "encoder",
        head_weight: npt.ArrayLike | None = None,
        head_bias: npt.ArrayLike | None = None,
        image_projection: npt.ArrayLike | None = None,
    ) -> None:
        self.percentile = percentile
        store_head_params(self, head, (head_weight, head_bias, image_projection))

    def shape(self, head_features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.where(_top_mask(head_features, self.n_kept_), head_features, 0.0)

    def _shape_torch(self, head_features: torch.Tensor) -> torch.Tensor:
        return head_features * _top_mask_torch(head_features, self.n_kept_)


@register_detector
class ASHBDetector(_ShapingDetector):
    """ASH-B: energy of the head on features binarised to their largest units.

    Djurisic et al., ICLR 2023 (see ``ash-s``). Score: ``logsumexp(W (m · s1/k) + b)``,
    ``s1 = Σ h`` the row's sum before pruning and ``m`` its ``k`` largest entries (so the sum
    is kept). Default percentile 65, the authors' ImageNet setting for ASH-B (Table 1).
    Differences: see ``ash-s``; ties matter most here, as post-ReLU features are mostly exact
    zeros and the fill lands on the zeros chosen. Piecewise differentiable (through ``s1``).
    """

    name: ClassVar[str] = "ash-b"

    def __init__(
        self,
        *,
        percentile: float = 65.0,
        head: str = "encoder",
        head_weight: npt.ArrayLike | None = None,
        head_bias: npt.ArrayLike | None = None,
        image_projection: npt.ArrayLike | None = None,
    ) -> None:
        self.percentile = percentile
        store_head_params(self, head, (head_weight, head_bias, image_projection))

    def shape(self, head_features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        fill = head_features.sum(axis=1) / self.n_kept_
        return np.where(_top_mask(head_features, self.n_kept_), fill[:, None], 0.0)

    def _shape_torch(self, head_features: torch.Tensor) -> torch.Tensor:
        fill = head_features.sum(dim=1, keepdim=True) / self.n_kept_
        return _top_mask_torch(head_features, self.n_kept_) * fill


@register_detector
class ASHSDetector(_ShapingDetector):
    """ASH-S: energy of the head on pruned features sharpened by ``exp(s1/s2)``.

    Djurisic, Bozanic, Ashok, Liu, "Extremely Simple Activation Shaping for
    Out-of-Distribution Detection", ICLR 2023. Score: ``logsumexp(W (h ⊙ m)·exp(s1/s2) + b)``,
    ``m`` keeping each row's ``k = D − round(D·p/100)`` largest entries, ``s1 = Σ h`` and
    ``s2 = Σ h ⊙ m``. Default percentile 90 (``ash_s@90``, the authors' ImageNet config).
    Differences: applied to the pooled features, as the authors' ImageNet ResNet-50 code does
    (``apply_ash`` after ``avgpool``, on a 2048 × 1 × 1 map, andrijazz/ash); for their CIFAR
    and other networks it shapes an earlier feature map, which cached pooled features cannot
    reproduce (OpenOOD and pytorch-ood on pooled input do as here). Exactly k units are kept,
    ties with the k-th largest broken by lowest index (``torch.topk``: unspecified, so the
    authors' choice among tied units is not reproducible). ``s1/s2`` is clipped
    to ``[1, D/k]`` (1 where ``s2 <= 0``): a no-op on the non-negative (post-ReLU) features
    the paper assumes, finite scores on features with negative entries (ViT, CLIP), where the
    method is outside its assumptions. Piecewise differentiable.
    """

    name: ClassVar[str] = "ash-s"

    def __init__(
        self,
        *,
        percentile: float = 90.0,
        head: str = "encoder",
        head_weight: npt.ArrayLike | None = None,
        head_bias: npt.ArrayLike | None = None,
        image_projection: npt.ArrayLike | None = None,
    ) -> None:
        self.percentile = percentile
        store_head_params(self, head, (head_weight, head_bias, image_projection))

    def shape(self, head_features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        pruned = np.where(_top_mask(head_features, self.n_kept_), head_features, 0.0)
        bound = head_features.shape[1] / self.n_kept_
        exponent = sharpening_exponent(head_features.sum(axis=1), pruned.sum(axis=1), bound)
        return np.asarray(pruned * np.exp(exponent)[:, None], dtype=np.float64)

    def _shape_torch(self, head_features: torch.Tensor) -> torch.Tensor:
        import torch

        pruned = head_features * _top_mask_torch(head_features, self.n_kept_)
        bound = head_features.shape[1] / self.n_kept_
        exponent = _sharpening_exponent_torch(head_features.sum(dim=1), pruned.sum(dim=1), bound)
        return pruned * torch.exp(exponent)[:, None]


@register_detector
class SCALEDetector(_ShapingDetector):
    """SCALE: energy of the head on the whole features scaled by ASH-S's ``exp(s1/s2)``.

    Xu, Chen, Franchi, Yao, "Scaling for Training Time and Post-hoc Out-of-distribution
    Detection Enhancement", ICLR 2024. Score: ``logsumexp(W h·exp(s1/s2) + b)``,
    ``s1 = Σ h`` and ``s2`` the sum of each row's ``k = D − round(D·p/100)`` largest entries;
    nothing is pruned. Default percentile 85 (the authors' ``configs/postprocessors/
    scale.yml``, kai422/SCALE). Differences: none in where it is applied (the authors' code
    scales the pooled features too); ties and the clip of ``s1/s2`` as in ``ash-s``.
    Piecewise differentiable. As for ``ash-s``, ``exp(s1/s2)`` passes float32's range when
    ``s1/s2 > 88`` (percentiles above ~99 on dense features): the torch score of float32
    features is then inf; pass float64 features (the numpy score is float64).
    """

    name: ClassVar[str] = "scale"

    def __init__(
        self,
        *,
        percentile: float = 85.0,
        head: str = "encoder",
        head_weight: npt.ArrayLike | None = None,
        head_bias: npt.ArrayLike | None = None,
        image_projection: npt.ArrayLike | None = None,
    ) -> None:
        self.percentile = percentile
        store_head_params(self, head, (head_weight, head_bias, image_projection))

    def shape(self, head_features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        kept = np.where(_top_mask(head_features, self.n_kept_), head_features, 0.0).sum(axis=1)
        bound = head_features.shape[1] / self.n_kept_
        exponent = sharpening_exponent(head_features.sum(axis=1), kept, bound)
        return np.asarray(head_features * np.exp(exponent)[:, None], dtype=np.float64)

    def _shape_torch(self, head_features: torch.Tensor) -> torch.Tensor:
        import torch

        kept = (head_features * _top_mask_torch(head_features, self.n_kept_)).sum(dim=1)
        bound = head_features.shape[1] / self.n_kept_
        exponent = _sharpening_exponent_torch(head_features.sum(dim=1), kept, bound)
        return head_features * torch.exp(exponent)[:, None]


# -- DICE -------------------------------------------------------------------------------------


@register_detector
class DICEDetector(HeadDetector):
    """DICE: energy of the head with only its largest ID contributions kept.

    Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection", ECCV 2022.
    Score: ``logsumexp((W ⊙ M) h + b)``, ``M`` keeping the ``C·D − round(p·C·D)`` largest
    entries of the contribution matrix ``mean_ID(h)[None, :] ⊙ W`` (fitted on the ID training
    features). Default sparsity p = 0.9 (``RouteDICE(p=90)`` of deeplearning-wisc/dice;
    OpenOOD's ``dice.yml``). Differences: the authors keep ``contrib > percentile(contrib,
    100p)``, which drops the smallest contribution even at p = 0; here exactly the top count
    is kept (ties, such as the zero contributions of units never active on ID data, broken
    by lowest index), so p = 0 is the plain energy. Differentiable
    (the mask is fixed after ``fit``).
    """

    name: ClassVar[str] = "dice"
    differentiable: ClassVar[bool] = True
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "sparsity": [Number(0, 1, closed="left")],
        **HEAD_CONSTRAINTS,
    }

    def __init__(
        self,
        *,
        sparsity: float = 0.9,
        head: str = "encoder",
        head_weight: npt.ArrayLike | None = None,
        head_bias: npt.ArrayLike | None = None,
        image_projection: npt.ArrayLike | None = None,
    ) -> None:
        self.sparsity = sparsity
        store_head_params(self, head, (head_weight, head_bias, image_projection))

    def _fit_head(self, features: npt.NDArray[np.float64], labels: Labels | None) -> None:
        self.mean_activation_ = np.asarray(features.mean(axis=0), dtype=np.float64)
        contributions = (self.mean_activation_[None, :] * self.weight_).ravel()
        n_kept = max(1, contributions.size - int(np.round(contributions.size * self.sparsity)))
        kept = np.zeros(contributions.size, dtype=bool)
        kept[np.argsort(-contributions, kind="stable")[:n_kept]] = True  # ties: lowest index
        self.masked_weight_ = np.where(kept.reshape(self.weight_.shape), self.weight_, 0.0)

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 DICE energies of (n, D) features, higher = more in-distribution."""
        return self._score_blocks(
            features, lambda h: negative_energy(h @ self.masked_weight_.T + self.bias_)
        )

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) DICE energies of an (n, D) tensor; matches ``score_samples``."""
        head_features = self.head_features_torch(features)
        weight = self._torch_constant(self.masked_weight_, head_features)
        logits = head_features @ weight.T + self._torch_constant(self.bias_, head_features)
        return energy_torch(logits)


# -- SHE --------------------------------------------------------------------------------------

PATTERN_SAMPLES = ("auto", "correct", "predicted")


@register_detector
class SHEDetector(HeadDetector):
    """SHE: inner product of the features with the stored pattern of their predicted class.

    Zhang, Fu, Liu, Ma, Lin, "Out-of-Distribution Detection based on In-Distribution Data
    Patterns Memorization with Modern Hopfield Energy", ICLR 2023. Score: ``⟨h, S_ŷ⟩``,
    ``ŷ = argmax_c z_c`` and ``S_c`` the mean of the ID training features of class c that the
    head classifies correctly (the authors' code and pytorch-ood's / OpenOOD's ``SHE``, metric
    inner product). ``pattern_samples``: ``correct`` needs labels that index the head's
    classes; ``predicted`` groups the training features by the head's prediction (no labels
    needed); ``auto`` (default) uses ``correct`` when labels are given and index the head's
    classes — a ``probe`` or ``zero-shot`` head (built on the ID classes) or labels agreeing
    with the head's prediction on more than half of the training samples — else
    ``predicted`` (an ImageNet head on another dataset's classes). The choice made is
    ``pattern_samples_``; the runner passes the ID labels whenever the ID set has them
    (:meth:`uses_labels`) and refuses unlabelled ID data for ``correct`` only. Difference: a
    class without samples (never predicted, or never correct) has a zero pattern and scores 0,
    where the authors' code needs every class present. Piecewise differentiable (the predicted class
    is chosen without gradient).
    """

    name: ClassVar[str] = "she"
    differentiable: ClassVar[bool] = True
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "pattern_samples": [Choices(*PATTERN_SAMPLES)],
        **HEAD_CONSTRAINTS,
    }

    def __init__(
        self,
        *,
        pattern_samples: str = "auto",
        head: str = "encoder",
        head_weight: npt.ArrayLike | None = None,
        head_bias: npt.ArrayLike | None = None,
        image_projection: npt.ArrayLike | None = None,
    ) -> None:
        self.pattern_samples = pattern_samples
        store_head_params(self, head, (head_weight, head_bias, image_projection))

    @classmethod
    def needs_labels(cls, params: Mapping[str, Any]) -> bool:
        """Labels are needed for ``correct`` only (a probe head needs them anyway)."""
        return params.get("pattern_samples", "auto") == "correct"

    @classmethod
    def uses_labels(cls, params: Mapping[str, Any]) -> bool:
        """``auto`` uses labels when the ID set has them (else it groups by prediction)."""
        return params.get("pattern_samples", "auto") in ("correct", "auto")

    def _predict(self, head_features: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        blocks = row_blocks(len(head_features), rows_per_block(max(self.weight_.shape)))
        predictions = [self.head_logits(head_features[rows]).argmax(axis=1) for rows in blocks]
        return np.concatenate(predictions).astype(np.int64)

    def _fit_head(self, features: npt.NDArray[np.float64], labels: Labels | None) -> None:
        n_classes = len(self.weight_)
        predictions = self._predict(features)
        mode = str(self.pattern_samples)
        if labels is not None:
            labels = check_labels(labels, len(features), min_classes=1)
        if mode == "correct":
            if labels is None or int(labels.max()) >= n_classes:
                given = "no labels" if labels is None else f"labels up to {int(labels.max())}"
                raise InvalidParameterError(
                    f"detector 'she' with pattern_samples='correct' needs labels that index "
                    f"the head's {n_classes} classes, got {given}; use "
                    f"pattern_samples='predicted' or 'auto'"
                )
        elif mode == "auto":
            index_head = (
                labels is not None
                and int(labels.max()) < n_classes
                and (self.head != "encoder" or float(np.mean(labels == predictions)) > 0.5)
            )
            mode = "correct" if index_head else "predicted"
        keep = np.ones(len(features), dtype=bool)
        if mode == "correct":
            assert labels is not None
            keep = labels == predictions
        classes, kept = predictions[keep], features[keep]
        order = np.argsort(classes, kind="stable")
        present, starts = np.unique(classes[order], return_index=True)
        sums = np.zeros((n_classes, features.shape[1]))
        if len(order):
            sums[present] = np.add.reduceat(kept[order], starts, axis=0)
        counts = np.bincount(classes, minlength=n_classes)
        self.patterns_ = sums / np.maximum(counts, 1)[:, None]
        self.pattern_counts_ = counts.astype(np.int64)
        self.pattern_samples_ = mode

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 SHE scores of (n, D) features, higher = more in-distribution."""

        def score(head_features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
            predictions = self.head_logits(head_features).argmax(axis=1)
            return np.einsum("nd,nd->n", head_features, self.patterns_[predictions])

        return self._score_blocks(features, score)

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Piecewise-differentiable (n,) SHE scores of an (n, D) tensor."""
        head_features = self.head_features_torch(features)
        predictions = self.head_logits_torch(head_features).detach().argmax(dim=1)
        patterns = self._torch_constant(self.patterns_, head_features)[predictions]
        return (head_features * patterns).sum(dim=1)


# -- NNGuide ----------------------------------------------------------------------------------


@register_detector
class NNGuideDetector(HeadDetector):
    """NNGuide: the head's energy guided by the k-NN similarity to a confidence-scaled bank.

    Park, Jung, Teoh, "Nearest Neighbor Guidance for Out-of-Distribution Detection", ICCV 2023.
    Score: ``energy(h) · mean_{top-k} ⟨ĥ, ĥ_i·energy(h_i)⟩``, ``ĥ = h/‖h‖``, the bank the
    unit ID training features scaled by their energies ``logsumexp(z_i)``, the k largest
    inner products. Default ``k`` 10 (``configs/detector/nnguide.yaml``, roomo7time/nnguide).
    Differences: the bank is every ID training feature given to ``fit`` (the authors use a
    random 1 % of ImageNet's training set; OpenOOD 1 % with k = 100): pass a subsample for
    theirs. The neighbours are found in float32 and their similarities recomputed in float64.
    Piecewise differentiable (neighbours chosen without gradient).
    """

    name: ClassVar[str] = "nnguide"
    differentiable: ClassVar[bool] = True
    bank_: npt.NDArray[np.float32]
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "k": [integer(1)],
        **HEAD_CONSTRAINTS,
    }

    def __init__(
        self,
        *,
        k: int = 10,
        head: str = "encoder",
        head_weight: npt.ArrayLike | None = None,
        head_bias: npt.ArrayLike | None = None,
        image_projection: npt.ArrayLike | None = None,
    ) -> None:
        self.k = k
        store_head_params(self, head, (head_weight, head_bias, image_projection))

    def _fit_head(self, features: npt.NDArray[np.float64], labels: Labels | None) -> None:
        search.check_search_limits(int(self.k), len(features), None)
        bank = np.empty(features.shape, dtype=np.float32)
        for rows in row_blocks(len(features), rows_per_block(max(self.weight_.shape))):
            energy = negative_energy(self.head_logits(features[rows]))
            bank[rows] = l2_normalize(features[rows], dtype=np.float64) * energy[:, None]
        self.bank_ = bank

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 NNGuide scores of (n, D) features, higher = more in-distribution."""
        check_is_fitted(self)

        def score(head_features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
            unit = np.asarray(l2_normalize(head_features, dtype=np.float64), dtype=np.float64)
            indices = search.exact_search(self.bank_, unit.astype(np.float32), int(self.k))[1]
            neighbours = self.bank_[indices].astype(np.float64)  # (n, k, D')
            guidance = np.einsum("nkd,nd->nk", neighbours, unit).mean(axis=1)
            return guidance * negative_energy(self.head_logits(head_features))

        return self._score_blocks(features, score, width=int(self.k) * self.bank_.shape[1])

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Piecewise-differentiable (n,) NNGuide scores of an (n, D) tensor."""
        import torch

        head_features = self.head_features_torch(features)
        unit = torch.nn.functional.normalize(head_features, dim=1, eps=_TINY)
        query = unit.detach().to(device="cpu", dtype=torch.float32).numpy()
        indices = search.exact_search(self.bank_, np.ascontiguousarray(query), int(self.k))[1]
        neighbours = torch.from_numpy(self.bank_[indices]).to(unit)
        guidance = torch.einsum("nkd,nd->nk", neighbours, unit).mean(dim=1)
        return guidance * energy_torch(self.head_logits_torch(head_features))


# -- fDBD -------------------------------------------------------------------------------------


def _squared_distances(
    rows: npt.NDArray[np.float64],
    weight: npt.NDArray[np.float64],
    squared_norms: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """(n, C) ``‖r_i − w_c‖²`` of weight rows ``rows`` (n, D') to every class row of ``weight``.

    ``squared_norms`` are the rows' ``‖w_c‖²``; expanded as ``‖r‖² + ‖w‖² − 2 r·w`` (one
    matrix product), clipped at 0 against rounding.
    """
    distances = np.einsum("nd,nd->n", rows, rows)[:, None] + squared_norms[None, :]
    distances -= 2.0 * rows @ weight.T
    return np.asarray(np.maximum(distances, 0.0), dtype=np.float64)


@register_detector
class FDBDDetector(HeadDetector):
    """fDBD: mean feature distance to the decision boundaries, over the distance to the ID mean.

    Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024.
    Score: ``mean_{c≠ŷ} |z_ŷ − z_c| / ‖w_ŷ − w_c‖ / ‖h − μ‖``, ``ŷ = argmax z`` and ``μ`` the
    mean ID training feature. No parameters (the authors' ``run_imagenet.py``,
    litianliu/fDBD-OOD). Difference: the authors sum over the classes instead of averaging,
    a constant factor C − 1 (the same ranking). A head with two identical class rows is
    refused (their boundary is undefined). Piecewise differentiable (``ŷ`` chosen without
    gradient).
    """

    name: ClassVar[str] = "fdbd"
    differentiable: ClassVar[bool] = True
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

    def _fit_head(self, features: npt.NDArray[np.float64], labels: Labels | None) -> None:
        n_classes = len(self.weight_)
        if n_classes < 2:
            raise InvalidParameterError(
                f"detector 'fdbd' needs a head with at least 2 classes, got {n_classes}"
            )
        squared_norms = np.einsum("cd,cd->c", self.weight_, self.weight_)
        # two identical rows: a squared distance at rounding level of the norms
        tolerance = _TINY * (1.0 + float(squared_norms.max()))
        for rows in row_blocks(n_classes, rows_per_block(n_classes)):
            distances = _squared_distances(self.weight_[rows], self.weight_, squared_norms)
            distances[np.arange(distances.shape[0]), np.arange(rows.start, rows.stop)] = np.inf
            same = np.argwhere(distances <= tolerance)
            if len(same):
                first, second = rows.start + int(same[0, 0]), int(same[0, 1])
                raise InvalidParameterError(
                    f"detector 'fdbd': classes {first} and {second} of the head have the same "
                    f"weight, so their decision boundary is undefined; check head_weight"
                )
        self.squared_weight_norms_ = squared_norms
        self.train_mean_ = np.asarray(features.mean(axis=0), dtype=np.float64)

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 fDBD scores of (n, D) features, higher = more in-distribution."""
        check_is_fitted(self)
        n_classes = len(self.weight_)

        def score(head_features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
            logits = self.head_logits(head_features)
            rows = np.arange(len(logits))
            predictions = logits.argmax(axis=1)
            distances = np.sqrt(
                _squared_distances(
                    self.weight_[predictions], self.weight_, self.squared_weight_norms_
                )
            )
            distances[rows, predictions] = 1.0  # its numerator is 0
            gaps = np.abs(logits[rows, predictions][:, None] - logits)
            boundary = (gaps / np.maximum(distances, _TINY)).sum(axis=1) / (n_classes - 1)
            spread = np.linalg.norm(head_features - self.train_mean_, axis=1)
            return np.asarray(boundary / np.maximum(spread, _TINY), dtype=np.float64)

        return self._score_blocks(features, score, width=3 * n_classes)

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Piecewise-differentiable (n,) fDBD scores of an (n, D) tensor."""
        import torch

        head_features = self.head_features_torch(features)
        logits = self.head_logits_torch(head_features)
        predictions = logits.detach().argmax(dim=1)
        weight = self._torch_constant(self.weight_, logits)
        norms = self._torch_constant(self.squared_weight_norms_, logits)
        chosen = weight[predictions]
        squared = norms[predictions][:, None] + norms[None, :] - 2.0 * chosen @ weight.T
        distances = squared.clamp_min(0.0).sqrt()
        is_prediction = torch.nn.functional.one_hot(predictions, len(self.weight_)).bool()
        distances = torch.where(is_prediction, torch.ones_like(distances), distances)
        top = logits.gather(1, predictions[:, None])
        boundary = ((top - logits).abs() / distances.clamp_min(_TINY)).sum(dim=1)
        boundary = boundary / (len(self.weight_) - 1)
        spread = torch.linalg.vector_norm(
            head_features - self._torch_constant(self.train_mean_, head_features), dim=1
        )
        return boundary / spread.clamp_min(_TINY)
