"""Run an attack over a benchmark spec: fit, attack per batch (resumable), evaluate saved PNGs.

:func:`run_attack` wires the attack core (:mod:`oodprobe.attack`) to a benchmark spec the way
``bench`` does: the ID training and test sets and the OOD set come from the spec, the encoder
is the spec's first (or a chosen one, or a deployment file's), and the attacked detector is
fitted on the cached ID training features (or loaded from a deployment file). The first ``n``
images of the OOD set are attacked per batch; every finished batch is saved at once
(``batches/<attack>/<NNNN>/``: lossless PNGs, float tensors, ``batch.json`` last, as the
batch's completion mark), so a killed run keeps its finished batches and a rerun with the same
parameters attacks only the rest. Random draws are seeded per (seed, image position), so the
resumed run's numbers equal one whole run's. Evaluation reads the saved PNGs back (what a
deployment would see): AUROC / FPR of ID test vs clean and vs attacked OOD per budget, the
perturbation sizes, the success rate at a threshold, the removed-targets evaluation of the
feature-matching attack, and the class-score SVM (Uelwer, Michels, De Candido, KI 2021) on the
encoder's logits, trained on half of the images and evaluated on the other half.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from oodprobe.attack import PGD_STEPS, check_int, check_number, input_array_of
from oodprobe.errors import InvalidParameterError

if TYPE_CHECKING:
    from oodprobe.benchmark_spec import BenchmarkSpec, DetectorSpec

__all__ = ["METHODS", "AttackRun", "parse_eps", "run_attack"]

Log = Callable[[str], None]

METHODS = ("pgd", "feature-matching")
TARGET_MODES = ("random", "nearest")
SMOOTHNESS_NAMES = ("smooth", "patchy")
DEFAULT_STEPS = {"pgd": PGD_STEPS, "feature-matching": 250}
ATTACK_FORMAT = "oodprobe-attack"
ATTACK_VERSION = 1
RUN_FILE = "run.json"
RESULT_FILE = "attack.json"
BATCH_FILE = "batch.json"
SVM_MIN_IMAGES = 4


@dataclass
class AttackRun:
    """What :func:`run_attack` produced: the content of ``attack.json`` and where files are."""

    output_dir: Path
    summary: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    batches_resumed: int = 0

    @property
    def results(self) -> list[dict[str, Any]]:
        """One entry per attack (per budget ε for PGD; one for feature matching)."""
        return list(self.summary["results"])


def parse_eps(value: Any) -> float:
    """A budget from ``"4/255"``, ``"0.03"`` or a number; InvalidParameterError otherwise."""
    if isinstance(value, bool):
        raise InvalidParameterError(f"eps must be a number such as 4/255 or 0.0157, got {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            raise InvalidParameterError(
                f"eps must be a number such as 4/255 or 0.0157, got {value!r}"
            ) from None
    else:
        raise InvalidParameterError(f"eps must be a number such as 4/255 or 0.0157, got {value!r}")
    if not math.isfinite(number) or number <= 0:
        raise InvalidParameterError(f"eps must be a finite number > 0 (e.g. 4/255), got {value!r}")
    return number


# -- validation -----------------------------------------------------------------------------


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InvalidParameterError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _smoothness(value: Any) -> float:
    from oodprobe.attack import SMOOTHNESS

    if isinstance(value, str):
        _check_choice("smoothness", value, SMOOTHNESS_NAMES)
        return SMOOTHNESS[value]
    try:
        return check_number("smoothness", value, low=0)
    except InvalidParameterError:
        raise InvalidParameterError(
            f"smoothness must be smooth (λ = 5e3), patchy (λ = 0) or a number >= 0, got {value!r}"
        ) from None


def _budgets(eps: Any, norm: str) -> list[float]:
    values = [eps] if isinstance(eps, (str, int, float)) else list(eps)
    if not values:
        raise InvalidParameterError("eps must name at least one budget, e.g. 4/255")
    budgets = [parse_eps(value) for value in values]
    if norm == "linf":
        for value, budget in zip(values, budgets, strict=True):
            if budget > 1:
                raise InvalidParameterError(
                    f"an L∞ budget eps must be <= 1 (pixels are in [0, 1]), got {value!r}; "
                    f"write e.g. 8/255"
                )
    if len(set(budgets)) != len(budgets):
        raise InvalidParameterError(f"eps must list each budget once, got {values}")
    return budgets


def _detector_spec(detector: Any) -> DetectorSpec:
    from oodprobe.benchmark_spec import DetectorSpec, parse_detector_option

    if isinstance(detector, DetectorSpec):
        return detector
    if isinstance(detector, str):
        return parse_detector_option(detector)
    raise InvalidParameterError(
        f"detector must be a name such as 'knn' or 'knn:k=10' (or a DetectorSpec), got "
        f"{type(detector).__name__}"
    )


def _refuse_concatenation(encoder_name: str) -> None:
    """A ``concat:`` encoder has no forward pass (its parts take different pixels)."""
    from oodprobe.encoders import parse_encoder_name

    if parse_encoder_name(encoder_name).source.prefix == "concat":
        raise InvalidParameterError(
            f"encoder {encoder_name!r} is a concatenation, whose parts take different pixels: "
            f"it has no forward pass to attack; attack one of its parts"
        )


def _refuse_non_differentiable(spec: DetectorSpec) -> None:
    """PGD needs a torch score: a detector without one is refused with its own message."""
    import torch

    from oodprobe.detectors import DETECTORS, create_detector

    cls = DETECTORS[spec.name]
    if cls.is_differentiable(spec.params):
        return
    if cls.differentiable:  # a torch score, not with these parameters (an ensemble's members)
        raise InvalidParameterError(
            f"detector {spec.display!r} has no differentiable score with these parameters (a "
            f"member without one); PGD needs one: choose differentiable members"
        )
    create_detector(spec.name, **dict(spec.params)).score_samples_torch(torch.zeros(0, 1))


def _json_value(value: Any) -> Any:
    """Plain JSON: numpy scalars and arrays as numbers and lists, non-finite floats as None."""
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, np.ndarray):
        return _json_value(value.tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, Path):
        return str(value)
    return value


def _mean(values: Any) -> float | None:
    array = np.asarray(values, dtype=np.float64)
    finite = array[np.isfinite(array)]
    return float(finite.mean()) if finite.size else None


def _write_json(path: Path, payload: dict[str, Any]) -> Path:
    from oodprobe.files import write_text_atomic

    text = json.dumps(_json_value(payload), indent=2, allow_nan=False, sort_keys=False)
    return write_text_atomic(path, text + "\n")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- the runner -----------------------------------------------------------------------------


def run_attack(
    spec: BenchmarkSpec,
    output_dir: str | Path,
    *,
    method: str = "pgd",
    detector: str | DetectorSpec | None = None,
    encoder: str | None = None,
    eps: Sequence[float | str] | float | str = (4 / 255,),
    norm: str = "linf",
    steps: int | None = None,
    step_size: float | None = None,
    lr: float = 1e-3,
    n: int = 32,
    ood: str | None = None,
    batch_size: int = 16,
    targets: str = "random",
    smoothness: str | float = "smooth",
    seed: int = 0,
    deployment: str | Path | None = None,
    force: bool = False,
    cache_root: str | Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    num_workers: int | None = None,
    download: bool = False,
    progress: bool = False,
    log: Log = lambda message: None,
    after_batch: Callable[[dict[str, Any]], None] | None = None,
) -> AttackRun:
    """Attack the first ``n`` OOD images of ``spec`` per batch (resumably); write ``attack.json``.

    ``method``: ``pgd`` (white-box PGD on the detector's own score, one attack per budget in
    ``eps``, ``norm`` ``linf`` or ``l2``, ``step_size`` default ε/16; Madry et al., ICLR 2018) or
    ``feature-matching`` (the paper's attack, Adaloglou et al., TMLR 2024: Adam with ``lr`` on
    a perturbation matching a ``targets`` ID training image, ``random`` or ``nearest``, with
    ``smoothness`` ``smooth`` λ = 5e3, ``patchy`` λ = 0, or a number). ``steps`` default: 40
    (PGD), 250 (feature matching). ``detector`` (default ``knn``; ``NAME[:k=v,…]``) is fitted
    on the cached ID training features of ``encoder`` (default the spec's first); with
    ``deployment`` (a file from ``oodprobe fit``) its encoder, fitted detector and calibrated
    threshold are used instead. ``ood`` names the OOD set (default the spec's first).

    Every value is checked before any work, and a detector PGD cannot differentiate is refused
    with its own message; nothing is written until the data are listed and the encoder is built.
    A folder holding a run with other parameters is refused unless ``force`` (which removes
    its batches). ``after_batch(info)`` is called after each batch is saved (for progress; an
    exception it raises stops the run with the finished batches kept).

    Scores are higher = more in-distribution. Evaluation uses the saved PNGs (``round(x·255)``,
    PGD's budget enforced on the quantised image): clean and attacked OOD images are encoded
    from them; ID test scores come from the cached features. The success rate is the fraction
    of OOD images rejected clean and accepted attacked, at the deployment's threshold, else at
    the one accepting ``spec.tpr`` of the ID test images.
    """
    from oodprobe.benchmark_outputs import versions
    from oodprobe.detectors import DETECTORS
    from oodprobe.features import resolve_precision, select_device
    from oodprobe.pipeline import check_compatibility, check_detector_specs

    started = time.perf_counter()
    # -- every value that needs no data or model ------------------------------------------
    method = _check_choice("method", method, METHODS)
    norm = _check_choice("norm", norm, ("linf", "l2"))
    budgets: list[float | None] = list(_budgets(eps, norm)) if method == "pgd" else [None]
    steps = check_int("steps", DEFAULT_STEPS[method] if steps is None else steps, low=1)
    if step_size is not None:
        step_size = check_number("step_size", step_size, low=0, closed_low=False)
    lr = check_number("lr", lr, low=0, closed_low=False)
    n = check_int("n", n, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    targets = _check_choice("targets", targets, TARGET_MODES)
    smoothness_value = _smoothness(smoothness)
    seed = check_int("seed", seed, low=0)
    if not isinstance(force, bool):
        raise InvalidParameterError(f"force must be true or false, got {force!r}")
    if num_workers is not None:
        check_int("num_workers", num_workers, low=0)
    torch_device = select_device(device)
    feature_precision = resolve_precision(precision, torch_device)
    from oodprobe.attack import resolve_attack_precision

    attack_precision = resolve_attack_precision(precision, torch_device)
    ood_specs = {item.label: item for item in spec.ood}
    if ood is None:
        ood_spec = spec.ood[0]
    elif ood in ood_specs:
        ood_spec = ood_specs[ood]
    else:
        raise InvalidParameterError(f"unknown OOD set {ood!r}; choose from: {', '.join(ood_specs)}")
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise InvalidParameterError(f"the output {output} is a file; give a folder")

    deployment_info: dict[str, Any] | None = None
    loaded_detector = None
    if deployment is not None:
        from oodprobe.deploy import check_deployment_metadata
        from oodprobe.detectors import load_detector_with_metadata

        if detector is not None:
            raise InvalidParameterError(
                "a deployment file holds its fitted detector; leave out the detector option, "
                "or leave out the deployment to fit one"
            )
        deployment = Path(deployment).resolve()
        loaded_detector, metadata = load_detector_with_metadata(deployment)
        deployment_info = check_deployment_metadata(
            metadata, deployment, input_array_of(loaded_detector)
        )
        if encoder is not None and encoder != deployment_info["encoder"]:
            raise InvalidParameterError(
                f"the deployment {deployment} was fitted on encoder "
                f"{deployment_info['encoder']!r}, not {encoder!r}; leave out the encoder option"
            )
        encoder_name = str(deployment_info["encoder"])
        _refuse_concatenation(encoder_name)
        loaded_params = loaded_detector.get_params(deep=False)
        if method == "pgd" and not type(loaded_detector).is_differentiable(loaded_params):
            loaded_detector.score_samples_torch(_empty())
        detector_spec = None
        detector_name = type(loaded_detector).name
        detector_record: dict[str, Any] = {
            "name": detector_name,
            "label": deployment_info.get("detector_label", detector_name),
            "deployment": str(deployment),
            "deployment_sha256": _file_sha256(deployment),
            "threshold": float(deployment_info["threshold"]),
        }
    else:
        detector_spec = _detector_spec("knn" if detector is None else detector)
        check_detector_specs([detector_spec])
        if DETECTORS[detector_spec.name].fit_labels != "classes":
            raise InvalidParameterError(
                f"detector {detector_spec.name!r} is fitted on clean vs attacked images; "
                f"attack an OOD detector (knn, mahalanobis, …); the class-score SVM is "
                f"reported beside the attack on its own"
            )
        if method == "pgd":
            _refuse_non_differentiable(detector_spec)
        encoder_name = spec.encoders[0] if encoder is None else encoder
        from oodprobe.benchmark_spec import check_encoders
        from oodprobe.pipeline import detector_params

        check_encoders([encoder_name], "encoder")
        _refuse_concatenation(encoder_name)
        check_compatibility(
            [detector_spec], labelled=True, id_label="", encoders={encoder_name: None}
        )
        detector_name = detector_spec.name
        detector_record = {
            "name": detector_spec.name,
            "label": detector_spec.display,
            "params": detector_params(detector_spec),
        }

    # -- the data (a listing), then the model ---------------------------------------------
    from oodprobe.benchmark import create_data, create_id_sets
    from oodprobe.encoders import create_encoder

    id_train, id_test = create_id_sets(spec, download)
    ood_set = create_data(ood_spec, "OOD set", download)
    if n > len(ood_set):
        raise InvalidParameterError(
            f"n = {n} images to attack, and the OOD set {ood_spec.label!r} has {len(ood_set)}; "
            f"use n <= {len(ood_set)}"
        )
    labelled = id_train.labels is not None
    if detector_spec is not None:
        check_compatibility(
            [detector_spec],
            labelled=labelled,
            id_label=spec.id_train.label,
            encoders={encoder_name: None},
        )
    model = create_encoder(encoder_name)
    if deployment_info is not None:
        from oodprobe.deploy import check_same_encoder

        check_same_encoder(model, deployment_info)
    elif detector_spec is not None:
        check_compatibility(
            [detector_spec],
            labelled=labelled,
            id_label=spec.id_train.label,
            encoders={encoder_name: model},
        )
    fingerprints = {
        "id_train": id_train.fingerprint(),
        "id_test": id_test.fingerprint(),
        "ood": ood_set.fingerprint(),
    }
    params: dict[str, Any] = {
        "method": method,
        "encoder": encoder_name,
        "encoder_cache_id": model.cache_id,
        "detector": detector_record,
        "ood_set": ood_spec.label,
        "n": n,
        "batch_size": batch_size,
        "steps": steps,
        "seed": seed,
        "device": torch_device.type,
        "precision": attack_precision,
        "feature_precision": feature_precision,
        "data_fingerprints": fingerprints,
        "convention": spec.convention,
        "tpr": spec.tpr,
    }
    if method == "pgd":
        params.update({"eps": budgets, "norm": norm, "step_size": step_size})
    else:
        params.update({"lr": lr, "targets": targets, "smoothness": smoothness_value})
    params = _json_value(params)
    from oodprobe import attack

    # decoded before the folder is made: an undecodable image stops the run with nothing written
    positions = np.arange(n, dtype=np.int64)
    pixels = attack.load_pixels(model, ood_set, positions)
    _prepare_output(output, params, force)

    # -- fit the detector on cached ID training features ----------------------------------
    from oodprobe.features import extract_features
    from oodprobe.pipeline import (
        build_detector,
        compute_text_arrays,
        detector_input,
        fit_labels,
        id_class_names,
        needs_text,
    )

    extract_options: dict[str, Any] = {
        "batch_size": 64,
        "num_workers": num_workers,
        "device": device,
        "precision": precision,
        "cache_root": cache_root,
        "progress": progress,
    }
    need_train = deployment_info is None or method == "feature-matching"
    train = extract_features(id_train, model, **extract_options) if need_train else None
    test = extract_features(id_test, model, **extract_options)
    log(f"ID: {len(test)} test images" + (f", {len(train)} training images" if train else ""))
    if loaded_detector is not None:
        fitted = loaded_detector
    else:
        assert detector_spec is not None and train is not None
        class_embeddings = None
        if needs_text([detector_spec]):
            class_embeddings = compute_text_arrays(
                model,
                id_class_names(spec.class_names, id_train),
                spec.prompts,
                [detector_spec],
                cache_root=cache_root,
                progress=progress,
                device=device,
            )
        fitted = build_detector(detector_spec, model, class_embeddings, train=train)
        fitted.fit(detector_input(fitted, train), fit_labels(fitted, detector_spec, train.labels))
    id_scores = np.asarray(fitted.score_samples(detector_input(fitted, test)), dtype=np.float64)
    if deployment_info is not None:
        threshold = float(deployment_info["threshold"])
        threshold_source = f"deployment {deployment}"
    else:
        from oodprobe.deploy import calibrate_threshold

        threshold = calibrate_threshold(id_scores, spec.tpr)
        threshold_source = f"accepts {spec.tpr:.0%} of the ID test images"

    # -- the targets, the attack per batch -------------------------------------------------
    target_indices = None
    target_pixels = None
    if method == "feature-matching":
        assert train is not None
        query = attack.encode_images(model, pixels, device=device) if targets == "nearest" else None
        target_rows = attack.select_targets(targets, n, train.features, features=query, seed=seed)
        target_indices = target_rows
        target_pixels = attack.load_pixels(model, id_train, train.indices[target_rows])
    tags = [f"eps{i}" for i in range(len(budgets))] if method == "pgd" else ["feature-matching"]
    slices = [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    batches: dict[str, list[dict[str, Any]]] = {}
    resumed = 0
    for tag, budget in zip(tags, budgets, strict=True):
        batches[tag] = []
        for number, rows in enumerate(slices):
            folder = output / "batches" / tag / f"{number:04d}"
            record = _read_batch(folder)
            if record is not None:
                resumed += 1
                batches[tag].append(record)
                continue
            shown = "feature matching" if budget is None else f"pgd {norm} eps {budget:.4g}"
            log(f"{shown}: batch {number + 1}/{len(slices)}")
            ids = positions[rows]
            common: dict[str, Any] = {
                "steps": steps,
                "batch_size": batch_size,
                "seed": seed,
                "device": device,
                "progress": progress,
                "precision": precision,
                "image_ids": ids,
            }
            if budget is None:
                assert target_pixels is not None and target_indices is not None
                result = attack.feature_matching_attack(
                    model,
                    pixels[rows],
                    target_pixels[rows],
                    lr=lr,
                    smoothness=smoothness_value,
                    target_indices=target_indices[rows],
                    **common,
                )
            else:
                result = attack.pgd_score_attack(
                    model,
                    fitted,
                    pixels[rows],
                    eps=budget,
                    norm=norm,
                    step_size=step_size,
                    **common,
                )
            saved = attack.save_attack_images(result, folder)
            record = {
                "positions": ids.tolist(),
                "clean": [str(path.relative_to(output)) for path in saved["clean"]],
                "adversarial": [str(path.relative_to(output)) for path in saved["adversarial"]],
                "result": result.as_dict(perturbation=saved["perturbation"]),
            }
            _write_json(folder / BATCH_FILE, record)  # last: marks the batch as finished
            batches[tag].append(record)
            if after_batch is not None:
                after_batch({"attack": tag, "batch": number, "n_batches": len(slices)})

    # -- evaluation on the saved PNGs -----------------------------------------------------
    log("evaluating the saved images")
    output_array = input_array_of(fitted)
    logits_available = "logits" in model.outputs
    first = batches[tags[0]]
    clean_paths = [output / path for record in first for path in record["clean"]]
    clean_png = attack.load_attack_images(clean_paths)
    clean_inputs = attack.encode_images(model, clean_png, output=output_array, device=device)
    clean_scores = np.asarray(fitted.score_samples(clean_inputs), dtype=np.float64)
    clean_logits = (
        attack.encode_images(model, clean_png, output="logits", device=device)
        if logits_available
        else None
    )
    refitted = None
    removed_id_scores = None
    if method == "feature-matching" and deployment_info is None:
        assert train is not None and target_indices is not None and detector_spec is not None
        labels = fit_labels(fitted, detector_spec, train.labels)
        refitted = attack.refit_without_targets(
            fitted, detector_input(fitted, train), target_indices, labels
        )
        removed_id_scores = np.asarray(refitted.score_samples(detector_input(fitted, test)))
    metric_options: dict[str, Any] = {
        "convention": spec.convention,
        "tpr": spec.tpr,
        "bootstrap": spec.bootstrap,
        "seed": spec.seed,
    }
    results: list[dict[str, Any]] = []
    timing: list[dict[str, Any]] = []
    per_budget: list[dict[str, Any]] = []
    attacked_logits_per_budget: list[np.ndarray] = []
    for tag, budget in zip(tags, budgets, strict=True):
        records = batches[tag]
        adversarial_paths = [output / path for record in records for path in record["adversarial"]]
        adversarial_png = attack.load_attack_images(adversarial_paths)
        inputs = attack.encode_images(model, adversarial_png, output=output_array, device=device)
        attacked_scores = np.asarray(fitted.score_samples(inputs), dtype=np.float64)
        evaluation = attack.evaluate_attack(
            id_scores, clean_scores, attacked_scores, threshold=threshold, **metric_options
        )
        sizes = attack.perturbation_sizes(clean_png, adversarial_png)
        summaries = [record["result"] for record in records]
        counts = [summary["n_images"] for summary in summaries]
        loss = np.average(
            np.asarray([summary["loss_history"] for summary in summaries], dtype=np.float64),
            axis=0,
            weights=counts,
        )
        seconds = float(sum(summary["seconds"] for summary in summaries))
        entry: dict[str, Any] = {
            "attack": tag,
            "method": summaries[0]["method"],
            "eps": budget,
            "eps_255": None if budget is None else budget * 255,
            "norm": norm if budget is not None else None,
            "evaluation": evaluation.as_dict(),
            "clean_auroc": evaluation.clean.auroc,
            "attacked_auroc": evaluation.attacked.auroc,
            "clean_fpr": evaluation.clean.fpr,
            "attacked_fpr": evaluation.attacked.fpr,
            "success_rate": evaluation.success_rate,
            "score_raised": float(np.mean(attacked_scores > clean_scores)),
            "perturbation_mean": {name: _mean(values) for name, values in sizes.items()},
            "perturbation_max": {
                "linf": float(sizes["linf"].max()),
                "l2": float(sizes["l2"].max()),
            },
            "loss_history": loss.tolist(),
            "removed_targets": None,
            "class_score_svm": None,
        }
        removed_scores: tuple[np.ndarray, np.ndarray] | None = None
        if refitted is not None and removed_id_scores is not None:
            removed_clean = np.asarray(refitted.score_samples(clean_inputs), dtype=np.float64)
            removed_attacked = np.asarray(refitted.score_samples(inputs), dtype=np.float64)
            removed = attack.evaluate_attack(
                removed_id_scores, removed_clean, removed_attacked, **metric_options
            )
            entry["removed_targets"] = removed.as_dict()
            removed_scores = (removed_clean, removed_attacked)
        if clean_logits is not None:
            attacked_logits = attack.encode_images(
                model, adversarial_png, output="logits", device=device
            )
            entry["class_score_svm"] = _class_score_svm(
                clean_logits,
                attacked_logits,
                seed=seed,
                convention=spec.convention,
                tpr=spec.tpr,
                bootstrap=spec.bootstrap,
            )
            attacked_logits_per_budget.append(attacked_logits)
        results.append(entry)
        timing.append(
            {
                "attack": tag,
                "seconds": seconds,
                "seconds_per_image_step": seconds / (n * steps),
            }
        )
        float_clean = np.concatenate(
            [summary["per_image"].get("clean_scores", []) for summary in summaries]
        )
        float_attacked = np.concatenate(
            [summary["per_image"].get("attacked_scores", []) for summary in summaries]
        )
        per_budget.append(
            {
                "records": records,
                "attacked_scores": attacked_scores,
                "sizes": sizes,
                "float_clean": float_clean,
                "float_attacked": float_attacked,
                "removed": removed_scores,
                "cosines": [
                    np.concatenate([s["per_image"].get(key, []) for s in summaries])
                    for key in ("clean_cosines", "attacked_cosines")
                ],
            }
        )
    across: list[dict[str, Any]] = []
    if clean_logits is not None and len(attacked_logits_per_budget) > 1 and n >= SVM_MIN_IMAGES:
        for fit_budget, fit_logits in zip(budgets, attacked_logits_per_budget, strict=True):
            for test_budget, test_logits in zip(budgets, attacked_logits_per_budget, strict=True):
                svm_result = _class_score_svm(
                    clean_logits,
                    fit_logits,
                    seed=seed,
                    convention=spec.convention,
                    tpr=spec.tpr,
                    bootstrap=0,
                    held_out_attacked=test_logits,
                )
                across.append(
                    {"fit_eps": fit_budget, "test_eps": test_budget, "auroc": svm_result["auroc"]}
                )
    images = _image_records(
        ood_set,
        positions,
        clean_scores,
        threshold,
        tags,
        budgets,
        per_budget,
        target_indices,
        None if train is None or target_indices is None else train.indices[target_indices],
    )
    provenance: dict[str, Any] = {
        "benchmark": spec.name,
        "versions": versions(),
        "encoder": encoder_name,
        "encoder_cache_id": model.cache_id,
        "encoder_weights_sha256": model.weights_digest,
        "detector": detector_record,
        "id_train": {"spec": spec.id_train.label, "n": len(id_train)},
        "id_test": {"spec": spec.id_test.label, "n": len(id_test), "n_scored": len(test)},
        "ood": {"spec": ood_spec.label, "n": len(ood_set), "n_attacked": n},
        "data_fingerprints": fingerprints,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if train is not None:
        provenance["id_train"]["n_fitted"] = len(train)
    summary = {
        "format": ATTACK_FORMAT,
        "version": ATTACK_VERSION,
        "params": params,
        "provenance": provenance,
        "threshold": {"value": threshold, "source": threshold_source},
        "quantization": (
            "PNG uint8 round(x*255); PGD's budget enforced on the quantised image against the "
            "equally quantised clean one; evaluation encodes the saved PNGs"
        ),
        # every ID test score, so the report's histograms can be drawn again from the file
        "id_scores": {
            "n": len(id_scores),
            "mean": float(id_scores.mean()),
            "scores": [float(score) for score in id_scores],
        },
        "results": results,
        "class_score_svm_across_budgets": across,
        "images": images,
        "timing": {
            "attacks": timing,
            "total_seconds": time.perf_counter() - started,
            "batches_resumed": resumed,
        },
    }
    path = _write_json(output / RESULT_FILE, summary)
    files = {"json": path, "run": output / RUN_FILE, "batches": output / "batches"}
    written = json.loads(path.read_text())
    # the HTML report beside attack.json; ID test scores passed here (attack.json has the mean)
    from oodprobe.report.attack import REPORT_FILE, render_attack_report

    files["report"] = render_attack_report(written, output / REPORT_FILE, id_scores=id_scores)
    return AttackRun(
        output,
        written,
        files,
        seconds=time.perf_counter() - started,
        batches_resumed=resumed,
    )


def _empty() -> Any:
    import torch

    return torch.zeros(0, 1)


def _prepare_output(output: Path, params: dict[str, Any], force: bool) -> None:
    """Create the folder and record the run's parameters; refuse another run's folder."""
    run_file = output / RUN_FILE
    if run_file.is_file():
        try:
            recorded = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError):
            recorded = None
        if recorded != params:
            if not force:
                differing = (
                    "unreadable"
                    if not isinstance(recorded, dict)
                    else next(
                        (key for key in params if recorded.get(key) != params[key]),
                        next(iter(set(recorded) - set(params)), "?"),
                    )
                )
                raise InvalidParameterError(
                    f"{output} holds an attack run with other parameters ({differing} differs); "
                    f"choose another output folder, or pass force (--force) to start it over"
                )
            _clear(output)
    elif (output / "batches").exists() or (output / RESULT_FILE).exists():
        if not force:
            raise InvalidParameterError(
                f"{output} holds attack files without their {RUN_FILE}; choose another output "
                f"folder, or pass force (--force) to start it over"
            )
        _clear(output)
    output.mkdir(parents=True, exist_ok=True)
    _write_json(run_file, params)


def _clear(output: Path) -> None:
    """Remove what a run writes (its batches and results), nothing else in the folder."""
    shutil.rmtree(output / "batches", ignore_errors=True)
    from oodprobe.report.attack import REPORT_FILE

    for name in (RESULT_FILE, RUN_FILE, REPORT_FILE):
        (output / name).unlink(missing_ok=True)


def _read_batch(folder: Path) -> dict[str, Any] | None:
    """A finished batch's record (its images present), or None to attack it again."""
    path = folder / BATCH_FILE
    if not path.is_file():
        return None
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    output = folder.parents[2]
    if not all((output / p).is_file() for p in record["clean"] + record["adversarial"]):
        return None
    return record


def _class_score_svm(
    clean_logits: np.ndarray,
    attacked_logits: np.ndarray,
    *,
    seed: int,
    convention: str,
    tpr: float,
    bootstrap: int,
    held_out_attacked: np.ndarray | None = None,
) -> dict[str, Any]:
    """Class-score SVM (Uelwer et al., KI 2021) fitted on half the images, clean vs attacked.

    The images are split (seeded) into halves; the SVM is fitted on the first half's clean (1)
    and attacked (0) logits and evaluated on the other half: AUROC with clean as positive.
    ``held_out_attacked`` (the same images attacked otherwise, e.g. at another budget) replaces
    the attacked logits of the held-out half: how the detector carries over.
    """
    from oodprobe.detectors import create_detector
    from oodprobe.metrics import evaluate

    count = len(clean_logits)
    if count < SVM_MIN_IMAGES:
        return {"skipped": f"needs at least {SVM_MIN_IMAGES} images, got {count}"}
    order = np.random.default_rng(seed).permutation(count)
    fit_rows, held_rows = np.sort(order[: count // 2]), np.sort(order[count // 2 :])
    svm = create_detector("class-score-svm")
    svm.fit(
        np.concatenate([clean_logits[fit_rows], attacked_logits[fit_rows]]),
        np.concatenate([np.ones(len(fit_rows)), np.zeros(len(fit_rows))]).astype(np.int64),
    )
    result = evaluate(
        svm.score_samples(clean_logits[held_rows]),
        svm.score_samples(
            (attacked_logits if held_out_attacked is None else held_out_attacked)[held_rows]
        ),
        convention=convention,
        tpr=tpr,
        bootstrap=bootstrap,
        seed=seed,
    )
    return {
        "auroc": result.auroc,
        "n_fit": 2 * len(fit_rows),
        "n_held_out": 2 * len(held_rows),
        "evaluation": result.as_dict(),
    }


def _image_records(
    dataset: Any,
    positions: np.ndarray,
    clean_scores: np.ndarray,
    threshold: float,
    tags: list[str],
    budgets: list[float | None],
    per_budget: list[dict[str, Any]],
    target_rows: np.ndarray | None,
    target_indices: np.ndarray | None,
) -> list[dict[str, Any]]:
    """One record per attacked image: its source, clean score and, per attack, what changed."""
    clean_paths = [path for record in per_budget[0]["records"] for path in record["clean"]]
    images = []
    for row, position in enumerate(positions.tolist()):
        attacks = []
        for tag, budget, part in zip(tags, budgets, per_budget, strict=True):
            paths = [path for record in part["records"] for path in record["adversarial"]]
            score = float(part["attacked_scores"][row])
            item: dict[str, Any] = {
                "attack": tag,
                "eps": budget,
                "attacked_score": score,
                "accepted": score >= threshold,
                "score_raised": score > float(clean_scores[row]),
                "adversarial_png": paths[row],
                **{name: float(values[row]) for name, values in part["sizes"].items()},
            }
            if len(part["float_attacked"]):
                item["float_clean_score"] = float(part["float_clean"][row])
                item["float_attacked_score"] = float(part["float_attacked"][row])
            cosines = part["cosines"]
            if len(cosines[0]):
                item["clean_cosine"] = float(cosines[0][row])
                item["attacked_cosine"] = float(cosines[1][row])
            if part["removed"] is not None:
                item["removed_targets_clean_score"] = float(part["removed"][0][row])
                item["removed_targets_attacked_score"] = float(part["removed"][1][row])
            attacks.append(item)
        record: dict[str, Any] = {
            "position": position,
            "index": position,
            "source": dataset.describe(position),
            "clean_score": float(clean_scores[row]),
            "clean_accepted": bool(clean_scores[row] >= threshold),
            "clean_png": clean_paths[row],
            "attacks": attacks,
        }
        if target_rows is not None and target_indices is not None:
            record["target_row"] = int(target_rows[row])
            record["target_index"] = int(target_indices[row])
        images.append(record)
    return images


TRANSFER_FILE = "svm_transfer.json"


def class_score_svm_transfer(
    runs: Sequence[str | Path],
    output: str | Path | None = None,
    *,
    device: str = "auto",
    log: Log = lambda message: None,
) -> dict[str, Any]:
    """The class-score SVM fitted on each attack and tested on each other, across runs.

    Uelwer, Michels, De Candido, "Learning to Detect Adversarial Examples Based on Class
    Scores", KI 2021, measured how a detector trained on one attack carries over to others.
    ``runs`` are finished ``oodprobe attack`` folders over the *same* images (encoder, OOD set,
    ``n`` and data checked) — e.g. a PGD run and a feature-matching run; every attack in them
    (each PGD budget, the feature matching) is one row and one column. Cell (fit, test): the
    SVM fitted on one half of the images, clean vs ``fit``-attacked logits, evaluated on the
    other half, clean vs ``test``-attacked (AUROC, clean = positive): the diagonal is each run's
    own held-out AUROC. Logits are the encoder's head, encoded from the saved PNGs. Writes
    ``svm_transfer.json`` to ``output`` when given; returns its content.
    """
    from oodprobe import attack
    from oodprobe.encoders import create_encoder

    if len(runs) < 1:
        raise InvalidParameterError("give at least one attack run folder")
    summaries = []
    for run in runs:
        path = Path(run) / RESULT_FILE
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise InvalidParameterError(
                f"{run} holds no finished attack run ({path.name} unreadable: {error}); run "
                f"`oodprobe attack` into it first"
            ) from None
        if not isinstance(summary, dict) or summary.get("format") != ATTACK_FORMAT:
            raise InvalidParameterError(f"{path} is not an oodprobe attack result")
        summaries.append((Path(run), summary))
    first = summaries[0][1]["params"]
    for run, summary in summaries[1:]:
        params = summary["params"]
        for key in ("encoder_cache_id", "ood_set", "n"):
            if params[key] != first[key]:
                raise InvalidParameterError(
                    f"{run} attacked other images or another encoder than {summaries[0][0]} "
                    f"({key}: {params[key]!r} vs {first[key]!r}); compare runs over the same "
                    f"encoder, OOD set and n"
                )
        if params["data_fingerprints"]["ood"] != first["data_fingerprints"]["ood"]:
            raise InvalidParameterError(
                f"{run} attacked another OOD set's files than {summaries[0][0]}"
            )
    if first["n"] < SVM_MIN_IMAGES:
        raise InvalidParameterError(
            f"the class-score SVM needs at least {SVM_MIN_IMAGES} attacked images, the runs "
            f"have {first['n']}"
        )
    model = create_encoder(first["encoder"])
    if model.cache_id != first["encoder_cache_id"]:
        raise InvalidParameterError(
            f"the encoder {first['encoder']!r} built here is not the one the runs attacked "
            f"(cache id {model.cache_id} vs {first['encoder_cache_id']})"
        )
    if "logits" not in model.outputs:
        raise InvalidParameterError(
            f"the class-score SVM scores an encoder's logits, and {first['encoder']!r} has none"
        )
    # every image's clean PNG is the same quantised image in every run: the first run's serve
    run, summary = summaries[0]
    clean = attack.load_attack_images([run / image["clean_png"] for image in summary["images"]])
    clean_logits = attack.encode_images(model, clean, output="logits", device=device)
    names: list[str] = []
    attacked: list[np.ndarray] = []
    for run, summary in summaries:
        for position, entry in enumerate(summary["results"]):
            paths = [
                run / image["attacks"][position]["adversarial_png"] for image in summary["images"]
            ]
            label = entry["method"]
            if entry.get("eps_255") is not None:
                label += f" eps {entry['eps_255']:.3g}/255"
            log(f"encoding {label} ({run})")
            names.append(label if label not in names else f"{label} ({run.name})")
            images = attack.load_attack_images(paths)
            attacked.append(attack.encode_images(model, images, output="logits", device=device))
    cells = []
    for fit_name, fit_logits in zip(names, attacked, strict=True):
        for test_name, test_logits in zip(names, attacked, strict=True):
            result = _class_score_svm(
                clean_logits,
                fit_logits,
                seed=int(first["seed"]),
                convention=first["convention"],
                tpr=float(first["tpr"]),
                bootstrap=0,
                held_out_attacked=test_logits,
            )
            cells.append({"fit": fit_name, "test": test_name, "auroc": result["auroc"]})
    payload: dict[str, Any] = {
        "format": "oodprobe-svm-transfer",
        "runs": [str(run) for run, _ in summaries],
        "encoder": first["encoder"],
        "ood_set": first["ood_set"],
        "n": first["n"],
        "attacks": names,
        "cells": cells,
    }
    if output is not None:
        folder = Path(output)
        folder.mkdir(parents=True, exist_ok=True)
        payload["file"] = str(_write_json(folder / TRANSFER_FILE, payload))
    return payload
