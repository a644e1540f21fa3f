"""``LatentDiffusion``: the LightningModule that trains a text-conditional UNet in a frozen VAE's latent space."""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import WeightAveraging
import torch
import torch.nn.functional as F

from ldm.data.fingerprints import text_encoder_fingerprint, vae_encoder_fingerprint
from ldm.diffusion import drop_captions, loss_weights, offset_noise, sample_latents, training_target
from ldm.formats.load import load_components
from ldm.formats.lightning_ckpt import (
    check_only_frozen_missing,
    components_from_hparams,
    frozen_state_keys,
    prepare_for_training,
    restorable_keys,
    without_dropped_encoder,
)
from ldm.models.frozen_weights import cast_frozen
from ldm.models.image_logging import log_image_grid, pad_to_common_size
from ldm.models.latent_data import check_precomputed, enable_latent_cache
from ldm.models.latent_diffusion_config import ObjectiveConfig, OptimizerConfig, ValidationConfig
from ldm.models.latent_export import save_trained
from ldm.models.lr_schedule import lr_factor
from ldm.models.nonfinite_loss import NonFiniteLossSkipping
from ldm.models.sdxl_training import sdxl_generation_conditioning, sdxl_training_conditioning
from ldm.nn.configs import UNET_DERIVED_FIELDS, TextEncoderConfig, UNetArchitecture
from ldm.nn.distributions import DiagonalGaussianDistribution
from ldm.nn.dual_text_encoder import DualTextEncoder
from ldm.nn.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS
from ldm.nn.speedups import CudaGraphSteps, channels_last_input, compile_in_place, compile_mode, to_channels_last, uses_cuda_graphs

log = logging.getLogger(__name__)


class LatentDiffusion(NonFiniteLossSkipping, pl.LightningModule):
    """Text-conditional latent diffusion: frozen autoencoder + CLIP text encoder + UNet + noise schedule.

    Args:
        autoencoder: Folder written by ``AutoencoderKL.save_pretrained`` (frozen; its scaling factor is used).
            Not needed with ``init_from``.
        unet: Shape of a new UNet (:class:`~ldm.nn.configs.UNetArchitecture`: the fields of ``UNetConfig``
            but the channels, which follow the VAE's latents and the text encoder's width); the default is SD v1.x's.
            Leave it at its default with ``init_from``.
        init_from: Fine-tune: start from this model (an SD single file ``.safetensors``/``.ckpt``, a diffusers
            folder, an ldm export or a LatentDiffusion ``.ckpt``); its UNet, VAE, text encoder, schedule and
            prediction type are used and ``autoencoder``/``unet``/``text_encoder`` must be left out.
        init_from_ema: Take the EMA weights of ``init_from`` when it has them.
        text_encoder: A pretrained CLIP text model to load with ``from_pretrained`` (a hub name such as
            ``openai/clip-vit-large-patch14`` where the network allows, or a local folder). When None,
            a small CLIP text model is built from ``text_encoder_config`` with the tokenizer in ``tokenizer``.
        tokenizer: Tokenizer folder for the small CLIP built when ``text_encoder`` is None
            (``ldm data tokenizer`` writes one); with ``init_from`` an SD single file, its tokenizer
            (such files hold none; default ``openai/clip-vit-large-patch14``, which needs network).
        text_encoder_config: Size of that small CLIP (:class:`~ldm.nn.configs.TextEncoderConfig`: ``hidden_size``,
            ``num_layers``, ``num_heads``, ...).
        text_encoder_layer: ``last`` or ``penultimate`` hidden layer as the context (SD 2.x: penultimate);
            ``None``: that of ``init_from`` (SD 2.x single files: penultimate), else ``last``.
        train_text_encoder: Train the text encoder jointly (needed for the small one); frozen otherwise.
        prediction_type: ``epsilon`` or ``v_prediction``; ``None``: that of ``init_from``, else ``epsilon``.
        objective: Noise schedule and training objective (:class:`ObjectiveConfig`: ``schedule``, ``num_timesteps``,
            ``loss_weighting``, ``noise_offset``, ``cond_dropout``, ...).
        optimizer: AdamW, its warm-up and NaN/inf losses (:class:`OptimizerConfig`: ``learning_rate``,
            ``weight_decay``, ``warmup_steps``, ``scale_lr``, ``max_consecutive_nonfinite``, ...).
        cache_dir: Where to cache VAE latents (and frozen text embeddings): handed with the frozen encoders to the
            DataModule's ``enable_latent_cache`` (``ImageCaptionDataModule``: centre crops without flips; one shard
            set per aspect-ratio bucket); None encodes every step.
        validation: Samples drawn at each validation (:class:`ValidationConfig`: ``prompts``, ``steps``, ``guidance``,
            ``sampler``, ``images_per_prompt``).
        lora_rank: LoRA rank; 0 trains all UNet weights (full fine-tune), > 0 freezes them and trains peft
            LoRA adapters on ``lora_targets`` only (fp32 even under mixed precision).
        lora_alpha: LoRA alpha (update scale ``alpha / rank``); ``None`` means ``lora_rank``.
        lora_targets: UNet layer names (or suffixes) that get adapters: the attention projections by default;
            add ``ff.net.0.proj`` and ``ff.net.2`` for the transformer blocks' feed-forward layers (more capacity
            to learn a new shape: the mirrored-digits demo), or resnet convolutions such as ``in_layers.2``.
        lora_text_encoder: Also put adapters on the text encoder's ``lora_text_encoder_targets`` (then text
            embeddings are not cached).
        lora_text_encoder_targets: Text-encoder layer names (or suffixes) that get adapters with
            ``lora_text_encoder``: the attention projections by default; add ``fc1`` and ``fc2`` for the MLPs (what
            kohya's sd-scripts adapt; the mirrored-digits demo learns its digits apart with them).
        lora_dropout: Dropout on the LoRA branch.
        lora_format: Layout of the exported adapter file: ``diffusers`` (``pytorch_lora_weights.safetensors``, what
            diffusers' ``load_lora_weights`` reads) or ``kohya`` (``<folder name>.safetensors`` with ``lora_unet_*`` /
            ``lora_te_*`` keys, what A1111, Forge and ComfyUI load). ``pipe.load_lora`` reads both.
        gradient_checkpointing: Recompute UNet block activations in the backward pass (less memory, ~30% slower).
        compile: ``torch.compile`` the UNet (in place: checkpoints and exports keep their keys) for training and
            validation sampling: ``true`` (mode ``default``) or a mode, ``reduce-overhead`` (CUDA graphs),
            ``max-autotune``, ``max-autotune-no-cudagraphs``. The first steps compile. On a GPU it is faster; on a CPU
            an SD-shaped UNet's step takes ~3 minutes to compile and then runs no faster (0.9x): leave it off there.
        channels_last: Keep the UNet's convolution weights and its input in channels_last (NHWC) layout: faster
            convolutions on tensor-core GPUs with bf16/fp16, no gain on a CPU. Values and saved keys are unchanged.
        frozen_dtype: Store frozen weights (VAE, frozen text encoder, the UNet base under LoRA) in ``bf16`` or
            ``fp16`` to save memory; use with ``--trainer.precision bf16-mixed``/``16-mixed``. ``None`` keeps fp32.
        vae_encoder: Build the VAE's encoder. ``False`` (for training from precomputed latents): the decoder only;
            the encoder's weights are read from the VAE's file just to hash them for the fingerprint check, and are
            never built, moved to the device or written to checkpoints (an export re-reads them from the source).
            ``None``: ``False`` when ``ldm fit`` trains on ``PrecomputedLatentsDataModule``, else ``True``.
        seed: Seed of the per-step noise, timesteps and caption dropout (derived from it and the step,
            so a resumed run draws exactly what an uninterrupted one would).
        encode_repeated_captions_once: Run a caption repeated in a batch through the text encoder once, when it is
            encoded in the step (trained, or not cached): the same context; a trained encoder's gradient sums the
            shared row's uses in another order, so the low bits differ from ``false``. Fine-tuning sets have few
            distinct captions (DreamBooth: two), where this is much faster; ``false`` repeats runs made before it
            bit for bit (the digits demo config, whose published figures were measured so).

    The grouped settings (``objective``, ``optimizer``, ``validation``, ``text_encoder_config``) take their config or a
    dict of its fields; ``hparams`` (and so checkpoints) hold them as dicts, the module as ``self.objective``,
    ``self.optimizer_config`` and ``self.validation``.

    SDXL (``init_from`` an SDXL model, two text encoders): the context is both encoders' tokens and the UNet's vector
    input the pooled embedding with each sample's size micro-conditioning (the batches' ``size_conditioning``, the
    training resolution as the target); caption dropout zeroes both embeddings; ``lora_text_encoder`` adapts both
    encoders (``ldm.models.sdxl_training``).

    Precomputed latents: batches that carry ``moments`` (``PrecomputedLatentsDataModule``, from ``ldm data encode``)
    are trained on without encoding images, and batches that carry ``context`` without running a frozen text
    encoder (caption dropout then swaps in the stored empty-prompt embedding, as the cache path does; a trained text
    encoder ignores ``context``). At set-up the datamodule's ``encoder_fingerprint`` (and text-encoder fingerprint)
    must match this model's, else training is refused (with ``frozen_dtype`` the fingerprints are taken from the
    fp32 weights at construction). ``ldm fit`` on such data builds the VAE without its encoder (``vae_encoder``);
    its decoder draws the validation samples.
    """

    nonfinite_setting = "optimizer.max_consecutive_nonfinite"  # named by NonFiniteLossError

    def __init__(
        self,
        autoencoder: str | None = None,
        unet: UNetArchitecture = UNetArchitecture(),  # noqa: B008 (frozen)
        init_from: str | None = None,
        init_from_ema: bool = True,
        text_encoder: str | None = None,
        tokenizer: str | None = None,
        text_encoder_config: TextEncoderConfig | None = None,
        text_encoder_layer: str | None = None,
        train_text_encoder: bool = False,
        prediction_type: str | None = None,
        objective: ObjectiveConfig = ObjectiveConfig(),  # noqa: B008 (frozen; jsonargparse shows it in --help)
        optimizer: OptimizerConfig = OptimizerConfig(),  # noqa: B008
        cache_dir: str | None = None,
        validation: ValidationConfig = ValidationConfig(),  # noqa: B008
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_targets: list[str] = list(UNET_TARGETS),  # noqa: B006
        lora_text_encoder: bool = False,
        lora_text_encoder_targets: list[str] = list(TEXT_ENCODER_TARGETS),  # noqa: B006
        lora_dropout: float = 0.0,
        lora_format: Literal["diffusers", "kohya"] = "diffusers",
        gradient_checkpointing: bool = False,
        compile: bool | str = False,
        channels_last: bool = False,
        frozen_dtype: str | None = None,
        seed: int = 0,
        vae_encoder: bool | None = None,
        encode_repeated_captions_once: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.objective = ObjectiveConfig.coerce(objective)
        self.optimizer_config = OptimizerConfig.coerce(optimizer)
        self.validation = ValidationConfig.coerce(validation)
        text_config = None if text_encoder_config is None else TextEncoderConfig.coerce(text_encoder_config).to_dict()
        if isinstance(unet, dict):
            derived = sorted(set(unet) & set(UNET_DERIVED_FIELDS))
            if derived:
                raise ValueError(f"unet sets {derived}: a new UNet's channels follow the VAE's latents and the text "
                                 "encoder's width; leave them out")
            unet = UNetArchitecture(**unet)
        if init_from is not None and unet != UNetArchitecture():
            raise ValueError(f"init_from={init_from!r} brings its own VAE, UNet and text encoder; leave out ['unet']")
        # Plain JSON in checkpoints (read back with weights_only=True, which cannot unpickle dataclasses).
        self.hparams.update(objective=self.objective.to_dict(), optimizer=self.optimizer_config.to_dict(),
                            validation=self.validation.to_dict(), text_encoder_config=text_config,
                            unet=None if init_from is not None else unet.to_dict())
        if lora_rank < 0:
            raise ValueError(f"lora_rank={lora_rank} must be >= 0 (0 = full fine-tune)")
        if lora_format not in ("diffusers", "kohya"):
            raise ValueError(f"lora_format={lora_format!r}: choose 'diffusers' or 'kohya'")
        if frozen_dtype not in (None, "bf16", "fp16"):
            raise ValueError(f"frozen_dtype={frozen_dtype!r}; use 'bf16', 'fp16' or leave it out")

        parts = components_from_hparams(self.hparams, load_components, vae_encoder=vae_encoder is not False)
        self.prediction_type = parts.prediction_type
        self.autoencoder = parts.vae
        self.register_buffer("scaling_factor", torch.tensor(float(parts.scaling_factor)))
        self.text_encoder = parts.text_encoder
        self.unet = parts.unet
        self.schedule, self.sampler_config = parts.schedule, parts.sampler_config
        if init_from is not None:
            log.info("fine-tuning from %s (%s prediction, %s)", init_from, self.prediction_type, self.schedule.kind)
        self._fingerprints: dict[str, str] = {}
        if frozen_dtype is not None:  # the weights are about to be cast: hash the fp32 ones the encode used
            self._fingerprints = {"vae": vae_encoder_fingerprint(self.autoencoder)}
            if not train_text_encoder:
                self._fingerprints["text"] = text_encoder_fingerprint(self.text_encoder)
        prepare_for_training(self, self.hparams)  # freezing and LoRA adapters, as the checkpoint reader does
        if frozen_dtype is not None:
            cast_frozen([self.autoencoder, self.text_encoder, self.unet], {"bf16": torch.bfloat16, "fp16": torch.float16}[frozen_dtype])
        if gradient_checkpointing:
            self.unet.set_gradient_checkpointing(True)
        self._compile_mode = compile_mode(compile, "compile")
        if channels_last:
            to_channels_last(self.unet)
        if self._compile_mode is not None:
            compile_in_place(self.unet, self._compile_mode)
        self._empty_context: torch.Tensor | None = None

    # ----------------------------------------------------------------- conditioning
    @property
    def is_sdxl(self) -> bool:
        """Two text encoders and a UNet with vector conditioning (SDXL)."""
        return isinstance(self.text_encoder, DualTextEncoder)

    def encode_text(self, prompts: list[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> context (B, 77, D), by the text encoder; SDXL: (context, pooled (B, P)) of its two encoders.

        With ``encode_repeated_captions_once`` a prompt repeated in the batch is encoded once, unless the encoder is
        training with dropout, which must draw each row's mask on its own."""
        unique = list(dict.fromkeys(prompts))
        if (len(unique) == len(prompts) or not self.hparams.get("encode_repeated_captions_once", True)
                or _has_active_dropout(self.text_encoder)):
            return self._encode_text_rows(prompts)
        row_of = {p: i for i, p in enumerate(unique)}
        rows = torch.tensor([row_of[p] for p in prompts], device=self.device)
        encoded = self._encode_text_rows(unique)
        if self.is_sdxl:
            return encoded[0].index_select(0, rows), encoded[1].index_select(0, rows)
        return encoded.index_select(0, rows)

    def _encode_text_rows(self, prompts: list[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.is_sdxl:
            context, pooled = self.text_encoder.encode_with_pooled(prompts)
            return context.float(), pooled.float()
        return self.text_encoder.encode(prompts).float()

    def context_from_batch(self, batch: dict[str, Any], generator: torch.Generator, dropout: float) -> torch.Tensor:
        """Context of a batch's captions after caption dropout: the batch's ``context`` (precomputed or cached by the
        DataModule; dropped captions get the empty prompt's, stored with it) when it has one and the text encoder is
        frozen, else :meth:`encode_text`."""
        prompts = drop_captions(list(batch["text"]), dropout, generator, batch.get("caption_dropout"))
        if "context" not in batch or self.text_encoder.trainable:
            return self.encode_text(prompts)
        context = batch["context"].to(self.device, self.dtype)
        dropped = torch.tensor([p == "" for p in prompts], device=self.device)
        if dropped.any():
            context = torch.where(dropped[:, None, None], self._empty_prompt_context().to(context), context)
        return context

    def _empty_prompt_context(self) -> torch.Tensor:
        if self._empty_context is None:
            self._empty_context = self.encode_text([""])[0].detach()
        return self._empty_context

    def _step_generator(self, salt: int = 0) -> torch.Generator:
        """A generator seeded by (seed, global step, rank): resumed runs draw the same numbers."""
        g = torch.Generator(device=self.device)
        rank = self.trainer.global_rank if self._trainer is not None else 0
        g.manual_seed(self.hparams.seed * 1_000_003 + self.global_step * 1_009 + rank * 7 + salt)
        return g

    def latents_from_batch(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """Scaled latents: sampled from cached moments, or encoded from images with the frozen VAE."""
        if "moments" in batch:
            posterior = DiagonalGaussianDistribution(batch["moments"].float())
        else:
            posterior = self.vae_encode(batch["image"])
        return posterior.sample(generator) * self.scaling_factor

    @torch.no_grad()
    def vae_encode(self, images: torch.Tensor) -> DiagonalGaussianDistribution:
        """The frozen VAE's posterior of images in [-1, 1], in fp32 whatever dtype the VAE is stored in."""
        if self.autoencoder.encoder is None:
            raise RuntimeError(self._no_encoder_message("these batches hold images"))
        with torch.autocast(images.device.type, enabled=False):
            moments = self.autoencoder.encode(images.to(self.autoencoder.encoder.conv_in.weight.dtype)).moments
        return DiagonalGaussianDistribution(moments.float())

    @torch.no_grad()
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents (the VAE runs outside autocast, in its stored dtype)."""
        with torch.autocast(latents.device.type, enabled=False):
            return self.autoencoder.decode_scaled(latents.float(), self.scaling_factor).float().clamp(-1, 1)

    # ----------------------------------------------------------------- training
    def diffusion_loss(self, batch: dict[str, Any], generator: torch.Generator, dropout: float) -> torch.Tensor:
        x0 = self.latents_from_batch(batch, generator)
        b = x0.shape[0]
        if self.is_sdxl:
            f = self.autoencoder.downsampling_factor
            context, y = sdxl_training_conditioning(self, batch, generator, dropout, (x0.shape[-2] * f, x0.shape[-1] * f))
        else:
            context, y = self.context_from_batch(batch, generator, dropout), None
        noise = torch.randn(x0.shape, generator=generator, device=self.device, dtype=x0.dtype)
        if self.objective.noise_offset > 0:
            noise = offset_noise(noise, self.objective.noise_offset, generator)
        t = torch.randint(0, self.schedule.num_timesteps, (b,), generator=generator, device=self.device)
        alpha, sigma = self.schedule.alpha_sigma(t, x0.ndim, x0.dtype, self.device)
        x_t = alpha * x0 + sigma * noise
        if self.hparams.channels_last:
            x_t = channels_last_input(x_t)
        if uses_cuda_graphs(self._compile_mode):
            torch.compiler.cudagraph_mark_step_begin()  # a new training step: the last one's graph outputs are done
        output = self.unet(x_t, t, context) if y is None else self.unet(x_t, t, context, y=y)
        target = training_target(self.prediction_type, x0, noise, alpha, sigma)
        per_sample = F.mse_loss(output.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        snr = (alpha / sigma.clamp_min(1e-12)).pow(2).flatten()
        weights = loss_weights(self.objective.loss_weighting, snr, self.prediction_type, self.objective.snr_gamma)
        return (weights.to(per_sample) * per_sample).mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch, self._step_generator(), self.objective.cond_dropout)
        # NaN/inf on some rank: no weight update on any (the gradients are dropped; ldm.models.nonfinite_loss)
        if not self.skip_nonfinite_loss(loss, max_consecutive=self.optimizer_config.max_consecutive_nonfinite):
            self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["text"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        g = torch.Generator(device=self.device).manual_seed(self.hparams.seed + batch_idx)
        batch = {k: v for k, v in batch.items() if k != "caption_dropout"}  # no caption dropout in validation
        loss = self.diffusion_loss(batch, g, 0.0)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["text"]))

    def on_validation_epoch_end(self) -> None:
        v = self.validation
        if self.trainer.sanity_checking or self.trainer.global_rank != 0 or not v.prompts:
            return
        prompts = [p for p in v.prompts for _ in range(v.images_per_prompt)]
        images = self.generate(prompts, v.steps, v.guidance, v.sampler, self.hparams.seed)
        nrow = math.ceil(len(prompts) / v.images_per_prompt)
        log_image_grid(self, "samples", images, nrow=nrow if v.images_per_prompt > 1 else len(prompts))
        buckets = self._bucket_latent_sizes()
        if buckets:  # aspect-ratio buckets: the first prompt once at each training bucket's size, in one row
            samples = [self.generate(prompts[:1], v.steps, v.guidance, v.sampler, self.hparams.seed, latent_size=size)
                       for size in buckets]
            log_image_grid(self, "samples_buckets", pad_to_common_size(samples), nrow=len(samples))

    @torch.no_grad()
    def generate(self, prompts: list[str], steps: int = 20, guidance: float = 5.0, sampler: str = "dpmpp_2m", seed: int = 0,
                 latent_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """Sample one image per prompt; returns images in [-1, 1], (B, 3, H, W).

        ``latent_size``: latent side, or ``(height, width)``; None: the training image size's (a square).
        """
        was_training = self.training
        self.eval()
        size = self._latent_size() if latent_size is None else latent_size
        height, width = (size, size) if isinstance(size, int) else size
        if self.is_sdxl:
            f = self.autoencoder.downsampling_factor
            context, uncond, y, uncond_y = sdxl_generation_conditioning(self, prompts, height * f, width * f)
            vectors = {"y": y.float(), "uncond_y": uncond_y.float()}
        else:
            context, uncond, vectors = self.text_encoder.encode(prompts), self.text_encoder.encode([""] * len(prompts)), {}
        g = torch.Generator(device=self.device).manual_seed(seed)
        # Half-precision frozen weights need autocast (Lightning's covers only the steps, not this hook).
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.hparams.frozen_dtype)
        with torch.autocast(self.device.type, dtype=half or torch.bfloat16, enabled=half is not None):
            unet = CudaGraphSteps(self.unet) if uses_cuda_graphs(self._compile_mode) else self.unet
            latents = sample_latents(unet, context.float(), uncond.float(), self.schedule, self.prediction_type,
                                     (self.autoencoder.latent_channels, height, width), steps, guidance, sampler, generator=g,
                                     config=self.sampler_config, **vectors)
        images = self.vae_decode(latents)
        self.train(was_training)
        return images

    def _latent_size(self) -> int:
        dm = self.trainer.datamodule if self._trainer is not None else None
        image_size = getattr(dm, "image_size", 32)
        return image_size // self.autoencoder.downsampling_factor

    def _bucket_latent_sizes(self) -> list[tuple[int, int]]:
        """Latent ``(height, width)`` of each aspect-ratio bucket the training images use (the DataModule's
        ``bucket_counts``); empty without buckets or when every image is in the square one."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        counts = getattr(dm, "bucket_counts", None) or {}
        square = (getattr(dm, "image_size", None),) * 2
        f = self.autoencoder.downsampling_factor
        return [(h // f, w // f) for h, w in counts] if set(counts) - {square} else []

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        config = self.optimizer_config
        scale = 1.0
        if config.scale_lr:
            dm = self.trainer.datamodule
            global_batch = dm.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches
            scale = global_batch / config.base_batch_size
        lr = config.learning_rate * scale
        # Fused AdamW: on CUDA no parameter-sized temporary in the step (3.2 GiB less peak for a full SD 1.5 fine-tune,
        # see benchmarks/sd15_finetune_memory.py); on a CPU about 4-5x faster than the per-parameter loop.
        # Not with gradient clipping: Lightning's mixed-precision plugin refuses to clip for a fused optimiser (it
        # unscales gradients internally), so clipped runs keep the per-parameter AdamW.
        clipping = bool(getattr(self._trainer, "gradient_clip_val", None)) if self._trainer is not None else False
        fused = self.device.type in ("cuda", "cpu") and all(p.dtype == torch.float32 for p in params) and not clipping
        groups = [{"params": params}]
        if config.text_encoder_learning_rate is not None:
            text = {id(p) for p in self.text_encoder.parameters()}
            groups = [{"params": [p for p in params if id(p) not in text]},
                      {"params": [p for p in params if id(p) in text], "lr": config.text_encoder_learning_rate * scale}]
            groups = [g for g in groups if g["params"]]
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(config.adam_betas), weight_decay=config.weight_decay,
                                fused=fused or None)
        total = int(self.trainer.estimated_stepping_batches) if config.lr_decay != "constant" else 0
        shape = partial(lr_factor, warmup_steps=config.warmup_steps, total_steps=total, decay=config.lr_decay,
                        final_ratio=config.final_lr_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, shape)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----------------------------------------------------------------- resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Our noise, timesteps and caption dropout use per-step generators and the data loader seeds its own
        # draws per batch; what else draws from the global RNG (dropout layers, e.g. LoRA dropout) continues
        # from here on resume.
        checkpoint["ldm_rng_state"] = torch.get_rng_state()
        image_size = getattr(self.trainer.datamodule, "image_size", None)
        if image_size:  # the sample size of a pipeline loaded from this .ckpt, whatever the DataModule
            checkpoint["ldm_image_size"] = int(image_size)

        # A fine-tune re-reads its frozen weights from init_from: keep them out of the checkpoint (a LoRA
        # checkpoint then holds the adapters and optimiser state only). Not with weight averaging, whose
        # callback reloads the whole module strictly.
        if self.hparams.init_from is not None and not any(isinstance(cb, WeightAveraging) for cb in self.trainer.callbacks):
            frozen = frozen_state_keys(self)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
            checkpoint["ldm_frozen_keys_omitted"] = len(frozen)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "ldm_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["ldm_rng_state"])
        state = checkpoint["state_dict"] = without_dropped_encoder(self.autoencoder, checkpoint["state_dict"])
        if "ldm_frozen_keys_omitted" in checkpoint or set(self.state_dict()) - set(state):
            check_only_frozen_missing(self, state, "the checkpoint", restorable_keys(self, self.hparams))
            self.strict_loading = False

    def load_trained_state(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load a checkpoint's ``state_dict``; it may lack the weights this model re-read from its sources at
        construction (:func:`~ldm.formats.lightning_ckpt.restorable_keys`)."""
        state = without_dropped_encoder(self.autoencoder, state)
        check_only_frozen_missing(self, state, source, restorable_keys(self, self.hparams))
        self.load_state_dict(state, strict=False)

    # ----------------------------------------------------------------- data holding latents
    def setup(self, stage: str) -> None:
        """Check precomputed latents' encoders, or with ``cache_dir`` hand the frozen encoders to the DataModule's
        latent cache (:func:`ldm.models.latent_data.enable_latent_cache`) when fitting."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        if getattr(dm, "encoder_fingerprint", None) is not None:
            empty = check_precomputed(self, dm)
        elif self.autoencoder.encoder is None and dm is not None:
            raise ValueError(self._no_encoder_message(f"{type(dm).__name__} serves images, not precomputed latents"))
        elif stage == "fit" and self.hparams.cache_dir is not None and dm is not None:
            empty = enable_latent_cache(self, dm)
        else:
            return
        if empty is not None:
            self._empty_context = empty

    def _no_encoder_message(self, why: str) -> str:
        return (f"this LatentDiffusion was built without its VAE's encoder (vae_encoder=False), but {why}: leave "
                "--model.init_args.vae_encoder unset (or true), or train from 'ldm data encode' output with "
                "--data ldm.data.PrecomputedLatentsDataModule")

    def frozen_fingerprints(self, text: bool = True) -> dict[str, str]:
        """Fingerprints of the VAE encoder (``vae``) and, when frozen and ``text``, the text encoder (``text``), as
        ``ldm data encode`` records them."""
        if "vae" not in self._fingerprints:
            self._fingerprints["vae"] = vae_encoder_fingerprint(self.autoencoder)
        if text and not self.text_encoder.trainable and "text" not in self._fingerprints:
            self._fingerprints["text"] = text_encoder_fingerprint(self.text_encoder)
        return self._fingerprints

    # ----------------------------------------------------------------- export
    @property
    def is_lora(self) -> bool:
        return self.hparams.lora_rank > 0

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the trained model where ``path`` says (:func:`ldm.models.latent_export.save_trained`).

        Full training or fine-tuning: a folder a pipeline loads (``unet/``, ``vae/``, ``text_encoder/``,
        ``tokenizer/``, ``scheduler/``, ``model_index.json``; safetensors and JSON; after ``fit`` with the EMA
        callback the module holds the EMA weights, so those are written). LoRA: only the adapters, as
        ``pytorch_lora_weights.safetensors`` in the folder (diffusers' ``load_lora_weights`` file name and key
        layout; ``pipe.load_lora`` reads it), or with ``lora_format="kohya"`` ``<folder name>.safetensors`` in
        kohya's layout, plus ``lora_info.json`` naming the base model.
        """
        return save_trained(self, path)


def _has_active_dropout(module: torch.nn.Module) -> bool:
    """Whether a forward pass of ``module`` now draws dropout masks: a dropout layer with p > 0, or a transformers
    model whose config asks for (attention) dropout, in training mode."""
    for m in module.modules():
        if not m.training:
            continue
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        config = getattr(m, "config", None)
        if config is not None and any(getattr(config, name, 0) or 0 for name in ("attention_dropout", "dropout", "hidden_dropout")):
            return True
    return False
