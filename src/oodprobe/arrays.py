"""Array aliases, the validation every detector and metric shares, and memory budgets.

Memory-mapped inputs (``np.memmap``, ``np.load(..., mmap_mode="r")``) are read in row blocks:
:func:`row_blocks` with ``release=array`` hands each block's pages back to the kernel once the
block is done (``madvise(MADV_DONTNEED)`` on a shared mapping: the data stay in the page
cache, but no longer count in the process's resident set), so a pass over a 7.7 GB file keeps
the RSS of one block. A peak-memory budget (:func:`memory_budget`, parsed by
:func:`parse_memory_budget`) sets the block sizes of the streamed passes.
"""

from __future__ import annotations

import contextlib
import contextvars
import mmap
import re
import warnings
from collections.abc import Iterator
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from oodprobe.errors import InvalidParameterError

Features: TypeAlias = npt.NDArray[np.floating[Any]]
"""(n_samples, n_dims) float array of image or text features."""
Labels: TypeAlias = npt.NDArray[np.integer[Any]]
"""(n_samples,) integer class indices."""
Scores: TypeAlias = npt.NDArray[np.float64]
"""(n_samples,) scores; higher = more in-distribution."""


def row_blocks(
    n_rows: int, block_rows: int, *, release: npt.NDArray[Any] | None = None
) -> Iterator[slice]:
    """Consecutive slices of at most ``block_rows`` rows covering ``range(n_rows)``.

    The one row-block loop of the package: every pass over (n, D) data that makes temporaries
    per row goes through it, so temporaries stay O(block_rows · D) whatever n is. With
    ``release`` (the array the slices index), the pages of each block of a memory-mapped array
    are released when the loop moves on (:func:`release_pages`): resident memory stays one
    block whatever the file's size.
    """
    step = max(1, int(block_rows))
    for start in range(0, n_rows, step):
        rows = slice(start, min(start + step, n_rows))
        try:
            yield rows
        finally:
            if release is not None:
                release_pages(release, rows)


# -- memory-mapped arrays ---------------------------------------------------------------------


def _mapping_of(array: npt.NDArray[Any]) -> mmap.mmap | None:
    """The shared ``mmap`` under ``array`` (through its ``base`` chain), or None.

    None for a private (copy-on-write, ``mode="c"``) mapping: releasing its pages would drop
    the array's own modifications. Only a chain that passes an ``np.memmap`` with a known mode
    counts, so a foreign buffer is never advised.
    """
    mode: str | None = None
    node: Any = array
    for _ in range(64):
        if isinstance(node, mmap.mmap):
            return node if mode in ("r", "r+", "w+") else None
        if mode is None and isinstance(node, np.memmap):
            mode = getattr(node, "mode", None)
        node = getattr(node, "base", None)
        if node is None:
            return None
    return None


def is_memory_mapped(array: Any) -> bool:
    """Whether ``array`` is (a view of) a shared memory-mapped file (``np.memmap``)."""
    return isinstance(array, np.ndarray) and _mapping_of(array) is not None


def release_pages(array: npt.NDArray[Any], rows: slice | None = None) -> None:
    """Drop the resident pages of ``array[rows]`` (all rows by default) if it is memory-mapped.

    ``madvise(MADV_DONTNEED)`` on a shared file mapping unmaps the pages from this process
    (dirty ones stay in the page cache and are written back); the next read faults them in
    again from the cache. Values never change. A no-op for in-memory arrays and elsewhere than
    Linux-like systems.
    """
    mapping = _mapping_of(array) if isinstance(array, np.ndarray) else None
    if mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    part = array if rows is None else array[rows]
    if part.size == 0:
        return
    low, high = np.lib.array_utils.byte_bounds(part)
    start = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
    first = (low - start) // mmap.PAGESIZE * mmap.PAGESIZE
    length = min(high - start, len(mapping)) - first
    if first >= 0 and length > 0:
        with contextlib.suppress(OSError, ValueError):
            mapping.madvise(mmap.MADV_DONTNEED, first, length)


_GATHER_ROWS = 256  # rows gathered from a mapped array between two releases of its pages


def take_rows(array: npt.NDArray[Any], indices: npt.ArrayLike) -> npt.NDArray[Any]:
    """``array[indices]`` (any index shape), a new in-memory array; from a memory-mapped array
    in runs of 256 rows, its pages released after each run.

    A random row read from a mapped file maps far more than the row: the kernel's fault-around
    and read-around map the neighbouring cached pages too (measured: ~220 KB of resident file
    pages per 3 KB row), so gathering 10k rows at once would hold ~2 GB.
    """
    positions = np.asarray(indices)
    if not is_memory_mapped(array):
        return np.asarray(array[positions])
    flat = positions.reshape(-1)
    out = np.empty((len(flat), *array.shape[1:]), dtype=array.dtype)
    for start in range(0, len(flat), _GATHER_ROWS):
        part = flat[start : start + _GATHER_ROWS]
        out[start : start + len(part)] = array[part]
        release_pages(array)
    return out.reshape(*positions.shape, *array.shape[1:])


# -- the memory budget ------------------------------------------------------------------------

_BUDGET: contextvars.ContextVar[int | None] = contextvars.ContextVar("memory_budget", default=None)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
MIN_MEMORY_BUDGET = 64 << 20
"""The smallest budget accepted (64 MiB): below it the fixed costs (D × D matrices, one
similarity block) alone exceed it."""


def parse_memory_budget(value: Any, *, name: str = "memory_budget") -> int | None:
    """Bytes of a peak-memory budget: an integer, or a string such as ``"4GiB"``, ``"512MB"``.

    Units: B, kB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of 1024), any case; a
    plain number is bytes. ``None`` (or ``"none"``) means no budget. Raises
    InvalidParameterError naming the value and the accepted forms; refuses less than 64 MiB.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
        return None
    number: float | None = None
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        number = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match and unit in _UNITS:
            number = float(match.group(1)) * _UNITS[unit]
    if number is None:
        raise InvalidParameterError(
            f"{name} must be a number of bytes or a size such as '4GiB', '512MB' or '2G', got "
            f"{value!r}"
        )
    if number < MIN_MEMORY_BUDGET:
        raise InvalidParameterError(
            f"{name} must be at least 64MiB, got {value!r} ({int(number)} bytes); raise it"
        )
    return int(number)


@contextlib.contextmanager
def memory_budget(value: Any) -> Iterator[int | None]:
    """Within the block, streamed passes size their blocks to stay within ``value`` bytes.

    ``value`` as :func:`parse_memory_budget` takes it (``None``: no budget, today's block
    sizes). What it bounds is the working memory of fitting and scoring *beyond* the inputs'
    own memory: with memory-mapped inputs, the process's peak RSS.
    """
    token = _BUDGET.set(parse_memory_budget(value))
    try:
        yield _BUDGET.get()
    finally:
        _BUDGET.reset(token)


def current_memory_budget() -> int | None:
    """The budget in bytes set by the innermost :func:`memory_budget`, or None."""
    return _BUDGET.get()


def budget_rows(row_bytes: int, default_rows: int, *, share: float = 0.125) -> int:
    """Rows per block: ``default_rows``, fewer when ``share`` of the budget cannot hold them.

    ``row_bytes`` is what one row of a block costs in all its temporaries (e.g. 3 float64
    copies of a D-wide row: ``24 · D``). Blocks take at most ``share`` of the budget (the rest
    is left to the detector's fixed state and the caller's arrays).
    """
    budget = current_memory_budget()
    if budget is None:
        return max(1, int(default_rows))
    return max(1, min(int(default_rows), int(budget * share) // max(1, int(row_bytes))))


def rows_per_block(width: int, elements: int = 1 << 24) -> int:
    """Rows of width ``width`` that fit in ``elements`` values (at least 1)."""
    return max(1, elements // max(1, int(width)))


def l2_normalize(
    features: npt.ArrayLike, eps: float = 1e-12, *, dtype: npt.DTypeLike | None = None
) -> Features:
    """Return rows scaled to unit L2 norm (rows of zeros stay zero). Input is not modified.

    Norms and quotients are computed in float64 per row block; the result has ``dtype``
    (default: the input's float dtype, float32 for integer input).
    """
    array = np.asarray(features)
    if dtype is None:
        dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else np.float32
    if array.ndim < 2:  # one vector
        vector = array.astype(np.float64)
        return np.asarray(vector / max(float(np.linalg.norm(vector)), eps), dtype=dtype)
    unit = np.empty(array.shape, dtype=dtype)
    for rows in row_blocks(len(array), rows_per_block(array[0].size, 1 << 21), release=array):
        block = float64_rows(array, rows)
        unit[rows] = block / np.maximum(np.linalg.norm(block, axis=-1, keepdims=True), eps)
    return unit


def check_features(
    features: npt.ArrayLike,
    *,
    name: str = "features",
    n_dims: int | None = None,
    min_samples: int = 1,
    dtype: npt.DTypeLike | None = None,
) -> Features:
    """Validate a (n_samples, n_dims) finite float array and return it (never a modified input).

    Raises InvalidParameterError naming the problem and the value received.
    """
    array = np.asarray(features)
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.floating)
        or np.issubdtype(array.dtype, np.integer)
        or is_bfloat16(array.dtype)
    ):
        raise InvalidParameterError(f"{name} must be a numeric array, got dtype {array.dtype}")
    if array.ndim != 2:
        raise InvalidParameterError(
            f"{name} must be 2-D (n_samples, n_dims), got shape {array.shape}"
        )
    if array.shape[0] < min_samples:
        raise InvalidParameterError(
            f"{name} needs at least {min_samples} sample(s), got {array.shape[0]}"
        )
    if array.shape[1] == 0:
        raise InvalidParameterError(f"{name} has 0 dimensions, got shape {array.shape}")
    if n_dims is not None and array.shape[1] != n_dims:
        raise InvalidParameterError(
            f"{name} has {array.shape[1]} dimensions but the detector was fitted on {n_dims}"
        )
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    elif not (np.issubdtype(array.dtype, np.floating) or is_bfloat16(array.dtype)):
        array = array.astype(np.float32)
    # in row blocks (and, memory-mapped, releasing each block's pages): a full-size boolean
    # temporary would cost n × D bytes (768 MB at 1M × 768), a mapped file its size in RSS
    step = rows_per_block(array.shape[1])
    bad = 0
    for rows in row_blocks(len(array), step, release=array):
        finite = np.isfinite(array[rows])
        if not finite.all():
            bad += int(np.count_nonzero(~finite.all(axis=1)))
    if bad:
        raise InvalidParameterError(f"{name} contains NaN or inf in {bad} row(s)")
    return array


def float64_rows(array: npt.NDArray[Any], rows: slice) -> npt.NDArray[np.float64]:
    """A new float64 copy of ``array[rows]`` (callers may edit it in place).

    float16 and bfloat16 rows are widened by torch's vectorised conversion (measured ~4x
    faster than numpy's scalar float16 loop: 3.7 vs 14 ns a value), the values being exact.
    """
    block = array[rows]
    if block.dtype == np.float16 or is_bfloat16(block.dtype):
        import torch

        with warnings.catch_warnings():  # a read-only (memory-mapped) block: only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            source = torch.from_numpy(np.ascontiguousarray(block).view(np.int16))
        source = source.view(torch.float16 if block.dtype == np.float16 else torch.bfloat16)
        out = np.empty(block.shape, dtype=np.float64)
        torch.from_numpy(out).copy_(source)
        return out
    return np.array(block, dtype=np.float64)


def bfloat16_as_float32(values: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """bfloat16 values (``ml_dtypes.bfloat16``, or their uint16 bit patterns) as float32: the
    same upper 16 bits, exact for every bit pattern (NaN payloads too, which a float cast may
    change), with one temporary of the block and no "invalid value" warning."""
    bits = np.ascontiguousarray(values).view(np.uint16).astype(np.uint32)
    bits <<= 16
    return bits.view(np.float32)


def is_bfloat16(dtype: npt.DTypeLike) -> bool:
    """Whether ``dtype`` is ``ml_dtypes.bfloat16`` (a float numpy does not class as floating)."""
    return np.dtype(dtype).name == "bfloat16"


def check_labels(labels: npt.ArrayLike, n_samples: int, *, min_classes: int = 2) -> Labels:
    """Validate integer class labels of length n_samples with at least min_classes classes."""
    array = np.asarray(labels)
    if array.ndim != 1:
        raise InvalidParameterError(f"labels must be 1-D, got shape {array.shape}")
    if array.shape[0] != n_samples:
        raise InvalidParameterError(
            f"labels has {array.shape[0]} entries but features has {n_samples} rows"
        )
    if not np.issubdtype(array.dtype, np.integer):
        if np.issubdtype(array.dtype, np.floating) and np.all(np.mod(array, 1) == 0):
            array = array.astype(np.int64)
        else:
            raise InvalidParameterError(f"labels must be integers, got dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise InvalidParameterError(f"labels must be >= 0, got {int(array.min())}")
    n_classes = len(np.unique(array))
    if n_classes < min_classes:
        raise InvalidParameterError(
            f"labels must contain at least {min_classes} classes, got {n_classes}"
        )
    return array.astype(np.int64, copy=False)
