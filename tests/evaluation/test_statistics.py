"""Known answers of the distribution statistics (FD, KID, IS), and agreement with torchmetrics given the same features."""

import numpy as np
import pytest
import scipy.linalg
import torch

from ldm.evaluation.statistics import frechet_distance, inception_score, kernel_distance


def _exact_gaussian_sample(mean: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` points whose sample mean and (unbiased) covariance are exactly ``mean`` and ``cov``."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whitened: covariance exactly I
    return z @ np.linalg.cholesky(cov).T + mean


def test_identical_sets_score_zero_and_noise_scores_high():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((300, 16))
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-8)
    kid, _ = kernel_distance(real, real, subset_size=300, subsets=1)
    # The unbiased MMD^2 of a set with itself leaves the diagonal out of the within-set terms only: O(1/N) below 0.
    assert -0.1 < kid <= 0
    far = rng.standard_normal((300, 16)) * 3 + 2
    assert frechet_distance(real, far) > 50
    assert kernel_distance(real, far, subset_size=100, subsets=10)[0] > 20 * abs(kid)


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(1)
    d = 6
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    cov1, cov2 = a @ a.T + 0.5 * np.eye(d), b @ b.T + 0.1 * np.eye(d)  # do not commute
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) + 1
    x, y = _exact_gaussian_sample(mu1, cov1, 500, 2), _exact_gaussian_sample(mu2, cov2, 400, 3)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * scipy.linalg.sqrtm(cov1 @ cov2).real)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-8)
    # Diagonal covariances: sum of (mean gap)^2 + (std gap)^2 per dimension.
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    x, y = _exact_gaussian_sample(np.zeros(3), np.diag(s1), 50, 4), _exact_gaussian_sample(np.ones(3), np.diag(s2), 60, 5)
    assert frechet_distance(x, y) == pytest.approx(3 + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum(), rel=1e-9)


def test_kid_is_unbiased_on_small_sets_where_fd_is_not():
    rng = np.random.default_rng(2)
    kids, fds = [], []
    for i in range(60):
        x, y = rng.standard_normal((20, 8)), rng.standard_normal((20, 8))
        kids.append(kernel_distance(x, y, subset_size=20, subsets=1, seed=i)[0])
        fds.append(frechet_distance(x, y))
    kids, fds = np.array(kids), np.array(fds)
    stderr = kids.std() / np.sqrt(len(kids))
    assert abs(kids.mean()) < 3 * stderr  # ~0 within its spread
    assert fds.mean() > 10 * fds.std() / np.sqrt(len(fds)) and fds.min() > 0  # clearly positive: biased


def test_inception_score_known_answers():
    classes = 7
    one_hot = np.eye(classes)[np.arange(70) % classes]  # confident and spread evenly
    assert inception_score(one_hot, splits=1)[0] == pytest.approx(classes, rel=1e-6)
    same = np.tile(np.random.default_rng(3).dirichlet(np.ones(classes)), (50, 1))
    assert inception_score(same, splits=5)[0] == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(np.ones((4, 3)))


def test_bad_feature_arrays_are_refused():
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((4, 3), np.nan), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="feature sizes differ"):
        kernel_distance(np.zeros((4, 3)), np.zeros((4, 2)))


class _Features(torch.nn.Module):
    """The identity: torchmetrics' metrics given features as 'images' compute on exactly these features."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_statistics_agree_with_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(4)
    real, fake = rng.standard_normal((64, 12)), rng.standard_normal((48, 12)) * 1.3 + 0.4
    fid = FrechetInceptionDistance(feature=_Features(12))
    fid.update(torch.from_numpy(real), real=True)
    fid.update(torch.from_numpy(fake), real=False)
    assert frechet_distance(fake, real) == pytest.approx(float(fid.compute()), rel=1e-6)

    # With one subset of every row the subset draw cannot differ: the unbiased MMD^2 must agree exactly.
    kid = KernelInceptionDistance(feature=_Features(12), subsets=1, subset_size=48)
    kid.update(torch.from_numpy(real[:48]), real=True)
    kid.update(torch.from_numpy(fake), real=False)
    assert kernel_distance(fake, real[:48], subset_size=48, subsets=1)[0] == pytest.approx(float(kid.compute()[0]), rel=1e-6)

    logits = rng.standard_normal((40, 10)) * 2
    score = InceptionScore(feature=_Features(10), splits=1)
    score.update(torch.from_numpy(logits))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert inception_score(probabilities, splits=1)[0] == pytest.approx(float(score.compute()[0]), rel=1e-6)
