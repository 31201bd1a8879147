"""Run a benchmark: extract (cached) → fit each detector once → score every OOD set → metrics.

This is where encoders and detectors meet: detectors see arrays, the runner feeds them the
features (or logits) of each encoder, class embeddings for text detectors, the classifier head
for the post-hoc detectors (the encoder's, stored with its features; a probe fitted on the ID
training features; or a zero-shot head), and labels for the detectors that need them.
Encoders are built one at a time and released before the next, so a study over several large
models holds one in memory. A detector that fails becomes rows with its error and the run goes
on. Files are written by :mod:`oodprobe.benchmark_outputs`.
"""

from __future__ import annotations

import gc
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from oodprobe.benchmark_outputs import (
    DetectorOutcome,
    Split,
    check_output_folder,
    provenance,
    write_outputs,
    write_scores,
)
from oodprobe.benchmark_spec import BenchmarkSpec, DataSpec, DetectorSpec, validate
from oodprobe.errors import DataError, OodprobeError
from oodprobe.pipeline import (
    TextArrays,
    build_detector,
    check_compatibility,
    compute_text_arrays,
    detector_input,
    detector_params,
    fit_labels,
    id_class_names,
    needs_text,
    require_class_names,
)
from oodprobe.results import ResultRow, RowContext, failed_rows, metric_row

Log = Callable[[str], None]

KNN_CLASSIFIER_K = 20
KNN_CLASSIFIER_TEMPERATURE = 0.02
"""The paper's k-NN classifier of ID accuracy (Adaloglou et al., TMLR 2024): k = 20 neighbours,
weights ``exp(cos / 0.02)``."""
KNN_ACCURACY_METHOD = f"knn classifier (k={KNN_CLASSIFIER_K}, T={KNN_CLASSIFIER_TEMPERATURE})"


@dataclass
class BenchmarkRun:
    """What a run produced: result rows, ID accuracies, and where the files are."""

    spec: BenchmarkSpec
    rows: list[ResultRow]
    id_accuracy: list[dict[str, Any]]
    output_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = "cpu"
    precision: str = "fp32"
    skipped: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def records(self) -> list[dict[str, Any]]:
        """The rows as flat dicts (what results.json holds)."""
        return [row.as_dict() for row in self.rows]


def create_data(data: DataSpec, role: str, download: bool) -> Any:
    """Build one dataset of the spec; a data error names the role it plays in the benchmark."""
    try:
        return data.create(download)
    except DataError as error:
        raise DataError(f"{role} {data.label!r}: {error}") from error


def create_id_sets(spec: BenchmarkSpec, download: bool) -> tuple[Any, Any]:
    """The ID training and test sets; one folder split by ``test_fraction`` is read once."""
    if spec.id_train.test_fraction is not None and spec.id_train.split_of(spec.id_test):
        try:
            return spec.id_train.create_split(download)
        except DataError as error:
            raise DataError(f"ID images {spec.id_train.source!r}: {error}") from error
    return (
        create_data(spec.id_train, "ID training set", download),
        create_data(spec.id_test, "ID test set", download),
    )


def _warn_on_overlap(data: dict[str, tuple[DataSpec, Any, str]]) -> None:
    """An OOD set with the same images as the ID test or training set measures nothing."""
    for role, (ood_spec, _, fingerprint) in data.items():
        if not role.startswith("ood:"):
            continue
        for id_role, what in (("id_test", "ID test set"), ("id_train", "ID training set")):
            id_spec, _, id_fingerprint = data[id_role]
            if fingerprint == id_fingerprint:
                warnings.warn(
                    f"OOD set {ood_spec.label!r} holds the same images as the {what} "
                    f"{id_spec.label!r}: its AUROC will be about 0.5; check the [[ood]] source",
                    stacklevel=3,
                )


def run_benchmark(
    spec: BenchmarkSpec,
    output_dir: str | Path,
    *,
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
) -> BenchmarkRun:
    """Run every encoder × detector × OOD set of ``spec``; write results and the report.

    ``store_dtype``, ``engine`` and ``ray_address`` are those of
    :func:`oodprobe.features.extract_features` (with engine ray, ``device`` is the Ray actors').
    ``memory_budget`` (bytes, or a size such as ``"4GiB"``; checked before any work) bounds the
    working memory of fitting and scoring: block sizes follow it, and k-NN keeps a normalised
    ID set larger than a quarter of it on disk (:func:`oodprobe.arrays.memory_budget`).
    """
    from oodprobe.arrays import memory_budget as budget_scope
    from oodprobe.arrays import parse_memory_budget

    with budget_scope(parse_memory_budget(memory_budget)):
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
            store_dtype=store_dtype,
            engine=engine,
            ray_address=ray_address,
        )
    return finish_benchmark(execution)


@dataclass
class EncoderRecord:
    """One encoder of a run: its identity, and which forward pass gave its features.

    ``shared_pass`` names the extraction the encoder's features came from: encoders with the
    same one (blocks of one model at one input size) were served by a single forward pass per
    image, ``output`` being the array of that pass that holds this encoder's features. ``base``
    is the encoder a fine-tuned one started from; ``head_accuracy`` the ID test accuracy of a
    fine-tuned encoder's own classification head.
    """

    name: str
    cache_id: str
    weights_sha256: str | None
    shared_pass: str
    output: str
    base: str | None = None
    head_accuracy: float | None = None


@dataclass
class BenchmarkExecution:
    """A finished run before its files are written (what ``study`` adds its analysis to)."""

    spec: BenchmarkSpec
    output_dir: Path
    rows: list[ResultRow]
    id_accuracy: list[dict[str, Any]]
    outcomes: list[DetectorOutcome]
    encoders: list[EncoderRecord]
    data: dict[str, tuple[DataSpec, Any, str]]
    skipped: dict[str, list[Any]]
    seconds: float
    device: str
    precision: str
    mined: list[dict[str, Any]] = field(default_factory=list)


def finish_benchmark(
    execution: BenchmarkExecution, *, study: dict[str, Any] | None = None
) -> BenchmarkRun:
    """Write the files of an executed run (with a study's analysis, when given)."""
    run = BenchmarkRun(
        execution.spec,
        execution.rows,
        execution.id_accuracy,
        execution.output_dir,
        seconds=execution.seconds,
        device=execution.device,
        precision=execution.precision,
        skipped=execution.skipped,
    )
    run.files = write_outputs(
        execution.spec,
        execution.output_dir,
        execution.rows,
        execution.id_accuracy,
        execution.outcomes,
        provenance(
            execution.spec,
            execution.data,
            seconds=execution.seconds,
            device=execution.device,
            precision=execution.precision,
        ),
        study=study,
        mined=execution.mined,
        id_train=execution.data["id_train"][1],
    )
    return run


def shared_passes(encoder_names: Sequence[str]) -> list[list[str]]:
    """Group encoder names that one forward pass serves, in the order they first appear."""
    from oodprobe.encoders import shared_pass_key

    groups: dict[str, list[str]] = {}
    for name in encoder_names:
        groups.setdefault(shared_pass_key(name), []).append(name)
    return list(groups.values())


def execute_benchmark(
    spec: BenchmarkSpec,
    output_dir: str | Path,
    *,
    cache_root: str | Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    download: bool = False,
    progress: bool = True,
    log: Log = lambda message: None,
    detectors_if_labelled: Sequence[DetectorSpec] = (),
    skip_inapplicable: bool = False,
    require_accuracy: bool = False,
    store_dtype: str = "float32",
    engine: str = "local",
    ray_address: str | None = None,
) -> BenchmarkExecution:
    """Extract, fit, score and measure; write the per-detector score files, not the report.

    Encoders that are blocks of one model at one input size share one forward pass per image
    (:func:`shared_passes`); each pass's model is built, used and released before the next.
    ``detectors_if_labelled`` join the spec's when the ID training set has labels (the study's
    linear probe); the returned execution's spec lists them. With ``skip_inapplicable`` a
    detector an encoder cannot serve (logits or text on an intermediate block) is left out for
    that encoder, and logged, instead of stopping the run; one no encoder can serve still
    stops it. ``require_accuracy`` refuses, before any extraction, ID data on which the k-NN
    classifier's accuracy cannot be measured (no labels, fewer than k = 20 training images).
    ``store_dtype``, ``engine`` and ``ray_address`` are :func:`run_benchmark`'s; with engine ray
    the text embeddings are computed here, on this machine's ``auto`` device.
    """
    from oodprobe.encoders import create_encoder, create_shared_encoder, shared_pass_key
    from oodprobe.encoders.base import TappedEncoder
    from oodprobe.features import check_engine, resolve_precision, run_device, storage_dtype

    started = time.perf_counter()
    # every check that needs no image runs first: device, precision, compatibility by name
    output = Path(output_dir)
    check_output_folder(output)
    storage_dtype(store_dtype)
    check_engine(engine, ray_address)
    torch_device = run_device(device, engine, ray_address)
    resolved_precision = resolve_precision(precision, torch_device)
    id_train, id_test = create_id_sets(spec, download)
    datasets = {
        "id_train": (spec.id_train, id_train),
        "id_test": (spec.id_test, id_test),
        **{f"ood:{ood.label}": (ood, create_data(ood, "OOD set", download)) for ood in spec.ood},
    }
    labelled = datasets["id_train"][1].labels is not None
    if labelled and detectors_if_labelled:
        spec = validate(replace(spec, detectors=(*spec.detectors, *detectors_if_labelled)))
    if require_accuracy:
        _check_accuracy_measurable(spec, datasets["id_train"][1], datasets["id_test"][1])

    def applicable(name: str, encoder: Any, quiet: bool = False) -> list[DetectorSpec]:
        """The detectors ``encoder`` (None: judged by its name) can serve."""
        return _applicable_detectors(
            spec, name, encoder, labelled, skip_inapplicable, (lambda _: None) if quiet else log
        )

    by_name = {name: applicable(name, None, quiet=True) for name in spec.encoders}
    for detector in spec.detectors:  # one that no encoder can serve is a mistake in the spec
        if not any(detector in served for served in by_name.values()):
            check_compatibility(
                [detector],
                labelled=labelled,
                id_label=spec.id_train.label,
                encoders=dict.fromkeys(spec.encoders),
            )
    if needs_text([d for served in by_name.values() for d in served]) and spec.mining is None:
        require_class_names(id_class_names(spec.class_names, id_train))  # before any model
    passes = shared_passes(spec.encoders)
    # fingerprints once per data set per run (a stat per file)
    data = {role: (s, d, d.fingerprint()) for role, (s, d) in datasets.items()}
    _warn_on_overlap(data)
    output.mkdir(parents=True, exist_ok=True)
    rows: list[ResultRow] = []
    id_accuracy: list[dict[str, Any]] = []
    outcomes: list[DetectorOutcome] = []
    records: list[EncoderRecord] = []
    skipped: dict[str, list[Any]] = {}
    mined: list[dict[str, Any]] = []

    def extract(role: str, encoder: Any, outputs: dict[str, str]) -> dict[str, Split]:
        """Each encoder's features of one data set: one pass, each cached in its own entry."""
        from oodprobe.features import extract_features, extract_shared_features

        data_spec, dataset, fingerprint = data[role]
        options: dict[str, Any] = {
            "batch_size": batch_size,
            "num_workers": num_workers,
            "device": device,
            "precision": precision,
            "cache_root": cache_root,
            "progress": progress,
            "store_dtype": store_dtype,
            "engine": engine,
            "ray_address": ray_address,
        }
        if len(outputs) == 1:
            (name,) = outputs
            per_name = {name: extract_features(dataset, encoder, **options)}
        else:
            per_name = extract_shared_features(dataset, encoder, outputs, **options)
        features = next(iter(per_name.values()))
        origin = (
            "cache" if features.from_cache else f"{features.stats['images_per_second']:.0f} img/s"
        )
        log(
            f"  {data_spec.label}: {len(features)} images ({origin})"
            + (f", {len(features.skipped)} skipped" if features.skipped else "")
        )
        if features.skipped:
            skipped.setdefault(data_spec.label, features.skipped)
        return {name: Split(data_spec, dataset, f, fingerprint) for name, f in per_name.items()}

    for pass_index, names in enumerate(passes, start=1):
        shown = names[0] if len(names) == 1 else f"{', '.join(names)} (one forward pass)"
        log(f"[{shown}] loading ({pass_index}/{len(passes)})")
        if len(names) == 1:
            encoder = create_encoder(names[0])
            outputs = {names[0]: "features"}
        else:
            encoder, outputs = create_shared_encoder(names)
        served = {
            name: applicable(name, encoder if outputs[name] == "features" else None)
            for name in names
        }
        log(f"[{shown}] extracting features")
        splits = [extract(role, encoder, outputs) for role in data]
        class_embeddings = None
        if needs_text([d for ds in served.values() for d in ds]):  # final-layer encoders only
            names_of_classes = id_class_names(spec.class_names, id_train)
            final = next(name for name in names if outputs[name] == "features")
            final_train = splits[0][final]
            class_embeddings = compute_text_arrays(
                encoder,
                names_of_classes,
                spec.prompts,
                [d for ds in served.values() for d in ds],
                cache_root=cache_root,
                progress=progress,
                mining=spec.mining,
                train=final_train.features,
                # extraction handed the encoder back on the CPU; Ray's device is the actors'
                device=device if engine == "local" else "auto",
            )
            if class_embeddings.mined is not None:
                record_of_mining = mined_record(final, encoder, class_embeddings, final_train)
                mined.append(record_of_mining)
                log(f"[{final}] mined class names: {', '.join(class_embeddings.class_names)}")
        for name in names:
            output_key = outputs[name]
            train, test, *oods = (per_name[name] for per_name in splits)
            record = EncoderRecord(
                name=name,
                cache_id=(
                    encoder.variant_cache_id(output_key)
                    if isinstance(encoder, TappedEncoder)
                    else encoder.cache_id
                ),
                weights_sha256=encoder.weights_digest,
                shared_pass=shared_pass_key(name),
                output=output_key,
                base=getattr(encoder, "base_name", None),
            )
            if train.features.labels is not None and test.features.labels is not None:
                if len(train.features) >= KNN_CLASSIFIER_K:
                    id_accuracy.append(_knn_accuracy(name, train, test))
                else:
                    log(
                        f"[{name}] no k-NN accuracy: {len(train.features)} training images, "
                        f"fewer than k = {KNN_CLASSIFIER_K}"
                    )
                record.head_accuracy = _head_accuracy(encoder, test)
            records.append(record)
            for detector_spec in served[name]:
                log(f"[{name}] {detector_spec.display}")
                context = _row_context(
                    spec, detector_spec, record, train, test, str(torch_device), resolved_precision
                )
                if class_embeddings is not None and context.class_names is not None:
                    context = replace(context, class_names=list(class_embeddings.class_names))
                outcome = _evaluate_detector(
                    spec, detector_spec, context, encoder, class_embeddings, train, test, oods, log
                )
                rows.extend(outcome.rows)
                if outcome.accuracy is not None:
                    id_accuracy.append(
                        {
                            "encoder": name,
                            "method": detector_spec.display,
                            "accuracy": outcome.accuracy,
                        }
                    )
                outcomes.append(outcome)
                write_scores(output, outcome)
        del encoder
        _free_memory()
    return BenchmarkExecution(
        spec=spec,
        output_dir=output,
        rows=rows,
        id_accuracy=id_accuracy,
        outcomes=outcomes,
        encoders=records,
        data=data,
        skipped=skipped,
        seconds=time.perf_counter() - started,
        device=str(torch_device),
        precision=resolved_precision,
        mined=mined,
    )


MINED_EXAMPLES = 8  # training images shown per mined cluster: the nearest to its centre


def mined_record(encoder_name: str, encoder: Any, text: TextArrays, train: Split) -> dict[str, Any]:
    """What a run records of mined class names: per cluster its names with their scores and
    agreement, its size, and the training images nearest its centre (for the report)."""
    from oodprobe.pipeline import joint_embeddings

    mined = text.mined
    assert mined is not None  # the caller records mined names only
    joint = joint_embeddings(encoder, train.features.features)
    clusters = []
    for cluster, names in enumerate(mined.cluster_names()):
        members = np.flatnonzero(mined.assignments == cluster)
        similarity = joint[members] @ mined.centers[cluster]
        nearest = members[np.argsort(-similarity, kind="stable")[:MINED_EXAMPLES]]
        entries = np.flatnonzero(mined.clusters == cluster)
        clusters.append(
            {
                "cluster": cluster,
                "size": int(mined.cluster_sizes[cluster]),
                "names": names,
                "scores": [float(mined.scores[i]) for i in entries],
                "agreement": [float(mined.agreement[i]) for i in entries],
                "examples": [
                    {
                        "index": int(train.features.indices[row]),
                        "source": train.dataset.describe(int(train.features.indices[row])),
                        "similarity": float(joint[row] @ mined.centers[cluster]),
                    }
                    for row in nearest
                ],
            }
        )
    return {"encoder": encoder_name, "class_names": list(text.class_names), "clusters": clusters}


def _head_accuracy(encoder: Any, test: Split) -> float | None:
    """ID test accuracy of a fine-tuned encoder's own head, or None.

    The head's column i is the label ``encoder.classes[i]`` of its training set (fine-tuning
    keeps the classes present, in label order). None when the encoder has no such head, or
    when the ID test labels are not among those classes (a model fine-tuned on other data).
    """
    logits = test.features.logits
    classes = getattr(encoder, "classes", None)
    if getattr(encoder, "base_name", None) is None or logits is None or classes is None:
        return None
    labels = test.features.labels
    assert labels is not None  # the caller checked
    classes = np.asarray(classes)
    if len(classes) != logits.shape[1] or not np.isin(labels, classes).all():
        return None
    return float(np.mean(classes[np.argmax(logits, axis=1)] == labels))


def _applicable_detectors(
    spec: BenchmarkSpec,
    name: str,
    encoder: Any,
    labelled: bool,
    skip: bool,
    log: Log,
) -> list[DetectorSpec]:
    """The spec's detectors that encoder ``name`` can serve (``encoder`` None: by its name).

    Without ``skip`` the first that it cannot serve raises; with it, each is logged and left out.
    """
    if not skip:
        check_compatibility(
            spec.detectors,
            labelled=labelled,
            id_label=spec.id_train.label,
            encoders={name: encoder},
        )
        return list(spec.detectors)
    served = []
    for detector in spec.detectors:
        try:
            check_compatibility(
                [detector],
                labelled=labelled,
                id_label=spec.id_train.label,
                encoders={name: encoder},
            )
        except OodprobeError as error:
            log(f"[{name}] {detector.display}: not applicable ({error})")
            continue
        served.append(detector)
    return served


def _check_accuracy_measurable(spec: BenchmarkSpec, id_train: Any, id_test: Any) -> None:
    """DataError unless the k-NN classifier's ID accuracy can be measured on this data."""
    for role, dataset in (("training", id_train), ("test", id_test)):
        if dataset.labels is None:
            raise DataError(
                f"a study measures ID accuracy, and the ID {role} set {dataset.name!r} has no "
                f"labels; use folders with one subfolder per class (or a labelled dataset)"
            )
    if len(id_train) < KNN_CLASSIFIER_K:
        raise DataError(
            f"a study measures ID accuracy with the k-NN classifier (k = {KNN_CLASSIFIER_K}), "
            f"and the ID training set {id_train.name!r} has {len(id_train)} images; give it at "
            f"least {KNN_CLASSIFIER_K}"
        )


def _free_memory() -> None:
    """Collect a released encoder now (host and GPU), before the next one is built.

    Extraction already returned it to the device it was built on; the caller drops its last
    reference first.
    """
    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _knn_accuracy(encoder_name: str, train: Split, test: Split) -> dict[str, Any]:
    from oodprobe.detectors.neighbors import knn_accuracy

    assert train.features.labels is not None and test.features.labels is not None  # caller's
    accuracy = knn_accuracy(
        train.features.features,
        train.features.labels,
        test.features.features,
        test.features.labels,
        k=KNN_CLASSIFIER_K,
        temperature=KNN_CLASSIFIER_TEMPERATURE,
    )
    return {
        "encoder": encoder_name,
        "method": KNN_ACCURACY_METHOD,
        "accuracy": float(accuracy),
    }


def _row_context(
    spec: BenchmarkSpec,
    detector_spec: DetectorSpec,
    encoder: EncoderRecord,
    train: Split,
    test: Split,
    device: str,
    precision: str,
) -> RowContext:
    text = needs_text([detector_spec])  # text detectors and zero-shot heads record their prompts
    return RowContext(
        encoder=encoder.name,
        encoder_cache_id=encoder.cache_id,
        encoder_weights_sha256=encoder.weights_sha256,
        detector=detector_spec.display,
        detector_name=detector_spec.name,
        detector_params=detector_params(detector_spec),
        id_train=spec.id_train.label,
        id_test=spec.id_test.label,
        id_train_fingerprint=train.fingerprint,
        id_test_fingerprint=test.fingerprint,
        n_train=len(train.features),
        device=device,
        precision=precision,
        prompts=(spec.prompts if isinstance(spec.prompts, str) else list(spec.prompts))
        if text
        else None,
        class_names=list(spec.class_names or train.dataset.class_names or []) if text else None,
    )


def _evaluate_detector(
    spec: BenchmarkSpec,
    detector_spec: DetectorSpec,
    context: RowContext,
    encoder: Any,
    class_embeddings: TextArrays | None,
    train: Split,
    test: Split,
    oods: list[Split],
    log: Log,
) -> DetectorOutcome:
    """Fit, score and measure one detector; a failure becomes rows with its error."""
    from oodprobe.metrics import evaluate, get_convention

    convention = get_convention(spec.convention)
    try:
        detector = build_detector(detector_spec, encoder, class_embeddings, train=train.features)
        fit_started = time.perf_counter()
        labels = fit_labels(detector, detector_spec, train.features.labels)
        detector.fit(detector_input(detector, train.features), labels)
        fit_seconds = time.perf_counter() - fit_started
        score_started = time.perf_counter()
        id_scores = detector.score_samples(detector_input(detector, test.features))
        ood_scores = {
            ood.spec.label: detector.score_samples(detector_input(detector, ood.features))
            for ood in oods
        }
        score_seconds = time.perf_counter() - score_started
        accuracy = None
        if hasattr(detector, "predict") and test.features.labels is not None and labels is not None:
            predictions = detector.predict(detector_input(detector, test.features))
            accuracy = float(np.mean(predictions == test.features.labels))
        rows = [
            metric_row(
                context,
                ood_set=ood.spec.label,
                group=ood.spec.group,
                ood_fingerprint=ood.fingerprint,
                result=evaluate(
                    id_scores,
                    ood_scores[ood.spec.label],
                    convention=convention,
                    tpr=spec.tpr,
                    bootstrap=spec.bootstrap,
                    seed=spec.seed,
                ),
                fit_seconds=fit_seconds,
                score_seconds=score_seconds,
            )
            for ood in oods
        ]
    except Exception as error:  # one failing detector must not lose the rest of the run
        message = (
            str(error) if isinstance(error, OodprobeError) else (f"{type(error).__name__}: {error}")
        )
        warnings.warn(f"detector {detector_spec.display!r} failed: {message}", stacklevel=2)
        log(f"  failed: {message}")
        rows = failed_rows(
            context,
            ood_sets=[(o.spec.label, o.spec.group, o.fingerprint) for o in oods],
            convention=convention,
            tpr=spec.tpr,
            bootstrap=spec.bootstrap,
            error=message,
        )
        return DetectorOutcome(context.encoder, detector_spec.display, rows, test, oods)
    return DetectorOutcome(
        context.encoder,
        detector_spec.display,
        rows,
        test,
        oods,
        id_scores=id_scores,
        ood_scores=ood_scores,
        accuracy=accuracy,
    )
