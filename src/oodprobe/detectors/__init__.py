"""Detectors: arrays in, scores out (higher = more in-distribution).

Importing this package registers every detector in ``DETECTORS``.
"""

from oodprobe.detectors import baselines as _baselines  # noqa: F401  (lof, isolation-forest, …)
from oodprobe.detectors import clipn as _clipn  # noqa: F401  (clipn-atd, clipn-ctw)
from oodprobe.detectors import ensemble as _ensemble  # noqa: F401  (score-, prob-ensemble)
from oodprobe.detectors import gaussian as _gaussian  # noqa: F401  (gaussian, mahalanobis, rmd)
from oodprobe.detectors import neighbors as _neighbors  # noqa: F401  (knn, deep-knn)
from oodprobe.detectors import posthoc as _posthoc  # noqa: F401  (vim, react, ash-*, dice, …)
from oodprobe.detectors import posthoc_logits as _posthoc_logits  # noqa: F401  (gen, gradnorm, …)
from oodprobe.detectors import probe as _probe  # noqa: F401  (registers linear-probe, logits)
from oodprobe.detectors import text as _text  # noqa: F401  (registers mcm, plp)
from oodprobe.detectors import zeroshot as _zeroshot  # noqa: F401  (neglabel, gl-mcm)

# isort: off
# registered last, so listed last: it detects attacks, it is not an OOD detector of the ID set
from oodprobe.detectors import adversarial as _adversarial  # noqa: F401  (class-score-svm)

# isort: on
from oodprobe.detectors.base import (
    DETECTORS,
    Detector,
    create_detector,
    detector_names,
    load_detector,
    load_detector_with_metadata,
    register_detector,
    save_detector,
)

__all__ = [
    "DETECTORS",
    "Detector",
    "create_detector",
    "detector_names",
    "load_detector",
    "load_detector_with_metadata",
    "register_detector",
    "save_detector",
]
