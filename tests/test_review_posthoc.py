"""Review of the post-hoc family and the ensembles (issue 10): regressions of bugs found."""

from __future__ import annotations

import numpy as np
import torch

from oodprobe.detectors import create_detector
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
