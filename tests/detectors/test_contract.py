"""The detector contract, over every registered detector (new ones are covered automatically)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score

from oodprobe.detectors import DETECTORS, Detector, create_detector, load_detector
from oodprobe.errors import InvalidParameterError

from .conftest import ClusterData, fit_arrays

NAMES = sorted(DETECTORS)
MakeDetector = Callable[[str], Detector]


def fit(detector: Detector, data: ClusterData) -> Detector:
    # class labels for most detectors; clean/attacked rows for the class-score SVM (fit_arrays)
    return detector.fit(*fit_arrays(detector, data))


def params_equal(left: dict[str, Any], right: dict[str, Any]) -> bool:
    if left.keys() != right.keys():
        return False
    return all(np.array_equal(left[key], right[key]) for key in left)


@pytest.fixture(scope="module", params=NAMES)
def fitted(request: pytest.FixtureRequest, cluster_data: ClusterData) -> Detector:
    make_detector: MakeDetector = request.getfixturevalue("make_detector")
    return fit(make_detector(request.param), cluster_data)


def test_every_detector_has_a_factory_and_a_docstring_citation() -> None:
    from .conftest import DETECTOR_FACTORIES

    assert set(NAMES) <= set(DETECTOR_FACTORIES), set(NAMES) - set(DETECTOR_FACTORIES)
    for name in NAMES:
        assert DETECTORS[name].__doc__, f"{name} has no docstring"


@pytest.mark.parametrize("name", NAMES)
def test_fit_returns_self_and_scores_are_finite_float64(
    name: str, make_detector: MakeDetector, cluster_data: ClusterData
) -> None:
    detector = make_detector(name)
    assert fit(detector, cluster_data) is detector
    scores = detector.score_samples(cluster_data.test_features)
    assert scores.dtype == np.float64
    assert scores.shape == (len(cluster_data.test_features),)
    assert np.all(np.isfinite(scores))


def test_scores_are_deterministic_across_calls_and_fits(
    fitted: Detector, cluster_data: ClusterData
) -> None:
    first = fitted.score_samples(cluster_data.test_features)
    np.testing.assert_array_equal(first, fitted.score_samples(cluster_data.test_features))
    refitted = fit(clone(fitted), cluster_data)
    np.testing.assert_array_equal(first, refitted.score_samples(cluster_data.test_features))


@pytest.mark.parametrize("name", NAMES)
def test_inputs_are_not_modified(
    name: str, make_detector: MakeDetector, cluster_data: ClusterData
) -> None:
    detector = make_detector(name)
    train_features, train_labels = fit_arrays(detector, cluster_data)
    features, labels = train_features.copy(), train_labels.copy()
    queries = cluster_data.test_features.astype(np.float64)  # float64 input: no implicit copy
    queries_before = queries.copy()
    detector.fit(features, labels)
    detector.score_samples(queries)
    np.testing.assert_array_equal(features, train_features)
    np.testing.assert_array_equal(labels, train_labels)
    np.testing.assert_array_equal(queries, queries_before)


@pytest.mark.parametrize("name", NAMES)
def test_score_before_fit_raises_not_fitted(
    name: str, make_detector: MakeDetector, cluster_data: ClusterData
) -> None:
    with pytest.raises(NotFittedError):
        make_detector(name).score_samples(cluster_data.test_features)


def test_save_load_round_trip_gives_identical_scores(
    fitted: Detector, cluster_data: ClusterData, tmp_path: Path
) -> None:
    path = fitted.save(tmp_path / "detector.safetensors")
    loaded = load_detector(path)
    assert type(loaded) is type(fitted)
    # runner parameters that fit alone uses (NegLabel's corpus) are not saved: they load as None
    unsaved = type(fitted).unsaved_params
    assert all(loaded.get_params()[name] is None for name in unsaved)
    assert params_equal(
        {k: v for k, v in loaded.get_params().items() if k not in unsaved},
        {k: v for k, v in fitted.get_params().items() if k not in unsaved},
    )
    queries = np.vstack([cluster_data.test_features, cluster_data.ood_features])
    np.testing.assert_array_equal(loaded.score_samples(queries), fitted.score_samples(queries))


def test_clone_and_get_params_round_trip(fitted: Detector) -> None:
    params = fitted.get_params()
    cloned = clone(fitted)
    assert type(cloned) is type(fitted)
    assert params_equal(cloned.get_params(), params)
    rebuilt = create_detector(fitted.name, **params)
    assert params_equal(rebuilt.get_params(), params)
    with pytest.raises(NotFittedError):  # clone copies hyperparameters, not learned state
        cloned.score_samples(np.zeros((1, 6), np.float32))


def test_higher_scores_mean_in_distribution(fitted: Detector, cluster_data: ClusterData) -> None:
    id_scores = fitted.score_samples(cluster_data.test_features)
    ood_scores = fitted.score_samples(cluster_data.ood_features)
    truth = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    auroc = roc_auc_score(truth, np.r_[id_scores, ood_scores])
    assert auroc > 0.9, f"{fitted.name}: AUROC {auroc:.3f}"


def test_wrong_dimensionality_and_nan_are_rejected(
    fitted: Detector, cluster_data: ClusterData
) -> None:
    with pytest.raises(InvalidParameterError, match=r"dimensions|shape"):
        fitted.score_samples(cluster_data.test_features[:, :5])
    with pytest.raises(InvalidParameterError, match="must be 2-D"):
        fitted.score_samples(cluster_data.test_features[0])
    bad = cluster_data.test_features.copy()
    bad[3, 2] = np.nan
    with pytest.raises(InvalidParameterError, match=r"contains NaN or inf in 1 row\(s\)"):
        fitted.score_samples(bad)


@pytest.mark.parametrize("name", [name for name in NAMES if DETECTORS[name].requires_labels])
def test_detectors_that_need_labels_reject_none(
    name: str, make_detector: MakeDetector, cluster_data: ClusterData
) -> None:
    with pytest.raises(InvalidParameterError, match=f"{name} needs class labels"):
        make_detector(name).fit(cluster_data.train_features)


# -- parameters: one validation home, before any work ----------------------------------------


def user_params(name: str) -> list[str]:
    cls = DETECTORS[name]
    return [key for key in cls._get_param_names() if key not in cls.runner_params]


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_has_constraints_and_param_info_lists_the_user_ones(name: str) -> None:
    cls = DETECTORS[name]
    assert set(cls._parameter_constraints) == set(cls._get_param_names())
    signature = inspect.signature(cls.__init__).parameters
    info = cls.param_info()
    assert [item.name for item in info] == [key for key in signature if key in user_params(name)]
    for item in info:
        assert item.default == signature[item.name].default
        assert item.allowed and "\n" not in item.allowed
    assert all(item.name not in cls.runner_params for item in info)


@pytest.mark.parametrize("name", NAMES)
def test_check_params_accepts_the_defaults(name: str) -> None:
    cls = DETECTORS[name]
    cls.check_params({item.name: item.default for item in cls.param_info()})
    cls.check_params({})


@pytest.mark.parametrize("name", NAMES)
def test_check_params_refuses_an_unknown_name_in_one_exact_line(name: str) -> None:
    expected = (
        f"unknown parameter 'no_such_parameter' for detector '{name}'; valid parameters: "
        f"{', '.join(sorted(user_params(name)))}"
    )
    with pytest.raises(InvalidParameterError) as error:
        DETECTORS[name].check_params({"no_such_parameter": 3})
    assert str(error.value) == expected
    with pytest.raises(InvalidParameterError) as error:  # create_detector uses the same check
        create_detector(name, no_such_parameter=3)
    assert str(error.value).startswith(
        f"unknown parameter 'no_such_parameter' for detector '{name}'"
    )


@pytest.mark.parametrize(
    ("name", "parameter"), [(name, key) for name in NAMES for key in user_params(name)]
)
def test_check_params_refuses_a_wrong_type_naming_detector_parameter_and_value(
    name: str, parameter: str
) -> None:
    cls = DETECTORS[name]
    for wrong in ({"a": 1}, True):  # a dict fits no constraint; a bool is not a number here
        default = next(item.default for item in cls.param_info() if item.name == parameter)
        if isinstance(default, bool):
            continue
        with pytest.raises(InvalidParameterError) as error:
            cls.check_params({parameter: wrong})
        message = str(error.value)
        assert message.startswith(f"detector '{name}': {parameter} must be ")
        assert message.endswith(f", got {wrong!r}")
        assert "\n" not in message


@pytest.mark.parametrize("name", [name for name in NAMES if DETECTORS[name].runner_params])
def test_runner_parameters_are_refused_from_users_and_accepted_from_the_runner(
    name: str, cluster_data: ClusterData
) -> None:
    cls = DETECTORS[name]
    for parameter in sorted(cls.runner_params):
        with pytest.raises(InvalidParameterError) as error:
            cls.check_params({parameter: cluster_data.class_means})
        assert str(error.value) == (
            f"parameter {parameter!r} of detector {name!r} is computed by the runner from the "
            f"encoder; remove it from the detector's parameters"
        )
    if cls.requires_text:  # required: create_detector names it
        cls.check_params({"class_embeddings": cluster_data.class_means}, runner=True)
        with pytest.raises(InvalidParameterError) as error:
            create_detector(name)
        assert str(error.value).startswith(f"detector {name!r} needs class_embeddings")
    elif "head_weight" in cls.runner_params:  # None at construction: fit names the missing head
        cls.check_params({"head_weight": cluster_data.class_means}, runner=True)
        detector = create_detector(name)
        with pytest.raises(InvalidParameterError) as error:
            detector.fit(cluster_data.train_features, cluster_data.train_labels)
        assert str(error.value).startswith(f"detector {name!r} needs the classifier head's")


@pytest.mark.parametrize("name", NAMES)
def test_fit_validates_with_the_same_check(
    name: str, make_detector: MakeDetector, cluster_data: ClusterData
) -> None:
    detector = make_detector(name)
    parameter = user_params(name)[0]
    detector.set_params(**{parameter: {"a": 1}})
    with pytest.raises(InvalidParameterError) as error:
        fit(detector, cluster_data)
    assert str(error.value).startswith(f"detector '{name}': {parameter} must be ")


# -- score_samples_torch: part of the contract -----------------------------------------------

DIFFERENTIABLE = [name for name in NAMES if DETECTORS[name].differentiable]
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
# Gaussian detectors compute in float64 whatever the input dtype; the others in float32 for
# fp16/bf16/fp32 input, which bounds their difference from the float64 numpy scores.
RTOL = {"gaussian": 1e-9, "mahalanobis": 1e-9, "relative-mahalanobis": 1e-9}


def test_differentiable_says_whether_score_samples_torch_exists() -> None:
    for name in NAMES:
        cls = DETECTORS[name]
        has_torch = cls.score_samples_torch is not Detector.score_samples_torch
        assert cls.differentiable == has_torch, name


@pytest.mark.parametrize("name", [name for name in NAMES if not DETECTORS[name].differentiable])
def test_detectors_without_a_torch_score_say_so(name: str, make_detector: MakeDetector) -> None:
    detector = make_detector(name)
    with pytest.raises(InvalidParameterError) as error:
        detector.score_samples_torch(torch.zeros(2, 6))
    assert str(error.value) == (
        f"detector {name!r} has no differentiable score (score_samples_torch); choose one that "
        f"has: {', '.join(DIFFERENTIABLE)}"
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_torch_scores_are_finite_close_and_differentiable_in_half_precision(
    name: str,
    dtype: torch.dtype,
    device: str,
    make_detector: MakeDetector,
    cluster_data: ClusterData,
) -> None:
    detector = fit(make_detector(name), cluster_data)
    queries = np.vstack([cluster_data.test_features[:8], cluster_data.ood_features[:8]])
    features = torch.tensor(queries, dtype=dtype, device=device, requires_grad=True)
    scores = detector.score_samples_torch(features)
    assert scores.device.type == device and scores.shape == (16,)
    assert scores.dtype in (torch.float32, torch.float64)  # never accumulated in half precision
    assert torch.all(torch.isfinite(scores))
    # the same (rounded) input values through the numpy path
    expected = detector.score_samples(features.detach().double().cpu().numpy())
    rtol = RTOL.get(name, 1e-4)
    np.testing.assert_allclose(
        scores.detach().double().cpu().numpy(), expected, rtol=rtol, atol=rtol
    )
    scores.sum().backward()
    assert features.grad is not None and features.grad.dtype == dtype
    assert torch.all(torch.isfinite(features.grad)) and torch.count_nonzero(features.grad) > 0
