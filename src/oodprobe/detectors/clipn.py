"""CLIPN's two zero-shot scores, ATD and CTW, from yes and no class embeddings.

Wang, Li, Yao, Li, "CLIPN for Zero-Shot OOD Detection: Teaching CLIP to Say No", ICCV 2023.
CLIPN's image embedding ``u(x)`` is compared with each ID class twice: with the yes text
embedding ``t_c`` (CLIP's text tower) and with the no text embedding ``n_c`` (CLIPN's no tower,
the same prompts). With CLIPN's fixed logit scale ``s = 100`` (their ``ViT_Classifier.scale``):

* ``p_c = softmax_c(s·cos(u, t_c))``: the zero-shot class probabilities;
* ``p_yes_c = exp(s·cos(u, t_c)) / (exp(s·cos(u, t_c)) + exp(s·cos(u, n_c)))
  = sigmoid(s·(cos(u, t_c) − cos(u, n_c)))``: "it is class c" against "it is not c".

Both scores are CLIPN's evaluation code (``src/zero_shot_infer.py``) exactly, already with
higher = more in-distribution (their AUROC takes ID as positive): ATD ``Σ_c p_yes_c · p_c``,
CTW ``p_yes_ŷ`` with ``ŷ = argmax_c cos(u, t_c)``. The arrays come from the runner
(``oodprobe.encoders.clipn``: ``compute_class_embeddings`` and ``compute_no_class_embeddings``
over ``CLIPN_PROMPTS``); no detector holds a model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt
from scipy.special import expit, softmax
from sklearn.utils.validation import check_is_fitted

from oodprobe.arrays import Features, Labels, Scores, check_features, l2_normalize, row_blocks
from oodprobe.detectors.base import Number, register_detector
from oodprobe.detectors.probe import _CHUNK
from oodprobe.detectors.text import _TEXT_CONSTRAINTS, _TextMixin, joint_space
from oodprobe.errors import InvalidParameterError

if TYPE_CHECKING:
    import torch

CLIPN_LOGIT_SCALE = 100.0
"""CLIPN's evaluation scale of cosines (fixed, not the checkpoint's learned ``logit_scale``)."""

_CLIPN_CONSTRAINTS: dict[str, list[Any]] = {
    **_TEXT_CONSTRAINTS,
    "no_class_embeddings": ["array-like"],
    "logit_scale": [Number(0, None, closed="neither")],
}


class _CLIPNDetector(_TextMixin):
    """What ATD and CTW share: the checked arrays, the logits, ``fit`` and ``predict``."""

    no_class_embeddings: npt.ArrayLike
    logit_scale: float
    runner_params: ClassVar[frozenset[str]] = frozenset({*_TEXT_CONSTRAINTS, "no_class_embeddings"})
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = _CLIPN_CONSTRAINTS

    def __init__(
        self,
        *,
        class_embeddings: npt.ArrayLike,
        no_class_embeddings: npt.ArrayLike,
        image_projection: npt.ArrayLike | None = None,
        logit_scale: float = CLIPN_LOGIT_SCALE,
    ) -> None:
        self.class_embeddings = class_embeddings
        self.no_class_embeddings = no_class_embeddings
        self.image_projection = image_projection
        self.logit_scale = logit_scale

    def _no_arrays(self) -> npt.NDArray[np.float64]:
        """The unit-norm no class embeddings (C, E), checked against the yes ones, memoised."""
        yes, _, _ = self._text_arrays()
        source = self.no_class_embeddings
        cached = self.__dict__.get("_no_cache")
        if cached is not None and cached[0] is source and cached[1] is yes:
            return cached[2]
        embeddings = check_features(source, name="no_class_embeddings", dtype=np.float64)
        if embeddings.shape != yes.shape:
            raise InvalidParameterError(
                f"no_class_embeddings has shape {embeddings.shape} but class_embeddings has "
                f"{yes.shape}; compute both from the same class names (one no embedding per "
                f"class, from CLIPN's no text encoder)"
            )
        if np.any(np.linalg.norm(embeddings, axis=1) == 0):
            raise InvalidParameterError("no_class_embeddings has an all-zero row; recompute it")
        unit = np.asarray(l2_normalize(embeddings), dtype=np.float64)
        self.__dict__["_no_cache"] = (source, yes, unit)
        return unit

    def _logit_blocks(
        self, features: Features
    ) -> Iterator[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
        """Yield (yes logits, no logits), ``s·cos`` of row blocks: two (block, C) float64."""
        yes, projection, n_dims = self._text_arrays()
        no = self._no_arrays()
        features = check_features(features, n_dims=n_dims)
        for rows in row_blocks(len(features), _CHUNK):
            joint = joint_space(features[rows], projection)
            yield self.logit_scale * (joint @ yes.T), self.logit_scale * (joint @ no.T)

    def _logits_torch(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable (yes logits, no logits) of an (n, D) tensor, in float32 at least."""
        import torch

        yes, projection, _ = self._text_arrays()
        no = self._no_arrays()
        joint = torch.nn.functional.normalize(self._torch_features(features), dim=1)
        if projection is not None:
            joint = torch.nn.functional.normalize(joint @ self._torch_constant(projection, joint))
        return (
            self.logit_scale * (joint @ self._torch_constant(yes, joint).T),
            self.logit_scale * (joint @ self._torch_constant(no, joint).T),
        )

    def fit(self, features: Features, labels: Labels | None = None) -> _CLIPNDetector:
        """Validate (n, D) features against the text arrays; nothing is learned, labels ignored."""
        self._validate_params()
        yes, _, n_dims = self._text_arrays()
        self._no_arrays()
        check_features(features, n_dims=n_dims)
        self.n_dims_, self.n_classes_ = n_dims, int(yes.shape[0])
        return self

    def predict(self, features: Features) -> Labels:
        """(n,) zero-shot class ``argmax_c cos(u(x), t_c)`` (ID accuracy; not an OOD decision)."""
        check_is_fitted(self)
        return self.zero_shot_predict(features)

    def yes_probabilities(self, features: Features) -> npt.NDArray[np.float64]:
        """(n, C) ``p_yes_c``: the softmax over (yes, no) of each class, its yes entry."""
        check_is_fitted(self)
        blocks = [expit(yes - no) for yes, no in self._logit_blocks(features)]
        return np.concatenate(blocks).astype(np.float64)


@register_detector
class CLIPNATDDetector(_CLIPNDetector):
    """CLIPN-ATD ("agreeing to differ"): the yes probabilities weighted by the class softmax.

    Wang, Li, Yao, Li, "CLIPN for Zero-Shot OOD Detection: Teaching CLIP to Say No", ICCV 2023.
    Score: ``Σ_c sigmoid(s·(cos(u, t_c) − cos(u, n_c))) · softmax_c(s·cos(u, t_c))`` with
    ``s = logit_scale = 100``, their ``zero_shot_infer.py`` (``(yesno * softmax(logits)).sum``).
    Differences: features may be pre-projection (``image_projection``);
    the embeddings' prompts are the runner's (CLIPN: ``CLIPN_PROMPTS``, both towers).
    Differentiable everywhere. ``fit`` learns nothing; it checks the arrays' shapes.
    """

    name: ClassVar[str] = "clipn-atd"

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 ATD scores of (n, D) features, higher = more in-distribution."""
        check_is_fitted(self)
        scores = [
            (expit(yes - no) * softmax(yes, axis=1)).sum(axis=1)
            for yes, no in self._logit_blocks(features)
        ]
        return np.concatenate(scores).astype(np.float64)

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) ATD scores of an (n, D) tensor; matches ``score_samples``."""
        import torch

        yes, no = self._logits_torch(features)
        return (torch.sigmoid(yes - no) * torch.softmax(yes, dim=1)).sum(dim=1)


@register_detector
class CLIPNCTWDetector(_CLIPNDetector):
    """CLIPN-CTW ("competing to win"): the yes probability of the zero-shot predicted class.

    Wang, Li, Yao, Li, "CLIPN for Zero-Shot OOD Detection: Teaching CLIP to Say No", ICCV 2023.
    Score: ``sigmoid(s·(cos(u, t_ŷ) − cos(u, n_ŷ)))`` with ``ŷ = argmax_c cos(u, t_c)`` and
    ``s = logit_scale = 100`` (their ``zero_shot_infer.py``: ``gather(yesno, argmax(logits))``);
    below 0.5 the no text wins for the predicted class. Differences: as CLIPN-ATD. The torch score's
    gradient flows through ``p_yes`` of the predicted class; the choice of ``ŷ`` is piecewise
    constant (no gradient), so the score jumps where the top class changes, like MCM's max.
    """

    name: ClassVar[str] = "clipn-ctw"

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 CTW scores of (n, D) features, higher = more in-distribution."""
        check_is_fitted(self)
        scores = []
        for yes, no in self._logit_blocks(features):
            predicted = yes.argmax(axis=1)
            rows = np.arange(len(yes))
            scores.append(expit(yes[rows, predicted] - no[rows, predicted]))
        return np.concatenate(scores).astype(np.float64)

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) CTW scores of an (n, D) tensor; matches ``score_samples``."""
        import torch

        yes, no = self._logits_torch(features)
        predicted = yes.argmax(dim=1, keepdim=True)
        return torch.sigmoid(yes.gather(1, predicted) - no.gather(1, predicted)).squeeze(1)
