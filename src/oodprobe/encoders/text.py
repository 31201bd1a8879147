"""Zero-shot class embeddings from class names: prompt ensembles shared by MCM and PLP."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from oodprobe.encoders.base import TextImageEncoder
from oodprobe.errors import InvalidParameterError

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


def clean_class_names(class_names: Sequence[str]) -> list[str]:
    """Underscores → spaces, stripped; duplicates are disambiguated with a warning.

    ImageNet's standard list names two classes "crane" and two "maillot": identical text
    embeddings would make those classes indistinguishable, so the second gets " (2)".
    """
    cleaned = [" ".join(name.replace("_", " ").split()) for name in class_names]
    if any(not name for name in cleaned):
        raise InvalidParameterError("class names must not be empty")
    counts = Counter(cleaned)
    duplicates = sorted(name for name, count in counts.items() if count > 1)
    if duplicates:
        warnings.warn(
            f"duplicate class names {duplicates} were disambiguated with a numeric suffix",
            stacklevel=2,
        )
        seen: Counter[str] = Counter()
        for index, name in enumerate(cleaned):
            seen[name] += 1
            if counts[name] > 1 and seen[name] > 1:
                cleaned[index] = f"{name} ({seen[name]})"
    return cleaned


def compute_class_embeddings(
    encoder: TextImageEncoder,
    class_names: Sequence[str],
    prompts: Sequence[str] = PROMPT_ENSEMBLE,
    *,
    batch_size: int = 256,
) -> np.ndarray:
    """(C, E) float32 class embeddings ``t_c = normalize(mean_p normalize(text(prompt_p(c))))``.

    Each prompt must contain ``{}`` where the (cleaned) class name goes.
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
