"""``LatentDiffusionPipeline``: load an exported model folder and generate images from text."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ldm.diffusion import NoiseSchedule
from ldm.models.pretrained import load_weights, read_model_folder
from ldm.models.sampling import sample_latents
from ldm.nn.autoencoder import KLAutoencoder
from ldm.nn.text_encoder import TextEncoder
from ldm.nn.unet import UNetModel

_VAE_ARGS = ("in_channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels", "dropout", "mid_attention", "norm_groups")


@dataclass
class PipelineOutput:
    """Generated images and the seed of each."""

    images: list[Image.Image] | torch.Tensor
    seeds: list[int]


class LatentDiffusionPipeline:
    """Text-to-image generation with a UNet, a KL autoencoder and a CLIP text encoder."""

    def __init__(self, unet: UNetModel, vae: KLAutoencoder, text_encoder: TextEncoder, schedule: NoiseSchedule,
                 prediction_type: str, scaling_factor: float):
        self.unet, self.vae, self.text_encoder = unet.eval(), vae.eval(), text_encoder.eval()
        self.schedule, self.prediction_type, self.scaling_factor = schedule, prediction_type, scaling_factor
        self.sample_size = 8 * vae.downsampling_factor  # default image size; from_pretrained reads the trained one

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None) -> "LatentDiffusionPipeline":
        """Load a folder written by ``LatentDiffusion.save_pretrained`` (``model_index.json`` at its top)."""
        folder = Path(path)
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"{folder} has no model_index.json: pass a folder exported by ldm (e.g. checkpoints/demo)")
        index = json.loads((folder / "model_index.json").read_text())
        unet_config, _ = read_model_folder(folder / "unet", "UNetModel")
        unet_config.pop("_class_name")
        unet = UNetModel(**unet_config)
        unet.load_state_dict(load_weights(folder / "unet", "model.safetensors"))
        vae_config, _ = read_model_folder(folder / "vae", "AutoencoderKL")
        vae = KLAutoencoder(**{k: vae_config[k] for k in _VAE_ARGS if k in vae_config}, out_channels=vae_config.get("in_channels", 3),
                            embed_dim=vae_config.get("z_channels", 4))
        vae.load_state_dict(load_weights(folder / "vae", "model.safetensors"))
        text_encoder = TextEncoder.from_pretrained(str(folder), layer=index.get("text_encoder_layer", "last"))
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        prediction_type = sched.pop("prediction_type", "epsilon")
        sched.pop("_class_name", None)
        pipe = cls(unet, vae, text_encoder, NoiseSchedule.from_config(sched), prediction_type, float(vae_config.get("scaling_factor", 1.0)))
        pipe.sample_size = int(index.get("sample_size", 8 * vae.downsampling_factor))
        return pipe.to(device) if device is not None else pipe

    def to(self, device: str | torch.device) -> "LatentDiffusionPipeline":
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 25, guidance_scale: float = 5.0,
                 sampler: str = "dpmpp_2m", seed: int | list[int] | None = None, height: int | None = None,
                 width: int | None = None, output_type: str = "pil") -> PipelineOutput:
        """Generate one image per prompt; ``seed`` an int (seed, seed+1, ...) or one per prompt."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if seed is None:
            seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        elif isinstance(seed, int):
            seeds = [seed + i for i in range(len(prompts))]
        else:
            seeds = list(seed)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        factor = self.vae.downsampling_factor
        h, w = height or self.sample_size, width or height or self.sample_size
        if h % factor or w % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {h}x{w}")
        shape = (self.vae.latent_channels, h // factor, w // factor)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(self.device)
        context = self.text_encoder.encode(prompts)
        uncond = self.text_encoder.encode([""] * len(prompts))
        latents = sample_latents(self.unet, context, uncond, self.schedule, self.prediction_type, shape,
                                 num_inference_steps, guidance_scale, sampler, noise=noise)
        images = self.vae.decode(latents / self.scaling_factor).clamp(-1, 1)
        if output_type == "pt":
            return PipelineOutput(images.cpu(), seeds)
        arrays = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return PipelineOutput([Image.fromarray(a) for a in arrays], seeds)
