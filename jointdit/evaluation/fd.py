"""Distances between two sets of features: Fréchet distance (FVD, FAD) and KVD.

Both are computed in float64. The Fréchet distance of Gaussians N(mu1, S1), N(mu2, S2) is
|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2); the trace term is taken through the
symmetric form tr((S1^1/2 S2 S1^1/2)^1/2) with eigendecompositions, which equals what
`scipy.linalg.sqrtm` gives on the product (the reference code) without its complex round trip.
Covariances are the unbiased ones (np.cov), as in the reference implementations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Gaussian:
    """Mean and covariance of a feature set, and how many features made them."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def of(cls, features: np.ndarray) -> Gaussian:
        x = _features(features)
        if len(x) < 2:
            raise ValueError(f"a covariance needs at least 2 features, got {len(x)}")
        return cls(x.mean(axis=0), np.cov(x, rowvar=False), len(x))


def _features(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    return x


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues,
    rounding noise, are clipped to 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """Fréchet distance between two Gaussians (feature sets summarised by `Gaussian.of`)."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature sizes differ: {a.mu.shape} vs {b.mu.shape}")
    root = _sqrt_psd(a.sigma)
    middle = np.linalg.eigvalsh((root @ b.sigma @ root + (root @ b.sigma @ root).T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(middle, 0.0, None)).sum())
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_sqrt)


def kvd(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
    """Kernel distance (KVD for I3D features) as the FVD reference code computes it: squared
    MMD with the polynomial kernel k(a, b) = (a.b / D + coef0)^degree, the within-set terms
    without their diagonal (unbiased), the cross term over all pairs. It is 0 in expectation
    for two samples of one distribution (not exactly 0 on two copies of one set)."""
    x, y = _features(x), _features(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"KVD needs at least 2 features per set, got {m} and {n}")

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a @ b.T / x.shape[1] + coef0) ** degree

    kxx, kyy = kernel(x, x), kernel(y, y)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kernel(x, y).mean())
