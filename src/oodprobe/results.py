"""Typed result rows: one (encoder, detector, OOD set) measurement, built in one place.

A row is built from a :class:`~oodprobe.metrics.MetricResult` by :func:`metric_row`, or from a
failure by :func:`failed_rows`; ``as_dict()`` is the flat JSON/CSV record the report renders
(keys :data:`oodprobe.report.model.MAIN_ROW_KEYS` first). Reading a metric by attribute name
keeps the row and the metric result from drifting apart (the empty-FPR bug of an earlier version
came from a dict key that the metric result did not have).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oodprobe.metrics import MetricConvention, MetricResult

METRIC_NAMES: tuple[str, ...] = ("auroc", "fpr", "aupr_in", "aupr_out")
"""Metric columns; ``fpr`` is the FPR at the row's ``tpr`` in the row's named convention."""


@dataclass(frozen=True)
class RowContext:
    """What every row of one encoder × detector shares: who measured what, on which data."""

    encoder: str
    encoder_cache_id: str
    encoder_weights_sha256: str | None
    detector: str
    detector_name: str
    detector_params: dict[str, Any]
    id_train: str
    id_test: str
    id_train_fingerprint: str
    id_test_fingerprint: str
    n_train: int
    device: str
    precision: str
    prompts: str | list[str] | None = None
    class_names: list[str] | None = None


@dataclass(frozen=True)
class ResultRow:
    """One result: metrics (None when the detector failed, with ``error`` saying why)."""

    context: RowContext
    ood_set: str
    group: str
    ood_fingerprint: str
    convention: str
    tpr: float
    fpr_positive: str
    fpr_rule: str
    aupr_method: str
    bootstrap: int
    n_id: int | None = None
    n_ood: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    fit_seconds: float | None = None
    score_seconds: float | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The flat record of ``results.json`` / ``results.csv``."""
        context = asdict(self.context)
        text_only = {"prompts", "class_names"}
        record: dict[str, Any] = {
            key: value
            for key, value in context.items()
            if key not in text_only or value is not None
        }
        record.update(
            ood_set=self.ood_set,
            group=self.group,
            ood_fingerprint=self.ood_fingerprint,
            convention=self.convention,
            tpr=self.tpr,
            fpr_positive=self.fpr_positive,
            fpr_rule=self.fpr_rule,
            aupr_method=self.aupr_method,
            bootstrap=self.bootstrap,
            n_id=self.n_id,
            n_ood=self.n_ood,
            fit_seconds=self.fit_seconds,
            score_seconds=self.score_seconds,
            error=self.error,
        )
        for name in METRIC_NAMES:
            record[name] = self.metrics.get(name)
            low, high = self.intervals.get(name, (None, None))
            record[f"{name}_low"], record[f"{name}_high"] = low, high
        return record


def _convention_fields(convention: MetricConvention, tpr: float, bootstrap: int) -> dict[str, Any]:
    return {
        "convention": convention.name,
        "tpr": tpr,
        "fpr_positive": convention.positive,
        "fpr_rule": convention.rule,
        "aupr_method": convention.aupr_method,
        "bootstrap": bootstrap,
    }


def metric_row(
    context: RowContext,
    *,
    ood_set: str,
    group: str,
    ood_fingerprint: str,
    result: MetricResult,
    fit_seconds: float,
    score_seconds: float,
) -> ResultRow:
    """The row of one OOD set, read from the metric result's attributes."""
    return ResultRow(
        context=context,
        ood_set=ood_set,
        group=group,
        ood_fingerprint=ood_fingerprint,
        **_convention_fields(result.convention, result.tpr, result.bootstrap),
        n_id=result.n_id,
        n_ood=result.n_ood,
        metrics={name: float(getattr(result, name)) for name in METRIC_NAMES},
        intervals={name: tuple(bounds) for name, bounds in result.intervals.items()},  # type: ignore[misc]
        fit_seconds=round(fit_seconds, 4),
        score_seconds=round(score_seconds, 4),
    )


def failed_rows(
    context: RowContext,
    *,
    ood_sets: list[tuple[str, str, str]],
    convention: MetricConvention,
    tpr: float,
    bootstrap: int,
    error: str,
) -> list[ResultRow]:
    """One row per ``(name, group, fingerprint)`` OOD set for a detector that failed."""
    return [
        ResultRow(
            context=context,
            ood_set=name,
            group=group,
            ood_fingerprint=fingerprint,
            **_convention_fields(convention, tpr, bootstrap),
            error=error,
        )
        for name, group, fingerprint in ood_sets
    ]
