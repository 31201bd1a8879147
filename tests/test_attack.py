"""The attack core: budgets (float and saved PNG), score increase, AUROC drop, text detectors."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from oodprobe import attack
from oodprobe.benchmark_spec import DetectorSpec
from oodprobe.errors import InvalidParameterError


@dataclass
class Setup:
    encoder: Any
    train: torch.Tensor
    train_features: np.ndarray
    test: torch.Tensor
    ood: torch.Tensor
    knn: Any
    id_scores: np.ndarray


@pytest.fixture(scope="module")
def lite0() -> Setup:
    """EfficientNet-Lite0 @64 px (real weights), k-NN on 100 Fashion-MNIST training images.

    ID test: 50 Fashion-MNIST test images; OOD: 16 scikit-image textures (clean AUROC ≈ 0.99).
    """
    from oodprobe.data import create_dataset
    from oodprobe.detectors import create_detector
    from oodprobe.encoders import create_encoder

    torch.manual_seed(0)
    encoder = create_encoder("efficientnet-lite0@64")
    rng = np.random.default_rng(0)
    sets = []
    for name, count in (
        ("fashion-mnist:train", 100),
        ("fashion-mnist:test", 50),
        ("skimage-textures", 16),
    ):
        dataset = create_dataset(name)
        sets.append(
            attack.load_pixels(encoder, dataset, rng.choice(len(dataset), count, replace=False))
        )
    train, test, ood = sets
    train_features = attack.encode_images(encoder, train, device="cpu")
    knn = create_detector("knn").fit(train_features)
    id_scores = attack.score_images(encoder, knn, test, device="cpu")
    return Setup(encoder, train, train_features, test, ood, knn, id_scores)


@pytest.fixture(scope="module")
def clip(tiny_openclip: str) -> Any:
    from oodprobe.encoders import create_encoder

    torch.manual_seed(0)
    return create_encoder(tiny_openclip)


def _pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, size, size), generator=generator)


# -- PGD on EfficientNet-Lite0 ---------------------------------------------------------------


def test_pgd_linf_keeps_budget_raises_scores_and_drops_knn_auroc(
    lite0: Setup, tmp_path: Path
) -> None:
    eps = 8 / 255
    result = attack.pgd_score_attack(
        lite0.encoder, lite0.knn, lite0.ood, eps=eps, steps=10, device="cpu"
    )
    delta = result.adversarial - result.clean
    assert float(delta.abs().max()) <= eps + 1e-6
    assert float(result.adversarial.min()) >= 0.0 and float(result.adversarial.max()) <= 1.0
    assert result.adversarial.dtype == torch.float32
    assert result.clean_scores is not None and result.attacked_scores is not None
    success = result.success
    assert success is not None and success.all()
    assert (result.attacked_scores[success] > result.clean_scores[success]).all()
    # the reported scores are the detector's numpy scores of the returned images
    rescored = attack.score_images(lite0.encoder, lite0.knn, result.adversarial, device="cpu")
    np.testing.assert_allclose(rescored, result.attacked_scores, atol=1e-5)
    np.testing.assert_allclose(
        attack.score_images(lite0.encoder, lite0.knn, lite0.ood, device="cpu"),
        result.clean_scores,
        atol=1e-5,
    )
    evaluation = attack.evaluate_attack(
        lite0.id_scores, result.clean_scores, result.attacked_scores, threshold=0.6
    )
    print(
        f"\nPGD L∞ 8/255, 10 steps: clean AUROC {evaluation.clean.auroc:.3f} -> attacked "
        f"{evaluation.attacked.auroc:.3f}; FPR@95 {evaluation.clean.fpr:.3f} -> "
        f"{evaluation.attacked.fpr:.3f}; {result.seconds_per_image_step:.4f} s/image/step"
    )
    assert evaluation.clean.auroc >= 0.95
    assert evaluation.auroc_drop >= 0.3
    assert evaluation.attacked.fpr > evaluation.clean.fpr
    assert evaluation.attacked_acceptance is not None and evaluation.clean_acceptance is not None
    assert evaluation.attacked_acceptance > evaluation.clean_acceptance
    assert result.loss_history[-1] < result.loss_history[0]

    # the saved PNGs satisfy the budget themselves (clean quantised the same way) and still fool
    saved = attack.save_attack_images(result, tmp_path)
    assert len(saved["adversarial"]) == len(result) and saved["tensors"].is_file()
    png = attack.load_attack_images(saved["adversarial"])
    png_clean = attack.load_attack_images(saved["clean"])
    assert float((png - png_clean).abs().max()) <= eps + 1e-6
    np.testing.assert_array_equal(
        np.rint(png_clean.numpy() * 255), np.clip(np.rint(result.clean.numpy() * 255), 0, 255)
    )
    assert float((png - result.adversarial).abs().max()) <= 1 / 255 + 1e-6
    assert saved["perturbation"]["linf"].max() <= eps + 1e-6
    png_scores = attack.score_images(lite0.encoder, lite0.knn, png, device="cpu")
    png_evaluation = attack.evaluate_attack(
        lite0.id_scores,
        attack.score_images(lite0.encoder, lite0.knn, png_clean, device="cpu"),
        png_scores,
    )
    assert png_evaluation.auroc_drop >= 0.25
    summary = result.as_dict(perturbation=saved["perturbation"])
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary
    assert summary["budget"] == {"norm": "linf", "eps": eps}
    assert summary["per_image"]["success"] == [True] * len(result)
    assert summary["per_image"]["attacked_scores"] == result.attacked_scores.tolist()
    assert len(summary["loss_history"]) == 10
    assert evaluation.as_dict()["auroc_drop"] == pytest.approx(evaluation.auroc_drop)
    from safetensors.torch import load_file

    tensors = load_file(str(saved["tensors"]))
    torch.testing.assert_close(tensors["adversarial"], result.adversarial)


def test_pgd_l2_stays_in_its_ball(lite0: Setup, tmp_path: Path) -> None:
    eps = 0.5
    result = attack.pgd_score_attack(
        lite0.encoder, lite0.knn, lite0.ood[:4], eps=eps, norm="l2", steps=3, device="cpu"
    )
    norms = (result.adversarial - result.clean).flatten(1).norm(dim=1)
    assert float(norms.max()) <= eps + 1e-5
    assert float(result.adversarial.min()) >= 0.0 and float(result.adversarial.max()) <= 1.0
    assert result.attacked_scores is not None and result.clean_scores is not None
    assert (result.attacked_scores >= result.clean_scores).all()
    assert result.attacked_scores.mean() > result.clean_scores.mean()
    saved = attack.save_attack_images(result, tmp_path)
    png = attack.load_attack_images(saved["adversarial"])
    png_clean = attack.load_attack_images(saved["clean"])
    assert float((png - png_clean).flatten(1).norm(dim=1).max()) <= eps + 1e-6


def test_robustness_curve_falls_with_the_budget_on_saved_pngs(lite0: Setup) -> None:
    curve = attack.robustness_curve(
        lite0.encoder,
        lite0.knn,
        lite0.id_scores,
        lite0.ood[:8],
        [1 / 255, 8 / 255],
        steps=4,
        threshold=float(np.quantile(lite0.id_scores, 0.05)),
        device="cpu",
    )
    assert [eps for eps, _, _ in curve] == [1 / 255, 8 / 255]
    (_, small, _), (_, large, large_result) = curve
    assert small.clean.auroc == pytest.approx(large.clean.auroc)
    assert large.attacked.auroc < small.attacked.auroc
    assert large.attacked.auroc < large.clean.auroc - 0.2
    assert large.success_rate is not None and large.success_rate > 0
    assert large_result.budget == ("linf", 8 / 255)
    with pytest.raises(InvalidParameterError, match="eps must be a finite number > 0"):
        attack.robustness_curve(lite0.encoder, lite0.knn, lite0.id_scores, lite0.ood, [0.1, -1])


def test_evaluate_attack_success_rate_at_a_threshold() -> None:
    id_scores = np.array([0.9, 0.8, 0.7, 0.95])
    clean = np.array([0.1, 0.2, 0.75, 0.3])
    attacked = np.array([0.72, 0.2, 0.8, 0.69])
    evaluation = attack.evaluate_attack(id_scores, clean, attacked, threshold=0.7)
    assert evaluation.clean_acceptance == 0.25 and evaluation.attacked_acceptance == 0.5
    assert evaluation.success_rate == pytest.approx(1 / 3)  # of the 3 rejected clean, 1 passes
    assert evaluation.clean.auroc == pytest.approx(15 / 16)
    assert evaluation.attacked.auroc == pytest.approx(13.5 / 16)  # one tie at 0.8
    with pytest.raises(InvalidParameterError, match="one score per OOD image each"):
        attack.evaluate_attack(id_scores, clean, attacked[:2])


# -- the feature-matching attack ------------------------------------------------------------


def test_feature_matching_raises_cosine_and_lowers_auroc(lite0: Setup) -> None:
    images = lite0.ood[:8]
    targets = attack.random_targets(len(images), len(lite0.train), seed=0)
    result = attack.feature_matching_attack(
        lite0.encoder,
        images,
        lite0.train[targets],
        steps=20,
        lr=1e-2,
        smoothness=attack.SMOOTHNESS["smooth"],
        batch_size=8,
        device="cpu",
        target_indices=targets,
    )
    assert result.clean_cosines is not None and result.attacked_cosines is not None
    assert (result.attacked_cosines > result.clean_cosines + 0.1).all()
    assert result.loss_history[-1] < result.loss_history[0]
    assert float(result.adversarial.min()) >= 0.0 and float(result.adversarial.max()) <= 1.0
    # the recorded cosine is that of the returned images
    features = attack.encode_images(lite0.encoder, result.adversarial, device="cpu")
    target_features = lite0.train_features[targets]
    cosines = (features * target_features).sum(1) / (
        np.linalg.norm(features, axis=1) * np.linalg.norm(target_features, axis=1)
    )
    np.testing.assert_allclose(cosines, result.attacked_cosines, atol=1e-4)

    clean_scores = attack.score_images(lite0.encoder, lite0.knn, images, device="cpu")
    attacked_scores = lite0.knn.score_samples(features)
    evaluation = attack.evaluate_attack(lite0.id_scores, clean_scores, attacked_scores)
    # evaluated again with the targets removed from the k-NN reference set
    refitted = attack.refit_without_targets(lite0.knn, lite0.train_features, targets)
    assert refitted.train_features_.shape[0] == len(lite0.train) - len(np.unique(targets))
    removed = attack.evaluate_attack(
        refitted.score_samples(attack.encode_images(lite0.encoder, lite0.test, device="cpu")),
        refitted.score_samples(attack.encode_images(lite0.encoder, images, device="cpu")),
        refitted.score_samples(features),
    )
    sizes = result.perturbation()
    print(
        f"\nfeature matching, 20 steps lr 1e-2: cosine {result.clean_cosines.mean():.3f} -> "
        f"{result.attacked_cosines.mean():.3f}; AUROC {evaluation.clean.auroc:.3f} -> "
        f"{evaluation.attacked.auroc:.3f}; targets removed {removed.clean.auroc:.3f} -> "
        f"{removed.attacked.auroc:.3f}; L∞ {sizes['linf'].mean() * 255:.1f}/255, PSNR "
        f"{sizes['psnr'].mean():.1f} dB, SSIM {sizes['ssim'].mean():.3f}; "
        f"{result.seconds_per_image_step:.4f} s/image/step"
    )
    assert evaluation.attacked.auroc < evaluation.clean.auroc - 0.1
    assert removed.attacked.auroc < removed.clean.auroc


def test_feature_matching_is_seeded_and_independent_of_batch_size(clip: Any) -> None:
    images, targets = _pixels(4, 32, seed=1), _pixels(4, 32, seed=2)
    options: dict[str, Any] = {"steps": 3, "lr": 1e-2, "device": "cpu", "seed": 5}
    whole = attack.feature_matching_attack(clip, images, targets, batch_size=4, **options)
    split = attack.feature_matching_attack(clip, images, targets, batch_size=2, **options)
    again = attack.feature_matching_attack(clip, images, targets, batch_size=4, **options)
    torch.testing.assert_close(whole.adversarial, again.adversarial, rtol=0, atol=0)
    # the same δ₀ and, Adam being invariant to the 1/batch scale of the loss, nearly the same
    # steps (Adam's ε and float sums differ in the last digits)
    assert float((whole.adversarial - split.adversarial).abs().mean()) < 1e-5
    # a run in parts (or resumed on its unfinished images) draws each image's own noise
    first = attack.feature_matching_attack(clip, images[:3], targets[:3], **options)
    rest = attack.feature_matching_attack(clip, images[3:], targets[3:], image_ids=[3], **options)
    parts = torch.cat([first.adversarial, rest.adversarial])
    assert float((whole.adversarial - parts).abs().mean()) < 1e-5
    other = attack.feature_matching_attack(
        clip, images, targets, batch_size=4, **{**options, "seed": 6}
    )
    assert not torch.equal(whole.adversarial, other.adversarial)
    assert whole.params["smoothness"] == 5e3 and len(whole.loss_history) == 3


def test_smooth_attack_makes_smoother_perturbations_than_patchy(clip: Any) -> None:
    images, targets = _pixels(4, 32, seed=1) * 0.5 + 0.25, _pixels(4, 32, seed=2)
    options: dict[str, Any] = {"steps": 8, "lr": 1e-2, "device": "cpu"}
    smooth = attack.feature_matching_attack(
        clip, images, targets, smoothness=attack.SMOOTHNESS["smooth"], **options
    )
    patchy = attack.feature_matching_attack(
        clip, images, targets, smoothness=attack.SMOOTHNESS["patchy"], **options
    )
    roughness = [
        float(attack._smoothness(result.adversarial - result.clean)) for result in (smooth, patchy)
    ]
    assert roughness[0] < 0.5 * roughness[1]
    assert patchy.attacked_cosines is not None and patchy.clean_cosines is not None
    assert patchy.attacked_cosines.mean() > patchy.clean_cosines.mean()


def test_smoothness_penalty_is_the_mean_squared_finite_differences() -> None:
    delta = torch.tensor([[[[0.0, 1.0, 3.0], [0.0, 0.0, 0.0]]]]).repeat(1, 3, 1, 1)
    # vertical differences: 0, -1, -3 → mean 10/3; horizontal: 1, 2, 0, 0 → mean 5/4
    expected = 10 / 3 + 5 / 4
    assert float(attack._smoothness(delta)) == pytest.approx(expected)


def test_nearest_and_random_targets() -> None:
    train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    query = np.array([[10.0, 0.5], [0.1, 3.0], [2.0, 2.1]])
    np.testing.assert_array_equal(attack.nearest_targets(query, train), [0, 1, 2])
    np.testing.assert_array_equal(
        attack.select_targets("nearest", 3, train, features=query), [0, 1, 2]
    )
    np.testing.assert_array_equal(
        attack.select_targets("random", 2, train, seed=4), attack.random_targets(2, 3, seed=4)
    )
    with pytest.raises(InvalidParameterError, match="one of random, nearest, got 'far'"):
        attack.select_targets("far", 3, train)
    first = attack.random_targets(5, 10, seed=3)
    np.testing.assert_array_equal(first, attack.random_targets(5, 10, seed=3))
    assert len(np.unique(first)) == 5 and first.max() < 10
    assert len(attack.random_targets(12, 10, seed=0)) == 12


# -- every differentiable OOD detector --------------------------------------------------------


def _varied_pixels() -> torch.Tensor:
    """72 images: noise, grey levels and flat colours (distinct features under a random model)."""
    generator = torch.Generator().manual_seed(3)
    flat = torch.ones(24, 3, 32, 32)
    return torch.cat(
        [
            torch.rand((24, 3, 32, 32), generator=generator),
            torch.linspace(0, 1, 24).view(24, 1, 1, 1) * flat,
            torch.rand((24, 3, 1, 1), generator=generator) * flat,
        ]
    )


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("knn", {"k": 3}),
        ("deep-knn", {"k": 5}),
        ("gaussian", {}),
        ("mahalanobis", {}),
        ("relative-mahalanobis", {}),
        ("linear-probe", {"epochs": 5}),
    ],
)
def test_pgd_raises_the_score_of_every_differentiable_detector(
    clip: Any, name: str, params: dict[str, Any]
) -> None:
    from oodprobe.detectors import create_detector

    train = attack.encode_images(clip, _varied_pixels(), device="cpu")
    labels = np.repeat(np.arange(3), 24)
    detector = create_detector(name, **params).fit(train, labels)
    images = _pixels(4, 32, seed=8)
    result = attack.pgd_score_attack(clip, detector, images, eps=4 / 255, steps=3, device="cpu")
    assert result.clean_scores is not None and result.attacked_scores is not None
    assert (result.attacked_scores >= result.clean_scores).all()
    assert result.attacked_scores.mean() > result.clean_scores.mean()
    rescored = attack.score_images(clip, detector, result.adversarial, device="cpu")
    np.testing.assert_allclose(rescored, result.attacked_scores, rtol=1e-4, atol=1e-5)
    assert float((result.adversarial - images).abs().max()) <= 4 / 255 + 1e-6


def test_pgd_attacks_a_logits_detector_through_the_encoder_head(lite0: Setup) -> None:
    from oodprobe.detectors import create_detector

    logits = attack.encode_images(lite0.encoder, lite0.train, output="logits", device="cpu")
    detector = create_detector("logits", score="energy").fit(logits)
    result = attack.pgd_score_attack(
        lite0.encoder, detector, lite0.ood[:4], eps=4 / 255, steps=3, device="cpu"
    )
    assert result.clean_scores is not None and result.attacked_scores is not None
    assert (result.attacked_scores > result.clean_scores).all()
    rescored = attack.score_images(lite0.encoder, detector, result.adversarial, device="cpu")
    np.testing.assert_allclose(rescored, result.attacked_scores, rtol=1e-4, atol=1e-4)


# -- text detectors through the real CLIP path ------------------------------------------------


@pytest.mark.parametrize("name", ["mcm", "plp"])
def test_pgd_through_clip_text_detectors(clip: Any, name: str) -> None:
    from oodprobe.pipeline import build_detector, compute_text_embeddings

    embeddings = compute_text_embeddings(clip, [f"class {c}" for c in range(10)], "single")
    params = {"epochs": 5} if name == "plp" else {}
    detector = build_detector(DetectorSpec(name, params), clip, embeddings)
    assert detector.image_projection is not None  # pre-projection features, projected inside
    # the random model pseudo-labels these into more than one class
    train = attack.encode_images(clip, _varied_pixels(), device="cpu")
    detector.fit(train)
    images = _pixels(6, 32, seed=4)
    result = attack.pgd_score_attack(clip, detector, images, eps=8 / 255, steps=5, device="cpu")
    assert result.clean_scores is not None and result.attacked_scores is not None
    assert result.attacked_scores.mean() > result.clean_scores.mean()
    success = result.success
    assert success is not None and success.any()
    assert (result.attacked_scores[success] > result.clean_scores[success]).all()
    rescored = attack.score_images(clip, detector, result.adversarial, device="cpu")
    np.testing.assert_allclose(rescored, result.attacked_scores, rtol=1e-4, atol=1e-6)
    assert float((result.adversarial - images).abs().max()) <= 8 / 255 + 1e-6


# -- quantisation and perturbation sizes ------------------------------------------------------


def test_quantize_enforces_linf_budget_that_rounding_alone_breaks() -> None:
    eps = 0.01  # 2.55 levels: not a whole number of 1/255 steps
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand((3, 3, 8, 8), generator=generator) * 0.8 + 0.1  # off the 1/255 grid
    signs = torch.randint(0, 2, clean.shape, generator=generator) * 2 - 1
    adversarial = clean + eps * signs
    rounded = np.rint(adversarial.numpy() * 255) - np.rint(clean.numpy() * 255)
    assert np.abs(rounded).max() > 2  # plain rounding exceeds the budget by a level somewhere
    png = attack.quantize_to_png(adversarial, clean=clean, budget=("linf", eps))
    clean_png = attack.quantize_to_png(clean)
    assert png.dtype == np.uint8 and png.shape == (3, 8, 8, 3)
    difference = png.astype(int) - clean_png.astype(int)
    assert np.abs(difference).max() == 2
    # unbudgeted quantisation is round(x·255), channels last
    np.testing.assert_array_equal(
        attack.quantize_to_png(adversarial),
        np.clip(np.rint(adversarial.numpy() * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1),
    )


def test_quantize_enforces_l2_budget() -> None:
    clean = torch.full((2, 3, 4, 4), 0.5)
    adversarial = clean.clone()
    adversarial[0] += 0.6 / math.sqrt(48)  # L2 0.6, over a 0.5 budget
    png = attack.quantize_to_png(adversarial, clean=clean, budget=("l2", 0.5))
    difference = (png.astype(float) - attack.quantize_to_png(clean).astype(float)) / 255
    norms = np.linalg.norm(difference.reshape(2, -1), axis=1)
    assert norms[0] <= 0.5 and norms[0] > 0.45
    assert norms[1] == 0


def test_perturbation_sizes_match_hand_values() -> None:
    clean = torch.full((2, 3, 8, 8), 0.5)
    adversarial = clean.clone()
    adversarial[0] += 0.1
    sizes = attack.perturbation_sizes(clean, adversarial)
    assert sizes["linf"][0] == pytest.approx(0.1, abs=1e-6) and sizes["linf"][1] == 0
    assert sizes["l2"][0] == pytest.approx(0.1 * math.sqrt(192), rel=1e-5)
    assert sizes["psnr"][0] == pytest.approx(20.0, abs=1e-4) and sizes["psnr"][1] == math.inf
    assert sizes["ssim"][1] == pytest.approx(1.0)
    assert sizes["ssim"][0] < 1.0


# -- validation before any work ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"eps": 0}, "eps must be a finite number > 0 and <= 1, got 0"),
        ({"eps": 2.0}, "eps must be a finite number > 0 and <= 1, got 2.0"),
        ({"norm": "l1"}, "norm must be one of linf, l2, got 'l1'"),
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"step_size": -1.0}, "step_size must be a finite number > 0, got -1.0"),
        ({"random_start": "yes"}, "random_start must be true or false, got 'yes'"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"device": "gpu"}, "unknown device 'gpu'"),
        ({"precision": "fp16", "device": "cpu"}, "precision fp16 needs a GPU"),
        ({"precision": "fp64"}, "precision must be one of auto, fp32, fp16, bf16"),
        ({"image_ids": [0]}, "image_ids must be 2 non-negative integers"),
    ],
)
def test_pgd_refuses_bad_parameters(clip: Any, options: dict[str, Any], message: str) -> None:
    from oodprobe.detectors import create_detector

    detector = create_detector("knn").fit(np.random.default_rng(0).normal(size=(5, 64)))
    with pytest.raises(InvalidParameterError, match=message.replace("(", r"\(")):
        attack.pgd_score_attack(clip, detector, _pixels(2, 32), **options)


def test_pgd_refuses_detectors_and_images_it_cannot_attack(clip: Any) -> None:
    from oodprobe.detectors import create_detector

    features = np.random.default_rng(0).normal(size=(20, 64))
    images = _pixels(2, 32)
    with pytest.raises(InvalidParameterError, match="has no differentiable score"):
        attack.pgd_score_attack(clip, create_detector("lof", n_neighbors=3).fit(features), images)
    with pytest.raises(InvalidParameterError, match="'knn' is not fitted"):
        attack.pgd_score_attack(clip, create_detector("knn"), images)
    with pytest.raises(InvalidParameterError, match="scores the encoder's logits"):
        attack.pgd_score_attack(clip, create_detector("logits").fit(features), images)
    with pytest.raises(InvalidParameterError, match=r"pixels in \[0, 1\]"):
        attack.pgd_score_attack(clip, create_detector("knn").fit(features), images * 2 - 1)
    with pytest.raises(InvalidParameterError, match=r"shape \(N, 3, H, W\)"):
        attack.pgd_score_attack(clip, create_detector("knn").fit(features), images[0])


def test_feature_matching_refuses_bad_parameters(clip: Any) -> None:
    images = _pixels(2, 32)
    with pytest.raises(InvalidParameterError, match="targets must have the images' shape"):
        attack.feature_matching_attack(clip, images, images[:1])
    with pytest.raises(InvalidParameterError, match="lr must be a finite number > 0, got 0"):
        attack.feature_matching_attack(clip, images, images, lr=0)
    with pytest.raises(InvalidParameterError, match="smoothness must be a finite number >= 0"):
        attack.feature_matching_attack(clip, images, images, smoothness=-1.0)
    with pytest.raises(InvalidParameterError, match="target_indices must have one index"):
        attack.feature_matching_attack(clip, images, images, target_indices=[1])


def test_refit_without_targets_removes_them_and_keeps_labels() -> None:
    from oodprobe.detectors import create_detector

    features = np.eye(6)
    detector = create_detector("knn").fit(features)
    refitted = attack.refit_without_targets(detector, features, [1, 1, 4])
    assert refitted is not detector and refitted.train_features_.shape == (4, 6)
    assert detector.train_features_.shape == (6, 6)
    assert refitted.score_samples(features[[1]])[0] == pytest.approx(0.0)
    with pytest.raises(InvalidParameterError, match="target_indices must index the 6"):
        attack.refit_without_targets(detector, features, [6])
