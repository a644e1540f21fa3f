"""Short stable hashes of what determines an encoded result: inputs (files, their sizes and times) and encoders.

The latent cache (:mod:`ldm.data.latent_cache`) keys its folders with them, ``ldm data encode`` records them, and
``LatentDiffusion`` compares its own encoders' with the recorded ones before training on precomputed latents.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

__all__ = ["file_signature", "fingerprint", "text_encoder_fingerprint", "vae_encoder_fingerprint"]


def fingerprint(*parts: object, tensors: Iterable[torch.Tensor] = ()) -> str:
    """A short stable hash of JSON-able ``parts`` and the bytes of ``tensors``."""
    h = hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode())
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def vae_encoder_fingerprint(vae) -> str:
    """Hash of what turns images into posterior moments: a KL autoencoder's ``encoder_fingerprint()`` (its
    ``encoder`` and ``quant_conv`` weights as stored, or the hash of those it dropped when built without them).

    ``ldm data encode`` records it and ``LatentDiffusion`` compares it with its own VAE's before training on
    precomputed latents.
    """
    return vae.encoder_fingerprint()


def text_encoder_fingerprint(text_encoder) -> str:
    """Hash of what turns captions into context: a :class:`~ldm.nn.text_encoder.TextEncoder`'s weights, vocabulary,
    hidden layer and sequence length."""
    encoders = getattr(text_encoder, "encoders", None)
    if encoders is not None:  # SDXL's two text encoders
        return fingerprint("text-encoders", *[text_encoder_fingerprint(e) for e in encoders])
    vocab = sorted(text_encoder.tokenizer.get_vocab().items())
    return fingerprint("text-encoder", text_encoder.layer, text_encoder.max_length, vocab,
                       tensors=list(text_encoder.model.state_dict().values()))


def file_signature(root: Path, paths: Sequence[str]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of each file under ``root``: changes when a file is replaced or edited."""
    out = []
    for p in paths:
        st = os.stat(Path(root) / p)
        out.append((p, st.st_size, st.st_mtime_ns))
    return out
