"""What the benchmark runner and deployment share: checking and building detectors over encoders.

Both ``benchmark`` and ``deploy`` sit above this module; it sits above ``features``,
``encoders`` and ``detectors``. Everything here that can fail on user input fails before any
image is decoded: detector names and parameters (:func:`check_detector_specs`), detector ×
data × encoder compatibility (:func:`check_compatibility`, with what an encoder's *name* already
tells, so no model is loaded to refuse a run), and the device (:func:`check_device`).

The post-hoc detectors (``requires_head``) get their classifier head here as arrays
(:func:`resolve_head`), from the source their ``head`` parameter names: the encoder's own
classifier (stored with its features), a linear probe fitted on the labelled ID training
features, or a CLIP zero-shot head of class embeddings.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from oodprobe.errors import InvalidParameterError, UnknownNameError

if TYPE_CHECKING:
    from oodprobe.benchmark_spec import DetectorSpec, MiningSpec
    from oodprobe.detectors import Detector
    from oodprobe.features import FeatureSet
    from oodprobe.mining import MinedLabels


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


def check_detector_specs(detectors: Sequence[DetectorSpec]) -> None:
    """Every detector name is registered, its parameters are valid for its class, and every
    corpus the runner would embed for it (NegLabel's ``corpus``, a member's too) is there."""
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
    from oodprobe.corpus import check_corpus_source

    # a corpus is the runner's to load (a fitted or loaded detector holds its negatives only)
    for source in corpus_sources(detectors):
        check_corpus_source(source)


def detector_params(spec: DetectorSpec) -> dict[str, Any]:
    """Every user-facing parameter of a detector spec, defaults filled in (JSON-able values)."""
    from oodprobe.detectors import DETECTORS

    defaults = {info.name: info.default for info in DETECTORS[spec.name].param_info()}
    return {**defaults, **dict(spec.params)}


def head_source(spec: DetectorSpec) -> str | None:
    """Where a post-hoc detector's head comes from (``encoder``, ``probe``, ``zero-shot``).

    None for a detector without one ``head`` (no head, or an ensemble's several: see
    :func:`head_sources`). The detector's default fills in an unset ``head``.
    """
    from oodprobe.detectors import DETECTORS

    cls = DETECTORS[spec.name]
    if not cls.requires_head or "head" not in cls._get_param_names():
        return None
    return str(detector_params(spec).get("head", "encoder"))


def head_sources(spec: DetectorSpec) -> tuple[str, ...]:
    """Every head source the runner resolves for a detector: its ``head``, or the ``heads`` of
    a probability ensemble (``prob-ensemble``), in order; () for a detector without a head.
    A score ensemble's members are separate detectors (:func:`member_specs`)."""
    from oodprobe.detectors import DETECTORS

    source = head_source(spec)
    if source is not None:
        return (source,)
    if DETECTORS[spec.name].runner_params >= _HEAD_LISTS:
        from oodprobe.detectors.ensemble import prob_ensemble_heads

        return prob_ensemble_heads(spec.params)
    return ()


_HEAD_LISTS = frozenset({"head_weights", "head_biases", "image_projections"})


def member_specs(spec: DetectorSpec) -> list[DetectorSpec]:
    """The member detectors the runner builds for a score ensemble (``member_detectors``);
    [] for any other detector."""
    from oodprobe.detectors import DETECTORS

    if "member_detectors" not in DETECTORS[spec.name].runner_params:
        return []
    from oodprobe.detectors.ensemble import ensemble_member_specs

    return ensemble_member_specs(spec.params)


def needs_labels(spec: DetectorSpec) -> bool:
    """Whether running the detector needs ID class labels: for its ``fit``
    (``Detector.needs_labels``), for a probe head, or for a score ensemble's member."""
    from oodprobe.detectors import DETECTORS
    from oodprobe.detectors.posthoc import head_kinds

    return (
        DETECTORS[spec.name].needs_labels(spec.params)
        or "probe" in head_kinds(head_sources(spec))
        or any(needs_labels(member) for member in member_specs(spec))
    )


def fit_labels(detector: Detector, spec: DetectorSpec, labels: np.ndarray | None) -> Any:
    """The ``labels`` to pass to a built detector's ``fit``: ``labels`` when its fit uses them
    (``Detector.uses_labels`` with the spec's params: a labelled member of an ensemble too),
    else None. ``labels`` are those the detector was built with (``train``'s): under a probe or
    zero-shot head they become the indices of its rows (row c: the c-th sorted class), which
    is what a post-hoc detector fitted on labels (``temp-msp``) takes."""
    if labels is None or not type(detector).uses_labels(spec.params):
        return None
    from oodprobe.detectors.posthoc import head_row_labels

    return head_row_labels(labels, head_source(spec) or "encoder")


def encoder_has_head(encoder: Any) -> bool | None:
    """Whether an encoder (built, or a *name*) has a linear classifier head; None: unknown.

    A name tells only whether the model gives ``logits`` (EfficientNet-Lite, ``finetuned:``
    yes; intermediate variants, open_clip no; a timm name not until it is built); a built
    encoder answers with :meth:`~oodprobe.encoders.base.ImageEncoder.head_arrays`.
    """
    if isinstance(encoder, str):
        outputs = encoder_traits(encoder).outputs
        return None if outputs is None or "logits" in outputs else False
    head_arrays = getattr(encoder, "head_arrays", None)
    return head_arrays is not None and head_arrays() is not None


def head_encoder(detector: str, source: str, name: str, encoder: Any) -> tuple[str, Any]:
    """(name, encoder or name) of what a head source reads: the encoder, or for ``SOURCE@K``
    part K of a concatenation (``concat:A+B``). InvalidParameterError for a part of an encoder
    that is not a concatenation, or one it does not have."""
    from oodprobe.detectors.posthoc import parse_head_source
    from oodprobe.encoders.concat import ConcatEncoder, ConcatTextEncoder, split_concat_name

    kind, part = parse_head_source(source)
    target = name if encoder is None else encoder
    if part is None:
        if kind == "zero-shot" and isinstance(encoder, ConcatEncoder):
            return name, encoder  # the concatenation's text part (ConcatTextEncoder)
        return name, target
    parts = split_concat_name(name) if encoder is None else None
    if encoder is not None and isinstance(encoder, ConcatEncoder):
        index = encoder.part_index(part, f"detector {detector!r}'s head {source!r}")
        chosen = encoder.part_encoders[index]
        if (
            kind == "zero-shot"
            and isinstance(encoder, ConcatTextEncoder)
            and index != encoder.text_part
            and encoder_traits(chosen).has_text
        ):
            raise _not_the_text_part(detector, source, encoder.name, encoder.text_part)
        return chosen.name, chosen
    if parts is None:
        raise InvalidParameterError(
            f"detector {detector!r}'s head {source!r} names part {part} of a concat: encoder, "
            f"but {name!r} is not one; write head={kind!r}, or an encoder 'concat:A+B'"
        )
    if not 1 <= part <= len(parts):
        raise InvalidParameterError(
            f"detector {detector!r}'s head {source!r} names part {part} of {name!r}, which has "
            f"parts 1 to {len(parts)}"
        )
    if kind == "zero-shot" and encoder_traits(parts[part - 1]).has_text is not False:
        text_part = _first_text_part(parts)  # the part a ConcatTextEncoder embeds texts with
        if text_part is not None and text_part != part - 1:
            raise _not_the_text_part(detector, source, name, text_part)
    return parts[part - 1], parts[part - 1]


def _first_text_part(parts: Sequence[str]) -> int | None:
    """The 0-based index of the first part name with a text tower; None when there is none, or
    when a part before it can only tell once built (``hf:``)."""
    for index, part in enumerate(parts):
        has_text = encoder_traits(part).has_text
        if has_text is not False:
            return index if has_text else None
    return None


def _not_the_text_part(
    detector: str, source: str, name: str, text_part: int | None
) -> InvalidParameterError:
    """A zero-shot head on a part of concatenation ``name`` other than its text part (0-based
    ``text_part``, None: it has none): the class embeddings are that part's."""
    where = (
        ", and it has none"
        if text_part is None
        else f" (part {text_part + 1}); write 'zero-shot@{text_part + 1}'"
    )
    return InvalidParameterError(
        f"detector {detector!r} with head={source!r}: the zero-shot head of {name!r} is its "
        f"first part with a text tower{where}"
    )


def check_compatibility(
    detectors: Sequence[DetectorSpec],
    *,
    labelled: bool,
    id_label: str,
    encoders: dict[str, Any],
) -> None:
    """Fail fast, before any extraction, on detectors the data or encoders cannot serve.

    ``encoders`` maps names to built encoders or to ``None`` (judged from the name alone).
    A post-hoc detector's head is checked too: ``encoder`` needs an encoder with a linear
    classifier head, ``probe`` labelled ID data, ``zero-shot`` a text tower; ``SOURCE@K`` needs
    a concatenation with a part K that has what the source needs (:func:`head_encoder`).
    """
    from oodprobe.detectors import DETECTORS
    from oodprobe.detectors.posthoc import head_kinds, parse_head_source

    for detector in detectors:
        cls = DETECTORS[detector.name]
        sources = head_sources(detector)
        heads = head_kinds(sources)
        members = member_specs(detector)
        if members:  # each member as the runner builds it (its name in the message)
            check_compatibility(members, labelled=labelled, id_label=id_label, encoders=encoders)
        if cls.fit_labels != "classes":
            raise InvalidParameterError(
                f"detector {detector.name!r} is fitted on clean vs attacked images (labels "
                f"1 / 0), not on the ID training set; it detects attacks beside `oodprobe "
                f"attack`, not in bench, study or fit"
            )
        if "probe" in heads and not labelled:
            raise InvalidParameterError(
                f"detector {detector.name!r} with head='probe' scores a linear probe fitted on "
                f"the ID training labels, but {id_label!r} has none; use head='encoder' (the "
                f"encoder's own classifier) or head='zero-shot' (a CLIP text tower)"
            )
        if cls.needs_labels(detector.params) and "probe" not in heads and not labelled:
            raise InvalidParameterError(
                f"detector {detector.name!r} needs class labels, but the ID training data "
                f"{id_label!r} has none; use a folder with one subfolder per class, "
                f"or a label-free detector (knn, deep-knn, gaussian)"
            )
        for name, encoder in encoders.items():
            traits = encoder_traits(name if encoder is None else encoder)
            for source in sources:
                kind = parse_head_source(source)[0]
                part_name, part = head_encoder(detector.name, source, name, encoder)
                if kind == "zero-shot" and encoder_traits(part).has_text is False:
                    raise InvalidParameterError(
                        f"detector {detector.name!r} with head={source!r} needs a "
                        f"vision-language encoder with a text tower (openclip:…, hf: "
                        f"CLIP/SigLIP), but {part_name!r} is image-only; use head='encoder' or "
                        f"head='probe'"
                    )
                if kind == "encoder" and encoder_has_head(part) is False:
                    raise InvalidParameterError(
                        f"detector {detector.name!r} with head={source!r} scores the encoder's "
                        f"own classifier, and {part_name!r} has no linear classifier head on "
                        f"its features; use head='probe' (a linear probe on the labelled ID "
                        f"training features) or head='zero-shot' (a CLIP text tower)"
                    )
            if "no_class_embeddings" in cls.runner_params and not _is_clipn(name, encoder):
                raise InvalidParameterError(
                    f"detector {detector.name!r} scores CLIPN's 'no' text tower (Wang et al., "
                    f"ICCV 2023), which {name!r} has not; use a CLIPN checkpoint "
                    f"('clipn:ARCH/PATH')"
                )
            if cls.needs_text(detector.params) and not heads and traits.has_text is False:
                raise InvalidParameterError(
                    f"detector {detector.name!r} needs a vision-language encoder with a text "
                    f"tower (openclip:…, hf: CLIP/SigLIP), but {name!r} is image-only"
                )
            array = cls.input_array_for(detector.params)
            if traits.outputs is not None and array not in traits.outputs:
                raise InvalidParameterError(
                    f"detector {detector.name!r} scores the encoder's {array}, and "
                    f"{name!r} gives only: {', '.join(traits.outputs)}"
                )


def _is_clipn(name: str, encoder: Any) -> bool:
    """Whether an encoder (built, or judged by its name) has CLIPN's "no" text tower."""
    if encoder is not None:
        return hasattr(encoder, "encode_no_texts")
    from oodprobe.encoders import parse_encoder_name

    return parse_encoder_name(name).source.prefix == "clipn"


def check_device(device: str) -> str:
    """The device string, refused in one line when this machine has no such device."""
    from oodprobe.features import select_device

    select_device(device)
    return device


def detector_input(detector: Detector, features: FeatureSet) -> np.ndarray:
    """The array a detector consumes: the features, or the classifier logits for ``logits``."""
    name = type(detector).input_array_for(detector.get_params(deep=False))
    array = features.arrays.get(name)
    if array is None:
        raise InvalidParameterError(
            f"detector {type(detector).name!r} needs the encoder's {name}, and "
            f"{features.encoder_name!r} has none (it gives: {', '.join(features.arrays)})"
        )
    return np.asarray(array)


def needs_text(detectors: Iterable[DetectorSpec]) -> bool:
    """Whether any of the detectors needs class embeddings (text detectors, zero-shot heads)."""
    from oodprobe.detectors import DETECTORS
    from oodprobe.detectors.posthoc import head_kinds

    return any(
        DETECTORS[d.name].needs_text(d.params)
        or "zero-shot" in head_kinds(head_sources(d))
        or needs_text(member_specs(d))
        for d in detectors
    )


def id_class_names(class_names: Sequence[str] | None, dataset: Any) -> list[str] | None:
    """The class names text detectors and zero-shot heads prompt, in label order.

    The user's ``class_names`` when given; else the names of the classes the ID training
    ``dataset`` holds. A class selection (``classes = [0, 1, 2, 3, 4]``) keeps the dataset's
    full name list so that labels index it, but prompting the names of the classes left out —
    often the near-OOD set's — would score those OOD images as ID classes. Row ``c`` of the
    embeddings is then the c-th sorted class present, as for a probe's head.
    """
    if class_names:
        return list(class_names)
    names = dataset.class_names
    if not names:
        return None
    labels = dataset.labels
    if labels is None:
        return list(names)
    return [names[int(label)] for label in np.unique(labels)]


def require_class_names(class_names: Sequence[str] | None) -> list[str]:
    """The class list text detectors and zero-shot heads prompt; refused in one line if none."""
    if not class_names:
        raise InvalidParameterError(
            "text detectors need class names: set [id].class_names in the config (or "
            "--class-names) or use a dataset with named classes"
        )
    return list(class_names)


def compute_text_embeddings(
    encoder: Any, class_names: Sequence[str] | None, prompts: str | Sequence[str]
) -> np.ndarray:
    """(C, E) class embeddings of ``class_names`` under a named prompt set or a prompt list."""
    from oodprobe.encoders.text import compute_class_embeddings

    names = require_class_names(class_names)
    return compute_class_embeddings(encoder, names, _prompt_list(prompts))


def _prompt_list(prompts: str | Sequence[str]) -> tuple[str, ...]:
    from oodprobe.encoders.text import PROMPT_SETS

    return PROMPT_SETS[prompts] if isinstance(prompts, str) else tuple(prompts)


@dataclass
class TextArrays:
    """What the runner computes with an encoder's text tower for the detectors of a run.

    ``class_embeddings`` (C × E) of the ID class names; ``no_class_embeddings`` the same names
    through CLIPN's "no" tower (``clipn-atd``, ``clipn-ctw``), or None; ``corpora`` maps a
    corpus source (``wordnet``, a file) to the (N × E) embeddings of its terms without the ID
    class names (NegLabel's candidates), under the class embeddings' prompts.
    """

    class_embeddings: np.ndarray
    no_class_embeddings: np.ndarray | None = None
    corpora: dict[str, np.ndarray] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    mined: MinedLabels | None = None  # when the class names were mined (mine_class_names)


def _all_specs(detectors: Iterable[DetectorSpec]) -> list[DetectorSpec]:
    """The detectors and, recursively, a score ensemble's members."""
    found: list[DetectorSpec] = []
    for spec in detectors:
        found.append(spec)
        found.extend(_all_specs(member_specs(spec)))
    return found


def corpus_sources(detectors: Iterable[DetectorSpec]) -> list[str]:
    """The corpora the detectors mine labels from (NegLabel's ``corpus``), each once."""
    from oodprobe.detectors import DETECTORS

    sources: list[str] = []
    for spec in _all_specs(detectors):
        if "corpus_embeddings" in DETECTORS[spec.name].runner_params:
            source = str(detector_params(spec)["corpus"])
            if source not in sources:
                sources.append(source)
    return sources


def compute_text_arrays(
    encoder: Any,
    class_names: Sequence[str] | None,
    prompts: str | Sequence[str],
    detectors: Sequence[DetectorSpec],
    *,
    cache_root: str | os.PathLike[str] | None = None,
    progress: bool = True,
    mining: MiningSpec | None = None,
    train: FeatureSet | None = None,
    device: str | None = None,
) -> TextArrays:
    """The class embeddings, and what else the detectors need of the text tower.

    With ``mining`` the class names are mined from a corpus with the ID training features
    ``train`` (:func:`mine_class_names`) instead of given. A corpus is embedded on ``device``
    (``auto``, ``cpu``, ``cuda``; None: where the encoder is, the CPU after an extraction).

    CLIPN's no-embeddings use the same names and prompts as the class embeddings (CLIPN's
    ``merge_yes_no_feature`` runs one prompt list through both towers). A corpus is embedded
    with the same prompts and cached (:func:`oodprobe.corpus.corpus_embeddings`: a second run
    reads it); terms equal to an ID class name (ignoring case) are left out, so that an ID
    label is never mined as a negative.
    """
    from oodprobe.detectors import DETECTORS

    prompt_list = _prompt_list(prompts)
    root = None if cache_root is None else Path(cache_root)
    if mining is not None:
        if train is None:
            raise InvalidParameterError("mining class names needs the ID training features")
        text = mine_class_names(encoder, train, mining, prompt_list, root, progress, device)
        names = text.class_names
    else:
        names = require_class_names(class_names)
        text = TextArrays(compute_text_embeddings(encoder, names, prompt_list), class_names=names)
    specs = _all_specs(detectors)
    if any("no_class_embeddings" in DETECTORS[spec.name].runner_params for spec in specs):
        from oodprobe.encoders.clipn import compute_no_class_embeddings

        text.no_class_embeddings = compute_no_class_embeddings(encoder, names, prompt_list)
    sources = corpus_sources(detectors)
    if sources:
        from oodprobe.corpus import corpus_embeddings, load_corpus
        from oodprobe.encoders.text import clean_class_names

        id_names = {name.casefold() for name in clean_class_names(names)}
        for source in sources:
            corpus = load_corpus(source, cache_root=root)
            embeddings = corpus_embeddings(
                encoder, corpus, prompt_list, cache_root=root, progress=progress, device=device
            )
            keep = np.array([term.casefold() not in id_names for term in corpus.terms], bool)
            text.corpora[source] = embeddings[keep]
    return text


def joint_embeddings(encoder: Any, features: np.ndarray) -> np.ndarray:
    """(n, E) unit joint-space embeddings ``normalize(normalize(f) @ W_proj)`` of features (the
    features themselves, normalised, for an encoder without a projection)."""
    from oodprobe.detectors.text import joint_space

    projection = _projection(encoder)
    return joint_space(
        np.asarray(features), None if projection is None else projection.astype(np.float64)
    )


def mine_class_names(
    encoder: Any,
    train: FeatureSet,
    mining: MiningSpec,
    prompts: Sequence[str],
    cache_root: Path | None,
    progress: bool,
    device: str | None = None,
) -> TextArrays:
    """Class names mined from ``mining.corpus`` for the ID training images (ClusterMine-style,
    :func:`oodprobe.mining.mine_positive_labels`); their class embeddings are the corpus rows.

    The corpus is embedded with ``prompts`` (on ``device``) and cached. InvalidParameterError
    when fewer than two names are mined (the text detectors need two classes), saying what to
    change.
    """
    from oodprobe.corpus import corpus_embeddings, load_corpus
    from oodprobe.mining import mine_positive_labels

    corpus = load_corpus(mining.corpus, cache_root=cache_root)
    embeddings = corpus_embeddings(
        encoder, corpus, prompts, cache_root=cache_root, progress=progress, device=device
    )
    mined = mine_positive_labels(
        joint_embeddings(encoder, train.features),
        embeddings,
        corpus.terms,
        mining.clusters,
        names_per_cluster=mining.names_per_cluster,
        min_agreement=mining.min_agreement,
        seed=mining.seed,
    )
    if len(mined.names) < 2:
        raise InvalidParameterError(
            f"mining class names from {mining.corpus!r} found {len(mined.names)} name(s) for "
            f"{mining.clusters} clusters of {len(train)} images, and text detectors need two; "
            f"lower [id].mine.min_agreement (now {mining.min_agreement}) or change clusters"
        )
    return TextArrays(
        np.asarray(embeddings[mined.indices], np.float32),
        class_names=list(mined.names),
        mined=mined,
    )


def text_arrays_of(text: TextArrays | np.ndarray | None) -> TextArrays | None:
    """``text`` as TextArrays (bare class embeddings, as tests and older callers pass them)."""
    if text is None or isinstance(text, TextArrays):
        return text
    return TextArrays(np.asarray(text))


def build_detector(
    spec: DetectorSpec,
    encoder: Any,
    text: TextArrays | np.ndarray | None,
    *,
    train: FeatureSet | None = None,
) -> Detector:
    """Instantiate a detector with the arrays the runner computes for it.

    Text detectors get class embeddings (``text``: :class:`TextArrays` from
    :func:`compute_text_arrays`, or bare class embeddings) and the image projection when they
    score the encoder's ``features`` (GL-MCM's ``local`` tokens are in the joint space already),
    CLIPN's detectors the no-embeddings, NegLabel its corpus; post-hoc detectors their
    head (:func:`resolve_head`, from ``train``, the ID training features, and ``encoder``); a
    probability ensemble one head per entry of its ``heads`` (:func:`resolve_heads`); a score
    ensemble its members, each built by this function.
    """
    from oodprobe.detectors import DETECTORS, create_detector

    cls = DETECTORS[spec.name]
    params = dict(spec.params)
    arrays = text_arrays_of(text)
    class_embeddings = None if arrays is None else arrays.class_embeddings
    if cls.requires_text:
        params["class_embeddings"] = class_embeddings
        if cls.input_array_for(spec.params) == "features":
            params["image_projection"] = _projection(encoder)
    if "no_class_embeddings" in cls.runner_params:
        params["no_class_embeddings"] = None if arrays is None else arrays.no_class_embeddings
    if "corpus_embeddings" in cls.runner_params:
        source = str(detector_params(spec)["corpus"])
        params["corpus_embeddings"] = None if arrays is None else arrays.corpora.get(source)
    if head_source(spec) is not None:
        weight, bias, projection = resolve_head(spec, encoder, class_embeddings, train=train)
        params.update(head_weight=weight, head_bias=bias, image_projection=projection)
    elif cls.runner_params >= _HEAD_LISTS:
        resolved = resolve_heads(spec, encoder, class_embeddings, train=train)
        params.update(
            head_weights=[weight for weight, _, _ in resolved],
            head_biases=[bias for _, bias, _ in resolved],
            image_projections=[projection for _, _, projection in resolved],
        )
    if "member_detectors" in cls.runner_params:
        params["member_detectors"] = [
            build_detector(member, encoder, arrays, train=train) for member in member_specs(spec)
        ]
    return create_detector(spec.name, **params)


def _projection(encoder: Any) -> np.ndarray | None:
    """The encoder's image projection (D × E) as a float32 array, or None."""
    projection = getattr(encoder, "image_projection", None)
    return None if projection is None else projection.detach().float().cpu().numpy()


HeadParams = tuple[np.ndarray, np.ndarray, np.ndarray | None]
"""``(head_weight (C × D'), head_bias (C,), image_projection (D × D') or None)``."""


def resolve_head(
    spec: DetectorSpec,
    encoder: Any,
    class_embeddings: np.ndarray | None,
    *,
    train: FeatureSet | None = None,
) -> HeadParams:
    """The head arrays a post-hoc detector is built with, from the source ``head`` names.

    * ``encoder``: the classifier stored with ``train``'s features (``train.head``), else (no
      ``train``, or one of this very encoder without a stored head) ``encoder.head_arrays()``;
    * ``probe``: oodprobe's ``linear-probe`` (its defaults) fitted on ``train``'s features and
      labels, its standardisation folded into ``W`` and ``b``
      (:func:`~oodprobe.detectors.probe.fold_standardization`); fitted once per training set
      in a process, however many detectors use it;
    * ``zero-shot``: ``W = s · t_c`` for the unit class embeddings ``t_c`` and the encoder's
      CLIP logit scale ``s`` (100 where the model has none), ``b = 0``, and the encoder's image
      projection, or the identity when its features are already in the joint space, so the
      head sees ``normalize(f)`` as CLIP does.

    InvalidParameterError (one line) when the source is missing what it needs.
    """
    source = head_source(spec)
    if source is None:
        raise InvalidParameterError(f"detector {spec.name!r} has no head parameter")
    return _resolve_source(source, spec, encoder, class_embeddings, train)


def resolve_heads(
    spec: DetectorSpec,
    encoder: Any,
    class_embeddings: np.ndarray | None,
    *,
    train: FeatureSet | None = None,
) -> list[HeadParams]:
    """The heads of a probability ensemble, one per entry of its ``heads``, over one class list.

    Each is resolved as :func:`resolve_head` resolves that source. A probe's rows are the
    sorted labels of the training set; a head with one row per class name of the training set
    (the zero-shot head of a dataset whose class selection keeps some of its classes, the
    encoder's ImageNet head on ImageNet data) keeps the rows of those labels, so that column
    ``c`` is one class in every head. InvalidParameterError when the heads still differ in
    their number of classes.
    """
    from oodprobe.detectors.posthoc import head_kinds

    sources = head_sources(spec)
    heads = [_resolve_source(source, spec, encoder, class_embeddings, train) for source in sources]
    if "probe" in head_kinds(sources) and train is not None and train.labels is not None:
        classes = np.unique(train.labels)
        names = train.class_names

        def by_label(rows: int) -> bool:  # rows indexed by label: one per class name
            return rows != len(classes) and rows > int(classes.max()) and rows == len(names or ())

        heads = [
            (weight[classes], bias[classes], projection)
            if by_label(len(weight))
            else (weight, bias, projection)
            for weight, bias, projection in heads
        ]
    counts = {source: len(head[0]) for source, head in zip(sources, heads, strict=True)}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{source}: {count}" for source, count in counts.items())
        raise InvalidParameterError(
            f"detector {spec.name!r} averages the heads' class probabilities, and its heads "
            f"have different numbers of classes ({listing}); choose heads over the same classes "
            f"(e.g. heads = ['probe', 'zero-shot'] with the ID class names)"
        )
    return heads


def _resolve_source(
    source: str,
    spec: DetectorSpec,
    encoder: Any,
    class_embeddings: np.ndarray | None,
    train: FeatureSet | None,
) -> HeadParams:
    """One head of the named source (see :func:`resolve_head`); ``SOURCE@K`` reads only part
    K of a concatenated encoder (``oodprobe.encoders.concat``), its head padded with zeros."""
    from oodprobe.detectors.posthoc import parse_head_source

    kind, part = parse_head_source(source)
    if part is not None:
        return _resolve_part_source(kind, part, spec, encoder, class_embeddings, train)
    source = kind
    if source == "probe":
        if train is None or train.labels is None:
            raise InvalidParameterError(
                f"detector {spec.name!r} with head='probe' needs the labelled ID training "
                f"features to fit the probe on; pass train= (a FeatureSet with labels)"
            )
        weight, bias = probe_head(_probe_training_set(spec, train))
        return weight, bias, None
    if source == "zero-shot":
        if class_embeddings is None:
            raise InvalidParameterError(
                f"detector {spec.name!r} with head='zero-shot' needs class embeddings from the "
                f"encoder's text tower (compute_text_embeddings); pass class_embeddings"
            )
        return zero_shot_head(encoder, class_embeddings)
    head = None if train is None else train.head
    if head is None and (train is None or train.encoder_name == getattr(encoder, "name", None)):
        # a shared pass's encoder is not the variant's: its head is not the variant's head
        head = encoder.head_arrays() if hasattr(encoder, "head_arrays") else None
    if head is None:
        name = train.encoder_name if train is not None else getattr(encoder, "name", encoder)
        raise InvalidParameterError(
            f"detector {spec.name!r} with head='encoder' scores the encoder's own classifier, "
            f"and {name!r} has no linear classifier head on its features; use head='probe' or "
            f"head='zero-shot'"
        )
    weight, bias = head
    return np.asarray(weight, np.float32), np.asarray(bias, np.float32), None


def _probe_training_set(spec: DetectorSpec, train: FeatureSet) -> FeatureSet:
    """The rows of ``train`` a probe head is fitted on: all, or those the detector does not
    hold out for itself (``HeadDetector.probe_rows``: temp-msp fits its temperature on the
    rest, as Guo et al. fit it on data the classifier was not trained on)."""
    from oodprobe.detectors import DETECTORS

    probe_rows = getattr(DETECTORS[spec.name], "probe_rows", None)
    rows = None if probe_rows is None else probe_rows(spec.params, len(train))
    return train if rows is None else train.subset(rows)


def _resolve_part_source(
    kind: str,
    part: int,
    spec: DetectorSpec,
    encoder: Any,
    class_embeddings: np.ndarray | None,
    train: FeatureSet | None,
) -> HeadParams:
    """A head on part ``part`` (1-based) of a concatenation, as a head on all its columns."""
    from dataclasses import replace

    from oodprobe.encoders.concat import ConcatEncoder, ConcatTextEncoder

    source = f"{kind}@{part}"
    if not isinstance(encoder, ConcatEncoder):
        head_encoder(spec.name, source, str(getattr(encoder, "name", encoder)), None)
        raise AssertionError("head_encoder refuses a part of an encoder that is no concat:")
    index = encoder.part_index(part, f"detector {spec.name!r}'s head {source!r}")
    part_name = encoder.part_encoders[index].name
    if kind == "encoder":
        head = encoder.part_head_arrays(index)
        if head is None:
            raise InvalidParameterError(
                f"detector {spec.name!r} with head={source!r} scores the own classifier of "
                f"{part_name!r}, which has no linear classifier head; use 'probe@{part}'"
            )
        return head[0], head[1], None
    if kind == "zero-shot":
        if not isinstance(encoder, ConcatTextEncoder) or encoder.text_part != index:
            text_part = encoder.text_part if isinstance(encoder, ConcatTextEncoder) else None
            raise _not_the_text_part(spec.name, source, encoder.name, text_part)
        return _resolve_source("zero-shot", spec, encoder, class_embeddings, train)
    if train is None or train.labels is None:
        return _resolve_source("probe", spec, encoder, class_embeddings, train)  # refused there
    columns = encoder.part_slices[index]
    part_train = replace(
        train,
        arrays={"features": np.asarray(train.features[:, columns])},
        key=f"{train.key}:part{part}",
        head=None,
    )
    weight, bias = probe_head(_probe_training_set(spec, part_train))
    return encoder.pad_head(index, weight), bias, None


def zero_shot_head(encoder: Any, class_embeddings: np.ndarray) -> HeadParams:
    """CLIP's zero-shot classifier as a head: ``(s · unit t_c, 0, projection or identity)``."""
    from oodprobe.arrays import check_features, l2_normalize
    from oodprobe.encoders.base import DEFAULT_LOGIT_SCALE

    embeddings = check_features(class_embeddings, name="class_embeddings", dtype=np.float64)
    scale = float(getattr(encoder, "logit_scale", DEFAULT_LOGIT_SCALE))
    weight = (scale * l2_normalize(np.asarray(embeddings, np.float64))).astype(np.float32)
    projection = _projection(encoder)
    if projection is None:  # features already in the joint space: the identity normalises them
        projection = np.eye(weight.shape[1], dtype=np.float32)
    return weight, np.zeros(len(weight), np.float32), projection


# probe heads fitted in this process: (training set fingerprint) → (W, b); a benchmark's
# post-hoc detectors with head='probe' share one fit
_PROBE_HEADS: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
_PROBE_HEADS_KEPT = 4


def probe_head(train: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    """``(W (C, D), b (C,))`` float32 of oodprobe's linear probe fitted on ``train``.

    The probe is ``linear-probe`` with its defaults (Adaloglou et al., TMLR 2024), fitted on
    ``train.features`` and ``train.labels``; its per-dimension standardisation is folded into
    the layer, so ``logits = features @ W.T + b``. Fits are remembered per training set
    (cache key, rows, labels and a sample of the features) for the last few sets.
    """
    from oodprobe.detectors.probe import LinearProbeDetector

    if train.labels is None:
        raise InvalidParameterError(
            f"a probe head needs labelled ID training features; {train.dataset_name!r} has none"
        )
    features = np.asarray(train.features)
    digest = hashlib.sha256()
    step = max(1, len(features) // 256)
    for part in (
        train.key.encode(),
        str(features.shape).encode(),
        np.ascontiguousarray(train.indices).tobytes(),
        np.ascontiguousarray(train.labels).tobytes(),
        np.ascontiguousarray(features[::step], dtype=np.float32).tobytes(),
    ):
        digest.update(part)
    key = digest.hexdigest()
    cached = _PROBE_HEADS.get(key)
    if cached is None:
        probe = LinearProbeDetector().fit(features, train.labels)
        weight, bias = probe.affine_head()
        cached = (weight.astype(np.float32), bias.astype(np.float32))
        _PROBE_HEADS[key] = cached
        while len(_PROBE_HEADS) > _PROBE_HEADS_KEPT:
            _PROBE_HEADS.popitem(last=False)
    _PROBE_HEADS.move_to_end(key)
    return cached
