"""Concatenated encoders (``concat:A+B``) and heads on one of their parts (``probe@2``): the
multi-backbone COOkeD ensemble, checked against each part's own features and heads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import ArrayDataset, random_images
from oodprobe.benchmark_spec import DetectorSpec
from oodprobe.detectors import create_detector, load_detector
from oodprobe.detectors.posthoc import parse_head_source
from oodprobe.detectors.posthoc_logits import softmax
from oodprobe.encoders import create_encoder, encoder_name_traits, parse_encoder_name
from oodprobe.encoders.concat import ConcatEncoder, ConcatTextEncoder
from oodprobe.encoders.text import compute_class_embeddings
from oodprobe.errors import InvalidParameterError, OodprobeError
from oodprobe.features import FeatureSet, extract_features
from oodprobe.pipeline import build_detector, check_compatibility, probe_head, zero_shot_head

LITE = "efficientnet-lite0@32"
BLOCK = "efficientnet-lite0/block4@32"
NAMES = ("zero", "one", "two")


@pytest.fixture(scope="module")
def names(tiny_openclip: str) -> dict[str, str]:
    return {
        "clip": tiny_openclip,
        "concat": f"concat:{LITE}+{BLOCK}+{tiny_openclip}",
    }


@pytest.fixture(scope="module")
def encoders(names: dict[str, str]) -> dict[str, Any]:
    return {
        "lite": create_encoder(LITE),
        "block": create_encoder(BLOCK),
        "clip": create_encoder(names["clip"]),
        "concat": create_encoder(names["concat"]),
    }


@pytest.fixture(scope="module")
def dataset() -> ArrayDataset:
    labels = np.arange(18) % 3
    data = ArrayDataset(random_images(18, size=32, seed=3), labels, name="concat-test")
    data.class_names = NAMES
    return data


@pytest.fixture(scope="module")
def extracted(
    encoders: dict[str, Any], dataset: ArrayDataset, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, FeatureSet]:
    root = tmp_path_factory.mktemp("cache")
    options: dict[str, Any] = {"cache_root": root, "progress": False, "num_workers": 0}
    parts = {key: extract_features(dataset, encoders[key], **options) for key in encoders}
    parts["again"] = extract_features(dataset, encoders["concat"].name, **options)
    return parts


# -- names ------------------------------------------------------------------------------------


def test_a_concat_name_is_checked_part_by_part_without_building_anything(
    names: dict[str, str],
) -> None:
    parsed = parse_encoder_name(f"concat:efficientnet-lite0@224+{BLOCK}")
    assert parsed.canonical == f"concat:efficientnet-lite0+{BLOCK}"  # parts made canonical
    assert encoder_name_traits(names["concat"]) == (True, ("features", "logits"))
    # two parts with logits: the concatenation has none of its own
    assert encoder_name_traits(f"concat:{LITE}+efficientnet-lite1") == (False, ("features",))
    for bad, message in [
        ("concat:efficientnet-lite0", "two or more"),
        ("concat:efficientnet-lite0++efficientnet-lite1", "two or more"),
        (f"concat:{LITE}+concat:{BLOCK}", "cannot hold another"),
        (f"concat:{LITE}+nosuch:model", "unknown encoder"),
        (f"concat:{LITE}+efficientnet-lite0/block99", "block"),
    ]:
        with pytest.raises(OodprobeError, match=message):
            parse_encoder_name(bad)


def test_head_sources_take_an_optional_part() -> None:
    assert parse_head_source("probe") == ("probe", None)
    assert parse_head_source("zero-shot@3") == ("zero-shot", 3)
    for bad in ["probe@0", "probe@", "probe@x", "classifier@1", "probe@1@2"]:
        with pytest.raises(InvalidParameterError, match="head source"):
            parse_head_source(bad)
    with pytest.raises(InvalidParameterError, match="head"):
        create_detector("vim", head="probe@0")


# -- extraction -------------------------------------------------------------------------------


def test_concatenated_features_are_the_parts_side_by_side_each_cached_on_its_own(
    encoders: dict[str, Any], extracted: dict[str, FeatureSet]
) -> None:
    concat = encoders["concat"]
    assert isinstance(concat, ConcatTextEncoder)
    result = extracted["concat"]
    expected = np.hstack([extracted[key].features for key in ("lite", "block", "clip")])
    np.testing.assert_array_equal(result.features, expected)
    assert [concat.feature_dim, *concat.part_slices[1:2]] == [1280 + 40 + 64, slice(1280, 1320)]
    np.testing.assert_array_equal(result.logits, extracted["lite"].logits)
    np.testing.assert_array_equal(result.labels, extracted["lite"].labels)
    # the parts were extracted first (their own entries), so the concatenation read them
    assert result.from_cache and extracted["again"].from_cache
    np.testing.assert_array_equal(extracted["again"].features, expected)
    # the one part with logits gives the head, padded to the concatenated columns
    weight, bias = result.head
    lite_weight, lite_bias = encoders["lite"].head_arrays()
    np.testing.assert_array_equal(weight[:, :1280], lite_weight)
    assert not weight[:, 1280:].any()
    np.testing.assert_array_equal(bias, lite_bias)
    np.testing.assert_allclose(
        result.features @ weight.T.astype(np.float64) + bias, result.logits, atol=1e-3
    )


@pytest.mark.parametrize("store_dtype", ["float16", "bfloat16"])
def test_a_half_size_concatenation_keeps_its_parts_dtype(
    encoders: dict[str, Any],
    dataset: ArrayDataset,
    extracted: dict[str, FeatureSet],
    tmp_path: Path,
    store_dtype: str,
) -> None:
    """``--store-dtype`` parts give a concatenation of that dtype: their values side by side."""
    options: dict[str, Any] = {"cache_root": tmp_path, "progress": False, "num_workers": 0}
    half = extract_features(dataset, encoders["concat"], store_dtype=store_dtype, **options)
    assert half.features.dtype.name == store_dtype
    expected = np.hstack([extracted[key].features for key in ("lite", "block", "clip")])
    np.testing.assert_array_equal(
        half.features.astype(np.float32), expected.astype(half.features.dtype).astype(np.float32)
    )


def test_parts_that_skip_different_images_join_on_the_images_every_part_has(
    encoders: dict[str, Any], extracted: dict[str, FeatureSet]
) -> None:
    from oodprobe.data.base import SkippedImage
    from oodprobe.features import concatenate_feature_sets

    def without(key: str, dropped: list[int]) -> FeatureSet:
        part = extracted[key]
        kept = part.subset(np.flatnonzero(~np.isin(part.indices, dropped)))
        kept.skipped = [SkippedImage(index, f"image {index}", "undecodable") for index in dropped]
        return kept

    parts = [without("lite", [2]), without("block", [5, 2]), without("clip", [7])]
    joined = concatenate_feature_sets(encoders["concat"], parts)
    rows = np.setdiff1d(np.arange(18), [2, 5, 7])
    np.testing.assert_array_equal(joined.indices, rows)
    expected = np.hstack([extracted[key].features[rows] for key in ("lite", "block", "clip")])
    np.testing.assert_array_equal(joined.features, expected)
    np.testing.assert_array_equal(joined.logits, extracted["lite"].logits[rows])
    np.testing.assert_array_equal(joined.labels, extracted["lite"].labels[rows])
    assert sorted(item.index for item in joined.skipped) == [2, 5, 7]  # each image once


def test_a_concatenation_has_no_forward_pass(encoders: dict[str, Any]) -> None:
    import torch

    with pytest.raises(InvalidParameterError, match="no forward pass"):
        encoders["concat"](torch.zeros(1, 3, 32, 32))


# -- heads on parts ---------------------------------------------------------------------------


def _part(result: FeatureSet, encoder: ConcatEncoder, index: int) -> FeatureSet:
    from dataclasses import replace

    columns = encoder.part_slices[index]
    return replace(
        result, arrays={"features": result.features[:, columns]}, key=f"{result.key}-{index}"
    )


def test_cooked_averages_a_classifier_a_probe_on_another_backbone_and_clip_zero_shot(
    encoders: dict[str, Any], extracted: dict[str, FeatureSet]
) -> None:
    """COOkeD (Humblot-Renaux et al., 2025): the mean of three heads' softmaxes, each on its own
    backbone's features; MSP of the mean. Reference: each head applied to its part alone."""
    concat, train = encoders["concat"], extracted["concat"]
    embeddings = compute_class_embeddings(encoders["clip"], list(NAMES))
    spec = DetectorSpec("prob-ensemble", {"heads": ["probe@1", "probe@2", "zero-shot@3"]})
    detector = build_detector(spec, concat, embeddings, train=train)
    scores = detector.fit(train.features).score_samples(train.features)

    probe_lite = probe_head(_part(train, concat, 0))
    probe_block = probe_head(_part(train, concat, 1))
    clip_weight, _, clip_projection = zero_shot_head(encoders["clip"], embeddings)
    clip_features = extracted["clip"].features.astype(np.float64)
    joint = clip_features / np.linalg.norm(clip_features, axis=1, keepdims=True)
    joint = joint @ clip_projection.astype(np.float64)
    joint /= np.linalg.norm(joint, axis=1, keepdims=True)
    logits = [
        extracted["lite"].features @ probe_lite[0].T.astype(np.float64) + probe_lite[1],
        extracted["block"].features @ probe_block[0].T.astype(np.float64) + probe_block[1],
        joint @ clip_weight.T.astype(np.float64),
    ]
    expected = np.mean([softmax(z) for z in logits], axis=0).max(axis=1)
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_a_part_head_of_a_logit_score_equals_that_score_on_the_part_alone(
    encoders: dict[str, Any], extracted: dict[str, FeatureSet]
) -> None:
    concat, train = encoders["concat"], extracted["concat"]
    for spec, part, reference in [
        (DetectorSpec("kl-matching", {"head": "encoder@1"}), "lite", "encoder"),
        (DetectorSpec("gen", {"head": "probe@2"}), "block", "probe"),
    ]:
        on_concat = build_detector(spec, concat, None, train=train)
        part_spec = DetectorSpec(spec.name, {"head": reference})
        alone = build_detector(part_spec, encoders[part], None, train=extracted[part])
        labels = None
        on_concat.fit(train.features, labels)
        alone.fit(extracted[part].features, labels)
        np.testing.assert_allclose(
            on_concat.score_samples(train.features),
            alone.score_samples(extracted[part].features),
            rtol=1e-6,
            atol=1e-9,
        )


def test_mcm_on_a_concatenation_is_mcm_on_its_text_part(
    encoders: dict[str, Any], extracted: dict[str, FeatureSet]
) -> None:
    embeddings = compute_class_embeddings(encoders["clip"], list(NAMES))
    scores = {}
    for key in ("concat", "clip"):
        detector = build_detector(DetectorSpec("mcm"), encoders[key], embeddings)
        scores[key] = detector.fit(extracted[key].features).score_samples(extracted[key].features)
    np.testing.assert_allclose(scores["concat"], scores["clip"], rtol=1e-9)


def test_a_multi_backbone_ensemble_saves_and_loads(
    encoders: dict[str, Any], extracted: dict[str, FeatureSet], tmp_path: Path
) -> None:
    concat, train = encoders["concat"], extracted["concat"]
    embeddings = compute_class_embeddings(encoders["clip"], list(NAMES))
    spec = DetectorSpec("prob-ensemble", {"heads": ["probe@1", "zero-shot@3"], "score": "gen"})
    detector = build_detector(spec, concat, embeddings, train=train).fit(train.features)
    loaded = load_detector(detector.save(tmp_path / "cooked.safetensors"))
    assert list(loaded.heads) == ["probe@1", "zero-shot@3"]
    np.testing.assert_array_equal(
        loaded.score_samples(train.features), detector.score_samples(train.features)
    )


@pytest.mark.parametrize(
    ("head", "message"),
    [
        ("probe@4", "parts 1 to 3"),
        ("encoder@2", "has no linear classifier head"),
        ("zero-shot@1", "image-only"),
    ],
)
def test_a_part_head_the_part_cannot_give_is_refused_by_name_and_once_built(
    head: str, message: str, names: dict[str, str], encoders: dict[str, Any]
) -> None:
    spec = DetectorSpec("prob-ensemble", {"heads": [head, "probe@1"]})
    for built in (None, encoders["concat"]):
        with pytest.raises(InvalidParameterError, match=message):
            check_compatibility(
                [spec], labelled=True, id_label="id", encoders={names["concat"]: built}
            )


def test_a_zero_shot_head_on_a_second_text_part_is_refused_by_name_and_once_built(
    names: dict[str, str],
) -> None:
    """The class embeddings come from the first part with a text tower: a zero-shot head on
    another CLIP part is refused before any extraction, not when the detector is built."""
    name = f"concat:{names['clip']}+{LITE}+{names['clip']}"
    spec = DetectorSpec("prob-ensemble", {"heads": ["zero-shot@3", "probe@2"]})
    message = r"first part with a text tower \(part 1\); write 'zero-shot@1'"
    for built in (None, create_encoder(name)):
        with pytest.raises(InvalidParameterError, match=message):
            check_compatibility([spec], labelled=True, id_label="id", encoders={name: built})
    fine = DetectorSpec("prob-ensemble", {"heads": ["zero-shot@1", "probe@2"]})
    check_compatibility([fine], labelled=True, id_label="id", encoders={name: None})


def test_a_part_of_an_encoder_that_is_not_a_concatenation_is_refused(
    encoders: dict[str, Any],
) -> None:
    spec = DetectorSpec("vim", {"head": "probe@1"})
    with pytest.raises(InvalidParameterError, match="not one; write head='probe'"):
        check_compatibility([spec], labelled=True, id_label="id", encoders={LITE: None})
    with pytest.raises(InvalidParameterError, match="not one"):
        build_detector(spec, encoders["lite"], None)


def test_a_benchmark_runs_the_multi_backbone_ensemble_on_a_concatenation(
    names: dict[str, str], tmp_path: Path
) -> None:
    from oodprobe.benchmark import execute_benchmark
    from oodprobe.benchmark_spec import spec_from_dict

    spec = spec_from_dict(
        {
            "name": "cooked",
            "encoders": [names["concat"]],
            "bootstrap": 0,
            "id": {
                "train": {"source": "digits:train", "classes": "0-2", "per_class": 8},
                "test": {"source": "digits:test", "classes": "0-2", "per_class": 4},
            },
            "ood": [{"source": "digits:test", "classes": "5-6", "per_class": 4, "name": "5-6"}],
            "detectors": [
                {"name": "prob-ensemble", "params": {"heads": ["probe@1", "zero-shot@3"]}},
                {"name": "knn"},
                {"name": "logits", "params": {"score": "msp"}},
            ],
        }
    )
    run = execute_benchmark(spec, tmp_path / "out", cache_root=tmp_path / "cache", progress=False)
    assert [row.error for row in run.rows] == [None, None, None]
    assert all(0 <= row.metrics["auroc"] <= 1 for row in run.rows)


def test_attacks_and_fine_tuning_refuse_a_concatenation_before_any_work(tmp_path: Path) -> None:
    from oodprobe.attack_run import run_attack
    from oodprobe.finetune import finetune
    from oodprobe.presets import offline_default

    name = f"concat:{LITE}+{BLOCK}"
    with pytest.raises(InvalidParameterError, match="no forward pass to attack"):
        run_attack(offline_default(), tmp_path / "attack", encoder=name)
    assert not (tmp_path / "attack").exists()
    data = ArrayDataset(random_images(6, size=32), np.arange(6) % 2)
    with pytest.raises(InvalidParameterError, match="no forward pass"):
        finetune(name, data, tmp_path / "ft")
    assert not (tmp_path / "ft").exists()
