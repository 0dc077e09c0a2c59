"""Moments and null spaces against brute-force numpy."""

import numpy as np
import pytest

from nullcov.projection import null_space, spectrum_threshold
from nullcov.statistics import Moments


def _rows(seed, n=200, d=12, rank=None):
    rng = np.random.default_rng(seed)
    if rank is None:
        return rng.normal(size=(n, d)) * rng.uniform(0.1, 3, size=d) + rng.normal(size=d)
    return rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d))


def test_sums_of_shards_equal_the_whole_in_any_order():
    rows = _rows(0)
    parts = [Moments.of_rows(rows[a:b]) for a, b in [(0, 1), (1, 70), (70, 133), (133, 200)]]
    forward = parts[0] + parts[1] + parts[2] + parts[3]
    backward = parts[3] + parts[2] + parts[1] + parts[0]
    whole = Moments.of_rows(rows)
    for merged in (forward, backward):
        assert merged.count == 200
        np.testing.assert_allclose(merged.sum_outer, whole.sum_outer, rtol=1e-13)
        np.testing.assert_allclose(merged.sum, whole.sum, rtol=1e-13, atol=1e-12)


def test_second_moment_and_covariance_match_numpy():
    rows = _rows(1)
    moments = Moments.of_rows(rows)
    np.testing.assert_allclose(moments.statistic("second_moment"), rows.T @ rows / len(rows), rtol=1e-12)
    np.testing.assert_allclose(moments.statistic("covariance"), np.cov(rows, rowvar=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="statistic must be"):
        moments.statistic("mean")


def test_problems_are_reported():
    good = Moments.of_rows(_rows(2, n=5, d=3))
    assert good.problems() == []
    assert "positive" in Moments(0, good.sum, good.sum_outer).problems()[0]
    assert "float64" in Moments(5, good.sum.astype(np.float32), good.sum_outer).problems()[0]
    assert "shapes" in Moments(5, good.sum, good.sum_outer[:2]).problems()[0]
    bad = good.sum_outer.copy()
    bad[0, 0] = np.nan
    assert "non-finite" in Moments(5, good.sum, bad).problems()[0]


@pytest.mark.parametrize("threshold", [1e-6, 0.5, 5.0])
def test_projection_properties(threshold):
    rows = _rows(3, n=300, d=16, rank=9)  # 7-dimensional exact null space
    statistic = Moments.of_rows(rows).second_moment()
    space = null_space(statistic, threshold)
    eigenvalues = np.linalg.eigvalsh(statistic)
    P = space.projection.astype(np.float64)
    assert space.null_dim == int((eigenvalues < threshold).sum()) >= 7
    np.testing.assert_allclose(space.eigenvalues, eigenvalues, rtol=1e-8, atol=1e-9)
    assert np.all(np.diff(space.eigenvalues) >= 0)
    np.testing.assert_allclose(P, P.T, atol=1e-6)
    np.testing.assert_allclose(P @ P, P, atol=1e-5)
    assert np.linalg.matrix_rank(P, tol=1e-3) == space.null_dim
    # Everything left in C P has eigenvalue below the threshold.
    assert np.linalg.norm(statistic @ P, 2) <= threshold * (1 + 1e-5) + 1e-6
    assert np.linalg.norm(statistic @ P) / np.linalg.norm(statistic) < max(threshold, 1e-5)


def test_exact_null_space_annihilates_the_data():
    rows = _rows(4, n=100, d=10, rank=6)
    space = null_space(Moments.of_rows(rows).second_moment(), 1e-8)
    assert space.null_dim == 4
    update = np.random.default_rng(5).normal(size=(7, 10))
    assert np.abs((update @ space.projection.astype(np.float64)) @ rows.T).max() < 1e-4


def test_percentile_threshold_wins():
    eigenvalues = np.arange(1.0, 101.0)
    assert spectrum_threshold(eigenvalues, 0.02, 10) == pytest.approx(np.percentile(eigenvalues, 10))
    assert spectrum_threshold(eigenvalues, 0.02, None) == 0.02
    rows = _rows(6, n=500, d=20)
    space = null_space(Moments.of_rows(rows).second_moment(), 1e9, threshold_percent=25)
    assert space.null_dim == int((space.eigenvalues < np.percentile(space.eigenvalues, 25)).sum()) == 5
    for bad in (0, 100, -1):
        with pytest.raises(ValueError, match="threshold_percent"):
            spectrum_threshold(eigenvalues, 0.02, bad)
    with pytest.raises(ValueError, match="nullspace_threshold"):
        spectrum_threshold(eigenvalues, -1, None)
