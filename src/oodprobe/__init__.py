"""oodprobe: out-of-distribution detection with frozen features of pretrained models."""

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

__all__ = [
    "CacheError",
    "DataError",
    "DetectorFileError",
    "InvalidParameterError",
    "MissingWeightsError",
    "OodprobeError",
    "UnknownNameError",
    "__version__",
]
