"""Fine-tuning (oodprobe.finetune) and the ``finetuned:PATH`` encoder it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ArrayDataset, random_images
from oodprobe.data import create_dataset
from oodprobe.encoders import TextImageEncoder, create_encoder
from oodprobe.encoders.finetuned import FinetunedEncoder
from oodprobe.errors import (
    DataError,
    InvalidParameterError,
    MissingWeightsError,
    UnknownNameError,
)
from oodprobe.finetune import (
    CHECKPOINT_FILE,
    METADATA_FILE,
    WEIGHTS_FILE,
    FinetuneRecipe,
    finetune,
    image_tower,
)

LITE = "efficientnet-lite0@64"
SHORT = FinetuneRecipe(epochs=1, batch_size=8, ema_decay=0.0)


def _digits(n_classes: int = 4, per_class: int = 4) -> Any:
    return create_dataset("digits:train", classes=list(range(n_classes)), per_class=per_class)


def _run(name: str, dataset: Any, output: Path, **options: Any) -> Any:
    options.setdefault("recipe", SHORT)
    return finetune(name, dataset, output, num_workers=0, progress=False, **options)


@pytest.fixture(scope="module")
def lite_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EfficientNet-Lite0 at 64 px fine-tuned for 1 epoch on 16 digits (saved as trained)."""
    output = tmp_path_factory.mktemp("ft") / "lite"
    _run(LITE, _digits(), output)
    return output


def _changed(tensors: dict[str, torch.Tensor], tower: torch.nn.Module) -> tuple[int, int]:
    """(tower tensors that differ from ``tower``'s, tower tensors saved)."""
    base = tower.state_dict()
    saved = {k[len("tower.") :]: v for k, v in tensors.items() if k.startswith("tower.")}
    assert set(saved) == set(base)  # exactly the tower, nothing else (no text tower)
    return sum(not torch.equal(saved[k], base[k]) for k in saved), len(saved)


def test_one_epoch_of_lite0_trains_the_tower_and_writes_the_model(lite_model: Path) -> None:
    meta = json.loads((lite_model / METADATA_FILE).read_text())
    assert meta["base_encoder"] == LITE and meta["tower"] == "model"
    assert meta["n_classes"] == 4 and meta["classes"] == [0, 1, 2, 3]
    assert meta["class_names"] == ["zero", "one", "two", "three"]
    assert meta["ema"] is False and meta["weights_are"] == "trained"
    assert len(meta["history"]) == 1 and np.isfinite(meta["history"][0]["loss"])
    assert meta["history"][0]["images"] == 16
    assert not (lite_model / CHECKPOINT_FILE).exists()  # removed once the model is written
    tensors = load_file(str(lite_model / WEIGHTS_FILE))
    assert tensors["head.weight"].shape == (4, 1280)
    changed, total = _changed(tensors, create_encoder(LITE).model)
    assert changed > total // 2  # weights and BN statistics moved


def test_tiny_open_clip_trains_only_the_image_tower(tiny_openclip: str, tmp_path: Path) -> None:
    dataset = ArrayDataset(random_images(16, size=32), np.arange(16) % 2)
    recipe = FinetuneRecipe(epochs=1, batch_size=8, lr=1e-3)  # EMA on: the saved weights
    result = _run(tiny_openclip, dataset, tmp_path / "clip", recipe=recipe)
    assert result.ema and np.isfinite(result.history[0]["loss"])
    tensors = load_file(str(result.model_path))
    base = create_encoder(tiny_openclip)
    changed, _ = _changed(tensors, base.model.visual)
    assert changed > 0
    encoder = FinetunedEncoder(str(tmp_path / "clip"))
    assert not isinstance(encoder, TextImageEncoder) and encoder.base_name == tiny_openclip
    with torch.no_grad():
        outputs = encoder(torch.rand(3, 3, 32, 32))
    assert outputs["features"].shape == (3, base.feature_dim) and outputs["logits"].shape == (3, 2)


_KILL_SCRIPT = """
import os, signal, sys
from oodprobe.data import create_dataset
from oodprobe.finetune import FinetuneRecipe, finetune

def stop_mid_epoch_2(epoch, step):
    if epoch == 1 and step == 0:  # after the first step of epoch 2, before its checkpoint
        os.kill(os.getpid(), signal.SIGKILL)

def run(output, workers, callback=None):
    dataset = create_dataset("digits:train", classes=[0, 1, 2, 3], per_class=4)
    recipe = FinetuneRecipe(
        epochs=2, batch_size=6, warmup_epochs=0.5, mixup=0.8, cutmix=1.0, randaugment=True
    )
    result = finetune(
        "efficientnet-lite0@32", dataset, output, recipe=recipe, num_workers=workers,
        progress=False, callback=callback,
    )
    print("resumed from", result.resumed_from_epoch, flush=True)

if sys.argv[1] == "kill":  # an uninterrupted run without workers, then one killed mid-epoch 2
    run(sys.argv[2], 0)
    run(sys.argv[3], 1, stop_mid_epoch_2)
else:  # resume, with a worker
    run(sys.argv[2], 1)
"""


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    """SIGKILL mid-epoch 2, resume: bitwise the same EMA weights (mixup, cutmix, RandAugment,
    drop-connect all on), with and without data-loading workers."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_KILL_SCRIPT))
    # one thread: two OpenMP threads on 2 busy cores can run 100x slower (spinning barriers)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    killed = run("kill", str(tmp_path / "whole"), str(tmp_path / "killed"))
    assert killed.returncode == -9, killed.stderr
    assert killed.stdout == "resumed from 0\n"  # the first run finished, the second did not
    checkpoint = torch.load(tmp_path / "killed" / CHECKPOINT_FILE, weights_only=True)
    assert checkpoint["epoch"] == 1 and not (tmp_path / "killed" / WEIGHTS_FILE).exists()
    resumed = run("resume", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from 1" in resumed.stdout
    expected = load_file(str(tmp_path / "whole" / WEIGHTS_FILE))
    got = load_file(str(tmp_path / "killed" / WEIGHTS_FILE))
    assert set(got) == set(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    histories = [
        json.loads((tmp_path / folder / METADATA_FILE).read_text())["history"]
        for folder in ("whole", "killed")
    ]
    assert [e["loss"] for e in histories[0]] == [e["loss"] for e in histories[1]]


class _Interrupt(Exception):
    pass


def _interrupt_in_epoch_2(epoch: int, step: int) -> None:
    if epoch == 1:
        raise _Interrupt


def test_a_finished_model_is_kept_unless_forced(tiny_openclip: str, tmp_path: Path) -> None:
    dataset = ArrayDataset(random_images(8, size=32), np.arange(8) % 2)
    first = _run(tiny_openclip, dataset, tmp_path)
    with pytest.raises(InvalidParameterError, match=r"already holds a fine-tuned model .*--force"):
        _run(tiny_openclip, dataset, tmp_path)
    assert json.loads(first.metadata_path.read_text())["weights_sha256"]
    again = _run(
        tiny_openclip,
        dataset,
        tmp_path,
        force=True,
        recipe=FinetuneRecipe(epochs=2, batch_size=8, ema_decay=0.0),
    )
    assert again.epochs_done == 2 and len(again.history) == 2


def test_a_checkpoint_of_another_run_is_refused_unless_forced(
    tiny_openclip: str, tmp_path: Path
) -> None:
    dataset = ArrayDataset(random_images(8, size=32), np.arange(8) % 2)
    recipe = FinetuneRecipe(epochs=2, batch_size=4)
    with pytest.raises(_Interrupt):
        _run(tiny_openclip, dataset, tmp_path, recipe=recipe, callback=_interrupt_in_epoch_2)
    assert (tmp_path / CHECKPOINT_FILE).exists()
    other = FinetuneRecipe(epochs=2, batch_size=4, lr=1e-3)
    with pytest.raises(
        InvalidParameterError,
        match=r"checkpoint of a different fine-tuning run \(recipe\.lr 0\.00025 \(checkpoint\) "
        r"vs 0\.001 \(now\)\); pass --force",
    ):
        _run(tiny_openclip, dataset, tmp_path, recipe=other)
    other_data = ArrayDataset(random_images(8, size=32, seed=1), np.arange(8) % 2)
    with pytest.raises(InvalidParameterError, match=r"dataset_fingerprint"):
        _run(tiny_openclip, other_data, tmp_path, recipe=recipe)
    resumed = _run(tiny_openclip, dataset, tmp_path, recipe=recipe)  # the same run: resumed
    assert resumed.resumed_from_epoch == 1
    (tmp_path / METADATA_FILE).unlink()
    with pytest.raises(_Interrupt):
        _run(tiny_openclip, dataset, tmp_path, recipe=recipe, callback=_interrupt_in_epoch_2)
    restarted = _run(tiny_openclip, dataset, tmp_path, recipe=other, force=True)
    assert restarted.resumed_from_epoch == 0


def test_a_damaged_checkpoint_is_refused(tiny_openclip: str, tmp_path: Path) -> None:
    dataset = ArrayDataset(random_images(8, size=32), np.arange(8) % 2)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidParameterError, match=r"cannot be read as a fine-tuning checkpoint"):
        _run(tiny_openclip, dataset, tmp_path)
    assert _run(tiny_openclip, dataset, tmp_path, force=True).epochs_done == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": 0}, r"fine-tuning lr must be a number > 0, got 0; the paper uses 2.5e-4"),
        ({"epochs": 0}, r"epochs must be an integer >= 1, got 0"),
        ({"batch_size": 2.0}, r"batch_size must be an integer >= 1, got 2.0"),
        ({"warmup_epochs": 3, "epochs": 2}, r"warmup_epochs must be a number in \[0, epochs = 2\]"),
        ({"label_smoothing": 1.0}, r"label_smoothing must be a number in \[0, 1\)"),
        ({"ema_decay": 1.0}, r"ema_decay must be a number in \[0, 1\), got 1.0; 0 turns"),
        ({"mixup": 0.8, "batch_size": 7}, r"batch_size must be even when mixup or cutmix is on"),
        ({"randaugment": 1}, r"randaugment must be true or false, got 1"),
        ({"precision": "fp8"}, r"precision must be one of auto, fp32, fp16, bf16, got 'fp8'"),
        ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
        ({"weight_decay": float("nan")}, r"weight_decay must be a number >= 0, got nan"),
    ],
)
def test_recipe_values_are_checked_when_built(options: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidParameterError, match=message):
        FinetuneRecipe(**options)


def test_recipe_round_trips_through_its_dict() -> None:
    recipe = FinetuneRecipe(mixup=0.8, cutmix=1.0, randaugment=True)
    assert FinetuneRecipe.from_dict(recipe.as_dict()) == recipe
    with pytest.raises(InvalidParameterError, match="needs exactly the fields"):
        FinetuneRecipe.from_dict({"lr": 1.0})


def test_data_and_folder_are_checked_before_training(tiny_openclip: str, tmp_path: Path) -> None:
    images = random_images(8, size=32)
    with pytest.raises(DataError, match="needs labelled training images"):
        _run(tiny_openclip, ArrayDataset(images), tmp_path / "a")
    with pytest.raises(DataError, match="needs at least 2 classes, and 'arrays' has 1"):
        _run(tiny_openclip, ArrayDataset(images, np.zeros(8, dtype=int)), tmp_path / "b")
    (tmp_path / "file").write_text("")
    labelled = ArrayDataset(images, np.arange(8) % 2)
    with pytest.raises(InvalidParameterError, match="is a file; give a folder"):
        _run(tiny_openclip, labelled, tmp_path / "file")
    with pytest.raises(InvalidParameterError, match="already fine-tuned"):
        _run("finetuned:x", labelled, tmp_path / "c")
    with pytest.raises(InvalidParameterError, match="intermediate-block variant"):
        _run("efficientnet-lite0/block4@32", labelled, tmp_path / "c")
    with pytest.raises(UnknownNameError, match="unknown encoder 'nope:x'"):
        _run("nope:x", labelled, tmp_path / "c")
    assert not (tmp_path / "c").exists()  # refused before the folder was made
    with pytest.raises(InvalidParameterError, match="freeze_blocks must be at most 2"):
        _run(tiny_openclip, labelled, tmp_path / "d", recipe=FinetuneRecipe(freeze_blocks=3))
    assert not (tmp_path / "d" / CHECKPOINT_FILE).exists()


def test_freeze_blocks_keeps_the_stem_and_first_blocks(tiny_openclip: str, tmp_path: Path) -> None:
    dataset = ArrayDataset(random_images(8, size=32), np.arange(8) % 2)
    recipe = FinetuneRecipe(epochs=1, batch_size=4, ema_decay=0.0, lr=1e-3, freeze_blocks=1)
    result = _run(tiny_openclip, dataset, tmp_path, recipe=recipe)
    tensors = load_file(str(result.model_path))
    base = create_encoder(tiny_openclip).model.visual.state_dict()
    for name in ("conv1.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight"):
        assert torch.equal(tensors[f"tower.{name}"], base[name]), name
    assert not torch.equal(
        tensors["tower.transformer.resblocks.1.mlp.c_fc.weight"],
        base["transformer.resblocks.1.mlp.c_fc.weight"],
    )


def test_image_tower_per_encoder_family(tiny_openclip: str) -> None:
    lite = create_encoder("efficientnet-lite0@32")
    assert image_tower(lite) == (lite.model, "model")
    clip = create_encoder(tiny_openclip)
    assert image_tower(clip) == (clip.model.visual, "model.visual")
    with pytest.raises(InvalidParameterError, match="cannot be fine-tuned"):
        image_tower(create_encoder("efficientnet-lite0/block4@32"))


@pytest.mark.parametrize("fixture", ["tiny_hf_clip_dir", "tiny_hf_dinov2_dir"])
def test_transformers_vision_towers_fine_tune(
    fixture: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    name = f"hf:{request.getfixturevalue(fixture)}"
    dataset = ArrayDataset(random_images(8, size=32), np.arange(8) % 2)
    recipe = FinetuneRecipe(epochs=1, batch_size=4, lr=1e-3, ema_decay=0.0, freeze_blocks=1)
    result = _run(name, dataset, tmp_path, recipe=recipe)
    base = create_encoder(name)
    tower, path = image_tower(base)
    assert path == ("model.vision_model" if "clip" in fixture else "model")
    changed, total = _changed(load_file(str(result.model_path)), tower)
    assert 0 < changed < total  # trained, but the embeddings and block 1 stayed frozen
    encoder = FinetunedEncoder(str(tmp_path))
    with torch.no_grad():
        assert encoder(torch.rand(2, 3, 32, 32))["logits"].shape == (2, 2)


def test_finetuned_encoder_extracts_features_with_its_own_cache_id(
    lite_model: Path, cache_root: Path
) -> None:
    from oodprobe.features import extract_features

    encoder = create_encoder(f"finetuned:{lite_model}")
    assert isinstance(encoder, FinetunedEncoder) and encoder.base_name == LITE
    assert encoder.outputs == ("features", "logits") and encoder.weights_location == (
        lite_model / WEIGHTS_FILE
    )
    base = create_encoder(LITE)
    assert encoder.cache_id != base.cache_id
    dataset = create_dataset("digits:test", classes=[0, 1, 2, 3], per_class=2)
    features = extract_features(dataset, encoder, cache_root=cache_root, progress=False)
    plain = extract_features(dataset, base, cache_root=cache_root, progress=False)
    assert features.features.shape == (8, 1280) and features.logits.shape == (8, 4)
    assert features.key != plain.key
    assert not np.allclose(features.features, plain.features)


def test_finetuned_encoder_refuses_missing_and_damaged_files(
    lite_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(
        MissingWeightsError, match=r"no fine-tuned model folder .*oodprobe finetune"
    ):
        FinetunedEncoder(str(tmp_path / "nothing"))
    copy = tmp_path / "copy"
    copy.mkdir()
    meta = json.loads((lite_model / METADATA_FILE).read_text())
    weights = bytearray((lite_model / WEIGHTS_FILE).read_bytes())
    weights[-1] ^= 1
    (copy / WEIGHTS_FILE).write_bytes(bytes(weights))
    (copy / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(MissingWeightsError, match="is damaged or was replaced: its sha256"):
        FinetunedEncoder(str(copy))
    (copy / METADATA_FILE).write_text(json.dumps({**meta, "n_classes": 1}))
    with pytest.raises(MissingWeightsError, match="n_classes must be an integer >= 2, got 1"):
        FinetunedEncoder(str(copy))
    (copy / METADATA_FILE).unlink()
    with pytest.raises(MissingWeightsError, match=r"finetuned\.json is missing"):
        FinetunedEncoder(str(copy))


def test_a_benchmark_scores_the_finetuned_encoder(
    lite_model: Path, tmp_path: Path, cache_root: Path
) -> None:
    from oodprobe.benchmark import run_benchmark
    from oodprobe.benchmark_spec import spec_from_dict

    name = f"finetuned:{lite_model}"
    spec = spec_from_dict(
        {
            "name": "ft",
            "encoders": [name],
            "bootstrap": 0,
            "gallery_size": 2,
            "id": {
                "train": {"source": "digits:train", "classes": "0-3", "per_class": 5},
                "test": {"source": "digits:test", "classes": "0-3", "per_class": 5},
            },
            "ood": [{"source": "digits:test", "classes": "5-9", "per_class": 3, "name": "5-9"}],
            "detectors": [{"name": "knn"}, {"name": "logits", "params": {"score": "msp"}}],
        }
    )
    run = run_benchmark(spec, tmp_path / "out", cache_root=cache_root, progress=False)
    rows = [row.as_dict() for row in run.rows]
    assert {row["detector"] for row in rows} == {"knn", "logits(score=msp)"}
    assert all(row["encoder"] == name and row["error"] is None for row in rows)
    assert all(0.0 <= row["auroc"] <= 1.0 for row in rows)


def test_cli_finetune_trains_on_the_configs_id_train_part(
    tiny_openclip: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from oodprobe.cli import main

    config = tmp_path / "bench.toml"
    config.write_text(
        textwrap.dedent(
            """
            name = "ft-cli"
            encoders = ["efficientnet-lite0@32"]
            [id]
            images = { source = "digits:train", classes = "0-3", per_class = 5 }
            test_fraction = 0.2
            [[ood]]
            source = "digits:test"
            classes = "5-9"
            [[detectors]]
            name = "knn"
            """
        )
    )
    output = tmp_path / "model"
    argv = [
        "finetune", str(config), "-e", tiny_openclip, "-o", str(output), "--epochs", "1",
        "--batch-size", "8",
        "--ema-decay", "0", "--workers", "0", "--device", "cpu",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"finetuned:{output}" in printed and "saved the trained weights" in printed
    meta = json.loads((output / METADATA_FILE).read_text())
    assert meta["n_images"] == 16 and meta["recipe"]["ema_decay"] == 0.0  # 80% of 20 images
    assert meta["base_encoder"] == tiny_openclip
    assert main(argv) == 1
    assert "already holds a fine-tuned model" in capsys.readouterr().err
    assert main(["finetune", str(config)]) == 1
    assert "--output" in capsys.readouterr().err
    two = tmp_path / "two.toml"
    both = '["efficientnet-lite0@32", "efficientnet-lite0@64"]'
    two.write_text(config.read_text().replace('["efficientnet-lite0@32"]', both))
    assert main(["finetune", str(two), "-o", str(tmp_path / "other")]) == 1
    assert "names 2 encoders; pick one with -e" in capsys.readouterr().err


def test_bf16_autocast_trains_on_the_cpu(tiny_openclip: str, tmp_path: Path) -> None:
    dataset = ArrayDataset(random_images(8, size=32), np.arange(8) % 2)
    recipe = FinetuneRecipe(epochs=1, batch_size=4, precision="bf16")
    result = _run(tiny_openclip, dataset, tmp_path, recipe=recipe, device="cpu")
    assert np.isfinite(result.history[0]["loss"])
    meta = json.loads(result.metadata_path.read_text())
    assert meta["precision"] == "bf16"
    tensors = load_file(str(result.model_path))
    assert all(t.dtype in (torch.float32, torch.int64) for t in tensors.values())  # fp32 weights
    with pytest.raises(InvalidParameterError, match="precision fp16 needs a GPU"):
        _run(
            tiny_openclip,
            dataset,
            tmp_path / "fp16",
            recipe=FinetuneRecipe(precision="fp16"),
            device="cpu",
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make test-gpu)")
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_finetune_on_cuda(precision: str, tmp_path: Path) -> None:
    """fp16 with the gradient scaler, bf16 and fp32 autocast on the GPU, EMA and mixing on."""
    recipe = FinetuneRecipe(
        epochs=2, batch_size=8, precision=precision, mixup=0.8, cutmix=1.0, randaugment=True
    )
    result = _run(LITE, _digits(), tmp_path, recipe=recipe, device="cuda")
    assert all(np.isfinite(entry["loss"]) for entry in result.history)
    meta = json.loads(result.metadata_path.read_text())
    assert meta["device"].startswith("cuda") and meta["precision"] == precision
    encoder = FinetunedEncoder(str(tmp_path)).to("cuda")
    with torch.no_grad():
        logits = encoder(torch.rand(2, 3, 64, 64, device="cuda"))["logits"]
    assert logits.shape == (2, 4) and bool(torch.isfinite(logits).all())


def test_undecodable_images_are_left_out_and_listed(tiny_openclip: str, tmp_path: Path) -> None:
    dataset = ArrayDataset(random_images(8, size=32), np.arange(8) % 2, broken=frozenset({3}))
    result = _run(tiny_openclip, dataset, tmp_path, recipe=FinetuneRecipe(epochs=2, batch_size=4))
    assert [(item.index, item.source, item.reason) for item in result.skipped] == [
        (3, "arrays[3]", "image file is truncated")
    ]
    assert [entry["images"] for entry in result.history] == [7, 7]
    meta = json.loads(result.metadata_path.read_text())
    assert meta["skipped"] == [[3, "arrays[3]", "image file is truncated"]]


def test_freezing_leaves_the_trained_blocks_in_training_mode(tiny_openclip: str) -> None:
    from oodprobe.finetune import _freeze

    encoder = create_encoder(tiny_openclip)
    tower, _ = image_tower(encoder)
    tower.requires_grad_(True)  # as training does: the encoder was built frozen
    frozen = _freeze(tower, 1, encoder.name)
    blocks = list(tower.transformer.resblocks)  # type: ignore[union-attr]
    # the root holds the class and position embeddings (stem) but also the trained blocks
    assert not any(module is tower for module in frozen)
    assert any(module is blocks[0] for module in frozen)
    assert not any(module is blocks[1] for module in frozen)
    assert not any(p.requires_grad for p in blocks[0].parameters())
    assert all(p.requires_grad for p in blocks[1].parameters())
