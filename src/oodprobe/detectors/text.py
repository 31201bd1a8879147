"""Detectors that use class-name text embeddings: MCM (zero-shot) and PLP (pseudo-label probe).

Both take the class embeddings ``t_c`` (C × E, from the encoder's text tower; see
``oodprobe.encoders.text.compute_class_embeddings``) and, when the features are taken before the
image projection, that projection ``W_proj`` (D × E) as constructor arrays. The joint-space image
embedding is ``u(x) = normalize(normalize(f(x)) @ W_proj)``. No detector holds a model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from sklearn.utils.validation import check_is_fitted

from oodprobe.arrays import (
    Features,
    Labels,
    Scores,
    budget_rows,
    check_features,
    float64_rows,
    l2_normalize,
    row_blocks,
    rows_per_block,
)
from oodprobe.detectors.base import Detector, register_detector
from oodprobe.detectors.probe import (
    PROBE_CONSTRAINTS,
    TEMPERATURE,
    LinearHead,
    LogitScore,
    ProbePrecision,
)
from oodprobe.errors import InvalidParameterError

# computed by the runner from the encoder's text tower, never set by a user
_TEXT_CONSTRAINTS: dict[str, list[Any]] = {
    "class_embeddings": ["array-like"],
    "image_projection": ["array-like", None],
}

if TYPE_CHECKING:
    import torch


def joint_space(
    features: npt.NDArray[Any], projection: npt.NDArray[np.float64] | None
) -> npt.NDArray[np.float64]:
    """Unit-norm joint-space rows ``normalize(normalize(f) @ W_proj)`` of (n, D) rows, float64.

    CLIP's mapping of (pre-projection) image features into the joint space (the features
    themselves, normalised, without a projection): the one home of what NegLabel, GL-MCM, CLIPN
    and the runner's label mining score; MCM's blocks fold the same norms into one pass.
    """
    joint = np.asarray(l2_normalize(features, dtype=np.float64), dtype=np.float64)
    if projection is not None:
        joint = np.asarray(l2_normalize(joint @ projection), dtype=np.float64)
    return joint


def _checked_text_arrays(
    class_embeddings: npt.ArrayLike, image_projection: npt.ArrayLike | None
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64] | None, int]:
    """Validate; return unit-norm float64 class embeddings, the projection, feature dims."""
    embeddings = check_features(
        class_embeddings, name="class_embeddings", min_samples=2, dtype=np.float64
    )
    if np.any(np.linalg.norm(embeddings, axis=1) == 0):
        raise InvalidParameterError("class_embeddings has an all-zero row; recompute it")
    unit = np.asarray(l2_normalize(embeddings), dtype=np.float64)
    if image_projection is None:
        return unit, None, int(embeddings.shape[1])
    projection = np.asarray(
        check_features(image_projection, name="image_projection", dtype=np.float64), np.float64
    )
    if projection.shape[1] != embeddings.shape[1]:
        raise InvalidParameterError(
            f"image_projection has shape {projection.shape} but class_embeddings has "
            f"{embeddings.shape[1]} columns; it must be (feature dims, {embeddings.shape[1]})"
        )
    return unit, projection, int(projection.shape[0])


def _cosine_blocks(
    features: Features,
    embeddings: npt.NDArray[np.float64],
    projection: npt.NDArray[np.float64] | None,
) -> Iterator[npt.NDArray[np.float64]]:
    """Yield ``cos(u(x), t_c)`` for consecutive row blocks: (block, C) float64."""
    for _, raw, norms in _raw_cosine_blocks(features, embeddings, projection):
        raw /= norms[:, None]
        yield raw


_EPS = 1e-12  # l2_normalize's: a row of norm below it is divided by it instead (zeros stay 0)
_BLOCK_ELEMENTS = 1 << 21  # (rows, C) float64 blocks of 16 MiB: large GEMMs, bounded temporaries


def _raw_cosine_blocks(
    features: Features,
    embeddings: npt.NDArray[np.float64],
    projection: npt.NDArray[np.float64] | None,
) -> Iterator[tuple[slice, npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
    """Yield ``(rows, v @ tᵀ, ‖v‖)`` per row block, in float64, with ``v`` ∝ ``u(x)``.

    ``v = f(x) @ W_proj`` (or ``f(x)`` without a projection), so ``cos = (v @ tᵀ) / ‖v‖``.
    ``normalize(normalize(f) @ W) = normalize(f @ W)`` (a positive factor per row cancels), so
    both normalisations become row norms folded into whatever follows: no division pass over
    the (rows, D) and (rows, E) blocks, the same values to a few float64 ulps. Norms below
    ``l2_normalize``'s eps are clamped where it clamps them (a row of zeros gives zero
    cosines, as ``l2_normalize`` leaves it zero).
    """
    width = max(len(embeddings), embeddings.shape[1])
    step = budget_rows(8 * (features.shape[1] + 2 * width), rows_per_block(width, _BLOCK_ELEMENTS))
    for rows in row_blocks(len(features), step, release=features):
        joint = float64_rows(features, rows)  # memory-mapped float16/bf16 too, page by page
        norms = np.maximum(np.sqrt(np.einsum("ij,ij->i", joint, joint)), _EPS)
        if projection is not None:
            joint = joint @ projection
            # ‖normalize(f) @ W‖ clamped at eps, as the second l2_normalize does, times ‖f‖
            projected = np.sqrt(np.einsum("ij,ij->i", joint, joint)) / norms
            norms *= np.maximum(projected, _EPS)
        yield rows, joint @ embeddings.T, norms


def mcm_scores(
    features: Features,
    embeddings: npt.NDArray[np.float64],
    projection: npt.NDArray[np.float64] | None,
    temperature: float,
) -> Scores:
    """(n,) float64 ``max_c softmax_c(cos(u(x), t_c) / T)``, computed in place per row block.

    With ``r = v @ tᵀ`` (``cos = r / ‖v‖``, see :func:`_raw_cosine_blocks`), the score is
    ``1 / Σ_c exp((r_c − max r) / (T‖v‖))``: max, subtract, scale, exp and sum on the one
    (rows, C) block the product wrote, with no copy, no separate normalisation and no
    (n, C) array. Every operation is float64, in the order of the reference formula up to
    the folded normalisation, so the scores equal the float64 reference
    ``softmax(normalize(normalize(f) @ W) @ tᵀ / T).max()`` to ~1e-15 relative (tested at
    1e-12 on near-tied cosines, 1000+ classes, T = 1 and T = 0.01), and so does the ranking.

    Why float64, not float32 plus a float64 softmax over the top classes: a float32 product
    of unit vectors of length E has an a-priori error bound ``γ_E = E·2⁻²⁴/(1 − E·2⁻²⁴)``
    (3e-5 at E = 512; ~1e-7 in practice), and the score's relative error is up to ``2γ_E/T``
    because *every* class enters the softmax: at T = 1 on cosines in [−1, 1] each term is at
    least ``e⁻²`` of the largest, so no class can be dropped and no top-k restriction
    recovers 1e-12. Scores scored in separate calls (ID and OOD) must each be exact for their
    ranking to be the float64 one, so the products stay float64.
    """
    scores = np.empty(len(features))
    for rows, raw, norms in _raw_cosine_blocks(features, embeddings, projection):
        top = raw.max(axis=1)
        raw -= top[:, None]
        raw *= (1.0 / (temperature * norms))[:, None]
        np.exp(raw, out=raw)
        scores[rows] = 1.0 / raw.sum(axis=1)
    return scores


class _TextMixin(Detector):
    """Validation and zero-shot cosines shared by MCM and PLP."""

    class_embeddings: npt.ArrayLike
    image_projection: npt.ArrayLike | None
    requires_text: ClassVar[bool] = True
    differentiable: ClassVar[bool] = True
    runner_params: ClassVar[frozenset[str]] = frozenset(_TEXT_CONSTRAINTS)

    def _text_arrays(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64] | None, int]:
        """The checked text arrays, computed once per (class_embeddings, image_projection).

        Kept as the same array objects between calls, so that their device copies are cached.
        """
        sources = (self.class_embeddings, self.image_projection)
        cached = self.__dict__.get("_text_cache")
        if cached is None or cached[0] is not sources[0] or cached[1] is not sources[1]:
            cached = (*sources, _checked_text_arrays(*sources))
            self.__dict__["_text_cache"] = cached
        return cached[2]

    def similarities(self, features: Features) -> npt.NDArray[np.float64]:
        """(n, C) cosines ``cos(u(x), t_c)`` of (n, D) features to the class embeddings."""
        embeddings, projection, n_dims = self._text_arrays()
        features = check_features(features, n_dims=n_dims)
        return np.concatenate(list(_cosine_blocks(features, embeddings, projection)))

    def zero_shot_predict(self, features: Features) -> Labels:
        """(n,) zero-shot class ``argmax_c cos(u(x), t_c)`` (PLP's pseudo-labels)."""
        embeddings, projection, n_dims = self._text_arrays()
        features = check_features(features, n_dims=n_dims)
        # argmax of cos = argmax of ‖v‖·cos: the per-row normalisation is not needed
        blocks = _raw_cosine_blocks(features, embeddings, projection)
        return np.concatenate([raw.argmax(axis=1) for _, raw, _ in blocks]).astype(np.int64)

    def _joint_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n, C) cosines of an (n, D) tensor, in float32 at least."""
        import torch

        embeddings, projection, _ = self._text_arrays()
        features = self._torch_features(features)
        joint = torch.nn.functional.normalize(features, dim=1)
        if projection is not None:
            joint = torch.nn.functional.normalize(joint @ self._torch_constant(projection, joint))
        return joint @ self._torch_constant(embeddings, joint).T


@register_detector
class MCMDetector(_TextMixin):
    """Maximum concept matching: zero-shot softmax over image-text cosines.

    Ming et al., "Delving into Out-of-Distribution Detection with Vision-Language
    Representations", NeurIPS 2022. Score: ``max_c softmax_c(cos(u(x), t_c) / T)``.
    ``temperature`` T = 1 on raw cosines as in the paper — *not* CLIP's logit scale 100. With
    cosines in [−1, 1] the softmax at T = 1 is nearly flat (scores near 1/C) but the ranking, which
    is all AUROC/FPR use, still separates. Differences: the class embeddings may come from the
    5-prompt ensemble of Adaloglou et al. (TMLR 2024) rather than MCM's single prompt — that is
    the caller's choice; features may be pre-projection (``image_projection`` given).
    ``fit`` learns nothing from the data; it checks the arrays' shapes and records them.
    """

    name: ClassVar[str] = "mcm"
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **_TEXT_CONSTRAINTS,
        "temperature": TEMPERATURE,
    }

    def __init__(
        self,
        *,
        class_embeddings: npt.ArrayLike,
        image_projection: npt.ArrayLike | None = None,
        temperature: float = 1.0,
    ) -> None:
        self.class_embeddings = class_embeddings
        self.image_projection = image_projection
        self.temperature = temperature

    def fit(self, features: Features, labels: Labels | None = None) -> MCMDetector:
        """Validate shapes of (n, D) features against the text arrays; labels are ignored."""
        self._validate_params()
        embeddings, _, n_dims = self._text_arrays()
        check_features(features, n_dims=n_dims)
        self.n_dims_, self.n_classes_ = n_dims, int(embeddings.shape[0])
        return self

    def predict(self, features: Features) -> Labels:
        """(n,) zero-shot class of each row (for ID accuracy; not an OOD decision)."""
        check_is_fitted(self)
        return self.zero_shot_predict(features)

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 MCM scores of (n, D) features, higher = more in-distribution."""
        check_is_fitted(self)
        embeddings, projection, n_dims = self._text_arrays()
        features = check_features(features, n_dims=n_dims)
        return mcm_scores(features, embeddings, projection, float(self.temperature))

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) MCM scores of an (n, D) tensor; matches ``score_samples``."""
        import torch

        cosines = self._joint_torch(features)
        return torch.softmax(cosines / self.temperature, dim=1).amax(dim=1)


@register_detector
class PLPDetector(_TextMixin, LinearHead):
    """Pseudo-label probing: a linear probe trained on zero-shot pseudo-labels, label-free.

    Adaloglou, Michels, Kaiser, Kollmann, "Adapting Contrastive Language-Image Pretrained (CLIP)
    Models for Out-of-Distribution Detection", TMLR 2024. Score: ``max softmax(z/T)`` of the
    probe logits ``z = W·(f(x)−μ)/σ + b``, trained with cross-entropy on the pseudo-labels
    ``ŷ = argmax_c cos(u(x), t_c)`` of the training features (hard, unfiltered). The probe and
    its recipe are ``linear-probe``'s (Adam, lr 1e-3, weight decay 1e-3, warm-up + cosine, seed
    42). Differences: ``epochs`` 100 and ``batch_size`` 256 are the paper's CIFAR setting (8192
    on ImageNet); the probe always has C outputs, also for classes no sample was assigned to
    (their counts are in ``pseudo_label_counts_``); ``batch_size="full"`` and ``precision``
    are ``linear-probe``'s options (the trainer is shared).
    """

    name: ClassVar[str] = "plp"
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **_TEXT_CONSTRAINTS,
        **PROBE_CONSTRAINTS,
    }

    def __init__(
        self,
        *,
        class_embeddings: npt.ArrayLike,
        image_projection: npt.ArrayLike | None = None,
        epochs: int = 100,
        batch_size: int | Literal["full"] = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        warmup_fraction: float = 0.1,
        seed: int = 42,
        device: str = "auto",
        precision: ProbePrecision = "fp32",
        score: LogitScore = "msp",
        temperature: float = 1.0,
    ) -> None:
        self.class_embeddings = class_embeddings
        self.image_projection = image_projection
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_fraction = warmup_fraction
        self.seed = seed
        self.device = device
        self.precision = precision
        self.score = score
        self.temperature = temperature

    def fit(self, features: Features, labels: Labels | None = None) -> PLPDetector:
        """Pseudo-label (n, D) training features zero-shot, then train the probe; labels ignored."""
        self._validate_params()
        embeddings, _, n_dims = self._text_arrays()
        features = check_features(features, n_dims=n_dims)
        n_classes = int(embeddings.shape[0])
        pseudo_labels = self.zero_shot_predict(features)
        counts = np.bincount(pseudo_labels, minlength=n_classes)
        if np.count_nonzero(counts) < 2:
            raise InvalidParameterError(
                f"zero-shot pseudo-labelling put all {len(features)} training samples in class "
                f"{int(counts.argmax())}; a probe cannot learn from one class. Check that the "
                "class embeddings and image_projection come from the encoder of the features"
            )
        self.pseudo_label_counts_ = counts.astype(np.int64)
        self.classes_ = np.arange(n_classes, dtype=np.int64)
        self._fit_probe(features, pseudo_labels, n_classes)
        return self
