"""`oodprobe study`: one benchmark over many encoders, and how ID accuracy predicts OOD AUROC.

Adaloglou, Michels, Kaiser, Kollmann (TMLR 2024), claim 1: without fine-tuning, a pretrained
model's ID classification accuracy — the k-NN classifier with k = 20 and weights
``exp(cos / 0.02)`` — predicts its label-free OOD AUROC (1-NN cosine), R² ≥ 0.92 across CLIP
models. The authors fit it by hand per benchmark; here one run measures every encoder (features
cached, one model in memory at a time, blocks of one model served by one forward pass) and fits,
per detector and OOD target, ``AUROC = slope · accuracy + intercept`` by least squares
(``scipy.stats.linregress``), with R², Pearson's r and Spearman's ρ, and percentile-bootstrap
intervals that resample the *models* (the unit the claim generalises over). Claim 3 (linear
probing beats fine-tuning) is the LP-vs-FT table: a ``finetuned:PATH`` encoder beside its base.

Where this differs from the paper: the paper's R² is over CLIP models on full CIFAR/ImageNet
benchmarks; a study here ranges over whatever encoders and data it is given, and says how many
models each fit has. Fits with fewer than three models, or whose models all have one accuracy,
have no statistics (a note says why) instead of a meaningless R² of 1. Fine-tuned encoders are
left out of the fits (the claim concerns pretrained models; ``fit_excludes`` lists them) and
compared with their base in the LP-vs-FT table. Detectors an encoder cannot serve (logits or
text on an intermediate block) are left out for that encoder only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from oodprobe.benchmark import (
    KNN_ACCURACY_METHOD,
    BenchmarkExecution,
    BenchmarkRun,
    Log,
    execute_benchmark,
    finish_benchmark,
)
from oodprobe.benchmark_spec import BenchmarkSpec, DetectorSpec, validate
from oodprobe.errors import InvalidParameterError

PRIMARY_DETECTOR = "knn"
"""The paper's label-free detector: max cosine similarity to the ID training features (k = 1)."""

PROBE_DETECTOR = "linear-probe"
MIN_MODELS_FOR_FIT = 3
BAND_POINTS = 50


@dataclass
class StudyRun:
    """A finished study: the benchmark run behind it and the analysis (``study.json``)."""

    run: BenchmarkRun
    study: dict[str, Any]

    @property
    def files(self) -> dict[str, Path]:
        return self.run.files


def study_spec(spec: BenchmarkSpec, encoders: Sequence[str] | None = None) -> BenchmarkSpec:
    """The benchmark a study runs: its encoders and the detectors the analysis needs.

    Encoders: ``encoders`` if given, else the ``[study]`` table's, else the benchmark's; at
    least two. The paper's label-free k-NN detector (``knn``, k = 1) is added in front when the
    benchmark has no ``knn`` detector with its default parameters.
    """
    chosen = tuple(encoders or spec.study.encoders or spec.encoders)
    if len(chosen) < 2:
        raise InvalidParameterError(
            f"a study compares encoders and needs at least two, got {list(chosen)}; "
            f"pass them with -e A -e B … or list them in [study] encoders = [...]"
        )
    detectors = spec.detectors
    if _primary_index(detectors) is None:
        taken = {d.display for d in detectors}
        label = PRIMARY_DETECTOR if PRIMARY_DETECTOR not in taken else f"{PRIMARY_DETECTOR} (k=1)"
        detectors = (DetectorSpec(PRIMARY_DETECTOR, label=label), *detectors)
    return validate(replace(spec, encoders=chosen, detectors=detectors))


def _primary_index(detectors: Sequence[DetectorSpec]) -> int | None:
    from oodprobe.pipeline import detector_params

    default = detector_params(DetectorSpec(PRIMARY_DETECTOR))
    for index, detector in enumerate(detectors):
        if detector.name == PRIMARY_DETECTOR and detector_params(detector) == default:
            return index
    return None


def run_study(
    spec: BenchmarkSpec,
    output_dir: str | Path,
    *,
    encoders: Sequence[str] | None = None,
    cache_root: str | Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    download: bool = False,
    progress: bool = True,
    log: Log = lambda message: None,
    store_dtype: str = "float32",
    engine: str = "local",
    ray_address: str | None = None,
    memory_budget: int | str | None = None,
) -> StudyRun:
    """Run ``spec`` over every encoder, fit AUROC on accuracy, and write the study's files.

    Writes what ``bench`` writes (results, per-model tables, report) plus ``study.json``,
    ``study.csv``, ``study_fits.csv`` and the report's study section. With labelled ID data a
    linear probe is added (when the benchmark has none) for the probe's accuracy.
    ``store_dtype``, ``engine`` and ``ray_address`` are those of
    :func:`oodprobe.features.extract_features` (with engine ray, ``device`` is the Ray actors').
    ``memory_budget`` is :func:`oodprobe.benchmark.run_benchmark`'s (checked before any work).
    """
    from oodprobe.arrays import memory_budget as budget_scope
    from oodprobe.arrays import parse_memory_budget

    budget = parse_memory_budget(memory_budget)
    spec = study_spec(spec, encoders)
    probe = (
        ()
        if any(d.name == PROBE_DETECTOR for d in spec.detectors)
        else (DetectorSpec(PROBE_DETECTOR),)
    )
    with budget_scope(budget):
        execution = execute_benchmark(
            spec,
            output_dir,
            cache_root=cache_root,
            device=device,
            precision=precision,
            batch_size=batch_size,
            num_workers=num_workers,
            download=download,
            progress=progress,
            log=log,
            detectors_if_labelled=probe,
            skip_inapplicable=True,  # e.g. a logits detector beside intermediate blocks
            require_accuracy=True,
            store_dtype=store_dtype,
            engine=engine,
            ray_address=ray_address,
        )
    study = analyse(execution)
    return StudyRun(finish_benchmark(execution, study=study), study)


# --------------------------------------------------------------------------------------------
# analysis: rows of a finished run → models, fits, ranking, LP vs FT


def analyse(execution: BenchmarkExecution) -> dict[str, Any]:
    """The study document (``study.json``) of an executed benchmark; see the module docstring."""
    spec = execution.spec
    detectors = ordered_detectors(execution)
    primary = detectors[0]
    targets = ood_targets(spec)
    models = [_model_entry(execution, record, detectors, targets) for record in execution.encoders]
    fits = []
    kinds = ["knn"] + (["probe"] * any(m["probe_accuracy"] is not None for m in models))
    # claim 1 is about pretrained models: a fine-tuned one is compared with its base instead
    pretrained = [model for model in models if model["base"] is None]
    for detector in detectors:
        for target in [label for label, _ in targets]:
            for kind in kinds:
                points = [
                    {
                        "encoder": model["encoder"],
                        "accuracy": model[f"{kind}_accuracy"],
                        "auroc": model["auroc"][detector][target],
                    }
                    for model in pretrained
                    if model[f"{kind}_accuracy"] is not None
                    and model["auroc"][detector][target] is not None
                ]
                fits.append(
                    {
                        "detector": detector,
                        "target": target,
                        "accuracy": kind,
                        **fit_statistics(
                            [p["accuracy"] for p in points],
                            [p["auroc"] for p in points],
                            bootstrap=spec.study.bootstrap,
                            confidence=spec.study.confidence,
                            seed=spec.seed,
                        ),
                        "points": points,
                    }
                )
    ranking_target = "mean"
    return {
        "name": spec.name,
        "benchmark": spec.name,
        "accuracy_method": KNN_ACCURACY_METHOD,
        "primary_detector": primary,
        "detectors": detectors,
        "targets": [label for label, _ in targets],
        "bootstrap": spec.study.bootstrap,
        "confidence": spec.study.confidence,
        "seed": spec.seed,
        "models": models,
        "fits": fits,
        "ranking": rank_models(models, primary, ranking_target),
        "ranking_by": f"mean AUROC of {primary} over all OOD sets, then k-NN accuracy",
        "fit_excludes": [model["encoder"] for model in models if model["base"] is not None],
        "lp_vs_ft": lp_vs_ft(models, detectors, classifier_msp_pair(spec)),
    }


def ordered_detectors(execution: BenchmarkExecution) -> list[str]:
    """Detector display names, the paper's label-free k-NN first."""
    detectors = list(execution.spec.detectors)
    extra = [
        row.context.detector
        for row in execution.rows
        if row.context.detector not in {d.display for d in detectors}
    ]
    index = _primary_index(detectors)
    assert index is not None  # study_spec added it
    names = [d.display for d in detectors]
    names.insert(0, names.pop(index))
    return names + list(dict.fromkeys(extra))


def ood_targets(spec: BenchmarkSpec) -> list[tuple[str, list[str]]]:
    """(target label, OOD sets it averages): each set, then near and far means, then all."""
    targets = [(ood.label, [ood.label]) for ood in spec.ood]
    for group in ("near", "far"):
        members = [ood.label for ood in spec.ood if ood.group == group]
        if len(members) > 1:  # a group of one set is that set
            targets.append((f"{group} mean", members))
    if len(spec.ood) > 1:
        targets.append(("mean", [ood.label for ood in spec.ood]))
    else:
        targets.append(("mean", [spec.ood[0].label]))
    return targets


def _model_entry(
    execution: BenchmarkExecution,
    record: Any,
    detectors: list[str],
    targets: list[tuple[str, list[str]]],
) -> dict[str, Any]:
    def accuracy(method: str) -> float | None:
        for entry in execution.id_accuracy:
            if entry["encoder"] == record.name and entry["method"] == method:
                return float(entry["accuracy"])
        return None

    probe_label = next(
        (d.display for d in execution.spec.detectors if d.name == PROBE_DETECTOR), PROBE_DETECTOR
    )
    metrics: dict[str, dict[str, dict[str, float | None]]] = {"auroc": {}, "fpr": {}}
    for detector in detectors:
        per_set = {
            row.ood_set: row.metrics
            for row in execution.rows
            if row.context.encoder == record.name and row.context.detector == detector
        }
        for metric, table in metrics.items():
            table[detector] = {
                label: _mean([per_set.get(member, {}).get(metric) for member in members])
                for label, members in targets
            }
    return {
        "encoder": record.name,
        "base": record.base,
        "shared_pass": record.shared_pass,
        "cache_id": record.cache_id,
        "knn_accuracy": accuracy(KNN_ACCURACY_METHOD),
        "probe_accuracy": accuracy(probe_label),
        "head_accuracy": record.head_accuracy,
        **metrics,
    }


def _mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values, or None if any is missing (a failed detector, a NaN)."""
    if not values or any(v is None or not np.isfinite(v) for v in values):
        return None
    return float(np.mean([float(v) for v in values if v is not None]))


def fit_statistics(
    accuracy: Sequence[float],
    auroc: Sequence[float],
    *,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Least-squares fit of AUROC on accuracy across models, with percentile-bootstrap CIs.

    Returns ``n_models``, ``slope``, ``intercept``, ``r2``, ``pearson``, ``spearman`` (from
    ``scipy.stats.linregress`` and ``spearmanr``), ``*_ci`` = [low, high] at ``confidence``
    from ``bootstrap`` resamples of the models with replacement (resamples whose models all
    have one accuracy are dropped: their line is undefined), ``band`` = the same percentile band
    of the fitted line on a grid over the observed accuracies, and ``note``. With fewer than
    three models or a single accuracy value the statistics are None and ``note`` says why.
    """
    from scipy import stats

    x = np.asarray(accuracy, dtype=np.float64)
    y = np.asarray(auroc, dtype=np.float64)
    empty: dict[str, Any] = {
        "n_models": len(x),
        **dict.fromkeys(["slope", "intercept", "r2", "pearson", "spearman"]),
        **dict.fromkeys(["slope_ci", "intercept_ci", "r2_ci", "pearson_ci", "spearman_ci"]),
        "band": None,
        "n_bootstrap_used": 0,
        "note": None,
    }
    if len(x) < MIN_MODELS_FOR_FIT:
        return {**empty, "note": f"needs at least {MIN_MODELS_FOR_FIT} models, has {len(x)}"}
    if np.ptp(x) == 0:
        return {**empty, "note": "every model has the same accuracy: the line is undefined"}
    line = stats.linregress(x, y)
    constant_auroc = np.ptp(y) == 0
    result = {
        **empty,
        "slope": float(line.slope),
        "intercept": float(line.intercept),
        "r2": None if constant_auroc else float(line.rvalue**2),
        "pearson": None if constant_auroc else float(line.rvalue),
        "spearman": None if constant_auroc else float(stats.spearmanr(x, y).statistic),
        "note": "every model has the same AUROC" if constant_auroc else None,
    }
    if bootstrap == 0:
        return result
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(x), size=(bootstrap, len(x)))
    xs, ys = x[picks], y[picks]
    keep = np.ptp(xs, axis=1) > 0
    xs, ys = xs[keep], ys[keep]
    if len(xs) == 0:
        return result
    slopes, intercepts, pearsons = _least_squares_rows(xs, ys)
    ranks_x = stats.rankdata(xs, axis=1)
    ranks_y = stats.rankdata(ys, axis=1)
    spearmans = _least_squares_rows(ranks_x, ranks_y)[2]
    low, high = 50 * (1 - confidence), 50 * (1 + confidence)

    def interval(values: np.ndarray) -> list[float] | None:
        finite = values[np.isfinite(values)]
        if len(finite) == 0:
            return None
        return [float(v) for v in np.percentile(finite, [low, high])]

    grid = np.linspace(x.min(), x.max(), BAND_POINTS)
    lines = intercepts[:, None] + slopes[:, None] * grid[None, :]
    result.update(
        slope_ci=interval(slopes),
        intercept_ci=interval(intercepts),
        r2_ci=None if constant_auroc else interval(pearsons**2),
        pearson_ci=None if constant_auroc else interval(pearsons),
        spearman_ci=None if constant_auroc else interval(spearmans),
        band={
            "x": grid.tolist(),
            "low": np.percentile(lines, low, axis=0).tolist(),
            "high": np.percentile(lines, high, axis=0).tolist(),
        },
        n_bootstrap_used=len(xs),
    )
    return result


def _least_squares_rows(
    xs: np.ndarray, ys: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slope, intercept and Pearson r of each row's (x, y) points; r is NaN for constant y."""
    dx = xs - xs.mean(axis=1, keepdims=True)
    dy = ys - ys.mean(axis=1, keepdims=True)
    sxx = np.sum(dx * dx, axis=1)
    syy = np.sum(dy * dy, axis=1)
    sxy = np.sum(dx * dy, axis=1)
    slopes = sxy / sxx
    intercepts = ys.mean(axis=1) - slopes * xs.mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        pearsons = np.clip(sxy / np.sqrt(sxx * syy), -1.0, 1.0)
    return slopes, intercepts, pearsons


def rank_models(models: list[dict[str, Any]], detector: str, target: str) -> list[dict[str, Any]]:
    """Models by the detector's AUROC on ``target`` (best first), then k-NN accuracy."""

    def key(model: dict[str, Any]) -> tuple[float, float]:
        auroc = model["auroc"][detector][target]
        accuracy = model["knn_accuracy"]
        return (
            -auroc if auroc is not None else np.inf,
            -accuracy if accuracy is not None else np.inf,
        )

    ordered = sorted(models, key=key)
    return [
        {
            "rank": rank,
            "encoder": model["encoder"],
            "knn_accuracy": model["knn_accuracy"],
            "probe_accuracy": model["probe_accuracy"],
            "primary_auroc": model["auroc"][detector][target],
            "score": model["auroc"][detector][target],
        }
        for rank, model in enumerate(ordered, start=1)
    ]


def lp_vs_ft(
    models: list[dict[str, Any]],
    detectors: list[str],
    classifier_pair: tuple[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Each fine-tuned encoder beside its base, per detector (the paper's LP-vs-FT table).

    LP is the base's frozen features with a linear probe (its accuracy is the probe's); FT the
    fine-tuned encoder (its accuracy is the fine-tuned head's). Each detector runs on both
    feature sets; AUROC and FPR are the means over all OOD sets. ``classifier_pair`` = (the
    probe's MSP detector, the head's MSP detector) adds the paper's headline row: MSP of the
    linear probe on the frozen base against MSP of the fine-tuned model's own head.
    """
    by_name = {_canonical(model["encoder"]): model for model in models}
    table = []
    for model in models:
        base = by_name.get(_canonical(model["base"])) if model["base"] else None
        if base is None:
            continue
        pairs = [(detector, detector, detector) for detector in detectors]
        if classifier_pair is not None:
            probe, head = classifier_pair
            pairs.insert(0, (f"MSP (LP: {probe}, FT: {head})", probe, head))
        for label, lp_detector, ft_detector in pairs:
            table.append(
                {
                    "base": base["encoder"],
                    "finetuned": model["encoder"],
                    "detector": label,
                    "lp_accuracy": base["probe_accuracy"],
                    "ft_accuracy": model["head_accuracy"],
                    "lp_auroc": base["auroc"][lp_detector]["mean"],
                    "ft_auroc": model["auroc"][ft_detector]["mean"],
                    "lp_fpr": base["fpr"][lp_detector]["mean"],
                    "ft_fpr": model["fpr"][ft_detector]["mean"],
                    "target": "mean",
                }
            )
    return table


def _canonical(name: str) -> str:
    """One spelling per encoder (``efficientnet-lite0@224`` is ``efficientnet-lite0``)."""
    from oodprobe.encoders import parse_encoder_name
    from oodprobe.errors import OodprobeError

    try:
        return parse_encoder_name(name).canonical
    except OodprobeError:
        return name


def classifier_msp_pair(spec: BenchmarkSpec) -> tuple[str, str] | None:
    """(linear probe scored by MSP, classifier logits scored by MSP) of the spec, if both exist."""
    from oodprobe.pipeline import detector_params

    def first(name: str) -> str | None:
        return next(
            (
                d.display
                for d in spec.detectors
                if d.name == name and detector_params(d).get("score") == "msp"
            ),
            None,
        )

    probe, head = first(PROBE_DETECTOR), first("logits")
    return None if probe is None or head is None else (probe, head)
