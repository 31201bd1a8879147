"""NegLabel and GL-MCM (detectors/zeroshot.py) on synthetic joint spaces with known answers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from scipy.special import softmax
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from oodprobe.detectors import DETECTORS, create_detector, load_detector
from oodprobe.detectors.text import MCMDetector
from oodprobe.detectors.zeroshot import GLMCMDetector, NegLabelDetector
from oodprobe.errors import InvalidParameterError
from oodprobe.metrics import auroc
from oodprobe.mining import mine_negative_labels

N_CLASSES, JOINT_DIMS = 4, 16
CLASS_EMBEDDINGS = np.eye(N_CLASSES, JOINT_DIMS)  # t_c = e_c
OOD_DIRECTION = np.eye(JOINT_DIMS)[10]  # orthogonal to every t_c


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def near_ood_world(seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ID near t_c; OOD halfway between a class and a direction no ID label is near, so its
    class-cosine pattern looks like a (noisy) ID image's. The corpus holds that direction
    (far from every ID label: NegMining keeps it) and labels near the ID labels (it drops
    them). Returns (id_features, ood_features, corpus)."""
    rng = np.random.default_rng(seed)
    classes = np.arange(n) % N_CLASSES
    id_features = CLASS_EMBEDDINGS[classes] + 0.3 * rng.normal(size=(n, JOINT_DIMS))
    ood_features = (
        0.8 * CLASS_EMBEDDINGS[classes]
        + 0.8 * OOD_DIRECTION
        + 0.3 * rng.normal(size=(n, JOINT_DIMS))
    )
    near_id = unit(CLASS_EMBEDDINGS + 0.2 * rng.normal(size=(N_CLASSES, JOINT_DIMS)))
    far = unit(OOD_DIRECTION + 0.05 * rng.normal(size=(3, JOINT_DIMS)))
    corpus = np.vstack([near_id, far, near_id[::-1]])
    return id_features.astype(np.float32), ood_features.astype(np.float32), corpus


def neglabel(corpus: np.ndarray, **params: object) -> NegLabelDetector:
    detector = create_detector(
        "neglabel", class_embeddings=CLASS_EMBEDDINGS, corpus_embeddings=corpus, **params
    )
    assert isinstance(detector, NegLabelDetector)
    return detector


def hand_share(features: np.ndarray, negatives: np.ndarray, tau: float) -> np.ndarray:
    """S(x) = Σ_ID exp(cos/τ) / Σ_{ID ∪ neg} exp(cos/τ), written out with math.exp."""
    scores = []
    for row in features:
        u = row / np.linalg.norm(row)
        ids = [math.exp(float(u @ t) / np.linalg.norm(t) / tau) for t in CLASS_EMBEDDINGS]
        negs = [math.exp(float(u @ v) / np.linalg.norm(v) / tau) for v in negatives]
        scores.append(sum(ids) / (sum(ids) + sum(negs)))
    return np.array(scores)


# -- NegLabel -------------------------------------------------------------------------------


def test_negatives_near_the_ood_cluster_raise_auroc_over_mcm() -> None:
    for seed in range(3):
        id_features, ood_features, corpus = near_ood_world(seed)
        train, *_ = near_ood_world(seed + 10)
        detector = neglabel(corpus, n_negatives=3, n_groups=1).fit(train)
        assert sorted(detector.negative_indices_.tolist()) == [4, 5, 6]  # the far labels
        mcm = MCMDetector(class_embeddings=CLASS_EMBEDDINGS).fit(train)
        neg_auroc = auroc(detector.score_samples(id_features), detector.score_samples(ood_features))
        mcm_auroc = auroc(mcm.score_samples(id_features), mcm.score_samples(ood_features))
        assert mcm_auroc < 0.8, mcm_auroc  # the class pattern alone barely separates them
        assert neg_auroc > 0.95 and neg_auroc > mcm_auroc + 0.15, (neg_auroc, mcm_auroc)


@pytest.mark.parametrize("tau", [0.5, 0.05, 0.01])
def test_the_score_is_the_log_of_the_formula_computed_by_hand(tau: float) -> None:
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(9, JOINT_DIMS))
    features = rng.normal(size=(6, JOINT_DIMS)) + CLASS_EMBEDDINGS[rng.integers(0, 4, 6)]
    detector = neglabel(corpus, n_negatives=5, n_groups=1, temperature=tau).fit(features)
    negatives = corpus[detector.negative_indices_]
    np.testing.assert_array_equal(detector.negative_embeddings_, negatives)
    expected = hand_share(features, negatives, tau)
    np.testing.assert_allclose(np.exp(detector.score_samples(features)), expected, rtol=1e-12)


def test_one_group_is_the_plain_score_and_groups_average_their_own_scores() -> None:
    rng = np.random.default_rng(1)
    corpus = rng.normal(size=(30, JOINT_DIMS))
    features = rng.normal(size=(20, JOINT_DIMS))
    plain = neglabel(corpus, n_negatives=7, n_groups=1, temperature=0.1).fit(features)
    cosines = unit(features) @ np.vstack([CLASS_EMBEDDINGS, unit(plain.negative_embeddings_)]).T
    full = softmax(cosines / 0.1, axis=1)[:, :N_CLASSES].sum(axis=1)
    np.testing.assert_allclose(np.exp(plain.score_samples(features)), full, rtol=1e-12)

    grouped = neglabel(corpus, n_negatives=7, n_groups=3, temperature=0.1, seed=5).fit(features)
    groups = grouped.group_indices()
    # 7 mod 3 = 1 dropped: the least distant (stored last); the 6 others split 3 × 2
    assert groups.shape == (3, 2) and sorted(groups.ravel().tolist()) == list(range(6))
    np.testing.assert_array_equal(groups, grouped.group_indices())  # seeded
    per_group = [hand_share(features, grouped.negative_embeddings_[group], 0.1) for group in groups]
    np.testing.assert_allclose(
        np.exp(grouped.score_samples(features)), np.mean(per_group, axis=0), rtol=1e-12
    )
    assert not np.array_equal(
        groups, neglabel(corpus, n_negatives=7, n_groups=3, seed=6).fit(features).group_indices()
    )


def test_the_log_score_keeps_ranking_where_the_share_rounds_to_one() -> None:
    corpus = np.eye(JOINT_DIMS)[8:12]
    features = np.vstack([CLASS_EMBEDDINGS[0] + 0.01 * k * np.eye(JOINT_DIMS)[9] for k in range(5)])
    detector = neglabel(corpus, n_negatives=4, n_groups=2).fit(features)  # τ = 0.01
    scores = detector.score_samples(features)
    assert np.all(np.exp(scores) == 1.0)  # S itself cannot tell these five apart in float64
    assert np.all(np.diff(scores) < 0)  # its log can: closer to a negative, lower
    ood = np.vstack([np.eye(JOINT_DIMS)[8:12].sum(axis=0), np.eye(JOINT_DIMS)[8:10].sum(axis=0)])
    low = detector.score_samples(ood)  # cosine 0.5 / 0.71 to negatives, 0 to every ID label
    assert np.all(np.isfinite(low)) and np.all(low < -20)  # S ~ 1e-21: its log, not -inf
    np.testing.assert_allclose(np.exp(low[0]), 4 / (4 + 2 * np.exp(50)), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_torch_score_equals_numpy_and_has_finite_gradients(dtype: torch.dtype) -> None:
    id_features, ood_features, corpus = near_ood_world(0, n=16)
    projection = np.vstack([np.eye(JOINT_DIMS), 0.1 * np.ones((4, JOINT_DIMS))])  # D = 20
    rng = np.random.default_rng(0)
    pre = np.hstack([np.vstack([id_features, ood_features]), rng.normal(size=(32, 4))])
    detector = neglabel(corpus, n_negatives=5, n_groups=2, image_projection=projection)
    detector.fit(pre)
    features = torch.tensor(pre, dtype=dtype, requires_grad=True)
    scores = detector.score_samples_torch(features)
    expected = detector.score_samples(features.detach().double().numpy())
    tolerance = 1e-10 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(scores.detach().numpy(), expected, rtol=tolerance, atol=tolerance)
    scores.sum().backward()
    assert features.grad is not None and torch.all(torch.isfinite(features.grad))
    assert torch.count_nonzero(features.grad) > 0


def test_a_saved_neglabel_keeps_its_negatives_not_the_corpus(tmp_path: Path) -> None:
    id_features, ood_features, corpus = near_ood_world(0)
    big_corpus = np.vstack([corpus, unit(np.random.default_rng(0).normal(size=(500, 16)))])
    detector = neglabel(big_corpus, n_negatives=20, n_groups=4).fit(id_features)
    path = detector.save(tmp_path / "neglabel.safetensors")
    with safe_open(str(path), framework="np") as handle:
        names = set(handle.keys())
    assert names == {
        "param.class_embeddings",
        "state.negative_embeddings_",
        "state.negative_indices_",
    }
    loaded = load_detector(path)
    assert isinstance(loaded, NegLabelDetector) and loaded.corpus_embeddings is None
    queries = np.vstack([id_features, ood_features])
    np.testing.assert_array_equal(loaded.score_samples(queries), detector.score_samples(queries))
    np.testing.assert_array_equal(loaded.negative_indices_, detector.negative_indices_)
    params = {k: v for k, v in detector.get_params().items() if k != "corpus_embeddings"}
    loaded_params = {k: v for k, v in loaded.get_params().items() if k != "corpus_embeddings"}
    assert params.keys() == loaded_params.keys()
    assert all(np.array_equal(params[k], loaded_params[k]) for k in params)
    assert detector.corpus_embeddings is big_corpus  # saving changed nothing on the detector
    with pytest.raises(InvalidParameterError) as error:
        clone(loaded).fit(id_features)
    assert str(error.value).startswith("detector 'neglabel' needs corpus_embeddings")


def test_neglabel_contract_and_parameter_checks() -> None:
    id_features, _, corpus = near_ood_world(0)
    detector = neglabel(corpus, n_negatives=3, n_groups=1)
    with pytest.raises(NotFittedError):
        detector.score_samples(id_features)
    assert detector.fit(id_features) is detector
    before = id_features.copy()
    scores = detector.score_samples(id_features)
    assert scores.dtype == np.float64 and scores.shape == (len(id_features),)
    np.testing.assert_array_equal(id_features, before)
    np.testing.assert_array_equal(
        scores, clone(detector).fit(id_features).score_samples(id_features)
    )
    assert DETECTORS["neglabel"].runner_params == {
        "class_embeddings",
        "image_projection",
        "corpus_embeddings",
    }
    assert [info.name for info in NegLabelDetector.param_info()] == [
        "n_negatives",
        "percentile",
        "temperature",
        "n_groups",
        "seed",
        "corpus",  # which corpus the runner embeds (a user parameter since the runner wiring)
    ]
    defaults = {info.name: info.default for info in NegLabelDetector.param_info()}
    assert defaults == {
        "n_negatives": 10_000,
        "percentile": 0.05,
        "temperature": 0.01,
        "n_groups": 100,
        "seed": 0,
        "corpus": "wordnet",
    }
    with pytest.raises(InvalidParameterError) as error:
        create_detector("neglabel")
    assert str(error.value).startswith(
        "detector 'neglabel' needs class_embeddings, corpus_embeddings"
    )
    with pytest.raises(InvalidParameterError) as error:
        NegLabelDetector.check_params({"percentile": 1.5})
    assert str(error.value) == (
        "detector 'neglabel': percentile must be a number in [0, 1], got 1.5"
    )
    with pytest.raises(InvalidParameterError) as error:
        neglabel(corpus, n_negatives=3, n_groups=4).fit(id_features)
    assert str(error.value) == (
        "detector 'neglabel': n_groups must be <= n_negatives (3), got 4; each group needs at "
        "least one negative"
    )
    with pytest.raises(InvalidParameterError, match="n_negatives must be <= the 11 corpus"):
        neglabel(corpus, n_negatives=12, n_groups=1).fit(id_features)
    with pytest.raises(InvalidParameterError, match="corpus_embeddings has 8 columns"):
        neglabel(corpus[:, :8], n_negatives=2, n_groups=1).fit(id_features)


def test_neg_mining_in_fit_is_the_public_function() -> None:
    id_features, _, corpus = near_ood_world(3)
    detector = neglabel(corpus, n_negatives=6, percentile=0.2, n_groups=1).fit(id_features)
    expected = mine_negative_labels(CLASS_EMBEDDINGS, corpus, 6, 0.2)
    np.testing.assert_array_equal(detector.negative_indices_, expected)


# -- GL-MCM ---------------------------------------------------------------------------------


def hand_gl_mcm(tokens: np.ndarray, tau: float, lam: float) -> np.ndarray:
    return hand_gl_mcm_with(tokens, CLASS_EMBEDDINGS, tau, lam)


def hand_gl_mcm_with(
    tokens: np.ndarray, class_embeddings: np.ndarray, tau: float, lam: float
) -> np.ndarray:
    """max_c softmax(cos(g, t)/T) + λ max_p max_c softmax(cos(l_p, t)/T), token by token."""
    labels = unit(np.asarray(class_embeddings, dtype=np.float64))
    scores = []
    for image in tokens:
        cos = [unit(token.astype(np.float64)) @ labels.T for token in image]
        global_score = softmax(cos[0] / tau).max()
        local = max(softmax(patch / tau).max() for patch in cos[1:])
        scores.append(global_score + lam * local)
    return np.array(scores)


def multi_object_world(seed: int, n: int = 120, patches: int = 6) -> tuple[np.ndarray, ...]:
    """(n, 1 + P, E) tokens. ID: a cluttered image whose global embedding only leans to its
    class, but one patch shows the class clearly; OOD: as diffuse globally, no clear patch."""
    rng = np.random.default_rng(seed)
    classes = np.arange(n) % N_CLASSES
    clutter = np.eye(JOINT_DIMS)[8:16]

    def images(with_object: bool) -> np.ndarray:
        background = clutter[rng.integers(0, 8, size=(n, 1 + patches))]
        tokens = background + 0.2 * rng.normal(size=(n, 1 + patches, JOINT_DIMS))
        tokens[:, 0] += 0.45 * CLASS_EMBEDDINGS[classes]  # global: a lean, ID and OOD alike
        if with_object:
            tokens[np.arange(n), 1 + rng.integers(0, patches, n)] += 3.0 * CLASS_EMBEDDINGS[classes]
        return tokens.astype(np.float32)

    return images(True), images(False)


def test_gl_mcm_equals_a_hand_computation_and_reads_both_layouts() -> None:
    id_tokens, _ = multi_object_world(0, n=10)
    detector = GLMCMDetector(class_embeddings=CLASS_EMBEDDINGS, temperature=0.5, lambda_local=0.7)
    detector.fit(id_tokens)
    assert detector.n_tokens_ == 7 and detector.n_dims_ == 7 * JOINT_DIMS
    scores = detector.score_samples(id_tokens)
    np.testing.assert_allclose(scores, hand_gl_mcm(id_tokens, 0.5, 0.7), rtol=1e-12)
    flat = id_tokens.reshape(len(id_tokens), -1)
    np.testing.assert_array_equal(detector.score_samples(flat), scores)
    assert detector.similarities(flat).shape == (10, 7, N_CLASSES)
    np.testing.assert_array_equal(
        detector.zero_shot_predict(id_tokens),
        (id_tokens[:, 0] @ CLASS_EMBEDDINGS.T).argmax(axis=1),
    )


def test_gl_mcm_with_lambda_zero_is_mcm_of_the_global_token() -> None:
    id_tokens, ood_tokens = multi_object_world(1, n=20)
    tokens = np.vstack([id_tokens, ood_tokens])
    detector = GLMCMDetector(class_embeddings=CLASS_EMBEDDINGS, lambda_local=0.0).fit(tokens)
    mcm = MCMDetector(class_embeddings=CLASS_EMBEDDINGS).fit(tokens[:, 0])
    np.testing.assert_allclose(detector.score_samples(tokens), mcm.score_samples(tokens[:, 0]))


def test_local_patches_find_the_object_the_global_embedding_misses() -> None:
    id_tokens, ood_tokens = multi_object_world(2)
    train, _ = multi_object_world(3)
    gl = create_detector("gl-mcm", class_embeddings=CLASS_EMBEDDINGS).fit(train)  # T=1, λ=1
    mcm = MCMDetector(class_embeddings=CLASS_EMBEDDINGS).fit(train[:, 0])
    gl_auroc = auroc(gl.score_samples(id_tokens), gl.score_samples(ood_tokens))
    mcm_auroc = auroc(mcm.score_samples(id_tokens[:, 0]), mcm.score_samples(ood_tokens[:, 0]))
    assert mcm_auroc < 0.7 and gl_auroc > 0.98, (mcm_auroc, gl_auroc)


def test_gl_mcm_projects_every_token_when_given_the_projection() -> None:
    rng = np.random.default_rng(4)
    projection = rng.normal(size=(24, JOINT_DIMS))
    pre = rng.normal(size=(5, 3, 24))
    projected = unit(unit(pre) @ projection)
    with_projection = GLMCMDetector(class_embeddings=CLASS_EMBEDDINGS, image_projection=projection)
    without = GLMCMDetector(class_embeddings=CLASS_EMBEDDINGS)
    np.testing.assert_allclose(
        with_projection.fit(pre).score_samples(pre),
        without.fit(projected).score_samples(projected),
        rtol=1e-12,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["tokens", "flat"])
def test_gl_mcm_torch_equals_numpy_with_gradients(dtype: torch.dtype, layout: str) -> None:
    id_tokens, ood_tokens = multi_object_world(5, n=8)
    tokens = np.vstack([id_tokens, ood_tokens])
    detector = GLMCMDetector(class_embeddings=CLASS_EMBEDDINGS, temperature=0.2).fit(tokens)
    array = tokens if layout == "tokens" else tokens.reshape(len(tokens), -1)
    features = torch.tensor(array, dtype=dtype, requires_grad=True)
    scores = detector.score_samples_torch(features)
    assert scores.dtype in (torch.float32, torch.float64)
    expected = detector.score_samples(features.detach().double().numpy())
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(scores.detach().double().numpy(), expected, atol=tolerance)
    scores.sum().backward()
    assert features.grad is not None and features.grad.shape == features.shape
    assert torch.all(torch.isfinite(features.grad)) and torch.count_nonzero(features.grad) > 0


def test_gl_mcm_round_trip_and_contract(tmp_path: Path) -> None:
    id_tokens, ood_tokens = multi_object_world(6, n=12)
    detector = create_detector("gl-mcm", class_embeddings=CLASS_EMBEDDINGS, lambda_local=0.5)
    assert DETECTORS["gl-mcm"].input_array == "local"
    with pytest.raises(NotFittedError):
        detector.score_samples(id_tokens)
    assert detector.fit(id_tokens) is detector
    loaded = load_detector(detector.save(tmp_path / "gl.safetensors"))
    assert isinstance(loaded, GLMCMDetector) and loaded.n_tokens_ == 7
    queries = np.vstack([id_tokens, ood_tokens])
    np.testing.assert_array_equal(loaded.score_samples(queries), detector.score_samples(queries))
    assert [info.name for info in GLMCMDetector.param_info()] == ["temperature", "lambda_local"]


def test_gl_mcm_errors_name_the_expected_shape() -> None:
    detector = GLMCMDetector(class_embeddings=CLASS_EMBEDDINGS)
    with pytest.raises(InvalidParameterError) as error:
        detector.fit(np.ones((3, 1, JOINT_DIMS)))
    assert str(error.value) == (
        "gl-mcm needs the global token and at least one patch token per image, got 1 token(s) "
        "of 16 dimensions; pass the encoder's 'local' output (n, 1 + P, 16)"
    )
    with pytest.raises(InvalidParameterError, match="not a multiple of the 16-dimensional"):
        detector.fit(np.ones((3, 40)))
    with pytest.raises(InvalidParameterError, match=r"tokens of 8 dimensions .* \(n, 1 \+ P, 16\)"):
        detector.fit(np.ones((3, 4, 8)))
    detector.fit(np.ones((3, 4, JOINT_DIMS)))
    with pytest.raises(InvalidParameterError, match=r"must have shape \(n, 4, 16\) as at fit"):
        detector.score_samples(np.ones((3, 5, JOINT_DIMS)))
    with pytest.raises(InvalidParameterError, match="has 48 dimensions but the detector"):
        detector.score_samples(np.ones((3, 48)))
    bad = np.ones((3, 4, JOINT_DIMS))
    bad[1, 2, 3] = np.nan
    with pytest.raises(InvalidParameterError, match=r"NaN or inf in 1 row\(s\)"):
        detector.score_samples(bad)


def test_gl_mcm_scores_the_local_output_of_a_tiny_open_clip(tiny_openclip: str) -> None:
    """The encoder's ',local' output as the detector's input: token 0 is what MCM scores (so
    λ = 0 is MCM on the pre-projection features with the projection), and the torch score
    runs back to the pixels (the attack's path)."""
    from PIL import Image

    from oodprobe.encoders import create_encoder
    from oodprobe.encoders.text import compute_class_embeddings

    encoder = create_encoder(f"{tiny_openclip},local")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(6)]
    pixels = torch.stack([encoder.pixel_transform(image) for image in images])
    with torch.inference_mode():
        outputs = encoder(pixels)
    tokens, features = outputs["local"].numpy(), outputs["features"].numpy()
    class_embeddings = compute_class_embeddings(
        encoder, ["cat", "dog", "car"], ["a photo of a {}."]
    )
    detector = GLMCMDetector(class_embeddings=class_embeddings, temperature=0.1).fit(tokens)
    assert detector.n_tokens_ == tokens.shape[1] > 2
    np.testing.assert_allclose(
        detector.score_samples(tokens),
        hand_gl_mcm_with(tokens, class_embeddings, 0.1, 1.0),
        rtol=1e-10,
    )
    projection = encoder.image_projection.detach().numpy()
    mcm = MCMDetector(
        class_embeddings=class_embeddings, image_projection=projection, temperature=0.1
    )
    global_only = GLMCMDetector(class_embeddings=class_embeddings, temperature=0.1, lambda_local=0)
    np.testing.assert_allclose(
        global_only.fit(tokens).score_samples(tokens),
        mcm.fit(features).score_samples(features),
        rtol=1e-5,
    )
    attacked = pixels.clone().requires_grad_(True)
    detector.score_samples_torch(encoder(attacked)["local"]).sum().backward()
    assert attacked.grad is not None and attacked.grad.abs().sum() > 0


def test_neglabel_runs_on_a_tiny_open_clip_from_pixels_to_gradients(tiny_openclip: str) -> None:
    """Real text tower for the labels and a small corpus, pre-projection features with the
    projection (as the runner passes them), and a torch score back to the pixels."""
    from PIL import Image

    from oodprobe.encoders import create_encoder
    from oodprobe.encoders.text import compute_class_embeddings

    encoder = create_encoder(tiny_openclip)
    prompt = ["a photo of a {}."]
    class_embeddings = compute_class_embeddings(encoder, ["cat", "dog", "car"], prompt)
    terms = ["tree", "house", "river", "cloud", "chair", "spoon", "violin", "mountain"]
    corpus = compute_class_embeddings(encoder, terms, prompt)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(5)]
    pixels = torch.stack([encoder.pixel_transform(image) for image in images])
    with torch.inference_mode():
        features = encoder(pixels)["features"].numpy()
    projection = encoder.image_projection.detach().numpy()
    detector = create_detector(
        "neglabel",
        class_embeddings=class_embeddings,
        corpus_embeddings=corpus,
        image_projection=projection,
        n_negatives=4,
        n_groups=2,
    ).fit(features)
    np.testing.assert_array_equal(
        detector.negative_indices_, mine_negative_labels(class_embeddings, corpus, 4)
    )
    scores = detector.score_samples(features)
    joint = unit(unit(features.astype(np.float64)) @ projection)
    per_group = []
    for group in detector.group_indices():
        negatives = unit(detector.negative_embeddings_[group].astype(np.float64))
        logits = joint @ np.vstack([unit(class_embeddings.astype(np.float64)), negatives]).T
        per_group.append(softmax(logits / 0.01, axis=1)[:, :3].sum(axis=1))
    np.testing.assert_allclose(np.exp(scores), np.mean(per_group, axis=0), rtol=1e-9)
    attacked = pixels.clone().requires_grad_(True)
    detector.score_samples_torch(encoder(attacked)["features"]).sum().backward()
    assert attacked.grad is not None and torch.all(torch.isfinite(attacked.grad))


def test_a_neglabel_fits_saves_and_loads_where_its_corpus_is_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``corpus`` names what the runner embeds; a detector given the embeddings (or loaded with
    its mined negatives) needs neither WordNet nor the corpus file: a deployment machine may
    have neither. The runner still refuses a missing corpus before any work."""
    from oodprobe.benchmark_spec import DetectorSpec
    from oodprobe.corpus import WordNetMissingError
    from oodprobe.pipeline import check_detector_specs

    monkeypatch.setenv("OODPROBE_WORDNET", str(tmp_path / "no-wordnet"))
    id_features, ood_features, corpus = near_ood_world(0)
    detector = neglabel(corpus, n_negatives=3, n_groups=1).fit(id_features)  # corpus="wordnet"
    moved = create_detector(
        "neglabel",
        class_embeddings=CLASS_EMBEDDINGS,
        corpus_embeddings=corpus,
        n_negatives=3,
        n_groups=1,
        corpus=str(tmp_path / "gone.txt"),  # a corpus file no longer there
    ).fit(id_features)
    queries = np.vstack([id_features, ood_features])
    for fitted in (detector, moved):
        loaded = load_detector(fitted.save(tmp_path / "neglabel.safetensors"))
        np.testing.assert_array_equal(loaded.score_samples(queries), fitted.score_samples(queries))
    with pytest.raises(WordNetMissingError, match="apt-get install wordnet-base"):
        check_detector_specs([DetectorSpec("neglabel")])
    member = {"members": ["mcm", "neglabel"]}
    with pytest.raises(WordNetMissingError, match="apt-get install wordnet-base"):
        check_detector_specs([DetectorSpec("score-ensemble", member)])


def test_more_groups_than_negatives_is_refused_with_the_spec() -> None:
    """Before any work (the runner embeds the corpus first: hours for WordNet on a CPU): the
    default 100 groups with n_negatives=50 is refused by the parameter check."""
    from oodprobe.benchmark_spec import DetectorSpec
    from oodprobe.pipeline import check_detector_specs

    expected = (
        "detector 'neglabel': n_groups must be <= n_negatives (50), got 100; each group needs at "
        "least one negative"
    )
    with pytest.raises(InvalidParameterError) as error:
        NegLabelDetector.check_params({"n_negatives": 50})
    assert str(error.value) == expected
    with pytest.raises(InvalidParameterError) as error:
        check_detector_specs([DetectorSpec("neglabel", {"n_negatives": 50})])
    assert str(error.value) == expected
    NegLabelDetector.check_params({"n_negatives": 50, "n_groups": 50})  # one negative each
