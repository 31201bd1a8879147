"""Features stored as float16 / bfloat16: values, cache keys, resume, the CLI option."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from conftest import ArrayDataset, random_images
from oodprobe import cache
from oodprobe.cli import main
from oodprobe.encoders import ImageEncoder, create_encoder
from oodprobe.errors import InvalidParameterError
from oodprobe.features import extract_features, load_features

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def encoder(tiny_openclip: str) -> ImageEncoder:
    return create_encoder(tiny_openclip)


@pytest.fixture(scope="module")
def dataset() -> ArrayDataset:
    return ArrayDataset(random_images(20, seed=3), np.arange(20) % 2)


def _extract(dataset: ArrayDataset, encoder: ImageEncoder, root: Path, **options: Any) -> Any:
    return extract_features(
        dataset, encoder, cache_root=root, num_workers=0, progress=False, **options
    )


@pytest.mark.parametrize(("store_dtype", "dtype"), [("float16", np.float16), ("bfloat16", BF16)])
def test_half_storage_holds_the_float32_features_cast(
    dataset: ArrayDataset, encoder: ImageEncoder, cache_root: Path, store_dtype: str, dtype: Any
) -> None:
    full = _extract(dataset, encoder, cache_root)
    half = _extract(dataset, encoder, cache_root, store_dtype=store_dtype)
    assert half.features.dtype == dtype and not half.from_cache
    assert half.key != full.key and half.path != full.path
    # the same forward pass, cast once (round to nearest even)
    np.testing.assert_array_equal(
        half.features.view(np.uint16), full.features.astype(dtype).view(np.uint16)
    )
    np.testing.assert_array_equal(half.indices, full.indices)
    again = _extract(dataset, encoder, cache_root, store_dtype=store_dtype)
    assert again.from_cache and again.stats["images_encoded"] == 0
    assert again.features.dtype == dtype
    np.testing.assert_array_equal(again.features.view(np.uint16), half.features.view(np.uint16))
    on_disk = load_features(half.path)["features"]
    assert on_disk.dtype == dtype


def test_float32_keys_are_those_written_before_store_dtypes_existed(
    dataset: ArrayDataset, encoder: ImageEncoder, cache_root: Path
) -> None:
    result = _extract(dataset, encoder, cache_root, store_dtype="float32")
    # the key formula of entries written before this option (oodprobe 0.x, cache format 1)
    before = cache.cache_key(
        {
            "encoder": encoder.cache_id,
            "precision": "fp32",
            "dataset": dataset.fingerprint(),
            "n_images": len(dataset),
            "shard_size": 2048,
        }
    )
    assert result.key == before
    assert result.path == cache.entry_dir(cache_root, before)
    keys = {
        _extract(dataset, encoder, cache_root, store_dtype=name).key
        for name in ("float16", "bfloat16")
    }
    assert len(keys | {before}) == 3


def test_an_interrupted_float16_extraction_resumes_from_its_shards(
    dataset: ArrayDataset,
    encoder: ImageEncoder,
    cache_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    written: list[int] = []
    write_shard = cache.write_shard

    def stop_after_two(directory: Path, shard: int, *args: Any) -> None:
        if len(written) == 2:
            raise KeyboardInterrupt  # the run is killed after two whole shards
        write_shard(directory, shard, *args)
        written.append(shard)

    monkeypatch.setattr(cache, "write_shard", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        _extract(dataset, encoder, cache_root, store_dtype="float16", shard_size=4, batch_size=4)
    monkeypatch.setattr(cache, "write_shard", write_shard)
    assert written == [0, 1]
    resumed = _extract(dataset, encoder, cache_root, store_dtype="float16", shard_size=4)
    # the two float16 shards on disk passed their checks and were kept
    assert resumed.stats["images_encoded"] == 20 - 2 * 4
    fresh = _extract(dataset, encoder, tmp_path / "other", store_dtype="float16", shard_size=4)
    assert resumed.features.dtype == np.float16
    np.testing.assert_array_equal(resumed.features, fresh.features)
    np.testing.assert_array_equal(resumed.indices, fresh.indices)


def test_a_float32_shard_is_recomputed_in_a_float16_entry(
    dataset: ArrayDataset, encoder: ImageEncoder, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard of another dtype under the entry's key (another version) fails its check."""
    from oodprobe import features

    probe = _extract(dataset, encoder, cache_root, store_dtype="float16", shard_size=4)
    cache.remove_entry(probe.path)
    probe.path.mkdir(parents=True)
    rows = np.arange(4)
    cache.write_shard(
        probe.path,
        0,
        {"features": np.asarray(probe.features[rows], np.float32), "indices": rows},
        {"key": probe.key, "skipped": []},
    )
    with pytest.warns(UserWarning, match=r"shard 0 has features of dtype float32.*float16"):
        again = _extract(dataset, encoder, cache_root, store_dtype="float16", shard_size=4)
    assert again.stats["images_encoded"] == 20 and again.features.dtype == np.float16
    assert features.storage_dtype("bfloat16") == BF16


def test_a_store_dtype_outside_the_three_is_refused(
    dataset: ArrayDataset, encoder: ImageEncoder
) -> None:
    with pytest.raises(
        InvalidParameterError,
        match=r"^store_dtype must be one of float32, float16, bfloat16, got 'float64'$",
    ):
        extract_features(dataset, encoder, store_dtype="float64")  # type: ignore[arg-type]


def test_cli_store_dtype(
    tiny_openclip: str, cache_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["extract", "digits:test", "--limit", "12", "-e", tiny_openclip]
    args += ["--cache-dir", str(cache_root), "--workers", "0", "--json"]
    assert main([*args, "--store-dtype", "float16"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert np.load(Path(summary["path"]) / "features.npy").dtype == np.float16
    assert json.loads((Path(summary["path"]) / "meta.json").read_text())["store_dtype"] == (
        "float16"
    )
    assert main([*args, "--store-dtype", "float64"]) != 0
    err = capsys.readouterr().err
    assert "'float64' is not one of 'float32', 'float16', 'bfloat16'" in err


def test_a_shared_pass_files_each_name_in_its_own_float16_entry(cache_root: Path) -> None:
    """Each name's entry is the one ``extract_features(name, store_dtype=...)`` reads."""
    from oodprobe.encoders import create_shared_encoder
    from oodprobe.features import extract_shared_features

    dataset = ArrayDataset(random_images(12, seed=5))
    names = ["efficientnet-lite0@32", "efficientnet-lite0/block2@32"]
    shared, outputs = create_shared_encoder(names)
    results = extract_shared_features(
        dataset,
        shared,
        outputs,
        cache_root=cache_root,
        num_workers=0,
        progress=False,
        store_dtype="float16",
    )
    for name in names:
        alone = extract_features(
            dataset,
            name,
            cache_root=cache_root,
            num_workers=0,
            progress=False,
            store_dtype="float16",
        )
        assert alone.from_cache and alone.key == results[name].key
        assert results[name].features.dtype == np.float16
        full = extract_features(dataset, name, use_cache=False, num_workers=0, progress=False)
        np.testing.assert_array_equal(results[name].features, full.features.astype(np.float16))
    assert results[names[0]].logits is not None
    assert results[names[0]].logits.dtype == np.float16


def test_cli_extract_says_how_to_read_a_bfloat16_entry(
    tiny_openclip: str, cache_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """np.load of a bfloat16 entry gives uint16 bit patterns: the summary must not say it works."""
    import ml_dtypes

    args = ["extract", "digits:test", "--limit", "12", "-e", tiny_openclip]
    args += ["--cache-dir", str(cache_root), "--workers", "0", "--store-dtype", "bfloat16"]
    assert main(args) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "np.load works" not in out
    assert "view(ml_dtypes.bfloat16)" in out
    path = Path(out.split("features: ")[1].split(" ")[0])
    bits = np.load(path / "features.npy")
    assert bits.dtype == np.uint16 and bits.view(ml_dtypes.bfloat16).dtype.name == "bfloat16"
