"""Zero-shot class embeddings from class names: prompt ensembles shared by MCM and PLP.

Names go through :func:`oodprobe.classnames.clean_class_names` (re-exported here), the one home
of name cleaning: underscores → spaces, ImageNet-1k synset ids → curated names, duplicates
(ignoring case) numbered with a warning.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from oodprobe.classnames import clean_class_names
from oodprobe.encoders.base import TextImageEncoder
from oodprobe.errors import InvalidParameterError

__all__ = [
    "CLIPN_PROMPTS",
    "PROMPT_ENSEMBLE",
    "PROMPT_SETS",
    "SINGLE_PROMPT",
    "clean_class_names",
    "compute_class_embeddings",
]

# Adaloglou et al. (TMLR 2024) average these five; MCM (Ming et al., 2022) uses the first alone.
PROMPT_ENSEMBLE: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of many {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
)
SINGLE_PROMPT: tuple[str, ...] = ("a photo of a {}",)
# CLIPN's inference prompts, src/prompt/prompt.txt of their repository, as their
# ``merge_yes_no_feature`` reads them: each line *with* its single quotes (and, on the two
# "a photo of a {}." lines, a trailing comma), for the yes and the no tower alike (prompt_no.txt
# is for training). 64 templates (CLIP's ImageNet ensemble, in CLIPN's order), then the same
# 64 with "of" -> "with" and "in a video game" -> "appearing in a video game".
_CLIPN_OF_TEMPLATES: tuple[str, ...] = (
    "'a bad photo of a {}.'",
    "'a photo of many {}.'",
    "'a sculpture of a {}.'",
    "'a low resolution photo of the {}.'",
    "'a rendering of a {}.'",
    "'graffiti of a {}.'",
    "'a bad photo of the {}.'",
    "'a cropped photo of the {}.'",
    "'a tattoo of a {}.'",
    "'a bright photo of a {}.'",
    "'a photo of a clean {}.'",
    "'a photo of a dirty {}.'",
    "'a dark photo of the {}.'",
    "'a drawing of a {}.'",
    "'a photo of my {}.'",
    "'a photo of the cool {}.'",
    "'a close-up photo of a {}.'",
    "'a black and white photo of the {}.'",
    "'a painting of the {}.'",
    "'a painting of a {}.'",
    "'a pixelated photo of the {}.'",
    "'a sculpture of the {}.'",
    "'a bright photo of the {}.'",
    "'a cropped photo of a {}.'",
    "'a photo of the dirty {}.'",
    "'a jpeg corrupted photo of a {}.'",
    "'a blurry photo of the {}.'",
    "'a photo of the {}.'",
    "'a good photo of the {}.'",
    "'a rendering of the {}.'",
    "'a {} in a video game.'",
    "'a photo of one {}.'",
    "'a doodle of a {}.'",
    "'a close-up photo of the {}.'",
    "'a photo of a {}.',",
    "'the {} in a video game.'",
    "'a sketch of a {}.'",
    "'a doodle of the {}.'",
    "'a low resolution photo of a {}.'",
    "'a rendition of the {}.'",
    "'a photo of the clean {}.'",
    "'a photo of a large {}.'",
    "'a rendition of a {}.'",
    "'a photo of a nice {}.'",
    "'a photo of a weird {}.'",
    "'a blurry photo of a {}.'",
    "'art of a {}.'",
    "'a sketch of the {}.'",
    "'a pixelated photo of a {}.'",
    "'itap of the {}.'",
    "'a jpeg corrupted photo of the {}.'",
    "'a good photo of a {}.'",
    "'a photo of the nice {}.'",
    "'a photo of the small {}.'",
    "'a photo of the weird {}.'",
    "'a drawing of the {}.'",
    "'a photo of the large {}.'",
    "'a black and white photo of a {}.'",
    "'a dark photo of a {}.'",
    "'itap of a {}.'",
    "'graffiti of the {}.'",
    "'a photo of a cool {}.'",
    "'a photo of a small {}.'",
    "'a tattoo of the {}.'",
)


def _with_variant(template: str) -> str:
    return template.replace(" of ", " with ", 1).replace(
        " in a video game", " appearing in a video game"
    )


CLIPN_PROMPTS: tuple[str, ...] = _CLIPN_OF_TEMPLATES + tuple(
    _with_variant(template) for template in _CLIPN_OF_TEMPLATES
)
"""CLIPN's 128 inference prompts (``{}`` = class name), verbatim as their evaluation uses them."""
PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "ensemble": PROMPT_ENSEMBLE,
    "single": SINGLE_PROMPT,
    "clipn": CLIPN_PROMPTS,
}


def compute_class_embeddings(
    encoder: TextImageEncoder,
    class_names: Sequence[str],
    prompts: Sequence[str] = PROMPT_ENSEMBLE,
    *,
    batch_size: int = 256,
) -> np.ndarray:
    """(C, E) float32 class embeddings ``t_c = normalize(mean_p normalize(text(prompt_p(c))))``.

    Each prompt must contain ``{}`` where the class name goes; names are cleaned first
    (:func:`clean_class_names`: ``n01440764`` → ``tench``, ``great_white_shark`` → ``great white
    shark``, a duplicate → ``crane (2)`` with a warning).
    """
    if not prompts or any("{}" not in prompt for prompt in prompts):
        raise InvalidParameterError(f"each prompt needs a '{{}}' for the class name, got {prompts}")
    names = clean_class_names(class_names)
    texts = [prompt.format(name) for name in names for prompt in prompts]
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            embedded = encoder.encode_texts(texts[start : start + batch_size]).float().cpu()
            chunks.append(torch.nn.functional.normalize(embedded, dim=-1))
    per_prompt = torch.cat(chunks).view(len(names), len(prompts), -1)
    class_embeddings = torch.nn.functional.normalize(per_prompt.mean(dim=1), dim=-1)
    return class_embeddings.numpy().astype(np.float32)
