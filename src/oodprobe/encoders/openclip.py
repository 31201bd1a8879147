"""open_clip models: ``openclip:ARCH/TAG``, ``openclip:ARCH/PATH`` (local checkpoint),
``openclip:hf-hub:ORG/REPO`` and ``openclip:ARCH/random`` (random weights, for tests).

Image features are taken **before** the final projection, as in Adaloglou et al. (TMLR 2024);
the projection is kept as ``image_projection`` for zero-shot scoring. Towers without a linear
projection parameter (ResNet attention pooling, timm/ConvNeXt towers) give their output embedding
and ``image_projection = None``, as the paper does for ConvNeXt CLIP.

Layer taps (``openclip:ARCH/TAG,layer=N``, ViT image towers only) come from the tower's
``forward_intermediates``: the output of residual block N (1-based) of
``visual.transformer.resblocks``, before ``ln_post``, averaged over the patch tokens (the class
token left out). A tap lives in no joint space, so a layer variant has no text tower.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from oodprobe.encoders.base import (
    TextImageEncoder,
    file_identity,
    split_normalize,
    state_dict_digest,
)
from oodprobe.errors import InvalidParameterError, MissingWeightsError, UnknownNameError

RANDOM_TAG = "random"


def parse_openclip_name(spec: str) -> tuple[str, str | None]:
    """``ARCH/TAG`` → (arch, tag); ``hf-hub:ORG/REPO`` → (that, None). Tag may be a file path."""
    if spec.startswith("hf-hub:"):
        return spec, None
    arch, sep, tag = spec.partition("/")
    if not arch or not sep or not tag:
        raise InvalidParameterError(
            f"open_clip encoder names look like 'openclip:ARCH/TAG' (e.g. "
            f"'openclip:ViT-B-16/openai') or 'openclip:ARCH/PATH_TO_CHECKPOINT', got "
            f"'openclip:{spec}'"
        )
    return arch, tag


class OpenClipEncoder(TextImageEncoder):
    """An open_clip CLIP model: pre-projection image features, projection, text embeddings."""

    def __init__(self, spec: str, *, allow_download: bool = True) -> None:
        import open_clip

        arch, tag = parse_openclip_name(spec)
        self.name = f"openclip:{spec}"
        identity: dict[str, Any] = {"open_clip_version": open_clip.__version__, "arch": arch}
        pretrained: str | None = None
        local_checkpoint: Path | None = None
        if tag is None:  # hf-hub model: the weights come with the architecture name
            identity["hub"] = arch
        elif tag == RANDOM_TAG:
            if arch not in open_clip.list_models():
                raise UnknownNameError("open_clip architecture", arch, open_clip.list_models())
        elif Path(tag).expanduser().exists() or tag.startswith((".", "/", "~")):
            checkpoint = Path(tag).expanduser()
            if not checkpoint.is_file():
                raise MissingWeightsError(f"open_clip checkpoint not found: {checkpoint}")
            pretrained = str(checkpoint)
            local_checkpoint = checkpoint
            identity.update(file_identity(checkpoint))
        else:
            if arch not in open_clip.list_models():
                raise UnknownNameError("open_clip architecture", arch, open_clip.list_models())
            tags = open_clip.list_pretrained_tags_by_model(arch)
            if tag not in tags:
                raise UnknownNameError(f"pretrained tag for open_clip {arch}", tag, tags)
            pretrained = tag
            identity["pretrained"] = tag
            if not allow_download:
                raise MissingWeightsError(f"{self.name} needs a download and downloads are off")

        try:
            with torch.random.fork_rng():
                torch.manual_seed(0)  # "random" weights are reproducible, so they can be cached
                model, _, preprocess = open_clip.create_model_and_transforms(
                    arch, pretrained=pretrained
                )
        except (OSError, RuntimeError, ValueError) as error:
            raise MissingWeightsError(
                f"could not load weights for {self.name}: {error}. On a machine with internet "
                f"they download to the Hugging Face cache on first use; offline, copy that cache "
                f"(~/.cache/huggingface) or pass a local checkpoint as "
                f"'openclip:{arch}/PATH_TO_CHECKPOINT'"
            ) from None
        if tag == RANDOM_TAG:
            identity["weights_sha256"] = state_dict_digest(model)
        pixel_transform, mean, std = split_normalize(preprocess)
        super().__init__(mean, std)
        self.model = model
        self.pixel_transform = pixel_transform
        self.tokenizer = open_clip.get_tokenizer(arch)

        visual = model.visual
        projection = getattr(visual, "proj", None)
        if isinstance(projection, torch.nn.Parameter):
            self.image_projection = projection.detach().clone()
            visual.proj = None  # forward now returns pre-projection pooled features
        else:
            self.image_projection = None
        self.identity = identity
        # a local checkpoint is hashed (weights_digest); hub tags resolve inside open_clip
        self.weights_location = local_checkpoint
        with torch.inference_mode():
            probe = self(torch.zeros(1, 3, *_input_size(visual)))["features"]
        self.feature_dim = int(probe.shape[-1])
        resblocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if resblocks is not None and hasattr(visual, "forward_intermediates"):
            self.tap_kind = "layer"
        self.embed_dim = int(
            self.image_projection.shape[1]
            if self.image_projection is not None
            else self.feature_dim
        )
        self.freeze()

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": self.model.visual(self.normalize(pixels))}

    @property
    def tap_count(self) -> int:
        if self.tap_kind is None:
            raise InvalidParameterError(
                f"encoder {self.name!r} has no ViT image tower with forward_intermediates "
                f"(visual.transformer.resblocks) to tap; layer variants need one"
            )
        return len(self.model.visual.transformer.resblocks)

    def tap_channels(self) -> tuple[int, ...]:
        return (int(self.model.visual.transformer.width),) * self.tap_count

    def forward_taps(
        self, pixels: torch.Tensor, taps: Sequence[int], *, final: bool = True
    ) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
        indices = sorted({tap - 1 for tap in taps})
        if not indices:
            return (self(pixels) if final else {}), {}
        result = self.model.visual.forward_intermediates(
            self.normalize(pixels),
            indices=indices,
            stop_early=not final,
            intermediates_only=not final,
            output_fmt="NLC",  # patch tokens only: the class token is split off
        )
        pooled = {
            index + 1: tokens.mean(dim=1)
            for index, tokens in zip(indices, result["image_intermediates"], strict=True)
        }
        # visual.proj is None (taken out above), so image_features are pre-projection
        return ({"features": result["image_features"]} if final else {}), pooled

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        device = self.pixel_mean.device
        tokens = self.tokenizer(list(texts)).to(device)
        return self.model.encode_text(tokens).float()

    def _apply(self, fn: Any, recurse: bool = True) -> OpenClipEncoder:
        # image_projection is a plain tensor attribute: move it with the module.
        super()._apply(fn, recurse)
        if self.image_projection is not None:
            self.image_projection = fn(self.image_projection)
        return self


def _input_size(visual: torch.nn.Module) -> tuple[int, int]:
    size = getattr(visual, "image_size", 224)
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
