"""Label mining (oodprobe.mining): NegMining against brute force, ClusterMine-style positives on
clustered joint-space data whose true names are in the corpus."""

from __future__ import annotations

import numpy as np
import pytest

from oodprobe.detectors import create_detector
from oodprobe.errors import InvalidParameterError
from oodprobe.metrics import auroc
from oodprobe.mining import (
    MinedLabels,
    mine_negative_labels,
    mine_positive_labels,
    negative_label_similarity,
)

JOINT_DIMS = 16


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def hand_quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile written out (torch.quantile's and numpy's default rule)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(np.floor(position))
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


# -- NegMining -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labels_and_corpus() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(7, JOINT_DIMS)), rng.normal(size=(60, JOINT_DIMS))


@pytest.mark.parametrize("percentile", [0.05, 0.0, 0.5, 1.0])
def test_negative_label_similarity_is_the_quantile_of_cosines_written_out(
    labels_and_corpus: tuple[np.ndarray, np.ndarray], percentile: float
) -> None:
    labels, corpus = labels_and_corpus
    expected = [
        hand_quantile(
            [
                float(np.dot(candidate, label) / np.linalg.norm(candidate) / np.linalg.norm(label))
                for label in labels
            ],
            1 - percentile,
        )
        for candidate in corpus
    ]
    got = negative_label_similarity(labels, corpus, percentile)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    if percentile == 0.0:  # the 0-percentile of distances is the nearest ID label
        np.testing.assert_allclose(got, (unit(corpus) @ unit(labels).T).max(axis=1), atol=1e-12)


def test_neg_mining_keeps_the_farthest_candidates_as_brute_force_does(
    labels_and_corpus: tuple[np.ndarray, np.ndarray],
) -> None:
    labels, corpus = labels_and_corpus
    closeness = negative_label_similarity(labels, corpus, 0.05)
    brute = sorted(range(len(corpus)), key=lambda index: (closeness[index], index))[:25]
    mined = mine_negative_labels(labels, corpus, 25, 0.05)
    assert mined.dtype == np.int64
    assert mined.tolist() == brute
    rest = np.setdiff1d(np.arange(len(corpus)), mined)
    assert closeness[mined].max() <= closeness[rest].min()  # farthest first, none left behind


def test_neg_mining_picks_the_labels_orthogonal_to_the_id_labels() -> None:
    class_embeddings = np.eye(4, JOINT_DIMS)
    near = unit(class_embeddings + 0.3 * np.eye(4, JOINT_DIMS, k=4))  # near one ID label each
    far = np.eye(JOINT_DIMS)[10:13]  # orthogonal to every ID label
    corpus = np.vstack([near, far, near])
    mined = mine_negative_labels(class_embeddings, corpus, 3)
    assert sorted(mined.tolist()) == [4, 5, 6]


def test_neg_mining_exclude_by_index_and_by_mask() -> None:
    class_embeddings = np.eye(3, JOINT_DIMS)
    corpus = np.vstack([np.eye(JOINT_DIMS)[5:9], class_embeddings])
    assert mine_negative_labels(class_embeddings, corpus, 2, exclude=[0, 1]).tolist() == [2, 3]
    mask = np.zeros(len(corpus), dtype=bool)
    mask[[0, 2]] = True
    assert mine_negative_labels(class_embeddings, corpus, 2, exclude=mask).tolist() == [1, 3]


def test_neg_mining_errors_say_what_and_how_to_fix() -> None:
    class_embeddings = np.eye(3, JOINT_DIMS)
    corpus = np.eye(JOINT_DIMS)[5:9]
    with pytest.raises(InvalidParameterError) as error:
        mine_negative_labels(class_embeddings, corpus, 5)
    assert str(error.value) == (
        "n_negatives must be <= the 4 corpus labels available to mine, got 5; lower "
        "n_negatives or use a larger corpus"
    )
    with pytest.raises(InvalidParameterError, match="corpus_embeddings has 12 columns but"):
        mine_negative_labels(class_embeddings, corpus[:, :12], 2)
    with pytest.raises(InvalidParameterError, match=r"percentile must be a number in \[0, 1\]"):
        mine_negative_labels(class_embeddings, corpus, 2, 1.5)
    with pytest.raises(InvalidParameterError, match="n_negatives must be an integer, got True"):
        mine_negative_labels(class_embeddings, corpus, True)
    with pytest.raises(InvalidParameterError, match=r"all-zero row \(1\)"):
        mine_negative_labels(class_embeddings, np.vstack([corpus[:1], np.zeros(16)]), 1)
    with pytest.raises(InvalidParameterError, match="exclude must be corpus indices"):
        mine_negative_labels(class_embeddings, corpus, 1, exclude=[7])


# -- ClusterMine-style positives -------------------------------------------------------------

TRUE_NAMES = ("tench", "goldfish", "church", "parachute")


def clustered_world(
    seed: int = 0, per_cluster: int = 60, noise: float = 0.15
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], np.ndarray]:
    """ID images around 4 orthogonal concept directions; a corpus of their true names (near
    the centres), distractors (random; and one halfway between two concepts) and an OOD
    concept. Returns (images, true cluster per image, corpus embeddings, terms, OOD images).
    """
    rng = np.random.default_rng(seed)
    centres = np.eye(len(TRUE_NAMES), JOINT_DIMS)
    truth = np.repeat(np.arange(len(TRUE_NAMES)), per_cluster)
    images = unit(centres[truth] + noise * rng.normal(size=(len(truth), JOINT_DIMS)))
    true_names = unit(centres + 0.05 * rng.normal(size=centres.shape))
    random_distractors = unit(rng.normal(size=(30, JOINT_DIMS)))
    halfway = unit(centres[:1] + centres[1:2])  # tench and goldfish at once
    ood_direction = np.eye(JOINT_DIMS)[12:13]
    corpus = np.vstack([random_distractors[:15], true_names, halfway, random_distractors[15:]])
    corpus = np.vstack([corpus, ood_direction])
    terms = [f"distractor {i}" for i in range(15)] + list(TRUE_NAMES) + ["fish"]
    terms += [f"distractor {i}" for i in range(15, 30)] + ["tiling"]
    ood = unit(ood_direction + noise * rng.normal(size=(per_cluster, JOINT_DIMS)))
    return images, truth, corpus, terms, ood


def test_mined_positives_are_the_true_names_each_for_its_own_cluster() -> None:
    images, truth, corpus, terms, _ = clustered_world()
    mined = mine_positive_labels(images, corpus, terms, n_clusters=4, seed=0)
    assert isinstance(mined, MinedLabels)
    assert sorted(mined.names) == sorted(TRUE_NAMES)
    assert [terms[index] for index in mined.indices] == list(mined.names)
    for name, cluster in zip(mined.names, mined.clusters, strict=True):
        members = truth[mined.assignments == cluster]
        # every image of the cluster mined as 'tench' is a tench (clusters are pure here)
        assert set(members.tolist()) == {TRUE_NAMES.index(name)}
    np.testing.assert_array_equal(np.bincount(mined.assignments), mined.cluster_sizes)
    assert [len(names) for names in mined.cluster_names()] == [1, 1, 1, 1]
    assert np.all(mined.scores > 0.9) and np.all(mined.agreement == 1.0)
    np.testing.assert_allclose(np.linalg.norm(mined.centers, axis=1), 1.0)


def test_mined_names_serve_as_mcm_class_names_label_free() -> None:
    images, _, corpus, terms, ood = clustered_world(seed=1)
    mined = mine_positive_labels(images, corpus, terms, n_clusters=4, seed=0)
    mcm = create_detector("mcm", class_embeddings=corpus[mined.indices], temperature=0.1)
    mcm.fit(images)
    test_images, *_ = clustered_world(seed=2)
    assert auroc(mcm.score_samples(test_images), mcm.score_samples(ood)) > 0.99


def test_more_names_per_cluster_and_an_agreement_threshold() -> None:
    images, _, corpus, terms, _ = clustered_world(noise=0.6)  # noisier: some images pick others
    one = mine_positive_labels(images, corpus, terms, n_clusters=4, seed=0)
    more = mine_positive_labels(images, corpus, terms, n_clusters=4, seed=0, names_per_cluster=3)
    assert set(one.names) <= set(more.names) and len(more.names) > len(one.names)
    for names in more.cluster_names():
        assert len(names) <= 3
    for cluster in range(4):  # ranked by the share of the cluster's images, highest first
        scores = more.scores[more.clusters == cluster]
        assert np.all(np.diff(scores) <= 0)
    every = mine_positive_labels(images, corpus, terms, n_clusters=4, names_per_cluster=99)
    strict = mine_positive_labels(
        images, corpus, terms, n_clusters=4, names_per_cluster=99, min_agreement=1.0
    )
    unanimous = {
        name for name, share in zip(every.names, every.agreement, strict=True) if share == 1.0
    }
    assert set(strict.names) == unanimous and len(unanimous) < len(every.names)


def test_positive_mining_is_seeded_and_checks_its_inputs() -> None:
    images, _, corpus, terms, _ = clustered_world()
    first = mine_positive_labels(images, corpus, terms, n_clusters=4, seed=3)
    second = mine_positive_labels(images, corpus, terms, n_clusters=4, seed=3)
    assert first.names == second.names
    np.testing.assert_array_equal(first.assignments, second.assignments)
    with pytest.raises(InvalidParameterError) as error:
        mine_positive_labels(images, corpus, terms[:-1], n_clusters=4)
    assert str(error.value) == (
        f"corpus_terms must be {len(corpus)} strings, one per row of corpus_embeddings, got "
        f"{len(corpus) - 1} items"
    )
    with pytest.raises(InvalidParameterError, match=r"n_clusters must be an integer in \[1, 240\]"):
        mine_positive_labels(images, corpus, terms, n_clusters=0)
    with pytest.raises(InvalidParameterError, match="corpus_embeddings has 13 columns"):
        mine_positive_labels(images, corpus[:, :13], terms, n_clusters=4)
