"""Parquet export and import of extracted features, for Ray Data, pandas, pyarrow and polars.

A file written by :func:`export_parquet` has one row per extracted image and the columns

* ``index`` (int64): the dataset index of the row (``FeatureSet.indices``);
* one per encoder output, named after it (``features``, ``logits``, ``local``): a
  ``fixed_size_list<float32>`` or ``fixed_size_list<float16>`` of the row's values (an (T, E)
  row, GL-MCM's ``local``, flattened to T·E values; its shape is in the metadata). bfloat16 has
  no Arrow type: a bfloat16 output is written as float32 (exactly: every bfloat16 value is a
  float32) and read back as bfloat16 by :func:`import_parquet`;
* ``label`` (int64), when the labels are known (a FeatureSet of a labelled dataset, or
  ``labels=`` given).

The schema metadata key ``oodprobe`` holds JSON: the format, each output's dtype and row shape,
the class names, the cache key and the entry's provenance (encoder, dataset and its fingerprint,
precision, versions, skip records; not the head, which stays in the cache). The file is written
row group by row group (``row_group_size`` rows), reading memory-mapped blocks of the entry and
releasing their pages, so memory stays one row group whatever the number of rows; it is written
beside its path and renamed over it when complete, with page checksums that
:func:`import_parquet` verifies. The footer's ``oodprobe.sha256`` (:data:`DIGESTS_KEY`) holds
each column's checksum, written after the last row group: the cache key is honoured on import
only while the rows still match it (a rewrite by another tool keeps the schema metadata, key
included, but drops it). A FeatureSet that is not its entry's whole files (a subset, a copy, an
array put in its place) is exported without its key.

Reading it elsewhere: ``pd.read_parquet(path)`` (each output a column of arrays),
``pyarrow.parquet.read_table(path)``, ``ray.data.read_parquet(path)`` (a column of arrays per
row), ``polars.read_parquet(path)``; ``np.stack(frame["features"])`` is the (N, D) matrix.
Reading one back: :func:`import_parquet` → :class:`ParquetFeatures` (arrays in their stored
dtype, ``.to_feature_set()`` for the detectors and the benchmark), or
:func:`import_parquet_to_cache`, which streams it into a cache entry (memory-mapped reads
thereafter, and ``extract_features`` reuses it when its key is the one extraction computes).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from oodprobe import cache
from oodprobe.arrays import bfloat16_as_float32, release_pages, row_blocks
from oodprobe.errors import CacheError, DataError, InvalidParameterError
from oodprobe.files import atomic_write

if TYPE_CHECKING:
    import pyarrow as pa

    from oodprobe.features import FeatureSet

PARQUET_FORMAT = 1
METADATA_KEY = b"oodprobe"
DIGESTS_KEY = b"oodprobe.sha256"
"""Footer key-value metadata written after the last row group: per column (``index`` and each
output), the sha256 of its values as exported (see :class:`_Digests`). A file rewritten by
another tool (pandas, ``pyarrow.parquet.write_table``) keeps the schema metadata but not this
footer key, so :func:`import_parquet_to_cache` trusts a recorded cache key only when the digests
are there and match the rows."""
DEFAULT_ROW_GROUP_SIZE = 16_384
"""Rows per row group: 16,384 x 768 float16 is 24 MiB, float32 48 MiB, in memory at once."""
_RESERVED = ("index", "label")
_ENTRY_DROPPED = ("files", "head", "format", "n_rows")  # of the cache's files, not of the data


@dataclass
class ParquetFeatures:
    """What :func:`import_parquet` reads: arrays of the rows, in file order.

    ``arrays[name]`` is (N, D) (or (N, T, E)) in the dtype it was exported from (float32,
    float16, ``ml_dtypes.bfloat16``); ``indices`` (N,) int64; ``labels`` (N,) int64 or None;
    ``meta`` the exported entry's provenance (``{}`` for a file another tool wrote).
    """

    arrays: dict[str, np.ndarray]
    indices: np.ndarray
    labels: np.ndarray | None
    class_names: tuple[str, ...] | None = None
    key: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def features(self) -> np.ndarray:
        return self.arrays["features"]

    def __len__(self) -> int:
        return len(self.indices)

    def to_feature_set(self) -> FeatureSet:
        """The :class:`oodprobe.features.FeatureSet` of these rows (detector input).

        ``skipped`` comes from the exported skip records, ``head`` is None (a head is not
        exported: read the cache entry for it), ``path`` None.
        """
        from oodprobe.data.base import SkippedImage
        from oodprobe.features import FeatureSet

        skipped = [
            SkippedImage(int(record[0]), str(record[1]), str(record[2]))
            for record in self.meta.get("skipped", [])
        ]
        return FeatureSet(
            arrays=dict(self.arrays),
            indices=self.indices,
            labels=self.labels,
            class_names=self.class_names,
            skipped=skipped,
            encoder_name=str(self.meta.get("encoder", "parquet")),
            dataset_name=str(self.meta.get("dataset", "parquet")),
            key=self.key or "",
            path=None,
            from_cache=False,
        )


# -- export -----------------------------------------------------------------------------------


def _check_row_group_size(row_group_size: Any) -> int:
    if (
        not isinstance(row_group_size, int)
        or isinstance(row_group_size, bool)
        or row_group_size < 1
    ):
        raise InvalidParameterError(f"row_group_size must be >= 1, got {row_group_size!r}")
    return row_group_size


def _source_parts(
    source: FeatureSet | str | os.PathLike[str],
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray | None, Any, str | None, dict[str, Any]]:
    """``(outputs, indices, labels, class_names, key, provenance)`` of an entry or FeatureSet."""
    if not isinstance(source, str | os.PathLike):
        # imported only for a FeatureSet source: oodprobe.features imports torch (seconds, and
        # hundreds of MB), which exporting an entry folder does not need
        from oodprobe.features import FeatureSet

        if not isinstance(source, FeatureSet):
            raise InvalidParameterError(
                f"export_parquet needs a FeatureSet or a cache entry folder, got "
                f"{type(source).__name__}"
            )
        meta: dict[str, Any] = {}
        if source.path is not None and (source.path / "meta.json").is_file():
            meta = cache.read_meta(source.path)
        meta = {"encoder": source.encoder_name, "dataset": source.dataset_name, **meta}
        key = source.key or None
        if source.path is not None and (
            "files" not in meta or not _holds_its_entry(source, source.path, meta)
        ):
            # a subset, a reordering or replaced arrays are not the entry (nor is anything once
            # the entry is gone): exported without its key, so importing them never stands in
            # for the extraction that key names
            key = None
        if "skipped" not in meta:  # undecodable images, as an entry records them (no scan's)
            meta["skipped"] = [
                [item.index, item.source, item.reason] for item in source.skipped if item.index >= 0
            ]
        return (
            dict(source.arrays),
            source.indices,
            source.labels,
            source.class_names,
            key,
            meta,
        )
    directory = Path(source)
    if not (directory / "meta.json").is_file():
        raise CacheError(
            f"{directory} is not a complete cache entry (no meta.json); give the folder of an "
            "entry 'oodprobe cache list' shows"
        )
    arrays, meta = cache.read_entry(directory, mmap=True)
    indices = arrays.pop("indices")
    return arrays, indices, None, None, meta.get("key", directory.name), meta


def _holds_its_entry(features: FeatureSet, directory: Path, meta: dict[str, Any]) -> bool:
    """Whether a FeatureSet's rows are those of its entry (``directory``): as many, in order,
    and each output the entry's own whole memory-mapped file (as extraction returns them), not
    an array put in its place."""
    indices = features.indices
    if len(indices) != meta["n_rows"] or (len(indices) > 1 and np.any(np.diff(indices) <= 0)):
        return False
    if set(features.arrays) != set(meta["files"]) - {"indices"}:
        return False
    for name, array in features.arrays.items():
        filename = getattr(array, "filename", None)  # a str or a Path, as it was opened
        if not (
            isinstance(array, np.memmap)
            and filename is not None
            and os.path.abspath(filename) == os.path.abspath(directory / f"{name}.npy")
            and list(array.shape) == meta["files"][name]["shape"]
        ):
            return False
    return True


def _arrow_values(block: np.ndarray) -> pa.Array:
    """A (rows, …) block as a ``fixed_size_list`` array: float16 stays, the rest is float32."""
    import pyarrow as pa

    values = block.reshape(len(block), -1)
    width = values.shape[1]
    if cache.dtype_name(values.dtype) == "bfloat16":
        values = bfloat16_as_float32(values)
    elif values.dtype != np.float16:
        values = values.astype(np.float32)
    flat = np.ascontiguousarray(values).reshape(-1)
    # pa.array converts float16 value by value (0.8 s per 16k x 768 block); the buffer is
    # already Arrow's layout, so it is wrapped without a copy (the array keeps it alive)
    value_type = pa.float16() if flat.dtype == np.float16 else pa.float32()
    values_array = pa.Array.from_buffers(value_type, len(flat), [None, pa.py_buffer(flat)])
    return pa.FixedSizeListArray.from_arrays(values_array, width)


def _float32_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """The inverse of :func:`oodprobe.arrays.bfloat16_as_float32` where the low 16 bits are
    zero (every value :func:`export_parquet` writes); others are rounded to nearest even."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    if np.any(bits & 0xFFFF):
        return values.astype(cache.bfloat16())
    return (bits >> 16).astype(np.uint16).view(cache.bfloat16())


class _Digests:
    """Streamed sha256 of each column's values, as :func:`oodprobe.cache.arrays_sha256` hashes
    one array: ``name|dtype|row shape`` then the values' bytes in the stored dtype, row by row
    (blocks fed in order give the digest of the whole column)."""

    def __init__(self) -> None:
        self.digests: dict[str, Any] = {}

    def update(self, name: str, block: np.ndarray) -> None:
        import hashlib

        if name not in self.digests:
            tag = block.dtype.name if block.dtype.kind == "V" else block.dtype.str
            self.digests[name] = hashlib.sha256(f"{name}|{tag}|{block.shape[1:]}".encode())
        if block.size:
            self.digests[name].update(np.ascontiguousarray(block).view(np.uint8).reshape(-1).data)

    def hexdigests(self) -> dict[str, str]:
        return {name: digest.hexdigest() for name, digest in sorted(self.digests.items())}


def export_parquet(
    source: FeatureSet | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    labels: Sequence[int] | np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    compression: str = "snappy",
) -> Path:
    """Write the rows of a cache entry (its folder) or a FeatureSet to a Parquet file.

    Columns and metadata: module docstring. ``labels`` (one per row, integers) and
    ``class_names`` override or supply what ``source`` lacks (an entry folder stores no
    labels). Streamed: each of the ``row_group_size``-row groups is read (from memory-mapped
    files, their pages released after), converted and written before the next. ``compression``
    is any codec pyarrow writes (``snappy``, ``zstd``, ``none``). Returns ``path``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    row_group_size = _check_row_group_size(row_group_size)
    try:
        available = compression == "none" or pa.Codec.is_available(compression)
    except (ValueError, TypeError):
        available = False
    if not isinstance(compression, str) or not available:
        raise InvalidParameterError(
            f"compression must be a codec pyarrow writes (snappy, zstd, gzip, lz4, brotli, "
            f"none), got {compression!r}"
        ) from None
    target = Path(path)
    if target.is_dir() or not target.parent.is_dir():
        raise InvalidParameterError(
            f"the Parquet file {target} "
            + ("is a directory" if target.is_dir() else "is in a folder that does not exist")
            + "; give the path of a file to write, e.g. "
            + str((target if target.is_dir() else target.parent) / "features.parquet")
        )
    outputs, indices, source_labels, source_names, key, meta = _source_parts(source)
    n_rows = len(indices)
    for name in outputs:
        if name in _RESERVED:
            raise InvalidParameterError(f"an output may not be named {name!r} (a Parquet column)")
        if cache.dtype_name(outputs[name].dtype) is None:
            raise InvalidParameterError(
                f"output {name!r} has dtype {outputs[name].dtype}; Parquet export takes "
                f"{', '.join(cache.OUTPUT_DTYPES)}"
            )
        if len(outputs[name]) != n_rows or outputs[name].ndim < 2:
            raise InvalidParameterError(
                f"output {name!r} has shape {outputs[name].shape}, expected ({n_rows}, D)"
            )
    if labels is not None:
        source_labels = np.asarray(labels)
        if source_labels.shape != (n_rows,) or source_labels.dtype.kind not in "iu":
            raise InvalidParameterError(
                f"labels must be {n_rows} integers (one per row), got an array of shape "
                f"{source_labels.shape} and dtype {source_labels.dtype}"
            )
    names = tuple(class_names) if class_names is not None else source_names
    provenance = {k: v for k, v in meta.items() if k not in _ENTRY_DROPPED}
    description = {
        "format": PARQUET_FORMAT,
        "key": key,
        "n_rows": n_rows,
        "outputs": {
            name: {
                "dtype": cache.dtype_name(array.dtype),
                "shape": list(array.shape[1:]),
                "column_dtype": "float16" if array.dtype == np.float16 else "float32",
            }
            for name, array in outputs.items()
        },
        "class_names": None if names is None else list(names),
        "entry": provenance,
    }
    fields = [pa.field("index", pa.int64(), nullable=False)]
    for name, array in outputs.items():
        width = int(np.prod(array.shape[1:]))
        value_type = pa.float16() if array.dtype == np.float16 else pa.float32()
        fields.append(pa.field(name, pa.list_(value_type, width), nullable=False))
    if source_labels is not None:
        fields.append(pa.field("label", pa.int64(), nullable=False))
    schema = pa.schema(fields, metadata={METADATA_KEY: json.dumps(description).encode()})

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(
            tmp,
            schema,
            compression=compression,
            use_dictionary=False,
            write_statistics=["index", *(["label"] if source_labels is not None else [])],
            write_page_checksum=True,
        ) as writer:
            digests = _Digests()
            for rows in row_blocks(n_rows, row_group_size):
                index = np.asarray(indices[rows], dtype=np.int64)
                digests.update("index", index)
                columns = [pa.array(index)]
                for name, array in outputs.items():
                    block = np.asarray(array[rows])
                    digests.update(name, block)
                    columns.append(_arrow_values(block))
                if source_labels is not None:
                    columns.append(pa.array(np.asarray(source_labels[rows], dtype=np.int64)))
                writer.write_table(
                    pa.Table.from_arrays(columns, schema=schema), row_group_size=row_group_size
                )
                del columns  # a float16 column wraps the mapped pages themselves
                for array in outputs.values():
                    release_pages(array, rows)
            writer.add_key_value_metadata({DIGESTS_KEY: json.dumps(digests.hexdigests())})

    return atomic_write(path, write)


# -- import -----------------------------------------------------------------------------------


def _open(path: str | os.PathLike[str]) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory; give a Parquet file (export_parquet writes one)")
    if not path.is_file():
        raise DataError(f"Parquet file {path} does not exist (or is not a file)")
    try:
        return pq.ParquetFile(path, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as error:
        raise DataError(
            f"{path} is not a readable Parquet file: {cache._one_line(error)}"
        ) from None


def _layout(parquet: Any, path: Path) -> tuple[dict[str, Any], list[str]]:
    """The file's ``oodprobe`` description (``{}`` if none) and its output columns."""
    import pyarrow as pa

    schema = parquet.schema_arrow
    description: dict[str, Any] = {}
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is not None:
        try:
            description = json.loads(raw)
        except ValueError:
            raise DataError(f"{path} has unreadable oodprobe metadata") from None
        if not isinstance(description, dict) or description.get("format") != PARQUET_FORMAT:
            raise DataError(
                f"{path} has oodprobe metadata of format "
                f"{description.get('format') if isinstance(description, dict) else None!r}; "
                f"this version reads format {PARQUET_FORMAT}"
            )
    outputs = []
    for column in schema:
        if column.name in _RESERVED:
            if not pa.types.is_integer(column.type):
                raise DataError(
                    f"{path}: column {column.name!r} is {column.type}, expected integers"
                )
            continue
        kind = column.type
        if (
            pa.types.is_fixed_size_list(kind)
            or pa.types.is_list(kind)
            or pa.types.is_large_list(kind)
        ) and pa.types.is_floating(kind.value_type):
            outputs.append(column.name)
            continue
        if column.name in (description.get("outputs") or {}) or column.name == "features":
            raise DataError(
                f"{path}: column {column.name!r} is {kind}, expected a list of floats per row"
            )
    entry = description.get("entry")
    if isinstance(entry, dict) and "skipped" in entry:
        try:
            entry["skipped"] = cache._check_skipped(entry["skipped"], path)
        except CacheError as error:
            raise DataError(str(error)) from None
    missing = [name for name in description.get("outputs") or {} if name not in outputs]
    if missing:
        raise DataError(f"{path}: its metadata lists output {missing[0]!r}, which has no column")
    if "features" not in outputs:
        raise DataError(
            f"{path} has no 'features' column (a list of floats per row); its columns: "
            f"{', '.join(schema.names)}"
        )
    return description, outputs


def _block(column: Any, name: str, path: Path) -> np.ndarray:
    """A row group's column of per-row float lists as a (rows, width) array."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if column.null_count:
        raise DataError(f"{path}: column {name!r} has {column.null_count} empty (null) rows")
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
    else:
        lengths = np.diff(np.asarray(column.offsets))
        if len(lengths) and (lengths != lengths[0]).any():
            raise DataError(
                f"{path}: column {name!r} has rows of {lengths.min()} to {lengths.max()} values; "
                "every row needs the same number"
            )
        width = int(lengths[0]) if len(lengths) else 0
    flat = column.flatten()
    if flat.null_count:  # to_numpy would turn them into NaN, silently
        raise DataError(
            f"{path}: column {name!r} has {flat.null_count} null values inside its rows"
        )
    values = np.asarray(flat.to_numpy(zero_copy_only=False))
    if values.dtype.kind == "O":  # pragma: no cover - a float list always converts
        raise DataError(f"{path}: column {name!r} does not hold numbers")
    return values.reshape(len(column), width)


def _row_dtypes(
    description: dict[str, Any], outputs: list[str], path: Path
) -> dict[str, tuple[np.dtype[Any], tuple[int, ...] | None]]:
    """Each output's dtype to restore and row shape (None: as the column's width)."""
    described = description.get("outputs") or {}
    result: dict[str, tuple[np.dtype[Any], tuple[int, ...] | None]] = {}
    for name in outputs:
        info = described.get(name) or {}
        dtype_name = info.get("dtype")
        shape = info.get("shape")
        if dtype_name is None:
            result[name] = (np.dtype(np.float32), None)  # written by another tool
            continue
        if dtype_name not in cache.OUTPUT_DTYPES or not (
            isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
        ):
            raise DataError(f"{path} describes output {name!r} as {str(info)[:80]}")
        result[name] = (cache.output_dtype(dtype_name), tuple(shape))
    return result


def _rows_of(
    parquet: Any, outputs: list[str], description: dict[str, Any], path: Path
) -> tuple[Any, Any, bool]:
    """Row groups as ``(index, label, {output: block})`` in file order, checked."""
    dtypes = _row_dtypes(description, outputs, path)
    names = parquet.schema_arrow.names
    has_index, has_label = "index" in names, "label" in names
    columns = [*outputs, *(["index"] if has_index else []), *(["label"] if has_label else [])]

    def groups() -> Any:
        start = 0
        widths: dict[str, int] = {}
        for group, table in _batches(parquet, columns, path):
            rows = table.num_rows
            if rows == 0:  # an empty row group holds nothing (a list column: not even a width)
                continue
            blocks = {}
            for name in outputs:
                dtype, shape = dtypes[name]
                block = _block(table.column(name), name, path)
                if shape is not None and int(np.prod(shape)) != block.shape[1]:
                    raise DataError(
                        f"{path}: column {name!r} has {block.shape[1]} values per row, "
                        f"its metadata says shape {list(shape)}"
                    )
                if rows and widths.setdefault(name, block.shape[1]) != block.shape[1]:
                    raise DataError(
                        f"{path}: column {name!r} has {widths[name]} values per row before row "
                        f"group {group} and {block.shape[1]} in it; every row needs the same "
                        "number"
                    )
                if cache.dtype_name(dtype) == "bfloat16" or block.dtype != dtype:
                    block = _narrowed(block, dtype, name, path)
                blocks[name] = block.reshape(rows, *(shape or block.shape[1:]))
            index = (
                _integers(table.column("index"), "index", path)
                if has_index
                else np.arange(start, start + rows, dtype=np.int64)
            )
            label = _integers(table.column("label"), "label", path) if has_label else None
            start += rows
            yield index, label, blocks

    return groups(), has_label, has_index


def _narrowed(block: np.ndarray, dtype: np.dtype[Any], name: str, path: Path) -> np.ndarray:
    """``block`` as ``dtype``: bfloat16 from its exact float32 (bit for bit what was exported),
    a float64 column of another tool rounded to float32. DataError if a finite value does not
    fit (it would become infinite)."""
    with np.errstate(over="ignore"):
        if cache.dtype_name(dtype) == "bfloat16":
            narrowed = _float32_to_bfloat16(block)
        else:
            narrowed = block.astype(dtype)
    if block.dtype.itemsize > narrowed.dtype.itemsize:
        lost = np.isfinite(block) & ~np.isfinite(narrowed.astype(np.float32))
        if lost.any():
            value = block[lost][0]
            raise DataError(
                f"{path}: column {name!r} holds {float(value):g}, beyond the range of "
                f"{cache.dtype_name(dtype)} it is stored as"
            )
    return narrowed


def _batches(parquet: Any, columns: list[str], path: Path) -> Any:
    """``(row group, record batch)`` of at most :data:`DEFAULT_ROW_GROUP_SIZE` rows, in file
    order. Decoded batch by batch (``iter_batches``), not a row group at a time: another
    tool's file may hold a million rows in one group (pyarrow's default), which
    ``read_row_group`` decodes at once (measured: 2.7 GiB peak for a 600 MB group, 1.0 GiB
    batched)."""
    import pyarrow as pa

    for group in range(parquet.num_row_groups):
        batches = parquet.iter_batches(
            batch_size=DEFAULT_ROW_GROUP_SIZE, row_groups=[group], columns=columns
        )
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (OSError, pa.ArrowException) as error:
                raise DataError(
                    f"{path} is damaged (row group {group}): {cache._one_line(error)}"
                ) from None
            yield group, batch


def _integers(column: Any, name: str, path: Path) -> np.ndarray:
    if column.null_count:
        raise DataError(f"{path}: column {name!r} has {column.null_count} null rows")
    return np.asarray(column.to_numpy(), dtype=np.int64)


def import_parquet(path: str | os.PathLike[str]) -> ParquetFeatures:
    """Read a Parquet file of features (:func:`export_parquet`'s, or another tool's).

    Another tool's file needs a ``features`` column of per-row float lists of one length; ``index``
    (default: row numbers) and ``label`` integer columns are optional, and every other float-list
    column is an output. float64 lists are rounded to float32. Read batch by batch
    (:func:`_batches`) into arrays allocated once (memory: the arrays plus one batch); for a file
    larger than memory use :func:`import_parquet_to_cache`. DataError of one line if the file is
    missing, damaged (page checksums are verified: :func:`export_parquet` writes them; a file
    written without them is checked only as far as its encoding goes), its rows fail the
    checksums its footer records, or it has the wrong columns. ``key`` is the exported cache
    key only while those checksums vouch for the rows (None for a file rewritten by another
    tool, which keeps the schema metadata but drops them).
    """
    path = Path(path)
    parquet = _open(path)
    description, outputs = _layout(parquet, path)
    n_rows = parquet.metadata.num_rows
    groups, has_label, _ = _rows_of(parquet, outputs, description, path)
    arrays: dict[str, np.ndarray] = {}
    indices = np.empty(n_rows, np.int64)
    labels = np.empty(n_rows, np.int64) if has_label else None
    row = 0
    computed = _Digests()
    for index, label, blocks in groups:
        stop = row + len(index)
        computed.update("index", index)
        for name, block in blocks.items():
            computed.update(name, block)
            if name not in arrays:
                arrays[name] = np.empty((n_rows, *block.shape[1:]), block.dtype)
            arrays[name][row:stop] = block
        indices[row:stop] = index
        if labels is not None:
            labels[row:stop] = label
        row = stop
    if not arrays:  # no row group: empty arrays of the described widths
        for name, (dtype, shape) in _row_dtypes(description, outputs, path).items():
            arrays[name] = np.empty((0, *(shape or (0,))), dtype)
    digests = _recorded_digests(parquet, path)
    if digests is None:
        description = {**description, "key": None}  # rows no checksum vouches for
    else:
        _check_digests(computed, digests, path)
    return _described(arrays, indices, labels, description)


def _described(
    arrays: dict[str, np.ndarray],
    indices: np.ndarray,
    labels: np.ndarray | None,
    description: dict[str, Any],
) -> ParquetFeatures:
    names = description.get("class_names")
    entry = description.get("entry")
    return ParquetFeatures(
        arrays=arrays,
        indices=indices,
        labels=labels,
        class_names=tuple(str(n) for n in names) if isinstance(names, list) else None,
        key=description.get("key") if isinstance(description.get("key"), str) else None,
        meta=entry if isinstance(entry, dict) else {},
    )


def import_parquet_to_cache(
    path: str | os.PathLike[str], cache_root: str | os.PathLike[str] | None = None
) -> Path:
    """Stream a Parquet file of features into a cache entry; return the entry's folder.

    The entry's key is the exported one (so ``extract_features`` with the same encoder, dataset,
    precision and storage dtype finds it) when the file is one :func:`export_parquet` wrote and its
    rows are the ones it wrote (the footer's :data:`DIGESTS_KEY` checksums match them). Otherwise (a
    file of another tool, or one rewritten by another tool, which keeps the schema metadata but not
    the footer's checksums) the key is the sha256 of the file, so extraction never takes rows
    changed after export for the encoder's output; a recorded key is then kept as ``exported_key``
    in ``meta.json``, with a warning. Batches of at most :data:`DEFAULT_ROW_GROUP_SIZE` rows (a
    larger row group is decoded batch by batch) are written as verified shards and joined as
    extraction joins them (:func:`oodprobe.cache.write_entry`): memory stays one batch, and the
    entry is read memory-mapped afterwards (:func:`oodprobe.features.load_features`). Labels are not
    stored (the cache keeps none). An existing complete entry of that key is kept as it is (a
    damaged one is replaced). DataError
    if the file is unreadable, records a key that is not a cache key (64 hex digits), its rows
    fail the checksums it records, or its ``index`` column is not strictly increasing (the
    cache holds rows in dataset order); a file refused half way leaves no entry behind. A file
    of no rows is imported when it describes its outputs' widths (an entry of one that
    :func:`export_parquet` wrote: every image skipped).
    """
    import warnings

    path = Path(path)
    parquet = _open(path)
    description, outputs = _layout(parquet, path)
    key = description.get("key")
    # the key names a folder that may be removed: never a path, only what cache_key makes
    if key is not None and not (isinstance(key, str) and re.fullmatch(r"[0-9a-f]{64}", key)):
        raise DataError(f"{path} records a cache key that is not 64 hex digits: {str(key)[:80]!r}")
    digests = _recorded_digests(parquet, path)
    entry = description.get("entry")
    meta = {
        **{
            name: value
            for name, value in (entry if isinstance(entry, dict) else {}).items()
            if name not in (*_ENTRY_DROPPED, "key", "exported_key", "imported_from")
        },
        "imported_from": str(path.resolve()),
    }
    if key is not None and digests is None:
        warnings.warn(
            f"{path} records cache key {key[:16]}… but not the checksums export_parquet writes "
            "(rewritten by another tool?): imported under the file's own checksum, which "
            "extraction does not reuse; export the entry again to carry its key",
            stacklevel=2,
        )
        meta["exported_key"] = key
        key = None
    if key is None:
        key = cache.file_sha256(path)
    meta["key"] = key
    skipped = meta.pop("skipped", [])
    root = Path(cache_root) if cache_root is not None else cache.default_cache_root()
    directory = cache.entry_dir(root, key)
    with cache.locked(directory):
        if (directory / "meta.json").exists():
            with contextlib.suppress(CacheError):
                cache.read_entry(directory, key=key, mmap=True)
                return directory
        # a damaged entry, or the shards of an interrupted extraction, give way to the file's rows
        cache.remove_entry(directory)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            n_shards = _write_shards(
                parquet, outputs, description, path, directory, key, skipped, digests
            )
            cache.write_entry(directory, n_shards, meta)
        except BaseException:  # a damaged or refused file leaves no partial entry behind
            cache.remove_entry(directory)
            raise
    return directory


def _recorded_digests(parquet: Any, path: Path) -> dict[str, str] | None:
    """The footer's :data:`DIGESTS_KEY` checksums, or None if the file has none."""
    raw = (parquet.metadata.metadata or {}).get(DIGESTS_KEY)
    if raw is None:
        return None
    try:
        digests = json.loads(raw)
    except ValueError:
        digests = None
    if not isinstance(digests, dict) or not all(
        isinstance(name, str) and isinstance(value, str) for name, value in digests.items()
    ):
        raise DataError(f"{path} has unreadable oodprobe checksums ({DIGESTS_KEY.decode()})")
    return digests


def _write_shards(
    parquet: Any,
    outputs: list[str],
    description: dict[str, Any],
    path: Path,
    directory: Path,
    key: str,
    skipped: list[Any],
    digests: dict[str, str] | None,
) -> int:
    """Write the file's row groups as shards of ``directory``; return how many.

    With ``digests`` (the file's recorded checksums), the rows must match them before the entry
    is completed; DataError if they do not.
    """
    groups, _, _ = _rows_of(parquet, outputs, description, path)
    computed = _Digests()
    last = -1
    n_shards = 0
    row = 0
    for shard, (index, _labels, blocks) in enumerate(groups):
        if index[0] < 0:
            raise DataError(
                f"{path}: the index column holds {int(index[0])}; dataset indices are >= 0"
            )
        if index[0] <= last or np.any(np.diff(index) <= 0):
            decreasing = 0 if index[0] <= last else int(np.argmax(np.diff(index) <= 0)) + 1
            raise DataError(
                f"{path}: the index column is not strictly increasing (row {row + decreasing}: "
                f"{int(index[decreasing])}); the cache keeps rows in dataset order"
            )
        last = int(index[-1])
        row += len(index)
        computed.update("index", index)
        for name, block in blocks.items():
            computed.update(name, block)
        extra = {"key": key, "skipped": skipped if shard == 0 else []}
        cache.write_shard(directory, shard, {**blocks, "indices": index}, extra)
        n_shards += 1
    if n_shards == 0:
        # no rows: one empty shard of the described widths, if the file describes them
        row_dtypes = _row_dtypes(description, outputs, path)
        if any(shape is None for _, shape in row_dtypes.values()):
            raise DataError(f"{path} has no rows to import (and no row width to give an entry)")
        empty = {
            name: np.empty((0, *(shape or ())), dtype)
            for name, (dtype, shape) in row_dtypes.items()
        }
        cache.write_shard(
            directory,
            0,
            {**empty, "indices": np.empty(0, np.int64)},
            {"key": key, "skipped": skipped},
        )
        n_shards = 1
    if digests is not None:
        _check_digests(computed, digests, path)
    return n_shards


def _check_digests(computed: _Digests, digests: dict[str, str], path: Path) -> None:
    """DataError unless the rows read hash to the checksums the file records."""
    found = computed.hexdigests()
    if found != digests:
        differing = sorted(
            name for name in {*digests, *found} if digests.get(name) != found.get(name)
        )
        raise DataError(
            f"{path}: the rows of column(s) {', '.join(differing)} are not those exported "
            f"(they fail the checksums the file records); export the entry again"
        )
