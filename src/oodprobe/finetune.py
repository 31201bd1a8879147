"""Fine-tuning baseline: train an encoder's image tower with a linear head on the ID train set.

Adaloglou et al. (TMLR 2024) compare linear probing of frozen features with a full fine-tune
of the image tower plus a linear head (AdamW, lr 2.5e-4, weight decay 0.05, cosine schedule,
label smoothing 0.1, mixup 0.8 / cutmix 1.0, RandAugment, EMA of the weights), then score OOD
data with the same detectors. :func:`finetune` runs that recipe (:class:`FinetuneRecipe`;
mixup, cutmix and RandAugment are off by default, see there) and writes a folder that the
encoder name ``finetuned:FOLDER`` reads back (:mod:`oodprobe.encoders.finetuned`)::

    model.safetensors   tower weights ("tower.*") and the head ("head.weight", "head.bias")
    finetuned.json      base encoder, classes, recipe, history, sha256 of model.safetensors
    checkpoint.pt       while training: everything needed to resume (removed when done)

Training resumes after an interruption from the last epoch's checkpoint and ends with the same
weights as an uninterrupted run (bitwise on the CPU): the data order, every augmentation, mixup
and dropout draw are pure functions of ``(seed, epoch, index)``, so nothing depends on worker
processes or on where the run stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from oodprobe.errors import DataError, InvalidParameterError

if TYPE_CHECKING:
    import torch

    from oodprobe.data.base import ImageDataset, SkippedImage
    from oodprobe.encoders.base import ImageEncoder

__all__ = [
    "CHECKPOINT_FILE",
    "METADATA_FILE",
    "WEIGHTS_FILE",
    "FinetuneRecipe",
    "FinetuneResult",
    "finetune",
    "image_tower",
]

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "finetuned.json"
CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
Log = Callable[[str], None]


# -- the recipe -------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class FinetuneRecipe:
    """How to fine-tune: every value is checked when the recipe is built.

    Defaults are the paper's recipe (Adaloglou et al., TMLR 2024), except that mixup, cutmix
    and RandAugment are off (the paper: mixup 0.8, cutmix 1.0, RandAugment on; pass them to
    get it); with few images and epochs they mostly slow training down.

    * ``lr`` is the effective learning rate (no scaling by batch size); AdamW with decoupled
      ``weight_decay`` on weights of 2 or more dimensions (biases and norms get none, as timm).
    * The schedule is per optimiser step: linear warm-up over ``warmup_epochs`` (a fraction of
      an epoch is allowed), then a cosine down to 0 at the last step.
    * ``label_smoothing`` applies with or without mixing (timm's ``Mixup`` smooths the mixed
      targets). ``mixup`` / ``cutmix`` are the Beta alphas (0: off); when both are on, each
      batch uses one of them with probability 1/2 (timm's defaults). Mixing pairs a batch with
      its reverse, so an odd last batch loses its last image for that epoch.
    * Training images: ``RandomResizedCrop`` (scale 0.08-1, bicubic) to the encoder's input size,
      horizontal flip, and with ``randaugment`` torchvision's ``RandAugment(randaugment_ops,
      randaugment_magnitude)``; pixels in [0, 1] (the encoder normalises inside ``forward``).
    * ``ema_decay`` > 0 keeps an exponential moving average of the tower and head weights
      (timm ``ModelEmaV3``) and **the saved model is the EMA one**; 0 saves the trained weights.
      With ``ema_warmup`` the decay ramps up as ``1 − (1 + step)^(−2/3)`` until it reaches
      ``ema_decay`` (without it, a short run's average stays close to the pretrained weights).
    * ``freeze_blocks`` = N > 0 freezes the stem (everything before the first block: patch or
      convolution embedding, position embeddings) and the first N blocks (transformer blocks,
      MBConv blocks, stages), kept in eval mode; 0 trains the whole tower.
    * ``precision``: autocast in fp16 (with a gradient scaler) or bf16; ``auto`` is fp16 on a
      GPU, fp32 on the CPU (bf16 works on the CPU too). Weights stay float32.
    * ``seed`` fixes the head's initialisation, the data order and every random draw.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 2.5e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    randaugment: bool = False
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    ema_decay: float = 0.9998
    ema_warmup: bool = True
    freeze_blocks: int = 0
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        def fail(name: str, allowed: str, fix: str = "") -> None:
            value = getattr(self, name)
            raise InvalidParameterError(
                f"fine-tuning {name} must be {allowed}, got {value!r}" + (f"; {fix}" if fix else "")
            )

        for name in ("epochs", "batch_size", "randaugment_ops"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "an integer >= 1")
        for name in ("freeze_blocks", "seed"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "an integer >= 0")
        if not _is_int(self.randaugment_magnitude) or not 0 <= self.randaugment_magnitude <= 30:
            fail("randaugment_magnitude", "an integer in [0, 30]", "9 is RandAugment's usual")
        if not _is_real(self.lr) or self.lr <= 0:
            fail("lr", "a number > 0", "the paper uses 2.5e-4")
        for name in ("weight_decay", "mixup", "cutmix"):
            if not _is_real(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "a number >= 0")
        if not _is_real(self.warmup_epochs) or not 0 <= self.warmup_epochs <= (
            self.epochs if _is_int(self.epochs) else math.inf
        ):
            fail("warmup_epochs", f"a number in [0, epochs = {self.epochs}]")
        if not _is_real(self.label_smoothing) or not 0 <= self.label_smoothing < 1:
            fail("label_smoothing", "a number in [0, 1)", "the paper uses 0.1")
        if not _is_real(self.ema_decay) or not 0 <= self.ema_decay < 1:
            fail("ema_decay", "a number in [0, 1)", "0 turns the EMA off; 0.9998 is the default")
        for name in ("randaugment", "ema_warmup"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "true or false")
        if self.precision not in PRECISIONS:
            fail("precision", f"one of {', '.join(PRECISIONS)}")
        if self.mixes and self.batch_size % 2:
            fail("batch_size", "even when mixup or cutmix is on (a batch is mixed in pairs)")

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (mixup or cutmix)."""
        return self.mixup > 0 or self.cutmix > 0

    @property
    def uses_ema(self) -> bool:
        return self.ema_decay > 0

    def as_dict(self) -> dict[str, Any]:
        """The recipe as a JSON-able dict (what metadata and checkpoints record)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneRecipe:
        """A recipe from :meth:`as_dict` output; unknown or missing names are refused."""
        names = {item.name for item in fields(cls)}
        if not isinstance(values, dict) or set(values) != names:
            got = sorted(values) if isinstance(values, dict) else values
            raise InvalidParameterError(
                f"a fine-tuning recipe needs exactly the fields {sorted(names)}, got {got!r}"
            )
        return cls(**values)


@dataclass
class FinetuneResult:
    """What :func:`finetune` produced.

    ``history`` has one entry per epoch (``epoch``, ``loss``, ``accuracy`` on the augmented
    training batches, ``lr`` at the epoch's end, ``images``, ``seconds``). ``images_per_second``
    is the training throughput of the epochs run by this call (data loading included).
    ``encoder_name`` is the name to pass to other commands (``finetuned:OUTPUT_DIR``).
    """

    output_dir: Path
    model_path: Path
    metadata_path: Path
    encoder_name: str
    epochs_done: int
    resumed_from_epoch: int
    history: list[dict[str, float]]
    images_per_second: float
    seconds: float
    ema: bool
    skipped: list[SkippedImage] = field(default_factory=list)


# -- the image tower --------------------------------------------------------------------------

# where the repeated blocks live under the tower, tried in order (EfficientNet-Lite, open_clip
# ViT, timm ViT/ConvNeXt, open_clip's timm towers, transformers CLIP/SigLIP and DINOv2/ViT)
_BLOCK_PATHS = (
    "_blocks",
    "transformer.resblocks",
    "blocks",
    "stages",
    "trunk.blocks",
    "trunk.stages",
    "encoder.layers",
    "encoder.layer",
)


def image_tower(encoder: ImageEncoder) -> tuple[torch.nn.Module, str]:
    """The module fine-tuning trains, and its attribute path under the encoder.

    EfficientNet-Lite0 and timm: the whole ``encoder.model``; open_clip: ``model.visual`` (the
    text tower stays frozen and is not saved); transformers: ``model.vision_model`` for CLIP /
    SigLIP, the whole ``model`` for image-only backbones. Other encoders are refused.
    """
    from oodprobe.encoders.efficientnet import EfficientNetLite0Encoder
    from oodprobe.encoders.hf import HFImageEncoder, HFTextImageEncoder
    from oodprobe.encoders.openclip import OpenClipEncoder
    from oodprobe.encoders.timm_encoder import TimmEncoder

    if isinstance(encoder, EfficientNetLite0Encoder | TimmEncoder | HFImageEncoder):
        path = "model"
    elif isinstance(encoder, OpenClipEncoder):
        path = "model.visual"
    elif isinstance(encoder, HFTextImageEncoder):
        path = "model.vision_model"
    else:
        raise InvalidParameterError(
            f"encoder {encoder.name!r} ({type(encoder).__name__}) cannot be fine-tuned; "
            "fine-tune an efficientnet-lite0/1/2, openclip:…, timm:… or hf:… encoder"
        )
    module: Any = encoder
    for part in path.split("."):
        module = getattr(module, part)
    return module, path


def _blocks(tower: torch.nn.Module) -> list[torch.nn.Module] | None:
    for path in _BLOCK_PATHS:
        module: Any = tower
        for part in path.split("."):
            module = getattr(module, part, None)
        if module is not None and hasattr(module, "__len__") and len(module) > 0:
            return list(module)
    layers = [getattr(tower, f"layer{i}", None) for i in range(1, 5)]  # ResNets
    return layers if all(layer is not None for layer in layers) else None  # type: ignore[return-value]


def _freeze(tower: torch.nn.Module, n_blocks: int, encoder_name: str) -> list[torch.nn.Module]:
    """Freeze the stem and the first ``n_blocks`` blocks; return the modules to keep in eval."""
    if n_blocks == 0:
        return []
    blocks = _blocks(tower)
    if blocks is None:
        raise InvalidParameterError(
            f"freeze_blocks={n_blocks} needs a tower made of blocks, and {encoder_name!r} has "
            "none that oodprobe recognises; use freeze_blocks=0"
        )
    if n_blocks > len(blocks):
        raise InvalidParameterError(
            f"freeze_blocks must be at most {len(blocks)} for {encoder_name!r} (its tower has "
            f"{len(blocks)} blocks), got {n_blocks}"
        )
    first_block = {id(p) for p in blocks[0].parameters()}
    stem: set[int] = set()
    for parameter in tower.parameters():  # registration order: the stem comes first
        if id(parameter) in first_block:
            break
        stem.add(id(parameter))
    for parameter in tower.parameters():
        if id(parameter) in stem:
            parameter.requires_grad_(False)
    for block in blocks[:n_blocks]:
        block.requires_grad_(False)
    # eval mode (batch-norm statistics, dropout, drop-path) for every module that is frozen as
    # a whole, recursively: never an ancestor of a trained block, such as a ViT tower's root,
    # whose own parameters (class and position embeddings) belong to the stem
    return [
        module
        for module in tower.modules()
        if any(True for _ in module.parameters())
        and not any(p.requires_grad for p in module.parameters())
    ]


# -- randomness as a function of (seed, epoch, index) -----------------------------------------


def _seed_of(*numbers: int) -> int:
    """A 63-bit seed mixed from the given non-negative integers (numpy's SeedSequence)."""
    return (
        int(np.random.SeedSequence(list(numbers)).generate_state(2, np.uint32).view(np.uint64)[0])
        >> 1
    )


_DATA_ORDER, _SAMPLE, _STEP, _HEAD = 0, 1, 2, 3  # streams of the seed


def _epoch_batches(
    recipe: FinetuneRecipe, n_images: int, epoch: int
) -> list[list[tuple[int, int]]]:
    """This epoch's batches of (dataset index, that sample's augmentation seed)."""
    import torch

    generator = torch.Generator().manual_seed(_seed_of(recipe.seed, _DATA_ORDER, epoch))
    order = torch.randperm(n_images, generator=generator).tolist()
    batches = [
        [
            (index, _seed_of(recipe.seed, _SAMPLE, epoch, index))
            for index in order[i : i + recipe.batch_size]
        ]
        for i in range(0, n_images, recipe.batch_size)
    ]
    if recipe.mixes and len(batches[-1]) % 2:
        batches[-1] = batches[-1][:-1]  # mixing needs pairs; another image is left out next epoch
    return [batch for batch in batches if batch]


def _steps_per_epoch(recipe: FinetuneRecipe, n_images: int) -> int:
    last = n_images % recipe.batch_size
    return n_images // recipe.batch_size + (last > 0) - (recipe.mixes and last == 1)


# (dataset index, pixels or None, error message)
_Item = tuple[int, "torch.Tensor | None", str]


class _TrainImages:
    """Decodes and augments training images; each sample's draws come from its own seed."""

    def __init__(self, dataset: ImageDataset, transform: Any) -> None:
        self.dataset = dataset
        self.transform = transform

    def __getitem__(self, key: tuple[int, int]) -> _Item:
        import torch

        index, seed = key
        try:
            image = self.dataset.load(index)
        except DataError as error:
            return index, None, str(error)
        # torchvision's transforms draw from the global generator: give it this sample's seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return index, self.transform(image), ""


def _collate(items: list[_Item]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    import torch

    good = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    failed = [(index, message) for index, pixels, message in items if pixels is None]
    batch = torch.stack([pixels for _, pixels in good]) if good else None
    return [index for index, _ in good], batch, failed


def _train_transform(encoder: ImageEncoder, recipe: FinetuneRecipe) -> Any:
    from PIL import Image
    from torchvision import transforms

    height, width = encoder.pixel_transform(Image.new("RGB", (64, 64))).shape[-2:]
    steps: list[Any] = [
        transforms.RandomResizedCrop(
            (int(height), int(width)),
            interpolation=transforms.InterpolationMode.BICUBIC,
            antialias=True,
        ),
        transforms.RandomHorizontalFlip(),
    ]
    if recipe.randaugment:
        steps.append(
            transforms.RandAugment(
                num_ops=recipe.randaugment_ops, magnitude=recipe.randaugment_magnitude
            )
        )
    steps.append(transforms.ToTensor())
    return transforms.Compose(steps)


# -- the output folder ------------------------------------------------------------------------


def _check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise InvalidParameterError(
            f"output folder {output_dir} is a file; give a folder for the fine-tuned model"
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as error:
        raise InvalidParameterError(
            f"cannot write to the output folder {output_dir}: {error.strerror or error}; "
            "choose another --output"
        ) from None


def _differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out.extend(_differences(old, new, f"{prefix}{key}."))
        elif old != new:
            shown = [str(v) if len(str(v)) <= 24 else str(v)[:21] + "…" for v in (old, new)]
            out.append(f"{prefix}{key} {shown[0]} (checkpoint) vs {shown[1]} (now)")
    return out


def _load_checkpoint(path: Path, run: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """The checkpoint of this same run, or None (none there, or another run's with force)."""
    import torch

    if not path.exists():
        return None
    fix = "pass --force (force=True) to discard it and start again, or choose another --output"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not isinstance(state.get("run"), dict):
            raise ValueError("not a fine-tuning checkpoint")
        saved_run = json.loads(state["run"]["json"])
    except Exception as error:  # any unreadable file: refused the same way
        if force:
            return None
        raise InvalidParameterError(
            f"{path} cannot be read as a fine-tuning checkpoint ({type(error).__name__}: "
            f"{error}); {fix}"
        ) from None
    if saved_run != run:
        if force:
            return None
        differences = "; ".join(_differences(saved_run, run)[:4])
        raise InvalidParameterError(
            f"{path} is the checkpoint of a different fine-tuning run ({differences}); {fix}"
        )
    return state


def _atomic_torch_save(state: dict[str, Any], path: Path) -> None:
    import torch

    from oodprobe.files import atomic_write

    atomic_write(path, lambda temporary: torch.save(state, temporary))


def _rng_state() -> dict[str, Any]:
    import torch

    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [
            name,
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            position,
            has_gauss,
            cached,
        ],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    """Leave the caller's torch, numpy and Python generators as they were."""
    import torch

    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(
            devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []
        ):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


# -- training ---------------------------------------------------------------------------------


def finetune(
    encoder_name: str,
    train_dataset: ImageDataset,
    output_dir: str | os.PathLike[str],
    *,
    recipe: FinetuneRecipe | None = None,
    device: str = "auto",
    num_workers: int | None = None,
    progress: bool = True,
    force: bool = False,
    log: Log = lambda message: None,
    callback: Callable[[int, int], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``encoder_name``'s image tower with a linear head on ``train_dataset``.

    The head is ``Linear(feature_dim, n_classes)`` on the encoder's ``"features"``, over the
    classes present in the labels (in increasing label order). A checkpoint is written after
    every epoch; a rerun with the same encoder, data and recipe resumes from it (with the same
    final weights as an uninterrupted run). Refused before any training: an unknown encoder, an
    unlabelled dataset or one with fewer than 2 classes, a folder that cannot be written, one
    that holds a finished model (unless ``force``) or a checkpoint of another run (unless
    ``force``: it is discarded). The finished folder is read by ``finetuned:OUTPUT_DIR``; the
    checkpoint is removed. Undecodable images are left out of every batch and listed in
    ``skipped``. ``callback(epoch, step)`` (both 0-based) runs after every optimiser step.
    The global random generators are left as they were found.
    """
    from oodprobe.encoders import create_encoder, parse_encoder_name
    from oodprobe.features import default_num_workers, resolve_precision, select_device

    recipe = FinetuneRecipe() if recipe is None else recipe
    if not isinstance(recipe, FinetuneRecipe):
        raise InvalidParameterError(f"recipe must be a FinetuneRecipe, got {type(recipe).__name__}")
    if num_workers is not None and (not _is_int(num_workers) or num_workers < 0):
        raise InvalidParameterError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    if not isinstance(encoder_name, str) or not encoder_name:
        raise InvalidParameterError(
            f"encoder name must be a non-empty string, got {encoder_name!r}"
        )
    if encoder_name.startswith("finetuned:"):
        raise InvalidParameterError(
            f"{encoder_name!r} is already fine-tuned; fine-tune its base encoder instead"
        )
    if parse_encoder_name(encoder_name).source.prefix == "concat":
        raise InvalidParameterError(
            f"{encoder_name!r} is a concatenation of encoders, which has no forward pass; "
            f"fine-tune one of its parts"
        )
    if parse_encoder_name(encoder_name).local:
        raise InvalidParameterError(
            f"{encoder_name!r} is a ',local' (patch-token) variant; fine-tune the encoder "
            f"without ',local'"
        )
    if parse_encoder_name(encoder_name).tap is not None:  # also refuses unknown names, cheaply
        raise InvalidParameterError(
            f"{encoder_name!r} is an intermediate-block variant; fine-tune the whole encoder "
            f"({parse_encoder_name(encoder_name).base!r})"
        )
    torch_device = select_device(device)
    precision = resolve_precision(recipe.precision, torch_device)
    labels = train_dataset.labels
    if labels is None:
        raise DataError(
            f"fine-tuning needs labelled training images, and {train_dataset.name!r} has no "
            "labels; use a folder with one subfolder per class or a labelled dataset"
        )
    if len(train_dataset) == 0:
        raise DataError(f"dataset {train_dataset.name!r} has no images")
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise DataError(
            f"fine-tuning needs at least 2 classes, and {train_dataset.name!r} has "
            f"{len(classes)}; add images of other classes"
        )
    output = Path(output_dir).expanduser()
    _check_output_dir(output)
    metadata_path, weights_path = output / METADATA_FILE, output / WEIGHTS_FILE
    checkpoint_path = output / CHECKPOINT_FILE
    if metadata_path.exists() and not force:
        raise InvalidParameterError(
            f"{output} already holds a fine-tuned model ({METADATA_FILE}); pass --force "
            "(force=True) to replace it, or choose another --output"
        )
    encoder = create_encoder(encoder_name)
    tower, tower_path = image_tower(encoder)
    run = {
        "format": FORMAT_VERSION,
        "encoder": encoder_name,
        "encoder_cache_id": encoder.cache_id,
        "dataset_fingerprint": train_dataset.fingerprint(),
        "n_images": len(train_dataset),
        "classes": [int(c) for c in classes],
        "recipe": recipe.as_dict(),
        # precision "auto" resolves per device: a run resumed elsewhere must not change it
        "precision": precision,
    }
    state = _load_checkpoint(checkpoint_path, run, force)
    if force:
        for path in (metadata_path, weights_path):
            path.unlink(missing_ok=True)
        if state is None:
            checkpoint_path.unlink(missing_ok=True)
    workers = default_num_workers() if num_workers is None else num_workers

    with _global_rng_kept():
        trained = _Training(
            encoder, tower, train_dataset, labels, classes, recipe, torch_device, precision
        )
        first_epoch = 0
        if state is not None:
            first_epoch = trained.load_state(state)
            log(f"resuming {encoder_name} after epoch {first_epoch} of {recipe.epochs}")
        started = time.perf_counter()
        images = 0
        for epoch in range(first_epoch, recipe.epochs):
            entry = trained.run_epoch(epoch, workers, progress, callback)
            images += int(entry["images"])
            speed = entry["images"] / max(entry["seconds"], 1e-9)
            log(
                f"epoch {epoch + 1}/{recipe.epochs}: loss {entry['loss']:.4f}, accuracy "
                f"{100 * entry['accuracy']:.1f}%, {speed:.1f} images/s"
            )
            _atomic_torch_save(
                {**trained.state(epoch + 1), "run": {"json": json.dumps(run)}}, checkpoint_path
            )
        seconds = time.perf_counter() - started
        tensors = trained.final_weights()

    from safetensors.torch import save_file

    from oodprobe.encoders.base import file_sha256
    from oodprobe.files import atomic_write, write_text_atomic

    atomic_write(weights_path, lambda temporary: save_file(tensors, str(temporary)))
    names = train_dataset.class_names
    metadata = {
        "format": FORMAT_VERSION,
        "base_encoder": encoder_name,
        "base_cache_id": encoder.cache_id,
        "base_class": type(encoder).__name__,
        "tower": tower_path,
        "feature_dim": int(encoder.feature_dim),
        "n_classes": len(classes),
        "classes": [int(c) for c in classes],
        "class_names": (
            [names[int(c)] if 0 <= int(c) < len(names) else str(int(c)) for c in classes]
            if names is not None
            else None
        ),
        "dataset": train_dataset.name,
        "dataset_fingerprint": run["dataset_fingerprint"],
        "n_images": len(train_dataset),
        "recipe": recipe.as_dict(),
        "precision": precision,
        "device": str(torch_device),
        "ema": recipe.uses_ema,
        "weights_are": "ema" if recipe.uses_ema else "trained",
        "history": trained.history,
        "skipped": [[item.index, item.source, item.reason] for item in trained.skipped],
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": file_sha256(weights_path),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_text_atomic(metadata_path, json.dumps(metadata, indent=2) + "\n")
    checkpoint_path.unlink(missing_ok=True)
    ran = recipe.epochs - first_epoch
    return FinetuneResult(
        output_dir=output,
        model_path=weights_path,
        metadata_path=metadata_path,
        encoder_name=f"finetuned:{output_dir}",
        epochs_done=recipe.epochs,
        resumed_from_epoch=first_epoch,
        history=trained.history,
        images_per_second=images / seconds if ran and seconds > 0 else 0.0,
        seconds=seconds,
        ema=recipe.uses_ema,
        skipped=list(trained.skipped),
    )


class _Training:
    """Model, head, optimiser, schedule, EMA and scaler of one fine-tuning run."""

    def __init__(
        self,
        encoder: ImageEncoder,
        tower: torch.nn.Module,
        dataset: ImageDataset,
        labels: np.ndarray,
        classes: np.ndarray,
        recipe: FinetuneRecipe,
        device: torch.device,
        precision: str,
    ) -> None:
        import torch
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy
        from timm.utils import ModelEmaV3

        from oodprobe.detectors.probe import warmup_cosine_factor

        self.encoder, self.tower, self.dataset, self.recipe = encoder, tower, dataset, recipe
        self.device, self.precision = device, precision
        position = {int(c): i for i, c in enumerate(classes)}
        self.targets = torch.as_tensor([position[int(c)] for c in labels], dtype=torch.int64)
        self.transform = _train_transform(encoder, recipe)
        self.skipped: list[SkippedImage] = []
        self.history: list[dict[str, float]] = []

        encoder.requires_grad_(False)
        tower.requires_grad_(True)
        self.frozen = _freeze(tower, recipe.freeze_blocks, encoder.name)
        torch.manual_seed(_seed_of(recipe.seed, _HEAD))
        self.head = torch.nn.Linear(int(encoder.feature_dim), len(classes))
        encoder.to(device)
        self.head.to(device)
        # channels-last convolutions run 1.5-2x faster (CPU) and use tensor cores (GPU)
        encoder.to(memory_format=torch.channels_last)
        self.trained = torch.nn.ModuleDict({"tower": tower, "head": self.head})
        parameters = [p for p in self.trained.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [
                {
                    "params": [p for p in parameters if p.ndim > 1],
                    "weight_decay": recipe.weight_decay,
                },
                {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0},
            ],
            lr=recipe.lr,
        )
        n_steps = recipe.epochs * _steps_per_epoch(recipe, len(dataset))
        warmup = round(recipe.warmup_epochs * _steps_per_epoch(recipe, len(dataset)))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine_factor(step, n_steps, warmup)
        )
        self.ema = (
            ModelEmaV3(self.trained, decay=recipe.ema_decay, use_warmup=recipe.ema_warmup)
            if recipe.uses_ema
            else None
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.mixup = (
            Mixup(
                mixup_alpha=recipe.mixup,
                cutmix_alpha=recipe.cutmix,
                label_smoothing=recipe.label_smoothing,
                num_classes=len(classes),
            )
            if recipe.mixes
            else None
        )
        self.soft_loss = SoftTargetCrossEntropy()
        self.hard_loss = torch.nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        self.step = 0

    def state(self, epochs_done: int) -> dict[str, Any]:
        return {
            "epoch": epochs_done,
            "step": self.step,
            "model": self.trained.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else {},
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "history": self.history,
            "skipped": [[item.index, item.source, item.reason] for item in self.skipped],
        }

    def load_state(self, state: dict[str, Any]) -> int:
        from oodprobe.data.base import SkippedImage

        self.trained.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.history = [dict(entry) for entry in state["history"]]
        self.skipped = [SkippedImage(int(i), str(s), str(r)) for i, s, r in state["skipped"]]
        return int(state["epoch"])

    def final_weights(self) -> dict[str, torch.Tensor]:
        module = self.ema.module if self.ema is not None else self.trained
        return {
            name: tensor.detach().cpu().contiguous().clone()
            for name, tensor in module.state_dict().items()
        }

    def run_epoch(
        self,
        epoch: int,
        num_workers: int,
        progress: bool,
        callback: Callable[[int, int], None] | None,
    ) -> dict[str, float]:
        import torch

        from oodprobe.data.base import SkippedImage
        from oodprobe.features import _progress_bar, autocast_for, batch_loader

        recipe, device = self.recipe, self.device
        batches = _epoch_batches(recipe, len(self.dataset), epoch)
        loader = batch_loader(
            _TrainImages(self.dataset, self.transform),
            batches,
            _collate,
            num_workers=num_workers,
            device=device,
        )
        autocast = autocast_for(self.precision, device)
        self.encoder.eval()
        self.tower.train()
        for module in self.frozen:
            module.eval()
        # sums stay on the device (no sync per step); a step whose loss is not finite is
        # counted: fp16's gradient scaler skips such steps, in fp32/bf16 the run has diverged
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        bad_steps = torch.zeros((), dtype=torch.int64, device=device)
        seen, n_steps = 0, 0
        known = {item.index for item in self.skipped}
        started = time.perf_counter()
        total = sum(len(batch) for batch in batches)
        with _progress_bar(
            progress, total, f"fine-tune epoch {epoch + 1}/{recipe.epochs}"
        ) as advance:
            for batch_number, (indices, pixels, failed) in enumerate(loader):
                for index, message in failed:
                    if index not in known:
                        known.add(index)
                        reason = message.rsplit(": ", 1)[-1] if ": " in message else message
                        self.skipped.append(
                            SkippedImage(index, self.dataset.describe(index), reason)
                        )
                advance(len(indices) + len(failed))
                if pixels is None:
                    continue
                targets = self.targets[indices].to(device)
                pixels = pixels.to(device, memory_format=torch.channels_last, non_blocking=True)
                if self.mixup is not None and len(indices) % 2:
                    pixels, targets, indices = pixels[:-1], targets[:-1], indices[:-1]
                if not indices:
                    continue
                # dropout, drop-path and mixing draw from the global generators: seed them per step
                step_seed = _seed_of(recipe.seed, _STEP, epoch, batch_number)
                torch.manual_seed(step_seed)
                np.random.seed(step_seed % 2**32)
                hard_targets = targets
                if self.mixup is not None:
                    pixels, soft = self.mixup(pixels, targets)
                with autocast:
                    features = self.encoder(pixels)["features"]
                    logits = self.head(features)
                loss = (
                    self.soft_loss(logits.float(), soft)
                    if self.mixup is not None
                    else self.hard_loss(logits.float(), targets)
                )
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.step += 1
                if self.ema is not None:
                    self.ema.update(self.trained, step=self.step)
                finite = torch.isfinite(loss.detach())
                loss_sum += torch.where(finite, loss.detach(), 0.0) * len(indices)
                bad_steps += ~finite
                correct += (logits.detach().argmax(dim=1) == hard_targets).sum()
                seen += len(indices)
                n_steps += 1
                if callback is not None:
                    callback(epoch, batch_number)
        self.encoder.eval()
        seconds = time.perf_counter() - started
        if seen == 0:
            raise DataError(
                f"no image of {self.dataset.name!r} could be decoded for training "
                f"({len(self.skipped)} skipped); fix or replace those files"
            )
        n_bad = int(bad_steps)
        if n_bad and (self.precision != "fp16" or 2 * n_bad > n_steps):
            raise InvalidParameterError(
                f"fine-tuning diverged: the loss was not finite in {n_bad} of {n_steps} steps "
                f"of epoch {epoch + 1}; lower the learning rate (lr={recipe.lr})"
                + (" or use precision fp32/bf16" if self.precision == "fp16" else "")
            )
        entry = {
            "epoch": float(epoch + 1),
            "loss": float(loss_sum) / seen,
            "accuracy": int(correct) / seen,
            "lr": float(self.scheduler.get_last_lr()[0]),
            "images": float(seen),
            "seconds": seconds,
        }
        self.history.append(entry)
        return entry
