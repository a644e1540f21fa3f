"""Memory-saving decode for large images: the autoencoder decodes overlapping latent tiles, blended linearly."""

from __future__ import annotations

import torch

from ldm.nn.autoencoder import KLAutoencoder


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(n: int, overlap: int, at_start: bool, at_end: bool) -> torch.Tensor:
    w = torch.ones(n)
    if overlap > 0:
        edge = torch.linspace(0, 1, overlap + 2)[1:-1]
        if not at_start:
            w[:overlap] = edge
        if not at_end:
            w[-overlap:] = edge.flip(0)
    return w


@torch.no_grad()
def tiled_decode(vae: KLAutoencoder, z: torch.Tensor, tile: int = 32, overlap: int = 8, scaling_factor: float = 1.0) -> torch.Tensor:
    """Decode (B, C, H, W) latents, scaled by ``scaling_factor``, in ``tile`` x ``tile`` pieces overlapping by
    ``overlap`` latents (:meth:`~ldm.nn.autoencoder.KLAutoencoder.decode_scaled` of each; not clamped).

    Peak memory follows the tile, not the image. The mid-block attention then sees one tile at a time,
    so the result differs slightly from a whole decode; the overlaps are cross-faded to hide seams.
    """
    b, _, h, w = z.shape
    if h <= tile and w <= tile:
        return vae.decode_scaled(z, scaling_factor)
    f = vae.downsampling_factor
    overlap = min(overlap, tile // 2)
    stride = tile - overlap
    out = weight = None
    ys, xs = _starts(h, tile, stride), _starts(w, tile, stride)
    for y in ys:
        for x in xs:
            piece = vae.decode_scaled(z[:, :, y : y + tile, x : x + tile], scaling_factor)
            th, tw = piece.shape[-2:]
            wy = _ramp(th, overlap * f, y == ys[0], y == ys[-1])
            wx = _ramp(tw, overlap * f, x == xs[0], x == xs[-1])
            mask = (wy[:, None] * wx[None, :]).to(piece)
            if out is None:
                out = piece.new_zeros(b, piece.shape[1], h * f, w * f)
                weight = piece.new_zeros(1, 1, h * f, w * f)
            out[:, :, y * f : y * f + th, x * f : x * f + tw] += piece * mask
            weight[:, :, y * f : y * f + th, x * f : x * f + tw] += mask
    return out / weight
