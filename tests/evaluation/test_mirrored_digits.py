"""The mirrored-digits judge (digit x orientation) and the prompt evaluation built on it."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from ldm.data.builtin.digits import upscale_digit
from ldm.data.builtin.mirrored_digits import MIRRORED_DIGITS, mirror_digit
from ldm.evaluation.mirrored_digits import evaluate_mirrored_prompts, judge_orientation, train_orientation_classifier

DIGITS = load_digits()


def _image(pixels: np.ndarray) -> torch.Tensor:
    """One 8x8 digit -> a (3, 32, 32) image in [-1, 1], as the dataset writes it."""
    return torch.from_numpy(np.array(upscale_digit(pixels, 32))).permute(2, 0, 1).float() / 127.5 - 1


@pytest.fixture(scope="module")
def judge():
    return train_orientation_classifier()


def test_judge_is_accurate_on_held_out_digits_in_both_orientations(judge):
    _, held_out = judge
    # Measured 99.1% (seed 0; 98.1-99.1% over split seeds 0-2) on 14 classes; a judge blind to
    # orientation could score at most 50%, so 0.97 fails any judge that cannot tell a mirror image.
    assert held_out > 0.97


def test_judge_reads_upscaled_real_digits_and_their_mirror_images(judge):
    classifier, _ = judge
    picks = [i for i in range(0, 1797, 5) if DIGITS.target[i] in MIRRORED_DIGITS]
    labels = DIGITS.target[picks]
    normal = torch.stack([_image(DIGITS.images[i]) for i in picks])
    mirrored = torch.stack([_image(mirror_digit(DIGITS.images[i])) for i in picks])
    digits, is_mirrored = judge_orientation(classifier, normal)
    assert np.mean((digits == labels) & ~is_mirrored) > 0.95
    digits, is_mirrored = judge_orientation(classifier, mirrored)
    assert np.mean((digits == labels) & is_mirrored) > 0.95


class FakePipe:
    """Returns real digit images chosen from the prompt and seed, so every judged figure is known.

    ``a mirrored digit d``, sample k: the mirrored d for k < MIRRORED_RIGHT[d], else the normal d.
    ``a handwritten digit d``, sample k: the normal d for k < NORMAL_RIGHT[d], else the normal
    image of the next digit (right orientation, wrong digit).
    """

    def __init__(self, images: dict, first_seed: int, per_digit: int):
        self.images, self.first_seed, self.per_digit, self.calls = images, first_seed, per_digit, []

    def __call__(self, prompts, num_inference_steps, guidance_scale, sampler, seed, output_type, progress):
        self.calls.append(dict(n=len(prompts), steps=num_inference_steps, guidance=guidance_scale, sampler=sampler,
                               seed=list(seed), output_type=output_type, progress=progress))
        assert len(seed) == len(prompts)
        out = []
        for prompt, s in zip(prompts, seed):
            d = int(prompt[-1])
            k = (s - self.first_seed) % self.per_digit
            assert (s - self.first_seed) // self.per_digit == MIRRORED_DIGITS.index(d)
            if prompt == f"a mirrored digit {d}":
                out.append(self.images[d, k < MIRRORED_RIGHT[d]])
            else:
                assert prompt == f"a handwritten digit {d}"
                other = MIRRORED_DIGITS[(MIRRORED_DIGITS.index(d) + 1) % 7]
                out.append(self.images[d, False] if k < NORMAL_RIGHT[d] else self.images[other, False])
        return SimpleNamespace(images=torch.stack(out))


PER_DIGIT = 4
MIRRORED_RIGHT = {2: 4, 3: 3, 4: 2, 5: 1, 6: 0, 7: 4, 9: 4}  # 18 of 28
NORMAL_RIGHT = {2: 4, 3: 4, 4: 4, 5: 4, 6: 4, 7: 2, 9: 0}  # 22 of 28


def _judged_right_images(classifier) -> dict:
    """(digit, mirrored) -> an image of a real digit that the judge reads as exactly that."""
    images = {}
    for d in MIRRORED_DIGITS:
        for i in np.flatnonzero(DIGITS.target == d)[:20]:
            pair = {False: _image(DIGITS.images[i]), True: _image(mirror_digit(DIGITS.images[i]))}
            digits, mirrored = judge_orientation(classifier, torch.stack([pair[False], pair[True]]))
            if list(digits) == [d, d] and list(mirrored) == [False, True]:
                images[d, False], images[d, True] = pair[False], pair[True]
                break
        assert (d, True) in images, f"no real {d} among 20 read right in both orientations"
    return images


def test_evaluate_mirrored_prompts_reports_exact_shares(judge, tmp_path):
    pipe = FakePipe(_judged_right_images(judge[0]), first_seed=5, per_digit=PER_DIGIT)
    grid = tmp_path / "grids" / "mirrored.png"
    result = evaluate_mirrored_prompts(pipe, steps=7, guidance=3.0, sampler="euler", per_digit=PER_DIGIT, seed=5,
                                       grid_path=grid, batch_size=10)
    assert result["samples"] == 2 * 7 * PER_DIGIT
    assert result["mirrored_accuracy"] == pytest.approx(18 / 28)
    assert result["normal_accuracy"] == pytest.approx(22 / 28)
    assert result["judged_mirrored"] == pytest.approx({"mirrored_prompts": 18 / 28, "normal_prompts": 0.0})
    assert result["right_digit"] == pytest.approx({"mirrored_prompts": 1.0, "normal_prompts": 22 / 28})
    assert result["digits"] == list(MIRRORED_DIGITS)
    assert result["per_digit"]["mirrored"] == pytest.approx([MIRRORED_RIGHT[d] / PER_DIGIT for d in MIRRORED_DIGITS])
    assert result["per_digit"]["normal"] == pytest.approx([NORMAL_RIGHT[d] / PER_DIGIT for d in MIRRORED_DIGITS])
    assert result["judge_accuracy"] == pytest.approx(judge[1])
    # batches of 10, sampler settings passed through, one seed per sample shared by the two prompts of a pair
    assert [c["n"] for c in pipe.calls] == [10, 10, 10, 10, 10, 6]
    assert all(c["steps"] == 7 and c["guidance"] == 3.0 and c["sampler"] == "euler" for c in pipe.calls)
    assert all(c["output_type"] == "pt" and c["progress"] is False for c in pipe.calls)
    assert [s for c in pipe.calls for s in c["seed"]] == list(range(5, 5 + 28)) * 2
    # grid: one row per prompt (7 mirrored, then 7 normal), PER_DIGIT columns, 1-pixel padding
    img = Image.open(grid)
    assert img.size == (PER_DIGIT * 33 + 1, 14 * 33 + 1)
    tile = np.asarray(img)[1:33, 1:33, 0].astype(np.float64)  # row 0 = 'a mirrored digit 2', sample 0
    expected = (pipe.images[2, True][0].numpy() + 1) * 127.5
    assert np.abs(tile - expected).max() <= 1


def test_evaluate_mirrored_prompts_rejects_empty_runs():
    with pytest.raises(ValueError, match="per_digit"):
        evaluate_mirrored_prompts(object(), per_digit=0)
