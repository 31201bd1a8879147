"""The feature cache: sharded atomic writes, verified once and stamped, memory-mapped reads.

Layout of an entry ``<root>/features/<key[:2]>/<key>/``:

* while extracting: ``shard-00000.safetensors`` … — rows of one fixed range of dataset indices,
  each written atomically (temporary file + ``os.replace``) with a sha256 of its arrays in its
  metadata, so a run killed at any instant leaves only whole, verifiable shards to resume from;
* when complete: one plain ``<output>.npy`` per encoder output (``features.npy``, ``logits.npy``)
  plus ``indices.npy`` (dataset index of each row), ``verified.json`` (the verification stamp,
  below) and ``meta.json`` written last with the dtype, shape, size and sha256 of every file;
* for an encoder with a linear classifier head (``ImageEncoder.head_arrays``), also
  ``head.safetensors`` (``weight`` (C, D) and ``bias`` (C,) float32, the sha256 of its arrays in
  its metadata), written before ``meta.json``, whose ``head`` records its shape and that sha256
  (``null`` for an encoder without one). Entries written before heads were stored have no
  ``head`` key; :func:`add_head` adds one to them.

**Dtypes.** Outputs are stored as float32, float16 or bfloat16 (:data:`OUTPUT_DTYPES`; the
numpy dtype of bfloat16 is ``ml_dtypes.bfloat16``), ``indices`` as int64, and every read returns
the dtype that was written. Shards hold them natively (safetensors ``F32``/``F16``/``BF16``;
``safetensors.numpy`` resolves ``BF16`` through ``np.dtype("bfloat16")``, which exists only
once ``ml_dtypes`` is imported, so the readers here import it first). In the joined ``.npy``
files float32 and float16 are standard npy (``<f4``, ``<f2``). bfloat16 has no npy type code
(``np.save`` would write an opaque ``<V2`` that loads as raw bytes), so a bfloat16 output is
stored as its bit pattern, a standard ``<u2`` npy, and ``meta.json`` records
``"dtype": "bfloat16", "stored_as": "<u2"``; :func:`read_entry` returns
``.view(ml_dtypes.bfloat16)`` of it (no copy; a memmap stays a memmap). **Users who**
``np.load`` **a bfloat16 output directly get uint16 bit patterns**: check ``meta.json`` and
view them, ``np.load(path, mmap_mode="r").view(ml_dtypes.bfloat16)``, or use
:func:`oodprobe.features.load_features`, which does.

**Verification.** Every shard is checked against its checksum whenever it is read, and when
the entry is completed each ``.npy`` is hashed in full (sha256) as it is written. A *stamp* of
each fully verified file — its sha256 and its ``st_size``, ``st_mtime_ns``, ``st_ctime_ns``,
``st_ino`` and ``st_dev`` — is kept in ``verified.json`` (written atomically). A later
``read_entry(verify=True)`` checks each file's size, its npy header (dtype, shape) and its stamp,
and hashes the file in full again only when the stamp does not match it (the file was
replaced, rewritten, truncated, touched, copied, or ``meta.json`` records another sha256), then
stamps it anew; ``verify="full"`` hashes every file whatever its stamp; ``verify=False`` only
checks sizes and headers. A file is stamped only once its last change is
:data:`STAMP_MIN_AGE_NS` (2 s) old, so a change in the same timestamp tick as the stamp cannot
hide behind it (git's "racy clean" rule); a small entry read within 2 s of being written is
hashed once more. What the stamp check catches without re-hashing: any change made through
the file system — a write, truncation, replacement, ``touch``, ``chmod``, even a write whose
mtime was set back with ``utime`` (the kernel still moves ``ctime``, which no user call can
set). What it does not catch between full verifications: damage below the file system (bit
rot, a failing disk, a write to the raw block device), and a change on a network file system
whose server clock runs more than 2 s behind this machine's within one tick of the stamp; use
``verify="full"`` (``oodprobe cache info --verify``) to check those. A stamp that cannot be
written (a read-only cache) costs only speed: each read then hashes in full, as before stamps.

A damaged entry of any kind (missing or truncated file, checksum mismatch, unreadable JSON, a
head file that is missing, unreadable or not the one ``meta.json`` records,
``meta.json`` of the wrong structure, a shard of the wrong shape or dtype) raises
:class:`CacheError`; the extractor then deletes and rebuilds it, never using it silently.
Skip records (undecodable images: index, source, reason, full error message) are stored in
each shard and in ``meta.json``, so a warm read reports the same skips as the cold run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from oodprobe.errors import CacheError, InvalidParameterError
from oodprobe.files import atomic_write, commit_temporary, temporary_beside

CACHE_FORMAT_VERSION = 1
HEAD_FILE = "head.safetensors"
STAMP_FILE = "verified.json"
_STAMP_FORMAT = 1
STAMP_MIN_AGE_NS = 2_000_000_000
"""A file is stamped only once its last change is this old (2 s: above the timestamp tick of
every common file system, FAT's 2 s included), so no later change can share the stamp's tick."""
_HASH_CHUNK = 1 << 22

OUTPUT_DTYPES = ("float32", "float16", "bfloat16")
"""The dtypes an output (``features``, ``logits``, …) may be stored as; ``indices`` is int64."""
Verify = bool | Literal["full"]
"""``read_entry``'s ``verify``: True (stamp-checked), ``"full"`` (re-hash), False (none)."""
# safetensors' dtype names of the output dtypes, and meta.json's (numpy's ``dtype.str``, but
# "bfloat16" for bfloat16, whose ``dtype.str`` is an opaque ``<V2``)
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_META_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "bfloat16"}
_BF16_STORED_AS = "<u2"  # a bfloat16 output's .npy holds its bit pattern


def bfloat16() -> np.dtype[Any]:
    """numpy's bfloat16 dtype (``ml_dtypes.bfloat16``; importing it registers ``"bfloat16"``)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def output_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype of an :data:`OUTPUT_DTYPES` name; InvalidParameterError for another."""
    if name not in OUTPUT_DTYPES:
        raise InvalidParameterError(
            f"store dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {name!r}"
        )
    return bfloat16() if name == "bfloat16" else np.dtype(name)


def dtype_name(dtype: np.dtype[Any]) -> str | None:
    """The :data:`OUTPUT_DTYPES` name of a numpy dtype, or None if outputs cannot have it."""
    if dtype == np.float32 or dtype == np.float16:
        return str(np.dtype(dtype).name)
    # compare by name: ml_dtypes need not be imported for a dtype that is not bfloat16
    return "bfloat16" if dtype.kind == "V" and dtype.name == "bfloat16" else None


def to_output_dtype(array: np.ndarray, name: str) -> np.ndarray:
    """``array`` as a C-contiguous array of output dtype ``name`` (float32 → bfloat16 and
    float16 round to nearest even, as ``ml_dtypes`` and numpy cast)."""
    return np.ascontiguousarray(array, dtype=output_dtype(name))


def _one_line(error: BaseException) -> str:
    """An exception's text on one line (library errors about damaged files can span several)."""
    return " ".join(str(error).split()) or type(error).__name__


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
        # dtype.str, as before dtypes other than float32 were stored (old checksums stay
        # valid); bfloat16's is the opaque "<V2", so its name stands in
        tag = array.dtype.name if array.dtype.kind == "V" else array.dtype.str
        digest.update(f"{name}|{tag}|{array.shape}".encode())
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


def _check_skipped(records: Any, where: object) -> list[list[Any]]:
    """Skip records as ``[index, source, reason, message]`` lists; CacheError if malformed."""
    if not isinstance(records, list):
        raise CacheError(f"{where} has skip records of type {type(records).__name__}")
    checked = []
    for record in records:
        if (
            not isinstance(record, list)
            or len(record) not in (3, 4)
            or not isinstance(record[0], int)
            or isinstance(record[0], bool)
            or not all(isinstance(item, str) for item in record[1:])
        ):
            raise CacheError(f"{where} has a malformed skip record {str(record)[:80]}")
        if len(record) == 3:  # written before messages were stored
            record = [*record, f"cannot decode {record[1]}: {record[2]}"]
        checked.append(record)
    return checked


def read_shard(directory: Path, shard: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and verify one shard; CacheError if it is unreadable or fails its checksum.

    The ``extra`` metadata returned is a dict whose ``skipped`` (if present) is a list of
    well-formed skip records.
    """
    from safetensors import safe_open

    path = shard_path(directory, shard)
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            names = list(handle.keys())
            if any(handle.get_slice(name).get_dtype() == "BF16" for name in names):
                bfloat16()  # registers np.dtype("bfloat16"), which safetensors.numpy looks up
            arrays = {name: handle.get_tensor(name) for name in names}
        extra = json.loads(metadata["extra"])
    except Exception as error:  # safetensors raises several error types on damaged files
        raise CacheError(f"shard {path} is unreadable: {_one_line(error)}") from None
    if arrays_sha256(arrays) != metadata.get("sha256"):
        raise CacheError(f"shard {path} failed its checksum")
    if not isinstance(extra, dict):
        raise CacheError(f"shard {path} has metadata of the wrong structure")
    extra["skipped"] = _check_skipped(extra.get("skipped", []), f"shard {path}")
    return arrays, extra


def shard_layout(directory: Path, shard: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype string, shape)}`` of a shard's arrays, read from its header only.

    Dtype strings are safetensors' (``F32``, ``F16``, ``BF16``, ``I64``, …).
    """
    from safetensors import safe_open

    path = shard_path(directory, shard)
    try:
        with safe_open(str(path), framework="np") as handle:
            layout = {}
            for name in handle.keys():  # noqa: SIM118
                view = handle.get_slice(name)
                layout[name] = (view.get_dtype(), tuple(view.get_shape()))
    except Exception as error:  # safetensors raises several error types on damaged files
        raise CacheError(f"shard {path} is unreadable: {_one_line(error)}") from None
    return layout


# -- complete entries ---------------------------------------------------------------------------


def _file_dtypes(path: Path, layout: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """CacheError unless a shard holds int64 ``indices`` and outputs of :data:`OUTPUT_DTYPES`."""
    allowed = set(_SAFETENSORS_DTYPES.values())
    for name, (dtype, _) in layout.items():
        if (name == "indices" and dtype != "I64") or (name != "indices" and dtype not in allowed):
            raise CacheError(
                f"shard {path} holds {name} of dtype {dtype}; outputs are "
                f"{', '.join(OUTPUT_DTYPES)} and indices int64"
            )


def _storage(dtype: np.dtype[Any]) -> tuple[str, np.dtype[Any]]:
    """``(meta.json dtype, dtype of the .npy on disk)`` of an array of ``dtype``."""
    name = dtype_name(dtype)
    if name == "bfloat16":
        return _META_DTYPES[name], np.dtype(_BF16_STORED_AS)
    return dtype.str, dtype


def write_entry(directory: Path, n_shards: int, meta: dict[str, Any]) -> dict[str, Any]:
    """Join verified shards into ``<name>.npy`` files, stamp them, then write ``meta.json``.

    One pass over the shards' headers (row counts, shapes, dtypes) and one over their data, each
    shard read and verified once and copied into every output file; then each file is hashed
    in full and stamped as verified (``verified.json``, see the module docstring; a file whose
    last change is under :data:`STAMP_MIN_AGE_NS` old is left unstamped and hashed on its next
    read), so warm reads need not hash it again. Outputs keep their dtype (float32, float16 or
    bfloat16, a bfloat16 one stored as its ``<u2`` bit pattern). Returns the completed meta
    (with files, dtypes, shapes, checksums and the skipped list). CacheError if the shards
    disagree on their arrays' names, dtypes or row shapes, or hold an output of another dtype.
    """
    layouts = [shard_layout(directory, shard) for shard in range(n_shards)]
    names = sorted(layouts[0])
    counts = []
    for shard, layout in enumerate(layouts):
        if (
            sorted(layout) != names
            or "indices" not in layout
            or any(
                not layout[name][1]
                or layout[name][0] != layouts[0][name][0]
                or layout[name][1][1:] != layouts[0][name][1][1:]
                or layout[name][1][0] != layout["indices"][1][0]
                for name in names
            )
        ):
            raise CacheError(
                f"shard {shard_path(directory, shard)} does not match shard 0: {layout} vs "
                f"{layouts[0]}"
            )
        counts.append(layout["indices"][1][0])
    _file_dtypes(shard_path(directory, 0), layouts[0])
    total = sum(counts)
    first_arrays, first_extra = read_shard(directory, 0)
    storage = {name: _storage(first_arrays[name].dtype) for name in names}
    shapes = {name: (total, *first_arrays[name].shape[1:]) for name in names}
    targets = {name: directory / f"{name}.npy" for name in names}
    temporaries = {name: temporary_beside(target) for name, target in targets.items()}
    skipped: list[list[Any]] = []
    try:
        outputs = {
            name: np.lib.format.open_memmap(
                temporaries[name], mode="w+", dtype=storage[name][1], shape=shapes[name]
            )
            for name in names
        }
        row = 0
        for shard in range(n_shards):
            arrays, extra = (
                (first_arrays, first_extra) if shard == 0 else read_shard(directory, shard)
            )
            skipped.extend(extra["skipped"])
            for name in names:
                if (
                    arrays[name].shape != (counts[shard], *shapes[name][1:])
                    or _storage(arrays[name].dtype) != storage[name]
                ):
                    raise CacheError(f"shard {shard_path(directory, shard)} changed while read")
                # a bfloat16 array is copied as its bit pattern (the .npy's <u2)
                outputs[name][row : row + counts[shard]] = arrays[name].view(storage[name][1])
            row += counts[shard]
        for output in outputs.values():
            output.flush()
        del outputs
        for name in names:
            commit_temporary(temporaries[name], targets[name])
    finally:
        for tmp in temporaries.values():
            tmp.unlink(missing_ok=True)
    files: dict[str, Any] = {}
    stamps: dict[str, dict[str, Any]] = {}
    for name in names:
        digest, stamp = _hash_and_stamp(targets[name])
        files[name] = {
            "shape": list(shapes[name]),
            "dtype": storage[name][0],
            **({"stored_as": storage[name][1].str} if storage[name][0] == "bfloat16" else {}),
            "bytes": targets[name].stat().st_size,
            "sha256": digest,
        }
        if stamp is not None:
            stamps[name] = stamp
    meta = {
        **meta,
        "format": CACHE_FORMAT_VERSION,
        "files": files,
        "skipped": skipped,
        "n_rows": total,
    }
    _write_stamps(directory, stamps, replace=True)

    def write_meta(tmp: Path) -> None:
        tmp.write_text(json.dumps(meta, indent=1))

    atomic_write(directory / "meta.json", write_meta)
    for shard in range(n_shards):
        shard_path(directory, shard).unlink(missing_ok=True)
    return meta


# -- the verification stamp ---------------------------------------------------------------------


def _identity(status: os.stat_result) -> dict[str, int]:
    """What changes when a file is written, truncated, replaced, touched or copied."""
    return {
        "size": status.st_size,
        "mtime_ns": status.st_mtime_ns,
        "ctime_ns": status.st_ctime_ns,
        "ino": status.st_ino,
        "dev": status.st_dev,
    }


def _hash_and_stamp(path: Path) -> tuple[str, dict[str, Any] | None]:
    """The file's sha256, and its stamp: None if the file changed while it was hashed, or
    changed less than :data:`STAMP_MIN_AGE_NS` ago (git's "racy clean" problem: a change made
    later within the same timestamp tick would leave the stamp matching; the file is then
    hashed again on its next read, and stamped once its last change is old enough)."""
    before = _identity(path.stat())
    digest = file_sha256(path)
    after = _identity(path.stat())
    changed = max(after["mtime_ns"], after["ctime_ns"])
    if after != before or time.time_ns() - changed < STAMP_MIN_AGE_NS:
        return digest, None
    return digest, {"sha256": digest, **after}


def _read_stamps(directory: Path) -> dict[str, dict[str, Any]]:
    """The stamps of ``verified.json``; none if it is missing or malformed (never trusted)."""
    try:
        raw = json.loads((directory / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict) or raw.get("format") != _STAMP_FORMAT:
        return {}
    files = raw.get("files")
    if not isinstance(files, dict):
        return {}
    fields = ("size", "mtime_ns", "ctime_ns", "ino", "dev")
    return {
        name: stamp
        for name, stamp in files.items()
        if isinstance(stamp, dict)
        and isinstance(stamp.get("sha256"), str)
        and all(isinstance(stamp.get(field), int) for field in fields)
    }


def _write_stamps(directory: Path, stamps: dict[str, dict[str, Any]], *, replace: bool) -> None:
    """Write (``replace``) or update ``verified.json`` atomically; best effort (a read-only
    cache keeps no stamp, and its reads hash in full)."""
    if not stamps and not replace:
        return
    merged = stamps if replace else {**_read_stamps(directory), **stamps}
    text = json.dumps({"format": _STAMP_FORMAT, "files": merged}, indent=1)

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    with contextlib.suppress(OSError):
        atomic_write(directory / STAMP_FILE, write)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_meta(meta: Any, meta_path: Path, key: str | None) -> dict[str, Any]:
    """The parsed ``meta.json`` if it has the structure :func:`write_entry` writes."""
    if not isinstance(meta, dict):
        raise CacheError(f"{meta_path} holds a {type(meta).__name__}, not an object")
    if meta.get("format") != CACHE_FORMAT_VERSION:
        raise CacheError(f"{meta_path.parent} has cache format {meta.get('format')!r}")
    # Entries written before keys were recorded have none; their folder name is their key.
    if key is not None and meta.get("key", key) != key:
        raise CacheError(f"{meta_path} belongs to another cache key")
    files = meta.get("files")
    if not isinstance(files, dict) or "indices" not in files or "features" not in files:
        raise CacheError(f"{meta_path} does not list the features and indices files")
    n_rows = meta.get("n_rows")
    if not _is_count(n_rows):
        raise CacheError(f"{meta_path} has n_rows {n_rows!r}")
    output_dtypes = set(_META_DTYPES.values())
    for name, info in files.items():
        if (
            not isinstance(name, str)
            or not name.isidentifier()
            or not isinstance(info, dict)
            or not isinstance(info.get("shape"), list)
            or not info["shape"]
            or not all(_is_count(size) for size in info["shape"])
            or info["shape"][0] != n_rows
            or not isinstance(info.get("dtype"), str)
            or not _is_count(info.get("bytes"))
            or not isinstance(info.get("sha256"), str)
            or info.get("stored_as") != (_BF16_STORED_AS if info["dtype"] == "bfloat16" else None)
        ):
            raise CacheError(f"{meta_path} has a malformed entry for {str(name)[:40]!r}")
        if name != "indices" and info["dtype"] not in output_dtypes:
            raise CacheError(
                f"{meta_path} describes {name} of dtype {info['dtype']!r}; outputs are "
                f"{', '.join(OUTPUT_DTYPES)}"
            )
    if files["indices"]["shape"] != [n_rows] or files["indices"]["dtype"] != "<i8":
        raise CacheError(f"{meta_path} describes indices of the wrong shape or dtype")
    meta["skipped"] = _check_skipped(meta.get("skipped"), meta_path)
    _check_head_record(meta.get("head"), meta_path)
    return meta


def read_meta(directory: Path, *, key: str | None = None) -> dict[str, Any]:
    """A complete entry's checked ``meta.json`` (no array file is opened); CacheError if it is
    missing, unreadable or of the wrong structure (or of another ``key``, when given)."""
    meta_path = directory / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CacheError(f"{meta_path} is unreadable: {_one_line(error)}") from None
    return _check_meta(meta, meta_path, key)


def read_entry(
    directory: Path, *, verify: Verify = True, mmap: bool = False, key: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Load a complete entry's arrays and meta; CacheError if anything is missing or damaged.

    Checked for every file: the structure of ``meta.json`` (and its ``key``, when given), the
    file's size, its npy header (shape and dtype, those ``meta.json`` records), and its sha256:

    * ``verify=True``: hashed in full only if its stamp in ``verified.json`` does not match it
      (the file changed since it was last fully verified, or was never stamped), then stamped;
      an untouched file costs a ``stat`` (what this does and does not catch: module docstring);
    * ``verify="full"``: hashed in full whatever its stamp (and stamped);
    * ``verify=False``: not hashed (size and header only).

    ``mmap`` returns read-only ``np.memmap`` arrays (mode ``"r"``): nothing is read until used,
    so a warm read of any size costs the checks above. Arrays have the dtype they were stored
    with (float32, float16 or ``ml_dtypes.bfloat16``; ``indices`` int64).
    """
    if verify not in (True, False, "full"):
        raise InvalidParameterError(f"verify must be True, False or 'full', got {verify!r}")
    meta = read_meta(directory, key=key)
    stamps = _read_stamps(directory) if verify is True else {}
    new_stamps: dict[str, dict[str, Any]] = {}
    arrays: dict[str, np.ndarray] = {}
    for name, info in meta["files"].items():
        path = directory / f"{name}.npy"
        try:
            status = path.stat()
        except OSError:
            status = None
        if status is None or not path.is_file() or status.st_size != info["bytes"]:
            raise CacheError(f"{path} is missing or has the wrong size")
        stamp = stamps.get(name)
        if verify and (stamp is None or stamp != {"sha256": info["sha256"], **_identity(status)}):
            digest, new_stamp = _hash_and_stamp(path)
            if digest != info["sha256"]:
                raise CacheError(f"{path} failed its checksum")
            if new_stamp is not None:
                new_stamps[name] = new_stamp
        stored = info.get("stored_as", info["dtype"])
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError, TypeError) as error:
            raise CacheError(f"{path} is unreadable: {_one_line(error)}") from None
        if list(array.shape) != info["shape"] or array.dtype.str != stored:
            raise CacheError(
                f"{path} has shape {array.shape} and dtype {array.dtype.str}, "
                f"expected {tuple(info['shape'])} and {stored}"
            )
        arrays[name] = array.view(bfloat16()) if info["dtype"] == "bfloat16" else array
    _write_stamps(directory, new_stamps, replace=False)
    return arrays, meta


# -- finding and listing entries ----------------------------------------------------------------


def find_entry(root: Path, entry: str) -> Path:
    """The folder of a complete entry named by its folder, its key, or a unique key prefix.

    CacheError of one line if no entry (or an incomplete one) is found, or a prefix is
    ambiguous.
    """
    path = Path(entry).expanduser()
    if path.is_dir():
        if not (path / "meta.json").is_file():
            raise CacheError(
                f"{path} is not a complete cache entry (it has no meta.json: not an entry "
                "folder, or an interrupted extraction, which rerunning completes)"
            )
        return path
    key = entry.lower()
    if not (4 <= len(key) <= 64 and all(char in "0123456789abcdef" for char in key)):
        raise CacheError(
            f"{entry!r} is neither an entry folder nor a cache key (4 to 64 hex digits); "
            "'oodprobe cache list' shows the entries"
        )
    bucket = root / "features" / key[:2]
    found = sorted(
        candidate
        for candidate in (bucket.iterdir() if bucket.is_dir() else [])
        if candidate.is_dir() and candidate.name.startswith(key)
    )
    if not found:
        raise CacheError(
            f"no cache entry has a key starting {key!r} under {root}; 'oodprobe cache list' "
            "shows the entries (or pass --cache-dir)"
        )
    if len(found) > 1:
        raise CacheError(
            f"key prefix {key!r} matches {len(found)} entries under {root}; give more digits"
        )
    return find_entry(root, str(found[0]))


def list_entries(root: Path) -> list[dict[str, Any]]:
    """Every entry under ``root``: ``{"key", "path", "status", "meta"}``, by key; reads only
    ``meta.json`` (``status`` is ``complete``, ``incomplete: N shards`` or ``damaged: why``)."""
    entries = []
    features = root / "features"
    for bucket in sorted(features.iterdir()) if features.is_dir() else []:
        if not bucket.is_dir():
            continue
        for directory in sorted(bucket.iterdir()):
            if not directory.is_dir():
                continue  # the entries' .lock files
            meta: dict[str, Any] | None = None
            if (directory / "meta.json").exists():
                try:
                    meta = read_meta(directory)
                    status = "complete"
                except CacheError as error:
                    status = f"damaged: {error}"
            else:
                shards = len(list(directory.glob("shard-*.safetensors")))
                status = f"incomplete: {shards} shard(s)"
            entries.append(
                {"key": directory.name, "path": directory, "status": status, "meta": meta}
            )
    return entries


# -- the classifier head ----------------------------------------------------------------------


def write_head(directory: Path, weight: np.ndarray, bias: np.ndarray) -> dict[str, Any]:
    """Atomically write ``head.safetensors``; return its record for ``meta.json``'s ``head``.

    ``weight`` is (C, D) and ``bias`` (C,), stored as float32 with the sha256 of the arrays in
    the file's metadata (as shards are); the record holds the shape and that sha256.
    """
    from safetensors.numpy import save_file

    arrays = {
        "weight": np.ascontiguousarray(weight, dtype=np.float32),
        "bias": np.ascontiguousarray(bias, dtype=np.float32),
    }
    if arrays["weight"].ndim != 2 or arrays["bias"].shape != (len(arrays["weight"]),):
        raise ValueError(
            f"a head is a (C, D) weight and a (C,) bias, got {arrays['weight'].shape} and "
            f"{arrays['bias'].shape}"
        )
    digest = arrays_sha256(arrays)
    path = directory / HEAD_FILE
    atomic_write(path, lambda tmp: save_file(arrays, str(tmp), {"sha256": digest}))
    return {"file": HEAD_FILE, "shape": list(arrays["weight"].shape), "sha256": digest}


def _check_head_record(record: Any, meta_path: Path) -> None:
    """CacheError unless ``meta.json``'s ``head`` is null or what :func:`write_head` returns."""
    if record is None:
        return
    if (
        not isinstance(record, dict)
        or record.get("file") != HEAD_FILE
        or not isinstance(record.get("shape"), list)
        or len(record["shape"]) != 2
        or not all(_is_count(size) and size > 0 for size in record["shape"])
        or not isinstance(record.get("sha256"), str)
    ):
        raise CacheError(f"{meta_path} has a malformed head record {str(record)[:80]}")


def read_head(
    directory: Path, meta: dict[str, Any], *, verify: bool = True
) -> tuple[np.ndarray, np.ndarray] | None:
    """The entry's head ``(weight (C, D), bias (C,))`` float32, or None if it records none.

    ``meta`` is the entry's checked ``meta.json`` (:func:`read_entry`); an entry written before
    heads were stored (no ``head`` key) gives None too. CacheError if the file is missing,
    unreadable, holds other arrays or shapes, fails its checksum (``verify``), is not the file
    ``meta.json`` records, or holds a value that is not finite.
    """
    from safetensors import safe_open

    record = meta.get("head")
    _check_head_record(record, directory / "meta.json")
    if record is None:
        return None
    path = directory / HEAD_FILE
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises several error types on damaged files
        raise CacheError(f"head {path} is unreadable: {_one_line(error)}") from None
    n_classes, n_dims = record["shape"]
    if (
        set(arrays) != {"weight", "bias"}
        or arrays["weight"].dtype != np.float32
        or arrays["bias"].dtype != np.float32
        or arrays["weight"].shape != (n_classes, n_dims)
        or arrays["bias"].shape != (n_classes,)
    ):
        layout = {name: (array.dtype.str, array.shape) for name, array in arrays.items()}
        raise CacheError(
            f"head {path} holds {layout}, expected float32 weight ({n_classes}, {n_dims}) and "
            f"bias ({n_classes},)"
        )
    if metadata.get("sha256") != record["sha256"]:
        raise CacheError(f"head {path} is not the head {directory / 'meta.json'} records")
    if verify and arrays_sha256(arrays) != record["sha256"]:
        raise CacheError(f"head {path} failed its checksum")
    if not (np.isfinite(arrays["weight"]).all() and np.isfinite(arrays["bias"]).all()):
        raise CacheError(f"head {path} holds values that are not finite")
    return arrays["weight"], arrays["bias"]


def add_head(directory: Path, weight: np.ndarray, bias: np.ndarray) -> dict[str, Any]:
    """Store a head in a complete entry written before heads were (its ``meta.json`` rewritten).

    The head file is written first and ``meta.json`` then replaced atomically with its record
    added and nothing else changed, so a reader sees either the old entry or the new one. The
    caller holds the entry's lock and has read the entry. Returns the record.
    """
    meta_path = directory / "meta.json"
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CacheError(f"{meta_path} is unreadable: {_one_line(error)}") from None
    if not isinstance(raw, dict):
        raise CacheError(f"{meta_path} holds a {type(raw).__name__}, not an object")
    record = write_head(directory, weight, bias)
    raw["head"] = record

    def write_meta(tmp: Path) -> None:
        tmp.write_text(json.dumps(raw, indent=1))

    atomic_write(meta_path, write_meta)
    return record


def remove_entry(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


_Filled = TypeVar("_Filled")


def fill_entry(
    directory: Path,
    write_missing: Callable[[], _Filled],
    complete: Callable[[], Any],
    what: str,
    *,
    stacklevel: int = 4,
) -> list[_Filled]:
    """Write an entry's missing shards (``write_missing``), then complete it (``complete``,
    which writes ``meta.json`` with :func:`write_entry`); returns what each fill returned.

    Shards that each pass their own checks can still disagree with each other (written by
    another version, another width): ``write_entry`` then raises CacheError, and the entry is
    started again from nothing, once, with a warning naming ``what`` (the feature cache, the
    corpus embeddings; ``stacklevel`` as ``warnings.warn`` counts from here, default the
    caller's caller's caller: the user of ``extract_features``). A second failure is raised.
    """
    filled = []
    for attempt in (1, 2):
        filled.append(write_missing())
        try:
            complete()
            return filled
        except CacheError as error:
            if attempt == 2:
                raise
            warnings.warn(
                f"{what} cache entry is damaged ({error}); rebuilding it", stacklevel=stacklevel
            )
            remove_entry(directory)
    raise AssertionError("unreachable")  # pragma: no cover
