"""Array aliases and the validation every detector and metric shares."""

from __future__ import annotations

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


def row_blocks(n_rows: int, block_rows: int) -> Iterator[slice]:
    """Consecutive slices of at most ``block_rows`` rows covering ``range(n_rows)``.

    The one row-block loop of the package: every pass over (n, D) data that makes temporaries
    per row goes through it, so temporaries stay O(block_rows · D) whatever n is.
    """
    step = max(1, int(block_rows))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


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
    for rows in row_blocks(len(array), rows_per_block(array[0].size, 1 << 21)):
        block = np.asarray(array[rows], dtype=np.float64)
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
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
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
    elif not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    # in row blocks: a full-size boolean temporary would cost n × D bytes (768 MB at 1M × 768)
    blocks = row_blocks(len(array), rows_per_block(array.shape[1]))
    if not all(np.isfinite(array[rows]).all() for rows in blocks):
        bad = int(np.count_nonzero(~np.isfinite(array).all(axis=1)))
        raise InvalidParameterError(f"{name} contains NaN or inf in {bad} row(s)")
    return array


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
