"""oodprobe: out-of-distribution detection with frozen features of pretrained models.

The public API, imported lazily (``import oodprobe`` stays cheap, so ``oodprobe --help`` is fast)::

    import oodprobe

    train = oodprobe.create_dataset("fashion-mnist:train", classes=[0, 1, 2, 3, 4], per_class=200)
    test = oodprobe.create_dataset("fashion-mnist:test", classes=[5, 6, 7, 8, 9], per_class=100)
    encoder = oodprobe.create_encoder("efficientnet-lite0")
    id_features = oodprobe.extract_features(train, encoder)
    detector = oodprobe.create_detector("knn").fit(id_features.features)
    scores = detector.score_samples(oodprobe.extract_features(test, encoder).features)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from oodprobe.errors import (
    CacheError,
    DataError,
    DetectorFileError,
    InvalidParameterError,
    MissingWeightsError,
    OodprobeError,
    UnknownNameError,
)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "create_dataset": "oodprobe.data",
    "list_datasets": "oodprobe.data",
    "DATASETS": "oodprobe.data",
    "create_encoder": "oodprobe.encoders",
    "ENCODERS": "oodprobe.encoders",
    "extract_features": "oodprobe.features",
    "load_features": "oodprobe.features",
    "FeatureSet": "oodprobe.features",
    "create_detector": "oodprobe.detectors",
    "DETECTORS": "oodprobe.detectors",
    "Detector": "oodprobe.detectors",
    "save_detector": "oodprobe.detectors",
    "load_detector": "oodprobe.detectors",
    "evaluate": "oodprobe.metrics",
    "auroc": "oodprobe.metrics",
    "fpr_at_tpr": "oodprobe.metrics",
    "aupr": "oodprobe.metrics",
    "CONVENTIONS": "oodprobe.metrics",
    "run_benchmark": "oodprobe.benchmark",
    "load_benchmark": "oodprobe.benchmark_spec",
    "create_benchmark": "oodprobe.benchmark_spec",
    "benchmark_names": "oodprobe.benchmark_spec",
    "run_study": "oodprobe.study",
    "finetune": "oodprobe.finetune",
    "FinetuneRecipe": "oodprobe.finetune",
    "feature_matching_attack": "oodprobe.attack",
    "pgd_score_attack": "oodprobe.attack",
    "AttackResult": "oodprobe.attack",
    "perturbation_sizes": "oodprobe.attack",
    "quantize_to_png": "oodprobe.attack",
    "save_attack_images": "oodprobe.attack",
    "evaluate_attack": "oodprobe.attack",
    "robustness_curve": "oodprobe.attack",
    "run_attack": "oodprobe.attack_run",
    "AttackRun": "oodprobe.attack_run",
    "parse_eps": "oodprobe.attack_run",
    "class_score_svm_transfer": "oodprobe.attack_run",
    "export_parquet": "oodprobe.parquet",
    "import_parquet": "oodprobe.parquet",
    "import_parquet_to_cache": "oodprobe.parquet",
}

if TYPE_CHECKING:
    from oodprobe.attack import (
        AttackResult,
        evaluate_attack,
        feature_matching_attack,
        perturbation_sizes,
        pgd_score_attack,
        quantize_to_png,
        robustness_curve,
        save_attack_images,
    )
    from oodprobe.attack_run import AttackRun, class_score_svm_transfer, parse_eps, run_attack
    from oodprobe.benchmark import run_benchmark
    from oodprobe.benchmark_spec import benchmark_names, create_benchmark, load_benchmark
    from oodprobe.data import DATASETS, create_dataset, list_datasets
    from oodprobe.detectors import (
        DETECTORS,
        Detector,
        create_detector,
        load_detector,
        save_detector,
    )
    from oodprobe.encoders import ENCODERS, create_encoder
    from oodprobe.features import FeatureSet, extract_features, load_features
    from oodprobe.finetune import FinetuneRecipe, finetune
    from oodprobe.metrics import CONVENTIONS, aupr, auroc, evaluate, fpr_at_tpr
    from oodprobe.parquet import export_parquet, import_parquet, import_parquet_to_cache
    from oodprobe.study import run_study


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'oodprobe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CONVENTIONS",
    "DATASETS",
    "DETECTORS",
    "ENCODERS",
    "AttackResult",
    "AttackRun",
    "CacheError",
    "DataError",
    "Detector",
    "DetectorFileError",
    "FeatureSet",
    "FinetuneRecipe",
    "InvalidParameterError",
    "MissingWeightsError",
    "OodprobeError",
    "UnknownNameError",
    "__version__",
    "aupr",
    "auroc",
    "benchmark_names",
    "class_score_svm_transfer",
    "create_benchmark",
    "create_dataset",
    "create_detector",
    "create_encoder",
    "evaluate",
    "evaluate_attack",
    "export_parquet",
    "extract_features",
    "feature_matching_attack",
    "finetune",
    "fpr_at_tpr",
    "import_parquet",
    "import_parquet_to_cache",
    "list_datasets",
    "load_benchmark",
    "load_detector",
    "load_features",
    "parse_eps",
    "perturbation_sizes",
    "pgd_score_attack",
    "quantize_to_png",
    "robustness_curve",
    "run_attack",
    "run_benchmark",
    "run_study",
    "save_attack_images",
    "save_detector",
]
