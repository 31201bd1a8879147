"""The cache at scale: float16 and bfloat16 outputs kept as written, and the verification stamp
(hash in full once, then a stat per read; a changed file hashed again, a damaged one refused)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from oodprobe import cache
from oodprobe.errors import CacheError, InvalidParameterError

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": BF16}


def _arrays(dtype: np.dtype[Any], start: int, rows: int) -> dict[str, np.ndarray]:
    values = np.arange(start * 6, (start + rows) * 6, dtype=np.float32).reshape(rows, 6) / 8
    return {
        "features": values.astype(dtype),
        "logits": -values[:, :3].astype(dtype),
        "indices": np.arange(start, start + rows, dtype=np.int64),
    }


def _entry(directory: Path, dtype: np.dtype[Any], shards: tuple[int, ...] = (3, 2)) -> None:
    start = 0
    for shard, rows in enumerate(shards):
        cache.write_shard(directory, shard, _arrays(dtype, start, rows), {"skipped": []})
        start += rows
    cache.write_entry(directory, len(shards), {"key": "k"})


@pytest.fixture
def stamp_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stamp files however recently they changed (the 2 s guard is tested on its own)."""
    monkeypatch.setattr(cache, "STAMP_MIN_AGE_NS", 0)


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files hashed in full from now on."""
    hashed: list[str] = []
    original = cache.file_sha256

    def counting(path: Path) -> str:
        hashed.append(path.name)
        return original(path)

    monkeypatch.setattr(cache, "file_sha256", counting)
    return hashed


# -- dtypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("mmap", [False, True])
def test_each_output_dtype_round_trips_through_shards_and_the_entry(
    name: str, mmap: bool, tmp_path: Path
) -> None:
    dtype = DTYPES[name]
    expected = {
        key: np.concatenate([_arrays(dtype, 0, 3)[key], _arrays(dtype, 3, 2)[key]])
        for key in ("features", "logits", "indices")
    }
    cache.write_shard(tmp_path, 0, _arrays(dtype, 0, 3), {"skipped": []})
    shard, _ = cache.read_shard(tmp_path, 0)
    assert shard["features"].dtype == dtype
    assert cache.shard_layout(tmp_path, 0)["features"] == (
        {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[name],
        (3, 6),
    )
    cache.write_shard(tmp_path, 1, _arrays(dtype, 3, 2), {"skipped": []})
    meta = cache.write_entry(tmp_path, 2, {"key": "k"})
    arrays, read_meta = cache.read_entry(tmp_path, mmap=mmap, key="k")
    assert (
        read_meta["files"]["features"]["dtype"]
        == {
            "float32": "<f4",
            "float16": "<f2",
            "bfloat16": "bfloat16",
        }[name]
    )
    assert meta["files"] == read_meta["files"]
    for key, array in expected.items():
        assert arrays[key].dtype == array.dtype
        assert isinstance(arrays[key], np.memmap) == mmap
        np.testing.assert_array_equal(arrays[key].view(np.uint8), array.view(np.uint8))


def test_a_bfloat16_output_is_a_standard_u2_npy_of_its_bit_patterns(tmp_path: Path) -> None:
    values = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -0.25]], dtype=np.float32)
    cache.write_shard(
        tmp_path,
        0,
        {"features": values.astype(BF16), "indices": np.arange(2, dtype=np.int64)},
        {"skipped": []},
    )
    meta = cache.write_entry(tmp_path, 1, {})
    assert meta["files"]["features"]["dtype"] == "bfloat16"
    assert meta["files"]["features"]["stored_as"] == "<u2"
    raw = np.load(tmp_path / "features.npy")  # what a user's np.load sees
    # bfloat16 is float32's upper 16 bits: 1.0 = 0x3F80, -2.0 = 0xC000, 0.5 = 0x3F00, …
    assert raw.dtype == np.uint16
    assert raw.tolist() == [[0x3F80, 0xC000, 0x3F00], [0x4040, 0x0000, 0xBE80]]
    np.testing.assert_array_equal(raw.view(BF16).astype(np.float32), values)


def test_a_bfloat16_shard_reads_in_a_process_that_never_imported_ml_dtypes(
    tmp_path: Path,
) -> None:
    """safetensors.numpy looks up np.dtype('bfloat16'), which exists only once ml_dtypes is
    imported: read_shard imports it itself."""
    cache.write_shard(tmp_path, 0, _arrays(BF16, 0, 3), {"skipped": []})
    code = (
        "import sys; from pathlib import Path; from oodprobe import cache\n"
        "assert 'ml_dtypes' not in sys.modules\n"
        f"arrays, _ = cache.read_shard(Path({str(tmp_path)!r}), 0)\n"
        "print(arrays['features'].dtype, float(arrays['features'].astype('f4').sum()))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["bfloat16", str(float(np.arange(18).sum() / 8))]


def test_an_output_of_another_dtype_is_refused_when_joined(tmp_path: Path) -> None:
    arrays = _arrays(np.dtype(np.float64), 0, 3)
    cache.write_shard(tmp_path, 0, arrays, {"skipped": []})
    with pytest.raises(CacheError, match=r"holds features of dtype F64; outputs are float32, "):
        cache.write_entry(tmp_path, 1, {})
    assert not (tmp_path / "meta.json").exists()


def test_meta_of_an_unknown_output_dtype_or_a_bfloat16_without_its_storage_is_damage(
    tmp_path: Path,
) -> None:
    _entry(tmp_path, BF16)
    meta = json.loads((tmp_path / "meta.json").read_text())
    for change, message in (
        ({"dtype": "<f8"}, "describes features of dtype '<f8'"),
        ({"dtype": "bfloat16"}, "malformed entry for 'features'"),  # no stored_as
        ({"dtype": "bfloat16", "stored_as": "<f2"}, "malformed entry for 'features'"),
        ({"dtype": "<f2", "stored_as": "<u2"}, "malformed entry for 'features'"),
    ):
        edited = {**meta, "files": {**meta["files"]}}
        info = {k: v for k, v in meta["files"]["features"].items() if k != "stored_as"}
        edited["files"]["features"] = {**info, **change}
        (tmp_path / "meta.json").write_text(json.dumps(edited))
        with pytest.raises(CacheError, match=message):
            cache.read_entry(tmp_path)


def test_output_dtype_names_and_casts() -> None:
    assert [cache.output_dtype(name) for name in cache.OUTPUT_DTYPES] == list(DTYPES.values())
    assert [cache.dtype_name(dtype) for dtype in DTYPES.values()] == list(DTYPES)
    assert cache.dtype_name(np.dtype(np.float64)) is None
    with pytest.raises(InvalidParameterError, match=r"^store dtype must be one of float32, "):
        cache.output_dtype("fp16")
    # round to nearest even: 1 + 2**-8 is halfway between bfloat16's 1 and 1 + 2**-7
    cast = cache.to_output_dtype(np.array([1 + 2**-8, 1 + 3 * 2**-8], np.float32), "bfloat16")
    assert cast.astype(np.float32).tolist() == [1.0, 1 + 2**-6]


# -- the verification stamp -------------------------------------------------------------------


def test_an_entry_is_hashed_once_when_written_and_not_on_warm_reads(
    tmp_path: Path, stamp_now: None, hashes: list[str]
) -> None:
    _entry(tmp_path, np.dtype(np.float16))
    assert sorted(hashes) == ["features.npy", "indices.npy", "logits.npy"]  # by write_entry
    hashes.clear()
    for _ in range(3):
        arrays, _ = cache.read_entry(tmp_path, mmap=True)
    assert hashes == []
    assert arrays["features"].shape == (5, 6)
    cache.read_entry(tmp_path, verify="full")
    assert sorted(hashes) == ["features.npy", "indices.npy", "logits.npy"]


def test_a_touched_file_is_hashed_again_then_stamped_anew(
    tmp_path: Path, stamp_now: None, hashes: list[str]
) -> None:
    _entry(tmp_path, np.dtype(np.float32))
    hashes.clear()
    os.utime(tmp_path / "logits.npy", ns=(1, 10**18))  # contents unchanged
    cache.read_entry(tmp_path)
    assert hashes == ["logits.npy"]
    cache.read_entry(tmp_path)
    assert hashes == ["logits.npy"]  # stamped again: no second hash


def test_a_file_changed_in_place_is_hashed_and_refused(
    tmp_path: Path, stamp_now: None, hashes: list[str]
) -> None:
    _entry(tmp_path, np.dtype(np.float16))
    cache.read_entry(tmp_path)  # verified and stamped
    hashes.clear()
    path = tmp_path / "features.npy"
    status = path.stat()
    with open(path, "r+b") as handle:  # one bit of the data flipped, same size
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)[0]
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last ^ 0x01]))
    # even with its mtime set back, ctime moved: the stamp no longer matches
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    with pytest.raises(CacheError, match=r"features.npy failed its checksum$"):
        cache.read_entry(tmp_path, mmap=True)
    assert hashes == ["features.npy"]
    with pytest.raises(CacheError, match=r"features.npy failed its checksum$"):
        cache.read_entry(tmp_path)  # and on every later read: no stamp for a bad file


def test_a_replaced_file_is_hashed_and_refused(tmp_path: Path, stamp_now: None) -> None:
    _entry(tmp_path, np.dtype(np.float32))
    cache.read_entry(tmp_path)
    path = tmp_path / "features.npy"
    array = np.load(path)
    array[0, 0] += 1
    np.save(tmp_path / "other.npy", array)  # same size and header, other values
    os.replace(tmp_path / "other.npy", path)
    with pytest.raises(CacheError, match=r"features.npy failed its checksum$"):
        cache.read_entry(tmp_path, mmap=True)


def test_a_truncated_or_extended_file_fails_the_size_check_without_a_hash(
    tmp_path: Path, stamp_now: None, hashes: list[str]
) -> None:
    _entry(tmp_path, np.dtype(np.float16))
    hashes.clear()
    path = tmp_path / "features.npy"
    data = path.read_bytes()
    for damaged in (data[:-2], data + b"\0\0"):
        path.write_bytes(damaged)
        with pytest.raises(CacheError, match=r"features.npy is missing or has the wrong size$"):
            cache.read_entry(tmp_path, mmap=True)
    assert hashes == []


def test_a_stamp_matching_a_damaged_file_hides_it_until_a_full_verification(
    tmp_path: Path, stamp_now: None
) -> None:
    """What the stamp cannot see (damage below the file system, simulated by re-stamping a
    changed file): documented, and caught by verify='full'."""
    _entry(tmp_path, np.dtype(np.float32))
    path = tmp_path / "features.npy"
    with open(path, "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        handle.write(b"\x55")
    stamps = json.loads((tmp_path / cache.STAMP_FILE).read_text())
    status = path.stat()
    stamps["files"]["features"].update(
        size=status.st_size,
        mtime_ns=status.st_mtime_ns,
        ctime_ns=status.st_ctime_ns,
        ino=status.st_ino,
        dev=status.st_dev,
    )
    (tmp_path / cache.STAMP_FILE).write_text(json.dumps(stamps))
    cache.read_entry(tmp_path)  # not seen
    with pytest.raises(CacheError, match=r"features.npy failed its checksum$"):
        cache.read_entry(tmp_path, verify="full")


def test_a_stamp_of_another_checksum_or_a_malformed_stamp_file_is_not_trusted(
    tmp_path: Path, stamp_now: None, hashes: list[str]
) -> None:
    _entry(tmp_path, np.dtype(np.float32))
    stamps = json.loads((tmp_path / cache.STAMP_FILE).read_text())
    stamps["files"]["features"]["sha256"] = "0" * 64
    (tmp_path / cache.STAMP_FILE).write_text(json.dumps(stamps))
    hashes.clear()
    cache.read_entry(tmp_path)
    assert hashes == ["features.npy"]
    for text in ("{not json", "[]", '{"format": 1, "files": {"features": {"sha256": 3}}}'):
        (tmp_path / cache.STAMP_FILE).write_text(text)
        hashes.clear()
        cache.read_entry(tmp_path)
        assert sorted(hashes) == ["features.npy", "indices.npy", "logits.npy"]


def test_a_file_changed_within_the_minimum_age_is_not_stamped(
    tmp_path: Path, hashes: list[str]
) -> None:
    """With the default 2 s guard a just-written file is hashed again on its next read, so a
    change in the same timestamp tick as a stamp cannot be missed."""
    _entry(tmp_path, np.dtype(np.float32))
    assert json.loads((tmp_path / cache.STAMP_FILE).read_text())["files"] == {}
    hashes.clear()
    cache.read_entry(tmp_path)
    assert sorted(hashes) == ["features.npy", "indices.npy", "logits.npy"]


def test_a_read_only_entry_is_read_and_hashed_each_time(
    tmp_path: Path, stamp_now: None, hashes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _entry(tmp_path, np.dtype(np.float32))
    (tmp_path / cache.STAMP_FILE).unlink()

    def refuse(path: Any, write: Any) -> Path:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache, "atomic_write", refuse)
    hashes.clear()
    for _ in range(2):
        arrays, _ = cache.read_entry(tmp_path)
        assert arrays["features"].shape == (5, 6)
    assert len(hashes) == 6


def test_verify_of_another_value_is_refused(tmp_path: Path) -> None:
    _entry(tmp_path, np.dtype(np.float32))
    with pytest.raises(InvalidParameterError, match=r"^verify must be True, False or 'full'"):
        cache.read_entry(tmp_path, verify="stamp")  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_warm_mmapped_read_of_a_large_entry_costs_no_hash(
    tmp_path: Path, stamp_now: None, hashes: list[str]
) -> None:
    """200k x 768 float16 (300 MB): the warm read is a stat per file, not a 300 MB hash."""
    rows = 20_000
    for shard in range(10):
        arrays = {
            "features": np.full((rows, 768), shard, np.float16),
            "indices": np.arange(shard * rows, (shard + 1) * rows, dtype=np.int64),
        }
        cache.write_shard(tmp_path, shard, arrays, {"skipped": []})
    cache.write_entry(tmp_path, 10, {})
    hashes.clear()
    try:
        started = time.perf_counter()
        arrays, _ = cache.read_entry(tmp_path, mmap=True)
        assert time.perf_counter() - started < 0.5 and hashes == []
        assert float(arrays["features"][-1, -1]) == 9.0
        del arrays
    finally:  # 300 MB: not left for pytest's last three runs
        cache.remove_entry(tmp_path)
