"""``LatentDiffusionPipeline``: text-to-image, img2img and inpainting from an exported model or a checkpoint.

    pipe = LatentDiffusionPipeline.from_pretrained("checkpoints/demo")
    out = pipe("a handwritten digit 7", num_inference_steps=25, guidance_scale=5, seed=0)
    out.images[0].save("seven.png")
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ldm.diffusion import SAMPLER_REGISTRY, NoiseSchedule, SamplerConfig, noise_to_step, sample
from ldm.pipeline.image_io import OUTPUT_TYPES, image_to_tensor, mask_to_latent, mask_to_tensor, tensor_to_output
from ldm.formats.components import ModelComponents
from ldm.formats.load import load_components
from ldm.formats.save import save_components
from ldm.diffusion.guided import guided_denoiser
from ldm.nn.attention import CrossAttention
from ldm.nn.autoencoder import KLAutoencoder
from ldm.nn.dual_text_encoder import DualTextEncoder
from ldm.nn.text_encoder import TextEncoder
from ldm.nn.speedups import CudaGraphSteps, compile_in_place, to_channels_last, uses_cuda_graphs
from ldm.nn.unet import UNetModel
from ldm.pipeline.checks import (DEFAULT_MAX_BATCH_PIXELS, DEFAULT_MAX_PIXELS, check_batch, check_finite, check_finite_output,
                                 check_size)
from ldm.pipeline.memory import tiled_decode
from ldm.nn.sdxl_conditioning import sdxl_conditioning

@dataclass
class PipelineOutput:
    """Generated images (PIL list, numpy array or tensor, per ``output_type``) and the seed of each."""

    images: Any
    seeds: list[int | None]


class LatentDiffusionPipeline:
    """UNet + KL autoencoder + CLIP text encoder (SDXL: two) + noise schedule, with the diffusers-style call signature."""

    def __init__(self, unet: UNetModel, vae: KLAutoencoder, text_encoder: TextEncoder | DualTextEncoder, schedule: NoiseSchedule,
                 prediction_type: str, scaling_factor: float, sample_size: int | None = None,
                 sampler_config: SamplerConfig = SamplerConfig(), force_zeros_for_empty_prompt: bool = False):
        self.unet, self.vae, self.text_encoder = unet.eval(), vae.eval(), text_encoder.eval()
        if (unet.adm_in_channels is not None) != isinstance(text_encoder, DualTextEncoder):
            raise ValueError("an SDXL UNet (with adm_in_channels) needs SDXL's two text encoders (DualTextEncoder), and "
                             "two text encoders need such a UNet")
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.schedule, self.prediction_type, self.scaling_factor = schedule, prediction_type, float(scaling_factor)
        check_finite("scaling_factor", float(scaling_factor))
        if float(scaling_factor) <= 0:
            raise ValueError(f"the VAE's scaling_factor must be positive, got {scaling_factor}: the model's config is broken")
        self.sample_size = 64 * vae.downsampling_factor if sample_size is None else sample_size
        check_size(self.sample_size, self.sample_size, vae.downsampling_factor, DEFAULT_MAX_PIXELS, "the model's sample_size")
        self.max_pixels = DEFAULT_MAX_PIXELS  # per image; checked before anything is allocated
        self.max_batch_pixels = DEFAULT_MAX_BATCH_PIXELS  # all images of one call together
        self.vae_slicing = False
        self.vae_tile_size: int | None = None
        # The model's timestep layout and final-step settings (SD: steps_offset 1, DDIM ends at alphas_cumprod[0]).
        self.sampler_config = sampler_config
        self.compile_mode: str | None = None  # set by compile()

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        use_ema: bool = True, prediction_type: str | None = None, tokenizer: str | Path | None = None,
                        num_heads: int | None = None, num_head_channels: int | None = None,
                        vae_dtype: torch.dtype | None = None) -> "LatentDiffusionPipeline":
        """Load a model in any layout ldm reads, detected from ``path``: our exported folder, a diffusers Stable
        Diffusion (or SDXL) folder, a Lightning ``.ckpt`` of ``LatentDiffusion`` or an original SD single file
        (``.safetensors``/``.ckpt``, v1/v2/inpainting/XL).

        Args:
            path: The model.
            device: Where to put it.
            dtype: UNet and text-encoder dtype (the VAE stays fp32).
            use_ema: EMA weights of a Lightning checkpoint or SD file, when present.
            prediction_type: ``epsilon`` or ``v_prediction``, overriding the stored one (an SD 2.x 768-v single
                file needs ``v_prediction``, or its YAML beside it; then the default size is 768).
            tokenizer: Tokenizer folder (or hub id) for an SD single file, which holds none (SDXL: a folder with
                ``tokenizer/`` and ``tokenizer_2/``).
            num_heads: UNet attention heads of an SD single file whose heads differ from SD's (shapes cannot
                tell; else from its YAML beside it, or SD's: v1 8 heads, v2 64-channel heads).
            num_head_channels: Channels per UNet attention head of such a file, instead of ``num_heads``.
            vae_dtype: The VAE's dtype (default fp32; see :meth:`to`).
        """
        parts = load_components(path, use_ema=use_ema, prediction_type=prediction_type, tokenizer=tokenizer,
                                num_heads=num_heads, num_head_channels=num_head_channels)
        return cls.from_components(parts).to(device, dtype, vae_dtype)

    @classmethod
    def from_components(cls, parts: ModelComponents) -> "LatentDiffusionPipeline":
        """A pipeline over already-loaded :class:`~ldm.formats.components.ModelComponents`."""
        return cls(parts.unet, parts.vae, parts.text_encoder, parts.schedule, parts.prediction_type, parts.scaling_factor,
                   parts.sample_size, parts.sampler_config, parts.force_zeros_for_empty_prompt)

    def save_pretrained(self, path: str | Path, format: str = "ldm") -> Path:
        """Write the model as ``ldm`` (our folder), ``diffusers`` (a folder diffusers' StableDiffusionPipeline
        loads) or ``sd`` (an original single-file ``.safetensors`` checkpoint). Loaded LoRA adapters must be
        merged first (:meth:`merge_lora`); the adapter file itself is what :func:`ldm.formats.lora_files.save_lora` writes."""
        from ldm.nn.lora import lora_layers

        if lora_layers(self.unet) or lora_layers(self.text_encoder):
            raise ValueError("this pipeline has LoRA adapters loaded: call merge_lora() to save the merged model")
        return save_components(self.components(), path, format)

    def components(self) -> ModelComponents:
        """The pipeline's model as :class:`~ldm.formats.components.ModelComponents` (the same modules, not copies)."""
        return ModelComponents(self.unet, self.vae, self.text_encoder, self.schedule, self.prediction_type, self.scaling_factor,
                               self.sample_size, self.sampler_config,
                               force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)

    unet_config = property(lambda self: self.unet.config, doc="The UNet's shape (a UNetConfig).")
    vae_config = property(lambda self: self.vae.config, doc="The autoencoder's shape (an AutoencoderConfig).")

    # ------------------------------------------------------------------ LoRA
    def load_lora(self, path: str | Path, scale: float = 1.0) -> "LatentDiffusionPipeline":
        """Load a LoRA adapter file (diffusers' or kohya's layout, SD 1.x/2.x or SDXL) onto the UNet and the text
        encoder(s) it has adapters for; see :func:`ldm.formats.lora_files.load_lora`."""
        from ldm.formats.lora_files import load_lora

        load_lora(self, path, scale=scale)
        return self

    def set_lora_scale(self, scale: float) -> None:
        """Change the strength of loaded adapters (0 = the base model)."""
        from ldm.nn.lora import set_lora_scale

        for module in (self.unet, self.text_encoder):
            set_lora_scale(module, scale)

    def merge_lora(self) -> None:
        """Fold loaded adapters into the base weights (faster inference; no more scale changes)."""
        from ldm.nn.lora import lora_layers, merge_lora

        for module in (self.unet, self.text_encoder):
            if lora_layers(module):
                merge_lora(module)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
           vae_dtype: torch.dtype | None = None) -> "LatentDiffusionPipeline":
        """Move to ``device``; ``dtype`` applies to the UNet and text encoder. The VAE stays fp32 for a clean decode
        unless ``vae_dtype`` says otherwise (fp16 halves its memory; SDXL's original VAE overflows in fp16, and a
        decode that gives NaN or infinity is then redone in fp32, with a warning)."""
        for module in (self.unet, self.text_encoder):
            module.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=vae_dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # ------------------------------------------------------------------ speed
    def compile(self, mode: str = "default", backend: str = "inductor", fullgraph: bool = False,
                dynamic: bool | None = None) -> "LatentDiffusionPipeline":
        """``torch.compile`` the UNet forward that the samplers call, in place (``nn.Module.compile``: saving and
        LoRA loading are unchanged); the next generation compiles, and a new image size or batch recompiles.

        Args:
            mode: ``default``, ``reduce-overhead`` (also captures CUDA graphs of the UNet call: least launch overhead
                per sampler step on a GPU), ``max-autotune`` or ``max-autotune-no-cudagraphs``.
            backend: ``inductor``; ``eager``/``aot_eager`` only trace (tests, debugging).
            fullgraph: Fail on a graph break (the UNet compiles to one graph).
            dynamic: ``torch.compile``'s ``dynamic`` (None: sizes become dynamic once a second one is seen).

        On a GPU this is faster (published for SD 1.5 at 512 px on an A100: 31 -> 47 it/s with channels_last); on a
        CPU the first call takes minutes to compile and the sampler runs about as fast as without.
        """
        compile_in_place(self.unet, mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
        self.compile_mode = mode
        return self

    def to_channels_last(self) -> "LatentDiffusionPipeline":
        """Store the UNet's convolution weights in channels_last (NHWC) layout, which tensor-core GPUs run faster in
        half precision; the same outputs within float round-off, and saving writes the usual layout."""
        to_channels_last(self.unet)
        return self

    # ------------------------------------------------------------------ memory
    def enable_attention_slicing(self, chunk_size: int | None = 1024) -> None:
        """Compute attention over at most ``chunk_size`` query positions at a time (None turns it off)."""
        for module in self.unet.modules():
            if isinstance(module, CrossAttention):
                module.query_chunk_size = chunk_size

    def enable_vae_slicing(self, enabled: bool = True) -> None:
        """Decode a batch one image at a time."""
        self.vae_slicing = enabled

    def enable_vae_tiling(self, tile_size: int | None = 32) -> None:
        """Decode large latents in overlapping ``tile_size`` latent tiles, blended (None turns it off)."""
        self.vae_tile_size = tile_size

    # ------------------------------------------------------------------ generation
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, num_inference_steps: int = 25,
                 guidance_scale: float = 5.0, sampler: str = "dpmpp_2m", height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, seed: int | list[int] | None = None, generator: torch.Generator | None = None,
                 eta: float = 0.0, guidance_rescale: float = 0.0, output_type: str = "pil", progress: bool = True,
                 callback: Callable[[int, int, torch.Tensor], None] | None = None, karras_sigmas: bool = False,
                 timestep_spacing: str | None = None, prompt_2: str | list[str] | None = None,
                 negative_prompt_2: str | list[str] | None = None, original_size: tuple[int, int] | None = None,
                 crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
                 negative_original_size: tuple[int, int] | None = None,
                 negative_crops_coords_top_left: tuple[int, int] | None = None,
                 negative_target_size: tuple[int, int] | None = None) -> PipelineOutput:
        """Text to image; returns images and seeds.

        ``seed``: an int (image i gets seed + i) or one per image. ``generator``: instead of a seed, draw the
        whole batch's noise from it, as diffusers does (the reported seeds are then ``None``).
        ``timestep_spacing``: ``leading``, ``trailing`` or ``linspace``; ``None`` uses the model's scheduler's.

        SDXL models only: ``prompt_2``/``negative_prompt_2`` go to the second text encoder (default: the first's);
        ``original_size``, ``crops_coords_top_left`` and ``target_size`` (height, width; default the output size and
        no crop) are the micro-conditioning, and the ``negative_*`` ones that of the unconditional branch (default:
        the same). Without a negative prompt the unconditional branch gets zero embeddings when the model says so
        (``force_zeros_for_empty_prompt``, SDXL base)."""
        args = {k: v for k, v in locals().items() if k != "self"}
        args["height"], args["width"] = self._check_size(height, width)
        return self._run(**args)

    def img2img(self, prompt: str | list[str], image, strength: float = 0.8, **kwargs) -> PipelineOutput:
        """Noise the encoded ``image`` to the step that ``strength`` selects (1 = pure noise) and denoise from there."""
        check_finite("strength", strength, 0.0, 1.0)
        if strength == 0.0:
            raise ValueError("strength must be in (0, 1], got 0.0")
        init = image_to_tensor(image, "image")
        h, w = self._check_size(init.shape[-2], init.shape[-1])
        return self._run(prompt=prompt, height=h, width=w, init_image=init, strength=strength, **kwargs)

    def inpaint(self, prompt: str | list[str], image, mask, strength: float = 1.0, paste_unmasked: bool = True, **kwargs) -> PipelineOutput:
        """Repaint where ``mask`` is white (1) and keep the rest: the known latents are re-imposed at every step.
        With ``paste_unmasked`` the original pixels are pasted back outside the mask after decoding."""
        check_finite("strength", strength, 0.0, 1.0)
        if strength == 0.0:
            raise ValueError("strength must be in (0, 1], got 0.0")
        init, m = image_to_tensor(image, "image"), mask_to_tensor(mask)
        if m.shape[-2:] != init.shape[-2:]:
            raise ValueError(f"mask is {m.shape[-1]}x{m.shape[-2]} but image is {init.shape[-1]}x{init.shape[-2]}; they must match")
        h, w = self._check_size(init.shape[-2], init.shape[-1])
        return self._run(prompt=prompt, height=h, width=w, init_image=init, strength=strength, mask=m,
                         paste_unmasked=paste_unmasked, **kwargs)

    def _check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        h = self.sample_size if height is None else height
        w = self.sample_size if width is None else width
        # The VAE downsamples by its factor, then the UNet by its own: sizes are multiples of their product.
        check_size(h, w, self.vae.downsampling_factor * self.unet.downsampling_factor, self.max_pixels)
        return int(h), int(w)

    @torch.no_grad()
    def _run(self, prompt, negative_prompt=None, num_inference_steps=25, guidance_scale=5.0, sampler="dpmpp_2m", height=None,
             width=None, num_images_per_prompt=1, seed=None, generator=None, eta=0.0, guidance_rescale=0.0, output_type="pil",
             progress=True, callback=None, karras_sigmas=False, timestep_spacing=None, init_image=None, strength=1.0,
             mask=None, paste_unmasked=True, prompt_2=None, negative_prompt_2=None, original_size=None,
             crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
             negative_crops_coords_top_left=None, negative_target_size=None) -> PipelineOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is empty: give a string (\"\" for unconditional) or a non-empty list")
        steps_limit = len(self.schedule.alphas_cumprod)
        if (isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral)
                or not 1 <= num_inference_steps <= steps_limit):
            raise ValueError(f"num_inference_steps must be an integer in [1, {steps_limit}] (the model's training "
                             f"timesteps), got {num_inference_steps!r}")
        if sampler not in SAMPLER_REGISTRY:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLER_REGISTRY)}")
        if output_type not in (*OUTPUT_TYPES, "latent"):
            raise ValueError(f"output_type must be one of {(*OUTPUT_TYPES, 'latent')}, got {output_type!r}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, numbers.Integral) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        check_finite("guidance_scale", guidance_scale)
        check_finite("guidance_rescale", guidance_rescale, 0.0, 1.0)
        check_finite("eta", eta, 0.0, 1.0)
        for name, tensor in (("init image", init_image), ("mask", mask)):
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"the {name} holds NaN or infinite values")
        check_batch(len(prompts) * num_images_per_prompt, height, width, self.max_batch_pixels)
        negatives = _expand_negative(negative_prompt, len(prompts))
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        seeds = _seeds_for(seed, len(prompts), generator)
        config = self.sampler_config if timestep_spacing is None else replace(self.sampler_config, timestep_spacing=timestep_spacing)

        f = self.vae.downsampling_factor
        shape = (self.vae.latent_channels, height // f, width // f)
        sdxl = dict(prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, original_size=original_size,
                    crops_coords_top_left=crops_coords_top_left, target_size=target_size,
                    negative_original_size=negative_original_size,
                    negative_crops_coords_top_left=negative_crops_coords_top_left, negative_target_size=negative_target_size)
        if isinstance(self.text_encoder, DualTextEncoder):
            context, uncond, y, uncond_y = sdxl_conditioning(
                self.text_encoder, self.unet.config.addition_time_embed_dim, self.force_zeros_for_empty_prompt, prompts,
                negatives, negative_prompt is None, num_images_per_prompt, height, width, **sdxl)
            context, uncond, y, uncond_y = (t.to(self.dtype) for t in (context, uncond, y, uncond_y))
        else:
            given = [k for k, v in sdxl.items() if v is not None and k != "crops_coords_top_left"]
            if given or tuple(crops_coords_top_left) != (0, 0):
                raise ValueError(f"{', '.join(given) or 'crops_coords_top_left'} applies to SDXL models only (two text "
                                 "encoders, micro-conditioning); this model has one text encoder")
            context = self.text_encoder.encode(prompts).to(self.dtype)
            uncond = self.text_encoder.encode(negatives).to(self.dtype)
            y = uncond_y = None
        known = None
        if init_image is not None:
            init = init_image.to(self.device).expand(len(prompts), -1, -1, -1)
            known = self._encode(init)
        latent_mask = mask_to_latent(mask.to(self.device), shape[1:]) if mask is not None else None
        extra = self._inpainting_channels(init_image, mask, len(prompts), height, width) if self.is_inpainting_model else None
        start_step = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)

        # Deterministic samplers run the batch at once; those that draw noise at every step image by image, so that
        # each image depends only on its own seed.
        stochastic = SAMPLER_REGISTRY[sampler].draws_noise(eta)
        groups = [[i] for i in range(len(prompts))] if stochastic else [list(range(len(prompts)))]
        bar = tqdm(total=len(groups) * (num_inference_steps - start_step), disable=not progress, desc="sampling")
        latents = []
        for group in groups:
            if generator is not None:
                noise = torch.randn((len(group), *shape), generator=generator)
                gen = generator
            else:  # image i's noise comes from its own seed alone
                gens = [torch.Generator().manual_seed(seeds[i]) for i in group]
                noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
                # Stochastic samplers (one image per group) continue that image's stream; on another device,
                # a generator there with a derived seed.
                gen = gens[0] if self.device.type == "cpu" else torch.Generator(self.device).manual_seed(seeds[group[0]] + 1)
            noise = noise.to(self.device, torch.float32)
            sub_known = known[group] if known is not None else None
            denoiser = self._denoiser(context[group], uncond[group], guidance_scale, guidance_rescale, sub_known, latent_mask, noise,
                                      extra[group] if extra is not None else None,
                                      None if y is None else y[group], None if uncond_y is None else uncond_y[group])

            def step_callback(i, t, x, _cb=callback):
                bar.update(1)
                if _cb is not None:
                    _cb(i, t, x)

            if start_step >= num_inference_steps:  # strength so small that no step is left
                z = sub_known
            else:
                x = noise if sub_known is None else noise_to_step(sampler, sub_known, noise, self.schedule, num_inference_steps,
                                                                  start_step, config, karras_sigmas)
                z = sample(sampler, denoiser, x, self.schedule, num_inference_steps, prediction_type=self.prediction_type,
                           config=config, karras=karras_sigmas, eta=eta, generator=gen, callback=step_callback,
                           start_step=start_step)
            if latent_mask is not None:
                z = latent_mask * z + (1 - latent_mask) * sub_known
            latents.append(z)
        bar.close()
        check_finite_output(torch.cat(latents), "sampled latents")
        if output_type == "latent":
            return PipelineOutput(torch.cat(latents).cpu(), seeds)
        images = self._decode(torch.cat(latents).float())
        check_finite_output(images, "decoded images")
        if mask is not None and paste_unmasked:
            m = mask.to(images.device)
            images = m * images + (1 - m) * init_image.to(images.device).clamp(-1, 1)
        return PipelineOutput(tensor_to_output(images, output_type), seeds)

    @property
    def is_inpainting_model(self) -> bool:
        """An SD inpainting UNet: its input is the latents, the mask and the masked image's latents (4 + 1 + 4)."""
        return self.unet.in_channels == 2 * self.vae.latent_channels + 1

    def _inpainting_channels(self, init_image, mask, n: int, height: int, width: int) -> torch.Tensor:
        """The extra input of an inpainting UNet: mask (1 = repaint) and the latents of the image with the
        masked part blanked, as SD's inpainting models were trained. Without a mask everything is repainted."""
        f = self.vae.downsampling_factor
        if mask is None:
            pixel_mask = torch.ones(1, 1, height, width, device=self.device)
            image = torch.zeros(1, 3, height, width, device=self.device)
        else:
            pixel_mask = (mask.to(self.device) > 0.5).float()
            image = init_image.to(self.device) * (1 - pixel_mask)
        masked_latents = self._encode(image)
        latent_mask = torch.nn.functional.interpolate(pixel_mask, size=(height // f, width // f))
        return torch.cat([latent_mask, masked_latents], dim=1).expand(n, -1, -1, -1).to(self.dtype)

    def _denoiser(self, context, uncond, scale, rescale, known, latent_mask, noise, extra=None, y=None, uncond_y=None):
        unet = self.unet if extra is None else _WithExtraChannels(self.unet, extra)
        if uses_cuda_graphs(self.compile_mode):
            unet = CudaGraphSteps(unet)
        guided = guided_denoiser(unet, context, uncond, scale, rescale, y=y, uncond_y=uncond_y)
        if latent_mask is None or extra is not None:  # an inpainting UNet sees the known region itself
            return guided

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # Re-impose the known region, noised to this step, before every model call. Samplers in sigma
            # space hand the denoiser the VP-scaled x_t, so the same blend applies to every sampler.
            alpha, sigma = self.schedule.alpha_sigma(t, x.ndim, x.dtype, x.device, fractional=True)
            return guided(latent_mask * x + (1 - latent_mask) * (alpha * known + sigma * noise), t)

        return denoise

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled fp32 latents (the posterior's mode) of images in [-1, 1], whatever dtype the VAE is stored in."""
        weights = self.vae.post_quant_conv.weight
        return self.vae.encode(images.to(weights.device, weights.dtype)).mode().float() * self.scaling_factor

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        parts = latents.split(1) if self.vae_slicing else [latents]
        tile, scale = self.vae_tile_size, self.scaling_factor
        decode = (lambda p: tiled_decode(self.vae, p, tile, scaling_factor=scale)) if tile else (lambda p: self.vae.decode_scaled(p, scale))
        images = torch.cat([decode(p) for p in parts])
        if self.vae.post_quant_conv.weight.dtype != torch.float32 and not bool(torch.isfinite(images).all()):
            warnings.warn(f"the VAE decode in {self.vae.post_quant_conv.weight.dtype} gave NaN or infinite values (SDXL's "
                          "original VAE overflows in fp16); the VAE is now fp32 and the decode was redone. Use an fp16-fixed "
                          "VAE or keep vae_dtype fp32 (ldm generate --vae-dtype fp32).", stacklevel=3)
            self.vae.float()
            images = torch.cat([decode(p) for p in parts])
        return images.float().clamp(-1, 1)


class _WithExtraChannels(torch.nn.Module):
    """A UNet whose input gets fixed extra channels appended (an inpainting UNet's mask and masked image)."""

    def __init__(self, unet: UNetModel, extra: torch.Tensor):
        super().__init__()
        self.unet, self.extra = unet, extra

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **kwargs) -> torch.Tensor:
        extra = self.extra.repeat(x.shape[0] // self.extra.shape[0], 1, 1, 1)  # CFG doubles the batch
        return self.unet(torch.cat([x, extra], dim=1), t, context, **kwargs)


def _expand_negative(negative_prompt: str | list[str] | None, n: int) -> list[str]:
    if negative_prompt is None:
        return [""] * n
    if isinstance(negative_prompt, str):
        return [negative_prompt] * n
    if len(negative_prompt) != n:
        raise ValueError(f"negative_prompt has {len(negative_prompt)} entries but there are {n} prompts; give one per prompt or a single string")
    return list(negative_prompt)


def _seeds_for(seed: int | list[int] | None, n: int, generator: torch.Generator | None) -> list[int | None]:
    if generator is not None:
        if seed is not None:
            raise ValueError("give seed or generator, not both (a generator's noise does not follow the seeds)")
        return [None] * n  # the noise comes from the generator, untouched here, as in diffusers
    if seed is None:
        return torch.randint(0, 2**31 - 1, (n,)).tolist()
    seeds = [seed + i for i in range(n)] if isinstance(seed, numbers.Integral) else list(seed)
    if len(seeds) != n:
        raise ValueError(f"seed has {len(seeds)} entries but {n} images are requested (prompts x num_images_per_prompt); give one seed per image or a single int")
    for value in seeds:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63) (one per image: seed + i), got {value!r}")
    return [int(value) for value in seeds]
