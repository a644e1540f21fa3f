"""CLIP score: how well images match their prompts, by a separate CLIP model with an image tower.

``100 * max(cos(image embedding, text embedding), 0)`` per image, averaged (Hessel et al. 2021, as torchmetrics'
``CLIPScore`` defines it). A thin wrapper of ``transformers.CLIPModel`` instead of torchmetrics' ``CLIPScore``, which
breaks on transformers v5 (``get_image_features`` returns an output object there) and refuses local folders whose
name lacks "openai". The model is a local folder (``save_pretrained`` output with its tokenizer) or a hub name
(``openai/clip-vit-large-patch14`` where the network allows). Images are resized (bicubic, shorter side) and
centre-cropped to the model's image size and normalised with its processor's mean and std (CLIP's when the folder
has no ``preprocessor_config.json``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ClipScorer"]

# OpenAI CLIP's image normalisation (the processor's defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _model_type(config_file: Path) -> str:
    import json

    try:
        return str(json.loads(config_file.read_text()).get("model_type"))
    except (ValueError, OSError, AttributeError) as exc:
        raise ValueError(f"{config_file} is not a readable JSON model config ({exc})") from None


def _embedding(output) -> torch.Tensor:
    """``get_image_features``/``get_text_features`` output as a tensor: transformers v4 returns one, v5 an output
    object whose ``pooler_output`` holds the projected embedding."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected CLIP feature output {type(output).__name__}")


class ClipScorer:
    """CLIP score with a ``transformers.CLIPModel``.

    Args:
        model: Local folder with the CLIP model and its tokenizer, or a hub name.
        device: Where to run it.

    Raises:
        FileNotFoundError: ``model`` is neither a folder with a CLIP model nor a name the hub (or its local cache)
            can provide.
        ValueError: the folder holds a model without an image tower (a text encoder alone).
    """

    def __init__(self, model: str | Path, device: str | torch.device = "cpu"):
        from transformers import AutoTokenizer, CLIPModel

        self.name = str(model)
        path = Path(model).expanduser()
        looks_local = path.exists() or self.name.startswith((".", "/", "~")) or self.name.count("/") != 1
        if looks_local and not path.is_dir():
            raise FileNotFoundError(f"CLIP model {self.name!r}: no such folder; give a folder written by "
                                    "CLIPModel.save_pretrained (with its tokenizer) or a hub name such as "
                                    "openai/clip-vit-large-patch14 (needs network or the hub cache)")
        if path.is_dir() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"CLIP model {self.name!r} has no config.json: give the folder that "
                                    "CLIPModel.save_pretrained wrote")
        if path.is_dir():
            model_type = _model_type(path / "config.json")
            if model_type != "clip":
                raise ValueError(f"CLIP model {self.name!r} is a {model_type!r} model, not a CLIPModel: the CLIP score "
                                 "needs CLIP's image tower too (a text encoder alone cannot score images)")
        source = str(path) if path.is_dir() else self.name
        try:
            self.model = CLIPModel.from_pretrained(source).to(device).eval().requires_grad_(False)
            self.tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            where = "the folder" if path.is_dir() else "the hub (offline machines cannot reach it)"
            error = ValueError if path.is_dir() else FileNotFoundError
            raise error(f"CLIP model {self.name!r} could not be loaded from {where}: {first}; give a folder with a "
                        "CLIPModel (config.json with a vision_config, weights, tokenizer files)") from None
        vision = self.model.config.vision_config
        self.image_size = int(vision.image_size)
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        if path.is_dir() and (path / "preprocessor_config.json").is_file():
            from transformers import CLIPImageProcessor

            processor = CLIPImageProcessor.from_pretrained(str(path))
            self.mean, self.std = tuple(processor.image_mean), tuple(processor.image_std)
            crop = getattr(processor, "crop_size", None)
            if isinstance(crop, dict) and "height" in crop:
                self.image_size = int(crop["height"])
        self.max_length = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images.float().clamp(-1, 1) + 1) / 2).to(self.device)
        h, w = x.shape[-2:]
        scale = self.image_size / min(h, w)
        size = (max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size]
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def per_image(self, images: torch.Tensor, prompts: list[str], batch_size: int = 64) -> np.ndarray:
        """``100 * max(cos, 0)`` of each image (N, 3, H, W) in [-1, 1] with its prompt."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores = []
        for start in range(0, len(images), batch_size):
            pixels = self._pixels(images[start : start + batch_size])
            tokens = self.tokenizer(list(prompts[start : start + batch_size]), padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            image = _embedding(self.model.get_image_features(pixel_values=pixels))
            text = _embedding(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                           attention_mask=tokens.get("attention_mask")))
            cos = F.cosine_similarity(image.float(), text.float(), dim=-1)
            scores.append((100 * cos.clamp(min=0)).double().cpu())
        return torch.cat(scores).numpy()

    def score(self, images: torch.Tensor, prompts: list[str], batch_size: int = 64) -> float:
        """The mean CLIP score of ``images`` with their ``prompts``."""
        return float(self.per_image(images, prompts, batch_size).mean())
