"""Prompt accuracy on the digits demo: does a sample of "a handwritten digit 7" show a 7?

A classifier trained on scikit-learn's real 8x8 digits (never on generated images) reads each
generated image after it is turned back into the digits' format: greyscale, downsampled to 8x8,
values 0..16. Accuracy is the share of samples whose predicted digit is the prompted one.
"""

from __future__ import annotations

import numpy as np
import torch

from ldm.evaluation.digit_fidelity import digit_fidelity
from ldm.evaluation.digit_reading import images_to_digit_features

__all__ = ["evaluate_digit_prompts", "images_to_digit_features", "prompt_accuracy", "train_digit_classifier"]


def train_digit_classifier(seed: int = 0):
    """An RBF SVM on all 1,797 real digits; returns the classifier and its held-out accuracy."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.data, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)
    held_out = SVC(gamma=0.001, C=10.0).fit(x_train, y_train).score(x_test, y_test)
    return SVC(gamma=0.001, C=10.0).fit(digits.data, digits.target), float(held_out)


def prompt_accuracy(classifier, images: torch.Tensor, labels: list[int]) -> tuple[float, np.ndarray]:
    """Share of ``images`` classified as their ``labels``; also returns the predictions."""
    predictions = classifier.predict(images_to_digit_features(images))
    return float(np.mean(predictions == np.asarray(labels))), predictions


def evaluate_digit_prompts(pipe, steps: int = 20, guidance: float = 5.0, sampler: str = "dpmpp_2m", per_digit: int = 10,
                           seed: int = 0, grid_path: str | None = None, batch_size: int = 100) -> dict:
    """Generate ``per_digit`` samples of ``a handwritten digit d`` for d = 0..9 and score them: prompt accuracy, and
    with ``per_digit >= 2`` fidelity and diversity (`ldm.evaluation.digit_fidelity`)."""
    from pathlib import Path

    from torchvision.utils import make_grid, save_image

    classifier, classifier_accuracy = train_digit_classifier()
    prompts = [f"a handwritten digit {d}" for d in range(10) for _ in range(per_digit)]
    labels = [d for d in range(10) for _ in range(per_digit)]
    seeds = [seed + i for i in range(len(prompts))]
    images = torch.cat([
        pipe(prompts[i : i + batch_size], num_inference_steps=steps, guidance_scale=guidance, sampler=sampler,
             seed=seeds[i : i + batch_size], output_type="pt", progress=False).images
        for i in range(0, len(prompts), batch_size)
    ])
    accuracy, predictions = prompt_accuracy(classifier, images, labels)
    per = [float(np.mean(predictions[d * per_digit : (d + 1) * per_digit] == d)) for d in range(10)]
    quality = digit_fidelity(images, labels, seed=seed) if per_digit >= 2 else {}
    if grid_path is not None:
        Path(grid_path).parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid((images + 1) / 2, nrow=per_digit, padding=1), grid_path)
    return {"accuracy": accuracy, "per_digit": per, "samples": len(prompts), "classifier_accuracy": classifier_accuracy, **quality}
