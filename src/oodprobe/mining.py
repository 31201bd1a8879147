"""Label mining from a text corpus in a vision-language joint space: negatives and positives.

Arrays in, indices and names out; no model is held. The runner embeds the corpus once with the
encoder's text tower (unit rows, N × E) and passes it here with the ID class embeddings or the
ID training images' joint-space embeddings.

* :func:`mine_negative_labels`: NegMining of NegLabel (Jiang et al., ICLR 2024): the corpus
  labels farthest from the ID labels, used as negatives by the ``neglabel`` detector.
* :func:`mine_positive_labels`: ClusterMine-style label-free positives (Adaloglou et al.,
  WACV 2026): cluster the ID images, keep for each cluster the corpus concepts that the
  images of that cluster pick zero-shot; the names then serve as ID class names for MCM, PLP
  or NegLabel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
import numpy.typing as npt

from oodprobe.arrays import check_features, l2_normalize, row_blocks, rows_per_block
from oodprobe.errors import InvalidParameterError

__all__ = [
    "MinedLabels",
    "mine_negative_labels",
    "mine_positive_labels",
    "negative_label_similarity",
]

# elements of one float64 temporary (rows × columns) per block: 32 MB
_BLOCK_ELEMENTS = 1 << 22


def _unit_rows(array: npt.ArrayLike, name: str, *, min_samples: int = 1) -> npt.NDArray[Any]:
    """A checked (n, E) float64 array scaled to unit rows; an all-zero row is refused."""
    checked = check_features(array, name=name, min_samples=min_samples, dtype=np.float64)
    if np.any(np.linalg.norm(checked, axis=1) == 0):
        bad = int(np.flatnonzero(np.linalg.norm(checked, axis=1) == 0)[0])
        raise InvalidParameterError(f"{name} has an all-zero row ({bad}); recompute it")
    return np.asarray(l2_normalize(checked), dtype=np.float64)


def _check_same_width(left: np.ndarray, left_name: str, right: np.ndarray, right_name: str) -> None:
    if left.shape[1] != right.shape[1]:
        raise InvalidParameterError(
            f"{right_name} has {right.shape[1]} columns but {left_name} has {left.shape[1]}; "
            f"both must be embeddings of the same joint space (the same encoder)"
        )


def _check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral):
        raise InvalidParameterError(f"{name} must be an integer, got {value!r}")
    number = int(value)
    if number < low or (high is not None and number > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidParameterError(f"{name} must be an integer {bound}, got {number}")
    return number


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise InvalidParameterError(f"{name} must be a number in [0, 1], got {value!r}")
    number = float(value)
    if not 0 <= number <= 1:  # NaN fails too
        raise InvalidParameterError(f"{name} must be a number in [0, 1], got {value}")
    return number


# -- NegMining (NegLabel) ---------------------------------------------------------------------


def negative_label_similarity(
    class_embeddings: npt.ArrayLike,
    corpus_embeddings: npt.ArrayLike,
    percentile: float = 0.05,
) -> npt.NDArray[np.float64]:
    """(N,) NegMining's closeness of each corpus label to the ID labels; lower = farther.

    For candidate ``ñ_i`` it is the ``(1 − η)``-quantile over the C ID labels of
    ``cos(ñ_i, t_c)``, which is the η-percentile of the distance ``1 − cos`` ranked the other
    way: NegLabel's paper states the η-percentile of distances (η = 0.05), its code
    (``multi_modal.py``, ``pencentile = 0.95``) takes ``torch.quantile(sim, 0.95)`` of the
    similarities; both give this. Quantiles interpolate linearly, as ``torch.quantile`` does.
    Rows of either array are normalised here; float64 throughout.
    """
    labels = _unit_rows(class_embeddings, "class_embeddings")
    corpus = _unit_rows(corpus_embeddings, "corpus_embeddings")
    _check_same_width(labels, "class_embeddings", corpus, "corpus_embeddings")
    quantile = 1.0 - _check_fraction(percentile, "percentile")
    closeness = np.empty(len(corpus), dtype=np.float64)
    for rows in row_blocks(len(corpus), rows_per_block(len(labels), _BLOCK_ELEMENTS)):
        closeness[rows] = np.quantile(corpus[rows] @ labels.T, quantile, axis=1)
    return closeness


def mine_negative_labels(
    class_embeddings: npt.ArrayLike,
    corpus_embeddings: npt.ArrayLike,
    n_negatives: int = 10_000,
    percentile: float = 0.05,
    *,
    exclude: npt.ArrayLike | None = None,
) -> npt.NDArray[np.int64]:
    """NegMining: (M,) corpus indices of the M labels farthest from the ID labels, farthest first.

    Jiang et al., "Negative Label Guided OOD Detection with Pretrained Vision-Language Models",
    ICLR 2024, Sec. 3.2. ``class_embeddings`` (C × E) are the ID label embeddings,
    ``corpus_embeddings`` (N × E) the candidate labels' (both from the same text tower and
    prompt; rows are normalised here). Each candidate is ranked by
    :func:`negative_label_similarity` (``percentile`` η = 0.05), and the ``n_negatives``
    (M = 10,000) with the lowest values are kept, in ascending order; ties keep corpus order.
    ``exclude``: corpus indices (or an (N,) boolean mask) never to mine, e.g. the ID names
    themselves when the corpus holds them. The authors exclude nothing by default (their
    ID-name filter belongs to an optional mode), and mine 15 % of the nouns and 15 % of the
    adjectives separately; here one M is taken over the whole corpus (pass each part's rows
    separately to mine per part). Uses no image data.
    """
    closeness = negative_label_similarity(class_embeddings, corpus_embeddings, percentile)
    n_corpus = len(closeness)
    excluded = _excluded_mask(exclude, n_corpus)
    available = n_corpus - int(excluded.sum())
    if available < 1:
        raise InvalidParameterError(
            f"exclude removes all {n_corpus} corpus labels; nothing is left to mine negatives from"
        )
    n_negatives = _check_int(n_negatives, "n_negatives", 1)
    if n_negatives > available:
        raise InvalidParameterError(
            f"n_negatives must be <= the {available} corpus labels available to mine"
            f"{' (after exclude)' if excluded.any() else ''}, got {n_negatives}; lower "
            f"n_negatives or use a larger corpus"
        )
    candidates = np.flatnonzero(~excluded)
    order = np.argsort(closeness[candidates], kind="stable")[:n_negatives]
    return candidates[order].astype(np.int64)


def _excluded_mask(exclude: npt.ArrayLike | None, n_corpus: int) -> npt.NDArray[np.bool_]:
    """(N,) mask of corpus rows never to mine, from indices or a boolean mask."""
    mask = np.zeros(n_corpus, dtype=bool)
    if exclude is None:
        return mask
    values = np.asarray(exclude)
    if values.dtype == bool:
        if values.shape != (n_corpus,):
            raise InvalidParameterError(
                f"exclude as a mask must have shape ({n_corpus},), one entry per corpus label, "
                f"got {values.shape}"
            )
        return values.copy()
    if values.size and (
        not np.issubdtype(values.dtype, np.integer)
        or values.ndim != 1
        or values.min() < 0
        or values.max() >= n_corpus
    ):
        raise InvalidParameterError(
            f"exclude must be corpus indices in [0, {n_corpus - 1}] or an ({n_corpus},) "
            f"boolean mask, got {values.dtype} values of shape {values.shape}"
        )
    mask[values.astype(np.int64)] = True
    return mask


# -- ClusterMine-style positive mining ---------------------------------------------------------


@dataclass(frozen=True)
class MinedLabels:
    """Positive labels mined per cluster of the ID images (:func:`mine_positive_labels`).

    One entry per mined name, in cluster order, then by score within a cluster:
    ``names`` (the corpus terms, usable as ID class names), ``indices`` (their rows of the
    corpus: ``corpus_embeddings[indices]`` are class embeddings for MCM, PLP or NegLabel),
    ``clusters`` (the cluster each name was mined for), ``scores`` (the fraction of that
    cluster's images that pick the name zero-shot over the corpus) and ``agreement`` (the
    fraction of all images picking the name that lie in that cluster). Per image:
    ``assignments`` (n,) its cluster. Per cluster: ``centers`` (k × E, unit-norm k-means
    centres) and ``cluster_sizes`` (k,).
    """

    names: tuple[str, ...]
    indices: npt.NDArray[np.int64]
    clusters: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float64]
    agreement: npt.NDArray[np.float64]
    assignments: npt.NDArray[np.int64]
    centers: npt.NDArray[np.float64]
    cluster_sizes: npt.NDArray[np.int64]

    @property
    def n_clusters(self) -> int:
        return len(self.cluster_sizes)

    def cluster_names(self) -> list[list[str]]:
        """The names mined for each cluster (an empty list: no concept agreed with it)."""
        per_cluster: list[list[str]] = [[] for _ in range(self.n_clusters)]
        for name, cluster in zip(self.names, self.clusters, strict=True):
            per_cluster[int(cluster)].append(name)
        return per_cluster


def zero_shot_top_concepts(
    joint_features: npt.ArrayLike, corpus_embeddings: npt.ArrayLike
) -> npt.NDArray[np.int64]:
    """(n,) index of the corpus concept with the largest cosine to each image embedding."""
    images = _unit_rows(joint_features, "joint_features")
    corpus = _unit_rows(corpus_embeddings, "corpus_embeddings")
    _check_same_width(images, "joint_features", corpus, "corpus_embeddings")
    top = np.empty(len(images), dtype=np.int64)
    for rows in row_blocks(len(images), rows_per_block(len(corpus), _BLOCK_ELEMENTS)):
        top[rows] = np.argmax(images[rows] @ corpus.T, axis=1)
    return top


def mine_positive_labels(
    joint_features: npt.ArrayLike,
    corpus_embeddings: npt.ArrayLike,
    corpus_terms: Sequence[str],
    n_clusters: int,
    *,
    names_per_cluster: int = 1,
    min_agreement: float = 0.5,
    seed: int = 0,
    n_init: int = 3,
) -> MinedLabels:
    """ClusterMine-style label-free positives: per k-means cluster of the ID images, the corpus
    concepts their zero-shot assignment agrees on.

    After Adaloglou et al., "ClusterMine: Robust Label-Free Visual Out-Of-Distribution
    Detection via Concept Mining from Text Corpora", WACV 2026, which combines visual-only
    sample consistency (clustering) with zero-shot image-text consistency. Their code was not
    available offline; this is our reading of that description, not their algorithm:

    1. k-means (scikit-learn, ``seed``, ``n_init``) on the unit-norm ``joint_features``
       (n × E: the ID *training* images' embeddings in the joint space; never test or OOD
       data) gives each image a cluster.
    2. Each image is assigned zero-shot its nearest corpus concept (largest cosine over
       ``corpus_embeddings``, N × E, the text embeddings of ``corpus_terms``).
    3. A concept is mined for the cluster holding most of the images assigned to it (ties:
       the lower cluster), if that cluster holds at least ``min_agreement`` of them
       (clustering and zero-shot agree). Within a cluster, concepts are ranked by how many of
       its images pick them; the top ``names_per_cluster`` are kept.

    A concept thus belongs to at most one cluster, so the names are distinct; a cluster whose
    images agree on no concept gets none. Returns :class:`MinedLabels`.
    """
    from sklearn.cluster import KMeans

    images = _unit_rows(joint_features, "joint_features")
    corpus = _unit_rows(corpus_embeddings, "corpus_embeddings")
    _check_same_width(images, "joint_features", corpus, "corpus_embeddings")
    terms = tuple(corpus_terms)
    if len(terms) != len(corpus) or not all(isinstance(term, str) for term in terms):
        raise InvalidParameterError(
            f"corpus_terms must be {len(corpus)} strings, one per row of corpus_embeddings, got "
            f"{len(terms)} items"
        )
    n_clusters = _check_int(n_clusters, "n_clusters", 1, len(images))
    names_per_cluster = _check_int(names_per_cluster, "names_per_cluster", 1)
    min_agreement = _check_fraction(min_agreement, "min_agreement")
    seed = _check_int(seed, "seed", 0, 2**32 - 1)
    n_init = _check_int(n_init, "n_init", 1)

    kmeans = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit(images)
    assignments = np.asarray(kmeans.labels_, dtype=np.int64)
    centers = np.asarray(l2_normalize(kmeans.cluster_centers_), dtype=np.float64)
    cluster_sizes = np.bincount(assignments, minlength=n_clusters).astype(np.int64)
    concepts = zero_shot_top_concepts(images, corpus)

    # sparse (cluster, concept) vote counts: a dense k × N table is 640 MB at k=1000, N=80k
    pairs, votes = np.unique(assignments * len(corpus) + concepts, return_counts=True)
    pair_cluster, pair_concept = np.divmod(pairs, len(corpus))
    totals = np.bincount(pair_concept, weights=votes, minlength=len(corpus))
    # per concept, its best cluster: most votes, then the lower cluster (pairs sort by cluster)
    order = np.lexsort((pair_cluster, -votes, pair_concept))
    first = order[np.r_[True, np.diff(pair_concept[order]) != 0]]
    agreement = votes[first] / totals[pair_concept[first]]
    kept = first[agreement >= min_agreement]
    kept_agreement = agreement[agreement >= min_agreement]
    # within each cluster: most votes first, then corpus order
    rank = np.lexsort((pair_concept[kept], -votes[kept], pair_cluster[kept]))
    kept, kept_agreement = kept[rank], kept_agreement[rank]
    clusters = pair_cluster[kept]
    position = np.arange(len(kept)) - np.searchsorted(clusters, clusters)
    within = position < names_per_cluster
    kept, kept_agreement, clusters = kept[within], kept_agreement[within], clusters[within]
    indices = pair_concept[kept].astype(np.int64)
    return MinedLabels(
        names=tuple(terms[index] for index in indices),
        indices=indices,
        clusters=clusters.astype(np.int64),
        scores=(votes[kept] / cluster_sizes[clusters]).astype(np.float64),
        agreement=kept_agreement.astype(np.float64),
        assignments=assignments,
        centers=centers,
        cluster_sizes=cluster_sizes,
    )
