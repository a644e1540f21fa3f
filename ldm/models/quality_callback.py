"""``QualityMetrics``: FD/KID of validation samples (FID/KID/IS with Inception weights) logged while training.

    trainer:
      callbacks:
        - class_path: ldm.models.QualityMetrics
          init_args: {every_n_epochs: 5, num_samples: 200, steps: 20}

The figures are those of ``ldm evaluate quality`` (:mod:`ldm.evaluation.quality`), on the DataModule's images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from ldm.diffusion import SAMPLER_REGISTRY

log = logging.getLogger(__name__)

__all__ = ["QualityMetrics"]


class QualityMetrics(pl.Callback):
    """At the end of validation every ``every_n_epochs`` epochs, generate samples from validation captions with the
    model being trained and log how close they are to the real images.

    Global rank 0 does the work (the other ranks wait for its figures, then all log the same values, so a
    ``ModelCheckpoint`` may monitor them on every rank). The reference is a seeded choice of ``num_samples``
    validation images (their first captions prompt the samples; fewer when the validation set is smaller), the
    real-vs-real floor compares as many training images with it. Logged: ``val/fd_data``, ``val/kid_data`` and their
    ``_floor`` (with ``inception_weights``: ``val/fid``, ``val/kid``, ``val/is``), and ``val/clip_score`` with
    ``clip_model``. The model must have ``generate(prompts, steps, guidance, sampler, seed)`` (``LatentDiffusion``)
    and the DataModule ``train_dataset``/``val_dataset`` of images with captions (``ImageCaptionDataModule``).

    Args:
        every_n_epochs: Evaluate after every this many epochs' validation (not during the sanity check).
        num_samples: Samples (and real reference images) per evaluation.
        steps: Sampler steps.
        guidance: Classifier-free guidance scale.
        sampler: Sampler name (``dpmpp_2m``, ``ddim``, ``euler_a``, ...).
        seed: Seed of the image choice and of the samples (the same at every evaluation, so figures compare).
        batch_size: Samples per ``generate`` call.
        inception_weights: FID Inception-v3 weights file; the figures are then FID, KID and IS. None: FD_data and
            KID_data on a network trained on the DataModule's images (``ldm.evaluation.data_features``).
        feature_cache: Folder caching that trained network (shared with ``ldm evaluate quality``); None: train it
            in memory at the first evaluation of each run.
        feature_steps: Training steps of that network; None: about 10 epochs of the data, 150 to 300 steps.
        clip_model: CLIPModel folder or hub name for ``val/clip_score``; None: no CLIP score.
    """

    def __init__(self, every_n_epochs: int = 1, num_samples: int = 64, steps: int = 20, guidance: float = 5.0,
                 sampler: str = "dpmpp_2m", seed: int = 0, batch_size: int = 32, inception_weights: str | None = None,
                 feature_cache: str | None = "data/cache/feature-nets", feature_steps: int | None = None,
                 clip_model: str | None = None):
        for name, value, low in (("every_n_epochs", every_n_epochs, 1), ("num_samples", num_samples, 2),
                                 ("steps", steps, 1), ("batch_size", batch_size, 1),
                                 ("feature_steps", 1 if feature_steps is None else feature_steps, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"QualityMetrics {name} must be an integer >= {low}, got {value!r}")
        if sampler not in SAMPLER_REGISTRY:
            raise ValueError(f"QualityMetrics sampler {sampler!r} is unknown; choose one of {sorted(SAMPLER_REGISTRY)}")
        if inception_weights is not None and not Path(inception_weights).expanduser().is_file():
            raise FileNotFoundError(f"QualityMetrics inception_weights {inception_weights!r}: no such file; give the FID "
                                    "Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth) or leave it out")
        self.every_n_epochs, self.num_samples, self.steps, self.guidance = every_n_epochs, num_samples, steps, guidance
        self.sampler, self.seed, self.batch_size = sampler, seed, batch_size
        self.inception_weights, self.feature_cache, self.clip_model = inception_weights, feature_cache, clip_model
        self.feature_steps = feature_steps
        self._network = None
        self._clip = None
        self._real: tuple[torch.Tensor, torch.Tensor | None, list[str]] | None = None
        self._last_epoch = -1
        self.last_metrics: dict[str, float] = {}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if trainer.sanity_checking or (epoch + 1) % self.every_n_epochs or epoch == self._last_epoch:
            return
        self._last_epoch = epoch
        values = self._evaluate(trainer, pl_module) if trainer.is_global_zero else None
        values = trainer.strategy.broadcast(values, src=0)
        for key, value in values.items():
            pl_module.log(f"val/{key}", float(value), sync_dist=False, batch_size=1)
        self.last_metrics = dict(values)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        from ldm.evaluation.quality import quality_metrics

        reference, floor, prompts = self._real_sets(trainer)
        network = self._feature_network(trainer, pl_module.device)
        clip = self._clip_scorer(pl_module.device)
        generated = torch.cat([
            pl_module.generate(prompts[i : i + self.batch_size], self.steps, self.guidance, self.sampler, self.seed + i).float()
            for i in range(0, len(prompts), self.batch_size)
        ])
        metrics = quality_metrics(network, generated, reference, floor, prompts, clip, self.seed)
        keys = [*network.keys.values(), f"{network.keys['fd']}_floor", f"{network.keys['kid']}_floor", "clip_score"]
        values = {k: float(metrics[k]) for k in keys if metrics.get(k) is not None}
        log.info("quality at epoch %d: %s", trainer.current_epoch, values)
        return values

    def _datasets(self, trainer: pl.Trainer):
        dm = trainer.datamodule
        train, val = getattr(dm, "train_dataset", None), getattr(dm, "val_dataset", None)
        if train is None or not hasattr(train, "records") or not hasattr(train, "image"):
            raise ValueError(f"QualityMetrics needs a DataModule of images with captions (ImageCaptionDataModule), got "
                             f"{type(dm).__name__}: remove the callback or change --data")
        return train, val

    def _real_sets(self, trainer: pl.Trainer) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        """Reference images (validation), floor images (training) and the reference's first captions; chosen once."""
        if self._real is None:
            from ldm.evaluation.eval_data import evaluation_view
            from ldm.evaluation.quality import first_captions, load_images

            train, val = self._datasets(trainer)
            train_view = evaluation_view(train)
            ref_view = evaluation_view(val) if val is not None and len(val) >= 2 else train_view
            n = min(self.num_samples, len(ref_view))
            if n < self.num_samples:
                log.warning("QualityMetrics: %d samples instead of num_samples=%d (the reference set has %d images)",
                            n, self.num_samples, len(ref_view))
            rng = np.random.default_rng(self.seed)
            reference_idx = rng.permutation(len(ref_view))[:n].tolist()
            taken = set(reference_idx) if ref_view is train_view else set()
            pool = [i for i in rng.permutation(len(train_view)).tolist() if i not in taken][:n]
            floor = load_images(train_view, pool) if len(pool) >= 2 else None
            self._real = (load_images(ref_view, reference_idx), floor, first_captions(ref_view, reference_idx))
        return self._real

    def _feature_network(self, trainer: pl.Trainer, device: torch.device):
        if self._network is None:
            from ldm.evaluation.data_features import DataFeatureSettings
            from ldm.evaluation.eval_data import evaluation_view
            from ldm.evaluation.feature_networks import build_feature_network

            dataset = None if self.inception_weights else evaluation_view(*self._datasets(trainer))
            settings = None if dataset is None else DataFeatureSettings.for_image_size(dataset.image_size, steps=self.feature_steps)
            self._network = build_feature_network(dataset, self.inception_weights, self.feature_cache, device, settings)
        return self._network

    def _clip_scorer(self, device: torch.device):
        if self._clip is None and self.clip_model is not None:
            from ldm.evaluation.clip_score import ClipScorer

            self._clip = ClipScorer(self.clip_model, device)
        return self._clip
