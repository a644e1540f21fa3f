"""``ldm data encode``: encode a dataset once, offline, with a frozen VAE (and text encoder) into precomputed latents.

The images are those training sees (the folder DataModule's records and split, centre crop or with ``buckets`` each
image's aspect-ratio bucket, no flip); the output
layout is described in :mod:`ldm.data.precomputed`, the resumable writing in :mod:`ldm.data.precomputed_writer`.
Train from it with ``--data ldm.data.PrecomputedLatentsDataModule --data.root DIR``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldm.data import ImageCaptionDataModule
from ldm.data.dataset import ImageCaptionDataset
from ldm.data.fingerprints import file_signature, fingerprint, text_encoder_fingerprint, vae_encoder_fingerprint
from ldm.data.precomputed import EMPTY_PROMPT_ID, FORMAT, SPLITS, TEXT_DIR
from ldm.data.precomputed_writer import PrecomputedWriter, caption_items, image_items
from ldm.models.autoencoder import AutoencoderKL
from ldm.formats.components import ModelComponents
from ldm.formats.load import load_components
from ldm.formats.text_encoder_files import load_text_encoder
from ldm.nn.autoencoder import KLAutoencoder
from ldm.nn.text_encoder import TextEncoder

__all__ = ["DTYPES", "EncodeSummary", "encode_dataset", "load_frozen_encoders"]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16}
SAME = "same"


@dataclass
class EncodeSummary:
    """What :func:`encode_dataset` did: the output's ``ldm_latents.json``, and the parts written by this call
    (by folder: ``train``, ``val``, ``text``; complete parts of an interrupted run are not written again)."""

    info: dict[str, Any]
    parts_written: dict[str, list[int]] = field(default_factory=dict)
    already_complete: bool = False


def load_frozen_encoders(vae: str | Path, text_encoder: str | None = None, text_encoder_layer: str | None = None
                         ) -> tuple[KLAutoencoder, float, int | None, TextEncoder | None]:
    """Load the VAE (and text encoder) to encode with.

    Args:
        vae: A folder written by ``AutoencoderKL.save_pretrained``, or any model :func:`load_components` reads (an
            ldm export, a diffusers folder, a LatentDiffusion ``.ckpt``, an SD single file): then its VAE.
        text_encoder: None (no text embeddings); ``"same"``: the text encoder of the model ``vae`` names (not
            with a VAE folder); else a CLIP text encoder folder or hub id ``load_text_encoder`` reads
            (e.g. an ldm or diffusers model folder, whose ``text_encoder/`` and ``tokenizer/`` are used).
        text_encoder_layer: ``last`` or ``penultimate``; None: the one recorded with the text encoder.

    Returns:
        The VAE (eval, fp32, CPU), its scaling factor, its training image size when known, and the text encoder.
    """
    path = Path(vae)
    parts: ModelComponents | None = None
    config_file = path / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("_class_name") == "AutoencoderKL":
        model = AutoencoderKL.from_pretrained(path, disc_weight=0.0)
        module, scaling, size = model.vae, float(model.scaling_factor), model.vae.config.resolution
    else:
        try:
            parts = load_components(path)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"--vae {vae}: not a VAE folder (written by AutoencoderKL.save_pretrained, with "
                                    f"config.json) nor a model: {error}") from error
        module, scaling, size = parts.vae, float(parts.scaling_factor), parts.sample_size
    encoder = None
    if text_encoder == SAME:
        if parts is None:
            raise ValueError(f"--text-encoder same takes the text encoder of the model given as --vae, but {vae} is a "
                             "VAE folder; give a text encoder folder instead")
        encoder = parts.text_encoder
        if text_encoder_layer is not None:
            encoder.layer = text_encoder_layer
    elif text_encoder is not None:
        encoder = load_text_encoder(text_encoder, layer=text_encoder_layer)
    if encoder is not None:
        encoder.freeze()
    return module.eval().requires_grad_(False), scaling, size, encoder


def _records_fingerprint(root: Path, splits: dict[str, list]) -> str:
    listing = {name: [(r.path, list(r.captions)) for r in records] for name, records in splits.items()}
    files = file_signature(root, [r.path for records in splits.values() for r in records])
    return fingerprint("records", listing, files)


def encode_dataset(src: str, vae: str | Path, out: str | Path, text_encoder: str | None = None,
                   text_encoder_layer: str | None = None, image_size: int | None = None, batch_size: int = 32,
                   device: str | None = None, dtype: str = "float32", chunk_bytes: str = "64MB", part_size: int = 4096,
                   data_dir: str = "data", val_fraction: float = 0.1, num_workers: int = 0, buckets: bool = False,
                   bucket_multiple: int = 64, bucket_max_ratio: float = 2.0, **folder_rules: Any) -> EncodeSummary:
    """Encode every training and validation image of ``src`` (and every distinct caption) into ``out``.

    Rerunning with the same arguments after an interruption encodes only the parts not yet complete; rerunning
    on a finished output returns its info without encoding anything.

    Args:
        src: Anything ``ImageCaptionDataModule(root=...)`` reads: a dataset folder or a built-in name.
        vae: See :func:`load_frozen_encoders`.
        out: Output folder (local; upload it to object storage afterwards to stream it from there).
        text_encoder: See :func:`load_frozen_encoders`; None writes no text embeddings.
        text_encoder_layer: See :func:`load_frozen_encoders`.
        image_size: Training image size (shorter side resized, centre crop); None: the VAE's training size.
        batch_size: Images (captions) per encoder call.
        device: ``cpu``, ``cuda``, ``cuda:1``...; None: cuda when available.
        dtype: Storage of moments and embeddings: ``float32`` (exact) or ``float16`` (half the size; the
            dataset returns float32 either way).
        chunk_bytes: Target size of a litdata chunk.
        part_size: Images per resumable part.
        data_dir: Where built-in datasets live.
        val_fraction: Validation share, as ``--data.val_fraction`` (train with the same value).
        num_workers: DataLoader processes decoding images.
        buckets: Encode each image at its aspect-ratio bucket (as ``--data.buckets true`` trains it) instead of the
            centre square: items then differ in latent shape, and ``ldm_latents.json`` records each item's bucket
            (``buckets``), by which ``PrecomputedLatentsDataModule`` batches them.
        bucket_multiple: Bucket sides are multiples of this (as ``--data.bucket_multiple``).
        bucket_max_ratio: Widest (and tallest) bucket aspect ratio (as ``--data.bucket_max_ratio``).
        folder_rules: ``follow_symlinks``, ``max_image_pixels`` (as ``--data.*``): what the folder scan accepts.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    module, scaling, vae_size, text = load_frozen_encoders(vae, text_encoder, text_encoder_layer)
    image_size = image_size or vae_size
    if not image_size:
        raise ValueError(f"{vae} does not record its training image size; pass --image-size")
    dm = ImageCaptionDataModule(root=src, data_dir=data_dir, image_size=image_size, crop="center", random_flip=False,
                                val_fraction=val_fraction, buckets=buckets, bucket_multiple=bucket_multiple,
                                bucket_max_ratio=bucket_max_ratio, **folder_rules)
    dm.prepare_data()
    dm.setup("fit")
    root = Path(dm.train_dataset.root)
    splits = {"train": list(dm.train_dataset.records), "val": list(dm.val_dataset.records)}
    split_sizes = {"train": dm.train_dataset.sizes, "val": dm.val_dataset.sizes}
    own_rates = sum("caption_dropout" in r.metadata for records in splits.values() for r in records)
    if own_rates:
        log.warning("%d images of %s have their own caption_dropout; precomputed latents do not keep it, so a training "
                    "on them drops every caption at objective.cond_dropout", own_rates, src)
    captions = [""] + sorted({c for records in splits.values() for r in records for c in r.captions} - {""})
    caption_ids = {c: i for i, c in enumerate(captions)} if text is not None else None

    plan = {
        "format": FORMAT,
        "source": str(root.resolve()),
        "records": _records_fingerprint(root, splits),
        "image_size": image_size,
        "encoder_fingerprint": vae_encoder_fingerprint(module),
        "text_encoder_fingerprint": text_encoder_fingerprint(text) if text is not None else None,
        "dtype": dtype,
        "part_size": part_size,
        "chunk_bytes": chunk_bytes,
    }
    if buckets:  # (only then, so that outputs written before buckets existed keep their plan)
        plan["buckets"] = [list(size) for size in dm.bucket_sizes]
    writer = PrecomputedWriter(out, plan, part_size=part_size, chunk_bytes=chunk_bytes)
    if writer.complete:
        log.info("%s already holds these latents; nothing to encode", out)
        return EncodeSummary(json.loads((Path(out) / "ldm_latents.json").read_text()), already_complete=True)
    writer.begin()

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module.to(device)
    storage = DTYPES[dtype]

    @torch.inference_mode()
    def encode_images(images: torch.Tensor) -> torch.Tensor:
        return module.encode(images.to(device)).moments.float()

    for name in SPLITS:
        records = splits[name]
        sizes = split_sizes[name]
        dataset = ImageCaptionDataset(root, records, image_size=image_size, crop="center", random_flip=False, train=False,
                                      sizes=sizes)
        writer.write(name, len(records), lambda start, stop: image_items(dataset, records, start, stop, encode_images, storage,
                                                                          batch_size, num_workers, caption_ids, sizes))
    latent_size = image_size // module.downsampling_factor
    info: dict[str, Any] = {
        "format": FORMAT,
        "source": str(src),
        "source_path": str(root.resolve()),
        "vae": str(vae),
        "encoder_fingerprint": plan["encoder_fingerprint"],
        "scaling_factor": scaling,
        "image_size": image_size,
        "latent_shape": [module.latent_channels, latent_size, latent_size],
        "moments_shape": [2 * module.latent_channels, latent_size, latent_size],
        "dtype": dtype,
        "val_fraction": val_fraction,
        "counts": {"train": len(splits["train"]), "val": len(splits["val"]), "captions": len(captions) if text is not None else 0},
        "text_encoder": None,
        "text_encoder_fingerprint": None,
        "buckets": None,
    }
    if buckets:  # latent_shape/moments_shape above are the square bucket's; each item has its own bucket's
        index = {size: b for b, size in enumerate(dm.bucket_sizes)}
        info["buckets"] = {"sizes": plan["buckets"], **{name: [index[s] for s in split_sizes[name]] for name in SPLITS}}
    if text is not None:
        text.to(device)

        @torch.inference_mode()
        def encode_texts(prompts: list[str]) -> torch.Tensor:
            return text.encode(prompts).float()

        writer.write(TEXT_DIR, len(captions), lambda start, stop: caption_items(captions, start, stop, encode_texts, storage,
                                                                                 batch_size))
        info.update(text_encoder=str(vae) if text_encoder == SAME else str(text_encoder),
                    text_encoder_fingerprint=plan["text_encoder_fingerprint"], text_encoder_layer=text.layer,
                    context_shape=[text.max_length, text.hidden_size], empty_prompt_id=EMPTY_PROMPT_ID)
    info = writer.finish(info)
    log.info("encoded %d training and %d validation images into %s", info["counts"]["train"], info["counts"]["val"], out)
    return EncodeSummary(info, writer.parts_written)
