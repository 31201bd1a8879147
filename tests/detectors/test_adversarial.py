"""The class-score SVM (Uelwer, Michels, De Candido, KI 2021): separation, sklearn equality,
persistence without pickle, the clean/attacked label convention, and its torch score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from oodprobe.detectors import DETECTORS, create_detector, load_detector
from oodprobe.detectors.adversarial import ClassScoreSVMDetector, ClassScoreSVMFeaturesDetector
from oodprobe.errors import InvalidParameterError

N_CLASSES = 10


def class_scores(
    rng: np.random.Generator, n: int, margin: float, classes: range = range(N_CLASSES)
) -> npt.NDArray[np.float64]:
    """(n, 10) logits: N(0, 1) noise with ``margin`` added to one random class per row.

    Clean images: a large margin (a peaked, confident score vector); attacked images: a small
    one (the flatter scores an attack leaves behind).
    """
    logits = rng.normal(size=(n, N_CLASSES))
    logits[np.arange(n), rng.choice(classes, size=n)] += margin
    return logits


def clean_vs_attacked(
    seed: int, n: int = 150
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    scores = np.vstack([class_scores(rng, n, 8.0), class_scores(rng, n, 2.5)])
    return scores, np.r_[np.ones(n), np.zeros(n)].astype(np.int64)


@pytest.fixture(scope="module")
def training() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    return clean_vs_attacked(0)


def auroc(clean_scores: np.ndarray, attacked_scores: np.ndarray) -> float:
    truth = np.r_[np.ones(len(clean_scores)), np.zeros(len(attacked_scores))]
    return float(roc_auc_score(truth, np.r_[clean_scores, attacked_scores]))


def test_registry_declares_inputs_labels_and_differentiability() -> None:
    assert DETECTORS["class-score-svm"] is ClassScoreSVMDetector
    assert DETECTORS["class-score-svm-features"] is ClassScoreSVMFeaturesDetector
    assert ClassScoreSVMDetector.input_array == "logits"
    assert ClassScoreSVMFeaturesDetector.input_array == "features"
    for cls in (ClassScoreSVMDetector, ClassScoreSVMFeaturesDetector):
        assert cls.requires_labels and cls.differentiable
        assert cls.fit_labels == "clean-vs-attacked"
    defaults = {info.name: info.default for info in ClassScoreSVMDetector.param_info()}
    assert defaults == {"C": 1.0, "gamma": "scale", "sort": False, "standardize": True}


@pytest.mark.parametrize("sort", [True, False])
def test_flatter_attacked_scores_are_separated_on_held_out_data(
    training: tuple[np.ndarray, np.ndarray], sort: bool
) -> None:
    detector = create_detector("class-score-svm", sort=sort).fit(*training)
    held_out, labels = clean_vs_attacked(1)
    scores = detector.score_samples(held_out)
    value = auroc(scores[labels == 1], scores[labels == 0])
    assert value >= 0.9, value
    # the sign: clean (label 1) is the positive side of the decision function
    assert np.median(scores[labels == 1]) > 0 > np.median(scores[labels == 0])


def test_sorted_scores_do_not_depend_on_which_class_is_predicted(
    training: tuple[np.ndarray, np.ndarray],
) -> None:
    detector = create_detector("class-score-svm", sort=True).fit(*training)
    queries, _ = clean_vs_attacked(2, n=20)
    permutation = np.random.default_rng(3).permutation(N_CLASSES)
    # equal up to rounding (the BLAS may sum in another order for another memory alignment)
    np.testing.assert_allclose(
        detector.score_samples(queries[:, permutation]),
        detector.score_samples(queries),
        rtol=1e-13,
    )
    unsorted = create_detector("class-score-svm", sort=False).fit(*training)
    assert not np.allclose(
        unsorted.score_samples(queries[:, permutation]), unsorted.score_samples(queries)
    )


def reference_decision_function(
    scores: np.ndarray,
    labels: np.ndarray,
    queries: np.ndarray,
    *,
    C: float,
    gamma: float | str,
    sort: bool,
    standardize: bool,
) -> tuple[np.ndarray, SVC]:
    """The paper's pipeline straight from scikit-learn: sort, StandardScaler, SVC(rbf)."""

    def arrange(array: np.ndarray) -> np.ndarray:
        return -np.sort(-array, axis=1) if sort else array

    inputs = arrange(scores)
    if standardize:
        scaler = StandardScaler().fit(inputs)
        transform = scaler.transform
    else:

        def transform(array: np.ndarray) -> np.ndarray:
            return array

    svm = SVC(C=C, kernel="rbf", gamma=gamma).fit(transform(inputs), labels)
    return svm.decision_function(transform(arrange(queries))), svm


@pytest.mark.parametrize(
    ("C", "gamma", "sort", "standardize"),
    [(1.0, "scale", True, True), (10.0, 0.05, False, True), (0.5, "auto", True, False)],
)
def test_numpy_decision_function_equals_sklearns(
    training: tuple[np.ndarray, np.ndarray],
    C: float,
    gamma: float | str,
    sort: bool,
    standardize: bool,
) -> None:
    params = {"C": C, "gamma": gamma, "sort": sort, "standardize": standardize}
    detector = create_detector("class-score-svm", **params).fit(*training)
    queries = np.vstack([clean_vs_attacked(4, n=40)[0], 3.0 * training[0][:5]])
    expected, svm = reference_decision_function(*training, queries, **params)
    np.testing.assert_allclose(detector.score_samples(queries), expected, rtol=1e-10, atol=1e-12)
    assert detector.gamma_ == svm._gamma
    assert detector.intercept_ == svm.intercept_[0]
    np.testing.assert_array_equal(detector.n_support_, svm.n_support_)
    assert detector.support_vectors_.shape == (svm.n_support_.sum(), N_CLASSES)


def test_save_load_round_trip_keeps_the_svm_without_pickle(
    training: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    detector = create_detector("class-score-svm", C=3.0, gamma=0.2).fit(*training)
    path = detector.save(tmp_path / "svm.safetensors")
    assert b"pickle" not in path.read_bytes() and b"sklearn" not in path.read_bytes()
    loaded = load_detector(path)
    assert type(loaded) is ClassScoreSVMDetector and loaded.get_params() == detector.get_params()
    assert loaded.gamma_ == 0.2 and loaded.intercept_ == detector.intercept_
    for name in ("support_vectors_", "dual_coef_", "scaler_mean_", "scaler_scale_"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(detector, name))
    queries = clean_vs_attacked(5, n=30)[0]
    np.testing.assert_array_equal(loaded.score_samples(queries), detector.score_samples(queries))


def test_the_features_variant_scores_like_the_logits_one(
    training: tuple[np.ndarray, np.ndarray],
) -> None:
    queries = clean_vs_attacked(6, n=20)[0]
    np.testing.assert_array_equal(
        create_detector("class-score-svm-features").fit(*training).score_samples(queries),
        create_detector("class-score-svm").fit(*training).score_samples(queries),
    )


def test_torch_score_equals_numpy_and_its_gradient_raises_the_score(
    training: tuple[np.ndarray, np.ndarray],
) -> None:
    detector = create_detector("class-score-svm").fit(*training)
    rng = np.random.default_rng(7)
    attacked = class_scores(rng, 16, 2.5)
    logits = torch.tensor(attacked, dtype=torch.float32, requires_grad=True)
    scores = detector.score_samples_torch(logits)
    assert scores.dtype == torch.float64
    expected = detector.score_samples(logits.detach().double().numpy())
    np.testing.assert_allclose(scores.detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    (gradient,) = torch.autograd.grad(scores.sum(), logits)
    # an adaptive attacker: small steps along the gradient raise every attacked image's score
    stepped = logits.detach() + 0.05 * gradient / gradient.norm(dim=1, keepdim=True)
    assert np.all(detector.score_samples(stepped.double().numpy()) > expected)


# -- the label convention and parameters -----------------------------------------------------


def test_fit_without_labels_names_the_convention(training: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(InvalidParameterError) as error:
        create_detector("class-score-svm").fit(training[0])
    assert str(error.value) == (
        "class-score-svm needs class labels: call fit(scores, labels) with labels 1 for clean "
        "and 0 for attacked images (it is trained on both kinds)"
    )


@pytest.mark.parametrize(
    ("labels", "shown"),
    [
        (np.arange(300) % 4, "0, 1, 2, 3"),  # class indices, as a benchmark would pass
        (np.where(np.arange(300) < 150, 1, -1), "-1, 1"),  # the ±1 SVM convention
        (np.full(300, 0.5), "0.5"),
        (np.array(["clean"] * 150 + ["attacked"] * 150), "attacked, clean"),
    ],
)
def test_labels_other_than_clean_1_attacked_0_are_refused(
    training: tuple[np.ndarray, np.ndarray], labels: np.ndarray, shown: str
) -> None:
    with pytest.raises(InvalidParameterError) as error:
        create_detector("class-score-svm").fit(training[0], labels)
    assert str(error.value) == (
        f"class-score-svm: labels must be 1 (clean image) or 0 (attacked image), got values "
        f"{shown}; these are not class indices: label each row by whether its image was attacked"
    )


@pytest.mark.parametrize(("value", "kind"), [(1, "clean (1)"), (0, "attacked (0)")])
def test_labels_of_one_kind_only_are_refused(
    training: tuple[np.ndarray, np.ndarray], value: int, kind: str
) -> None:
    with pytest.raises(InvalidParameterError) as error:
        create_detector("class-score-svm").fit(training[0], np.full(300, value))
    assert str(error.value) == (
        f"class-score-svm: labels are all {kind}; the SVM is trained on both clean (1) and "
        f"attacked (0) images, so give some of each"
    )


def test_labels_of_the_wrong_length_are_refused(training: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(InvalidParameterError) as error:
        create_detector("class-score-svm").fit(training[0], training[1][:-1])
    assert str(error.value) == (
        "class-score-svm: labels must be a 1-D array of 300 entries (one per row of scores), "
        "got shape (299,)"
    )


def test_float_and_boolean_labels_of_the_convention_are_accepted(
    training: tuple[np.ndarray, np.ndarray],
) -> None:
    queries = clean_vs_attacked(8, n=10)[0]
    expected = create_detector("class-score-svm").fit(*training).score_samples(queries)
    for labels in (training[1].astype(np.float32), training[1].astype(bool)):
        detector = create_detector("class-score-svm").fit(training[0], labels)
        np.testing.assert_array_equal(detector.score_samples(queries), expected)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"C": 0}, "C must be a finite number > 0, got 0"),
        ({"C": -1.0}, "C must be a finite number > 0, got -1.0"),
        ({"gamma": 0.0}, "gamma must be one of scale, auto or a finite number > 0, got 0.0"),
        (
            {"gamma": "bogus"},
            "gamma must be one of scale, auto or a finite number > 0, got 'bogus'",
        ),
        ({"sort": 1}, "sort must be a boolean (true or false), got 1"),
        ({"standardize": "yes"}, "standardize must be a boolean (true or false), got 'yes'"),
    ],
)
def test_bad_parameters_are_refused_in_one_line(params: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidParameterError) as error:
        create_detector("class-score-svm", **params)
    assert str(error.value) == f"detector 'class-score-svm': {message}"


# -- real class scores: EfficientNet-Lite0 logits of clean vs PGD-attacked images ------------


def test_separates_pgd_attacked_from_clean_images_on_real_logits() -> None:
    """Real logits (EfficientNet-Lite0 at 64 px, ImageNet head) of MNIST digits 5-9 (OOD to a
    k-NN fitted on digits 0-4), clean and after a white-box PGD on the k-NN score (L∞, ε =
    8/255, 5 steps). The SVM is fitted on 24 images (clean and attacked) and evaluated on the
    26 others. Measured held-out AUROC over attack seeds 0-1 and two splits: 0.74-0.80 sorted
    (the default), 0.93-0.96 unsorted (on digits the predicted ImageNet class itself tells
    attacked images apart); chance is 0.5, and the standard error at 26 + 26 is about 0.06.
    """
    from oodprobe.attack import encode_images, load_pixels, pgd_score_attack
    from oodprobe.data import create_dataset
    from oodprobe.encoders import create_encoder

    encoder = create_encoder("efficientnet-lite0@64")
    train = create_dataset("mnist-5k:train", classes=[0, 1, 2, 3, 4], per_class=40)
    ood = create_dataset("mnist-5k:test", classes=[5, 6, 7, 8, 9], per_class=10)
    train_pixels = load_pixels(encoder, train, range(len(train)))
    knn = create_detector("knn", k=5).fit(encode_images(encoder, train_pixels, device="cpu"))
    images = load_pixels(encoder, ood, range(len(ood)))
    result = pgd_score_attack(encoder, knn, images, eps=8 / 255, steps=5, seed=0, device="cpu")
    assert result.attacked_scores is not None and result.clean_scores is not None
    assert np.mean(result.attacked_scores > result.clean_scores) > 0.5  # the attack worked
    clean = encode_images(encoder, images, output="logits", device="cpu")
    attacked = encode_images(encoder, result.adversarial, output="logits", device="cpu")
    order = np.random.default_rng(0).permutation(len(images))
    fit_rows, held_out = order[:24], order[24:]
    labels = np.r_[np.ones(24), np.zeros(24)].astype(np.int64)
    for sort, minimum in ((True, 0.65), (False, 0.85)):
        detector = create_detector("class-score-svm", sort=sort)
        detector.fit(np.vstack([clean[fit_rows], attacked[fit_rows]]), labels)
        value = auroc(
            detector.score_samples(clean[held_out]), detector.score_samples(attacked[held_out])
        )
        assert value > minimum, f"sort={sort}: held-out AUROC {value:.3f}"
