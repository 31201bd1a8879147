"""Shared fakes and tiny real models (random weights, built offline from small configs)."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from oodprobe.data.base import ImageDataset
from oodprobe.errors import DataError

TINY_OPENCLIP = "tiny-test"
TINY_OPENCLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


class ArrayDataset(ImageDataset):
    """In-memory uint8 images; indices in ``broken`` fail to decode like a truncated file."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        *,
        broken: frozenset[int] = frozenset(),
        name: str = "arrays",
    ) -> None:
        self.images = images
        self.labels = labels
        self.class_names = (
            None if labels is None else tuple(f"class {c}" for c in range(labels.max() + 1))
        )
        self.broken = broken
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        if index in self.broken:
            raise DataError(f"cannot decode {self.describe(index)}: image file is truncated")
        return Image.fromarray(self.images[index]).convert("RGB")

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.images.tobytes())
        digest.update(repr(sorted(self.broken)).encode())
        return digest.hexdigest()


def random_images(n: int, size: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def array_dataset() -> ArrayDataset:
    images = random_images(40)
    return ArrayDataset(images, np.arange(40) % 4)


@pytest.fixture
def cache_root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def tiny_openclip() -> Iterator[str]:
    """Register a tiny open_clip architecture and yield its encoder name (random weights)."""
    import open_clip

    open_clip.factory._MODEL_CONFIGS[TINY_OPENCLIP] = TINY_OPENCLIP_CONFIG
    yield f"openclip:{TINY_OPENCLIP}/random"


def write_clip_tokenizer(directory: Path) -> None:
    """CLIP's real BPE tokenizer files, rebuilt from the vocabulary open_clip bundles."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [token + "</w>" for token in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    # transformers 5 takes the vocabulary and merges themselves (4.x took file paths)
    tokenizer = CLIPTokenizer(
        vocab={token: index for index, token in enumerate(vocab)},
        merges=merges,
        model_max_length=16,
    )
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_hf_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A save_pretrained folder of a tiny random transformers CLIP, processor and tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    directory = tmp_path_factory.mktemp("hf-clip")
    text: dict[str, Any] = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=49408,
        max_position_embeddings=16,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    ).save_pretrained(directory)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(directory)
    write_clip_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_hf_dinov2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DINOv2 with its image processor (image-only transformers backbone)."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    directory = tmp_path_factory.mktemp("hf-dinov2")
    torch.manual_seed(0)
    Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(directory)
    BitImageProcessor(
        size={"shortest_edge": 36},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(directory)
    return directory
