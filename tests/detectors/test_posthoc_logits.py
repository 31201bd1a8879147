"""GEN, KL-matching, GradNorm, entropy and temperature-scaled MSP against known answers.

Each reference below is written from the paper's formula, independently of the module (plain
softmax, sorting, loops, scipy, torch autograd), on data where the answer is known.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import scipy.special
import scipy.stats
import torch

from oodprobe.detectors import DETECTORS, create_detector, load_detector, save_detector
from oodprobe.detectors.posthoc import HeadDetector
from oodprobe.detectors.posthoc_logits import fit_temperature, generalized_entropy
from oodprobe.errors import InvalidParameterError

from .conftest import ClusterData

NAMES = ("gen", "kl-matching", "gradnorm", "entropy", "temp-msp")
N_CLASSES, N_DIMS = 7, 5


def identity_head(n_classes: int) -> dict[str, npt.NDArray[np.float64]]:
    """A head whose logits are the features themselves (W = I, b = 0)."""
    return {"head_weight": np.eye(n_classes), "head_bias": np.zeros(n_classes)}


def random_problem(seed: int = 0, n: int = 60) -> dict[str, npt.NDArray[np.float64]]:
    rng = np.random.default_rng(seed)
    return {
        "features": rng.normal(size=(n, N_DIMS)) * 2.0,
        "weight": rng.normal(size=(N_CLASSES, N_DIMS)),
        "bias": rng.normal(size=N_CLASSES),
        "labels": rng.integers(0, N_CLASSES, n),
    }


def fitted(name: str, seed: int = 0, **params: object) -> tuple[HeadDetector, np.ndarray]:
    """A detector fitted on a random head whose labels are its own predictions (temp-msp)."""
    problem = random_problem(seed)
    detector = create_detector(
        name, head_weight=problem["weight"], head_bias=problem["bias"], **params
    )
    assert isinstance(detector, HeadDetector)
    logits = problem["features"] @ problem["weight"].T + problem["bias"]
    detector.fit(problem["features"], logits.argmax(axis=1))
    return detector, problem["features"]


# -- GEN ----------------------------------------------------------------------------------------


def reference_gen(logits: np.ndarray, gamma: float, top_m: int) -> np.ndarray:
    """The authors' formula: sort the softmax, keep the M largest, −Σ p^γ (1 − p)^γ."""
    probabilities = scipy.special.softmax(logits, axis=1)
    top = -np.sort(-probabilities, axis=1)[:, :top_m]
    return -np.sum(top**gamma * (1 - top) ** gamma, axis=1)


@pytest.mark.parametrize(("gamma", "top_m"), [(0.1, 100), (0.1, 3), (0.5, 1), (2.0, 7)])
def test_gen_equals_the_authors_formula(gamma: float, top_m: int) -> None:
    logits = np.random.default_rng(1).normal(size=(40, N_CLASSES)) * 3
    detector = create_detector("gen", gamma=gamma, top_m=top_m, **identity_head(N_CLASSES))
    scores = detector.fit(logits).score_samples(logits)
    np.testing.assert_allclose(scores, reference_gen(logits, gamma, top_m), rtol=1e-12)


def test_gen_of_uniform_logits_and_small_gamma_are_known() -> None:
    uniform = np.zeros((3, N_CLASSES))
    p = 1 / N_CLASSES
    for top_m in (1, 4, 100):  # M is capped at C
        expected = -min(top_m, N_CLASSES) * (p * (1 - p)) ** 0.1
        np.testing.assert_allclose(generalized_entropy(uniform, 0.1, top_m), expected)
    # γ → 0: every term p^γ (1 − p)^γ → 1 for 0 < p < 1, so the score → −M
    logits = np.random.default_rng(2).normal(size=(5, N_CLASSES))
    np.testing.assert_allclose(generalized_entropy(logits, 1e-9, 4), -4.0, rtol=1e-7)


def test_gen_is_exact_where_the_top_probability_rounds_to_one() -> None:
    # p_top = 1 / (1 + 2e^-100) is 1.0 in float64; 1 − p_top = 2e^-100 / (1 + 2e^-100)
    logits = np.array([[100.0, 0.0, 0.0]])
    log_rest = math.log(2) - 100 - math.log1p(2 * math.exp(-100))
    log_small = -100 - math.log1p(2 * math.exp(-100))  # log p of each 0-logit class
    log_one_minus_small = math.log1p(-math.exp(log_small))
    expected = -(math.exp(0.1 * log_rest) + 2 * math.exp(0.1 * (log_small + log_one_minus_small)))
    np.testing.assert_allclose(generalized_entropy(logits, 0.1, 3), expected, rtol=1e-12)


# -- KL-matching --------------------------------------------------------------------------------


def test_kl_matching_equals_the_reference_formula() -> None:
    problem = random_problem(3, n=200)
    detector = create_detector(
        "kl-matching", head_weight=problem["weight"], head_bias=problem["bias"]
    ).fit(problem["features"])
    train = scipy.special.softmax(problem["features"] @ problem["weight"].T + problem["bias"], 1)
    predicted = train.argmax(axis=1)
    typical = [train[predicted == k].mean(axis=0) for k in np.unique(predicted)]
    queries = random_problem(4)["features"]
    probabilities = scipy.special.softmax(queries @ problem["weight"].T + problem["bias"], 1)
    expected = [-min(scipy.stats.entropy(p, d) for d in typical) for p in probabilities]
    np.testing.assert_allclose(detector.score_samples(queries), expected, rtol=1e-10)
    np.testing.assert_array_equal(detector.typical_classes_, np.unique(predicted))


def test_kl_matching_is_zero_at_a_typical_posterior_and_negative_elsewhere() -> None:
    # every training row of a class has the same softmax: d_k is it, and KL(d_k ‖ d_k) = 0
    rows = np.array([[4.0, 0, 0, 0], [0, 3.0, 1, 0], [4.0, 0, 0, 0], [0, 3.0, 1, 0]])
    detector = create_detector("kl-matching", **identity_head(4)).fit(rows)
    np.testing.assert_allclose(detector.score_samples(rows), 0.0, atol=1e-12)
    assert detector.typical_classes_.tolist() == [0, 1]  # classes 2, 3 are never predicted
    others = np.random.default_rng(5).normal(size=(20, 4))
    assert np.all(detector.score_samples(others) < 0)


def test_kl_matching_fitted_in_blocks_equals_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    import oodprobe.detectors.posthoc_logits as module

    whole, features = fitted("kl-matching")
    monkeypatch.setattr(module, "_CHUNK", 7)
    blocked = fitted("kl-matching")[0]
    np.testing.assert_allclose(blocked.typical_log_probs_, whole.typical_log_probs_, rtol=1e-12)
    np.testing.assert_allclose(blocked.score_samples(features), whole.score_samples(features))


# -- GradNorm -----------------------------------------------------------------------------------


def autograd_gradnorm(
    head_features: np.ndarray, weight: np.ndarray, bias: np.ndarray, temperature: float
) -> np.ndarray:
    """The authors' loop: one sample per backward pass, all-ones targets, |∂L/∂W| summed."""
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0]).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    norms = []
    for row in torch.from_numpy(head_features):
        layer.zero_grad()
        outputs = layer(row[None]) / temperature
        targets = torch.ones_like(outputs)
        loss = torch.mean(torch.sum(-targets * torch.log_softmax(outputs, dim=-1), dim=-1))
        loss.backward()
        assert layer.weight.grad is not None
        norms.append(layer.weight.grad.abs().sum().item())
    return np.array(norms)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gradnorm_equals_its_autograd_value(temperature: float) -> None:
    problem = random_problem(6)
    detector = create_detector(
        "gradnorm",
        temperature=temperature,
        head_weight=problem["weight"],
        head_bias=problem["bias"],
    ).fit(problem["features"])
    expected = autograd_gradnorm(
        problem["features"], problem["weight"], problem["bias"], temperature
    )
    np.testing.assert_allclose(detector.score_samples(problem["features"]), expected, rtol=1e-10)


def test_gradnorm_of_a_zero_shot_head_uses_the_joint_space_features() -> None:
    rng = np.random.default_rng(7)
    features, projection = rng.normal(size=(10, N_DIMS)), rng.normal(size=(N_DIMS, 4))
    weight = 100 * scipy.stats.zscore(rng.normal(size=(N_CLASSES, 4)), axis=1) / 2
    detector = create_detector(
        "gradnorm", head="zero-shot", head_weight=weight, image_projection=projection
    ).fit(features)
    joint = features / np.linalg.norm(features, axis=1, keepdims=True) @ projection
    joint /= np.linalg.norm(joint, axis=1, keepdims=True)
    expected = autograd_gradnorm(joint, weight, np.zeros(N_CLASSES), 1.0)
    np.testing.assert_allclose(detector.score_samples(features), expected, rtol=1e-10)


def test_gradnorm_is_zero_for_a_uniform_softmax() -> None:
    detector = create_detector("gradnorm", **identity_head(4)).fit(np.eye(4))
    np.testing.assert_allclose(detector.score_samples(np.full((2, 4), 3.0)), 0.0, atol=1e-12)


# -- entropy ------------------------------------------------------------------------------------


def test_entropy_of_uniform_logits_is_minus_log_c_and_matches_scipy() -> None:
    detector = create_detector("entropy", **identity_head(N_CLASSES)).fit(np.eye(N_CLASSES))
    uniform = np.full((3, N_CLASSES), 1.5)
    np.testing.assert_allclose(detector.score_samples(uniform), -math.log(N_CLASSES))
    logits = np.random.default_rng(8).normal(size=(30, N_CLASSES)) * 4
    expected = -scipy.stats.entropy(scipy.special.softmax(logits, axis=1), axis=1)
    np.testing.assert_allclose(detector.score_samples(logits), expected, rtol=1e-12)
    # a one-hot-like row has entropy ~0 (the maximum score); logits of 800 stay finite
    assert detector.score_samples(800.0 * np.eye(N_CLASSES)[:1])[0] == pytest.approx(0, abs=1e-300)


# -- temperature-scaled MSP ---------------------------------------------------------------------


def test_temp_msp_recovers_the_temperature_the_labels_were_drawn_at() -> None:
    rng = np.random.default_rng(9)
    true_temperature, n_classes = 2.0, 10
    logits = rng.normal(size=(20000, n_classes)) * 4
    probabilities = scipy.special.softmax(logits / true_temperature, axis=1)
    labels = (probabilities.cumsum(axis=1) > rng.random((len(logits), 1))).argmax(axis=1)
    detector = create_detector("temp-msp", **identity_head(n_classes)).fit(logits, labels)
    assert detector.temperature_ == pytest.approx(true_temperature, rel=0.05)
    # the held-out part alone: the same fit as fit_temperature on those rows
    held_out = np.random.default_rng(0).permutation(len(logits))[:4000]
    assert detector.temperature_ == fit_temperature(logits[held_out], labels[held_out])
    expected = scipy.special.softmax(logits / detector.temperature_, axis=1).max(axis=1)
    np.testing.assert_allclose(detector.score_samples(logits), expected, rtol=1e-12)


def test_temp_msp_labels_must_be_the_heads_classes() -> None:
    logits = np.random.default_rng(10).normal(size=(50, 4))
    detector = create_detector("temp-msp", **identity_head(4))
    with pytest.raises(InvalidParameterError) as error:
        detector.fit(logits)
    assert str(error.value).startswith("temp-msp needs class labels")
    with pytest.raises(InvalidParameterError) as error:
        detector.fit(logits, np.r_[np.zeros(49, np.int64), 6])
    assert str(error.value) == (
        "temp-msp: labels must index the head's 4 classes (0..3), got a label 6; these are not "
        "the head's classes (e.g. another data set's classes under an ImageNet head): use "
        "head='probe' (a linear probe fitted on these labels)"
    )
    # valid indices, wrong classes: the head never predicts them (another data set's labels)
    wrong = (logits.argmax(axis=1) + 1) % 4
    with pytest.raises(InvalidParameterError, match=r"no better than chance \(accuracy 0\.000"):
        detector.fit(logits, wrong)
    # a probe head's rows are its sorted classes: the fix is to pass their indices
    probe = create_detector("temp-msp", head="probe", **identity_head(4))
    with pytest.raises(InvalidParameterError, match=r"return_inverse=True\)\[1\]\)$"):
        probe.fit(logits, np.r_[np.zeros(49, np.int64), 6])


def test_a_head_of_one_class_is_refused() -> None:
    for name in NAMES:
        if name == "gradnorm":
            continue  # defined (0) for one class
        with pytest.raises(InvalidParameterError, match="at least 2 classes"):
            create_detector(name, **identity_head(1)).fit(np.ones((4, 1)), np.zeros(4, int))


# -- torch == numpy, gradients, save/load -------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_torch_scores_equal_numpy_and_have_finite_gradients(name: str) -> None:
    detector, features = fitted(name)
    tensor = torch.tensor(features, requires_grad=True)
    scores = detector.score_samples_torch(tensor)
    assert scores.dtype == torch.float64
    np.testing.assert_allclose(
        scores.detach().numpy(), detector.score_samples(features), rtol=1e-10, atol=1e-12
    )
    scores.sum().backward()
    assert tensor.grad is not None and torch.all(torch.isfinite(tensor.grad))


@pytest.mark.parametrize("name", NAMES)
def test_saturated_float32_logits_keep_finite_scores_and_gradients(name: str) -> None:
    # p_top rounds to 1 and the others underflow in float32: log(1 − p) must not be log 0
    detector, _ = fitted(name)
    features = torch.tensor(
        np.random.default_rng(11).normal(size=(6, N_DIMS)) * 300, dtype=torch.float32
    )
    features.requires_grad_(True)
    scores = detector.score_samples_torch(features)
    assert scores.dtype == torch.float32 and torch.all(torch.isfinite(scores))
    scores.sum().backward()
    assert features.grad is not None and torch.all(torch.isfinite(features.grad))
    expected = detector.score_samples(features.detach().double().numpy())
    np.testing.assert_allclose(scores.detach().double().numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name: str, tmp_path: Path) -> None:
    detector, features = fitted(name)
    loaded = load_detector(save_detector(detector, tmp_path / f"{name}.safetensors"))
    assert type(loaded) is DETECTORS[name]
    np.testing.assert_array_equal(loaded.score_samples(features), detector.score_samples(features))
    for key, value in detector._get_state().items():
        np.testing.assert_array_equal(getattr(loaded, key), value)


@pytest.mark.parametrize("name", NAMES)
def test_cluster_data_id_scores_above_ood(name: str, cluster_data: ClusterData) -> None:
    # the unit class directions as the head: ID rows are confident (p_top ≈ 0.98), the OOD
    # centre is equidistant. (The class means themselves, 5x larger, make the OOD softmax
    # peaky too, and GradNorm's ‖h‖₁ factor, twice as large at the OOD centre, then wins.)
    detector = create_detector(name, head_weight=cluster_data.class_means / 5)
    detector.fit(cluster_data.train_features, cluster_data.train_labels)
    id_scores = detector.score_samples(cluster_data.test_features)
    ood_scores = detector.score_samples(cluster_data.ood_features)
    truth = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(truth, np.r_[id_scores, ood_scores]) > 0.95
