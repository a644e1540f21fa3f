"""Fidelity and diversity of generated digits, checked on sets whose answer is known."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from ldm.data.builtin.digits import upscale_digit
from ldm.evaluation.digit_fidelity import digit_fidelity, train_digit_feature_net


def _real_images(per_digit: int, seed: int, mirror: bool = False):
    digits = load_digits()
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(digits.target == d), per_digit, replace=False) for d in range(10)])
    pixels = [digits.images[i][:, ::-1] if mirror else digits.images[i] for i in idx]
    images = torch.stack([torch.from_numpy(np.array(upscale_digit(p, 32))).permute(2, 0, 1).float() / 127.5 - 1 for p in pixels])
    return images, digits.target[idx]


@pytest.fixture(scope="module")
def real_set():
    return _real_images(10, seed=1)


def test_feature_net_recognises_real_digits():
    assert train_digit_feature_net(32).held_out_accuracy > 0.95


def test_real_digits_score_at_the_floor_and_are_as_diverse_as_real(real_set):
    result = digit_fidelity(*real_set)
    assert result["fd_digits"] < result["fd_floor"] + 3 * result["fd_floor_std"]
    assert 0.8 < result["diversity"] < 1.2
    assert set(result["diversity_per_digit"]) == set(range(10))


def test_noise_mirrored_and_collapsed_sets_score_worse(real_set):
    images, labels = real_set
    real = digit_fidelity(images, labels)
    noise = digit_fidelity(torch.rand_like(images) * 2 - 1, labels)
    mirrored = digit_fidelity(*_real_images(10, seed=1, mirror=True))
    collapsed = digit_fidelity(images[np.repeat(np.arange(0, 100, 10), 10)], labels)  # one image per digit, 10 times
    assert noise["fd_digits"] > 20 * real["fd_floor"]
    assert mirrored["fd_digits"] > 5 * real["fd_floor"]
    assert collapsed["fd_digits"] > 3 * real["fd_floor"]
    assert collapsed["diversity"] < 1e-6 and real["diversity"] > 0.8


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="one label per image"):
        digit_fidelity(torch.zeros(4, 3, 32, 32), [1, 2])
