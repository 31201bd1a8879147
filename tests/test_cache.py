"""The feature cache under damage of every shape, resume cost, skip records warm and cold,
and what extraction leaves of the caller's encoder."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ArrayDataset, random_images
from oodprobe import cache
from oodprobe.data import ImageFolderDataset, SkippedImage
from oodprobe.encoders import ImageEncoder
from oodprobe.errors import DataError
from oodprobe.features import FeatureSet, extract_features


class ToPixels:
    """PIL image → (3, 8, 8) float tensor in [0, 1] (picklable, with a stable repr)."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image.resize((8, 8)), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1)

    def __repr__(self) -> str:
        return "ToPixels(8)"


class ConvEncoder(ImageEncoder):
    """A tiny convolutional encoder with dropout (so eval and train mode differ) and logits."""

    outputs = ("features", "logits")

    def __init__(self) -> None:
        super().__init__([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(6, 3)
        self.name = "conv-test"
        self.feature_dim = 6
        self.identity = {"test": "conv-encoder"}
        self.pixel_transform = ToPixels()

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.drop(self.conv(self.normalize(pixels)).mean((2, 3)))
        return {"features": features, "logits": self.head(features)}


@pytest.fixture
def encoder() -> ConvEncoder:
    return ConvEncoder()


def _extract(dataset: Any, encoder: ImageEncoder, root: Path, **options: Any) -> FeatureSet:
    options = {"num_workers": 0, "progress": False, "batch_size": 4, **options}
    return extract_features(dataset, encoder, cache_root=root, **options)


def _direct(encoder: ImageEncoder, dataset: ArrayDataset, rows: list[int]) -> np.ndarray:
    pixels = torch.stack([encoder.pixel_transform(dataset.load(i)) for i in rows])
    encoder.eval()
    with torch.inference_mode():
        return encoder(pixels)["features"].numpy()


# -- a damaged complete entry of any shape is rebuilt ------------------------------------------


def _edit_meta(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def damage(entry: Path) -> None:
        meta = json.loads((entry / "meta.json").read_text())
        (entry / "meta.json").write_text(json.dumps(edit(meta)))

    return damage


def _replace_array(name: str, array: np.ndarray) -> Callable[[Path], None]:
    """A well-formed .npy of other contents, with meta.json's size and checksum updated."""

    def damage(entry: Path) -> None:
        np.save(entry / f"{name}.npy", array)
        meta = json.loads((entry / "meta.json").read_text())
        meta["files"][name]["bytes"] = (entry / f"{name}.npy").stat().st_size
        meta["files"][name]["sha256"] = cache.file_sha256(entry / f"{name}.npy")
        (entry / "meta.json").write_text(json.dumps(meta))

    return damage


def _truncate(name: str) -> Callable[[Path], None]:
    def damage(entry: Path) -> None:
        path = entry / name
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])

    return damage


def _meta_dir(entry: Path) -> None:
    (entry / "meta.json").unlink()
    (entry / "meta.json").mkdir()


def _drop(meta: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k != key}


def _files(meta: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**meta, "files": {**meta["files"], **changes}}


DAMAGE = {
    # meta.json: valid JSON of the wrong structure (before: AttributeError/KeyError tracebacks)
    "meta is a list": _edit_meta(lambda meta: []),
    "meta is a number": _edit_meta(lambda meta: 3),
    "meta is empty": _edit_meta(lambda meta: {}),
    "files is a list": _edit_meta(lambda meta: {**meta, "files": []}),
    "files lacks indices": _edit_meta(
        lambda meta: {**meta, "files": _drop(meta["files"], "indices")}
    ),
    "file entry is a string": _edit_meta(lambda meta: _files(meta, features="x")),
    "file shape is a string": _edit_meta(
        lambda meta: _files(meta, features={**meta["files"]["features"], "shape": "x"})
    ),
    "file bytes missing": _edit_meta(
        lambda meta: _files(meta, features=_drop(meta["files"]["features"], "bytes"))
    ),
    "n_rows is a string": _edit_meta(lambda meta: {**meta, "n_rows": "8"}),
    "skipped missing": _edit_meta(lambda meta: _drop(meta, "skipped")),
    "skipped is a string": _edit_meta(lambda meta: {**meta, "skipped": "none"}),
    "skip record malformed": _edit_meta(lambda meta: {**meta, "skipped": [["3", 4]]}),
    "format missing": _edit_meta(lambda meta: _drop(meta, "format")),
    "other key": _edit_meta(lambda meta: {**meta, "key": "0" * 64}),
    "meta is a folder": _meta_dir,
    "meta is not json": lambda entry: (entry / "meta.json").write_text("{not json"),
    # array files
    "features truncated": _truncate("features.npy"),
    "indices truncated": _truncate("indices.npy"),
    "logits missing": lambda entry: (entry / "logits.npy").unlink(),
    "features of the wrong shape": _replace_array("features", np.zeros((8, 5), np.float32)),
    "features of the wrong dtype": _replace_array("features", np.zeros((8, 6), np.float64)),
    "indices out of range": _replace_array("indices", np.arange(8, dtype=np.int64) + 5),
    "indices repeated": _replace_array("indices", np.zeros(8, dtype=np.int64)),
    "features are a pickle": _replace_array("features", np.array([{"a": 1}] * 8, dtype=object)),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_any_damage_to_an_entry_is_one_warning_and_a_rebuild(
    damage: Callable[[Path], None], encoder: ConvEncoder, cache_root: Path
) -> None:
    dataset = ArrayDataset(random_images(8))
    original = _extract(dataset, encoder, cache_root)
    assert original.path is not None
    reference = original.features.copy()
    damage(original.path)
    with pytest.warns(UserWarning) as caught:
        rebuilt = _extract(dataset, encoder, cache_root)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert messages[0].startswith("feature cache entry is damaged (")
    assert messages[0].endswith("); rebuilding it")
    assert not rebuilt.from_cache and rebuilt.stats["images_encoded"] == 8
    np.testing.assert_array_equal(rebuilt.features, reference)
    again = _extract(dataset, encoder, cache_root)  # and the rebuilt entry is good
    assert again.from_cache


# -- damaged shards of a resumed run are recomputed, each shard validated once -----------------


def _write_shards(
    directory: Path,
    full: FeatureSet,
    shards: list[int],
    size: int,
    key: str | None = None,
    skipped: dict[int, list[list[Any]]] | None = None,
) -> None:
    for shard in shards:
        keep = (full.indices >= shard * size) & (full.indices < (shard + 1) * size)
        arrays = {name: array[keep] for name, array in full.arrays.items()}
        arrays["indices"] = full.indices[keep]
        extra = {"key": key or full.key, "skipped": (skipped or {}).get(shard, [])}
        cache.write_shard(directory, shard, arrays, extra)


def _rewrite(directory: Path, shard: int, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    arrays, extra = cache.read_shard(directory, shard)
    change(arrays)
    cache.write_shard(directory, shard, arrays, extra)


SHARD_DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated": lambda d: cache.shard_path(d, 1).write_bytes(
        cache.shard_path(d, 1).read_bytes()[:-9]
    ),
    "features 1-d": lambda d: _rewrite(d, 1, lambda a: a.update(features=a["features"][:, 0])),
    "features float64": lambda d: _rewrite(
        d, 1, lambda a: a.update(features=a["features"].astype(np.float64))
    ),
    "features of other width": lambda d: _rewrite(
        d, 1, lambda a: a.update(features=a["features"][:, :4].copy())
    ),
    "no logits": lambda d: _rewrite(d, 1, lambda a: a.pop("logits")),
    "indices of another shard": lambda d: _rewrite(
        d, 1, lambda a: a.update(indices=a["indices"] + 4)
    ),
    "rows missing": lambda d: _rewrite(
        d, 1, lambda a: a.update({k: v[:2].copy() for k, v in a.items()})
    ),
    "extra not a dict": lambda d: cache.write_shard(
        d,
        1,
        cache.read_shard(d, 1)[0],
        ["not", "a", "dict"],  # type: ignore[arg-type]
    ),
}


@pytest.mark.parametrize("damage", SHARD_DAMAGE.values(), ids=SHARD_DAMAGE.keys())
def test_a_damaged_shard_of_any_shape_is_recomputed_alone(
    damage: Callable[[Path], None], encoder: ConvEncoder, cache_root: Path
) -> None:
    dataset = ArrayDataset(random_images(16))
    full = _extract(dataset, encoder, cache_root, use_cache=False, shard_size=4)
    directory = cache.entry_dir(cache_root, full.key)
    _write_shards(directory, full, [0, 1, 2], 4)
    damage(directory)
    with pytest.warns(UserWarning, match=r"shard .*; recomputing that shard$"):
        resumed = _extract(dataset, encoder, cache_root, shard_size=4)
    assert resumed.stats["images_encoded"] == 8  # shards 1 and 3
    np.testing.assert_array_equal(resumed.features, full.features)
    np.testing.assert_array_equal(resumed.logits, full.logits)


def test_a_shard_of_another_key_is_not_reused(encoder: ConvEncoder, cache_root: Path) -> None:
    dataset = ArrayDataset(random_images(8))
    full = _extract(dataset, encoder, cache_root, use_cache=False, shard_size=4)
    directory = cache.entry_dir(cache_root, full.key)
    _write_shards(directory, full, [0], 4, key="f" * 64)
    with pytest.warns(UserWarning, match=r"shard 0 belongs to another cache key"):
        resumed = _extract(dataset, encoder, cache_root, shard_size=4)
    assert resumed.stats["images_encoded"] == 8


def test_resume_reads_each_shard_a_fixed_number_of_times(
    encoder: ConvEncoder, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: every shard on disk was re-validated once per missing shard (quadratic)."""
    dataset = ArrayDataset(random_images(64))
    full = _extract(dataset, encoder, cache_root, use_cache=False, shard_size=2)
    directory = cache.entry_dir(cache_root, full.key)
    _write_shards(directory, full, list(range(0, 32, 2)), 2)  # 16 of 32 shards on disk
    reads: list[int] = []
    original = cache.read_shard

    def counting(directory: Path, shard: int) -> Any:
        reads.append(shard)
        return original(directory, shard)

    monkeypatch.setattr(cache, "read_shard", counting)
    resumed = _extract(dataset, encoder, cache_root, shard_size=2)
    assert resumed.stats["images_encoded"] == 32
    # 16 validations of the shards found, then one verified read of each of the 32 to join
    assert sorted(reads) == sorted(list(range(0, 32, 2)) + list(range(32)))
    np.testing.assert_array_equal(resumed.features, full.features)


# -- skip records travel with the cache ---------------------------------------------------------


def test_skip_records_and_on_error_raise_are_the_same_warm_or_cold(
    encoder: ConvEncoder, cache_root: Path, tmp_path: Path
) -> None:
    """Before: with features from the cache, on_error='raise' returned them without a word."""
    dataset = ArrayDataset(random_images(12), np.arange(12) % 3, broken=frozenset({5, 9}))
    with pytest.raises(DataError) as cold:
        _extract(dataset, encoder, tmp_path / "fresh", on_error="raise", shard_size=4)
    first = _extract(dataset, encoder, cache_root, shard_size=4)
    warm = _extract(dataset, encoder, cache_root, shard_size=4)
    expected = [
        SkippedImage(5, "arrays[5]", "image file is truncated"),
        SkippedImage(9, "arrays[9]", "image file is truncated"),
    ]
    assert first.skipped == warm.skipped == expected and warm.from_cache
    with pytest.raises(DataError) as from_cache:
        _extract(dataset, encoder, cache_root, on_error="raise", shard_size=4)
    assert (
        str(cold.value)
        == str(from_cache.value)
        == ("cannot decode arrays[5]: image file is truncated")
    )


def test_on_error_raise_on_resume_raises_a_failure_recorded_in_a_shard(
    encoder: ConvEncoder, cache_root: Path
) -> None:
    dataset = ArrayDataset(random_images(12), broken=frozenset({6}))
    full = _extract(dataset, encoder, cache_root, use_cache=False, shard_size=4)
    directory = cache.entry_dir(cache_root, full.key)
    record = [
        6,
        "arrays[6]",
        "image file is truncated",
        "cannot decode arrays[6]: image file is truncated",
    ]
    _write_shards(directory, full, [1], 4, skipped={1: [record]})  # a killed skip-mode run
    with pytest.raises(DataError) as caught:
        _extract(dataset, encoder, cache_root, on_error="raise", shard_size=4)
    assert str(caught.value) == "cannot decode arrays[6]: image file is truncated"
    assert cache.shard_path(directory, 0).exists()  # work done before the failure is kept


def test_scan_records_are_reported_first_and_the_same_warm(
    tmp_path: Path, encoder: ConvEncoder, cache_root: Path
) -> None:
    tmp_path = tmp_path / "images"  # beside the cache, not above it (a subfolder is listed)
    tmp_path.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / name)
    (tmp_path / "self").symlink_to(".")
    (tmp_path / "x.png").symlink_to("y.png")
    (tmp_path / "y.png").symlink_to("x.png")
    (tmp_path / "c.png").write_bytes(b"not a png")
    dataset = ImageFolderDataset(tmp_path)
    cold = _extract(dataset, encoder, cache_root)
    expected = [
        SkippedImage(-1, f"{tmp_path}/x.png", "symbolic link loop"),
        SkippedImage(-1, f"{tmp_path}/y.png", "symbolic link loop"),
        SkippedImage(2, f"{tmp_path}/c.png", "not an image file"),
    ]
    assert cold.skipped == expected and len(cold) == 2
    warm = _extract(ImageFolderDataset(tmp_path), encoder, cache_root)
    assert warm.from_cache and warm.skipped == expected
    with pytest.raises(DataError, match=r"^cannot decode .*/c.png: not an image file$"):
        _extract(dataset, encoder, cache_root, on_error="raise")  # scan records do not raise


# -- a class or a whole set that lost every image -----------------------------------------------


def test_a_class_that_lost_all_its_images_is_an_error_warm_or_cold(
    encoder: ConvEncoder, cache_root: Path
) -> None:
    """Before: class 1 vanished from the labels without a word."""
    labels = np.array([0, 0, 1, 1, 2, 2])
    dataset = ArrayDataset(random_images(6), labels, broken=frozenset({2, 3}), name="pets")
    message = (
        "class 'class 1' (label 1) of 'pets' lost all its 2 images: every one was skipped "
        "(e.g. pets[2]: image file is truncated); fix or replace those files, or leave the "
        "class out"
    )
    for _ in ("cold", "warm"):
        with pytest.raises(DataError) as caught:
            _extract(dataset, encoder, cache_root)
        assert str(caught.value) == message


def test_a_set_that_lost_all_its_images_is_an_error(encoder: ConvEncoder, cache_root: Path) -> None:
    dataset = ArrayDataset(random_images(3), broken=frozenset({0, 1, 2}), name="ood")
    with pytest.raises(DataError) as caught:
        _extract(dataset, encoder, cache_root)
    assert str(caught.value) == (
        "no image of 'ood' could be used: all 3 were skipped (e.g. ood[0]: image file is "
        "truncated); fix or replace those files"
    )


def test_selected_classes_only_are_checked(encoder: ConvEncoder, cache_root: Path) -> None:
    """Labels keep their original indices: a class not selected is not 'lost'."""
    labels = np.array([1, 1, 3, 3])
    result = _extract(
        ArrayDataset(random_images(4), labels, broken=frozenset({0})), encoder, cache_root
    )
    assert result.labels is not None and result.labels.tolist() == [1, 3, 3]


# -- the caller's encoder is left as it was found ------------------------------------------------


def _state(encoder: ImageEncoder) -> list[tuple[str, Any, Any, tuple[int, ...], int]]:
    return [
        (name, tensor.device, tensor.dtype, tensor.stride(), id(tensor))
        for name, tensor in [*encoder.named_parameters(), *encoder.named_buffers()]
    ]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_extraction_leaves_the_encoder_as_it_found_it(
    layout: str, encoder: ConvEncoder, cache_root: Path
) -> None:
    """Before: the encoder came back in eval... on the CPU, contiguous, whatever it was."""
    if layout == "channels_last":
        encoder.conv.weight.data = encoder.conv.weight.data.contiguous(
            memory_format=torch.channels_last
        )
    encoder.train()
    encoder.head.eval()  # a submodule frozen on purpose keeps its own mode
    parameters = {name: p for name, p in encoder.named_parameters()}
    before = [(n, d, t, s) for n, d, t, s, _ in _state(encoder)]
    dataset = ArrayDataset(random_images(6))
    result = _extract(dataset, encoder, cache_root)
    assert [(n, d, t, s) for n, d, t, s, _ in _state(encoder)] == before
    assert {name: p for name, p in encoder.named_parameters()} == parameters  # same objects
    assert encoder.training and encoder.drop.training and not encoder.head.training
    # features were computed in eval mode (dropout off): equal to an eval forward pass
    reference = _direct(ConvEncoder(), dataset, list(range(6)))
    np.testing.assert_allclose(result.features, reference, rtol=1e-5, atol=1e-6)


def test_the_encoder_is_restored_when_extraction_raises(
    encoder: ConvEncoder, cache_root: Path
) -> None:
    encoder.train()
    before = [(n, d, t, s) for n, d, t, s, _ in _state(encoder)]
    with pytest.raises(DataError):
        _extract(
            ArrayDataset(random_images(4), broken=frozenset({1})),
            encoder,
            cache_root,
            on_error="raise",
        )
    assert [(n, d, t, s) for n, d, t, s, _ in _state(encoder)] == before
    assert encoder.training


def test_odd_file_names_extract_end_to_end(
    tmp_path: Path, encoder: ConvEncoder, cache_root: Path
) -> None:
    """Before: a non-UTF-8 name crashed writers of describe() output (score CSVs, reports)."""
    names = [os.fsdecode(b"\xff\xfe.png"), "line\nbreak.png", "-n 'q' \".png", "ü 猫.png"]
    for number, name in enumerate(names):
        Image.new("RGB", (8, 8), (number * 40, 0, 0)).save(tmp_path / name)
    (tmp_path / os.fsdecode(b"bad\xe9.png")).write_bytes(b"junk")
    dataset = ImageFolderDataset(tmp_path)
    result = _extract(dataset, encoder, cache_root)
    assert len(result) == 4
    # sorted by name: "-n…" < "bad…" < "line…" < "ü…" < the undecodable bytes (surrogates)
    assert result.skipped == [SkippedImage(1, f"{tmp_path}/bad\\xe9.png", "not an image file")]
    described = [dataset.describe(int(i)) for i in result.indices]
    assert all(text.isprintable() for text in described)
    (tmp_path.parent / "scores.csv").write_text("\n".join(described), encoding="utf-8")
    json.dumps([vars(item) for item in result.skipped], ensure_ascii=False).encode("utf-8")


def test_an_entry_written_before_keys_and_messages_were_stored_is_still_read(
    encoder: ConvEncoder, cache_root: Path
) -> None:
    """No rebuild of existing caches: meta.json without 'key', skip records of 3 fields."""
    dataset = ArrayDataset(random_images(6), broken=frozenset({2}))
    first = _extract(dataset, encoder, cache_root)
    assert first.path is not None
    meta = json.loads((first.path / "meta.json").read_text())
    meta.pop("key")
    meta["skipped"] = [record[:3] for record in meta["skipped"]]
    (first.path / "meta.json").write_text(json.dumps(meta))
    warm = _extract(dataset, encoder, cache_root)
    assert warm.from_cache and warm.skipped == first.skipped
    with pytest.raises(DataError) as caught:
        _extract(dataset, encoder, cache_root, on_error="raise")
    assert str(caught.value) == "cannot decode arrays[2]: image file is truncated"
