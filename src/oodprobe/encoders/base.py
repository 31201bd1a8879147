"""The encoder contract: differentiable torch modules from pixels in [0, 1] to named outputs.

An encoder is split in two so that both the cached extraction and future adversarial attacks use
the same code:

* ``pixel_transform(image)`` — PIL image → float tensor (3, H, W) in [0, 1] (resize, crop); runs
  in data-loading workers, no normalisation.
* ``forward(pixels)`` — (B, 3, H, W) in [0, 1] → ``{"features": (B, D), ...}``; normalisation
  happens inside, so gradients w.r.t. pixels are meaningful.

Vision-language encoders (``TextImageEncoder``) also give text embeddings in the joint space and
the ``image_projection`` that maps stored (pre-projection) image features into it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

PixelTransform = Callable[[Image.Image], torch.Tensor]


class ImageEncoder(torch.nn.Module):
    """A frozen image encoder in eval mode with its pixel transform.

    Subclasses set ``name`` (as the user typed it), ``outputs`` (names of the arrays ``forward``
    returns; the first is ``"features"``), ``feature_dim``, ``pixel_transform`` and
    ``identity`` (a JSON-able dict naming the weights and preprocessing; it becomes ``cache_id``).
    """

    name: str
    outputs: tuple[str, ...] = ("features",)
    feature_dim: int
    pixel_transform: PixelTransform
    identity: dict[str, Any]
    model: Any
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map pixels in [0, 1] to the model's input space."""
        return (pixels - self.pixel_mean.to(pixels.dtype)) / self.pixel_std.to(pixels.dtype)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [0, 1] → (B, feature_dim) features (differentiable)."""
        return self(pixels)["features"]

    @property
    def cache_id(self) -> str:
        """Digest of everything about the encoder that changes its outputs."""
        payload = {
            "class": type(self).__qualname__,
            "outputs": list(self.outputs),
            "mean": self.pixel_mean.flatten().tolist(),
            "std": self.pixel_std.flatten().tolist(),
            "transform": repr(self.pixel_transform),
            **self.identity,
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def freeze(self) -> ImageEncoder:
        """Eval mode, no parameter gradients (pixel gradients still flow)."""
        self.eval()
        self.requires_grad_(False)
        return self


class TextImageEncoder(ImageEncoder):
    """A vision-language encoder (CLIP, SigLIP): image features, text embeddings, projection.

    ``image_projection`` is a (feature_dim, embed_dim) tensor, or None when the stored image
    features already live in the joint space (towers without a linear projection).
    """

    embed_dim: int
    image_projection: torch.Tensor | None

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:  # pragma: no cover
        """Texts → (n, embed_dim) joint-space embeddings (not normalised)."""
        raise NotImplementedError

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-projection image features → joint-space embeddings (not normalised)."""
        if self.image_projection is None:
            return features
        return features @ self.image_projection.to(features.dtype)


def split_normalize(transform: Any) -> tuple[PixelTransform, list[float], list[float]]:
    """Split a torchvision ``Compose`` ending in ``Normalize`` into ([0, 1] transform, mean, std).

    open_clip and timm build their eval transforms this way; normalisation moves into the
    encoder's forward so that it is differentiable.
    """
    from torchvision import transforms

    steps = list(getattr(transform, "transforms", [transform]))
    normalizers = [step for step in steps if isinstance(step, transforms.Normalize)]
    if len(normalizers) != 1:
        raise ValueError(f"expected exactly one Normalize in {transform!r}")
    normalize = normalizers[0]
    kept = [step for step in steps if step is not normalize]
    return (
        transforms.Compose(kept),
        list(map(float, normalize.mean)),
        list(map(float, normalize.std)),
    )


def build_pixel_transform(
    resize: int | tuple[int, int], crop: int | tuple[int, int] | None, interpolation: str
) -> PixelTransform:
    """Resize (shorter side, or exact (H, W)), centre-crop, convert to RGB tensor in [0, 1]."""
    from torchvision import transforms

    mode = transforms.InterpolationMode(interpolation)
    steps: list[Any] = [transforms.Resize(resize, interpolation=mode, antialias=True)]
    if crop is not None:
        steps.append(transforms.CenterCrop(crop))
    steps.append(transforms.ToTensor())
    return transforms.Compose(steps)


def file_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Identity of a weights file or folder: resolved path, sizes and modification times."""
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    entries = [
        (
            str(p.relative_to(path) if path.is_dir() else p.name),
            p.stat().st_size,
            p.stat().st_mtime_ns,
        )
        for p in files
    ]
    return {"weights_path": str(path), "weights_files": entries}


def state_dict_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer: the identity of weights with no file behind them."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            if tensor.numel()
            else b""
        )
    return digest.hexdigest()
