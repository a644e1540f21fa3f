"""The autoencoder's training objective: reconstruction + KL + optional LPIPS + PatchGAN hinge loss.

Reductions follow Stable Diffusion's first-stage loss: the reconstruction term is summed over pixels
and the KL over latent dimensions, both averaged over the batch, so ``kl_weight = 1e-6`` means what it
means there. The generator's adversarial term is scaled by the adaptive weight of Esser et al.
(ratio of the last decoder layer's gradient norms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.perceptual import build_lpips
from ldm.nn.discriminator import NLayerDiscriminator
from ldm.nn.distributions import DiagonalGaussianDistribution


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss for the discriminator: push real logits above 1 and fake logits below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """||d nll / d last|| / ||d g_loss / d last||: balances the GAN term against reconstruction."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class AutoencoderLoss(nn.Module):
    """Computes both halves of the autoencoder's GAN objective; owns the discriminator."""

    def __init__(
        self,
        reconstruction_loss: str = "l1",
        kl_weight: float = 1e-6,
        perceptual_weight: float = 0.0,
        lpips_net: str = "vgg",
        disc_weight: float = 0.5,
        disc_ndf: int = 64,
        disc_layers: int = 3,
        in_channels: int = 3,
    ):
        super().__init__()
        if reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"reconstruction_loss={reconstruction_loss!r}; use 'l1' or 'l2'")
        self.reconstruction_loss = reconstruction_loss
        self.kl_weight = kl_weight
        self.perceptual_weight = perceptual_weight
        self.disc_weight = disc_weight
        # Not a submodule: its frozen weights are not ours to save.
        self._lpips = [build_lpips(lpips_net)] if perceptual_weight > 0 else []
        self.discriminator = NLayerDiscriminator(in_channels, disc_ndf, disc_layers) if disc_weight > 0 else None

    def pixel_loss(self, x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        """Per-pixel reconstruction error (plus the LPIPS distance, broadcast, when enabled)."""
        err = (x - rec).abs() if self.reconstruction_loss == "l1" else (x - rec).pow(2)
        if self._lpips:
            lpips = self._lpips[0].to(x.device)
            err = err + self.perceptual_weight * lpips(x.contiguous(), rec.contiguous())
        return err

    def autoencoder_loss(
        self,
        x: torch.Tensor,
        rec: torch.Tensor,
        posterior: DiagonalGaussianDistribution,
        last_layer: torch.Tensor,
        use_discriminator: bool,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The encoder/decoder's loss and a dict of detached terms to log."""
        err = self.pixel_loss(x, rec)
        nll = err.sum() / x.shape[0]
        kl = posterior.kl().mean()
        loss = nll + self.kl_weight * kl
        logs = {"rec_loss": err.mean().detach(), "nll_loss": nll.detach(), "kl_loss": kl.detach()}
        if use_discriminator and self.discriminator is not None:
            g_loss = -self.discriminator(rec.contiguous()).mean()
            if torch.is_grad_enabled():
                d_weight = adaptive_weight(nll, g_loss, last_layer) * self.disc_weight
            else:
                d_weight = torch.tensor(self.disc_weight, device=x.device)
            loss = loss + d_weight * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight)
        logs["total_loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, rec: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss of the discriminator on real images and (detached) reconstructions."""
        if self.discriminator is None:
            raise RuntimeError("this loss has no discriminator (disc_weight is 0)")
        logits_real = self.discriminator(x.contiguous().detach())
        logits_fake = self.discriminator(rec.contiguous().detach())
        d_loss = hinge_discriminator_loss(logits_real, logits_fake)
        return d_loss, {"disc_loss": d_loss.detach(), "logits_real": logits_real.mean().detach(), "logits_fake": logits_fake.mean().detach()}
