"""Nearest-neighbour detectors (label-free k-NN, deep k-NN) and the k-NN ID classifier.

All of them search cosine similarities of L2-normalised features with the code in
``oodprobe.detectors.search`` (exact blocked matrix products by default, faiss optionally).
Similarities that enter a score are recomputed in float64 for the neighbours found, so scores
match a brute-force float64 computation. The exact backend also *chooses* the neighbours by
float64 scores, provably (a float32 or bfloat16 product finds candidates, a rigorous error
bound says which to re-score; ``search_precision`` picks that product, never the result);
faiss chooses them in float32.

Under a memory budget (:func:`oodprobe.arrays.memory_budget`) an ID set whose normalised
float32 copy exceeds a quarter of the budget is kept on disk: written block by block to a
file in ``$OODPROBE_SCRATCH_DIR`` (default: the system's temporary folder), memory-mapped, and
the file's name removed at once (the mapping keeps its data until the detector is gone). The
exact search then reads it in shards and merges the top-k (``search``'s exactness guarantees
hold unchanged), so peak memory does not grow with N. The faiss backends copy the set into
their own index in memory either way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt
from sklearn.utils.validation import check_is_fitted

from oodprobe.arrays import (
    Features,
    Labels,
    Scores,
    budget_rows,
    check_features,
    check_labels,
    current_memory_budget,
    l2_normalize,
    row_blocks,
    rows_per_block,
    take_rows,
)
from oodprobe.detectors import search
from oodprobe.detectors.base import (
    Choices,
    Detector,
    Number,
    integer,
    register_detector,
    validate_values,
)
from oodprobe.errors import InvalidParameterError

if TYPE_CHECKING:
    import torch

_GATHER_ELEMENTS = 1 << 23  # floats gathered at once when refining neighbour similarities
_QUERY_ROWS = 1 << 15  # queries normalised and searched together (one pass over a mapped ID set)
SCRATCH_ENV = "OODPROBE_SCRATCH_DIR"
"""Folder where an ID set kept on disk under a memory budget is written (default: the temp
folder)."""


def normalized_id_set(features: Features) -> Features:
    """(n, D) float32 L2-normalised rows of ``features``: in memory, or, when a memory budget
    is set and they exceed a quarter of it, an unlinked file memory-mapped read-only."""
    budget = current_memory_budget()
    size = len(features) * features.shape[1] * 4
    if budget is None or size <= budget // 4:
        return l2_normalize(features, dtype=np.float32)
    folder = os.environ.get(SCRATCH_ENV) or tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if free < size + (256 << 20):
        raise InvalidParameterError(
            f"keeping the normalised ID set on disk needs {size / 2**30:.1f} GiB in {folder}, "
            f"which has {free / 2**30:.1f} GiB free; set {SCRATCH_ENV} to a folder with room, "
            f"or raise the memory budget (now {budget / 2**30:.1f} GiB) above "
            f"{4 * size / 2**30:.1f} GiB to keep it in memory"
        )
    handle, path = tempfile.mkstemp(prefix="oodprobe-id-set-", suffix=".f32", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            step = rows_per_block(features.shape[1], 1 << 22)
            for rows in row_blocks(len(features), step, release=features):
                file.write(l2_normalize(features[rows], dtype=np.float32).tobytes())
        mapped = np.memmap(path, dtype=np.float32, mode="r", shape=features.shape)
    finally:
        with contextlib.suppress(OSError):  # mapped (or failed): the name is not needed
            os.unlink(path)
    return mapped


# exp(cos/T) with cos <= 1 must fit in float64 (exp(709) is the largest)
_TEMPERATURE = [Number(1 / 700, text="finite number >= 1/700 (so exp(cos/T) fits in float64)")]
_SEARCH_CONSTRAINTS: dict[str, list[Any]] = {
    "k": [integer(1)],
    "backend": [Choices(*search.BACKENDS)],
    "n_lists": [integer(1), None],
    "n_probe": [integer(1)],
    "hnsw_m": [integer(1)],
    "ef_search": [integer(1)],
    "search_precision": [Choices(*search.PRECISIONS)],
}


class _NeighborDetector(Detector):
    """Shared fit, search and persistence of the k-NN detectors."""

    k: int
    backend: str
    n_lists: int | None
    n_probe: int
    hnsw_m: int
    ef_search: int
    search_precision: str
    _exact_index: search.ExactIndex | None

    differentiable: ClassVar[bool] = True

    @classmethod
    def check_params(cls, params: Mapping[str, Any], *, runner: bool = False) -> None:
        """The base checks, and ``search_precision='bf16'`` only with ``backend='exact'``."""
        super().check_params(params, runner=runner)
        backend = params.get("backend", "exact")
        if params.get("search_precision", "auto") == "bf16" and backend != "exact":
            raise InvalidParameterError(
                f"detector {cls.name!r}: search_precision='bf16' needs backend='exact' (faiss "
                f"searches in float32), got backend={backend!r}; use backend='exact' or "
                f"search_precision='auto'"
            )

    def fit(self, features: Features, labels: Labels | None = None) -> _NeighborDetector:
        """Store the L2-normalised (n, D) ID training features (float32); labels are ignored."""
        self._validate_params()
        features = check_features(features)
        search.check_search_limits(self.k, len(features), self.n_lists)
        self.train_features_ = normalized_id_set(features)
        self.n_dims_ = int(features.shape[1])
        self._faiss_index = None
        self._exact_index = None
        if self.backend in search.APPROXIMATE_BACKENDS:
            # only the live index: a serialised copy beside it (as fitted state) was a third
            # copy of the ID set (measured ~12 GiB peak at 1M x 768); it is made when saved
            self._faiss_index = search.build_faiss_index(
                self.train_features_, self.backend, n_lists=self.n_lists, hnsw_m=self.hnsw_m
            )
        return self

    def _get_state(self) -> dict[str, Any]:
        state = super()._get_state()
        if self.backend in search.APPROXIMATE_BACKENDS:  # saved as faiss' bytes, no pickle
            state["index_bytes_"] = search.serialize_faiss_index(self._live_faiss_index())
        return state

    def _set_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        index_bytes = state.pop("index_bytes_", None)
        super()._set_state(state)
        self._faiss_index = None if index_bytes is None else search.load_faiss_index(index_bytes)
        self._exact_index = None

    def __getstate__(self) -> dict[str, Any]:
        # the exact search's bf16 copy is a cache, rebuilt from train_features_; the faiss
        # index (a SWIG object) travels as its bytes, so copy/deepcopy/pickle work
        state = dict(super().__getstate__())
        faiss_index = state.pop("_faiss_index", None)
        if faiss_index is not None:
            state["_faiss_bytes"] = search.serialize_faiss_index(faiss_index)
        state.pop("_exact_index", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        index_bytes = state.pop("_faiss_bytes", None)
        super().__setstate__(state)
        self._faiss_index = None if index_bytes is None else search.load_faiss_index(index_bytes)

    def _live_faiss_index(self) -> Any:
        index = getattr(self, "_faiss_index", None)
        if index is None:
            raise InvalidParameterError(
                f"detector {self.name!r} with backend={self.backend!r} has no faiss index: fit it"
            )
        return index

    def _neighbors(self, query_unit: npt.NDArray[np.floating[Any]]) -> search.IndexArray:
        """(n, k) indices into ``train_features_`` of each query's neighbours, nearest first.

        ``query_unit`` is float64 (or float32); the exact backend ranks by float64 scores of it.
        """
        if self.backend == "exact":
            index = getattr(self, "_exact_index", None)
            if index is None:
                index = search.prepare_exact(self.train_features_, self.search_precision)
                self._exact_index = index
            return search.exact_search(self.train_features_, query_unit, self.k, index=index)[1]
        query_unit = np.asarray(query_unit, dtype=np.float32)
        index = None
        if self.backend in search.APPROXIMATE_BACKENDS:
            index = self._live_faiss_index()
        return search.faiss_search(
            index,
            self.train_features_,
            query_unit,
            self.k,
            backend=self.backend,
            n_probe=self.n_probe,
            ef_search=self.ef_search,
        )[1]

    def _score_from_neighbors(
        self, unit: npt.NDArray[np.float64], indices: search.IndexArray
    ) -> Scores:
        raise NotImplementedError

    def score_samples(self, features: Features) -> Scores:
        """(n,) float64 scores of (n, D) features; higher = more in-distribution.

        Queries are taken in blocks (``_QUERY_ROWS``, fewer under a tight memory budget):
        each block is normalised, searched and scored on its own, so no float64 copy of all
        queries is made; every query's result is independent of the blocking.
        """
        check_is_fitted(self)
        features = check_features(features, n_dims=self.n_dims_)
        scores = np.empty(len(features), dtype=np.float64)
        # the float64 unit rows, their rounded copy and the (n, k) results
        step = budget_rows(8 * self.n_dims_ * 2 + 24 * self.k, _QUERY_ROWS)
        for block in row_blocks(len(features), step, release=features):
            unit = np.asarray(l2_normalize(features[block], dtype=np.float64), dtype=np.float64)
            indices = self._neighbors(unit)
            width = indices.shape[1] * self.n_dims_
            for rows in row_blocks(len(unit), rows_per_block(width, _GATHER_ELEMENTS)):
                scores[block.start + rows.start : block.start + rows.stop] = (
                    self._score_from_neighbors(unit[rows], indices[rows])
                )
        return scores

    def kneighbors(self, features: Features) -> tuple[npt.NDArray[np.float64], search.IndexArray]:
        """(n, k) float64 cosine similarities and train-row indices of each row's k nearest ID
        training features, nearest first, found by this detector's ``backend``.

        scikit-learn's ``NearestNeighbors.kneighbors``, with similarities (higher = nearer)
        instead of distances. ``search.recall_at_k(approx.kneighbors(f)[1],
        exact.kneighbors(f)[1])`` is an approximate backend's recall on ``features``.
        """
        check_is_fitted(self)
        features = check_features(features, n_dims=self.n_dims_)
        unit = np.asarray(l2_normalize(features, dtype=np.float64), dtype=np.float64)
        indices = self._neighbors(unit)
        similarities = np.empty(indices.shape, dtype=np.float64)
        width = indices.shape[1] * self.n_dims_
        for rows in row_blocks(len(unit), rows_per_block(width, _GATHER_ELEMENTS)):
            neighbours = take_rows(self.train_features_, indices[rows]).astype(np.float64)
            similarities[rows] = np.einsum("nkd,nd->nk", neighbours, unit[rows])
        return similarities, indices

    def _torch_inputs(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable unit features and their (n, k, D) neighbours (found without grad).

        Computed in float32 at least (float64 input stays float64), on the input's device.
        """
        import torch

        features = self._torch_features(features)
        unit = torch.nn.functional.normalize(features, dim=1, eps=1e-12)
        with torch.no_grad():
            query = unit.detach().to(device="cpu", dtype=torch.float32).numpy()
            indices = self._neighbors(np.ascontiguousarray(query))
        neighbours = torch.from_numpy(take_rows(self.train_features_, indices)).to(unit)
        return unit, neighbours


@register_detector
class KNNDetector(_NeighborDetector):
    """Label-free k-NN: cosine similarity to the nearest ID training features.

    Adaloglou, Michels, Kaiser, Kollmann, TMLR 2024 ("Adapting Contrastive Language-Image
    Pretrained (CLIP) Models for Out-of-Distribution Detection"). Score: ``max_i cos(x, x_i)``
    for k=1, else ``mean_{i ∈ top-k} exp(cos(x, x_i) / T)``. Differences from the paper: none
    in the formula; the paper does not fix T for k > 1, the default 0.02 is its k-NN
    classifier's. Differences from the authors' code (``OOD_classifier_knn``, metric
    ``temp-cos-sim``, T = 0.02): it scores ``exp(cos/T)`` also for k = 1, where we return the
    cosine itself, a monotone transform (same ranking, AUROC and FPR; other values); the
    neighbours are the exact float64 top-k (the authors' search is float32). ``backend``
    picks the search: ``exact`` (provably the float64 top-k, ties to the smaller index: a
    blocked low-precision product for candidates, float64 re-ranking), ``faiss`` (faiss brute
    force in float32), ``faiss-ivf`` (``n_lists``, ``n_probe``) or ``faiss-hnsw`` (``hnsw_m``,
    ``ef_search``), the last two approximate. ``search_precision`` (exact backend only):
    ``auto`` (bf16 where this machine's bf16 product is faster), ``fp32`` or ``bf16``, the
    product that finds candidates; the neighbours and scores are the same for all three.
    Approximate backends pay off only at scale (``benchmarks/ann_recall.py``: at 1M × 768 on
    2 cores an index took ~10 min to build and beat exact only after ~25k queries) and bias
    the AUROC upwards, because OOD queries lose more true neighbours than ID ones; keeping it
    within 0.1 point of exact needed recall@1 ≥ 0.98 (measure it: ``kneighbors`` and
    :func:`oodprobe.detectors.search.recall_at_k`).
    """

    name: ClassVar[str] = "knn"
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **_SEARCH_CONSTRAINTS,
        "temperature": _TEMPERATURE,
    }

    def __init__(
        self,
        *,
        k: int = 1,
        temperature: float = 0.02,
        backend: str = "exact",
        n_lists: int | None = None,
        n_probe: int = 8,
        hnsw_m: int = 32,
        ef_search: int = 64,
        search_precision: str = "auto",
    ) -> None:
        self.k = k
        self.temperature = temperature
        self.backend = backend
        self.n_lists = n_lists
        self.n_probe = n_probe
        self.hnsw_m = hnsw_m
        self.ef_search = ef_search
        self.search_precision = search_precision

    def _score_from_neighbors(
        self, unit: npt.NDArray[np.float64], indices: search.IndexArray
    ) -> Scores:
        neighbours = take_rows(self.train_features_, indices).astype(np.float64)  # (n, k, D)
        cosines = np.einsum("nkd,nd->nk", neighbours, unit)
        if self.k == 1:
            return np.asarray(cosines[:, 0], dtype=np.float64)
        return np.asarray(np.exp(cosines / self.temperature).mean(axis=1), dtype=np.float64)

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) scores of an (n, D) tensor; matches ``score_samples``, higher = ID.

        The neighbours are chosen without gradient; the score is differentiable in ``features``.
        """
        unit, neighbours = self._torch_inputs(features)
        cosines = (neighbours * unit.unsqueeze(1)).sum(dim=2)
        if self.k == 1:
            return cosines[:, 0]
        return (cosines / self.temperature).exp().mean(dim=1)


@register_detector
class DeepKNNDetector(_NeighborDetector):
    """Deep nearest neighbours: minus the distance to the k-th nearest ID training feature.

    Sun, Ming, Zhu, Li, ICML 2022 ("Out-of-Distribution Detection with Deep Nearest
    Neighbors"). Score: ``−‖z − z_(k)‖₂`` with ``z = x/‖x‖`` and ``z_(k)`` the k-th nearest
    normalised training feature. Differences from the paper: none (k=50 is its CIFAR-10
    choice, 1000 its ImageNet one). Search backends as in ``knn``.
    """

    name: ClassVar[str] = "deep-knn"
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = _SEARCH_CONSTRAINTS

    def __init__(
        self,
        *,
        k: int = 50,
        backend: str = "exact",
        n_lists: int | None = None,
        n_probe: int = 8,
        hnsw_m: int = 32,
        ef_search: int = 64,
        search_precision: str = "auto",
    ) -> None:
        self.k = k
        self.backend = backend
        self.n_lists = n_lists
        self.n_probe = n_probe
        self.hnsw_m = hnsw_m
        self.ef_search = ef_search
        self.search_precision = search_precision

    def _score_from_neighbors(
        self, unit: npt.NDArray[np.float64], indices: search.IndexArray
    ) -> Scores:
        kth = take_rows(self.train_features_, indices[:, -1]).astype(np.float64)
        return -np.linalg.norm(unit - kth, axis=1)

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) scores of an (n, D) tensor, as ``score_samples``; higher = ID."""
        import torch

        unit, neighbours = self._torch_inputs(features)
        return -torch.linalg.vector_norm(unit - neighbours[:, -1], dim=1)


# -- the k-NN ID classifier (paper claim 1) ----------------------------------------------------


def knn_classify(
    train_features: Features,
    train_labels: Labels,
    test_features: Features,
    *,
    k: int = 20,
    temperature: float = 0.02,
) -> Labels:
    """Predict (n_test,) labels by a weighted vote of the k nearest training features.

    Cosine similarity of L2-normalised features; neighbour i votes for its label with weight
    ``exp(cos_i / T)`` (Wu et al. 2018; DINO's k-NN evaluation; the paper uses k=20, T=0.02).
    Ties go to the smaller label. Returns labels drawn from ``train_labels``' values.
    """
    validate_values(
        {"k": [integer(1)], "temperature": _TEMPERATURE},
        {"k": k, "temperature": temperature},
        "knn_classify",
    )
    train = check_features(train_features, name="train_features")
    labels = check_labels(train_labels, len(train), min_classes=1)
    test = check_features(test_features, name="test_features", n_dims=train.shape[1])
    search.check_search_limits(k, len(train), None)
    classes, codes = np.unique(labels, return_inverse=True)
    similarities, indices = search.exact_search(
        l2_normalize(train, dtype=np.float32), l2_normalize(test, dtype=np.float64), k
    )
    # subtracting each row's best similarity leaves the argmax unchanged and avoids overflow
    weights = np.exp((similarities.astype(np.float64) - similarities[:, :1]) / temperature)
    predictions = np.empty(len(test), dtype=np.int64)
    n_classes = len(classes)
    for block in row_blocks(len(test), rows_per_block(n_classes)):
        n_rows = block.stop - block.start
        slots = np.arange(n_rows)[:, None] * n_classes + codes[indices[block]]
        votes = np.bincount(slots.ravel(), weights[block].ravel(), n_rows * n_classes)
        predictions[block] = votes.reshape(n_rows, n_classes).argmax(axis=1)
    return np.asarray(classes[predictions], dtype=np.int64)


def knn_accuracy(
    train_features: Features,
    train_labels: Labels,
    test_features: Features,
    test_labels: Labels,
    *,
    k: int = 20,
    temperature: float = 0.02,
) -> float:
    """Fraction of test samples whose :func:`knn_classify` prediction equals ``test_labels``."""
    test = check_features(test_features, name="test_features")
    truth = check_labels(test_labels, len(test), min_classes=1)
    predicted = knn_classify(train_features, train_labels, test, k=k, temperature=temperature)
    return float(np.mean(predicted == truth))
