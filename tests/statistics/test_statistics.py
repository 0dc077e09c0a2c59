"""Moments and null spaces against brute-force numpy."""

import numpy as np
import pytest

from nullcov.statistics.moments import Moments
from nullcov.statistics.projection import null_space, spectrum_threshold


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


def test_moments_about_different_shifts_add_up_to_the_brute_force_whole():
    rows = _rows(7) + 40.0
    rng = np.random.default_rng(7)
    parts = [Moments.of_rows(rows[a:b], shift=rows[a] + rng.normal(size=rows.shape[1]))
             for a, b in [(0, 1), (1, 70), (70, 133), (133, 200)]]
    merged = parts[0] + parts[1] + parts[2] + parts[3]
    np.testing.assert_array_equal(merged.shift, parts[0].shift)  # the left operand's shift: deterministic
    np.testing.assert_allclose(merged.sum_outer, rows.T @ rows, rtol=1e-12)
    np.testing.assert_allclose(merged.sum, rows.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(merged.covariance(), np.cov(rows, rowvar=False), rtol=1e-9, atol=1e-10)
    moved = merged.shifted_to(np.zeros(rows.shape[1]))
    np.testing.assert_allclose(moved.shifted_outer, rows.T @ rows, rtol=1e-12)


def test_covariance_keeps_its_digits_when_the_mean_dwarfs_the_spread():
    """|μ| ≫ σ (as text-encoder states): the capture's float32 products about a shift give the
    float64 brute-force covariance; without the shift (the old code) the cancellation of Σxxᵀ
    against nμμᵀ leaves errors of ~10% of the covariance."""
    import torch

    from nullcov.collection.capture import TorchMoments, column_sums, gram

    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(64, generator=generator) * 30
    batches = [(mean + 0.05 * torch.randn(48, 64, generator=generator)).float() for _ in range(5)]
    rows = torch.cat(batches).double().numpy()
    truth = np.cov(rows, rowvar=False)  # two-pass, float64

    def error(covariance):
        return np.abs(covariance - truth).max() / np.abs(truth).max()

    shifted = TorchMoments(64, "cpu")
    for batch in batches:
        shifted.add(batch)
    unshifted = Moments(len(rows), sum(column_sums(b, 0).double() for b in batches).numpy(),
                        sum(gram(b).double() for b in batches).numpy())  # the old capture: Σxxᵀ in float32 products
    assert error(unshifted.covariance()) > 1e-2
    assert error(shifted.to_moments().covariance()) < 1e-5
    np.testing.assert_allclose(shifted.to_moments().second_moment(), rows.T @ rows / len(rows), rtol=1e-6)


@pytest.mark.parametrize("threshold, percent", [(1e-8, None), (1.0, None), (50.0, None), (1e-30, None), (1e9, None),
                                                (None, 10), (None, 90)])
def test_null_space_from_the_smaller_side_equals_the_full_eigh(threshold, percent):
    """Brute force: the full eigh and U0 U0ᵀ over every eigenvalue under the threshold."""
    rows = _rows(11, n=300, d=40, rank=25) + 0.01 * _rows(12, n=300, d=40)
    statistic = rows.T @ rows / len(rows)
    values, vectors = np.linalg.eigh(statistic)
    cut = np.percentile(values, percent) if percent is not None else threshold
    basis = vectors[:, values < cut]
    space = null_space(statistic, threshold, threshold_percent=percent)
    assert space.null_dim == basis.shape[1]
    np.testing.assert_allclose(space.projection, basis @ basis.T, atol=1e-6)
    np.testing.assert_allclose(space.eigenvalues, values, rtol=1e-9, atol=1e-12)
