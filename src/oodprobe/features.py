"""Feature extraction: batched, decoding in worker processes, cached and resumable.

``extract_features(dataset, encoder)`` returns a :class:`FeatureSet`. Images are decoded and
transformed in DataLoader workers while the main process runs the model, under
``torch.inference_mode`` on the best device (cuda, mps, cpu) and, on a GPU, in fp16/bf16.
Results go to the sharded cache (:mod:`oodprobe.cache`): a rerun reads them without a forward
pass, and a run killed half way resumes at the first missing shard.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from oodprobe import cache
from oodprobe.data.base import ImageDataset, SkippedImage
from oodprobe.encoders import ImageEncoder, create_encoder
from oodprobe.errors import CacheError, DataError, InvalidParameterError

Precision = Literal["auto", "fp32", "fp16", "bf16"]
OnError = Literal["skip", "raise"]
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class FeatureSet:
    """Extracted arrays for the decodable images of a dataset, in dataset order.

    ``arrays["features"]`` is (n_rows, D) float32; classifiers add ``arrays["logits"]``.
    ``indices[i]`` is the dataset index of row ``i`` (images that failed to decode are left out
    and listed in ``skipped``); ``labels`` are those rows' labels, if the dataset has any.
    """

    arrays: dict[str, np.ndarray]
    indices: np.ndarray
    labels: np.ndarray | None
    class_names: tuple[str, ...] | None
    skipped: list[SkippedImage]
    encoder_name: str
    dataset_name: str
    key: str
    path: Path | None
    from_cache: bool
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def features(self) -> np.ndarray:
        return self.arrays["features"]

    @property
    def logits(self) -> np.ndarray | None:
        return self.arrays.get("logits")

    def __len__(self) -> int:
        return len(self.indices)


def select_device(device: str = "auto") -> torch.device:
    """``auto`` → cuda if available, else mps, else cpu; otherwise the named device."""
    if device != "auto":
        try:
            return torch.device(device)
        except RuntimeError as error:
            raise InvalidParameterError(f"unknown device {device!r}: {error}") from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → fp16 on cuda/mps, fp32 on cpu; fp16 on cpu is refused (slow and lossy)."""
    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise InvalidParameterError(
            f"precision must be one of auto, fp32, fp16, bf16, got {precision!r}"
        )
    if precision == "auto":
        return "fp16" if device.type in ("cuda", "mps") else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise InvalidParameterError("precision fp16 needs a GPU; use fp32 or bf16 on the cpu")
    return precision


def default_num_workers() -> int:
    """One decoding worker per spare core (at least one, at most 8)."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class _DecodeDataset(torch.utils.data.Dataset[tuple[int, torch.Tensor | None, str]]):
    """Decodes and transforms images in workers; failures travel back as messages."""

    def __init__(self, dataset: ImageDataset, transform: Any) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, self.transform(self.dataset.load(index)), ""
        except DataError as error:
            return index, None, str(error)


def _collate(
    items: list[tuple[int, torch.Tensor | None, str]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    failed = [(index, reason) for index, pixels, reason in items if pixels is None]
    batch = torch.stack([pixels for _, pixels in good]) if good else None
    return [index for index, _ in good], batch, failed


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the model for cores


def _shard_batches(
    missing: Sequence[int], n_images: int, shard_size: int, batch_size: int
) -> list[list[int]]:
    """Batches of dataset indices that never straddle a shard, so any shard can be resumed."""
    batches: list[list[int]] = []
    for shard in missing:
        indices = list(range(shard * shard_size, min((shard + 1) * shard_size, n_images)))
        batches.extend(indices[i : i + batch_size] for i in range(0, len(indices), batch_size))
    return batches


def _provenance(
    encoder: ImageEncoder, dataset: ImageDataset, device: torch.device, precision: str
) -> dict[str, Any]:
    versions = {}
    for package in ("oodprobe", "torch", "torchvision", "open_clip_torch", "transformers", "timm"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "encoder": encoder.name,
        "encoder_cache_id": encoder.cache_id,
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint(),
        "n_images": len(dataset),
        "device": str(device),
        "precision": precision,
        "versions": versions,
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, description: str) -> Iterator[Any]:
    if not enabled or total == 0:
        yield lambda advance: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda advance: progress.advance(task, advance)


def extract_features(
    dataset: ImageDataset,
    encoder: ImageEncoder | str,
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str = "auto",
    precision: Precision = "auto",
    cache_root: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    on_error: OnError = "skip",
    shard_size: int = 2048,
    progress: bool = True,
) -> FeatureSet:
    """Encode every image of ``dataset``; serve from or fill the feature cache.

    ``on_error="skip"`` leaves undecodable images out and lists them in ``FeatureSet.skipped``;
    ``"raise"`` stops at the first one with a DataError naming its path (the shards written so
    far are kept, so a rerun resumes). ``use_cache=False`` extracts into a temporary folder.
    """
    if on_error not in ("skip", "raise"):
        raise InvalidParameterError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if value < 1:
            raise InvalidParameterError(f"{name} must be >= 1, got {value}")
    if len(dataset) == 0:
        raise DataError(f"dataset {dataset.name!r} has no images")
    if isinstance(encoder, str):
        encoder = create_encoder(encoder)
    torch_device = select_device(device)
    resolved_precision = resolve_precision(precision, torch_device)
    options = {
        "batch_size": batch_size,
        "num_workers": default_num_workers() if num_workers is None else num_workers,
        "on_error": on_error,
        "shard_size": shard_size,
        "progress": progress,
    }
    key = cache.cache_key(
        {
            "encoder": encoder.cache_id,
            "precision": resolved_precision,
            "dataset": dataset.fingerprint(),
            "n_images": len(dataset),
            "shard_size": shard_size,
        }
    )
    if not use_cache:  # extract into a temporary folder and keep the arrays in memory
        with tempfile.TemporaryDirectory(prefix="oodprobe-") as scratch:
            result = _cached_extraction(
                dataset, encoder, Path(scratch), key, torch_device, resolved_precision, options
            )
            result.arrays = {name: np.array(array) for name, array in result.arrays.items()}
            result.path = None
            return result
    root = Path(cache_root) if cache_root is not None else cache.default_cache_root()
    return _cached_extraction(
        dataset, encoder, root, key, torch_device, resolved_precision, options
    )


def _cached_extraction(
    dataset: ImageDataset,
    encoder: ImageEncoder,
    root: Path,
    key: str,
    device: torch.device,
    precision: str,
    options: dict[str, Any],
) -> FeatureSet:
    directory = cache.entry_dir(root, key)
    with cache.locked(directory):
        if (directory / "meta.json").exists():
            try:
                return _feature_set(directory, dataset, encoder, key, from_cache=True)
            except CacheError as error:
                warnings.warn(
                    f"feature cache entry is damaged ({error}); rebuilding it", stacklevel=3
                )
                cache.remove_entry(directory)
        started = time.perf_counter()
        n_encoded = _extract_missing_shards(
            dataset, encoder, directory, key, device=device, precision=precision, **options
        )
        meta = _provenance(encoder, dataset, device, precision)
        meta["shard_size"] = options["shard_size"]
        cache.write_entry(directory, -(-len(dataset) // options["shard_size"]), meta)
        result = _feature_set(directory, dataset, encoder, key, from_cache=False, verify=False)
        elapsed = time.perf_counter() - started
        result.stats = {
            "images_encoded": n_encoded,
            "seconds": elapsed,
            "images_per_second": n_encoded / elapsed if elapsed > 0 else 0.0,
        }
        return result


def _valid_shards(directory: Path, n_shards: int) -> set[int]:
    """Shards already on disk that pass their checksum; damaged ones are deleted."""
    valid = set()
    for shard in range(n_shards):
        if not cache.shard_path(directory, shard).exists():
            continue
        try:
            cache.read_shard(directory, shard)
            valid.add(shard)
        except CacheError as error:
            warnings.warn(f"{error}; recomputing that shard", stacklevel=3)
            cache.shard_path(directory, shard).unlink(missing_ok=True)
    return valid


def _extract_missing_shards(
    dataset: ImageDataset,
    encoder: ImageEncoder,
    directory: Path,
    key: str,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str,
    on_error: str,
    shard_size: int,
    progress: bool,
) -> int:
    """Encode the images of every shard not yet on disk; returns how many images were encoded."""
    n_images = len(dataset)
    n_shards = -(-n_images // shard_size)
    missing = [
        shard for shard in range(n_shards) if shard not in _valid_shards(directory, n_shards)
    ]
    batches = _shard_batches(missing, n_images, shard_size, batch_size)
    loader = torch.utils.data.DataLoader(
        _DecodeDataset(dataset, encoder.pixel_transform),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )
    # channels-last convolutions run 1.5-2x faster on CPU (EfficientNet-Lite0, 2 cores) and use
    # tensor cores on GPU; only 4-d weights change layout, so transformers are unaffected.
    encoder.to(device)
    encoder.to(memory_format=torch.channels_last)
    autocast = (
        torch.autocast(device.type, dtype=_DTYPES[precision])
        if precision in _DTYPES
        else contextlib.nullcontext()
    )
    buffers: dict[str, list[np.ndarray]] = {name: [] for name in encoder.outputs}
    kept: list[int] = []
    skipped: list[list[Any]] = []
    current = missing[0] if missing else -1
    n_encoded = 0

    def flush(shard: int) -> None:
        arrays = {
            name: (
                np.concatenate(parts)
                if parts
                else np.zeros((0, *_output_shape(encoder, name)), np.float32)
            )
            for name, parts in buffers.items()
        }
        arrays["indices"] = np.asarray(kept, dtype=np.int64)
        cache.write_shard(directory, shard, arrays, {"key": key, "skipped": skipped})
        for parts in buffers.values():
            parts.clear()
        kept.clear()
        skipped.clear()

    total = sum(len(batch) for batch in batches)
    with (
        _progress_bar(progress, total, f"{encoder.name} · {dataset.name}") as advance,
        torch.inference_mode(),
    ):
        for indices, pixels, failed in loader:
            first = indices[0] if indices else failed[0][0]
            shard = first // shard_size
            if shard != current:
                flush(current)
                current = shard
            for index, reason in failed:
                if on_error == "raise":
                    raise DataError(reason)
                skipped.append([index, dataset.describe(index), _short_reason(reason)])
            if pixels is not None:
                with autocast:
                    outputs = encoder(
                        pixels.to(device, memory_format=torch.channels_last, non_blocking=True)
                    )
                for name in encoder.outputs:
                    buffers[name].append(outputs[name].float().cpu().numpy())
                kept.extend(indices)
                n_encoded += len(indices)
            advance(len(indices) + len(failed))
        if current >= 0:
            flush(current)
    encoder.to("cpu")
    encoder.to(memory_format=torch.contiguous_format)
    return n_encoded


def _short_reason(message: str) -> str:
    """The reason part of a DataError ``'cannot decode PATH: reason'`` message."""
    return message.rsplit(": ", 1)[-1] if ": " in message else message


def _output_shape(encoder: ImageEncoder, name: str) -> tuple[int, ...]:
    # Only needed for a shard whose every image failed; probe once with a blank image.
    from PIL import Image

    pixels = encoder.pixel_transform(Image.new("RGB", (32, 32))).unsqueeze(0)
    device = encoder.pixel_mean.device
    with torch.inference_mode():
        return tuple(encoder(pixels.to(device))[name].shape[1:])


def _feature_set(
    directory: Path,
    dataset: ImageDataset,
    encoder: ImageEncoder,
    key: str,
    *,
    from_cache: bool,
    verify: bool = True,
) -> FeatureSet:
    arrays, meta = cache.read_entry(directory, verify=verify)
    indices = arrays.pop("indices")
    labels = None if dataset.labels is None else np.asarray(dataset.labels)[indices]
    skipped = [
        SkippedImage(int(i), str(source), str(reason)) for i, source, reason in meta["skipped"]
    ]
    return FeatureSet(
        arrays=arrays,
        indices=indices,
        labels=labels,
        class_names=dataset.class_names,
        skipped=skipped,
        encoder_name=encoder.name,
        dataset_name=dataset.name,
        key=key,
        path=directory,
        from_cache=from_cache,
        stats={"images_encoded": 0} if from_cache else {},
    )


def load_features(path: str | os.PathLike[str], *, mmap: bool = False) -> dict[str, np.ndarray]:
    """Read a complete cache entry's arrays (``features``, ``logits``, ``indices``) verified."""
    arrays, _ = cache.read_entry(Path(path), verify=not mmap, mmap=mmap)
    return arrays
