"""Write a loaded model (:class:`~ldm.formats.components.ModelComponents`) in any format we write: our folder
(``ldm``), a diffusers Stable Diffusion folder (``diffusers``) or an original SD single file (``sd``); SDXL models in
all three (the single file in Stability's SGM layout, :mod:`ldm.formats.sdxl_single_file`).

The pipeline's ``save_pretrained`` and ``LatentDiffusion.save_pretrained`` both come here, so every export
carries the same configs, schedule, prediction type, sample size and sampler settings.
"""

from __future__ import annotations

from pathlib import Path

from ldm.formats.components import ModelComponents
from ldm.formats.ldm_folder import write_pipeline_folder
from ldm.formats.weights import check_finite_weights

FORMATS = ("ldm", "diffusers", "sd")


def save_components(parts: ModelComponents, path: str | Path, format: str = "ldm") -> Path:
    """Write ``parts`` at ``path`` as ``format`` (one of :data:`FORMATS`); returns the folder or file written.

    Raises:
        ValueError: for an unknown format, an SD file not named ``.safetensors``, or weights holding NaN or infinity.
    """
    for name, module in (("UNet", parts.unet), ("VAE", parts.vae), ("text encoder", parts.text_encoder)):
        check_finite_weights(module.state_dict(), f"the model's {name} (not written to {path})")
    sample_size = int(64 * parts.vae.downsampling_factor if parts.sample_size is None else parts.sample_size)
    if format == "ldm":
        vae_config = {**parts.vae_config.to_dict(), "scaling_factor": float(parts.scaling_factor), "disc_weight": 0.0}
        return write_pipeline_folder(path, parts.unet_config.to_dict(), parts.unet.state_dict(), vae_config, parts.vae.state_dict(),
                                     parts.text_encoder, parts.schedule.to_config(), parts.prediction_type, sample_size,
                                     parts.sampler_config, parts.force_zeros_for_empty_prompt)
    if format == "diffusers":
        from ldm.formats.diffusers_folder import last_layer_text_encoder, write_diffusers_folder

        scheduler = {**parts.schedule.to_diffusers_scheduler_config(), **parts.sampler_config.to_dict()}
        if parts.is_sdxl:  # diffusers' SDXL pipeline reads both encoders' penultimate hidden states: written whole
            first, second = parts.text_encoder.encoders
            texts = dict(text_encoder=first.model, tokenizer=first.tokenizer, text_encoder_2=second.model,
                         tokenizer_2=second.tokenizer, force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt)
        else:
            texts = dict(text_encoder=last_layer_text_encoder(parts.text_encoder.model, parts.text_encoder.layer),
                         tokenizer=parts.text_encoder.tokenizer)
        return write_diffusers_folder(path, parts.unet.state_dict(), parts.unet_config.to_dict(), parts.vae.state_dict(),
                                      parts.vae_config.to_dict(), scheduler_config=scheduler,
                                      scheduler_class="DPMSolverMultistepScheduler", prediction_type=parts.prediction_type,
                                      vae_scaling_factor=float(parts.scaling_factor),
                                      sample_size=sample_size // parts.vae.downsampling_factor, **texts)
    if format == "sd":
        from ldm.formats.sd_single_file import write_sd_single_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"an SD single file is written as .safetensors; got {path.name}")
        if parts.is_sdxl:  # Stability's SGM layout (conditioner.embedders.*)
            from ldm.formats.sdxl_single_file import write_sdxl_single_file

            return write_sdxl_single_file(path, parts, sample_size)
        return write_sd_single_file(path, parts.unet, parts.unet_config.to_dict(), parts.vae, parts.vae_config.to_dict(),
                                    parts.text_encoder, parts.schedule.to_config(), parts.prediction_type,
                                    float(parts.scaling_factor), sample_size, parts.sampler_config)
    raise ValueError(f"format must be one of {', '.join(repr(f) for f in FORMATS)}, got {format!r}")
