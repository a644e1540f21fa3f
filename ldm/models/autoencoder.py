"""``AutoencoderKL``: the LightningModule that trains the KL autoencoder (the "first stage")."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm.formats.weights import check_block_count, check_config_fits, load_checked
from ldm.models.autoencoder_loss import AutoencoderLoss
from ldm.models.image_logging import log_image_grid
from ldm.models.nonfinite_loss import NonFiniteLossSkipping
from ldm.formats.ldm_folder import VAE_WEIGHTS as WEIGHTS_NAME
from ldm.formats.ldm_folder import load_weights, read_vae_folder, write_model_folder
from ldm.nn.autoencoder import KLAutoencoder
from ldm.nn.configs import AutoencoderConfig

log = logging.getLogger(__name__)

DISCRIMINATOR_NAME = "discriminator.safetensors"


class AutoencoderKL(NonFiniteLossSkipping, pl.LightningModule):
    """KL-regularised autoencoder trained with reconstruction, KL and PatchGAN losses.

    Training uses manual optimisation with two Adam optimisers (autoencoder, discriminator).

    Args:
        vae: Shape of the autoencoder (:class:`~ldm.nn.configs.AutoencoderConfig`: ``ch``, ``ch_mult``,
            ``num_res_blocks``, ``z_channels``, ...); the defaults are Stable Diffusion's VAE.
        learning_rate: Adam learning rate of the autoencoder.
        disc_learning_rate: Adam learning rate of the discriminator (defaults to ``learning_rate``).
        adam_betas: Adam betas for both optimisers (SD uses 0.5, 0.9).
        reconstruction_loss: ``l1`` or ``l2`` pixel loss.
        kl_weight: Weight of the KL term (SD: 1e-6, with pixel loss summed per image).
        perceptual_weight: Weight of the LPIPS term; > 0 needs the backbone weights on disk (no download).
        lpips_net: LPIPS backbone: ``vgg``, ``alex`` or ``squeeze``.
        disc_weight: Weight of the adversarial term; 0 builds no discriminator.
        disc_start: Training batches before the discriminator and adversarial loss switch on.
        disc_ndf: Width of the discriminator's first layer.
        disc_layers: Stride-2 layers of the PatchGAN discriminator.
        scale_factor_batches: Training batches used at the end of fit to measure the latent scaling
            factor (1 / std of latents); 0 keeps the current value.
        num_logged_images: Images in the validation reconstruction grid.
        max_consecutive_nonfinite: A step whose autoencoder loss is NaN/inf (on any rank) is skipped without an
            update (a NaN/inf discriminator loss skips the discriminator's update) and counted
            (``train/nonfinite_steps``); this many such steps in a row stop training with an error naming the step
            and the likely causes. 0: never stop.
    """

    def __init__(
        self,
        vae: AutoencoderConfig = AutoencoderConfig(),  # noqa: B008 (frozen; jsonargparse shows it in --help)
        learning_rate: float = 1e-4,
        disc_learning_rate: float | None = None,
        adam_betas: tuple[float, float] = (0.5, 0.9),
        reconstruction_loss: str = "l1",
        kl_weight: float = 1e-6,
        perceptual_weight: float = 0.0,
        lpips_net: str = "vgg",
        disc_weight: float = 0.5,
        disc_start: int = 50001,
        disc_ndf: int = 64,
        disc_layers: int = 3,
        scale_factor_batches: int = 50,
        num_logged_images: int = 8,
        max_consecutive_nonfinite: int = 10,
    ):
        super().__init__()
        self.save_hyperparameters()
        if max_consecutive_nonfinite < 0:
            raise ValueError(f"max_consecutive_nonfinite={max_consecutive_nonfinite} must be >= 0 (0: never stop)")
        self.automatic_optimization = False
        config = AutoencoderConfig.coerce(vae)
        self.hparams["vae"] = config.to_dict()  # plain JSON in checkpoints (read back with weights_only=True)
        self.vae = KLAutoencoder(config)
        self.loss = AutoencoderLoss(
            reconstruction_loss=reconstruction_loss,
            kl_weight=kl_weight,
            perceptual_weight=perceptual_weight,
            lpips_net=lpips_net,
            disc_weight=disc_weight,
            disc_ndf=disc_ndf,
            disc_layers=disc_layers,
            in_channels=config.in_channels,
        )
        self.register_buffer("scaling_factor", torch.tensor(1.0))
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    # ----------------------------------------------------------------- inference helpers
    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> latents multiplied by the scaling factor (what a diffusion model sees)."""
        posterior = self.vae.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (clamped)."""
        return self.vae.decode_scaled(latents, self.scaling_factor).clamp(-1.0, 1.0)

    # ----------------------------------------------------------------- training
    @property
    def discriminator_active(self) -> bool:
        """Whether the current training batch uses the adversarial loss (after ``disc_start`` batches)."""
        if self.loss.discriminator is None:
            return False
        return self.trainer.fit_loop.total_batch_idx >= self.hparams.disc_start

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        optimizers = self.optimizers()
        opt_ae = optimizers[0] if isinstance(optimizers, list) else optimizers
        use_disc = self.discriminator_active

        limit = self.hparams.max_consecutive_nonfinite
        with self.toggled_optimizer(opt_ae):
            rec, posterior = self.vae(x)
            ae_loss, logs = self.loss.autoencoder_loss(x, rec, posterior, self.vae.decoder.conv_out.weight, use_disc)
            if not self.losses_finite(ae_loss):  # NaN/inf on some rank: no update on any (ldm.models.nonfinite_loss)
                self.record_step(False, limit)
                return
            opt_ae.zero_grad()
            self.manual_backward(ae_loss)
            opt_ae.step()

        finite = True
        if use_disc:
            opt_disc = optimizers[1]
            with self.toggled_optimizer(opt_disc):
                d_loss, d_logs = self.loss.discriminator_loss(x, rec)
                finite = self.losses_finite(d_loss)
                if finite:  # else no discriminator update, and the step counts as non-finite
                    opt_disc.zero_grad()
                    self.manual_backward(d_loss)
                    opt_disc.step()
            logs.update(d_logs)
        self.record_step(finite, limit)
        self.log("train/rec_loss", logs.pop("rec_loss"), prog_bar=True, batch_size=x.shape[0])
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=x.shape[0])

    def configure_optimizers(self):
        betas = tuple(self.hparams.adam_betas)
        opt_ae = torch.optim.Adam(self.vae.parameters(), lr=self.hparams.learning_rate, betas=betas)
        if self.loss.discriminator is None:
            return opt_ae
        disc_lr = self.hparams.learning_rate if self.hparams.disc_learning_rate is None else self.hparams.disc_learning_rate
        opt_disc = torch.optim.Adam(self.loss.discriminator.parameters(), lr=disc_lr, betas=betas)
        return [opt_ae, opt_disc]

    # ----------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        rec, posterior = self.vae(x, sample_posterior=False)
        _, logs = self.loss.autoencoder_loss(x, rec, posterior, self.vae.decoder.conv_out.weight, False)
        target, output = (x + 1) / 2, ((rec + 1) / 2).clamp(0, 1)
        self.val_psnr(output, target)
        self.val_ssim(output, target)
        n = x.shape[0]
        self.log("val/rec_loss", logs["rec_loss"], sync_dist=True, batch_size=n)
        self.log("val/psnr", self.val_psnr, prog_bar=True, batch_size=n)
        self.log("val/ssim", self.val_ssim, batch_size=n)
        if batch_idx == 0:
            k = min(self.hparams.num_logged_images, n)
            log_image_grid(self, "reconstructions", torch.cat([x[:k], rec[:k]]), nrow=k)

    # ----------------------------------------------------------------- scaling factor
    def on_train_end(self) -> None:
        if self.hparams.scale_factor_batches > 0 and self.trainer.datamodule is not None:
            loader = self.trainer.datamodule.train_dataloader()
            scale = self.measure_scaling_factor(loader, self.hparams.scale_factor_batches)
            log.info("latent scaling factor measured on the training data: %.5f", scale)

    @torch.no_grad()
    def measure_scaling_factor(self, dataloader, max_batches: int = 50) -> float:
        """Set ``scaling_factor`` to 1 / std of posterior samples over up to ``max_batches`` batches.

        Under DDP the moments are summed over ranks, so every rank stores the same value.
        """
        was_training = self.training
        self.eval()
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)  # count, sum, sum of squares
        for i, batch in enumerate(dataloader):
            if i >= max_batches:
                break
            z = self.vae.encode(batch["image"].to(self.device)).sample().double()
            stats += torch.stack([torch.tensor(z.numel(), dtype=torch.float64, device=z.device), z.sum(), z.pow(2).sum()])
        self.train(was_training)
        if self._trainer is not None and self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        if stats[0] == 0:
            raise ValueError("measure_scaling_factor got an empty dataloader")
        mean = stats[1] / stats[0]
        std = (stats[2] / stats[0] - mean**2).clamp_min(1e-12).sqrt()
        self.scaling_factor.fill_(float(1.0 / std))
        return float(self.scaling_factor)

    # ----------------------------------------------------------------- save / load
    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.json`` (constructor arguments + scaling factor), ``model.safetensors`` (the
        autoencoder, with Stable Diffusion's key names) and ``discriminator.safetensors`` if any."""
        # LightningCLI adds private entries such as `_class_path` to hparams: not constructor arguments. The shape is
        # written flat, as folders always held it.
        args = {k: v for k, v in self.hparams.items() if not k.startswith("_") and k != "vae"}
        config = {"_class_name": type(self).__name__, **self.vae.config.to_dict(), **args,
                  "scaling_factor": float(self.scaling_factor)}
        weights = {WEIGHTS_NAME: self.vae.state_dict()}
        if self.loss.discriminator is not None:
            weights[DISCRIMINATOR_NAME] = self.loss.discriminator.state_dict()
        return write_model_folder(path, config, weights)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> "AutoencoderKL":
        """Rebuild a model written by :meth:`save_pretrained`; ``overrides`` replace config values."""
        _, scaling_factor, config, folder = read_vae_folder(path, cls.__name__)  # checked; errors name file and key
        config = {**config, **overrides}
        training = set(inspect.signature(cls.__init__).parameters) - {"self", "vae"}
        vae_config = AutoencoderConfig.from_dict(config)
        state = load_weights(folder, WEIGHTS_NAME)
        source = str(folder / "config.json")  # a config that does not describe the weights allocates nothing
        check_block_count(vae_config.to_dict(), state, source, "num_res_blocks, ch_mult")
        check_config_fits(lambda: KLAutoencoder(vae_config), state, source)
        model = cls(vae=vae_config, **{k: v for k, v in config.items() if k in training})
        load_checked(model.vae, state, str(folder))
        if model.loss.discriminator is not None and (folder / DISCRIMINATOR_NAME).is_file():
            model.loss.discriminator.load_state_dict(load_weights(folder, DISCRIMINATOR_NAME))
        model.scaling_factor.fill_(scaling_factor)
        return model
