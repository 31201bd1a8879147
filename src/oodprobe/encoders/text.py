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
PROMPT_SETS: dict[str, tuple[str, ...]] = {"ensemble": PROMPT_ENSEMBLE, "single": SINGLE_PROMPT}


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
