"""Parquet export/import of features: columns and metadata other tools read (pandas, pyarrow,
Ray Data), dtypes restored bit for bit, streamed row groups, the cache round trip, bad files."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ArrayDataset, random_images
from oodprobe import cache, parquet
from oodprobe.data import SkippedImage
from oodprobe.errors import CacheError, DataError, InvalidParameterError
from oodprobe.features import extract_features
from test_cache import ConvEncoder

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": BF16}


def _values(rows: int, width: int, offset: float = 0.0) -> np.ndarray:
    return (np.arange(rows * width, dtype=np.float32).reshape(rows, width) - offset) / 8


def _entry(directory: Path, dtype: np.dtype[Any], rows: int = 10) -> dict[str, np.ndarray]:
    """A complete entry of ``rows`` rows (dataset indices 0, 2, 4, …), written as two shards."""
    arrays = {
        "features": _values(rows, 6).astype(dtype),
        "logits": _values(rows, 3, offset=7).astype(dtype),
        "indices": np.arange(0, 2 * rows, 2, dtype=np.int64),
    }
    half = rows // 2
    for shard, part in enumerate((slice(0, half), slice(half, rows))):
        records = [[1, "img1.png", "bad", "cannot decode img1.png"]] if shard == 0 else []
        extra = {"key": "k" * 64, "skipped": records}
        cache.write_shard(directory, shard, {n: a[part] for n, a in arrays.items()}, extra)
    cache.write_entry(directory, 2, {"key": "k" * 64, "encoder": "enc", "dataset": "set"})
    return arrays


@pytest.mark.parametrize("name", DTYPES)
def test_an_entry_exports_to_columns_pandas_and_pyarrow_read(name: str, tmp_path: Path) -> None:
    dtype = DTYPES[name]
    expected = _entry(tmp_path / "entry", dtype)
    path = parquet.export_parquet(tmp_path / "entry", tmp_path / "out.parquet")
    schema = pq.read_schema(path)
    value_type = pa.float16() if name == "float16" else pa.float32()
    assert schema.names == ["index", "features", "logits"]
    assert schema.field("index").type == pa.int64()
    assert schema.field("features").type == pa.list_(value_type, 6)
    assert schema.field("logits").type == pa.list_(value_type, 3)
    description = json.loads(schema.metadata[b"oodprobe"])
    assert description["key"] == "k" * 64 and description["n_rows"] == 10
    assert description["outputs"]["features"] == {
        "dtype": name,
        "shape": [6],
        "column_dtype": "float16" if name == "float16" else "float32",
    }
    assert description["entry"]["encoder"] == "enc"
    assert description["entry"]["skipped"] == [[1, "img1.png", "bad", "cannot decode img1.png"]]
    frame = pd.read_parquet(path)
    assert frame["index"].tolist() == list(range(0, 20, 2))
    # every value of the three dtypes is exact in the column's float16 / float32
    features = np.stack(frame["features"].to_numpy())
    np.testing.assert_array_equal(features, expected["features"].astype(features.dtype))
    table = pq.read_table(path)
    flat = table.column("logits").combine_chunks().flatten().to_numpy().reshape(10, 3)
    np.testing.assert_array_equal(flat, expected["logits"].astype(flat.dtype))


@pytest.mark.parametrize("name", DTYPES)
def test_import_gives_back_the_dtype_and_bits_that_were_exported(name: str, tmp_path: Path) -> None:
    expected = _entry(tmp_path / "entry", DTYPES[name])
    path = parquet.export_parquet(tmp_path / "entry", tmp_path / "out.parquet", row_group_size=3)
    back = parquet.import_parquet(path)
    assert back.key == "k" * 64 and back.labels is None and len(back) == 10
    np.testing.assert_array_equal(back.indices, expected["indices"])
    for output in ("features", "logits"):
        assert back.arrays[output].dtype == DTYPES[name]
        np.testing.assert_array_equal(
            back.arrays[output].view(np.uint8), expected[output].view(np.uint8)
        )


def test_export_is_streamed_in_row_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _entry(tmp_path / "entry", np.dtype(np.float16))
    blocks: list[int] = []
    original = parquet._arrow_values

    def recording(block: np.ndarray) -> Any:
        blocks.append(len(block))
        return original(block)

    monkeypatch.setattr(parquet, "_arrow_values", recording)
    path = parquet.export_parquet(tmp_path / "entry", tmp_path / "out.parquet", row_group_size=4)
    file = pq.ParquetFile(path)
    assert [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)] == [4, 4, 2]
    assert blocks == [4, 4, 4, 4, 2, 2]  # features and logits, one row group at a time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "out.parquet"]  # no temporary


def test_a_feature_set_exports_its_labels_class_names_and_skips(
    tmp_path: Path, cache_root: Path
) -> None:
    dataset = ArrayDataset(random_images(9), np.arange(9) % 3, broken=frozenset({4}))
    features = extract_features(
        dataset, ConvEncoder(), cache_root=cache_root, num_workers=0, progress=False
    )
    path = parquet.export_parquet(features, tmp_path / "set.parquet")
    frame = pd.read_parquet(path)
    assert frame.columns.tolist() == ["index", "features", "logits", "label"]
    assert frame["label"].tolist() == [0, 1, 2, 0, 2, 0, 1, 2]  # image 4 (label 1) skipped
    back = parquet.import_parquet(path).to_feature_set()
    assert back.class_names == ("class 0", "class 1", "class 2")
    assert back.labels is not None and back.labels.tolist() == frame["label"].tolist()
    assert back.skipped == [SkippedImage(4, "arrays[4]", "image file is truncated")]
    assert back.encoder_name == "conv-test" and back.key == features.key
    np.testing.assert_array_equal(back.features, features.features)
    np.testing.assert_array_equal(back.indices, features.indices)


def test_labels_and_class_names_can_be_given_for_an_entry(tmp_path: Path) -> None:
    _entry(tmp_path / "entry", np.dtype(np.float32), rows=4)
    path = parquet.export_parquet(
        tmp_path / "entry", tmp_path / "out.parquet", labels=[1, 0, 1, 1], class_names=["a", "b"]
    )
    back = parquet.import_parquet(path)
    assert back.labels is not None and back.labels.tolist() == [1, 0, 1, 1]
    assert back.class_names == ("a", "b")
    with pytest.raises(InvalidParameterError, match=r"^labels must be 4 integers \(one per row\)"):
        parquet.export_parquet(tmp_path / "entry", tmp_path / "x.parquet", labels=[0.5] * 4)


def test_a_row_of_tokens_is_flattened_and_reshaped(tmp_path: Path) -> None:
    local = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2).astype(np.float16)
    arrays = {
        "features": _values(4, 2),
        "local": local,
        "indices": np.arange(4, dtype=np.int64),
    }
    cache.write_shard(tmp_path / "entry", 0, arrays, {"skipped": []})
    cache.write_entry(tmp_path / "entry", 1, {})
    path = parquet.export_parquet(tmp_path / "entry", tmp_path / "out.parquet")
    assert pq.read_schema(path).field("local").type == pa.list_(pa.float16(), 6)
    back = parquet.import_parquet(path)
    assert back.arrays["local"].shape == (4, 3, 2) and back.arrays["local"].dtype == np.float16
    np.testing.assert_array_equal(back.arrays["local"], local)


def test_a_parquet_round_trip_through_the_cache_is_reused_by_extraction(
    tmp_path: Path, cache_root: Path
) -> None:
    dataset = ArrayDataset(random_images(8), broken=frozenset({3}))
    options: dict[str, Any] = {"cache_root": cache_root, "num_workers": 0, "progress": False}
    cold = extract_features(dataset, ConvEncoder(), **options)
    assert cold.path is not None
    path = parquet.export_parquet(cold.path, tmp_path / "f.parquet", row_group_size=3)
    cache.remove_entry(cold.path)
    directory = parquet.import_parquet_to_cache(path, cache_root)
    assert directory == cold.path
    arrays, meta = cache.read_entry(directory, mmap=True, key=cold.key)
    assert isinstance(arrays["features"], np.memmap)
    assert meta["imported_from"] == str(path.resolve())
    warm = extract_features(dataset, ConvEncoder(), **options)
    assert warm.from_cache and warm.stats["images_encoded"] == 0
    assert warm.skipped == cold.skipped
    np.testing.assert_array_equal(warm.features, cold.features)
    np.testing.assert_array_equal(warm.logits, cold.logits)


def test_a_file_another_tool_wrote_is_read_too(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "features": [np.array([1.0, 2.0]), np.array([3.0, 4.0]), np.array([5.0, 6.5])],
            "label": [2, 0, 1],
            "name": ["a", "b", "c"],  # not a list of floats: ignored
        }
    )
    frame.to_parquet(tmp_path / "other.parquet")
    back = parquet.import_parquet(tmp_path / "other.parquet")
    assert back.features.dtype == np.float32 and back.features.tolist() == [
        [1.0, 2.0],
        [3.0, 4.0],
        [5.0, 6.5],
    ]
    assert back.indices.tolist() == [0, 1, 2] and back.labels is not None
    assert back.labels.tolist() == [2, 0, 1] and back.meta == {} and back.key is None
    directory = parquet.import_parquet_to_cache(tmp_path / "other.parquet", tmp_path / "root")
    assert directory.name == cache.file_sha256(tmp_path / "other.parquet")
    arrays, _ = cache.read_entry(directory)
    assert arrays["features"].tolist() == back.features.tolist()


# -- bad inputs are one-line errors -----------------------------------------------------------


def _write(table: pa.Table, path: Path) -> Path:
    pq.write_table(table, path)
    return path


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file at all" * 10)
    cases: list[tuple[Path, str]] = [
        (tmp_path / "missing.parquet", r"missing.parquet does not exist \(or is not a file\)$"),
        (tmp_path, r" is a directory; give a Parquet file \(export_parquet writes one\)$"),
        (tmp_path / "junk.parquet", r"junk.parquet is not a readable Parquet file: "),
        (
            _write(pa.table({"x": [[1.0, 2.0]]}), tmp_path / "nofeat.parquet"),
            r"has no 'features' column \(a list of floats per row\); its columns: x$",
        ),
        (
            _write(pa.table({"features": ["a", "b"]}), tmp_path / "str.parquet"),
            r"column 'features' is string, expected a list of floats per row$",
        ),
        (
            _write(pa.table({"features": [[1.0, 2.0], [3.0]]}), tmp_path / "ragged.parquet"),
            r"column 'features' has rows of 1 to 2 values; every row needs the same number$",
        ),
        (
            _write(pa.table({"features": [[1.0], None]}), tmp_path / "null.parquet"),
            r"column 'features' has 1 empty \(null\) rows$",
        ),
        (
            _write(pa.table({"features": [[1.0]], "index": ["a"]}), tmp_path / "idx.parquet"),
            r"column 'index' is string, expected integers$",
        ),
    ]
    for path, message in cases:
        with pytest.raises(DataError, match=message) as caught:
            parquet.import_parquet(path)
        assert "\n" not in str(caught.value)


def test_a_damaged_data_page_is_caught_by_its_checksum(tmp_path: Path) -> None:
    _entry(tmp_path / "entry", np.dtype(np.float32), rows=200)
    path = parquet.export_parquet(tmp_path / "entry", tmp_path / "out.parquet", compression="none")
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the features data
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"out.parquet is damaged \(row group 0\): ") as caught:
        parquet.import_parquet(path)
    assert "\n" not in str(caught.value)


def test_metadata_that_does_not_fit_the_columns_is_an_error(tmp_path: Path) -> None:
    _entry(tmp_path / "entry", np.dtype(np.float32), rows=4)
    path = parquet.export_parquet(tmp_path / "entry", tmp_path / "out.parquet")
    table = pq.read_table(path)
    description = json.loads(table.schema.metadata[b"oodprobe"])
    for change, message in (
        ({"format": 9}, r"has oodprobe metadata of format 9; this version reads format 1$"),
        (
            {"outputs": {**description["outputs"], "extra": {"dtype": "float32", "shape": [1]}}},
            r"its metadata lists output 'extra', which has no column$",
        ),
        (
            {"outputs": {**description["outputs"], "logits": {"dtype": "float32", "shape": [5]}}},
            r"column 'logits' has 3 values per row, its metadata says shape \[5\]$",
        ),
    ):
        edited = table.replace_schema_metadata(
            {b"oodprobe": json.dumps({**description, **change}).encode()}
        )
        with pytest.raises(DataError, match=message):
            parquet.import_parquet(_write(edited, tmp_path / "edited.parquet"))


def test_import_to_the_cache_refuses_a_key_that_is_not_a_cache_key(tmp_path: Path) -> None:
    """The key names a folder that import may remove: a path in it must never be followed."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("x")
    _entry(tmp_path / "entry", np.dtype(np.float32), rows=4)
    table = pq.read_table(parquet.export_parquet(tmp_path / "entry", tmp_path / "out.parquet"))
    description = json.loads(table.schema.metadata[b"oodprobe"])
    for key in ("../../../victim", "k" * 64, 7):
        edited = table.replace_schema_metadata(
            {b"oodprobe": json.dumps({**description, "key": key}).encode()}
        )
        path = _write(edited, tmp_path / "edited.parquet")
        with pytest.raises(DataError, match=r"records a cache key that is not 64 hex digits"):
            parquet.import_parquet_to_cache(path, tmp_path / "root" / "a" / "b")
    assert (victim / "keep.txt").exists()


def test_a_damaged_file_leaves_no_partial_entry(tmp_path: Path) -> None:
    _entry(tmp_path / "entry", np.dtype(np.float32), rows=200)
    source = parquet.export_parquet(
        tmp_path / "entry", tmp_path / "out.parquet", compression="none", row_group_size=50
    )
    table = pq.read_table(source)
    description = json.loads(table.schema.metadata[b"oodprobe"])
    edited = table.replace_schema_metadata(
        {b"oodprobe": json.dumps({**description, "key": "ab" * 32}).encode()}
    )
    pq.write_table(edited, source, row_group_size=50, compression="none", write_page_checksum=True)
    data = bytearray(source.read_bytes())
    data[len(data) * 3 // 4] ^= 0xFF  # in a later row group
    source.write_bytes(bytes(data))
    with (
        pytest.warns(UserWarning, match=r"but not the checksums export_parquet writes"),
        pytest.raises(DataError, match=r"out.parquet is damaged \(row group [1-3]\)"),
    ):
        parquet.import_parquet_to_cache(source, tmp_path / "root")
    assert not list((tmp_path / "root" / "features").glob("*/*/*"))  # no entry, no shard


def test_import_to_the_cache_refuses_rows_out_of_order(tmp_path: Path) -> None:
    table = pa.table({"index": [0, 2, 1], "features": [[1.0], [2.0], [3.0]]})
    path = _write(table, tmp_path / "order.parquet")
    with pytest.raises(DataError, match=r"the index column is not strictly increasing"):
        parquet.import_parquet_to_cache(path, tmp_path / "root")
    assert not list((tmp_path / "root" / "features").glob("*/*/*.npy"))


def test_bad_export_arguments_are_refused_before_any_work(tmp_path: Path) -> None:
    _entry(tmp_path / "entry", np.dtype(np.float32), rows=4)
    with pytest.raises(CacheError, match=r"is not a complete cache entry \(no meta.json\)"):
        parquet.export_parquet(tmp_path / "nowhere", tmp_path / "out.parquet")
    with pytest.raises(InvalidParameterError, match=r"^row_group_size must be >= 1, got 0$"):
        parquet.export_parquet(tmp_path / "entry", tmp_path / "out.parquet", row_group_size=0)
    with pytest.raises(InvalidParameterError, match=r"^compression must be a codec pyarrow"):
        parquet.export_parquet(tmp_path / "entry", tmp_path / "out.parquet", compression="zip")
    (tmp_path / "entry" / "features.npy").write_bytes(b"short")
    with pytest.raises(CacheError, match=r"features.npy is missing or has the wrong size$"):
        parquet.export_parquet(tmp_path / "entry", tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.slow
def test_ray_data_reads_an_export(tmp_path: Path) -> None:
    """A local Ray (2 CPUs) reads the columns; a batch's lists stack into the (N, D) matrix."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    expected = _entry(tmp_path / "entry", np.dtype(np.float16))
    path = parquet.export_parquet(tmp_path / "entry", tmp_path / "out.parquet", row_group_size=4)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        dataset = ray.data.read_parquet(str(path))
        assert dataset.count() == 10
        batch = next(iter(dataset.iter_batches(batch_size=10, batch_format="numpy")))
        np.testing.assert_array_equal(batch["index"], expected["indices"])
        np.testing.assert_array_equal(np.stack(batch["features"]), expected["features"])
    finally:
        ray.shutdown()


# -- the command line -------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from oodprobe.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_cache_commands_list_inspect_export_and_import(
    tmp_path: Path, cache_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = ArrayDataset(random_images(8))
    cold = extract_features(
        dataset, ConvEncoder(), cache_root=cache_root, num_workers=0, progress=False
    )
    assert cold.path is not None
    root = ["--cache-dir", str(cache_root)]
    code, out, _ = _cli(capsys, "cache", "list", *root)
    assert code == 0
    assert out.splitlines()[0].startswith(f"{cold.key[:16]}  8 rows  features 6-d float32, ")
    assert out.splitlines()[-1] == f"1 entry under {cache_root}"
    code, out, _ = _cli(capsys, "cache", "info", cold.key[:8], *root, "--verify")
    assert code == 0 and f"key: {cold.key}" in out.splitlines()
    assert "outputs: features 6-d float32, logits 3-d float32" in out.splitlines()
    assert "verified: every file hashed in full" in out.splitlines()
    target = tmp_path / "f.parquet"
    code, out, _ = _cli(
        capsys, "cache", "export", str(cold.path), str(target), "--compression", "zstd"
    )
    assert code == 0 and out.strip() == f"8 rows written to {target}"
    np.testing.assert_array_equal(np.stack(pd.read_parquet(target)["features"]), cold.features)
    cache.remove_entry(cold.path)
    code, out, _ = _cli(capsys, "cache", "import", str(target), *root)
    assert code == 0 and out.splitlines()[-1] == f"entry: {cold.path}"
    warm = extract_features(
        dataset, ConvEncoder(), cache_root=cache_root, num_workers=0, progress=False
    )
    assert warm.from_cache


def test_cache_commands_explain_bad_inputs_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = ["--cache-dir", str(tmp_path / "root")]
    _entry(tmp_path / "root" / "features" / "ab" / ("ab" * 32), np.dtype(np.float32))
    incomplete = tmp_path / "root" / "features" / "cd" / ("cd" * 32)
    cache.write_shard(incomplete, 0, {"features": np.zeros((1, 2), np.float32)}, {})
    (tmp_path / "junk.parquet").write_bytes(b"junk")
    _write(pa.table({"x": [1]}), tmp_path / "schema.parquet")
    cases = [
        (("export", "ef01", "out.parquet"), r"no cache entry has a key starting 'ef01' under "),
        (("export", "ab", "out.parquet"), r"'ab' is neither an entry folder nor a cache key"),
        (("info", str(incomplete)), r"is not a complete cache entry \(it has no meta.json"),
        (("import", str(tmp_path / "junk.parquet")), r"junk.parquet is not a readable Parquet"),
        (("import", str(tmp_path / "schema.parquet")), r"has no 'features' column"),
        (("import", str(tmp_path / "none.parquet")), r"none.parquet does not exist"),
        (("export", "abab", str(tmp_path)), r"--output .* is a directory; give a file path"),
    ]
    for args, message in cases:
        code, _, err = _cli(capsys, "cache", *args, *root)
        assert code == 1
        assert re.search(message, _error_line(err)), err
    code, out, _ = _cli(capsys, "cache", "list", *root)
    assert out.splitlines()[:2] == [
        f"{'ab' * 8}  10 rows  features 6-d float32, logits 3-d float32  enc · set",
        f"{'cd' * 8}  incomplete: 1 shard(s)",
    ]
    (tmp_path / "root" / "features" / "ab" / ("ab" * 32) / "features.npy").write_bytes(b"x")
    code, _, err = _cli(capsys, "cache", "export", "abab", str(tmp_path / "o.parquet"), *root)
    assert code == 1 and _error_line(err).endswith("features.npy is missing or has the wrong size")


# -- found in review: a changed file never stands in for an entry; edge cases --------------------


def _rewrite_features(source: Path, target: Path, *, keep_footer: bool) -> None:
    """``source`` with every feature doubled, the schema metadata (the cache key) kept, as
    pyarrow writes a table it read; with ``keep_footer`` also the exporter's checksums."""
    table = pq.read_table(source)
    width = table.schema.field("features").type.list_size
    features = np.stack(table.column("features").to_pylist()).astype(np.float32) * 2
    doubled = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), width)
    table = table.set_column(table.schema.get_field_index("features"), "features", doubled)
    with pq.ParquetWriter(target, table.schema) as writer:
        writer.write_table(table)
        if keep_footer:
            footer = pq.ParquetFile(source).metadata.metadata
            writer.add_key_value_metadata({parquet.DIGESTS_KEY: footer[parquet.DIGESTS_KEY]})


def test_rows_changed_after_export_never_take_the_entry_key(
    tmp_path: Path, cache_root: Path
) -> None:
    """Extraction reuses an imported entry by its key: rows edited since export (the schema
    metadata, key included, survives a pyarrow rewrite) must not become the encoder's output."""
    dataset = ArrayDataset(random_images(6))
    options: dict[str, Any] = {"cache_root": cache_root, "num_workers": 0, "progress": False}
    cold = extract_features(dataset, ConvEncoder(), **options)
    assert cold.path is not None
    exported = parquet.export_parquet(cold.path, tmp_path / "f.parquet")
    cache.remove_entry(cold.path)
    edited = tmp_path / "edited.parquet"
    _rewrite_features(exported, edited, keep_footer=False)
    with pytest.warns(UserWarning, match=r"records cache key .* but not the checksums"):
        directory = parquet.import_parquet_to_cache(edited, cache_root)
    assert directory.name == cache.file_sha256(edited) != cold.key
    assert cache.read_meta(directory)["exported_key"] == cold.key
    assert not cold.path.exists()
    forged = tmp_path / "forged.parquet"  # the exporter's checksums copied onto changed rows
    _rewrite_features(exported, forged, keep_footer=True)
    with pytest.raises(DataError, match=r"rows of column\(s\) features are not those exported"):
        parquet.import_parquet_to_cache(forged, cache_root)
    assert not cold.path.exists()
    warm = extract_features(dataset, ConvEncoder(), **options)
    assert not warm.from_cache
    np.testing.assert_array_equal(warm.features, cold.features)


def test_a_subset_or_changed_arrays_of_an_entry_are_exported_without_its_key(
    tmp_path: Path, cache_root: Path
) -> None:
    features = extract_features(
        ArrayDataset(random_images(6)),
        ConvEncoder(),
        cache_root=cache_root,
        num_workers=0,
        progress=False,
    )
    for rows in (np.array([0, 2, 5]), np.array([5, 4, 3, 2, 1, 0]), np.arange(6)):
        # a copy of all rows in order (subset copies) is not the entry's files either
        path = parquet.export_parquet(features.subset(rows), tmp_path / "subset.parquet")
        assert parquet.import_parquet(path).key is None
    changed = features.subset(np.arange(6))
    changed.arrays = {**features.arrays, "features": np.asarray(features.features) * 2}
    path = parquet.export_parquet(changed, tmp_path / "changed.parquet")
    assert parquet.import_parquet(path).key is None
    assert features.path is not None
    kept = parquet.export_parquet(features, tmp_path / "kept.parquet")
    cache.remove_entry(features.path)  # its memory maps still read; nothing vouches for them
    gone = parquet.export_parquet(features, tmp_path / "gone.parquet")
    assert parquet.import_parquet(kept).key == features.key
    assert parquet.import_parquet(gone).key is None


def test_widths_that_change_between_row_groups_and_null_values_are_one_line_errors(
    tmp_path: Path,
) -> None:
    two = pa.table({"features": pa.array([[1.0, 2.0]], pa.list_(pa.float32()))})
    three = pa.table({"features": pa.array([[1.0, 2.0, 3.0]], pa.list_(pa.float32()))})
    with pq.ParquetWriter(tmp_path / "widths.parquet", two.schema) as writer:
        writer.write_table(two)
        writer.write_table(three)
    _write(pa.table({"features": [[1.0, None], [2.0, 3.0]]}), tmp_path / "hole.parquet")
    for name, message in (
        ("widths", r"'features' has 2 values per row before row group 1 and 3 in it"),
        ("hole", r"column 'features' has 1 null values inside its rows$"),
    ):
        for read in (parquet.import_parquet, parquet.import_parquet_to_cache):
            with pytest.raises(DataError, match=message) as caught:
                read(
                    tmp_path / f"{name}.parquet",
                    *([tmp_path / "root"] if read is not parquet.import_parquet else []),
                )
            assert "\n" not in str(caught.value)
    assert not list((tmp_path / "root" / "features").glob("*/*/*"))


def test_empty_row_groups_of_another_tool_are_skipped(tmp_path: Path) -> None:
    schema = pa.schema([pa.field("features", pa.list_(pa.float32()))])
    with pq.ParquetWriter(tmp_path / "gaps.parquet", schema) as writer:
        writer.write_table(pa.table({"features": pa.array([], pa.list_(pa.float32()))}))
        writer.write_table(pa.table({"features": [[1.0, 2.0], [3.0, 4.0]]}, schema=schema))
    assert pq.ParquetFile(tmp_path / "gaps.parquet").num_row_groups == 2
    assert parquet.import_parquet(tmp_path / "gaps.parquet").features.tolist() == [
        [1.0, 2.0],
        [3.0, 4.0],
    ]
    directory = parquet.import_parquet_to_cache(tmp_path / "gaps.parquet", tmp_path / "root")
    assert cache.read_entry(directory)[0]["features"].tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_every_bfloat16_and_float16_bit_pattern_round_trips(tmp_path: Path) -> None:
    """All 65,536 patterns, NaN payloads and signalling NaNs included, with no cast warning."""
    patterns = np.arange(1 << 16, dtype=np.uint16).reshape(-1, 16)
    for dtype in (BF16, np.dtype(np.float16)):
        directory = tmp_path / dtype.name
        arrays = {"features": patterns.view(dtype), "indices": np.arange(len(patterns))}
        cache.write_shard(directory, 0, arrays, {"skipped": []})
        cache.write_entry(directory, 1, {"key": "e" * 64})
        path = parquet.export_parquet(directory, tmp_path / f"{dtype.name}.parquet")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            back = parquet.import_parquet(path).features
            cache.remove_entry(directory)
            entry = parquet.import_parquet_to_cache(path, tmp_path / "root")
        assert back.dtype == dtype
        np.testing.assert_array_equal(back.view(np.uint16), patterns)
        stored = cache.read_entry(entry)[0]["features"]
        np.testing.assert_array_equal(stored.view(np.uint16), patterns)


def test_an_empty_entry_round_trips_through_the_cache(tmp_path: Path) -> None:
    """Every image skipped: 0 rows, the widths and the skip records still exported."""
    empty = {"features": np.zeros((0, 6), np.float16), "indices": np.zeros(0, np.int64)}
    records = [[0, "a.png", "bad", "cannot decode a.png"]]
    cache.write_shard(tmp_path / "entry", 0, empty, {"skipped": records})
    cache.write_entry(tmp_path / "entry", 1, {"key": "f" * 64})
    path = parquet.export_parquet(tmp_path / "entry", tmp_path / "out.parquet")
    directory = parquet.import_parquet_to_cache(path, tmp_path / "root")
    assert directory.name == "f" * 64
    arrays, meta = cache.read_entry(directory)
    assert arrays["features"].shape == (0, 6) and arrays["features"].dtype == np.float16
    assert meta["n_rows"] == 0 and meta["skipped"] == records


def test_the_entry_provenance_cannot_name_the_cache_s_own_records(tmp_path: Path) -> None:
    """A head record in the file's metadata would make the imported entry claim a head file."""
    _entry(tmp_path / "entry", np.dtype(np.float32), rows=4)
    path = parquet.export_parquet(tmp_path / "entry", tmp_path / "out.parquet")
    table = pq.read_table(path)
    description = json.loads(table.schema.metadata[b"oodprobe"])
    head = {"file": "head.safetensors", "shape": [2, 6], "sha256": "0" * 64}
    description["entry"].update(head=head, imported_from="/elsewhere", exported_key="x")
    description["key"] = "ab" * 32
    edited = table.replace_schema_metadata({b"oodprobe": json.dumps(description).encode()})
    with pytest.warns(UserWarning, match=r"but not the checksums"):
        directory = parquet.import_parquet_to_cache(
            _write(edited, tmp_path / "e.parquet"), tmp_path / "root"
        )
    meta = cache.read_meta(directory)
    assert "head" not in meta and meta["exported_key"] == "ab" * 32
    assert meta["imported_from"] == str((tmp_path / "e.parquet").resolve())


def test_a_bad_output_path_or_codec_is_refused_before_the_entry_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _entry(tmp_path / "entry", np.dtype(np.float32), rows=4)

    def unread(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the entry was read before the arguments were checked")

    monkeypatch.setattr(cache, "read_entry", unread)
    (tmp_path / "folder").mkdir()
    for target, keyword, message in (
        (tmp_path / "folder", {}, r"folder is a directory; give the path of a file to write"),
        (tmp_path / "no" / "f.parquet", {}, r"is in a folder that does not exist"),
        (tmp_path / "f.parquet", {"compression": "zip"}, r"^compression must be a codec"),
    ):
        with pytest.raises(InvalidParameterError, match=message):
            parquet.export_parquet(tmp_path / "entry", target, **keyword)


def test_cache_export_lists_its_codecs_and_refuses_another_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(capsys, "cache", "export", "--help")
    assert code == 0 and "<snappy|zstd|gzip|lz4|br" in out
    _entry(tmp_path / "root" / "features" / "ab" / ("ab" * 32), np.dtype(np.float32))
    root = ["--cache-dir", str(tmp_path / "root")]
    for args, message in (
        (("--compression", "zip"), r"'zip' is not one of 'snappy', 'zstd', 'gzip'"),
        ((), r"f.parquet is in a folder that does not exist; give the path of a file"),
    ):
        code, _, err = _cli(
            capsys, "cache", "export", "abab", str(tmp_path / "no" / "f.parquet"), *args, *root
        )
        assert code == 1 and re.search(message, _error_line(err)), err


def test_a_large_row_group_of_another_tool_is_read_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyarrow's default row group is a million rows: decoded whole, it cost 4x its size."""
    monkeypatch.setattr(parquet, "DEFAULT_ROW_GROUP_SIZE", 4)
    rows = _values(10, 3)
    _write(pa.table({"features": list(rows), "index": np.arange(10) * 3}), tmp_path / "one.parquet")
    assert pq.ParquetFile(tmp_path / "one.parquet").num_row_groups == 1
    shards: list[int] = []
    original = cache.write_shard

    def recording(directory: Path, shard: int, arrays: dict[str, np.ndarray], extra: Any) -> None:
        shards.append(len(arrays["indices"]))
        original(directory, shard, arrays, extra)

    monkeypatch.setattr(cache, "write_shard", recording)
    directory = parquet.import_parquet_to_cache(tmp_path / "one.parquet", tmp_path / "root")
    assert shards == [4, 4, 2]
    arrays, _ = cache.read_entry(directory)
    np.testing.assert_array_equal(arrays["features"], rows)
    np.testing.assert_array_equal(arrays["indices"], np.arange(10) * 3)
    np.testing.assert_array_equal(parquet.import_parquet(tmp_path / "one.parquet").features, rows)
    table = pa.table({"features": list(rows), "index": [0, 1, 2, 3, 4, 5, 6, 8, 7, 9]})
    with pytest.raises(DataError, match=r"not strictly increasing \(row 8: 7\); the cache keeps"):
        parquet.import_parquet_to_cache(_write(table, tmp_path / "order.parquet"), tmp_path / "r")


def test_values_beyond_the_stored_dtype_and_negative_indices_are_refused(tmp_path: Path) -> None:
    """float64 columns of another tool are rounded to float32: a value too large would be inf."""
    huge = _write(pa.table({"features": [[1e300, 2.0], [3.0, 4.0]]}), tmp_path / "huge.parquet")
    with pytest.raises(DataError, match=r"'features' holds 1e\+300, beyond the range of float32"):
        parquet.import_parquet(huge)
    special = _write(
        pa.table({"features": [[np.nan, -np.inf], [3.0, 4.0]]}), tmp_path / "s.parquet"
    )
    kept = parquet.import_parquet(special).features  # what was not finite stays as it was
    assert np.isnan(kept[0, 0]) and kept[0, 1] == -np.inf and kept.dtype == np.float32
    table = pa.table({"features": [[1.0], [3.0]], "index": [-1, 0]})
    with pytest.raises(DataError, match=r"the index column holds -1; dataset indices are >= 0$"):
        parquet.import_parquet_to_cache(_write(table, tmp_path / "n.parquet"), tmp_path / "root")
    assert not list((tmp_path / "root" / "features").glob("*/*/*"))


def test_import_reports_the_key_only_for_rows_the_checksums_vouch_for(tmp_path: Path) -> None:
    _entry(tmp_path / "entry", np.dtype(np.float16), rows=4)
    exported = parquet.export_parquet(tmp_path / "entry", tmp_path / "out.parquet")
    assert parquet.import_parquet(exported).key == "k" * 64
    _rewrite_features(exported, tmp_path / "edited.parquet", keep_footer=False)
    edited = parquet.import_parquet(tmp_path / "edited.parquet")
    assert edited.key is None and edited.to_feature_set().key == ""
    assert edited.meta["encoder"] == "enc"  # the provenance is still shown
    _rewrite_features(exported, tmp_path / "forged.parquet", keep_footer=True)
    with pytest.raises(DataError, match=r"rows of column\(s\) features are not those exported"):
        parquet.import_parquet(tmp_path / "forged.parquet")


def test_malformed_skip_records_in_the_metadata_are_one_line_errors(tmp_path: Path) -> None:
    _entry(tmp_path / "entry", np.dtype(np.float32), rows=4)
    table = pq.read_table(parquet.export_parquet(tmp_path / "entry", tmp_path / "out.parquet"))
    description = json.loads(table.schema.metadata[b"oodprobe"])
    description["entry"]["skipped"] = "img1.png"
    edited = table.replace_schema_metadata({b"oodprobe": json.dumps(description).encode()})
    path = _write(edited, tmp_path / "edited.parquet")
    for read in (
        parquet.import_parquet,
        lambda path: parquet.import_parquet_to_cache(path, tmp_path),
    ):
        with pytest.raises(DataError, match=r"edited.parquet has skip records of type str$"):
            read(path)
