"""The demo's prompt-accuracy judge: a classifier of real 8x8 digits reading 32x32 RGB images."""

import numpy as np
import torch
from sklearn.datasets import load_digits

from ldm.data.builtin.digits import upscale_digit
from ldm.evaluation.digit_accuracy import images_to_digit_features, prompt_accuracy, train_digit_classifier


def test_classifier_reads_upscaled_real_digits_and_rejects_wrong_labels():
    classifier, held_out = train_digit_classifier()
    assert held_out > 0.97
    digits = load_digits()
    picks = np.arange(0, 1797, 9)[:200]
    images = torch.stack([
        torch.from_numpy(np.asarray(upscale_digit(digits.images[i], 32))).permute(2, 0, 1).float() / 127.5 - 1 for i in picks
    ])
    features = images_to_digit_features(images)
    assert features.shape == (len(picks), 64) and 0 <= features.min() and features.max() <= 16
    labels = digits.target[picks].tolist()
    accuracy, predictions = prompt_accuracy(classifier, images, labels)
    assert accuracy > 0.95 and len(predictions) == len(picks)
    wrong = [(d + 1) % 10 for d in labels]
    assert prompt_accuracy(classifier, images, wrong)[0] < 0.05
    blank = -torch.ones(10, 3, 32, 32)  # an empty (black) image is not every digit at once
    assert prompt_accuracy(classifier, blank, list(range(10)))[0] <= 0.2
