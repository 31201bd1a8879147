"""GL-MCM's local image features: the ``,local`` encoder variant of open_clip and HF CLIP ViTs.

References are computed from each model's own modules by a second route: the last block run by
its own forward with an attention mask that lets every token attend only to itself (which is
what GL-MCM's value-value path is), and a line-by-line transcription of GL-MCM's
``ResidualAttentionBlock.forward`` (github.com/AtsuMiyai/GL-MCM, ``clip/model.py``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import ArrayDataset, random_images
from oodprobe.encoders import (
    TextImageEncoder,
    create_encoder,
    create_shared_encoder,
    encoder_name_traits,
    parse_encoder_name,
    shared_pass_key,
)
from oodprobe.errors import InvalidParameterError

N_PATCHES = 16  # tiny models: 32 px images, 8 px patches


def _pixels(encoder: Any, n: int = 3, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(n)]
    return torch.stack([encoder.pixel_transform(image) for image in images])


def _self_only_mask(n_tokens: int) -> torch.Tensor:
    """Additive attention mask: each token attends to itself only (attention = identity)."""
    mask = torch.full((n_tokens, n_tokens), float("-inf"))
    mask.fill_diagonal_(0.0)
    return mask


@pytest.fixture(scope="module")
def openclip_pair(tiny_openclip: str) -> tuple[Any, Any]:
    return create_encoder(tiny_openclip), create_encoder(f"{tiny_openclip},local")


@pytest.fixture(scope="module")
def hf_pair(tiny_hf_clip_dir: Path) -> tuple[Any, Any]:
    name = f"hf:{tiny_hf_clip_dir}"
    return create_encoder(name), create_encoder(f"{name},local")


# -- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("openclip:ViT-B-16/openai,local", "ViT-B-16/openai"),
        ("hf:openai/clip-vit-base-patch16,local", "openai/clip-vit-base-patch16"),
        # a comma elsewhere in a checkpoint path stays part of the path
        ("openclip:ViT-B-16//ckpt/a,local/b.pt,local", "ViT-B-16//ckpt/a,local/b.pt"),
    ],
)
def test_local_names_parse_to_their_own_pass(name: str, spec: str) -> None:
    parsed = parse_encoder_name(name)
    assert parsed.local and parsed.tap is None and parsed.spec == spec
    assert parsed.canonical == parsed.base == name
    assert shared_pass_key(name) == name != shared_pass_key(name.removesuffix(",local"))
    assert parsed.output_key == "features"
    assert encoder_name_traits(name) == (True, ("features", "local"))
    # without the suffix: the plain encoder, as before
    plain = parse_encoder_name(name.removesuffix(",local"))
    assert not plain.local and encoder_name_traits(plain.canonical)[1] != ("features", "local")
    # a path that merely contains ',local' is not the variant
    assert not parse_encoder_name("openclip:ViT-B-16//ckpt/a,local/b.pt").local


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "efficientnet-lite0,local",
            "encoder 'efficientnet-lite0,local': ',local' (GL-MCM's patch-token features) needs "
            "a CLIP ViT with a text tower, and efficientnet-lite0 encoders have none; write "
            "'openclip:ARCH/TAG,local' or 'hf:CLIP_ID_OR_DIR,local'",
        ),
        ("efficientnet-lite0/block4@112,local", "efficientnet-lite0 encoders have none"),
        ("timm:vit_small_patch16_224/random,local", "timm encoders have none"),
        ("finetuned:runs/ft,local", "finetuned encoders have none"),
        (
            "openclip:ViT-B-16/openai,local,layer=6",
            "encoder 'openclip:ViT-B-16/openai,local,layer=6': ',local' (the last block's patch "
            "tokens, GL-MCM) and ',layer=N' cannot be combined; write "
            "'openclip:ViT-B-16/openai,local' or 'openclip:ViT-B-16/openai,layer=6'",
        ),
        ("hf:openai/clip-vit-base-patch16,layer=3,local", "cannot be combined"),
        ("openclip:,local", "missing the model"),
    ],
)
def test_local_names_refused_with_one_line(name: str, message: str) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        parse_encoder_name(name)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(InvalidParameterError):
        encoder_name_traits(name)


def test_local_refused_when_built_on_a_tower_without_local_tokens(
    tiny_hf_dinov2_dir: Path,
) -> None:
    import open_clip

    name = f"hf:{tiny_hf_dinov2_dir},local"
    with pytest.raises(InvalidParameterError) as caught:
        create_encoder(name)
    assert str(caught.value) == (
        f"encoder {name!r}: ',local' (GL-MCM's patch-token features) needs a CLIP ViT with a "
        f"visual projection; this is a dinov2 model; drop ',local'"
    )
    open_clip.factory._MODEL_CONFIGS["tiny-test-rn"] = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64},
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    with pytest.raises(InvalidParameterError, match=r"tower is a ModifiedResNet, not a ViT"):
        create_encoder("openclip:tiny-test-rn/random,local")


# -- the output contract -----------------------------------------------------------------------


def _check_contract(plain: Any, local: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Shape, token 0, unit norms, features unchanged; returns the local tokens."""
    assert isinstance(local, TextImageEncoder) and local.outputs == ("features", "local")
    assert local.name.endswith(",local") and local.tap_kind is None
    assert local.cache_id != plain.cache_id and local.identity["local"]
    assert local.head_arrays() is None
    with torch.inference_mode():
        outputs, reference = local(pixels), plain(pixels)
    tokens = outputs["local"]
    assert tokens.shape == (len(pixels), N_PATCHES + 1, local.embed_dim)
    assert tokens.dtype == torch.float32
    torch.testing.assert_close(outputs["features"], reference["features"])
    projected = F.normalize(reference["features"] @ plain.image_projection, dim=-1)
    torch.testing.assert_close(tokens[:, 0], projected)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(tokens.shape[:2]))
    # text tower kept: zero-shot logits come from the same joint space
    assert local.encode_texts(["a photo of a cat"]).shape == (1, local.embed_dim)
    return tokens


def _gl_mcm_values(block: Any, tokens: torch.Tensor) -> torch.Tensor:
    """GL-MCM's ``ResidualAttentionBlock.forward`` value route, transcribed for (N, L, C) input:
    in_proj on ln_1(x), split into q/k/v, out_proj on each, v += x, v + mlp(ln_2(v))."""
    attention = block.attn
    qkv = F.linear(block.ln_1(tokens), attention.in_proj_weight, attention.in_proj_bias)
    n, length, width3 = qkv.shape
    qkv = qkv.view(n, length, 3, width3 // 3).permute(2, 0, 1, 3).reshape(3 * n, length, -1)
    qkv = F.linear(qkv, attention.out_proj.weight, attention.out_proj.bias)
    _, _, values = qkv.tensor_split(3, dim=0)
    values = values + tokens
    return values + block.mlp(block.ln_2(values))


def test_openclip_local_tokens_are_gl_mcms(openclip_pair: tuple[Any, Any]) -> None:
    plain, local = openclip_pair
    pixels = _pixels(local)
    tokens = _check_contract(plain, local, pixels)
    visual = local.model.visual
    assert visual.transformer.batch_first
    n_blocks = len(visual.transformer.resblocks)
    with torch.inference_mode():
        # the input of the last block, from open_clip's own forward_intermediates
        result = visual.forward_intermediates(
            local.normalize(pixels),
            indices=[n_blocks - 2],
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        block_input = torch.cat(
            [result["image_intermediates_prefix"][0], result["image_intermediates"][0]], dim=1
        )
        last = visual.transformer.resblocks[-1]
        self_only = last(block_input, attn_mask=_self_only_mask(N_PATCHES + 1))
        transcribed = _gl_mcm_values(last, block_input)
        plain_last = last(block_input)  # ordinary attention: what GL-MCM does not use
        projection = local.image_projection

        def project(values: torch.Tensor) -> torch.Tensor:
            return F.normalize(visual.ln_post(values[:, 1:]) @ projection, dim=-1)

    torch.testing.assert_close(self_only, transcribed, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tokens[:, 1:], project(self_only), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tokens[:, 1:], project(transcribed), rtol=1e-4, atol=1e-5)
    assert (tokens[:, 1:] - project(plain_last)).abs().max() > 1e-2


def test_hf_local_tokens_are_gl_mcms(hf_pair: tuple[Any, Any]) -> None:
    plain, local = hf_pair
    pixels = _pixels(local)
    tokens = _check_contract(plain, local, pixels)
    vision = local.model.vision_model
    with torch.inference_mode():
        states = vision(pixel_values=local.normalize(pixels), output_hidden_states=True)
        block_input = states.hidden_states[-2]  # the input of the last encoder layer
        last = vision.encoder.layers[-1]
        mask = _self_only_mask(N_PATCHES + 1).expand(len(pixels), 1, -1, -1)
        self_only = last(block_input, mask)
        self_only = self_only[0] if isinstance(self_only, tuple) else self_only
        plain_last = states.last_hidden_state
        projection = local.image_projection

        def project(values: torch.Tensor) -> torch.Tensor:
            return F.normalize(vision.post_layernorm(values[:, 1:]) @ projection, dim=-1)

    torch.testing.assert_close(tokens[:, 1:], project(self_only), rtol=1e-4, atol=1e-5)
    assert (tokens[:, 1:] - project(plain_last)).abs().max() > 1e-2


def test_local_tokens_are_differentiable_and_float32_under_autocast(
    openclip_pair: tuple[Any, Any],
) -> None:
    _, local = openclip_pair
    pixels = _pixels(local, n=2).requires_grad_(True)
    local(pixels)["local"][:, 1:].sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = local(pixels.detach())["local"]
    assert tokens.dtype == torch.float32
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(tokens.shape[:2]))


def test_shared_pass_of_a_local_name_is_the_local_encoder(tiny_openclip: str) -> None:
    name = f"{tiny_openclip},local"
    encoder, keys = create_shared_encoder([name])
    assert encoder.outputs == ("features", "local") and keys == {name: "features"}
    with pytest.raises(InvalidParameterError, match=r"cannot share one forward pass"):
        create_shared_encoder([tiny_openclip, name])


# -- cached like the global features -----------------------------------------------------------


def test_extraction_caches_and_reads_back_the_local_array(
    openclip_pair: tuple[Any, Any], cache_root: Path
) -> None:
    from oodprobe.features import extract_features

    plain, local = openclip_pair
    dataset = ArrayDataset(random_images(5, size=40, seed=4))
    options: dict[str, Any] = dict(cache_root=cache_root, num_workers=0, progress=False)
    cold = extract_features(dataset, local, **options)
    assert not cold.from_cache and set(cold.arrays) == {"features", "local"}
    assert cold.arrays["local"].shape == (5, N_PATCHES + 1, local.embed_dim)
    assert cold.arrays["local"].dtype == np.float32
    assert cold.path is not None and (cold.path / "local.npy").is_file()
    warm = extract_features(dataset, local.name, **options)  # by name: the same entry
    assert warm.from_cache and warm.key == cold.key
    np.testing.assert_array_equal(warm.arrays["local"], cold.arrays["local"])
    np.testing.assert_array_equal(warm.features, cold.features)
    separate = extract_features(dataset, plain, **options)
    assert separate.key != cold.key and set(separate.arrays) == {"features"}
    np.testing.assert_allclose(separate.features, cold.features, rtol=1e-5, atol=1e-6)
    rows = np.array([0, 3])
    assert cold.subset(rows).arrays["local"].shape == (2, N_PATCHES + 1, local.embed_dim)


def test_resumed_extraction_keeps_local_shards(
    openclip_pair: tuple[Any, Any], cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from oodprobe import cache
    from oodprobe.features import extract_features

    _, local = openclip_pair
    dataset = ArrayDataset(random_images(4, size=40, seed=5))
    options: dict[str, Any] = dict(
        cache_root=cache_root, num_workers=0, progress=False, shard_size=2
    )

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # after every shard is on disk, before the entry is joined

    with monkeypatch.context() as patch:
        patch.setattr(cache, "write_entry", killed)
        with pytest.raises(KeyboardInterrupt):
            extract_features(dataset, local, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = extract_features(dataset, local, **options)
    assert resumed.stats["images_encoded"] == 0


def test_fine_tuning_refuses_a_local_variant_before_any_work(tmp_path: Path) -> None:
    from oodprobe.finetune import finetune

    data = ArrayDataset(random_images(4, size=32), np.arange(4) % 2)
    with pytest.raises(InvalidParameterError, match="',local'"):
        finetune("openclip:ViT-B-16/openai,local", data, tmp_path / "ft")
    assert not (tmp_path / "ft").exists()
