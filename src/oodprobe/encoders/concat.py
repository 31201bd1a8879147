"""Several encoders side by side: ``concat:A+B+…``, their features concatenated per image.

A multi-backbone detector (COOkeD's classifier + a probe on another backbone + a CLIP
zero-shot head, Humblot-Renaux et al., ICCV Workshops 2025) needs the features of several
encoders for the same images, and a detector sees one array. A concatenation gives it that
array: row ``i`` is ``[f_A(x_i), f_B(x_i), …]``, part ``k`` occupying the columns
:attr:`ConcatEncoder.part_slices` ``[k]``. Each part keeps its own preprocessing, so the parts
are extracted one after the other, each in its own cache entry (an earlier ``bench`` of a part
serves the concatenation too; :func:`oodprobe.features.extract_features`), and then joined.

Every head a part has becomes a head on the concatenated features that reads only that part's
columns (zeros elsewhere): the part's own classifier (:meth:`ConcatEncoder.part_head_arrays`),
and for the text part, the zero-shot head through :attr:`ConcatTextEncoder.image_projection`,
whose rows outside the part are zero. Since CLIP normalises before and after the projection,
``normalize(normalize(f) @ P)`` of the concatenation equals that of the part alone, so MCM, PLP
and zero-shot heads on a concatenation are the text part's. A concatenation has ``logits``
when exactly one part has them (that part's).

There is no forward pass through a concatenation (the parts need different pixels): it cannot
be attacked or fine-tuned, and :meth:`forward` says so.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence

import numpy as np
import torch

from oodprobe.encoders.base import HeadArrays, ImageEncoder, TextImageEncoder
from oodprobe.errors import InvalidParameterError

PREFIX = "concat:"
SEPARATOR = "+"


def split_concat_name(name: str) -> list[str] | None:
    """The part names of ``concat:A+B…``, or None for a name that is not a concatenation.

    InvalidParameterError for fewer than two parts, an empty part or a nested concatenation.
    """
    if not name.startswith(PREFIX):
        return None
    parts = name[len(PREFIX) :].split(SEPARATOR)
    if len(parts) < 2 or any(not part.strip() for part in parts):
        raise InvalidParameterError(
            f"encoder {name!r}: a concatenation needs two or more encoder names joined by "
            f"'{SEPARATOR}', e.g. 'concat:efficientnet-lite0+efficientnet-lite1'"
        )
    if any(part.startswith(PREFIX) for part in parts):
        raise InvalidParameterError(
            f"encoder {name!r}: a concatenation cannot hold another 'concat:'; list its parts "
            f"in one"
        )
    return [part.strip() for part in parts]


class ConcatEncoder(ImageEncoder):
    """The parts' features side by side; see the module docstring."""

    def __init__(self, name: str, parts: Sequence[ImageEncoder]) -> None:
        first = parts[0]
        super().__init__(first.pixel_mean.flatten().tolist(), first.pixel_std.flatten().tolist())
        self.name = name
        self.parts = torch.nn.ModuleList(parts)
        widths = [int(part.feature_dim) for part in parts]
        edges = np.cumsum([0, *widths])
        self.part_slices = [slice(int(a), int(b)) for a, b in itertools.pairwise(edges)]
        self.feature_dim = int(edges[-1])
        with_logits = [k for k, part in enumerate(parts) if "logits" in part.outputs]
        self.logits_part: int | None = with_logits[0] if len(with_logits) == 1 else None
        self.outputs = ("features", "logits") if self.logits_part is not None else ("features",)
        self.pixel_transform = first.pixel_transform
        self.identity = {"parts": [part.cache_id for part in parts]}
        self.model = None

    @property
    def part_encoders(self) -> list[ImageEncoder]:
        return list(self.parts)  # type: ignore[arg-type]

    def _parts_digest(self, ids: Sequence[str]) -> str:
        text = json.dumps({"class": self.identity_class, "parts": list(ids)})
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @property
    def cache_id(self) -> str:
        return self._parts_digest([part.cache_id for part in self.part_encoders])

    @property
    def portable_id(self) -> str:
        return self._parts_digest([part.portable_id for part in self.part_encoders])

    @property
    def weights_digest(self) -> str | None:
        digests = [part.weights_digest for part in self.part_encoders]
        if all(digest is None for digest in digests):
            return None
        return hashlib.sha256(json.dumps(digests).encode()).hexdigest()

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise InvalidParameterError(
            f"encoder {self.name!r} is a concatenation: its parts take different pixels, so it "
            f"has no forward pass (no attack, no fine-tuning); use one of its parts "
            f"({', '.join(part.name for part in self.part_encoders)})"
        )

    def part_index(self, part: int, what: str) -> int:
        """The 0-based index of 1-based ``part``; InvalidParameterError outside 1..#parts."""
        if not 1 <= part <= len(self.parts):
            raise InvalidParameterError(
                f"{what} names part {part} of {self.name!r}, which has parts 1 to {len(self.parts)}"
            )
        return part - 1

    def pad_head(self, index: int, weight: np.ndarray) -> np.ndarray:
        """A head on part ``index``'s columns as a head on the concatenation (zeros elsewhere)."""
        padded = np.zeros((len(weight), self.feature_dim), np.float32)
        padded[:, self.part_slices[index]] = weight
        return padded

    def part_head_arrays(self, index: int) -> HeadArrays | None:
        """Part ``index``'s (0-based) own classifier as a head on the concatenated features."""
        head = self.part_encoders[index].head_arrays()
        if head is None:
            return None
        weight, bias = head
        return self.pad_head(index, weight), np.asarray(bias, np.float32)

    def head_arrays(self) -> HeadArrays | None:
        """The classifier of the one part with ``logits``, padded; None otherwise."""
        if self.logits_part is None:
            return None
        return self.part_head_arrays(self.logits_part)


class ConcatTextEncoder(ConcatEncoder, TextImageEncoder):
    """A concatenation with a vision-language part (the first one): its text tower and scale.

    ``image_projection`` is the text part's projection (or the identity, for features already
    in the joint space) in that part's rows, zeros in the others.
    """

    def __init__(self, name: str, parts: Sequence[ImageEncoder]) -> None:
        super().__init__(name, parts)
        self.text_part = next(
            k for k, part in enumerate(parts) if isinstance(part, TextImageEncoder)
        )
        text = parts[self.text_part]
        assert isinstance(text, TextImageEncoder)
        self.embed_dim = int(text.embed_dim)
        own = text.image_projection
        part_projection = torch.eye(text.feature_dim) if own is None else own.detach().float().cpu()
        projection = torch.zeros(self.feature_dim, part_projection.shape[1])
        projection[self.part_slices[self.text_part]] = part_projection
        self.register_buffer("_projection", projection)

    @property
    def image_projection(self) -> torch.Tensor:  # type: ignore[override]
        projection = self._projection
        assert isinstance(projection, torch.Tensor)
        return projection

    @property
    def text_encoder(self) -> TextImageEncoder:
        encoder = self.part_encoders[self.text_part]
        assert isinstance(encoder, TextImageEncoder)
        return encoder

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text_encoder.encode_texts(texts)

    @property
    def text_cache_id(self) -> str:
        return self.text_encoder.text_cache_id

    @property
    def logit_scale(self) -> float:
        return self.text_encoder.logit_scale


def create_concat_encoder(name: str, parts: Sequence[ImageEncoder]) -> ConcatEncoder:
    """The concatenation of built ``parts``: text-capable when one of them has a text tower."""
    if any(isinstance(part, TextImageEncoder) for part in parts):
        return ConcatTextEncoder(name, parts)
    return ConcatEncoder(name, parts)
