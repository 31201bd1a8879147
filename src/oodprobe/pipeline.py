"""What the benchmark runner and deployment share: checking and building detectors over encoders.

Both ``benchmark`` and ``deploy`` sit above this module; it sits above ``features``,
``encoders`` and ``detectors``. Everything here that can fail on user input fails before any
image is decoded: detector names and parameters (:func:`check_detector_specs`), detector ×
data × encoder compatibility (:func:`check_compatibility`, with what an encoder's *name* already
tells, so no model is loaded to refuse a run), and the device (:func:`check_device`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from oodprobe.errors import InvalidParameterError, UnknownNameError

if TYPE_CHECKING:
    from oodprobe.benchmark_spec import DetectorSpec
    from oodprobe.detectors import Detector
    from oodprobe.features import FeatureSet


@dataclass(frozen=True)
class EncoderTraits:
    """What a detector may need of an encoder: a text tower, and which arrays it outputs.

    ``None`` means unknown until the encoder is built (e.g. a Hugging Face id, which may be a
    CLIP or a DINOv2); the check then runs again on the built encoder.
    """

    has_text: bool | None
    outputs: tuple[str, ...] | None


def encoder_traits(encoder: Any) -> EncoderTraits:
    """Traits of a built encoder, or of an encoder *name* without building it."""
    if isinstance(encoder, str):
        from oodprobe.encoders import encoder_name_traits

        has_text, outputs = encoder_name_traits(encoder)
        return EncoderTraits(has_text, outputs)
    from oodprobe.encoders import TextImageEncoder

    return EncoderTraits(isinstance(encoder, TextImageEncoder), tuple(encoder.outputs))


def check_detector_specs(detectors: Iterable[DetectorSpec]) -> None:
    """Every detector name is registered and its parameters are valid for its class."""
    from oodprobe.detectors import DETECTORS, detector_names

    detector_names()  # imports the registry
    for detector in detectors:
        cls = DETECTORS.get(detector.name)
        if cls is None:
            raise UnknownNameError("detector", detector.name, DETECTORS)
        cls.check_params(dict(detector.params))
        device = detector.params.get("device", "auto")  # probes train on a device of their own
        if device != "auto":
            check_device(device)


def detector_params(spec: DetectorSpec) -> dict[str, Any]:
    """Every user-facing parameter of a detector spec, defaults filled in (JSON-able values)."""
    from oodprobe.detectors import DETECTORS

    defaults = {info.name: info.default for info in DETECTORS[spec.name].param_info()}
    return {**defaults, **dict(spec.params)}


def check_compatibility(
    detectors: Sequence[DetectorSpec],
    *,
    labelled: bool,
    id_label: str,
    encoders: dict[str, Any],
) -> None:
    """Fail fast, before any extraction, on detectors the data or encoders cannot serve.

    ``encoders`` maps names to built encoders or to ``None`` (judged from the name alone).
    """
    from oodprobe.detectors import DETECTORS

    for detector in detectors:
        cls = DETECTORS[detector.name]
        if cls.fit_labels != "classes":
            raise InvalidParameterError(
                f"detector {detector.name!r} is fitted on clean vs attacked images (labels "
                f"1 / 0), not on the ID training set; it detects attacks beside `oodprobe "
                f"attack`, not in bench, study or fit"
            )
        if cls.requires_labels and not labelled:
            raise InvalidParameterError(
                f"detector {detector.name!r} needs class labels, but the ID training data "
                f"{id_label!r} has none; use a folder with one subfolder per class, "
                f"or a label-free detector (knn, deep-knn, gaussian)"
            )
        for name, encoder in encoders.items():
            traits = encoder_traits(name if encoder is None else encoder)
            if cls.requires_text and traits.has_text is False:
                raise InvalidParameterError(
                    f"detector {detector.name!r} needs a vision-language encoder with a text "
                    f"tower (openclip:…, hf: CLIP/SigLIP), but {name!r} is image-only"
                )
            if traits.outputs is not None and cls.input_array not in traits.outputs:
                raise InvalidParameterError(
                    f"detector {detector.name!r} scores the encoder's {cls.input_array}, and "
                    f"{name!r} gives only: {', '.join(traits.outputs)}"
                )


def check_device(device: str) -> str:
    """The device string, refused in one line when this machine has no such device."""
    from oodprobe.features import select_device

    select_device(device)
    return device


def detector_input(detector: Detector, features: FeatureSet) -> np.ndarray:
    """The array a detector consumes: the features, or the classifier logits for ``logits``."""
    name = type(detector).input_array
    array = features.arrays.get(name)
    if array is None:
        raise InvalidParameterError(
            f"detector {type(detector).name!r} needs the encoder's {name}, and "
            f"{features.encoder_name!r} has none (it gives: {', '.join(features.arrays)})"
        )
    return np.asarray(array)


def needs_text(detectors: Iterable[DetectorSpec]) -> bool:
    """Whether any of the detectors needs class embeddings from a text encoder."""
    from oodprobe.detectors import DETECTORS

    return any(DETECTORS[d.name].requires_text for d in detectors)


def compute_text_embeddings(
    encoder: Any, class_names: Sequence[str] | None, prompts: str | Sequence[str]
) -> np.ndarray:
    """(C, E) class embeddings of ``class_names`` under a named prompt set or a prompt list."""
    from oodprobe.encoders.text import PROMPT_SETS, compute_class_embeddings

    if not class_names:
        raise InvalidParameterError(
            "text detectors need class names: set [id].class_names in the config (or "
            "--class-names) or use a dataset with named classes"
        )
    prompt_list = PROMPT_SETS[prompts] if isinstance(prompts, str) else tuple(prompts)
    return compute_class_embeddings(encoder, list(class_names), prompt_list)


def build_detector(
    spec: DetectorSpec, encoder: Any, class_embeddings: np.ndarray | None
) -> Detector:
    """Instantiate a detector; text detectors get class embeddings and the image projection."""
    from oodprobe.detectors import DETECTORS, create_detector

    params = dict(spec.params)
    if DETECTORS[spec.name].requires_text:
        projection = encoder.image_projection
        params["class_embeddings"] = class_embeddings
        params["image_projection"] = (
            None if projection is None else projection.detach().float().cpu().numpy()
        )
    return create_detector(spec.name, **params)
