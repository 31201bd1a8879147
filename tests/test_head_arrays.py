"""The classifier head as arrays: encoders expose it, the cache stores it with the features, the
pipeline resolves a post-hoc detector's head (encoder / probe / zero-shot) and refuses what
cannot work before any extraction, and a deployed post-hoc detector carries its head."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.utils.validation import check_is_fitted

from conftest import ArrayDataset, random_images
from oodprobe import cache
from oodprobe.benchmark_spec import DetectorSpec
from oodprobe.detectors import DETECTORS, load_detector
from oodprobe.detectors.posthoc import HEAD_CONSTRAINTS, HeadDetector
from oodprobe.detectors.probe import LinearProbeDetector, fold_standardization, negative_energy
from oodprobe.detectors.text import MCMDetector
from oodprobe.encoders import TextImageEncoder, create_encoder, create_shared_encoder
from oodprobe.errors import CacheError, InvalidParameterError
from oodprobe.features import FeatureSet, extract_features, extract_shared_features, load_head
from oodprobe.pipeline import (
    build_detector,
    check_compatibility,
    needs_labels,
    needs_text,
    probe_head,
    resolve_head,
)

SMALL = "efficientnet-lite0@32"
BLOCK = "efficientnet-lite0/block4@32"
HEAD_TEST = "head-energy-test"


class _EnergyHead(HeadDetector):
    """Negative energy of the head's logits: the smallest post-hoc detector, for these tests."""

    name: ClassVar[str] = HEAD_TEST
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = dict(HEAD_CONSTRAINTS)

    def __init__(
        self,
        *,
        head: str = "encoder",
        head_weight: Any = None,
        head_bias: Any = None,
        image_projection: Any = None,
    ) -> None:
        self.head = head
        self.head_weight = head_weight
        self.head_bias = head_bias
        self.image_projection = image_projection

    def score_samples(self, features: Any) -> Any:
        check_is_fitted(self)
        return negative_energy(self.head_logits(self.head_features(features)))


@pytest.fixture(autouse=True, scope="module")
def _registered() -> Iterator[None]:
    """The test detector in the registry for this module only."""
    DETECTORS[HEAD_TEST] = _EnergyHead
    yield
    del DETECTORS[HEAD_TEST]


@pytest.fixture(scope="module")
def lite0() -> Any:
    return create_encoder("efficientnet-lite0")


@pytest.fixture(scope="module")
def small() -> Any:
    return create_encoder(SMALL)


@pytest.fixture(scope="module")
def block4() -> Any:
    return create_encoder(BLOCK)


def _assert_head_gives_logits(features: np.ndarray, logits: np.ndarray, head: Any) -> None:
    weight, bias = head
    expected = features.astype(np.float64) @ weight.astype(np.float64).T + bias
    scale = float(np.abs(logits).max())
    np.testing.assert_allclose(expected, logits, rtol=0, atol=1e-4 * scale)


def _outputs(encoder: Any, images: list[Image.Image]) -> dict[str, np.ndarray]:
    pixels = torch.stack([encoder.pixel_transform(image) for image in images])
    with torch.inference_mode():
        return {name: value.numpy() for name, value in encoder(pixels).items()}


# -- encoders ---------------------------------------------------------------------------------


def test_efficientnet_lite0_head_reproduces_its_logits_on_real_photos(lite0: Any) -> None:
    from skimage import data

    photos = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket()]
    outputs = _outputs(lite0, [Image.fromarray(photo).convert("RGB") for photo in photos])
    head = lite0.head_arrays()
    assert head is not None
    weight, bias = head
    assert weight.shape == (1000, 1280) and bias.shape == (1000,)
    assert weight.dtype == bias.dtype == np.float32
    np.testing.assert_array_equal(weight, lite0.model._fc.weight.detach().numpy())
    _assert_head_gives_logits(outputs["features"], outputs["logits"], head)
    # the arrays are copies: changing them leaves the model alone
    weight[0, 0] += 1.0
    assert lite0.model._fc.weight[0, 0] != weight[0, 0]


@pytest.mark.parametrize("name", ["timm:resnet18/random", "timm:vit_tiny_patch16_224/random"])
def test_a_timm_classifier_head_reproduces_its_logits(name: str) -> None:
    encoder = create_encoder(name)
    head = encoder.head_arrays()
    assert head is not None and head[0].shape == (1000, encoder.feature_dim)
    images = [Image.fromarray(image) for image in random_images(3, size=40, seed=1)]
    outputs = _outputs(encoder, images)
    _assert_head_gives_logits(outputs["features"], outputs["logits"], head)


def test_heads_that_are_not_one_linear_layer_on_the_features_give_none(
    tiny_openclip: str, small: Any, block4: Any
) -> None:
    # DeiT-distilled has two heads (get_classifier is a pair), a CLIP tower has no logits
    assert create_encoder("timm:deit_tiny_distilled_patch16_224/random").head_arrays() is None
    assert create_encoder(tiny_openclip).head_arrays() is None
    # a block variant has no logits; a shared pass that keeps the final layer keeps its head
    assert block4.head_arrays() is None
    shared, _ = create_shared_encoder([SMALL, "efficientnet-lite0/block4@32"])
    blocks, _ = create_shared_encoder(
        ["efficientnet-lite0/block4@32", "efficientnet-lite0/block6@32"]
    )
    assert blocks.head_arrays() is None
    shared_head = shared.head_arrays()
    assert shared_head is not None
    np.testing.assert_array_equal(shared_head[0], small.head_arrays()[0])


def test_a_layer_whose_output_is_not_the_logits_is_refused_by_the_probe_batch() -> None:
    encoder = create_encoder(SMALL)
    other = torch.nn.Linear(1280, 1000)  # right shape, wrong weights
    encoder.linear_head = lambda: other  # type: ignore[method-assign]
    assert encoder.head_arrays() is None


def test_a_finetuned_encoder_exposes_its_trained_head(tmp_path: Path) -> None:
    from oodprobe.data import create_dataset
    from oodprobe.finetune import FinetuneRecipe, finetune

    digits = create_dataset("digits:train", classes=[0, 1, 2], per_class=4)
    output = tmp_path / "ft"
    recipe = FinetuneRecipe(epochs=1, batch_size=6, ema_decay=0.0)
    finetune("efficientnet-lite0@32", digits, output, recipe=recipe, num_workers=0, progress=False)
    encoder = create_encoder(f"finetuned:{output}")
    head = encoder.head_arrays()
    assert head is not None and head[0].shape == (3, 1280)
    np.testing.assert_array_equal(head[0], encoder.head.weight.detach().numpy())
    outputs = _outputs(encoder, [digits.load(index) for index in range(4)])
    _assert_head_gives_logits(outputs["features"], outputs["logits"], head)


def test_clip_logit_scale_is_the_models_exp_or_100(tiny_openclip: str) -> None:
    from oodprobe.encoders.base import DEFAULT_LOGIT_SCALE

    encoder = create_encoder(tiny_openclip)
    assert encoder.logit_scale == pytest.approx(float(encoder.model.logit_scale.exp()))
    assert encoder.logit_scale == pytest.approx(1 / 0.07)  # CLIP's initial temperature
    del encoder.model.logit_scale
    assert encoder.logit_scale == DEFAULT_LOGIT_SCALE == 100.0


# -- the cache --------------------------------------------------------------------------------


@pytest.fixture
def images() -> ArrayDataset:
    return ArrayDataset(random_images(12, size=32), np.arange(12) % 3)


def _extract(dataset: Any, encoder: Any, root: Path) -> FeatureSet:
    return extract_features(dataset, encoder, cache_root=root, progress=False, num_workers=0)


def test_the_head_is_stored_with_the_features_and_read_back(
    images: ArrayDataset, small: Any, cache_root: Path
) -> None:
    cold = _extract(images, small, cache_root)
    assert cold.head is not None and not cold.from_cache
    np.testing.assert_array_equal(cold.head[0], small.head_arrays()[0])
    np.testing.assert_array_equal(cold.head[1], small.head_arrays()[1])
    assert cold.logits is not None
    _assert_head_gives_logits(cold.features, cold.logits, cold.head)
    assert cold.path is not None and (cold.path / cache.HEAD_FILE).is_file()
    record = json.loads((cold.path / "meta.json").read_text())["head"]
    assert record["shape"] == [1000, 1280] and record["file"] == cache.HEAD_FILE
    warm = _extract(images, small, cache_root)
    assert warm.from_cache and warm.head is not None
    np.testing.assert_array_equal(warm.head[0], cold.head[0])
    loaded = load_head(cold.path)  # without the model
    assert loaded is not None
    np.testing.assert_array_equal(loaded[1], cold.head[1])
    # a subset keeps the head
    part = warm.subset(np.array([0, 2]))
    assert part.head is warm.head and len(part) == 2
    np.testing.assert_array_equal(part.features, warm.features[[0, 2]])


def test_an_encoder_without_a_head_stores_none(
    images: ArrayDataset, block4: Any, cache_root: Path
) -> None:
    features = _extract(images, block4, cache_root)
    assert features.head is None and features.path is not None
    assert json.loads((features.path / "meta.json").read_text())["head"] is None
    assert not (features.path / cache.HEAD_FILE).exists()
    assert load_head(features.path) is None
    assert _extract(images, block4, cache_root).head is None


def _flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def _swap_head(path: Path) -> None:
    """Another valid head file (its own checksum right), not the one meta.json records."""
    weight, bias = cache.read_head(path.parent, json.loads((path.parent / "meta.json").read_text()))
    cache.write_head(path.parent, weight * 2, bias)


@pytest.mark.parametrize(
    "damage",
    [
        _flip_last_byte,
        lambda path: path.write_bytes(path.read_bytes()[:100]),
        lambda path: path.unlink(),
        _swap_head,
    ],
    ids=["flipped-byte", "truncated", "missing", "swapped"],
)
def test_a_damaged_head_file_rebuilds_the_entry(
    damage: Any, images: ArrayDataset, small: Any, cache_root: Path
) -> None:
    cold = _extract(images, small, cache_root)
    assert cold.path is not None and cold.head is not None
    damage(cold.path / cache.HEAD_FILE)
    with pytest.raises(CacheError):
        cache.read_head(cold.path, json.loads((cold.path / "meta.json").read_text()))
    with pytest.warns(UserWarning, match=r"feature cache entry is damaged .*rebuilding it"):
        rebuilt = _extract(images, small, cache_root)
    assert not rebuilt.from_cache and rebuilt.head is not None
    np.testing.assert_array_equal(rebuilt.head[0], cold.head[0])
    np.testing.assert_array_equal(rebuilt.features, cold.features)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _extract(images, small, cache_root).from_cache


def test_a_malformed_head_record_is_a_damaged_entry(
    images: ArrayDataset, small: Any, cache_root: Path
) -> None:
    cold = _extract(images, small, cache_root)
    assert cold.path is not None
    meta_path = cold.path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["head"] = {"file": "../elsewhere.safetensors", "shape": [1000, 1280], "sha256": "0"}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=r"malformed head record"):
        cache.read_entry(cold.path)
    with pytest.warns(UserWarning, match=r"malformed head record.*rebuilding it"):
        assert not _extract(images, small, cache_root).from_cache


def test_an_entry_written_before_heads_gets_the_encoders_head_without_extracting(
    images: ArrayDataset, small: Any, cache_root: Path
) -> None:
    cold = _extract(images, small, cache_root)
    assert cold.path is not None and cold.head is not None
    meta_path = cold.path / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["head"]  # what an entry of an older oodprobe looks like
    meta_path.write_text(json.dumps(meta, indent=1))
    (cold.path / cache.HEAD_FILE).unlink()
    assert load_head(cold.path) is None  # nothing stored yet
    old = _extract(images, small, cache_root)
    assert old.from_cache and old.stats["images_encoded"] == 0
    assert old.head is not None
    np.testing.assert_array_equal(old.head[0], cold.head[0])
    # and the entry now holds it, the rest of meta.json unchanged
    upgraded = json.loads(meta_path.read_text())
    assert upgraded.pop("head")["shape"] == [1000, 1280]
    assert upgraded == meta
    stored = load_head(cold.path)
    assert stored is not None
    np.testing.assert_array_equal(stored[0], cold.head[0])


def test_a_shared_pass_stores_the_head_with_the_final_layer_only(
    images: ArrayDataset, small: Any, cache_root: Path
) -> None:
    names = [SMALL, "efficientnet-lite0/block4@32"]
    shared, outputs = create_shared_encoder(names)
    results = extract_shared_features(
        images, shared, outputs, cache_root=cache_root, progress=False, num_workers=0
    )
    final, block = results[SMALL], results[names[1]]
    assert block.head is None and final.head is not None and final.logits is not None
    _assert_head_gives_logits(final.features, final.logits, final.head)
    alone = _extract(images, small, cache_root)  # the same entry, read by its own name
    assert alone.from_cache and alone.head is not None
    np.testing.assert_array_equal(alone.head[0], final.head[0])


# -- the pipeline -----------------------------------------------------------------------------


def _feature_set(features: np.ndarray, labels: np.ndarray | None, **fields: Any) -> FeatureSet:
    values: dict[str, Any] = {
        "arrays": {"features": features},
        "indices": np.arange(len(features)),
        "labels": labels,
        "class_names": None,
        "skipped": [],
        "encoder_name": "synthetic",
        "dataset_name": "synthetic",
        "key": "",
        "path": None,
        "from_cache": False,
        **fields,
    }
    return FeatureSet(**values)


def _synthetic(n: int = 60, dims: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    centres = rng.normal(0, 3, (3, dims))
    features = (centres[labels] + rng.normal(0, 1, (n, dims)) * [1, 2, 3, 4, 5][:dims]) + 7
    return features.astype(np.float32), labels


def test_the_encoder_head_comes_from_the_training_features_or_the_encoder(small: Any) -> None:
    spec = DetectorSpec(HEAD_TEST)
    head = (np.ones((4, 1280), np.float32), np.arange(4, dtype=np.float32))
    train = _feature_set(np.zeros((2, 1280), np.float32), None, head=head)
    detector = build_detector(spec, small, None, train=train)
    np.testing.assert_array_equal(detector.head_weight, head[0])
    np.testing.assert_array_equal(detector.head_bias, head[1])
    assert detector.image_projection is None
    # no training features (the old positional call): the encoder's own head
    detector = build_detector(spec, small, None)
    np.testing.assert_array_equal(detector.head_weight, small.head_arrays()[0])
    # features of another encoder without a head (a variant of a shared pass): refused, the
    # shared pass's head is not theirs
    variant = _feature_set(np.zeros((2, 48), np.float32), None, encoder_name="lite0/block4")
    with pytest.raises(InvalidParameterError, match=r"^detector 'head-energy-test' with head="):
        build_detector(spec, small, None, train=variant)


def test_a_probe_head_is_the_fitted_linear_probe_folded_into_one_affine_map() -> None:
    features, labels = _synthetic()
    train = _feature_set(features, labels, key="probe-test")
    detector = build_detector(DetectorSpec(HEAD_TEST, {"head": "probe"}), None, None, train=train)
    probe = LinearProbeDetector().fit(features, labels)
    head_logits = features.astype(np.float64) @ np.asarray(detector.head_weight).T
    head_logits += detector.head_bias
    np.testing.assert_allclose(head_logits, probe.logits(features), rtol=1e-5, atol=1e-5)
    detector.fit(features)
    np.testing.assert_allclose(
        detector.score_samples(features), negative_energy(probe.logits(features)), rtol=1e-5
    )
    # the fold itself: W·(x − μ)/σ + b on hand-made numbers
    weight, bias = fold_standardization([[2.0, 4.0]], [1.0], [1.0, 2.0], [2.0, 4.0])
    np.testing.assert_allclose(weight, [[1.0, 1.0]])
    np.testing.assert_allclose(bias, [1.0 - 3.0])
    # one fit per training set, whichever detector asks
    assert probe_head(train)[0] is probe_head(train)[0]
    with pytest.raises(InvalidParameterError, match=r"head='probe' needs the labelled ID"):
        resolve_head(
            DetectorSpec(HEAD_TEST, {"head": "probe"}),
            None,
            None,
            train=_feature_set(features, None),
        )


def test_a_zero_shot_head_is_the_scaled_class_embeddings_on_projected_features(
    tiny_openclip: str,
) -> None:
    from oodprobe.encoders.text import compute_class_embeddings

    encoder = create_encoder(tiny_openclip)
    assert isinstance(encoder, TextImageEncoder) and encoder.image_projection is not None
    projection = encoder.image_projection.numpy()
    embeddings = compute_class_embeddings(encoder, ["cat", "dog", "ship"])
    spec = DetectorSpec(HEAD_TEST, {"head": "zero-shot"})
    assert needs_text([spec]) and not needs_text([DetectorSpec(HEAD_TEST)])
    detector = build_detector(spec, encoder, embeddings)
    np.testing.assert_allclose(detector.head_weight, encoder.logit_scale * embeddings, rtol=1e-6)
    np.testing.assert_array_equal(detector.head_bias, np.zeros(3))
    np.testing.assert_array_equal(detector.image_projection, projection)
    features = np.random.default_rng(0).normal(size=(6, encoder.feature_dim)).astype(np.float32)
    detector.fit(features)
    logits = detector.head_logits(detector.head_features(features))
    mcm = MCMDetector(class_embeddings=embeddings, image_projection=projection).fit(features)
    np.testing.assert_allclose(logits, encoder.logit_scale * mcm.similarities(features), rtol=1e-5)
    with pytest.raises(InvalidParameterError, match=r"head='zero-shot' needs class embeddings"):
        build_detector(spec, encoder, None)


def test_a_zero_shot_head_without_a_projection_normalises_the_features() -> None:
    class Joint:  # features already in the joint space (SigLIP, ConvNeXt CLIP)
        image_projection = None
        logit_scale = 10.0

    embeddings = np.eye(3, 4, dtype=np.float32)
    detector = build_detector(DetectorSpec(HEAD_TEST, {"head": "zero-shot"}), Joint(), embeddings)
    features = np.array([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0]], np.float32)
    detector.fit(features)
    logits = detector.head_logits(detector.head_features(features))
    np.testing.assert_allclose(logits, [[6.0, 8.0, 0.0], [0.0, 0.0, 10.0]], atol=1e-6)


def test_needs_labels_counts_a_probe_head() -> None:
    assert needs_labels(DetectorSpec(HEAD_TEST, {"head": "probe"}))
    assert not needs_labels(DetectorSpec(HEAD_TEST))
    assert needs_labels(DetectorSpec("linear-probe")) and not needs_labels(DetectorSpec("knn"))


@pytest.mark.parametrize(
    ("head", "encoder", "labelled", "message"),
    [
        ("encoder", "efficientnet-lite0/block4", True, r"with head='encoder' scores the encoder"),
        ("encoder", "openclip:ViT-B-16/openai", True, r"has no linear classifier head"),
        ("zero-shot", "efficientnet-lite0", True, r"with head='zero-shot' needs a vision-lang"),
        ("probe", "efficientnet-lite0", False, r"with head='probe' scores a linear probe"),
    ],
)
def test_a_head_the_encoder_or_data_cannot_give_is_refused_by_name(
    head: str, encoder: str, labelled: bool, message: str
) -> None:
    with pytest.raises(InvalidParameterError, match=rf"^detector '{HEAD_TEST}' .*{message}"):
        check_compatibility(
            [DetectorSpec(HEAD_TEST, {"head": head})],
            labelled=labelled,
            id_label="flat",
            encoders={encoder: None},
        )


def test_what_the_name_cannot_tell_is_refused_once_the_encoder_is_built(small: Any) -> None:
    spec = [DetectorSpec(HEAD_TEST)]
    name = "timm:deit_tiny_distilled_patch16_224/random"
    check_compatibility(spec, labelled=True, id_label="x", encoders={name: None})  # unknown yet
    with pytest.raises(InvalidParameterError, match=r"has no linear classifier head"):
        check_compatibility(
            spec, labelled=True, id_label="x", encoders={name: create_encoder(name)}
        )
    check_compatibility(spec, labelled=True, id_label="x", encoders={SMALL: small})


# -- the runners ------------------------------------------------------------------------------


def test_refusals_come_before_any_extraction_in_fit(tmp_path: Path) -> None:
    from oodprobe.deploy import fit_deployment

    labelled = ArrayDataset(random_images(12, size=32), np.arange(12) % 3)
    flat = ArrayDataset(random_images(12, size=32), name="flat")
    cases = [
        (labelled, "efficientnet-lite0/block4@32", "encoder", "head='encoder'"),
        (labelled, SMALL, "zero-shot", "head='zero-shot'"),
        (flat, SMALL, "probe", "head='probe'"),
    ]
    for dataset, encoder, head, message in cases:
        with pytest.raises(InvalidParameterError, match=message):
            fit_deployment(
                dataset,
                encoder,
                DetectorSpec(HEAD_TEST, {"head": head}),
                cache_root=tmp_path / "cache",
                progress=False,
                num_workers=0,
            )
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("head", ["encoder", "probe"])
def test_a_deployed_post_hoc_detector_carries_its_head_through_fit_and_score(
    head: str, images: ArrayDataset, small: Any, tmp_path: Path
) -> None:
    from oodprobe.deploy import fit_deployment, score_with_deployment

    root = tmp_path / "cache"
    deployment = fit_deployment(
        images,
        SMALL,
        DetectorSpec(HEAD_TEST, {"head": head}),
        keep=0.9,
        cache_root=root,
        progress=False,
        num_workers=0,
    )
    weight = np.asarray(deployment.detector.head_weight)
    if head == "encoder":
        np.testing.assert_array_equal(weight, small.head_arrays()[0])
    else:  # fitted on the fit rows only: 3 classes, the feature dims
        assert weight.shape == (3, 1280)
    path = deployment.save(tmp_path / "head.safetensors")
    loaded = load_detector(path)
    assert loaded.head == head
    assert isinstance(loaded, HeadDetector)
    np.testing.assert_array_equal(np.asarray(loaded.head_weight), weight)
    new_images = ArrayDataset(random_images(5, size=32, seed=7), name="new")
    scored = score_with_deployment(path, new_images, cache_root=root, progress=False, num_workers=0)
    features = _extract(new_images, small, root).features
    np.testing.assert_allclose(scored.scores, deployment.detector.score_samples(features))


def test_a_benchmark_scores_post_hoc_detectors_with_each_head(
    cache_root: Path, tmp_path: Path
) -> None:
    from oodprobe.benchmark import execute_benchmark
    from oodprobe.benchmark_spec import spec_from_dict

    spec = spec_from_dict(
        {
            "name": "heads",
            "encoders": [SMALL, "efficientnet-lite0/block4@32"],
            "bootstrap": 0,
            "id": {
                "train": {"source": "digits:train", "classes": "0-2", "per_class": 8},
                "test": {"source": "digits:test", "classes": "0-2", "per_class": 4},
            },
            "ood": [{"source": "digits:test", "classes": "5-6", "per_class": 4, "name": "5-6"}],
            "detectors": [
                {"name": HEAD_TEST, "label": "encoder head"},
                {"name": HEAD_TEST, "params": {"head": "probe"}, "label": "probe head"},
            ],
        }
    )
    run = execute_benchmark(
        spec, tmp_path / "out", cache_root=cache_root, progress=False, skip_inapplicable=True
    )
    by_key = {(row.context.encoder, row.context.detector): row for row in run.rows}
    assert by_key[(SMALL, "encoder head")].error is None
    assert by_key[(SMALL, "probe head")].error is None
    assert by_key[("efficientnet-lite0/block4@32", "probe head")].error is None
    # the encoder head is not offered to a block without logits
    assert ("efficientnet-lite0/block4@32", "encoder head") not in by_key


# -- ensembles: the runner builds their heads and members -------------------------------------


def test_a_prob_ensemble_gets_a_probe_and_a_zero_shot_head_over_the_same_classes(
    tiny_openclip: str, small: Any
) -> None:
    from oodprobe.encoders.text import compute_class_embeddings

    encoder = create_encoder(tiny_openclip)
    assert isinstance(encoder, TextImageEncoder)
    names = ("zero", "one", "two", "three", "four", "five")
    embeddings = compute_class_embeddings(encoder, list(names))  # every class name of the data
    rng = np.random.default_rng(0)
    features = rng.normal(size=(30, encoder.feature_dim)).astype(np.float32)
    labels = 2 + np.arange(30) % 3  # a class selection: labels 2, 3, 4 of six names
    train = _feature_set(features, labels, class_names=names, key="prob-ensemble-test")
    spec = DetectorSpec("prob-ensemble", {"heads": ["probe", "zero-shot"]})
    assert needs_labels(spec) and needs_text([spec])
    detector = build_detector(spec, encoder, embeddings, train=train)
    probe_weight, zero_shot_weight = (np.asarray(w) for w in detector.head_weights)
    assert probe_weight.shape == (3, encoder.feature_dim)  # on the features
    assert zero_shot_weight.shape == (3, encoder.embed_dim)  # in the joint space
    np.testing.assert_allclose(
        zero_shot_weight, encoder.logit_scale * embeddings[[2, 3, 4]], rtol=1e-6
    )
    np.testing.assert_array_equal(probe_weight, probe_head(train)[0])
    projections = detector.image_projections
    assert projections[0] is None and projections[1].shape == (encoder.feature_dim, 32)
    scores = detector.fit(features).score_samples(features)
    assert scores.shape == (30,) and np.all((scores > 1 / 3 - 1e-9) & (scores <= 1))
    with pytest.raises(InvalidParameterError, match=r"different numbers of classes"):
        # the encoder's ImageNet head is over other classes than the probe's
        build_detector(
            DetectorSpec("prob-ensemble", {"heads": ["encoder", "probe"]}),
            small,
            None,
            train=_feature_set(
                rng.normal(size=(30, 1280)).astype(np.float32),
                labels,
                class_names=names,
                head=small.head_arrays(),
            ),
        )


def test_a_score_ensemble_gets_its_members_built_with_their_heads() -> None:
    features, labels = _synthetic()
    train = _feature_set(features, labels, key="score-ensemble-test")
    spec = DetectorSpec("score-ensemble", {"members": ["knn:k=1", f"{HEAD_TEST}:head=probe"]})
    assert needs_labels(spec) and not needs_text([spec])
    detector = build_detector(spec, None, None, train=train)
    knn, head = detector.member_detectors
    assert knn.name == "knn" and head.name == HEAD_TEST
    np.testing.assert_array_equal(head.head_weight, probe_head(train)[0])
    scores = detector.fit(features).score_samples(features)
    assert scores.shape == (60,) and np.all(np.isfinite(scores))
    with pytest.raises(InvalidParameterError, match=rf"^detector '{HEAD_TEST}' with head='probe'"):
        check_compatibility([spec], labelled=False, id_label="flat", encoders={SMALL: None})
    block = DetectorSpec("score-ensemble", {"members": ["knn", HEAD_TEST]})
    with pytest.raises(InvalidParameterError, match=r"has no linear classifier head"):
        check_compatibility([block], labelled=True, id_label="x", encoders={BLOCK: None})


def test_the_cli_fits_and_scores_a_post_hoc_detector_with_a_probe_head(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv

    from oodprobe.cli import main

    folder = tmp_path / "images"
    for index, image in enumerate(random_images(12, size=32, seed=3)):
        (folder / f"class{index % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"class{index % 3}" / f"{index}.png")
    detector_file, scores_csv, cache_dir = (
        tmp_path / "d.safetensors",
        tmp_path / "s.csv",
        tmp_path / "c",
    )
    common = ["--cache-dir", str(cache_dir), "--workers", "0"]
    detector = f"{HEAD_TEST}:head=probe"
    assert (
        main(["fit", str(folder), "-o", str(detector_file), "-e", SMALL, "-d", detector, *common])
        == 0
    )
    saved = load_detector(detector_file)
    assert isinstance(saved, HeadDetector) and np.asarray(saved.head_weight).shape == (3, 1280)
    assert (
        main(
            [
                "score",
                str(folder),
                "--detector-file",
                str(detector_file),
                "-o",
                str(scores_csv),
                *common,
            ]
        )
        == 0
    )
    with open(scores_csv) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and all(np.isfinite(float(row["score"])) for row in rows)
    capsys.readouterr()


def test_fit_labels_index_a_probe_heads_rows() -> None:
    from oodprobe.pipeline import fit_labels

    rng = np.random.default_rng(1)
    labels = 3 + 2 * (np.arange(300) % 3)  # classes 3, 5, 7: a probe head's rows 0, 1, 2
    features = (rng.normal(0, 3, (8, 32))[labels] + rng.normal(size=(300, 32))).astype(np.float32)
    train = _feature_set(features, labels, key="fit-labels-test")
    spec = DetectorSpec("temp-msp", {"head": "probe"})
    detector = build_detector(spec, None, None, train=train)
    rows = fit_labels(detector, spec, labels)
    np.testing.assert_array_equal(rows, (labels - 3) // 2)
    detector.fit(features, rows)
    assert np.all(np.isfinite(detector.score_samples(features)))
    label_free = DetectorSpec(HEAD_TEST, {"head": "probe"})  # its fit takes no labels
    assert (
        fit_labels(build_detector(label_free, None, None, train=train), label_free, labels) is None
    )


def test_text_detectors_prompt_only_the_id_training_sets_classes() -> None:
    """A class selection keeps the full name list (labels index it); prompting it would give
    the zero-shot head rows for the near-OOD classes, so only the selected classes are named."""
    from oodprobe.benchmark_spec import DataSpec
    from oodprobe.pipeline import id_class_names

    full = DataSpec("fashion-mnist:train", per_class=2).create(False)
    first = DataSpec("fashion-mnist:train", classes=(0, 1, 2, 3, 4), per_class=2).create(False)
    last = DataSpec("fashion-mnist:train", classes=(7, 5, 9), per_class=2).create(False)
    assert len(first.class_names) == 10  # the dataset's own list, indexed by label
    assert id_class_names(None, first) == list(full.class_names[:5])
    names = full.class_names
    assert id_class_names(None, last) == [names[5], names[7], names[9]]  # sorted labels
    assert id_class_names(["a", "b"], last) == ["a", "b"]  # the user's names as given
    assert id_class_names(None, full) == list(full.class_names)
    # ... and a detector fitted on labels over a zero-shot head gets the rows' indices
    from oodprobe.benchmark_spec import DetectorSpec
    from oodprobe.detectors import create_detector
    from oodprobe.pipeline import fit_labels

    spec = DetectorSpec("she", {"head": "zero-shot"})
    detector = create_detector("she", head="zero-shot")
    mapped = fit_labels(detector, spec, np.array([9, 5, 7, 5]))
    np.testing.assert_array_equal(mapped, [2, 0, 1, 0])


def test_temp_msp_fits_its_temperature_on_rows_its_probe_head_never_saw() -> None:
    """Guo et al. (ICML 2017) fit the temperature on a validation set the classifier was not
    trained on: the runner's probe is fitted on the rows temp-msp does not hold out."""
    rng = np.random.default_rng(1)
    labels = np.arange(300) % 3  # enough rows for the probe's recipe to beat chance
    features = (rng.normal(0, 4, (3, 6))[labels] + rng.normal(0, 1, (300, 6))).astype(np.float32)
    train = _feature_set(features, labels, key="temp-msp-holdout")
    spec = DetectorSpec("temp-msp", {"head": "probe", "holdout_fraction": 0.3, "seed": 4})
    detector = build_detector(spec, None, None, train=train)
    order = np.random.default_rng(4).permutation(300)
    held_out, kept = order[:90], np.sort(order[90:])
    expected = probe_head(train.subset(kept))
    np.testing.assert_array_equal(detector.head_weight, expected[0])
    np.testing.assert_array_equal(detector.head_bias, expected[1])
    assert not np.array_equal(detector.head_weight, probe_head(train)[0])
    detector.fit(features, labels)  # the same split: the temperature sees only held-out rows
    logits = features[held_out] @ expected[0].T.astype(np.float64) + expected[1]
    from oodprobe.detectors.posthoc_logits import fit_temperature

    assert detector.temperature_ == pytest.approx(fit_temperature(logits, labels[held_out]))
