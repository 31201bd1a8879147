"""The feature cache: one folder per key, sharded atomic writes, checksums on every read.

Layout of an entry ``<root>/features/<key[:2]>/<key>/``:

* while extracting: ``shard-00000.safetensors`` … — rows of one fixed range of dataset indices,
  each written atomically (temporary file + ``os.replace``) with a sha256 of its arrays in its
  metadata, so a run killed at any instant leaves only whole, verifiable shards to resume from;
* when complete: one plain ``<output>.npy`` per encoder output (``features.npy``, ``logits.npy``)
  plus ``indices.npy`` (dataset index of each row), and ``meta.json`` written last with the
  sha256 of every file. Users can ``np.load`` the arrays directly (``mmap_mode="r"`` works).

A damaged entry (missing file, wrong size, checksum mismatch, unreadable JSON) raises
:class:`CacheError`; the extractor then deletes and rebuilds it, never using it silently.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from oodprobe.errors import CacheError

CACHE_FORMAT_VERSION = 1
_HASH_CHUNK = 1 << 22
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def default_cache_root() -> Path:
    """``$OODPROBE_CACHE``, else ``$XDG_CACHE_HOME/oodprobe``, else ``~/.cache/oodprobe``."""
    if env := os.environ.get("OODPROBE_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "oodprobe"


def cache_key(payload: dict[str, Any]) -> str:
    """Key of an entry: sha256 of the canonical JSON of everything that changes the output."""
    text = json.dumps({"format": CACHE_FORMAT_VERSION, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def entry_dir(root: Path, key: str) -> Path:
    return root / "features" / key[:2] / key


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; cache files are shareable
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.view(np.uint8).reshape(-1).data if array.size else b"")
    return digest.hexdigest()


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Exclusive lock on an entry, so two processes never write the same shards."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(directory.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- shards -------------------------------------------------------------------------------------


def shard_path(directory: Path, shard: int) -> Path:
    return directory / f"shard-{shard:05d}.safetensors"


def write_shard(
    directory: Path, shard: int, arrays: dict[str, np.ndarray], extra: dict[str, Any]
) -> None:
    """Atomically write one shard's arrays with their checksum and JSON ``extra`` metadata."""
    from safetensors.numpy import save_file

    metadata = {"sha256": arrays_sha256(arrays), "extra": json.dumps(extra)}
    atomic_write(shard_path(directory, shard), lambda tmp: save_file(arrays, tmp, metadata))


def read_shard(directory: Path, shard: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and verify one shard; CacheError if it is unreadable or fails its checksum."""
    from safetensors import safe_open

    path = shard_path(directory, shard)
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        extra = json.loads(metadata["extra"])
    except Exception as error:  # safetensors raises several error types on damaged files
        raise CacheError(f"shard {path} is unreadable: {error}") from None
    if arrays_sha256(arrays) != metadata.get("sha256"):
        raise CacheError(f"shard {path} failed its checksum")
    return arrays, extra


# -- complete entries ---------------------------------------------------------------------------


def write_entry(directory: Path, n_shards: int, meta: dict[str, Any]) -> dict[str, Any]:
    """Join verified shards into ``<name>.npy`` files (streaming), then write ``meta.json``.

    Returns the completed meta (with files, shapes, checksums and the skipped list).
    """
    first, _ = read_shard(directory, 0)
    names = sorted(first)
    counts, skipped = [], []
    for shard in range(n_shards):
        arrays, extra = read_shard(directory, shard)
        counts.append(len(arrays["indices"]))
        skipped.extend(extra["skipped"])
    total = sum(counts)
    files: dict[str, Any] = {}
    for name in names:
        shape = (total, *first[name].shape[1:])
        target = directory / f"{name}.npy"

        def write(tmp: Path, name: str = name, shape: tuple[int, ...] = shape) -> None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=first[name].dtype, shape=shape)
            row = 0
            for shard in range(n_shards):
                block = read_shard(directory, shard)[0][name]
                out[row : row + len(block)] = block
                row += len(block)
            out.flush()
            del out

        atomic_write(target, write)
        files[name] = {
            "shape": list(shape),
            "dtype": first[name].dtype.str,
            "bytes": target.stat().st_size,
            "sha256": file_sha256(target),
        }
    meta = {
        **meta,
        "format": CACHE_FORMAT_VERSION,
        "files": files,
        "skipped": skipped,
        "n_rows": total,
    }

    def write_meta(tmp: Path) -> None:
        tmp.write_text(json.dumps(meta, indent=1))

    atomic_write(directory / "meta.json", write_meta)
    for shard in range(n_shards):
        shard_path(directory, shard).unlink(missing_ok=True)
    return meta


def read_entry(
    directory: Path, *, verify: bool = True, mmap: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Load a complete entry's arrays and meta; CacheError if anything is missing or damaged."""
    meta_path = directory / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
        if meta.get("format") != CACHE_FORMAT_VERSION:
            raise CacheError(f"{directory} has cache format {meta.get('format')!r}")
    except CacheError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CacheError(f"{meta_path} is unreadable: {error}") from None
    arrays: dict[str, np.ndarray] = {}
    for name, info in files.items():
        path = directory / f"{name}.npy"
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            raise CacheError(f"{path} is missing or has the wrong size")
        if verify and file_sha256(path) != info["sha256"]:
            raise CacheError(f"{path} failed its checksum")
        try:
            arrays[name] = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise CacheError(f"{path} is unreadable: {error}") from None
        if list(arrays[name].shape) != info["shape"]:
            raise CacheError(f"{path} has shape {arrays[name].shape}, expected {info['shape']}")
    return arrays, meta


def remove_entry(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
