"""Known answers for the Fréchet distance."""

import numpy as np
import pytest

from eval.frechet import frechet_distance, frechet_distance_from_stats


def test_identical_sets_give_zero():
    x = np.random.default_rng(0).normal(size=(200, 16))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_mean_shift_gives_squared_norm():
    x = np.random.default_rng(1).normal(size=(300, 8))
    d = np.arange(8) / 3.0
    assert frechet_distance(x, x + d) == pytest.approx(float(d @ d), rel=1e-9, abs=1e-9)


def test_diagonal_covariances_closed_form():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_rank_deficient_covariance_stays_real_and_finite():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, 32)), rng.normal(size=(5, 32)) + 1.0  # fewer samples than dimensions
    value = frechet_distance(x, y)
    assert np.isfinite(value) and value > 0


def test_too_few_samples():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 4)), np.zeros((3, 4)))
