"""Reconstruction quality of an autoencoder on a dataset: PSNR, SSIM, rFD (rFID with Inception weights) and a grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchvision.utils import make_grid, save_image

from ldm.evaluation.feature_networks import FeatureNetwork
from ldm.evaluation.statistics import frechet_distance
from ldm.nn.autoencoder import KLAutoencoder


@torch.no_grad()
def evaluate_reconstruction(
    vae: KLAutoencoder,
    dataloader: DataLoader,
    grid_path: str | Path | None = None,
    grid_images: int = 16,
    feature_network: FeatureNetwork | None = None,
) -> dict[str, float]:
    """Mean per-image PSNR (dB) and SSIM of ``vae``'s posterior-mode reconstructions over ``dataloader``.

    With ``grid_path``, also writes a PNG: originals in the top row, reconstructions below. With ``feature_network``,
    also the Frechet distance between the originals' and the reconstructions' features: ``rfd_data`` on the
    dataset's own network, ``rfid`` on FID's Inception (key and printed name in ``rfd_key``/``rfd_label``).
    """
    device = next(vae.parameters()).device
    psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3)).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device)
    was_training = vae.training
    vae.eval()
    shown: list[torch.Tensor] = []
    original_features, reconstruction_features = [], []
    count = 0
    for batch in dataloader:
        x = batch["image"].to(device)
        rec, _ = vae(x, sample_posterior=False)
        target, output = (x + 1) / 2, ((rec + 1) / 2).clamp(0, 1)
        psnr.update(output, target)
        ssim.update(output, target)
        if feature_network is not None:
            original_features.append(feature_network.features(x))
            reconstruction_features.append(feature_network.features(output * 2 - 1))
        count += x.shape[0]
        if grid_path is not None and sum(t.shape[0] for t in shown) < grid_images:
            shown.append(torch.stack([target, output], dim=1).cpu())
    vae.train(was_training)
    if count == 0:
        raise ValueError("evaluate_reconstruction got an empty dataloader")
    if grid_path is not None:
        pairs = torch.cat(shown)[:grid_images]  # (N, 2, C, H, W)
        n = pairs.shape[0]
        grid = make_grid(pairs.transpose(0, 1).reshape(2 * n, *pairs.shape[2:]), nrow=n, padding=1)
        Path(grid_path).parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, grid_path)
    metrics = {"psnr": float(psnr.compute()), "ssim": float(ssim.compute()), "images": count}
    if feature_network is not None and count >= 2:
        key, label = "r" + feature_network.keys["fd"], "r" + feature_network.labels["fd"]
        metrics.update({key: frechet_distance(np.concatenate(original_features), np.concatenate(reconstruction_features)),
                        "rfd_key": key, "rfd_label": label})
    return metrics
