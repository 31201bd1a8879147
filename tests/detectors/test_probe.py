"""Logit scores, the ``logits`` detector and the linear probe (``linear-probe``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from oodprobe.detectors import create_detector, load_detector
from oodprobe.detectors import probe as probe_module
from oodprobe.detectors.probe import (
    LinearProbeDetector,
    LogitsDetector,
    cross_entropy_gradient,
    make_optimizer,
    max_logit,
    msp,
    negative_energy,
    warmup_cosine_factor,
)
from oodprobe.errors import InvalidParameterError


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    truth = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return float(roc_auc_score(truth, np.r_[id_scores, ood_scores]))


def clusters(
    n: int, n_classes: int = 4, n_dims: int = 12, spread: float = 0.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters around ±3 on the first ``n_classes`` axes; the other axes are noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    centers = np.zeros((n_classes, n_dims))
    centers[np.arange(n_classes), np.arange(n_classes)] = 3.0
    features = centers[labels] + spread * rng.normal(size=(n, n_dims))
    return features.astype(np.float32), labels


# -- logit scores -----------------------------------------------------------------------------


def test_logit_scores_on_hand_computed_vectors() -> None:
    logits = np.array([[0.0, math.log(3.0)], [1.0, 1.0]])
    np.testing.assert_allclose(msp(logits), [0.75, 0.5])
    np.testing.assert_allclose(negative_energy(logits), [math.log(4.0), 1.0 + math.log(2.0)])
    np.testing.assert_allclose(max_logit(logits), [math.log(3.0), 1.0])
    # T = 2: z / T = [0, ln(3) / 2] -> exp = [1, sqrt(3)]
    root3 = math.sqrt(3.0)
    np.testing.assert_allclose(msp(logits[:1], temperature=2.0), [root3 / (1 + root3)])
    np.testing.assert_allclose(negative_energy(logits[:1], 2.0), [2 * math.log(1 + root3)])
    assert msp(logits).dtype == np.float64


def test_logit_scores_are_stable_at_huge_logits() -> None:
    logits = np.array([[1e4, 0.0, -1e4], [1e4, 1e4, 1e4], [-1e6, -1e6, -1e6]])
    np.testing.assert_allclose(msp(logits), [1.0, 1 / 3, 1 / 3])
    np.testing.assert_allclose(
        negative_energy(logits), [1e4, 1e4 + math.log(3), -1e6 + math.log(3)]
    )
    np.testing.assert_allclose(max_logit(logits), [1e4, 1e4, -1e6])
    for score, function in [("msp", msp), ("energy", negative_energy)]:
        torch_scores = probe_module.score_logits_torch(torch.tensor(logits), score)
        np.testing.assert_allclose(torch_scores.numpy(), function(logits))


def test_logit_scores_equal_scipy_on_random_logits_and_ties() -> None:
    logits = np.random.default_rng(0).normal(size=(40_000, 9)) * 20  # > one row block
    logits[:5] = 7.0  # exact ties
    for temperature in (1.0, 0.3, 10.0):
        scaled = logits / temperature
        np.testing.assert_allclose(msp(logits, temperature), softmax(scaled, axis=1).max(axis=1))
        np.testing.assert_allclose(
            negative_energy(logits, temperature), temperature * logsumexp(scaled, axis=1)
        )
    np.testing.assert_allclose(msp(logits[:5]), 1 / 9)
    assert msp(logits.astype(np.float32)).dtype == np.float64


def test_logit_scores_reject_bad_input() -> None:
    with pytest.raises(InvalidParameterError, match="temperature must be a finite number > 0"):
        msp(np.zeros((2, 3)), temperature=0.0)
    with pytest.raises(
        InvalidParameterError, match=r"logits must be a numeric 2-D .* got shape \(3,\)"
    ):
        max_logit(np.zeros(3))


def test_logits_detector_scores_precomputed_logits() -> None:
    logits = np.random.default_rng(0).normal(size=(20, 7)) * 5
    for score, expected in [
        ("msp", msp(logits, 2.0)),
        ("energy", negative_energy(logits, 2.0)),
        ("max-logit", max_logit(logits)),
    ]:
        detector = LogitsDetector(score=score, temperature=2.0).fit(logits)  # type: ignore[arg-type]
        assert detector.n_dims_ == 7
        np.testing.assert_allclose(detector.score_samples(logits), expected)
        torch_scores = detector.score_samples_torch(torch.tensor(logits))
        np.testing.assert_allclose(torch_scores.numpy(), expected)
    with pytest.raises(
        InvalidParameterError, match="6 dimensions but the detector was fitted on 7"
    ):
        detector.score_samples(logits[:, :6])
    with pytest.raises(
        InvalidParameterError,
        match=r"^detector 'logits': score must be one of msp, energy, max-logit, got 'entropy'$",
    ):
        LogitsDetector(score="entropy").fit(logits)  # type: ignore[arg-type]


# -- training pieces ------------------------------------------------------------------------


def test_schedule_warms_up_over_10_percent_then_cosine_to_zero() -> None:
    weight = torch.zeros(3, requires_grad=True)
    optimizer, scheduler = make_optimizer(
        [weight], total_steps=100, lr=1e-3, weight_decay=1e-3, warmup_fraction=0.1
    )
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])  # the lr this update uses
        weight.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()
    np.testing.assert_allclose(lrs[:10], np.arange(1, 11) * 1e-4)  # linear warm-up to the peak
    assert lrs[10] == pytest.approx(1e-3)
    assert np.all(np.diff(lrs[10:]) < 0)  # cosine decay
    assert lrs[55] == pytest.approx(0.5e-3)  # halfway through the cosine: half the peak
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)  # ends at 0
    assert optimizer.param_groups[0]["weight_decay"] == 1e-3
    assert isinstance(optimizer, torch.optim.Adam)  # coupled L2, not AdamW
    assert warmup_cosine_factor(0, 10, 0) == 1.0  # no warm-up: start at the peak


def test_training_uses_one_schedule_over_all_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, float] = {}
    real = probe_module.make_optimizer

    def spy(parameters: list[torch.Tensor], **options: float) -> object:
        seen.update(options)
        return real(parameters, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(probe_module, "make_optimizer", spy)
    features, labels = clusters(100)
    LinearProbeDetector(epochs=3, batch_size=32).fit(features, labels)
    assert seen == {"total_steps": 3 * 4, "lr": 1e-3, "weight_decay": 1e-3, "warmup_fraction": 0.1}


def test_closed_form_gradient_equals_autograd() -> None:
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(17, 6, generator=generator)
    targets = torch.randint(0, 4, (17,), generator=generator)
    weight = torch.randn(4, 6, generator=generator, requires_grad=True)
    bias = torch.randn(4, generator=generator, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(batch, weight, bias), targets
    )
    loss.backward()
    with torch.no_grad():
        grad_weight, grad_bias = cross_entropy_gradient(batch, targets, weight, bias)
    torch.testing.assert_close(grad_weight, weight.grad)
    torch.testing.assert_close(grad_bias, bias.grad)


# -- the linear probe -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted_probe() -> tuple[LinearProbeDetector, np.ndarray, np.ndarray]:
    features, labels = clusters(800)
    # lr 1e-3 needs ~1000+ updates to overcome the random initialisation
    detector = LinearProbeDetector(epochs=60, batch_size=32).fit(features, labels)
    return detector, features, labels


def test_probe_classifies_separable_clusters_and_rejects_a_far_cluster(
    fitted_probe: tuple[LinearProbeDetector, np.ndarray, np.ndarray],
) -> None:
    detector, _, _ = fitted_probe
    test_features, test_labels = clusters(400, seed=1)
    assert (detector.predict(test_features) == test_labels).mean() >= 0.99
    np.testing.assert_allclose(detector.predict_proba(test_features).sum(axis=1), 1.0)
    assert detector.logits(test_features).shape == (400, 4)
    # A cluster 6 spreads from every class cluster, in the middle of them: no class fits it.
    # (Far out along axes the training data never varied in, a linear probe extrapolates and
    # can be *more* confident than on ID data; that is the model, not a bug to test away.)
    far = (0.5 * np.random.default_rng(2).normal(size=(400, 12))).astype(np.float32)
    assert auroc(detector.score_samples(test_features), detector.score_samples(far)) > 0.97


def test_probe_state_is_numpy_and_torch_scores_match(
    fitted_probe: tuple[LinearProbeDetector, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    detector, features, _ = fitted_probe
    assert detector.weight_.shape == (4, 12) and detector.bias_.shape == (4,)
    assert detector.mean_.shape == detector.std_.shape == (12,)
    np.testing.assert_allclose(detector.mean_, features.mean(axis=0), atol=1e-5)
    tensor = torch.tensor(features[:50], dtype=torch.float64, requires_grad=True)
    torch_scores = detector.score_samples_torch(tensor)
    np.testing.assert_allclose(torch_scores.detach().numpy(), detector.score_samples(features[:50]))
    torch_scores.sum().backward()
    assert tensor.grad is not None and torch.count_nonzero(tensor.grad) > 0
    loaded = load_detector(detector.save(tmp_path / "probe.safetensors"))
    np.testing.assert_array_equal(loaded.score_samples(features), detector.score_samples(features))


def test_probe_is_deterministic_under_its_seed() -> None:
    features, labels = clusters(200)
    first = LinearProbeDetector(epochs=3, batch_size=32).fit(features, labels)
    second = LinearProbeDetector(epochs=3, batch_size=32).fit(features, labels)
    other = LinearProbeDetector(epochs=3, batch_size=32, seed=7).fit(features, labels)
    np.testing.assert_array_equal(first.weight_, second.weight_)
    np.testing.assert_array_equal(first.bias_, second.bias_)
    assert not np.array_equal(first.weight_, other.weight_)


def test_probe_matches_sklearn_logistic_regression_accuracy() -> None:
    features, labels = clusters(1200, n_classes=5, n_dims=20, spread=1.2, seed=3)
    test_features, test_labels = clusters(1200, n_classes=5, n_dims=20, spread=1.2, seed=4)
    reference = LogisticRegression(max_iter=1000).fit(features, labels)
    reference_accuracy = (reference.predict(test_features) == test_labels).mean()
    detector = LinearProbeDetector(epochs=40, batch_size=32).fit(features, labels)
    accuracy = (detector.predict(test_features) == test_labels).mean()
    assert 0.8 < reference_accuracy < 0.999  # not trivially separable
    assert abs(accuracy - reference_accuracy) <= 0.015


def test_probe_maps_arbitrary_label_values() -> None:
    features, labels = clusters(200)
    detector = LinearProbeDetector(epochs=10, batch_size=32, lr=1e-2)
    detector.fit(features, labels * 10 + 3)
    np.testing.assert_array_equal(detector.classes_, [3, 13, 23, 33])
    assert (detector.predict(features) == labels * 10 + 3).mean() > 0.95


def test_probe_errors_say_what_to_do() -> None:
    features, labels = clusters(40)
    with pytest.raises(InvalidParameterError, match="linear-probe needs class labels"):
        LinearProbeDetector().fit(features)
    cases = [
        (
            lambda: LinearProbeDetector(epochs=0).fit(features, labels),
            "detector 'linear-probe': epochs must be an integer >= 1, got 0",
        ),
        (
            lambda: LinearProbeDetector(warmup_fraction=1).fit(features, labels),
            "detector 'linear-probe': warmup_fraction must be a number in [0, 1), got 1",
        ),
        (
            lambda: LinearProbeDetector(device="gpu").fit(features, labels),
            "detector 'linear-probe': device must be a device name (auto, cpu, cuda, "
            "cuda:<index> or mps), got 'gpu'",
        ),
        (
            lambda: create_detector("linear-probe", k=3),
            "unknown parameter 'k' for detector 'linear-probe'; valid parameters: batch_size, "
            "device, epochs, lr, precision, score, seed, temperature, warmup_fraction, "
            "weight_decay",
        ),
    ]
    for call, message in cases:
        with pytest.raises(InvalidParameterError) as error:
            call()
        assert str(error.value) == message


# -- the fast trainer (issue 12): same updates as the plain loop, options ----------------------


def plain_loop(
    features: np.ndarray, labels: np.ndarray, n_classes: int, epochs: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The textbook loop: LambdaLR per batch, unfused Adam, per-batch standardisation."""
    mean = features.astype(np.float64).mean(axis=0)
    std = features.astype(np.float64).std(axis=0)
    data = torch.tensor((features - mean) / std, dtype=torch.float32)
    targets = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(42)
    bound = 1 / math.sqrt(features.shape[1])
    weight = (torch.rand(n_classes, features.shape[1], generator=generator) * 2 - 1) * bound
    bias = (torch.rand(n_classes, generator=generator) * 2 - 1) * bound
    total = epochs * math.ceil(len(features) / batch_size)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2, weight_decay=1e-3, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, total, int(0.1 * total))
    )
    with torch.no_grad():
        for _ in range(epochs):
            order = torch.randperm(len(features), generator=generator)
            for start in range(0, len(features), batch_size):
                index = order[start : start + batch_size]
                weight.grad, bias.grad = cross_entropy_gradient(
                    data[index], targets[index], weight, bias
                )
                optimizer.step()
                scheduler.step()
    return weight.numpy(), bias.numpy()


def test_fast_trainer_makes_the_plain_loops_updates() -> None:
    features, labels = clusters(300)
    features = features * 5 + 2  # standardisation matters
    expected_weight, expected_bias = plain_loop(features, labels, 4, epochs=3, batch_size=64)
    for resident_bytes in (1 << 30, 0):  # whole standardised copy, or per-batch gather
        state = probe_module.train_linear_probe(
            features, labels, 4, epochs=3, batch_size=64, lr=1e-2, weight_decay=1e-3,
            warmup_fraction=0.1, seed=42, device="cpu", resident_bytes=resident_bytes,
        )  # fmt: skip
        np.testing.assert_allclose(state["weight"], expected_weight, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(state["bias"], expected_bias, rtol=1e-4, atol=1e-6)


def test_chunked_big_batches_and_full_batch_make_the_same_update(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    features, labels = clusters(100)
    options: dict[str, Any] = {
        "lr": 1e-2, "weight_decay": 1e-3, "warmup_fraction": 0.1, "seed": 42, "device": "cpu"
    }  # fmt: skip
    whole = probe_module.train_linear_probe(
        features, labels, 4, epochs=4, batch_size=100, **options
    )
    full = probe_module.train_linear_probe(
        features, labels, 4, epochs=4, batch_size="full", **options
    )
    np.testing.assert_array_equal(full["weight"], whole["weight"])
    monkeypatch.setattr(probe_module, "_TRAIN_CHUNK", 7)  # 100 rows in 15 chunks
    for resident_bytes in (1 << 30, 0):
        chunked = probe_module.train_linear_probe(
            features, labels, 4, epochs=4, batch_size="full", resident_bytes=resident_bytes,
            **options,
        )  # fmt: skip
        np.testing.assert_allclose(chunked["weight"], whole["weight"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(chunked["bias"], whole["bias"], rtol=1e-5, atol=1e-6)
    # a batch of 40 in chunks of 7 (the last chunk short), against unchunked batches of 40
    batches = probe_module.train_linear_probe(
        features, labels, 4, epochs=2, batch_size=40, **options
    )
    monkeypatch.setattr(probe_module, "_TRAIN_CHUNK", 8192)
    unchunked = probe_module.train_linear_probe(
        features, labels, 4, epochs=2, batch_size=40, **options
    )
    np.testing.assert_allclose(batches["weight"], unchunked["weight"], rtol=1e-5, atol=1e-6)


def test_bf16_products_keep_the_gradient_and_the_accuracy() -> None:
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(64, 32, generator=generator)
    targets = torch.randint(0, 5, (64,), generator=generator)
    weight, bias = torch.randn(5, 32, generator=generator), torch.randn(5, generator=generator)
    exact = cross_entropy_gradient(batch, targets, weight, bias)
    low = cross_entropy_gradient(batch, targets, weight, bias, matmul_dtype=torch.bfloat16)
    assert low[0].dtype == low[1].dtype == torch.float32
    for approximate, reference in zip(low, exact, strict=True):  # bf16: 8 significant bits
        assert float((approximate - reference).norm() / reference.norm()) < 2e-2
    features, labels = clusters(1200, n_classes=5, n_dims=20, spread=1.2, seed=3)
    test_features, test_labels = clusters(1200, n_classes=5, n_dims=20, spread=1.2, seed=4)
    accuracies = []
    for precision in ("fp32", "bf16"):
        detector = LinearProbeDetector(epochs=40, batch_size=32, precision=precision)  # type: ignore[arg-type]
        detector.fit(features, labels)
        assert detector.weight_.dtype == np.float32  # float32 master weights either way
        accuracies.append((detector.predict(test_features) == test_labels).mean())
    assert abs(accuracies[0] - accuracies[1]) <= 0.005


def test_auto_precision_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    for flags, expected in [
        ({"avx512_bf16", "GenuineIntel"}, "fp32"),  # no AMX: bf16 slower than fp32
        ({"amx_bf16", "avx512_bf16", "GenuineIntel"}, "bf16"),
        ({"avx512_bf16", "AuthenticAMD"}, "bf16"),  # Zen 4: bf16 dot products at full rate
        ({"avx2", "AuthenticAMD"}, "fp32"),
    ]:
        monkeypatch.setattr(probe_module, "_cpu_flags", lambda flags=flags: frozenset(flags))
        assert probe_module.resolve_probe_precision("auto", "cpu") == expected
        assert probe_module.resolve_probe_precision("fp32", "cpu") == "fp32"
    assert probe_module.resolve_probe_precision("auto", "mps") == "fp32"


def test_new_probe_options_are_validated() -> None:
    features, labels = clusters(40)
    cases = [
        (
            lambda: create_detector("linear-probe", precision="fp16"),
            "detector 'linear-probe': precision must be one of auto, fp32, bf16, got 'fp16'",
        ),
        (
            lambda: create_detector("plp", batch_size="half", class_embeddings=np.eye(3)),
            "detector 'plp': batch_size must be an integer >= 1 or 'full', got 'half'",
        ),
    ]
    for call, message in cases:
        with pytest.raises(InvalidParameterError) as error:
            call()
        assert str(error.value) == message
    detector = LinearProbeDetector(epochs=30, batch_size="full", lr=1e-1).fit(features, labels)
    assert (detector.predict(features) == labels).mean() > 0.95


def test_small_steps_run_on_one_thread_and_the_setting_is_restored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[int] = []
    real = probe_module._gradient_into

    def spy(*args: Any, **kwargs: Any) -> None:
        seen.append(torch.get_num_threads())
        real(*args, **kwargs)

    monkeypatch.setattr(probe_module, "_gradient_into", spy)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        features, labels = clusters(64)
        LinearProbeDetector(epochs=1, batch_size=32, device="cpu").fit(features, labels)
        assert seen == [1, 1] and torch.get_num_threads() == 2
        monkeypatch.setattr(probe_module, "_PARALLEL_MACS", 1)  # every step counts as large
        LinearProbeDetector(epochs=1, batch_size=32, device="cpu").fit(features, labels)
        assert seen[2:] == [2, 2]
    finally:
        torch.set_num_threads(previous)
