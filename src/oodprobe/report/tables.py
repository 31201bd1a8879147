"""Arrange result rows into per-encoder tables (detectors x OOD sets) and format numbers.

Only arranges and averages numbers the benchmark already computed: near/far means are plain
means of the per-set values, and "best" is the max AUROC / min FPR of a column.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "EncoderTable",
    "TableCell",
    "build_tables",
    "compact_json",
    "csv_cell",
    "format_ci",
    "format_percent",
    "fpr_label",
    "jsonable",
    "md_escape",
]

GROUP_ORDER = ("near", "far")
METRICS = ("auroc", "fpr", "aupr_in")
HIGHER_IS_BETTER = {"auroc": True, "fpr": False, "aupr_in": True, "aupr_out": True}


def as_float(value: Any) -> float | None:
    """The value as a finite float, or None for None, NaN, infinities and non-numbers."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def format_percent(value: Any) -> str:
    """A fraction in [0, 1] as a percentage with one decimal (``0.9512`` -> ``95.1``); ``–``."""
    number = as_float(value)
    return "–" if number is None else f"{100.0 * number:.1f}"


def format_ci(low: Any, high: Any) -> str:
    """``[94.2, 96.0]`` from fractional bounds, or an empty string when either is missing."""
    if as_float(low) is None or as_float(high) is None:
        return ""
    return f"[{format_percent(low)}, {format_percent(high)}]"


def fpr_label(tpr: Any) -> str:
    """``FPR@95`` for a TPR of 0.95 (``FPR@90`` for 0.9); ``FPR@95`` when unknown."""
    number = as_float(tpr)
    return f"FPR@{round(100.0 * (0.95 if number is None else number), 6):g}"


def jsonable(value: Any) -> Any:
    """A JSON-safe copy: numpy scalars/arrays to Python, tuples to lists, NaN/inf to None."""
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [jsonable(item) for item in items]
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars and arrays
        return jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def compact_json(value: Any) -> str:
    """Compact, key-sorted JSON of ``value`` (for CSV cells and small HTML annotations)."""
    return json.dumps(jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def csv_cell(value: Any) -> str:
    """A CSV cell: '' for None/NaN, compact JSON for dicts/lists, ``repr``-exact floats."""
    value = jsonable(value)
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return compact_json(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def md_escape(text: str) -> str:
    """Text safe inside a Markdown table cell.

    Pipes and newlines would break the row; ``<`` would open raw HTML in most renderers.
    """
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "\\<").replace("\n", " ")


def ordered_unique(values: Iterable[str]) -> list[str]:
    """Distinct values in order of first appearance."""
    return list(dict.fromkeys(values))


@dataclass(frozen=True)
class TableCell:
    """One metric of one detector on one column (an OOD set or a near/far mean)."""

    value: float | None
    low: float | None = None
    high: float | None = None
    best: bool = False


@dataclass(frozen=True)
class EncoderTable:
    """Detectors (rows) x columns (OOD sets, then near/far means) for one encoder.

    ``cells[detector][(column, metric)]`` with metric ``auroc``, ``fpr`` or ``aupr_in``;
    ``groups[column]`` is ``near``/``far``/``""`` for OOD sets and ``mean`` for the mean columns.
    """

    encoder: str
    detectors: list[str]
    params: dict[str, Any]
    columns: list[str]
    groups: dict[str, str]
    cells: dict[str, dict[tuple[str, str], TableCell]]


def ordered_sets(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """OOD set names: near sets first, then far, then ungrouped, each in order of appearance."""
    groups = {str(row["ood_set"]): str(row.get("group") or "") for row in rows}
    rank = {name: GROUP_ORDER.index(g) if g in GROUP_ORDER else 2 for name, g in groups.items()}
    return sorted(groups, key=lambda name: rank[name])  # stable: keeps order of appearance


def _mark_best(cells: dict[str, dict[tuple[str, str], TableCell]], key: tuple[str, str]) -> None:
    """Flag the best value of one column (ties all flagged) when at least two detectors have one."""
    present = {det: cell.value for det, row in cells.items() if (cell := row.get(key))}
    values = {det: v for det, v in present.items() if v is not None}
    if len(values) < 2:
        return
    pick = max if HIGHER_IS_BETTER[key[1]] else min
    best = pick(values.values())
    for det, value in values.items():
        if math.isclose(value, best, rel_tol=0.0, abs_tol=1e-12):
            old = cells[det][key]
            cells[det][key] = TableCell(old.value, old.low, old.high, best=True)


def build_tables(rows: Sequence[Mapping[str, Any]]) -> list[EncoderTable]:
    """One :class:`EncoderTable` per encoder, in order of first appearance in ``rows``."""
    tables = []
    for encoder in ordered_unique(str(row["encoder"]) for row in rows):
        mine = [row for row in rows if str(row["encoder"]) == encoder]
        detectors = ordered_unique(str(row["detector"]) for row in mine)
        params: dict[str, Any] = {}
        for row in mine:
            params.setdefault(str(row["detector"]), row.get("detector_params") or {})
        sets = ordered_sets(mine)
        groups = {str(row["ood_set"]): str(row.get("group") or "") for row in mine}
        cells: dict[str, dict[tuple[str, str], TableCell]] = {det: {} for det in detectors}
        for row in mine:
            for metric in METRICS:
                cells[str(row["detector"])][(str(row["ood_set"]), metric)] = TableCell(
                    as_float(row.get(metric)),
                    as_float(row.get(f"{metric}_low")),
                    as_float(row.get(f"{metric}_high")),
                )
        columns = list(sets)
        for group in GROUP_ORDER:
            members = [name for name in sets if groups[name] == group]
            if not members:
                continue
            column = f"{group} mean"
            columns.append(column)
            groups[column] = "mean"
            for det in detectors:
                for metric in METRICS:
                    values = [cells[det].get((name, metric)) for name in members]
                    numbers = [c.value for c in values if c is not None and c.value is not None]
                    complete = len(numbers) == len(members)
                    mean = sum(numbers) / len(numbers) if complete else None
                    cells[det][(column, metric)] = TableCell(mean)
        for column in columns:
            for metric in METRICS:
                _mark_best(cells, (column, metric))
        tables.append(EncoderTable(encoder, detectors, params, columns, groups, cells))
    return tables


def mean_auroc(table: EncoderTable, detector: str) -> float | None:
    """Mean AUROC of ``detector`` over all OOD sets of ``table`` (None if any is missing)."""
    sets = [c for c in table.columns if table.groups[c] != "mean"]
    values = [table.cells[detector].get((name, "auroc")) for name in sets]
    numbers = [c.value for c in values if c is not None and c.value is not None]
    return sum(numbers) / len(numbers) if numbers and len(numbers) == len(sets) else None
