"""Choosing images from a dataset: class selections, seeded per-class samples, limits."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import numpy as np

from oodprobe.data.arrays import sample_per_class
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
