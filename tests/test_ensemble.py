"""Ensembles: score-level (normalised member scores) and probability-level (COOkeD heads)."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from safetensors.numpy import load_file, save_file
from sklearn.metrics import roc_auc_score

from oodprobe.detectors import DETECTORS, create_detector, load_detector, save_detector
from oodprobe.detectors.ensemble import (
    ProbEnsembleDetector,
    ScoreEnsembleDetector,
    _RankNormalizer,
    ensemble_member_specs,
    holdout_split,
    prob_ensemble_heads,
)
from oodprobe.detectors.probe import msp
from oodprobe.errors import DetectorFileError, InvalidParameterError

F32 = npt.NDArray[np.float32]


def overlapping_data(seed: int = 0) -> tuple[F32, np.ndarray, F32, F32]:
    """(train, train labels, ID test, OOD): two ID classes at ±1.5·e_0 and OOD at 2·e_1 in
    D = 8, unit noise, so every detector's AUROC is well below 1 (rankings matter)."""
    rng = np.random.default_rng(seed)
    means = np.zeros((2, 8))
    means[0, 0], means[1, 0] = 1.5, -1.5
    train_labels = np.repeat([0, 1], 150)
    train = means[train_labels] + rng.normal(size=(300, 8))
    test = means[np.tile([0, 1], 100)] + rng.normal(size=(200, 8))
    ood = 2.0 * np.eye(8)[1] + rng.normal(size=(200, 8))
    return (
        train.astype(np.float32),
        train_labels,
        test.astype(np.float32),
        ood.astype(np.float32),
    )


def auroc(detector: Any, test: F32, ood: F32) -> float:
    scores = np.r_[detector.score_samples(test), detector.score_samples(ood)]
    return float(roc_auc_score(np.r_[np.ones(len(test)), np.zeros(len(ood))], scores))


@pytest.fixture(scope="module")
def data() -> tuple[F32, np.ndarray, F32, F32]:
    return overlapping_data()


# -- rank and z-score normalisation -----------------------------------------------------------


def test_rank_normalisation_is_the_interpolated_mid_rank_ecdf_with_ordered_tails() -> None:
    normalizer = _RankNormalizer(np.array([1.0, 2.0, 3.0, 4.0]))
    # at a held-out score: (#below + half the ties) / m; between them: linear
    np.testing.assert_allclose(
        normalizer(np.array([1.0, 2.0, 2.5, 4.0])), [0.125, 0.375, 0.5, 0.875]
    )
    tails = normalizer(np.array([-100.0, 0.0, 0.9, 4.1, 5.0, 6.0]))
    assert np.all(np.diff(tails) > 0) and np.all((tails > 0) & (tails < 1))
    tau = np.std([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(tails[1], 0.125 * np.exp(-1.0 / tau))
    np.testing.assert_allclose(tails[4], 1 - 0.125 * np.exp(-1.0 / tau))
    ties = _RankNormalizer(np.array([1.0, 1.0, 2.0]))
    np.testing.assert_allclose(ties(np.array([1.0, 2.0])), [1 / 3, 2.5 / 3])


def test_rank_normalising_one_member_keeps_its_ranking_and_auroc(
    data: tuple[F32, np.ndarray, F32, F32],
) -> None:
    train, _, test, ood = data
    ensemble = create_detector("score-ensemble", members=["knn:k=5"]).fit(train)
    member = ensemble.members_[0]
    queries = np.vstack([test, ood])
    ranks = np.argsort(np.argsort(ensemble.score_samples(queries)))
    np.testing.assert_array_equal(ranks, np.argsort(np.argsort(member.score_samples(queries))))
    assert auroc(ensemble, test, ood) == auroc(member, test, ood) < 0.99


def test_the_members_are_fitted_on_the_fit_part_and_normalised_on_the_holdout(
    data: tuple[F32, np.ndarray, F32, F32],
) -> None:
    train, labels, test, _ = data
    ensemble = create_detector(
        "score-ensemble", members=["mahalanobis"], normalize="zscore", seed=3
    ).fit(train, labels)
    fit_rows, holdout_rows = holdout_split(len(train), labels, 0.2, 3)
    assert len(holdout_rows) == 60 and np.bincount(labels[holdout_rows]).tolist() == [30, 30]
    assert not set(fit_rows) & set(holdout_rows) and len(fit_rows) + len(holdout_rows) == 300
    reference = create_detector("mahalanobis").fit(train[fit_rows], labels[fit_rows])
    held = reference.score_samples(train[holdout_rows])
    np.testing.assert_allclose(ensemble.holdout_scores_[0], np.sort(held))
    expected = (reference.score_samples(test) - held.mean()) / held.std()
    np.testing.assert_allclose(ensemble.score_samples(test), expected, rtol=1e-10)


def test_weights_give_the_weighted_mean_of_the_normalised_scores(
    data: tuple[F32, np.ndarray, F32, F32],
) -> None:
    train, _, test, _ = data
    members = ["knn:k=5", "gaussian"]
    weighted = create_detector("score-ensemble", members=members, weights=[3, 1]).fit(train)
    first, second = weighted.members_
    norm_first, norm_second = weighted._normalizers
    expected = 0.75 * norm_first(first.score_samples(test)) + 0.25 * norm_second(
        second.score_samples(test)
    )
    np.testing.assert_allclose(weighted.score_samples(test), expected, rtol=1e-12)
    only_knn = create_detector("score-ensemble", members=members, weights=[1, 0]).fit(train)
    alone = create_detector("score-ensemble", members=["knn:k=5"]).fit(train)
    np.testing.assert_allclose(only_knn.score_samples(test), alone.score_samples(test))


def test_knn_plus_mahalanobis_matches_or_beats_the_worse_member(
    data: tuple[F32, np.ndarray, F32, F32],
) -> None:
    train, labels, test, ood = data
    for normalize in ("rank", "zscore"):
        ensemble = create_detector(
            "score-ensemble", members=["knn:k=5", "mahalanobis"], normalize=normalize
        ).fit(train, labels)
        members = [auroc(member, test, ood) for member in ensemble.members_]
        assert auroc(ensemble, test, ood) >= min(members) - 1e-9, (normalize, members)


def test_a_label_free_ensemble_fits_without_labels_and_a_labelled_one_says_why(
    data: tuple[F32, np.ndarray, F32, F32],
) -> None:
    train = data[0]
    create_detector("score-ensemble").fit(train)  # knn + gaussian
    with pytest.raises(InvalidParameterError) as error:
        create_detector("score-ensemble", members=["knn", "mahalanobis"]).fit(train)
    assert str(error.value) == (
        "score-ensemble needs class labels: its member(s) mahalanobis do; call "
        "fit(features, labels), or choose label-free members"
    )


def test_a_constant_member_cannot_be_z_scored() -> None:
    features = np.ones((20, 3), np.float32)
    with pytest.raises(InvalidParameterError, match=r"member 0 \(knn\) gives every held-out ID"):
        create_detector("score-ensemble", members=["knn"], normalize="zscore").fit(features)


def test_the_split_needs_a_held_out_sample() -> None:
    labels = np.array([0, 0, 1, 1])
    with pytest.raises(InvalidParameterError, match=r"of 4 training samples \(stratified by class"):
        holdout_split(4, labels, 0.2, 0)
    fit_rows, holdout_rows = holdout_split(4, None, 0.2, 0)
    assert len(holdout_rows) == 1 and len(fit_rows) == 3


# -- parameters: every member checked before any work ----------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"members": ["knnn"]},
            "detector 'score-ensemble': members[0] 'knnn': unknown detector 'knnn'; choose from: ",
        ),
        (
            {"members": ["knn:k=0"]},
            "detector 'score-ensemble': members[0] 'knn:k=0': detector 'knn': k must be an "
            "integer >= 1, got 0",
        ),
        (
            {"members": ["knn", "score-ensemble"]},
            "detector 'score-ensemble': members[1] 'score-ensemble': a score ensemble cannot be a "
            "member of one",
        ),
        (
            {"members": ["mcm:class_embeddings=1"]},
            "detector 'score-ensemble': members[0] 'mcm:class_embeddings=1': parameter "
            "'class_embeddings' of detector 'mcm' is computed by the runner",
        ),
        (
            {"members": ["class-score-svm"]},
            "detector 'score-ensemble': members[0] 'class-score-svm': 'class-score-svm' is "
            "fitted on clean vs attacked images",
        ),
        (
            {"members": ["knn", "logits"]},
            "detector 'score-ensemble': members score different encoder outputs (knn (features), "
            "logits (logits)); an ensemble scores one array, so choose members of one kind",
        ),
        (
            {"members": ["knn", "gaussian"], "weights": [1.0]},
            "detector 'score-ensemble': weights has 1 entries but members has 2; give one "
            "weight per member",
        ),
        (
            {"weights": [0, 0]},
            "detector 'score-ensemble': weights must not all be 0, got [0, 0]",
        ),
        (
            {"members": []},
            "detector 'score-ensemble': members must be a non-empty list of detector specs such "
            "as ['knn:k=1', 'mahalanobis'], got []",
        ),
    ],
)
def test_check_params_refuses_a_bad_member_before_any_work(
    params: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidParameterError) as error:
        ScoreEnsembleDetector.check_params(params)
    assert str(error.value).startswith(message), str(error.value)
    with pytest.raises(InvalidParameterError):
        create_detector("score-ensemble", **params)


def test_member_specs_and_the_needs_of_an_ensemble_come_from_its_members() -> None:
    specs = ensemble_member_specs({"members": ["knn:k=3", "mahalanobis"]})
    assert [(spec.name, dict(spec.params)) for spec in specs] == [
        ("knn", {"k": 3}),
        ("mahalanobis", {}),
    ]
    assert [spec.name for spec in ensemble_member_specs({})] == ["knn", "gaussian"]
    cls = DETECTORS["score-ensemble"]
    assert not cls.needs_labels({}) and cls.needs_labels({"members": ["knn", "mahalanobis"]})
    assert cls.needs_text({"members": ["mcm"]}) and not cls.needs_text({})
    assert cls.needs_head({"members": ["prob-ensemble"]}) and not cls.needs_head({})
    assert cls.input_array_for({"members": ["logits"]}) == "logits"
    assert cls.input_array_for({}) == "features"
    assert cls.is_differentiable({}) and not cls.is_differentiable({"members": ["knn", "lof"]})
    prob = DETECTORS["prob-ensemble"]
    assert prob.needs_labels({}) and prob.needs_text({}) and prob.needs_head({})
    assert not prob.needs_labels({"heads": ["encoder"]})
    assert not prob.needs_text({"heads": ["encoder", "probe"]})
    assert prob_ensemble_heads({}) == ("probe", "zero-shot")


def test_members_that_need_runner_arrays_come_from_the_runner(
    data: tuple[F32, np.ndarray, F32, F32],
) -> None:
    train, _, test, ood = data
    embeddings = np.r_[[np.eye(8)[0]], [-np.eye(8)[0]]]
    with pytest.raises(InvalidParameterError) as error:
        create_detector("score-ensemble", members=["knn", "mcm"]).fit(train)
    assert str(error.value) == (
        "score-ensemble member 1 (mcm) needs arrays the runner computes (class_embeddings, "
        "image_projection); build the members with the runner (pipeline.build_detector) and "
        "pass them as member_detectors"
    )
    built = [create_detector("knn"), create_detector("mcm", class_embeddings=embeddings)]
    ensemble = create_detector("score-ensemble", members=["knn", "mcm"], member_detectors=built)
    ensemble.fit(train)
    assert not hasattr(built[1], "n_dims_")  # the runner's detectors are cloned, not fitted
    assert 0.5 < auroc(ensemble, test, ood) < 1
    wrong = [create_detector("knn", k=2), create_detector("mcm", class_embeddings=embeddings)]
    with pytest.raises(InvalidParameterError) as error:
        create_detector("score-ensemble", members=["knn", "mcm"], member_detectors=wrong[::-1])
    assert str(error.value) == (
        "detector 'score-ensemble': member_detectors[0] is 'mcm' but members[0] is 'knn'; build "
        "one per member, in order (ensemble_member_specs)"
    )
    with pytest.raises(InvalidParameterError, match=r"member_detectors\[0\] has k=2 but members"):
        create_detector("score-ensemble", members=["knn:k=1", "mcm"], member_detectors=wrong)


# -- torch -----------------------------------------------------------------------------------


def test_torch_scores_match_and_need_every_member_differentiable(
    data: tuple[F32, np.ndarray, F32, F32],
) -> None:
    train, labels, test, ood = data
    queries = np.vstack([test[:10], ood[:10]])
    for normalize in ("rank", "zscore"):
        ensemble = create_detector(
            "score-ensemble", members=["gaussian", "mahalanobis"], normalize=normalize
        ).fit(train, labels)
        tensor = torch.tensor(queries, dtype=torch.float64, requires_grad=True)
        scores = ensemble.score_samples_torch(tensor)
        np.testing.assert_allclose(scores.detach().numpy(), ensemble.score_samples(queries))
        scores.sum().backward()
        assert tensor.grad is not None and torch.all(torch.isfinite(tensor.grad))
    lof = create_detector("score-ensemble", members=["gaussian", "lof"]).fit(train)
    with pytest.raises(InvalidParameterError) as error:
        lof.score_samples_torch(torch.tensor(queries))
    assert str(error.value) == (
        "score-ensemble has no differentiable score: its member 1 (lof) has none; choose "
        "differentiable members"
    )


# -- save / load: members nested, every value validated --------------------------------------


def read_metadata(path: Path) -> dict[str, str]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return dict(json.loads(raw[8 : 8 + length])["__metadata__"])


def forge(
    path: Path,
    edit_header: Callable[[dict[str, Any]], None] = lambda header: None,
    edit_arrays: Callable[[dict[str, np.ndarray]], None] = lambda arrays: None,
) -> None:
    """Edit a detector file and recompute its sha256, as a forger would."""
    arrays = load_file(str(path))
    metadata = read_metadata(path)
    content = json.loads(metadata["header"])
    edit_header(content)
    edit_arrays(arrays)
    header = json.dumps(content, sort_keys=True)
    digest = hashlib.sha256(header.encode())
    for name in sorted(arrays):
        array = arrays[name]
        digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.tobytes())
    metadata["header"], metadata["sha256"] = header, digest.hexdigest()
    save_file(arrays, str(path), metadata=metadata)


def heads_for(n_dims: int) -> dict[str, Any]:
    rng = np.random.default_rng(5)
    return {
        "heads": ["probe", "zero-shot"],
        "head_weights": [rng.normal(size=(2, n_dims)), 30 * rng.normal(size=(2, 4))],
        "head_biases": [rng.normal(size=2), None],
        "image_projections": [None, rng.normal(size=(n_dims, 4))],
    }


@pytest.fixture
def nested(data: tuple[F32, np.ndarray, F32, F32], tmp_path: Path) -> tuple[Any, Path]:
    """A fitted knn + mahalanobis + prob-ensemble score ensemble, saved."""
    train, labels, _, _ = data
    members = ["knn:k=3", "mahalanobis", "prob-ensemble"]  # heads: probe, zero-shot
    built = [
        create_detector("knn", k=3),
        create_detector("mahalanobis"),
        create_detector("prob-ensemble", **heads_for(8)),
    ]
    ensemble = create_detector("score-ensemble", members=members, member_detectors=built)
    ensemble.fit(train, labels)
    return ensemble, save_detector(ensemble, tmp_path / "ensemble.safetensors", metadata={"t": 1})


def test_a_nested_ensemble_round_trips_with_its_members_and_their_runner_arrays(
    nested: tuple[Any, Path], data: tuple[F32, np.ndarray, F32, F32]
) -> None:
    ensemble, path = nested
    _, _, test, ood = data
    arrays = load_file(str(path))
    assert "member.0.state.train_features_" in arrays
    assert "member.2.param.head_weights.1" in arrays and "member.2.state.weights_.0" in arrays
    header = json.loads(read_metadata(path)["header"])
    assert [member["detector"] for member in header["members"]] == [
        "knn",
        "mahalanobis",
        "prob-ensemble",
    ]
    assert header["members"][2]["params"]["image_projections"][0] is None
    loaded = load_detector(path)
    queries = np.vstack([test, ood])
    np.testing.assert_array_equal(loaded.score_samples(queries), ensemble.score_samples(queries))
    assert [type(member) for member in loaded.member_detectors] == [
        type(member) for member in ensemble.member_detectors
    ]
    refitted = loaded.fit(*data[:2])  # its runner-built members came back unfitted, refittable
    np.testing.assert_array_equal(refitted.score_samples(queries), ensemble.score_samples(queries))


def test_a_prob_ensemble_round_trips(
    data: tuple[F32, np.ndarray, F32, F32], tmp_path: Path
) -> None:
    train, _, test, _ = data
    detector = create_detector("prob-ensemble", score="entropy", **heads_for(8)).fit(train)
    loaded = load_detector(save_detector(detector, tmp_path / "prob.safetensors"))
    np.testing.assert_array_equal(loaded.score_samples(test), detector.score_samples(test))
    assert loaded.get_params()["image_projections"][0] is None


def _member(index: int, edit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    return lambda content: edit(content["members"][index])


@pytest.mark.parametrize(
    ("edit_header", "edit_arrays", "message"),
    [
        (
            _member(0, lambda member: member.update(detector="knnn")),
            None,
            "{path} (member.0) holds a detector 'knnn' this oodprobe does not have; choose from: ",
        ),
        (
            _member(1, lambda member: member.update(detector="gaussian")),
            None,
            "{path} (member.1) holds an invalid gaussian detector: missing state field mean_; "
            "refit and save it",
        ),
        (
            lambda content: content["members"].reverse(),
            None,
            "{path} (member.0) holds an invalid prob-ensemble detector: state field weights_ "
            "must be a list of 2 arrays (one per head)",
        ),
        (
            lambda content: content["members"].pop(),
            None,
            "{path} has an unexpected array 'member.2.param.head_bias",
        ),
        (
            None,
            lambda arrays: arrays.pop("member.0.state.train_features_"),
            "{path} (member.0) holds an invalid knn detector: missing state field "
            "train_features_; refit and save it",
        ),
        (
            None,
            lambda arrays: arrays.update(
                {"member.1.state.center_": np.full_like(arrays["member.1.state.center_"], np.nan)}
            ),
            "{path} (member.1) holds an invalid mahalanobis detector: state field center_ has "
            "non-finite values (NaN or infinity)",
        ),
        (
            None,
            lambda arrays: arrays.pop("member.2.state.weights_.1"),
            "{path} (member.2) holds an invalid prob-ensemble detector: ",
        ),
        (
            _member(0, lambda member: member["params"].update(k=4)),
            None,
            "{path} holds an invalid score-ensemble detector: detector 'score-ensemble': the "
            "file's members[0] has k=4 but members[0] sets k=3",
        ),
        (
            lambda content: content["members"].clear(),
            None,
            "{path} has an invalid header: 'members' must be a non-empty JSON list, got []",
        ),
        (
            lambda content: content.pop("members"),
            lambda arrays: [arrays.pop(name) for name in list(arrays) if name.startswith("m")],
            "{path} holds an invalid score-ensemble detector: detector 'score-ensemble': the "
            "file's members has 0 detector(s) but members lists 3",
        ),
    ],
)
def test_a_forged_member_fails_on_load_in_one_line(
    nested: tuple[Any, Path],
    edit_header: Callable[[dict[str, Any]], None] | None,
    edit_arrays: Callable[[dict[str, np.ndarray]], None] | None,
    message: str,
) -> None:
    _, path = nested
    forge(path, edit_header or (lambda header: None), edit_arrays or (lambda arrays: None))
    with pytest.raises(DetectorFileError) as error:
        load_detector(path)
    text = str(error.value)
    assert text.startswith(message.format(path=path)), text
    assert "\n" not in text


def test_a_forged_holdout_is_refused(nested: tuple[Any, Path]) -> None:
    _, path = nested

    def unsort(arrays: dict[str, np.ndarray]) -> None:
        arrays["state.holdout_scores_"] = arrays["state.holdout_scores_"][:, ::-1].copy()

    forge(path, edit_arrays=unsort)
    expected = (
        f"{path} holds an invalid score-ensemble detector: state field holdout_scores_ has rows "
        f"that are not sorted"
    )
    with pytest.raises(DetectorFileError, match=f"^{re.escape(expected)}$"):
        load_detector(path)


# -- prob-ensemble ----------------------------------------------------------------------------


def test_one_head_is_that_heads_msp_and_two_identical_heads_are_one(
    data: tuple[F32, np.ndarray, F32, F32],
) -> None:
    train, _, test, _ = data
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(size=(3, 8)), rng.normal(size=3)
    logits = test.astype(np.float64) @ weight.T + bias
    one = create_detector(
        "prob-ensemble", heads=["encoder"], head_weights=[weight], head_biases=[bias]
    ).fit(train)
    np.testing.assert_allclose(one.score_samples(test), msp(logits), rtol=1e-12)
    cooled = create_detector(
        "prob-ensemble",
        heads=["encoder"],
        temperatures=[2.0],
        head_weights=[weight],
        head_biases=[bias],
    ).fit(train)
    np.testing.assert_allclose(cooled.score_samples(test), msp(logits, 2.0), rtol=1e-12)
    for score in ("msp", "entropy", "gen"):
        single = create_detector(
            "prob-ensemble",
            heads=["encoder"],
            score=score,
            head_weights=[weight],
            head_biases=[bias],
        ).fit(train)
        double = create_detector(
            "prob-ensemble",
            heads=["encoder", "probe"],
            score=score,
            head_weights=[weight, weight],
            head_biases=[bias, bias],
        ).fit(train)
        np.testing.assert_allclose(
            double.score_samples(test), single.score_samples(test), rtol=1e-12
        )


def test_the_mean_distribution_and_its_entropy_and_gen_match_the_formulas(
    data: tuple[F32, np.ndarray, F32, F32],
) -> None:
    train, _, test, _ = data
    params = heads_for(8)
    detector = create_detector("prob-ensemble", **params).fit(train)
    features = test.astype(np.float64)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    joint = unit @ params["image_projections"][1]
    joint /= np.linalg.norm(joint, axis=1, keepdims=True)
    logits = [
        features @ params["head_weights"][0].T + params["head_biases"][0],
        joint @ params["head_weights"][1].T,
    ]
    probabilities = [np.exp(z - z.max(1, keepdims=True)) for z in logits]
    mean = sum(p / p.sum(1, keepdims=True) for p in probabilities) / 2
    np.testing.assert_allclose(detector.probabilities(test), mean, rtol=1e-12)
    np.testing.assert_allclose(detector.score_samples(test), mean.max(1), rtol=1e-12)
    detector.set_params(score="entropy")
    np.testing.assert_allclose(detector.score_samples(test), (mean * np.log(mean)).sum(1))
    detector.set_params(score="gen", gamma=0.5, top_m=1)
    top = mean.max(1)
    np.testing.assert_allclose(detector.score_samples(test), -np.sqrt(top * (1 - top)))
    for score in ("msp", "entropy", "gen"):  # torch matches, with finite gradients
        detector.set_params(score=score)
        tensor = torch.tensor(test, dtype=torch.float64, requires_grad=True)
        scores = detector.score_samples_torch(tensor)
        np.testing.assert_allclose(scores.detach().numpy(), detector.score_samples(test))
        scores.sum().backward()
        assert tensor.grad is not None and torch.all(torch.isfinite(tensor.grad))


def test_prob_ensemble_parameters_and_heads_are_checked(
    data: tuple[F32, np.ndarray, F32, F32],
) -> None:
    train = data[0]
    with pytest.raises(InvalidParameterError) as error:
        ProbEnsembleDetector.check_params({"heads": ["probe", "probe"]})
    assert str(error.value) == (
        "detector 'prob-ensemble': heads lists 'probe' more than once; give each head source once"
    )
    with pytest.raises(InvalidParameterError, match=r"temperatures has 1 entries but heads has 2"):
        ProbEnsembleDetector.check_params({"temperatures": [1.0]})
    with pytest.raises(InvalidParameterError, match=r"heads must be a non-empty list of head"):
        ProbEnsembleDetector.check_params({"heads": ["classifier"]})
    with pytest.raises(InvalidParameterError, match=r"needs the heads' weights \(head_weights"):
        create_detector("prob-ensemble").fit(train)
    different = create_detector(
        "prob-ensemble", heads=["encoder", "probe"], head_weights=[np.ones((2, 8)), np.ones((3, 8))]
    )
    with pytest.raises(InvalidParameterError, match=r"different numbers of classes \(encoder 2,"):
        different.fit(train)
    narrow = create_detector("prob-ensemble", heads=["encoder"], head_weights=[np.ones((2, 5))])
    with pytest.raises(InvalidParameterError, match=r"^detector 'prob-ensemble': head 0 \(encod"):
        narrow.fit(train)


def test_the_hmac_covers_the_members(nested: tuple[Any, Path], tmp_path: Path) -> None:
    ensemble, _ = nested
    key = b"the owner's key"
    path = save_detector(ensemble, tmp_path / "signed.safetensors", key=key)
    load_detector(path, key=key)
    forge(path, _member(0, lambda member: member["params"].update(temperature=0.5)))
    with pytest.raises(DetectorFileError, match="failed its HMAC check"):
        load_detector(path, key=key)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_precision_torch_scores_match_the_numpy_scores(
    dtype: torch.dtype, data: tuple[F32, np.ndarray, F32, F32]
) -> None:
    train, labels, test, ood = data
    detectors = [
        create_detector("score-ensemble", members=["gaussian", "mahalanobis"]).fit(train, labels),
        create_detector("prob-ensemble", score="gen", **heads_for(8)).fit(train),
    ]
    for detector in detectors:
        features = torch.tensor(np.vstack([test[:8], ood[:8]]), dtype=dtype, requires_grad=True)
        scores = detector.score_samples_torch(features)
        assert scores.dtype in (torch.float32, torch.float64)
        expected = detector.score_samples(features.detach().double().numpy())
        np.testing.assert_allclose(scores.detach().double().numpy(), expected, rtol=1e-4, atol=1e-4)
        scores.sum().backward()
        assert features.grad is not None and features.grad.dtype == dtype
        assert torch.all(torch.isfinite(features.grad)) and torch.count_nonzero(features.grad) > 0


def test_a_probe_head_member_gets_the_heads_row_indices_not_the_raw_labels() -> None:
    """ID classes 5 and 7: a temp-msp member on a (2-row) probe head is fitted on 0 / 1."""
    train, labels, test, _ = overlapping_data()
    raw = np.where(labels == 0, 5, 7)
    head = np.zeros((2, train.shape[1]))
    head[0, 0], head[1, 0] = 2.0, -2.0  # row 0 = class 5 at +e_0, row 1 = class 7 at -e_0
    members = [
        create_detector("temp-msp", head="probe", head_weight=head),
        create_detector("gaussian"),
    ]
    ensemble = create_detector(
        "score-ensemble", members=["temp-msp:head=probe", "gaussian"], member_detectors=members
    ).fit(train, raw)
    fitted = ensemble.members_[0]
    alone = create_detector("temp-msp", head="probe", head_weight=head)
    fit_rows, _ = holdout_split(len(train), raw, 0.2, 0)
    alone.fit(train[fit_rows], np.where(raw[fit_rows] == 5, 0, 1))
    assert fitted.temperature_ == pytest.approx(alone.temperature_)
    assert np.isfinite(ensemble.score_samples(test)).all()
