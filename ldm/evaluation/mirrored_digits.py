"""Did fine-tuning teach the digits demo "mirrored"? Judge samples by digit AND orientation.

The judge is an RBF SVM over 14 classes, (digit, orientation) for the digits whose mirror image
differs from the digit (2, 3, 4, 5, 6, 7, 9) and orientation normal or mirrored. It is trained on
scikit-learn's real 8x8 digits and their left-right flips, never on generated images, and reads a
generated image the way `ldm.evaluation.digit_accuracy` does (grey, pooled to 8x8, 0..16).

`evaluate_mirrored_prompts` samples ``"a mirrored digit d"`` and ``"a handwritten digit d"`` with
the same seeds (so the two prompts of a pair start from the same noise) and reports how often
each sample shows the prompted digit in the prompted orientation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.data.builtin.mirrored_digits import MIRRORED_DIGITS
from ldm.evaluation.digit_accuracy import images_to_digit_features

__all__ = [
    "MIRRORED_PROMPT",
    "NORMAL_PROMPT",
    "evaluate_mirrored_prompts",
    "judge_orientation",
    "orientation_class",
    "train_orientation_classifier",
]

MIRRORED_PROMPT = "a mirrored digit {d}"
NORMAL_PROMPT = "a handwritten digit {d}"


def orientation_class(digit: int, mirrored: bool) -> int:
    """The judge's class index (0..13) of ``digit`` drawn normally or mirrored.

    Args:
        digit: One of `MIRRORED_DIGITS`.
        mirrored: True for the left-right flipped digit.
    """
    return 2 * MIRRORED_DIGITS.index(digit) + int(mirrored)


def _both_orientations(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 8, 8) digits -> (2N, 64) features of the digits then their mirrors, and their classes."""
    features = np.concatenate([images.reshape(len(images), -1), images[:, :, ::-1].reshape(len(images), -1)])
    classes = [orientation_class(int(d), False) for d in labels] + [orientation_class(int(d), True) for d in labels]
    return features, np.asarray(classes)


def train_orientation_classifier(seed: int = 0) -> tuple[Any, float]:
    """An RBF SVM over (digit, orientation) trained on all real digits 2-7, 9 and their mirrors.

    The held-out accuracy comes from a second SVM trained on 75% of the source digits (both
    orientations) and scored on the other 25% (both orientations), so no digit's mirror image
    is in training while the digit itself is scored.

    Args:
        seed: Seed of the train/held-out split.

    Returns:
        The classifier (predicts `orientation_class` indices from 64 features on the 0..16
        scale) and its held-out accuracy over the 14 classes.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    digits = load_digits()
    keep = np.isin(digits.target, MIRRORED_DIGITS)
    images, labels = digits.images[keep], digits.target[keep]
    im_train, im_test, y_train, y_test = train_test_split(images, labels, test_size=0.25, random_state=seed, stratify=labels)
    held_out = SVC(gamma=0.001, C=10.0).fit(*_both_orientations(im_train, y_train)).score(*_both_orientations(im_test, y_test))
    return SVC(gamma=0.001, C=10.0).fit(*_both_orientations(images, labels)), float(held_out)


def judge_orientation(classifier: Any, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Read images in [-1, 1], (B, 3, H, W): returns the judged digits and whether each is mirrored.

    Args:
        classifier: From `train_orientation_classifier`.
        images: White-on-black digit images.
    """
    classes = classifier.predict(images_to_digit_features(images))
    digits = np.asarray(MIRRORED_DIGITS)[classes // 2]
    return digits, (classes % 2).astype(bool)


def evaluate_mirrored_prompts(pipe, steps: int = 20, guidance: float = 5.0, sampler: str = "dpmpp_2m", per_digit: int = 20,
                              seed: int = 0, grid_path: str | Path | None = None, batch_size: int = 100) -> dict[str, Any]:
    """Generate ``per_digit`` samples of the mirrored and the normal prompt of each digit and judge them.

    Args:
        pipe: A `LatentDiffusionPipeline` (or anything called the same way returning ``.images``
            in [-1, 1]), with or without a LoRA adapter loaded.
        steps: Sampler steps.
        guidance: Classifier-free guidance scale.
        sampler: Sampler name.
        per_digit: Samples per prompt; 2 x 7 x ``per_digit`` images in all.
        seed: First seed; sample k of digit d gets the same seed under both prompts.
        grid_path: PNG to write (one row per prompt: the 7 mirrored prompts, then the 7 normal).
        batch_size: Images per pipeline call.

    Returns:
        ``mirrored_accuracy`` (share of mirrored-prompt samples judged that digit, mirrored),
        ``normal_accuracy`` (share of normal-prompt samples judged that digit, normal),
        ``judged_mirrored`` and ``right_digit`` (shares for each prompt kind, orientation or digit
        alone), ``per_digit`` (``mirrored`` and ``normal`` accuracies in the order of ``digits``),
        ``samples`` and ``judge_accuracy`` (the judge's held-out accuracy on real digits).
    """
    from torchvision.utils import make_grid, save_image

    if per_digit < 1 or batch_size < 1:
        raise ValueError(f"per_digit and batch_size must be at least 1, got {per_digit} and {batch_size}")
    classifier, judge_accuracy = train_orientation_classifier()
    labels = [d for d in MIRRORED_DIGITS for _ in range(per_digit)]
    prompts = [MIRRORED_PROMPT.format(d=d) for d in labels] + [NORMAL_PROMPT.format(d=d) for d in labels]
    seeds = [seed + i for i in range(len(labels))] * 2
    images = torch.cat([
        pipe(prompts[i : i + batch_size], num_inference_steps=steps, guidance_scale=guidance, sampler=sampler,
             seed=seeds[i : i + batch_size], output_type="pt", progress=False).images.float().cpu()
        for i in range(0, len(prompts), batch_size)
    ])
    digits, mirrored = judge_orientation(classifier, images)
    right_digit = digits == np.asarray(labels * 2)
    want_mirrored = np.arange(len(prompts)) < len(labels)
    correct = right_digit & (mirrored == want_mirrored)
    n = len(labels)
    result = {
        "mirrored_accuracy": float(correct[:n].mean()),
        "normal_accuracy": float(correct[n:].mean()),
        "judged_mirrored": {"mirrored_prompts": float(mirrored[:n].mean()), "normal_prompts": float(mirrored[n:].mean())},
        "right_digit": {"mirrored_prompts": float(right_digit[:n].mean()), "normal_prompts": float(right_digit[n:].mean())},
        "digits": list(MIRRORED_DIGITS),
        "per_digit": {
            kind: [float(correct[start + j * per_digit : start + (j + 1) * per_digit].mean()) for j in range(len(MIRRORED_DIGITS))]
            for kind, start in (("mirrored", 0), ("normal", n))
        },
        "samples": len(prompts),
        "judge_accuracy": judge_accuracy,
    }
    if grid_path is not None:
        Path(grid_path).parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid((images.clamp(-1, 1) + 1) / 2, nrow=per_digit, padding=1), str(grid_path))
    return result
