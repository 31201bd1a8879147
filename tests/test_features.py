"""Extraction and the feature cache: reuse, skips, damage, resume after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_OPENCLIP, TINY_OPENCLIP_CONFIG, ArrayDataset, random_images
from oodprobe.encoders import ImageEncoder, create_encoder
from oodprobe.errors import DataError, InvalidParameterError
from oodprobe.features import extract_features, load_features, resolve_precision, select_device


@pytest.fixture(scope="module")
def encoder(tiny_openclip: str) -> ImageEncoder:
    return create_encoder(tiny_openclip)


def _count_forwards(encoder: ImageEncoder) -> list[int]:
    calls: list[int] = []
    encoder.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    return calls


def _direct_features(encoder: ImageEncoder, dataset: ArrayDataset) -> np.ndarray:
    pixels = torch.stack([encoder.pixel_transform(dataset.load(i)) for i in range(len(dataset))])
    with torch.inference_mode():
        return encoder.encode_images(pixels).numpy()


def test_second_run_reads_the_cache_without_a_forward_pass(
    array_dataset: ArrayDataset, cache_root: Path, tiny_openclip: str
) -> None:
    encoder = create_encoder(tiny_openclip)
    calls = _count_forwards(encoder)
    first = extract_features(
        array_dataset, encoder, cache_root=cache_root, batch_size=16, num_workers=1, progress=False
    )
    assert sum(calls) == 40 and not first.from_cache
    assert first.features.shape == (40, 64) and first.features.dtype == np.float32
    np.testing.assert_allclose(
        first.features, _direct_features(encoder, array_dataset), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(first.labels, np.arange(40) % 4)
    calls.clear()
    second = extract_features(array_dataset, encoder, cache_root=cache_root, progress=False)
    assert calls == [] and second.from_cache and second.stats["images_encoded"] == 0
    np.testing.assert_array_equal(second.features, first.features)
    assert second.path == first.path
    on_disk = load_features(first.path)  # plain arrays for users
    np.testing.assert_array_equal(np.load(first.path / "features.npy"), first.features)
    np.testing.assert_array_equal(on_disk["indices"], np.arange(40))


def test_undecodable_images_are_skipped_and_listed(cache_root: Path, encoder: ImageEncoder) -> None:
    dataset = ArrayDataset(random_images(20), np.arange(20) % 2, broken=frozenset({3, 17}))
    result = extract_features(
        dataset,
        encoder,
        cache_root=cache_root,
        batch_size=8,
        shard_size=8,
        num_workers=0,
        progress=False,
    )
    assert [(s.index, s.source, s.reason) for s in result.skipped] == [
        (3, "arrays[3]", "image file is truncated"),
        (17, "arrays[17]", "image file is truncated"),
    ]
    expected_rows = [i for i in range(20) if i not in (3, 17)]
    np.testing.assert_array_equal(result.indices, expected_rows)
    np.testing.assert_array_equal(result.labels, np.array(expected_rows) % 2)
    assert len(result) == 18
    again = extract_features(dataset, encoder, cache_root=cache_root, progress=False, shard_size=8)
    assert again.from_cache and again.skipped == result.skipped


def test_on_error_raise_names_the_image(cache_root: Path, encoder: ImageEncoder) -> None:
    dataset = ArrayDataset(random_images(10), broken=frozenset({6}))
    with pytest.raises(DataError, match=r"^cannot decode arrays\[6\]: image file is truncated$"):
        extract_features(
            dataset, encoder, cache_root=cache_root, on_error="raise", num_workers=0, progress=False
        )


def test_a_damaged_cache_entry_is_detected_and_rebuilt(
    array_dataset: ArrayDataset, cache_root: Path, encoder: ImageEncoder
) -> None:
    original = extract_features(array_dataset, encoder, cache_root=cache_root, progress=False)
    reference = original.features.copy()
    target = original.path / "features.npy"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the last feature
    target.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"features.npy failed its checksum\); rebuilding it"):
        rebuilt = extract_features(array_dataset, encoder, cache_root=cache_root, progress=False)
    assert not rebuilt.from_cache
    np.testing.assert_array_equal(rebuilt.features, reference)
    (original.path / "meta.json").write_text("{not json")
    with pytest.warns(UserWarning, match=r"meta.json is unreadable"):
        again = extract_features(array_dataset, encoder, cache_root=cache_root, progress=False)
    np.testing.assert_array_equal(again.features, reference)
    (original.path / "logits.npy").unlink(missing_ok=True)
    (original.path / "features.npy").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"missing or has the wrong size"):
        extract_features(array_dataset, encoder, cache_root=cache_root, progress=False)


def test_damaged_shards_are_recomputed_on_resume(cache_root: Path, encoder: ImageEncoder) -> None:
    from oodprobe import cache

    dataset = ArrayDataset(random_images(32))
    full = extract_features(dataset, encoder, use_cache=False, shard_size=8, progress=False)
    directory = cache.entry_dir(cache_root, full.key)
    # Leave shards 0 and 1 as a killed run would, then damage shard 1.
    for shard in (0, 1):
        rows = slice(shard * 8, shard * 8 + 8)
        cache.write_shard(
            directory,
            shard,
            {"features": full.features[rows], "indices": full.indices[rows]},
            {"key": full.key, "skipped": []},
        )
    path = cache.shard_path(directory, 1)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.warns(UserWarning, match=r"shard-00001.safetensors is unreadable"):
        resumed = extract_features(
            dataset, encoder, cache_root=cache_root, shard_size=8, progress=False
        )
    assert resumed.stats["images_encoded"] == 24  # shard 0 reused; 1, 2, 3 encoded
    np.testing.assert_array_equal(resumed.features, full.features)
    assert not list(directory.glob("shard-*"))  # shards are joined into .npy files at the end


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import open_clip
    open_clip.factory._MODEL_CONFIGS[{arch!r}] = {config!r}
    from conftest import ArrayDataset, random_images
    from oodprobe.features import extract_features

    class SlowDataset(ArrayDataset):
        def load(self, index):
            time.sleep(0.01)
            return super().load(index)

    dataset = SlowDataset(random_images(400))
    extract_features(dataset, "openclip:{arch}/random", cache_root={root!r}, shard_size=16,
                     batch_size=8, num_workers=1, progress=False)
    """
)


def test_a_run_killed_with_sigkill_resumes_and_equals_an_uninterrupted_run(
    cache_root: Path, tmp_path: Path, encoder: ImageEncoder
) -> None:
    script = KILL_SCRIPT.format(
        tests=str(Path(__file__).parent),
        arch=TINY_OPENCLIP,
        config=TINY_OPENCLIP_CONFIG,
        root=str(cache_root),
    )
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(cache_root.rglob("shard-*.safetensors"))) < 3:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(list(cache_root.rglob("shard-*.safetensors")))
    assert 3 <= done_before < 25
    assert not list(cache_root.rglob("meta.json"))
    dataset = ArrayDataset(random_images(400))
    resumed = extract_features(
        dataset,
        encoder,
        cache_root=cache_root,
        shard_size=16,
        batch_size=8,
        num_workers=1,
        progress=False,
    )
    assert resumed.stats["images_encoded"] <= 400 - 16 * done_before
    uninterrupted = extract_features(
        dataset,
        encoder,
        cache_root=tmp_path / "other",
        shard_size=16,
        batch_size=8,
        num_workers=1,
        progress=False,
    )
    np.testing.assert_array_equal(resumed.features, uninterrupted.features)
    np.testing.assert_array_equal(resumed.indices, uninterrupted.indices)


def test_cache_key_names_data_encoder_and_precision(
    cache_root: Path, encoder: ImageEncoder
) -> None:
    images = random_images(8)
    base = extract_features(ArrayDataset(images), encoder, cache_root=cache_root, progress=False)
    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1
    assert (
        extract_features(ArrayDataset(changed), encoder, cache_root=cache_root, progress=False).key
        != base.key
    )
    bf16 = extract_features(
        ArrayDataset(images), encoder, cache_root=cache_root, precision="bf16", progress=False
    )
    assert bf16.key != base.key
    other = create_encoder("timm:resnet18/random")
    assert other.cache_id != encoder.cache_id


def test_no_cache_keeps_arrays_in_memory_only(cache_root: Path, encoder: ImageEncoder) -> None:
    result = extract_features(
        ArrayDataset(random_images(6)),
        encoder,
        use_cache=False,
        cache_root=cache_root,
        progress=False,
    )
    assert result.path is None and result.features.shape == (6, 64)
    assert not cache_root.exists()


def test_bad_arguments_are_one_line_errors(encoder: ImageEncoder) -> None:
    with pytest.raises(DataError, match=r"dataset 'empty' has no images"):
        extract_features(ArrayDataset(random_images(0), name="empty"), encoder)
    dataset = ArrayDataset(random_images(2))
    with pytest.raises(InvalidParameterError, match=r"batch_size must be >= 1, got 0"):
        extract_features(dataset, encoder, batch_size=0)
    with pytest.raises(InvalidParameterError, match=r"on_error must be 'skip' or 'raise'"):
        extract_features(dataset, encoder, on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match=r"precision fp16 needs a GPU"):
        extract_features(dataset, encoder, precision="fp16", device="cpu")
    with pytest.raises(InvalidParameterError, match=r"precision must be one of"):
        extract_features(dataset, encoder, precision="fp8")  # type: ignore[arg-type]


def test_efficientnet_features_of_digits_separate_classes(cache_root: Path) -> None:
    """Real pretrained features: nearest-centroid accuracy far above chance on 4 digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.isin(digits.target, [0, 1, 2, 3])
    images = (digits.images[keep][:120] * 16).clip(0, 255).astype(np.uint8)
    labels = digits.target[keep][:120]
    rgb = np.repeat(images[..., None], 3, axis=-1)
    result = extract_features(
        ArrayDataset(rgb, labels), "efficientnet-lite0@112", cache_root=cache_root, progress=False
    )
    features = result.features / np.linalg.norm(result.features, axis=1, keepdims=True)
    train, test = slice(0, 80), slice(80, 120)
    centroids = np.stack([features[train][labels[train] == c].mean(0) for c in range(4)])
    accuracy = np.mean((features[test] @ centroids.T).argmax(1) == labels[test])
    assert accuracy > 0.8


# -- devices and precisions are checked in one line, before any work ----------------------------


def _no_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        (
            "cuda",
            "device 'cuda' was requested but no CUDA GPU is available; use --device auto or cpu",
        ),
        (
            "cuda:1",
            "device 'cuda:1' was requested but no CUDA GPU is available; use --device auto or cpu",
        ),
        (
            "mps",
            "device 'mps' was requested but MPS (Apple GPU) is not available; use --device auto "
            "or cpu",
        ),
        ("gpu", "unknown device 'gpu'; choose from: auto, cpu, cuda, cuda:N, mps"),
        ("", "unknown device ''; choose from: auto, cpu, cuda, cuda:N, mps"),
        ("cuda:x", "unknown device 'cuda:x'; choose from: auto, cpu, cuda, cuda:N, mps"),
        ("meta", "device 'meta' is not supported; choose from: auto, cpu, cuda, cuda:N, mps"),
        (3, "device must be one of auto, cpu, cuda, cuda:N, mps, got 3"),
    ],
)
def test_select_device_refuses_what_the_machine_lacks(
    device: object, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: 'cuda' without a GPU returned a device, and failed with a traceback later."""
    _no_accelerators(monkeypatch)
    with pytest.raises(InvalidParameterError) as caught:
        select_device(device)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_select_device_counts_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert select_device("cuda:1") == torch.device("cuda:1")
    assert select_device("auto") == torch.device("cuda")
    with pytest.raises(InvalidParameterError) as caught:
        select_device("cuda:2")
    assert str(caught.value) == (
        "device 'cuda:2' was requested but this machine has 2 CUDA GPU(s) (cuda:0 to cuda:1); "
        "use --device auto, cuda or cpu"
    )


def test_select_device_auto_and_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_accelerators(monkeypatch)
    assert select_device() == torch.device("cpu")
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(torch.device("cpu")) == torch.device("cpu")


def test_extraction_checks_the_device_before_building_the_encoder(
    monkeypatch: pytest.MonkeyPatch, cache_root: Path
) -> None:
    _no_accelerators(monkeypatch)
    with pytest.raises(InvalidParameterError, match=r"^device 'cuda' was requested"):
        extract_features(
            ArrayDataset(random_images(2)), "no-such-encoder", device="cuda", cache_root=cache_root
        )
    assert not cache_root.exists()


@pytest.mark.parametrize("precision", ["fp8", "FP16", "", None, 16])
def test_resolve_precision_lists_its_choices(precision: object) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        resolve_precision(precision, torch.device("cpu"))  # type: ignore[arg-type]
    assert str(caught.value) == (
        f"precision must be one of auto, fp32, fp16, bf16, got {precision!r}"
    )


def test_resolve_precision_choices() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [resolve_precision(p, cpu) for p in ("auto", "fp32", "bf16")] == ["fp32", "fp32", "bf16"]
    assert [resolve_precision(p, cuda) for p in ("auto", "fp16", "bf16")] == [
        "fp16",
        "fp16",
        "bf16",
    ]
    with pytest.raises(InvalidParameterError) as caught:
        resolve_precision("fp16", cpu)
    assert str(caught.value) == "precision fp16 needs a GPU; use fp32 or bf16 on the cpu"
