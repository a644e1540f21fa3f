"""Distribution distances between two sets of feature vectors: Frechet distance, KID, Inception Score.

These are the statistics behind FID, KID and IS; what makes a figure "FID" is the feature network
(Inception-v3's 2048-d pool features), not the formula. Every function here takes plain feature
arrays, so the same code scores Inception features, CLIP features or those of a network trained on
the dataset itself (`ldm.evaluation.feature_networks`); the caller labels the figure.

All arithmetic is float64 numpy. The Frechet distance agrees with torchmetrics'
``FrechetInceptionDistance`` given the same features (tested).
"""

from __future__ import annotations

import numpy as np

__all__ = ["frechet_distance", "gaussian_stats", "inception_score", "kernel_distance", "mean_pairwise_distance"]


def _as_features(x, name: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"{name}: expected a (N, D) feature array with N >= 2, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return a


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of (N, D) features."""
    a = _as_features(features, "features")
    return a.mean(axis=0), np.cov(a, rowvar=False).reshape(a.shape[1], a.shape[1])


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((m + m.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a, b) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` (N, D) and ``b`` (M, D).

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``, the trace of the square root taken
    from the eigenvalues of the symmetric ``S_a^(1/2) S_b S_a^(1/2)`` (same spectrum, numerically
    stable). It is biased upwards for small N: compare figures at the same sample sizes, and quote the
    real-vs-real floor at that size.
    """
    mu_a, s_a = gaussian_stats(a)
    mu_b, s_b = gaussian_stats(b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature sizes differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    root = _sqrt_psd(s_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s_b @ root), 0, None)).sum()
    return float(max(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross, 0.0))


def kernel_distance(a, b, subset_size: int = 1000, subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the cubic polynomial kernel ``(x.y / D + 1)^3``, mean and std over subsets.

    Each of ``subsets`` draws ``min(subset_size, N, M)`` rows of each set without replacement
    (seeded). The estimator is unbiased, so two samples of one distribution average to ~0 even when
    small (it can be slightly negative), unlike the Frechet distance.
    """
    x, y = _as_features(a, "a"), _as_features(b, "b")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    m = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    d = x.shape[1]
    values = []
    for _ in range(subsets):
        xs, ys = x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)]
        kxx, kyy, kxy = (xs @ xs.T / d + 1) ** 3, (ys @ ys.T / d + 1) ** 3, (xs @ ys.T / d + 1) ** 3
        off = m * (m - 1)
        values.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def inception_score(probabilities, splits: int = 10) -> tuple[float, float]:
    """``exp(E_x KL(p(y|x) || p(y)))`` from (N, C) class probabilities, mean and std over ``splits`` parts.

    1 for a set whose every image gets the same distribution; C for confident predictions spread
    evenly over all C classes.
    """
    p = _as_features(probabilities, "probabilities")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("probabilities: rows must be non-negative and sum to 1 (apply softmax to logits first)")
    splits = max(1, min(splits, len(p)))
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(np.clip(part, 1e-12, None)) - np.log(np.clip(marginal, 1e-12, None)))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def mean_pairwise_distance(features) -> float:
    """Mean Euclidean distance between distinct rows of (N, D) features: a set's spread (diversity)."""
    a = _as_features(features, "features")
    sq = (a * a).sum(axis=1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2 * a @ a.T, 0, None)
    n = len(a)
    return float(np.sqrt(d2)[~np.eye(n, dtype=bool)].mean())
