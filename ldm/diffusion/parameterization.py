"""What the network predicts (epsilon or v) and conversions between predictions, x0 and noise.

All functions take ``alpha``/``sigma`` already broadcastable to the data (see
:meth:`ldm.diffusion.schedule.NoiseSchedule.alpha_sigma`) and assume ``alpha^2 + sigma^2 = 1``,
with ``x_t = alpha * x0 + sigma * eps`` and ``v = alpha * eps - sigma * x0`` (Salimans & Ho 2022).
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")
_ALIASES = {"epsilon": "epsilon", "eps": "epsilon", "v_prediction": "v_prediction", "v": "v_prediction"}


def normalize_prediction_type(name: str) -> str:
    """Map a prediction type or alias (``"eps"``, ``"v"``) to diffusers' name.

    Raises:
        ValueError: if ``name`` is not a known prediction type.
    """
    try:
        return _ALIASES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown prediction type {name!r}; choose one of {', '.join(PREDICTION_TYPES)} (aliases: eps, v)"
        ) from None


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Velocity ``v = alpha * eps - sigma * x0``."""
    return alpha * eps - sigma * x0


def training_target(
    prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """The regression target for a network of the given prediction type (noise for epsilon, v for v)."""
    if normalize_prediction_type(prediction_type) == "epsilon":
        return noise
    return v_from_x0_eps(x0, noise, alpha, sigma)


def x0_from_output(
    prediction_type: str, output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """The clean-data estimate implied by a model output at ``x_t``.

    For epsilon this divides by ``alpha`` and is undefined where ``alpha == 0`` (zero terminal SNR).
    """
    if normalize_prediction_type(prediction_type) == "epsilon":
        return (x_t - sigma * output) / alpha
    return alpha * x_t - sigma * output


def eps_from_output(
    prediction_type: str, output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """The noise estimate implied by a model output at ``x_t``."""
    if normalize_prediction_type(prediction_type) == "epsilon":
        return output
    return alpha * output + sigma * x_t
