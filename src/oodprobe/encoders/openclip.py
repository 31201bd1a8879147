"""open_clip models: ``openclip:ARCH/TAG``, ``openclip:ARCH/PATH`` (local checkpoint),
``openclip:hf-hub:ORG/REPO`` and ``openclip:ARCH/random`` (random weights, for tests).

Image features are taken **before** the final projection, as in Adaloglou et al. (TMLR 2024);
the projection is kept as ``image_projection`` for zero-shot scoring. Towers without a linear
projection parameter (ResNet attention pooling, timm/ConvNeXt towers) give their output embedding
and ``image_projection = None``, as the paper does for ConvNeXt CLIP.

Layer taps (``openclip:ARCH/TAG,layer=N``, ViT image towers only) come from the tower's
``forward_intermediates``: the output of residual block N (1-based) of
``visual.transformer.resblocks``, before ``ln_post``, averaged over the patch tokens (the class
token left out). A tap lives in no joint space, so a layer variant has no text tower.

Local features (``openclip:ARCH/TAG,local``, ViT image towers only) are GL-MCM's (Miyai et al.,
"GL-MCM: Global and Local Maximum Concept Matching for Zero-Shot Out-of-Distribution Detection",
arXiv:2304.04521, 2023), computed as their code does (github.com/AtsuMiyai/GL-MCM,
``clip/model.py``: ``ResidualAttentionBlock.forward`` and ``VisionTransformer.forward``): the
last residual block is run a second time on its own input with its attention replaced by each
token's own value (``v = x + out_proj(v_proj(ln_1(x)))``, then ``v + mlp(ln_2(v))``: the
"value-value" path, no mixing between tokens), and its patch tokens (class token dropped) go
through ``ln_post`` and the projection ``proj``; GL-MCM's scoring then L2-normalises them
(``utils/detection_util.py``). See :func:`local_embeddings` for the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from oodprobe.encoders.base import (
    TextImageEncoder,
    file_identity,
    split_normalize,
    state_dict_digest,
)
from oodprobe.errors import InvalidParameterError, MissingWeightsError, UnknownNameError

RANDOM_TAG = "random"
LOCAL_METHOD = "gl-mcm:last-block-value-path"
"""Names the local-token computation in ``identity`` (so in ``cache_id``) of ``,local`` encoders."""


def parse_openclip_name(spec: str) -> tuple[str, str | None]:
    """``ARCH/TAG`` → (arch, tag); ``hf-hub:ORG/REPO`` → (that, None). Tag may be a file path."""
    if spec.startswith("hf-hub:"):
        return spec, None
    arch, sep, tag = spec.partition("/")
    if not arch or not sep or not tag:
        raise InvalidParameterError(
            f"open_clip encoder names look like 'openclip:ARCH/TAG' (e.g. "
            f"'openclip:ViT-B-16/openai') or 'openclip:ARCH/PATH_TO_CHECKPOINT', got "
            f"'openclip:{spec}'"
        )
    return arch, tag


class OpenClipEncoder(TextImageEncoder):
    """An open_clip CLIP model: pre-projection image features, projection, text embeddings.

    With ``local`` (the ``,local`` name variant) the outputs are ``features`` and ``local``, a
    (B, P + 1, embed_dim) float32 array: row 0 the L2-normalised joint-space global embedding
    ``normalize(features @ image_projection)`` (what MCM scores), rows 1..P GL-MCM's
    L2-normalised local embeddings of the P patches in row-major grid order (module docstring).
    """

    local: bool = False

    def __init__(self, spec: str, *, allow_download: bool = True, local: bool = False) -> None:
        import open_clip

        arch, tag = parse_openclip_name(spec)
        self.name = f"openclip:{spec}" + (",local" if local else "")
        self.local = local
        identity: dict[str, Any] = {"open_clip_version": open_clip.__version__, "arch": arch}
        pretrained: str | None = None
        local_checkpoint: Path | None = None
        if tag is None:  # hf-hub model: the weights come with the architecture name
            identity["hub"] = arch
        elif tag == RANDOM_TAG:
            if arch not in open_clip.list_models():
                raise UnknownNameError("open_clip architecture", arch, open_clip.list_models())
        elif Path(tag).expanduser().exists() or tag.startswith((".", "/", "~")):
            checkpoint = Path(tag).expanduser()
            if not checkpoint.is_file():
                raise MissingWeightsError(f"open_clip checkpoint not found: {checkpoint}")
            pretrained = str(checkpoint)
            local_checkpoint = checkpoint
            identity.update(file_identity(checkpoint))
        else:
            if arch not in open_clip.list_models():
                raise UnknownNameError("open_clip architecture", arch, open_clip.list_models())
            tags = open_clip.list_pretrained_tags_by_model(arch)
            if tag not in tags:
                raise UnknownNameError(f"pretrained tag for open_clip {arch}", tag, tags)
            pretrained = tag
            identity["pretrained"] = tag
            if not allow_download:
                raise MissingWeightsError(f"{self.name} needs a download and downloads are off")

        try:
            with torch.random.fork_rng():
                torch.manual_seed(0)  # "random" weights are reproducible, so they can be cached
                model, _, preprocess = open_clip.create_model_and_transforms(
                    arch, pretrained=pretrained
                )
        except (OSError, RuntimeError, ValueError) as error:
            raise MissingWeightsError(
                f"could not load weights for {self.name}: {error}. On a machine with internet "
                f"they download to the Hugging Face cache on first use; offline, copy that cache "
                f"(~/.cache/huggingface) or pass a local checkpoint as "
                f"'openclip:{arch}/PATH_TO_CHECKPOINT'"
            ) from None
        if tag == RANDOM_TAG:
            identity["weights_sha256"] = state_dict_digest(model)
        pixel_transform, mean, std = split_normalize(preprocess)
        super().__init__(mean, std)
        self.model = model
        self.pixel_transform = pixel_transform
        self.tokenizer = open_clip.get_tokenizer(arch)

        visual = model.visual
        projection = getattr(visual, "proj", None)
        if isinstance(projection, torch.nn.Parameter):
            self.image_projection = projection.detach().clone()
            visual.proj = None  # forward now returns pre-projection pooled features
        else:
            self.image_projection = None
        if local:
            _check_local_tower(visual, self.image_projection, self.name)
            identity["local"] = LOCAL_METHOD
            self.outputs = ("features", "local")
        self.identity = identity
        # a local checkpoint is hashed (weights_digest); hub tags resolve inside open_clip
        self.weights_location = local_checkpoint
        with torch.inference_mode():
            probe = self(torch.zeros(1, 3, *_input_size(visual)))["features"]
        self.feature_dim = int(probe.shape[-1])
        resblocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if resblocks is not None and hasattr(visual, "forward_intermediates") and not local:
            self.tap_kind = "layer"
        self.embed_dim = int(
            self.image_projection.shape[1]
            if self.image_projection is not None
            else self.feature_dim
        )
        self.freeze()

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.local:
            return self._forward_local(pixels)
        return {"features": self.model.visual(self.normalize(pixels))}

    def _forward_local(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``features`` as the plain forward computes them, and ``local`` (class docstring)."""
        visual = self.model.visual
        last = visual.transformer.resblocks[-1]
        seen: list[torch.Tensor] = []
        # the input of the last block, caught on the way: one pass of the tower as it is
        handle = last.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
        try:
            features = visual(self.normalize(pixels))
        finally:
            handle.remove()
        (block_input,) = seen
        tokens = _value_path(last, block_input)  # per token, so in either layout
        if not visual.transformer.batch_first:
            tokens = tokens.transpose(0, 1)  # LND -> NLD
        assert self.image_projection is not None  # checked when built
        patches = visual.ln_post(tokens[:, 1:])  # GL-MCM: ln_post on every token, class dropped
        return {
            "features": features,
            "local": local_embeddings(
                self.project_features(features), patches @ self.image_projection.to(patches.dtype)
            ),
        }

    @property
    def tap_count(self) -> int:
        if self.tap_kind is None:
            raise InvalidParameterError(
                f"encoder {self.name!r} has no ViT image tower with forward_intermediates "
                f"(visual.transformer.resblocks) to tap; layer variants need one"
            )
        return len(self.model.visual.transformer.resblocks)

    def tap_channels(self) -> tuple[int, ...]:
        return (int(self.model.visual.transformer.width),) * self.tap_count

    def forward_taps(
        self, pixels: torch.Tensor, taps: Sequence[int], *, final: bool = True
    ) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
        indices = sorted({tap - 1 for tap in taps})
        if not indices:
            return (self(pixels) if final else {}), {}
        result = self.model.visual.forward_intermediates(
            self.normalize(pixels),
            indices=indices,
            stop_early=not final,
            intermediates_only=not final,
            output_fmt="NLC",  # patch tokens only: the class token is split off
        )
        pooled = {
            index + 1: tokens.mean(dim=1)
            for index, tokens in zip(indices, result["image_intermediates"], strict=True)
        }
        # visual.proj is None (taken out above), so image_features are pre-projection
        return ({"features": result["image_features"]} if final else {}), pooled

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        device = self.pixel_mean.device
        tokens = self.tokenizer(list(texts)).to(device)
        return self.model.encode_text(tokens).float()

    def _apply(self, fn: Any, recurse: bool = True) -> OpenClipEncoder:
        # image_projection is a plain tensor attribute: move it with the module.
        super()._apply(fn, recurse)
        if self.image_projection is not None:
            self.image_projection = fn(self.image_projection)
        return self


def local_embeddings(
    global_embeddings: torch.Tensor, patch_embeddings: torch.Tensor
) -> torch.Tensor:
    """(B, E) global and (B, P, E) patch joint-space embeddings → (B, P + 1, E) L2-normalised.

    Row 0 is the global embedding, rows 1..P the patches; normalised in float32 (GL-MCM casts to
    float before its norms), whatever the model's precision.
    """
    stacked = torch.cat([global_embeddings[:, None], patch_embeddings], dim=1)
    return F.normalize(stacked.float(), dim=-1)


def _value_path(block: Any, tokens: torch.Tensor) -> torch.Tensor:
    """GL-MCM's tokens of one open_clip residual block: its attention replaced by each token's
    own value (``ResidualAttentionBlock.forward`` in their ``clip/model.py``).

    ``x + out_proj(W_v ln_1(x) + b_v)``, then ``+ mlp(ln_2(.))``; the block's layer scales
    (identity in CLIP, absent from GL-MCM's code) where the block's own forward has them.
    """
    attention = block.attn
    width = attention.embed_dim
    if attention.in_proj_weight is not None:
        weight = attention.in_proj_weight[2 * width :]
    else:  # separate q/k/v weights (kdim/vdim differ from embed_dim)
        weight = attention.v_proj_weight
    bias = None if attention.in_proj_bias is None else attention.in_proj_bias[2 * width :]
    values = attention.out_proj(F.linear(block.ln_1(tokens), weight, bias))
    hidden = tokens + block.ls_1(values)
    return hidden + block.ls_2(block.mlp(block.ln_2(hidden)))


def _check_local_tower(visual: Any, projection: torch.Tensor | None, name: str) -> None:
    """InvalidParameterError unless ``visual`` is a ViT whose local tokens GL-MCM defines."""
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    last = blocks[-1] if blocks is not None and len(blocks) else None
    problem = None
    if last is None or not hasattr(visual, "ln_post"):
        problem = f"its image tower is a {type(visual).__name__}, not a ViT"
    elif not isinstance(getattr(last, "attn", None), torch.nn.MultiheadAttention) or not all(
        hasattr(last, part) for part in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2")
    ):
        problem = f"its blocks are {type(last).__name__}s, not open_clip's ResidualAttentionBlock"
    elif getattr(visual, "attn_pool", None) is not None:
        problem = "its tower pools with an attentional pooler (CoCa)"
    elif projection is None:
        problem = "its tower has no linear projection 'proj' into the joint space"
    if problem is not None:
        raise InvalidParameterError(
            f"encoder {name!r}: ',local' (GL-MCM's patch-token features) needs a CLIP ViT with a "
            f"plain attention block and a projection; {problem}; drop ',local'"
        )


def _input_size(visual: torch.nn.Module) -> tuple[int, int]:
    size = getattr(visual, "image_size", 224)
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
