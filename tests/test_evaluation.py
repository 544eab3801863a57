"""The evaluation suite (jointdit/evaluation): distances, weights, front ends, protocol."""

import numpy as np
import pytest
import scipy.linalg

from jointdit.evaluation.fd import Gaussian, frechet_distance, kvd


def _scipy_fd(x: np.ndarray, y: np.ndarray) -> float:
    """The reference form: sqrtm of the product of the covariances."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("n", [500, 40])  # more and fewer features than dimensions
def test_frechet_distance_matches_scipy(n):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 64))
    y = rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.5
    ours = frechet_distance(Gaussian.of(x), Gaussian.of(y))
    assert ours == pytest.approx(_scipy_fd(x, y), rel=1e-6)
    # rank-deficient covariances (n < D) leave rounding noise of ~1e-8 of the trace
    assert frechet_distance(Gaussian.of(x), Gaussian.of(x)) == pytest.approx(0.0, abs=1e-5)


def test_frechet_distance_closed_form_gaussians():
    """Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2, exactly."""
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([3.0, 1.0, 0.0])
    got = frechet_distance(Gaussian(mu1, np.diag(a), 0), Gaussian(mu2, np.diag(b), 0))
    want = 9 + 4 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert got == pytest.approx(want, rel=1e-12)
    # a full covariance: rotating both Gaussians together changes nothing
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    rotated = frechet_distance(
        Gaussian(q @ mu1, q @ np.diag(a) @ q.T, 0), Gaussian(q @ mu2, q @ np.diag(b) @ q.T, 0)
    )
    assert rotated == pytest.approx(want, rel=1e-9)


def test_kvd_reference_estimator():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 5)), rng.normal(size=(7, 5)) + 1.0
    kxx, kyy, kxy = ((a @ b.T / 5 + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    want = (kxx.sum() - np.trace(kxx)) / 30 + (kyy.sum() - np.trace(kyy)) / 42 - 2 * kxy.mean()
    assert kvd(x, y) == pytest.approx(want, rel=1e-12)
    # the unbiased within-set terms: two copies of one set give -2 (m tr K - sum K) / (m^2 (m-1))
    m, k = len(x), kxx
    assert kvd(x, x) == pytest.approx(-2 * (m * np.trace(k) - k.sum()) / (m * m * (m - 1)))
    # and two large samples of one distribution are ~0, far below a shifted one
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    assert abs(kvd(a, b)) < 0.02 * kvd(a, b + 0.5)


def test_distances_refuse_bad_shapes():
    with pytest.raises(ValueError, match="feature sizes differ"):
        kvd(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        Gaussian.of(np.zeros((1, 4)))
