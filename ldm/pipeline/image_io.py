"""Conversions between PIL images, arrays and tensors for the pipeline, and PNGs with generation metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin

from ldm.data.images import to_rgb

OUTPUT_TYPES = ("pil", "np", "pt")


def image_to_tensor(image: Image.Image | np.ndarray | torch.Tensor, name: str = "image") -> torch.Tensor:
    """A PIL image, an HxWx3 uint8/float array in [0, 1] or a (3, H, W)/(1, 3, H, W) tensor in [-1, 1] -> (1, 3, H, W) in [-1, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(to_rgb(image))
    if isinstance(image, np.ndarray):
        arr = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"{name} must be HxWx3, got an array of shape {image.shape}")
        return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2 - 1
    if isinstance(image, torch.Tensor):
        t = image[None] if image.ndim == 3 else image
        if t.ndim != 4 or t.shape[1] != 3:
            raise ValueError(f"{name} must be a (3, H, W) or (B, 3, H, W) tensor, got shape {tuple(image.shape)}")
        return t.float()
    raise TypeError(f"{name} must be a PIL image, a numpy array or a tensor, not {type(image).__name__}")


def mask_to_tensor(mask: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """A mask (white/1 = repaint, black/0 = keep) as (1, 1, H, W) floats in [0, 1]."""
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    if isinstance(mask, np.ndarray):
        arr = mask.astype(np.float32)
        if arr.ndim == 3:
            arr = arr.mean(axis=2)
        if arr.max() > 1.0:
            arr = arr / 255.0
        mask = torch.from_numpy(arr)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a PIL image, a numpy array or a tensor, not {type(mask).__name__}")
    while mask.ndim < 4:
        mask = mask[None]
    return mask.float().clamp(0, 1)


def mask_to_latent(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Downsample a pixel mask to latent size; a latent is repainted if any pixel under it is masked."""
    return (F.adaptive_max_pool2d(mask, latent_hw) > 0.5).float()


def tensor_to_output(images: torch.Tensor, output_type: str):
    """(B, 3, H, W) in [-1, 1] -> list of PIL images, a (B, H, W, 3) float array in [0, 1], or the tensor."""
    if output_type == "pt":
        return images.cpu()
    arr = ((images.float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return arr
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


def unused_path(path: str | Path) -> Path:
    """``path``, or when a file is there, the first free ``<stem>-<n><suffix>`` beside it (never overwrite)."""
    path = Path(path)
    n = 1
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def save_png_with_metadata(image: Image.Image, path: str | Path, metadata: dict[str, object]) -> Path:
    """Save a PNG whose text chunks hold the generation settings (one chunk per key, plus an A1111-style
    ``parameters`` chunk that popular SD UIs read). An existing file is never overwritten: the image goes to the
    first free name (:func:`unused_path`), which is returned."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, "" if value is None else str(value))
    settings = ", ".join(f"{k.replace('_', ' ').capitalize()}: {v}" for k, v in metadata.items() if k not in ("prompt", "negative_prompt"))
    info.add_text("parameters", f"{metadata.get('prompt', '')}\nNegative prompt: {metadata.get('negative_prompt') or ''}\n{settings}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    path = unused_path(path)
    image.save(path, pnginfo=info)
    return path
