"""The detector contract, the registry, parameter validation, and pickle-free persistence.

Every detector is a scikit-learn estimator: keyword-only hyperparameters stored under their own
names in ``__init__``, ``fit(features, labels=None) -> self``, learned state in attributes ending
in ``_``, and ``score_samples(features) -> scores`` where **higher = more in-distribution**.

Parameters are validated in one place, on scikit-learn's own mechanism: each detector declares
``_parameter_constraints`` (``Interval``, ``StrOptions``, types, ``None``, ``"array-like"``) for
every constructor parameter, and :func:`validate_values` checks them with
``sklearn.utils._param_validation`` and words a failure as one oodprobe line. The same check
runs before any work (``Detector.check_params`` on a user's parameter dict, ``create_detector``)
and at the start of ``fit``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import (
    Interval,
    StrOptions,
    make_constraint,
    validate_parameter_constraints,
)
from sklearn.utils._param_validation import (
    InvalidParameterError as SklearnParameterError,
)
from sklearn.utils.validation import check_is_fitted

from oodprobe.arrays import Features, Labels, Scores
from oodprobe.errors import DetectorFileError, InvalidParameterError, UnknownNameError
from oodprobe.files import atomic_write

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "oodprobe-detector"
FORMAT_VERSION = 1

_JsonScalar = (str, int, float, bool, type(None))


# -- parameter constraints ------------------------------------------------------------------


class Number(Interval):
    """``sklearn`` ``Interval`` that refuses booleans (``True`` is an ``int`` to Python, not here).

    ``integer=True`` is an interval of integers, else of real numbers; ``text`` replaces the
    generated description (e.g. to say why a bound is there).
    """

    def __init__(
        self,
        left: float | None,
        right: float | None = None,
        *,
        closed: str = "left",
        integer: bool = False,
        text: str | None = None,
    ) -> None:
        super().__init__(Integral if integer else Real, left, right, closed=closed)
        self.text = text

    def is_satisfied_by(self, val: Any) -> bool:
        return not isinstance(val, (bool, np.bool_)) and bool(super().is_satisfied_by(val))

    def describe(self) -> str:
        if self.text is not None:
            return self.text
        kind = "integer" if self.type is Integral else "number"
        bound = "{}" if self.type is Integral else "{:g}"  # 4294967295, not 4.29497e+09
        left = "" if self.left is None else bound.format(self.left)
        right = "" if self.right is None else bound.format(self.right)
        left_closed = self.closed in ("left", "both")
        right_closed = self.closed in ("right", "both")
        if self.right is None:
            finite = "" if self.type is Integral or right_closed else "finite "
            if self.left is None:
                return f"{finite}{kind}"
            return f"{finite}{kind} {'>=' if left_closed else '>'} {left}"
        if self.left is None:
            return f"{kind} {'<=' if right_closed else '<'} {right}"
        brackets = ("[" if left_closed else "(", "]" if right_closed else ")")
        return f"{kind} in {brackets[0]}{left}, {right}{brackets[1]}"


def integer(left: int | None = None, right: int | None = None) -> Number:
    """Constraint: an integer in ``[left, right]`` (``None``: unbounded), never a bool."""
    closed = {(True, True): "both", (True, False): "left", (False, True): "right"}
    return Number(
        left,
        right,
        closed=closed.get((left is not None, right is not None), "neither"),
        integer=True,
    )


class Choices(StrOptions):
    """``sklearn`` ``StrOptions`` that keeps the order its options were given in (for messages)."""

    def __init__(self, *options: str, text: str | None = None) -> None:
        super().__init__(set(options))
        self.ordered = tuple(options)
        self.text = text

    def describe(self) -> str:
        if self.text is not None:
            return self.text
        if len(self.ordered) == 1:
            return repr(self.ordered[0])
        return f"one of {', '.join(self.ordered)}"


class DeviceName(StrOptions):
    """A torch device name: ``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:<index>``.

    A ``StrOptions`` so that scikit-learn's ``make_constraint`` accepts it; the options are a
    pattern, not a list. Whether the device exists is checked when it is used.
    """

    _PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

    def __init__(self) -> None:
        super().__init__({"auto", "cpu", "mps", "cuda"})

    def is_satisfied_by(self, val: Any) -> bool:
        return isinstance(val, str) and self._PATTERN.fullmatch(val) is not None

    def describe(self) -> str:
        return "device name (auto, cpu, cuda, cuda:<index> or mps)"


_TYPE_NAMES = {str: "string", bool: "boolean (true or false)", float: "number", int: "integer"}


def describe_constraint(constraint: Any) -> str:
    """Human text of one constraint, without an article: ``integer >= 1``, ``one of a, b``."""
    if hasattr(constraint, "describe"):
        return str(constraint.describe())
    if constraint is None:
        return "None"
    if constraint == "array-like":
        return "array"
    if constraint == "boolean":
        return _TYPE_NAMES[bool]
    if isinstance(constraint, type):
        return _TYPE_NAMES.get(constraint, constraint.__name__)
    return str(make_constraint(constraint))


def describe_constraints(constraints: list[Any], *, articles: bool = False) -> str:
    """``integer >= 1 or None``: every allowed form (``articles``: ``an integer >= 1 or None``)."""
    texts = [describe_constraint(constraint) for constraint in constraints]
    if articles:
        texts = [_with_article(text) for text in texts]
    return texts[0] if len(texts) == 1 else f"{', '.join(texts[:-1])} or {texts[-1]}"


def _with_article(text: str) -> str:
    """``integer >= 1`` -> ``an integer >= 1``; choices, quoted values and None stay as they are."""
    if text.startswith(("one of", "'", "None")):
        return text
    return f"{'an' if text[:1] in 'aeiou' else 'a'} {text}"


def _short_repr(value: Any) -> str:
    """repr of a received value, one line and at most 80 characters."""
    if isinstance(value, np.ndarray) or type(value).__name__ == "Tensor":
        return f"an array of shape {tuple(value.shape)}"
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else f"{text[:77]}..."


def validate_values(
    constraints: Mapping[str, list[Any]], values: Mapping[str, Any], owner: str
) -> None:
    """Check ``values`` against scikit-learn ``constraints``; a failure is one oodprobe line.

    ``owner`` opens the message: ``"detector 'knn': k must be an integer >= 1, got 'abc'"``.
    Names without constraints are not checked here (``Detector.check_params`` refuses them).
    """
    for name, value in values.items():
        if name not in constraints:
            continue
        try:
            validate_parameter_constraints({name: constraints[name]}, {name: value}, owner)
        except SklearnParameterError:
            allowed = describe_constraints(constraints[name], articles=True)
            raise InvalidParameterError(
                f"{owner}: {name} must be {allowed}, got {_short_repr(value)}"
            ) from None


@dataclass(frozen=True)
class ParamInfo:
    """One user-settable detector parameter: its name, default and what values it allows."""

    name: str
    default: Any
    allowed: str


# -- the detector base class ----------------------------------------------------------------


class Detector(BaseEstimator):
    """Base class: subclasses set ``name``, implement ``fit`` and ``score_samples``.

    ``requires_labels`` says whether ``fit`` needs class labels; ``requires_text`` whether the
    constructor needs class embeddings from a text encoder (MCM, PLP). ``input_array`` names the
    encoder output the detector consumes: ``"features"`` (pooled image features, the default)
    or ``"logits"`` (the encoder's own classifier head). ``runner_params`` are constructor
    parameters the runner computes (class embeddings, the image projection): a user never sets
    them. ``differentiable`` says whether ``score_samples_torch`` exists.
    ``_parameter_constraints`` holds scikit-learn constraints for every constructor parameter.
    """

    name: ClassVar[str] = ""
    requires_labels: ClassVar[bool] = False
    # what ``labels`` of ``fit`` are: ID class labels, or 1 clean / 0 attacked images (the
    # class-score SVM, fitted by the attack, never on a benchmark's ID training set)
    fit_labels: ClassVar[str] = "classes"
    requires_text: ClassVar[bool] = False
    # whether the constructor needs a classifier head's weight and bias as arrays (the
    # post-hoc family, detectors/posthoc.py; the runner computes them)
    requires_head: ClassVar[bool] = False
    input_array: ClassVar[str] = "features"
    runner_params: ClassVar[frozenset[str]] = frozenset()
    # runner parameters that ``fit`` alone uses (NegLabel's corpus): saved as None, so a file
    # holds what scoring needs (the fitted state), not the inputs it was mined from
    unsaved_params: ClassVar[frozenset[str]] = frozenset()
    differentiable: ClassVar[bool] = False
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {}
    # parameters added after files were first written, with the value that reproduces what such
    # an older file was fitted with (a file without ``covariance`` was fitted with 1/n)
    params_of_older_files: ClassVar[dict[str, Any]] = {}

    n_dims_: int

    def fit(self, features: Features, labels: Labels | None = None) -> Detector:
        raise NotImplementedError

    def score_samples(self, features: Features) -> Scores:
        """Return (n_samples,) float64 scores, higher = more in-distribution."""
        raise NotImplementedError

    def score_samples_torch(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable (n,) scores of an (n, D) tensor, as ``score_samples``; higher = ID.

        Detectors with ``differentiable = True`` implement it on the input's device, for fp16,
        bf16, fp32 and fp64 input, computing in at least float32. Others raise.
        """
        names = ", ".join(detector_names(lambda cls: cls.differentiable))
        raise InvalidParameterError(
            f"detector {self.name!r} has no differentiable score (score_samples_torch); "
            f"choose one that has: {names}"
        )

    # -- parameters ---------------------------------------------------------------------------
    @classmethod
    def check_params(cls, params: Mapping[str, Any], *, runner: bool = False) -> None:
        """Validate a user's parameter dict before any work; raise InvalidParameterError.

        Unknown names, wrong types and out-of-range values are refused in one line each.
        ``runner_params`` are refused (the runner computes them) unless ``runner=True`` (a
        loaded detector file, ``create_detector``), when they are checked like the others.
        Data-dependent limits (``k`` <= training samples) are checked by ``fit``.
        """
        names = cls._get_param_names()
        valid = names if runner else [name for name in names if name not in cls.runner_params]
        unknown = sorted(name for name in params if name not in valid)
        if unknown:
            given = [name for name in unknown if name in cls.runner_params]
            if given:
                raise InvalidParameterError(
                    f"parameter {given[0]!r} of detector {cls.name!r} is computed by the runner "
                    f"from the encoder; remove it from the detector's parameters"
                )
            quoted = ", ".join(repr(name) for name in unknown)
            raise InvalidParameterError(
                f"unknown parameter{'s' if len(unknown) > 1 else ''} {quoted} for detector "
                f"{cls.name!r}; valid parameters: {', '.join(sorted(valid)) or '(none)'}"
            )
        validate_values(cls._parameter_constraints, params, f"detector {cls.name!r}")

    @classmethod
    def param_info(cls) -> list[ParamInfo]:
        """The user-settable parameters (not ``runner_params``) in signature order."""
        signature = inspect.signature(cls.__init__)
        return [
            ParamInfo(
                name=name,
                default=signature.parameters[name].default,
                allowed=describe_constraints(cls._parameter_constraints[name]),
            )
            for name in signature.parameters
            if name != "self" and name not in cls.runner_params
        ]

    def _validate_params(self) -> None:
        """Check every constructor parameter (scikit-learn's hook; ``fit`` calls it first)."""
        self.check_params(self.get_params(deep=False), runner=True)

    # -- what a detector needs, for given parameters ------------------------------------------
    # The ClassVars above describe the detector with its default parameters. A detector whose
    # needs depend on its parameters (an ensemble: its members'; a head consumer: its head
    # sources) overrides these hooks, and the runner asks them, with the user's parameters
    # (a DetectorSpec's ``params``), instead of reading the ClassVars.
    @classmethod
    def needs_labels(cls, params: Mapping[str, Any]) -> bool:
        """Whether running the detector with ``params`` needs class labels of the ID set."""
        return cls.requires_labels

    @classmethod
    def uses_labels(cls, params: Mapping[str, Any]) -> bool:
        """Whether ``fit`` uses class labels when the ID set has them (it may do without:
        SHE's ``auto`` mode); the runner passes them then, and refuses only on ``needs_labels``.
        """
        return cls.needs_labels(params)

    @classmethod
    def needs_text(cls, params: Mapping[str, Any]) -> bool:
        """Whether it needs class embeddings from a text tower (and the image projection)."""
        return cls.requires_text

    @classmethod
    def needs_head(cls, params: Mapping[str, Any]) -> bool:
        """Whether it needs a classifier head's weight and bias as arrays."""
        return cls.requires_head

    @classmethod
    def input_array_for(cls, params: Mapping[str, Any]) -> str:
        """The encoder output it consumes (``features`` or ``logits``)."""
        return cls.input_array

    @classmethod
    def is_differentiable(cls, params: Mapping[str, Any]) -> bool:
        """Whether ``score_samples_torch`` works with ``params``."""
        return cls.differentiable

    # -- torch helpers ------------------------------------------------------------------------
    def _torch_features(self, features: torch.Tensor, *, float64: bool = False) -> torch.Tensor:
        """Check a fitted detector's (n, D) tensor input; return it in the compute dtype.

        fp16 and bf16 become float32 (their range and precision are not enough for sums of
        squares); ``float64=True`` computes in float64 (float32 on MPS, which has no float64)
        where the numpy scores need it. The cast is differentiable: gradients flow back in the
        input's dtype.
        """
        import torch

        check_is_fitted(self)
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            raise InvalidParameterError(
                f"features must be a floating-point torch tensor, got {_short_repr(features)}"
            )
        if features.ndim != 2 or features.shape[1] != self.n_dims_:
            raise InvalidParameterError(
                f"features must have shape (n_samples, {self.n_dims_}), got {tuple(features.shape)}"
            )
        if float64:
            dtype = torch.float32 if features.device.type == "mps" else torch.float64
        else:
            dtype = torch.promote_types(features.dtype, torch.float32)
        return features.to(dtype)

    def _torch_constant(self, array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        """``array`` as a tensor on ``like``'s device and dtype, cached per fitted array.

        An attack calls ``score_samples_torch`` thousands of times; copying D × D matrices to
        the device each time would dominate. The cache is keyed by the array object, so a refit
        (new arrays) never reuses a stale tensor.
        """
        import torch

        cache: dict[tuple[int, str, str], tuple[np.ndarray, torch.Tensor]]
        cache = self.__dict__.setdefault("_torch_cache", {})
        key = (id(array), str(like.device), str(like.dtype))
        entry = cache.get(key)
        if entry is None or entry[0] is not array:
            # torch.tensor copies (once): read-only arrays of a loaded file raise no warning
            entry = (array, torch.tensor(array, device=like.device, dtype=like.dtype))
            cache[key] = entry
        return entry[1]

    def __getstate__(self) -> dict[str, Any]:
        # device tensors are a cache: copies, deep copies and pickles leave them behind
        state = dict(super().__getstate__())
        state.pop("_torch_cache", None)
        return state

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

    def _params_to_save(self) -> dict[str, Any]:
        """Constructor parameters to save (default: all); a file restores them on load.

        Runner arrays given as array-likes (nested lists: a head, class embeddings, or a list
        of them) are saved as arrays, the only form in which a file's runner parameters load.
        """
        params = dict(self.get_params(deep=False))
        for name in sorted(self.runner_params & params.keys()):
            value = params[name]
            if value is None or isinstance(value, np.ndarray):
                continue
            if "array-like" in self._parameter_constraints.get(name, []):
                params[name] = np.asarray(value)
            elif isinstance(value, (list, tuple)) and not any(
                isinstance(item, Detector) for item in value
            ):  # one array-like per entry (a probability ensemble's heads)
                params[name] = [None if item is None else np.asarray(item) for item in value]
        params.update(dict.fromkeys(self.unsaved_params & params.keys()))
        return params

    def _get_members(self) -> list[Detector]:
        """Fitted member detectors saved nested in the file (an ensemble's); default none."""
        return []

    def _set_members(self, members: list[Detector]) -> None:
        """Restore what ``_get_members`` returned (after ``_set_state``); validate them here."""
        if members:
            raise InvalidParameterError(
                f"detector {self.name!r} has no member detectors, got {len(members)}"
            )

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
    missing = set(cls._get_param_names()) - set(cls._parameter_constraints)
    if missing:  # a programming error, caught at import
        raise RuntimeError(f"detector {cls.name!r} has no constraints for {sorted(missing)}")
    DETECTORS[cls.name] = cls
    return cls


def create_detector(name: str, **params: Any) -> Detector:
    """Instantiate a registered detector by name with keyword hyperparameters.

    Parameters are validated first (``Detector.check_params`` with the runner's parameters
    allowed); a required runner parameter that is missing is named.
    """
    _ensure_registered()

    try:
        cls = DETECTORS[name]
    except KeyError:
        raise UnknownNameError("detector", name, DETECTORS) from None
    cls.check_params(params, runner=True)
    signature = inspect.signature(cls.__init__).parameters
    missing = [
        key
        for key, parameter in signature.items()
        if key != "self" and parameter.default is inspect.Parameter.empty and key not in params
    ]
    if missing:
        raise InvalidParameterError(
            f"detector {name!r} needs {', '.join(missing)} (computed by the runner from the "
            f"encoder's text tower); pass them to create_detector"
        )
    return cls(**params)


# -- save / load --------------------------------------------------------------------------------
#
# A detector file is one safetensors file: the arrays (``param.NAME``, ``state.NAME``) and, in
# the safetensors metadata, a JSON header (detector name, plain parameters and state, the
# caller's metadata), its ``sha256`` and, when a key was given, its ``hmac_sha256``.
# A parameter or state value that is a list of arrays (or None) is saved as arrays
# ``param.NAME.0``, ``param.NAME.1``, … with the list, its length and None entries, in the header.
# A detector with members (an ensemble) nests them: member i's header is entry i of the header's
# ``members`` list (a detector, params, state and, for a nested ensemble, members of its own), its
# arrays are ``member.i.param.NAME`` / ``member.i.state.NAME`` (``member.i.member.j.…`` nested).
# Both digests cover the whole header and every array, members included.
#
# What the two digests guarantee:
# * ``sha256`` (always) detects *accidental* damage: a truncated copy, a flipped bit. It is no
#   protection against a deliberate change: anyone who edits the file can recompute it.
# * ``hmac_sha256`` (with a key) is tamper evidence: HMAC-SHA256 of the same content with a key
#   only its holders know. Loading *with* the key refuses a file without an HMAC, a file whose
#   content was changed after signing (even with the sha256 recomputed), and a file signed with
#   another key. Loading *without* a key checks the sha256 only, so a forged file is accepted.
#   The HMAC says a key holder wrote this exact file; it does not hide the content, and it does
#   not stop one signed file from being swapped for another signed with the same key.
#
# Whatever the digests say, every loaded value is validated (parameters by the detector class,
# state names and finiteness, a probe score), so a forged or hand-edited file fails on load in
# one line, never later at score time. Nothing is ever unpickled.

KEY_ENV = "OODPROBE_DETECTOR_KEY"
"""Environment variable holding the HMAC key (its UTF-8 bytes) when no ``key`` is passed."""


def resolve_detector_key(key: bytes | None) -> bytes | None:
    """The HMAC key to use: ``key``, else ``$OODPROBE_DETECTOR_KEY`` (UTF-8) if set and non-empty.

    Raises InvalidParameterError for a key that is not non-empty bytes.
    """
    if key is None:
        value = os.environ.get(KEY_ENV)
        # os.fsencode undoes the surrogate escapes of a non-UTF-8 environment: the raw bytes
        return os.fsencode(value) if value else None
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise InvalidParameterError(
            f"a detector key must be non-empty bytes, got {type(key).__name__} of length "
            f"{len(key) if isinstance(key, (bytes, bytearray, str)) else '?'}; pass the bytes of "
            f"a secret (e.g. Path('key').read_bytes()) or set {KEY_ENV}"
        )
    return bytes(key)


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
        elif _is_array_list(value):
            plain[key] = [None] * len(value)
            for index, item in enumerate(value):
                if item is None:
                    continue
                if item.dtype == object:
                    raise DetectorFileError(f"cannot save object array {key!r}")
                arrays[f"{prefix}{key}.{index}"] = np.ascontiguousarray(item)
        elif isinstance(value, (list, tuple, dict, *_JsonScalar)):
            plain[key] = value
        else:
            raise DetectorFileError(
                f"cannot save attribute {key!r} of type {type(value).__name__} without pickle"
            )
    return arrays, plain


def _is_array_list(value: Any) -> bool:
    """A list (or tuple) of arrays and Nones, at least one an array (saved as arrays)."""
    return (
        isinstance(value, (list, tuple))
        and any(isinstance(item, np.ndarray) for item in value)
        and all(item is None or isinstance(item, np.ndarray) for item in value)
    )


def _encode_detector(
    detector: Detector, prefix: str = ""
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays (named under ``prefix``) and the header node of a fitted detector, members
    nested (``members``: their nodes; their arrays under ``{prefix}member.{i}.``)."""
    check_is_fitted(detector)
    param_arrays, params = _split_arrays(f"{prefix}param.", detector._params_to_save())
    state_arrays, state = _split_arrays(f"{prefix}state.", detector._get_state())
    arrays = {**param_arrays, **state_arrays}
    node: dict[str, Any] = {"detector": detector.name, "params": params, "state": state}
    members = detector._get_members()
    if members:  # absent for a plain detector: its header is what it always was
        node["members"] = []
        for index, member in enumerate(members):
            member_arrays, member_node = _encode_detector(member, f"{prefix}member.{index}.")
            arrays.update(member_arrays)
            node["members"].append(member_node)
    return arrays, node


def _feed(update: Callable[[bytes], Any], arrays: dict[str, np.ndarray], header: str) -> None:
    """Feed the checksummed content (header, then each array's name, dtype, shape and bytes)."""
    update(header.encode())
    for key in sorted(arrays):
        array = arrays[key]
        update(f"{key}|{array.dtype.str}|{array.shape}".encode())
        update(array.tobytes())


def _digest(arrays: dict[str, np.ndarray], header: str) -> str:
    digest = hashlib.sha256()
    _feed(digest.update, arrays, header)
    return digest.hexdigest()


def _hmac(key: bytes, arrays: dict[str, np.ndarray], header: str) -> str:
    import hmac

    mac = hmac.new(key, digestmod=hashlib.sha256)
    _feed(mac.update, arrays, header)
    return mac.hexdigest()


def save_detector(
    detector: Detector,
    path: str | os.PathLike[str],
    metadata: dict[str, Any] | None = None,
    *,
    key: bytes | None = None,
) -> Path:
    """Save a fitted detector atomically to one ``.safetensors`` file (no pickle).

    ``metadata`` (JSON-able, finite numbers; e.g. the encoder and a calibrated threshold) is
    stored in the checksummed header and returned by :func:`load_detector_with_metadata`.
    The file always carries a sha256 of its content, which detects accidental damage but not a
    deliberate change (anyone can recompute it). With ``key`` (or ``$OODPROBE_DETECTOR_KEY``)
    it also carries an HMAC-SHA256 with that key: tamper evidence, checked on load with the key.
    """
    from safetensors.numpy import save_file
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(detector)
    secret = resolve_detector_key(key)
    path = Path(path)
    if path.is_dir():
        raise InvalidParameterError(
            f"cannot save the detector to {path}: it is a folder; give a file name such as "
            f"{path / 'detector.safetensors'}"
        )
    arrays, node = _encode_detector(detector)
    try:
        header = json.dumps(
            {**node, "metadata": metadata or {}},
            sort_keys=True,
            allow_nan=False,  # a NaN threshold would reject everything: refuse to write it
        )
    except (TypeError, ValueError) as error:
        raise DetectorFileError(
            f"cannot save detector {detector.name!r}: its parameters, state or metadata are not "
            f"plain JSON with finite numbers ({error})"
        ) from None
    file_metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "header": header,
        "sha256": _digest(arrays, header),
    }
    if secret is not None:
        file_metadata["hmac_sha256"] = _hmac(secret, arrays, header)
    # safetensors refuses an empty dict; a marker keeps the format uniform.
    payload = arrays or {"_empty": np.zeros(0, np.float32)}
    return atomic_write(path, lambda tmp: save_file(payload, str(tmp), metadata=file_metadata))


def load_detector(path: str | os.PathLike[str], *, key: bytes | None = None) -> Detector:
    """Load a detector saved by :func:`save_detector`; see :func:`load_detector_with_metadata`."""
    return load_detector_with_metadata(path, key=key)[0]


def load_detector_with_metadata(
    path: str | os.PathLike[str], *, key: bytes | None = None
) -> tuple[Detector, dict[str, Any]]:
    """Load a detector and the metadata saved with it, verifying and validating everything.

    Checks, each failing with a one-line DetectorFileError naming the file: format and version;
    the sha256 (accidental damage); with ``key`` (or ``$OODPROBE_DETECTOR_KEY``) the HMAC
    (tampering: a file without an HMAC, a modified file, another key); then every value: the
    detector name, its parameters (by the detector class's own checks), state names, finite
    numbers, and a probe score, so a file missing a state field fails here.
    Without a key, a file whose content and sha256 were both rewritten is accepted: only the
    HMAC detects a deliberate change.
    """
    import hmac

    from safetensors import safe_open

    _ensure_registered()

    secret = resolve_detector_key(key)
    path = Path(path)
    if not path.is_file():
        raise DetectorFileError(f"detector file not found: {path}")
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises several types for damaged files
        raise DetectorFileError(
            f"{path} is not a readable oodprobe detector file ({_one_line(error)}); save it again"
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
    if secret is not None:
        recorded = metadata.get("hmac_sha256")
        if recorded is None:
            raise DetectorFileError(
                f"{path} has no HMAC: it was saved without a key, so a key cannot verify it; "
                f"save it again with the key, or load it without one (checksum only)"
            )
        expected = _hmac(secret, arrays, header)
        if not hmac.compare_digest(expected.encode(), recorded.encode("utf-8", "replace")):
            raise DetectorFileError(
                f"{path} failed its HMAC check: modified, or signed with another key"
            )
    content = _parse_header(path, header)
    detector = _decode_detector(path, str(path), content, arrays, "")
    return detector, dict(content["metadata"])


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _parse_header(path: Path, header: str) -> dict[str, Any]:
    """The header's JSON object, with a ``metadata`` object (its detector checked later)."""
    try:
        content = json.loads(header)
    except ValueError as error:
        raise DetectorFileError(f"{path} has an invalid header: {error}") from None
    if not isinstance(content, dict):
        raise DetectorFileError(f"{path} has an invalid header: not a JSON object")
    if not isinstance(content.get("metadata"), dict):
        raise DetectorFileError(
            f"{path} has an invalid header: 'metadata' must be a JSON object, got "
            f"{content.get('metadata')!r:.60}"
        )
    return content


def _decode_detector(
    path: Path, where: str, node: Any, arrays: dict[str, np.ndarray], prefix: str
) -> Detector:
    """Build and validate the detector of one header node and its arrays (names under
    ``prefix``), its members first; ``where`` names it in messages (the file, or the file and
    the member: ``detector.safetensors (member.1)``)."""
    from oodprobe.errors import OodprobeError

    cls, params, state, member_nodes = _parse_node(where, node)
    children: list[dict[str, np.ndarray]] = [{} for _ in member_nodes]
    for name, value in arrays.items():
        kind, _, attribute = name.partition(".")
        if kind == "member":
            index, _, rest = attribute.partition(".")
            if index.isdigit() and str(int(index)) == index and int(index) < len(children) and rest:
                children[int(index)][rest] = value
                continue
        elif kind in ("param", "state") and attribute:
            values = params if kind == "param" else state
            if _place_array(values, attribute, value):
                continue
        raise DetectorFileError(f"{where} has an unexpected array {prefix + name!r}; save it again")
    params = {**cls.params_of_older_files, **params}
    _check_loaded_params(where, cls, params)
    _check_loaded_state(where, cls, state)
    members = [
        _decode_detector(
            path,
            f"{path} ({prefix}member.{index})",
            member_node,
            children[index],
            f"{prefix}member.{index}.",
        )
        for index, member_node in enumerate(member_nodes)
    ]
    try:
        detector = cls(**params)
        detector._set_state(state)
        detector._set_members(members)
    except OodprobeError as error:
        raise DetectorFileError(f"{where} holds an invalid {cls.name} detector: {error}") from None
    except (TypeError, ValueError, LookupError) as error:  # a state the class cannot take
        raise DetectorFileError(
            f"{where} holds an invalid {cls.name} detector: {_one_line(error)}"
        ) from None
    _probe(where, detector, state)
    return detector


def _place_array(values: dict[str, Any], attribute: str, value: np.ndarray) -> bool:
    """Put a loaded array in ``values``: ``NAME`` itself, or ``NAME.i`` into entry i of the
    header's list ``NAME`` (a None placeholder); False when it belongs nowhere."""
    if attribute.isidentifier():
        if attribute in values:
            return False
        values[attribute] = value
        return True
    name, _, index = attribute.rpartition(".")
    target = values.get(name)
    if not (name.isidentifier() and index.isdigit() and str(int(index)) == index):
        return False
    if not isinstance(target, list) or int(index) >= len(target) or target[int(index)] is not None:
        return False
    target[int(index)] = value
    return True


def _parse_node(
    where: str, content: Any
) -> tuple[type[Detector], dict[str, Any], dict[str, Any], list[Any]]:
    """(class, plain params, plain state, member nodes) of a header node, each of the right type."""
    if not isinstance(content, dict):
        raise DetectorFileError(f"{where} has an invalid header: not a JSON object")
    for field, kind in (("detector", str), ("params", dict), ("state", dict)):
        if not isinstance(content.get(field), kind):
            raise DetectorFileError(
                f"{where} has an invalid header: {field!r} must be a JSON "
                f"{'string' if kind is str else 'object'}, got {content.get(field)!r:.60}"
            )
    members = content.get("members", [])
    if not isinstance(members, list) or (not members and "members" in content):
        raise DetectorFileError(
            f"{where} has an invalid header: 'members' must be a non-empty JSON list, got "
            f"{members!r:.60}"
        )
    cls = DETECTORS.get(content["detector"])
    if cls is None:
        raise DetectorFileError(
            f"{where} holds a detector {content['detector']!r} this oodprobe does not have; "
            f"choose from: {', '.join(sorted(DETECTORS))}"
        )
    return cls, dict(content["params"]), dict(content["state"]), members


def _check_loaded_params(path: Path | str, cls: type[Detector], params: dict[str, Any]) -> None:
    """Exactly the class's parameters, valid by its own checks; runner arrays finite."""
    expected = set(cls._get_param_names())
    missing, unknown = sorted(expected - set(params)), sorted(set(params) - expected)
    if missing or unknown:
        problem = "; ".join(
            text
            for text in (
                f"missing parameter(s) {', '.join(missing)}" if missing else "",
                f"unknown parameter(s) {', '.join(unknown)}" if unknown else "",
            )
            if text
        )
        raise DetectorFileError(
            f"{path} does not hold a valid {cls.name} detector: {problem}; refit and save it"
        )
    runner = frozenset(getattr(cls, "runner_params", frozenset()))
    for name in sorted(runner & set(params)):
        value = params[name]
        items = value if isinstance(value, list) else [value]  # a list: one array per head
        if not all(
            item is None or (isinstance(item, np.ndarray) and _finite(item)) for item in items
        ):
            raise DetectorFileError(
                f"{path} holds an invalid {cls.name} detector: parameter {name} must be a finite "
                f"array, got {_describe(value)}"
            )
    from oodprobe.errors import OodprobeError

    check_params = getattr(cls, "check_params", None)  # Detector.check_params, the one home
    if check_params is None:
        return
    try:
        check_params(params, runner=True)  # the class's own checks, as for a user's params
    except OodprobeError as error:
        raise DetectorFileError(f"{path} holds an invalid {cls.name} detector: {error}") from None


def _check_loaded_state(path: Path | str, cls: type[Detector], state: dict[str, Any]) -> None:
    """State names are fitted-attribute names the class does not define; numbers are finite."""
    for name, value in state.items():
        if (
            not name.isidentifier()
            or not name.endswith("_")
            or name.startswith("_")
            or hasattr(cls, name)
        ):
            raise DetectorFileError(
                f"{path} holds an invalid {cls.name} detector: {name!r} is not a state field"
            )
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        if isinstance(value, float) and not np.isfinite(value):
            raise DetectorFileError(
                f"{path} holds an invalid {cls.name} detector: state field {name} is {value}"
            )
        if not _finite_value(value):
            raise DetectorFileError(
                f"{path} holds an invalid {cls.name} detector: state field {name} has non-finite "
                f"values (NaN or infinity)"
            )
    n_dims = state.get("n_dims_")
    if n_dims is None:
        raise DetectorFileError(
            f"{path} holds an invalid {cls.name} detector: missing state field n_dims_; refit "
            f"and save it"
        )
    if isinstance(n_dims, bool) or not isinstance(n_dims, int) or n_dims < 1:
        raise DetectorFileError(
            f"{path} holds an invalid {cls.name} detector: state field n_dims_ must be an "
            f"integer >= 1, got {n_dims!r}"
        )


def _probe(path: Path | str, detector: Detector, state: dict[str, Any]) -> None:
    """Score two rows now, so a missing or misshapen state field fails on load, not later."""
    import warnings

    probe = np.ones((2, int(state["n_dims_"])), dtype=np.float32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = np.asarray(detector.score_samples(probe))
    except AttributeError as error:
        field = f"state field {error.name}" if error.name else _one_line(error)
        raise DetectorFileError(
            f"{path} holds an invalid {detector.name} detector: missing {field}; refit and save it"
        ) from None
    except Exception as error:  # any failure here is the file's: its state does not fit
        raise DetectorFileError(
            f"{path} holds an invalid {detector.name} detector: its state does not score "
            f"({type(error).__name__}: {_one_line(error)}); refit and save it"
        ) from None
    if scores.shape != (2,):
        raise DetectorFileError(
            f"{path} holds an invalid {detector.name} detector: it scores 2 rows as an array of "
            f"shape {scores.shape}; refit and save it"
        )


def _finite_value(value: Any) -> bool:
    """Whether an array, a number, or the arrays and numbers of a list hold no NaN or infinity
    (JSON parsing accepts ``NaN`` and ``Infinity``, so a forged header can hold them)."""
    if isinstance(value, np.ndarray):
        return _finite(value)
    if isinstance(value, float):
        return bool(np.isfinite(value))
    if isinstance(value, list):
        return all(_finite_value(item) for item in value)
    return True


def _finite(array: np.ndarray) -> bool:
    """Whether a numeric array holds no NaN or infinity (integer and byte arrays always do)."""
    return not np.issubdtype(array.dtype, np.inexact) or bool(np.isfinite(array).all())


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array with non-finite values"
    return f"{type(value).__name__} {value!r:.40}"


def detector_names(predicate: Callable[[type[Detector]], bool] | None = None) -> list[str]:
    """Registered detector names, optionally filtered by a predicate on the class."""
    _ensure_registered()

    return sorted(name for name, cls in DETECTORS.items() if predicate is None or predicate(cls))
