"""The detector contract, the registry, and pickle-free persistence.

Every detector is a scikit-learn estimator: keyword-only hyperparameters stored under their own
names in ``__init__``, ``fit(features, labels=None) -> self``, learned state in attributes ending
in ``_``, and ``score_samples(features) -> scores`` where **higher = more in-distribution**.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
from sklearn.base import BaseEstimator

from oodprobe.arrays import Features, Labels, Scores
from oodprobe.errors import DetectorFileError, InvalidParameterError, UnknownNameError

FORMAT_NAME = "oodprobe-detector"
FORMAT_VERSION = 1

_JsonScalar = (str, int, float, bool, type(None))


class Detector(BaseEstimator):
    """Base class: subclasses set ``name``, implement ``fit`` and ``score_samples``.

    ``requires_labels`` says whether ``fit`` needs class labels; ``requires_text`` whether the
    constructor needs class embeddings from a text encoder (MCM, PLP). ``input_array`` names the
    encoder output the detector consumes: ``"features"`` (pooled image features, the default)
    or ``"logits"`` (the encoder's own classifier head).
    """

    name: ClassVar[str] = ""
    requires_labels: ClassVar[bool] = False
    requires_text: ClassVar[bool] = False
    input_array: ClassVar[str] = "features"

    def fit(self, features: Features, labels: Labels | None = None) -> Detector:
        raise NotImplementedError

    def score_samples(self, features: Features) -> Scores:
        """Return (n_samples,) float64 scores, higher = more in-distribution."""
        raise NotImplementedError

    # -- persistence hooks -------------------------------------------------------------------
    def _get_state(self) -> dict[str, Any]:
        """Learned state to save: by default every attribute ending in a single ``_``."""
        return {
            key: value
            for key, value in vars(self).items()
            if key.endswith("_") and not key.startswith("_") and not key.endswith("__")
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        """Restore what ``_get_state`` returned."""
        for key, value in state.items():
            setattr(self, key, value)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the fitted detector to ``path`` (safetensors + JSON metadata, no pickle)."""
        return save_detector(self, path)


DETECTORS: dict[str, type[Detector]] = {}


def _ensure_registered() -> None:
    """Import the detectors package, whose modules register themselves in DETECTORS."""
    import oodprobe.detectors  # noqa: F401


_D = TypeVar("_D", bound=type[Detector])


def register_detector(cls: _D) -> _D:
    """Class decorator adding a detector to ``DETECTORS`` under its ``name``."""
    if not cls.name or cls.name in DETECTORS:
        raise RuntimeError(f"detector name {cls.name!r} is empty or registered twice")
    DETECTORS[cls.name] = cls
    return cls


def create_detector(name: str, **params: Any) -> Detector:
    """Instantiate a registered detector by name with keyword hyperparameters."""
    _ensure_registered()

    try:
        cls = DETECTORS[name]
    except KeyError:
        raise UnknownNameError("detector", name, DETECTORS) from None
    try:
        return cls(**params)
    except TypeError as error:
        valid = ", ".join(sorted(cls._get_param_names()))
        raise InvalidParameterError(
            f"invalid parameters for detector {name!r}: {error}; valid parameters: {valid}"
        ) from None


# -- save / load --------------------------------------------------------------------------------


def _split_arrays(prefix: str, values: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    arrays: dict[str, np.ndarray] = {}
    plain: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise DetectorFileError(f"cannot save object array {key!r}")
            arrays[f"{prefix}{key}"] = np.ascontiguousarray(value)
        elif isinstance(value, np.generic):
            plain[key] = value.item()
        elif isinstance(value, (list, tuple, dict, *_JsonScalar)):
            plain[key] = value
        else:
            raise DetectorFileError(
                f"cannot save attribute {key!r} of type {type(value).__name__} without pickle"
            )
    return arrays, plain


def _digest(arrays: dict[str, np.ndarray], header: str) -> str:
    digest = hashlib.sha256(header.encode())
    for key in sorted(arrays):
        array = arrays[key]
        digest.update(f"{key}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save_detector(
    detector: Detector, path: str | os.PathLike[str], metadata: dict[str, Any] | None = None
) -> Path:
    """Save a fitted detector atomically to one ``.safetensors`` file (no pickle).

    ``metadata`` (JSON-able, e.g. the encoder and a calibrated threshold) is stored in the
    checksummed header and returned by :func:`load_detector_with_metadata`.
    """
    from safetensors.numpy import save_file
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(detector)
    path = Path(path)
    param_arrays, params = _split_arrays("param.", detector.get_params(deep=False))
    state_arrays, state = _split_arrays("state.", detector._get_state())
    arrays = {**param_arrays, **state_arrays}
    header = json.dumps(
        {"detector": detector.name, "params": params, "state": state, "metadata": metadata or {}},
        sort_keys=True,
    )
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "header": header,
        "sha256": _digest(arrays, header),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # safetensors refuses an empty dict; a marker keeps the format uniform.
        save_file(arrays or {"_empty": np.zeros(0, np.float32)}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_detector(path: str | os.PathLike[str]) -> Detector:
    """Load a detector saved by :func:`save_detector`, verifying format, version and checksum."""
    return load_detector_with_metadata(path)[0]


def load_detector_with_metadata(path: str | os.PathLike[str]) -> tuple[Detector, dict[str, Any]]:
    """Like :func:`load_detector`, also returning the metadata saved with the detector."""
    from safetensors import safe_open

    _ensure_registered()

    path = Path(path)
    if not path.is_file():
        raise DetectorFileError(f"detector file not found: {path}")
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except DetectorFileError:
        raise
    except Exception as error:  # safetensors raises several types for damaged files
        raise DetectorFileError(
            f"{path} is not a readable oodprobe detector file ({error}); save it again"
        ) from None
    arrays.pop("_empty", None)
    if metadata.get("format") != FORMAT_NAME:
        raise DetectorFileError(f"{path} is not an oodprobe detector file")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise DetectorFileError(
            f"{path} has format version {metadata.get('format_version')!r}; this oodprobe reads "
            f"version {FORMAT_VERSION}; refit and save the detector with this version"
        )
    header = metadata.get("header", "")
    if _digest(arrays, header) != metadata.get("sha256"):
        raise DetectorFileError(f"{path} failed its checksum: the file is damaged or was modified")
    try:
        content = json.loads(header)
        cls = DETECTORS[content["detector"]]
        params = dict(content["params"])
        state = dict(content["state"])
        saved_metadata = dict(content.get("metadata", {}))
    except (ValueError, KeyError, TypeError) as error:
        raise DetectorFileError(f"{path} has an invalid header: {error}") from None
    for key, value in arrays.items():
        kind, _, attribute = key.partition(".")
        (params if kind == "param" else state)[attribute] = value
    try:
        detector = cls(**params)
    except TypeError as error:
        raise DetectorFileError(
            f"{path} has parameters {cls.name!r} does not accept: {error}"
        ) from None
    detector._set_state(state)
    return detector, saved_metadata


def detector_names(predicate: Callable[[type[Detector]], bool] | None = None) -> list[str]:
    """Registered detector names, optionally filtered by a predicate on the class."""
    _ensure_registered()

    return sorted(name for name, cls in DETECTORS.items() if predicate is None or predicate(cls))
