"""The JSON that describes a model, read one way by every reader: parse errors and bad values name the file and key.

:func:`read_json_config` (a ``.json`` file) and :func:`parse_json_config` (JSON text kept elsewhere, such as a
safetensors header entry) give a dict or raise :class:`~ldm.nn.configs.ConfigError` naming the file (and the line
and column of a syntax error). The values then go through the typed configs (``UNetConfig.from_dict(values,
source=path, required=...)``, :class:`ScheduleConfig`, ...), which check types and ranges. The checks of values that
are no config field (sample size, scaling factor, prediction type) and the scheduler files live here too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.diffusion import NoiseSchedule, SamplerConfig, normalize_prediction_type
from ldm.diffusion.schedule import BETA_SCHEDULES
from ldm.nn.configs import Config, ConfigError, check_fields, check_value, positive

__all__ = ["MAX_SAMPLE_SIZE", "MAX_TIMESTEPS", "ScheduleConfig", "check_prediction_type", "check_sample_size",
           "check_scaling_factor", "parse_json_config", "read_diffusers_scheduler", "read_json_config",
           "read_ldm_scheduler", "sampler_config_from"]

# The largest default image side a model may record: the pipeline's default limit is 2048 * 2048 pixels per image
# (``LatentDiffusionPipeline.max_pixels``), checked before anything is allocated.
MAX_SAMPLE_SIZE = 2048
MIN_SCALING_FACTOR, MAX_SCALING_FACTOR = 1e-4, 1e4  # latent scaling factors in use are 0.1 to 2
MAX_TIMESTEPS = 1_000_000  # 8 MB of float64 betas; real schedules have 1000


def parse_json_config(text: str | bytes, source: str) -> dict[str, Any]:
    """The JSON object in ``text`` (which came from ``source``).

    Raises:
        ConfigError: for invalid JSON (with line and column) or JSON that is not an object, naming ``source``.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(None, f"is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})",
                          source) from None
    except (UnicodeDecodeError, RecursionError) as error:
        raise ConfigError(None, f"is not readable JSON text ({type(error).__name__}: {error})", source) from None
    if not isinstance(value, dict):
        raise ConfigError(None, f"holds a JSON {type(value).__name__}, not an object of settings", source)
    return value


def read_json_config(path: str | Path) -> dict[str, Any]:
    """The JSON object in the file ``path``: the one way every reader reads a config file.

    Raises:
        FileNotFoundError: if ``path`` is not a file.
        ConfigError: for invalid JSON (naming the file, line and column) or JSON that is not an object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return parse_json_config(path.read_bytes(), str(path))


def check_sample_size(value: Any, source: str, key: str = "sample_size", factor: int = 1) -> int | None:
    """A recorded default image size: None, or an integer > 0 whose image (``value * factor`` pixels a side: a
    latent size times the VAE's factor) is at most :data:`MAX_SAMPLE_SIZE`. A list of two equal sizes is one size.

    Raises:
        ConfigError: naming ``source`` and ``key``.
    """
    if value is None:
        return None
    if isinstance(value, list | tuple) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    try:
        size = check_value(key, value, int)
    except ConfigError as error:
        raise error.located(source) from None
    if size <= 0 or size * factor > MAX_SAMPLE_SIZE:
        unit = f" (x{factor} = {size * factor} pixels)" if factor != 1 else " pixels"
        raise ConfigError(key, f"got {size}{unit}; expected a size > 0 of at most {MAX_SAMPLE_SIZE} pixels a side",
                          source)
    return size


def check_scaling_factor(value: Any, source: str, key: str = "scaling_factor") -> float:
    """The latent scaling factor: a number in [:data:`MIN_SCALING_FACTOR`, :data:`MAX_SCALING_FACTOR`] (SD's 0.18215,
    SDXL's 0.13025; one far outside makes latents overflow to inf and the images black).

    Raises:
        ConfigError: naming ``source`` and ``key``.
    """
    try:
        scale = check_value(key, value, float)
    except ConfigError as error:
        raise error.located(source) from None
    if not MIN_SCALING_FACTOR <= scale <= MAX_SCALING_FACTOR:
        raise ConfigError(key, f"got {scale}; expected a number in [{MIN_SCALING_FACTOR:g}, {MAX_SCALING_FACTOR:g}] "
                          "(Stable Diffusion: 0.18215)", source)
    return scale


def check_prediction_type(value: Any, source: str, key: str = "prediction_type") -> str:
    """diffusers' name of a prediction type we follow (``epsilon``, ``v_prediction``; aliases ``eps``, ``v``).

    Raises:
        ConfigError: naming ``source`` and ``key``.
    """
    try:
        return normalize_prediction_type(value)
    except ValueError as error:
        raise ConfigError(key, str(error), source) from None


@dataclass(frozen=True)
class ScheduleConfig(Config):
    """A noise schedule as our files store it (:meth:`NoiseSchedule.to_config`).

    Args:
        kind: ``linear``, ``scaled_linear`` or ``cosine``.
        num_timesteps: Training timesteps (at most :data:`MAX_TIMESTEPS`).
        beta_start: First beta, in (0, 1).
        beta_end: Last beta, in (0, 1).
        zero_terminal_snr: Rescale to zero SNR at the last timestep.
    """

    kind: str = "scaled_linear"
    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False

    _RULES = {"num_timesteps": positive}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in BETA_SCHEDULES:
            raise ConfigError("kind", f"got {self.kind!r}; expected one of {', '.join(BETA_SCHEDULES)}")
        if self.num_timesteps > MAX_TIMESTEPS:
            raise ConfigError("num_timesteps", f"got {self.num_timesteps}; expected at most {MAX_TIMESTEPS}")
        for name in ("beta_start", "beta_end"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(name, f"got {getattr(self, name)}; expected a number in (0, 1)")

    def build(self) -> NoiseSchedule:
        return NoiseSchedule(self.kind, self.num_timesteps, self.beta_start, self.beta_end, self.zero_terminal_snr)


def sampler_config_from(values: Mapping[str, Any], source: str, num_timesteps: int | None = None,
                        **defaults: Any) -> SamplerConfig:
    """The sampler settings in ``values`` (a scheduler config; other keys are ignored), type-checked; missing ones
    from ``defaults``, else :class:`SamplerConfig`'s. ``num_timesteps``: the schedule's, which ``steps_offset``
    must stay below.

    Raises:
        ConfigError: naming ``source`` and the key.
    """
    checked = check_fields(SamplerConfig, values, source)
    try:
        config = SamplerConfig(**{**defaults, **checked})
    except ValueError as error:  # a known type, an unknown choice: SamplerConfig says which
        raise ConfigError(None, str(error), source) from None
    if num_timesteps is not None and config.steps_offset >= num_timesteps:
        raise ConfigError("steps_offset", f"got {config.steps_offset}; expected less than the {num_timesteps} "
                          "training timesteps (Stable Diffusion: 1)", source)
    return config


# The keys our scheduler_config.json has always held (NoiseSchedule.to_config and the prediction type).
LDM_SCHEDULER_REQUIRED = ("kind", "num_timesteps", "beta_start", "beta_end", "prediction_type")


def read_ldm_scheduler(values: Mapping[str, Any], source: str) -> tuple[NoiseSchedule, str, SamplerConfig]:
    """Schedule, prediction type and sampler settings of our ``scheduler_config.json`` (or the same keys elsewhere).

    Raises:
        ConfigError: for a missing key, a bad value or an unknown choice, naming ``source`` and the key.
    """
    schedule = ScheduleConfig.from_dict(values, source, required=LDM_SCHEDULER_REQUIRED)
    prediction = check_prediction_type(values["prediction_type"], source)
    built = schedule.build()
    return built, prediction, sampler_config_from(values, source, built.num_timesteps)


# diffusers' scheduler keys -> ours, and diffusers' beta_schedule names -> our kinds.
_DIFFUSERS_SCHEDULE_KEYS = {"num_train_timesteps": "num_timesteps", "beta_start": "beta_start", "beta_end": "beta_end",
                            "rescale_betas_zero_snr": "zero_terminal_snr", "beta_schedule": "kind"}
_DIFFUSERS_KINDS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


def read_diffusers_scheduler(values: Mapping[str, Any], source: str) -> tuple[NoiseSchedule, str, SamplerConfig]:
    """Schedule, prediction type and sampler settings of a diffusers ``scheduler_config.json``, with diffusers'
    defaults for what it leaves out (``DDIMScheduler``'s: linear betas 0.0001 to 0.02 over 1000 steps, epsilon).

    Raises:
        ConfigError: for a bad value, ``trained_betas`` or a ``beta_schedule`` we do not implement, naming ``source``
            and diffusers' key.
    """
    if values.get("trained_betas") is not None:
        raise ConfigError("trained_betas", "explicit betas are not supported by NoiseSchedule", source)
    name = values.get("beta_schedule", "linear")
    if not isinstance(name, str) or name not in _DIFFUSERS_KINDS:
        raise ConfigError("beta_schedule", f"got {name!r}; supported: {', '.join(_DIFFUSERS_KINDS)}", source)
    ours = {mine: values[theirs] for theirs, mine in _DIFFUSERS_SCHEDULE_KEYS.items() if theirs in values}
    ours["kind"] = _DIFFUSERS_KINDS[name]
    defaults = {"num_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "zero_terminal_snr": False}
    try:
        schedule = ScheduleConfig(**{**defaults, **ours})
    except ConfigError as error:
        raise error.located(source, rename={v: k for k, v in _DIFFUSERS_SCHEDULE_KEYS.items()}) from None
    prediction = check_prediction_type(values.get("prediction_type", "epsilon"), source)
    # diffusers' defaults for what the file leaves out: DDIMScheduler's and DPMSolverMultistepScheduler's.
    built = schedule.build()
    return built, prediction, sampler_config_from(values, source, built.num_timesteps, set_alpha_to_one=True)
