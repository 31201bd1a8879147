"""Top-k cosine-similarity search over L2-normalised features: exact (torch) or faiss.

The exact search finds *provably* the exact top-k of the float64 scores
``s_j = Σ_d float64(x_jd) · y_d`` (train rows ``x_j`` as stored, in float32; the query ``y`` as
given, float32 or float64), ties broken by the smaller train index. It runs in two stages:

1. **Candidates** from a blocked low-precision matrix product: float32 (``precision="fp32"``)
   or bfloat16 inputs with float32 accumulation (``"bf16"``). Queries and the training set are
   cut into blocks so that one (query block × train block) similarity matrix stays within
   ``_BLOCK_ELEMENTS`` values; each block's top-m (m = k + a few) is merged into a running
   top-m per query.
2. **Exact re-ranking**: with a rigorous bound ``err`` on |approximate − exact score| (see
   :func:`_error_bounds`), every candidate whose upper bound reaches the k-th candidate's
   lower bound is re-scored in float64 and the top-k taken by (score, −index). The result is
   proven when every row *outside* the top-m has an upper bound below the k-th exact score:
   ``upper(a_m) < s_(k)``. A query where that fails (its candidate set would be too large:
   near-duplicates, ties) falls back to a full float32 row for that query, from which every
   row whose upper bound reaches the k-th lower bound is re-scored (no cap: always exact).

Both precisions therefore return identical neighbours and (float64) scores; ``bf16`` only
changes the speed (and halves the memory of the training copy the product reads), so it is
chosen automatically (``precision="auto"``) where a one-time micro-benchmark finds the bf16
product faster than the float32 one.

A memory-mapped training set (``np.memmap``: the k-NN detectors keep a large normalised ID set
on disk under a memory budget) is searched in *shards*: each shard of rows is read once into
memory (and rounded to bf16 there, if so), every query block is multiplied with it, and the
running top-m merged, so the whole file is read once per search and resident memory stays one
shard (its pages are released after it). The re-ranking and the fallback read the same
float32 rows (the fallback also shard by shard), so neighbours and scores are identical to the
in-memory search of the same rows.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from oodprobe.arrays import bfloat16_as_float32
from oodprobe.errors import InvalidParameterError

if TYPE_CHECKING:
    import torch

BACKENDS: tuple[str, ...] = ("exact", "faiss", "faiss-ivf", "faiss-hnsw")
APPROXIMATE_BACKENDS: tuple[str, ...] = ("faiss-ivf", "faiss-hnsw")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
_BLOCK_ELEMENTS = 1 << 24  # values in one similarity block (64 MiB of float32: cache-friendly)
_MAX_TRAIN_BLOCK = 16384  # train rows per block, so query blocks stay tall enough for BLAS
_GROUP = 64  # columns per group in the group-max prefilter of _block_topk
# candidates kept per query beyond k: float32's error window (~5e-5 for D = 768) rarely holds
# more than one extra row; bf16's (~5e-3) holds a few more on dense data
_EXTRA_CANDIDATES = {"fp32": 3, "bf16": 15}
_EXACT_ELEMENTS = 1 << 22  # float64 values gathered at once when re-scoring candidates
_BF16_MIN_SPEEDUP = 1.25  # "auto" picks bf16 when its product is at least this much faster

_U32 = 2.0**-24  # unit roundoff of float32 (round to nearest)
_U64 = 2.0**-53  # unit roundoff of float64
_U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8-bit significand, round to nearest even)
_TINY = 2.0**-126  # smallest normal float32 / bfloat16 (denormals are flushed, see below)

Float32Array = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]
IndexArray = npt.NDArray[np.int64]


def check_search_limits(k: int, n_train: int, n_lists: int | None) -> None:
    """Check ``k`` and ``n_lists`` against the training-set size (their types: constraints)."""
    if k > n_train:
        raise InvalidParameterError(
            f"k={k} is larger than the {n_train} training samples; use k <= {n_train}"
        )
    if n_lists is not None and n_lists > n_train:
        raise InvalidParameterError(
            f"n_lists={n_lists} is larger than the {n_train} training samples; "
            f"use n_lists <= {n_train} or leave it unset"
        )


# -- precision: which product finds the candidates ----------------------------------------------


def resolve_precision(precision: str) -> str:
    """``fp32`` or ``bf16`` for a search ``precision`` (``auto``: bf16 where it is faster)."""
    if precision not in PRECISIONS:
        raise InvalidParameterError(
            f"search precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    if precision == "auto":
        return "bf16" if bf16_is_faster() and bf16_product_is_safe() else "fp32"
    if precision == "bf16" and not bf16_product_is_safe():
        raise InvalidParameterError(
            "search precision 'bf16' needs a bfloat16 product that accumulates in float32, "
            "and this torch build's CPU product does not; use 'auto' or 'fp32'"
        )
    return precision


def _probe_operands() -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randn(128, 768, generator=generator), torch.randn(4096, 768, generator=generator)


@functools.cache
def bf16_product_is_safe() -> bool:
    """Whether torch's CPU bfloat16 product obeys the error model of :func:`_error_bounds`.

    Float32 accumulation and one rounding of the result to bfloat16, checked once per process
    on a random (128 × 768) · (768 × 4096) product against float64. A kernel that accumulated
    in bfloat16 would break the bound on such sums (their partial sums exceed the result).
    """
    import torch

    queries, train = (operand.to(torch.bfloat16) for operand in _probe_operands())
    with torch.no_grad():
        product = torch.mm(queries, train.T).double()
        exact = queries.double() @ train.double().T
        magnitudes = queries.double().abs() @ train.double().abs().T
    allowed = _U_BF16 / (1 - _U_BF16) * product.abs() + _gamma(768, _U32) * magnitudes
    return bool(((product - exact).abs() <= allowed + 4 * 768 * _TINY).all())


@functools.cache
def bf16_is_faster() -> bool:
    """Whether this CPU's bfloat16 product is ``_BF16_MIN_SPEEDUP``× faster than float32's.

    A one-time micro-benchmark per process (~0.1-0.2 s): CPU flags are not enough. An AVX-512 BF16
    core without AMX (Intel Sapphire Rapids under a hypervisor that hides AMX) issues one
    ``vdpbf16ps`` per cycle against two float32 FMAs, so its bf16 product is no faster (here it
    is ~0.55× float32 in oneDNN and in MKL), while AMD Zen 4 and AMX cores run it 2-3× faster.
    """
    import torch

    queries, train = _probe_operands()

    def best_seconds(dtype: torch.dtype) -> float:
        left, right = queries.to(dtype), train.to(dtype)
        out = torch.empty(len(left), len(right), dtype=dtype)
        torch.mm(left, right.T, out=out)  # warm-up (oneDNN builds its kernel once)
        timings = []
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(left, right.T, out=out)
            timings.append(time.perf_counter() - start)
        return min(timings)

    with torch.no_grad():
        return best_seconds(torch.float32) >= _BF16_MIN_SPEEDUP * best_seconds(torch.bfloat16)


# -- the exact search ---------------------------------------------------------------------------


def _gamma(n_terms: int, unit_roundoff: float) -> float:
    """Higham's γ_n = n·u / (1 − n·u): relative error bound of an n-term sum or dot product."""
    return n_terms * unit_roundoff / (1.0 - n_terms * unit_roundoff)


def _row_norms(rows: Float64Array) -> Float64Array:
    """Float64 norms of the rows of a (n, D) block (relative error below D·2⁻⁵³)."""
    return np.asarray(np.sqrt(np.einsum("ij,ij->i", rows, rows)), dtype=np.float64)


def _max_row_norm(rows: Float64Array) -> float:
    """The largest row norm of a block, rounded up (0 for an empty block)."""
    return float(_row_norms(rows).max(initial=0.0)) * (1 + 1e-12)


@dataclass(frozen=True)
class ExactIndex:
    """A training set prepared for :func:`exact_search` at one precision (a cache, never saved).

    ``train`` is the float32 (n, D) array the exact re-ranking reads (the caller's, not a
    copy). ``product`` is what the candidate product reads: ``train``'s own memory for fp32; a
    bfloat16 copy, half of float32's size, for bf16 (the float32 array is still needed: it is
    the exact source of the re-ranking, and the detector holds it anyway). ``train_norm``,
    ``product_norm`` and ``residual_norm`` bound ‖x_j‖, ‖x̃_j‖ and ‖x_j − x̃_j‖ over all rows.
    """

    precision: str
    train: Float32Array
    product: torch.Tensor | None  # None: a memory-mapped train, read in shards
    train_norm: float
    product_norm: float
    residual_norm: float
    shard_rows: int = 0  # rows per shard of a memory-mapped train


def prepare_exact(train_unit: npt.ArrayLike, precision: str = "auto") -> ExactIndex:
    """Prepare (n, D) training rows for :func:`exact_search` (``precision``: see PRECISIONS)."""
    import torch

    from oodprobe.arrays import is_memory_mapped, row_blocks, rows_per_block

    resolved = resolve_precision(precision)
    mapped = is_memory_mapped(train_unit) and np.asarray(train_unit).dtype == np.float32
    train = np.asarray(train_unit) if mapped else np.ascontiguousarray(train_unit, np.float32)
    keep_bits = resolved == "bf16" and not mapped
    bits = np.empty(train.shape, dtype=np.uint16) if keep_bits else None
    train_norm = product_norm = residual_norm = 0.0
    step = rows_per_block(train.shape[1], 1 << 18)
    for rows in row_blocks(len(train), step, release=train if mapped else None):
        single = np.asarray(train[rows])
        block = single.astype(np.float64)
        train_norm = max(train_norm, _max_row_norm(block))
        if resolved == "bf16":
            block_bits = _bf16_bits(single)
            if bits is not None:
                bits[rows] = block_bits
            rounded = bfloat16_as_float32(block_bits).astype(np.float64)
            product_norm = max(product_norm, _max_row_norm(rounded))
            residual_norm = max(residual_norm, _max_row_norm(block - rounded))
    if resolved == "fp32":
        product_norm = train_norm
    if mapped:
        return ExactIndex(
            resolved, train, None, train_norm, product_norm, residual_norm, _shard_rows(train)
        )
    if bits is None:
        with warnings.catch_warnings():  # a read-only (memory-mapped) ID set: only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            product = torch.from_numpy(train)
    else:
        product = torch.from_numpy(bits).view(torch.bfloat16)
    return ExactIndex(resolved, train, product, train_norm, product_norm, residual_norm)


def _shard_rows(train: Float32Array) -> int:
    """Rows per shard of a memory-mapped train: 1/8 of the memory budget (256 MiB without)."""
    from oodprobe.arrays import budget_rows

    row_bytes = train.shape[1] * 6  # the float32 rows and their bf16 copy
    return max(_MAX_TRAIN_BLOCK, budget_rows(row_bytes, (256 << 20) // row_bytes, share=0.125))


def _product_shards(index: ExactIndex, precision: str) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows as the candidate product reads them) of each shard of the train."""
    import torch

    from oodprobe.arrays import release_pages

    if index.product is not None and precision == index.precision:
        yield 0, index.product
        return
    if index.product is not None:  # the fp32 product of an in-memory bf16 index (fallback)
        yield 0, torch.from_numpy(index.train)
        return
    step = index.shard_rows or len(index.train)
    for start in range(0, len(index.train), step):
        rows = slice(start, start + step)
        single = np.array(index.train[rows], dtype=np.float32)  # one read of the shard
        release_pages(index.train, rows)
        if precision == "bf16":
            yield start, torch.from_numpy(_bf16_bits(single)).view(torch.bfloat16)
        else:
            yield start, torch.from_numpy(single)


def _bf16_bits(single: Float32Array) -> npt.NDArray[np.uint16]:
    """bfloat16 bit patterns of finite float32 values, rounded to nearest, ties to even.

    The top 16 bits of ``x + 0x7FFF + (bit 16 of x)`` (as uint32): what torch's conversion
    does, ~20x faster here than ``Tensor.to(torch.bfloat16)`` on small blocks.
    """
    raw = np.ascontiguousarray(single, dtype=np.float32).view(np.uint32)
    return ((raw + (np.uint32(0x7FFF) + ((raw >> 16) & 1))) >> 16).astype(np.uint16)


def _error_bounds(
    index: ExactIndex, query: Float64Array, query_product: torch.Tensor, *, precision: str
) -> tuple[Float64Array, float]:
    """Rigorous bounds on |approximate − exact score|: ``(absolute (q,), relative)``.

    For a train row ``x`` (float32, exact) and a query ``y`` (float64), the candidate product
    computes ``a = fl(x̃·ỹ)`` with ``x̃, ỹ`` their rounded copies (float32 or bfloat16), and the
    re-ranking computes ``s = fl64(x·y)``. Then ``|a − s| ≤ abs_q + rel·|a|`` with

    * rounding the inputs: ``x·y − x̃·ỹ = x̃·r_y + r_x·ỹ + r_x·r_y`` (``r = exact − rounded``),
      so by Cauchy–Schwarz ``|x·y − x̃·ỹ| ≤ X̃ρ_y + ρ_X Ỹ + ρ_X ρ_y``, with the *measured*
      residual norms (``ρ_X`` the largest over train rows, ``ρ_y`` the query's). Round to nearest
      gives ``|r_i| ≤ u|x_i|``, so this is at most ``(2u + u²)·‖x‖‖y‖`` (u = 2⁻⁸ for bfloat16;
      a measured ρ is ~0.4 of that bound, which keeps the re-ranking window small);
    * float32 accumulation: a dot product of D terms evaluated in float32 in any order, with
      or without FMA, satisfies ``|fl(x̃·ỹ) − x̃·ỹ| ≤ γ_D Σ|x̃_i ỹ_i| ≤ γ_D X̃Ỹ`` with
      ``γ_D = D·2⁻²⁴/(1 − D·2⁻²⁴)`` (Higham, Accuracy and Stability of Numerical Algorithms,
      2nd ed., eq. 3.4 and §4.2; the product of two bfloat16 is even exact in float32).
      oneDNN's bf16 kernels (``vdpbf16ps``, AMX) and BLAS accumulate in float32 registers;
      :func:`bf16_is_faster` also checks that this torch build's bf16 product obeys the bound
      before ``auto`` picks it;
    * denormals: ``vdpbf16ps`` and flush-to-zero modes treat denormal inputs and results as
      zero, at most 2⁻¹²⁶ per input or operation: ``4D·2⁻¹²⁶`` in all;
    * torch's CPU bfloat16 product returns bfloat16 (no float32-output matmul on CPU): its
      output rounding adds ``|a − acc| ≤ u|acc| ≤ u/(1 − u)·|a|``, the relative term;
    * the float64 re-score: ``|s − x·y| ≤ γ_{D+1}(2⁻⁵³)·XY``.

    Each bound is finally inflated by 1e-10 relative to cover rounding in evaluating it.
    """
    import torch

    dims = query.shape[1]
    query_norm = _row_norms(query)
    if query_product.dtype == torch.bfloat16:
        bits = query_product.view(torch.int16).numpy().view(np.uint16)
        rounded = bfloat16_as_float32(bits).astype(np.float64)
    else:
        rounded = query_product.numpy().astype(np.float64)
    rounded_norm = _row_norms(rounded)
    residual = _row_norms(query - rounded)
    bound = (
        index.product_norm * residual
        + index.residual_norm * rounded_norm
        + index.residual_norm * residual
        + _gamma(dims, _U32) * index.product_norm * rounded_norm
        + _gamma(dims + 1, _U64) * index.train_norm * query_norm
        + 4 * dims * _TINY
    )
    relative = _U_BF16 / (1 - _U_BF16) if precision == "bf16" else 0.0
    return bound * (1 + 1e-10), relative * (1 + 1e-10)


def _rounded_queries(query: Float64Array, precision: str) -> torch.Tensor:
    """The query block as the candidate product reads it (float32 or bfloat16)."""
    import torch

    single = np.ascontiguousarray(query, dtype=np.float32)
    if precision == "bf16":
        return torch.from_numpy(_bf16_bits(single)).view(torch.bfloat16)
    return torch.from_numpy(single)


def _top_columns(values: Float32Array, k: int) -> IndexArray:
    """Positions of the k largest values of each row (unordered; ties: any of them)."""
    if k >= values.shape[1]:
        return np.broadcast_to(np.arange(values.shape[1]), values.shape).copy()
    return np.argpartition(-values, k - 1, axis=1)[:, :k]


def _block_topk(similarities: torch.Tensor, k: int) -> tuple[Float32Array, IndexArray]:
    """Top-k values (float32, unordered) and column indices of each row of a (rows, cols) block.

    Every column not returned is <= the smallest returned value of its row (ties included).
    For small k a group-max prefilter: column c belongs to group ``c mod n_groups``; the top-k
    entries of a row lie in the k groups with the largest maxima, so only those k·``_GROUP``
    columns are searched. With groups strided this way their maxima are a max over the middle
    axis of a (rows, _GROUP, n_groups) view, which vectorises like a plain row max, and the
    small selections run in numpy (``argpartition``; torch's CPU topk costs ~10 µs a row).
    """
    import torch

    rows, cols = similarities.shape
    n_groups = cols // _GROUP
    if k > 64 or 4 * k > n_groups:
        top_values, top_columns = torch.topk(similarities, k, dim=1, sorted=False)
        return top_values.float().numpy(), top_columns.numpy()
    body = n_groups * _GROUP
    maxima = similarities[:, :body].unflatten(1, (_GROUP, n_groups)).amax(dim=1)
    groups = _top_columns(maxima.float().numpy(), k)
    columns = (groups[:, :, None] + n_groups * np.arange(_GROUP)).reshape(rows, k * _GROUP)
    if body < cols:  # the tail columns are all candidates
        tail = np.broadcast_to(np.arange(body, cols), (rows, cols - body))
        columns = np.concatenate([columns, tail], axis=1)
    gathered = torch.gather(similarities, 1, torch.from_numpy(columns)).float().numpy()
    top = _top_columns(gathered, k)
    return np.take_along_axis(gathered, top, axis=1), np.take_along_axis(columns, top, axis=1)


def _block_shape(n_train: int) -> tuple[int, int]:
    """(query rows, train rows) of one similarity block."""
    n_train_blocks = math.ceil(n_train / _MAX_TRAIN_BLOCK)
    train_block = math.ceil(n_train / n_train_blocks)
    return max(1, _BLOCK_ELEMENTS // train_block), train_block


def _candidates(
    index: ExactIndex, queries: torch.Tensor, m: int, buffer: torch.Tensor
) -> tuple[Float64Array, IndexArray]:
    """(q, m) approximate top-m scores (sorted descending, as float64) and their train rows.

    Train shards (one for an in-memory train) outside, train blocks, then query blocks of
    ``_block_shape`` rows inside: a memory-mapped train is read once for all the queries.
    """
    import torch

    n_train = len(index.train)
    query_block, train_block = _block_shape(n_train)
    starts = range(0, len(queries), query_block)
    best: list[tuple[Float32Array, IndexArray] | None] = [None] * len(starts)
    for shard_start, shard in _product_shards(index, index.precision):
        for t_start in range(0, len(shard), train_block):
            block = shard[t_start : t_start + train_block]
            for slot, q_start in enumerate(starts):
                rows = queries[q_start : q_start + query_block]
                similarities = buffer[: len(rows) * len(block)].view(len(rows), len(block))
                torch.mm(rows, block.T, out=similarities)
                values, columns = _block_topk(similarities, min(m, len(block)))
                columns = columns + (shard_start + t_start)
                previous = best[slot]
                if previous is not None:  # merge with the running top-m of earlier blocks
                    values = np.concatenate([previous[0], values], axis=1)
                    columns = np.concatenate([previous[1], columns], axis=1)
                    keep = _top_columns(values, m)
                    values = np.take_along_axis(values, keep, axis=1)
                    columns = np.take_along_axis(columns, keep, axis=1)
                best[slot] = (values, columns)
    found = [entry for entry in best if entry is not None]
    assert len(found) == len(best)
    values = np.concatenate([entry[0] for entry in found])
    columns = np.concatenate([entry[1] for entry in found])
    order = np.argsort(-values, axis=1, kind="stable")
    ranked = np.asarray(np.take_along_axis(values, order, axis=1), dtype=np.float64)
    return ranked, np.take_along_axis(columns, order, axis=1)


def exact_scores(
    train: Float32Array, queries: Float64Array, query_rows: IndexArray, train_rows: IndexArray
) -> Float64Array:
    """Float64 scores ``Σ_d x_d·y_d`` of (query row, train row) pairs: the exact ranking key.

    One fixed computation per pair (numpy's einsum sum of products over one contiguous row of
    each operand), so identical train rows get identical scores wherever they are and the
    tie-break by index is well defined.
    """
    from oodprobe.arrays import take_rows

    scores = np.empty(len(query_rows), dtype=np.float64)
    step = max(1, _EXACT_ELEMENTS // max(1, train.shape[1]))
    for start in range(0, len(query_rows), step):
        pairs = slice(start, start + step)
        rows = take_rows(train, train_rows[pairs]).astype(np.float64)
        scores[pairs] = np.einsum("ij,ij->i", rows, queries[query_rows[pairs]])
    return scores


def _select(
    query_rows: IndexArray, train_rows: IndexArray, scores: Float64Array, n_queries: int, k: int
) -> tuple[Float64Array, IndexArray]:
    """Per query, the k pairs of highest score, ties to the smaller train index (k per query)."""
    order = np.lexsort((train_rows, -scores, query_rows))
    counts = np.bincount(query_rows, minlength=n_queries)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    picks = order[starts[:, None] + np.arange(k)]
    return scores[picks], train_rows[picks]


def _rerank(
    index: ExactIndex,
    queries: Float64Array,
    approximate: Float64Array,
    candidates: IndexArray,
    bound: tuple[Float64Array, float],
    k: int,
) -> tuple[Float64Array, IndexArray, npt.NDArray[np.bool_]]:
    """Exact top-k among each query's candidates, and whether it is the top-k of all rows."""
    absolute, relative = bound
    slack = absolute[:, None] + relative * np.abs(approximate)
    upper = np.nextafter(approximate + slack, np.inf)
    lower_kth = np.nextafter(approximate[:, k - 1] - slack[:, k - 1], -np.inf)
    # a candidate whose upper bound is below the k-th candidate's lower bound cannot be in the
    # top-k: the first k candidates all score at least that lower bound
    query_rows, positions = np.nonzero(upper >= lower_kth[:, None])
    train_rows = candidates[query_rows, positions]
    scores = exact_scores(index.train, queries, query_rows, train_rows)
    values, indices = _select(query_rows, train_rows, scores, len(queries), k)
    # every row outside the top-m scores at most upper[:, -1]; below the k-th exact score it
    # cannot enter the top-k, nor tie with it
    proven = (upper[:, -1] < values[:, -1]) | (candidates.shape[1] == len(index.train))
    return values, indices, proven


def _full_rows(index: ExactIndex, queries: Float64Array, k: int) -> tuple[Float64Array, IndexArray]:
    """The fallback: exact top-k from a full float32 row of each query (no candidate cap)."""
    import torch

    from oodprobe.arrays import row_blocks, rows_per_block

    single = ExactIndex(
        "fp32", index.train, None, index.train_norm, index.train_norm, 0.0, index.shard_rows
    )
    one_shard = index.product is not None
    widest = len(index.train) if one_shard else min(len(index.train), index.shard_rows)
    values = np.empty((len(queries), k), dtype=np.float64)
    indices = np.empty((len(queries), k), dtype=np.int64)
    for rows in row_blocks(len(queries), rows_per_block(widest, _BLOCK_ELEMENTS)):
        query = queries[rows]
        rounded = _rounded_queries(query, "fp32")
        absolute, _ = _error_bounds(single, query, rounded, precision="fp32")
        # the k-th largest float32 score over all shards (one shard in memory: kept)
        kept: torch.Tensor | None = None
        top: torch.Tensor | None = None
        for _, shard in _product_shards(index, "fp32"):
            similarities = torch.mm(rounded, shard.T)
            shard_top = torch.topk(similarities, min(k, len(shard)), dim=1).values
            top = shard_top if top is None else torch.cat([top, shard_top], dim=1)
            top = torch.topk(top, min(k, top.shape[1]), dim=1).values
            kept = similarities if one_shard else None
        assert top is not None
        kth = top[:, k - 1].double().numpy()
        # keep every row j with s̃_j + err >= s̃_(k) − err, rounded down to float32 (a superset)
        threshold = np.nextafter(kth - 2 * absolute, -np.inf) - 2 * absolute * 1e-10
        single_threshold = threshold.astype(np.float32)
        too_high = single_threshold > threshold
        single_threshold[too_high] = np.nextafter(single_threshold[too_high], np.float32(-np.inf))
        limit = torch.from_numpy(single_threshold)[:, None]
        found_query: list[IndexArray] = []
        found_train: list[IndexArray] = []
        shards = [(0, kept)] if kept is not None else _product_shards(index, "fp32")
        for start, shard_or_scores in shards:
            assert shard_or_scores is not None
            scores_block = (
                shard_or_scores if kept is not None else torch.mm(rounded, shard_or_scores.T)
            )
            mask = scores_block >= limit
            query_rows, train_rows = (array.numpy() for array in torch.nonzero(mask, as_tuple=True))
            found_query.append(query_rows)
            found_train.append(train_rows + start)
        query_rows, train_rows = np.concatenate(found_query), np.concatenate(found_train)
        scores = exact_scores(index.train, query, query_rows, train_rows)
        values[rows], indices[rows] = _select(query_rows, train_rows, scores, len(query), k)
    return values, indices


@contextlib.contextmanager
def _full_float32_products() -> Iterator[None]:
    """Float32 products in float32 for the block (``set_float32_matmul_precision('medium')``
    would let oneDNN run them in bf16, outside the float32 error bound); restored after."""
    import torch

    previous = torch.get_float32_matmul_precision()
    if previous != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if previous != "highest":
            torch.set_float32_matmul_precision(previous)


def exact_search(
    train_unit: npt.ArrayLike,
    query_unit: npt.ArrayLike,
    k: int,
    *,
    precision: str = "auto",
    index: ExactIndex | None = None,
) -> tuple[Float64Array, IndexArray]:
    """Exact top-k inner products of each query row with the train rows, sorted descending.

    Returns ``(similarities, indices)``, both (n_queries, k): the float64 scores
    :func:`exact_scores` and their train rows, ties to the smaller index, whatever the
    ``precision`` (``auto``, ``fp32``, ``bf16``: the candidate product; see the module doc).
    ``index`` (from :func:`prepare_exact`, for these ``train_unit``) skips the preparation.
    Memory beyond the inputs: one similarity block of at most ``_BLOCK_ELEMENTS`` values, the
    (n, k) results and, for bf16, the bfloat16 copy of the train rows (half of float32).
    """
    import torch

    from oodprobe.arrays import release_pages

    if index is None:
        index = prepare_exact(train_unit, precision)
    queries = np.asarray(query_unit)
    n_train = len(index.train)
    m = min(n_train, k + _EXTRA_CANDIDATES[index.precision])
    query_block, train_block = _block_shape(n_train)
    buffer_rows = min(query_block, len(queries))
    if index.product is None:  # memory-mapped: every query against each shard, read once
        query_block = max(query_block, _mapped_query_rows(queries.shape[1], m))
    out_values = np.empty((len(queries), k), dtype=np.float64)
    out_indices = np.empty((len(queries), k), dtype=np.int64)
    unproven: list[IndexArray] = []
    product_dtype = torch.bfloat16 if index.precision == "bf16" else torch.float32
    buffer = torch.empty(buffer_rows * train_block, dtype=product_dtype)
    with torch.no_grad(), _full_float32_products():
        for q_start in range(0, len(queries), query_block):
            rows = slice(q_start, q_start + query_block)
            query = np.ascontiguousarray(queries[rows], dtype=np.float64)
            rounded = _rounded_queries(query, index.precision)
            bound = _error_bounds(index, query, rounded, precision=index.precision)
            approximate, candidates = _candidates(index, rounded, m, buffer)
            values, indices, proven = _rerank(index, query, approximate, candidates, bound, k)
            out_values[rows], out_indices[rows] = values, indices
            unproven.append(q_start + np.flatnonzero(~proven))
            release_pages(index.train)  # the re-ranking's random reads of a mapped train
        del buffer
        fallback = np.concatenate(unproven) if unproven else np.empty(0, dtype=np.int64)
        if len(fallback):
            query = np.ascontiguousarray(queries[fallback], dtype=np.float64)
            out_values[fallback], out_indices[fallback] = _full_rows(index, query, k)
            release_pages(index.train)
    return out_values, out_indices


def _mapped_query_rows(dims: int, m: int) -> int:
    """Queries searched together against a memory-mapped train: 1/16 of the budget (default
    256 MiB) over their float64 rows, rounded copy, error bounds and (m) candidates."""
    from oodprobe.arrays import budget_rows

    row_bytes = 8 * dims + 4 * dims + 64 * m
    return budget_rows(row_bytes, (256 << 20) // row_bytes, share=1 / 16)


def default_n_lists(n_train: int) -> int:
    """IVF lists: 4·√N, but at least 39 training points per list (faiss's k-means minimum)."""
    return max(1, min(int(4 * math.sqrt(n_train)), n_train // 39))


def build_faiss_index(
    train_unit: Float32Array, backend: str, *, n_lists: int | None, hnsw_m: int
) -> Any:
    """Build an approximate faiss index (inner product); the live index, which holds its own
    copy of the vectors (serialise it for a file with :func:`serialize_faiss_index`)."""
    import faiss

    dims = train_unit.shape[1]
    index: Any
    if backend == "faiss-ivf":
        lists = n_lists if n_lists is not None else default_n_lists(len(train_unit))
        quantizer = faiss.IndexFlatIP(dims)
        index = faiss.IndexIVFFlat(quantizer, dims, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(train_unit)
    elif backend == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(dims, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        raise InvalidParameterError(f"backend {backend!r} has no faiss index to build")
    index.add(train_unit)
    return index


def serialize_faiss_index(index: Any) -> npt.NDArray[np.uint8]:
    """A faiss index as bytes (faiss' own format, no pickle), for a detector file or a copy."""
    import faiss

    return np.asarray(faiss.serialize_index(index), dtype=np.uint8)


def load_faiss_index(index_bytes: npt.NDArray[np.uint8]) -> Any:
    """Deserialise a faiss index written by :func:`serialize_faiss_index`."""
    import faiss

    return faiss.deserialize_index(np.ascontiguousarray(index_bytes))


def faiss_search(
    index: Any,
    train_unit: Float32Array,
    query_unit: Float32Array,
    k: int,
    *,
    backend: str,
    n_probe: int,
    ef_search: int,
) -> tuple[Float32Array, IndexArray]:
    """Top-k inner products with faiss: brute force (``faiss``) or the given approximate index."""
    import faiss

    queries = np.ascontiguousarray(query_unit, dtype=np.float32)
    if backend == "faiss":
        values, indices = faiss.knn(queries, train_unit, k, metric=faiss.METRIC_INNER_PRODUCT)
    else:
        space = faiss.ParameterSpace()
        if backend == "faiss-ivf":
            space.set_index_parameter(index, "nprobe", n_probe)
        else:
            space.set_index_parameter(index, "efSearch", max(ef_search, k))
        values, indices = index.search(queries, k)
    if np.any(indices < 0):
        raise InvalidParameterError(
            f"backend {backend!r} found fewer than k={k} neighbours for some queries; "
            f"raise n_probe (now {n_probe}) or ef_search (now {ef_search})"
        )
    return np.asarray(values, np.float32), np.asarray(indices, np.int64)


def recall_at_k(
    approximate_indices: npt.ArrayLike, exact_indices: npt.ArrayLike, k: int | None = None
) -> float:
    """Share of the exact top-k that an approximate search found: mean of ``|A_k ∩ E_k| / k``.

    Both are (n_queries, >= k) train-row indices, nearest first (a detector's ``kneighbors``,
    :func:`exact_search`, faiss); ``k`` defaults to the width of ``exact_indices``. Index sets
    are compared (ann-benchmarks' recall without its distance epsilon): a returned row tied in
    similarity with the exact k-th but of another index counts as a miss, and so does faiss'
    ``-1`` (nothing found). Rows within one result are distinct, so counting the found ones
    that lie in the truth is the intersection; processed in blocks (k = 1000 fits).
    """
    approximate = np.asarray(approximate_indices)
    exact = np.asarray(exact_indices)
    if approximate.ndim != 2 or exact.ndim != 2 or len(approximate) != len(exact):
        raise InvalidParameterError(
            f"approximate_indices and exact_indices must be (n_queries, k) arrays with the same "
            f"number of rows, got shapes {approximate.shape} and {exact.shape}"
        )
    k = exact.shape[1] if k is None else k
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InvalidParameterError(f"k must be >= 1, got {k!r}")
    widest = min(approximate.shape[1], exact.shape[1])
    if k > widest:
        raise InvalidParameterError(
            f"k={k} is larger than the neighbours given ({approximate.shape[1]} approximate, "
            f"{exact.shape[1]} exact); pass k <= {widest}"
        )
    if len(exact) == 0:
        raise InvalidParameterError("recall_at_k needs at least one query, got 0")
    truth_all = exact[:, :k].astype(np.int64)
    found_all = approximate[:, :k].astype(np.int64)
    # row r's indices are shifted by r·width, so one np.isin compares each row only with itself
    width = int(max(truth_all.max(), found_all.max())) + 2
    hits = 0
    step = max(1, (1 << 22) // k)
    for start in range(0, len(exact), step):
        truth = truth_all[start : start + step]
        found = found_all[start : start + step]
        offset = (np.arange(len(truth), dtype=np.int64) * width)[:, None]
        hits += int(np.isin(np.where(found < 0, -1, found + offset), truth + offset).sum())
    return hits / (len(exact) * k)
