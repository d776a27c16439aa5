"""Fréchet distance between two sets of feature vectors (the FID/FVD formula), in float64.

    d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2})

(Dowson & Landau 1982; Heusel et al. 2017, eq. 6). The matrix square roots are taken by symmetric eigen-decomposition
(`numpy.linalg.eigh`) with negative eigenvalues — round-off on rank-deficient covariances, common when there are fewer
samples than feature dimensions — clipped to zero. Unlike `scipy.linalg.sqrtm` on the non-symmetric S_1 S_2, this never
returns complex values, and Tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2}) equals Tr((S_1 S_2)^{1/2}).
"""

from __future__ import annotations

import numpy as np


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of `features` [N, D] in float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape [N, D], got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    # Symmetrise: covariances from np.cov are symmetric only up to round-off.
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    root1 = _sqrt_psd(sigma1)
    cross = root1 @ sigma2 @ root1
    trace_cross = np.sqrt(np.clip(np.linalg.eigvalsh((cross + cross.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_cross)


def frechet_distance(features1: np.ndarray, features2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets [N1, D] and [N2, D]."""
    return frechet_distance_from_stats(*gaussian_stats(features1), *gaussian_stats(features2))
