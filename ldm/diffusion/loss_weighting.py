"""Per-sample loss weights over timesteps, and offset noise for training."""

from __future__ import annotations

import torch

from ldm.diffusion.parameterization import normalize_prediction_type

LOSS_WEIGHTINGS = ("uniform", "min_snr")


def loss_weights(weighting: str, snr: torch.Tensor, prediction_type: str, gamma: float = 5.0) -> torch.Tensor:
    """Weights (same shape as ``snr``) to multiply the per-sample MSE of the model output.

    ``"uniform"``: all ones. ``"min_snr"`` (Hang et al. 2023, Min-SNR-gamma), expressed for the loss on the
    network's own output: ``min(snr, gamma) / snr`` for epsilon, ``min(snr, gamma) / (snr + 1)`` for v.
    At ``snr == 0`` (zero terminal SNR) the epsilon weight takes its limit 1 and the v weight is 0; no NaN.

    Raises:
        ValueError: on an unknown weighting or prediction type, or ``gamma <= 0``.
    """
    prediction_type = normalize_prediction_type(prediction_type)
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting == "min_snr":
        if gamma <= 0:
            raise ValueError(f"min_snr gamma must be > 0, got {gamma}")
        if prediction_type == "epsilon":
            # min(snr, g) / snr == min(1, g / snr); written so snr == 0 gives 1 instead of 0/0.
            return (gamma / snr).clamp(max=1.0)
        return snr.clamp(max=gamma) / (snr + 1.0)
    raise ValueError(f"Unknown loss weighting {weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add per-sample, per-channel constant noise: ``noise + strength * N(0, 1)`` of shape (B, C, 1, ..., 1).

    The extra draw happens on the generator's device (``noise``'s device without one) and is moved to ``noise``.
    """
    if strength == 0:
        return noise
    shape = noise.shape[:2] + (1,) * (noise.ndim - 2)
    device = generator.device if generator is not None else noise.device
    extra = torch.randn(shape, generator=generator, device=device, dtype=noise.dtype).to(noise.device)
    return noise + strength * extra
