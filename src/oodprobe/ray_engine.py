"""Feature extraction on Ray Data (``--engine ray``): decoding in CPU tasks, encoding in actors.

:func:`oodprobe.features.extract_features` hands this module the shards its cache lacks; this
module runs them as one Ray Data pipeline and gives back, in dataset order, what the local
engine computes per batch (the kept indices, the encoder's outputs, the undecodable images).
The driver writes the shards, so they are the ones the local engine writes (same ranges, keys,
skip records, storage dtype), are checked, resumed and completed the same way, and a later run
of either engine is served from the cache. Workers need the images (a shared filesystem or
the built-in data installed on each node), not the cache.

The pipeline::

    range(n positions) -> map_batches(decode, CPU tasks)     # ImageDataset.load + pixel_transform
                       -> map_batches(_EncoderActor, actors) # one per GPU, or CPU actors
                       -> driver: split by shard, cast, cache.write_shard

* Decoding is the local engine's (:class:`oodprobe.features._DecodeDataset`): the same
  ``load`` and ``pixel_transform``, the same failure reasons and messages. Each task runs one
  torch thread; the dataset and the transform reach the workers once, through the object store.
* The encoder: an actor per GPU (``num_gpus=1``, at the run's precision) where the cluster has
  GPUs and the device asks for them, else CPU actors (1 CPU each below 8 CPUs, 4 from 8 on),
  as many as fit in three quarters of the cluster's CPUs (the rest decode). Each actor
  rebuilds the encoder **by name** (:func:`oodprobe.encoders.create_encoder`) and keeps it when
  its ``cache_id`` equals the driver's, so weights load from each node's own files or hub cache;
  otherwise (an encoder object with no registry name, weights only the driver has, an
  architecture registered only in the driver) it takes the driver's module from the object store
  (cloudpickle; put there once, moved to the CPU first). Either way the features are those of
  the encoder the cache key names.
* Order: ``preserve_order`` keeps rows in dataset order, so ``on_error="raise"`` raises at the
  first undecodable image in index order, as the local engine does, with every earlier shard
  written.

Ray: a local one (``ray.init(address="local")``, every CPU of this machine, no dashboard) when no
address is given, or the cluster at ``ray_address`` (``ray://head:10001``, ``auto``); a Ray
that is already initialised (by the user, or by an earlier extraction) is used as it is and
never shut down here (Ray shuts its own down at exit). Every node of a cluster needs oodprobe
installed (``pip install 'oodprobe[ray]'``), or a ``runtime_env`` the user passes to
``ray.init`` before calling.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from oodprobe.errors import DataError, InvalidParameterError, OodprobeError

if TYPE_CHECKING:
    import torch

    from oodprobe.data.base import ImageDataset
    from oodprobe.encoders import ImageEncoder

INSTALL_HINT = "pip install 'oodprobe[ray]'"
RAY_DEVICES = ("auto", "cpu", "cuda")
DECODE_HEADROOM = 64 << 20  # bytes a decoding task holds besides its pixels
BLOCKS_PER_BATCH = 4  # batches per input block of positions: enough blocks to keep tasks busy

# (kept dataset indices, {output: (n_kept, ...) float32}, [(index, (reason, message))])
EncodedBatch = tuple[list[int], dict[str, np.ndarray], list[tuple[int, tuple[str, str]]]]


def require_ray() -> None:
    """InvalidParameterError of one line, saying how to install it, if Ray Data is missing."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise InvalidParameterError(
            f"engine 'ray' needs Ray Data, which is not installed ({error}); install it with "
            f"{INSTALL_HINT}, or use --engine local"
        ) from None


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Start a local Ray (``address`` None) or connect to a cluster, unless Ray is running.

    A local Ray gets ``num_cpus`` CPUs (default: every core, ``os.cpu_count()``) and no
    dashboard. A Ray already initialised is left as it is, whatever ``address`` says.
    """
    require_ray()
    import ray

    if ray.is_initialized():
        return
    if address is None:
        ray.init(
            address="local",  # not $RAY_ADDRESS: the library's default is a local Ray
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
        return
    _check_reachable(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as error:
        message = " ".join(str(error).split())[:300]
        raise InvalidParameterError(
            f"cannot connect to the Ray cluster at {address!r} ({message}); check --ray-address "
            "or $RAY_ADDRESS, or leave both unset for a local Ray"
        ) from None


CONNECT_TIMEOUT_S = 5.0  # a head that does not accept a TCP connection in this long is down


def _check_reachable(address: str) -> None:
    """InvalidParameterError of one line unless the host:port of ``address`` accepts a connection.

    ``ray.init`` waits for a GCS that is not there for minutes (then retries on), so an address
    nothing answers at is refused here first, in seconds. ``auto`` (and any address that does
    not name a host and port) is left to Ray, which fails fast on it.
    """
    import socket

    host_port = address.removeprefix("ray://")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise InvalidParameterError(
            f"cannot connect to the Ray cluster at {address!r} (nothing answers at {host_port}: "
            f"{error}); check --ray-address or $RAY_ADDRESS, or leave both unset for a local Ray"
        ) from None


def actor_device(device: str, ray_address: str | None) -> torch.device:
    """The device the encoder actors run on: ``auto`` → cuda where the cluster has GPUs.

    ``device`` is one of auto, cpu, cuda (each actor gets a GPU of its own, so no index).
    Without an address and before Ray runs, the local Ray's GPUs are this machine's, so no Ray
    is started for the answer (a run served from the cache starts none).
    """
    import torch

    require_ray()
    if not isinstance(device, str) or device not in RAY_DEVICES:
        raise InvalidParameterError(
            f"with engine 'ray' the device is the Ray actors': one of {', '.join(RAY_DEVICES)} "
            f"(each actor gets a GPU of its own), got {device!r}"
        )
    import ray

    if ray_address is None and not ray.is_initialized():
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    else:
        init_ray(ray_address)
        n_gpus = int(ray.cluster_resources().get("GPU", 0))
    if device == "cuda" and n_gpus == 0:
        raise InvalidParameterError(
            "device 'cuda' was requested but the Ray cluster has no GPU; use --device auto or cpu"
        )
    return torch.device("cuda" if device != "cpu" and n_gpus > 0 else "cpu")


@dataclass(frozen=True)
class _Positions:
    """Maps positions ``0..total-1`` of the pipeline to the dataset indices of missing shards."""

    starts: np.ndarray  # first dataset index of each missing shard
    offsets: np.ndarray  # first position of each missing shard, then the total

    @classmethod
    def of(cls, missing: Sequence[int], n_images: int, shard_size: int) -> _Positions:
        starts = np.asarray([shard * shard_size for shard in missing], dtype=np.int64)
        lengths = np.minimum(starts + shard_size, n_images) - starts
        return cls(starts, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    @property
    def total(self) -> int:
        return int(self.offsets[-1])

    def indices(self, positions: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self.offsets, positions, side="right") - 1
        return self.starts[shard] + (positions - self.offsets[shard])


_FETCHED: dict[str, Any] = {}  # per worker process: objects taken from the store once


def _fetch(holder: list[Any]) -> Any:
    """The object behind ``[ObjectRef]`` (a list, so Ray does not resolve it on every call)."""
    import ray

    key = holder[0].hex()
    if key not in _FETCHED:
        if len(_FETCHED) > 8:  # another extraction's; let them go
            _FETCHED.clear()
        _FETCHED[key] = ray.get(holder[0])
    return _FETCHED[key]


def _decode_batch(
    batch: dict[str, np.ndarray],
    *,
    dataset: list[Any],
    transform: list[Any],
    positions: _Positions,
    pixel_shape: tuple[int, ...],
) -> dict[str, np.ndarray]:
    """CPU task: the pixels of a batch of positions, as the local engine's workers make them."""
    import torch

    from oodprobe.features import _DecodeDataset

    torch.set_num_threads(1)  # decoding tasks must not compete with the encoder for cores
    indices = positions.indices(np.asarray(batch["id"], dtype=np.int64))
    items = _DecodeDataset(_fetch(dataset), _fetch(transform))
    pixels = np.zeros((len(indices), *pixel_shape), dtype=np.float32)
    ok = np.zeros(len(indices), dtype=bool)
    reasons, messages = [], []
    for row, index in enumerate(indices.tolist()):
        _, tensor, (reason, message) = items[index]
        if tensor is not None:
            pixels[row] = tensor.numpy()
            ok[row] = True
        reasons.append(reason)
        messages.append(message)
    return {
        "index": indices,
        "ok": ok,
        "pixels": pixels,
        "reason": np.asarray(reasons, dtype=str),
        "message": np.asarray(messages, dtype=str),
    }


def _rebuild_encoder(name: str | None, cache_id: str, module: list[Any]) -> ImageEncoder:
    """The encoder by its registry name if that gives the driver's ``cache_id``, else shipped."""
    if name is not None:
        from oodprobe.encoders import create_encoder

        # Anything may fail here (an architecture or weights only the driver has, a hub that
        # cannot be reached): the driver's own module is then used instead.
        with contextlib.suppress(Exception):
            rebuilt = create_encoder(name)
            if rebuilt.cache_id == cache_id:
                return rebuilt
    shipped: ImageEncoder = _fetch(module)
    return shipped


class _EncoderActor:
    """Actor: the encoder on its device, in eval mode and channels-last, at the run's precision."""

    def __init__(
        self,
        *,
        name: str | None,
        cache_id: str,
        module: list[Any],
        device_type: str,
        precision: str,
        threads: int,
        outputs: tuple[str, ...],
    ) -> None:
        import torch

        from oodprobe.features import autocast_for

        torch.set_num_threads(threads)
        self.device = torch.device(device_type)
        self.encoder = _rebuild_encoder(name, cache_id, module)
        self.encoder.eval()
        self.encoder.to(self.device)
        self.encoder.to(memory_format=torch.channels_last)
        self.autocast = autocast_for(precision, self.device)
        self.outputs = outputs
        self.shapes: dict[str, tuple[int, ...]] = {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from oodprobe.features import _output_shape, encode_pixels

        ok = np.asarray(batch["ok"], dtype=bool)
        result = {name: batch[name] for name in ("index", "ok", "reason", "message")}
        encoded: dict[str, np.ndarray] = {}
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            with torch.inference_mode():
                encoded = encode_pixels(
                    self.encoder, pixels, self.device, self.autocast, self.outputs
                )
        for name in self.outputs:
            if name in encoded:
                self.shapes[name] = encoded[name].shape[1:]
            elif name not in self.shapes:  # a batch whose every image failed
                self.shapes[name] = _output_shape(self.encoder, name)
            full = np.zeros((len(ok), *self.shapes[name]), dtype=np.float32)
            if name in encoded:
                full[ok] = encoded[name]
            result[f"out_{name}"] = full
        return result


def _actor_pool(device_type: str) -> tuple[int, dict[str, Any]]:
    """How many encoder actors, their ``num_cpus`` (torch threads: at least 1) and ``num_gpus``.

    Decoding tasks take one CPU each, so the actors always leave one free: where one CPU per
    actor would hold them all (a 1-CPU Ray; as many GPUs as CPUs), the actors reserve none (they
    still run; Ray does not cap a process's cores) instead of starving decoding for ever.
    """
    import ray

    resources = ray.cluster_resources()
    cpus = max(1, int(resources.get("CPU", 1)))
    if device_type == "cuda":
        n_gpus = int(resources.get("GPU", 0))
        return n_gpus, {"num_cpus": 1 if cpus > n_gpus else 0, "num_gpus": 1}
    if cpus < 2:
        return 1, {"num_cpus": 0}
    per_actor = 1 if cpus < 8 else 4
    return max(1, (cpus * 3 // 4) // per_actor), {"num_cpus": per_actor}


def _registry_name(encoder: ImageEncoder) -> str | None:
    """The encoder's name if it parses as a registry name (a shared pass's is not one)."""
    from oodprobe.encoders import parse_encoder_name
    from oodprobe.encoders.base import TappedEncoder

    if isinstance(encoder, TappedEncoder) and "+" in encoder.name:  # create_shared_encoder's
        return None
    try:
        parse_encoder_name(encoder.name)
    except OodprobeError:
        return None
    return encoder.name


def encode_batches(
    dataset: ImageDataset,
    encoder: ImageEncoder,
    missing: Sequence[int],
    *,
    n_images: int,
    shard_size: int,
    batch_size: int,
    device: torch.device,
    precision: str,
    ray_address: str | None = None,
) -> Iterator[EncodedBatch]:
    """The encoded rows of the ``missing`` shards, in dataset order, each batch in one shard.

    ``device`` and ``precision`` are the actors' (:func:`actor_device`,
    :func:`oodprobe.features.resolve_precision`); ``batch_size`` images go through an actor at
    a time. Yields what the local engine's loop computes per batch.
    """
    import ray
    import ray.data
    import torch
    from PIL import Image

    from oodprobe.features import borrowed_encoder

    init_ray(ray_address)
    positions = _Positions.of(missing, n_images, shard_size)
    if positions.total == 0:
        return
    pixel_shape = tuple(encoder.pixel_transform(Image.new("RGB", (32, 32))).shape)
    with borrowed_encoder(encoder, torch.device("cpu")):  # a CPU module loads on any node
        module = [ray.put(encoder)]
    dataset_ref, transform_ref = [ray.put(dataset)], [ray.put(encoder.pixel_transform)]
    n_actors, actor_resources = _actor_pool(device.type)
    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    context.execution_options.preserve_order = True  # rows in dataset order
    context.enable_progress_bars = False  # the driver shows one bar, images done of all
    data_logger = logging.getLogger("ray.data")
    saved_level = data_logger.level
    data_logger.setLevel(logging.ERROR)  # Ray Data's plan and progress lines; errors still show
    try:
        n_blocks = max(1, -(-positions.total // (batch_size * BLOCKS_PER_BATCH)))
        pipeline = (
            ray.data.range(positions.total, override_num_blocks=n_blocks)
            .map_batches(
                cast(Any, _decode_batch),  # Ray's stub knows no keyword arguments
                batch_size=batch_size,
                batch_format="numpy",
                num_cpus=1,
                # The heap a task needs (its pixels twice, and room to decode). Ray Data fuses
                # operators with equal remote arguments only, so this also keeps decoding in
                # tasks of its own instead of inside the encoder actors (one batch at a time).
                memory=2 * batch_size * 4 * int(np.prod(pixel_shape)) + DECODE_HEADROOM,
                fn_kwargs={
                    "dataset": dataset_ref,
                    "transform": transform_ref,
                    "positions": positions,
                    "pixel_shape": pixel_shape,
                },
            )
            .map_batches(
                _EncoderActor,
                batch_size=batch_size,
                batch_format="numpy",
                fn_constructor_kwargs={
                    "name": _registry_name(encoder),
                    "cache_id": encoder.cache_id,
                    "module": module,
                    "device_type": device.type,
                    "precision": precision,
                    "threads": max(1, actor_resources["num_cpus"]),
                    "outputs": tuple(encoder.outputs),
                },
                compute=ray.data.ActorPoolStrategy(size=n_actors),
                **actor_resources,
            )
        )
        for batch in pipeline.iter_batches(batch_size=None, batch_format="numpy"):
            for encoded in _by_shard(batch, shard_size, tuple(encoder.outputs)):
                _raise_if_only_workers_miss(dataset, encoder.pixel_transform, encoded[2])
                yield encoded
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        data_logger.setLevel(saved_level)


def _raise_if_only_workers_miss(
    dataset: ImageDataset, transform: Any, failed: Sequence[tuple[int, tuple[str, str]]]
) -> None:
    """DataError if an image a worker found missing is read here, on the driver.

    A node without the images (no shared filesystem) would otherwise file each as a "file not
    found" skip record, cached: features silently missing for every later run of either engine.
    An image missing here too stays a skip record, as the local engine keeps it.
    """
    from oodprobe.data.decode import REASON_MISSING
    from oodprobe.features import _DecodeDataset

    items = _DecodeDataset(dataset, transform)
    for index, (reason, message) in failed:
        if reason == REASON_MISSING and items[index][1] is not None:
            raise DataError(
                f"image {dataset.describe(index)} is missing on a Ray worker node but readable "
                f"here ({message}); the workers need the images at the same paths: a shared "
                "filesystem, or the data copied to each node"
            )


def _by_shard(
    batch: dict[str, np.ndarray], shard_size: int, outputs: tuple[str, ...]
) -> Iterator[EncodedBatch]:
    """A block of rows (in dataset order) cut where the shard changes."""
    indices = np.asarray(batch["index"], dtype=np.int64)
    if len(indices) == 0:
        return
    ok = np.asarray(batch["ok"], dtype=bool)
    shards = indices // shard_size
    cuts = np.flatnonzero(np.diff(shards)) + 1
    for rows in np.split(np.arange(len(indices)), cuts):
        kept = rows[ok[rows]]
        failed = [
            (int(indices[row]), (str(batch["reason"][row]), str(batch["message"][row])))
            for row in rows[~ok[rows]]
        ]
        yield (
            indices[kept].tolist(),
            {name: np.asarray(batch[f"out_{name}"][kept]) for name in outputs},
            failed,
        )
