"""``finetuned:PATH``: an encoder fine-tuned by ``oodprobe finetune`` (:mod:`oodprobe.finetune`).

PATH is the output folder of a fine-tuning run: ``finetuned.json`` (base encoder, classes,
recipe, sha256 of the weights) and ``model.safetensors`` (tower and head weights). The base
encoder is built by name, its image tower gets the fine-tuned weights, and the head gives the
``logits``. It is a plain image encoder (no text tower) even when the base is a CLIP model.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from oodprobe.encoders.base import ImageEncoder, file_sha256
from oodprobe.errors import InvalidParameterError, MissingWeightsError

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _how_to_make(folder: str) -> str:
    return (
        f"make one with 'oodprobe finetune CONFIG_OR_PRESET -e ENCODER -o {folder}' "
        "(or oodprobe.finetune.finetune)"
    )


def read_finetune_metadata(folder: Path, spec: str) -> dict[str, Any]:
    """The checked ``finetuned.json`` of a fine-tuning output folder.

    MissingWeightsError when the folder or a file is missing, or any field is damaged (wrong
    type or value), naming the field.
    """
    from oodprobe.finetune import FORMAT_VERSION, METADATA_FILE, WEIGHTS_FILE, FinetuneRecipe

    if not folder.is_dir():
        raise MissingWeightsError(f"no fine-tuned model folder {folder}; {_how_to_make(spec)}")
    path = folder / METADATA_FILE
    if not path.is_file():
        raise MissingWeightsError(
            f"{folder} holds no finished fine-tuned model ({METADATA_FILE} is missing; an "
            f"interrupted run resumes when started again); {_how_to_make(spec)}"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MissingWeightsError(f"{path} is damaged ({error}); {_how_to_make(spec)}") from None

    def damaged(field: str, expected: str) -> MissingWeightsError:
        value = meta.get(field) if isinstance(meta, dict) else None
        return MissingWeightsError(
            f"{path} is damaged: {field} must be {expected}, got {value!r}; fine-tune again "
            f"with --force"
        )

    if not isinstance(meta, dict):
        raise damaged("the file", "a JSON object")

    def is_int(value: Any, minimum: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

    if meta.get("format") != FORMAT_VERSION:
        raise damaged("format", f"{FORMAT_VERSION} (written by this version of oodprobe)")
    for field in ("base_encoder", "base_cache_id", "tower"):
        if not isinstance(meta.get(field), str) or not meta[field]:
            raise damaged(field, "a non-empty string")
    if meta["base_encoder"].startswith("finetuned:"):
        raise damaged("base_encoder", "an encoder that is not itself fine-tuned")
    if not is_int(meta.get("feature_dim"), 1):
        raise damaged("feature_dim", "an integer >= 1")
    if not is_int(meta.get("n_classes"), 2):
        raise damaged("n_classes", "an integer >= 2")
    classes = meta.get("classes")
    if (
        not isinstance(classes, list)
        or len(classes) != meta["n_classes"]
        or not all(is_int(value, 0) for value in classes)
        or classes != sorted(set(classes))
    ):
        raise damaged("classes", f"{meta['n_classes']} increasing label integers >= 0")
    names = meta.get("class_names")
    if names is not None and (
        not isinstance(names, list)
        or len(names) != meta["n_classes"]
        or not all(isinstance(name, str) for name in names)
    ):
        raise damaged("class_names", f"null or a list of {meta['n_classes']} strings")
    if not isinstance(meta.get("ema"), bool):
        raise damaged("ema", "true or false")
    if meta.get("weights_file") != WEIGHTS_FILE:
        raise damaged("weights_file", repr(WEIGHTS_FILE))
    if not isinstance(meta.get("weights_sha256"), str) or not _SHA256.fullmatch(
        meta["weights_sha256"]
    ):
        raise damaged("weights_sha256", "64 lowercase hex digits")
    history = meta.get("history")
    if not isinstance(history, list) or not all(
        isinstance(entry, dict)
        and all(isinstance(v, int | float) and math.isfinite(v) for v in entry.values())
        for entry in history
    ):
        raise damaged("history", "a list of per-epoch records of finite numbers")
    try:
        FinetuneRecipe.from_dict(meta.get("recipe"))  # type: ignore[arg-type]
    except InvalidParameterError as error:
        raise MissingWeightsError(
            f"{path} is damaged: its recipe is not valid ({error}); fine-tune again with --force"
        ) from None
    return meta


class FinetunedEncoder(ImageEncoder):
    """A base encoder whose image tower was fine-tuned, with the trained linear head.

    ``forward`` gives the tower's ``features`` (as the base encoder computes them, with the
    fine-tuned weights) and the head's ``logits`` over the fine-tuning classes (``classes``
    holds their labels, ``class_names`` their names). The weights file's sha256 is checked
    against the metadata when the encoder is built; ``identity`` holds the base encoder's
    identity and that digest, so ``cache_id`` differs from the base's and changes whenever the
    weights do.
    """

    outputs = ("features", "logits")

    def __init__(self, spec: str) -> None:
        from safetensors.torch import load_file

        from oodprobe.encoders import create_encoder
        from oodprobe.finetune import WEIGHTS_FILE, image_tower

        if not isinstance(spec, str) or not spec:
            raise InvalidParameterError(
                f"finetuned encoders are named 'finetuned:PATH' (a fine-tuning output folder), "
                f"got {spec!r}"
            )
        folder = Path(spec).expanduser()
        meta = read_finetune_metadata(folder, spec)
        weights_path = folder / WEIGHTS_FILE
        if not weights_path.is_file():
            raise MissingWeightsError(
                f"{weights_path} is missing; {_how_to_make(spec)} (with --force to replace "
                "the rest of the folder)"
            )
        digest = file_sha256(weights_path)
        if digest != meta["weights_sha256"]:
            raise MissingWeightsError(
                f"{weights_path} is damaged or was replaced: its sha256 is {digest}, the "
                f"metadata records {meta['weights_sha256']}; fine-tune again with --force"
            )
        base = create_encoder(meta["base_encoder"])
        tower, tower_path = image_tower(base)
        if tower_path != meta["tower"] or int(base.feature_dim) != meta["feature_dim"]:
            raise MissingWeightsError(
                f"{folder}: the base encoder {meta['base_encoder']!r} now has tower "
                f"{tower_path!r} of {base.feature_dim} features, the fine-tuned weights are "
                f"for {meta['tower']!r} of {meta['feature_dim']}; fine-tune again with --force"
            )
        try:
            tensors = load_file(str(weights_path))
        except Exception as error:  # a file whose digest matched but that safetensors refuses
            raise MissingWeightsError(f"{weights_path} cannot be read: {error}") from None
        tower_state = {k[len("tower.") :]: v for k, v in tensors.items() if k.startswith("tower.")}
        head_state = {k[len("head.") :]: v for k, v in tensors.items() if k.startswith("head.")}
        others = sorted(
            set(tensors) - {f"tower.{k}" for k in tower_state} - {f"head.{k}" for k in head_state}
        )
        head = torch.nn.Linear(meta["feature_dim"], meta["n_classes"])
        try:
            if others:
                raise RuntimeError(f"unexpected tensors {others[:3]}")
            tower.load_state_dict(tower_state, strict=True)
            head.load_state_dict(head_state, strict=True)
        except RuntimeError as error:
            message = " ".join(str(error).split())[:300]
            raise MissingWeightsError(
                f"{weights_path} does not fit {meta['base_encoder']!r}: {message}; fine-tune "
                "again with --force"
            ) from None
        super().__init__(base.pixel_mean.flatten().tolist(), base.pixel_std.flatten().tolist())
        self.base = base
        self.head = head
        self.model = base.model
        self.name = f"finetuned:{spec}"
        self.base_name = meta["base_encoder"]
        self.classes = tuple(meta["classes"])
        self.class_names = tuple(meta["class_names"]) if meta["class_names"] else None
        self.metadata = meta
        self.feature_dim = int(meta["feature_dim"])
        self.pixel_transform = base.pixel_transform
        self.weights_location = weights_path
        self.identity = {
            "base_encoder": meta["base_encoder"],
            "base_class": base.identity_class,
            "base_identity": base.identity,
            "finetuned_weights_sha256": digest,
            "classes": list(self.classes),
        }
        self.freeze()

    def linear_head(self) -> torch.nn.Module | None:
        """The trained linear head over the fine-tuning classes."""
        head: torch.nn.Module = self.head
        return head

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.base(pixels)["features"]
        return {"features": features, "logits": self.head(features)}
