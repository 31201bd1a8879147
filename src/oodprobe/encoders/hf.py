"""Hugging Face transformers models: ``hf:ID_OR_DIR`` for CLIP, SigLIP, DINOv2 and other
vision backbones.

CLIP gives the pooled image features **before** ``visual_projection`` (Adaloglou et al., TMLR
2024) and keeps the projection; SigLIP's vision tower ends in an attention-pooling head with no
separate projection, so its output embedding is used (``image_projection = None``); image-only
models (DINOv2 and the rest) give their pooled output.

Layer taps (``hf:ID_OR_DIR,layer=N``) read ``output_hidden_states=True``: ``hidden_states[N]``,
the output of encoder layer (or stage) N, 1-based (``hidden_states[0]`` is the embedding
output), averaged over its positions. Token outputs leave out the leading non-patch tokens
(CLIP's and DINOv2's class token, DINOv2's register tokens): as many as the sequence holds
beyond the (H / patch) x (W / patch) patch grid. SigLIP has none; a (B, C, H, W) stage output
(ConvNeXt, ResNet) is averaged over H and W. A layer variant of CLIP or SigLIP has no text tower.

Local features (``hf:ID_OR_DIR,local``, CLIP only) are GL-MCM's (Miyai et al., arXiv:2304.04521,
2023), as for open_clip (:mod:`oodprobe.encoders.openclip`): the last encoder layer run again on
its own input with its attention replaced by each token's own value (``x + out_proj(v_proj(
layer_norm1(x)))``, then ``+ mlp(layer_norm2(.))``), the patch tokens through
``post_layernorm`` and ``visual_projection``, L2-normalised; the output ``local`` is (B, P + 1,
projection_dim) with row 0 the normalised projected global embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from oodprobe.encoders.base import (
    ImageEncoder,
    TextImageEncoder,
    build_pixel_transform,
    file_identity,
)
from oodprobe.errors import InvalidParameterError, MissingWeightsError

_PIL_TO_TORCHVISION = {
    0: "nearest",
    1: "lanczos",
    2: "bilinear",
    3: "bicubic",
    4: "box",
    5: "hamming",
}
_TEXT_MODEL_TYPES = {"clip", "siglip", "siglip2"}


def _load(source: str) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Model, image processor, tokenizer (or None) and identity for a hub id or a local folder."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    local = Path(source).expanduser()
    is_local = local.is_dir()
    location = str(local) if is_local else source
    try:
        config = AutoConfig.from_pretrained(location, local_files_only=is_local)
        model = AutoModel.from_pretrained(location, local_files_only=is_local)
        processor = AutoImageProcessor.from_pretrained(location, local_files_only=is_local)
        tokenizer = (
            AutoTokenizer.from_pretrained(location, local_files_only=is_local)
            if config.model_type in _TEXT_MODEL_TYPES
            else None
        )
    except (OSError, ValueError) as error:
        where = f"folder {local}" if is_local else f"hub id {source!r}"
        raise MissingWeightsError(
            f"could not load the transformers model from {where}: {error}. A hub model downloads "
            f"to the Hugging Face cache on first use (needs internet); offline, use a folder "
            f"written by save_pretrained (model, image processor and, for CLIP/SigLIP, tokenizer)"
        ) from None
    identity: dict[str, Any] = {
        "transformers_version": transformers.__version__,
        "model_type": config.model_type,
    }
    if is_local:
        identity.update(file_identity(local))
    else:
        identity.update({"hub_id": source, "revision": getattr(config, "_commit_hash", None)})
    return model, processor, tokenizer, identity


def _pixel_transform_from(processor: Any) -> Any:
    size = dict(getattr(processor, "size", None) or {"shortest_edge": 224})
    resize: int | tuple[int, int] = (
        int(size["shortest_edge"])
        if "shortest_edge" in size
        else (int(size["height"]), int(size["width"]))
    )
    crop: int | tuple[int, int] | None = None
    if getattr(processor, "do_center_crop", False):
        crop_size = dict(getattr(processor, "crop_size", None) or {})
        if crop_size:
            crop = (int(crop_size["height"]), int(crop_size["width"]))
    resample = getattr(processor, "resample", 3)
    interpolation = _PIL_TO_TORCHVISION.get(int(resample), "bicubic")
    return build_pixel_transform(resize, crop, interpolation)


def _mean_std(processor: Any) -> tuple[list[float], list[float]]:
    if not getattr(processor, "do_normalize", True):
        return [0.0] * 3, [1.0] * 3
    return list(map(float, processor.image_mean)), list(map(float, processor.image_std))


class _HFTaps:
    """Layer taps shared by both transformers encoders, from ``output_hidden_states``."""

    tap_kind: str | None = "layer"
    _tap_shapes: tuple[tuple[int, ...], ...] | None = None
    pixel_transform: Any

    def _run(self, pixels: torch.Tensor, hidden_states: bool) -> Any:  # pragma: no cover
        raise NotImplementedError

    def _final(self, outputs: Any) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _patch_size(self) -> tuple[int, int] | None:  # pragma: no cover
        raise NotImplementedError

    def _shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-sample shape of each hidden state after the embedding, probed once."""
        if self._tap_shapes is None:
            from PIL import Image

            pixels = self.pixel_transform(Image.new("RGB", (64, 64))).unsqueeze(0)
            with torch.inference_mode():
                states = self._run(pixels, True).hidden_states
            self._tap_shapes = tuple(tuple(state.shape[1:]) for state in states[1:])
        return self._tap_shapes

    @property
    def tap_count(self) -> int:
        return len(self._shapes())

    def tap_channels(self) -> tuple[int, ...]:
        return tuple(shape[0] if len(shape) == 3 else shape[-1] for shape in self._shapes())

    def forward_taps(
        self, pixels: torch.Tensor, taps: Sequence[int], *, final: bool = True
    ) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
        outputs = self._run(pixels, True)
        states = outputs.hidden_states
        pooled = {tap: self._pool_state(states[tap], pixels) for tap in sorted(set(taps))}
        return (self._final(outputs) if final else {}), pooled

    def _pool_state(self, state: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        if state.ndim == 4:  # (B, C, H, W) stage output
            return state.mean(dim=(2, 3))
        patch = self._patch_size()
        n_tokens = state.shape[1]
        grid = (
            (pixels.shape[-2] // patch[0]) * (pixels.shape[-1] // patch[1]) if patch else n_tokens
        )
        # the leading tokens beyond the patch grid are class / register tokens
        n_prefix = n_tokens - grid if n_tokens >= grid else 0
        return state[:, n_prefix:].mean(dim=1)


def _pair(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def _pooled(outputs: Any) -> torch.Tensor:
    pooled = getattr(outputs, "pooler_output", None)
    if pooled is None:  # backbones without a pooler: mean of the tokens
        pooled = outputs.last_hidden_state.mean(dim=1)
    return pooled.flatten(1) if pooled.ndim > 2 else pooled


class HFImageEncoder(_HFTaps, ImageEncoder):
    """An image-only transformers backbone (DINOv2, ViT, ConvNeXt, …): its pooled output."""

    def __init__(self, source: str, model: Any, processor: Any, identity: dict[str, Any]) -> None:
        super().__init__(*_mean_std(processor))
        self.name = f"hf:{source}"
        self.model = model
        self.pixel_transform = _pixel_transform_from(processor)
        self.identity = identity
        self.weights_location = _local_folder(identity)
        self.feature_dim = _probe_dim(self)
        self.freeze()

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._final(self._run(pixels, False))

    def _run(self, pixels: torch.Tensor, hidden_states: bool) -> Any:
        normalized = self.normalize(pixels)
        if hidden_states:
            return self.model(pixel_values=normalized, output_hidden_states=True)
        return self.model(pixel_values=normalized)

    def _final(self, outputs: Any) -> dict[str, torch.Tensor]:
        return {"features": _pooled(outputs)}

    def _patch_size(self) -> tuple[int, int] | None:
        return _pair(getattr(self.model.config, "patch_size", None))


class HFTextImageEncoder(_HFTaps, TextImageEncoder):
    """A transformers CLIP or SigLIP model: image features, projection, text embeddings.

    With ``local`` (CLIP only; the ``,local`` name variant) the outputs are ``features`` and
    ``local`` (B, P + 1, embed_dim) float32: row 0 ``normalize(features @ image_projection)``,
    rows 1..P GL-MCM's normalised local embeddings of the patches (module docstring).
    """

    local: bool = False

    def __init__(
        self,
        source: str,
        model: Any,
        processor: Any,
        tokenizer: Any,
        identity: dict[str, Any],
        *,
        local: bool = False,
    ) -> None:
        super().__init__(*_mean_std(processor))
        self.name = f"hf:{source}" + (",local" if local else "")
        self.model = model
        self.local = local
        self.tokenizer = tokenizer
        self.model_type = identity["model_type"]
        self.pixel_transform = _pixel_transform_from(processor)
        self.identity = identity
        self.weights_location = _local_folder(identity)
        projection = getattr(model, "visual_projection", None)
        self.image_projection = (
            projection.weight.detach().T.contiguous().clone() if projection is not None else None
        )
        if local:
            from oodprobe.encoders.openclip import LOCAL_METHOD

            _check_local_model(model, self.image_projection, self.name)
            self.identity = {**identity, "local": LOCAL_METHOD}
            self.outputs = ("features", "local")
            self.tap_kind = None  # a ,local encoder has no layer variants
        self.feature_dim = _probe_dim(self)
        self.embed_dim = int(
            self.image_projection.shape[1]
            if self.image_projection is not None
            else self.feature_dim
        )
        self.freeze()

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.local:
            return self._forward_local(pixels)
        return self._final(self._run(pixels, False))

    def _forward_local(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``features`` as the plain forward computes them, and ``local`` (class docstring)."""
        from oodprobe.encoders.openclip import local_embeddings

        vision = self.model.vision_model
        last = vision.encoder.layers[-1]
        seen: list[torch.Tensor] = []

        def keep_input(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.append(args[0] if args else kwargs["hidden_states"])

        # the input of the last layer, caught on the way: one pass of the tower as it is
        handle = last.register_forward_pre_hook(keep_input, with_kwargs=True)
        try:
            features = self._final(self._run(pixels, False))["features"]
        finally:
            handle.remove()
        (block_input,) = seen
        hidden = block_input + last.self_attn.out_proj(
            last.self_attn.v_proj(last.layer_norm1(block_input))
        )
        tokens = hidden + last.mlp(last.layer_norm2(hidden))
        patches = vision.post_layernorm(tokens[:, 1:])  # the class token dropped
        assert self.image_projection is not None  # checked when built
        return {
            "features": features,
            "local": local_embeddings(
                self.project_features(features), patches @ self.image_projection.to(patches.dtype)
            ),
        }

    def _run(self, pixels: torch.Tensor, hidden_states: bool) -> Any:
        normalized = self.normalize(pixels)
        if hidden_states:
            return self.model.vision_model(pixel_values=normalized, output_hidden_states=True)
        return self.model.vision_model(pixel_values=normalized)

    def _final(self, outputs: Any) -> dict[str, torch.Tensor]:
        return {"features": outputs.pooler_output}

    def _patch_size(self) -> tuple[int, int] | None:
        vision = getattr(self.model.config, "vision_config", self.model.config)
        return _pair(getattr(vision, "patch_size", None))

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        # SigLIP was trained on max-length padded text; CLIP pools at the EOS token.
        padding = "max_length" if self.model_type.startswith("siglip") else True
        tokens = self.tokenizer(list(texts), padding=padding, truncation=True, return_tensors="pt")
        tokens = {key: value.to(self.pixel_mean.device) for key, value in tokens.items()}
        if self.model_type.startswith("siglip"):
            tokens.pop("attention_mask", None)  # SigLIP's text tower attends to the padding too
        pooled = self.model.text_model(**tokens).pooler_output
        projection = getattr(self.model, "text_projection", None)
        return (projection(pooled) if projection is not None else pooled).float()

    def _apply(self, fn: Any, recurse: bool = True) -> HFTextImageEncoder:
        super()._apply(fn, recurse)
        if self.image_projection is not None:
            self.image_projection = fn(self.image_projection)
        return self


def _check_local_model(model: Any, projection: torch.Tensor | None, name: str) -> None:
    """InvalidParameterError unless ``model`` is a CLIP whose local tokens GL-MCM defines."""
    layers = getattr(getattr(getattr(model, "vision_model", None), "encoder", None), "layers", None)
    last = layers[-1] if layers is not None and len(layers) else None
    attention = getattr(last, "self_attn", None)
    if (
        projection is None
        or last is None
        or not all(hasattr(last, part) for part in ("layer_norm1", "layer_norm2", "mlp"))
        or not all(hasattr(attention, part) for part in ("v_proj", "out_proj"))
        or not hasattr(model.vision_model, "post_layernorm")
    ):
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise InvalidParameterError(
            f"encoder {name!r}: ',local' (GL-MCM's patch-token features) needs a CLIP ViT with a "
            f"visual projection; this is a {model_type} model; drop ',local'"
        )


def _local_folder(identity: dict[str, Any]) -> Path | None:
    """The save_pretrained folder the model was read from (hashed for weights_digest); hub: None.

    A hub id's files live in the Hugging Face cache, resolved by transformers: not hashed.
    """
    location = identity.get("weights_path")
    return Path(location) if location else None


def _probe_dim(encoder: ImageEncoder) -> int:
    from PIL import Image

    pixels = encoder.pixel_transform(Image.new("RGB", (64, 64))).unsqueeze(0)
    with torch.inference_mode():
        return int(encoder(pixels)["features"].shape[-1])


def create_hf_encoder(source: str, *, local: bool = False) -> ImageEncoder:
    """``hf:ID_OR_DIR`` → a text-image encoder for CLIP/SigLIP, an image encoder otherwise.

    ``local`` (``hf:ID_OR_DIR,local``): a CLIP encoder that also outputs GL-MCM's ``local``
    tokens; InvalidParameterError for any other model (SigLIP, DINOv2, …).
    """
    model, processor, tokenizer, identity = _load(source)
    if local and identity["model_type"] != "clip":
        raise InvalidParameterError(
            f"encoder 'hf:{source},local': ',local' (GL-MCM's patch-token features) needs a CLIP "
            f"ViT with a visual projection; this is a {identity['model_type']} model; drop ',local'"
        )
    if identity["model_type"] in _TEXT_MODEL_TYPES:
        return HFTextImageEncoder(source, model, processor, tokenizer, identity, local=local)
    return HFImageEncoder(source, model, processor, identity)
