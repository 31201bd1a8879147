"""Review of the post-hoc family and the ensembles (issue 10): regressions of bugs found."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodprobe.detectors import create_detector, load_detector, save_detector
from oodprobe.detectors.ensemble import _RankNormalizer


def test_rank_normalisation_in_float32_is_finite_where_the_top_knots_collapse() -> None:
    """Held-out scores distinct in float64 but equal in float32 (the top two here) leave the
    last interpolation segment of zero width in a float32 torch score: a score at the top
    knot must still get the numpy value and a finite gradient, not 0/0."""
    normalizer = _RankNormalizer(np.array([0.0, 0.5, 1.0, 1.0 + 1e-9]))
    owner = create_detector("score-ensemble")
    scores = torch.tensor([1.0, 2.0, 0.7, 0.0], dtype=torch.float32, requires_grad=True)
    values = normalizer.torch(scores, owner)
    expected = normalizer(scores.detach().double().numpy())
    np.testing.assert_allclose(values.detach().double().numpy(), expected, atol=1e-6)
    assert torch.isfinite(values).all()
    values.sum().backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()


def _round_trip_scores(detector: Any, features: np.ndarray, path: Path) -> None:
    loaded = load_detector(save_detector(detector, path))
    np.testing.assert_array_equal(loaded.score_samples(features), detector.score_samples(features))


def test_runner_arrays_given_as_nested_lists_save_and_load(tmp_path: Path) -> None:
    """The head (and class embeddings) are array-like parameters: a detector fitted with them
    as nested lists must load from the file it saved, as one fitted with arrays does."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 4))
    weight, bias = rng.normal(size=(3, 4)), rng.normal(size=3)
    gen = create_detector("gen", head_weight=weight.tolist(), head_bias=bias.tolist())
    _round_trip_scores(gen.fit(features), features, tmp_path / "gen.safetensors")
    prob = create_detector(
        "prob-ensemble",
        heads=["encoder", "probe"],
        head_weights=[weight.tolist(), (2 * weight).tolist()],
        head_biases=[bias.tolist(), None],
    )
    _round_trip_scores(prob.fit(features), features, tmp_path / "prob.safetensors")
    mcm = create_detector("mcm", class_embeddings=weight.tolist())
    _round_trip_scores(mcm.fit(features), features, tmp_path / "mcm.safetensors")
