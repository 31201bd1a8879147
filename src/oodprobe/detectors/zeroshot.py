"""Zero-shot detectors beyond MCM: NegLabel (negative labels) and GL-MCM (local features).

Both follow ``text.py``: the ID class embeddings ``t_c`` (C × E) and, for pre-projection
inputs, the image projection ``W_proj`` (D × E) are runner arrays in the constructor; no
detector holds a model.

* ``neglabel`` also takes the corpus of candidate labels (``corpus_embeddings``, N × E, from the
  same text tower), mines its negatives from it in ``fit`` (no image data is used) and keeps
  only those (M × E) and their corpus rows as fitted state: a saved detector does not carry
  the corpus.
* ``gl-mcm`` scores the encoder output ``"local"``: per image, the global embedding as token
  0 followed by the P patch embeddings, all in the joint space (see :class:`GLMCMDetector`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt
from scipy.special import logsumexp
from sklearn.utils.validation import check_is_fitted

from oodprobe.arrays import (
    Features,
    Labels,
    Scores,
    check_features,
    l2_normalize,
    row_blocks,
    rows_per_block,
)
from oodprobe.detectors.base import Number, integer, register_detector
from oodprobe.detectors.probe import TEMPERATURE, msp
from oodprobe.detectors.text import _TEXT_CONSTRAINTS, _TextMixin, joint_space
from oodprobe.errors import InvalidParameterError
from oodprobe.mining import mine_negative_labels

if TYPE_CHECKING:
    import torch

# elements of one float64 temporary per row block (rows × (C + M), rows × tokens × C): 32 MB
_BLOCK_ELEMENTS = 1 << 22


def _block_rows(width: int) -> int:
    """Rows per block whose float64 temporaries of ``width`` columns stay bounded."""
    return rows_per_block(width, _BLOCK_ELEMENTS)


_LOG_HALF = math.log(0.5)


def _log_mean_share(
    positive: npt.NDArray[np.float64], negative: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """``log mean_g S_g`` with ``S_g = e^p / (e^p + e^{n_g})``, accurate for S near 0 and 1.

    ``positive`` (b,) is ``lse_ID``, ``negative`` (b, G) each group's ``lse``. Where the mean
    is below 1/2 it is ``logsumexp_g(log S_g) − log G``; above, ``log1p(−(1 − S̄))`` from
    ``log(1 − S̄) = logsumexp_g(log(1 − S_g)) − log G``, since ``log S_g`` rounds to 0 there.
    """
    margin = negative - positive[:, None]
    log_groups = np.log(margin.shape[1])
    log_mean = logsumexp(-np.logaddexp(0.0, margin), axis=1) - log_groups
    log_rest = logsumexp(-np.logaddexp(0.0, -margin), axis=1) - log_groups
    near_one = log_mean >= _LOG_HALF
    with np.errstate(divide="ignore"):  # log1p(−1) in the branch not taken
        return np.where(near_one, np.log1p(-np.exp(log_rest)), log_mean)


def _log_mean_share_torch(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """:func:`_log_mean_share` in torch, with finite gradients through the branch not taken."""
    import torch

    margin = negative - positive[:, None]
    log_groups = math.log(margin.shape[1])
    log_mean = torch.logsumexp(-torch.nn.functional.softplus(margin), dim=1) - log_groups
    log_rest = torch.logsumexp(-torch.nn.functional.softplus(-margin), dim=1) - log_groups
    near_one = log_mean >= _LOG_HALF
    safe_rest = torch.where(near_one, log_rest, torch.full_like(log_rest, _LOG_HALF))
    return torch.where(near_one, torch.log1p(-torch.exp(safe_rest)), log_mean)


# -- NegLabel -----------------------------------------------------------------------------------


@register_detector
class NegLabelDetector(_TextMixin):
    """NegLabel: the ID labels' share of the softmax over ID *and* mined negative labels.

    Jiang et al., "Negative Label Guided OOD Detection with Pretrained Vision-Language
    Models", ICLR 2024 (code: github.com/XueJiang16/NegLabel). Score:
    ``S(x) = Σ_c exp(cos(u, t_c)/τ) / (Σ_c exp(cos(u, t_c)/τ) + Σ_j exp(cos(u, ñ_j)/τ))``,
    averaged over ``n_groups`` groups of negatives (the grouping strategy); higher = ID.
    ``fit`` mines the M = ``n_negatives`` corpus labels farthest from the ID labels
    (:func:`oodprobe.mining.mine_negative_labels`, η = ``percentile``) from
    ``corpus_embeddings``; it uses no image data. Defaults are the paper's and its ImageNet
    config: M = 10,000, η = 0.05, τ = 0.01 (their logits are 100·cos, t = 1), 100 groups.
    Grouping as their ``ScalableClassifier.grouping``: the M mod G least-distant negatives are
    dropped, the rest shuffled (seeded) and split into G equal groups; each group's score is
    the formula over the ID labels and that group, and the groups' scores are averaged.
    Differences: the shuffle is numpy's (``seed``), not torch's CUDA ``randperm(seed 0)``, so
    the groups differ (the expected score does not); with ``n_groups = 1`` their released
    code sums raw logits without the softmax (a bug fixed in CSP's copy of it), here it is the
    formula; M is one count over the whole corpus (they take 15 % of nouns and of adjectives).
    The detector returns ``log S(x)`` (log of the mean over groups), computed in float64 with
    stable log-sum-exps (``log S_g = −softplus(lse_neg_g − lse_ID)``, and from ``log(1 − S)``
    where S is near 1): a monotone transform, so AUROC and FPR are those of ``S``, but ``S``
    itself rounds to 1.0 in float64 once the ID log-sum-exp leads a group's by ~37 (a cosine
    margin of 0.37 at τ = 0.01), tying the most ID-like images; its log keeps them ranked.
    ``exp(score)`` is the paper's ``S``.
    ``corpus`` names the candidate labels the runner embeds (:mod:`oodprobe.corpus`: default
    ``wordnet``, WordNet's nouns and adjectives as in the paper, or a file of terms), with the
    prompts of the ID class embeddings, leaving out the ID class names themselves.
    A loaded detector holds its mined negatives, not the corpus (``corpus_embeddings`` loads
    as None: it scores, and refitting needs the corpus again).
    """

    name: ClassVar[str] = "neglabel"
    runner_params: ClassVar[frozenset[str]] = frozenset({*_TEXT_CONSTRAINTS, "corpus_embeddings"})
    # the corpus (10^5 × E) is not written to a detector file: the fitted negatives are what
    # scoring needs (Detector.unsaved_params)
    unsaved_params: ClassVar[frozenset[str]] = frozenset({"corpus_embeddings"})
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **_TEXT_CONSTRAINTS,
        "corpus_embeddings": ["array-like", None],
        "n_negatives": [integer(1)],
        "percentile": [Number(0, 1, closed="both")],
        "temperature": TEMPERATURE,
        "n_groups": [integer(1)],
        "seed": [integer(0, 2**32 - 1)],
        "corpus": [str],
    }

    negative_embeddings_: npt.NDArray[Any]
    negative_indices_: npt.NDArray[np.int64]

    def __init__(
        self,
        *,
        class_embeddings: npt.ArrayLike,
        corpus_embeddings: npt.ArrayLike | None,
        image_projection: npt.ArrayLike | None = None,
        n_negatives: int = 10_000,
        percentile: float = 0.05,
        temperature: float = 0.01,
        n_groups: int = 100,
        seed: int = 0,
        corpus: str = "wordnet",
    ) -> None:
        self.class_embeddings = class_embeddings
        self.corpus = corpus
        self.corpus_embeddings = corpus_embeddings
        self.image_projection = image_projection
        self.n_negatives = n_negatives
        self.percentile = percentile
        self.temperature = temperature
        self.n_groups = n_groups
        self.seed = seed

    @classmethod
    def check_params(cls, params: Mapping[str, Any], *, runner: bool = False) -> None:
        """The base checks, and ``n_groups <= n_negatives`` (defaults filled in): each group
        needs a negative. Checked with the spec, before the runner embeds the corpus."""
        super().check_params(params, runner=runner)
        defaults = {info.name: info.default for info in cls.param_info()}
        n_negatives = params.get("n_negatives", defaults["n_negatives"])
        n_groups = params.get("n_groups", defaults["n_groups"])
        if n_groups > n_negatives:
            raise InvalidParameterError(
                f"detector {cls.name!r}: n_groups must be <= n_negatives ({n_negatives}), "
                f"got {n_groups}; each group needs at least one negative"
            )

    def fit(self, features: Features, labels: Labels | None = None) -> NegLabelDetector:
        """Mine the negatives from the corpus; (n, D) features only fix the shape; no labels."""
        self._validate_params()
        embeddings, _, n_dims = self._text_arrays()
        check_features(features, n_dims=n_dims)
        if self.corpus_embeddings is None:
            raise InvalidParameterError(
                f"detector {self.name!r} needs corpus_embeddings (text embeddings of the "
                f"candidate labels, computed by the runner) to mine its negatives; a loaded "
                f"detector keeps only the mined negatives: score with it, or refit it with "
                f"corpus_embeddings"
            )
        corpus = np.asarray(self.corpus_embeddings)
        indices = mine_negative_labels(
            embeddings, corpus, self.n_negatives, self.percentile
        )  # checks the corpus (finite, 2-D, same width, no zero rows)
        dtype = corpus.dtype if np.issubdtype(corpus.dtype, np.floating) else np.float64
        self.negative_embeddings_ = np.array(corpus[indices], dtype=dtype)
        self.negative_indices_ = indices
        self.n_dims_, self.n_classes_ = n_dims, int(embeddings.shape[0])
        return self

    # -- scoring ----------------------------------------------------------------------------
    def group_indices(self) -> npt.NDArray[np.int64]:
        """(G, M // G) rows of ``negative_embeddings_`` in each group (the grouping strategy).

        One group of all M negatives for ``n_groups = 1``; else the last M mod G (the least
        distant: they are stored farthest first) are dropped, the rest permuted with ``seed``.
        """
        check_is_fitted(self)
        n_negatives, n_groups = len(self.negative_embeddings_), int(self.n_groups)
        if n_groups > n_negatives:
            raise InvalidParameterError(
                f"detector {self.name!r}: n_groups ({n_groups}) exceeds its {n_negatives} "
                f"negatives; refit it"
            )
        if n_groups == 1:
            return np.arange(n_negatives, dtype=np.int64)[None, :]
        kept = n_negatives - n_negatives % n_groups
        order = np.random.default_rng(int(self.seed)).permutation(kept)
        return order.reshape(n_groups, -1).astype(np.int64)

    def _score_arrays(
        self,
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64] | None, int, int]:
        """(unit ID labels then grouped unit negatives: (C + G·s) × E, projection, n_dims,
        C), computed once per fitted state and parameters (kept as one object, so device
        copies are cached)."""
        check_is_fitted(self)
        embeddings, projection, n_dims = self._text_arrays()
        key = (embeddings, self.negative_embeddings_, int(self.n_groups), int(self.seed))
        cached = self.__dict__.get("_score_cache")
        if cached is None or any(a is not b for a, b in zip(cached[0], key, strict=True)):
            negatives = check_features(
                self.negative_embeddings_, name="negative_embeddings_", dtype=np.float64
            )
            if negatives.shape[1] != embeddings.shape[1]:
                raise InvalidParameterError(
                    f"negative_embeddings_ has {negatives.shape[1]} columns but "
                    f"class_embeddings has {embeddings.shape[1]}; refit the detector"
                )
            if np.any(np.linalg.norm(negatives, axis=1) == 0):
                raise InvalidParameterError("negative_embeddings_ has an all-zero row; refit it")
            grouped = l2_normalize(negatives)[self.group_indices().ravel()]
            cached = (key, np.vstack([embeddings, grouped]).astype(np.float64))
            self.__dict__["_score_cache"] = cached
        return cached[1], projection, n_dims, int(embeddings.shape[0])

    def negative_similarities(self, features: Features) -> npt.NDArray[np.float64]:
        """(n, M) cosines of (n, D) features to the mined negatives (in their stored order)."""
        check_is_fitted(self)
        _, projection, n_dims = self._text_arrays()
        features = check_features(features, n_dims=n_dims)
        negatives = np.asarray(l2_normalize(self.negative_embeddings_, dtype=np.float64))
        blocks = row_blocks(len(features), _block_rows(len(negatives)))
        return np.concatenate(
            [joint_space(features[rows], projection) @ negatives.T for rows in blocks]
        )

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 ``log S(x)`` of (n, D) features, in (−inf, 0]; higher = more ID."""
        check_is_fitted(self)
        stacked, projection, n_dims, n_classes = self._score_arrays()
        features = check_features(features, n_dims=n_dims)
        n_groups = int(self.n_groups)
        scores = np.empty(len(features), dtype=np.float64)
        for rows in row_blocks(len(features), _block_rows(len(stacked))):
            logits = (joint_space(features[rows], projection) @ stacked.T) / self.temperature
            positive = logsumexp(logits[:, :n_classes], axis=1)
            negative = logsumexp(logits[:, n_classes:].reshape(len(logits), n_groups, -1), axis=2)
            scores[rows] = _log_mean_share(positive, negative)
        return scores

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) ``log S(x)`` of an (n, D) tensor (float64; float32 on MPS)."""
        import torch

        stacked, projection, _, n_classes = self._score_arrays()
        features = self._torch_features(features, float64=True)
        joint = torch.nn.functional.normalize(features, dim=1)
        if projection is not None:
            joint = torch.nn.functional.normalize(joint @ self._torch_constant(projection, joint))
        logits = joint @ self._torch_constant(stacked, joint).T / self.temperature
        positive = torch.logsumexp(logits[:, :n_classes], dim=1)
        negative = torch.logsumexp(
            logits[:, n_classes:].reshape(len(logits), int(self.n_groups), -1), dim=2
        )
        return _log_mean_share_torch(positive, negative)


# -- GL-MCM -------------------------------------------------------------------------------------


@register_detector
class GLMCMDetector(_TextMixin):
    """GL-MCM: MCM of the global image embedding plus λ × the best MCM over patch embeddings.

    Miyai et al., "GL-MCM: Global and Local Maximum Concept Matching for Zero-Shot
    Out-of-Distribution Detection", IJCV 2025 (first as "Zero-Shot In-Distribution Detection
    in Multi-Object Settings Using Vision-Language Foundation Models", 2023; code:
    github.com/AtsuMiyai/GL-MCM). Score:
    ``max_c softmax_c(cos(g, t_c)/T) + λ · max_p max_c softmax_c(cos(l_p, t_c)/T)``; higher
    = ID. Defaults are the code's: T = 1 on raw cosines (``--T 1``), λ = 1
    (``--lambda_local``); ``lambda_local = 0`` is MCM.

    Input (the encoder output ``"local"``): per image the tokens ``[g, l_1, …, l_P]``, an
    (n, 1 + P, D) array or its row-major flattening (n, (1 + P)·D); token 0 is the global
    image embedding, tokens 1..P the patch embeddings. With ``image_projection`` None (the
    recommended output) they are already in the joint space (D = E): GL-MCM's patch
    embeddings are the last block's value path through ``ln_post`` and the projection
    (``clip/model.py``, MaskCLIP-style), not the raw patch tokens. With ``image_projection``
    (D × E) it is applied to every token, as MCM's is. Every token is normalised here.
    ``fit`` learns nothing; it records the token count (1 + P, at least 2).
    """

    name: ClassVar[str] = "gl-mcm"
    input_array: ClassVar[str] = "local"
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **_TEXT_CONSTRAINTS,
        "temperature": TEMPERATURE,
        "lambda_local": [Number(0)],
    }

    n_tokens_: int

    def __init__(
        self,
        *,
        class_embeddings: npt.ArrayLike,
        image_projection: npt.ArrayLike | None = None,
        temperature: float = 1.0,
        lambda_local: float = 1.0,
    ) -> None:
        self.class_embeddings = class_embeddings
        self.image_projection = image_projection
        self.temperature = temperature
        self.lambda_local = lambda_local

    def fit(self, features: Features, labels: Labels | None = None) -> GLMCMDetector:
        """Check (n, 1 + P, D) tokens (or their (n, (1 + P)·D) flattening); labels ignored."""
        self._validate_params()
        embeddings, _, token_dims = self._text_arrays()
        array = np.asarray(features)
        if array.ndim == 3:
            if array.shape[2] != token_dims:
                raise InvalidParameterError(
                    f"local features have tokens of {array.shape[2]} dimensions but the class "
                    f"embeddings (and image_projection) need {token_dims}; the array must be "
                    f"(n, 1 + P, {token_dims})"
                )
            n_tokens = int(array.shape[1])
        else:
            width = check_features(array).shape[1]
            if width % token_dims:
                raise InvalidParameterError(
                    f"local features have {width} columns, not a multiple of the "
                    f"{token_dims}-dimensional tokens; pass (n, 1 + P, {token_dims}) or its "
                    f"flattening (n, (1 + P)·{token_dims})"
                )
            n_tokens = width // token_dims
        if n_tokens < 2:
            raise InvalidParameterError(
                f"gl-mcm needs the global token and at least one patch token per image, got "
                f"{n_tokens} token(s) of {token_dims} dimensions; pass the encoder's 'local' "
                f"output (n, 1 + P, {token_dims})"
            )
        self.n_tokens_ = n_tokens
        self.n_dims_ = n_tokens * token_dims
        self._tokens(array)  # finite, n >= 1
        self.n_classes_ = int(embeddings.shape[0])
        return self

    def _tokens(self, features: Features) -> npt.NDArray[Any]:
        """Checked (n, 1 + P, D) tokens of 3-D input or its 2-D flattening."""
        array = np.asarray(features)
        if array.ndim == 3:
            if array.shape[1:] != (self.n_tokens_, self.n_dims_ // self.n_tokens_):
                raise InvalidParameterError(
                    f"local features must have shape (n, {self.n_tokens_}, "
                    f"{self.n_dims_ // self.n_tokens_}) as at fit, got shape {array.shape}"
                )
            array = array.reshape(len(array), -1)
        flat = check_features(array, n_dims=self.n_dims_)
        return flat.reshape(len(flat), self.n_tokens_, -1)

    def _token_cosines(self, tokens: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        """(b, 1 + P, C) cosines of checked (b, 1 + P, D) tokens to the class embeddings."""
        embeddings, projection, _ = self._text_arrays()
        n, n_tokens, token_dims = tokens.shape
        joint = joint_space(tokens.reshape(-1, token_dims), projection)
        return (joint @ embeddings.T).reshape(n, n_tokens, len(embeddings))

    def similarities(self, features: Features) -> npt.NDArray[np.float64]:
        """(n, 1 + P, C) cosines of every token to the class embeddings (token 0: global)."""
        check_is_fitted(self)
        tokens = self._tokens(features)
        width = self.n_tokens_ * max(self.n_classes_, self.n_dims_ // self.n_tokens_)
        blocks = row_blocks(len(tokens), _block_rows(width))
        return np.concatenate([self._token_cosines(tokens[rows]) for rows in blocks])

    def zero_shot_predict(self, features: Features) -> Labels:
        """(n,) zero-shot class of the global token, ``argmax_c cos(g, t_c)``."""
        return self.similarities(features)[:, 0].argmax(axis=1).astype(np.int64)

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 GL-MCM scores of (n, 1 + P, D) tokens; higher = more in-distribution."""
        check_is_fitted(self)
        tokens = self._tokens(features)
        n, n_tokens, _ = tokens.shape
        n_classes = self.n_classes_
        scores = np.empty(n, dtype=np.float64)
        width = n_tokens * max(n_classes, self.n_dims_ // n_tokens)
        for rows in row_blocks(n, _block_rows(width)):
            cosines = self._token_cosines(tokens[rows])
            global_score = msp(cosines[:, 0], self.temperature)
            local = msp(cosines[:, 1:].reshape(-1, n_classes), self.temperature)
            best_local = local.reshape(len(cosines), -1).max(axis=1)
            scores[rows] = global_score + self.lambda_local * best_local
        return scores

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) GL-MCM scores of an (n, 1 + P, D) or (n, (1 + P)·D) tensor."""
        import torch

        embeddings, projection, _ = self._text_arrays()
        if isinstance(features, torch.Tensor) and features.ndim == 3:
            features = features.reshape(len(features), -1)
        flat = self._torch_features(features)
        tokens = torch.nn.functional.normalize(flat.reshape(len(flat), self.n_tokens_, -1), dim=2)
        if projection is not None:
            tokens = torch.nn.functional.normalize(
                tokens @ self._torch_constant(projection, tokens), dim=2
            )
        probabilities = torch.softmax(
            tokens @ self._torch_constant(embeddings, tokens).T / self.temperature, dim=2
        )
        global_score = probabilities[:, 0].amax(dim=1)
        local_score = probabilities[:, 1:].amax(dim=(1, 2))
        return global_score + self.lambda_local * local_score
