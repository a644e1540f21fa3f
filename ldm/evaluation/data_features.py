"""A feature network trained on the dataset itself, for Frechet distance and KID where no Inception weights exist.

FID needs Inception-v3 weights that an offline machine cannot download. Any network whose features separate what
matters in the data serves the same statistics, as long as the figure is labelled for what it is (``FD_data``,
``KID_data``: comparable only with figures from the same network on the same data, never with FID).

The network: a small CNN (a stem and three stride-2 conv stages of 16/32/64/64 channels with GroupNorm and SiLU, a
4x4 average pool flattened, a 64-wide SiLU layer whose output is the feature vector, a linear head), fast on a CPU
(tens of milliseconds a training step of 64 images on one core; at most 300 steps). On the built-in digits (1,797
images, 290 steps, about 20 s on one busy core) it names the digit of every training image. It is trained on the
dataset's images for a fixed number of steps with one of two objectives:

- ``words`` (the dataset has captions): multi-label prediction of the words of each image's captions (all its
  captions together), over a vocabulary without the words found in (almost) every image (``max_share``) or in very
  few (``min_images``). Features that tell the words apart are those a caption-conditioned model must get right.
- ``transforms`` (no captions, or fewer than two usable words): self-supervised; the network predicts which of the
  8 rotations-by-90-degrees and mirrorings was applied to an image (rotation prediction, Gidaris et al. 2018), which
  needs features of the images' shapes and orientation.

Training is seeded and runs on whatever device the images are on; ``ldm.evaluation.feature_networks`` caches the
trained network so that repeated evaluations compare with the same one.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DataFeatureNet", "DataFeatureSettings", "caption_vocabulary", "caption_words", "train_data_feature_net"]

OBJECTIVES = ("words", "transforms")
NUM_TRANSFORMS = 8  # 4 rotations x (mirrored or not)


@dataclass(frozen=True)
class DataFeatureSettings:
    """How the dataset's feature network is built and trained (all part of the cache key).

    Attributes:
        input_size: Side the network sees; images are resized to it (32 for 32-px data, 64 for larger).
        width: Channels of the first stage (then x2, x4).
        feature_dim: Size of the feature vector (the penultimate layer).
        steps: Training steps; None: about 10 epochs, at least 150 and at most 300 steps.
        batch_size: Images per step.
        learning_rate: AdamW learning rate (cosine decay to 0).
        max_share: A word in more than this share of the images is left out of the vocabulary (it tells nothing).
        min_images: A word in fewer images than this is left out (too rare to learn).
        max_words: At most this many words, the most frequent.
        max_images: At most this many images (a seeded choice) are used for training.
        seed: Seed of the initial weights, the image choice and the batches.
    """

    input_size: int = 32
    width: int = 16
    feature_dim: int = 64
    steps: int | None = None
    batch_size: int = 64
    learning_rate: float = 2e-3
    max_share: float = 0.9
    min_images: int = 5
    max_words: int = 1000
    max_images: int = 5000
    seed: int = 0

    @classmethod
    def for_image_size(cls, image_size: int, **overrides) -> "DataFeatureSettings":
        """Defaults for images of ``image_size``: a 32-px input up to 32-px images, else 64 px."""
        return cls(input_size=32 if image_size <= 32 else 64, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


def caption_words(caption: str) -> list[str]:
    """Lower-case words and numbers of a caption (``"A hand-drawn 7"`` -> ``["a", "hand", "drawn", "7"]``)."""
    return re.findall(r"[a-z0-9]+", caption.lower())


def caption_vocabulary(captions_per_image: Sequence[Sequence[str]], max_share: float = 0.9, min_images: int = 5,
                       max_words: int = 1000) -> list[str]:
    """The words worth predicting: in at least ``min_images`` images and at most ``max_share`` of them, the
    ``max_words`` most frequent (ties alphabetically)."""
    counts = Counter(w for captions in captions_per_image for w in {w for c in captions for w in caption_words(c)})
    n = len(captions_per_image)
    kept = [(w, c) for w, c in counts.items() if c >= min_images and c <= max_share * n]
    kept.sort(key=lambda wc: (-wc[1], wc[0]))
    return sorted(w for w, _ in kept[:max_words])


def _word_targets(captions_per_image: Sequence[Sequence[str]], vocabulary: Sequence[str]) -> torch.Tensor:
    index = {w: i for i, w in enumerate(vocabulary)}
    targets = torch.zeros(len(captions_per_image), len(vocabulary))
    for row, captions in enumerate(captions_per_image):
        for w in {w for c in captions for w in caption_words(c)}:
            if w in index:
                targets[row, index[w]] = 1.0
    return targets


class DataFeatureNet(nn.Module):
    """The small CNN: ``features(images)`` are the penultimate layer, ``forward(images)`` the head's logits.

    Args:
        input_size: Side the images are resized to (a multiple of 8).
        width: Channels of the first stage.
        feature_dim: Size of the feature vector.
        outputs: Outputs of the head (words, or the 8 transforms).
    """

    def __init__(self, input_size: int = 32, width: int = 16, feature_dim: int = 64, outputs: int = NUM_TRANSFORMS):
        super().__init__()
        if input_size < 8 or input_size % 8:
            raise ValueError(f"input_size must be a multiple of 8, got {input_size}")
        self.input_size = input_size
        stem_stride = max(1, input_size // 32)  # 64-px inputs: the stem halves them, so the cost stays a 32-px one

        def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.body = nn.Sequential(stage(3, width, stem_stride), stage(width, 2 * width, 2), stage(2 * width, 4 * width, 2),
                                  stage(4 * width, 4 * width, 2))
        # A 4x4 grid of the last stage, flattened: where things are matters (a 6 is not a 9), which a global mean loses.
        self.embed = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * 4 * width, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, outputs)
        # Set after training to the features' root-mean-square on the training images, and divided out: features
        # of RMS ~1, so KID's cubic kernel (x.y / D + 1)^3 works on the scale it was designed for (Inception's).
        self.register_buffer("feature_scale", torch.ones(()))

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().clamp(-1, 1)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True)
        return x

    def _embedding(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(self._prepare(images)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, feature_dim) features (the penultimate layer / ``feature_scale``)."""
        return self._embedding(images) / self.feature_scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self._embedding(images))


def _transformed(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each image rotated by ``label // 2`` quarter turns, then mirrored when ``label`` is odd."""
    out = images.clone()
    for label in range(NUM_TRANSFORMS):
        pick = labels == label
        if pick.any():
            x = torch.rot90(images[pick], label // 2, dims=(2, 3))
            out[pick] = x.flip(3) if label % 2 else x
    return out


def train_data_feature_net(images: torch.Tensor, captions_per_image: Sequence[Sequence[str]],
                           settings: DataFeatureSettings = DataFeatureSettings()) -> tuple[DataFeatureNet, dict]:
    """Train the feature network on ``images`` ((N, 3, H, W) in [-1, 1], on the device to train on) and their captions.

    Returns the network (in eval mode) and a summary: ``objective``, ``vocabulary``, ``train_images``, ``steps``,
    ``loss_first`` and ``loss_last`` (mean training loss over the first and last tenth of the steps).
    """
    if len(images) != len(captions_per_image):
        raise ValueError(f"{len(images)} images but {len(captions_per_image)} caption lists")
    if len(images) < 2:
        raise ValueError(f"the dataset feature network needs at least 2 images, got {len(images)}")
    # Also from a validation hook or an inference_mode block (the images may be inference tensors: copied here).
    with torch.inference_mode(False), torch.enable_grad():
        return _train(images.clone(), captions_per_image, settings)


def _train(images: torch.Tensor, captions_per_image: Sequence[Sequence[str]],
           settings: DataFeatureSettings) -> tuple[DataFeatureNet, dict]:
    g = torch.Generator().manual_seed(settings.seed)
    if len(images) > settings.max_images:
        keep = torch.randperm(len(images), generator=g)[: settings.max_images].sort().values
        images = images[keep.to(images.device)]
        captions_per_image = [captions_per_image[i] for i in keep.tolist()]
    vocabulary = caption_vocabulary(captions_per_image, settings.max_share, settings.min_images, settings.max_words)
    objective = "words" if len(vocabulary) >= 2 else "transforms"
    outputs = len(vocabulary) if objective == "words" else NUM_TRANSFORMS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = DataFeatureNet(settings.input_size, settings.width, settings.feature_dim, outputs).to(images.device)
    inputs = net._prepare(images)  # resized once
    targets = _word_targets(captions_per_image, vocabulary).to(images.device) if objective == "words" else None
    steps = settings.steps or min(300, max(150, 10 * math.ceil(len(inputs) / settings.batch_size)))
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    net.train()
    for _ in range(steps):
        batch = torch.randint(len(inputs), (min(settings.batch_size, len(inputs)),), generator=g).to(images.device)
        x = inputs[batch]
        if objective == "words":
            loss = F.binary_cross_entropy_with_logits(net(x), targets[batch])
        else:
            labels = torch.randint(NUM_TRANSFORMS, (len(batch),), generator=g).to(images.device)
            loss = F.cross_entropy(net(_transformed(x, labels)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    net.eval().requires_grad_(False)
    with torch.no_grad():
        square = sum(float(net._embedding(inputs[i : i + 256]).pow(2).sum()) for i in range(0, len(inputs), 256))
        net.feature_scale.fill_(max(math.sqrt(square / (len(inputs) * settings.feature_dim)), 1e-6))
    tenth = max(1, len(losses) // 10)
    summary = {"objective": objective, "vocabulary": vocabulary, "train_images": len(inputs), "steps": steps,
               "loss_first": sum(losses[:tenth]) / tenth, "loss_last": sum(losses[-tenth:]) / tenth}
    return net, summary
