"""MCM and PLP on synthetic vision-language setups with known answers, and a tiny open_clip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn.metrics import roc_auc_score

from oodprobe.arrays import l2_normalize
from oodprobe.detectors import load_detector
from oodprobe.detectors.probe import LinearProbeDetector
from oodprobe.detectors.text import MCMDetector, PLPDetector
from oodprobe.errors import InvalidParameterError

N_CLASSES, JOINT_DIMS = 4, 16
CLASS_EMBEDDINGS = np.eye(N_CLASSES, JOINT_DIMS)  # t_c = e_c
OOD_DIRECTION = np.eye(JOINT_DIMS)[10]  # orthogonal to every t_c
# lr 1e-2 (paper: 1e-3 over ~20k updates) so a few hundred updates suffice on these tiny sets
PROBE: dict[str, Any] = {"epochs": 20, "batch_size": 32, "lr": 1e-2}


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    truth = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return float(roc_auc_score(truth, np.r_[id_scores, ood_scores]))


def joint_space(n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ID features near t_c, OOD near a direction orthogonal to all t_c: (id, labels, ood)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % N_CLASSES
    id_features = CLASS_EMBEDDINGS[labels] + noise * rng.normal(size=(n, JOINT_DIMS))
    ood_features = OOD_DIRECTION + noise * rng.normal(size=(n, JOINT_DIMS))
    return id_features.astype(np.float32), labels, ood_features.astype(np.float32)


def pre_projection(
    n: int, seed: int, joint_signal: float = 3.0, hidden_signal: float = 4.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pre-projection features (D = 32) whose last 16 dims the projection drops.

    The first 16 dims are the joint-space picture, ``joint_signal`` · t_c plus unit noise, for
    ID *and* OOD alike (near-OOD: the text side cannot tell them apart). The last 16 carry
    ``hidden_signal`` · e_c for ID only, which a probe sees and zero-shot matching cannot: class
    clusters are better separated before the projection than after it.
    Returns (id_features, labels, ood_features, projection).
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % N_CLASSES
    ood_like = rng.integers(0, N_CLASSES, n)
    projection = np.vstack([np.eye(JOINT_DIMS), np.zeros((JOINT_DIMS, JOINT_DIMS))])
    hidden = np.eye(N_CLASSES, JOINT_DIMS)[labels] * hidden_signal
    id_features = np.hstack([joint_signal * CLASS_EMBEDDINGS[labels], hidden])
    ood_features = np.hstack([joint_signal * CLASS_EMBEDDINGS[ood_like], np.zeros_like(hidden)])
    id_features += rng.normal(size=id_features.shape)
    ood_features += rng.normal(size=ood_features.shape)
    return id_features.astype(np.float32), labels, ood_features.astype(np.float32), projection


# -- MCM --------------------------------------------------------------------------------------


def test_mcm_separates_features_near_class_embeddings_from_an_orthogonal_direction() -> None:
    id_features, labels, ood_features = joint_space(400, noise=0.2, seed=0)
    flat = MCMDetector(class_embeddings=CLASS_EMBEDDINGS).fit(id_features)
    sharp = MCMDetector(class_embeddings=CLASS_EMBEDDINGS, temperature=0.01).fit(id_features)
    flat_id, flat_ood = flat.score_samples(id_features), flat.score_samples(ood_features)
    # T = 1 on cosines in [-1, 1]: the softmax is nearly flat, scores stay near 1/C ...
    assert np.all(flat_id > 1 / N_CLASSES - 1e-9) and np.all(flat_id < 0.5)
    # ... but the ranking still separates ID from OOD.
    assert auroc(flat_id, flat_ood) > 0.99
    sharp_id = sharp.score_samples(id_features)
    assert np.median(sharp_id) > 0.99  # T = 0.01 (CLIP's scale 100): near one-hot on ID
    assert auroc(sharp_id, sharp.score_samples(ood_features)) > 0.95
    assert (flat.predict(id_features) == labels).mean() > 0.95


def test_mcm_with_projection_equals_the_hand_computed_score() -> None:
    rng = np.random.default_rng(1)
    features = rng.normal(size=(30, 24)).astype(np.float32) * 3
    projection = rng.normal(size=(24, JOINT_DIMS))
    embeddings = l2_normalize(rng.normal(size=(5, JOINT_DIMS)))
    joint = l2_normalize(l2_normalize(features.astype(np.float64)) @ projection)
    expected = softmax(joint @ embeddings.T / 0.5, axis=1).max(axis=1)
    detector = MCMDetector(
        class_embeddings=embeddings, image_projection=projection, temperature=0.5
    )
    detector.fit(features)
    assert (detector.n_dims_, detector.n_classes_) == (24, 5)
    np.testing.assert_allclose(detector.score_samples(features), expected, rtol=1e-12)
    np.testing.assert_allclose(detector.similarities(features), joint @ embeddings.T, rtol=1e-12)
    tensor = torch.tensor(features, dtype=torch.float64, requires_grad=True)
    torch_scores = detector.score_samples_torch(tensor)
    np.testing.assert_allclose(torch_scores.detach().numpy(), expected, rtol=1e-10)
    torch_scores.sum().backward()
    assert tensor.grad is not None and torch.count_nonzero(tensor.grad) > 0


def test_mcm_errors_name_the_shapes() -> None:
    projection = np.zeros((24, 8))
    with pytest.raises(InvalidParameterError, match=r"image_projection has shape \(24, 8\)"):
        MCMDetector(class_embeddings=CLASS_EMBEDDINGS, image_projection=projection).fit(
            np.ones((3, 24))
        )
    with pytest.raises(
        InvalidParameterError, match="24 dimensions but the detector was fitted on 16"
    ):
        MCMDetector(class_embeddings=CLASS_EMBEDDINGS).fit(np.ones((3, 24)))
    with pytest.raises(InvalidParameterError, match="class_embeddings needs at least 2 sample"):
        MCMDetector(class_embeddings=CLASS_EMBEDDINGS[:1]).fit(np.ones((3, 16)))


# -- PLP --------------------------------------------------------------------------------------


def test_plp_pseudo_labels_are_the_zero_shot_argmax() -> None:
    id_features, _, _, projection = pre_projection(400, seed=2)
    detector = PLPDetector(class_embeddings=CLASS_EMBEDDINGS, image_projection=projection, **PROBE)
    detector.fit(id_features)
    joint = l2_normalize(l2_normalize(id_features.astype(np.float64)) @ projection)
    expected = (joint @ CLASS_EMBEDDINGS.T).argmax(axis=1)
    np.testing.assert_array_equal(detector.zero_shot_predict(id_features), expected)
    np.testing.assert_array_equal(
        detector.pseudo_label_counts_, np.bincount(expected, minlength=N_CLASSES)
    )
    assert detector.weight_.shape == (N_CLASSES, 32)  # probe on pre-projection features


def test_plp_separates_features_near_class_embeddings_from_an_orthogonal_direction() -> None:
    id_features, _, _ = joint_space(400, noise=0.2, seed=0)
    test_id, _, test_ood = joint_space(400, noise=0.2, seed=1)
    plp = PLPDetector(class_embeddings=CLASS_EMBEDDINGS, **PROBE).fit(id_features)
    assert auroc(plp.score_samples(test_id), plp.score_samples(test_ood)) > 0.95


def test_plp_beats_mcm_when_classes_separate_better_before_the_projection() -> None:
    # The paper's claim (PLP > MCM) in miniature: zero-shot matching sees only the joint space,
    # where OOD looks like the classes; the probe also sees the dims the projection drops.
    id_features, _, _, projection = pre_projection(600, seed=3)
    test_id, test_labels, test_ood, _ = pre_projection(600, seed=4)
    text: dict[str, Any] = {"class_embeddings": CLASS_EMBEDDINGS, "image_projection": projection}
    mcm = MCMDetector(**text).fit(id_features)
    plp = PLPDetector(**text, **PROBE).fit(id_features)
    assert (mcm.predict(test_id) == test_labels).mean() > 0.9  # pseudo-labels are mostly right
    mcm_auroc = auroc(mcm.score_samples(test_id), mcm.score_samples(test_ood))
    plp_auroc = auroc(plp.score_samples(test_id), plp.score_samples(test_ood))
    assert mcm_auroc < 0.6
    assert plp_auroc > 0.85
    tensor = torch.tensor(test_id[:20], dtype=torch.float64)
    np.testing.assert_allclose(
        plp.score_samples_torch(tensor).numpy(), plp.score_samples(test_id[:20]), rtol=1e-6
    )


def test_plp_with_true_pseudo_labels_equals_the_linear_probe(tmp_path: Path) -> None:
    id_features, labels, _ = joint_space(200, noise=0.1, seed=5)
    plp = PLPDetector(class_embeddings=CLASS_EMBEDDINGS, epochs=5, batch_size=32).fit(id_features)
    np.testing.assert_array_equal(plp.zero_shot_predict(id_features), labels)
    probe = LinearProbeDetector(epochs=5, batch_size=32).fit(id_features, labels)
    np.testing.assert_array_equal(plp.weight_, probe.weight_)
    np.testing.assert_array_equal(plp.bias_, probe.bias_)
    np.testing.assert_array_equal(plp.score_samples(id_features), probe.score_samples(id_features))
    loaded = load_detector(plp.save(tmp_path / "plp.safetensors"))
    np.testing.assert_array_equal(loaded.score_samples(id_features), plp.score_samples(id_features))


def test_plp_keeps_outputs_for_classes_without_pseudo_labels() -> None:
    id_features, _, _ = joint_space(200, noise=0.1, seed=6)
    embeddings = np.vstack([CLASS_EMBEDDINGS, np.eye(JOINT_DIMS)[12]])  # class 4: nobody near
    plp = PLPDetector(class_embeddings=embeddings, **PROBE).fit(id_features)
    np.testing.assert_array_equal(plp.pseudo_label_counts_, [50, 50, 50, 50, 0])
    assert plp.weight_.shape == (5, JOINT_DIMS) and plp.logits(id_features).shape == (200, 5)
    assert np.all(np.isfinite(plp.score_samples(id_features)))
    assert not np.any(plp.predict(id_features) == 4)


def test_plp_refuses_a_single_pseudo_class() -> None:
    features = np.tile(CLASS_EMBEDDINGS[0], (20, 1)) + 0.01
    with pytest.raises(InvalidParameterError, match="put all 20 training samples in class 0"):
        PLPDetector(class_embeddings=CLASS_EMBEDDINGS).fit(features)


# -- a tiny random open_clip model, end to end ----------------------------------------------

PROMPTS = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of many {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
)


def test_text_path_runs_end_to_end_on_a_tiny_open_clip(tiny_openclip: str) -> None:
    import open_clip

    torch.manual_seed(1)
    model, _, _ = open_clip.create_model_and_transforms("tiny-test", pretrained=None)
    model.eval()
    tokenizer = open_clip.get_tokenizer("tiny-test")
    class_names = ["cat", "dog", "car", "tree"]
    with torch.no_grad():
        embeddings = []
        for name in class_names:
            texts = model.encode_text(tokenizer([prompt.format(name) for prompt in PROMPTS]))
            mean = torch.nn.functional.normalize(texts, dim=-1).mean(dim=0)
            embeddings.append(torch.nn.functional.normalize(mean, dim=0))
        class_embeddings = torch.stack(embeddings).numpy()
        # Solid colours: a random tower maps noise images all to one class, colours spread more.
        colours = torch.rand(48, 3, 1, 1, generator=torch.Generator().manual_seed(1))
        images = (colours * 2 - 0.5).expand(48, 3, 32, 32).contiguous()
        projection = model.visual.proj
        model.visual.proj = None  # the tower now returns pre-projection pooled features
        features = model.visual(images)
        model.visual.proj = projection
        joint = model.encode_image(images, normalize=True)
    assert features.shape == (48, 64) and class_embeddings.shape == (4, 32)
    by_hand = torch.nn.functional.normalize(
        torch.nn.functional.normalize(features, dim=-1) @ projection, dim=-1
    )
    torch.testing.assert_close(by_hand, joint, rtol=1e-5, atol=1e-5)

    text: dict[str, Any] = {
        "class_embeddings": class_embeddings,
        "image_projection": projection.detach().numpy(),
    }
    feature_array = features.numpy()
    mcm = MCMDetector(**text).fit(feature_array)
    expected = softmax(joint.double().numpy() @ class_embeddings.T, axis=1).max(axis=1)
    np.testing.assert_allclose(mcm.score_samples(feature_array), expected, rtol=1e-5)
    plp = PLPDetector(**text, epochs=2, batch_size=16).fit(feature_array)
    counts = np.bincount((joint.numpy() @ class_embeddings.T).argmax(axis=1), minlength=4)
    assert np.count_nonzero(counts) >= 2
    np.testing.assert_array_equal(plp.pseudo_label_counts_, counts)
    scores = plp.score_samples(feature_array)
    assert scores.shape == (48,) and np.all((scores > 0) & (scores <= 1))


# -- MCM's in-place float64 path (issue 12): equal to the float64 reference ----------------


def reference_mcm(
    features: np.ndarray, embeddings: np.ndarray, projection: np.ndarray | None, temperature: float
) -> np.ndarray:
    """The formula as written: normalise, project, normalise, cosines, softmax (float64)."""
    joint = l2_normalize(features.astype(np.float64))
    if projection is not None:
        joint = l2_normalize(joint @ projection)
    cosines = joint @ l2_normalize(embeddings.astype(np.float64)).T
    return np.asarray(softmax(cosines / temperature, axis=1).max(axis=1))


def adversarial_text_setup(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2,000 classes within 1e-6 of one direction, and images whose scores differ by ~1e-10.

    Every cosine of an image is within ~1e-6 of the others (near-equal cosines: the softmax is
    flat, so every class matters), and the images differ from each other by 1e-4 around the
    same direction, so their scores differ by ~1e-10 relative: a float32 computation (cosine
    errors ~1e-7) scrambles their order; a float64 one must not.
    """
    rng = np.random.default_rng(seed)
    n_classes, joint_dims, feature_dims = 2000, 64, 96
    base = l2_normalize(rng.normal(size=joint_dims))
    embeddings = base + 1e-6 * rng.normal(size=(n_classes, joint_dims))
    projection = rng.normal(size=(feature_dims, joint_dims))
    joint = base + 1e-4 * rng.normal(size=(200, joint_dims))
    features = joint @ np.linalg.pinv(projection)  # so that features @ projection = joint
    return features, embeddings, projection


def test_mcm_equals_the_float64_reference_on_adversarial_cases() -> None:
    features, embeddings, projection = adversarial_text_setup(seed=0)
    for temperature in (1.0, 0.01):
        detector = MCMDetector(
            class_embeddings=embeddings, image_projection=projection, temperature=temperature
        ).fit(features)
        scores = detector.score_samples(features)
        expected = reference_mcm(features, embeddings, projection, temperature)
        np.testing.assert_allclose(scores, expected, rtol=1e-12, atol=0)
        assert len(np.unique(expected)) == len(expected)  # distinct, so the order is defined
        np.testing.assert_array_equal(np.argsort(scores), np.argsort(expected))
        # the case is adversarial: float32 cosines lose this ranking
        joint32 = l2_normalize(
            l2_normalize(features.astype(np.float32)) @ projection.astype(np.float32)
        )
        cosines32 = joint32 @ l2_normalize(embeddings).astype(np.float32).T
        float32 = softmax(cosines32.astype(np.float64) / temperature, axis=1).max(axis=1)
        assert not np.array_equal(np.argsort(float32), np.argsort(expected))


@pytest.mark.parametrize("temperature", [1.0, 0.01])
def test_mcm_equals_the_float64_reference_on_random_and_edge_rows(temperature: float) -> None:
    rng = np.random.default_rng(7)
    features = rng.normal(size=(3000, 48)).astype(np.float32)  # > one block at 1,500 classes
    features[:3] = 0.0  # zero rows: cosines 0, score 1/C (l2_normalize leaves them zero)
    features[3] *= 1e-20  # a row of norm below l2_normalize's eps
    features[4] = features[5]  # an exact duplicate: an exact tie
    embeddings = rng.normal(size=(1500, 32))
    projection = rng.normal(size=(48, 32))
    for projected in (projection, None):
        dims = 48 if projected is not None else 32
        detector = MCMDetector(
            class_embeddings=embeddings,
            image_projection=projected,
            temperature=temperature,
        ).fit(features[:, :dims])
        scores = detector.score_samples(features[:, :dims])
        expected = reference_mcm(features[:, :dims], embeddings, projected, temperature)
        np.testing.assert_allclose(scores, expected, rtol=1e-12, atol=0)
        np.testing.assert_allclose(scores[:3], 1 / 1500, rtol=1e-12)
        assert scores[4] == scores[5]
        cosines = detector.similarities(features[:, :dims])
        assert np.all(np.abs(cosines) <= 1 + 1e-12)
        np.testing.assert_array_equal(
            detector.zero_shot_predict(features[3:, :dims]), cosines[3:].argmax(axis=1)
        )
