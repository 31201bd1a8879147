"""--engine ray: a local Ray (2 CPUs) extracts what the local engine does, into the same cache."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from oodprobe import cache
from oodprobe.cli import main
from oodprobe.data import create_dataset
from oodprobe.errors import DataError, InvalidParameterError
from oodprobe.features import ENGINES, STORE_DTYPES, extract_features

pytest.importorskip(
    "ray.data", reason="the ray extra is not installed (pip install 'oodprobe[ray]')"
)

LITE = "efficientnet-lite0@112"


def test_without_ray_the_engine_says_how_to_install_it_before_any_work(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `import ray` now raises ImportError (before any Ray runs in this process: tests in order)
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.data", None)

    class Untouchable:
        name = "untouchable"

        def __len__(self) -> int:
            raise AssertionError("the dataset was used before the engine was checked")

    with pytest.raises(InvalidParameterError, match=r"pip install 'oodprobe\[ray\]'"):
        extract_features(Untouchable(), LITE, engine="ray")  # type: ignore[arg-type]
    assert main(["extract", "digits:test", "--engine", "ray"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("error: engine 'ray' needs Ray Data, which is not installed")
    assert "pip install 'oodprobe[ray]'" in lines[0]


def test_engine_options_are_checked() -> None:
    dataset = create_dataset("digits:test", limit=4)
    with pytest.raises(
        InvalidParameterError, match=r"^engine must be one of local, ray, got 'spark'$"
    ):
        extract_features(dataset, LITE, engine="spark")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match=r"ray_address must be a Ray address"):
        extract_features(dataset, LITE, engine="ray", ray_address="")
    with pytest.raises(InvalidParameterError, match=r"one of auto, cpu, cuda .* got 'cuda:1'"):
        extract_features(dataset, LITE, engine="ray", device="cuda:1")


def test_an_address_nothing_answers_at_is_a_fast_one_line_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """ray.init waits minutes (then retries on) for a GCS that is not there; we must not."""
    import socket
    import time

    import ray

    with socket.socket() as probe:  # a port nothing listens on: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dataset = create_dataset("digits:test", limit=4)
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", "nowhere.invalid:6379"):
        started = time.perf_counter()
        with pytest.raises(InvalidParameterError, match=r"^cannot connect to the Ray cluster"):
            extract_features(dataset, LITE, engine="ray", ray_address=address)
        assert time.perf_counter() - started < 15, address
        assert not ray.is_initialized()
    assert main(["extract", "digits:test", "--engine", "ray", "--ray-address", address]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "'nowhere.invalid:6379'" in lines[0], lines


@pytest.mark.parametrize(
    ("resources", "device", "expected"),
    [
        ({"CPU": 2.0}, "cpu", (1, 1)),  # the test machine: one actor, one decoding CPU
        ({"CPU": 16.0}, "cpu", (3, 4)),
        ({"CPU": 1.0}, "cpu", (1, 0)),  # a 1-CPU actor would leave decoding no CPU: a hang
        ({"CPU": 8.0, "GPU": 2.0}, "cuda", (2, 1)),
        ({"CPU": 4.0, "GPU": 4.0}, "cuda", (4, 0)),  # 4 one-CPU actors: no CPU left to decode
    ],
)
def test_the_encoder_actors_leave_a_cpu_to_decode_on(
    monkeypatch: pytest.MonkeyPatch,
    resources: dict[str, float],
    device: str,
    expected: tuple[int, int],
) -> None:
    """Decoding tasks take one CPU each: actors holding every CPU would starve them forever."""
    import ray

    from oodprobe.ray_engine import _actor_pool

    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    n_actors, options = _actor_pool(device)
    assert (n_actors, options["num_cpus"]) == expected
    assert options.get("num_gpus", 0) == (1 if device == "cuda" else 0)
    assert resources["CPU"] - n_actors * options["num_cpus"] >= 1


def test_cli_choices_are_the_library_s(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from oodprobe import cli

    assert cli.ENGINES == ENGINES and cli.STORE_DTYPES == STORE_DTYPES
    monkeypatch.setenv("COLUMNS", "200")
    for command in ("extract", "bench", "study"):
        assert main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "local|ray" in text and "float32|float16|bfloat16" in text, command
        assert "--ray-address" in text and "RAY_ADDRESS" in text, command


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray with 2 CPUs (what the library starts when none runs), shut down after."""
    import ray

    from oodprobe.ray_engine import init_ray

    started = not ray.is_initialized()
    init_ray(None, num_cpus=2)
    yield
    if started:
        ray.shutdown()


def test_ray_features_equal_the_local_engine_and_the_local_engine_reads_them(
    local_ray: None, tmp_path: Path
) -> None:
    """Real pretrained features of a built-in dataset: same rows, same values, one cache."""
    import ray

    dataset = create_dataset("digits:test", limit=200)  # scikit-learn's 8x8 digits, 10 classes
    root = tmp_path / "cache"
    options: dict[str, Any] = {"batch_size": 32, "shard_size": 64, "progress": False}
    distributed = extract_features(dataset, LITE, cache_root=root, engine="ray", **options)
    single = extract_features(dataset, LITE, use_cache=False, num_workers=0, **options)
    assert not distributed.from_cache and distributed.stats["images_encoded"] == 200
    np.testing.assert_array_equal(distributed.indices, np.arange(200))
    np.testing.assert_array_equal(distributed.labels, single.labels)
    for name in ("features", "logits"):
        assert distributed.arrays[name].dtype == np.float32
        np.testing.assert_allclose(
            distributed.arrays[name], single.arrays[name], rtol=1e-5, atol=1e-5
        )
    assert json.loads((distributed.path / "meta.json").read_text())["engine"] == "ray"
    # the normal path is served from the entry Ray wrote
    again = extract_features(dataset, LITE, cache_root=root, **options)
    assert again.from_cache and again.stats["images_encoded"] == 0
    assert again.path == distributed.path and again.key == single.key
    np.testing.assert_array_equal(again.features, distributed.features)
    assert ray.is_initialized()  # the Ray it found running is left running


def _image_folder(root: Path, n_images: int, broken: dict[int, bytes]) -> Path:
    """``img-00.png`` … of random pixels; the indices in ``broken`` get those bytes instead."""
    folder = root / "images"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (n_images, 20, 20, 3), dtype=np.uint8)
    for index in range(n_images):
        path = folder / f"img-{index:02d}.png"
        if index in broken:
            path.write_bytes(broken[index])
        else:
            Image.fromarray(pixels[index]).save(path)
    return folder


def _png_bytes() -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow  # three Ray pipelines (~35 s on 2 busy cores); the test above is the default's
def test_ray_skips_and_raises_as_the_local_engine_and_resumes_its_shards(
    local_ray: None, tmp_path: Path, tiny_openclip: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Skip records, on_error="raise" and resume are the local engine's.

    The tiny open_clip architecture is registered in this process only, so the actors cannot
    rebuild it by name: they use the module shipped through the object store. Shard 2 (images
    4, 5) has no decodable image at all.
    """
    broken = {4: _png_bytes()[:200], 5: b"not an image", 9: b""}
    folder = _image_folder(tmp_path, 12, broken)
    dataset = create_dataset(str(folder))
    options: dict[str, Any] = {"batch_size": 3, "shard_size": 2, "progress": False}
    local = extract_features(dataset, tiny_openclip, use_cache=False, num_workers=0, **options)
    distributed = extract_features(
        dataset, tiny_openclip, cache_root=tmp_path / "a", engine="ray", **options
    )
    assert [(s.index, s.reason) for s in local.skipped] == [
        (4, "image file is truncated"),
        (5, "not an image file"),
        (9, "empty file"),
    ]
    assert distributed.skipped == local.skipped
    np.testing.assert_array_equal(distributed.indices, [0, 1, 2, 3, 6, 7, 8, 10, 11])
    np.testing.assert_allclose(distributed.features, local.features, rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError) as from_local:
        extract_features(
            dataset, tiny_openclip, use_cache=False, on_error="raise", num_workers=0, **options
        )
    with pytest.raises(DataError) as from_ray:
        extract_features(
            dataset,
            tiny_openclip,
            cache_root=tmp_path / "b",
            on_error="raise",
            engine="ray",
            **options,
        )
    assert str(from_ray.value) == str(from_local.value)
    assert "img-04.png" in str(from_ray.value)
    # the shards before the failing image were written, as the local engine writes them
    assert sorted(p.name for p in (tmp_path / "b").rglob("shard-*")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]

    # a local run killed after three shards is completed by Ray, and the other way round
    write_shard, written = cache.write_shard, []

    def stop_after_three(directory: Path, shard: int, *args: Any) -> None:
        if len(written) == 3:
            raise KeyboardInterrupt
        write_shard(directory, shard, *args)
        written.append(shard)

    monkeypatch.setattr(cache, "write_shard", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        extract_features(dataset, tiny_openclip, cache_root=tmp_path / "c", **options)
    monkeypatch.setattr(cache, "write_shard", write_shard)
    resumed = extract_features(
        dataset, tiny_openclip, cache_root=tmp_path / "c", engine="ray", **options
    )
    assert resumed.stats["images_encoded"] == 9 - 4  # images 0-3 were in shards 0 and 1
    assert resumed.skipped == local.skipped
    np.testing.assert_allclose(resumed.features, local.features, rtol=1e-5, atol=1e-6)


def test_a_running_ray_is_used_as_it_is(local_ray: None) -> None:
    import ray

    from oodprobe.ray_engine import init_ray

    resources = ray.cluster_resources()
    init_ray("ray://nowhere.invalid:10001")  # already initialised: no connection is tried
    assert ray.is_initialized() and ray.cluster_resources()["CPU"] == resources["CPU"] == 2


def test_an_image_only_a_worker_cannot_find_stops_the_run(tmp_path: Path) -> None:
    """A node without the images must not file them as "file not found" skip records.

    They would be cached as undecodable: features silently missing, for every later run of
    either engine. An image that is missing here too stays a skip record, as locally.
    """
    from oodprobe.ray_engine import _raise_if_only_workers_miss

    folder = _image_folder(tmp_path, 3, {})
    dataset = create_dataset(str(folder))
    transform = lambda image: np.zeros(3)  # noqa: E731
    worker_says = [(1, ("file not found", f"cannot decode {folder}/img-01.png: file not found"))]
    with pytest.raises(
        DataError, match=r"img-01\.png .*missing on a Ray worker.*shared filesystem"
    ):
        _raise_if_only_workers_miss(dataset, transform, worker_says)
    (folder / "img-01.png").unlink()  # gone for the driver too: a skip record, as locally
    _raise_if_only_workers_miss(dataset, transform, worker_says)
    _raise_if_only_workers_miss(dataset, transform, [(0, ("empty file", "cannot decode: empty"))])
