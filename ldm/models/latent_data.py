"""How ``LatentDiffusion`` meets data that already holds latents: a DataModule that caches them (it is handed the
frozen encoders) and precomputed latents from ``ldm data encode`` (their encoders' fingerprints must match).

The data layer owns the samples: these helpers never touch a DataModule's datasets, they only call its API.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from ldm.data.fingerprints import text_encoder_fingerprint, vae_encoder_fingerprint

if TYPE_CHECKING:
    from ldm.models.latent_diffusion import LatentDiffusion

log = logging.getLogger(__name__)

__all__ = ["check_precomputed", "enable_latent_cache"]


def enable_latent_cache(model: LatentDiffusion, dm: Any) -> torch.Tensor | None:
    """Ask ``dm`` to serve cached VAE moments (and, with a frozen text encoder, text embeddings) under the model's
    ``cache_dir``, encoded by the model's frozen encoders on the strategy's device (collective under DDP).

    Returns:
        The cached empty-prompt embedding (for caption dropout), or None when no text embeddings are cached.
    """
    enable = getattr(dm, "enable_latent_cache", None)
    if enable is None:
        log.warning("cache_dir=%s is not used: %s has no enable_latent_cache, so it cannot cache latents",
                    model.hparams.cache_dir, type(dm).__name__)
        return None
    strategy = model.trainer.strategy
    device = strategy.root_device
    model.autoencoder.to(device)
    text: dict[str, Any] = {}
    if not model.text_encoder.trainable:
        model.text_encoder.to(device)
        text = {"encode_text": model.encode_text, "text_encoder_fingerprint": text_encoder_fingerprint(model.text_encoder)}

    def encode(images: torch.Tensor) -> torch.Tensor:
        return model.vae_encode(images).moments

    # The fingerprint of the weights as stored (a frozen_dtype copy encodes differently from the fp32 one).
    enabled = enable(model.hparams.cache_dir, encode, vae_encoder_fingerprint(model.autoencoder), device,
                     rank=strategy.global_rank, world_size=strategy.world_size,
                     barrier=lambda: strategy.barrier("ldm_latent_cache"), **text)
    return getattr(dm, "empty_context", None) if enabled else None


def check_precomputed(model: LatentDiffusion, dm: Any) -> torch.Tensor | None:
    """Refuse precomputed latents (and text embeddings) that another VAE (text encoder) wrote.

    Returns:
        The stored empty-prompt embedding when the stored text embeddings are used, else None.
    """
    root = getattr(dm, "root", "the datamodule")
    source = model.hparams.autoencoder or model.hparams.init_from
    theirs, text_theirs = dm.encoder_fingerprint, getattr(dm, "text_encoder_fingerprint", None)
    use_text = text_theirs is not None and not model.text_encoder.trainable
    mine = model.frozen_fingerprints(text=use_text)
    if theirs != mine["vae"]:
        raise ValueError(
            f"the precomputed latents in {root} were encoded by a VAE encoder with fingerprint {theirs}, but this "
            f"model's VAE ({source}) has fingerprint {mine['vae']}: its latent space differs. Re-encode with this "
            f"model's VAE: 'ldm data encode SRC --vae {source} --out NEW_DIR', and train from NEW_DIR."
        )
    empty = None
    if text_theirs is not None and not use_text:
        log.warning("the text encoder is trained, so the precomputed text embeddings in %s are not used (set "
                    "--data.init_args.text_embeddings false to stop reading them)", root)
    elif use_text:
        if text_theirs != mine["text"]:
            text_source = model.hparams.text_encoder or model.hparams.init_from or model.hparams.tokenizer
            raise ValueError(
                f"the precomputed text embeddings in {root} were written by a text encoder with fingerprint "
                f"{text_theirs}, but this model's frozen text encoder ({text_source}, layer {model.text_encoder.layer}) "
                f"has fingerprint {mine['text']}. Re-encode with this model's text encoder ('ldm data encode SRC "
                f"--vae {source} --text-encoder TEXT_ENCODER --out NEW_DIR'), or set --data.init_args.text_embeddings "
                "false to encode captions while training."
            )
        empty = getattr(dm, "empty_context", None)
    if model.hparams.cache_dir is not None:
        log.info("the latents are precomputed in %s; cache_dir is not used", root)
    info = getattr(dm, "info", {})
    if "scaling_factor" in info and abs(float(info["scaling_factor"]) - float(model.scaling_factor)) > 1e-6:
        log.info("the latents in %s were written with scaling factor %s; this model scales by its own, %s", root,
                 info["scaling_factor"], float(model.scaling_factor))
    return empty
