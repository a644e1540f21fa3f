"""``LatentDiffusion``'s grouped settings: the training objective, the optimiser and validation sampling.

Frozen dataclasses on :class:`ldm.nn.configs.Config`, so ``ldm fit --help`` lists every field with its doc
(``--model.objective.loss_weighting``, ``--model.optimizer.learning_rate``, ``--model.validation.prompts``, ...)
and a checkpoint stores each group as a plain dict (``to_dict``), read back by ``from_dict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ldm.diffusion import SAMPLER_REGISTRY
from ldm.nn.configs import Config

__all__ = ["DEFAULT_VAL_PROMPTS", "ObjectiveConfig", "OptimizerConfig", "ValidationConfig"]

DEFAULT_VAL_PROMPTS = tuple(f"a handwritten digit {d}" for d in range(10))


@dataclass(frozen=True)
class ObjectiveConfig(Config):
    """Noise schedule and training objective.

    Args:
        schedule: Noise schedule kind: ``linear``, ``scaled_linear`` (SD) or ``cosine``; ``None``: that of
            ``init_from`` (all its schedule settings), else ``scaled_linear``.
        num_timesteps: Training timesteps.
        beta_start: First beta of the linear/scaled_linear schedule.
        beta_end: Last beta of the linear/scaled_linear schedule.
        zero_terminal_snr: Rescale the schedule to zero SNR at the last timestep (pair with v_prediction).
        loss_weighting: ``uniform`` or ``min_snr``.
        snr_gamma: Gamma of min-SNR weighting.
        noise_offset: Offset-noise strength (0 disables).
        cond_dropout: Probability of replacing a caption with the empty prompt (enables CFG).
    """

    schedule: str | None = None
    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False
    loss_weighting: str = "uniform"
    snr_gamma: float = 5.0
    noise_offset: float = 0.0
    cond_dropout: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_weighting not in ("uniform", "min_snr"):
            raise ValueError(f"objective.loss_weighting={self.loss_weighting!r}; use 'uniform' or 'min_snr'")
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"objective.cond_dropout={self.cond_dropout} must be in [0, 1]")


LR_DECAYS = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class OptimizerConfig(Config):
    """AdamW, its learning-rate warm-up, and what a NaN/inf loss does.

    Args:
        learning_rate: AdamW peak learning rate.
        text_encoder_learning_rate: Peak learning rate of the text encoder's trained weights (its LoRA adapters, or
            all of it when trained), as kohya's ``--text_encoder_lr``; ``None``: ``learning_rate``. Same warm-up,
            decay and ``scale_lr`` as the rest.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        warmup_steps: Linear learning-rate warm-up steps.
        lr_decay: After warm-up: ``constant``, or ``cosine`` / ``linear`` decay to ``final_lr_ratio`` x the peak at
            the run's last step (the Trainer's ``max_steps``, else ``max_epochs`` x batches per epoch).
        final_lr_ratio: Learning rate at the last step of a ``cosine``/``linear`` decay, as a share of the peak.
        scale_lr: Multiply ``learning_rate`` by global batch size / ``base_batch_size``.
        base_batch_size: Reference batch size for ``scale_lr``.
        max_consecutive_nonfinite: A step whose loss is NaN/inf (on any rank) is skipped, without a weight update,
            and counted (``train/nonfinite_steps``); this many in a row stop training with an error naming the step
            and the likely causes. 0: never stop.
    """

    learning_rate: float = 1e-4
    text_encoder_learning_rate: float | None = None
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_decay: str = "constant"
    final_lr_ratio: float = 0.0
    scale_lr: bool = False
    base_batch_size: int = 256
    max_consecutive_nonfinite: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"optimizer.lr_decay={self.lr_decay!r}; use one of {', '.join(LR_DECAYS)}")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ValueError(f"optimizer.final_lr_ratio={self.final_lr_ratio} must be in [0, 1]")
        for name in ("learning_rate", "text_encoder_learning_rate"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"optimizer.{name}={value} must be a finite number >= 0")
        if self.max_consecutive_nonfinite < 0:
            raise ValueError(f"optimizer.max_consecutive_nonfinite={self.max_consecutive_nonfinite} must be >= 0 "
                             "(0: never stop on NaN/inf losses)")


@dataclass(frozen=True)
class ValidationConfig(Config):
    """The image grid sampled at each validation.

    Args:
        prompts: Prompts sampled at each validation (image grid in the logs); empty: no samples.
        steps: Sampler steps for validation samples.
        guidance: Guidance scale for validation samples.
        sampler: Sampler for validation samples, a name in ``ldm.diffusion.SAMPLER_REGISTRY`` (``dpmpp_2m``,
            ``ddim``, ``euler``, ...).
        images_per_prompt: Samples per validation prompt (at the DataModule's square ``image_size``; with
            aspect-ratio buckets, a second grid ``samples_buckets`` shows the first prompt once per training bucket).
    """

    prompts: tuple[str, ...] = DEFAULT_VAL_PROMPTS
    steps: int = 20
    guidance: float = 5.0
    sampler: str = "dpmpp_2m"
    images_per_prompt: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampler not in SAMPLER_REGISTRY:
            raise ValueError(f"validation.sampler={self.sampler!r}; choose one of {', '.join(SAMPLER_REGISTRY)}")
