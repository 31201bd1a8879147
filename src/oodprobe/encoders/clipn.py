"""CLIPN: an open_clip CLIP with a second, "no" text encoder (``clipn:ARCH/PATH``).

Wang, Li, Yao, Li, "CLIPN for Zero-Shot OOD Detection: Teaching CLIP to Say No", ICCV 2023
(code: github.com/xmed-lab/CLIPN). CLIPN keeps CLIP's image tower and text tower ("yes") and
adds a copy of the text tower trained on CC3M to say *no* ("this is not a photo of a dog"),
with 16 learnable no-prompts: (16, context_length, width) embeddings added to the token and
position embeddings of the no tower's input. At inference CLIPN adds their *mean* (one
(context_length, width) offset, their ``CLIP.encode_text(text, "no")`` in eval mode), which is
what :meth:`CLIPNEncoder.encode_no_texts` does. Training CLIPN is out of scope: this loads
published weights.

The checkpoint is what CLIPN's training saves: ``{"epoch", "name", "state_dict",
"optimizer"}`` (a bare state dict is accepted too), keys of CLIPN's ``CLIP`` with the
``module.`` prefix of DistributedDataParallel (stripped, as their ``load_state_dict_local``
does): open_clip's own keys (``visual.*``, ``transformer.*``, ``token_embedding.weight``,
``positional_embedding``, ``ln_final.*``, ``text_projection``, ``logit_scale``) and the no
tower's (``transformer_no.*``, ``token_embedding_no.weight``, ``positional_embedding_no``,
``ln_final_no.*``, ``text_projection_no``, ``prompt_no``). It is read with
``torch.load(weights_only=True)``: a file that needs arbitrary unpickling is refused.

``ARCH`` is the open_clip architecture CLIPN was trained from: ``ViT-B-16`` (their released
weights, from ``laion2b_s34b_b88k``) or ``ViT-B-32`` (``laion2b_s34b_b79k``); the image
features, projection and yes texts are those of :class:`OpenClipEncoder` on that
architecture, so MCM and every other text detector run on a CLIPN encoder unchanged.
"""

from __future__ import annotations

import copy
import pickle
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodprobe.encoders.base import TextImageEncoder, file_identity, file_sha256
from oodprobe.encoders.openclip import RANDOM_TAG, OpenClipEncoder
from oodprobe.encoders.text import CLIPN_PROMPTS
from oodprobe.errors import InvalidParameterError, MissingWeightsError, UnknownNameError

PREFIX = "clipn:"
# the README of github.com/xmed-lab/CLIPN, table "Reproduced Results", column "Model/log":
# ViT-B-16, repeats 1, 2 and 3 (each folder holds the CTW/ATD checkpoint and its log)
WEIGHTS_URLS: tuple[str, ...] = (
    "https://drive.google.com/drive/folders/1CRIKr0vwrvK4Mc63zfhg2o8cbEGct4oF",
    "https://drive.google.com/drive/folders/1eNaaPaRWz0La8_qQliX30A4I7Y44yDMY",
    "https://drive.google.com/drive/folders/1qF4Pm1JSL3P0H4losPSmvldubFj91dew",
)
_NO_SUFFIX = "_no"
_PROMPT_KEY = "prompt_no"


def weights_help(arch: str = "ViT-B-16") -> str:
    """Where CLIPN's weights are published and how to name them (one line, for messages)."""
    return (
        f"download a CLIPN checkpoint (ViT-B-16, repeats 1-3: {', '.join(WEIGHTS_URLS)}; "
        f"linked from the README of https://github.com/xmed-lab/CLIPN, 'Reproduced Results') "
        f"and pass its path: 'clipn:{arch}/PATH_TO_CHECKPOINT.pt'"
    )


def parse_clipn_name(spec: str) -> tuple[str, Path]:
    """``ARCH/PATH`` → (arch, checkpoint path); InvalidParameterError if either part is empty."""
    arch, sep, path = spec.partition("/")
    if not arch or not sep or not path:
        raise InvalidParameterError(
            f"CLIPN encoder names look like 'clipn:ARCH/PATH_TO_CHECKPOINT' (e.g. "
            f"'clipn:ViT-B-16/CLIPN_ATD_Repeat2_epoch_10.pt'), got '{PREFIX}{spec}'"
        )
    return arch, Path(path).expanduser()


class NoTextTower(torch.nn.Module):
    """CLIPN's "no" text encoder: a text tower of CLIP's shape plus the learnable no-prompts.

    ``encode(tokens)``: ``pool(ln(T(E(tokens) + P + mean_k prompt_k))) @ W``, CLIPN's eval-mode
    ``encode_text(text, "no")`` (E token, P position embeddings, T the transformer with CLIP's
    causal mask, pooled at the end-of-text token as the yes tower is).
    """

    def __init__(self, model: Any, n_prompts: int) -> None:
        super().__init__()
        # the yes tower's modules as the template: same layers, widths and activations
        self.transformer = copy.deepcopy(model.transformer)
        self.token_embedding = copy.deepcopy(model.token_embedding)
        self.positional_embedding = copy.deepcopy(model.positional_embedding)
        self.ln_final = copy.deepcopy(model.ln_final)
        self.text_projection = copy.deepcopy(model.text_projection)
        self.prompt = torch.nn.Parameter(
            torch.zeros(n_prompts, *model.positional_embedding.shape), requires_grad=False
        )
        self.pool_type = str(getattr(model, "text_pool_type", "argmax"))
        self.eos_id = getattr(model, "text_eos_id", None)

    def encode(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        cast_dtype = self.transformer.get_cast_dtype()
        offset = self.positional_embedding + self.prompt.mean(dim=0)
        x = self.token_embedding(tokens).to(cast_dtype) + offset.to(cast_dtype)
        x = self.ln_final(self.transformer(x, attn_mask=attn_mask))
        x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        if isinstance(self.text_projection, torch.nn.Linear):
            return self.text_projection(x)
        return x if self.text_projection is None else x @ self.text_projection


class CLIPNEncoder(OpenClipEncoder):
    """A CLIPN checkpoint on its open_clip architecture: yes texts, no texts, image features.

    Everything :class:`OpenClipEncoder` gives (pre-projection image features,
    ``image_projection``, ``encode_texts`` through the yes tower), and
    :meth:`encode_no_texts` through the no tower. ``cache_id`` names the architecture, the
    checkpoint file (path, size, mtime) and its sha256; ``weights_digest`` is that sha256.
    """

    no_tower: NoTextTower

    def __init__(self, spec: str) -> None:
        import open_clip

        arch, checkpoint = parse_clipn_name(spec)
        if arch not in open_clip.list_models():
            raise UnknownNameError("open_clip architecture", arch, open_clip.list_models())
        if not checkpoint.is_file():
            raise MissingWeightsError(
                f"CLIPN checkpoint not found: {checkpoint}; {weights_help(arch)}"
            )
        state = _read_checkpoint(checkpoint, arch)
        # the architecture (validated there), its preprocessing and text tokenizer; the
        # random weights are replaced by the checkpoint's below
        super().__init__(f"{arch}/{RANDOM_TAG}", allow_download=False)
        self.name = f"{PREFIX}{spec}"
        yes_state = {key: value for key, value in state.items() if not _is_no_key(key)}
        no_state = {_tower_key(key): value for key, value in state.items() if _is_no_key(key)}
        if not no_state:
            raise InvalidParameterError(
                f"{checkpoint} holds a CLIP without CLIPN's no text encoder (no "
                f"transformer_no / prompt_no weights); load a plain CLIP checkpoint as "
                f"'openclip:{arch}/{checkpoint}', or {weights_help(arch)}"
            )
        self._load_yes(yes_state, checkpoint, arch)
        prompt = no_state.get("prompt")
        if prompt is None or prompt.ndim != 3 or prompt.shape[0] < 1:
            raise InvalidParameterError(
                f"{checkpoint} has no usable {_PROMPT_KEY} (CLIPN's learnable no-prompts, "
                f"shape (n, context length, width)); it is not a CLIPN checkpoint of the "
                f"released kind: {weights_help(arch)}"
            )
        self.no_tower = NoTextTower(self.model, int(prompt.shape[0]))
        _load_strict(self.no_tower, no_state, checkpoint, arch, rename=_checkpoint_key)
        self.identity = {
            "open_clip_version": open_clip.__version__,
            "arch": arch,
            "clipn": 1,  # the layout read here; bump it if the no tower's reading changes
            **file_identity(checkpoint),
            "weights_sha256": file_sha256(checkpoint),
        }
        self.weights_location = checkpoint
        self.freeze()

    def _load_yes(self, state: dict[str, torch.Tensor], checkpoint: Path, arch: str) -> None:
        """The open_clip part: every model key, ``visual.proj`` into ``image_projection``."""
        state = dict(state)
        if self.image_projection is not None:
            projection = state.pop("visual.proj", None)
            if projection is None:
                raise InvalidParameterError(
                    f"{checkpoint} has no visual.proj: it is not a CLIPN checkpoint of "
                    f"open_clip {arch}; pass the architecture it was trained from "
                    f"(ViT-B-16 or ViT-B-32)"
                )
            _check_shape("visual.proj", projection, self.image_projection, checkpoint, arch)
            self.image_projection = projection.detach().float().clone()
        _load_strict(self.model, state, checkpoint, arch)

    def encode_no_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts → (n, embed_dim) embeddings of CLIPN's no tower (not normalised)."""
        device = self.pixel_mean.device
        tokens = self.tokenizer(list(texts)).to(device)
        return self.no_tower.encode(tokens, getattr(self.model, "attn_mask", None)).float()

    def no_text_encoder(self) -> NoTextEncoder:
        """A view of this encoder whose ``encode_texts`` is the no tower (its own ``cache_id``).

        ``compute_class_embeddings(encoder.no_text_encoder(), names, CLIPN_PROMPTS)`` gives the
        no class embeddings; the distinct ``cache_id`` keeps cached yes and no text embeddings
        apart.
        """
        view = self.__dict__.get("_no_view")
        if view is None:
            view = NoTextEncoder(self)
            self.__dict__["_no_view"] = view
        return view


class NoTextEncoder(TextImageEncoder):
    """The CLIPN encoder with its no tower as the text tower (images as the base's)."""

    def __init__(self, base: CLIPNEncoder) -> None:
        super().__init__(base.pixel_mean.flatten().tolist(), base.pixel_std.flatten().tolist())
        # not submodules: the base owns (and moves) the weights; the view only reads them
        self.__dict__["base"] = base
        self.__dict__["model"] = base.model
        self.name = f"{base.name} (no texts)"
        self.outputs = base.outputs
        self.feature_dim = base.feature_dim
        self.embed_dim = base.embed_dim
        self.pixel_transform = base.pixel_transform
        self.weights_location = base.weights_location
        self.identity = {**base.identity, "text_tower": "no"}
        self.freeze()

    @property
    def base(self) -> CLIPNEncoder:
        base: CLIPNEncoder = self.__dict__["base"]
        return base

    @property
    def image_projection(self) -> torch.Tensor | None:
        return self.base.image_projection

    @image_projection.setter
    def image_projection(self, value: torch.Tensor | None) -> None:  # pragma: no cover
        raise AttributeError("a no-text view's image_projection is its base encoder's")

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        result: dict[str, torch.Tensor] = self.base(pixels)
        return result

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.base.encode_no_texts(texts)


def compute_no_class_embeddings(
    encoder: CLIPNEncoder,
    class_names: Sequence[str],
    prompts: Sequence[str] = CLIPN_PROMPTS,
    *,
    batch_size: int = 256,
) -> np.ndarray:
    """(C, E) float32 no class embeddings ``normalize(mean_p normalize(no(prompt_p(c))))``.

    The no tower's counterpart of :func:`oodprobe.encoders.text.compute_class_embeddings`
    (same name cleaning, same averaging): CLIPN's ``merge_yes_no_feature`` runs the *same*
    prompts through both towers, so pass the prompts of the yes class embeddings.
    """
    from oodprobe.encoders.text import compute_class_embeddings

    if not isinstance(encoder, CLIPNEncoder):
        raise InvalidParameterError(
            f"no class embeddings need a CLIPN encoder ('clipn:ARCH/PATH'), got "
            f"{getattr(encoder, 'name', type(encoder).__name__)!r}"
        )
    return compute_class_embeddings(
        encoder.no_text_encoder(), class_names, prompts, batch_size=batch_size
    )


# -- reading the checkpoint ------------------------------------------------------------------


def _read_checkpoint(path: Path, arch: str) -> dict[str, torch.Tensor]:
    """The state dict of a CLIPN checkpoint, loaded safely; one-line errors for anything else."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        ValueError,
        zipfile.BadZipFile,
    ) as error:
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise InvalidParameterError(
            f"{path} is not a checkpoint torch.load(weights_only=True) can read ({reason}); "
            f"oodprobe never unpickles arbitrary objects: {weights_help(arch)}"
        ) from None
    state = content.get("state_dict", content) if isinstance(content, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise InvalidParameterError(
            f"{path} holds no state dict (a dict of tensors, or one under 'state_dict'); "
            f"{weights_help(arch)}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InvalidParameterError(
                f"{path} holds a state dict with a non-tensor entry {key!r}; {weights_help(arch)}"
            )
        # DistributedDataParallel's prefix, stripped as CLIPN's load_state_dict_local does
        tensors[key.removeprefix("module.")] = value
    return tensors


def _is_no_key(key: str) -> bool:
    return key.split(".", 1)[0].endswith(_NO_SUFFIX)


def _tower_key(key: str) -> str:
    """``transformer_no.x`` → ``transformer.x``; ``prompt_no`` → ``prompt`` (NoTextTower's)."""
    head, dot, rest = key.partition(".")
    return head[: -len(_NO_SUFFIX)] + dot + rest


def _checkpoint_key(key: str) -> str:
    head, dot, rest = key.partition(".")
    return head + _NO_SUFFIX + dot + rest


def _check_shape(
    key: str, value: torch.Tensor, expected: torch.Tensor, checkpoint: Path, arch: str
) -> None:
    if tuple(value.shape) != tuple(expected.shape):
        raise InvalidParameterError(
            f"{checkpoint} does not fit open_clip {arch}: {key} has shape {tuple(value.shape)}, "
            f"{arch} needs {tuple(expected.shape)}; pass the architecture the CLIPN checkpoint "
            f"was trained from (ViT-B-16 or ViT-B-32)"
        )


def _load_strict(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    checkpoint: Path,
    arch: str,
    rename: Callable[[str], str] | None = None,
) -> None:
    """Load ``state`` into ``module``: every key present, none extra, every shape equal."""
    expected = module.state_dict()
    name = rename or str
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(name(key) for key in missing[:3])}")
        if unexpected:
            problems.append(f"unexpected {', '.join(name(key) for key in unexpected[:3])}")
        more = len(missing) + len(unexpected) - min(len(missing), 3) - min(len(unexpected), 3)
        raise InvalidParameterError(
            f"{checkpoint} does not fit a CLIPN of open_clip {arch}: "
            f"{'; '.join(problems)}{f' (and {more} more)' if more else ''}; pass the "
            f"architecture it was trained from (ViT-B-16 or ViT-B-32)"
        )
    for key, value in state.items():
        _check_shape(name(key), value, expected[key], checkpoint, arch)
    module.load_state_dict(state, strict=True)
