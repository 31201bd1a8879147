"""Feature extraction: batched, decoding in worker processes, cached and resumable.

``extract_features(dataset, encoder)`` returns a :class:`FeatureSet`. Images are decoded and
transformed in DataLoader workers while the main process runs the model, under
``torch.inference_mode`` on the best device (cuda, mps, cpu) and, on a GPU, in fp16/bf16.
Results go to the sharded cache (:mod:`oodprobe.cache`): a rerun reads them without a forward
pass, and a run killed half way resumes with the missing shards (each shard on disk is
validated once). The caller's encoder is left as it was found (device, memory layout, mode).
An encoder's linear classifier head (``ImageEncoder.head_arrays``) is stored with its features
and comes back as ``FeatureSet.head``, so the post-hoc detectors need no model.

At scale: ``store_dtype="float16"`` or ``"bfloat16"`` stores the outputs at half the size
(cast after the forward pass; part of the cache key), and ``engine="ray"`` computes the
missing shards on Ray Data, locally or on a cluster (:mod:`oodprobe.ray_engine`). Either
engine writes the same shards (:class:`_ShardWriter`), so each resumes and reads the other's.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from oodprobe import cache
from oodprobe.data.base import SCAN_INDEX, ImageDataset, SkippedImage
from oodprobe.data.decode import DecodeError
from oodprobe.encoders import ImageEncoder, create_encoder
from oodprobe.encoders.base import HeadArrays
from oodprobe.errors import CacheError, DataError, InvalidParameterError

if TYPE_CHECKING:
    from oodprobe.encoders.concat import ConcatEncoder

Precision = Literal["auto", "fp32", "fp16", "bf16"]
OnError = Literal["skip", "raise"]
StoreDtype = Literal["float32", "float16", "bfloat16"]
Engine = Literal["local", "ray"]
STORE_DTYPES: tuple[str, ...] = cache.OUTPUT_DTYPES
ENGINES: tuple[str, ...] = ("local", "ray")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_FLOAT32 = np.dtype(np.float32)


def storage_dtype(store_dtype: str) -> np.dtype[Any]:
    """The numpy dtype features are stored in: float32, float16 or ``ml_dtypes.bfloat16``.

    Anything else is an InvalidParameterError of one line (:func:`oodprobe.cache.output_dtype`
    with the parameter's name).
    """
    if not isinstance(store_dtype, str) or store_dtype not in STORE_DTYPES:
        raise InvalidParameterError(
            f"store_dtype must be one of {', '.join(STORE_DTYPES)}, got {store_dtype!r}"
        )
    return cache.output_dtype(store_dtype)


def check_engine(engine: str, ray_address: str | None = None) -> None:
    """InvalidParameterError unless ``engine`` is local or ray, and ray is importable for ray.

    Cheap (imports nothing heavy for ``local``): call it when options are built, before work.
    """
    if not isinstance(engine, str) or engine not in ENGINES:
        raise InvalidParameterError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if ray_address is not None and (not isinstance(ray_address, str) or not ray_address):
        raise InvalidParameterError(
            f"ray_address must be a Ray address such as 'ray://head:10001' or 'auto', "
            f"got {ray_address!r}"
        )
    if engine == "ray":
        from oodprobe.ray_engine import require_ray

        require_ray()


@dataclass
class FeatureSet:
    """Extracted arrays for the decodable images of a dataset, in dataset order.

    ``arrays["features"]`` is (n_rows, D) of the storage dtype (float32 unless extraction was
    asked for float16 or ``ml_dtypes.bfloat16``; memory-mapped when read from the cache);
    classifiers add ``arrays["logits"]``.
    ``indices[i]`` is the dataset index of row ``i`` (images that failed to decode are left out
    and listed in ``skipped``); ``labels`` are those rows' labels, if the dataset has any.
    ``skipped`` lists first what the dataset's scan left out (``index == -1``: symbolic-link
    loops, dangling links, duplicates; see ``ImageDataset.scan_skipped``), then the undecodable
    images in index order. It is the same whether the features come from the cache or not.
    ``head`` is the encoder's classifier head ``(weight (C, D), bias (C,))`` float32 with
    ``logits = features @ weight.T + bias``, or None for an encoder without a linear one.
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
    head: HeadArrays | None = None

    @property
    def features(self) -> np.ndarray:
        return self.arrays["features"]

    def subset(self, rows: np.ndarray) -> FeatureSet:
        """The FeatureSet of some of its rows (positions, e.g. a fit/calibration split).

        Arrays, indices and labels are taken in memory; ``skipped`` is not (it describes the
        whole dataset). The head, names and key stay.
        """
        rows = np.asarray(rows)
        return FeatureSet(
            arrays={name: np.asarray(array[rows]) for name, array in self.arrays.items()},
            indices=self.indices[rows],
            labels=None if self.labels is None else self.labels[rows],
            class_names=self.class_names,
            skipped=[],
            encoder_name=self.encoder_name,
            dataset_name=self.dataset_name,
            key=self.key,
            path=self.path,
            from_cache=self.from_cache,
            stats=dict(self.stats),
            head=self.head,
        )

    @property
    def logits(self) -> np.ndarray | None:
        return self.arrays.get("logits")

    def __len__(self) -> int:
        return len(self.indices)


_DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"


def select_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → cuda if available, else mps, else cpu; otherwise the named device, checked.

    A device this machine does not have (``cuda`` without a CUDA GPU, ``cuda:3`` on a machine
    with fewer GPUs, ``mps`` off Apple silicon), a malformed name (``gpu``) or an unsupported
    device type is an InvalidParameterError of one line. Cheap (no CUDA context is created):
    call it when a run is set up, before any extraction.
    """
    text = str(device) if isinstance(device, torch.device) else device
    if not isinstance(text, str):
        raise InvalidParameterError(f"device must be one of {_DEVICE_CHOICES}, got {device!r}")
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise InvalidParameterError(
            f"unknown device {text!r}; choose from: {_DEVICE_CHOICES}"
        ) from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidParameterError(
                f"device {text!r} was requested but no CUDA GPU is available; "
                "use --device auto or cpu"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise InvalidParameterError(
                f"device {text!r} was requested but this machine has {count} CUDA GPU(s) "
                f"(cuda:0 to cuda:{count - 1}); use --device auto, cuda or cpu"
            )
        return parsed
    if parsed.type == "mps":
        if not _mps_available():
            raise InvalidParameterError(
                f"device {text!r} was requested but MPS (Apple GPU) is not available; "
                "use --device auto or cpu"
            )
        return parsed
    raise InvalidParameterError(f"device {text!r} is not supported; choose from: {_DEVICE_CHOICES}")


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → fp16 on cuda/mps, fp32 on cpu; fp16 on cpu is refused (slow and lossy).

    Anything but ``auto``, ``fp32``, ``fp16``, ``bf16`` is an InvalidParameterError of one line.
    """
    if not isinstance(precision, str) or precision not in ("auto", "fp32", "fp16", "bf16"):
        raise InvalidParameterError(
            f"precision must be one of auto, fp32, fp16, bf16, got {precision!r}"
        )
    if precision == "auto":
        return "fp16" if device.type in ("cuda", "mps") else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise InvalidParameterError("precision fp16 needs a GPU; use fp32 or bf16 on the cpu")
    return precision


def autocast_for(precision: str, device: torch.device) -> Any:
    """The autocast context of a resolved precision: fp16/bf16 autocast, or none for fp32.

    The one home extraction, fine-tuning and the attacks share. A context manager object that
    can be entered again and again (``torch.autocast`` is re-entrant).
    """
    if precision in _DTYPES:
        return torch.autocast(device.type, dtype=_DTYPES[precision])
    return contextlib.nullcontext()


def default_num_workers() -> int:
    """One decoding worker per spare core (at least one, at most 8)."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


# (index, pixels or None, (short reason, full message) of a failure)
_Item = tuple[int, torch.Tensor | None, tuple[str, str]]


class _DecodeDataset(torch.utils.data.Dataset[_Item]):
    """Decodes and transforms images in workers; failures travel back as messages."""

    def __init__(self, dataset: ImageDataset, transform: Any) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> _Item:
        try:
            return index, self.transform(self.dataset.load(index)), ("", "")
        except DecodeError as error:
            return index, None, (error.reason, str(error))
        except DataError as error:
            return index, None, (_short_reason(str(error)), str(error))


def _collate(
    items: list[_Item],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, tuple[str, str]]]]:
    good = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    failed = [(index, problem) for index, pixels, problem in items if pixels is None]
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


def _check_count(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidParameterError(f"{name} must be >= 1, got {value!r}")


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
    store_dtype: StoreDtype = "float32",
    engine: Engine = "local",
    ray_address: str | None = None,
) -> FeatureSet:
    """Encode every image of ``dataset``; serve from or fill the feature cache.

    ``on_error="skip"`` leaves undecodable images out and lists them in ``FeatureSet.skipped``;
    ``"raise"`` stops at the first one (in index order) with a DataError naming its path (the
    shards written so far are kept, so a rerun resumes); features read from the cache raise the
    same error. Either way a labelled class, or the whole dataset, left without a single image
    is a DataError naming it (:func:`check_nothing_lost`). ``use_cache=False`` extracts into a
    temporary folder. The encoder is put in eval mode, on ``device``, in channels-last layout
    while it runs, and restored to its own device, layout and mode when extraction ends.

    ``store_dtype`` (float32, float16, bfloat16: ``ml_dtypes.bfloat16``) is the dtype the
    cache stores the encoder's outputs in (cast after the forward pass, which runs at
    ``precision``); it is part of the cache key, float32 keeping the keys of entries written
    before it existed. ``engine="ray"`` computes the missing shards on Ray Data
    (:mod:`oodprobe.ray_engine`: decoding in CPU tasks, the encoder in an actor pool, one actor
    per GPU) on a local Ray, or on the cluster at ``ray_address``; the shards it writes are the
    ones the local engine writes, so either engine reads, resumes and completes the other's.
    With it, ``device`` is the actors' (auto: cuda where the cluster has GPUs, else cpu).
    """
    if on_error not in ("skip", "raise"):
        raise InvalidParameterError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    storage_dtype(store_dtype)
    check_engine(engine, ray_address)
    _check_count("batch_size", batch_size)
    _check_count("shard_size", shard_size)
    if num_workers is not None and (
        not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0
    ):
        raise InvalidParameterError(f"num_workers must be >= 0, got {num_workers!r}")
    if len(dataset) == 0:
        raise DataError(f"dataset {dataset.name!r} has no images")
    torch_device = run_device(device, engine, ray_address)
    resolved_precision = resolve_precision(precision, torch_device)
    if isinstance(encoder, str):
        encoder = create_encoder(encoder)
    from oodprobe.encoders.concat import ConcatEncoder

    if isinstance(encoder, ConcatEncoder):  # each part in its own entry, then side by side
        parts = [
            extract_features(
                dataset,
                part,
                batch_size=batch_size,
                num_workers=num_workers,
                device=device,
                precision=precision,
                cache_root=cache_root,
                use_cache=use_cache,
                on_error=on_error,
                shard_size=shard_size,
                progress=progress,
                store_dtype=store_dtype,
                engine=engine,
                ray_address=ray_address,
            )
            for part in encoder.part_encoders
        ]
        return concatenate_feature_sets(encoder, parts)
    options = {
        "batch_size": batch_size,
        "num_workers": default_num_workers() if num_workers is None else num_workers,
        "on_error": on_error,
        "shard_size": shard_size,
        "progress": progress,
        "store_dtype": store_dtype,
        "engine": engine,
        "ray_address": ray_address,
    }
    key = _entry_key(encoder.cache_id, resolved_precision, dataset, shard_size, store_dtype)
    if not use_cache:  # extract into a temporary folder and keep the arrays in memory
        with tempfile.TemporaryDirectory(prefix="oodprobe-") as scratch:
            result = _cached_extraction(
                dataset, encoder, Path(scratch), key, torch_device, resolved_precision, options
            )
            result.arrays = {name: np.array(array) for name, array in result.arrays.items()}
            result.path = None
    else:
        root = Path(cache_root) if cache_root is not None else cache.default_cache_root()
        result = _cached_extraction(
            dataset, encoder, root, key, torch_device, resolved_precision, options
        )
    if on_error == "raise":
        decode_failures = [item for item in result.skipped if item.index != SCAN_INDEX]
        if decode_failures:  # from the cache: the error the cold run raised
            raise DataError(result.stats["messages"][decode_failures[0].index])
    result.stats.pop("messages", None)
    check_nothing_lost(dataset, result.indices, result.skipped)
    return result


def concatenate_feature_sets(encoder: ConcatEncoder, parts: Sequence[FeatureSet]) -> FeatureSet:
    """The FeatureSet of a concatenation from its parts' (one per part, same dataset).

    Rows are the images every part decoded (a part's own failures are its ``skipped``, listed
    once); ``features`` the parts' side by side, ``logits`` those of the one part that has
    them, ``head`` that part's classifier padded to the concatenated columns. ``key`` digests
    the parts' keys; ``path`` is None (the arrays live in the parts' entries, ``stats["parts"]``).
    """
    indices = parts[0].indices
    for part in parts[1:]:
        indices = np.intersect1d(indices, part.indices)
    rows = [np.searchsorted(part.indices, indices) for part in parts]
    # the parts' storage dtype when they share one (float16/bfloat16 stay half-size)
    dtypes = {part.features.dtype for part in parts}
    dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)
    features = np.hstack(
        [np.asarray(part.features[kept], dtype) for part, kept in zip(parts, rows, strict=True)]
    )
    arrays = {"features": features}
    if encoder.logits_part is not None:
        index = encoder.logits_part
        logits = parts[index].logits
        if logits is not None:
            arrays["logits"] = np.asarray(logits[rows[index]])
    skipped: list[SkippedImage] = []
    seen: set[tuple[int, str]] = set()
    for part in parts:
        for record in part.skipped:
            if (record.index, record.source) not in seen:
                seen.add((record.index, record.source))
                skipped.append(record)
    first = parts[0]
    return FeatureSet(
        arrays=arrays,
        indices=indices,
        labels=None if first.labels is None else first.labels[rows[0]],
        class_names=first.class_names,
        skipped=skipped,
        encoder_name=encoder.name,
        dataset_name=first.dataset_name,
        key=cache.cache_key({"concat": [part.key for part in parts]}),
        path=None,
        from_cache=all(part.from_cache for part in parts),
        stats={
            "parts": [
                {"encoder": part.encoder_name, "path": str(part.path), **part.stats}
                for part in parts
            ],
            "images_per_second": _combined_rate(parts),
        },
        head=encoder.head_arrays(),
    )


def _combined_rate(parts: Sequence[FeatureSet]) -> float:
    """Images per second of extracting every part one after the other (inf from the cache)."""
    seconds = sum(float(part.stats.get("seconds", 0.0)) for part in parts)
    return len(parts[0]) / seconds if seconds > 0 else float("inf")


def _entry_key(
    cache_id: str,
    precision: str,
    dataset: ImageDataset,
    shard_size: int,
    store_dtype: str = "float32",
) -> str:
    """The cache key of one encoder's features of ``dataset``: all that changes them.

    The storage dtype enters only when it is not float32, so entries written before it existed
    keep their keys. The engine does not enter: both write the same shards.
    """
    payload: dict[str, Any] = {
        "encoder": cache_id,
        "precision": precision,
        "dataset": dataset.fingerprint(),
        "n_images": len(dataset),
        "shard_size": shard_size,
    }
    if store_dtype != "float32":
        payload["store_dtype"] = store_dtype
    return cache.cache_key(payload)


def run_device(device: str, engine: str = "local", ray_address: str | None = None) -> torch.device:
    """The device the encoder runs on: this machine's, or (engine ray) the Ray actors'.

    Checked like :func:`select_device`; with engine ray by
    :func:`oodprobe.ray_engine.actor_device` (auto, cpu or cuda, judged by the cluster's GPUs).
    """
    if engine == "ray":
        from oodprobe.ray_engine import actor_device

        return actor_device(device, ray_address)
    return select_device(device)


@dataclass(frozen=True)
class _VariantView:
    """What a cache entry records of one encoder served by a shared pass (no model)."""

    name: str
    cache_id: str
    outputs: tuple[str, ...]
    source: str  # the shared pass's output that holds this encoder's features
    head: HeadArrays | None = field(default=None, compare=False)  # the final layer's only

    def head_arrays(self) -> HeadArrays | None:
        return self.head


def extract_shared_features(
    dataset: ImageDataset,
    encoder: ImageEncoder,
    outputs: dict[str, str],
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str = "auto",
    precision: Precision = "auto",
    cache_root: str | os.PathLike[str] | None = None,
    shard_size: int = 2048,
    progress: bool = True,
    store_dtype: StoreDtype = "float32",
    engine: Engine = "local",
    ray_address: str | None = None,
) -> dict[str, FeatureSet]:
    """Features of every encoder one forward pass serves, each cached in its own entry.

    ``encoder`` is a shared pass (:func:`oodprobe.encoders.create_shared_encoder`) and
    ``outputs`` maps each encoder name to the output holding its features. Each name's features
    live in the entry ``extract_features(dataset, name)`` reads and writes: encoders already
    cached (by ``bench``, or an earlier study) are read, and only if one is missing does the
    pass run, once, for all of them; its entry is then split into the names' own entries and
    removed. The final-layer encoder keeps the pass's ``logits``. ``store_dtype``, ``engine``
    and ``ray_address`` are :func:`extract_features`'s.
    """
    from oodprobe.encoders.base import TappedEncoder

    storage_dtype(store_dtype)
    check_engine(engine, ray_address)
    torch_device = run_device(device, engine, ray_address)
    resolved_precision = resolve_precision(precision, torch_device)
    root = Path(cache_root) if cache_root is not None else cache.default_cache_root()
    base = encoder.base if isinstance(encoder, TappedEncoder) else encoder
    views = {}
    for name, output in outputs.items():
        is_final = base is encoder or output in base.outputs
        views[name] = _VariantView(
            name=name,
            cache_id=(
                encoder.variant_cache_id(output)
                if isinstance(encoder, TappedEncoder)
                else encoder.cache_id
            ),
            outputs=tuple(base.outputs) if is_final else ("features",),
            source=output,
            head=base.head_arrays() if is_final else None,
        )
    keys = {
        name: _entry_key(view.cache_id, resolved_precision, dataset, shard_size, store_dtype)
        for name, view in views.items()
    }
    results: dict[str, FeatureSet] = {}
    for name, view in views.items():
        directory = cache.entry_dir(root, keys[name])
        with cache.locked(directory):
            if (directory / "meta.json").exists():
                try:
                    results[name] = _feature_set(
                        directory, dataset, view, keys[name], from_cache=True
                    )
                except CacheError as error:
                    warnings.warn(
                        f"feature cache entry is damaged ({error}); rebuilding it", stacklevel=2
                    )
                    cache.remove_entry(directory)
    missing = [name for name in views if name not in results]
    if missing:
        shared = extract_features(
            dataset,
            encoder,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            precision=precision,
            cache_root=root,
            shard_size=shard_size,
            progress=progress,
            store_dtype=store_dtype,
            engine=engine,
            ray_address=ray_address,
        )
        assert shared.path is not None  # extracted into the cache
        n_shards = -(-len(dataset) // shard_size)
        for name in missing:
            view, directory = views[name], cache.entry_dir(root, keys[name])
            with cache.locked(directory):
                _write_view_entry(shared.path, directory, view, keys[name], n_shards, dataset)
                result = _feature_set(
                    directory, dataset, view, keys[name], from_cache=False, verify=False
                )
            result.stats.update(shared.stats)
            results[name] = result
        with cache.locked(shared.path):
            cache.remove_entry(shared.path)  # its arrays now live in the names' own entries
    for result in results.values():
        result.stats.pop("messages", None)
        check_nothing_lost(dataset, result.indices, result.skipped)
    return {name: results[name] for name in outputs}


def _write_view_entry(
    source: Path,
    directory: Path,
    view: _VariantView,
    key: str,
    n_shards: int,
    dataset: ImageDataset,
) -> None:
    """One encoder's entry, cut from the complete entry of the shared pass that computed it.

    Written shard by shard as extraction writes them (rows and skip records by dataset index),
    so the entry is the one ``extract_features`` would have written for that encoder.
    """
    # verified as it was written; memory-mapped, as it is cut into shards row range by range
    arrays, source_meta = cache.read_entry(source, verify=False, mmap=True)
    shard_size = int(source_meta["shard_size"])
    indices = arrays["indices"]
    for shard in range(n_shards):
        low, high = shard * shard_size, (shard + 1) * shard_size
        rows = (indices >= low) & (indices < high)
        kept = {"features": arrays[view.source][rows], "indices": indices[rows]}
        kept.update({name: arrays[name][rows] for name in view.outputs if name != "features"})
        records = [r for r in source_meta["skipped"] if low <= int(r[0]) < high]
        cache.write_shard(directory, shard, kept, {"key": key, "skipped": records})
    meta: dict[str, Any] = {
        "head": None if view.head is None else cache.write_head(directory, *view.head),
        **{
            name: source_meta[name]
            for name in ("device", "precision", "versions", "python", "store_dtype", "engine")
            if name in source_meta
        },
        "encoder": view.name,
        "encoder_cache_id": view.cache_id,
        "shared_pass": source_meta.get("encoder"),
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint(),
        "n_images": len(dataset),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "shard_size": shard_size,
        "key": key,
    }
    cache.write_entry(directory, n_shards, meta)


def check_nothing_lost(
    dataset: ImageDataset, indices: np.ndarray, skipped: Sequence[SkippedImage]
) -> None:
    """DataError if extraction kept no image of ``dataset``, or none of one of its classes.

    ``indices`` are the dataset indices of the extracted rows, ``skipped`` the skip records.
    Classes are those with images in ``dataset.labels`` (a class selection keeps only some).
    """
    failures = [item for item in skipped if item.index != SCAN_INDEX]

    def example(records: Sequence[SkippedImage]) -> str:
        return f"e.g. {records[0].source}: {records[0].reason}" if records else "none listed"

    if len(indices) == 0:
        raise DataError(
            f"no image of {dataset.name!r} could be used: all {len(dataset)} were skipped "
            f"({example(failures)}); fix or replace those files"
        )
    if dataset.labels is None:
        return
    labels = np.asarray(dataset.labels)
    present = np.unique(labels)
    kept = np.unique(labels[indices])
    lost = np.setdiff1d(present, kept)
    if len(lost) == 0:
        return
    label = int(lost[0])
    names = dataset.class_names
    name = names[label] if names is not None and 0 <= label < len(names) else str(label)
    members = [item for item in failures if int(labels[item.index]) == label]
    more = f" ({len(lost) - 1} more classes too)" if len(lost) > 1 else ""
    raise DataError(
        f"class {name!r} (label {label}) of {dataset.name!r} lost all its "
        f"{int(np.sum(labels == label))} images: every one was skipped ({example(members)})"
        f"{more}; fix or replace those files, or leave the class out"
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
        n_shards = -(-len(dataset) // options["shard_size"])
        meta = _provenance(encoder, dataset, device, precision)
        meta["shard_size"] = options["shard_size"]
        meta["key"] = key
        meta["store_dtype"] = options["store_dtype"]
        meta["engine"] = options["engine"]
        head = encoder.head_arrays()

        def complete() -> None:
            # the head before meta.json, which completes the entry
            meta["head"] = None if head is None else cache.write_head(directory, *head)
            cache.write_entry(directory, n_shards, meta)

        n_encoded = sum(
            cache.fill_entry(
                directory,
                lambda: _extract_missing_shards(
                    dataset, encoder, directory, key, device=device, precision=precision, **options
                ),
                complete,
                "feature",
            )
        )
        result = _feature_set(directory, dataset, encoder, key, from_cache=False, verify=False)
        elapsed = time.perf_counter() - started
        result.stats.update(
            {
                "images_encoded": n_encoded,
                "seconds": elapsed,
                "images_per_second": n_encoded / elapsed if elapsed > 0 else 0.0,
            }
        )
        return result


def _valid_shards(
    directory: Path,
    dataset_size: int,
    shard_size: int,
    key: str,
    outputs: Sequence[str],
    dtype: np.dtype[Any] = _FLOAT32,
) -> dict[int, list[list[Any]]]:
    """``{shard: its skip records}`` of the shards on disk that pass every check, read once each.

    A shard passes if it is readable, matches its checksum and key, holds the encoder's outputs
    as arrays of at least 2 dimensions of the storage ``dtype`` and ``indices`` as int64, and
    its kept and skipped indices together are exactly its range of dataset indices. Failing
    shards are deleted (with a warning).
    """
    n_shards = -(-dataset_size // shard_size)
    valid: dict[int, list[list[Any]]] = {}
    layouts: dict[int, tuple[tuple[str, tuple[int, ...]], ...]] = {}
    expected_names = {*outputs, "indices"}
    for path in sorted(directory.glob("shard-*.safetensors")) if directory.is_dir() else []:
        try:
            shard = int(path.name[len("shard-") : -len(".safetensors")])
        except ValueError:
            continue
        if not 0 <= shard < n_shards or path != cache.shard_path(directory, shard):
            path.unlink(missing_ok=True)  # a shard of no range of this dataset
            continue
        try:
            arrays, extra = cache.read_shard(directory, shard)
            _check_shard(shard, arrays, extra, dataset_size, shard_size, key, expected_names, dtype)
            valid[shard] = extra["skipped"]
            layouts[shard] = tuple(sorted((n, a.shape[1:]) for n, a in arrays.items()))
        except CacheError as error:
            warnings.warn(f"{error}; recomputing that shard", stacklevel=5)
            path.unlink(missing_ok=True)
    # Shards that pass alone must still agree on row shapes: keep the most common layout.
    if len(set(layouts.values())) > 1:
        counts = Counter(layouts.values())
        usual = max(counts, key=lambda layout: counts[layout])
        for shard, layout in layouts.items():
            if layout != usual:
                warnings.warn(
                    f"shard {shard} has rows of shapes {dict(layout)} where the other shards "
                    f"have {dict(usual)}; recomputing that shard",
                    stacklevel=5,
                )
                cache.shard_path(directory, shard).unlink(missing_ok=True)
                del valid[shard]
    return valid


def _check_shard(
    shard: int,
    arrays: dict[str, np.ndarray],
    extra: dict[str, Any],
    dataset_size: int,
    shard_size: int,
    key: str,
    expected_names: set[str],
    dtype: np.dtype[Any] = _FLOAT32,
) -> None:
    where = f"shard {shard}"
    if extra.get("key") != key:
        raise CacheError(f"{where} belongs to another cache key")
    if set(arrays) != expected_names:
        raise CacheError(f"{where} holds {sorted(arrays)}, expected {sorted(expected_names)}")
    indices = arrays["indices"]
    if indices.dtype != np.int64 or indices.ndim != 1:
        raise CacheError(f"{where} has indices of dtype {indices.dtype} and shape {indices.shape}")
    for name in expected_names - {"indices"}:
        array = arrays[name]
        # (n, D) arrays, or (n, T, E) tokens (GL-MCM's ``local``)
        if array.dtype != dtype or array.ndim < 2 or len(array) != len(indices):
            raise CacheError(
                f"{where} has {name} of dtype {array.dtype} and shape {array.shape}, "
                f"expected {dtype} ({len(indices)}, D) or ({len(indices)}, T, E)"
            )
    start, stop = shard * shard_size, min((shard + 1) * shard_size, dataset_size)
    covered = np.sort(np.concatenate([indices, [int(r[0]) for r in extra["skipped"]]]))
    if not np.array_equal(covered, np.arange(start, stop)) or np.any(np.diff(indices) <= 0):
        raise CacheError(f"{where} does not cover dataset indices {start}-{stop - 1} once each")


@contextlib.contextmanager
def borrowed_encoder(encoder: ImageEncoder, device: torch.device) -> Iterator[None]:
    """Run ``encoder`` in eval mode on ``device``, channels-last; then restore it exactly.

    Every parameter and buffer gets back its own device and strides (so its memory format),
    every submodule its own training flag, whatever happens in between.
    """
    tensors = [
        (module, table, name, tensor.device, tensor.stride())
        for module in encoder.modules()
        for table in (module._parameters, module._buffers)
        for name, tensor in table.items()
        if tensor is not None
    ]
    modes = [(module, module.training) for module in encoder.modules()]
    try:
        encoder.eval()
        encoder.to(device)
        # channels-last convolutions run 1.5-2x faster on CPU (EfficientNet-Lite0, 2 cores) and
        # use tensor cores on GPU; only 4-d weights change layout, so transformers are unaffected.
        encoder.to(memory_format=torch.channels_last)
        yield
    finally:
        with torch.no_grad():
            for module, table, name, original_device, stride in tensors:
                tensor = table[name]
                if tensor is None or (
                    tensor.device == original_device and tensor.stride() == stride
                ):
                    continue
                restored = torch.empty_strided(
                    tensor.shape, stride, dtype=tensor.dtype, device=original_device
                )
                restored.copy_(tensor.detach())
                if isinstance(tensor, torch.nn.Parameter):
                    tensor.data = restored  # the same Parameter object, as tied weights need
                else:
                    module._buffers[name] = restored
        for module, training in modes:
            module.training = training


def batch_loader(
    items: Any,
    batches: list[list[Any]],
    collate: Callable[[list[Any]], Any],
    *,
    num_workers: int,
    device: torch.device,
) -> Any:
    """A DataLoader over ``batches`` of keys of ``items``, decoding in single-threaded workers.

    The one home of the loader extraction and fine-tuning share: workers (if any) run one
    torch thread each and prefetch four batches; host memory is pinned for a CUDA device.
    """
    return torch.utils.data.DataLoader(
        items,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )


class _ShardWriter:
    """Collects encoded rows and skip records shard by shard and writes each finished shard.

    The one home of what a shard holds, whichever engine computed it: rows in dataset order
    cast to the storage dtype, ``indices`` int64, and skip records
    ``[index, describe(index), reason, message]``. Batches must each lie within one shard and
    come in dataset order. With ``on_error="raise"`` the first undecodable image in index order
    raises, whether met now or recorded (``recorded``) in a shard on disk; finished shards are
    written first, so a rerun resumes.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        encoder: ImageEncoder,
        directory: Path,
        key: str,
        *,
        shard_size: int,
        on_error: str,
        recorded: list[list[Any]],
        dtype: np.dtype[Any],
        first_shard: int,
    ) -> None:
        self.dataset, self.encoder, self.directory, self.key = dataset, encoder, directory, key
        self.shard_size, self.on_error, self.recorded, self.dtype = (
            shard_size,
            on_error,
            recorded,
            dtype,
        )
        self.buffers: dict[str, list[np.ndarray]] = {name: [] for name in encoder.outputs}
        self.kept: list[int] = []
        self.skipped: list[list[Any]] = []
        self.current = first_shard
        self.n_encoded = 0

    def start_batch(self, first: int) -> None:
        """Begin a batch whose first dataset index is ``first`` (flushes a finished shard)."""
        shard = first // self.shard_size
        if shard < self.current:  # a shard already written would be overwritten with part of it
            raise RuntimeError(f"rows of shard {shard} arrived after shard {self.current}'s")
        if shard != self.current:
            self.flush()
            self.current = shard
        self.raise_recorded_before(first)  # after the flush: finished shards are kept

    def add_failures(self, failed: Sequence[tuple[int, tuple[str, str]]]) -> None:
        for index, (reason, message) in failed:
            if self.on_error == "raise":
                raise DataError(message)
            self.skipped.append([index, self.dataset.describe(index), reason, message])

    def add_rows(self, indices: Sequence[int], outputs: dict[str, np.ndarray]) -> None:
        for name in self.encoder.outputs:
            self.buffers[name].append(np.asarray(outputs[name]).astype(self.dtype, copy=False))
        self.kept.extend(int(index) for index in indices)
        self.n_encoded += len(indices)

    def flush(self) -> None:
        arrays = {
            name: (
                np.concatenate(parts)
                if parts
                else np.zeros((0, *_output_shape(self.encoder, name)), self.dtype)
            )
            for name, parts in self.buffers.items()
        }
        arrays["indices"] = np.asarray(self.kept, dtype=np.int64)
        cache.write_shard(
            self.directory, self.current, arrays, {"key": self.key, "skipped": self.skipped}
        )
        for parts in self.buffers.values():
            parts.clear()
        self.kept.clear()
        self.skipped = []

    def raise_recorded_before(self, index: int) -> None:
        if self.on_error == "raise" and self.recorded and self.recorded[0][0] < index:
            raise DataError(self.recorded[0][3])


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
    store_dtype: str = "float32",
    engine: str = "local",
    ray_address: str | None = None,
) -> int:
    """Encode the images of every shard not yet on disk; returns how many images were encoded.

    With ``on_error="raise"`` the first undecodable image in index order raises, whether it is
    met now or was recorded in a shard on disk. ``engine="ray"`` computes the same batches on
    Ray Data (:func:`oodprobe.ray_engine.encode_batches`); the shards are written here either way.
    """
    n_images = len(dataset)
    n_shards = -(-n_images // shard_size)
    dtype = storage_dtype(store_dtype)
    valid = _valid_shards(directory, n_images, shard_size, key, encoder.outputs, dtype)
    missing = [shard for shard in range(n_shards) if shard not in valid]
    recorded = sorted((r for records in valid.values() for r in records), key=lambda r: r[0])
    batches = _shard_batches(missing, n_images, shard_size, batch_size)
    if not batches:
        return 0
    writer = _ShardWriter(
        dataset,
        encoder,
        directory,
        key,
        shard_size=shard_size,
        on_error=on_error,
        recorded=recorded,
        dtype=dtype,
        first_shard=missing[0],
    )
    total = sum(len(batch) for batch in batches)
    with _progress_bar(progress, total, f"{encoder.name} · {dataset.name}") as advance:
        if engine == "ray":
            from oodprobe.ray_engine import encode_batches

            for indices, outputs, failed in encode_batches(
                dataset,
                encoder,
                missing,
                n_images=n_images,
                shard_size=shard_size,
                batch_size=batch_size,
                device=device,
                precision=precision,
                ray_address=ray_address,
            ):
                writer.start_batch(min(indices[:1] + [index for index, _ in failed[:1]]))
                writer.add_failures(failed)
                if indices:
                    writer.add_rows(indices, outputs)
                advance(len(indices) + len(failed))
        else:
            _encode_locally(
                dataset, encoder, batches, writer, advance, num_workers, device, precision
            )
        writer.flush()
    writer.raise_recorded_before(n_images)
    return writer.n_encoded


def _encode_locally(
    dataset: ImageDataset,
    encoder: ImageEncoder,
    batches: list[list[int]],
    writer: _ShardWriter,
    advance: Callable[[int], None],
    num_workers: int,
    device: torch.device,
    precision: str,
) -> None:
    """The local engine: decode in DataLoader workers, encode here, hand rows to ``writer``."""
    loader = batch_loader(
        _DecodeDataset(dataset, encoder.pixel_transform),
        batches,
        _collate,
        num_workers=num_workers,
        device=device,
    )
    autocast = autocast_for(precision, device)
    with borrowed_encoder(encoder, device), torch.inference_mode():
        for indices, pixels, failed in loader:
            writer.start_batch(indices[0] if indices else failed[0][0])
            writer.add_failures(failed)
            if pixels is not None:
                writer.add_rows(indices, encode_pixels(encoder, pixels, device, autocast))
            advance(len(indices) + len(failed))


def encode_pixels(
    encoder: ImageEncoder,
    pixels: torch.Tensor,
    device: torch.device,
    autocast: Any,
    outputs: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """One batch of pixels through ``encoder`` on ``device`` (channels-last, under ``autocast``):
    its outputs as float32 arrays. Both engines encode with it (call under inference mode)."""
    with autocast:
        encoded = encoder(pixels.to(device, memory_format=torch.channels_last, non_blocking=True))
    return {name: encoded[name].float().cpu().numpy() for name in outputs or encoder.outputs}


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
    encoder: ImageEncoder | _VariantView,
    key: str,
    *,
    from_cache: bool,
    verify: bool = True,
) -> FeatureSet:
    """The FeatureSet of a complete entry; CacheError if it does not fit ``dataset``.

    An entry written before heads were stored gets the encoder's head now (the encoder is the
    one whose ``cache_id`` the key names, so it is the head extraction would have stored).
    """
    # memory-mapped: a warm read of millions of rows costs nothing until the rows are used
    arrays, meta = cache.read_entry(directory, verify=verify, key=key, mmap=True)
    indices = np.array(arrays.pop("indices"))
    if set(arrays) != set(encoder.outputs):
        raise CacheError(f"{directory} holds {sorted(arrays)}, expected {list(encoder.outputs)}")
    if "head" in meta:
        head = cache.read_head(directory, meta, verify=verify)
    else:
        head = encoder.head_arrays()
        if head is not None:
            cache.add_head(directory, *head)
    n_dims = arrays["features"].shape[1]
    if head is not None and head[0].shape[1] != n_dims:
        raise CacheError(
            f"{directory} holds a head for {head[0].shape[1]}-d features and {n_dims}-d features"
        )
    failed = sorted(meta["skipped"], key=lambda record: record[0])
    covered = np.sort(np.concatenate([indices, [int(record[0]) for record in failed]]))
    if not np.array_equal(covered, np.arange(len(dataset))) or np.any(np.diff(indices) <= 0):
        raise CacheError(f"{directory} does not cover the {len(dataset)} images once each")
    labels = None if dataset.labels is None else np.asarray(dataset.labels)[indices]
    skipped = [*dataset.scan_skipped] + [
        SkippedImage(int(index), source, reason) for index, source, reason, _ in failed
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
        # error messages of the skipped images, for on_error="raise"; removed before return
        stats={
            "messages": {int(index): message for index, _, _, message in failed},
            **({"images_encoded": 0} if from_cache else {}),
        },
        head=head,
    )


def load_features(path: str | os.PathLike[str], *, mmap: bool = False) -> dict[str, np.ndarray]:
    """Read a complete cache entry's arrays (``features``, ``logits``, ``indices``) verified.

    Of the dtype they were stored in (bfloat16 as ``ml_dtypes.bfloat16``); ``mmap`` maps them
    read-only instead of reading them into memory.
    """
    arrays, _ = cache.read_entry(Path(path), verify=True, mmap=mmap)
    return arrays


def load_head(path: str | os.PathLike[str]) -> HeadArrays | None:
    """A complete cache entry's classifier head ``(weight (C, D), bias (C,))``, verified.

    None when the encoder had no linear head, or the entry was written before heads were stored
    and not read by ``extract_features`` since (which adds it).
    """
    directory = Path(path)
    _, meta = cache.read_entry(directory, verify=False, mmap=True)
    return cache.read_head(directory, meta)
