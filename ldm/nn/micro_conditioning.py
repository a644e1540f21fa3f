"""SDXL's micro-conditioning: the vector ``y`` that the UNet adds to its timestep embedding.

``y = [pooled text embedding, emb(original_h), emb(original_w), emb(crop_top), emb(crop_left), emb(target_h),
emb(target_w)]``, each ``emb`` the sinusoidal timestep embedding of one number (cosine half first, as SGM's
``ConcatTimestepEmbedderND`` and diffusers' ``add_time_proj`` compute it). Training records each image's original
size and crop; generation asks for ``original_size == target_size`` and no crop to get centred, full-resolution
looking images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ldm.nn.unet_blocks import timestep_embedding

Size = tuple[int, int]


def size_time_ids(original_size: Size, crops_coords_top_left: Size = (0, 0), target_size: Size | None = None) -> list[float]:
    """The six ids of one image: ``(height, width)`` of the original, ``(top, left)`` of the crop, ``(height, width)``
    of the target (None: the original's)."""
    target = original_size if target_size is None else target_size
    values = [*original_size, *crops_coords_top_left, *target]
    if len(values) != 6 or any(not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 for v in values):
        raise ValueError(f"original_size, crops_coords_top_left and target_size must be pairs of numbers >= 0, got "
                         f"{original_size!r}, {crops_coords_top_left!r}, {target_size!r}")
    return [float(v) for v in values]


def time_ids_tensor(ids: Sequence[Sequence[float]], device: torch.device | None = None) -> torch.Tensor:
    """(B, n) float32 ids from one row per image."""
    return torch.tensor([list(row) for row in ids], dtype=torch.float32, device=device)


def sdxl_vector(pooled: torch.Tensor, time_ids: torch.Tensor, embed_dim: int) -> torch.Tensor:
    """The UNet's vector conditioning: ``pooled`` (B, P) followed by the ``embed_dim``-wide sinusoidal embedding of
    every id of ``time_ids`` (B, n), giving (B, P + n * embed_dim) in ``pooled``'s dtype."""
    if pooled.ndim != 2 or time_ids.ndim != 2 or pooled.shape[0] != time_ids.shape[0]:
        raise ValueError(f"expected pooled (B, P) and time_ids (B, n) of one batch, got {tuple(pooled.shape)} and "
                         f"{tuple(time_ids.shape)}")
    b = time_ids.shape[0]
    embedded = timestep_embedding(time_ids.reshape(-1).to(pooled.device), embed_dim).reshape(b, -1)
    return torch.cat([pooled, embedded.to(pooled.dtype)], dim=1)
