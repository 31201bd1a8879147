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

The methods see ``h`` (the features the head is applied to: ``f`` itself for the first two)
and the head; :meth:`HeadDetector.head_features` and :meth:`HeadDetector.head_logits` are the one
home of that mapping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from oodprobe.arrays import Features, Labels, check_features, l2_normalize
from oodprobe.detectors.base import Choices, Detector
from oodprobe.errors import InvalidParameterError

if TYPE_CHECKING:
    import torch

HEAD_SOURCES = ("encoder", "probe", "zero-shot")
"""Where a post-hoc detector's head comes from (see the module docstring)."""

# the runner's arrays: never set by a user (``head`` is theirs)
HEAD_CONSTRAINTS: dict[str, list[Any]] = {
    "head": [Choices(*HEAD_SOURCES)],
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
        features = check_features(features)
        weight, bias, projection = self._checked_head(int(features.shape[1]))
        self.n_dims_ = int(features.shape[1])
        self.weight_, self.bias_ = weight, bias
        self.projection_ = projection
        self._fit_head(self.head_features(features), labels)
        return self

    def _fit_head(self, features: npt.NDArray[np.float64], labels: Labels | None) -> None:
        """What the method learns from the mapped ID training features (default: nothing)."""

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
        weight = check_features(self.head_weight, name="head_weight", dtype=np.float64)
        weight = np.asarray(weight, dtype=np.float64)
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
        projection = np.zeros((0, 0))
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
        features = check_features(features, n_dims=self.n_dims_, dtype=np.float64)
        features = np.asarray(features, dtype=np.float64)
        if self.projection_.size == 0:
            return features
        return np.asarray(l2_normalize(l2_normalize(features) @ self.projection_), np.float64)

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
