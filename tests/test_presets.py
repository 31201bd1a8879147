"""Tests for oodprobe.presets: the paper presets carry the paper's settings (reference/PAPER.md).

Specs are built without data (a preset touches no files); a missing data set is a DataError
naming where the preset looks when the set is created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from oodprobe.benchmark_spec import BenchmarkSpec, create_benchmark
from oodprobe.detectors import create_detector
from oodprobe.encoders.text import PROMPT_SETS
from oodprobe.errors import DataError
from oodprobe.metrics import evaluate

# The paper's numbers, copied from reference/PAPER.md (not from presets.py).
PAPER_PROMPTS = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of many {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
)
PAPER_PROBE = {  # PLP step 3; LP "is the same with the true labels"
    "epochs": 100,
    "lr": 1e-3,
    "weight_decay": 1e-3,
    "warmup_fraction": 0.1,
    "seed": 42,
    "score": "msp",
    "temperature": 1.0,
}
PAPER_BATCH = {"cifar10": 256, "cifar100": 256, "imagenet": 8192}
PAPER_DEEP_KNN_K = {"cifar10": 50, "cifar100": 50, "imagenet": 1000}
PAPER_PRESETS = ("cifar10", "cifar100", "imagenet")


def detectors_by_label(spec: BenchmarkSpec) -> dict[str, tuple[str, dict[str, Any]]]:
    return {d.display: (d.name, dict(d.params)) for d in spec.detectors}


def built(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """get_params() of the detector the runner would build (text arrays faked: 3 classes)."""
    extra: dict[str, Any] = {}
    if name in ("mcm", "plp"):
        extra["class_embeddings"] = np.eye(3, dtype=np.float32)
    return dict(create_detector(name, **params, **extra).get_params(deep=False))


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_preset_metrics_and_prompts(preset: str) -> None:
    spec = create_benchmark(preset)
    assert spec.convention == "plp"
    assert spec.tpr == 0.95
    assert spec.prompts == "ensemble" and PROMPT_SETS[spec.prompts] == PAPER_PROMPTS
    # The convention gives the authors' number (reference/METRICS.md): 1.0, not 0.25.
    result = evaluate(np.arange(20.0), [0.5, 0.6, 0.7, 30.0], convention=spec.convention)
    assert result.fpr == 1.0


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_preset_detectors_carry_the_papers_settings(preset: str) -> None:
    detectors = detectors_by_label(create_benchmark(preset))
    assert set(detectors) == {
        "knn",
        f"deep-knn(k={PAPER_DEEP_KNN_K[preset]})",
        "gaussian",
        "mahalanobis",
        "relative-mahalanobis",
        "linear-probe",
        "mcm",
        "plp",
    }
    probe = {"epochs": 100, "batch_size": PAPER_BATCH[preset], "seed": 42}
    assert detectors["plp"] == ("plp", probe)
    assert detectors["linear-probe"] == ("linear-probe", probe)
    assert detectors["knn"] == ("knn", {"k": 1})
    assert detectors[f"deep-knn(k={PAPER_DEEP_KNN_K[preset]})"] == (
        "deep-knn",
        {"k": PAPER_DEEP_KNN_K[preset]},
    )
    assert detectors["mcm"] == ("mcm", {"temperature": 1.0})
    # What the runner builds from them: the paper's recipe, explicit or by default.
    for label in ("plp", "linear-probe"):
        params = built(*detectors[label])
        assert {key: params[key] for key in PAPER_PROBE} == PAPER_PROBE, label
        assert params["batch_size"] == PAPER_BATCH[preset]
    assert built(*detectors["mcm"])["temperature"] == 1.0
    assert built(*detectors["knn"])["k"] == 1


def test_imagenet_preset_uses_the_whole_training_set_from_its_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OODPROBE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("OODPROBE_IMAGENET_TRAIN", str(tmp_path / "train"))
    spec = create_benchmark("imagenet")  # builds without any data
    assert spec.id_train.source == str(tmp_path / "train")
    assert spec.id_train.per_class is None and spec.id_train.limit is None
    assert spec.id_test.source == str(tmp_path / "data" / "imagenet" / "val")
    assert [(o.label, o.group) for o in spec.ood] == [
        ("inaturalist", "far"),
        ("sun", "far"),
        ("places", "far"),
        ("dtd", "far"),
        ("imagenet-o", "near"),
        ("ninco", "near"),
    ]
    with pytest.raises(DataError) as raised:
        spec.id_train.create()
    assert str(raised.value).startswith(f"{tmp_path / 'train'} does not exist")


@pytest.mark.parametrize("preset", ["cifar10", "cifar100"])
def test_cifar_preset_without_data_is_a_data_error_naming_the_folder(
    preset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OODPROBE_DATA", str(tmp_path))
    spec = create_benchmark(preset)
    assert (spec.id_train.source, spec.id_test.source) == (f"{preset}:train", f"{preset}:test")
    other = "cifar100" if preset == "cifar10" else "cifar10"
    assert [(o.source, o.group) for o in spec.ood] == [(f"{other}:test", "near")]
    with pytest.raises(DataError) as raised:
        spec.id_train.create()
    assert str(raised.value).startswith(f"{preset} not found in {tmp_path} ($OODPROBE_DATA)")


def test_offline_default_keeps_its_own_fast_settings() -> None:
    # Not a paper preset: oodprobe's convention and 30 probe epochs keep `make demo` short.
    spec = create_benchmark("offline-default")
    assert spec.convention == "oodprobe"
    assert detectors_by_label(spec)["linear-probe"] == (
        "linear-probe",
        {"epochs": 30, "batch_size": 256},
    )


# The post-hoc family every classifier preset reports (issue 10), by registered name.
POSTHOC = (
    "vim", "vim-residual", "react", "ash-p", "ash-b", "ash-s", "scale", "dice", "she",
    "nnguide", "fdbd", "gen", "kl-matching", "gradnorm", "entropy",
)  # fmt: skip


def test_offline_default_reports_the_post_hoc_family_on_the_imagenet_head() -> None:
    spec = create_benchmark("offline-default")
    pairs = {(d.name, d.params.get("head", "encoder")) for d in spec.detectors}
    assert {(name, "encoder") for name in POSTHOC} <= pairs  # each on the ImageNet head
    assert {("react", "probe"), ("vim", "probe")} <= pairs
    by_label = detectors_by_label(spec)
    assert by_label["temp-msp (probe head)"] == ("temp-msp", {"head": "probe"})
    assert by_label["score-ensemble (knn + mahalanobis + vim)"][0] == "score-ensemble"


def test_imagenet_classifier_preset_runs_the_family_on_a_timm_head() -> None:
    spec = create_benchmark("imagenet-classifier")
    assert spec.encoders == ("timm:resnet50.a1_in1k",)
    names = {d.name for d in spec.detectors}
    assert set(POSTHOC) | {"temp-msp", "logits", "knn", "mahalanobis"} <= names
    assert all(d.params.get("head", "encoder") == "encoder" for d in spec.detectors)
    imagenet = create_benchmark("imagenet")
    assert spec.id_train.source == imagenet.id_train.source and spec.id_train.per_class == 100
    assert spec.id_test == imagenet.id_test and spec.ood == imagenet.ood


def test_imagenet_cooked_preset_puts_one_head_on_each_backbone() -> None:
    from oodprobe.encoders import encoder_name_traits
    from oodprobe.encoders.concat import split_concat_name
    from oodprobe.pipeline import check_compatibility

    spec = create_benchmark("imagenet-cooked")
    (encoder,) = spec.encoders
    parts = split_concat_name(encoder)
    assert parts is not None and parts[0] == "timm:resnet50.a1_in1k" and len(parts) == 3
    assert encoder_name_traits(parts[2])[0] is True  # the CLIP part has the text tower
    by_label = detectors_by_label(spec)
    assert by_label["cooked (entropy)"] == (
        "prob-ensemble",
        {"heads": ["encoder@1", "probe@2", "zero-shot@3"], "score": "entropy"},
    )
    assert by_label["msp (probe@2)"] == ("prob-ensemble", {"heads": ["probe@2"]})
    # every head is one its part can give, judged by name before any model is built
    check_compatibility(
        spec.detectors, labelled=True, id_label="imagenet", encoders={encoder: None}
    )
