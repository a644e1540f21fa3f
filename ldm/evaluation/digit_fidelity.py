"""How close are the demo's samples to the real digits? Fidelity and diversity beside prompt accuracy.

Prompt accuracy says a sample of "a handwritten digit 7" is recognisably a 7; it says nothing about
whether the 7s look like the real ones or like one another. Two figures do:

- **Fidelity (FD_digits)**: the Frechet distance between the samples and real digits, on the
  hidden-layer features of a small network (an MLP, one 64-unit ReLU layer) trained to classify the
  real digits. It is not FID (no Inception network) and is comparable only with itself. FD is biased
  upwards for small sets, so it is printed with its **real-vs-real floor**: the FD that real digits,
  drawn like the samples (the same number per class), get against the same reference. A perfect model
  scores near the floor.
- **Diversity**: for each digit, the mean pairwise feature distance of its samples divided by that of
  the real images of the digit. 1.0 is as varied as the real handwriting; well below 1 means the
  model draws one 7 over and over; above 1, noisy or mixed shapes.

Real digits are read the way the samples are: upscaled to the samples' size as the built-in dataset
does, then pooled back to 8x8 (`ldm.evaluation.digit_reading.images_to_digit_features`). Half of
each class (seeded) is the reference set; the floor's draws come from the other half.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ldm.evaluation.digit_reading import images_to_digit_features
from ldm.evaluation.statistics import frechet_distance, mean_pairwise_distance

__all__ = ["DigitFeatures", "digit_fidelity", "real_digit_images", "train_digit_feature_net"]


@dataclass(frozen=True)
class DigitFeatures:
    """The hidden layer of an MLP trained on real digits: 64 values 0..16 in, ``width`` ReLU features out."""

    weight: np.ndarray
    bias: np.ndarray
    held_out_accuracy: float

    def __call__(self, digit_values: np.ndarray) -> np.ndarray:
        """(N, 64) digit values on the 0..16 scale -> (N, width) features."""
        return np.maximum(np.asarray(digit_values, dtype=np.float64) / 16.0 @ self.weight + self.bias, 0.0)


@lru_cache(maxsize=4)
def real_digit_images(image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 real digits as the samples are read: upscaled to ``image_size`` then pooled to 8x8.

    Returns (N, 64) values on the 0..16 scale and (N,) labels.
    """
    from sklearn.datasets import load_digits

    from ldm.data.builtin.digits import upscale_digit

    digits = load_digits()
    images = torch.stack([
        torch.from_numpy(np.array(upscale_digit(d, image_size))).permute(2, 0, 1).float() / 127.5 - 1 for d in digits.images
    ])
    return images_to_digit_features(images).astype(np.float64), digits.target.copy()


@lru_cache(maxsize=4)
def train_digit_feature_net(image_size: int = 32, width: int = 64, seed: int = 0) -> DigitFeatures:
    """Train the feature MLP on all real digits (as read at ``image_size``); its held-out accuracy comes from a
    second MLP trained on 75% of them."""
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    values, labels = real_digit_images(image_size)
    x = values / 16.0

    def fit(xs, ys):
        return MLPClassifier(hidden_layer_sizes=(width,), alpha=1e-3, max_iter=600, random_state=seed).fit(xs, ys)

    x_train, x_test, y_train, y_test = train_test_split(x, labels, test_size=0.25, random_state=seed, stratify=labels)
    held_out = float(fit(x_train, y_train).score(x_test, y_test))
    net = fit(x, labels)
    return DigitFeatures(net.coefs_[0].copy(), net.intercepts_[0].copy(), held_out)


def _split_halves(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    reference, pool = [], []
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(labels == d))
        reference.append(idx[: len(idx) // 2])
        pool.append(idx[len(idx) // 2 :])
    return np.concatenate(reference), np.concatenate(pool)


def digit_fidelity(images: torch.Tensor, labels: list[int] | np.ndarray, floor_draws: int = 20, seed: int = 0) -> dict:
    """Fidelity (FD_digits with its real-vs-real floor) and diversity of generated digits.

    Args:
        images: Samples in [-1, 1], (N, 3, H, W), square.
        labels: The digit each sample was prompted with.
        floor_draws: Real draws averaged for the floor.
        seed: Seeds the reference/pool split and the floor's draws.
    """
    labels = np.asarray(labels)
    if len(labels) != images.shape[0] or len(labels) < 2:
        raise ValueError(f"digit_fidelity: need one label per image and at least 2 images, got {images.shape[0]} images, {len(labels)} labels")
    image_size = int(images.shape[-1])
    features = train_digit_feature_net(image_size)
    real_values, real_labels = real_digit_images(image_size)
    real = features(real_values)
    fake = features(images_to_digit_features(images))
    rng = np.random.default_rng(seed)
    reference, pool = _split_halves(real_labels, rng)

    counts = {d: int((labels == d).sum()) for d in range(10)}
    floors = []
    for _ in range(floor_draws):
        draw = np.concatenate([
            rng.choice(pool[real_labels[pool] == d], n, replace=n > int((real_labels[pool] == d).sum())) for d, n in counts.items() if n
        ])
        floors.append(frechet_distance(real[draw], real[reference]))

    ratios = {}
    for d, n in counts.items():
        if n >= 2:
            ratios[d] = mean_pairwise_distance(fake[labels == d]) / mean_pairwise_distance(real[real_labels == d])
    return {
        "fd_digits": frechet_distance(fake, real[reference]),
        "fd_floor": float(np.mean(floors)),
        "fd_floor_std": float(np.std(floors)),
        "diversity": float(np.mean(list(ratios.values()))) if ratios else float("nan"),
        "diversity_per_digit": {int(d): float(r) for d, r in ratios.items()},
        "feature_net_accuracy": features.held_out_accuracy,
        "reference_images": int(len(reference)),
    }
