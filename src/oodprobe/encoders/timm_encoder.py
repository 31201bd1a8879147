"""timm image models: ``timm:NAME`` (pretrained from the hub), ``timm:NAME/PATH`` (local
checkpoint) and ``timm:NAME/random`` (random weights, for tests).

Features are the pre-logits pooled features (``forward_head(pre_logits=True)``); models with a
classifier also give their ``logits``, and when that classifier (``get_classifier()``) is one
``nn.Linear`` on those features its weight and bias are the encoder's ``head_arrays()``.

Layer taps (``timm:NAME,layer=N``) use timm's ``forward_intermediates``: N (1-based) indexes the
model's ``feature_info``, i.e. the transformer blocks of a ViT and the stem and stages of a
CNN. The tap is that output (before the final norm) averaged over its spatial positions; for a
ViT these are the patch tokens, with the class, distillation and register tokens left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from oodprobe.encoders.base import ImageEncoder, file_identity, split_normalize, state_dict_digest
from oodprobe.errors import MissingWeightsError, UnknownNameError

RANDOM_TAG = "random"


class TimmEncoder(ImageEncoder):
    """A timm model: pooled pre-logits features, plus logits when it has a classifier."""

    def __init__(self, spec: str) -> None:
        import timm
        from timm.data import create_transform, resolve_model_data_config

        model_name, _, tag = spec.partition("/")
        if not timm.is_model(model_name):
            raise UnknownNameError("timm model", model_name, timm.list_models())
        identity: dict[str, Any] = {"timm_version": timm.__version__, "model": model_name}
        kwargs: dict[str, Any] = {}
        local_checkpoint: Path | None = None
        if tag == RANDOM_TAG:
            kwargs["pretrained"] = False
        elif tag:
            checkpoint = Path(tag).expanduser()
            if not checkpoint.is_file():
                raise MissingWeightsError(f"timm checkpoint not found: {checkpoint}")
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(checkpoint)})
            identity.update(file_identity(checkpoint))
            local_checkpoint = checkpoint
        else:
            kwargs["pretrained"] = True
        try:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model: Any = timm.create_model(model_name, **kwargs)
        except (OSError, RuntimeError, ValueError) as error:
            raise MissingWeightsError(
                f"could not load weights for timm:{spec}: {error}. Pretrained weights download "
                f"from the Hugging Face hub on first use (needs internet); offline, pass a local "
                f"checkpoint as 'timm:{model_name}/PATH_TO_CHECKPOINT'"
            ) from None
        if not tag:
            identity["pretrained_cfg"] = {
                key: model.pretrained_cfg.get(key) for key in ("hf_hub_id", "url", "tag")
            }
        elif tag == RANDOM_TAG:
            identity["weights_sha256"] = state_dict_digest(model)
        data_config = resolve_model_data_config(model)
        pixel_transform, mean, std = split_normalize(create_transform(**data_config))
        super().__init__(mean, std)
        self.name = f"timm:{spec}"
        self.model = model
        self.pixel_transform = pixel_transform
        self.identity = identity
        self.weights_location = local_checkpoint  # hashed for weights_digest; hub: None
        self.has_classifier = int(getattr(model, "num_classes", 0) or 0) > 0
        self.outputs = ("features", "logits") if self.has_classifier else ("features",)
        self.feature_dim = int(model.num_features)
        if hasattr(model, "forward_intermediates") and getattr(model, "feature_info", None):
            self.tap_kind = "layer"
        self.freeze()

    def linear_head(self) -> torch.nn.Module | None:
        """``get_classifier()`` of a model with classes (a tuple for distilled heads: refused)."""
        if not self.has_classifier:
            return None
        classifier = self.model.get_classifier()
        return classifier if isinstance(classifier, torch.nn.Module) else None

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._head(self.model.forward_features(self.normalize(pixels)))

    def _head(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = {"features": self.model.forward_head(tokens, pre_logits=True)}
        if self.has_classifier:
            outputs["logits"] = self.model.forward_head(tokens)
        return outputs

    @property
    def tap_count(self) -> int:
        if self.tap_kind is None:
            return super().tap_count
        return len(self.model.feature_info)

    def tap_channels(self) -> tuple[int, ...]:
        if self.tap_kind is None:
            return super().tap_channels()
        return tuple(int(info["num_chs"]) for info in self.model.feature_info)

    def forward_taps(
        self, pixels: torch.Tensor, taps: Sequence[int], *, final: bool = True
    ) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
        if self.tap_kind is None:
            return super().forward_taps(pixels, taps, final=final)
        indices = sorted({tap - 1 for tap in taps})
        if not indices:
            return (self(pixels) if final else {}), {}
        normalized = self.normalize(pixels)
        outputs: dict[str, torch.Tensor] = {}
        if final:
            tokens, intermediates = self.model.forward_intermediates(normalized, indices=indices)
            outputs = self._head(tokens)
        else:
            intermediates = self.model.forward_intermediates(
                normalized, indices=indices, intermediates_only=True, stop_early=True
            )
        pooled = {index + 1: _pool(t) for index, t in zip(indices, intermediates, strict=True)}
        return outputs, pooled


def _pool(intermediate: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, C) mean over positions; (B, L, C) tokens → mean over tokens."""
    return intermediate.mean(dim=(2, 3)) if intermediate.ndim == 4 else intermediate.mean(dim=1)
