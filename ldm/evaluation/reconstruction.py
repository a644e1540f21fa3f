"""Reconstruction quality of an autoencoder on a dataset: PSNR, SSIM and an image grid."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchvision.utils import make_grid, save_image

from ldm.nn.autoencoder import KLAutoencoder


@torch.no_grad()
def evaluate_reconstruction(
    vae: KLAutoencoder,
    dataloader: DataLoader,
    grid_path: str | Path | None = None,
    grid_images: int = 16,
) -> dict[str, float]:
    """Mean per-image PSNR (dB) and SSIM of ``vae``'s posterior-mode reconstructions over ``dataloader``.

    With ``grid_path``, also writes a PNG: originals in the top row, reconstructions below.
    """
    device = next(vae.parameters()).device
    psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3)).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device)
    was_training = vae.training
    vae.eval()
    shown: list[torch.Tensor] = []
    count = 0
    for batch in dataloader:
        x = batch["image"].to(device)
        rec, _ = vae(x, sample_posterior=False)
        target, output = (x + 1) / 2, ((rec + 1) / 2).clamp(0, 1)
        psnr.update(output, target)
        ssim.update(output, target)
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
    return {"psnr": float(psnr.compute()), "ssim": float(ssim.compute()), "images": count}
