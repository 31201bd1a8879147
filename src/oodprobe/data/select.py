"""Choosing images from a dataset: class selections, seeded per-class samples, limits, splits."""

from __future__ import annotations

import copy
import math
import numbers
import re
from collections.abc import Sequence

import numpy as np

from oodprobe.data.arrays import sample_per_class, stable_keys
from oodprobe.data.base import ImageDataset
from oodprobe.errors import DataError, InvalidParameterError


def parse_class_selection(text: str) -> list[int | str]:
    """Parse a CLI class selection: ``"0-4,7"`` → ``[0, 1, 2, 3, 4, 7]``; names stay strings.

    Parts are separated by commas; ``A-B`` (both integers) is an inclusive range; anything else
    is a class name (``"T-shirt/top"``, ``"cat"``). Duplicates are dropped, order kept.
    """
    selection: list[int | str] = []
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part for part in parts):
        raise InvalidParameterError(
            f"class selection must be comma-separated indices, ranges or names "
            f"like '0-4,7', got {text!r}"
        )
    for part in parts:
        span = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if part.isdigit():
            selection.append(int(part))
        elif span:
            first, last = int(span[1]), int(span[2])
            if first > last:
                raise InvalidParameterError(
                    f"class range must go up, got {part!r} in {text!r}; write {last}-{first}"
                )
            selection.extend(range(first, last + 1))
        else:
            selection.append(part)
    return list(dict.fromkeys(selection))


def format_class_selection(indices: Sequence[int]) -> str:
    """Compact form of class indices: ``[0, 1, 2, 3, 4, 7]`` → ``"0-4,7"``."""
    ordered = sorted(set(int(i) for i in indices))
    parts: list[str] = []
    start = 0
    for position in range(1, len(ordered) + 1):
        if position == len(ordered) or ordered[position] != ordered[position - 1] + 1:
            first, last = ordered[start], ordered[position - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = position
    return ",".join(parts)


def _resolve_classes(dataset: ImageDataset, classes: Sequence[int | str]) -> list[int]:
    if dataset.labels is None:
        raise InvalidParameterError(
            f"classes={list(classes)!r} needs labels, but {dataset.name!r} is unlabelled; "
            "use a class-per-subfolder folder or a file list with labels"
        )
    names = dataset.class_names
    n_classes = len(names) if names else int(dataset.labels.max(initial=-1)) + 1

    def normal(text: str) -> str:
        return text.replace("_", " ").casefold().strip()

    lookup = {normal(name): index for index, name in enumerate(names or ())}
    resolved: list[int] = []
    for item in classes:
        if isinstance(item, str) and names and item in names:
            resolved.append(names.index(item))
        elif isinstance(item, str) and normal(item) in lookup:
            resolved.append(lookup[normal(item)])
        elif (isinstance(item, str) and item.strip().isdigit()) or (
            isinstance(item, int | np.integer) and not isinstance(item, bool)
        ):
            resolved.append(int(item))
        else:
            shown = ", ".join(names[:30]) + (", …" if len(names) > 30 else "") if names else ""
            raise InvalidParameterError(
                f"unknown class {item!r} in {dataset.name!r}; choose an index 0-{n_classes - 1}"
                + (f" or a name: {shown}" if shown else "")
            )
        if not 0 <= resolved[-1] < n_classes:
            raise InvalidParameterError(
                f"class index {resolved[-1]} is out of range for {dataset.name!r}, "
                f"which has classes 0-{n_classes - 1}"
            )
    return list(dict.fromkeys(resolved))


def _positive(value: int | None, what: str) -> None:
    if value is not None and (
        not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1
    ):
        raise InvalidParameterError(f"{what} must be a positive integer, got {value!r}")


def select_images(
    dataset: ImageDataset,
    *,
    classes: Sequence[int | str] | None = None,
    per_class: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    name: str | None = None,
) -> ImageDataset:
    """Keep some classes, then a seeded ``per_class`` sample of each, then the first ``limit``.

    Kept images keep their original labels and the dataset's full ``class_names``: selecting
    classes 5-9 gives labels 5-9, not 0-4. Order is always the dataset's. Classes with fewer than
    ``per_class`` images keep all of theirs. The result's ``name`` records the selection, e.g.
    ``fashion-mnist:test[0-4] 100/class``.
    """
    _positive(per_class, "per_class")
    _positive(limit, "limit")
    label = dataset.name if name is None else name
    indices = np.arange(len(dataset), dtype=np.int64)
    if classes is not None:
        kept = _resolve_classes(dataset, classes)
        assert dataset.labels is not None
        indices = indices[np.isin(dataset.labels, kept)]
        label += f"[{format_class_selection(kept)}]"
    if per_class is not None:
        if dataset.labels is None:
            raise InvalidParameterError(
                f"per_class={per_class} needs labels, but {dataset.name!r} is unlabelled; "
                "use limit instead"
            )
        indices = indices[sample_per_class(dataset.labels[indices], per_class, seed)]
        label += f" {per_class}/class" + (f" seed {seed}" if seed else "")
    if limit is not None and limit < len(indices):
        indices = indices[:limit]
        label += f" first {limit}"
    if len(indices) == len(dataset):
        if label == dataset.name:
            return dataset
        renamed = copy.copy(dataset)  # shallow: the caller's dataset keeps its name
        renamed.name = label
        return renamed
    if len(indices) == 0:
        raise DataError(f"the selection left no images of {dataset.name!r} ({label})")
    selected = dataset.subset(indices)
    selected.name = label
    return selected


def _test_count(n_images: int, test_fraction: float) -> int:
    """``round(n * test_fraction)`` (halves up) within ``1 .. n - 1``: both parts get one."""
    return min(max(math.floor(n_images * test_fraction + 0.5), 1), n_images - 1)


def split_dataset(
    dataset: ImageDataset, test_fraction: float, *, seed: int = 0
) -> tuple[ImageDataset, ImageDataset]:
    """Split ``dataset`` into disjoint ``(train, test)`` parts, seeded and stratified by label.

    Labelled: each class of ``n >= 2`` images gives ``round(n * test_fraction)`` of them (halves
    round up), but at least 1 and at most ``n - 1``, to ``test``, so every such class has images
    in both parts; a class of a single image goes to ``train`` only (``test`` then lacks that
    class). Unlabelled: the same rule over the whole dataset; a dataset of fewer than 2 images
    is a DataError. Which images go to ``test`` depends only on ``seed`` and the labels
    (SplitMix64 keys, the same on every platform and NumPy version), so a split is reproducible
    and its cached features are reused. Both parts keep the dataset's order, labels (original
    indices) and class names; together they hold every image once. What the dataset's scan left
    out (``scan_skipped``) is listed once, with ``train``. Names record the split, e.g.
    ``pets (train, test_fraction=0.2, seed=0)``.
    """
    if (
        not isinstance(test_fraction, numbers.Real)
        or isinstance(test_fraction, bool)
        or not 0.0 < float(test_fraction) < 1.0
    ):
        raise InvalidParameterError(
            f"test_fraction must be a number between 0 and 1 (both excluded), got {test_fraction!r}"
        )
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise InvalidParameterError(f"seed must be an integer, got {seed!r}")
    fraction, seed = float(test_fraction), int(seed)
    n_images = len(dataset)
    if n_images < 2:
        raise DataError(
            f"cannot split {dataset.name!r} into train and test: it has {n_images} image(s), "
            "at least 2 are needed"
        )
    keys = stable_keys(n_images, seed, salt=3)
    groups = (
        [np.arange(n_images)]
        if dataset.labels is None
        else [np.flatnonzero(dataset.labels == label) for label in np.unique(dataset.labels)]
    )
    is_test = np.zeros(n_images, dtype=bool)
    for members in groups:
        if len(members) >= 2:
            order = members[np.argsort(keys[members], kind="stable")]
            is_test[order[: _test_count(len(members), fraction)]] = True
    described = f"test_fraction={fraction:g}, seed={seed}"
    train = dataset.subset(np.flatnonzero(~is_test))
    test = dataset.subset(np.flatnonzero(is_test))
    train.name = f"{dataset.name} (train, {described})"
    test.name = f"{dataset.name} (test, {described})"
    train.scan_skipped, test.scan_skipped = dataset.scan_skipped, ()
    return train, test
